"""Crafted, deterministic test captures.

Packets are built with Scapy (``bytes(pkt)``); the files are written with the tiny struct
writers below because Scapy's writers cannot express everything needed here (caplen <
wire length, nanosecond / big-endian pcap, one pcapng with two link types, SLL2 ...).

Only documentation addresses are used (192.0.2.x, 198.51.100.x, 2001:db8::x) and all
timestamps are fixed, so every file is byte-for-byte reproducible.  The expected numbers
for these files come from tests/reference.py (tshark), not from this module.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import HDLC, PPP
from scapy.packet import Raw

# link-layer header types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_PPP = 0, 1, 9
LINKTYPE_RAW, LINKTYPE_SLL, LINKTYPE_USER0, LINKTYPE_SLL2 = 101, 113, 147, 276

BASE_NS = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z
A4, B4, C4, D4 = "192.0.2.10", "198.51.100.20", "192.0.2.30", "198.51.100.40"
A6, B6 = "2001:db8::10", "2001:db8::20"
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


# ----------------------------------------------------------------------------- writers
def _times(n: int, file_no: int) -> list[int]:
    """n timestamps (ns), 0.85 s apart (1.1 s for 5 packets) so that every file with >= 5
    packets covers >= 5 distinct seconds, some holding two packets.  The sub-microsecond
    part (...789 ns) survives only in nanosecond files."""
    start = BASE_NS + file_no * 100 * 10**9 + 123_456_789
    step = 850_000_000 if n >= 6 else 1_100_000_000
    return [start + i * step for i in range(n)]


def _rec(ts: int, data: bytes, wire_len: int | None = None) -> tuple[int, bytes, int]:
    return ts, data, len(data) if wire_len is None else wire_len


def write_pcap(
    path: Path,
    linktype: int,
    records,
    *,
    snaplen: int = 65535,
    nano: bool = False,
    endian: str = "<",
) -> Path:
    """Classic pcap.  records: (ts_ns, captured bytes, wire length); bytes beyond snaplen are
    cut (wire length kept), like a capture taken with -s snaplen."""
    out = [
        struct.pack(
            endian + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype
        )
    ]
    for ts, data, wire_len in records:
        sec, frac = divmod(ts, 10**9)
        data = data[:snaplen]
        out.append(
            struct.pack(endian + "IIII", sec, frac if nano else frac // 1000, len(data), wire_len)
            + data
        )
    path.write_bytes(b"".join(out))
    return path


def _block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)  # blocks are 32-bit aligned
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def write_pcapng(path: Path, linktypes: list[int], records) -> Path:
    """Little-endian pcapng: one section, one IDB per link type, all with if_tsresol=9
    (nanoseconds).  records: (interface id, ts_ns, captured bytes, wire length)."""
    out = [_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))]
    tsresol = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)  # if_tsresol, end
    for lt in linktypes:
        out.append(_block(1, struct.pack("<HHI", lt, 0, 262144) + tsresol))
    for ifid, ts, data, wire_len in records:
        out.append(
            _block(
                6,
                struct.pack("<IIIII", ifid, ts >> 32, ts & 0xFFFFFFFF, len(data), wire_len) + data,
            )
        )
    path.write_bytes(b"".join(out))
    return path


# ----------------------------------------------------------------------------- packets
def _eth(l3, src=MAC_A, dst=MAC_B) -> bytes:
    return bytes(Ether(src=src, dst=dst) / l3)


def _ipv4_mix() -> list:
    """TCP handshake + data, UDP request/response, ICMP echo + an ICMP error quoting UDP."""
    c, s = IP(src=A4, dst=B4), IP(src=B4, dst=A4)
    return [
        c / TCP(sport=40000, dport=80, flags="S", seq=1000),
        s / TCP(sport=80, dport=40000, flags="SA", seq=5000, ack=1001),
        c / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001),
        c
        / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=5001)
        / Raw(b"GET / HTTP/1.0\r\n\r\n"),
        s / TCP(sport=80, dport=40000, flags="PA", seq=5001, ack=1019) / Raw(b"x" * 300),
        c / UDP(sport=40001, dport=53) / DNS(id=0x1234, qd=DNSQR(qname="example.com")),
        s
        / UDP(sport=53, dport=40001)
        / DNS(
            id=0x1234,
            qr=1,
            qd=DNSQR(qname="example.com"),
            an=DNSRR(rrname="example.com", rdata="192.0.2.53"),
        ),
        c / ICMP(type=8, id=7, seq=1) / Raw(b"ping" * 8),
        s / ICMP(type=0, id=7, seq=1) / Raw(b"ping" * 8),
        # port unreachable: the quoted UDP header must not create a UDP flow
        s / ICMP(type=3, code=3) / IP(src=A4, dst=B4) / UDP(sport=40002, dport=9),
        c / TCP(sport=40000, dport=80, flags="FA", seq=1019, ack=5301),
    ]


def _ipv6_mix() -> list:
    """IPv6 with hop-by-hop + destination-options headers in front of TCP, UDP, ICMPv6."""

    def v6(src, dst):
        return IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()

    return [
        v6(A6, B6) / TCP(sport=41000, dport=443, flags="S"),
        v6(B6, A6) / TCP(sport=443, dport=41000, flags="SA"),
        v6(A6, B6) / TCP(sport=41000, dport=443, flags="A"),
        v6(A6, B6) / UDP(sport=41001, dport=123) / Raw(b"\x23" + b"\0" * 47),
        v6(B6, A6) / UDP(sport=123, dport=41001) / Raw(b"\x24" + b"\0" * 47),
        v6(A6, B6) / ICMPv6EchoRequest(id=9, seq=1, data=b"abcd"),
        v6(B6, A6) / ICMPv6EchoReply(id=9, seq=1, data=b"abcd"),
        IPv6(src=A6, dst=B6) / UDP(sport=41002, dport=5353),  # no extension header
    ]


def _v4_frags(src, dst, ident, l4: bytes, proto: int, sizes) -> list:
    """Split an L4 datagram (header included) into IPv4 fragments of the given sizes
    (multiples of 8 except the last)."""
    out, off = [], 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        out.append(
            IP(src=src, dst=dst, id=ident, proto=proto, frag=off // 8, flags=0 if last else "MF")
            / Raw(l4[off : off + n])
        )
        off += n
    return out


def _v6_frags(src, dst, ident, l4: bytes, nh: int, sizes) -> list:
    out, off = [], 0
    for i, n in enumerate(sizes):
        out.append(
            IPv6(src=src, dst=dst)
            / IPv6ExtHdrFragment(nh=nh, offset=off // 8, m=int(i < len(sizes) - 1), id=ident)
            / Raw(l4[off : off + n])
        )
        off += n
    return out


def _udp_bytes(ip, sport, dport, payload: bytes) -> bytes:
    """UDP header + payload with the checksum of the whole (unfragmented) datagram."""
    return bytes(ip / UDP(sport=sport, dport=dport) / Raw(payload))[len(bytes(ip)) :]


# ----------------------------------------------------------------------------- captures
def write_captures(directory) -> dict[str, Path]:
    """Write all good captures into directory; returns {name: path} (name = file stem)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def pcap(name, linktype, frames, file_no, wire_lens=None, **kw):
        ts = _times(len(frames), file_no)
        wl = wire_lens or [None] * len(frames)
        recs = [_rec(t, f, w) for t, f, w in zip(ts, frames, wl)]
        files[name] = write_pcap(d / f"{name}.pcap", linktype, recs, **kw)

    v4, v6 = _ipv4_mix(), _ipv6_mix()
    pcap("eth_ipv4", LINKTYPE_ETHERNET, [_eth(p) for p in v4], 1)
    pcap("eth_ipv6_ext", LINKTYPE_ETHERNET, [_eth(p) for p in v6], 2)

    # 802.1Q single tag and QinQ (802.1ad S-tag 0x88a8 + C-tag 0x8100); VLAN is not a flow key
    eth = Ether(src=MAC_A, dst=MAC_B)
    pcap(
        "vlan_qinq",
        LINKTYPE_ETHERNET,
        [
            bytes(eth / Dot1Q(vlan=10) / v4[0]),
            bytes(eth / Dot1Q(vlan=10) / v4[1]),
            bytes(eth / Dot1AD(vlan=100) / Dot1Q(vlan=200) / v4[2]),
            bytes(eth / Dot1AD(vlan=100) / Dot1Q(vlan=200) / v4[5]),
            bytes(eth / Dot1Q(vlan=10) / v6[3]),
            bytes(eth / Dot1AD(vlan=100) / Dot1Q(vlan=201) / v6[4]),
            bytes(eth / Dot1Q(vlan=11) / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=C4)),
        ],
        3,
    )

    # IPv4 fragments: a UDP datagram in order (first/middle/last), an ICMP echo delivered
    # last-fragment-first, and a lone middle fragment whose first fragment never arrives
    udp = _udp_bytes(IP(src=A4, dst=B4), 40010, 7, bytes(range(256)) * 10)  # 2568 bytes
    icmp = bytes(ICMP(type=8, id=3, seq=1) / Raw(b"F" * 1992))  # 2000 bytes
    in_order = _v4_frags(A4, B4, 0x1111, udp, 17, [1480, 1000, 88])
    reverse = _v4_frags(B4, A4, 0x2222, icmp, 1, [1000, 800, 200])[::-1]
    orphan = _v4_frags(C4, D4, 0x3333, udp, 17, [1480, 1000, 88])[1:2]
    pcap(
        "ipv4_fragments",
        LINKTYPE_ETHERNET,
        [
            _eth(p)
            for p in in_order + reverse + orphan + [IP(src=A4, dst=B4) / UDP(sport=40010, dport=7)]
        ],
        4,
    )

    # IPv6 fragment headers: UDP in order, UDP last-first, and an unfragmented reply
    udp6 = _udp_bytes(IPv6(src=A6, dst=B6), 41010, 7, bytes(range(200)) * 10)  # 2008
    udp6b = _udp_bytes(IPv6(src=B6, dst=A6), 7, 41010, b"R" * 1500)  # 1508
    pcap(
        "ipv6_fragments",
        LINKTYPE_ETHERNET,
        [
            _eth(p)
            for p in _v6_frags(A6, B6, 0xABCD0001, udp6, 17, [1232, 776])
            + _v6_frags(B6, A6, 0xABCD0002, udp6b, 17, [1000, 508])[::-1]
            + [IPv6(src=A6, dst=B6) / UDP(sport=41010, dport=7) / Raw(b"ok")]
        ],
        5,
    )

    # snaplen 64: 1500-byte frames keep their wire length, only 64 bytes are stored
    big = [
        _eth(IP(src=A4, dst=B4) / TCP(sport=40020, dport=443, flags="A") / Raw(b"T" * 1446)),
        _eth(IP(src=B4, dst=A4) / UDP(sport=443, dport=40021) / Raw(b"U" * 1458)),
        _eth(IPv6(src=A6, dst=B6) / TCP(sport=41020, dport=443, flags="A") / Raw(b"6" * 1426)),
        _eth(IP(src=A4, dst=B4) / TCP(sport=40020, dport=443, flags="A")),  # 54 B, kept whole
    ]
    pcap("snaplen64", LINKTYPE_ETHERNET, big * 2, 6, snaplen=64)

    # single frames cut short inside a 65535-snaplen file
    full = _eth(IP(src=A4, dst=B4) / TCP(sport=40030, dport=80, flags="S") / Raw(b"z" * 20))
    pcap(
        "truncated_frames",
        LINKTYPE_ETHERNET,
        [
            full,
            full[: 14 + 10],  # cut in the middle of the IPv4 header (no addresses)
            full[: 14 + 20 + 4],  # IPv4 header + TCP ports only
            full[:10],  # cut inside the Ethernet header
            _eth(IP(src=B4, dst=A4) / TCP(sport=80, dport=40030, flags="SA")),
        ],
        7,
        wire_lens=[None, len(full), len(full), len(full), None],
    )

    # IPv4 total length that lies: bigger than the frame, and smaller than the header
    pcap(
        "ipv4_bad_length",
        LINKTYPE_ETHERNET,
        [
            _eth(IP(src=A4, dst=B4, len=1000) / UDP(sport=40040, dport=7) / Raw(b"L" * 20)),
            _eth(IP(src=A4, dst=B4, len=12) / UDP(sport=40041, dport=7) / Raw(b"S" * 20)),
            _eth(IP(src=B4, dst=A4) / UDP(sport=7, dport=40040) / Raw(b"ok")),
            _eth(v4[7]),
            _eth(v4[8]),
        ],
        8,
    )

    # non-IP: ARP request/reply and the IEEE local-experimental EtherType 0x88b5
    pcap(
        "non_ip",
        LINKTYPE_ETHERNET,
        [
            bytes(
                Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=C4)
            ),
            bytes(
                Ether(src=MAC_B, dst=MAC_A) / ARP(op=2, hwsrc=MAC_B, psrc=C4, hwdst=MAC_A, pdst=A4)
            ),
            bytes(Ether(src=MAC_A, dst=MAC_B, type=0x88B5) / Raw(b"experimental" * 4)),
            _eth(v4[5]),
            _eth(v4[6]),
        ],
        9,
    )

    # other link types, each with IPv4 and IPv6 (and ARP where the link can carry it)
    mixed = [v4[0], v4[1], v4[5], v4[6], v6[3], v6[4]]
    sll_addr = bytes.fromhex("02000000000a0000")
    pcap(
        "linux_sll",
        LINKTYPE_SLL,
        [
            bytes(
                CookedLinux(pkttype=4 if i % 2 == 0 else 0, lladdrtype=1, lladdrlen=6, src=sll_addr)
                / p
            )
            for i, p in enumerate(mixed + [ARP(op=1, hwsrc=MAC_A, psrc=A4, pdst=C4)])
        ],
        10,
    )
    # SLL2 header: protocol, reserved, ifindex, ARPHRD_ETHER, packet type, addr len, addr
    sll2 = [
        struct.pack(">HHIHBB8s", 0x86DD if p.version == 6 else 0x0800, 0, 2, 1, 4 * (i % 2), 6,
                    sll_addr) + bytes(p)
        for i, p in enumerate(mixed)
    ]  # fmt: skip
    pcap("linux_sll2", LINKTYPE_SLL2, sll2, 11)
    pcap("raw_ip", LINKTYPE_RAW, [bytes(p) for p in mixed], 12)
    # DLT_NULL: 4-byte address family in the writer's byte order; IPv6 is 24 (Net/OpenBSD),
    # 28 (FreeBSD) or 30 (macOS) depending on the OS, so use two of them
    pcap(
        "null_loopback",
        LINKTYPE_NULL,
        [
            struct.pack("<I", 2 if p.version == 4 else (30 if i % 2 else 24)) + bytes(p)
            for i, p in enumerate(mixed)
        ],
        13,
    )
    pcap(
        "ppp",
        LINKTYPE_PPP,
        [bytes(HDLC() / PPP(proto=0x0057 if p.version == 6 else 0x0021) / p) for p in mixed],
        14,
    )

    # pcapng, two interfaces (Ethernet + raw IP), nanosecond timestamps on both
    ts = _times(8, 15)
    files["pcapng_two_interfaces"] = write_pcapng(
        d / "pcapng_two_interfaces.pcapng",
        [LINKTYPE_ETHERNET, LINKTYPE_RAW],
        [
            (i % 2, t, f, len(f))
            for i, (t, p) in enumerate(zip(ts, v4[:6] + v6[3:5]))
            for f in [_eth(p) if i % 2 == 0 else bytes(p)]
        ],
    )

    # nanosecond pcap: one timestamp 1 ns before a second boundary (floor must not round up)
    ts = _times(6, 16)
    ts[1] = ts[1] // 10**9 * 10**9 + 999_999_999
    files["nanosecond"] = write_pcap(
        d / "nanosecond.pcap",
        LINKTYPE_ETHERNET,
        [_rec(t, _eth(p)) for t, p in zip(ts, v4[:6])],
        nano=True,
    )

    pcap("big_endian", LINKTYPE_ETHERNET, [_eth(p) for p in v4[:6] + v6[:2]], 17, endian=">")

    # tunnels: IPv4-in-IPv4, IPv6-in-IPv4 (6in4) and GRE; flows use the innermost header
    outer = IP(src=C4, dst=D4)
    pcap(
        "tunnels",
        LINKTYPE_ETHERNET,
        [
            _eth(p)
            for p in [
                outer / v4[0],
                IP(src=D4, dst=C4) / v4[1],
                outer / v6[3],
                IP(src=D4, dst=C4) / v6[4],
                outer / GRE() / v4[7],
                IP(src=D4, dst=C4) / GRE() / v4[8],
            ]
        ],
        18,
    )
    return files


def write_bad_files(directory) -> dict[str, Path]:
    """Files a reader must reject (or survive) without crashing; returns {name: path}."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    recs = [_rec(t, _eth(p)) for t, p in zip(_times(3, 30), _ipv4_mix())]
    good = write_pcap(d / "cut_last_record.pcap", LINKTYPE_ETHERNET, recs).read_bytes()
    contents = {
        "empty": b"",
        "random_bytes": random.Random(1234).randbytes(4096),
        "short_header": good[:12],  # global header cut short
        "cut_last_record": good[:-10],  # last record lacks its final 10 bytes
    }
    files = {}
    for name, data in contents.items():
        files[name] = d / f"{name}.pcap"
        files[name].write_bytes(data)
    files["unknown_linktype"] = write_pcap(d / "unknown_linktype.pcap", LINKTYPE_USER0, recs)
    return files


if __name__ == "__main__":  # python tests/captures.py OUT_DIR
    import sys

    for name, path in {
        **write_captures(sys.argv[1]),
        **write_bad_files(Path(sys.argv[1]) / "bad"),
    }.items():
        print(f"{name:24} {path}")
