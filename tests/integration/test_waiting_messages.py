"""Messages a poll brings wait per partition and are aggregated together (flow_processor/
consumer.py, handle_all): the sums must be those of aggregating them one by one, nothing may
wait past a flush, an empty poll, or the bound on records, and pending records count them. A
replay's end marks make its flows due.

The processor runs in this process against the real broker and Redis of the test stack; the
messages are real record batches (packet_records.encode_batch) handed over as the consumer
hands them (a stand-in for confluent_kafka.Message, which has no public constructor).
"""

from __future__ import annotations

import random
import socket

import pytest
import redis

from flow_processor import consumer
from flow_processor.aggregate import PartitionState
from flow_processor.flows import FlowTable
from flow_processor.settings import ProcessorSettings
from flow_processor.sink import RedisSink
from packet_records import (
    FLAG_HAS_META,
    META_SERVER_NAME,
    RECORD,
    decode_batch,
    encode_batch,
    encode_stats,
)

S = 10**9
T = 1_700_000_000 * S


class Message:
    """What Processor.handle reads of a confluent_kafka.Message."""

    def __init__(self, partition: int, offset: int, value: bytes):
        self._partition, self._offset, self._value = partition, offset, value

    def error(self):
        return None

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return 0, 0  # TIMESTAMP_NOT_AVAILABLE


def batches(partition: int, count: int, seed: int) -> list[bytes]:
    """`count` replayed record batches of 200 records over 40 flows and 3 seconds, some with
    a server name: flows that several batches touch."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        packed, meta = [], []
        for i in range(200):
            flow = rng.randrange(40)
            src = socket.inet_aton(f"10.{partition}.0.{flow + 1}") + bytes(12)
            dst = socket.inet_aton("192.0.2.1") + bytes(12)
            forward = rng.random() < 0.6
            flags = 0
            if rng.random() < 0.05:
                flags = FLAG_HAS_META
                meta.append((i, META_SERVER_NAME, f"host{flow}.example"))
            packed.append(RECORD.pack(
                T + rng.randrange(3 * S), rng.randrange(60, 1500), 4, 6 if flow % 4 else 17,
                0, flags, *((40000 + flow, 443) if forward else (443, 40000 + flow)),
                *((src, dst) if forward else (dst, src)), 0, 0, 0))
        out.append(encode_batch(packed, meta, replay=True))
    return out


@pytest.fixture
def processor(stack, databases):
    number = databases.take()
    settings = ProcessorSettings(kafka_bootstrap_servers=stack.kafka, kafka_topic="waiting",
                                 kafka_group_id="waiting", redis_url=f"{stack.redis_url}/{number}")
    redis.Redis.from_url(settings.redis_url).flushdb()
    proc = consumer.Processor(settings, RedisSink(settings))
    for partition in (0, 1):
        proc.states[partition] = proc._new_state(partition, (None, None))
    yield proc
    proc.writer.settle()
    proc.consumer.close()
    proc.watermarks.close()
    databases.give(number)


def one_by_one(partition: int, values: list[bytes]) -> PartitionState:
    state = PartitionState(partition, None, FlowTable(120 * S, 1800 * S, 100_000))
    for value in values:
        records, meta = decode_batch(value)
        state.add_records(records, meta)
    return state


def sums(state: PartitionState) -> tuple:
    state.sync_flows()
    flows = {key: (f.delta_bytes, f.delta_packets, f.first_ns, f.last_ns, f.src, f.server_name)
             for key, f in state.table.flows.items()}
    return state.records, state.global_, state.protocols, flows


def test_waiting_messages_are_aggregated_as_one_by_one(processor):
    values = {p: batches(p, 12, seed=p) for p in (0, 1)}
    polls = [[Message(p, offset, values[p][offset]) for offset in range(at, at + 4) for p in (0, 1)]
             for at in (0, 4, 8)]
    for poll in polls:
        processor.handle_all(poll)
    held = [processor.states[p] for p in (0, 1)]
    # below the bound, nothing is aggregated yet; pending records count what waits
    assert [s.records for s in held] == [0, 0]
    assert [s.waiting_records for s in held] == [12 * 200, 12 * 200]
    assert processor.pending_records() == 2 * 12 * 200
    assert [s.next_offset for s in held] == [12, 12]
    processor.handle_all([])  # a poll that finds nothing: what waits is aggregated
    for p, state in zip((0, 1), held):
        assert not state.waiting and state.waiting_records == 0
        assert sums(state) == sums(one_by_one(p, values[p]))
    assert processor.pending_records() == 2 * 12 * 200


def test_a_partition_past_the_bound_is_aggregated_at_once(processor, monkeypatch):
    monkeypatch.setattr(consumer, "AGGREGATE_RECORDS", 1000)
    values = batches(0, 6, seed=7)
    processor.handle_all([Message(0, 0, values[0]), Message(0, 1, values[1])])
    assert processor.states[0].records == 0  # 400 records wait
    processor.handle_all([Message(0, offset, values[offset]) for offset in range(2, 6)])
    state = processor.states[0]
    assert state.records == 1200 and not state.waiting  # 1,200 >= 1,000: aggregated
    assert sums(state) == sums(one_by_one(0, values))


def test_a_flush_writes_what_waits(processor):
    values = batches(1, 5, seed=11)
    processor.handle_all([Message(1, offset, value) for offset, value in enumerate(values)])
    assert processor.states[1].waiting
    processor.flush()
    processor.settle()
    r = redis.Redis.from_url(processor.settings.redis_url)
    assert int(r.hget("pipeline:processor", "records")) == 5 * 200
    assert processor.sink.stored_offset_pairs([1]) == [(5, 5)]
    per_second = {t // 1000: int(v) for t, v in r.ts().range("ts:global:pps", "-", "+")}
    assert per_second == {sec: cell[1] for sec, cell in one_by_one(1, values).global_.items()}


def test_a_replay_read_to_its_end_on_every_partition_makes_its_flows_due(processor):
    """capture --pcap ends each partition with a replay-end mark: once the mark is the last
    message read on every partition of the member, the flows go to Redis at once (no wait
    for a quiet spell); records read after a mark on a partition undo it."""
    mark = encode_stats("replay:1", T, {}, replay_end=True)
    values = {p: batches(p, 2, seed=20 + p) for p in (0, 1)}
    processor.handle_all([Message(p, offset, values[p][offset]) for p in (0, 1)
                          for offset in (0, 1)])
    assert not processor.replay_read_to_end()
    processor.handle_all([Message(0, 2, mark)])
    assert not processor.replay_read_to_end()  # partition 1 may still bring records
    processor.handle_all([Message(1, 2, mark)])
    assert processor.replay_read_to_end()
    processor.handle_all([Message(0, 3, batches(0, 1, seed=30)[0])])  # another replay
    assert not processor.replay_read_to_end()
    processor.handle_all([Message(0, 4, mark)])
    assert processor.replay_read_to_end()
