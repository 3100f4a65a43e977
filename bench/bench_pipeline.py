"""Pipeline benchmark: `python bench/bench_pipeline.py [--packets N | --quick] [--no-e2e]`.

Writes one synthetic capture (tests/synthetic.py) and measures, in the same run:

1. the capture file path in this process, without Kafka: read only, read + decode, the full
   capture CPU path (capture.__main__.pump with a producer that discards), and Scapy's full
   dissection of the first packets of the same file;
2. the record encoding: the packed packet_records batch against orjson list-of-lists;
3. end to end through a real broker (Tansu) and Redis Stack started here as subprocesses:
   `python -m capture --pcap FILE`, then `python -m flow_processor --exit-when-idle 1`;
4. a summary table.

It prints figures and ratios; it asserts nothing (this machine is shared and noisy: compare the
ratios of one run, not absolute figures across runs). See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import redis  # noqa: E402

from capture.__main__ import pump  # noqa: E402
from capture.batching import RecordBatcher  # noqa: E402
from capture.counters import CaptureCounters  # noqa: E402
from capture.decode import decode_frame  # noqa: E402
from capture.inspect.tls import clear_fingerprint_cache  # noqa: E402
from capture.pcapfile import read_chunks, read_frames  # noqa: E402
from capture.settings import CaptureSettings  # noqa: E402
from flow_processor.aggregate import NS, PartitionState  # noqa: E402
from flow_processor.flows import FlowTable  # noqa: E402
from flow_processor.settings import ProcessorSettings  # noqa: E402
from local_stack.services import start_kafka, start_redis  # noqa: E402
from packet_records import RECORD, decode_batch, encode_batch  # noqa: E402
from tests.synthetic import write_synthetic_pcap  # noqa: E402

PARTITIONS = 12  # kafka/topics.json
BATCH = 1000  # records per message (CaptureSettings.records_per_message default)
ENCODING_RECORDS = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAIRED_RUNS = 3  # paired runs of (c) and (c2): the median is reported
PAIRED_SLICE = 2000  # frames per turn in a paired run
INSPECTION_ROUNDS = 40  # alternating on/off samples per row of section 1b
summary: list[tuple[str, str, str]] = []  # (what, figure, note)


def rate(n: float, seconds: float) -> float:
    if n == 0:
        return 0.0
    return n / seconds if seconds > 0 else float("inf")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(value: float) -> str:
    return f"{value:,.0f}"


def note(what: str, figure: str, extra: str = "") -> None:
    summary.append((what, figure, extra))


class Timer:
    """Wall and CPU (this process) time of a block."""

    def __enter__(self) -> Timer:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


# --------------------------------------------------------------------------------------------
# 1. Capture file path, in process


class NullProducer:
    """Stands in for capture.producer.RecordProducer: takes the messages and drops them."""

    def __init__(self) -> None:
        self.messages = self.records = self.bytes = 0
        self.kept: list[tuple[int, bytes]] = []  # (partition, message), for the processor row

    def send(self, partition: int, message: bytes, records: int) -> bool:
        self.kept.append((partition, message))
        self.messages += 1
        self.records += records
        self.bytes += len(message)
        return True

    def poll(self) -> None:
        pass

    def send_stats(self, message: bytes) -> None:
        pass

    def send_replay_end(self, message: bytes, partitions: int) -> None:
        pass


def read_only(path: Path) -> int:
    """The file read as the service reads it (batches of frames, one a chunk)."""
    n = 0
    for batch in read_chunks(path):
        n += len(batch.ts_ns)
    return n


def read_decode(path: Path) -> int:
    n = 0
    for _ts, _wire, frame, linktype in read_frames(path):
        decode_frame(frame, linktype)
        n += 1
    return n


def full_capture_path(path: Path, inspect: bool | None = None,
                      frames=None) -> tuple[int, NullProducer]:
    """pump() as `python -m capture --pcap` runs it; inspect=False turns L7 inspection off.
    frames: the file's frames as read_chunks(path) (or read_frames) yields them (default:
    read here, in batches, as the service does)."""
    settings = CaptureSettings()
    producer = NullProducer()
    counters = CaptureCounters()
    if inspect is None:
        inspect = settings.inspect_payloads  # as capture.__main__.main() does
    clear_fingerprint_cache()  # every run starts as a fresh capture process does
    batcher = RecordBatcher(PARTITIONS, settings.records_per_message, inspect)
    pump(read_chunks(path) if frames is None else frames, batcher, producer, counters,
         settings)  # type: ignore[arg-type]
    return counters.frames, producer


class _Turns:
    """Frames of a file, handed out PAIRED_SLICE at a time: between slices the process gives
    the turn to its partner over `conn` and waits for it back. Only the time inside turns
    counts (wall and this process's CPU)."""

    def __init__(self, conn, path: Path) -> None:
        self.conn, self.path = conn, path
        self.wall = self.cpu = 0.0

    def _start(self) -> None:
        self.conn.recv()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def _stop(self) -> None:
        self.wall += time.perf_counter() - self.t0
        self.cpu += time.process_time() - self.c0

    def __iter__(self):
        self._start()
        since = 0  # frames handed out in this turn
        for batch in read_chunks(self.path):  # as the service reads the file
            yield batch
            since += len(batch.ts_ns)
            if since >= PAIRED_SLICE:
                since = 0
                self._stop()
                self.conn.send(None)  # the turn is over, not the file
                self._start()


def _paired_side(conn, path: Path, inspect: bool, cpu: int) -> None:
    """One process of paired_capture(): the capture path (pump) over the whole file."""
    os.sched_setaffinity(0, {cpu})
    gc.collect()
    turns = _Turns(conn, path)
    frames, producer = full_capture_path(path, inspect, turns)
    turns._stop()  # the last turn ends with pump's final flush
    conn.send((frames, producer.records, turns.wall, turns.cpu))


def paired_capture(path: Path, modes: tuple[bool, bool]) -> list[tuple[int, int, float, float]]:
    """The capture path (c) in two processes, inspection on or off as `modes` says, pinned to
    the same CPU and taking turns over the same file PAIRED_SLICE frames at a time (the first
    to go alternates). This VM's speed drifts by tens of percent within seconds and its two
    CPUs differ: runs made one after the other, even alternating, disagree by more than the
    inspection costs; turns of a few milliseconds on one CPU see the same machine.
    Returns (frames, records, wall s, CPU s) per process, in the order of `modes`."""
    ctx = multiprocessing.get_context("fork")
    cpu = min(os.sched_getaffinity(0))
    sides = []
    for inspect in modes:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_paired_side, args=(child, path, inspect, cpu))
        process.start()
        sides.append((process, parent))
    results: list = [None, None]
    order = [0, 1]
    while results[0] is None or results[1] is None:
        for i in order:
            if results[i] is None:
                sides[i][1].send(None)  # your turn
                answer = sides[i][1].recv()
                if answer is not None:
                    results[i] = answer
        order.reverse()
    for process, _conn in sides:
        process.join()
    return results


def inspection_cost(label: str, frames: list, passes: int = 1,
                    rounds: int | None = None) -> tuple:
    """Decode + batching of the same frames with L7 inspection on and off: `rounds` samples of
    each, alternating, the best of each kept (this machine's speed drifts by tens of percent
    from one second to the next; short alternating samples see both modes at the same speed).
    A sample is `passes` passes over `frames`, each with a fresh batcher and cold caches, so
    every flow is inspected from its first packet as if it were new."""
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds or INSPECTION_ROUNDS):
        for inspect in (True, False):
            gc.collect()
            start = time.perf_counter()
            for _pass in range(passes):
                clear_fingerprint_cache()  # each pass as new traffic, not a replay of the last
                batcher = RecordBatcher(PARTITIONS, BATCH, inspect)
                for ts, wire, frame, linktype in frames:
                    batcher.add(ts, wire, frame, decode_frame(frame, linktype))
                    if batcher.ready:
                        batcher.take()
                batcher.flush(final=True)
                batcher.take()
            best[inspect] = min(best[inspect], time.perf_counter() - start)
    total = len(frames) * passes
    on, off = total / best[True], total / best[False]
    print(f"{label:<52} {total:>9,} {fmt(on):>12} {fmt(off):>12} {on / off - 1:>+9.0%} "
          f"{off / on - 1:>+10.0%}")
    return on, off


def flows_of(frames: list) -> int:
    """Distinct 5-tuples (either direction) among the frames."""
    keys = set()
    for _ts, _wire, frame, linktype in frames:
        d = decode_frame(frame, linktype)
        keys.add((d[1],) + tuple(sorted(((d[2], d[4]), (d[3], d[5])))))
    return len(keys)


def section_inspection(path: Path, packets: int, flows: int, seconds: int) -> dict:
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one CPU for all samples: this VM's two differ
    try:
        return _section_inspection(path, packets, flows, seconds)
    finally:
        os.sched_setaffinity(0, cpus)


def _section_inspection(path: Path, packets: int, flows: int, seconds: int) -> dict:
    print(f"\n== 1b. L7 inspection cost: decode + batching, inspection on vs off (best of "
          f"{INSPECTION_ROUNDS} alternating samples, on one CPU) ==")
    print(f"{'frames':<52} {'count':>9} {'on frames/s':>12} {'off frames/s':>12} "
          f"{'frames/s':>9} {'time/frame':>10}")
    # Captures of `sample` packets (short samples, many rounds) made like the bench capture: the
    # same packets per flow with real first payloads, the same with payloads of zeros, and
    # long flows; then real traffic
    sample = min(packets, 50_000)
    sample_flows = max(10, flows * sample // packets)
    per_flow = sample / sample_flows
    out = {}
    for key, label, flow_count, real in (
            ("bench", f"as the bench capture ({per_flow:.0f} pkts/flow)", sample_flows, True),
            ("zeros", "the same, payloads of zeros (the cost of looking)", sample_flows, False),
            ("long", "real first payloads, 50 pkts/flow", sample // 50, True)):
        file = path.with_name(f"inspection-{key}.pcap")
        write_synthetic_pcap(file, sample, flows=flow_count, seconds=seconds, real_payloads=real)
        out[key] = inspection_cost(label, list(read_frames(file)))
        file.unlink()
    pcap_dir = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "ndpi" / "pcap"
    if pcap_dir.is_dir():  # real traffic: every flow of the 45 captures, 4 passes a sample
        real = [item for p in sorted(pcap_dir.iterdir()) for item in read_frames(p)]
        out["corpus"] = inspection_cost(
            f"45 corpus captures, handshakes only ({len(real) / flows_of(real):.1f} pkts/flow)",
            real, 4)
    return out


def processor_aggregation(messages: list[tuple[int, bytes]]) -> int:
    """The processor's CPU path before Redis: decode_batch + PartitionState.add_records."""
    settings = ProcessorSettings()
    states: dict[int, PartitionState] = {}
    for partition, message in messages:
        state = states.get(partition)
        if state is None:
            table = FlowTable(settings.flow_idle_timeout_s * NS,
                              settings.flow_active_timeout_s * NS, settings.max_flows)
            states[partition] = state = PartitionState(partition, None, table)
        state.add_records(decode_batch(message)[0])
    return sum(s.records for s in states.values())


def scapy_dissect(path: Path, limit: int) -> int:
    # scapy.all registers the link-layer dissectors: from scapy.utils alone, PcapReader would
    # hand back undissected Raw packets ("unknown LL type")
    from scapy.all import PcapReader

    n = 0
    with PcapReader(str(path)) as reader:
        for pkt in reader:
            pkt.layers()  # walks the fully dissected layer chain
            last = pkt.lastlayer()
            _ = last.name
            n += 1
            if n >= limit:
                break
    return n


def section_capture(path: Path, packets: int, scapy_limit: int) -> dict:
    print("\n== 1. Capture file path, in process, no Kafka ==")
    print(f"{'stage':<44} {'frames':>10} {'wall s':>7} {'frames/s':>11} {'per CPU-s':>11}")
    out = {}

    def row(key: str, label: str, fn) -> None:
        gc.collect()
        with Timer() as t:
            result = fn()
        n = result[0] if isinstance(result, tuple) else result
        out[key] = rate(n, t.wall)
        out[key + "_cpu"] = rate(n, t.cpu)
        out[key + "_result"] = result
        print(f"{label:<44} {n:>10,} {t.wall:>7.2f} {fmt(rate(n, t.wall)):>11} "
              f"{fmt(rate(n, t.cpu)):>11}", flush=True)

    row("a", "(a) read only (read_frames, chunks)", lambda: read_only(path))
    row("b", "(b) read + decode_frame", lambda: read_decode(path))
    # (c) and (c2): paired runs (see paired_capture), the median one reported; then the same
    # method with inspection on in both processes, which should show no difference
    runs = []
    for _ in range(PAIRED_RUNS):
        on, off = paired_capture(path, (True, False))
        runs.append((off[2] / on[2] - 1, on, off))
    runs.sort(key=lambda run: run[0])
    _added, on, off = runs[len(runs) // 2]
    same = paired_capture(path, (True, True))
    for key, label, (n, records, wall, cpu) in (
            ("c", "(c) read + decode + batches (pump, no Kafka)", on),
            ("c2", "(c2) as (c), L7 payload inspection off", off)):
        out[key], out[key + "_cpu"] = rate(n, wall), rate(n, cpu)
        print(f"{label:<44} {n:>10,} {wall:>7.2f} {fmt(rate(n, wall)):>11} "
              f"{fmt(rate(n, cpu)):>11}", flush=True)
        if records != n:
            print(f"    WARNING: {key} read {n:,} frames but produced {records:,} records")
    out["paired_runs"] = [1 - run[2][2] / run[1][2] for run in runs]
    out["paired_same"] = 1 - same[1][2] / same[0][2]
    # one plain run of (c) for the processor row and the message figures
    gc.collect()
    with Timer() as t:
        out["c_result"] = full_capture_path(path, True)
    out["c_alone"] = rate(out["c_result"][0], t.wall)
    import scapy.all  # noqa: F401  (loaded here so that its import time is not measured)

    row("d", f"(d) Scapy PcapReader full dissection ({scapy_limit:,})",
        lambda: scapy_dissect(path, scapy_limit))
    producer: NullProducer = out["c_result"][1]
    row("e", "(e) processor aggregation, no Kafka/Redis", lambda: processor_aggregation(
        producer.kept))
    producer.kept = []
    print(f"    (c) produced {producer.messages:,} messages, {producer.records:,} records, "
          f"{producer.records / max(1, producer.messages):,.0f} records/message, "
          f"{producer.bytes / max(1, producer.records):.1f} bytes/record before compression")
    frames_c = out["c_result"][0]
    if producer.records != frames_c:
        print(f"    WARNING: (c) read {frames_c:,} frames but produced {producer.records:,} "
              "records: the capture path loses or adds records")
    print(f"    decode costs {1 / out['b'] - 1 / out['a']:.2e} s/frame, batching "
          f"{1 / out['c_alone'] - 1 / out['b']:.2e} s/frame, reading {1 / out['a']:.2e} s/frame "
          "(batching from the plain run of (c))")
    print(f"    ratio (c)/(d), full capture path vs Scapy dissection: "
          f"{out['c_alone'] / out['d']:.1f}x (plain run of (c))")
    print(f"    (c) and (c2) ran paired: two processes on one CPU taking turns over the file, "
          f"{PAIRED_SLICE:,} frames at a time; the median of {PAIRED_RUNS} runs is shown. L7 "
          f"payload inspection costs {1 - out['c'] / out['c2']:.0%} of the frames per second "
          f"((c)/(c2) = {out['c'] / out['c2']:.0%}), {1 / out['c'] - 1 / out['c2']:.2e} s/frame "
          f"(time per frame {out['c2'] / out['c'] - 1:+.0%}); the {PAIRED_RUNS} runs: "
          + ", ".join(f"{cost:.0%}" for cost in out["paired_runs"])
          + f". The same pairing with inspection on in both processes: "
          f"{out['paired_same']:+.1%} (the method's own error). (c) run alone, not paired: "
          f"{fmt(out['c_alone'])} frames/s")
    print(f"    ratio (c)/(a), share of the read-only speed kept: {out['c_alone'] / out['a']:.0%}")
    note("(a) read only", f"{fmt(out['a'])} frames/s")
    note("(b) read + decode", f"{fmt(out['b'])} frames/s")
    note("(c) capture CPU path, no Kafka", f"{fmt(out['c_alone'])} frames/s",
         f"{out['c_alone'] / out['d']:.0f}x Scapy (plain run)")
    note("(c) / (c2) paired: inspection on / off", f"{fmt(out['c'])} / {fmt(out['c2'])}",
         f"inspection costs {1 - out['c'] / out['c2']:.0%} of frames/s")
    note("(d) Scapy full dissection", f"{fmt(out['d'])} frames/s", f"first {scapy_limit:,}")
    note("(e) processor aggregation, no Redis", f"{fmt(out['e'])} records/s")
    return out


# --------------------------------------------------------------------------------------------
# 2. Record encoding


def sample_records(path: Path, count: int) -> list[tuple]:
    """Record tuples in RECORD field order, from the capture's real decoded frames."""
    records = []
    for ts, wire, frame, linktype in read_frames(path):
        ipver, proto, src, dst, sport, dport, tcp_flags, flags = decode_frame(frame, linktype)[:8]
        # the last three small fields (application / L7 label bits) are 0 here, as for
        # unclassified traffic
        records.append((ts, wire, ipver, proto, tcp_flags, flags, sport, dport, src, dst, 0, 0,
                        0))
        if len(records) >= count:
            break
    return records


def packed_encode(batches: list[list[tuple]]) -> list[bytes]:
    pack = RECORD.pack
    return [encode_batch([pack(*r) for r in batch]) for batch in batches]


def packed_decode(messages: list[bytes]) -> int:
    n = 0
    for message in messages:
        records = decode_batch(message)[0]
        for (_ts, _wire, _ipver, _proto, _tcp, _flags, _sport, _dport, _src, _dst, _app, _res,
             _name) in records:
            n += 1
    return n


def json_encode(batches: list[list[tuple]]) -> list[bytes]:
    dumps = orjson.dumps
    return [dumps([[ts, wire, ipver, proto, tcp, flags, sport, dport, src.hex(), dst.hex(), app,
                    res, name]
                   for ts, wire, ipver, proto, tcp, flags, sport, dport, src, dst, app, res, name
                   in batch])
            for batch in batches]


def json_decode(messages: list[bytes]) -> int:
    n = 0
    loads = orjson.loads
    for message in messages:
        for (_ts, _wire, _ipver, _proto, _tcp, _flags, _sport, _dport, _src, _dst, _app, _res,
             _name) in loads(message):
            n += 1
    return n


def json_decode_bytes(messages: list[bytes]) -> int:
    """As json_decode, plus turning the hex addresses back into the bytes the flow table keys."""
    n = 0
    loads, fromhex = orjson.loads, bytes.fromhex
    for message in messages:
        for (_ts, _wire, _ipver, _proto, _tcp, _flags, _sport, _dport, src, dst, _app, _res,
             _name) in loads(message):
            fromhex(src)
            fromhex(dst)
            n += 1
    return n


def best_of(fn, arg, repeat: int = 5, gc_on: bool = True) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        if not gc_on:
            gc.disable()
        try:
            t0 = time.perf_counter()
            result = fn(arg)
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best, result


def section_encoding(path: Path, packets: int) -> dict:
    count = min(packets, ENCODING_RECORDS)
    records = sample_records(path, count)
    batches = [records[i:i + BATCH] for i in range(0, len(records), BATCH)]
    n = len(records)
    print(f"\n== 2. Record encoding: {n:,} records of the capture, batches of {BATCH} "
          "(best of 5) ==")
    print(f"{'format':<34} {'encode rec/s':>13} {'decode rec/s':>13} {'decode, gc off':>15} "
          f"{'bytes/rec':>10}")
    out = {}
    for key, label, enc, decs in (
        ("packed", f"packed struct ({RECORD.size} B records)", packed_encode, (packed_decode,)),
        ("json", "orjson list-of-lists (hex addrs)", json_encode, (json_decode,)),
        ("json_bytes", "  + hex -> bytes on decode", None, (json_decode_bytes,)),
    ):
        if enc is None:  # the same messages as the row above
            t_enc = float("nan")
        else:
            t_enc, messages = best_of(enc, batches)
        t_dec, got = best_of(decs[0], messages)
        t_dec_nogc, _ = best_of(decs[0], messages, gc_on=False)
        size = sum(len(m) for m in messages) / n
        if got != n:
            print(f"    warning: {label} decoded {got} records, expected {n}")
        out[key] = {"enc": rate(n, t_enc), "dec": rate(n, t_dec), "dec_nogc": rate(n, t_dec_nogc),
                    "size": size}
        enc_text = "(same)" if t_enc != t_enc else fmt(rate(n, t_enc))
        print(f"{label:<34} {enc_text:>13} {fmt(rate(n, t_dec)):>13} "
              f"{fmt(rate(n, t_dec_nogc)):>15} {size:>10.1f}", flush=True)
    p, j = out["packed"], out["json"]
    print(f"    packed/orjson: encode {p['enc'] / j['enc']:.2f}x, decode {p['dec'] / j['dec']:.2f}x"
          f" (gc off {p['dec_nogc'] / j['dec_nogc']:.2f}x), size {p['size'] / j['size']:.2f}x")
    print("    (decode with the gc on runs while this process holds the sample records, as the "
          "processor holds its flow table)")
    note("packed records encode / decode", f"{fmt(p['enc'])} / {fmt(p['dec'])} rec/s",
         f"{p['size']:.0f} B/rec")
    note("orjson records encode / decode", f"{fmt(j['enc'])} / {fmt(j['dec'])} rec/s",
         f"{j['size']:.0f} B/rec")
    return out


# --------------------------------------------------------------------------------------------
# 3. End to end


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


FIELD = re.compile(r"(\w+)=(\[[^\]]*\]|\S+)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(log: str, marker: str) -> float | None:
    """Epoch time of the first log line containing marker (logging's asctime, local time)."""
    for line in log.splitlines():
        if marker in line:
            m = LOG_TIME.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def log_fields(log: str, prefix: str) -> dict[str, str]:
    """key=value pairs of the last log line whose message starts with prefix."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        if f": {prefix} " in line:
            found = dict(FIELD.findall(line.split(f": {prefix} ", 1)[1]))
    return found


def section_e2e(path: Path, packets: int, workdir: Path) -> dict:
    print("\n== 3. End to end: real broker (Tansu) and Redis Stack, services as subprocesses ==")
    out: dict = {}
    kafka = start_kafka(workdir=workdir / "run")
    try:
        rds = start_redis(workdir=workdir / "run")
    except Exception:
        kafka.stop()
        raise
    try:
        tag = uuid.uuid4().hex[:10]
        redis_url = rds.url.rsplit("/", 1)[0] + "/0"
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka.url, KAFKA_TOPIC=f"bench.{tag}",
                   KAFKA_GROUP_ID=f"bench-{tag}", REDIS_URL=redis_url, LOG_LEVEL="INFO",
                   STATS_INTERVAL_S="3600", PYTHONPATH=str(ROOT))
        print(f"broker {kafka.url} (pid {kafka.pid}), redis {redis_url} (pid {rds.pid}), "
              f"topic bench.{tag}")

        # capture --pcap
        servers_cpu0 = cpu_seconds(kafka.pid), cpu_seconds(rds.pid)
        child0 = children_cpu()
        t0 = time.time()
        p0 = time.perf_counter()
        cap = subprocess.run([sys.executable, "-m", "capture", "--pcap", str(path)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - p0
        cap_cpu = children_cpu() - child0
        broker_cpu = cpu_seconds(kafka.pid) - servers_cpu0[0]
        final = log_fields(cap.stderr, "final")
        if cap.returncode != 0:
            print(f"capture exited {cap.returncode}:\n{cap.stderr[-3000:]}")
            return out
        started = log_time(cap.stderr, "capturing from")
        done = log_time(cap.stderr, ": final ")
        frames = int(final.get("frames", packets))
        produced = int(final.get("records_produced", -1))
        out["capture_wall"] = rate(frames, wall)
        print(f"python -m capture --pcap: {frames:,} frames, {produced:,} records acknowledged, "
              f"exit {cap.returncode}")
        if produced != frames:
            print(f"    WARNING: capture read {frames:,} frames but the broker acknowledged "
                  f"{produced:,} records")
        print(f"    wall {wall:.2f} s -> {fmt(rate(frames, wall))} frames/s into Kafka "
              "(process start to exit)")
        if started and done and done > started:
            out["capture_active"] = rate(frames, done - started)
            print(f"    {done - started:.2f} s from 'capturing from' to the final line (pump + "
                  f"delivery, no start-up) -> {fmt(out['capture_active'])} frames/s; start-up "
                  f"{started - t0:.2f} s")
        print(f"    CPU: capture {cap_cpu:.2f} s ({fmt(rate(frames, cap_cpu))} frames per CPU-s),"
              f" broker {broker_cpu:.2f} s")

        # flow_processor --exit-when-idle 1, polled from here
        r = redis.Redis.from_url(redis_url)
        servers_cpu0 = cpu_seconds(kafka.pid), cpu_seconds(rds.pid)
        child0 = children_cpu()
        proc_log = workdir / "flow_processor.log"
        samples: list[tuple[float, int]] = []
        with open(proc_log, "w+") as log:
            t0 = time.time()
            p0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "flow_processor", "--exit-when-idle",
                                     "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            last = 0
            while True:
                exited = proc.poll() is not None
                value = int(r.hget("pipeline:processor", "records") or 0)
                now = time.perf_counter() - p0
                if value != last:
                    samples.append((now, value))
                    last = value
                if exited:
                    break
                if now > 3600:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.05)
            wall = time.perf_counter() - p0
            proc_cpu = children_cpu() - child0
            broker_cpu = cpu_seconds(kafka.pid) - servers_cpu0[0]
            redis_cpu = cpu_seconds(rds.pid) - servers_cpu0[1]
            log.seek(0)
            plog = log.read()
        print(f"python -m flow_processor --exit-when-idle 1: exit {proc.returncode}, "
              f"{last:,} records in Redis (capture sent {frames:,})")
        if proc.returncode != 0:
            print(plog[-3000:])
        out["proc_wall"] = rate(last, wall)
        print(f"    wall {wall:.2f} s -> {fmt(out['proc_wall'])} records/s (with start-up, group "
              "join and the 1 s idle exit)")
        assigned = log_time(plog, "assigned partitions")
        if assigned:
            print(f"    consumer group joined {assigned - t0:.2f} s after start")
        if len(samples) >= 2:
            (t_first, v_first), (t_last, v_last) = samples[0], samples[-1]
            out["proc_active"] = rate(v_last - v_first, t_last - t_first)
            print(f"    first write at {t_first:.2f} s ({v_first:,} records), last at "
                  f"{t_last:.2f} s ({v_last:,}), {len(samples)} distinct values seen")
            print(f"    first -> last write: {fmt(out['proc_active'])} records/s into Redis "
                  f"(exit {wall - t_last:.2f} s after the last write)")
        elif samples:
            print(f"    one write seen at {samples[0][0]:.2f} s: everything landed in one flush; "
                  "no first-to-last rate (use more packets)")
        print(f"    CPU: processor {proc_cpu:.2f} s ({fmt(rate(last, proc_cpu))} records per "
              f"CPU-s), redis {redis_cpu:.2f} s, broker {broker_cpu:.2f} s")
        pfinal = log_fields(plog, "final")
        if pfinal:
            print("    processor totals: " + " ".join(f"{k}={v}" for k, v in pfinal.items()))

        # what is in Redis
        info = r.info("memory")
        keys = r.dbsize()
        try:
            pps = r.execute_command("TS.RANGE", "ts:global:pps", "-", "+")
        except redis.ResponseError:  # nothing was written
            pps = []
        seconds_n = len(pps)
        pps_sum = sum(int(float(v)) for _ts, v in pps)
        out["mem"] = info["used_memory_human"]
        out["keys"] = keys
        print(f"Redis after: used_memory_human={info['used_memory_human']} "
              f"(used_memory={info['used_memory']:,} B), {keys:,} keys, "
              f"{info['used_memory'] / max(1, keys):,.0f} B/key")
        print(f"    ts:global:pps sums to {pps_sum:,} frames over {seconds_n} seconds "
              f"({'matches' if pps_sum == frames else 'DIFFERS FROM'} the {frames:,} captured)")
        note("capture --pcap into Kafka (wall)", f"{fmt(out['capture_wall'])} frames/s")
        if "capture_active" in out:
            note("capture --pcap, without start-up", f"{fmt(out['capture_active'])} frames/s")
        note("flow_processor into Redis (wall)", f"{fmt(out['proc_wall'])} records/s")
        if "proc_active" in out:
            note("flow_processor, first->last write", f"{fmt(out['proc_active'])} records/s")
        note("Redis after", f"{out['mem']}", f"{keys:,} keys")
        return out
    finally:
        rds.stop()
        kafka.stop()


# --------------------------------------------------------------------------------------------


def main() -> None:
    global PAIRED_RUNS, INSPECTION_ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000, help="packets in the capture")
    parser.add_argument("--quick", action="store_true", help="100,000 packets")
    parser.add_argument("--flows", type=int, help="flows in the capture (default 65 per 1000 "
                        "packets, 65,000 for a million)")
    parser.add_argument("--seconds", type=int, default=20, help="capture time span")
    parser.add_argument("--scapy-packets", type=int, default=20_000,
                        help="packets Scapy dissects in (d)")
    parser.add_argument("--no-e2e", action="store_true", help="skip section 3 (broker, Redis)")
    parser.add_argument("--paired-runs", type=int, default=PAIRED_RUNS,
                        help="paired runs of (c) and (c2), the median shown (default "
                        f"{PAIRED_RUNS})")
    parser.add_argument("--inspection-rounds", type=int, default=INSPECTION_ROUNDS,
                        help="alternating on/off samples per row of section 1b (default "
                        f"{INSPECTION_ROUNDS})")
    args = parser.parse_args()
    PAIRED_RUNS, INSPECTION_ROUNDS = max(1, args.paired_runs), max(1, args.inspection_rounds)
    packets = 100_000 if args.quick else args.packets
    flows = args.flows or max(10, packets * 65 // 1000)
    scapy_limit = min(args.scapy_packets, packets)

    with tempfile.TemporaryDirectory(prefix="dpi-bench-") as tmp:
        work = Path(tmp)
        path = work / "synthetic.pcap"
        with Timer() as t:
            write_synthetic_pcap(path, packets, flows=flows, seconds=args.seconds,
                                 real_payloads=True)
        size = path.stat().st_size
        print(f"synthetic capture: {packets:,} packets, {flows:,} flows (the first packet of "
              "each DNS, HTTP, TLS and QUIC flow carries a real query or hello), "
              f"{args.seconds} s, "
              f"{size / 1e6:,.1f} MB ({size / packets:.0f} B/packet), written in {t.wall:.1f} s;"
              f" Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        cap = section_capture(path, packets, scapy_limit)
        section_inspection(path, packets, flows, args.seconds)
        section_encoding(path, packets)
        e2e = {} if args.no_e2e else section_e2e(path, packets, work)

    c_alone = cap["c_alone"]  # the plain run of (c): throughput, not the inspection pairing
    ratios = [("(c) capture CPU path / (d) Scapy dissection", c_alone / cap["d"])]
    if "capture_wall" in e2e:
        ratios.append(("capture into Kafka (wall) / (c) no Kafka", e2e["capture_wall"] / c_alone))
    if "capture_active" in e2e:
        ratios.append(("capture into Kafka (no start-up) / (c)", e2e["capture_active"] / c_alone))
    if "proc_active" in e2e:
        ratios.append(("processor first->last write / (c)", e2e["proc_active"] / c_alone))
        ratios.append(("processor first->last write / (e) no Redis",
                       ratio(e2e["proc_active"], cap["e"])))
    print("\n== 4. Summary (one run; compare ratios) ==")
    width = max(len(w) for w in [w for w, _, _ in summary] + [w for w, _ in ratios])
    for what, figure, extra in summary:
        print(f"{what:<{width}}  {figure:>30}  {extra}".rstrip())
    print("ratios")
    for what, value in ratios:
        print(f"{what:<{width}}  {value:>29.2f}x")


if __name__ == "__main__":
    main()
