"""RecordBatcher.add_batch against add() frame by frame (decode_frame, the reference).

Differential: crafted captures (tests/captures.py), the real corpus captures (when present),
tests/synthetic.py captures with real first payloads, and random and garbled frames, under
several batcher settings (inspection on and off, small messages, a flow cache and an
inspection budget small enough to evict, short hold and idle times) and batch sizes. Both
paths must give the same messages (bytes, partitions, counts, order) and leave the same state
behind (flow cache order and labels, held fragments, inspection counters); pump() must give
the same messages and counters as add() per frame.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from capture import __main__ as capture_main
from capture.batch_decode import decode_batch, flow_keys
from capture.batching import RecordBatcher
from capture.counters import CaptureCounters
from capture.decode import decode_frame
from capture.flowcache import NOT_CACHED, FlowCache, inspect_ahead, label_of
from capture.inspect.flow import FlowInspector
from capture.pcapfile import CaptureFileError, FrameBatch, FrameChunk, read_frames
from packet_records import FLAG_MALFORMED, FLAG_UNSUPPORTED_LINK, MAX_WIRE_LEN
from packet_records import decode_batch as decode_message
from tests.captures import write_captures
from tests.fakes import RecordingProducer
from tests.synthetic import write_synthetic_pcap
from tests.unit.test_batch_decode import eth, ipv4, mutate, tcp, udp, valid_frames

CORPUS = Path(os.path.dirname(__file__), "..", "..", "..", "shared", "corpus", "ndpi", "pcap")
S = 10**9
DNS_QUERY = bytes.fromhex("123401000001000000000000076578616d706c6503636f6d0000010001")
HTTP_GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

# batcher settings: (name, RecordBatcher keyword arguments, flow cache bound)
SETTINGS = [
    ("default", {}, None),
    ("inspect off", {"inspect": False}, None),
    ("small messages", {"records_per_message": 7, "partitions": 5}, None),
    ("tiny cache", {"records_per_message": 50}, 40),
    ("tiny cache, inspect off", {"inspect": False}, 25),
    ("tight budget", {"inspect_memory_mb": 0.002, "inspect_idle_timeout_s": 0.5,
                      "fragments_held": 3}, 300),
]


def make_batcher(kwargs: dict, max_flows: int | None) -> RecordBatcher:
    args = {"partitions": 12, "records_per_message": 1000, "replay": True, **kwargs}
    batcher = RecordBatcher(args.pop("partitions"), args.pop("records_per_message"), **args)
    if max_flows is not None:
        batcher.flows.max_flows = max_flows
    return batcher


def state(batcher: RecordBatcher) -> dict:
    """What add() leaves behind that later frames depend on."""
    cache = batcher.flows
    flows = []
    for key, f in cache.flows.items():
        settled = f.inspector is None
        assert f.label == label_of(f.partition, f.app, f.app_flags, not settled)
        inspector = None if settled else (f.inspector.app, f.inspector.done,
                                          f.inspector.held_bytes())
        flows.append((key, f.partition, f.app, f.app_flags, f.label, inspector, f.held,
                      f.last_ns, f.sent_name, f.sent_fp, f.client_addr, f.client_port))
    key_of = {id(f): key for key, f in cache.flows.items()}
    frag = batcher.fragments
    return {"flows": flows, "active": [key_of.get(id(f)) for f in cache.active],
            "held_bytes": cache.held_bytes, "ports": list(frag.ports.items()),
            "held": list(frag.held.items()), "held_count": frag.held_count,
            "last_ts": batcher.last_ts, "counts": batcher.counts,
            # (add_batch() keeps several records in one bytes where add() has one each)
            "pending": [b"".join(records) for records in batcher.pending],
            "pending_meta": batcher.pending_meta,
            "given_up": (FlowInspector.budget_evictions, FlowInspector.idle_expired)}


def learned_ahead(decoded, frames: list[bytes]) -> dict[int, tuple]:
    """inspect_ahead() of a batch, as a reader process works it out on a read of a file."""
    lengths = np.array([len(f) for f in frames], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return inspect_ahead(decoded, b"".join(frames), starts, lengths)


def run(items: list, size: int, kwargs: dict, max_flows: int | None, batched: bool,
        flush_every: int = 0) -> tuple[list, dict, int]:
    """Every frame through add() (decode_frame) or add_batch() (decode_batch) in batches of
    `size`, take() after every frame or batch, flush() every flush_every batches, a final
    flush at the end. Returns the messages, the state and the number of add() calls."""
    batcher = make_batcher(kwargs, max_flows)
    calls = 0
    add = batcher.add

    def counted(*args):
        nonlocal calls
        calls += 1
        add(*args)

    batcher.add = counted
    out, states = [], []
    every = max(1, len(items) // size // 10)  # the state after some batches, not only the last
    for k, i in enumerate(range(0, len(items), size)):
        chunk = items[i:i + size]
        if batched:
            ts, wire, frames, linktypes = zip(*chunk)
            decoded = decode_batch(frames, linktypes)
            if k % 2 == 0:  # every other batch with its first payloads inspected ahead
                decoded.learned = learned_ahead(decoded, frames)
            batcher.add_batch(ts, wire, frames, decoded)
            out += batcher.take()
        else:
            for ts, wire, frame, linktype in chunk:
                batcher.add(ts, wire, frame, decode_frame(frame, linktype))
                out += batcher.take()
        if k % every == 0:
            states.append(state(batcher))
        if flush_every and (k + 1) % flush_every == 0:
            batcher.flush()
            out += batcher.take()
    batcher.flush(final=True)
    out += batcher.take()
    states.append(state(batcher))
    return out, states, calls


def compare(items: list, sizes=(1024,), settings=SETTINGS, flush_every: int = 0,
            where: str = "") -> list[float]:
    """Both paths give the same messages and state; returns, per setting and size, the share
    of frames add_batch() left to add()."""
    shares = []
    for name, kwargs, max_flows in settings:
        for size in sizes:
            given_up = FlowInspector.budget_evictions, FlowInspector.idle_expired
            ref, ref_states, _ = run(items, size, kwargs, max_flows, False, flush_every)
            ref_given_up = (FlowInspector.budget_evictions - given_up[0],
                            FlowInspector.idle_expired - given_up[1])
            given_up = FlowInspector.budget_evictions, FlowInspector.idle_expired
            got, got_states, calls = run(items, size, kwargs, max_flows, True, flush_every)
            got_given_up = (FlowInspector.budget_evictions - given_up[0],
                            FlowInspector.idle_expired - given_up[1])
            label = f"{where}: {name}, batches of {size}"
            assert len(got) == len(ref), label
            for k, (mine, theirs) in enumerate(zip(got, ref)):
                assert mine == theirs, f"{label}: message {k} differs"
            assert got_given_up == ref_given_up, label
            for k, (mine, theirs) in enumerate(zip(got_states, ref_states)):
                mine, theirs = dict(mine), dict(theirs)
                mine.pop("given_up"), theirs.pop("given_up")
                assert mine == theirs, f"{label}: state after batch {k} differs"
            shares.append(calls / max(1, len(items)))
    return shares


@pytest.fixture(autouse=True)
def zero_counters(monkeypatch):
    monkeypatch.setattr(FlowInspector, "budget_evictions", 0)
    monkeypatch.setattr(FlowInspector, "idle_expired", 0)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> list:
    """Every crafted capture's frames, one file after the other."""
    paths = write_captures(tmp_path_factory.mktemp("crafted"))
    return [item for _, path in sorted(paths.items()) for item in read_frames(path)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list:
    """TCP/UDP/ICMP over IPv4, IPv6 and 802.1Q, real first payloads (DNS, HTTP, TLS, QUIC)."""
    path = tmp_path_factory.mktemp("synthetic") / "s.pcap"
    write_synthetic_pcap(path, 12_000, flows=400, seconds=4, real_payloads=True)
    return list(read_frames(path))


def garbled(seed: int, n: int) -> list:
    """Valid, mutated and random frames under several link types, with captured lengths
    below the wire length here and there, in time order."""
    rnd = random.Random(seed)
    frames = []
    while len(frames) < n:
        for frame, lt in valid_frames(rnd):
            frames.append((frame, lt))
            if rnd.random() < 0.5:
                frames.append((mutate(rnd, frame), lt))
    for _ in range(n // 10):
        size = rnd.choice((0, 1, 14, 20, 34, 54, 60, rnd.randrange(200)))
        frames.append((rnd.randbytes(size), rnd.choice((1, 101, 113, 276, 0, 9, 147))))
    rnd.shuffle(frames)
    ts = 1_700_000_000 * S
    items = []
    for frame, lt in frames:
        ts += rnd.choice((0, 1000, 10**6, 3 * 10**8))
        items.append((ts, len(frame) + rnd.choice((0, 0, 0, 1, 900)), frame, lt))
    return items


def fragmented(seed: int, n: int) -> list:
    """Whole frames and IPv4 fragments of a few flows between two addresses: first fragments
    (some with a DNS query for the inspector), later ones before or after their first, IP ids
    reused, orphans; times that sometimes jump past the fragment hold time."""
    rnd = random.Random(seed)
    ts, items = 1_700_000_000 * S, []
    for _ in range(n):
        sport, dport = rnd.choice(((40000, 53), (53, 40000), (40001, 443), (5353, 5353)))
        ident = rnd.randrange(6)
        kind = rnd.random()
        if kind < 0.3:
            l3 = ipv4(17, udp(sport, dport, rnd.choice((b"", DNS_QUERY, bytes(30)))))
        elif kind < 0.45:
            l3 = ipv4(6, tcp(sport, dport, payload=rnd.choice((b"", HTTP_GET))))
        elif kind < 0.7:
            l3 = ipv4(17, udp(sport, dport, rnd.choice((DNS_QUERY, bytes(40)))), frag=0x2000,
                      ident=ident)
        else:
            l3 = ipv4(17, rnd.randbytes(24), frag=rnd.choice((0x0003, 0x2005)), ident=ident)
        ts += rnd.choice((1000, 10**6, 5 * 10**8, 3 * S))
        frame = eth(0x0800, l3)
        items.append((ts, len(frame) + rnd.choice((0, 0, 100)), frame, 1))
    return items


def lying(seed: int, n: int) -> list:
    """garbled() frames, some with a wire length that lies (4 GB, one past MAX_WIRE_LEN), and
    two frames bigger than any link carries."""
    rnd = random.Random(seed)
    items = []
    for ts, wire, frame, lt in garbled(seed, n):
        kind = rnd.random()
        if kind < 0.05:
            wire = 0xFFFFFFFF
        elif kind < 0.08:
            wire = MAX_WIRE_LEN + 1
        items.append((ts, wire, frame, lt))
    for at in (n // 3, 2 * n // 3):
        ts, _wire, frame, lt = items[at]
        frame += bytes(MAX_WIRE_LEN + 100)
        items[at] = (ts, len(frame), frame, lt)
    return items


# ------------------------------------------------------------------------------ the tests
def test_crafted_captures(crafted):
    compare(crafted, sizes=(1, 3, 64, 1024), where="crafted")
    compare(crafted, sizes=(5,), flush_every=2, where="crafted, flushed")


def test_synthetic_capture(synthetic):
    shares = compare(synthetic, sizes=(256, 1024), where="synthetic")
    compare(synthetic, sizes=(100,), flush_every=3, settings=SETTINGS[:1] + SETTINGS[3:4],
            where="synthetic, flushed")
    # the default settings leave most frames to the batch path itself
    assert shares[0] < 0.5 and shares[2] < 0.5  # (default and inspect off, batches of 256)


def test_first_payloads_inspected_ahead_give_the_labels_of_inspecting_them_here(
        crafted, synthetic, monkeypatch):
    """A reader process inspects the ClientHellos and QUIC Initials of a batch ahead
    (inspect_ahead); the capture process takes what it learned where that payload is the
    first its flow's inspector gets: the same messages and state as add() frame by frame,
    with many flows' inspection taken from the reader."""
    taken = []
    take_first = FlowInspector.take_first
    monkeypatch.setattr(FlowInspector, "take_first",
                        lambda self, learned: taken.append(learned) or take_first(self, learned))
    items = crafted + synthetic[:30000] + crafted
    settings = [SETTINGS[0], SETTINGS[3], SETTINGS[5]]  # with evictions and a tight budget
    compare(items, sizes=(1024, 16384), settings=settings, where="inspected ahead")
    assert len(taken) > 100
    assert {learned[0] for learned in taken} >= {"TLS", "QUIC"}
    assert any(learned[2] for learned in taken) and any(learned[3] for learned in taken)


def test_garbled_frames():
    for seed in range(2):
        compare(garbled(seed, 3000), sizes=(13, 1024), where=f"garbled {seed}")


def test_fragments_and_the_flows_they_feed():
    for seed in range(3):
        items = fragmented(seed, 2500)
        compare(items, sizes=(16, 1024), where=f"fragments {seed}")
        compare(items, sizes=(64,), flush_every=3, settings=SETTINGS[:1] + SETTINGS[5:],
                where=f"fragments {seed}, flushed")


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")
def test_corpus_captures():
    items = []
    for path in sorted(p for p in CORPUS.iterdir() if p.suffix in (".pcap", ".pcapng", ".cap")):
        try:
            items.extend(read_frames(path))
        except CaptureFileError:
            pass  # a damaged file: the frames before the damage still count
    assert len(items) > 1000
    compare(items, sizes=(1024,), where="corpus")
    compare(items, sizes=(97,), settings=SETTINGS[2:4], where="corpus")


def test_a_full_cache_sends_whole_batches_to_add(synthetic):
    """Near the flow cache's bound the batch path gives way to add(): a flow evicted by an
    earlier frame of the batch comes back afresh (a new inspection, its port guess) there."""
    shares = compare(synthetic, sizes=(512,), settings=[("full", {}, 10)], where="full")
    assert shares == [1.0]


def test_an_empty_batch_changes_nothing():
    batcher = make_batcher({}, None)
    batcher.add_batch([], [], [], decode_batch([], 1))
    assert batcher.take() == [] and not batcher.flows.flows and batcher.last_ts == 0


def test_flow_keys_are_the_flow_cache_keys(synthetic, crafted):
    cache = FlowCache(12, True)
    items = synthetic[:3000] + crafted
    batch = decode_batch([f for _, _, f, _ in items], [lt for *_, lt in items])
    keys = flow_keys(batch)
    rows = keys.view(f"V{keys.dtype.itemsize}").tolist()
    for key, (_v, proto, src, dst, sport, dport, *_rest) in zip(rows, batch.tuples()):
        flow = cache.get(proto, src, sport, dst, dport)
        assert cache.flows[key] is flow
    assert cache.labels(rows) == [cache.flows[key].label for key in rows]
    assert cache.labels([b"not a key"]) == [NOT_CACHED]


@pytest.mark.parametrize("max_flows, index_min, lower", [
    (5, 8, None), (300, 8, None), (300, 1024, None), (100_000, 16, None),
    (300, 1024, (1, 5)), (300, 8, (20, 100))])
def test_find_labels_gives_the_labels_of_the_dict(monkeypatch, max_flows, index_min, lower):
    """FlowCache.find_labels (numpy, FlowIndex) against labels() (the dict), as flows enter,
    are evicted, come back and change labels; the index grows (from index_min flows) and its
    table is small enough for many keys to share a place (found in the dict then). `lower`:
    (round, bound) the cache's bound is lowered to, below the index's capacity."""
    monkeypatch.setattr("capture.flowcache.INDEX_MIN", index_min)
    rnd = random.Random(max_flows)
    cache = FlowCache(12, True, max_flows=max_flows)
    pool = [(rnd.choice((6, 17)), rnd.randbytes(16), rnd.randrange(65536), rnd.randbytes(16),
             rnd.randrange(65536)) for _ in range(3 * min(max_flows, 2000))]

    def key_of(proto, src, sport, dst, dport) -> bytes:
        """The key the cache gives the flow (it orders the ends)."""
        flow = cache.get(proto, src, sport, dst, dport)
        return next(k for k, f in reversed(cache.flows.items()) if f is flow)

    keys = {}
    for round_ in range(30):
        if lower and round_ == lower[0]:
            cache.max_flows = lower[1]
        for _ in range(rnd.choice((1, 5, 50, 400)) if round_ else 2):
            flow_args = rnd.choice(pool)
            if flow_args not in keys:
                keys[flow_args] = key_of(*flow_args)
            flow = cache.get(*flow_args)
            if rnd.random() < 0.3:  # the label changes (as inspection changes it), or settles
                flow.app, flow.app_flags = rnd.randrange(256), rnd.randrange(2)
                flow.settle() if rnd.random() < 0.5 else flow.relabel()
        asked = [keys[a] for a in rnd.sample(sorted(keys), min(len(keys), 500))]
        asked += [rnd.randbytes(37) for _ in range(20)]  # never cached
        rows = np.frombuffer(b"".join(asked), dtype=np.uint8).reshape(len(asked), 37)
        assert cache.find_labels(rows).tolist() == cache.labels(asked), round_
    assert len(cache.flows) <= max_flows


def test_flows_waiting_for_the_index_stay_bounded_without_find_labels():
    """Light live traffic adds frames one by one (no find_labels()): a stream of new flows
    must not pile up waiting for the index, nor keep the flows the cache evicted."""
    rnd = random.Random(7)
    cache = FlowCache(12, True, max_flows=100)

    def new_flow():
        return cache.get(17, rnd.randbytes(16), rnd.randrange(65536), rnd.randbytes(16), 53)

    for _ in range(20):
        new_flow()
    keys = list(cache.flows)
    rows = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 37)
    cache.find_labels(rows)  # the index exists from here on
    for _ in range(5000):
        new_flow()
        assert len(cache.entering) <= cache.max_flows
    cached = set(map(id, cache.flows.values()))
    assert all(id(flow) in cached for flow in cache.entering)
    keys = list(cache.flows)[-50:] + keys[:5]  # cached, and evicted long ago
    rows = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 37)
    assert cache.find_labels(rows).tolist() == cache.labels(keys)


def test_survive_names_the_flows_at_risk():
    cache = FlowCache(1, False, max_flows=4)
    for port in range(4):
        cache.get(17, bytes(16), port, bytes(15) + b"\x01", 53)
    first, second, *_ = list(cache.flows)
    assert cache.survive([first], 0)
    assert not cache.survive([first], 1) and cache.survive([second], 1)
    assert not cache.survive([second], 2)
    assert not cache.survive([], 4)  # the new flows themselves could go


# ------------------------------------------------------------------------------ pump
def test_pump_gives_the_messages_and_counters_of_add_per_frame(crafted, synthetic, caplog):
    items = crafted + synthetic[:5000] + garbled(7, 2000) + crafted
    settings = SimpleNamespace(batch_interval_ms=10**9, stats_interval_s=10**9)
    producer, counters = RecordingProducer(), CaptureCounters()
    with caplog.at_level(logging.WARNING, logger="capture"):
        capture_main.pump(iter(items), make_batcher({}, None), producer, counters, settings)
    ref, _, _ = run(items, len(items), {}, None, batched=False)
    assert producer.sent == ref
    decoded = [decode_frame(f, lt) for _, _, f, lt in items]
    bad = [d[7] for d in decoded if d[7] & FLAG_MALFORMED]
    assert counters.frames == len(items)
    assert counters.bytes == sum(w for _, w, _, _ in items)
    assert counters.malformed == len(bad) > 0
    assert counters.unsupported_link == sum(1 for f in bad if f & FLAG_UNSUPPORTED_LINK) > 0
    unsupported = {lt for (_, _, _, lt), d in zip(items, decoded) if d[7] & FLAG_UNSUPPORTED_LINK}
    warnings = [r.getMessage() for r in caplog.records if "is not supported" in r.getMessage()]
    assert sorted(warnings) == sorted(f"link type {lt} is not supported: its frames count as "
                                      "OTHER" for lt in unsupported)


class PausedSource:
    """What pump() asks of a live source besides its items: its kernel drop count."""

    kernel_drops = 0

    def read_drops(self) -> int:
        return 0


def as_blocks(items: list, rnd: random.Random) -> list:
    """The frames as a live source yields them (capture.live.LiveSource.batches()): blocks of
    varied sizes, as FrameChunk columns over one buffer when the frames share a link type, as
    FrameBatch otherwise or at random, and None (traffic paused) between some, first too."""
    out, i = [None], 0
    while i < len(items):
        block = items[i:i + rnd.choice([1, 2, 7, 300, 1500, 5000])]
        i += len(block)
        ts, wire, frames, linktypes = (list(column) for column in zip(*block))
        if len(set(linktypes)) == 1 and rnd.random() < 0.8:
            starts = np.cumsum([0] + [len(f) + 3 for f in frames[:-1]], dtype=np.int64)
            buf = b"".join(f + b"pad" for f in frames)
            out.append(FrameChunk(buf, starts, np.array([len(f) for f in frames], np.int64),
                                  np.array(ts, np.int64), np.array(wire, np.int64),
                                  linktypes[0]))
        else:
            out.append(FrameBatch(ts, wire, frames, linktypes))
        if rnd.random() < 0.3:
            out.append(None)
    return out


def test_pump_of_live_blocks_and_pauses_gives_the_messages_of_add_per_frame(crafted, synthetic):
    """Live capture hands pump() a block of frames at a time (and None when traffic pauses):
    the same messages and counters as add() frame by frame."""
    items = crafted + synthetic[:20000] + garbled(8, 2000) + fragmented(9, 500) + crafted
    settings = SimpleNamespace(batch_interval_ms=10**9, stats_interval_s=10**9)
    producer, counters = RecordingProducer(), CaptureCounters()
    capture_main.pump(iter(as_blocks(items, random.Random(5))), make_batcher({}, None),
                      producer, counters, settings, PausedSource())
    ref, _, _ = run(items, len(items), {}, None, batched=False)
    assert producer.sent == ref
    assert counters.frames == len(items)
    assert counters.bytes == sum(w for _, w, _, _ in items)


def test_wire_lengths_that_lie_are_not_believed():
    """A wire length past MAX_WIRE_LEN (which the processor refuses, with the whole message
    around it) becomes the captured length (at most MAX_WIRE_LEN) and the frame is counted
    malformed: in add(), add_batch() and pump() alike."""
    items = lying(3, 3000)
    compare(items, sizes=(13, 1024), settings=SETTINGS[:3], where="lying lengths")
    settings = SimpleNamespace(batch_interval_ms=10**9, stats_interval_s=10**9)
    producer, counters = RecordingProducer(), CaptureCounters()
    capture_main.pump(iter(items), make_batcher({}, None), producer, counters, settings)
    lies = [(w, len(f)) for _, w, f, _ in items if w > MAX_WIRE_LEN]
    assert len(lies) > 100
    believed = [min(len(f), MAX_WIRE_LEN) if w > MAX_WIRE_LEN else w for _, w, f, _ in items]
    assert counters.bytes == sum(believed)
    malformed = sum(1 for (_, w, f, lt) in items
                    if w > MAX_WIRE_LEN or decode_frame(f, lt)[7] & FLAG_MALFORMED)
    assert counters.malformed == malformed
    records = [r for _, message, _ in producer.sent for r in decode_message(message)[0]]
    assert sorted(r[1] for r in records) == sorted(believed)
    assert sum(1 for r in records if r[5] & FLAG_MALFORMED) == malformed
