"""Peer benchmark: `python bench/bench_peers.py [--quick] [--rounds N]`.

The capture CPU path (`python -m capture --pcap` without Kafka) against nDPI's ndpiReader and
nfstream, on the same capture files, in one run, taking turns (the order rotates every round);
median of the rounds with [min-max]. Two workloads:

  A  bench_pipeline.py's bench capture (tests/synthetic.py): 1,000,000 frames (--quick 100,000),
     65 flows per 1000 frames, 20 s, real first payloads (DNS, HTTP, TLS ClientHello, QUIC);
  B  about 20,000 flows (--quick 2,000) of Pareto-distributed sizes, about 1,000,000 frames
     (--quick 100,000) over 60 s: TCP with handshake, data both ways with real sequence numbers
     and FIN teardown (80% of flows), QUIC and DNS over UDP; the first payload of every flow is
     real (bench/workloads.py, which writes it for bench_writepath too).

Tools, each a subprocess per run:

  capture     capture.__main__.pump (the service's own loop, RecordBatcher as main() builds it,
              inspection on, the file read and decoded by its reader process as main() does)
              with a producer that drops the messages; wall and CPU time (getrusage of that
              process and of the reader) measured around pump, interpreter start and imports
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
import json
import os
import re
import resource
import shutil
import statistics
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
from workloads import write_pareto_pcap  # noqa: E402

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

    def send_replay_end(self, message: bytes, partitions: int) -> None:
        pass


def cpu_self_children() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def child_capture(path: str) -> dict:
    from capture.__main__ import CHUNK_DECODE_BATCH, pump
    from capture.batching import RecordBatcher
    from capture.counters import CaptureCounters
    from capture.reader_process import read_decoded
    from capture.settings import CaptureSettings
    from packet_records.runtime import tune_gc

    settings = CaptureSettings()
    tune_gc()  # as the service does at start
    producer, counters = NullProducer(), CaptureCounters()
    batcher = RecordBatcher(12, settings.records_per_message, settings.inspect_payloads,
                            replay=True, inspect_memory_mb=settings.inspect_memory_mb,
                            inspect_idle_timeout_s=settings.inspect_idle_timeout_s,
                            fragments_held=settings.fragments_held)
    t0, c0 = time.perf_counter(), cpu_self_children()
    # the file read as the service reads it: by a reader process that decodes it too
    pump(read_decoded(path, CHUNK_DECODE_BATCH, settings.inspect_payloads), batcher, producer,
         counters, settings)  # type: ignore[arg-type]
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
