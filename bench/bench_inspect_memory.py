"""Inspection memory under a flood of unfinished ClientHellos:
`python bench/bench_inspect_memory.py [--flows 100000] [--segments 11] [--segment-bytes 1400]`.

Builds, in memory and one frame at a time (nothing is stored), FLOWS TCP flows to port 443
that each send SEGMENTS in-order segments of one TLS ClientHello whose record header announces
16 KB: the hello never completes, so every flow's inspector stays unfinished (at 11 segments
it is one packet short of MAX_PACKETS). The flows are interleaved (segment 1 of every flow,
then segment 2, ...), over SPAN_S seconds of capture time, as a flood of concurrent
connections would arrive. Each frame goes through capture.decode.decode_frame and
capture.batching.RecordBatcher.add, with RecordBatcher.flush() every 10,000 frames (the capture
CPU path without Kafka; the messages made are dropped). With the default SPAN_S of 10 s the
byte budget is what bounds the state; `--flows 3000 --span-s 600` (a round of segments every
55 s, the state under the budget) shows the idle timeout at work instead.

The same run measures, each in a fresh subprocess:

* before: the capture package of git HEAD (git archive HEAD capture packet_records into a
  temporary directory, imported from there);
* after: the working tree's capture package (its defaults: INSPECT_MEMORY_MB=64,
  INSPECT_IDLE_TIMEOUT_S=30);

and reports each one's peak RSS (VmHWM), its RSS before the first frame, frames per second,
the flows in the cache and, after, the inspections given up (budget, idle) and the bytes
charged to the budget at the end. Then, in the after process, the memory of one FlowCache entry
(tracemalloc, 20,000 flows with no payload: the cache's bound in entries times this is its
bound in bytes). It prints figures and asserts nothing (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the worker
def _vm(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hello_stream(size: int) -> bytes:
    """The first `size` bytes of a ClientHello stream whose record says 16 KB: a TLS record
    header (16384 bytes), the handshake header of a 16375-byte ClientHello (the longest the
    parser waits for), version, random, an empty session id, then filler that the parser
    never sees the end of."""
    body = b"\x03\x03" + bytes(range(32)) + b"\x00"
    stream = b"\x16\x03\x01" + struct.pack("!H", 16384) + b"\x01" + (16375).to_bytes(3, "big")
    stream += body
    return (stream + bytes(size))[:size]


def _frames(flows: int, segments: int, seg_bytes: int, span_ns: int, t0: int):
    """(ts_ns, frame) of the flood, one frame at a time: Ethernet, IPv4, TCP (ACK|PSH)."""
    stream = _hello_stream(segments * seg_bytes)
    payloads = [stream[k * seg_bytes:(k + 1) * seg_bytes] for k in range(segments)]
    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
    ip_tcp = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
    dst = bytes((192, 0, 2, 1))
    total = flows * segments
    n = 0
    for k in range(segments):
        payload = payloads[k]
        ip_len = 40 + len(payload)
        for i in range(flows):
            src = bytes((10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF))
            sport = 1024 + (i % 60000)
            seq = (1000 + k * seg_bytes) & 0xFFFFFFFF
            head = ip_tcp.pack(0x45, 0, ip_len, i & 0xFFFF, 0x4000, 64, 6, 0, src, dst,
                               sport, 443, seq, 1, 0x50, 0x18, 64240, 0, 0)
            yield t0 + n * span_ns // total, eth + head + payload
            n += 1


def _entry_bytes(batcher_cls, decode_frame, flows: int = 20000) -> dict:
    """tracemalloc bytes per FlowCache entry (key, addresses, ports, CachedFlow, dict and
    OrderedDict share): flows that sent a SYN only (the inspector is kept, unfinished, with no
    reassembly state), and the same flows once inspection ended."""
    import tracemalloc

    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
    ip_tcp = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
    out = {}
    batcher = batcher_cls(12, 1000, True)
    frames = []
    for i in range(flows):
        src = bytes((10, 1, (i >> 8) & 0xFF, i & 0xFF))
        frames.append(eth + ip_tcp.pack(0x45, 0, 40, 0, 0x4000, 64, 6, 0, src,
                                        bytes((192, 0, 2, 1)), 1024 + i, 443, 1, 0, 0x50,
                                        0x02, 64240, 0, 0))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for f in frames:  # decoded here: the cache keeps the address and port objects it made
        batcher.add(1, len(f), f, decode_frame(f, 1))
        batcher.take()
    batcher.pending = [[] for _ in batcher.pending]
    with_inspector = tracemalloc.get_traced_memory()[0] - before
    for flow in batcher.flows.flows.values():
        flow.inspector = None
    without = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    out["entry_bytes_with_idle_inspector"] = with_inspector / flows
    out["entry_bytes_done"] = without / flows
    return out


def worker(code_dir: str, flows: int, segments: int, seg_bytes: int, span_s: float,
           entry: bool) -> None:
    sys.path.insert(0, code_dir)
    import capture
    from capture.batching import RecordBatcher
    from capture.decode import decode_frame
    from capture.inspect.flow import FlowInspector

    assert str(Path(capture.__file__).resolve()).startswith(str(Path(code_dir).resolve()))
    batcher = RecordBatcher(12, 1000, True)
    add, take = batcher.add, batcher.take
    rss_start = _vm("VmRSS")
    t0 = 1_700_000_000 * 10**9
    n = 0
    began = time.perf_counter()
    for ts, frame in _frames(flows, segments, seg_bytes, int(span_s * 1e9), t0):
        add(ts, len(frame), frame, decode_frame(frame, 1))
        if batcher.ready:
            take()
        n += 1
        if not n % 10000:  # as capture's loop does every BATCH_INTERVAL_MS (100 ms)
            batcher.flush()
            take()
    batcher.flush()
    take()
    elapsed = time.perf_counter() - began
    cache = batcher.flows
    unfinished = sum(1 for f in cache.flows.values() if f.inspector is not None)
    result = {
        "frames": n, "seconds": elapsed, "fps": n / elapsed,
        "rss_start": rss_start, "rss_end": _vm("VmRSS"), "hwm": _vm("VmHWM"),
        "flows_cached": len(cache.flows), "unfinished": unfinished,
        "budget_evictions": getattr(FlowInspector, "budget_evictions", None),
        "idle_expired": getattr(FlowInspector, "idle_expired", None),
        "held_bytes": getattr(cache, "held_bytes", None),
        "memory_budget": getattr(cache, "memory_bytes", None),
    }
    if entry:
        result.update(_entry_bytes(RecordBatcher, decode_frame))
    print(json.dumps(result))


# ------------------------------------------------------------------------ the driver
def run(code_dir: Path, args, entry: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(code_dir), "--flows", str(args.flows),
           "--segments", str(args.segments), "--segment-bytes", str(args.segment_bytes),
           "--span-s", str(args.span_s)] + (["--entry"] if entry else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
    env["PYTHONPATH"] = str(code_dir)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=code_dir)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--segments", type=int, default=11)
    parser.add_argument("--segment-bytes", type=int, default=1400)
    parser.add_argument("--span-s", type=float, default=10.0,
                        help="capture time the flood spans (default 10 s: below the idle "
                        "timeout, so the byte budget is what bounds it)")
    parser.add_argument("--only", choices=("before", "after"), help="run one side only")
    parser.add_argument("--worker", metavar="CODE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--entry", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.flows, args.segments, args.segment_bytes, args.span_s,
               args.entry)
        return
    mb = 1 << 20
    print(f"{args.flows} TCP flows x {args.segments} segments of {args.segment_bytes} bytes of a "
          f"ClientHello announcing 16 KB (never complete), over {args.span_s:g} s of capture "
          f"time; decode_frame + RecordBatcher(12 partitions, inspection on)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "head"
        head.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "capture",
                                  "packet_records"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             check=True, capture_output=True, text=True).stdout.strip()
        if args.only != "after":
            results[f"before (HEAD {rev})"] = run(head, args, False)
        if args.only != "before":
            results["after (working tree)"] = run(ROOT, args, True)
    print(f"{'':24} {'peak RSS':>9} {'RSS start':>9} {'RSS end':>9} {'frames/s':>9} "
          f"{'cached':>7} {'unfinished':>10} {'budget ev.':>10} {'idle exp.':>9} {'held':>8}")
    for name, r in results.items():
        def opt(v, scale=1):
            return "-" if v is None else f"{v / scale:.0f}"
        print(f"{name:24} {r['hwm'] / mb:8.0f}M {r['rss_start'] / mb:8.0f}M "
              f"{r['rss_end'] / mb:8.0f}M {r['fps']:9.0f} {r['flows_cached']:7} "
              f"{r['unfinished']:10} {opt(r['budget_evictions']):>10} "
              f"{opt(r['idle_expired']):>9} {opt(r['held_bytes'], mb):>7}M")
    after = results.get("after (working tree)")
    if after and args.flows == 100_000 and args.segments == 11:
        print(f"target: peak RSS <= 300 MB after 100,000 such flows: "
              f"{after['hwm'] / mb:.0f} MB, {'met' if after['hwm'] <= 300 * mb else 'NOT met'} "
              f"(RSS before the first frame, the baseline: {after['rss_start'] / mb:.0f} MB)")
    if after and "entry_bytes_done" in after:
        print(f"FlowCache entry (tracemalloc): {after['entry_bytes_done']:.0f} bytes once "
              f"inspection ended, {after['entry_bytes_with_idle_inspector']:.0f} bytes with an "
              f"unfinished inspector that holds no payload")


if __name__ == "__main__":
    main()
