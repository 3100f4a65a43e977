"""Batch decoding of captured frames: the common frames of a batch with vectorised numpy.

decode_frame() (capture/decode.py) stays the reference: decode_batch() reproduces its result
field for field for the frames it decodes itself and hands every other frame to decode_frame().

Decoded here, with numpy over the header bytes of the whole batch:
  * link types Ethernet (with up to two VLAN tags 0x8100/0x88A8/0x9100/0x9200), Linux SLL and
    SLL2 (same EtherType walk) and raw IP (101, 12, 14, 228, 229);
  * IPv4 that is not a fragment (any IHL, options skipped), IPv6 without extension headers;
  * any L4 protocol except the tunnels: TCP/UDP/SCTP/UDP-Lite ports, TCP flags (a TCP header
    cut before its flags sets FLAG_MALFORMED as decode_frame does), ICMP/ICMPv6/others ports 0;
  * non-IP EtherTypes (ARP, LLDP...: MAC addresses, ports 0).
Sent to decode_frame(): other link types, frames too short for their link header, a third
VLAN tag, PPPoE, MPLS, IP fragments, IPv6 extension headers (and AH), IP-in-IP/6in4/GRE, UDP
on the VXLAN/GTP-U/Teredo ports, any IP header that is cut short or lies about its version or
header length, and an L4 header cut before its ports.

The result is columnar (DecodedBatch: one numpy array per field of the decoded tuple, for every
frame of the batch, fallback frames included) so that a caller can pack records without
per-frame Python work; DecodedBatch.tuples() (and decode_batch_frames()) gives the list of
decode_frame() tuples.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from capture.decode import (
    ETH_IPV4,
    ETH_IPV6,
    ETH_MPLS,
    ETH_PPPOE_SESSION,
    ETH_VLAN_TAGS,
    IP_TUNNELS,
    IPPROTO_AH,
    IPPROTO_FRAGMENT,
    IPV6_EXT_HEADERS,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    LINKTYPE_RAW_OLD,
    LINKTYPE_RAW_OLD2,
    PORTED,
    TCP,
    UDP,
    UDP_TUNNEL_PORTS,
    decode_frame,
)
from packet_records import FLAG_MALFORMED, FLAG_TRUNCATED, RECORD_DTYPE

MAX_VLAN_TAGS = 2  # a third tag goes to decode_frame()
_RAW_LINKTYPES = (LINKTYPE_RAW, LINKTYPE_RAW_OLD, LINKTYPE_RAW_OLD2, LINKTYPE_IPV4,
                  LINKTYPE_IPV6)
# link type -> (link header length, EtherType position, source MAC position, destination MAC
# position (-1: none)); raw IP has no link header and no EtherType
_LINKS = {
    LINKTYPE_ETHERNET: (14, 12, 6, 0),
    LINKTYPE_LINUX_SLL: (16, 14, 6, -1),
    LINKTYPE_LINUX_SLL2: (20, 0, 12, -1),
}
FAST_LINKTYPES = frozenset(_LINKS) | frozenset(_RAW_LINKTYPES)
# decode_chunk() of at most this many frames: decode_frame() for each
FEW_FRAMES = 8

# lookup tables (one gather instead of several comparisons)
ET_OTHER, ET_IPV4, ET_IPV6, ET_VLAN, ET_SLOW = 0, 1, 2, 3, 4
_ET_CLASS = np.zeros(65536, dtype=np.uint8)
_ET_CLASS[ETH_IPV4], _ET_CLASS[ETH_IPV6] = ET_IPV4, ET_IPV6
_ET_CLASS[list(ETH_VLAN_TAGS)] = ET_VLAN
_ET_CLASS[[ETH_PPPOE_SESSION, *ETH_MPLS]] = ET_SLOW
P_OTHER, P_PORTED, P_SLOW = 0, 1, 2
_PROTO_CLASS4 = np.zeros(256, dtype=np.uint8)  # after IPv4
_PROTO_CLASS4[list(PORTED)] = P_PORTED
_PROTO_CLASS4[list(IP_TUNNELS)] = P_SLOW
_PROTO_CLASS6 = _PROTO_CLASS4.copy()  # after IPv6: extension headers as well
_PROTO_CLASS6[list(IPV6_EXT_HEADERS | {IPPROTO_FRAGMENT, IPPROTO_AH})] = P_SLOW
_UDP_TUNNEL_PORT = np.zeros(65536, dtype=bool)
_UDP_TUNNEL_PORT[list(UDP_TUNNEL_PORTS)] = True

# Every field is read from a window of bytes at some offset of each frame: the link header
# (SLL2 20 + two tags: 28 bytes), the IPv4/IPv6 fixed fields (10), the L4 header (TCP up to its
# flags: 14) and the addresses (16). The furthest window starts 20 + 8 + 60 bytes into a frame.
# (Narrow windows keep every gathered array under glibc's mmap threshold up to 4096 frames:
# bigger ones cost page faults on every batch, 2-3x the decoding time.)
_LINK_WINDOW, _IP_WINDOW, _L4_WINDOW, _ADDR_WINDOW = 28, 10, 14, 16
_PAD = 20 + 8 + 60 + 28 + 8
_ZEROS = bytes(_PAD)
# address masks by kind: none, IPv4 (4 bytes), MAC (6), IPv6 (16)
_ADDR_NONE, _ADDR_V4, _ADDR_MAC, _ADDR_V6 = 0, 1, 2, 3
_ADDR_MASK = np.zeros((4, _ADDR_WINDOW), dtype=np.uint8)
_ADDR_MASK[_ADDR_V4, :4] = _ADDR_MASK[_ADDR_MAC, :6] = _ADDR_MASK[_ADDR_V6, :16] = 0xFF
_ADDR_MASK64 = _ADDR_MASK.view(np.uint64)  # (masking 8 bytes at a time: 8x fewer items)


class DecodedBatch:
    """The decoded tuples of a batch, by column (index i = frame i of the batch).

    ip_version, ip_proto, tcp_flags, flags: uint8; sport, dport: uint16; src, dst: (n, 16)
    uint8; frag_id, l4_off, ip_end: int64 (l4_off and ip_end -1 without L4 / IP header).
    `fast` is the mask of the frames decoded here; `fallback` lists (index, decode_frame tuple)
    for the others (their columns are filled from those tuples as well). `caplen` is each
    frame's captured length (len(frame)).
    """

    COLUMNS = ("ip_version", "ip_proto", "src", "dst", "sport", "dport", "tcp_flags", "flags",
               "frag_id", "l4_off", "ip_end", "fast", "caplen")
    __slots__ = (*COLUMNS, "fallback", "keys", "learned")

    def __init__(self, n: int) -> None:
        self.ip_version = np.zeros(n, dtype=np.uint8)
        self.ip_proto = np.zeros(n, dtype=np.uint8)
        self.src = np.zeros((n, 16), dtype=np.uint8)
        self.dst = np.zeros((n, 16), dtype=np.uint8)
        self.sport = np.zeros(n, dtype=np.uint16)
        self.dport = np.zeros(n, dtype=np.uint16)
        self.tcp_flags = np.zeros(n, dtype=np.uint8)
        self.flags = np.zeros(n, dtype=np.uint8)
        self.frag_id = np.zeros(n, dtype=np.int64)
        self.l4_off = np.full(n, -1, dtype=np.int64)
        self.ip_end = np.full(n, -1, dtype=np.int64)
        self.fast = np.zeros(n, dtype=bool)
        self.fallback: list[tuple[int, tuple]] = []
        self.caplen = np.zeros(n, dtype=np.int64)
        self.keys: np.ndarray | None = None  # flow_keys(self), when made ahead (a reader)
        # FlowInspector.first_payload() of some frames, by index, when inspected ahead (a
        # reader: capture.flowcache.inspect_ahead)
        self.learned: dict[int, tuple] | None = None

    @classmethod
    def of_columns(cls, columns: list[np.ndarray], fallback: list[tuple[int, tuple]],
                   keys: np.ndarray | None = None) -> DecodedBatch:
        """The batch whose columns() are `columns` (used as they are), with `fallback` and
        its flow_keys() when given."""
        batch = cls.__new__(cls)
        for name, column in zip(cls.COLUMNS, columns, strict=True):
            setattr(batch, name, column)
        batch.fallback, batch.keys, batch.learned = fallback, keys, None
        return batch

    def columns(self) -> list[np.ndarray]:
        """Every column, in COLUMNS order."""
        return [getattr(self, name) for name in self.COLUMNS]

    def __len__(self) -> int:
        return len(self.flags)

    def tuples(self, rows: Sequence[int] | np.ndarray | None = None) -> list[tuple]:
        """The decode_frame() tuple of every frame (the fallback frames' own tuples), or of the
        frames at `rows` (in that order)."""
        if rows is None:
            at, picked = slice(None), None
        else:
            at = picked = np.asarray(rows, dtype=np.int64)
        # a 16-byte void scalar lists as bytes (all 16: trailing zeros kept, unlike "S16")
        out = list(zip(self.ip_version[at].tolist(), self.ip_proto[at].tolist(),
                       self.src[at].view("V16").ravel().tolist(),
                       self.dst[at].view("V16").ravel().tolist(),
                       self.sport[at].tolist(), self.dport[at].tolist(),
                       self.tcp_flags[at].tolist(), self.flags[at].tolist(),
                       self.frag_id[at].tolist(), self.l4_off[at].tolist(),
                       self.ip_end[at].tolist()))
        if self.fallback:
            if picked is None:
                for i, decoded in self.fallback:
                    out[i] = decoded
            else:
                own = dict(self.fallback)
                for k, i in enumerate(picked.tolist()):
                    if i in own:
                        out[k] = own[i]
        return out

    def lazy_tuples(self, rows: np.ndarray) -> LazyTuples:
        """tuples(rows), each tuple made only when asked for (see LazyTuples)."""
        return LazyTuples(self, rows)

    def records(self, ts_ns, wire_len, app=0, app_flags=0) -> np.ndarray:
        """The packet_records RECORD of every frame, as one RECORD_DTYPE array (its bytes are
        the records RECORD.pack would give, back to back), with FLAG_TRUNCATED where the
        captured length is below the wire length, as RecordBatcher.add sets it. `app` and
        `app_flags` (per frame or one value) come from the flows; ports are the decoded ones
        (a non-first fragment's ports come from its first fragment: set them before)."""
        out = np.zeros(len(self.flags), dtype=RECORD_DTYPE)
        wire_len = np.asarray(wire_len)
        out["ts_ns"] = ts_ns
        out["wire_len"] = wire_len
        out["ip_version"] = self.ip_version
        out["ip_proto"] = self.ip_proto
        out["tcp_flags"] = self.tcp_flags
        out["flags"] = self.flags | np.where(self.caplen < wire_len, FLAG_TRUNCATED, 0)
        out["sport"] = self.sport
        out["dport"] = self.dport
        out["src"] = self.src.view("V16").ravel()
        out["dst"] = self.dst.view("V16").ravel()
        out["app"] = app
        out["app_flags"] = app_flags
        return out

    def _set(self, i: int, decoded: tuple) -> None:
        """Frame i's columns from its decode_frame() tuple."""
        ipv, proto, src, dst, sport, dport, tcp_flags, flags, frag_id, l4_off, ip_end = decoded
        self.ip_version[i], self.ip_proto[i] = ipv, proto
        self.sport[i], self.dport[i] = sport, dport
        self.src[i] = np.frombuffer(src, dtype=np.uint8)
        self.dst[i] = np.frombuffer(dst, dtype=np.uint8)
        self.tcp_flags[i], self.flags[i], self.frag_id[i] = tcp_flags, flags, frag_id
        self.l4_off[i], self.ip_end[i] = l4_off, ip_end
        self.fallback.append((i, decoded))


class LazyTuples:
    """The decode_frame() tuples of some frames of a DecodedBatch (DecodedBatch.tuples(rows)),
    item k made when asked for: RecordBatcher.add_batch looks at many frames whose flow's
    inspection ended earlier in the batch and needs no tuple of those. Numbers are listed
    for all rows at once; addresses are cut from one bytes object per column."""

    __slots__ = ("columns", "src", "dst", "own")

    def __init__(self, batch: DecodedBatch, rows: np.ndarray):
        self.columns = [column[rows].tolist() for column in (
            batch.ip_version, batch.ip_proto, batch.sport, batch.dport, batch.tcp_flags,
            batch.flags, batch.frag_id, batch.l4_off, batch.ip_end)]
        self.src, self.dst = batch.src[rows].tobytes(), batch.dst[rows].tobytes()
        self.own: dict[int, tuple] = {}  # the fallback frames' own tuples, by k
        if batch.fallback:
            own = dict(batch.fallback)
            self.own = {k: own[i] for k, i in enumerate(rows.tolist()) if i in own}

    def __getitem__(self, k: int) -> tuple:
        if k in self.own:
            return self.own[k]
        ipv, proto, sport, dport, tcp_flags, flags, frag_id, l4_off, ip_end = self.columns
        at = 16 * k
        return (ipv[k], proto[k], self.src[at:at + 16], self.dst[at:at + 16], sport[k],
                dport[k], tcp_flags[k], flags[k], frag_id[k], l4_off[k], ip_end[k])


def decode_batch_frames(frames: Sequence[bytes], linktype: int | Sequence[int]) -> list[tuple]:
    """decode_frame(frame, linktype) of every frame, as a list (decoded in one batch)."""
    return decode_batch(frames, linktype).tuples()


def decode_batch(frames: Sequence[bytes], linktype: int | Sequence[int]) -> DecodedBatch:
    """Decode a batch of frames; `linktype` is the batch's link type or one per frame (a
    batch of mixed link types, as pcapng allows, is decoded one link type at a time)."""
    n = len(frames)
    result = DecodedBatch(n)
    if n == 0:
        return result
    if isinstance(linktype, (list, tuple)) and linktype.count(linktype[0]) == n:
        linktype = linktype[0]  # one link type after all (the common case, checked in C)
    if isinstance(linktype, (int, np.integer)):
        _decode_frames(frames, int(linktype), result, None)
        return result
    types = np.fromiter(linktype, dtype=np.int64, count=n)
    first = int(types[0])
    if (types == first).all():
        _decode_frames(frames, first, result, None)
        return result
    for value in np.unique(types).tolist():
        rows = np.flatnonzero(types == value)
        _decode_frames([frames[i] for i in rows.tolist()], value, result, rows)
    result.fallback.sort(key=lambda item: item[0])
    return result


def _u16(window: np.ndarray, at: int) -> np.ndarray:
    """The big-endian 16-bit field at byte `at` of every row of a window (as int64)."""
    return (window[:, at].astype(np.int64) << 8) | window[:, at + 1]


def decode_chunk(buf: bytes, starts: np.ndarray, lengths: np.ndarray,
                 linktype: int) -> DecodedBatch:
    """decode_batch() of the frames buf[starts[i]:starts[i] + lengths[i]] (in that order, one
    link type), read where they lie in buf (a read of a capture file): no bytes object is made
    per frame, only for the frames decode_frame() takes."""
    n = len(starts)
    result = DecodedBatch(n)
    if n > FEW_FRAMES:
        _decode_group(buf, np.asarray(starts, dtype=np.int64),
                      np.asarray(lengths, dtype=np.int64), None, int(linktype), result, None)
        return result
    # a few frames (the record a read cut, completed by the next one): one by one costs less
    # than numpy's fixed costs
    for k, (start, length) in enumerate(zip(np.asarray(starts).tolist(),
                                            np.asarray(lengths).tolist())):
        result.caplen[k] = length
        result._set(k, decode_frame(buf[start:start + length], linktype))
    return result


def _decode_frames(frames: Sequence[bytes], linktype: int, result: DecodedBatch,
                   rows: np.ndarray | None) -> None:
    """Decode frames of one link type into result (at `rows`, or at 0..n-1 when None)."""
    if linktype not in FAST_LINKTYPES:
        for k, frame in enumerate(frames):
            i = k if rows is None else int(rows[k])
            result.caplen[i] = len(frame)
            result._set(i, decode_frame(frame, linktype))
        return
    n = len(frames)
    lengths = np.fromiter(map(len, frames), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    # The frames back to back, then zeros (the `+` of a `join` would copy the whole buffer
    # once more, and a copy of more than glibc's mmap threshold costs page faults on every
    # call: 30x the join at 4096 frames).
    joined = b"".join(chain(frames, (_ZEROS,)))
    _decode_group(joined, starts, lengths, frames, linktype, result, rows)


def _decode_group(buf: bytes, starts: np.ndarray, lengths: np.ndarray,
                  frames: Sequence[bytes] | None, linktype: int, result: DecodedBatch,
                  rows: np.ndarray | None) -> None:
    """Decode the frames buf[starts[k]:starts[k] + lengths[k]] of one link type into result
    (at `rows`, or at 0..n-1 when None); `frames`, when given, holds the same frames as bytes
    (for decode_frame(); else they are sliced from buf)."""
    n = len(starts)
    raw = linktype in _RAW_LINKTYPES
    link = _LINKS.get(linktype)
    if rows is None:
        result.caplen[:] = lengths
    else:
        result.caplen[rows] = lengths
    if link is None and not raw:
        for k in range(n):
            frame = frames[k] if frames is not None else buf[starts[k]:starts[k] + lengths[k]]
            result._set(k if rows is None else int(rows[k]), decode_frame(frame, linktype))
        return
    # buf seen as overlapping windows: windows(w)[p] is the w bytes from p, and
    # windows(w)[starts + off] gathers one row per frame. Bytes read past a frame's length
    # (the next record's) are never used: every use is guarded by a length check. Every
    # field lies within _PAD bytes of its frame's start; a frame closer than that to the end
    # of buf (a read's last frames; the zeros after joined frames are there to avoid it) goes
    # to decode_frame(), and its windows are read from the end of buf instead.
    if len(buf) < 4 * _PAD:
        buf = bytes(buf) + _ZEROS  # a short read: its copy costs nothing
    edge = starts > len(buf) - _PAD
    at_edge = bool(edge.any())

    def gather(width: int, pos: np.ndarray) -> np.ndarray:
        """The `width` bytes from every position `pos` of buf, one row each (as
        sliding_window_view would give them, without the cost of its checks)."""
        # (windows as one `width`-byte item each: numpy copies an item at a time, twice as
        # fast as rows of bytes)
        windows = np.ndarray((len(buf) - width + 1,), f"V{width}", buf, strides=(1,))
        rows = windows[np.minimum(pos, len(buf) - width) if at_edge else pos]
        return rows.view(np.uint8).reshape(len(rows), width)

    if raw:
        off = np.zeros(n, dtype=np.int64)
        fast = lengths > 0
        head = None
    else:
        hdr, et_pos, src_mac, dst_mac = link
        head = gather(_LINK_WINDOW, starts)
        fast = lengths >= hdr
        et_class = _ET_CLASS[_u16(head, et_pos)]
        off = np.full(n, hdr, dtype=np.int64)
        for tag in range(MAX_VLAN_TAGS):
            tagged = et_class == ET_VLAN
            if not tagged.any():
                break
            at = hdr + 4 * tag
            fast &= ~(tagged & (lengths < at + 4))  # a cut tag: decode_frame
            et_class = np.where(tagged, _ET_CLASS[_u16(head, at + 2)], et_class)
            off += tagged * 4
        # a third tag, PPPoE and MPLS: decode_frame
        fast &= (et_class != ET_VLAN) & (et_class != ET_SLOW)
    if at_edge:
        fast &= ~edge

    ip = gather(_IP_WINDOW, starts + off)
    version = ip[:, 0] >> 4
    if raw:
        et_class = np.where(version == 4, ET_IPV4, np.where(version == 6, ET_IPV6, ET_SLOW))
        fast &= et_class != ET_SLOW
    is4 = fast & (et_class == ET_IPV4)
    is6 = fast & (et_class == ET_IPV6)
    room = lengths - off  # bytes from the IP header on

    ihl = (ip[:, 0] & 0x0F).astype(np.int64) * 4
    total = _u16(ip, 2)
    # IPv4: whole fixed header, version 4, 20 <= IHL <= captured, total length >= IHL, not a
    # fragment; IPv6: whole fixed header, version 6
    good4 = ((room >= 20) & (version == 4) & (ihl >= 20) & (room >= ihl) & (total >= ihl)
             & ((_u16(ip, 6) & 0x3FFF) == 0))
    good6 = (room >= 40) & (version == 6)
    proto = np.where(is4, ip[:, 9], ip[:, 6])
    # tunnels (and, after IPv6, extension headers): decode_frame
    proto_class = np.where(is4, _PROTO_CLASS4[proto], _PROTO_CLASS6[proto])
    ip_ok = (is4 & good4) | (is6 & good6)
    fast &= ~((is4 | is6) & ~ip_ok)
    fast &= ~(ip_ok & (proto_class == P_SLOW))
    l4_rel = np.where(is4, ihl, 40)  # the L4 header, from the IP header
    ported = ip_ok & (proto_class == P_PORTED)
    fast &= ~(ported & (room < l4_rel + 4))  # ports cut: decode_frame

    pos = off + l4_rel
    l4 = gather(_L4_WINDOW, starts + pos)
    sport = _u16(l4, 0)
    dport = _u16(l4, 2)
    # UDP on a VXLAN/GTP-U/Teredo port: decode_frame
    fast &= ~(ported & (proto == UDP) & (_UDP_TUNNEL_PORT[sport] | _UDP_TUNNEL_PORT[dport]))
    ip_ok &= fast
    ported &= fast
    is4 &= fast
    tcp = ported & (proto == TCP)
    tcp_whole = tcp & (room >= l4_rel + 14)

    # addresses: 4 bytes (zero-padded) or 16 of the IP header; MACs for non-IP frames
    non_ip = fast & (et_class == ET_OTHER)
    kind = np.where(ip_ok, np.where(is4, _ADDR_V4, _ADDR_V6), np.where(non_ip, _ADDR_MAC, 0))
    if head is None:
        src_at, dst_at = off + np.where(is4, 12, 8), off + np.where(is4, 16, 24)
        dst_kind = kind
    else:
        src_at = np.where(ip_ok, off + np.where(is4, 12, 8), src_mac)
        dst_at = np.where(ip_ok, off + np.where(is4, 16, 24), max(dst_mac, 0))
        dst_kind = kind if dst_mac >= 0 else np.where(ip_ok, kind, _ADDR_NONE)
    src = gather(_ADDR_WINDOW, starts + src_at)
    # (take() of rows: several times faster than indexing a 2-d array by an index array)
    src.view(np.uint64)[:] &= np.take(_ADDR_MASK64, kind, axis=0)
    dst = gather(_ADDR_WINDOW, starts + dst_at)
    dst.view(np.uint64)[:] &= np.take(_ADDR_MASK64, dst_kind, axis=0)

    end = np.where(is4, np.minimum(off + total, lengths), lengths)
    plen = _u16(ip, 4)
    end = np.where(~is4 & (plen > 0), np.minimum(off + 40 + plen, lengths), end)
    at = slice(None) if rows is None else rows
    result.ip_version[at] = np.where(ip_ok, np.where(is4, 4, 6), 0)
    result.ip_proto[at] = np.where(ip_ok, proto, 0)
    result.src[at] = src
    result.dst[at] = dst
    result.sport[at] = np.where(ported, sport, 0)
    result.dport[at] = np.where(ported, dport, 0)
    result.tcp_flags[at] = np.where(tcp_whole, l4[:, 13], 0)
    result.flags[at] = np.where(tcp & ~tcp_whole, FLAG_MALFORMED, 0)
    result.l4_off[at] = np.where(ip_ok, pos, -1)
    result.ip_end[at] = np.where(ip_ok, end, -1)
    result.fast[at] = fast
    for k in np.flatnonzero(~fast).tolist():
        frame = frames[k] if frames is not None else buf[starts[k]:starts[k] + lengths[k]]
        result._set(k if rows is None else int(rows[k]), decode_frame(frame, linktype))


# -- for RecordBatcher.add_batch: the batch's frames in the flow cache -----------------------

FLOW_KEY_DTYPE = np.dtype([("proto", "u1"), ("a", "V16"), ("a_port", ">u2"), ("b", "V16"),
                           ("b_port", ">u2")])


def flow_keys(batch: DecodedBatch) -> np.ndarray:
    """Every frame's direction-independent flow key, ordered as FlowCache.get orders it
    ((proto, lower address, its port, higher address, its port); equal addresses: lower port
    first), as FLOW_KEY_DTYPE rows: each row's bytes are the frame's FlowCache key (a later
    fragment's are not its flow's: its ports come from its first fragment)."""
    src_be = batch.src.view(">u8")  # two big-endian halves: compare as bytes compare
    dst_be = batch.dst.view(">u8")
    src_first = ((src_be[:, 0] < dst_be[:, 0])
                 | ((src_be[:, 0] == dst_be[:, 0]) & ((src_be[:, 1] < dst_be[:, 1])
                                                      | ((src_be[:, 1] == dst_be[:, 1])
                                                         & (batch.sport <= batch.dport)))))
    keys = np.empty(len(batch.flags), dtype=FLOW_KEY_DTYPE)
    keys["proto"] = batch.ip_proto
    # (the addresses as two 8-byte items each: numpy picks 2 items a frame, not 16)
    src, dst = batch.src.view(np.uint64), batch.dst.view(np.uint64)
    keys["a"] = np.where(src_first[:, None], src, dst).view("V16").ravel()
    keys["b"] = np.where(src_first[:, None], dst, src).view("V16").ravel()
    keys["a_port"] = np.where(src_first, batch.sport, batch.dport)
    keys["b_port"] = np.where(src_first, batch.dport, batch.sport)
    return keys
