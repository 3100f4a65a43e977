"""Large synthetic captures, written fast with struct (Scapy would take minutes for a million
packets): a mix of TCP, UDP and ICMP over IPv4, IPv6 and 802.1Q, many flows, spread over a
number of seconds. Used by the crash tests and the benchmarks; the expected values come from
an independent reader (tshark via tests/reference.py, or Scapy), never from this module."""

from __future__ import annotations

import random
import struct
from pathlib import Path

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
RECORD = struct.Struct("<IIII")
BASE_S = 1_700_000_000


def _ipv4(src: int, dst: int, proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                       src.to_bytes(4, "big"), dst.to_bytes(4, "big")) + payload


def _ipv6(src: int, dst: int, proto: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), proto, 64,
                       src.to_bytes(16, "big"), dst.to_bytes(16, "big")) + payload


def _l4(proto: int, sport: int, dport: int, size: int) -> bytes:
    body = bytes(size)
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 65535, 0, 0) + body
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + size, 0) + body
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + body  # ICMP / ICMPv6 echo-like


def write_synthetic_pcap(path: str | Path, packets: int, flows: int = 5000, seconds: int = 20,
                         seed: int = 7) -> Path:
    rnd = random.Random(seed)
    specs = []
    for i in range(flows):
        version = 6 if i % 5 == 0 else 4
        proto = (6, 6, 17, 17, 1)[i % 5] if version == 4 else (6, 17, 58)[i % 3]
        src = (0xC0000200 + (i % 250)) if version == 4 else (0x20010DB8 << 96) + i
        dst = (0xC6336400 + (i // 250) % 250) if version == 4 else (0x20010DB8 << 96) + 0x10000 + i
        vlan = 100 + i % 4 if i % 7 == 0 else None
        specs.append((version, proto, src, dst, 1024 + i % 60000, (53, 80, 443, 8080)[i % 4], vlan))
    frames = []
    for version, proto, src, dst, sport, dport, vlan in specs:
        both = []
        for reply in (False, True):
            s, d, sp, dp = (dst, src, dport, sport) if reply else (src, dst, sport, dport)
            l4 = _l4(proto, sp, dp, rnd.choice((0, 18, 200, 1200)))
            ip = _ipv4(s, d, proto, l4) if version == 4 else _ipv6(s, d, proto, l4)
            eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
            if vlan is not None:
                eth += struct.pack("!HH", 0x8100, vlan)
            both.append(eth + struct.pack("!H", 0x0800 if version == 4 else 0x86DD) + ip)
        frames.append(both)
    step_ns = seconds * 1_000_000_000 // max(1, packets)
    with open(path, "wb") as fh:
        fh.write(PCAP_HEADER)
        ts = BASE_S * 1_000_000_000
        for n in range(packets):
            frame = frames[rnd.randrange(flows)][n & 1]
            ts += step_ns
            fh.write(RECORD.pack(ts // 1_000_000_000, ts % 1_000_000_000 // 1000, len(frame),
                                 len(frame)))
            fh.write(frame)
    return Path(path)
