"""The record contract between the capture service and the flow processor.

A Kafka message on the packets topic is one batch of packet records:

    header   '<4sBBH'   magic b"DPIR", format version, reserved (0), record count
    records  count x RECORD (fixed 56 bytes each, little-endian, fields of Record below)
    meta     '<H' count, then per entry '<HBB' record index, kind (META_*), length + UTF-8
             value: the L7 names found in that record's packet (records with FLAG_HAS_META)

A record carries headers and extracted L7 metadata only: never payload bytes.

Capture also sends, every few seconds, a stats message (magic b"DPIS", version byte, then JSON
{"source", "ts_ns", "counters"}) holding what its counters gained since the previous one
(frames, kernel drops, malformed frames, delivery failures, ...), for the pipeline-health
series the processor writes.
The packed layout was chosen over orjson by measurement (see README, "Record encoding").
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import orjson

MAGIC = b"DPIR"
VERSION = 1
HEADER = struct.Struct("<4sBBH")
RECORD = struct.Struct("<qIBBBBHH16s16sBBH")
NAME_COUNT = struct.Struct("<H")
MAX_RECORDS_PER_MESSAGE = 65535


class Record(NamedTuple):
    """Field order of RECORD; the processor unpacks straight into plain tuples of this order."""

    ts_ns: int  # capture time, nanoseconds since the epoch
    wire_len: int  # original frame length on the wire (pcap orig_len, tshark frame.len)
    ip_version: int  # 0 = no (decodable) IP header, 4 or 6 = innermost IP header
    ip_proto: int  # L4 protocol number of the innermost IP header (0 when ip_version == 0)
    tcp_flags: int
    flags: int  # FLAG_* bits below
    sport: int
    dport: int
    src: bytes  # 16 bytes: IPv6, or IPv4 in the first 4 bytes (MAC for non-IP frames)
    dst: bytes
    app: int  # application id (packet_records.apps), 0 = UNKNOWN / not classified yet
    app_flags: int  # APP_GUESS when the label comes from a well-known port only
    reserved: int


# Record.flags bits
FLAG_MALFORMED = 0x01  # something in the frame could not be decoded (still counted)
FLAG_FRAGMENT = 0x02  # IP fragment
FLAG_TRUNCATED = 0x04  # captured length shorter than the wire length
FLAG_TUNNEL = 0x08  # the IP header used is inside a decapsulated tunnel
FLAG_UNSUPPORTED_LINK = 0x10  # link type the decoder does not know
FLAG_LATER_FRAGMENT = 0x20  # non-first IP fragment (ports come from its first fragment)
FLAG_HAS_META = 0x40  # the message's meta section holds entries for this record

APP_GUESS = 0x01  # Record.app_flags

# kinds of meta entries
META_SERVER_NAME = 1  # TLS/QUIC SNI, HTTP Host or DNS query name
META_FINGERPRINT = 2  # JA4 of a TLS or QUIC ClientHello
META = struct.Struct("<HBB")

# L4 buckets of the Redis schema (ts:protocol:<PROTO>:...)
PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPV6"}
PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPV6", "OTHER")


def protocol_name(ip_version: int, ip_proto: int) -> str:
    """The schema's L4 bucket of a record: non-IP frames and other protocols are OTHER."""
    if ip_version == 0:
        return "OTHER"
    return PROTO_NAMES.get(ip_proto, "OTHER")


class MalformedMessage(ValueError):
    """A message on the topic is not a valid batch of this contract."""


def encode_batch(records: list[bytes], meta: list[tuple[int, int, str]] | None = None) -> bytes:
    """Join records already packed with RECORD.pack, and their meta entries
    (record index, META_* kind, text), into one message."""
    parts = [HEADER.pack(MAGIC, VERSION, 0, len(records)), *records]
    meta = meta or []
    parts.append(NAME_COUNT.pack(len(meta)))
    for index, kind, text in meta:
        raw = text.encode("utf-8")[:255].decode("utf-8", "ignore").encode("utf-8")  # whole chars
        parts.append(META.pack(index, kind, len(raw)) + raw)
    return b"".join(parts)


def decode_batch(message: bytes) -> tuple[Iterator[tuple], list[tuple[int, int, str]]]:
    """Validate a message and return (iterator of record tuples, meta entries)."""
    if len(message) < HEADER.size + NAME_COUNT.size:
        raise MalformedMessage("message shorter than the batch header")
    magic, version, _reserved, count = HEADER.unpack_from(message, 0)
    if magic != MAGIC:
        raise MalformedMessage("not a packet record batch (bad magic)")
    if version != VERSION:
        raise MalformedMessage(f"unsupported record format version {version}")
    end = HEADER.size + count * RECORD.size
    if len(message) < end + NAME_COUNT.size:
        raise MalformedMessage("record section shorter than its count")
    meta = _decode_meta(message, end, count)
    view = memoryview(message)[HEADER.size:end]
    return RECORD.iter_unpack(view), meta


def _decode_meta(message: bytes, pos: int, records: int) -> list[tuple[int, int, str]]:
    (count,) = NAME_COUNT.unpack_from(message, pos)
    pos += NAME_COUNT.size
    meta = []
    for _ in range(count):
        if pos + META.size > len(message):
            raise MalformedMessage("meta section shorter than its count")
        index, kind, size = META.unpack_from(message, pos)
        raw = message[pos + META.size:pos + META.size + size]
        if len(raw) != size or index >= records:
            raise MalformedMessage("meta entry past the end")
        meta.append((index, kind, raw.decode("utf-8", "replace")))
        pos += META.size + size
    if pos != len(message):
        raise MalformedMessage("trailing bytes after the meta section")
    return meta


STATS_MAGIC = b"DPIS"


def encode_stats(source: str, ts_ns: int, counters: dict[str, int]) -> bytes:
    body = orjson.dumps({"source": source, "ts_ns": ts_ns, "counters": counters})
    return STATS_MAGIC + bytes((VERSION,)) + body


def decode_stats(message: bytes) -> tuple[str, int, dict[str, int]]:
    """(source, ts_ns, counter increments) of a stats message."""
    if message[:4] != STATS_MAGIC or message[4:5] != bytes((VERSION,)):
        raise MalformedMessage("not a stats message of this version")
    try:
        body = orjson.loads(message[5:])
        counters = {str(k): int(v) for k, v in body["counters"].items()}
        return str(body["source"]), int(body["ts_ns"]), counters
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedMessage(f"bad stats message: {exc}") from None


def partition_for(src: bytes, dst: bytes, sport: int, dport: int, proto: int,
                  partitions: int) -> int:
    """Kafka partition of a flow: the same for both directions, in every process and run."""
    mixed = zlib.crc32(src) ^ zlib.crc32(dst) ^ ((sport ^ dport) * 0x9E3779B1) ^ proto
    return (mixed & 0xFFFFFFFF) % partitions
