"""Write-path benchmark: `python bench/bench_writepath.py [--packets N] [--flows F] [--runs R]`.

Replays one synthetic short-flow capture (tests/synthetic.py, like bench_pipeline's: 1,000,000
packets, 65,000 flows, 20 s) into a real local broker and Redis (local_stack), with the flow
processor already running, and measures for the processor of git HEAD ("before", a copy of
HEAD's flow_processor/ run through PYTHONPATH) and for the working tree ("after"), in the same
run, alternating:

- time from capture's exit until every record is in Redis (HGET pipeline:processor records,
  polled every 20 ms), and from capture's start;
- CPU seconds of the processor and of redis-server from capture's start until then, against
  capture's own CPU seconds;
- the longest wait of a client sending PING every 50 ms during that time (what a Grafana
  query or another processor would wait while a transaction or script holds Redis);
- Redis used_memory and key count afterwards, and the processor's peak RSS.

Medians of --runs runs. It prints figures and asserts nothing (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from bench_pipeline import cpu_seconds  # noqa: E402

from local_stack.services import start_kafka, start_redis  # noqa: E402
from tests.synthetic import write_synthetic_pcap  # noqa: E402

FIELD = re.compile(r"(\w+)=(\S+)")


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class PingPoller(threading.Thread):
    """PING every 50 ms on its own connection; keeps the longest reply time."""

    def __init__(self, url: str, every: float = 0.05):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=60)
        self.every, self.longest, self.over_100ms, self.count = every, 0.0, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            self.client.ping()
            wait = time.perf_counter() - t0
            self.count += 1
            self.longest = max(self.longest, wait)
            self.over_100ms += wait > 0.1
            self.stop.wait(max(0.0, self.every - wait))


def wait_for_line(path: Path, marker: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if marker in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"processor exited {proc.returncode}:\n{path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"no {marker!r} in {path} after {timeout} s")


def one_run(variant: str, pythonpath: str, pcap: Path, kafka_url: str, redis_url: str,
            redis_pid: int, work: Path, extra: dict[str, str]) -> dict:
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    r.config_set("slowlog-log-slower-than", 10000)  # µs: every command of 10 ms or more
    r.config_set("slowlog-max-len", 10000)
    r.slowlog_reset()
    r.config_set("latency-monitor-threshold", 10)  # ms
    r.execute_command("LATENCY", "RESET")
    time.sleep(0.5)
    tag = uuid.uuid4().hex[:10]
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_url, KAFKA_TOPIC=f"wp.{tag}",
               KAFKA_GROUP_ID=f"wp-{tag}", REDIS_URL=redis_url, LOG_LEVEL="INFO",
               STATS_INTERVAL_S="3600", PYTHONPATH=pythonpath, **extra)
    plog = work / f"processor-{variant}-{tag}.log"
    with open(plog, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flow_processor"], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_line(plog, "assigned partitions", proc, 120)
        poller = PingPoller(redis_url)
        poller.start()
        proc_cpu0, redis_cpu0 = cpu_seconds(proc.pid), cpu_seconds(redis_pid)
        t0 = time.perf_counter()
        cap = subprocess.Popen([sys.executable, "-m", "capture", "--pcap", str(pcap)], cwd=ROOT,
                               env=dict(env, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        _stderr = cap.stderr.read()
        _pid, status, usage = os.wait4(cap.pid, 0)
        cap.returncode = os.waitstatus_to_exitcode(status)
        t_exit = time.perf_counter()
        cap_cpu = usage.ru_utime + usage.ru_stime
        final = {}
        for line in _stderr.splitlines():
            if ": final " in line:
                final = dict(FIELD.findall(line.split(": final ", 1)[1]))
        frames = int(final.get("frames", 0))
        if cap.returncode != 0 or not frames:
            raise RuntimeError(f"capture exited {cap.returncode}:\n{_stderr[-2000:]}")
        while True:
            done = int(r.hget("pipeline:processor", "records") or 0)
            if done >= frames:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"processor exited:\n{plog.read_text()[-2000:]}")
            if time.perf_counter() - t0 > 900:
                raise RuntimeError(f"only {done} of {frames} records after 900 s")
            time.sleep(0.02)
        t_done = time.perf_counter()
        proc_cpu = cpu_seconds(proc.pid) - proc_cpu0
        redis_cpu = cpu_seconds(redis_pid) - redis_cpu0
        poller.stop.set()
        poller.join()
        rss = peak_rss_mb(proc.pid)
        slow = r.slowlog_get(10000)
        events = {e[0].decode(): e[3] for e in r.execute_command("LATENCY", "LATEST")}
        longest = max(slow, key=lambda e: e["duration"], default=None)
        time.sleep(1.5)  # a last flush of what the processor still holds (nothing: all written)
        info = r.info("memory")
        pps = sum(int(float(v)) for _t, v in r.execute_command("TS.RANGE", "ts:global:pps",
                                                                 "-", "+"))
        series = len(r.execute_command("TS.QUERYINDEX", "dimension=flow")) // 2
        return {
            "variant": variant, "frames": frames, "exact": pps == frames,
            "after_exit": t_done - t_exit, "from_start": t_done - t0, "capture_s": t_exit - t0,
            "cap_cpu": cap_cpu, "proc_cpu": proc_cpu, "redis_cpu": redis_cpu,
            "ratio": (proc_cpu + redis_cpu) / cap_cpu if cap_cpu else float("nan"),
            "ping_max_ms": poller.longest * 1000, "pings_over_100ms": poller.over_100ms,
            "pings": poller.count,
            "slow_max_ms": longest["duration"] / 1000 if longest else 0.0,
            "slow_cmd": (longest["command"][:40].decode(errors="replace") if longest else ""),
            "slow_over_50ms": sum(e["duration"] > 50000 for e in slow),
            "latency_ms": max(events.values(), default=0), "latency_events": events,
            "used_mb": info["used_memory"] / 2**20, "keys": r.dbsize(),
            "flows_with_series": series, "rss_mb": rss,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


COLUMNS = (("after_exit", "exit->all in Redis s", "{:.2f}"),
           ("from_start", "start->all s", "{:.2f}"),
           ("cap_cpu", "capture CPU s", "{:.1f}"), ("proc_cpu", "processor CPU s", "{:.1f}"),
           ("redis_cpu", "redis CPU s", "{:.1f}"), ("ratio", "(proc+redis)/capture", "{:.2f}"),
           ("ping_max_ms", "longest PING ms", "{:.0f}"),
           ("pings_over_100ms", "PINGs >100ms", "{:.0f}"),
           ("slow_max_ms", "longest command ms (server)", "{:.0f}"),
           ("slow_over_50ms", "commands >50ms (server)", "{:.0f}"),
           ("latency_ms", "longest event ms (LATENCY)", "{:.0f}"),
           ("used_mb", "used_memory MB", "{:.0f}"), ("keys", "keys", "{:,.0f}"),
           ("flows_with_series", "flows with series", "{:,.0f}"),
           ("rss_mb", "processor peak RSS MB", "{:.0f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--flows", type=int, help="default 65 per 1000 packets")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default="before,after",
                        help="comma-separated: before (git HEAD's flow_processor), after (the "
                        "working tree), with processor settings after ':' (NAME=VALUE;...)")
    args = parser.parse_args()
    flows = args.flows or max(10, args.packets * 65 // 1000)
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="dpi-writepath-") as tmp:
        work = Path(tmp)
        pcap = work / "short-flows.pcap"
        t = time.perf_counter()
        write_synthetic_pcap(pcap, args.packets, flows=flows, seconds=args.seconds,
                             real_payloads=True)
        print(f"capture: {args.packets:,} packets, {flows:,} flows, {args.seconds} s, written in "
              f"{time.perf_counter() - t:.0f} s; {os.cpu_count()} CPUs", flush=True)
        paths = {"after": str(ROOT)}
        if any(v.partition(":")[0] == "before" for v in variants):
            before = work / "before"
            before.mkdir()
            archive = subprocess.run(["git", "archive", "HEAD", "flow_processor"], cwd=ROOT,
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
            paths["before"] = f"{before}{os.pathsep}{ROOT}"
        kafka = start_kafka(workdir=work / "run")
        rds = start_redis(workdir=work / "run")
        results: list[dict] = []
        try:
            redis_url = rds.url.rsplit("/", 1)[0] + "/0"
            for run in range(args.runs):
                order = variants if run % 2 == 0 else variants[::-1]
                for variant in order:
                    base, _, settings = variant.partition(":")
                    extra = dict(item.split("=", 1) for item in settings.split(";") if item)
                    res = one_run(variant, paths[base], pcap, kafka.url, redis_url, rds.pid,
                                  work, extra)
                    results.append(res)
                    print(f"run {run + 1} {variant:<6} " + "  ".join(
                        f"{label}={fmt.format(res[key])}" for key, label, fmt in COLUMNS)
                        + f"  longest command: {res['slow_cmd']}"
                        + f"  latency events (max ms): {res['latency_events']}"
                        + ("" if res["exact"] else "  ts:global:pps DIFFERS"), flush=True)
        finally:
            rds.stop()
            kafka.stop()
    print(f"\nmedian of {args.runs} run(s) each, {args.packets:,} frames, {flows:,} flows")
    names = [v.replace("FLOW_SERIES=", "") for v in variants]
    width = max(12, *(len(n) + 2 for n in names))
    print(f"{'':<30}" + "".join(f"{n:>{width}}" for n in names))
    for key, label, fmt in COLUMNS:
        row = []
        for variant in variants:
            values = [res[key] for res in results if res["variant"] == variant]
            row.append(fmt.format(statistics.median(values)) if values else "-")
        print(f"{label:<30}" + "".join(f"{v:>{width}}" for v in row))
    print("exact (ts:global:pps = frames) in every run:", all(res["exact"] for res in results))


if __name__ == "__main__":
    main()
