"""The benchmark workloads, one capture file each, written fast with struct.

  A  the bench capture (tests/synthetic.py): 65 flows per 1000 frames (65,000 for a million),
     over 20 s, TCP/UDP/ICMP over IPv4, IPv6 and 802.1Q; the first packet of every DNS, HTTP,
     TLS and QUIC flow carries a real query, request, ClientHello or QUIC Initial, the rest
     zeros; about 15 packets a flow, packets of random flows interleaved.
  B  heavy-tailed flows: one flow per 50 frames (20,000 for a million) over 60 s, Pareto sizes
     (alpha 1.2, at least 8 packets a TCP flow, at most frames/20): 80% TCP (SYN, SYN-ACK, ACK,
     the real first payload, server data of mostly 1448 bytes with client ACKs, consistent
     sequence numbers, FIN/FIN/ACK teardown) to 443, 80 and 8080, 10% QUIC (real Initial, then
     1200-byte datagrams both ways), 10% DNS (query and response); 10% of flows over IPv6;
     packets 2-20 ms apart.
  S  a scan: every frame a flow of its own (1,000,000 distinct flows for a million frames),
     TCP SYNs from 4 scanners to 1000 ports of as many hosts as it takes (10.0.0.0/8), in a
     shuffled order, spread evenly over 60 s; no payload.

write_workload(key, path, frames) writes one and returns (frames written, flows, description).
"""

from __future__ import annotations

import heapq
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import synthetic  # noqa: E402

ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
WORKLOADS = ("A", "B", "S")


def _tcp(sport: int, dport: int, seq: int, ack: int, flags: int, body: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50,
                       flags, 65535, 0, 0) + body


def _udp(sport: int, dport: int, body: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body


# --------------------------------------------------------------------------------------------
# A


def flows_a(frames: int) -> int:
    return max(10, frames * 65 // 1000)


def write_short_flows_pcap(path: Path, frames: int) -> int:
    """Workload A (bench_pipeline's bench capture); returns the number of frames written."""
    synthetic.write_synthetic_pcap(path, frames, flows=flows_a(frames), seconds=20,
                                   real_payloads=True)
    return frames


# --------------------------------------------------------------------------------------------
# B


def flows_b(frames: int) -> int:
    return max(10, frames // 50)


def _flow_kind(rnd: random.Random) -> str:
    kind = rnd.random()
    if kind < 0.10:
        return "dns"
    if kind < 0.20:
        return "quic"
    return "tls" if kind < 0.70 else ("http" if kind < 0.95 else "http8080")


def _flow_length(kind: str, n: int) -> int:
    return 2 if kind == "dns" else (max(1, n) if kind == "quic" else max(0, n - 7) + 7)


def _flow_packets(i: int, kind: str, n: int, rnd: random.Random):
    """(direction, IP protocol, l4 bytes) of one flow of about n packets; direction 0 is
    client to server."""
    sport = 1024 + i % 60000
    if kind == "dns":  # query and response
        yield 0, 17, _udp(sport, 53, synthetic._first_payload(17, 53, i))
        yield 1, 17, _udp(53, sport, bytes(rnd.choice((60, 120, 200))))
        return
    if kind == "quic":  # Initial, then data both ways
        yield 0, 17, _udp(sport, 443, synthetic._first_payload(17, 443, i))
        for k in range(1, n):
            down = k % 4 != 0
            yield (1 if down else 0), 17, (_udp(443, sport, bytes(1200)) if down
                                           else _udp(sport, 443, bytes(40)))
        return
    dport = {"tls": 443, "http": 80, "http8080": 8080}[kind]
    first = synthetic._first_payload(6, dport, i)
    cseq, sseq = rnd.getrandbits(32), rnd.getrandbits(32)
    yield 0, 6, _tcp(sport, dport, cseq, 0, SYN, b"")
    yield 1, 6, _tcp(dport, sport, sseq, cseq + 1, SYN | ACK, b"")
    cseq, sseq = cseq + 1, sseq + 1
    yield 0, 6, _tcp(sport, dport, cseq, sseq, ACK, b"")
    yield 0, 6, _tcp(sport, dport, cseq, sseq, PSH | ACK, first)
    cseq += len(first)
    for k in range(max(0, n - 7)):  # the server sends, the client acks every other segment
        if k % 3 == 2:
            yield 0, 6, _tcp(sport, dport, cseq, sseq, ACK, b"")
        else:
            size = 1448 if rnd.random() < 0.85 else rnd.randrange(100, 1448)
            yield 1, 6, _tcp(dport, sport, sseq, cseq, PSH | ACK, bytes(size))
            sseq += size
    yield 0, 6, _tcp(sport, dport, cseq, sseq, FIN | ACK, b"")
    yield 1, 6, _tcp(dport, sport, sseq, cseq + 1, FIN | ACK, b"")
    yield 0, 6, _tcp(sport, dport, cseq + 1, sseq + 1, ACK, b"")


def write_pareto_pcap(path: Path, frames: int, flows: int, seconds: int = 60,
                      seed: int = 11) -> int:
    """Workload B; returns the number of frames written. Flows start at random times over
    `seconds`, packets 2-20 ms apart (jittered), flow sizes Pareto (alpha 1.2, at least 8
    packets for TCP, at most frames/20), scaled to about `frames` in all."""
    rnd = random.Random(seed)
    sizes = [rnd.paretovariate(1.2) for _ in range(flows)]
    kinds = [_flow_kind(random.Random(seed * 1_000_003 + i)) for i in range(flows)]
    raw = sizes
    scale = frames / sum(raw)
    for _ in range(20):  # the floor and the cap move the total: scale until it is near
        sizes = [min(frames // 20 + 8, max(8, round(s * scale))) for s in raw]
        total = sum(_flow_length(k, n) for k, n in zip(kinds, sizes))
        if abs(total - frames) < frames * 0.005:
            break
        scale *= frames / total
    base = 1_700_000_000 * 1_000_000_000
    span = seconds * 1_000_000_000

    def stream(i: int, n: int):
        """(ts_ns, frame) of flow i, in time order."""
        version = 6 if i % 10 == 0 else 4
        client = (0x0A000000 + i) if version == 4 else (0x20010DB8 << 96) + i
        server = (0xC6336400 + i % 200) if version == 4 else (0x20010DB8 << 96) + 0x10000 + i % 200
        rnd = random.Random(seed * 1_000_003 + i)
        kind = _flow_kind(rnd)
        count = _flow_length(kind, n)
        duration = min(span * 0.9, count * rnd.uniform(2e6, 20e6))  # 2-20 ms apart
        ts = base + int(rnd.uniform(0, span - duration))
        gap = duration / count
        for direction, proto, l4 in _flow_packets(i, kind, n, rnd):
            src, dst = (client, server) if direction == 0 else (server, client)
            ip = (synthetic._ipv4 if version == 4 else synthetic._ipv6)(src, dst, proto, l4)
            yield int(ts), ETH + struct.pack("!H", 0x0800 if version == 4 else 0x86DD) + ip
            ts += gap * rnd.uniform(0.5, 1.5)

    written = 0
    with open(path, "wb") as fh:
        fh.write(synthetic.PCAP_HEADER)
        for ts, frame in heapq.merge(*(stream(i, n) for i, n in enumerate(sizes)),
                                     key=lambda item: item[0]):
            fh.write(synthetic.RECORD.pack(ts // 1_000_000_000, ts % 1_000_000_000 // 1000,
                                           len(frame), len(frame)))
            fh.write(frame)
            written += 1
    return written


# --------------------------------------------------------------------------------------------
# S


SCANNERS = (0xCB007101, 0xCB007102, 0xCB007103, 0xCB007104)  # 203.0.113.1-4
SCAN_PORTS = 1000


def write_scan_pcap(path: Path, frames: int, seconds: int = 60) -> int:
    """Workload S: `frames` TCP SYNs, each a flow of its own (distinct destination address and
    port), in a shuffled order (a multiplicative permutation), evenly over `seconds`; returns
    the number of frames written (= flows)."""
    step = 7919  # prime, coprime with any frame count that is not a multiple of it
    while frames % step == 0:
        step += 2
    base = synthetic.BASE_S * 1_000_000_000
    span = seconds * 1_000_000_000
    head = ETH + b"\x08\x00"
    ip_head = struct.Struct("!BBHHHBBH4s4s")
    tcp = struct.Struct("!HHIIBBHHH")
    record = synthetic.RECORD
    chunk = []
    with open(path, "wb") as fh:
        fh.write(synthetic.PCAP_HEADER)
        for i in range(frames):
            k = (i * step + 13) % frames
            src = SCANNERS[k % len(SCANNERS)]
            dst = 0x0A000000 + k // SCAN_PORTS + 1
            dport = 1 + k % SCAN_PORTS
            frame = (head + ip_head.pack(0x45, 0, 40, i & 0xFFFF, 0x4000, 64, 6, 0,
                                         src.to_bytes(4, "big"), dst.to_bytes(4, "big"))
                     + tcp.pack(40000 + k % 20000, dport, k, 0, 0x50, SYN, 1024, 0, 0))
            ts = base + i * span // frames
            chunk.append(record.pack(ts // 1_000_000_000, ts % 1_000_000_000 // 1000,
                                     len(frame), len(frame)) + frame)
            if len(chunk) >= 65536:
                fh.write(b"".join(chunk))
                chunk.clear()
        fh.write(b"".join(chunk))
    return frames


# --------------------------------------------------------------------------------------------


def write_workload(key: str, path: Path, frames: int) -> tuple[int, int, str]:
    """Write workload `key` (A, B or S) of about `frames` frames to `path`: (frames written,
    flows, a one-line description)."""
    if key == "A":
        n = write_short_flows_pcap(path, frames)
        return n, flows_a(frames), (f"short flows (tests/synthetic.py): {n:,} frames, "
                                    f"{flows_a(frames):,} flows over 20 s, TCP/UDP/ICMP, real "
                                    "first payloads")
    if key == "B":
        n = write_pareto_pcap(path, frames, flows_b(frames))
        return n, flows_b(frames), (f"Pareto flows: {n:,} frames, {flows_b(frames):,} flows over "
                                    "60 s, TCP handshake/data/FIN, QUIC, DNS, real first "
                                    "payloads")
    if key == "S":
        n = write_scan_pcap(path, frames)
        return n, n, f"scan: {n:,} TCP SYNs, {n:,} distinct flows over 60 s"
    raise ValueError(f"unknown workload {key!r}")
