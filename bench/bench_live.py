"""Live capture on a loopback flood: the project's capture against tcpdump, on identical sends.

    .venv/bin/python bench/bench_live.py            # 5 rates x 3 rounds, about 4-5 minutes
    .venv/bin/python bench/bench_live.py --quick    # 3 rates x 3 rounds, about 1.5 minutes

Needs root (raw sockets), tcpreplay and tcpdump (Debian: apt-get install tcpreplay tcpdump).
tcpreplay, pinned to CPU 0, sends a capture of 1000 UDP datagrams (64 payload bytes, 106-byte
frames, 1000 flows) over and over on `lo` at each rate (--pps, and --topspeed for the sender's
maximum). On lo the sender's CPU also does the kernel's receiving, capturers' copies included,
so one sender tops out near 200k-300k pps here; "max x2" adds a second tcpreplay on CPU 1 at the
lowest priority (nice 19: it sends in the time the capturer leaves), both --topspeed for the
same number of seconds. One capturer runs at a time, pinned to CPU 1, with a filter on the
flood's port; the capturers take turns on every rate (their order rotates between rounds):

  tcpdump       tcpdump -i lo -w /dev/null -B <ring KiB> 'udp and dst port P'
  ring          capture.live.LiveSource (the TPACKET_V3 ring) alone, counting frames
  recvmsg (old) (with --recvmsg) the recvmsg source of BASELINE_REV (git show), alone,
                counting frames: the source the ring replaced
  ring + pump   LiveSource into capture.__main__.pump with RecordBatcher and a producer that
                drops the messages: the CPU path of `python -m capture` except Kafka
  python -m capture  (with --e2e) the service itself into a local broker (Tansu, started here),
                its CPU from /proc/PID/stat (all its threads, librdkafka's included)

Figures: captured/sent (sent = tcpreplay's successful packets); CPU seconds per million frames
captured (the capturer's user+system time from times(2), the figures of /proc/self/stat, from
when it is ready until the flood is drained; tcpdump's from wait4 over its whole life); the
median of the rounds with the range; and vs tcpdump, the project's median captured/sent over
tcpdump's (the fixed rates send identical counts; "max x2" sends for equally long, and counts
differ). Every frame lo delivers is seen by both (the kernel drops lo's outgoing copies by
our filter, libpcap in user space). Frames lost before any capturer sees them (the receive
backlog, net.core.netdev_max_backlog) are printed as backlog drops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "4d0d8e4"  # the last revision with the recvmsg source
PAYLOAD = 64
SENDER_CPU, CAPTURE_CPU = "0", "1"
RING_MB = 64  # SOCKET_BUFFER_MB's default; tcpdump gets the same buffer (-B)
METHODS = ("tcpdump", "ring", "recvmsg (old)", "ring + pump")
E2E = "python -m capture"
# the flood's fastest rate: two tcpreplays, one on each CPU (one alone stops at 200k-270k pps
# here: on lo the sender's own CPU also does the receiving, the capturers' copies included)
TWO_SENDERS = "max x2"
MAX_RATE = 250_000  # about one sender's maximum: frames at the maximum / this = seconds sent


# ---------------------------------------------------------------------------------- the child
def child(mode: str, port: int, ring_mb: int, old_path: str | None) -> None:
    """One capturer: prints 'ready', captures until SIGTERM and the next idle moment, prints its
    figures as JSON."""
    sys.path.insert(0, str(REPO))
    if mode == "recvmsg (old)":
        import importlib.util

        spec = importlib.util.spec_from_file_location("live_recvmsg", old_path)
        live = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(live)  # type: ignore[union-attr]
    else:
        import capture.live as live
    source = live.LiveSource("lo", f"udp and dst port {port}", ring_mb)
    source.read_drops()
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    def until_drained():
        """The source's items until it is idle after SIGTERM (Stop in capture.__main__ would
        end pump() before the ring is drained): blocks of frames (LiveSource.batches()), or
        frames one by one from the recvmsg source."""
        items = source.frames() if mode == "recvmsg (old)" else source.batches()
        for item in items:
            if item is None and stop:
                return
            yield item

    frames = 0
    if mode == "ring + pump":
        from capture.__main__ import pump
        from capture.batching import RecordBatcher
        from capture.counters import CaptureCounters
        from capture.settings import CaptureSettings

        class NullProducer:
            def send(self, partition, message, records):
                return True

            def poll(self):
                pass

            def send_stats(self, message):
                pass

        settings = CaptureSettings(stats_interval_s=3600)
        counters = CaptureCounters()
        batcher = RecordBatcher(12, settings.records_per_message, settings.inspect_payloads)
        cpu0 = _cpu()
        print("ready", flush=True)
        pump(until_drained(), batcher, NullProducer(), counters, settings, source)
        frames = counters.frames
    else:
        cpu0 = _cpu()
        print("ready", flush=True)
        for item in until_drained():
            if item is not None:
                frames += 1 if mode == "recvmsg (old)" else len(item.ts_ns)
        source.read_drops()
    cpu = _cpu() - cpu0
    print(json.dumps({"captured": frames, "kernel_drops": source.kernel_drops, "cpu": cpu}),
          flush=True)
    source.close()


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------- the parent
def write_pcap(path: Path, port: int) -> None:
    def checksum(data: bytes) -> int:
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF

    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i in range(1000):
        udp = struct.pack("!HHHH", 20000 + i, port, 8 + PAYLOAD, 0) + bytes(PAYLOAD)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                         b"\x7f\0\0\1", b"\x7f\0\0\1")
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        frame = bytes(12) + b"\x08\x00" + ip + udp
        out.append(struct.pack("<IIII", 0, i, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def backlog_drops() -> int:
    with open("/proc/net/softnet_stat") as fh:
        return sum(int(line.split()[1], 16) for line in fh)


def send(pcap: Path, rate: int | str | None, count: int) -> tuple[int, float]:
    """tcpreplay `count` frames at `rate` pps (None: as fast as it can): the frames it sent and
    its rate. TWO_SENDERS: two tcpreplays as fast as they can for `count` / MAX_RATE seconds,
    one on each CPU: all the frames they sent and the sum of their rates."""
    if rate == TWO_SENDERS:
        seconds = max(1, round(count / MAX_RATE))
        # the second sender shares the capturer's CPU at the lowest priority: it sends in the
        # time the capturer leaves, so the flood's own sender never starves the capturer
        senders = [(["taskset", "-c", SENDER_CPU], ["--topspeed", f"--duration={seconds}"]),
                   (["nice", "-n", "19", "taskset", "-c", CAPTURE_CPU],
                    ["--topspeed", f"--duration={seconds}"])]
    else:
        speed = "--topspeed" if rate is None else f"--pps={rate}"
        senders = [(["taskset", "-c", SENDER_CPU], [speed, f"--limit={count}"])]
    procs = [subprocess.Popen([*prefix, "tcpreplay", "-q", "-i", "lo", "-K", *how, "--loop=0",
                               str(pcap)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for prefix, how in senders]
    sent, pps = 0, 0.0
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"tcpreplay failed: {err.strip()}")
        sent += int(re.search(r"Successful packets:\s+(\d+)", out).group(1))
        pps += float(re.search(r"([\d.]+) pps", out).group(1))
    return sent, pps


def wait_line(proc: subprocess.Popen, stream, needle: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    buf = ""
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"capturer did not start: {buf!r}")
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 4096).decode(errors="replace")
            if not chunk:
                raise RuntimeError(f"capturer did not start: {buf!r}")
            buf += chunk


def run_tcpdump(pcap: Path, port: int, rate: int | None, count: int) -> dict:
    proc = subprocess.Popen(["taskset", "-c", CAPTURE_CPU, "tcpdump", "-i", "lo", "-n",
                             "-B", str(RING_MB * 1024), "-w", "/dev/null",
                             f"udp and dst port {port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_line(proc, proc.stderr, "listening on")
    before = backlog_drops()
    sent, pps = send(pcap, rate, count)
    time.sleep(1.2)  # libpcap hands over a partly filled block after its 1 s timeout
    backlog = backlog_drops() - before
    proc.send_signal(signal.SIGINT)
    _pid, _status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = 0
    captured = int(re.search(r"(\d+) packets? captured", err).group(1))
    drops = int(re.search(r"(\d+) packets? dropped by kernel", err).group(1))
    return {"sent": sent, "captured": captured, "kernel_drops": drops,
            "cpu": usage.ru_utime + usage.ru_stime, "backlog": backlog, "pps": pps}


def run_project(mode: str, pcap: Path, port: int, rate: int | None, count: int,
                old_path: str | None) -> dict:
    cmd = ["taskset", "-c", CAPTURE_CPU, sys.executable, __file__, "--child", mode,
           "--port", str(port), "--ring-mb", str(RING_MB)]
    if old_path:
        cmd += ["--old-path", old_path]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    wait_line(proc, proc.stdout, "ready")
    before = backlog_drops()
    sent, pps = send(pcap, rate, count)
    time.sleep(0.3)
    backlog = backlog_drops() - before
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    result = json.loads(out.decode().strip().splitlines()[-1])
    return dict(result, sent=sent, backlog=backlog, pps=pps)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_e2e(pcap: Path, port: int, rate: int | None, count: int, kafka: str, tmp: Path) -> dict:
    """`python -m capture` on lo into the broker; CPU from when it logs that it captures until
    it is idle after the flood (then SIGTERM)."""
    log_path = tmp / "capture.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), IFACE="lo", BPF_FILTER=f"udp and dst port {port}",
               KAFKA_BOOTSTRAP_SERVERS=kafka, KAFKA_TOPIC=f"bench.live.{time.time_ns()}",
               SOCKET_BUFFER_MB=str(RING_MB), STATS_INTERVAL_S="3600", LOG_LEVEL="INFO")
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(["taskset", "-c", CAPTURE_CPU, sys.executable, "-m", "capture"],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.monotonic() + 60
    while "capturing from" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"capture did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    cpu0 = proc_cpu(proc.pid)
    before = backlog_drops()
    sent, pps = send(pcap, rate, count)
    last = proc_cpu(proc.pid)
    for _ in range(50):  # until it uses under 10% of a CPU: the flood is decoded and produced
        time.sleep(0.2)
        now = proc_cpu(proc.pid)
        if now - last < 0.02:
            break
        last = now
    cpu = proc_cpu(proc.pid) - cpu0
    backlog = backlog_drops() - before
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    final = log_path.read_text().strip().splitlines()[-1]
    counters = dict(re.findall(r"(\w+)=(\d+)", final))
    return {"sent": sent, "captured": int(counters["frames"]),
            "kernel_drops": int(counters["kernel_drops"]), "cpu": cpu, "backlog": backlog,
            "pps": pps, "produced": int(counters.get("records_produced", 0))}


def old_source(tmp: Path, rev: str) -> str | None:
    try:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:capture/live.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"(no recvmsg baseline: git show {rev}:capture/live.py failed: {exc})")
        return None
    if "recvmsg" not in text:
        print(f"(no recvmsg baseline: {rev}:capture/live.py does not use recvmsg)")
        return None
    path = tmp / "live_recvmsg.py"
    path.write_text(text)
    return str(path)


def fmt_range(values: list[float], spec: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, spec)
    return f"{format(med, spec)} [{format(min(values), spec)}-{format(max(values), spec)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rates, shorter sends")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e", action="store_true",
                        help="also `python -m capture` into a local broker (Tansu)")
    parser.add_argument("--recvmsg", action="store_true",
                        help="also the recvmsg source the ring replaced (about 30 s more)")
    parser.add_argument("--baseline", default=BASELINE_REV,
                        help="git revision whose capture/live.py is the recvmsg baseline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ring-mb", type=int, default=RING_MB, help=argparse.SUPPRESS)
    parser.add_argument("--old-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.port, args.ring_mb, args.old_path)
        return
    if os.geteuid() != 0:
        sys.exit("bench_live: needs root (raw capture sockets)")
    missing = [tool for tool in ("tcpreplay", "tcpdump", "taskset") if not shutil.which(tool)]
    if missing:
        sys.exit(f"bench_live: needs {', '.join(missing)} (apt-get install tcpreplay tcpdump)")
    rates: list[int | str | None] = ([100_000, None, TWO_SENDERS] if args.quick
                                     else [50_000, 100_000, 200_000, None, TWO_SENDERS])
    seconds = 0.8 if args.quick else 1.5
    max_count = 250_000 if args.quick else 500_000

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no ICMP unreachables
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    results: dict[tuple, list[dict]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp, "flood.pcap")
        write_pcap(pcap, port)
        old_path = old_source(Path(tmp), args.baseline) if args.recvmsg else None
        methods = [m for m in METHODS if m != "recvmsg (old)" or old_path]
        kafka = None
        if args.e2e:
            sys.path.insert(0, str(REPO))
            from local_stack.services import start_kafka

            kafka = start_kafka(workdir=tmp)
            methods.append(E2E)
        for rnd in range(args.rounds):
            order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
            for rate in rates:
                count = int(rate * seconds) if isinstance(rate, int) else max_count
                for method in order:
                    if method == "tcpdump":
                        r = run_tcpdump(pcap, port, rate, count)
                    elif method == E2E:
                        r = run_e2e(pcap, port, rate, count, kafka.url, Path(tmp))
                    else:
                        r = run_project(method, pcap, port, rate, count, old_path)
                    results.setdefault((rate, method), []).append(r)
                    print(f"  round {rnd + 1} {rate or 'max'} {method}: sent {r['sent']} "
                          f"captured {r['captured']} drops {r['kernel_drops']} "
                          f"cpu {r['cpu']:.3f}s backlog {r['backlog']} at {r['pps']:.0f} pps",
                          file=sys.stderr)
        if kafka is not None:
            kafka.stop()
    listener.close()
    elapsed = time.monotonic() - started

    print(f"\nLive capture on lo: {args.rounds} rounds, {len(rates)} rates, "
          f"{seconds} s sends ({max_count} frames at the maximum), ring/buffer {RING_MB} MiB, "
          f"sender on CPU {SENDER_CPU}, capturer on CPU {CAPTURE_CPU}; {elapsed:.0f} s\n")
    head = (f"| {'rate (pps)':>10} | {'method':<17} | {'sent/s':>8} | {'captured/sent':<24} "
            f"| {'kernel drops':>12} | {'CPU-s per M frames':<22} | {'vs tcpdump':>10} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    verdicts = []
    for rate in rates:
        base = results.get((rate, "tcpdump"))
        base_share = statistics.median(r["captured"] / r["sent"] for r in base) if base else None
        for method in methods:
            rs = results[(rate, method)]
            shares = [r["captured"] / r["sent"] for r in rs]
            cpu = [r["cpu"] / max(r["captured"], 1) * 1e6 for r in rs]
            sent_rate = statistics.median(r["pps"] for r in rs)
            share = statistics.median(shares)
            ratio = f"{share / base_share:.3f}" if base_share else "-"
            drops = statistics.median(r["kernel_drops"] for r in rs)
            sent_txt = f"{sent_rate:8.0f}"
            print(f"| {rate or 'max':>10} | {method:<17} | {sent_txt:>8} | "
                  f"{fmt_range(shares, '.4f'):<24} | {drops:>12.0f} | "
                  f"{fmt_range(cpu, '.2f'):<22} | {ratio:>10} |")
            if method in ("ring", "ring + pump", E2E) and base_share:
                verdicts.append((rate, method, share / base_share, min(shares) / base_share))
    backlog = sum(r["backlog"] for rs in results.values() for r in rs)
    print(f"\nbacklog drops (frames lost before any capturer, all runs): {backlog}")
    tops = {rate: statistics.median(r["pps"] for m in methods for r in results[(rate, m)])
            for rate in rates if not isinstance(rate, int)}
    if tops:
        top = max(tops.values())
        print("sender's maximum (tcpreplay --topspeed, median of all runs): "
              + ", ".join(f"{'one sender' if rate is None else 'two senders'} {pps:.0f} pps"
                          for rate, pps in tops.items())
              + f" ({'at least' if top >= 300_000 else 'below'} the 300k pps of the target)")
    for rate, method, ratio, worst in verdicts:
        print(f"target {method}/tcpdump captured >= 0.99 at {rate or 'max'} pps: median "
              f"{ratio:.3f} (worst round {worst:.3f}) {'met' if ratio >= 0.99 else 'NOT met'}")
    for method in ("ring", "ring + pump", E2E):
        rs = results.get((100_000, method))
        if rs:
            cpu = statistics.median(r["cpu"] / max(r["captured"], 1) * 1e6 for r in rs)
            print(f"target CPU-s per M frames at 100k pps <= 3, {method}: {cpu:.2f} "
                  f"{'met' if cpu <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
