"""packet_records: the batch format, its validation, and the flow -> partition mapping."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from packet_records import (
    HEADER,
    MAGIC,
    META,
    META_FINGERPRINT,
    META_SERVER_NAME,
    NAME_COUNT,
    RECORD,
    VERSION,
    MalformedMessage,
    Record,
    decode_batch,
    encode_batch,
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
    Record(-5, 2**32 - 1, 0, 0, 0, 0x01, 0, 0, bytes(16), b"\xff" * 16, 255, 255, 0xFFFF),
]
META_ENTRIES = [(0, META_SERVER_NAME, "example.com"), (0, META_FINGERPRINT, "t13d1516h2_8daa"),
                (2, META_SERVER_NAME, ""), (2, META_SERVER_NAME, "bücher.example")]


def packed(records=RECORDS) -> list[bytes]:
    return [RECORD.pack(*r) for r in records]


def test_round_trip_with_meta_entries():
    records, meta = decode_batch(encode_batch(packed(), META_ENTRIES))
    assert [Record(*r) for r in records] == RECORDS
    assert meta == META_ENTRIES


def test_round_trip_without_meta_and_without_records():
    records, meta = decode_batch(encode_batch([]))
    assert (list(records), meta) == ([], [])
    message = encode_batch(packed())
    assert len(message) == HEADER.size + 3 * RECORD.size + NAME_COUNT.size
    assert list(decode_batch(message)[0]) == [tuple(r) for r in RECORDS]


def test_values_longer_than_255_bytes_are_cut():
    _, meta = decode_batch(encode_batch(packed(), [(1, META_SERVER_NAME, "a" * 300)]))
    assert meta == [(1, META_SERVER_NAME, "a" * 255)]


def test_long_values_are_cut_at_a_character_boundary():
    _, meta = decode_batch(encode_batch(packed(), [(0, META_SERVER_NAME, "é" * 200)]))
    assert meta == [(0, META_SERVER_NAME, "é" * 127)]


def message_with(count=None, magic=MAGIC, version=VERSION, tail=b"\0\0") -> bytes:
    count = len(RECORDS) if count is None else count
    return HEADER.pack(magic, version, 0, count) + b"".join(packed()) + tail


def meta_tail(*entries: bytes, count: int | None = None) -> bytes:
    return NAME_COUNT.pack(len(entries) if count is None else count) + b"".join(entries)


def test_well_formed_helper_message_decodes():
    message = message_with(tail=meta_tail(META.pack(2, META_SERVER_NAME, 3) + b"abc"))
    assert decode_batch(message)[1] == [(2, META_SERVER_NAME, "abc")]


MALFORMED = {
    "empty": (b"", "shorter than the batch header"),
    "short": (MAGIC + b"\x01\x00\x00", "shorter than the batch header"),
    "bad-magic": (message_with(magic=b"XXXX"), "bad magic"),
    "bad-version": (message_with(version=2), "version 2"),
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
