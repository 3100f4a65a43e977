"""Peer benchmark: `python bench/bench_peers.py [--quick] [--rounds N]`.

The capture CPU path (`python -m capture --pcap` without Kafka) against nDPI's ndpiReader and
nfstream, on the same capture files, in one run, taking turns (the order rotates every round);
median of the rounds with [min-max]. Two workloads:

  A  bench_pipeline.py's bench capture (tests/synthetic.py): 1,000,000 frames (--quick 100,000),
     65 flows per 1000 frames, 20 s, real first payloads (DNS, HTTP, TLS ClientHello, QUIC);
  B  about 20,000 flows (--quick 2,000) of Pareto-distributed sizes, about 1,000,000 frames
     (--quick 100,000) over 60 s: TCP with handshake, data both ways with real sequence numbers
     and FIN teardown (80% of flows), QUIC and DNS over UDP; the first payload of every flow is
     real (the generator helpers bench_pipeline uses).

Tools, each a subprocess per run:

  capture     capture.__main__.pump (the service's own loop, RecordBatcher as main() builds it,
              inspection on) with a producer that drops the messages; wall and CPU time
              (getrusage of that process) measured around pump, interpreter start and imports
              left out;
  ndpiReader  `ndpiReader -i FILE -q` (Debian libndpi-bin, nDPI 4.2): wall time of the whole
              process, CPU from getrusage(RUSAGE_CHILDREN) deltas;
  nfstream    NFStreamer(source=FILE, n_dissections=20, statistical_analysis=False), iterating
              every flow (n_meters default); wall around creation + iteration, CPU of the
              process and of its meter processes (RUSAGE_SELF + RUSAGE_CHILDREN), imports left
              out. Installed into this venv when missing (pip install nfstream==6.6.0).

Frames are the file's frame count for every tool. It prints figures and ratios and asserts
nothing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_pipeline import children_cpu  # noqa: E402

from tests import synthetic  # noqa: E402

NFSTREAM = "nfstream==6.6.0"
TOOLS = ("capture", "ndpiReader", "nfstream")


# --------------------------------------------------------------------------------------------
# children: one run of a Python tool, printing one JSON line


class NullProducer:
    """Stands in for capture.producer.RecordProducer: counts the messages and drops them."""

    def __init__(self) -> None:
        self.records = 0

    def send(self, partition: int, message: bytes, records: int) -> bool:
        self.records += records
        return True

    def poll(self) -> None:
        pass

    def send_stats(self, message: bytes) -> None:
        pass


def cpu_self_children() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def child_capture(path: str) -> dict:
    from capture.__main__ import pump
    from capture.batching import RecordBatcher
    from capture.counters import CaptureCounters
    from capture.pcapfile import read_frames
    from capture.settings import CaptureSettings

    settings = CaptureSettings()
    producer, counters = NullProducer(), CaptureCounters()
    batcher = RecordBatcher(12, settings.records_per_message, settings.inspect_payloads,
                            replay=True, inspect_memory_mb=settings.inspect_memory_mb,
                            inspect_idle_timeout_s=settings.inspect_idle_timeout_s,
                            fragments_held=settings.fragments_held)
    t0, c0 = time.perf_counter(), cpu_self_children()
    pump(read_frames(path), batcher, producer, counters, settings)  # type: ignore[arg-type]
    wall, cpu = time.perf_counter() - t0, cpu_self_children() - c0
    return {"wall": wall, "cpu": cpu, "frames": counters.frames, "records": producer.records}


def child_nfstream(path: str) -> dict:
    from nfstream import NFStreamer

    t0, c0 = time.perf_counter(), cpu_self_children()
    flows = packets = 0
    for flow in NFStreamer(source=path, n_dissections=20, statistical_analysis=False):
        flows += 1
        packets += flow.bidirectional_packets
    wall, cpu = time.perf_counter() - t0, cpu_self_children() - c0
    return {"wall": wall, "cpu": cpu, "flows": flows, "packets": packets}


# --------------------------------------------------------------------------------------------
# workload B


def _tcp(sport: int, dport: int, seq: int, ack: int, flags: int, body: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50,
                       flags, 65535, 0, 0) + body


def _udp(sport: int, dport: int, body: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body


ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01


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
# runs


def run_tool(tool: str, path: Path, kafka_env: dict | None = None) -> dict:
    if tool == "capture>kafka":  # the service itself into the local broker, whole process
        env = dict(kafka_env or {}, KAFKA_TOPIC=f"peers.{uuid.uuid4().hex[:10]}")
        c0, t0 = children_cpu(), time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "capture", "--pcap", str(path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
        wall, cpu = time.perf_counter() - t0, children_cpu() - c0
        if proc.returncode != 0:
            raise RuntimeError(f"capture exited {proc.returncode}: {proc.stderr[-3000:]}")
        return {"wall": wall, "cpu": cpu}
    if tool == "ndpiReader":
        c0, t0 = children_cpu(), time.perf_counter()
        proc = subprocess.run(["ndpiReader", "-i", str(path), "-q"], capture_output=True,
                              text=True, timeout=600)
        wall, cpu = time.perf_counter() - t0, children_cpu() - c0
        if proc.returncode != 0:
            raise RuntimeError(f"ndpiReader exited {proc.returncode}: {proc.stderr[-2000:]}")
        return {"wall": wall, "cpu": cpu}
    proc = subprocess.run([sys.executable, __file__, "--child", tool, str(path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ndpi_check(path: Path) -> str:
    """One ndpiReader run without -q (not timed): what it saw of the file."""
    out = subprocess.run(["ndpiReader", "-i", str(path)], capture_output=True, text=True,
                         timeout=600).stdout
    got = {}
    for key in ("IP packets", "Unique flows", "Confidence: DPI"):
        m = re.search(rf"{re.escape(key)}:?\s+(\d+)", out)
        got[key] = int(m.group(1)) if m else -1
    return (f"ndpiReader saw {got['IP packets']:,} IP packets, {got['Unique flows']:,} flows, "
            f"{got['Confidence: DPI']:,} classified by DPI")


def ensure_tools() -> None:
    if shutil.which("ndpiReader") is None:
        sys.exit("ndpiReader not found: apt-get install libndpi-bin")
    try:
        import nfstream  # noqa: F401
    except ImportError:
        print(f"installing {NFSTREAM} into {sys.prefix} (bench only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", NFSTREAM], check=True)


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt_range(values: list[float]) -> str:
    m, lo, hi = med(values)
    if len(values) == 1:
        return f"{m:,.0f}"
    return f"{m:,.0f} [{lo:,.0f}-{hi:,.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 frames a workload")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool (default 3)")
    parser.add_argument("--frames", type=int, help="frames a workload (default 1,000,000)")
    parser.add_argument("--e2e", action="store_true", help="also `python -m capture --pcap` "
                        "into a local Tansu broker (local_stack), whole process")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, path = args.child
        result = child_capture(path) if tool == "capture" else child_nfstream(path)
        print(json.dumps(result))
        return

    sys.stdout.reconfigure(line_buffering=True)
    ensure_tools()
    frames = args.frames or (100_000 if args.quick else 1_000_000)
    flows_a = max(10, frames * 65 // 1000)
    flows_b = max(10, frames // 50)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpi-bench-peers-") as tmp:
        work = Path(tmp)
        files = {}
        t0 = time.perf_counter()
        path_a = synthetic.write_synthetic_pcap(work / "a.pcap", frames, flows=flows_a,
                                                seconds=20, real_payloads=True)
        files["A"] = (path_a, frames, f"bench capture: {frames:,} frames, {flows_a:,} flows over "
                      "20 s, TCP/UDP/ICMP, real first payloads")
        t_a = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_b = write_pareto_pcap(work / "b.pcap", frames, flows_b)
        files["B"] = (work / "b.pcap", n_b, f"Pareto flows: {n_b:,} frames, {flows_b:,} flows "
                      "over 60 s, TCP handshake/data/FIN, QUIC, DNS, real first payloads")
        t_b = time.perf_counter() - t0
        print(f"captures written in {t_a:.1f} s (A) and {t_b:.1f} s (B); Python "
              f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.rounds} rounds")
        for key, (path, _n, what) in files.items():
            size = path.stat().st_size
            print(f"  {key}: {what}, {size / 1e6:,.1f} MB; {ndpi_check(path)}")

        tools = TOOLS + (("capture>kafka",) if args.e2e else ())
        kafka, kafka_env = None, None
        if args.e2e:
            from local_stack.services import start_kafka

            kafka = start_kafka(workdir=work / "run")
            kafka_env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka.url, LOG_LEVEL="INFO",
                             STATS_INTERVAL_S="3600", PYTHONPATH=str(ROOT))
        results = {(w, t): [] for w in files for t in tools}
        notes = []
        try:
            measure(args.rounds, files, tools, results, notes, kafka_env)
        finally:
            if kafka is not None:
                kafka.stop()
        print_table(args.rounds, files, tools, results, notes)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")


def measure(rounds: int, files: dict, tools: tuple, results: dict, notes: list,
            kafka_env: dict | None) -> None:
    """Every tool on every file, `rounds` times; the order of the tools rotates each round."""
    for r in range(rounds):
        order = tools[r % len(tools):] + tools[:r % len(tools)]
        for key, (path, n, _what) in files.items():
            for tool in order:
                res = run_tool(tool, path, kafka_env)
                results[key, tool].append(res)
                if tool == "capture" and res["records"] != n:
                    notes.append(f"{key}: capture produced {res['records']:,} records for "
                                 f"{n:,} frames")
                if tool == "nfstream" and r == 0:
                    notes.append(f"{key}: nfstream reported {res['flows']:,} flows, "
                                 f"{res['packets']:,} packets in them")
                print(f"  round {r + 1} {key} {tool:<13} {res['wall']:6.2f} s wall "
                      f"{res['cpu']:6.2f} CPU-s", file=sys.stderr, flush=True)


def print_table(rounds: int, files: dict, tools: tuple, results: dict, notes: list) -> None:
    print(f"\n== capture CPU path vs ndpiReader vs nfstream (median of {rounds} "
          "[min-max]) ==")
    print("| workload | tool          | frames    | frames/s                    "
          "| frames per CPU-s            |")
    print("|----------|---------------|-----------|-----------------------------"
          "|-----------------------------|")
    medians = {}
    for key, (_path, n, _what) in files.items():
        for tool in tools:
            runs = results[key, tool]
            fps = [n / x["wall"] for x in runs]
            fpc = [n / x["cpu"] for x in runs]
            medians[key, tool] = (med(fps)[0], med(fpc)[0])
            print(f"| {key:<8} | {tool:<13} | {n:>9,} | {fmt_range(fps):<27} "
                  f"| {fmt_range(fpc):<27} |")
    print("\nratios of the medians, frames/s and frames per CPU-s (targets: "
          "capture/ndpiReader >= 1.0, capture/nfstream >= 3.0)")
    print("| workload | capture/ndpiReader | per CPU-s | capture/nfstream | per CPU-s |")
    print("|----------|--------------------|-----------|------------------|-----------|")
    for key in files:
        c, nd, nf = (medians[key, t] for t in TOOLS)
        print(f"| {key:<8} | {c[0] / nd[0]:>18.2f} | {c[1] / nd[1]:>9.2f} "
              f"| {c[0] / nf[0]:>16.2f} | {c[1] / nf[1]:>9.2f} |")
    if "capture>kafka" in tools:
        for key in files:
            k, nd, nf = medians[key, "capture>kafka"], medians[key, "ndpiReader"], \
                medians[key, "nfstream"]
            print(f"  {key}: python -m capture --pcap into Tansu (whole process, start-up and "
                  f"delivery included): /ndpiReader {k[0] / nd[0]:.2f} (CPU {k[1] / nd[1]:.2f}),"
                  f" /nfstream {k[0] / nf[0]:.2f} (CPU {k[1] / nf[1]:.2f})")
    for line in notes:
        print("  " + line)


if __name__ == "__main__":
    main()
