"""Write-path benchmark: `python bench/bench_writepath.py [--quick] [--runs R] [--workloads A,B,S]`.

Three workloads (bench/workloads.py), 1,000,000 frames each (--quick 100,000):

  A  the bench capture (tests/synthetic.py): 65,000 short flows over 20 s, real first payloads;
  B  20,000 flows of Pareto-distributed sizes over 60 s, TCP with handshake, data and teardown,
     some QUIC and DNS, real first payloads;
  S  a scan: 1,000,000 distinct flows of one TCP SYN each over 60 s.

Tansu and Redis Stack run as local processes (local_stack). For every workload, --runs times
(default 3), in an order that rotates from run to run:

  capture alone    `python -m capture --pcap FILE` into a new topic: wall and CPU seconds, and
                   the broker's and Redis's CPU meanwhile;
  processor alone  FLUSHALL, then `python -m flow_processor` (new group) on that filled topic,
                   until HGET pipeline:processor records says every frame is in Redis (polled
                   every 20 ms): time from start and from its group join, CPU of processor,
                   Redis and broker from the join;
  end to end       FLUSHALL, the processor started on a new topic and joined, then capture:
                   from capture's exit (and start) until every frame is in Redis, CPU seconds of
                   capture, processor, broker and redis-server, processor peak RSS, Redis
                   used_memory and DBSIZE afterwards;
  peers            ndpiReader (Debian libndpi-bin) and nfstream 6.6.0 on the same file
                   (bench_peers.run_tool: the whole ndpiReader process, nfstream's iteration),
                   in the first --peer-runs runs (default: every run for A and B, the first for
                   S, where nfstream reads the first S_NFSTREAM_FRAMES frames only: all of S
                   takes it about 3 minutes).

A processor run that has not put every record into Redis --max-wait seconds after capture's
exit (processor alone: --max-wait-alone after its group join) is cut there and counts as that
long: it keeps `make bench` under 15 minutes however slow the write path is.

During the processor and end-to-end runs (and, as the baseline, during capture alone, when
nothing writes to Redis) a thread sends PING every 50 ms on its own connection: the longest
reply is what a dashboard query would have waited. Every processor run checks that
ts:global:pps sums to the frames captured (exact).

The summary gives per workload the median of the runs with [min-max], the same run's baseline
beside each figure (the peers on the same file, capture alone, the PINGs while Redis is idle,
Redis before the run, the processor before its first record) and the targets. It prints
figures and asserts nothing (see bench/README.md).

--variants before,after also runs the processor of git HEAD ("before", HEAD's flow_processor/
extracted with git archive, first on PYTHONPATH) against the working tree ("after"), in the
processor-alone and end-to-end runs; `:NAME=VALUE;...` adds processor settings to a variant.
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
from bench_peers import ensure_tools, run_tool  # noqa: E402
from bench_pipeline import cpu_seconds  # noqa: E402
from workloads import WORKLOADS, write_workload  # noqa: E402

from local_stack.services import start_kafka, start_redis  # noqa: E402

FIELD = re.compile(r"(\w+)=(\S+)")
PEERS = ("ndpiReader", "nfstream")
TARGETS = {"after_exit": 2.0, "ratio": 1.0, "ping_ms": 100.0}
TARGET_USED_MB_S = 1024.0
TARGET_VS_PEERS = {"ndpiReader": 1.0, "nfstream": 3.0}  # capture --pcap frames/s, A and B
TARGET_RSS_MB_S = 500.0
MAX_WAIT_S = 10.0  # 5x the target of 2 s
MAX_WAIT_ALONE_S = 8.0
# nfstream takes about 3 minutes on all of S (a 15-minute make bench cannot hold it): on S it
# reads the file's first this many frames, the same scan throughout
S_NFSTREAM_FRAMES = 100_000


def proc_status_mb(pid: int, field: str) -> float:
    """VmHWM (peak RSS) or VmRSS of a process, MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
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
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.perf_counter()
            self.client.ping()
            wait = time.perf_counter() - t0
            self.count += 1
            self.longest = max(self.longest, wait)
            self.over_100ms += wait > 0.1
            self.halt.wait(max(0.0, self.every - wait))

    def stop(self) -> float:
        """Stop; the longest wait in ms."""
        self.halt.set()
        self.join()
        return self.longest * 1000


class Bench:
    def __init__(self, work: Path, variants: dict[str, tuple[str, dict]]):
        self.work, self.variants = work, variants
        self.kafka = start_kafka(workdir=work / "run")
        try:
            self.rds = start_redis(workdir=work / "run")
        except Exception:
            self.kafka.stop()
            raise
        self.redis_url = self.rds.url.rsplit("/", 1)[0] + "/0"
        self.r = redis.Redis.from_url(self.redis_url, socket_timeout=120)
        self.env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.kafka.url,
                        REDIS_URL=self.redis_url, LOG_LEVEL="INFO", STATS_INTERVAL_S="3600",
                        PYTHONPATH=str(ROOT))

    def close(self) -> None:
        self.rds.stop()
        self.kafka.stop()

    def servers_cpu(self) -> tuple[float, float]:
        return cpu_seconds(self.kafka.pid), cpu_seconds(self.rds.pid)

    def delete_topic(self, topic: str) -> None:
        """The broker keeps topics in memory: drop a run's topic once it is consumed."""
        try:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": self.kafka.url, "log_level": 3})
            for future in admin.delete_topics([topic], operation_timeout=10).values():
                future.result(timeout=15)
        except Exception as exc:  # noqa: BLE001  (figures do not depend on it)
            print(f"    (topic {topic} not deleted: {exc})", file=sys.stderr)

    # ----------------------------------------------------------------------------------------

    def capture(self, pcap: Path, topic: str) -> dict:
        """python -m capture --pcap into `topic`; with the processor (if any) already running."""
        env = dict(self.env, KAFKA_TOPIC=topic)
        broker0, redis0 = self.servers_cpu()
        t0 = time.perf_counter()
        cap = subprocess.Popen([sys.executable, "-m", "capture", "--pcap", str(pcap)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        stderr = cap.stderr.read()
        _pid, status, usage = os.wait4(cap.pid, 0)
        cap.returncode = os.waitstatus_to_exitcode(status)
        t_exit = time.perf_counter()
        broker1, redis1 = self.servers_cpu()
        final: dict[str, str] = {}
        for line in stderr.splitlines():
            if ": final " in line:
                final = dict(FIELD.findall(line.split(": final ", 1)[1]))
        frames = int(final.get("frames", 0))
        if cap.returncode != 0 or not frames:
            raise RuntimeError(f"capture exited {cap.returncode}:\n{stderr[-2000:]}")
        produced = int(final.get("records_produced", frames))
        return {"t0": t0, "t_exit": t_exit, "wall": t_exit - t0, "frames": frames,
                "produced": produced, "cpu": usage.ru_utime + usage.ru_stime,
                "broker_cpu": broker1 - broker0, "redis_cpu": redis1 - redis0}

    def reset_redis(self) -> float:
        """FLUSHALL; used_memory afterwards (MB)."""
        self.r.flushall()
        self.r.config_set("latency-monitor-threshold", 10)  # ms
        self.r.execute_command("LATENCY", "RESET")
        time.sleep(0.3)
        return self.r.info("memory")["used_memory"] / 2**20

    def start_processor(self, variant: str, topic: str) -> tuple[subprocess.Popen, Path, float]:
        pythonpath, extra = self.variants[variant]
        tag = uuid.uuid4().hex[:10]
        env = dict(self.env, KAFKA_TOPIC=topic, KAFKA_GROUP_ID=f"wp-{tag}",
                   PYTHONPATH=pythonpath, **extra)
        plog = self.work / f"processor-{tag}.log"
        with open(plog, "w") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "flow_processor"], cwd=self.work,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        return proc, plog, t0

    def wait_joined(self, proc: subprocess.Popen, plog: Path, timeout: float = 120) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if "assigned partitions" in plog.read_text(errors="replace"):
                return time.perf_counter()
            if proc.poll() is not None:
                raise RuntimeError(f"processor exited {proc.returncode}:\n"
                                   f"{plog.read_text()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"no group join in {plog} after {timeout} s")

    def wait_all(self, frames: int, proc: subprocess.Popen, plog: Path,
                 deadline: float) -> tuple[float, int]:
        """Poll HGET pipeline:processor records every 20 ms until it reaches `frames` or
        perf_counter() passes `deadline` (the run is cut there: --max-wait); (time, records)."""
        while True:
            done = int(self.r.hget("pipeline:processor", "records") or 0)
            now = time.perf_counter()
            if done >= frames or now > deadline:
                return now, done
            if proc.poll() is not None:
                raise RuntimeError(f"processor exited:\n{plog.read_text()[-2000:]}")
            time.sleep(0.02)

    def redis_after(self, frames: int, cut: bool) -> dict:
        """ts:global:pps sums to frames (its last second may land one flush later: up to 3 s),
        used_memory, DBSIZE."""
        end = time.monotonic() + (0 if cut else 3)
        while True:
            try:
                pps = sum(int(float(v)) for _t, v in self.r.execute_command(
                    "TS.RANGE", "ts:global:pps", "-", "+"))
            except redis.ResponseError:
                pps = 0
            if pps == frames or time.monotonic() > end:
                break
            time.sleep(0.1)
        latest = self.r.execute_command("LATENCY", "LATEST")  # [event, time, latest, max]
        events = [e[3] for e in latest]
        worst = max(latest, key=lambda e: e[3], default=None)
        return {"exact": pps == frames, "pps_sum": pps,
                "used_mb": self.r.info("memory")["used_memory"] / 2**20, "keys": self.r.dbsize(),
                "latency_ms": max(events, default=0),
                "latency_event": worst[0].decode() if worst else "-"}

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """SIGKILL: the figures are taken, and a graceful stop would first flush what a cut
        run still holds (seconds of the 15 minutes); the next run starts with FLUSHALL."""
        proc.kill()
        proc.wait()

    # ----------------------------------------------------------------------------------------

    def capture_alone(self, pcap: Path) -> dict:
        topic = f"wp.{uuid.uuid4().hex[:10]}"
        poller = PingPoller(self.redis_url)
        poller.start()
        res = self.capture(pcap, topic)
        res["ping_ms"] = poller.stop()
        res["topic"] = topic
        return res

    def processor_alone(self, variant: str, topic: str, frames: int, max_wait: float) -> dict:
        used0 = self.reset_redis()
        poller = PingPoller(self.redis_url)
        poller.start()
        broker0, redis0 = self.servers_cpu()
        proc, plog, t0 = self.start_processor(variant, topic)
        try:
            t_join = self.wait_joined(proc, plog)
            proc0 = cpu_seconds(proc.pid)  # start-up and group join left out, as end to end
            t_done, done = self.wait_all(frames, proc, plog, t_join + max_wait)
            proc_cpu = cpu_seconds(proc.pid) - proc0
            broker1, redis1 = self.servers_cpu()
            ping = poller.stop()
            rss = proc_status_mb(proc.pid, "VmHWM")
            after = self.redis_after(frames, done < frames)
        finally:
            poller.halt.set()
            self.stop(proc)
        return {"from_start": t_done - t0, "from_join": t_done - t_join, "done": done,
                "frames": frames, "max_wait": max_wait,
                "cut": done < frames, "rate": done / (t_done - t_join), "proc_cpu": proc_cpu,
                "redis_cpu": redis1 - redis0, "broker_cpu": broker1 - broker0, "ping_ms": ping,
                "rss_mb": rss, "used0_mb": used0, **after}

    def end_to_end(self, variant: str, pcap: Path, max_wait: float) -> dict:
        used0 = self.reset_redis()
        topic = f"wp.{uuid.uuid4().hex[:10]}"
        proc, plog, _t0 = self.start_processor(variant, topic)
        try:
            self.wait_joined(proc, plog)
            time.sleep(0.5)  # settle after the join
            rss_idle = proc_status_mb(proc.pid, "VmRSS")
            proc0 = cpu_seconds(proc.pid)
            poller = PingPoller(self.redis_url)
            poller.start()
            cap = self.capture(pcap, topic)
            broker0, redis0 = cap.pop("broker_cpu"), cap.pop("redis_cpu")  # during capture
            mid = self.servers_cpu()
            t_done, done = self.wait_all(cap["frames"], proc, plog, cap["t_exit"] + max_wait)
            proc_cpu = cpu_seconds(proc.pid) - proc0
            end = self.servers_cpu()
            ping = poller.stop()
            rss = proc_status_mb(proc.pid, "VmHWM")
            after = self.redis_after(cap["frames"], done < cap["frames"])
        finally:
            self.stop(proc)
        self.delete_topic(topic)
        broker_cpu = broker0 + end[0] - mid[0]
        redis_cpu = redis0 + end[1] - mid[1]
        return {"after_exit": t_done - cap["t_exit"], "from_start": t_done - cap["t0"],
                "capture_s": cap["wall"], "frames": cap["frames"], "produced": cap["produced"],
                "done": done, "cut": done < cap["frames"], "max_wait": max_wait,
                "cap_cpu": cap["cpu"], "proc_cpu": proc_cpu, "broker_cpu": broker_cpu,
                "redis_cpu": redis_cpu,
                "total_cpu": cap["cpu"] + proc_cpu + broker_cpu + redis_cpu,
                "ratio": (proc_cpu + redis_cpu) / (cap["cpu"] * max(1, done) / cap["frames"]),
                "ping_ms": ping,
                "pings_over_100ms": poller.over_100ms, "rss_mb": rss, "rss_idle_mb": rss_idle,
                "used0_mb": used0, **after}


# --------------------------------------------------------------------------------------------
# summary


def cut_note(x: dict) -> str:
    if x["cut"]:
        return (f"; CUT at {x['max_wait']:.0f} s with {x['done']:,} of {x['frames']:,} records "
                "in Redis")
    return "" if x["exact"] else f"; ts:global:pps sums to {x['pps_sum']:,}: DIFFERS"


def pcap_prefix(path: Path, frames: int, out: Path) -> int:
    """The first `frames` frames of the classic pcap file `path` written to `out`: how many."""
    with open(path, "rb") as src, open(out, "wb") as dst:
        dst.write(src.read(24))
        count = 0
        while count < frames:
            head = src.read(16)
            if len(head) < 16:
                break
            dst.write(head + src.read(int.from_bytes(head[8:12], "little")))
            count += 1
    return count


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt_range(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "-"
    m, lo, hi = med(values)
    if len(values) == 1 or lo == hi:
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(lo)}-{fmt.format(hi)}]"


def summary_rows(key: str, n: int, flows: int, res: dict, variant: str) -> list[tuple]:
    """(figure, this code, baseline of the same run, target, met) of one workload."""
    cap, alone, e2e = res["capture"], res["alone", variant], res["e2e", variant]
    nd, nf = res["ndpiReader"], res["nfstream"]

    def col(runs: list[dict], field: str, fmt: str = "{:,.0f}", scale: float = 1.0) -> str:
        return fmt_range([x[field] * scale for x in runs], fmt)

    def rate(runs: list[dict], field: str = "wall") -> str:
        text = fmt_range([x.get("frames", n) / x[field] for x in runs])
        return text + prefix_note(runs)

    def prefix_note(runs: list[dict]) -> str:
        part = runs[0].get("frames", n) if runs else n
        return f" (first {part:,} frames)" if part < n else ""

    def met(runs: list[dict], field: str, limit: float) -> str:
        if not runs:
            return ""
        return "yes" if med([x[field] for x in runs])[0] <= limit else "NO"

    def cut(runs: list[dict]) -> str:
        """How many runs were cut at --max-wait, and how far they had got."""
        cuts = [x for x in runs if x["cut"]]
        if not cuts:
            return ""
        share = fmt_range([100 * x["done"] / n for x in cuts], "{:.0f}")
        return (f" ({len(cuts)} of {len(runs)} cut at {cuts[0]['max_wait']:.0f} s, {share}% "
                "in Redis)")

    rows = []
    if cap:
        rows.append(("capture alone, frames/s", rate(cap),
                     f"ndpiReader {rate(nd)}; nfstream {rate(nf)}" if nd else "", "", ""))
        for tool, target in (("ndpiReader", TARGET_VS_PEERS["ndpiReader"]),
                             ("nfstream", TARGET_VS_PEERS["nfstream"])):
            peer = res[tool]
            if key != "S" and peer:
                # run i of capture against run i of the peer (next to it in time): the host's
                # drift between runs cancels out of each ratio
                ratios = [p["wall"] / c["wall"] for c, p in zip(cap, peer)]
                rows.append((f"capture / {tool} frames/s, run by run", fmt_range(ratios, "{:.2f}x"),
                             f"{len(ratios)} pair(s)", f">= {target:.1f}x",
                             "yes" if med(ratios)[0] >= target else "NO"))
        rows.append(("capture alone, CPU s", col(cap, "cpu", "{:.1f}"),
                     f"ndpiReader {col(nd, 'cpu', '{:.1f}')}; nfstream {col(nf, 'cpu', '{:.1f}')}"
                     + prefix_note(nf) if nd else "", "", ""))
    if alone:
        rows.append(("processor alone, records/s from group join", col(alone, "rate") + cut(alone),
                     f"capture alone {rate(cap)} frames/s" if cap else "", "", ""))
        rows.append(("processor alone, CPU s: processor / redis / broker",
                     " / ".join(col(alone, f, "{:.1f}") for f in ("proc_cpu", "redis_cpu",
                                                                    "broker_cpu")), "", "", ""))
    if e2e:
        rows.append(("e2e: capture exit -> all in Redis, s",
                     col(e2e, "after_exit", "{:.2f}") + cut(e2e),
                     f"capture alone took {col(cap, 'wall', '{:.2f}')} s" if cap else "",
                     "<= 2 s", met(e2e, "after_exit", TARGETS["after_exit"])))
        rows.append(("e2e: capture start -> all in Redis, s", col(e2e, "from_start", "{:.2f}"),
                     f"capture alone {col(cap, 'wall', '{:.2f}')} s" if cap else "", "", ""))
        rows.append(("e2e CPU s: capture / processor / broker / redis",
                     " / ".join(col(e2e, f, "{:.1f}") for f in ("cap_cpu", "proc_cpu",
                                                                  "broker_cpu", "redis_cpu")),
                     f"capture alone {col(cap, 'cpu', '{:.1f}')} / broker "
                     f"{col(cap, 'broker_cpu', '{:.1f}')}" if cap else "", "", ""))
        rows.append(("e2e CPU s, all four processes", col(e2e, "total_cpu", "{:.1f}"),
                     f"ndpiReader {col(nd, 'cpu', '{:.1f}')}; nfstream {col(nf, 'cpu', '{:.1f}')}"
                     + prefix_note(nf) if nd else "", "", ""))
        base = ""
        if alone and cap:
            base = "alone: " + fmt_range(
                [(a["proc_cpu"] + a["redis_cpu"]) / (c["cpu"] * max(1, a["done"]) / a["frames"])
                 for a, c in zip(alone, cap)], "{:.2f}")
        rows.append(("e2e (processor + redis) / capture CPU", col(e2e, "ratio", "{:.2f}"), base,
                     "<= 1.0", met(e2e, "ratio", TARGETS["ratio"])))
        rows.append(("e2e longest PING (every 50 ms), ms", col(e2e, "ping_ms"),
                     f"during capture alone {col(cap, 'ping_ms')} ms" if cap else "",
                     "<= 100 ms", met(e2e, "ping_ms", TARGETS["ping_ms"])))
        rows.append(("processor alone longest PING, ms", col(alone, "ping_ms"), "", "", ""))
        cuts = [x for x in e2e if x["cut"]]
        partial = " (partial)" if cuts else ""
        projected = ""
        if cuts:
            projected = "; cut runs x frames/records in Redis: " + fmt_range(
                [x["used_mb"] * x["frames"] / max(1, x["done"]) for x in cuts]) + " MB"
        met_mem = met_rss = ""
        full = n >= 1_000_000  # the targets are for the scan of a million flows
        if key == "S" and not full:
            met_mem = met_rss = "n/a, < 1M"
        elif key == "S":
            met_mem = met(e2e, "used_mb", TARGET_USED_MB_S)
            met_rss = met(e2e, "rss_mb", TARGET_RSS_MB_S)
            if cuts:  # what a complete run would reach: judged on the projection
                proj = med([x["used_mb"] * x["frames"] / max(1, x["done"]) for x in cuts])[0]
                met_mem = "NO" if met_mem == "NO" or proj > TARGET_USED_MB_S else "yes?"
                met_rss = "NO" if met_rss == "NO" else "n/a, cut"
        rows.append(("e2e Redis used_memory after, MB", col(e2e, "used_mb") + partial,
                     f"before {col(e2e, 'used0_mb', '{:.1f}')} MB{projected}",
                     "<= 1024 MB" if key == "S" else "", met_mem))
        rows.append(("e2e Redis DBSIZE after", col(e2e, "keys") + partial,
                     f"{flows:,} flows in the file", "", ""))
        rows.append(("e2e processor peak RSS, MB", col(e2e, "rss_mb"),
                     f"joined, idle {col(e2e, 'rss_idle_mb')} MB",
                     "<= 500 MB" if key == "S" else "", met_rss))
        rows.append(("processor alone peak RSS, MB", col(alone, "rss_mb"), "", "", ""))
    runs = [x for x in e2e + alone if not x["cut"]]
    if runs:
        rows.append(("exact: ts:global:pps = frames captured",
                     f"{sum(x['exact'] for x in runs)} of {len(runs)} complete runs", "", "all",
                     "yes" if all(x["exact"] for x in runs) else "NO"))
    elif e2e or alone:
        rows.append(("exact: ts:global:pps = frames captured", "no complete run", "", "all",
                     "n/a, cut"))
    return rows


def print_summary(files: dict, results: dict, variants: list[str], runs: int) -> None:
    for variant in variants:
        title = f" ({variant})" if len(variants) > 1 else ""
        print(f"\n== write path{title}: median of {runs} run(s) [min-max], each with the same "
              "run's baseline ==")
        rows = []
        for key, (_path, n, flows, _what) in files.items():
            rows += [(key,) + row for row in summary_rows(key, n, flows, results[key], variant)]
        widths = [max(len(str(r[i])) for r in rows + [("wl", "figure", "this code",
                                                        "baseline (same run)", "target", "met")])
                  for i in range(6)]
        head = ("wl", "figure", "this code", "baseline (same run)", "target", "met")
        print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        last = None
        for row in rows:
            cells = [row[0] if row[0] != last else ""] + list(row[1:])
            last = row[0]
            print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |")
        print("A run not complete after --max-wait (cut) counts as that long; its CPU ratio is "
              "scaled to the records in Redis (capture CPU x records/frames); used_memory, "
              "DBSIZE and RSS are what there was at the cut. Baselines: ndpiReader and nfstream "
              "on the same file; capture alone; PINGs while only capture runs (Redis idle); "
              "Redis after FLUSHALL; the processor joined, before its first record.")


# --------------------------------------------------------------------------------------------


def compile_modules(root: Path, packages: list[str]) -> None:
    """Byte-compile the services' modules, as their images do at build time: with
    PYTHONDONTWRITEBYTECODE set (the images set it too), every start would compile them again
    and the start-up of each run would count that."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], cwd=root, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 frames a workload")
    parser.add_argument("--frames", type=int, help="frames a workload (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of everything (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="default A,B,S")
    parser.add_argument("--no-peers", action="store_true", help="skip ndpiReader and nfstream")
    parser.add_argument("--peer-runs", type=int, help="runs of ndpiReader and nfstream a workload "
                        "(default: every run for A and B, the first for S, where nfstream alone "
                        "takes about 1.5 minutes)")
    parser.add_argument("--max-wait", type=float, default=MAX_WAIT_S,
                        help="cut a processor run this many seconds after capture's exit (end "
                        "to end) or the group join (processor alone) when not every record is "
                        f"in Redis yet; it counts as that long (default {MAX_WAIT_S:.0f})")
    parser.add_argument("--max-wait-alone", type=float, default=MAX_WAIT_ALONE_S,
                        help="the same for the processor alone, from its group join (default "
                        f"{MAX_WAIT_ALONE_S:.0f})")
    parser.add_argument("--variants", default="after",
                        help="comma-separated processors: after (the working tree), before (git "
                        "HEAD's flow_processor), with settings after ':' (NAME=VALUE;...)")
    parser.add_argument("--before-rev", default="HEAD",
                        help="the git revision whose flow_processor 'before' runs (default HEAD)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    frames = args.frames or (100_000 if args.quick else 1_000_000)
    keys = [k.strip().upper() for k in args.workloads.split(",") if k.strip()]
    variants = args.variants.split(",")
    if not args.no_peers:
        ensure_tools()
    started = time.perf_counter()
    compile_modules(ROOT, ["capture", "flow_processor", "packet_records"])
    with tempfile.TemporaryDirectory(prefix="dpi-writepath-") as tmp:
        work = Path(tmp)
        variant_env: dict[str, tuple[str, dict]] = {}
        for variant in variants:
            base, _, settings = variant.partition(":")
            extra = dict(item.split("=", 1) for item in settings.split(";") if item)
            if base == "before":
                before = work / "before"
                if not before.exists():
                    before.mkdir()
                    archive = subprocess.run(["git", "archive", args.before_rev, "flow_processor"],
                                             cwd=ROOT, check=True, capture_output=True).stdout
                    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
                    compile_modules(before, ["flow_processor"])
                variant_env[variant] = (f"{before}{os.pathsep}{ROOT}", extra)
            elif base == "after":
                variant_env[variant] = (str(ROOT), extra)
            else:
                parser.error(f"unknown variant {variant!r}")
        files = {}
        for key in keys:
            t0 = time.perf_counter()
            path = work / f"{key}.pcap"
            n, flows, what = write_workload(key, path, frames)
            files[key] = (path, n, flows, what)
            print(f"{key}: {what}; {path.stat().st_size / 1e6:,.0f} MB, written in "
                  f"{time.perf_counter() - t0:.1f} s")
        print(f"{os.cpu_count()} CPUs, {args.runs} run(s), processor variants {variants}")
        bench = Bench(work, variant_env)
        results: dict = {}
        units = ["alone", "e2e"] + ([] if args.no_peers else ["peers"])
        try:
            for key, (path, n, _flows, _what) in files.items():
                res = results[key] = {"capture": [], "ndpiReader": [], "nfstream": []}
                for variant in variants:
                    res["alone", variant], res["e2e", variant] = [], []
                for run in range(args.runs):
                    order = units[run % len(units):] + units[:run % len(units)]
                    peer_runs = args.peer_runs or (1 if key == "S" else args.runs)
                    if run >= peer_runs and "peers" in order:
                        order.remove("peers")
                    for unit in order:
                        if unit == "peers":
                            for tool in PEERS:
                                tool_path, tool_frames = path, n
                                if key == "S" and tool == "nfstream":
                                    tool_path = work / "S-prefix.pcap"
                                    tool_frames = pcap_prefix(path, S_NFSTREAM_FRAMES, tool_path)
                                x = dict(run_tool(tool, tool_path), frames=tool_frames)
                                res[tool].append(x)
                                print(f"  {key} run {run + 1} {tool:<10} wall {x['wall']:.2f} s "
                                      f"CPU {x['cpu']:.2f} s")
                        elif unit == "alone":
                            cap = bench.capture_alone(path)
                            res["capture"].append(cap)
                            print(f"  {key} run {run + 1} capture alone: {cap['frames']:,} "
                                  f"frames, wall {cap['wall']:.2f} s, CPU {cap['cpu']:.1f} s, "
                                  f"broker {cap['broker_cpu']:.1f} s, PING max "
                                  f"{cap['ping_ms']:.0f} ms")
                            if cap["frames"] != n or cap["produced"] != n:
                                print(f"    WARNING: {n:,} frames in the file, capture read "
                                      f"{cap['frames']:,} and produced {cap['produced']:,}")
                            for variant in variants:
                                x = bench.processor_alone(variant, cap["topic"], cap["frames"],
                                                          args.max_wait_alone)
                                res["alone", variant].append(x)
                                print(f"  {key} run {run + 1} processor alone ({variant}): "
                                      f"{x['from_join']:.2f} s from join "
                                      f"({x['rate']:,.0f} records/s), {x['from_start']:.2f} s "
                                      f"from start; CPU processor {x['proc_cpu']:.1f} redis "
                                      f"{x['redis_cpu']:.1f} broker {x['broker_cpu']:.1f} s; "
                                      f"PING max {x['ping_ms']:.0f} ms; RSS {x['rss_mb']:.0f} "
                                      f"MB; {x['used_mb']:.0f} MB, {x['keys']:,} keys"
                                      + cut_note(x))
                            bench.delete_topic(cap["topic"])
                        else:
                            for variant in variants:
                                x = bench.end_to_end(variant, path, args.max_wait)
                                res["e2e", variant].append(x)
                                print(f"  {key} run {run + 1} end to end ({variant}): exit->all "
                                      f"{x['after_exit']:.2f} s, start->all "
                                      f"{x['from_start']:.2f} s; CPU capture "
                                      f"{x['cap_cpu']:.1f} processor {x['proc_cpu']:.1f} broker "
                                      f"{x['broker_cpu']:.1f} redis {x['redis_cpu']:.1f} s, "
                                      f"ratio {x['ratio']:.2f}; PING max {x['ping_ms']:.0f} ms "
                                      f"({x['pings_over_100ms']} > 100 ms), LATENCY max "
                                      f"{x['latency_ms']} ms ({x['latency_event']}); "
                                      f"RSS {x['rss_mb']:.0f} MB; "
                                      f"{x['used_mb']:.0f} MB, {x['keys']:,} keys"
                                      + cut_note(x))
                print(f"  {key} done at {time.perf_counter() - started:.0f} s")
        finally:
            bench.close()
    print_summary(files, results, variants, args.runs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
