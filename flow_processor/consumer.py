"""The consumer-group member: poll record batches, aggregate per partition, flush to Redis."""

from __future__ import annotations

import logging
import random
import time

import numpy as np
import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from flow_processor.aggregate import NS, PartitionState
from flow_processor.flows import FlowTable, evict_over_bound
from flow_processor.settings import ProcessorSettings
from flow_processor.sink import (
    REDIS_UNAVAILABLE,
    BackgroundWriter,
    RedisSink,
    redis_refusing,
)
from packet_records import (
    STATS_MAGIC,
    MalformedMessage,
    TimeLimits,
    decode_batch,
    decode_stats,
)
from packet_records.security import kafka_client_config

log = logging.getLogger("flow_processor")

REDIS_DOWN = REDIS_UNAVAILABLE
BACKLOG_FLUSH_FACTOR = 5  # behind on a backlog, flush at most this many intervals apart
# Nothing to read for this long: the newest minute of capture time joins the top-N windows
# before a newer minute starts (the end of a replay, a quiet network). Not on every empty poll:
# data still coming for a closed minute costs five sorted-set updates instead of one.
QUIET_S = 3.0
# A poll waits this long for a full batch. A partial one is topped up by more polls, up to
# POLL_FILL_S in all, while the partitions hold messages not fetched yet: records aggregated in
# bigger batches cost less (a flow many messages touch is updated once a batch), and the last
# poll of a backlog (the end of a replay) goes on at once. One poll of 0.2 s made the end of a
# replay wait about 0.4 s (that poll, then an empty one) before its flows went to Redis.
POLL_TIMEOUT_S = 0.05
POLL_FILL_S = 0.2
# A partition's decoded messages wait to be aggregated together until they hold this many
# records or a flush is due: a flow that many messages touch is updated once (65,000 short
# flows replayed end to end came in polls of about 4 messages a partition; aggregating a
# flush's worth at once took 0.5 of 2 CPU-seconds less).
AGGREGATE_RECORDS = 25_000
# A poll that comes back empty aggregates the waiting records of the partitions whose last
# aggregation created at least this many flows new to the partition's flow table per record
# with a 5-tuple (a scan: each record a flow of its own). Waiting spares nothing there, and a
# scan's records, the dearest to aggregate, would otherwise pile up for the end of a replay
# (a 1,000,000-flow scan: all in Redis 2.8 s after capture's exit instead of 1 s). Records of
# flows the table holds wait. Distinct flows per record would not tell: in a small batch they
# are nearly as many as the records on any busy network (a replay of 65,000 flows that each
# come back every second or so was aggregated message by message at its start).
SCAN_LIKE_NEW_FLOWS_PER_RECORD = 0.8
# A replay's end (capture marks it on every partition) read after the last records of every
# partition this member reads: the flows go to Redis at once (replay_read_to_end; no more
# often than every FLOWS_QUIET_S, and not while live records come, whatever marks the topic
# holds); read on some partitions, once nothing was read for FLOWS_QUIET_S; not at the next
# FLOW_WRITE_INTERVAL_MS either way (waiting for a quiet spell delayed the end of a replay by
# 0.1-0.2 s). Without the mark (a quiet network) after FLOWS_QUIET_LIVE_S: while capture is
# replaying a file, short gaps come and go (two busy cores), and a flow write at each split
# most flows of a replay across two writes (twice the Redis work); on live traffic of a few
# messages a second every poll gap would.
FLOWS_QUIET_S = 0.1
FLOWS_QUIET_LIVE_S = 1.0
# While only replayed records come (capture --pcap), the flow part waits for the replay's end
# (marked as above), up to this many FLOW_WRITE_INTERVAL_MS: a flow write in the middle of a
# replay writes most of its flows twice (65,000 short flows replayed in 4.5 s: Redis used 4.5
# CPU-seconds instead of 2.8, exit -> all in Redis 6.2-6.6 s instead of 4.7-5.1). Live records
# keep the interval; the flow tables' bound (MAX_FLOWS) holds either way.
REPLAY_FLOW_WRITE_FACTOR = 6
# While only replayed records come, the series part too is written up to this many
# FLUSH_INTERVAL_MS apart, as for a backlog: a replay is complete in Redis at its end either
# way (its last flush comes as soon as nothing is left to read), and each flush visits every
# flow it touched (65,000 flows replayed end to end: 5-6 flushes and 5.4-5.8 processor
# CPU-seconds at 1 s, 3 flushes and 4.2-5.0 at 5). Live records keep FLUSH_INTERVAL_MS.
REPLAY_FLUSH_FACTOR = 5
# Messages set aside are cut to this size: the dead-letter topic takes at most about 1 MB, and
# the first bytes are what tells what the message was.
MAX_SET_ASIDE_BYTES = 512 * 1024
# Past MAX_FLOWS (a flush is then due), the flow tables give up their oldest clean flows down to
# this share of it: room for the flows of the next reads before the next flush
EVICT_TO = 0.8
# Errors of one message the client cannot read: it is set aside and read past
UNREADABLE_MESSAGE = frozenset((KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG,
                                KafkaError.INVALID_MSG))
MALFORMED_LOG_LINES = 10  # then one line per MALFORMED_LOG_EVERY
MALFORMED_LOG_EVERY = 1000


def series_due(now: float, next_flush: float, every: float, behind: bool, live: bool) -> bool:
    """Is the series part's flush due at `now` (monotonic seconds), `next_flush` being one
    FLUSH_INTERVAL_MS (`every`) after the last? Caught up on live records: at next_flush.
    Behind on a backlog (the last poll came back full) or reading a replay only: up to
    BACKLOG_FLUSH_FACTOR or REPLAY_FLUSH_FACTOR intervals apart (fewer, bigger flushes)."""
    if behind:
        return now >= next_flush + (BACKLOG_FLUSH_FACTOR - 1) * every
    return now >= next_flush + (0 if live else (REPLAY_FLUSH_FACTOR - 1) * every)


def aggregate_now(waiting_records: int, new_flows_per_record: float,
                  poll_empty: bool) -> bool:
    """Are a partition's waiting records aggregated now (else at the next flush)? Once they
    hold AGGREGATE_RECORDS; when a poll comes back empty, also those of a partition whose
    last aggregation created mostly flows new to its flow table
    (SCAN_LIKE_NEW_FLOWS_PER_RECORD)."""
    return waiting_records >= AGGREGATE_RECORDS or (
        poll_empty and new_flows_per_record >= SCAN_LIKE_NEW_FLOWS_PER_RECORD)


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
                       "rejected_samples": 0, "write_errors": 0, "fenced": 0,
                       "set_aside_failed": 0, "offset_resets": 0, "flows_evicted": 0}
        # for pipeline:processor
        self.unwritten = {"set_aside_failed": 0, "offset_resets": 0, "flows_evicted": 0}
        self.idle = False  # nothing to read for QUIET_S: the newest minute may close
        self.replay_ended = False  # a replay's end was read since the last flow write
        self.live_read = False  # a live record batch was read since the last flow write
        self.live_series = False  # ... since the last flush
        self.writer = BackgroundWriter(sink)
        self.limits = TimeLimits(settings.live_time_window_s * NS, settings.max_time_ahead_s * NS)
        self.topic_id: str | None = None
        security = kafka_client_config(settings)
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            **security,
            "group.id": settings.kafka_group_id,
            "enable.auto.commit": False,  # offsets live in Redis with the data; see sink.py
            # An offset out of the topic's range is reported to us (handle), never reset
            # silently: it means the topic was recreated or its log reset.
            "auto.offset.reset": "error",
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
            **security,
            "group.id": f"{settings.kafka_group_id}.watermarks",
            "enable.auto.commit": False,
        })
        self.deadletter = Producer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            **security,
            "enable.idempotence": True,
            "enable.sparse.connections": False,  # no wait for a producer id (capture/producer.py)
            "linger.ms": 50,
            "error_cb": self._on_kafka_error,
        })
        self.admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers,
                                  **security})

    # -- rebalance callbacks ---------------------------------------------------------------

    def _new_state(self, partition: int, stored: tuple[int | None, int | None],
                   ) -> PartitionState:
        """A partition's state from its stored (series part, flow part) offsets."""
        s = self.settings
        table = FlowTable(s.flow_idle_timeout_s * NS, s.flow_active_timeout_s * NS, s.max_flows)
        return PartitionState(partition, stored[0], table, stored[1])

    def _stored_offsets(self, partition: int) -> tuple[int | None, int | None]:
        return self._wait_for_redis(lambda p: self.sink.stored_offset_pairs([p])[0], partition)

    def _stored_topic_id(self, partition: int) -> str | None:
        return self._wait_for_redis(lambda p: self.sink.stored_topic_ids([p])[0], partition)

    def _wait_for_redis(self, read, partition: int):
        delay = 0.2
        while True:  # without the stored offset we cannot know where to start: wait for Redis
            try:
                return read(partition)
            except REDIS_DOWN as exc:
                log.warning("Redis unavailable while taking partition %d (%s); retrying",
                            partition, exc)
                time.sleep(delay + random.random() * delay)
                delay = min(delay * 2, 5.0)

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        current_id = self._current_topic_id()
        for tp in partitions:
            stored = self._stored_offsets(tp.partition)
            state = self._new_state(tp.partition, stored)
            self.states[tp.partition] = state
            # from the flow part's offset: the messages up to the series part's count for the
            # flow part only (PartitionState.replayed)
            tp.offset = state.next_offset if state.next_offset is not None else OFFSET_BEGINNING
            if stored[0] is not None and stored[1] < stored[0]:
                log.info("partition %d: messages %d-%d are read again for the flow hashes and "
                         "top-N sets only (their series are written)", tp.partition, stored[1],
                         stored[0] - 1)
            if stored[0] is not None and current_id is not None:
                stored_id = self._stored_topic_id(tp.partition)
                if stored_id is not None and stored_id != current_id:
                    tp.offset = self._reset_to_earliest(
                        state, "the topic is not the one its stored offset belongs to")
            state.topic_id = current_id
        consumer.assign(partitions)
        self.joined = True
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [self.states[tp.partition] for tp in partitions if tp.partition in self.states]
        try:
            self.flush(revoked)
            self.settle()  # the next owner starts from what we stored: it must have landed
        except redis.RedisError as exc:  # the next owner resumes from the offsets stored in Redis
            if not redis_refusing(exc):
                raise
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

    def handle_all(self, messages: list) -> None:
        """Take a poll's messages. The record batches of a partition are validated one by one
        and wait (PartitionState.waiting) to be aggregated together, in offset order, once
        they hold AGGREGATE_RECORDS records, before a flush (aggregate_waiting) or, for a
        scan's records, when a poll finds nothing (aggregate_now): a flow that several of them
        touch is updated once (with many flows, each message of 1000 records touches 900)."""
        for msg in messages:
            self.handle(msg, queue=True)
        for state in self.states.values():
            if state.waiting and aggregate_now(state.waiting_records, state.new_flows_per_record,
                                               poll_empty=not messages):
                self._add_waiting(state)

    def aggregate_waiting(self, states: list[PartitionState] | None = None) -> None:
        """Aggregate what waits of these partitions (default: all): a flush is due."""
        for state in (states if states is not None else self.states.values()):
            if state.waiting:
                self._add_waiting(state)

    def _add_waiting(self, state: PartitionState) -> None:
        items, state.waiting, state.waiting_records = state.waiting, [], 0
        if len(items) == 1:
            records, meta = items[0][2], items[0][3]
        else:
            records = np.concatenate([item[2].array for item in items])
            meta, base = [], 0
            for item in items:
                meta += [(index + base, kind, text) for index, kind, text in item[3]]
                base += len(item[2])
        try:
            state.add_records(records, meta)
        except Exception as exc:  # noqa: BLE001 - a bug must not let one message stop us all
            log.exception("messages at %s/%d@%d-%d could not be processed", self.topic,
                          state.partition, items[0][0].offset(), items[-1][0].offset())
            for msg, value, _records, _meta in items:
                self._reject(state, msg, value, f"processing failed: {exc!r}"[:200])
            return
        for _msg, _value, message_records, _meta in items:
            count = len(message_records)
            self.records_per_message += (count - self.records_per_message) * 0.05
            self.totals["records"] += count

    def handle(self, msg, queue: bool = False) -> None:
        """Aggregate one message, or with queue validate it and add it to its partition's
        waiting messages (handle_all); one that is not valid is counted and set aside. Nothing
        a message holds can raise out of here."""
        err = msg.error()
        unreadable = None
        if err is not None:
            if err.fatal():
                raise RuntimeError(f"fatal Kafka error: {err}")
            state = self.states.get(msg.partition())
            if err.code() == KafkaError._AUTO_OFFSET_RESET and state is not None:
                self._seek(state.partition, self._reset_to_earliest(
                    state, f"offset {state.next_offset} is outside the topic ({err.str()})"))
                return
            if err.code() not in UNREADABLE_MESSAGE or msg.offset() is None or msg.offset() < 0:
                log.warning("Kafka: %s", err)
                return
            # a message the client cannot read (a compressed batch that will not decompress,
            # as a "decompression bomb"): counted and set aside as a stub like any other bad
            # message, then read past; the client alone would fetch it again forever
            unreadable = f"unreadable message: {err.str()}"[:200]
        state = self.states.get(msg.partition())
        if state is None:
            return  # not ours (any more)
        offset = msg.offset()
        if state.next_offset is not None and offset < state.next_offset:
            if unreadable:  # (the client would fetch it again and again)
                self._seek(state.partition, state.next_offset)
            return  # already aggregated
        if state.flow_base is None and state.flow_start is None:
            state.flow_start = offset
        value = b"" if unreadable else msg.value() or b""
        # before the series part's stored offset: read again for the flow part only
        replay = state.series_from is not None and offset < state.series_from
        try:
            if unreadable:
                raise MalformedMessage(unreadable)
            self._aggregate(state, msg, value, queue and not replay)
        except MalformedMessage as exc:
            self._reject(state, msg, value, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not let one message stop us all
            log.exception("message at %s/%d@%d could not be processed", self.topic,
                          msg.partition(), offset)
            self._reject(state, msg, value, f"processing failed: {exc!r}"[:200])
        if replay:
            state.replayed()
        self.totals["messages"] += 1
        state.next_offset = offset + 1
        state.last_read = offset
        if unreadable:
            self._seek(state.partition, offset + 1)

    def _aggregate(self, state: PartitionState, msg, value: bytes, queue: bool = False) -> None:
        ts_type, ts_ms = msg.timestamp()
        message_ns = ts_ms * 1_000_000 if ts_type != TIMESTAMP_NOT_AVAILABLE else None
        now_ns = time.time_ns()
        if value[:4] == STATS_MAGIC:
            _source, ts_ns, counters, replay_end = decode_stats(value, message_ns, now_ns,
                                                                self.limits)
            state.add_stats(ts_ns, counters)
            self.replay_ended |= replay_end
            state.at_replay_end |= replay_end
            return
        records, meta = decode_batch(value, message_ns, now_ns, self.limits)
        state.at_replay_end = False
        if not records.replay:
            self.live_read = self.live_series = True
        if queue:
            state.waiting.append((msg, value, records, meta))
            state.waiting_records += len(records)
            return
        before = state.records
        state.add_records(records, meta)
        count = state.records - before
        self.records_per_message += (count - self.records_per_message) * 0.05
        self.totals["records"] += count

    def read_past_markers(self) -> None:
        """Move a partition's offset past what the client read but does not hand over: the
        commit and abort markers of transactional producers, and aborted messages. Each takes
        an offset; without this the stored offset would stay short of the partition's end,
        the lag would never reach 0 and --exit-when-idle never exit. Only from the position
        after the last message this state read (a seek since then makes it wait for one)."""
        states = [s for s in self.states.values()
                  if s.last_read is not None and s.next_offset == s.last_read + 1]
        if not states:
            return
        try:
            positions = self.consumer.position(
                [TopicPartition(self.topic, s.partition) for s in states])
        except KafkaException as exc:
            log.debug("positions not read: %s", exc)
            return
        for state, tp in zip(states, positions):
            if tp.error is None and tp.offset > state.next_offset:
                state.next_offset = tp.offset

    def _reject(self, state: PartitionState, msg, value: bytes, reason: str) -> None:
        state.malformed_messages += 1
        self.totals["malformed_messages"] += 1
        n = self.totals["malformed_messages"]
        if n <= MALFORMED_LOG_LINES or n % MALFORMED_LOG_EVERY == 0:
            log.warning("malformed message at %s/%d@%d set aside (%d so far): %s", self.topic,
                        msg.partition(), msg.offset(), n, reason)
        self._set_aside(msg, value, reason)

    def _set_aside(self, msg, value: bytes, reason: str) -> None:
        """Copy a rejected message to the dead-letter topic. That can fail too (the broker
        refuses, the buffer stays full): then it is counted and logged, and we go on."""
        headers = {"source.topic": self.topic, "source.partition": str(msg.partition()),
                   "source.offset": str(msg.offset()), "error": reason}
        if len(value) > MAX_SET_ASIDE_BYTES:
            headers["truncated.from"] = str(len(value))
            value = value[:MAX_SET_ASIDE_BYTES]
        key = msg.key()
        if key is not None and len(key) > 1024:
            key = key[:1024]
        for _attempt in range(20):
            try:
                self.deadletter.produce(self.deadletter_topic, value, key=key, headers=headers,
                                        on_delivery=self._on_set_aside)
                self.deadletter.poll(0)
                return
            except BufferError:
                self.deadletter.poll(0.05)
            except (KafkaException, ValueError, TypeError) as exc:
                self._set_aside_failed(msg.partition(), msg.offset(), str(exc))
                return
        self._set_aside_failed(msg.partition(), msg.offset(), "dead-letter buffer full")

    def _on_set_aside(self, err, msg) -> None:
        if err is not None:
            headers = dict(msg.headers() or [])
            self._set_aside_failed(int(headers.get("source.partition", b"-1")),
                                   int(headers.get("source.offset", b"-1")), str(err))

    def _set_aside_failed(self, partition: int, offset: int, why: str) -> None:
        self._count("set_aside_failed", 1)
        log.error("could not set aside the malformed message at %s/%d@%d (%s): it is counted "
                  "and skipped", self.topic, partition, offset, why)

    # -- offsets that do not fit the topic ---------------------------------------------------

    def _current_topic_id(self) -> str | None:
        """The topic's id as the broker has it now (it changes when the topic is recreated)."""
        try:
            futures = self.admin.describe_topics(TopicCollection([self.topic]),
                                                 request_timeout=5)
            return str(futures[self.topic].result().topic_id)
        except Exception as exc:  # noqa: BLE001 - a broker without topic ids, or away: skip
            log.debug("topic id unknown: %s", exc)
            return None

    def _reset_to_earliest(self, state: PartitionState, why: str) -> int:
        """The documented policy for an offset that does not fit the topic: resume from the
        topic's earliest offset, say so loudly and count it. Returns that offset."""
        low = self.watermarks_of([state.partition], OffsetSpec.earliest())[state.partition]
        log.error("partition %d: %s; the topic was recreated or its log reset: resuming from its "
                  "earliest offset %d (what was counted before stays in Redis)",
                  state.partition, why, low)
        self._count("offset_resets", 1)
        state.restart_at_earliest(low)
        return low

    def _seek(self, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(self.topic, partition, offset))
        except KafkaException as exc:  # not fetching yet (inside on_assign): assign sets it
            log.debug("seek partition %d to %d: %s", partition, offset, exc)

    def reconcile(self) -> None:
        """Check every owned partition against Redis and the topic: a stored offset that moved
        (another member wrote, or Redis was emptied or rolled back) restarts the partition from
        it; a position past the topic's end, or offsets of another incarnation of the topic,
        reset it to the topic's earliest offset."""
        self.settle()  # a flush in flight has moved our offsets on already
        self.sink.ensure_series()
        failed = self.sink.drain_journal()  # entries another member left when it stopped
        self._count("write_errors", failed)
        owned = sorted(self.states)
        if not owned:
            return
        stored = self.sink.stored_offset_pairs(owned)
        topic_ids = self.sink.stored_topic_ids(owned)
        current_id = self._current_topic_id()
        for partition, offsets, topic_id in zip(owned, stored, topic_ids):
            state = self.states[partition]
            if offsets != (state.base_offset, state.flow_base) and not state.reset:
                log.warning("partition %d: Redis holds offsets %s, not %s (another member wrote, "
                            "or Redis was emptied or restored): resuming from them", partition,
                            offsets, (state.base_offset, state.flow_base))
                self._restart(state, offsets)
                continue
            if current_id and topic_id and topic_id != current_id and not state.reset:
                self._seek(partition, self._reset_to_earliest(
                    state, "the topic is not the one its stored offset belongs to"))
            if current_id:
                state.topic_id = current_id
                if (topic_id != current_id and not state.pending
                        and state.next_offset is not None):
                    state.reset = True  # store the id with the offset at the next flush

    def _restart(self, state: PartitionState, stored: tuple[int | None, int | None]) -> None:
        """Drop what we hold of a partition and consume it again from the stored offsets."""
        if self.states.get(state.partition) is not state:
            return
        new = self.states[state.partition] = self._new_state(state.partition, stored)
        self._seek(state.partition,
                   new.next_offset if new.next_offset is not None else OFFSET_BEGINNING)

    # -- flushing --------------------------------------------------------------------------

    def pending_records(self) -> int:
        return sum(s.records + s.waiting_records for s in self.states.values())

    def flows_in_memory(self) -> int:
        return sum(len(s.table) for s in self.states.values())

    def flush(self, states: list[PartitionState] | None = None, flows: bool = True) -> None:
        """Write what these partitions (default: all) hold, the flow part too with flows: wait
        for the previous flush to land (raising its Redis error, if any, to be retried), then
        build this one and send it on the writer thread while the loop reads on."""
        self.aggregate_waiting(states)  # (while the previous flush may still be in Redis)
        self.settle()
        targets = [s for s in (states if states is not None else self.states.values())
                   if s.series_pending or (flows and s.flows_pending)]
        if not targets:
            if self.idle:  # a quiet spell: the newest minute joins the top-N windows
                self.sink.advance_windows(close_newest=True)
            return
        open_from = self._open_from()
        # each group goes to the writer thread as soon as it is built; the top-N windows take
        # the minutes this flush completed (all, when nothing is left to read: a replay's last
        # minute, or a quiet moment live)
        started = False
        try:
            for group in self.sink.prepare_groups(targets, flows):
                if not started:
                    self.writer.start(close_newest=self.idle, open_from=open_from)
                    started = True
                self.writer.add(group)
        finally:
            if started:
                self.writer.finish()
        for state in targets:
            # flows leaving the table keep their keys: those carry a TTL since their first write
            state.table.expire(state.clock_ns)
        tables = [st.table for st in self.states.values()]
        evicted = 0
        if sum(len(t) for t in tables) > self.settings.max_flows:
            evicted = len(evict_over_bound(tables, int(self.settings.max_flows * EVICT_TO)))
        self._count("flows_evicted", evicted)
        self.totals["flushes"] += 1

    def _more_coming(self, messages: list) -> bool:
        """Whether a partition holds messages after these, as far as the last fetches tell
        (the watermarks librdkafka caches from them: no request to the broker)."""
        read = {state.partition: state.next_offset or 0 for state in self.states.values()}
        for msg in messages:
            if msg.error() is None:
                read[msg.partition()] = msg.offset() + 1
        for partition, position in read.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), cached=True)
            except KafkaException:
                continue
            if high > position:
                return True
        return False

    def _open_from(self) -> int | None:
        """The oldest minute of capture time a partition may still bring data for: one with
        records not written yet, or messages not read yet (as far as the last fetch tells),
        is in the minute of its newest record, or any (0) when nothing of it was read yet.
        The top-N windows keep that minute open (top.lua 'advance'): replaying a backlog, the
        partitions are read unevenly, and data for a minute already closed costs five
        increments instead of one."""
        oldest = None
        for state in self.states.values():
            if not state.records:
                try:
                    _low, high = self.consumer.get_watermark_offsets(
                        TopicPartition(self.topic, state.partition), cached=True)
                except KafkaException:
                    continue
                if high < 0 or high <= (state.next_offset or 0):
                    continue  # caught up, or not known (an idle partition)
            minute = state.clock_ns // (60 * NS)
            oldest = minute if oldest is None else min(oldest, minute)
        return oldest

    def replay_read_to_end(self) -> bool:
        """Is a replay's end mark read after the last records of every partition of this
        member? Its flows are complete then: written at once, with no wait for a quiet
        spell."""
        return bool(self.states) and all(st.at_replay_end for st in self.states.values())

    def settle(self) -> None:
        """Wait for the flush in flight, if any, and act on how it went: raise its Redis error
        (it is sent again by the next call), or count it, restart the partitions another
        member wrote meanwhile and report the offsets to Kafka."""
        result = self.writer.settle()
        if result is None:
            return
        commits = [TopicPartition(self.topic, w.partition, w.next_offset)
                   for w in result.written if self.states.get(w.partition) is w.state]
        for write, stored in result.fenced:
            # another member wrote this partition since we took it: drop ours, resume after theirs
            self.totals["fenced"] += 1
            log.warning("partition %d was written by another member; resuming at %s",
                        write.partition, stored)
            self._restart(write.state, stored)
        self._count("rejected_samples", result.rejected_samples)
        self._count("write_errors", result.write_errors)
        self._write_counters()
        if commits:  # Kafka's committed offsets only feed lag monitoring; Redis holds the truth
            try:
                self.consumer.commit(offsets=commits, asynchronous=True)
            except Exception as exc:  # noqa: BLE001 - a failed lag commit must not stop us
                log.debug("offset commit for monitoring failed: %s", exc)

    def _count(self, name: str, n: int) -> None:
        """Count n in the totals of the log lines and in pipeline:processor (written by
        _write_counters, outside the flush transactions)."""
        self.totals[name] += n
        self.unwritten[name] = self.unwritten.get(name, 0) + n

    def _write_counters(self) -> None:
        counts = {name: value for name, value in self.unwritten.items() if value}
        if counts:
            self.sink.add_counters(counts)
            for name in counts:
                self.unwritten[name] = 0

    # -- the loop --------------------------------------------------------------------------

    def watermarks_of(self, partitions: list[int], spec: OffsetSpec) -> dict[int, int]:
        """Earliest or latest offset of each partition, in one bounded request (a deleted
        topic fails it fast, instead of one slow query per partition)."""
        futures = self.admin.list_offsets(
            {TopicPartition(self.topic, p): spec for p in partitions}, request_timeout=5)
        return {tp.partition: future.result().offset for tp, future in futures.items()}

    def lag(self) -> int:
        """Messages in the topic not yet written to Redis by any member of the group."""
        partitions = sorted(self.watermarks.list_topics(self.topic, timeout=5)
                            .topics[self.topic].partitions)
        if not partitions:
            return 0
        stored = self.sink.stored_offsets(partitions)
        lows = self.watermarks_of(partitions, OffsetSpec.earliest())
        highs = self.watermarks_of(partitions, OffsetSpec.latest())
        return sum(max(0, highs[p] - (offset if offset is not None else lows[p]))
                   for p, offset in zip(partitions, stored))

    def caught_up(self) -> bool:
        """Everything in the topic is written to Redis, whoever wrote it: every partition's
        stored offset (ours or another member's) has reached the partition's end."""
        if not self.joined:
            return False
        self.reconcile()
        if any(s.pending for s in self.states.values()):
            return False
        return self.lag() == 0

    def _record_lag(self) -> None:
        try:
            self.sink.record_lag(self.lag())
        except (REDIS_DOWN + (KafkaException,)) as exc:
            log.debug("consumer lag not recorded: %s", exc)

    def _safely(self, check) -> bool:
        """Run a check that talks to Redis and the broker; False when either is away."""
        try:
            return bool(check())
        except (redis.RedisError, KafkaException) as exc:
            if isinstance(exc, redis.RedisError) and not redis_refusing(exc):
                raise
            log.debug("%s skipped: %s", check.__name__, exc)
            return False

    def run(self) -> int:
        s = self.settings
        self.consumer.subscribe([self.topic], on_assign=self.on_assign,
                                on_revoke=self.on_revoke, on_lost=self.on_lost)
        flush_every = s.flush_interval_ms / 1000
        flows_every = s.flow_write_interval_ms / 1000
        now = time.monotonic()
        next_flush, next_stats, last_message = now + flush_every, now + s.stats_interval_s, now
        next_flows, flows_written = now + flows_every, 0.0
        backoff = 0.0
        retry_at = 0.0
        try:
            while not self.stop_requested:
                per_message = max(1.0, self.records_per_message)
                batch = max(1, min(10000, int(s.max_poll_records / per_message)))
                messages = self.consumer.consume(num_messages=batch, timeout=POLL_TIMEOUT_S)
                fill_until = time.monotonic() + POLL_FILL_S - POLL_TIMEOUT_S
                while (0 < len(messages) < batch and time.monotonic() < fill_until
                       and self._more_coming(messages)):
                    more = self.consumer.consume(num_messages=batch - len(messages),
                                                 timeout=POLL_TIMEOUT_S)
                    if not more:
                        break
                    messages += more
                was_written = not any(st.series_pending for st in self.states.values())
                self.handle_all(messages)
                now = time.monotonic()
                if messages:
                    last_message = now
                    if was_written and not self.live_series:
                        # a replay's intervals count from its first records, not from the
                        # last flush before it (long past: a flush at its first poll)
                        next_flush = max(next_flush, now + flush_every)
                else:
                    self.read_past_markers()
                self.idle = now - last_message >= QUIET_S
                behind = len(messages) >= batch  # the poll came back full
                over = self.flows_in_memory() > s.max_flows  # only written flows can leave
                due = (series_due(now, next_flush, flush_every, behind, self.live_series)
                       or self.pending_records() >= s.max_pending_records or over)
                # the flow part: every FLOW_WRITE_INTERVAL_MS, and when there is nothing to
                # read (a replay's flows complete right away, a quiet network's within 1 s)
                quiet = FLOWS_QUIET_S if self.replay_ended else FLOWS_QUIET_LIVE_S
                flows_at = next_flows if self.live_read else (
                    next_flows + (REPLAY_FLOW_WRITE_FACTOR - 1) * flows_every)
                replay_done = (not self.live_read and now - flows_written >= FLOWS_QUIET_S
                               and self.replay_read_to_end())
                flows_due = (now >= flows_at or over or replay_done
                             or (not messages and now - last_message >= quiet))
                if flows_due and not due:
                    flows_due = due = any(st.flows_pending for st in self.states.values())
                big = [st for st in self.states.values()
                       if len(st.flow_updates) >= s.flush_max_flows]
                if (due or big) and now >= retry_at:
                    try:
                        if due:
                            self.flush(flows=flows_due)
                            next_flush = now + flush_every
                            self.live_series = False
                            if flows_due:
                                next_flows, flows_written = now + flows_every, now
                                self.replay_ended = self.live_read = False
                        else:  # only the partitions with many flows to write
                            self.flush(big)
                        resumed = self.paused
                        if self.paused:
                            self.consumer.resume(self.consumer.assignment())
                            self.paused = False
                            last_message = now  # time paused is not time idle (--exit-when-idle)
                            log.info("Redis takes writes again: resumed consuming")
                        backoff = 0.0
                        if resumed:
                            self._safely(self.reconcile)  # Redis may have come back older
                    except redis.RedisError as exc:
                        if not redis_refusing(exc):
                            raise
                        backoff = min(max(backoff * 2, 0.5), 10.0)
                        retry_at = now + backoff * (0.5 + random.random())
                        if not self.paused:  # once per episode, not once per retry
                            self.consumer.pause(self.consumer.assignment())
                            self.paused = True
                            log.warning("Redis cannot take writes (%s): paused consuming, "
                                        "retrying with backoff; nothing is lost", exc)
                        else:
                            log.debug("Redis still unavailable (%s); retry in %.1f s", exc,
                                      retry_at - now)
                if now >= next_stats:
                    self.log_stats()
                    if not self.paused:
                        self._safely(self.reconcile)
                        self._record_lag()
                    next_stats = now + s.stats_interval_s
                if (self.exit_when_idle is not None and now - last_message >= self.exit_when_idle
                        and not self.paused and self._safely(self.caught_up)):
                    log.info("idle for %.0f s with everything written: exiting",
                             self.exit_when_idle)
                    break
            if not self.paused:
                self.idle = True
                self.flush()
                self.settle()
                self.sink.advance_windows(close_newest=True, max_steps=1_000_000)
        finally:
            self.log_stats("final")
            self.deadletter.flush(10)
            try:
                self._write_counters()
            except redis.RedisError as exc:
                log.warning("final error counters not written: %s", exc)
            self.consumer.close()
            self.watermarks.close()
        return 0

    def log_stats(self, prefix: str = "stats") -> None:
        flows = self.flows_in_memory()
        log.info("%s %s flows_not_stored=%d flows_in_memory=%d partitions=%s", prefix,
                 " ".join(f"{k}={v}" for k, v in self.totals.items()),
                 self.sink.flows_not_stored, flows, sorted(self.states))

    def _on_kafka_error(self, err: KafkaError) -> None:
        now = time.monotonic()
        if now - getattr(self, "_last_error_log", 0.0) > 10:
            self._last_error_log = now
            log.warning("Kafka: %s", err)
