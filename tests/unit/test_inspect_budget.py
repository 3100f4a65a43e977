"""Bounded inspection state: the byte budget of unfinished inspectors (INSPECT_MEMORY_MB), the
idle timeout on capture time (INSPECT_IDLE_TIMEOUT_S), and their counters."""

from __future__ import annotations

import struct

import pytest

from capture.batching import RecordBatcher
from capture.counters import CaptureCounters
from capture.decode import decode_frame
from capture.flowcache import FlowCache
from capture.inspect.flow import STATE_BYTES, FlowInspector
from capture.settings import CaptureSettings
from packet_records import APP_GUESS, decode_batch
from packet_records.apps import APP_ID
from tests.unit.test_inspect_tls import records as records_of
from tests.unit.test_inspect_tls import spec_hello

T = 1_700_000_000 * 10**9
S = 10**9
SEG = 1000
_IP_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_ETH = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"


def hello_stream(size: int = 8 * SEG) -> bytes:
    """The start of a ClientHello whose record announces 16 KB: it never completes here."""
    head = b"\x16\x03\x01" + struct.pack("!H", 16384) + b"\x01" + (16375).to_bytes(3, "big")
    return (head + b"\x03\x03" + bytes(range(32)) + b"\x00" + bytes(size))[:size]


def frame(i: int, payload: bytes, seq: int, dport: int = 443, client: bool = True) -> bytes:
    a, b = bytes((10, 0, i >> 8 & 0xFF, i & 0xFF)), bytes((192, 0, 2, 1))
    sport = 1024 + i
    if not client:
        a, b, sport, dport = b, a, dport, sport
    return _ETH + _IP_TCP.pack(0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0, a, b, sport,
                               dport, seq, 1, 0x50, 0x18, 64240, 0, 0) + payload


def segment(i: int, k: int, stream: bytes | None = None, dport: int = 443) -> bytes:
    stream = stream or hello_stream()
    return frame(i, stream[k * SEG:(k + 1) * SEG], 1000 + k * SEG, dport)


def feed(batcher: RecordBatcher, ts: int, data: bytes) -> None:
    batcher.add(ts, len(data), data, decode_frame(data, 1))


def records(batcher: RecordBatcher) -> list[tuple]:
    batcher.flush()
    return [r for _p, message, _n in batcher.take() for r in decode_batch(message)[0]]


def cache_flow(batcher: RecordBatcher, i: int, dport: int = 443):
    return batcher.flows.get(6, bytes((10, 0, i >> 8 & 0xFF, i & 0xFF)) + bytes(12), 1024 + i,
                             bytes((192, 0, 2, 1)) + bytes(12), dport)


def check_accounting(cache: FlowCache) -> None:
    assert cache.held_bytes == sum(f.held for f in cache.active)
    assert all(f.inspector is not None and f.held == f.inspector.held_bytes()
               for f in cache.active)
    assert cache.held_bytes <= cache.memory_bytes


@pytest.fixture(autouse=True)
def zero_counters(monkeypatch):
    monkeypatch.setattr(FlowInspector, "budget_evictions", 0)
    monkeypatch.setattr(FlowInspector, "idle_expired", 0)


def test_an_unfinished_tcp_inspector_is_charged_what_its_buffers_hold():
    batcher = RecordBatcher(1, 1000)
    feed(batcher, T, segment(1, 0))
    flow = cache_flow(batcher, 1)
    assert flow.inspector is not None and not flow.inspector.done
    assert SEG + STATE_BYTES <= flow.held <= SEG * 1.25 + STATE_BYTES + 200
    feed(batcher, T + 1, segment(1, 1))
    assert flow.held >= 2 * SEG + STATE_BYTES
    assert batcher.flows.held_bytes == flow.held
    check_accounting(batcher.flows)


def test_the_budget_gives_up_the_inspections_waiting_longest_and_counts_them():
    per_flow = 3 * SEG + STATE_BYTES + 1000  # three segments each, with room to spare
    batcher = RecordBatcher(4, 1000, inspect_memory_mb=10 * per_flow / (1 << 20))
    flows, sent = 40, 0
    for k in range(3):
        for i in range(flows):
            feed(batcher, T + sent, segment(i, k))
            sent += 1
            check_accounting(batcher.flows)
    cache = batcher.flows
    kept = [i for i in range(flows) if cache_flow(batcher, i).inspector is not None]
    assert len(kept) >= 5 and flows - 1 in kept  # the most recently fed stays
    assert len(cache.active) == len(kept)
    assert FlowInspector.budget_evictions == flows - len(kept)  # each given up once
    assert FlowInspector.idle_expired == 0
    # every frame still gives a record, with the flow's label as it was (TLS: content said so)
    recs = records(batcher)
    assert len(recs) == sent
    assert {r[10] for r in recs} == {APP_ID["TLS"]}
    # a given-up flow is not inspected again: its next segments cost nothing and hold nothing
    before = cache.held_bytes
    feed(batcher, T + sent, segment(0, 3))
    assert cache_flow(batcher, 0).inspector is None and cache.held_bytes == before


def test_a_given_up_flow_keeps_its_port_guess():
    stream = b"\x00\x05" + bytes(8 * SEG)  # a DNS-length-looking start that needs more bytes
    batcher = RecordBatcher(1, 1000, inspect_memory_mb=(2 * SEG) / (1 << 20))
    feed(batcher, T, frame(1, b"\x16\x03", 1000, dport=443))  # 2 bytes of a record header
    flow = cache_flow(batcher, 1)
    assert flow.inspector is not None and flow.app == APP_ID["TLS"] and flow.app_flags
    for i in range(2, 6):
        feed(batcher, T + i, frame(i, stream[:SEG], 1000, dport=8443))
    assert flow.inspector is None and FlowInspector.budget_evictions >= 1
    assert flow.app == APP_ID["TLS"] and flow.app_flags == APP_GUESS
    recs = records(batcher)
    assert recs[0][10] == APP_ID["TLS"]


def test_unfinished_inspections_expire_after_the_idle_timeout_of_capture_time():
    batcher = RecordBatcher(1, 1000, inspect_idle_timeout_s=30)
    feed(batcher, T, segment(1, 0))
    feed(batcher, T + 10 * S, segment(2, 0))
    feed(batcher, T + 25 * S, segment(1, 1))  # flow 1 is fed again: its clock restarts
    cache = batcher.flows
    # a new flow starting to hold state looks at the oldest: nothing idle 30 s yet
    feed(batcher, T + 39 * S, segment(3, 0))
    assert FlowInspector.idle_expired == 0 and len(cache.active) == 3
    # flow 2 (last fed at 10 s) is idle for 30 s at 40 s; flow 1 (25 s) is not
    feed(batcher, T + 41 * S, segment(4, 0))
    assert FlowInspector.idle_expired == 1
    assert cache_flow(batcher, 2).inspector is None
    assert cache_flow(batcher, 1).inspector is not None
    check_accounting(cache)
    # flush() expires on the capture time of the last frame too (no new flow needed)
    feed(batcher, T + 80 * S, frame(9, b"", 1))  # a bare ACK of some other flow
    batcher.flush()
    assert FlowInspector.idle_expired == 4 and not cache.active and cache.held_bytes == 0
    assert FlowInspector.budget_evictions == 0


def test_finished_and_evicted_flows_release_their_charge():
    # a hello that completes in its second segment: done, nothing held any more
    whole = records_of(spec_hello())
    batcher = RecordBatcher(1, 1000)
    feed(batcher, T, frame(1, whole[:20], 1000))
    assert batcher.flows.held_bytes > 0
    feed(batcher, T + 1, frame(1, whole[20:], 1020))
    assert cache_flow(batcher, 1).inspector is None
    assert batcher.flows.held_bytes == 0 and not batcher.flows.active
    assert FlowInspector.budget_evictions == FlowInspector.idle_expired == 0
    # the cache's bound in entries takes a flow's charge with it
    cache = FlowCache(1, True, max_flows=2)
    batcher.flows = cache
    for i in range(3):
        feed(batcher, T + 2 + i, segment(10 + i, 0))
    assert len(cache.flows) == 2 and len(cache.active) == 2
    check_accounting(cache)


def test_udp_flows_without_quic_state_are_not_charged():
    ins = FlowInspector(17, 40000, 40001)
    ins.feed(b"\x01\x02\x03\x04", True, None)
    assert ins.held_bytes() == 0


def test_counters_show_the_inspections_given_up():
    counters = CaptureCounters()
    FlowInspector.budget_evictions += 3
    FlowInspector.idle_expired += 2
    line = counters.summary()
    assert "inspect_budget_evictions=3" in line and "inspect_idle_expired=2" in line


def test_settings_defaults():
    settings = CaptureSettings()
    assert settings.inspect_memory_mb == 64
    assert settings.inspect_idle_timeout_s == 30
    assert settings.fragments_held == 4096
    batcher = RecordBatcher(1, 1000, inspect_memory_mb=settings.inspect_memory_mb,
                            inspect_idle_timeout_s=settings.inspect_idle_timeout_s,
                            fragments_held=settings.fragments_held)
    assert batcher.flows.memory_bytes == 64 << 20
    assert batcher.flows.idle_timeout_ns == 30 * S
    assert batcher.fragments.max_held == 4096
