"""Reading pcap and pcapng files with plain chunked reads and struct (no per-packet Scapy objects).

read_frames() yields (ts_ns, wire_len, frame bytes, linktype) for every packet of the file, in
file order; read_batches() yields the same packets as FrameBatch columns, one batch for the
complete packets of each read; read_chunks() yields those of a classic pcap as FrameChunk
instead (what `python -m capture --pcap` decodes, in the reader process of
capture.reader_process): the read itself and where each frame lies
in it, no bytes object or tuple per packet.
Both classic pcap (micro- and nanosecond, either byte order) and pcapng (any number
of sections and interfaces, each with its own link type and timestamp resolution) are read.
A file that is empty, not a capture, or cut short raises CaptureFileError after yielding every
complete packet before the damage.

The file is read, not mapped: a mapped file that is truncated while we read it kills the
process with SIGBUS, while a read just ends early (and is reported as a file cut short). Reads
are also as fast here, and they work on pipes (`zcat f.pcap.gz | ... --pcap /dev/stdin`).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

log = logging.getLogger(__name__)
PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_EPB, PCAPNG_SPB, PCAPNG_OPB = 1, 6, 3, 2
IDB_OPT_TSRESOL, IDB_OPT_TSOFFSET = 9, 14
MAX_RECORD = 256 * 1024 * 1024  # bigger "packets" are corruption, not traffic
MAX_TIME_NS = (1 << 63) - 1  # a record's capture time: int64 nanoseconds since 1970
CHUNK = 4 << 20  # bytes per read (see capture.__main__.CHUNK_DECODE_BATCH)
READ_AHEAD = 4 * CHUNK  # asked of the kernel beyond each read (_read_ahead)
# fixed fields each block type needs before its packet data or options
BLOCK_MIN_BODY = {PCAPNG_IDB: 8, PCAPNG_EPB: 20, PCAPNG_OPB: 20, PCAPNG_SPB: 4}
# per byte order: a pcapng block's type and length; an enhanced packet block's fields
_PCAPNG_HEAD = {e: struct.Struct(e + "II").unpack_from for e in "<>"}
_PCAPNG_EPB = {e: struct.Struct(e + "IIIII").unpack_from for e in "<>"}
# compressed files people pass by mistake: magic -> (format, decompress, stream)
COMPRESSED = {
    b"\x1f\x8b": ("gzip", "gunzip", "zcat"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd", "zstdcat"),
    b"\xfd7zXZ\x00": ("xz", "unxz", "xzcat"),
    b"BZh": ("bzip2", "bunzip2", "bzcat"),
}

Frame = tuple[int, int, bytes, int]  # (ts_ns, wire_len, frame, linktype)


class FrameBatch(NamedTuple):
    """Consecutive packets of a file, as columns: frame i is (ts_ns[i], wire_lens[i],
    frames[i], linktypes if it is an int else linktypes[i])."""

    ts_ns: list[int]
    wire_lens: list[int]
    frames: list[bytes]
    linktypes: int | list[int]  # one link type for every frame (classic pcap), or one each


class FrameChunk(NamedTuple):
    """Consecutive packets of a classic pcap, in the read of the file that holds them: frame i
    is buf[starts[i]:starts[i] + lengths[i]], captured at ts_ns[i] with wire length
    wire_lens[i] (int64 arrays); one link type for all."""

    buf: bytes
    starts: np.ndarray
    lengths: np.ndarray
    ts_ns: np.ndarray
    wire_lens: np.ndarray
    linktype: int

    def frames(self, i: int = 0, j: int | None = None) -> FrameSlices:
        """Frames i..j-1 (all by default), sliced from buf only when asked for."""
        return FrameSlices(self.buf, self.starts[i:j], self.lengths[i:j])

    def parts(self, size: int) -> list[tuple[int, int]]:
        """(i, j) of consecutive runs of at most `size` frames covering them all, of about
        equal length (a small rest would cost a decoder as much as a full run)."""
        n = len(self.starts)
        count = -(-n // size)
        return [(n * k // count, n * (k + 1) // count) for k in range(count)]

    def as_batch(self) -> FrameBatch:
        return FrameBatch(self.ts_ns.tolist(), self.wire_lens.tolist(), self.frames().pick(),
                          self.linktype)


class FrameSlices(Sequence):
    """Frames that lie in one buffer, as a sequence of bytes: each is sliced when indexed."""

    __slots__ = ("buf", "starts", "lengths")

    def __init__(self, buf: bytes, starts: np.ndarray, lengths: np.ndarray):
        self.buf, self.starts, self.lengths = buf, starts, lengths

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FrameSlices(self.buf, self.starts[i], self.lengths[i])
        start = int(self.starts[i])
        return self.buf[start:start + int(self.lengths[i])]

    def __iter__(self):
        return iter(self.pick())

    def pick(self, rows: np.ndarray | None = None) -> list[bytes]:
        """The frames at `rows` (all by default), in that order."""
        starts, lengths = (self.starts, self.lengths) if rows is None else (
            self.starts[rows], self.lengths[rows])
        buf = self.buf
        return [buf[a:b] for a, b in zip(starts.tolist(), (starts + lengths).tolist())]


class CaptureFileError(Exception):
    """The capture file cannot be read (empty, not a capture, corrupt or cut short)."""


def read_frames(path: str | Path) -> Iterator[Frame]:
    for batch in read_batches(path):
        yield from frames_of(batch)


def frames_of(batch: FrameBatch | FrameChunk) -> Iterator[Frame]:
    """(ts_ns, wire_len, frame, linktype) of every packet of a batch, in order."""
    if type(batch) is FrameChunk:
        batch = batch.as_batch()
    ts_ns, wire_lens, frames, linktypes = batch
    types = repeat(linktypes) if isinstance(linktypes, int) else linktypes
    return zip(ts_ns, wire_lens, frames, types)


def read_batches(path: str | Path) -> Iterator[FrameBatch]:
    """The packets of read_frames(path), a batch (never empty) for each read of the file: a
    batch is yielded before the file is read further, and one that ends at damage before the
    CaptureFileError."""
    for batch in read_chunks(path):
        yield batch.as_batch() if type(batch) is FrameChunk else batch


def read_chunks(path: str | Path) -> Iterator[FrameChunk | FrameBatch]:
    """read_batches(path), with the batches of a classic pcap as FrameChunk (pcapng: FrameBatch
    still)."""
    path = Path(path)
    if path.is_dir():
        raise CaptureFileError(f"{path} is a directory: give one pcap or pcapng file")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise CaptureFileError(f"{path}: {exc.strerror}") from exc
    with fh:
        head = _read(fh, b"", 0, 24)
        if not head:
            raise CaptureFileError(f"{path}: empty file, not a capture")
        for magic, (kind, decompress, stream) in COMPRESSED.items():
            if head.startswith(magic):
                raise CaptureFileError(
                    f"{path} is {kind}-compressed: decompress it first ({decompress} {path}), "
                    f"or stream it: {stream} {path} | python -m capture --pcap /dev/stdin")
        if len(head) < 4:
            raise CaptureFileError(f"{path}: {len(head)} bytes, too short for a capture file")
        magic_le = struct.unpack_from("<I", head, 0)[0]
        if magic_le == PCAPNG_SHB:
            yield from _read_pcapng(fh, head, path)
        elif magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or struct.unpack_from(">I", head, 0)[0] in (
            PCAP_MAGIC_US, PCAP_MAGIC_NS
        ):
            yield from _read_pcap(fh, head, path)
        else:
            raise CaptureFileError(f"{path}: not a pcap or pcapng file (magic {magic_le:#010x})")


def _read(fh: BinaryIO, buf: bytes, pos: int, want: int) -> bytes:
    """buf[pos:] followed by what the file holds next, until there are `want` bytes or it ends.
    When buf is used up, that is a new chunk (as it was read); else only the bytes missing to
    the record or block that buf cut short are read: buf[pos:] joined with a whole chunk would
    copy the chunk into a fresh buffer, past glibc's mmap threshold, at a page fault a page
    (~0.2 us a frame)."""
    parts = [buf[pos:]] if pos < len(buf) else []
    have = len(buf) - pos if parts else 0
    while have < want:
        chunk = fh.read(want - have if parts else CHUNK)
        if not chunk:
            break
        if len(chunk) == CHUNK:
            _read_ahead(fh)
        parts.append(chunk)
        have += len(chunk)
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _read_ahead(fh: BinaryIO) -> None:
    """Ask the kernel to read the chunk READ_AHEAD past the start of this read (a full CHUNK)
    into the page cache in the background (the chunks before it were asked for by the reads
    before): a file that is not in the page cache is read from disk while the chunks before
    are decoded, not when a read asks for it (880 MB not in the cache: 2.7 -> 2.2 s). Pipes
    and other streams cannot be advised: nothing to do."""
    try:
        os.posix_fadvise(fh.fileno(), fh.tell() + READ_AHEAD - CHUNK, CHUNK,
                         os.POSIX_FADV_WILLNEED)
    except (OSError, ValueError):
        pass


def _read_pcap(fh: BinaryIO, buf: bytes, path: Path) -> Iterator[FrameChunk]:
    if len(buf) < 24:
        raise CaptureFileError(f"{path}: pcap header cut short")
    endian = "<" if struct.unpack_from("<I", buf, 0)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
    magic, _major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(
        endian + "IHHiIII", buf, 0
    )
    scale = 1 if magic == PCAP_MAGIC_NS else 1000
    linktype = network & 0x03FFFFFF  # upper bits may carry FCS information
    incl_at = struct.Struct(endian + "I").unpack_from
    fields = np.dtype(endian + "u4")
    pos, base = 24, 0  # base: the file offset of buf[0]
    # a read that cuts a record short is followed by a read from that record's start (its
    # first bytes read again), not by a read of the bytes it misses: a record joined from two
    # reads would be a batch of its own, with a batch's fixed costs (a pipe cannot seek back)
    seekable = fh.seekable()
    while True:
        # The records chain through the buffer: only their offsets are found one by one, the
        # rest is done for all of them at once. Each record whose header is complete is taken;
        # the last one taken is dropped again if its frame goes past the buffer.
        end = len(buf)
        last = end - 16
        starts: list[int] = []
        take = starts.append
        stop = pos
        while stop <= last:
            take(stop)
            stop += 16 + incl_at(buf, stop + 8)[0]
        if stop > end:
            stop = starts.pop()
        if starts:
            yield _pcap_chunk(buf, starts, scale, fields, linktype)
        pos = stop
        # the next record goes past what was read: read on
        want = 16
        if pos + 16 <= end:
            want += incl_at(buf, pos + 8)[0]
            if want > MAX_RECORD:
                raise CaptureFileError(f"{path}: packet record at byte {base + pos} is corrupt")
        had = end - pos  # bytes of that record read already
        base += pos
        if had and seekable:
            fh.seek(base)
            buf = _read(fh, b"", 0, want)
        else:
            buf = _read(fh, buf, pos, want)
        pos = 0
        if len(buf) < want:
            if not buf and not had:
                return
            if len(buf) < 16:
                raise CaptureFileError(
                    f"{path}: file cut short inside a packet header at byte {base}")
            raise CaptureFileError(
                f"{path}: packet record at byte {base} is cut short or corrupt")


def _pcap_chunk(buf: bytes, starts: list[int], scale: int, fields: np.dtype,
                linktype: int) -> FrameChunk:
    """The records at `starts` (consecutive, all complete) of a classic pcap."""
    at = np.array(starts, dtype=np.intp)
    # the 16-byte header of a record at every byte of buf, as overlapping items: item p is
    # the header of a record at p; one gather takes them all, then its 4 fields (seconds,
    # fraction, captured and original length) are columns
    headers = np.ndarray((len(buf) - 15,), "V16", buf, strides=(1,))
    head = headers[at].view(fields).reshape(len(at), 4)
    ts_ns = head[:, 0].astype(np.int64) * 1_000_000_000 + head[:, 1].astype(np.int64) * scale
    lengths = head[:, 2].astype(np.int64)
    wire_lens = np.maximum(lengths, head[:, 3])
    return FrameChunk(buf, at + 16, lengths, ts_ns, wire_lens, linktype)


class _Interface:
    __slots__ = ("linktype", "ticks_num", "ticks_den", "offset_ns")

    def __init__(self, linktype: int, resolution: int, offset_s: int):
        self.linktype = linktype
        if resolution & 0x80:  # power of two
            self.ticks_num, self.ticks_den = 1_000_000_000, 1 << (resolution & 0x7F)
        elif resolution <= 9:
            self.ticks_num, self.ticks_den = 10 ** (9 - resolution), 1
        else:
            self.ticks_num, self.ticks_den = 1, 10 ** (resolution - 9)
        self.offset_ns = offset_s * 1_000_000_000

    def to_ns(self, ticks: int) -> int:
        return ticks * self.ticks_num // self.ticks_den + self.offset_ns


def _read_pcapng(fh: BinaryIO, buf: bytes, path: Path) -> Iterator[FrameBatch]:
    packets: list[Frame] = []  # those of the blocks parsed since the last read
    try:
        pos = base = 0  # base: the file offset of buf[0], for error messages
        size = len(buf)
        endian = "<"
        head, packet = _PCAPNG_HEAD[endian], _PCAPNG_EPB[endian]
        interfaces: list[_Interface] = []
        clocks: list[tuple[int, int, int, int]] = []  # (linktype, ticks_num, ticks_den, offset)
        while True:
            if pos + 12 > size:
                if packets:
                    yield _pcapng_batch(packets)
                    packets = []
                base += pos
                buf, pos = _read(fh, buf, pos, 12), 0
                size = len(buf)
                if not size:
                    return
                if size < 12:
                    raise CaptureFileError(f"{path}: block header cut short at byte {base}")
            btype, blen = head(buf, pos)
            if btype == PCAPNG_SHB:  # a new section: byte order and interfaces start over
                bom = struct.unpack_from("<I", buf, pos + 8)[0]
                if bom == PCAPNG_BYTE_ORDER_MAGIC:
                    endian = "<"
                elif bom == 0x4D3C2B1A:
                    endian = ">"
                else:
                    raise CaptureFileError(
                        f"{path}: bad pcapng byte-order magic at byte {base + pos}")
                head, packet = _PCAPNG_HEAD[endian], _PCAPNG_EPB[endian]
                interfaces, clocks = [], []
                blen = head(buf, pos)[1]
            if blen < 12 or blen % 4 or blen > MAX_RECORD:
                raise CaptureFileError(f"{path}: pcapng block at byte {base + pos} is corrupt")
            if pos + blen > size:
                if packets:
                    yield _pcapng_batch(packets)
                    packets = []
                base += pos
                buf, pos = _read(fh, buf, pos, blen), 0
                size = len(buf)
                if size < blen:
                    raise CaptureFileError(f"{path}: pcapng block at byte {base} is cut short")
            body = pos + 8
            end = pos + blen - 4
            if btype == PCAPNG_EPB:  # the common case first
                if end - body < 20:
                    raise CaptureFileError(
                        f"{path}: pcapng block at byte {base + pos} too short for its fields")
                iface, ts_hi, ts_lo, cap, orig = packet(buf, body)
                start = body + 20
                if iface >= len(clocks) or start + cap > end:
                    raise CaptureFileError(
                        f"{path}: packet block at byte {base + pos} is corrupt")
                linktype, num, den, offset = clocks[iface]
                packets.append((((ts_hi << 32) | ts_lo) * num // den + offset,
                                orig if orig > cap else cap, buf[start:start + cap], linktype))
                pos += blen
                continue
            if end - body < BLOCK_MIN_BODY.get(btype, 0):
                raise CaptureFileError(
                    f"{path}: pcapng block at byte {base + pos} too short for its fields")
            if btype == PCAPNG_IDB:
                where = f"{path}: block at byte {base + pos}"
                itf = _parse_idb(buf, body, end, endian, where)
                interfaces.append(itf)
                clocks.append((itf.linktype, itf.ticks_num, itf.ticks_den, itf.offset_ns))
            elif btype == PCAPNG_OPB:
                iface, _drops, ts_hi, ts_lo, cap, orig = struct.unpack_from(
                    endian + "HHIIII", buf, body
                )
                start = body + 20
                if iface >= len(interfaces) or start + cap > end:
                    raise CaptureFileError(
                        f"{path}: packet block at byte {base + pos} is corrupt")
                itf = interfaces[iface]
                packets.append((itf.to_ns((ts_hi << 32) | ts_lo), max(orig, cap),
                                buf[start:start + cap], itf.linktype))
            elif btype == PCAPNG_SPB:
                if not interfaces:
                    raise CaptureFileError(f"{path}: simple packet block before any interface")
                orig = struct.unpack_from(endian + "I", buf, body)[0]
                cap = min(orig, end - body - 4)
                # a simple packet block has no timestamp: 0 rather than an invented time
                packets.append((0, orig, buf[body + 4:body + 4 + cap], interfaces[0].linktype))
            pos += blen
    except CaptureFileError:
        if packets:  # every packet before the damage
            yield _pcapng_batch(packets)
        raise


def _pcapng_batch(packets: list[Frame]) -> FrameBatch:
    ts_ns, wire_lens, frames, linktypes = map(list, zip(*packets))
    if min(ts_ns) < 0 or max(ts_ns) > MAX_TIME_NS:
        # a corrupt timestamp or interface time offset: time 0, as a packet without a time
        bad = sum(1 for ts in ts_ns if not 0 <= ts <= MAX_TIME_NS)
        log.warning("%d packets with times before 1970 or past 2262 (corrupt timestamps or "
                    "interface time offsets) take time 0, as packets without a time", bad)
        ts_ns = [ts if 0 <= ts <= MAX_TIME_NS else 0 for ts in ts_ns]
    return FrameBatch(ts_ns, wire_lens, frames, linktypes)


def _parse_idb(data: bytes, body: int, end: int, endian: str, where: str) -> _Interface:
    linktype = struct.unpack_from(endian + "H", data, body)[0]
    resolution, offset = 6, 0
    pos = body + 8
    while pos + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", data, pos)
        if code == 0:
            break
        value = pos + 4
        if value + length > end:
            raise CaptureFileError(f"{where}: an interface option runs past the block")
        if code == IDB_OPT_TSRESOL and length >= 1:
            resolution = data[value]
        elif code == IDB_OPT_TSOFFSET and length >= 8:
            offset = struct.unpack_from(endian + "q", data, value)[0]
        pos = value + ((length + 3) & ~3)
    return _Interface(linktype, resolution, offset)
