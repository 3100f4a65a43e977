"""capture.decode.decode_frame: every link type, encapsulation, IP variant and broken frame."""

from __future__ import annotations

import random
import socket
import struct
from typing import NamedTuple

import pytest
from scapy.contrib.gtp import GTP_U_Header
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import HDLC, PPP
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from capture.decode import NOT_IP_MALFORMED, SUPPORTED_LINKTYPES, decode_frame
from capture.flowcache import payload_of
from packet_records import (
    FLAG_FRAGMENT,
    FLAG_LATER_FRAGMENT,
    FLAG_MALFORMED,
    FLAG_TUNNEL,
    FLAG_UNSUPPORTED_LINK,
    RECORD,
)

A4, B4 = "192.0.2.10", "198.51.100.20"
A6, B6 = "2001:db8::10", "2001:db8::20"
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
MAC_A_RAW, MAC_B_RAW = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")


class D(NamedTuple):
    """Field names of the decoded tuple (see the comment above NOT_IP_MALFORMED)."""

    ip_version: int
    ip_proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    tcp_flags: int
    flags: int
    frag_id: int
    l4_off: int
    ip_end: int = -1  # where the innermost IP packet ends (-1 without IP)


def dec(frame, linktype: int = 1) -> D:
    return D(*decode_frame(bytes(frame), linktype))


def v4(addr: str) -> bytes:
    return socket.inet_aton(addr) + bytes(12)


def v6(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr)


def eth(l3, **kw) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B, **kw) / l3)


TCP4 = IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="SA")
UDP4 = IP(src=A4, dst=B4) / UDP(sport=40001, dport=53)
TCP6 = IPv6(src=A6, dst=B6) / TCP(sport=41000, dport=443, flags="PA")
UDP6 = IPv6(src=A6, dst=B6) / UDP(sport=41001, dport=123)


def assert_tcp4(d: D, l4_off: int) -> None:
    assert (d.ip_version, d.ip_proto, d.src, d.dst) == (4, 6, v4(A4), v4(B4))
    assert (d.sport, d.dport, d.tcp_flags, d.flags, d.frag_id, d.l4_off) == (
        40000, 80, 0x12, 0, 0, l4_off)


def assert_udp6(d: D, l4_off: int) -> None:
    assert (d.ip_version, d.ip_proto, d.src, d.dst) == (6, 17, v6(A6), v6(B6))
    assert (d.sport, d.dport, d.flags, d.l4_off) == (41001, 123, 0, l4_off)


def assert_not_ip_malformed(d: D) -> None:
    assert (d.ip_version, d.ip_proto, d.sport, d.dport) == (0, 0, 0, 0)
    assert d.flags == FLAG_MALFORMED and d.l4_off == -1


# ----------------------------------------------------------------------------- Ethernet + IPv4
def test_ethernet_ipv4_tcp_ports_and_flags():
    assert_tcp4(dec(eth(TCP4)), 34)


def test_ethernet_ipv4_udp():
    d = dec(eth(UDP4))
    assert (d.ip_version, d.ip_proto, d.sport, d.dport, d.tcp_flags, d.flags, d.l4_off) == (
        4, 17, 40001, 53, 0, 0, 34)


def test_ethernet_ipv4_icmp_has_no_ports():
    d = dec(eth(IP(src=A4, dst=B4) / ICMP(type=8)))
    assert (d.ip_version, d.ip_proto, d.sport, d.dport, d.flags, d.l4_off) == (4, 1, 0, 0, 0, 34)
    assert (d.src, d.dst) == (v4(A4), v4(B4))


def test_ipv4_options_move_the_l4_header():
    pkt = IP(src=A4, dst=B4, options=[IPOption_Router_Alert()]) / TCP(
        sport=40000, dport=80, flags="SA")
    assert bytes(pkt)[0] & 0x0F == 6
    assert_tcp4(dec(eth(pkt)), 14 + 24)


def test_ipv4_dont_fragment_is_not_a_fragment():
    d = dec(eth(IP(src=A4, dst=B4, flags="DF", id=7) / UDP(sport=1, dport=2)))
    assert (d.flags, d.frag_id, d.sport) == (0, 0, 1)


def test_ip_end_excludes_ethernet_padding():
    frame = eth(UDP4) + bytes(18)  # 42 bytes padded to the 60-byte minimum
    assert dec(frame).ip_end == 14 + 28


def test_ip_end_stops_at_the_frame_when_the_total_length_is_larger():
    frame = eth(IP(src=A4, dst=B4, len=1000) / UDP(sport=1, dport=2))
    assert dec(frame).ip_end == len(frame)


def test_ipv6_ip_end_follows_the_payload_length():
    assert dec(eth(UDP6) + bytes(10)).ip_end == 14 + 48
    jumbo = bytearray(eth(UDP6))
    jumbo[18:20] = b"\0\0"  # payload length 0 (jumbogram)
    assert dec(bytes(jumbo) + bytes(10)).ip_end == len(jumbo) + 10


def test_ip_end_is_minus_one_without_ip():
    assert dec(eth(Raw(b"x" * 46), type=0x88B5)).ip_end == -1
    assert dec(b"").ip_end == -1


# ----------------------------------------------------------------------------- VLAN
def test_single_8021q_tag():
    assert_tcp4(dec(eth(Dot1Q(vlan=10) / TCP4)), 18 + 20)


def test_qinq_88a8_then_8100():
    frame = eth(Dot1AD(vlan=100) / Dot1Q(vlan=200) / TCP4)
    assert frame[12:14] == b"\x88\xa8"
    assert_tcp4(dec(frame), 22 + 20)


def test_qinq_9100_outer_tag():
    frame = eth(Dot1Q(vlan=100) / Dot1Q(vlan=200) / TCP4, type=0x9100)
    assert frame[12:14] == b"\x91\x00"
    assert_tcp4(dec(frame), 22 + 20)


# ----------------------------------------------------------------------------- IPv6
def test_ipv6_tcp():
    d = dec(eth(TCP6))
    assert (d.ip_version, d.ip_proto, d.src, d.dst) == (6, 6, v6(A6), v6(B6))
    assert (d.sport, d.dport, d.tcp_flags, d.flags, d.l4_off) == (41000, 443, 0x18, 0, 54)


def test_ipv6_udp():
    assert_udp6(dec(eth(UDP6)), 54)


def test_ipv6_icmpv6():
    d = dec(eth(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest()))
    assert (d.ip_version, d.ip_proto, d.sport, d.dport, d.flags, d.l4_off) == (6, 58, 0, 0, 0, 54)


@pytest.mark.parametrize("ext", [IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting])
def test_ipv6_extension_header_is_skipped(ext):
    pkt = IPv6(src=A6, dst=B6) / ext() / UDP(sport=41001, dport=123)
    assert_udp6(dec(eth(pkt)), 54 + len(ext()))


def test_ipv6_hop_by_hop_routing_and_destination_options_chain():
    pkt = (IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()
           / IPv6ExtHdrDestOpt() / UDP(sport=41001, dport=123))
    ext_len = len(IPv6ExtHdrHopByHop()) + len(IPv6ExtHdrRouting()) + len(IPv6ExtHdrDestOpt())
    assert_udp6(dec(eth(pkt)), 54 + ext_len)


def test_ipv6_first_fragment_keeps_ports():
    pkt = (IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=0x1234, m=1, offset=0)
           / UDP(sport=41001, dport=123) / Raw(b"x" * 16))
    d = dec(eth(pkt))
    assert (d.ip_proto, d.sport, d.dport, d.l4_off) == (17, 41001, 123, 62)
    assert (d.flags, d.frag_id) == (FLAG_FRAGMENT, 0x1235)


def test_ipv6_non_first_fragment_has_no_ports():
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(nh=17, id=0x1234, offset=100) / Raw(b"x" * 8)
    d = dec(eth(pkt))
    assert (d.ip_version, d.ip_proto, d.sport, d.dport, d.l4_off) == (6, 17, 0, 0, -1)
    assert (d.flags, d.frag_id) == (FLAG_FRAGMENT | FLAG_LATER_FRAGMENT, 0x1235)


# ----------------------------------------------------------------------------- IPv4 fragments
def test_ipv4_first_fragment_keeps_ports_and_ident_plus_one():
    d = dec(eth(IP(src=A4, dst=B4, id=0x4242, flags="MF") / UDP(sport=40001, dport=53)))
    assert (d.ip_proto, d.sport, d.dport, d.l4_off) == (17, 40001, 53, 34)
    assert (d.flags, d.frag_id) == (FLAG_FRAGMENT, 0x4243)


@pytest.mark.parametrize("mf", ["MF", 0], ids=["middle", "last"])
def test_ipv4_non_first_fragment_has_no_ports(mf):
    pkt = IP(src=A4, dst=B4, id=0x4242, flags=mf, frag=185, proto=17) / Raw(b"\x9c\x41" * 8)
    d = dec(eth(pkt))
    assert (d.ip_version, d.ip_proto, d.src, d.dst) == (4, 17, v4(A4), v4(B4))
    assert (d.sport, d.dport, d.l4_off) == (0, 0, -1)
    assert (d.flags, d.frag_id) == (FLAG_FRAGMENT | FLAG_LATER_FRAGMENT, 0x4243)


def test_ipv4_ident_zero_fragment_gets_frag_id_one():
    d = dec(eth(IP(src=A4, dst=B4, id=0, flags="MF") / UDP(sport=1, dport=2)))
    assert d.frag_id == 1


# ----------------------------------------------------------------------------- link types
def test_linux_sll():
    frame = bytes(CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, src=MAC_A_RAW + bytes(2))
                  / TCP4)
    assert_tcp4(dec(frame, 113), 16 + 20)


def sll2(proto: int, payload: bytes) -> bytes:
    return struct.pack(">HHIHBB8s", proto, 0, 2, 1, 0, 6, MAC_A_RAW + bytes(2)) + payload


def test_linux_sll2():
    assert_tcp4(dec(sll2(0x0800, bytes(TCP4)), 276), 20 + 20)
    assert_udp6(dec(sll2(0x86DD, bytes(UDP6)), 276), 20 + 40)


IPIP = IP(src="203.0.113.1", dst="203.0.113.2") / TCP4


def test_ip_in_ip_on_ethernet_gives_the_inner_header():
    d = dec(eth(IPIP))
    assert (d.src, d.sport, d.dport, d.l4_off) == (v4(A4), 40000, 80, 14 + 40)
    assert d.flags == FLAG_TUNNEL


@pytest.mark.parametrize("linktype", [113, 276])
def test_ip_in_ip_behind_a_cooked_header(linktype):
    frame = bytes(CookedLinux() / IPIP) if linktype == 113 else sll2(0x0800, bytes(IPIP))
    d = dec(frame, linktype)
    assert (d.src, d.sport, d.dport, d.flags) == (v4(A4), 40000, 80, FLAG_TUNNEL)


@pytest.mark.parametrize("linktype, pkt", [
    (101, TCP4), (101, UDP6), (12, TCP4), (12, UDP6), (14, TCP4), (14, UDP6),
    (228, TCP4), (229, UDP6),
])
def test_raw_ip_link_types(linktype, pkt):
    d = dec(pkt, linktype)
    if pkt is TCP4:
        assert_tcp4(d, 20)
    else:
        assert_udp6(d, 40)


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("family", [2, 24, 28, 30])
def test_null_loopback_either_byte_order(endian, family):
    pkt = TCP4 if family == 2 else UDP6
    d = dec(struct.pack(endian + "I", family) + bytes(pkt), 0)
    if family == 2:
        assert_tcp4(d, 4 + 20)
    else:
        assert_udp6(d, 4 + 40)


@pytest.mark.parametrize("family, pkt", [(2, TCP4), (24, UDP6), (30, UDP6)])
def test_openbsd_loop_is_big_endian(family, pkt):
    d = dec(struct.pack(">I", family) + bytes(pkt), 108)
    assert d.ip_version == pkt.version and d.sport == pkt.payload.sport


@pytest.mark.parametrize("header, l4_off", [
    (bytes(HDLC() / PPP(proto=0x0021)), 4 + 20),  # ff 03 00 21
    (b"\x00\x21", 2 + 20),  # address/control omitted
    (b"\xff\x03\x21", 3 + 20),  # protocol field compressed to one byte
    (b"\x21", 1 + 20),  # both
])
def test_ppp_ipv4(header, l4_off):
    assert_tcp4(dec(header + bytes(TCP4), 9), l4_off)


def test_ppp_ipv6_uncompressed_and_compressed():
    assert_udp6(dec(b"\xff\x03\x00\x57" + bytes(UDP6), 9), 44)
    assert_udp6(dec(b"\x57" + bytes(UDP6), 9), 41)


def test_ppp_hdlc_link_type_50():
    assert_tcp4(dec(b"\xff\x03\x00\x21" + bytes(TCP4), 50), 24)


def test_ppp_non_ip_protocol_is_not_ip_and_not_malformed():
    d = dec(b"\xff\x03\xc0\x21" + b"\x01\x01\x00\x04", 9)  # LCP configure-request
    assert (d.ip_version, d.flags) == (0, 0)


def ppi(inner: bytes, dlt: int = 1, header_len: int = 8) -> bytes:
    fields = bytes(header_len - 8)
    return struct.pack("<BBHI", 0, 0, header_len, dlt) + fields + inner


@pytest.mark.parametrize("header_len", [8, 20])
def test_ppi_wrapping_ethernet(header_len):
    # offsets count from the start of the whole frame: the payload is cut from it
    frame = ppi(eth(TCP4 / Raw(b"GET / HTTP/1.1\r\n\r\n")), header_len=header_len)
    d = dec(frame, 192)
    assert_tcp4(d, header_len + 34)
    assert d.ip_end == len(frame)
    start, end = payload_of(frame, tuple(d))
    assert frame[start:end] == b"GET / HTTP/1.1\r\n\r\n"


def test_ppi_wrapping_a_non_first_fragment_moves_ip_end_only():
    frag = IP(src=A4, dst=B4, flags=0, frag=100, proto=17) / Raw(b"x" * 24)
    d = dec(ppi(eth(frag), header_len=20), 192)
    assert (d.l4_off, d.ip_end) == (-1, 20 + 14 + 20 + 24)


def test_ppi_header_cut_or_longer_than_the_frame_is_malformed():
    assert_not_ip_malformed(dec(ppi(eth(TCP4))[:6], 192))
    assert_not_ip_malformed(dec(struct.pack("<BBHI", 0, 0, 200, 1) + eth(TCP4)[:20], 192))


def test_ppi_wrapping_ppi_is_malformed():
    assert_not_ip_malformed(dec(ppi(ppi(eth(TCP4)), dlt=192), 192))


def test_pppoe_session_ipv4_and_ipv6():
    def pppoe(proto: int, pkt) -> bytes:
        body = struct.pack(">H", proto) + bytes(pkt)
        return eth(Raw(struct.pack(">BBHH", 0x11, 0, 0x0001, len(body)) + body), type=0x8864)

    assert_tcp4(dec(pppoe(0x0021, TCP4)), 14 + 8 + 20)
    assert_udp6(dec(pppoe(0x0057, UDP6)), 14 + 8 + 40)


def test_pppoe_non_ip_keeps_the_mac_addresses():
    body = b"\xc0\x21\x01\x01\x00\x04"  # LCP configure-request
    frame = eth(Raw(struct.pack(">BBHH", 0x11, 0, 1, len(body)) + body), type=0x8864)
    d = dec(frame)
    assert (d.ip_version, d.flags) == (0, 0)
    assert (d.src, d.dst) == (MAC_A_RAW + bytes(10), MAC_B_RAW + bytes(10))


def mpls(label: int, bottom: bool) -> bytes:
    return struct.pack(">I", label << 12 | int(bottom) << 8 | 64)


@pytest.mark.parametrize("ethertype", [0x8847, 0x8848])
def test_mpls_label_stack(ethertype):
    frame = eth(Raw(mpls(100, False) + mpls(200, True) + bytes(TCP4)), type=ethertype)
    assert_tcp4(dec(frame), 14 + 8 + 20)


def test_mpls_ipv6_after_one_label():
    assert_udp6(dec(eth(Raw(mpls(16, True) + bytes(UDP6)), type=0x8847)), 14 + 4 + 40)


def test_mpls_stack_cut_before_bottom_label_is_malformed():
    d = dec(eth(Raw(mpls(100, False) + mpls(200, False)), type=0x8847))
    assert (d.ip_version, d.flags, d.src) == (0, FLAG_MALFORMED, MAC_A_RAW + bytes(10))


# ----------------------------------------------------------------------------- truncated input
def test_empty_frame():
    assert_not_ip_malformed(dec(b""))


def test_13_byte_ethernet_header():
    d = dec(eth(TCP4)[:13])
    assert_not_ip_malformed(d)
    assert d.src == d.dst == bytes(16)


def test_vlan_tag_cut_keeps_the_macs():
    d = dec(eth(Dot1Q(vlan=10) / TCP4)[:16])
    assert (d.ip_version, d.flags) == (0, FLAG_MALFORMED)
    assert (d.src, d.dst) == (MAC_A_RAW + bytes(10), MAC_B_RAW + bytes(10))


def test_ipv4_header_cut_at_19_bytes():
    assert_not_ip_malformed(dec(eth(TCP4)[:14 + 19]))


def test_ipv4_ihl_below_5():
    raw = bytearray(bytes(TCP4))
    raw[0] = 0x44
    assert_not_ip_malformed(dec(eth(Raw(bytes(raw)), type=0x0800)))


def test_ipv4_options_cut_short():
    pkt = bytes(IP(src=A4, dst=B4, options=[IPOption_Router_Alert()]) / TCP())
    assert_not_ip_malformed(dec(pkt[:22], 101))


@pytest.mark.parametrize("ethertype, pkt", [(0x0800, TCP6), (0x86DD, TCP4)])
def test_ip_version_not_matching_the_ethertype(ethertype, pkt):
    assert_not_ip_malformed(dec(eth(Raw(bytes(pkt)), type=ethertype)))


def test_raw_link_unknown_ip_version():
    raw = bytearray(bytes(TCP4))
    raw[0] = 0x55
    assert_not_ip_malformed(dec(bytes(raw), 101))


def test_ipv4_total_length_below_header_length_is_not_ip():
    assert_not_ip_malformed(dec(eth(IP(src=A4, dst=B4, len=12) / UDP(sport=1, dport=2))))


def test_ipv4_total_length_beyond_the_frame_still_decodes():
    d = dec(eth(IP(src=A4, dst=B4, len=1000) / UDP(sport=40001, dport=53)))
    assert (d.ip_version, d.ip_proto, d.sport, d.dport, d.flags) == (4, 17, 40001, 53, 0)


def test_tcp_header_with_only_ports_keeps_ports_and_is_malformed():
    d = dec(eth(TCP4)[:14 + 20 + 4])
    assert (d.ip_version, d.ip_proto, d.sport, d.dport, d.tcp_flags) == (4, 6, 40000, 80, 0)
    assert (d.flags, d.l4_off) == (FLAG_MALFORMED, 34)


def test_udp_with_3_bytes_is_malformed_without_ports():
    d = dec(eth(UDP4)[:14 + 20 + 3])
    assert (d.ip_version, d.ip_proto, d.src, d.sport, d.dport) == (4, 17, v4(A4), 0, 0)
    assert (d.flags, d.l4_off) == (FLAG_MALFORMED, -1)


def ext_chain(n: int):
    pkt = IPv6(src=A6, dst=B6)
    for _ in range(n):
        pkt = pkt / IPv6ExtHdrDestOpt()
    return pkt / UDP(sport=41001, dport=123)


def test_ipv6_chain_of_15_extension_headers_decodes():
    assert_udp6(dec(ext_chain(15), 101), 40 + 15 * 8)


def test_ipv6_extension_chain_longer_than_16_is_malformed():
    d = dec(ext_chain(17), 101)
    assert (d.ip_version, d.src, d.sport, d.dport, d.l4_off) == (6, v6(A6), 0, 0, -1)
    assert d.flags == FLAG_MALFORMED


def test_ipv6_extension_header_cut_before_its_length_byte():
    frame = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / UDP())[:41]
    d = dec(frame, 101)
    assert (d.ip_version, d.ip_proto, d.flags, d.l4_off) == (6, 0, FLAG_MALFORMED, -1)


def test_ipv6_fragment_header_cut_short():
    frame = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment() / UDP())[:45]
    d = dec(frame, 101)
    assert (d.ip_version, d.ip_proto, d.flags) == (6, 44, FLAG_MALFORMED)


def test_ipv6_extension_header_cut_in_the_middle_before_udp():
    # hop-by-hop says 48 bytes, the frame holds 8 of them
    frame = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop(len=5, nh=17))[:48]
    d = dec(frame, 101)
    assert (d.ip_version, d.sport, d.dport) == (6, 0, 0)
    assert d.flags & FLAG_MALFORMED


def test_ipv6_extension_header_cut_in_the_middle_before_icmpv6():
    frame = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop(len=5, nh=58))[:48]
    d = dec(frame, 101)
    assert d.flags & FLAG_MALFORMED
    assert d.l4_off == -1 or d.l4_off <= len(frame)


# ----------------------------------------------------------------------------- non-IP, unknown link
def test_unknown_ethertype_is_non_ip_with_mac_addresses():
    d = dec(eth(Raw(b"experimental" * 4), type=0x88B5))
    assert (d.ip_version, d.ip_proto, d.flags, d.l4_off) == (0, 0, 0, -1)
    assert (d.src, d.dst) == (MAC_A_RAW + bytes(10), MAC_B_RAW + bytes(10))


def test_arp_behind_vlan_is_non_ip_with_mac_addresses():
    d = dec(eth(Dot1Q(vlan=11) / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4)))
    assert (d.ip_version, d.flags, d.src) == (0, 0, MAC_A_RAW + bytes(10))


def test_linux_sll2_non_ip_source_is_the_link_layer_address():
    d = dec(sll2(0x0806, bytes(ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=B4))), 276)
    assert (d.ip_version, d.flags) == (0, 0)
    assert d.src[:6] == MAC_A_RAW


def test_unknown_link_type_147():
    d = dec(eth(TCP4), 147)
    assert (d.ip_version, d.sport, d.l4_off) == (0, 0, -1)
    assert d.flags == FLAG_UNSUPPORTED_LINK | FLAG_MALFORMED


@pytest.mark.parametrize("linktype", [113, 276])
def test_thousands_of_vlan_tags_after_a_cooked_header_do_not_raise(linktype):
    tags = b"\x00\x0a\x81\x00" * 3000
    frame = (struct.pack(">HHH8sH", 0, 1, 6, MAC_A_RAW + bytes(2), 0x8100) + tags
             if linktype == 113 else sll2(0x8100, tags))
    try:
        d = dec(frame, linktype)
    except RecursionError:
        d = None
    assert d is not None, "decode_frame raised RecursionError on 3000 stacked VLAN tags"
    assert d.flags & FLAG_MALFORMED


def test_thousands_of_vlan_tags_on_ethernet_do_not_raise():
    frame = eth(Raw(b"\x00\x0a\x81\x00" * 3000), type=0x8100)
    assert dec(frame).flags == FLAG_MALFORMED


# ----------------------------------------------------------------------------- fuzz
FUZZ_LINKTYPES = sorted(SUPPORTED_LINKTYPES | {147})
SEEDS = {  # valid frames per link type: mutations of them reach the deeper decoders
    0: [struct.pack("<I", 2) + bytes(TCP4)],
    1: [eth(Dot1Q() / TCP6), eth(IP() / GRE() / UDP4), eth(IP() / UDP(dport=4789) / VXLAN()
        / Ether() / TCP4), eth(IP() / UDP(dport=2152) / GTP_U_Header() / TCP4),
        eth(IP() / UDP(dport=3544) / UDP6), eth(IPv6() / IPIP)],
    9: [b"\xff\x03\x00\x21" + bytes(TCP4)], 12: [bytes(UDP6)], 14: [bytes(TCP4)],
    50: [b"\x00\x57" + bytes(UDP6)],
    101: [bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / TCP())],
    108: [struct.pack(">I", 24) + bytes(UDP6)], 113: [bytes(CookedLinux() / TCP4)],
    192: [ppi(eth(TCP4))], 228: [bytes(UDP4)], 229: [bytes(TCP6)],
    276: [sll2(0x0800, bytes(UDP4))], 147: [b""],
}


@pytest.mark.parametrize("linktype", FUZZ_LINKTYPES)
def test_fuzz_random_frames_never_raise(linktype):
    rng = random.Random(linktype)
    for i in range(20_000):
        seed = rng.choice(SEEDS[linktype])
        if i % 2 and seed:  # a valid frame, cut and with a few bytes changed
            frame = bytearray(seed[: rng.randrange(len(seed) + 1)])
            for _ in range(rng.randrange(4)):
                if frame:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
            frame = bytes(frame)
        else:
            frame = rng.randbytes(rng.randrange(0, 129))
        d = decode_frame(frame, linktype)
        assert len(d) == len(NOT_IP_MALFORMED), frame.hex()  # one shape on every path
        # every decoded tuple must pack into a record
        RECORD.pack(0, len(frame), d[0], d[1], d[6], d[7], d[4], d[5], d[2], d[3], 0, 0, 0)
