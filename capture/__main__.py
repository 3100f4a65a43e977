"""python -m capture [--pcap FILE]: capture live (IFACE, BPF_FILTER) or replay a capture file.

Live: frames from IFACE (empty: every interface) that pass BPF_FILTER, until SIGINT/SIGTERM.
--pcap FILE: every frame of a pcap or pcapng file, then exit 0 once the broker has them all."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from itertools import chain

import numpy as np

from capture.batch_decode import decode_batch
from capture.batching import RecordBatcher
from capture.counters import CaptureCounters
from capture.pcapfile import CaptureFileError, FrameBatch, FrameChunk
from capture.producer import RecordProducer
from capture.reader_process import DecodedChunk, decode_read, read_decoded
from capture.settings import CaptureSettings
from packet_records import FLAG_MALFORMED, FLAG_UNSUPPORTED_LINK, encode_stats
from packet_records.runtime import (
    StartupError,
    configure_logging,
    environment_help,
    load_settings,
    tune_gc,
)
from packet_records.security import kafka_client_config
from packet_records.topics import ensure_topics

log = logging.getLogger("capture")
SOURCE = f"{socket.gethostname()}:{os.getpid()}"  # names this capture in its stats messages


class Stop:
    """Set by SIGINT/SIGTERM; the capture loop checks it between batches."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(_signum, _frame):
            cls.requested = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


# Frames are decoded in batches (capture.batch_decode: numpy over the common headers, the
# reference decoder for everything else); a batch is this many frames at most.
DECODE_BATCH = 1024
# ... and of a read of a classic pcap (FrameChunk), decoded in place: there, bigger batches
# cost no copy, and numpy's fixed costs are shared by more frames (a read of 4 MiB holds 4,000
# to 12,000 frames of common sizes, up to 65,000 of the smallest; on 20,000 heavy-tailed flows,
# reads of 4 MiB decoded whole made the file path 12% faster than reads of 1 MiB in batches
# of 4096)
CHUNK_DECODE_BATCH = 16384
_END = object()  # pump(): no first item


def pump(frames: Iterable, batcher: RecordBatcher, producer: RecordProducer,
         counters: CaptureCounters, settings: CaptureSettings, source=None) -> None:
    """Decode every frame into the batcher and hand full batches to the producer. `frames`
    yields either frames (ts_ns, wire_len, frame, linktype), or FrameBatch / FrameChunk
    columns of frames (capture.pcapfile.read_batches, read_chunks; capture.live's
    LiveSource.batches()): one or the other, as its first frames say; and None when live
    traffic paused for a while."""
    interval = settings.batch_interval_ms / 1000
    now = time.monotonic()
    next_flush, next_stats = now + interval, now + settings.stats_interval_s
    add_batch, take, send = batcher.add_batch, batcher.take, producer.send
    live = source is not None
    monotonic = time.monotonic
    # hot-loop counters live in locals and reach `counters` in sync_counters()
    frames_n = bytes_n = malformed = unsupported = 0
    warned_links: set[int] = set()
    pending: list[tuple] = []  # frames read, waiting to be decoded as one batch
    # frames read as FrameBatch columns, fewer than DECODE_BATCH, waiting for more
    held: FrameBatch | None = None

    def sync_counters() -> None:
        counters.frames, counters.bytes = frames_n, bytes_n
        counters.malformed, counters.unsupported_link = malformed, unsupported
        if source is not None:
            source.read_drops()
            counters.kernel_drops = source.kernel_drops

    def send_stats() -> None:
        producer.send_stats(encode_stats(SOURCE, time.time_ns(), counters.health_increments()))

    def send_ready() -> None:
        for partition, message, count in take():
            send(partition, message, count)

    def decode(ts_ns, wire_lens, frame_list, linktypes) -> None:
        """Decode frames as one batch and add them to the batcher, in order; `linktypes` is
        their link type or one per frame."""
        added(ts_ns, wire_lens, frame_list, linktypes, decode_batch(frame_list, linktypes))

    def added(ts_ns, wire_lens, frame_list, linktypes, decoded) -> None:
        """Add the decoded frames to the batcher, in order, and count them (the batcher flags
        those it finds malformed too: a wire length that lies)."""
        nonlocal frames_n, bytes_n, malformed, unsupported
        frames_n += len(frame_list)
        bytes_n += add_batch(ts_ns, wire_lens, frame_list, decoded)
        bad = (decoded.flags & FLAG_MALFORMED) != 0
        if bad.any():
            malformed += int(bad.sum())
            unknown = np.flatnonzero(bad & ((decoded.flags & FLAG_UNSUPPORTED_LINK) != 0))
            if len(unknown):
                unsupported += len(unknown)
                kinds = ([linktypes] if isinstance(linktypes, int)
                         else dict.fromkeys(linktypes[i] for i in unknown.tolist()))
                for linktype in kinds:
                    if linktype not in warned_links:
                        warned_links.add(linktype)
                        log.warning("link type %d is not supported: its frames count as OTHER",
                                    linktype)
        if batcher.ready:
            send_ready()

    def drain() -> None:
        """Decode the pending frames as one batch."""
        if pending:
            ts_ns, wire_lens, frame_list, linktypes = zip(*pending)
            pending.clear()
            decode(ts_ns, wire_lens, frame_list, linktypes)

    def decode_full(batch: FrameBatch) -> bool:
        """Decode the frames held and then those of `batch`, DECODE_BATCH at a time, with the
        flushes, stats and stop checks between batches as for single frames; the rest of
        them (fewer than DECODE_BATCH) is held for the next batch. False: stop requested."""
        nonlocal held
        if held is not None:
            batch, held = _joined(held, batch), None
        ts_ns, wire_lens, frame_list, linktypes = batch
        n = len(frame_list)
        one_type = isinstance(linktypes, int)
        if live:  # nothing is held: live frames would wait for the next traffic
            decode(ts_ns, wire_lens, frame_list, linktypes)
            return tick()
        for i in range(0, n - DECODE_BATCH + 1, DECODE_BATCH):
            j = i + DECODE_BATCH
            decode(ts_ns[i:j], wire_lens[i:j], frame_list[i:j],
                   linktypes if one_type else linktypes[i:j])
            if not tick():
                return False
        rest = n % DECODE_BATCH
        if rest:
            i = n - rest
            held = FrameBatch(ts_ns[i:], wire_lens[i:], frame_list[i:],
                              linktypes if one_type else linktypes[i:]) if i else batch
        return True

    def decode_chunk_of(chunk: FrameChunk | DecodedChunk) -> bool:
        """Add the frames of a read decoded by a reader process (DecodedChunk), or decoded
        here in place (FrameChunk), in batches of at most CHUNK_DECODE_BATCH, with the
        flushes, stats and stop checks between batches. False: stop requested."""
        nonlocal held
        if held is not None:  # frames before this chunk (pcapng) go first
            decode(*held)
            held = None
        if type(chunk) is FrameChunk:
            chunk = decode_read(chunk, CHUNK_DECODE_BATCH)
        read, parts = chunk
        for i, j, decoded in parts:
            added(read.ts_ns[i:j], read.wire_lens[i:j], read.frames(i, j), read.linktype,
                  decoded)
            if not tick():
                return False
        return True

    def tick() -> bool:
        """Flush and send stats when their time has come. False: stop requested."""
        nonlocal next_flush, next_stats
        now = monotonic()
        if now >= next_flush:
            batcher.flush()
            send_ready()
            producer.poll()
            next_flush = now + interval
        if now >= next_stats:
            sync_counters()
            counters.log_summary()
            send_stats()
            next_stats = now + settings.stats_interval_s
        return not Stop.requested

    items = iter(frames)
    try:
        first = next(items, _END)
        while first is None and tick():  # live, no traffic yet
            first = next(items, _END)
        if type(first) in (FrameBatch, FrameChunk, DecodedChunk):
            for batch in chain((first,), items):
                if batch is None:
                    going = tick()
                elif type(batch) is FrameBatch:
                    going = decode_full(batch)
                else:
                    going = decode_chunk_of(batch)
                if not going:
                    break
        elif first is not _END and first is not None:
            for item in chain((first,), items):
                if item is not None:
                    pending.append(item)
                    # a file fills whole batches; live traffic must not wait for one to fill
                    if len(pending) < DECODE_BATCH and not (live and monotonic() >= next_flush):
                        continue
                drain()
                if not tick():
                    break
    finally:  # a file cut short still delivers every frame before the damage
        drain()
        if held is not None:
            decode(*held)
        batcher.flush(final=True)
        send_ready()
        sync_counters()
        send_stats()
        if not live:
            producer.send_replay_end(encode_stats(SOURCE, time.time_ns(), {}, replay_end=True),
                                     batcher.partitions)


def _joined(first: FrameBatch, then: FrameBatch) -> FrameBatch:
    """The frames of `first` followed by those of `then`, as one batch."""
    types_a, types_b = first.linktypes, then.linktypes
    if isinstance(types_a, int) and types_a == types_b:
        types = types_a
    else:
        types = ([types_a] * len(first.frames) if isinstance(types_a, int) else types_a) + (
            [types_b] * len(then.frames) if isinstance(types_b, int) else types_b)
    return FrameBatch(first.ts_ns + then.ts_ns, first.wire_lens + then.wire_lens,
                      first.frames + then.frames, types)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capture", description=__doc__,
                                     epilog=environment_help(CaptureSettings),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pcap", metavar="FILE", help="read this pcap/pcapng file, then exit")
    args = parser.parse_args(argv)
    settings = load_settings(CaptureSettings, "capture")
    tune_gc()
    configure_logging(settings.log_level)
    Stop.install()
    counters = CaptureCounters()
    file_error = reader = None
    try:
        if args.pcap:
            # (read and decoded by a second process, while this one does the rest)
            reader = read_decoded(args.pcap, CHUNK_DECODE_BATCH, settings.inspect_payloads)
            first = next(reader, None)  # a bad file fails here, before we touch the broker
            frames = chain([first], reader) if first is not None else iter(())
            source = None
        else:
            from capture.live import LiveSource

            source = LiveSource(settings.iface, settings.bpf_filter, settings.socket_buffer_mb)
            frames = source.batches()
        partitions = ensure_topics(settings.kafka_bootstrap_servers, settings.kafka_topic,
                      client_config=kafka_client_config(settings))
    except (StartupError, CaptureFileError) as exc:
        if reader is not None:
            reader.close()
        print(f"capture: {exc}", file=sys.stderr)
        return 2
    producer = RecordProducer(settings, counters, block=source is None)
    batcher = RecordBatcher(partitions, settings.records_per_message, settings.inspect_payloads,
                            replay=source is None,
                            inspect_memory_mb=settings.inspect_memory_mb,
                            inspect_idle_timeout_s=settings.inspect_idle_timeout_s,
                            fragments_held=settings.fragments_held)
    log.info("capturing from %s into %s (%d partitions)",
             args.pcap or (settings.iface or "every interface"), settings.kafka_topic, partitions)
    try:
        pump(frames, batcher, producer, counters, settings, source)
    except CaptureFileError as exc:
        file_error = exc  # every frame before the damage was sent; report it after delivery
    finally:
        if reader is not None:  # (stopped early: the reader process is stopped too)
            reader.close()
    undelivered = producer.close(timeout=settings.delivery_timeout_ms / 1000)
    counters.log_summary("final")
    if file_error is not None:
        print(f"capture: {file_error}", file=sys.stderr)
        return 1
    if undelivered or counters.delivery_failed:
        print(f"capture: {counters.delivery_failed} records were not delivered", file=sys.stderr)
        return 1
    if source is None and counters.records_produced != counters.frames:
        print(f"capture: read {counters.frames} frames but the broker acknowledged "
              f"{counters.records_produced} records", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
