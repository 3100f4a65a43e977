"""capture.batching: records per partition, batch sizes, and the ports of IP fragments."""

from __future__ import annotations

import random
import socket

from capture.batching import FragmentTracker, RecordBatcher
from packet_records import (
    FLAG_FRAGMENT,
    FLAG_LATER_FRAGMENT,
    FLAG_MALFORMED,
    FLAG_TRUNCATED,
    Record,
    decode_batch,
    partition_for,
)

A4 = socket.inet_aton("192.0.2.10") + bytes(12)
B4 = socket.inet_aton("198.51.100.20") + bytes(12)
A6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
B6 = socket.inet_pton(socket.AF_INET6, "2001:db8::20")
T = 1_700_000_000 * 10**9
S = 10**9


def decoded(src=A4, dst=B4, sport=40000, dport=80, proto=6, flags=0, frag_id=0, ipver=4):
    """A decode_frame tuple (l4_off and ip_end matter to payload inspection only)."""
    return (ipver, proto, src, dst, sport, dport, 0x10, flags, frag_id, 34, 54)


def first_frag(sport=40001, dport=53, frag_id=0x1235, src=A4, dst=B4, ipver=4):
    return decoded(src, dst, sport, dport, 17, FLAG_FRAGMENT, frag_id, ipver)


def later_frag(frag_id=0x1235, src=A4, dst=B4, ipver=4):
    return decoded(src, dst, 0, 0, 17, FLAG_FRAGMENT | FLAG_LATER_FRAGMENT, frag_id, ipver)


def batcher_of(partitions: int, records_per_message: int) -> RecordBatcher:
    return RecordBatcher(partitions, records_per_message, inspect=False)


def add(batcher: RecordBatcher, ts: int, d: tuple, wire: int = 100, cap: int | None = None):
    """Add a frame of `cap` captured bytes (all of `wire` by default)."""
    batcher.add(ts, wire, bytes(wire if cap is None else cap), d)


def taken(batcher: RecordBatcher) -> list[tuple[int, Record]]:
    """(partition, record) of every message ready, after checking each message's count."""
    out = []
    for partition, message, count in batcher.take():
        records, _meta = decode_batch(message)
        records = [Record(*r) for r in records]
        assert len(records) == count
        out.extend((partition, r) for r in records)
    return out


def flushed(batcher: RecordBatcher, final: bool = False) -> list[Record]:
    batcher.flush(final)
    return [r for _p, r in taken(batcher)]


# ----------------------------------------------------------------------------- batches
def test_batches_split_at_records_per_message():
    batcher = batcher_of(1, 3)
    for i in range(7):
        add(batcher, T + i, decoded())
    assert [(p, n) for p, _m, n in batcher.take()] == [(0, 3), (0, 3)]
    assert batcher.take() == []
    assert [r.ts_ns for r in flushed(batcher)] == [T + 6]


def test_record_fields_come_from_the_decoded_tuple():
    batcher = batcher_of(1, 10)
    add(batcher, T, decoded(A6, B6, 41000, 443, 6, FLAG_MALFORMED, ipver=6), wire=1514)
    (record,) = flushed(batcher)
    assert record[:10] == (T, 1514, 6, 6, 0x10, FLAG_MALFORMED, 41000, 443, A6, B6)


def test_flush_closes_every_partial_batch_once():
    batcher = batcher_of(12, 1000)
    rng = random.Random(3)
    for i in range(500):
        add(batcher, T + i, decoded(sport=rng.randrange(1024, 65536)))
    assert batcher.take() == []
    batcher.flush()
    ready = batcher.take()
    partitions = [p for p, _m, _n in ready]
    assert len(partitions) == len(set(partitions)) > 1
    assert sum(n for _p, _m, n in ready) == 500
    batcher.flush()
    assert batcher.take() == []


def test_each_record_is_in_its_flows_partition():
    batcher = batcher_of(12, 7)
    rng = random.Random(5)
    for i in range(300):
        add(batcher, T + i, decoded(sport=rng.randrange(65536), dport=rng.randrange(65536)))
    batcher.flush()
    for partition, r in taken(batcher):
        assert partition == partition_for(r.src, r.dst, r.sport, r.dport, r.ip_proto, 12)


def test_both_directions_of_a_flow_go_to_the_same_partition():
    batcher = batcher_of(12, 1000)
    rng = random.Random(9)
    for i in range(200):
        sport, dport = rng.randrange(65536), rng.randrange(65536)
        add(batcher, T + i, decoded(A4, B4, sport, dport))
        add(batcher, T + i, decoded(B4, A4, dport, sport))
    batcher.flush()
    where = {}
    for partition, r in taken(batcher):
        flow = frozenset(((r.src, r.sport), (r.dst, r.dport)))
        assert where.setdefault(flow, partition) == partition
    assert len(where) == 200 and len(set(where.values())) > 1


def test_truncated_flag_when_captured_length_is_below_wire_length():
    batcher = batcher_of(1, 10)
    add(batcher, T, decoded(), wire=1514, cap=64)
    add(batcher, T, decoded(flags=FLAG_MALFORMED), wire=1514, cap=64)
    add(batcher, T, decoded(), wire=64, cap=64)
    assert [r.flags for r in flushed(batcher)] == [
        FLAG_TRUNCATED, FLAG_TRUNCATED | FLAG_MALFORMED, 0
    ]


# ----------------------------------------------------------------------------- fragments
def test_non_first_fragment_after_its_first_gets_the_first_ports():
    batcher = batcher_of(12, 100)
    add(batcher, T, first_frag())
    add(batcher, T + 1, later_frag())
    batcher.flush()
    (p1, first), (p2, later) = taken(batcher)
    assert (later.sport, later.dport) == (first.sport, first.dport) == (40001, 53)
    assert later.flags == FLAG_FRAGMENT | FLAG_LATER_FRAGMENT and p1 == p2


def test_ipv6_non_first_fragment_gets_the_first_ports():
    batcher = batcher_of(12, 100)
    add(batcher, T, first_frag(frag_id=0xABCD0002, src=A6, dst=B6, ipver=6))
    add(batcher, T + 1, later_frag(frag_id=0xABCD0002, src=A6, dst=B6, ipver=6))
    assert [(r.sport, r.dport) for r in flushed(batcher)] == [(40001, 53)] * 2


def test_fragments_of_another_datagram_do_not_get_the_ports():
    batcher = batcher_of(1, 100)
    add(batcher, T, first_frag(frag_id=0x1235))
    add(batcher, T + 1, later_frag(frag_id=0x9999))  # other IP id
    add(batcher, T + 2, later_frag(frag_id=0x1235, src=B4, dst=A4))  # other direction
    assert [(r.sport, r.dport) for r in flushed(batcher, final=True)] == [
        (40001, 53), (0, 0), (0, 0)
    ]


def test_non_first_fragment_before_its_first_is_held_then_released_with_its_ports():
    batcher = batcher_of(12, 100)
    add(batcher, T, later_frag())
    assert flushed(batcher) == []  # held, not lost
    add(batcher, T + S // 2, first_frag())
    records = flushed(batcher)
    assert [(r.ts_ns, r.sport, r.dport) for r in records] == [(T, 40001, 53),
                                                              (T + S // 2, 40001, 53)]
    assert records[0].flags & FLAG_LATER_FRAGMENT


def test_held_fragment_expires_after_the_hold_time_with_ports_0():
    batcher = batcher_of(1, 100)
    add(batcher, T, later_frag())
    add(batcher, T + 3 * S // 2, decoded())  # capture time 1.5 s later: still held
    assert [r.ts_ns for r in flushed(batcher)] == [T + 3 * S // 2]
    add(batcher, T + 5 * S // 2, decoded())  # 2.5 s later: past the 2 s hold time
    records = sorted(flushed(batcher))
    assert [(r.ts_ns, r.sport, r.dport) for r in records] == [(T, 0, 0),
                                                              (T + 5 * S // 2, 40000, 80)]
    add(batcher, T + 3 * S, first_frag())  # too late: the first goes out alone
    assert [r.ts_ns for r in flushed(batcher)] == [T + 3 * S]


def test_final_flush_releases_every_held_fragment_with_ports_0():
    batcher = batcher_of(1, 100)
    add(batcher, T, later_frag(frag_id=1))
    add(batcher, T + 1, later_frag(frag_id=2))
    assert flushed(batcher) == []
    assert [(r.sport, r.dport) for r in flushed(batcher, final=True)] == [(0, 0), (0, 0)]


def test_held_fragments_are_bounded_in_count():
    batcher = batcher_of(1, 100)
    batcher.fragments = FragmentTracker(max_held=2)
    for frag_id in (1, 2, 3):
        add(batcher, T + frag_id, later_frag(frag_id=frag_id))
    assert [(r.ts_ns, r.sport) for r in flushed(batcher)] == [(T + 1, 0)]  # oldest pushed out


def test_second_first_fragment_within_the_reassembly_window_does_not_take_over():
    batcher = batcher_of(1, 100)
    add(batcher, T, first_frag(sport=1000))
    add(batcher, T + S, first_frag(sport=2000))  # overlap on the same datagram
    add(batcher, T + 2 * S, later_frag())
    assert [r.sport for r in flushed(batcher)] == [1000, 2000, 1000]


def test_first_fragment_after_the_reassembly_window_takes_over_the_id():
    batcher = batcher_of(1, 100)
    add(batcher, T, first_frag(sport=1000))
    add(batcher, T + 31 * S, first_frag(sport=2000))  # 30 s reassembly timeout passed
    add(batcher, T + 32 * S, later_frag())
    assert [r.sport for r in flushed(batcher)] == [1000, 2000, 2000]
