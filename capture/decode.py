"""Fast header decoding of captured frames, without Scapy dissection.

decode_frame() walks the link layer, VLAN tags, the IP header (with IPv6 extension headers and
fragments), tunnels (IP-in-IP, 6in4/4in6, GRE with IP, PPP or Ethernet inside, VXLAN, GTP-U,
Teredo) down to the innermost IP header, and the L4 ports, and returns one flat tuple. It never
raises on bad input: anything it cannot decode sets FLAG_MALFORMED and the frame still counts
(as OTHER when no IP header).
"""

from __future__ import annotations

import struct

from packet_records import (
    FLAG_FRAGMENT,
    FLAG_LATER_FRAGMENT,
    FLAG_MALFORMED,
    FLAG_TUNNEL,
    FLAG_UNSUPPORTED_LINK,
)

# Link types (tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_PPP = 9
LINKTYPE_RAW_OLD = 12
LINKTYPE_RAW_OLD2 = 14
LINKTYPE_PPP_HDLC = 50
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_PPI = 192
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
ETH_VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)
ETH_PPPOE_SESSION = 0x8864
ETH_MPLS = (0x8847, 0x8848)
PPP_IPV4, PPP_IPV6 = 0x0021, 0x0057

# IPv6 extension headers skipped to reach the L4 header (AH is skipped after IPv6 as well)
IPV6_EXT_HEADERS = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
IPPROTO_FRAGMENT, IPPROTO_AH = 44, 51
PORTED = frozenset((6, 17, 132, 136))  # TCP, UDP, SCTP, UDP-Lite
TCP, UDP = 6, 17
IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_GRE = 4, 41, 47
IP_TUNNELS = frozenset((IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_GRE))
GRE_PPP, GRE_ETHERNET = 0x880B, 0x6558
PORT_VXLAN, PORT_GTP_U, PORT_TEREDO = 4789, 2152, 3544
UDP_TUNNEL_PORTS = frozenset((PORT_VXLAN, PORT_GTP_U, PORT_TEREDO))
MAX_TUNNEL_DEPTH = 4

SUPPORTED_LINKTYPES = frozenset(
    (LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_PPP, LINKTYPE_RAW_OLD, LINKTYPE_RAW_OLD2,
     LINKTYPE_PPP_HDLC, LINKTYPE_RAW, LINKTYPE_LOOP, LINKTYPE_LINUX_SLL, LINKTYPE_PPI,
     LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2)
)

_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_PORTS = struct.Struct("!HH").unpack_from
_V4_FIXED = struct.Struct("!BxHHH").unpack_from  # ver/ihl, total length, id, flags+offset
_V6_FRAG = struct.Struct("!BxHI").unpack_from  # next header, offset+flags, ident
_PAD12 = bytes(12)

# Decoded tuple: (ip_version, ip_proto, src, dst, sport, dport, tcp_flags, flags, frag_id, l4_off,
#                 ip_end)
# frag_id is 0 for unfragmented packets, else the IP ident (+1 so that 0 means "none");
# non-first fragments carry no ports (0) and l4_off -1. l4_off is where the L4 header starts,
# ip_end where the innermost IP packet ends in the frame (Ethernet padding may follow); -1
# without IP.
NOT_IP_MALFORMED = (0, 0, _PAD12 + bytes(4), _PAD12 + bytes(4), 0, 0, 0, FLAG_MALFORMED, 0, -1, -1)


def decode_frame(frame: bytes, linktype: int) -> tuple:
    """Decode one frame of the given link type into the flat decoded tuple."""
    if linktype == LINKTYPE_ETHERNET:
        return _decode_ethernet(frame, 0)
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return NOT_IP_MALFORMED
        return _decode_ethertype(frame, _U16(frame, 14)[0], 16, 0, _macs(frame[6:12], b""))
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return NOT_IP_MALFORMED
        return _decode_ethertype(frame, _U16(frame, 0)[0], 20, 0, _macs(frame[12:18], b""))
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_OLD, LINKTYPE_RAW_OLD2, LINKTYPE_IPV4,
                    LINKTYPE_IPV6):
        return _decode_ip_by_version(frame, 0)
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        return _decode_loopback(frame, linktype)
    if linktype in (LINKTYPE_PPP, LINKTYPE_PPP_HDLC):
        return _decode_ppp(frame, 0)
    if linktype == LINKTYPE_PPI:
        if len(frame) < 8:
            return NOT_IP_MALFORMED
        header_len = struct.unpack_from("<H", frame, 2)[0]
        inner = struct.unpack_from("<I", frame, 4)[0]
        if header_len < 8 or header_len > len(frame) or inner == LINKTYPE_PPI:
            return NOT_IP_MALFORMED
        decoded = decode_frame(frame[header_len:], inner)
        # offsets in the whole frame, as for every other link type (payloads are cut from it)
        l4_off, ip_end = decoded[9], decoded[10]
        return (*decoded[:9], l4_off + header_len if l4_off >= 0 else l4_off,
                ip_end + header_len if ip_end >= 0 else ip_end)
    return (0, 0, bytes(16), bytes(16), 0, 0, 0, FLAG_UNSUPPORTED_LINK | FLAG_MALFORMED, 0, -1, -1)


NO_MACS = (bytes(16), bytes(16))


def _macs(src: bytes, dst: bytes) -> tuple[bytes, bytes]:
    """Link-layer addresses of a non-IP frame, padded to the record's 16-byte address fields."""
    return src + bytes(16 - len(src)), dst + bytes(16 - len(dst))


def _non_ip(macs: tuple[bytes, bytes], flags: int = 0) -> tuple:
    """A frame without an IP header: addresses are the link-layer ones when there are any."""
    return (0, 0, macs[0], macs[1], 0, 0, 0, flags, 0, -1, -1)


def _decode_ethernet(frame: bytes, off: int, depth: int = 0) -> tuple:
    if len(frame) < off + 14:
        return NOT_IP_MALFORMED
    macs = _macs(frame[off + 6:off + 12], frame[off:off + 6])
    return _decode_ethertype(frame, _U16(frame, off + 12)[0], off + 14, depth, macs)


def _decode_ethertype(frame: bytes, ethertype: int, off: int, depth: int = 0,
                      macs: tuple[bytes, bytes] = NO_MACS) -> tuple:
    # 802.1Q, QinQ (802.1ad) and older double-tag EtherTypes, any number (a loop, not recursion:
    # a frame of a thousand tags must not exhaust the stack)
    while ethertype in ETH_VLAN_TAGS:
        if len(frame) < off + 4:
            return _non_ip(macs, FLAG_MALFORMED)
        ethertype = _U16(frame, off + 2)[0]
        off += 4
    if ethertype == ETH_IPV4:
        return _decode_ipv4(frame, off, depth)
    if ethertype == ETH_IPV6:
        return _decode_ipv6(frame, off, depth)
    if ethertype == ETH_PPPOE_SESSION:
        if len(frame) < off + 8:
            return _non_ip(macs, FLAG_MALFORMED)
        return _decode_ppp(frame, off + 6, depth, macs)
    if ethertype in ETH_MPLS:
        return _decode_mpls(frame, off, depth, macs)
    return _non_ip(macs)


def _decode_mpls(frame: bytes, off: int, depth: int, macs: tuple[bytes, bytes]) -> tuple:
    while True:
        if len(frame) < off + 4:
            return _non_ip(macs, FLAG_MALFORMED)
        bottom = frame[off + 2] & 1
        off += 4
        if bottom:
            return _decode_ip_by_version(frame, off, depth)


def _decode_ppp(frame: bytes, off: int, depth: int = 0,
                macs: tuple[bytes, bytes] = NO_MACS) -> tuple:
    if frame[off:off + 2] == b"\xff\x03":  # HDLC address + control
        off += 2
    if len(frame) < off + 1:
        return NOT_IP_MALFORMED
    if frame[off] & 1:  # protocol field compressed to one byte
        proto, off = frame[off], off + 1
    elif len(frame) >= off + 2:
        proto, off = _U16(frame, off)[0], off + 2
    else:
        return NOT_IP_MALFORMED
    if proto == PPP_IPV4:
        return _decode_ipv4(frame, off, depth)
    if proto == PPP_IPV6:
        return _decode_ipv6(frame, off, depth)
    return _non_ip(macs)


def _decode_loopback(frame: bytes, linktype: int) -> tuple:
    if len(frame) < 4:
        return NOT_IP_MALFORMED
    if linktype == LINKTYPE_LOOP:
        family = _U32(frame, 0)[0]
    else:  # DLT_NULL: host byte order of the capturing machine; AF values are small
        family = struct.unpack_from("<I", frame, 0)[0]
        if family > 0xFFFF:
            family = _U32(frame, 0)[0]
    if family == 2:
        return _decode_ipv4(frame, 4)
    if family in (10, 24, 28, 30):  # AF_INET6 on Linux, NetBSD/OpenBSD, FreeBSD, macOS
        return _decode_ipv6(frame, 4)
    return _decode_ip_by_version(frame, 4)


def _decode_ip_by_version(frame: bytes, off: int, depth: int = 0) -> tuple:
    if len(frame) <= off:
        return NOT_IP_MALFORMED
    version = frame[off] >> 4
    if version == 4:
        return _decode_ipv4(frame, off, depth)
    if version == 6:
        return _decode_ipv6(frame, off, depth)
    return NOT_IP_MALFORMED


def _decode_ipv4(frame: bytes, off: int, depth: int = 0) -> tuple:
    if len(frame) < off + 20:
        return NOT_IP_MALFORMED  # truncated IP header: counts as OTHER
    ver_ihl, total_len, ident, frag = _V4_FIXED(frame, off)
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < 20 or len(frame) < off + ihl:
        return NOT_IP_MALFORMED
    proto = frame[off + 9]
    src = frame[off + 12:off + 16] + _PAD12
    dst = frame[off + 16:off + 20] + _PAD12
    if total_len < ihl:  # a length shorter than the header: not a valid IP packet (as tshark)
        return NOT_IP_MALFORMED
    end = min(off + total_len, len(frame))  # the IP packet ends here (Ethernet pads beyond)
    frag_id = 0
    flags = 0
    if frag & 0x3FFF:  # MF set or offset > 0
        flags = FLAG_FRAGMENT
        frag_id = ident + 1
        if frag & 0x1FFF:  # non-first fragment: no L4 header
            return (4, proto, src, dst, 0, 0, 0, flags | FLAG_LATER_FRAGMENT, frag_id, -1, end)
    return _decode_l4(frame, off + ihl, end, 4, proto, src, dst, flags, frag_id, depth)


def _decode_ipv6(frame: bytes, off: int, depth: int = 0) -> tuple:
    if len(frame) < off + 40 or frame[off] >> 4 != 6:
        return NOT_IP_MALFORMED
    src = frame[off + 8:off + 24]
    dst = frame[off + 24:off + 40]
    nh = frame[off + 6]
    payload_len = _U16(frame, off + 4)[0]
    end = min(off + 40 + payload_len, len(frame)) if payload_len else len(frame)  # 0: jumbogram
    pos = off + 40
    flags = 0
    frag_id = 0
    for _ in range(16):  # bound the walk: a hostile chain of extension headers ends here
        if nh in IPV6_EXT_HEADERS or nh == IPPROTO_AH:
            if len(frame) < pos + 2:
                return (6, nh, src, dst, 0, 0, 0, FLAG_MALFORMED, 0, -1, end)
            size = (frame[pos + 1] + 2) * 4 if nh == IPPROTO_AH else (frame[pos + 1] + 1) * 8
            if len(frame) < pos + size:  # the header runs past the captured bytes
                return (6, frame[pos], src, dst, 0, 0, 0, flags | FLAG_MALFORMED, frag_id, -1, end)
            nh, pos = frame[pos], pos + size
        elif nh == IPPROTO_FRAGMENT:
            if len(frame) < pos + 8:
                return (6, nh, src, dst, 0, 0, 0, FLAG_MALFORMED, 0, -1, end)
            nh, offset_flags, ident = _V6_FRAG(frame, pos)
            flags = FLAG_FRAGMENT
            frag_id = ident + 1
            pos += 8
            if offset_flags & 0xFFF8:  # non-first fragment
                return (6, nh, src, dst, 0, 0, 0, flags | FLAG_LATER_FRAGMENT, frag_id, -1, end)
        else:
            return _decode_l4(frame, pos, end, 6, nh, src, dst, flags, frag_id, depth)
    return (6, nh, src, dst, 0, 0, 0, FLAG_MALFORMED, 0, -1, end)


def _decode_l4(frame: bytes, pos: int, end: int, version: int, proto: int, src: bytes,
               dst: bytes, flags: int, frag_id: int, depth: int) -> tuple:
    if proto in PORTED:
        if len(frame) < pos + 4:
            return (version, proto, src, dst, 0, 0, 0, flags | FLAG_MALFORMED, frag_id, -1, end)
        sport, dport = _PORTS(frame, pos)
        if proto == UDP and (sport in UDP_TUNNEL_PORTS or dport in UDP_TUNNEL_PORTS) \
                and not flags & FLAG_FRAGMENT and depth < MAX_TUNNEL_DEPTH:
            inner = _decode_udp_tunnel(frame, pos + 8, sport, dport, depth + 1)
            if inner is not None:
                return inner
        tcp_flags = 0
        if proto == TCP:
            if len(frame) >= pos + 14:
                tcp_flags = frame[pos + 13]
            else:
                flags |= FLAG_MALFORMED
        return (version, proto, src, dst, sport, dport, tcp_flags, flags, frag_id, pos, end)
    if proto in IP_TUNNELS and not flags & FLAG_FRAGMENT and depth < MAX_TUNNEL_DEPTH:
        if proto == IPPROTO_GRE:
            inner = _decode_gre(frame, pos, depth + 1)
        elif proto == IPPROTO_IPIP:
            inner = _decode_ipv4(frame, pos, depth + 1)
        else:
            inner = _decode_ipv6(frame, pos, depth + 1)
        if inner is not None and inner[0]:
            return _tunneled(inner)
    return (version, proto, src, dst, 0, 0, 0, flags, frag_id, pos, end)


# -- tunnels: the record describes the innermost IP header; without one inside, the outer -----

def _tunneled(inner: tuple) -> tuple:
    return inner[:7] + (inner[7] | FLAG_TUNNEL,) + inner[8:]


def _decode_gre(frame: bytes, pos: int, depth: int) -> tuple | None:
    if len(frame) < pos + 4:
        return None
    bits, ptype = _PORTS(frame, pos)
    version = bits & 0x7
    off = pos + 4
    if version == 0:  # RFC 2784/2890: optional checksum, key, sequence number
        off += 4 * (bool(bits & 0x8000) + bool(bits & 0x2000) + bool(bits & 0x1000))
    elif version == 1:  # PPTP enhanced GRE (RFC 2637): key always, optional seq and ack
        off += 4 + 4 * (bool(bits & 0x1000) + bool(bits & 0x0080))
    else:
        return None
    if off > len(frame):
        return None
    if ptype == ETH_IPV4:
        return _decode_ipv4(frame, off, depth)
    if ptype == ETH_IPV6:
        return _decode_ipv6(frame, off, depth)
    if ptype == GRE_PPP:
        return _decode_ppp(frame, off, depth)
    if ptype == GRE_ETHERNET:
        return _decode_ethernet(frame, off, depth)
    return None


def _decode_udp_tunnel(frame: bytes, off: int, sport: int, dport: int, depth: int) -> tuple | None:
    """VXLAN, GTP-U and Teredo, recognised by port and checked by their headers; None when the
    payload does not hold what the port promises (then it is plain UDP)."""
    size = len(frame)
    inner = None
    if PORT_VXLAN in (sport, dport):
        if size >= off + 8 and frame[off] & 0x08:
            inner = _decode_ethernet(frame, off + 8, depth)
    elif PORT_GTP_U in (sport, dport):
        # version 1, protocol type GTP, message type G-PDU
        if size < off + 8 or frame[off] & 0xF0 != 0x30 or frame[off + 1] != 0xFF:
            return None
        first = frame[off]
        off += 8
        if first & 0x07:  # sequence number, N-PDU number, next extension header type
            if size < off + 4:
                return None
            next_type = frame[off + 3]
            off += 4
            for _ in range(8):
                if not first & 0x04 or next_type == 0:
                    break
                if size <= off or frame[off] == 0:
                    return None
                ext_len = frame[off] * 4
                if size < off + ext_len:
                    return None
                next_type = frame[off + ext_len - 1]
                off += ext_len
        inner = _decode_ip_by_version(frame, off, depth)
    elif PORT_TEREDO in (sport, dport):
        if frame[off:off + 2] == b"\x00\x01" and size >= off + 4:  # authentication indicator
            off += 4 + frame[off + 2] + frame[off + 3] + 9
        if frame[off:off + 2] == b"\x00\x00":  # origin indication
            off += 8
        if size >= off + 40 and frame[off] >> 4 == 6:
            inner = _decode_ipv6(frame, off, depth)
    if inner is None or not inner[0] or inner is NOT_IP_MALFORMED:
        return None
    return _tunneled(inner)
