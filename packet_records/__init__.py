"""The record contract between the capture service and the flow processor.

A Kafka message on the packets topic is one batch of packet records:

    header   '<4sBBH'   magic b"DPIR", format version, batch flags (BATCH_*), record count
    records  count x RECORD (fixed 56 bytes each, little-endian, fields of Record below)
    meta     '<H' count, then per entry '<HBB' record index, kind (META_*), length + UTF-8
             value: the L7 names found in that record's packet (records with FLAG_HAS_META)
    check    '<I' CRC-32 of everything before it

A record carries headers and extracted L7 metadata only: never payload bytes.

Capture also sends, every few seconds, a stats message (magic b"DPIS", version byte, JSON
{"source", "ts_ns", "counters"}, CRC-32) holding what its counters gained since the previous
one (frames, kernel drops, malformed frames, delivery failures, ...), for the pipeline-health
series the processor writes.

Anyone who can write to the topic can write anything, so the processor validates every message
completely before it counts any of it (decode_batch, decode_stats): structure, checksum, every
field's range, names and timestamps. The packed layout was chosen over orjson by measurement
(see README, "Record encoding").
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import orjson

from packet_records.apps import APPS

MAGIC = b"DPIR"
VERSION = 2  # 2: batch flags in the header, CRC-32 at the end
HEADER = struct.Struct("<4sBBH")
RECORD = struct.Struct("<qIBBBBHH16s16sBBH")
NAME_COUNT = struct.Struct("<H")
CHECKSUM = struct.Struct("<I")
MAX_RECORDS_PER_MESSAGE = 65535
# Larger than any frame a capture socket or file hands over (GSO/BIG TCP super-packets
# included): a wire length past it is a lie.
MAX_WIRE_LEN = 1 << 20

# header batch flags
BATCH_REPLAY = 0x01  # records read from a capture file: their times are the file's, not now

# RECORD as a numpy dtype, to validate a whole batch at once
RECORD_DTYPE = np.dtype([
    ("ts_ns", "<i8"), ("wire_len", "<u4"), ("ip_version", "u1"), ("ip_proto", "u1"),
    ("tcp_flags", "u1"), ("flags", "u1"), ("sport", "<u2"), ("dport", "<u2"),
    ("src", "V16"), ("dst", "V16"), ("app", "u1"), ("app_flags", "u1"), ("reserved", "<u2"),
])
assert RECORD_DTYPE.itemsize == RECORD.size


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
META_KINDS = (META_SERVER_NAME, META_FINGERPRINT)

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


class TimeLimits(NamedTuple):
    """Which capture times a batch may carry, relative to when it was produced."""

    live_window_ns: int  # live batch: every record within this of the message's timestamp
    max_ahead_ns: int  # any batch: no record later than the reader's clock plus this


def encode_batch(records: list[bytes], meta: list[tuple[int, int, str]] | None = None,
                 replay: bool = False) -> bytes:
    """Join records already packed with RECORD.pack, and their meta entries
    (record index, META_* kind, text), into one message."""
    return encode_packed(len(records), records, meta, replay)


def encode_packed(count: int, parts: list, meta: list[tuple[int, int, str]] | None = None,
                  replay: bool = False) -> bytes:
    """encode_batch() of `count` records packed back to back in `parts` (bytes-like, each any
    number of whole records: RECORD.pack results, or the bytes of RECORD_DTYPE rows)."""
    head = HEADER.pack(MAGIC, VERSION, BATCH_REPLAY if replay else 0, count)
    tail = [NAME_COUNT.pack(len(meta) if meta else 0)]
    for index, kind, text in meta or ():
        raw = text.encode("utf-8")
        if len(raw) > 255:
            raw = raw[:255].decode("utf-8", "ignore").encode("utf-8")  # whole characters
        tail.append(META.pack(index, kind, len(raw)) + raw)
    tail = b"".join(tail)
    # the checksum runs over the parts where they are (the message is joined once), unless
    # they are many small ones (add()'s records): one call per record would cost more
    if len(parts) > 16:
        parts = [b"".join(parts)]
    crc = zlib.crc32(head)
    for piece in parts:
        crc = zlib.crc32(piece, crc)
    crc = zlib.crc32(tail, crc)
    return b"".join([head, *parts, tail, CHECKSUM.pack(crc)])


def _check_sum(message: bytes, what: str) -> None:
    (expected,) = CHECKSUM.unpack_from(message, len(message) - CHECKSUM.size)
    if zlib.crc32(memoryview(message)[:len(message) - CHECKSUM.size]) != expected:
        raise MalformedMessage(f"{what} checksum does not match (corrupted or forged)")


class DecodedRecords:
    """The records of a validated batch: iterating gives plain tuples (RECORD field order, as
    RECORD.iter_unpack does), `array` is the same records as a RECORD_DTYPE array (a view of
    the message, no copy) for column-wise work (flow_processor.aggregate). `replay`: the batch
    comes from a capture file (BATCH_REPLAY)."""

    __slots__ = ("array", "_view", "replay")

    def __init__(self, array: np.ndarray, view: memoryview, replay: bool = False):
        self.array = array
        self._view = view
        self.replay = replay

    def __iter__(self) -> Iterator[tuple]:
        return RECORD.iter_unpack(self._view)

    def __len__(self) -> int:
        return len(self.array)


def decode_batch(message: bytes, message_ns: int | None = None, now_ns: int | None = None,
                 limits: TimeLimits | None = None,
                 ) -> tuple[DecodedRecords, list[tuple[int, int, str]]]:
    """Validate a whole message and return (its records, meta entries): iterate the records
    for tuples, or take their `array` (see DecodedRecords).

    With limits, capture times are checked too: no record later than now_ns plus
    limits.max_ahead_ns, and in a live batch every record within limits.live_window_ns of
    message_ns (the Kafka message's timestamp). A replayed batch may carry any time from 1970
    on, as capture files do."""
    if len(message) < HEADER.size + NAME_COUNT.size + CHECKSUM.size:
        raise MalformedMessage("message shorter than the batch header")
    magic, version, batch_flags, count = HEADER.unpack_from(message, 0)
    if magic != MAGIC:
        raise MalformedMessage("not a packet record batch (bad magic)")
    if version != VERSION:
        raise MalformedMessage(f"unsupported record format version {version}")
    end = HEADER.size + count * RECORD.size
    if len(message) < end + NAME_COUNT.size + CHECKSUM.size:
        raise MalformedMessage("record section shorter than its count")
    _check_sum(message, "batch")
    if batch_flags & ~BATCH_REPLAY:
        raise MalformedMessage(f"unknown batch flags {batch_flags:#x}")
    meta = _decode_meta(message, end, count)
    batch = np.frombuffer(message, RECORD_DTYPE, count, HEADER.size)
    replay = bool(batch_flags & BATCH_REPLAY)
    if count:
        _check_records(batch, replay, message_ns, now_ns, limits)
    return DecodedRecords(batch, memoryview(message)[HEADER.size:end], replay), meta


def _check_records(batch: np.ndarray, replay: bool, message_ns: int | None, now_ns: int | None,
                   limits: TimeLimits | None) -> None:
    ipver = batch["ip_version"]
    if ((ipver != 0) & (ipver != 4) & (ipver != 6)).any():
        raise MalformedMessage("IP version other than 0, 4 or 6")
    if (batch["app"] >= len(APPS)).any():
        raise MalformedMessage(f"application id past the {len(APPS)} known")
    if (batch["app_flags"] & (0xFF ^ APP_GUESS)).any():
        raise MalformedMessage("unknown application flags")
    if (batch["wire_len"] > MAX_WIRE_LEN).any():
        raise MalformedMessage(f"wire length over {MAX_WIRE_LEN} bytes")
    if batch["reserved"].any():
        raise MalformedMessage("reserved field not zero")
    ts = batch["ts_ns"]
    oldest, newest = int(ts.min()), int(ts.max())
    if oldest < 0:
        raise MalformedMessage("capture time before 1970")
    if limits is not None:
        check_time(oldest, newest, replay, message_ns, now_ns, limits)


def check_time(oldest: int, newest: int, replay: bool, message_ns: int | None,
               now_ns: int | None, limits: TimeLimits) -> None:
    """Capture times [oldest, newest] of one message against TimeLimits (see decode_batch)."""
    if now_ns is not None and newest > now_ns + limits.max_ahead_ns:
        raise MalformedMessage("capture time in the future")
    if not replay and message_ns is not None and (
            oldest < message_ns - limits.live_window_ns
            or newest > message_ns + limits.live_window_ns):
        raise MalformedMessage("live capture time too far from the message's timestamp")


def _decode_meta(message: bytes, pos: int, records: int) -> list[tuple[int, int, str]]:
    (count,) = NAME_COUNT.unpack_from(message, pos)
    pos += NAME_COUNT.size
    stop = len(message) - CHECKSUM.size
    meta = []
    for _ in range(count):
        if pos + META.size > stop:
            raise MalformedMessage("meta section shorter than its count")
        index, kind, size = META.unpack_from(message, pos)
        raw = message[pos + META.size:pos + META.size + size]
        if len(raw) != size or pos + META.size + size > stop or index >= records:
            raise MalformedMessage("meta entry past the end")
        if kind not in META_KINDS:
            raise MalformedMessage(f"unknown meta kind {kind}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage("meta value is not UTF-8") from None
        if not text.isprintable():
            raise MalformedMessage("meta value with control characters")
        meta.append((index, kind, text))
        pos += META.size + size
    if pos != stop:
        raise MalformedMessage("trailing bytes after the meta section")
    return meta


STATS_MAGIC = b"DPIS"
MAX_STATS_BYTES = 16384
MAX_COUNTER_INCREMENT = 1 << 48
# The capture counters a stats message may carry (ts:health:<name>:count); nothing else is
# accepted, so a forged message cannot create series.
STATS_COUNTERS = ("capture_frames", "capture_kernel_drops", "capture_malformed",
                  "capture_delivery_failed", "capture_dropped_buffer_full",
                  "capture_parser_errors", "capture_inspect_budget_evictions",
                  "capture_inspect_idle_expired")


def encode_stats(source: str, ts_ns: int, counters: dict[str, int],
                 replay_end: bool = False) -> bytes:
    """A stats message; replay_end: the replay of a capture file ended (capture sends one to
    every partition after its last records: the processor writes its flows at once)."""
    fields = {"source": source, "ts_ns": ts_ns, "counters": counters}
    if replay_end:
        fields["replay_end"] = True
    body = STATS_MAGIC + bytes((VERSION,)) + orjson.dumps(fields)
    return body + CHECKSUM.pack(zlib.crc32(body))


def decode_stats(message: bytes, message_ns: int | None = None, now_ns: int | None = None,
                 limits: TimeLimits | None = None) -> tuple[str, int, dict[str, int], bool]:
    """(source, ts_ns, counter increments, replay end) of a validated stats message."""
    if message[:4] != STATS_MAGIC or message[4:5] != bytes((VERSION,)):
        raise MalformedMessage("not a stats message of this version")
    if len(message) > MAX_STATS_BYTES:
        raise MalformedMessage(f"stats message over {MAX_STATS_BYTES} bytes")
    if len(message) < 5 + CHECKSUM.size:
        raise MalformedMessage("stats message cut short")
    _check_sum(message, "stats")
    try:
        body = orjson.loads(message[5:len(message) - CHECKSUM.size])
        source, ts_ns, counters = body["source"], body["ts_ns"], body["counters"]
        replay_end = body.get("replay_end", False)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedMessage(f"bad stats message: {exc}") from None
    if not (isinstance(source, str) and 0 < len(source) <= 255 and source.isprintable()):
        raise MalformedMessage("stats source is not a short printable name")
    if type(ts_ns) is not int or ts_ns < 0:
        raise MalformedMessage("stats time is not a time")
    if not isinstance(counters, dict) or not set(counters) <= set(STATS_COUNTERS):
        raise MalformedMessage("unknown counter names in a stats message")
    for value in counters.values():
        if type(value) is not int or not 0 <= value < MAX_COUNTER_INCREMENT:
            raise MalformedMessage("stats counter out of range")
    if type(replay_end) is not bool:
        raise MalformedMessage("stats replay_end is not true or false")
    if limits is not None:
        check_time(ts_ns, ts_ns, False, message_ns, now_ns, limits)
    return source, ts_ns, counters, replay_end


def partition_for(src: bytes, dst: bytes, sport: int, dport: int, proto: int,
                  partitions: int) -> int:
    """Kafka partition of a flow: the same for both directions, in every process and run."""
    mixed = zlib.crc32(src) ^ zlib.crc32(dst) ^ ((sport ^ dport) * 0x9E3779B1) ^ proto
    return (mixed & 0xFFFFFFFF) % partitions
