"""Batch decoding benchmark: `python bench/bench_batch_decode.py [--packets N] [--runs R]`.

Writes one synthetic capture (tests/synthetic.py: TCP/UDP/ICMP over IPv4, IPv6 and 802.1Q,
1M frames by default), holds its frames in memory and measures, in alternating runs (every
mode once per round, R rounds), the frames per second of:

  * decode_frame() in a loop (the reference);
  * capture.batch_decode.decode_batch() in batches of 256/1024/4096 frames (columnar result:
    what RecordBatcher.add_batch packs records from);
  * the same followed by .tuples() (a drop-in list of decode_frame() tuples);
  * capture.batch_decode.decode_chunk() of every read of the file (1 MiB, as pump() decodes a
    classic pcap: in place, no bytes object per frame);
  * the slice of pump() that follows reading, on a sample: decode_frame + RecordBatcher.add
    per frame (the reference) against decode_batch(1024) + RecordBatcher.add_batch (what
    pump() runs) and decode_batch(1024).tuples() + add (the drop-in wiring), add and
    add_batch alone, the record packing per frame (RECORD.pack) against
    DecodedBatch.records(), and the flow cache look-up of a batch (flow_keys +
    FlowCache.labels, the dict, against FlowCache.find_labels, numpy).

Times are CPU times of this process (time.process_time). It prints the median and the range
of the runs and the ratio to decode_frame(); it asserts nothing but a sample of equal results
(this machine is shared and noisy: compare the ratios of one run, not absolute figures across
runs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from capture.batch_decode import decode_batch, decode_chunk, flow_keys  # noqa: E402
from capture.batching import RecordBatcher  # noqa: E402
from capture.decode import decode_frame  # noqa: E402
from capture.pcapfile import read_chunks, read_frames  # noqa: E402
from packet_records import RECORD  # noqa: E402
from tests.synthetic import write_synthetic_pcap  # noqa: E402

BATCHES = (256, 1024, 4096)


def loop_reference(frames: list[bytes], linktype: int) -> None:
    for frame in frames:
        decode_frame(frame, linktype)


def batched(size: int, tuples: bool):
    def run(frames: list[bytes], linktype: int) -> None:
        for i in range(0, len(frames), size):
            result = decode_batch(frames[i:i + size], linktype)
            if tuples:
                result.tuples()
    return run


def timed(fn, *args) -> float:
    gc.collect()
    gc.disable()
    try:
        started = time.process_time()  # CPU time: less sensitive than wall time to the other
        fn(*args)  # jobs of a shared machine (which still cost cache and frequency)
        return time.process_time() - started
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flows", type=int, default=5000,
                        help="flows of the synthetic capture (packets pick one at random)")
    parser.add_argument("--batcher-sample", type=int, default=200_000,
                        help="frames for the RecordBatcher.add row (0: skip it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.pcap"
        started = time.perf_counter()
        write_synthetic_pcap(path, args.packets, flows=args.flows)
        items = list(read_frames(path))
        chunks = list(read_chunks(path))
    frames = [frame for _, _, frame, _ in items]
    linktypes = {lt for *_, lt in items}
    assert linktypes == {1}, linktypes
    print(f"{len(frames):,} frames ({sum(map(len, frames)) / len(frames):.0f} bytes on average, "
          f"{args.flows} flows) written and read in {time.perf_counter() - started:.1f} s")

    sample = frames[:20_000]
    assert decode_batch(sample, 1).tuples() == [decode_frame(f, 1) for f in sample]
    fast_share = decode_batch(frames[:100_000], 1).fast.mean()
    print(f"decoded by the batch path itself (not handed to decode_frame): {fast_share:.1%}")

    def in_place(_frames: list[bytes], _linktype: int) -> None:
        for chunk in chunks:
            decode_chunk(chunk.buf, chunk.starts, chunk.lengths, chunk.linktype)

    modes = [("decode_frame loop (reference)", loop_reference)]
    for size in BATCHES:
        modes.append((f"decode_batch columns, batch {size}", batched(size, False)))
    modes.append(("decode_chunk columns, reads of 1 MiB", in_place))
    for size in BATCHES:
        modes.append((f"decode_batch + tuples(), batch {size}", batched(size, True)))
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    for run in range(args.runs):  # alternate: every mode once per round
        for name, fn in modes:
            times[name].append(timed(fn, frames, 1))
        print(f"round {run + 1}/{args.runs} done", file=sys.stderr)

    # the CPU path that follows decoding (pump() minus the producer): scaled to the capture
    extra = []
    if args.batcher_sample:
        n = min(args.batcher_sample, len(items))
        sample_items = items[:n]
        scale = len(frames) / n

        def per_frame(items=sample_items, inspect=True):
            batcher = RecordBatcher(12, 1000, inspect=inspect, replay=True)
            add = batcher.add
            for ts, wire, frame, lt in items:
                add(ts, wire, frame, decode_frame(frame, lt))
                if batcher.ready:
                    batcher.take()

        def drop_in(items=sample_items, size=1024):
            """decode_batch(...).tuples() in batches, then add() per frame as today."""
            batcher = RecordBatcher(12, 1000, inspect=True, replay=True)
            add = batcher.add
            for i in range(0, len(items), size):
                chunk = items[i:i + size]
                decoded = decode_batch([f for _, _, f, _ in chunk], 1).tuples()
                for (ts, wire, frame, _), dec in zip(chunk, decoded):
                    add(ts, wire, frame, dec)
                    if batcher.ready:
                        batcher.take()

        decoded_all = decode_batch(frames[:n], 1).tuples()

        def add_only(items=sample_items):
            batcher = RecordBatcher(12, 1000, inspect=True, replay=True)
            add = batcher.add
            for (ts, wire, frame, _), dec in zip(items, decoded_all):
                add(ts, wire, frame, dec)
                if batcher.ready:
                    batcher.take()

        def pack_per_frame(items=sample_items):
            pack = RECORD.pack
            for (ts, wire, _, _), d in zip(items, decoded_all):
                pack(ts, wire, d[0], d[1], d[6], d[7], d[4], d[5], d[2], d[3], 0, 0, 0)

        columns = [decode_batch([f for _, _, f, _ in sample_items[i:i + 1024]], 1)
                   for i in range(0, n, 1024)]
        stamps = [(np.array([t for t, _, _, _ in sample_items[i:i + 1024]], dtype=np.int64),
                   np.array([w for _, w, _, _ in sample_items[i:i + 1024]], dtype=np.int64))
                  for i in range(0, n, 1024)]

        def pack_columns():
            for cols, (ts, wire) in zip(columns, stamps):
                cols.records(ts, wire).tobytes()

        # the flow cache as the sample leaves it: every flow in it
        warm = RecordBatcher(12, 1000, inspect=True, replay=True)
        for ts, wire, frame, lt in sample_items:
            warm.add(ts, wire, frame, decode_frame(frame, lt))

        def labels_of_batches(flows=warm.flows):
            for cols in columns:
                keys = flow_keys(cols)
                flows.labels(keys.view(f"V{keys.dtype.itemsize}").tolist())

        def find_labels_of_batches(flows=warm.flows):
            for cols in columns:
                keys = flow_keys(cols)
                flows.find_labels(keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize))

        def add_batch_only(items=sample_items):
            batcher = RecordBatcher(12, 1000, inspect=True, replay=True)
            for i, cols in zip(range(0, len(items), 1024), columns):
                ts, wire, frames_, _ = zip(*items[i:i + 1024])
                batcher.add_batch(ts, wire, frames_, cols)
                if batcher.ready:
                    batcher.take()

        def batch_path(items=sample_items, size=1024, inspect=True):
            """decode_batch columns + RecordBatcher.add_batch, as pump() runs them."""
            batcher = RecordBatcher(12, 1000, inspect=inspect, replay=True)
            out = []
            for i in range(0, len(items), size):
                ts, wire, frames_, linktypes = zip(*items[i:i + size])
                batcher.add_batch(ts, wire, frames_, decode_batch(frames_, linktypes))
                if batcher.ready:
                    out += batcher.take()
            batcher.flush(final=True)
            return out + batcher.take()

        def reference_messages(items=sample_items, inspect=True):
            batcher = RecordBatcher(12, 1000, inspect=inspect, replay=True)
            out = []
            for ts, wire, frame, lt in items:
                batcher.add(ts, wire, frame, decode_frame(frame, lt))
                if batcher.ready:
                    out += batcher.take()
            batcher.flush(final=True)
            return out + batcher.take()

        for inspect in (True, False):  # the same messages, even in the same order
            same = batch_path(inspect=inspect) == reference_messages(inspect=inspect)
            print(f"add_batch, inspect {'on' if inspect else 'off'}: messages identical "
                  f"(and in the same order) to add() per frame: {same}")

        rows = [("slice: decode_frame + add (reference)", per_frame),
                ("slice: decode_batch 1024 + add_batch (pump)", batch_path),
                ("slice: decode_batch 1024 .tuples() + add", drop_in),
                ("  RecordBatcher.add alone", add_only),
                ("  RecordBatcher.add_batch alone", add_batch_only),
                ("  RECORD.pack per frame (inside add)", pack_per_frame),
                ("  DecodedBatch.records(), batch 1024", pack_columns),
                ("  flow_keys() + FlowCache.labels(), 1024", labels_of_batches),
                ("  flow_keys() + FlowCache.find_labels(), 1024", find_labels_of_batches),
                ("slice, inspect off: decode_frame + add", partial(per_frame, inspect=False)),
                ("slice, inspect off: batch 1024 + add_batch", partial(batch_path, inspect=False))]
        runs: dict[str, list[float]] = {name: [] for name, _ in rows}
        per_frame()  # warm-up: process-wide caches (names, fingerprints) fill on the first pass
        for _ in range(args.runs):
            for name, fn in rows:
                runs[name].append(timed(fn) * scale)
        extra = list(runs.items())
        extra_ref = statistics.median(runs[rows[0][0]])

    ref = statistics.median(times[modes[0][0]])
    n = len(frames)
    print()
    print(f"{'mode':44} {'frames/s (median)':>18} {'range (min..max)':>22} {'ns/frame':>9} "
          f"{'vs ref':>7}")

    def table(rows, ref: float) -> None:
        for name, runs in rows:
            med = statistics.median(runs)
            lo, hi = n / max(runs), n / min(runs)
            print(f"{name:44} {n / med:>18,.0f} {f'{lo:,.0f}..{hi:,.0f}':>22} "
                  f"{med / n * 1e9:>9.0f} {ref / med:>6.2f}x")

    table(times.items(), ref)
    print("\nvs ref: decode_frame loop time / this mode's time (higher is faster); "
          f"{args.runs} alternating runs each")
    if extra:
        print(f"\nDecode + batcher slice (RecordBatcher, inspection on unless said, producer "
              f"left out; {min(args.batcher_sample, n):,} frames, figures scaled to the capture; "
              "vs ref = the first row's time / this row's)")
        table(extra, extra_ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
