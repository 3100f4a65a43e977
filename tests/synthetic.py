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


def _l4(proto: int, sport: int, dport: int, body: bytes) -> bytes:
    size = len(body)
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 65535, 0, 0) + body
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + size, 0) + body
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + body  # ICMP / ICMPv6 echo-like


def _first_payload(proto: int, dport: int, i: int) -> bytes | None:
    """A real first client payload for the flow's server port (DNS query, HTTP GET, TLS
    ClientHello, QUIC Initial), as a flow's first packet carries on a real network."""
    from traffic_generator import messages

    if proto == 17 and dport == 53:
        return messages.dns_query(f"host{i}.example.com", i & 0xFFFF)
    if proto == 6 and dport in (80, 8080):
        return messages.http_get(f"www{i}.example.com")
    if proto == 6 and dport == 443:
        return messages.tls_client_hello(f"site{i}.example.org")
    if proto == 17 and dport == 443:
        return messages.quic_initial(f"video{i}.example.net", dcid=i.to_bytes(8, "big"))
    return None


def write_synthetic_pcap(path: str | Path, packets: int, flows: int = 5000, seconds: int = 20,
                         seed: int = 7, real_payloads: bool = False) -> Path:
    """real_payloads: each flow's first packet carries a real first payload for its port (the
    rest carry zeros), so L7 inspection does its real work once per flow."""
    rnd = random.Random(seed)
    frames = []  # per flow: [client frame, server frame, first frame]
    for i in range(flows):
        version = 6 if i % 5 == 0 else 4
        proto = (6, 6, 17, 17, 1)[i % 5] if version == 4 else (6, 17, 58)[i % 3]
        src = (0xC0000200 + (i % 250)) if version == 4 else (0x20010DB8 << 96) + i
        dst = (0xC6336400 + (i // 250) % 250) if version == 4 else (0x20010DB8 << 96) + 0x10000 + i
        vlan = 100 + i % 4 if i % 7 == 0 else None
        sport, dport = 1024 + i % 60000, (53, 80, 443, 8080)[i % 4]
        first = _first_payload(proto, dport, i) if real_payloads else None
        frames.append([
            _frame(version, proto, src, dst, sport, dport, vlan, bytes(rnd.choice(SIZES))),
            _frame(version, proto, dst, src, dport, sport, vlan, bytes(rnd.choice(SIZES))),
            _frame(version, proto, src, dst, sport, dport, vlan, first) if first else None,
        ])
    started = [False] * flows
    step_ns = seconds * 1_000_000_000 // max(1, packets)
    with open(path, "wb") as fh:
        fh.write(PCAP_HEADER)
        ts = BASE_S * 1_000_000_000
        for n in range(packets):
            flow = rnd.randrange(flows)
            frame = frames[flow][n & 1]
            if not started[flow]:
                started[flow] = True
                frame = frames[flow][2] or frame
            ts += step_ns
            fh.write(RECORD.pack(ts // 1_000_000_000, ts % 1_000_000_000 // 1000, len(frame),
                                 len(frame)))
            fh.write(frame)
    return Path(path)


SIZES = (0, 18, 200, 1200)  # payload sizes of the synthetic packets


def _frame(version: int, proto: int, src: int, dst: int, sport: int, dport: int,
           vlan: int | None, payload: bytes) -> bytes:
    eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
    if vlan is not None:
        eth += struct.pack("!HH", 0x8100, vlan)
    l4 = _l4(proto, sport, dport, payload)
    ip = _ipv4(src, dst, proto, l4) if version == 4 else _ipv6(src, dst, proto, l4)
    return eth + struct.pack("!H", 0x0800 if version == 4 else 0x86DD) + ip
