"""The Kafka side of capture: an idempotent, batching, compressing producer that counts losses."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException, Producer

from capture.counters import CaptureCounters
from capture.settings import CaptureSettings
from packet_records import HEADER, STATS_MAGIC
from packet_records.security import kafka_client_config

log = logging.getLogger(__name__)


class RecordProducer:
    """Sends record batches to explicit partitions.

    When librdkafka's bounded buffer is full (the broker is slow or away), a file replay waits
    (block=True) and a live capture drops the batch and counts its records (block=False): the
    kernel keeps capturing either way and nothing is lost without a count. A message librdkafka
    refuses at once (a partition the topic does not have, a message too large) is counted as
    not delivered, and capture goes on.
    """

    def __init__(self, settings: CaptureSettings, counters: CaptureCounters, block: bool):
        self.topic = settings.kafka_topic
        self.counters = counters
        self.block = block
        self.producer = Producer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            **kafka_client_config(settings),
            "enable.idempotence": True,
            # Sparse connections (the default) drop the first connection once the broker's id
            # is known and wait before connecting again; the idempotent producer, finding no
            # broker up for its producer id, then retries only half a second later: every
            # message waited 0.5-1 s at start (a 20,000-frame file took 1.2 s, not 0.2)
            "enable.sparse.connections": False,
            "acks": "all",
            "compression.type": settings.kafka_compression,
            "linger.ms": 20,
            "batch.size": 4 * 1024 * 1024,
            "message.max.bytes": 8 * 1024 * 1024,
            "queue.buffering.max.kbytes": settings.producer_buffer_mb * 1024,
            "queue.buffering.max.messages": 1_000_000,
            "message.timeout.ms": settings.delivery_timeout_ms,
            "error_cb": self._on_error,
        })
        # a message produced while the client still replaces its bootstrap connection (the
        # first few milliseconds) meets the same half-second retry
        self.producer.poll(0.01)

    def send(self, partition: int, message: bytes, records: int) -> bool:
        while True:
            try:
                self.producer.produce(self.topic, message, partition=partition,
                                      on_delivery=self._on_delivery)
                self.producer.poll(0)
                return True
            except BufferError:
                if not self.block:
                    self.counters.dropped_buffer_full += records
                    return False
                self.producer.poll(0.05)
            except KafkaException as exc:
                self._count_failure(records, partition, exc.args[0])
                return False

    def poll(self) -> None:
        self.producer.poll(0)

    def send_stats(self, message: bytes) -> None:
        """A stats message (packet_records.encode_stats); never blocks, never counted as records."""
        try:
            self.producer.produce(self.topic, message, partition=0, on_delivery=self._on_delivery)
        except BufferError:
            log.warning("producer buffer full: a stats message was not sent")
        except KafkaException as exc:
            log.warning("a stats message was not sent: %s", exc.args[0].str())

    def send_replay_end(self, message: bytes, partitions: int) -> None:
        """The end of a file replay (a stats message with replay_end and no counters), after
        the last records of every partition: the processor that reads each partition writes
        its flows then, not after waiting for more."""
        for partition in range(partitions):
            while True:
                try:
                    self.producer.produce(self.topic, message, partition=partition,
                                          on_delivery=self._on_delivery)
                    break
                except BufferError:  # waits, as the records before it did
                    self.producer.poll(0.05)
                except KafkaException as exc:
                    log.warning("the end of the replay was not sent to partition %d: %s",
                                partition, exc.args[0].str())
                    break

    def close(self, timeout: float) -> int:
        """Deliver everything still queued; return how many messages could not be delivered."""
        deadline = time.monotonic() + timeout
        remaining = len(self.producer)
        while remaining and time.monotonic() < deadline:
            remaining = self.producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        if remaining:
            log.error("%d messages still undelivered after %.0f s", remaining, timeout)
            self.counters.delivery_failed_messages += remaining
        return remaining

    def _on_delivery(self, err, msg) -> None:
        if msg.value()[:4] == STATS_MAGIC:
            if err is not None:
                log.warning("a stats message was not delivered: %s", err)
            return
        records = HEADER.unpack_from(msg.value(), 0)[3]
        if err is None:
            self.counters.records_produced += records
        else:
            self._count_failure(records, msg.partition(), err)

    def _count_failure(self, records: int, partition: int, err: KafkaError) -> None:
        self.counters.delivery_failed += records
        self.counters.delivery_failed_messages += 1
        if self.counters.delivery_failed_messages <= 10:  # the first ones say why; then counts
            log.error("delivery failed for %d records on partition %s: %s", records, partition,
                      err.str())

    def _on_error(self, err: KafkaError) -> None:
        # librdkafka retries by itself; say so once in a while instead of per event
        now = time.monotonic()
        if now - getattr(self, "_last_error_log", 0.0) > 10:
            self._last_error_log = now
            log.warning("Kafka: %s", err)
