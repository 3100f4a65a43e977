"""The processor's aggregation CPU path, before and after column-wise add_records.

Messages are made once per workload, as `python -m capture --pcap` makes them (the capture
path of bench_pipeline section 1, no Kafka), then fed through decode_batch + add_records into
one PartitionState per partition, as bench_pipeline's row (e) does:

  before  decode_batch, then the per-record loop of flow_processor/aggregate.py at the
          baseline revision (--baseline, loaded from git: the code as it was)
  after   decode_batch, then PartitionState.add_records of this tree
  decode  decode_batch alone (the validation both share)

Each workload runs twice: as row (e) does (one state per partition for the whole capture, never
flushed), and with the states written whenever they hold FLUSH_MAX_FLOWS dirty flows (as the
processor flushes at the latest; plan_series + written, no Redis). Rounds alternate
before/after/decode in one process (the machine is shared and noisy: compare
the medians, look at the ranges). Workloads: A, the bench capture (bench_pipeline's synthetic
file: short flows, about 15 packets each); B, heavy-tailed flows (bench/workloads.py).

    .venv/bin/python bench/bench_aggregate.py [--packets N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_pipeline import full_capture_path  # noqa: E402
from workloads import write_pareto_pcap  # noqa: E402

from flow_processor.aggregate import NS, PartitionState  # noqa: E402
from flow_processor.flows import FlowTable  # noqa: E402
from flow_processor.settings import ProcessorSettings  # noqa: E402
from packet_records import decode_batch  # noqa: E402
from tests.synthetic import write_synthetic_pcap  # noqa: E402

BASELINE = "cce0c78"  # the last revision with the per-record loop


def baseline_state_class(rev: str) -> type:
    """PartitionState of flow_processor/aggregate.py at git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:flow_processor/aggregate.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("aggregate_baseline")
    exec(compile(source, f"{rev}:flow_processor/aggregate.py", "exec"), module.__dict__)
    return module.PartitionState


def aggregate(messages: list[tuple[int, bytes]], state_class: type | None,
              flushes: bool = False) -> int:
    """decode_batch + add_records over every message, one state per partition (row (e) of
    bench_pipeline, with the meta entries passed as the consumer passes them); state_class
    None: decode_batch only. flushes: a partition's state is written (as after a flush that
    landed: plan_series + written + table.expire, no Redis) whenever it holds FLUSH_MAX_FLOWS
    dirty flows, as the processor does at the latest; row (e) never flushes, so its state
    grows over the whole capture."""
    settings = ProcessorSettings()
    states: dict = {}
    n = done = 0
    for partition, message in messages:
        records, meta = decode_batch(message)
        if state_class is None:
            n += len(records)
            continue
        state = states.get(partition)
        if state is None:
            table = FlowTable(settings.flow_idle_timeout_s * NS,
                              settings.flow_active_timeout_s * NS, settings.max_flows)
            states[partition] = state = state_class(partition, None, table)
        state.add_records(iter(records) if state_class is not PartitionState else records, meta)
        if flushes and len(state.dirty_flows) >= settings.flush_max_flows:
            done += state.records
            state.plan_series("all", 0, [], 0, 0)
            state.written()
            state.table.expire(state.clock_ns)
    return n or done + sum(s.records for s in states.values())


def distinct_per_message(messages: list[tuple[int, bytes]]) -> tuple[float, float]:
    """Distinct flows and (flow, second) cells per record with a 5-tuple, within a message:
    what the column-wise add_records still does in Python."""
    flows = cells = records = 0
    for _partition, message in messages:
        keys, seconds = set(), set()
        for ts, _w, ipver, proto, _t, _f, sport, dport, src, dst, *_rest in decode_batch(
                message)[0]:
            if ipver:
                key = ((ipver, proto, src, sport, dst, dport) if (src, sport) <= (dst, dport)
                       else (ipver, proto, dst, dport, src, sport))
                keys.add(key)
                seconds.add((key, ts // NS))
                records += 1
        flows += len(keys)
        cells += len(seconds)
    return flows / max(1, records), cells / max(1, records)


def measure(label: str, messages: list[tuple[int, bytes]], records: int, rounds: int,
            baseline: type, flushes: bool) -> dict:
    modes = {"before": baseline, "after": PartitionState, "decode only": None}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, state_class in modes.items():
            gc.collect()
            start = time.process_time()
            n = aggregate(messages, state_class, flushes)
            cpu[mode].append(time.process_time() - start)
            assert n == records, (mode, n, records)
    print(f"\n{label}, {'flushes every FLUSH_MAX_FLOWS' if flushes else 'no flushes (row (e))'}"
          f": {records:,} records in {len(messages):,} messages, {rounds} rounds alternating; "
          "CPU time of this process")
    print(f"  {'path':<14} {'median s':>9} {'range s':>15} {'us/record':>10} {'records/CPU-s':>14}")
    out = {}
    for mode, values in cpu.items():
        med = statistics.median(values)
        out[mode] = med
        print(f"  {mode:<14} {med:>9.3f} {min(values):>7.3f}-{max(values):<7.3f} "
              f"{med / records * 1e6:>10.2f} {records / med:>14,.0f}")
    ratios = sorted(b / a for b, a in zip(cpu["before"], cpu["after"]))
    print(f"  before/after per round: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}); without decode_batch: "
          f"{(out['before'] - out['decode only']) / (out['after'] - out['decode only']):.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the 'before' code")
    parser.add_argument("--workload", choices=("A", "B", "both"), default="both")
    args = parser.parse_args()
    baseline = baseline_state_class(args.baseline)
    with tempfile.TemporaryDirectory(prefix="dpi-bench-agg-") as tmp:
        files = []
        if args.workload in ("A", "both"):
            flows = max(10, args.packets * 65 // 1000)
            path = write_synthetic_pcap(Path(tmp) / "a.pcap", args.packets, flows=flows,
                                        seconds=20, real_payloads=True)
            files.append((f"A: bench capture, {flows:,} flows", path))
        if args.workload in ("B", "both"):
            flows = max(10, args.packets // 50)
            path = Path(tmp) / "b.pcap"
            write_pareto_pcap(path, args.packets, flows)
            files.append((f"B: heavy-tailed, {flows:,} flows", path))
        for label, path in files:
            frames, producer = full_capture_path(path, True)
            messages = producer.kept
            flows, cells = distinct_per_message(messages)
            print(f"\n{label}: {producer.records / len(messages):,.0f} records/message; per "
                  f"record with a 5-tuple, {flows:.2f} distinct flows and {cells:.2f} distinct "
                  "(flow, second) cells of its message")
            for flushes in (False, True):
                measure(label, messages, producer.records, args.rounds, baseline, flushes)


if __name__ == "__main__":
    main()
