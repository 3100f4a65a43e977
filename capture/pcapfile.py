"""Reading pcap and pcapng files with mmap and struct (no per-packet Scapy objects).

read_frames() yields (ts_ns, wire_len, frame bytes, linktype) for every packet of the file, in
file order. Both classic pcap (micro- and nanosecond, either byte order) and pcapng (any number
of sections and interfaces, each with its own link type and timestamp resolution) are read.
A file that is empty, not a capture, or cut short raises CaptureFileError after yielding every
complete packet before the damage.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_EPB, PCAPNG_SPB, PCAPNG_OPB = 1, 6, 3, 2
IDB_OPT_TSRESOL, IDB_OPT_TSOFFSET = 9, 14
MAX_RECORD = 256 * 1024 * 1024  # bigger "packets" are corruption, not traffic
# fixed fields each block type needs before its packet data or options
BLOCK_MIN_BODY = {PCAPNG_IDB: 8, PCAPNG_EPB: 20, PCAPNG_OPB: 20, PCAPNG_SPB: 4}

Frame = tuple[int, int, bytes, int]  # (ts_ns, wire_len, frame, linktype)


class CaptureFileError(Exception):
    """The capture file cannot be read (empty, not a capture, corrupt or cut short)."""


def read_frames(path: str | Path) -> Iterator[Frame]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CaptureFileError(f"{path}: {exc.strerror}") from exc
    if size == 0:
        raise CaptureFileError(f"{path}: empty file, not a capture")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if size < 4:
            raise CaptureFileError(f"{path}: {size} bytes, too short for a capture file")
        magic_le = struct.unpack_from("<I", data, 0)[0]
        if magic_le == PCAPNG_SHB:
            yield from _read_pcapng(data, path)
        elif magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or struct.unpack_from(">I", data, 0)[0] in (
            PCAP_MAGIC_US, PCAP_MAGIC_NS
        ):
            yield from _read_pcap(data, path)
        else:
            raise CaptureFileError(f"{path}: not a pcap or pcapng file (magic {magic_le:#010x})")


def _read_pcap(data: mmap.mmap, path: Path) -> Iterator[Frame]:
    size = len(data)
    if size < 24:
        raise CaptureFileError(f"{path}: pcap header cut short")
    endian = "<" if struct.unpack_from("<I", data, 0)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
    magic, _major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack_from(
        endian + "IHHiIII", data, 0
    )
    scale = 1 if magic == PCAP_MAGIC_NS else 1000
    linktype = network & 0x03FFFFFF  # upper bits may carry FCS information
    record = struct.Struct(endian + "IIII")
    unpack = record.unpack_from
    pos = 24
    while pos + 16 <= size:
        sec, frac, incl, orig = unpack(data, pos)
        pos += 16
        if incl > MAX_RECORD or pos + incl > size:
            raise CaptureFileError(
                f"{path}: packet record at byte {pos - 16} is cut short or corrupt")
        yield sec * 1_000_000_000 + frac * scale, max(orig, incl), data[pos:pos + incl], linktype
        pos += incl
    if pos != size:
        raise CaptureFileError(f"{path}: file cut short inside a packet header at byte {pos}")


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


def _read_pcapng(data: mmap.mmap, path: Path) -> Iterator[Frame]:
    size = len(data)
    pos = 0
    endian = "<"
    interfaces: list[_Interface] = []
    while pos < size:
        if pos + 12 > size:
            raise CaptureFileError(f"{path}: block header cut short at byte {pos}")
        btype = struct.unpack_from(endian + "I", data, pos)[0]
        if btype == PCAPNG_SHB:  # a new section: byte order and interfaces start over
            bom = struct.unpack_from("<I", data, pos + 8)[0]
            if bom == PCAPNG_BYTE_ORDER_MAGIC:
                endian = "<"
            elif bom == 0x4D3C2B1A:
                endian = ">"
            else:
                raise CaptureFileError(f"{path}: bad pcapng byte-order magic at byte {pos}")
            interfaces = []
        blen = struct.unpack_from(endian + "I", data, pos + 4)[0]
        if blen < 12 or blen % 4 or pos + blen > size:
            raise CaptureFileError(f"{path}: pcapng block at byte {pos} is cut short or corrupt")
        body = pos + 8
        end = pos + blen - 4
        if end - body < BLOCK_MIN_BODY.get(btype, 0):
            raise CaptureFileError(f"{path}: pcapng block at byte {pos} too short for its fields")
        if btype == PCAPNG_IDB:
            interfaces.append(_parse_idb(data, body, end, endian, path))
        elif btype in (PCAPNG_EPB, PCAPNG_OPB):
            if btype == PCAPNG_EPB:
                iface, ts_hi, ts_lo, cap, orig = struct.unpack_from(endian + "IIIII", data, body)
            else:
                iface, _drops, ts_hi, ts_lo, cap, orig = struct.unpack_from(
                    endian + "HHIIII", data, body
                )
            start = body + 20
            if iface >= len(interfaces) or start + cap > end:
                raise CaptureFileError(f"{path}: packet block at byte {pos} is corrupt")
            itf = interfaces[iface]
            ts = itf.to_ns((ts_hi << 32) | ts_lo)
            yield ts, max(orig, cap), data[start:start + cap], itf.linktype
        elif btype == PCAPNG_SPB:
            if not interfaces:
                raise CaptureFileError(f"{path}: simple packet block before any interface")
            orig = struct.unpack_from(endian + "I", data, body)[0]
            cap = min(orig, end - body - 4)
            # a simple packet block has no timestamp: 0 rather than an invented time
            yield 0, orig, data[body + 4:body + 4 + cap], interfaces[0].linktype
        pos += blen


def _parse_idb(data: mmap.mmap, body: int, end: int, endian: str, path: Path) -> _Interface:
    linktype = struct.unpack_from(endian + "H", data, body)[0]
    resolution, offset = 6, 0
    pos = body + 8
    while pos + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", data, pos)
        if code == 0:
            break
        value = pos + 4
        if value + length > end:
            raise CaptureFileError(f"{path}: interface option runs past its block at byte {pos}")
        if code == IDB_OPT_TSRESOL and length >= 1:
            resolution = data[value]
        elif code == IDB_OPT_TSOFFSET and length >= 8:
            offset = struct.unpack_from(endian + "q", data, value)[0]
        pos = value + ((length + 3) & ~3)
    return _Interface(linktype, resolution, offset)
