"""packet_records: the batch format, its validation, and the flow -> partition mapping."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from packet_records import (
    BATCH_REPLAY,
    CHECKSUM,
    HEADER,
    MAGIC,
    MAX_WIRE_LEN,
    META,
    META_FINGERPRINT,
    META_SERVER_NAME,
    NAME_COUNT,
    RECORD,
    RECORD_DTYPE,
    STATS_COUNTERS,
    VERSION,
    MalformedMessage,
    Record,
    TimeLimits,
    decode_batch,
    decode_stats,
    encode_batch,
    encode_packed,
    encode_stats,
    partition_for,
    protocol_name,
)

ROOT = Path(__file__).resolve().parents[2]
A4 = socket.inet_aton("192.0.2.10") + bytes(12)
B4 = socket.inet_aton("198.51.100.20") + bytes(12)
A6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")

RECORDS = [
    Record(1_700_000_000_123_456_789, 1514, 4, 6, 0x12, 0, 40000, 80, A4, B4, 3, 1, 0),
    Record(1_700_000_001_000_000_000, 60, 6, 17, 0, 0x04, 41001, 53, A6, A6, 0, 0, 0),
    Record(5, MAX_WIRE_LEN, 0, 0, 0, 0x01, 0, 0, bytes(16), b"\xff" * 16, 12, 1, 0),
]
META_ENTRIES = [(0, META_SERVER_NAME, "example.com"), (0, META_FINGERPRINT, "t13d1516h2_8daa"),
                (2, META_SERVER_NAME, ""), (2, META_SERVER_NAME, "bücher.example")]


def packed(records=RECORDS) -> list[bytes]:
    return [RECORD.pack(*r) for r in records]


def test_round_trip_with_meta_entries():
    records, meta = decode_batch(encode_batch(packed(), META_ENTRIES))
    assert [Record(*r) for r in records] == RECORDS
    assert meta == META_ENTRIES


def reference_encode_batch(records, meta=None, replay=False) -> bytes:
    """encode_batch() as it was before encode_packed(): the format's reference."""
    parts = [HEADER.pack(MAGIC, VERSION, BATCH_REPLAY if replay else 0, len(records)), *records]
    meta = meta or []
    parts.append(NAME_COUNT.pack(len(meta)))
    for index, kind, text in meta:
        raw = text.encode("utf-8")[:255].decode("utf-8", "ignore").encode("utf-8")
        parts.append(META.pack(index, kind, len(raw)) + raw)
    body = b"".join(parts)
    return body + CHECKSUM.pack(zlib.crc32(body))


def random_text(rng: random.Random) -> str:
    # ASCII, 2-, 3- and 4-byte characters, past 255 bytes at times (cut at a character)
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0xA0, 0x800),
                                   rng.randrange(0x800, 0xD800), rng.randrange(0x10000, 0x110000))))
                   for _ in range(rng.choice((0, 1, 5, 60, 130, 300))))


def test_encode_packed_gives_the_messages_of_the_reference_encoder():
    """encode_packed() (records packed back to back in any number of parts: bytes or numpy
    rows, as RecordBatcher.add_batch hands them) and encode_batch() against the reference,
    byte for byte: crafted and random records, meta entries and splits."""
    rng = random.Random(7)
    crafted = packed()
    cases = [(crafted, META_ENTRIES), (crafted, None), ([], None), ([], [])]
    for _ in range(300):
        records = [rng.randbytes(RECORD.size) for _ in range(rng.choice((0, 1, 2, 17, 1000)))]
        meta = [(rng.randrange(max(len(records), 1)), rng.choice((META_SERVER_NAME,
                                                                   META_FINGERPRINT)),
                 random_text(rng)) for _ in range(rng.choice((0, 0, 1, 3)))]
        cases.append((records, meta))
    for records, meta in cases:
        for replay in (False, True):
            expected = reference_encode_batch(records, meta, replay)
            assert encode_batch(records, meta, replay) == expected
            joined = b"".join(records)
            rows = np.frombuffer(joined, np.dtype(f"V{RECORD.size}"))
            cuts = sorted(rng.randrange(len(records) + 1) for _ in range(3))
            parts = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(records)])]
            assert encode_packed(len(records), parts, meta, replay) == expected
            assert encode_packed(len(records), [joined], meta, replay) == expected
            assert encode_packed(len(records), records, meta, replay) == expected


def test_a_batch_says_whether_it_comes_from_a_capture_file():
    """The processor writes a replay's flows at its end rather than every interval."""
    for replay in (False, True):
        for records in ([], packed(RECORDS[:3])):
            decoded, _ = decode_batch(encode_batch(records, replay=replay), limits=None)
            assert decoded.replay is replay


def test_round_trip_without_meta_and_without_records():
    records, meta = decode_batch(encode_batch([]))
    assert (list(records), meta) == ([], [])
    message = encode_batch(packed())
    assert len(message) == HEADER.size + 3 * RECORD.size + NAME_COUNT.size + CHECKSUM.size
    assert list(decode_batch(message)[0]) == [tuple(r) for r in RECORDS]


def test_decoded_records_are_also_an_array_of_the_same_records():
    records, _meta = decode_batch(encode_batch(packed(), META_ENTRIES))
    assert len(records) == 3 and records.array.dtype == RECORD_DTYPE
    assert [tuple(row) for row in records.array.tolist()] == [tuple(r) for r in RECORDS]
    assert list(records) == list(records)  # iterating again gives the tuples again
    assert not records.array.flags.writeable  # a view of the message
    empty, _ = decode_batch(encode_batch([]))
    assert len(empty) == 0 and empty.array.dtype == RECORD_DTYPE


def test_values_longer_than_255_bytes_are_cut():
    _, meta = decode_batch(encode_batch(packed(), [(1, META_SERVER_NAME, "a" * 300)]))
    assert meta == [(1, META_SERVER_NAME, "a" * 255)]


def test_long_values_are_cut_at_a_character_boundary():
    _, meta = decode_batch(encode_batch(packed(), [(0, META_SERVER_NAME, "é" * 200)]))
    assert meta == [(0, META_SERVER_NAME, "é" * 127)]


def with_checksum(body: bytes) -> bytes:
    return body + CHECKSUM.pack(zlib.crc32(body))


def message_with(count=None, magic=MAGIC, version=VERSION, tail=b"\0\0", records=RECORDS,
                 batch_flags=0) -> bytes:
    count = len(records) if count is None else count
    return with_checksum(HEADER.pack(magic, version, batch_flags, count)
                         + b"".join(packed(records)) + tail)


def meta_tail(*entries: bytes, count: int | None = None) -> bytes:
    return NAME_COUNT.pack(len(entries) if count is None else count) + b"".join(entries)


def test_well_formed_helper_message_decodes():
    message = message_with(tail=meta_tail(META.pack(2, META_SERVER_NAME, 3) + b"abc"))
    assert decode_batch(message)[1] == [(2, META_SERVER_NAME, "abc")]


MALFORMED = {
    "empty": (b"", "shorter than the batch header"),
    "short": (MAGIC + b"\x02\x00\x00", "shorter than the batch header"),
    "bad-magic": (message_with(magic=b"XXXX"), "bad magic"),
    "bad-version": (message_with(version=1), "version 1"),
    "bad-checksum": (message_with()[:-1] + b"!", "checksum"),
    "unknown-batch-flags": (message_with(batch_flags=0x80), "batch flags"),
    "ip-version-5": (message_with(records=[RECORDS[0]._replace(ip_version=5)]), "IP version"),
    "app-id-200": (message_with(records=[RECORDS[0]._replace(app=200)]), "application id"),
    "app-id-13": (message_with(records=[RECORDS[0]._replace(app=13)]), "application id"),
    "app-flags": (message_with(records=[RECORDS[0]._replace(app_flags=2)]), "application flags"),
    "wire-4gb": (message_with(records=[RECORDS[0]._replace(wire_len=2**32 - 1)]),
                 "wire length"),
    "reserved": (message_with(records=[RECORDS[0]._replace(reserved=1)]), "reserved"),
    "before-1970": (message_with(records=[RECORDS[0]._replace(ts_ns=-5)]), "before 1970"),
    "meta-kind": (message_with(tail=meta_tail(META.pack(0, 9, 1) + b"a")), "meta kind"),
    "meta-not-utf8": (message_with(tail=meta_tail(META.pack(0, 1, 2) + b"\xff\xfe")),
                      "not UTF-8"),
    "meta-control": (message_with(tail=meta_tail(META.pack(0, 1, 3) + b"a\x1bb")),
                     "control characters"),
    "record-section-short": (message_with(count=4), "record section shorter"),
    "meta-count-cut": (message_with(tail=b"\0"), "record section shorter"),
    "meta-missing": (message_with(tail=meta_tail(count=1)), "meta section shorter"),
    "meta-header-cut": (message_with(tail=meta_tail(META.pack(0, 1, 0)[:3])),
                        "meta section shorter"),
    "meta-value-past-the-end": (message_with(tail=meta_tail(META.pack(0, 1, 10) + b"abc")),
                                "past the end"),
    "meta-of-a-record-not-there": (message_with(tail=meta_tail(META.pack(3, 1, 1) + b"a")),
                                   "past the end"),
    "trailing-bytes": (message_with(tail=meta_tail() + b"!"), "trailing bytes"),
}


@pytest.mark.parametrize("message, reason", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages(message, reason):
    with pytest.raises(MalformedMessage, match=reason):
        decode_batch(message)


def test_every_bit_flip_of_a_message_is_refused():
    message = encode_batch(packed(), META_ENTRIES)
    rng = random.Random(5)
    for _ in range(1000):
        flipped = bytearray(message)
        bit = rng.randrange(len(message) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(MalformedMessage):
            decode_batch(bytes(flipped))


NOW = 1_800_000_000 * 10**9
LIMITS = TimeLimits(live_window_ns=300 * 10**9, max_ahead_ns=60 * 10**9)


def batch_at(ts_ns: int, replay: bool = False) -> bytes:
    return encode_batch(packed([RECORDS[0]._replace(ts_ns=ts_ns)]), replay=replay)


@pytest.mark.parametrize("ts_ns, replay, ok", [
    (NOW - 10**9, False, True),  # live, a second before it was produced
    (NOW - 301 * 10**9, False, False),  # live, older than the window
    (NOW + 61 * 10**9, False, False),  # ahead of the clock
    (10**9, False, False),  # 1970 in a live batch
    (10**9, True, True),  # 1970 in a replayed file: capture files can be that old
    (NOW + 61 * 10**9, True, False),  # a replayed file from the future
    (2**63 - 1, True, False),  # the year 2262
])
def test_capture_times_are_checked_against_the_message_time_and_the_clock(ts_ns, replay, ok):
    message = batch_at(ts_ns, replay)
    if ok:
        assert len(list(decode_batch(message, NOW, NOW, LIMITS)[0])) == 1
    else:
        with pytest.raises(MalformedMessage, match="time"):
            decode_batch(message, NOW, NOW, LIMITS)


def test_replay_flag_round_trips():
    assert HEADER.unpack_from(batch_at(1, replay=True))[2] == BATCH_REPLAY
    assert HEADER.unpack_from(batch_at(1))[2] == 0


# ----------------------------------------------------------------------------- stats messages
def test_stats_round_trip():
    counters = {name: 3 for name in STATS_COUNTERS}
    assert decode_stats(encode_stats("host:1", NOW, counters), NOW, NOW, LIMITS) == (
        "host:1", NOW, counters, False)
    assert decode_stats(encode_stats("host:1", NOW, {}, replay_end=True), NOW, NOW, LIMITS) == (
        "host:1", NOW, {}, True)


BAD_STATS = {
    "20000-names": encode_stats("h", NOW, {f"c{i}": 1 for i in range(20000)}),
    "unknown-name": encode_stats("h", NOW, {"capture_frames\x1b[2J": 1}),
    "negative": encode_stats("h", NOW, {"capture_frames": -1}),
    "absurd": encode_stats("h", NOW, {"capture_frames": 2**60}),
    "float": encode_stats("h", NOW, {"capture_frames": 1.5}),
    "bool": encode_stats("h", NOW, {"capture_frames": True}),
    "control-source": encode_stats("h\x07", NOW, {}),
    "future": encode_stats("h", NOW + 10**12, {}),
    "bad-checksum": encode_stats("h", NOW, {})[:-1] + b"!",
    "not-json": with_checksum(b"DPIS\x02{"),
    "counters-a-list": with_checksum(b"DPIS\x02" + json.dumps(
        {"source": "h", "ts_ns": NOW, "counters": []}).encode()),
    "replay-end-not-a-bool": with_checksum(b"DPIS\x02" + json.dumps(
        {"source": "h", "ts_ns": NOW, "counters": {}, "replay_end": 1}).encode()),
    "a-list": with_checksum(b"DPIS\x02" + json.dumps(["h", NOW, {}]).encode()),
}


@pytest.mark.parametrize("message", BAD_STATS.values(), ids=BAD_STATS.keys())
def test_bad_stats_messages_are_refused(message):
    with pytest.raises(MalformedMessage):
        decode_stats(message, NOW, NOW, LIMITS)


def test_malformed_message_is_a_value_error():
    assert issubclass(MalformedMessage, ValueError)


@pytest.mark.parametrize("ipver, proto, name", [
    (4, 6, "TCP"), (6, 17, "UDP"), (4, 1, "ICMP"), (6, 58, "ICMPV6"), (4, 47, "OTHER"),
    (6, 132, "OTHER"), (0, 6, "OTHER"), (0, 0, "OTHER"),
])
def test_protocol_name(ipver, proto, name):
    assert protocol_name(ipver, proto) == name


# ----------------------------------------------------------------------------- partition_for
def random_flows(n: int, seed: int = 7) -> list[tuple]:
    rng = random.Random(seed)
    flows = []
    for _ in range(n):
        size = 4 if rng.random() < 0.7 else 16
        src, dst = (rng.randbytes(size) + bytes(16 - size) for _ in range(2))
        flows.append((src, dst, rng.randrange(65536), rng.randrange(65536),
                      rng.choice((6, 17, 1, 58))))
    return flows


def test_partition_is_the_same_for_both_directions():
    for src, dst, sport, dport, proto in random_flows(2000):
        assert partition_for(src, dst, sport, dport, proto, 12) == partition_for(
            dst, src, dport, sport, proto, 12)


@pytest.mark.parametrize("partitions", [1, 2, 3, 12, 64, 1000])
def test_partition_is_within_range(partitions):
    assert {partition_for(*f, partitions) for f in random_flows(2000)} <= set(range(partitions))


def test_partition_is_the_same_in_another_process_with_another_hash_seed():
    flows = [(s.hex(), d.hex(), sp, dp, pr) for s, d, sp, dp, pr in random_flows(200)]
    here = [partition_for(bytes.fromhex(s), bytes.fromhex(d), sp, dp, pr, 12)
            for s, d, sp, dp, pr in flows]
    code = (
        "import json, sys; from packet_records import partition_for;"
        "print(json.dumps([partition_for(bytes.fromhex(s), bytes.fromhex(d), sp, dp, pr, 12)"
        " for s, d, sp, dp, pr in json.load(sys.stdin)]))"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                             input=json.dumps(flows), capture_output=True, text=True).stdout
        assert json.loads(out) == here


def assert_spread(flows, partitions: int = 12) -> None:
    counts = Counter(partition_for(*f, partitions) for f in flows)
    shares = {p: counts[p] / len(flows) for p in range(partitions)}
    assert all(0.05 <= share <= 0.12 for share in shares.values()), shares


def test_random_flows_spread_over_12_partitions():
    assert_spread(random_flows(10_000))


def test_client_server_flows_spread_over_12_partitions():
    """Realistic traffic: clients of one /16 to a few servers on well-known ports."""
    rng = random.Random(11)
    servers = [socket.inet_aton(f"198.51.100.{i}") + bytes(12) for i in range(1, 6)]
    flows = [
        (socket.inet_aton(f"10.1.{rng.randrange(256)}.{rng.randrange(1, 255)}") + bytes(12),
         rng.choice(servers), rng.randrange(32768, 61000), rng.choice((53, 80, 443)),
         rng.choice((6, 17)))
        for _ in range(10_000)
    ]
    assert_spread(flows)


def test_record_layout_is_56_bytes_little_endian():
    assert RECORD.size == 56
    assert struct.unpack_from("<q", RECORD.pack(*RECORDS[0]))[0] == RECORDS[0].ts_ns
