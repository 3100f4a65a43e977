"""Reading pcap and pcapng files with plain chunked reads and struct (no per-packet Scapy objects).

read_frames() yields (ts_ns, wire_len, frame bytes, linktype) for every packet of the file, in
file order. Both classic pcap (micro- and nanosecond, either byte order) and pcapng (any number
of sections and interfaces, each with its own link type and timestamp resolution) are read.
A file that is empty, not a capture, or cut short raises CaptureFileError after yielding every
complete packet before the damage.

The file is read, not mapped: a mapped file that is truncated while we read it kills the
process with SIGBUS, while a read just ends early (and is reported as a file cut short). Reads
are also as fast here, and they work on pipes (`zcat f.pcap.gz | ... --pcap /dev/stdin`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_EPB, PCAPNG_SPB, PCAPNG_OPB = 1, 6, 3, 2
IDB_OPT_TSRESOL, IDB_OPT_TSOFFSET = 9, 14
MAX_RECORD = 256 * 1024 * 1024  # bigger "packets" are corruption, not traffic
CHUNK = 1024 * 1024  # bytes per read
# fixed fields each block type needs before its packet data or options
BLOCK_MIN_BODY = {PCAPNG_IDB: 8, PCAPNG_EPB: 20, PCAPNG_OPB: 20, PCAPNG_SPB: 4}
# compressed files people pass by mistake: magic -> (format, decompress, stream)
COMPRESSED = {
    b"\x1f\x8b": ("gzip", "gunzip", "zcat"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd", "zstdcat"),
    b"\xfd7zXZ\x00": ("xz", "unxz", "xzcat"),
    b"BZh": ("bzip2", "bunzip2", "bzcat"),
}

Frame = tuple[int, int, bytes, int]  # (ts_ns, wire_len, frame, linktype)


class CaptureFileError(Exception):
    """The capture file cannot be read (empty, not a capture, corrupt or cut short)."""


def read_frames(path: str | Path) -> Iterator[Frame]:
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
    """buf[pos:] followed by what the file holds next, until there are `want` bytes or it ends."""
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < want:
        chunk = fh.read(CHUNK)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _read_pcap(fh: BinaryIO, buf: bytes, path: Path) -> Iterator[Frame]:
    if len(buf) < 24:
        raise CaptureFileError(f"{path}: pcap header cut short")
    endian = "<" if struct.unpack_from("<I", buf, 0)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
    magic, _major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(
        endian + "IHHiIII", buf, 0
    )
    scale = 1 if magic == PCAP_MAGIC_NS else 1000
    linktype = network & 0x03FFFFFF  # upper bits may carry FCS information
    unpack = struct.Struct(endian + "IIII").unpack_from
    pos, base = 24, 0  # base: the file offset of buf[0]
    while True:
        end = len(buf)
        while pos + 16 <= end:
            sec, frac, incl, orig = unpack(buf, pos)
            start = pos + 16
            stop = start + incl
            if stop > end:
                break
            yield sec * 1_000_000_000 + frac * scale, max(orig, incl), buf[start:stop], linktype
            pos = stop
        # the next record goes past what was read: read on
        want = 16
        if pos + 16 <= end:
            want += unpack(buf, pos)[2]
            if want > MAX_RECORD:
                raise CaptureFileError(f"{path}: packet record at byte {base + pos} is corrupt")
        base += pos
        buf, pos = _read(fh, buf, pos, want), 0
        if len(buf) < want:
            if not buf:
                return
            if len(buf) < 16:
                raise CaptureFileError(
                    f"{path}: file cut short inside a packet header at byte {base}")
            raise CaptureFileError(
                f"{path}: packet record at byte {base} is cut short or corrupt")


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


def _read_pcapng(fh: BinaryIO, buf: bytes, path: Path) -> Iterator[Frame]:
    pos = base = 0  # base: the file offset of buf[0], for error messages
    size = len(buf)
    endian = "<"
    interfaces: list[_Interface] = []
    while True:
        if pos + 12 > size:
            base += pos
            buf, pos = _read(fh, buf, pos, 12), 0
            size = len(buf)
            if not size:
                return
            if size < 12:
                raise CaptureFileError(f"{path}: block header cut short at byte {base}")
        btype = struct.unpack_from(endian + "I", buf, pos)[0]
        if btype == PCAPNG_SHB:  # a new section: byte order and interfaces start over
            bom = struct.unpack_from("<I", buf, pos + 8)[0]
            if bom == PCAPNG_BYTE_ORDER_MAGIC:
                endian = "<"
            elif bom == 0x4D3C2B1A:
                endian = ">"
            else:
                raise CaptureFileError(f"{path}: bad pcapng byte-order magic at byte {base + pos}")
            interfaces = []
        blen = struct.unpack_from(endian + "I", buf, pos + 4)[0]
        if blen < 12 or blen % 4 or blen > MAX_RECORD:
            raise CaptureFileError(f"{path}: pcapng block at byte {base + pos} is corrupt")
        if pos + blen > size:
            base += pos
            buf, pos = _read(fh, buf, pos, blen), 0
            size = len(buf)
            if size < blen:
                raise CaptureFileError(f"{path}: pcapng block at byte {base} is cut short")
        body = pos + 8
        end = pos + blen - 4
        if end - body < BLOCK_MIN_BODY.get(btype, 0):
            raise CaptureFileError(
                f"{path}: pcapng block at byte {base + pos} too short for its fields")
        if btype == PCAPNG_IDB:
            where = f"{path}: block at byte {base + pos}"
            interfaces.append(_parse_idb(buf, body, end, endian, where))
        elif btype in (PCAPNG_EPB, PCAPNG_OPB):
            if btype == PCAPNG_EPB:
                iface, ts_hi, ts_lo, cap, orig = struct.unpack_from(endian + "IIIII", buf, body)
            else:
                iface, _drops, ts_hi, ts_lo, cap, orig = struct.unpack_from(
                    endian + "HHIIII", buf, body
                )
            start = body + 20
            if iface >= len(interfaces) or start + cap > end:
                raise CaptureFileError(f"{path}: packet block at byte {base + pos} is corrupt")
            itf = interfaces[iface]
            ts = itf.to_ns((ts_hi << 32) | ts_lo)
            yield ts, max(orig, cap), buf[start:start + cap], itf.linktype
        elif btype == PCAPNG_SPB:
            if not interfaces:
                raise CaptureFileError(f"{path}: simple packet block before any interface")
            orig = struct.unpack_from(endian + "I", buf, body)[0]
            cap = min(orig, end - body - 4)
            # a simple packet block has no timestamp: 0 rather than an invented time
            yield 0, orig, buf[body + 4:body + 4 + cap], interfaces[0].linktype
        pos += blen


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
