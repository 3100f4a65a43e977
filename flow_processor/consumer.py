"""The consumer-group member: poll record batches, aggregate per partition, flush to Redis."""

from __future__ import annotations

import logging
import random
import time

import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from flow_processor.aggregate import NS, PartitionState
from flow_processor.flows import FlowTable
from flow_processor.settings import ProcessorSettings
from flow_processor.sink import RedisSink
from packet_records import STATS_MAGIC, MalformedMessage, decode_batch, decode_stats

log = logging.getLogger("flow_processor")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
TRIM_EVERY_FLUSHES = 60  # top-N sets are trimmed to TOP_FLOWS_KEPT this often


class Processor:
    def __init__(self, settings: ProcessorSettings, sink: RedisSink,
                 exit_when_idle: float | None = None):
        self.settings = settings
        self.sink = sink
        self.topic = settings.kafka_topic
        self.deadletter_topic = f"{settings.kafka_topic}.deadletter"
        self.exit_when_idle = exit_when_idle
        self.states: dict[int, PartitionState] = {}
        self.joined = False
        self.stop_requested = False
        self.paused = False
        self.records_per_message = 1000.0  # running estimate, to turn records into messages
        self.totals = {"records": 0, "messages": 0, "malformed_messages": 0, "flushes": 0,
                       "rejected_samples": 0, "write_errors": 0, "fenced": 0}
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": settings.kafka_group_id,
            "enable.auto.commit": False,  # offsets live in Redis with the data; see sink.py
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1500,
            "max.poll.interval.ms": 300000,
            "queued.min.messages": 100000,
            "queued.max.messages.kbytes": 262144,
            "fetch.queue.backoff.ms": 1,
            "error_cb": self._on_kafka_error,
        })
        # A separate client for watermark queries: on the group member they queue behind its
        # long-poll fetches (about 0.5 s each per partition).
        self.watermarks = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"{settings.kafka_group_id}.watermarks",
            "enable.auto.commit": False,
        })
        self.deadletter = Producer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 50,
        })

    # -- rebalance callbacks ---------------------------------------------------------------

    def _new_state(self, partition: int, stored: int | None) -> PartitionState:
        s = self.settings
        table = FlowTable(s.flow_idle_timeout_s * NS, s.flow_active_timeout_s * NS, s.max_flows)
        return PartitionState(partition, stored, table)

    def _stored_offset(self, partition: int) -> int | None:
        delay = 0.2
        while True:  # without the stored offset we cannot know where to start: wait for Redis
            try:
                return self.sink.stored_offset(partition)
            except REDIS_DOWN as exc:
                log.warning("Redis unavailable while taking partition %d (%s); retrying",
                            partition, exc)
                time.sleep(delay + random.random() * delay)
                delay = min(delay * 2, 5.0)

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            stored = self._stored_offset(tp.partition)
            tp.offset = stored if stored is not None else OFFSET_BEGINNING
            self.states[tp.partition] = self._new_state(tp.partition, stored)
        consumer.assign(partitions)
        self.joined = True
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [self.states[tp.partition] for tp in partitions if tp.partition in self.states]
        try:
            self.flush(revoked)
        except REDIS_DOWN as exc:  # the next owner resumes from the offsets stored in Redis
            log.warning("could not flush revoked partitions (%s); their next owner replays them",
                        exc)
        for tp in partitions:
            self.states.pop(tp.partition, None)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.states.pop(tp.partition, None)
        log.warning("lost partitions %s", sorted(tp.partition for tp in partitions))

    # -- messages --------------------------------------------------------------------------

    def handle(self, msg) -> None:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise RuntimeError(f"fatal Kafka error: {err}")
            log.warning("Kafka: %s", err)
            return
        state = self.states.get(msg.partition())
        offset = msg.offset()
        if state is None or (state.next_offset is not None and offset < state.next_offset):
            return  # not ours (any more), or already aggregated
        value = msg.value() or b""
        try:
            if value[:4] == STATS_MAGIC:
                _source, ts_ns, counters = decode_stats(value)
                state.add_stats(ts_ns, counters)
                state.next_offset = offset + 1
                return
            records, meta = decode_batch(value)
            before = state.records
            state.add_records(records, meta)
            count = state.records - before
            self.records_per_message += (count - self.records_per_message) * 0.05
            self.totals["records"] += count
        except MalformedMessage as exc:
            state.malformed_messages += 1
            self.totals["malformed_messages"] += 1
            self._set_aside(msg, value, str(exc))
        self.totals["messages"] += 1
        state.next_offset = offset + 1

    def _set_aside(self, msg, value: bytes, reason: str) -> None:
        if self.totals["malformed_messages"] <= 10:
            log.warning("malformed message at %s/%d@%d set aside: %s", self.topic,
                        msg.partition(), msg.offset(), reason)
        headers = {"source.topic": self.topic, "source.partition": str(msg.partition()),
                   "source.offset": str(msg.offset()), "error": reason}
        while True:
            try:
                self.deadletter.produce(self.deadletter_topic, value, key=msg.key(),
                                        headers=headers)
                break
            except BufferError:
                self.deadletter.poll(0.1)
        self.deadletter.poll(0)

    # -- flushing --------------------------------------------------------------------------

    def pending_records(self) -> int:
        return sum(s.records for s in self.states.values())

    def flush(self, states: list[PartitionState] | None = None) -> None:
        targets = [s for s in (states if states is not None else self.states.values()) if s.pending]
        if not targets:
            return
        result = self.sink.write(targets)
        commits = []
        for state in result.written:
            for flow in state.dirty_flows:
                flow.dirty = flow.new = flow.labels_changed = False
                flow.delta_bytes = flow.delta_packets = 0
            state.clear()
            state.base_offset = state.next_offset
            self.sink.expire_flows(state.table.expire(state.clock_ns))
            commits.append(TopicPartition(self.topic, state.partition, state.next_offset))
        for state, stored in result.fenced:
            # another member wrote this partition since we took it: drop ours, resume after theirs
            self.totals["fenced"] += 1
            log.warning("partition %d was written by another member; resuming at %s",
                        state.partition, stored)
            fresh = self._new_state(state.partition, stored)
            if self.states.get(state.partition) is state:
                self.states[state.partition] = fresh
                start = stored if stored is not None else OFFSET_BEGINNING
                self.consumer.seek(TopicPartition(self.topic, state.partition, start))
        self.totals["flushes"] += 1
        if self.totals["flushes"] % TRIM_EVERY_FLUSHES == 0:
            self.sink.trim_top()
        if result.rejected_samples or result.write_errors:
            self.totals["rejected_samples"] += result.rejected_samples
            self.totals["write_errors"] += result.write_errors
            self.sink.add_errors(result.rejected_samples, result.write_errors)
        if commits:  # Kafka's committed offsets only feed lag monitoring; Redis holds the truth
            try:
                self.consumer.commit(offsets=commits, asynchronous=True)
            except Exception as exc:  # noqa: BLE001 - a failed lag commit must not stop us
                log.debug("offset commit for monitoring failed: %s", exc)

    # -- the loop --------------------------------------------------------------------------

    def lag(self) -> int:
        """Messages in the topic not yet written to Redis by any member of the group."""
        partitions = sorted(self.watermarks.list_topics(self.topic, timeout=5)
                            .topics[self.topic].partitions)
        stored = self.sink.stored_offsets(partitions)
        lag = 0
        for partition, offset in zip(partitions, stored):
            low, high = self.watermarks.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=5, cached=False)
            lag += max(0, high - (offset if offset is not None else low))
        return lag

    def caught_up(self) -> bool:
        """Everything in the topic is written to Redis, whoever wrote it: every partition's
        stored offset (ours or another member's) has reached the partition's end."""
        if not self.joined or any(s.pending for s in self.states.values()):
            return False
        return self.lag() == 0

    def _record_lag(self) -> None:
        try:
            self.sink.record_lag(self.lag())
        except (REDIS_DOWN + (KafkaException,)) as exc:
            log.debug("consumer lag not recorded: %s", exc)

    def _safely_caught_up(self) -> bool:
        try:
            return self.caught_up()
        except REDIS_DOWN:
            return False

    def run(self) -> int:
        s = self.settings
        self.consumer.subscribe([self.topic], on_assign=self.on_assign,
                                on_revoke=self.on_revoke, on_lost=self.on_lost)
        flush_every = s.flush_interval_ms / 1000
        now = time.monotonic()
        next_flush, next_stats, last_message = now + flush_every, now + s.stats_interval_s, now
        backoff = 0.0
        retry_at = 0.0
        try:
            while not self.stop_requested:
                per_message = max(1.0, self.records_per_message)
                batch = max(1, min(10000, int(s.max_poll_records / per_message)))
                messages = self.consumer.consume(num_messages=batch, timeout=0.2)
                for msg in messages:
                    self.handle(msg)
                now = time.monotonic()
                if messages:
                    last_message = now
                due = now >= next_flush or self.pending_records() >= s.max_pending_records
                if due and now >= retry_at:
                    try:
                        self.flush()
                        next_flush = now + flush_every
                        if self.paused:
                            self.consumer.resume(self.consumer.assignment())
                            self.paused = False
                            log.info("Redis is back; resumed consuming")
                        backoff = 0.0
                    except REDIS_DOWN as exc:
                        backoff = min(max(backoff * 2, 0.5), 10.0)
                        retry_at = now + backoff * (0.5 + random.random())
                        if not self.paused:
                            self.consumer.pause(self.consumer.assignment())
                            self.paused = True
                        log.warning("Redis write failed (%s); paused, retrying in %.1f s",
                                    exc, retry_at - now)
                if now >= next_stats:
                    self.log_stats()
                    self._record_lag()
                    next_stats = now + s.stats_interval_s
                if (self.exit_when_idle is not None and now - last_message >= self.exit_when_idle
                        and not self.paused and self._safely_caught_up()):
                    log.info("idle for %.0f s with everything written: exiting",
                             self.exit_when_idle)
                    break
            if not self.paused:
                self.flush()
        finally:
            self.log_stats("final")
            self.deadletter.flush(10)
            self.consumer.close()
            self.watermarks.close()
        return 0

    def log_stats(self, prefix: str = "stats") -> None:
        flows = sum(len(st.table) for st in self.states.values())
        log.info("%s %s flows_in_memory=%d partitions=%s", prefix,
                 " ".join(f"{k}={v}" for k, v in self.totals.items()), flows, sorted(self.states))

    def _on_kafka_error(self, err: KafkaError) -> None:
        now = time.monotonic()
        if now - getattr(self, "_last_error_log", 0.0) > 10:
            self._last_error_log = now
            log.warning("Kafka: %s", err)
