"""Reading and decoding a capture file in a second process, while this one does the rest.

About a third of `python -m capture --pcap`'s work depends on nothing but the file: reading it,
finding its records (capture.pcapfile.read_chunks), decoding their headers
(capture.batch_decode.decode_chunk) and making their flow keys. read_decoded() forks a reader
process that does that work on another core, a few reads ahead of the capture process, which
finds the flows, inspects and batches (on 20,000 heavy-tailed flows, the capture process's own
work went from 0.80 to 0.58 s a million frames).

The capture process still did more than the reader (on those flows, 2.1 CPU-seconds against
1.4): while it holds every slot (the slower one), the reader also inspects each batch's TLS
ClientHellos and QUIC Initials ahead (capture.flowcache.inspect_ahead), which the capture
process takes where they are a flow's first payload. Measured in pairs on that file: capture
process 2.30 -> 1.79 CPU-s, reader 1.42 -> 1.73, wall time 2.33 -> 1.82 s (medians of 4).

Each read of a classic pcap comes over in a slot of memory shared by both processes: the read's
bytes, where each frame lies in it, the decoded columns and the flow keys, with no copy on this
side; a pipe carries only what says where they are (and the reference decoder's own tuples). A
pcapng file's batches (frame bytes in lists) come over the pipe whole, decoded here as before. A
slot is handed back once the capture process asks for the next read (so an empty list of free
slots, with none coming back, says the capture process is behind). The reader stops with the
capture process: it ignores SIGINT (the capture process stops it), and a pipe that closes ends
it.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import select
import signal
import struct
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from capture.batch_decode import FLOW_KEY_DTYPE, DecodedBatch, decode_chunk, flow_keys
from capture.flowcache import inspect_ahead
from capture.pcapfile import CaptureFileError, FrameBatch, FrameChunk, read_chunks

log = logging.getLogger(__name__)

# Slots of shared memory: a read (capture.pcapfile.CHUNK, 4 MiB, or 8 MiB joined from a pipe)
# plus its columns (32 bytes a frame) and decoded headers (73 bytes a frame: 7 MiB at most for
# 4 MiB of the smallest frames) fit in one; a read that does not (a record of many megabytes)
# comes over the pipe whole. The reader is at most SLOTS - 1 reads ahead.
SLOTS = 4
SLOT_BYTES = 20 << 20
_LENGTH = struct.Struct("<Q")
_KEY_BYTES = np.dtype(f"V{FLOW_KEY_DTYPE.itemsize}")  # a flow key as plain bytes (a layout's dtype)
_ALIGN = 64


class DecodedChunk(NamedTuple):
    """A read of a classic pcap (FrameChunk) and its frames decoded: parts[k] is (i, j, the
    DecodedBatch of frames i..j-1), in order, covering every frame."""

    chunk: FrameChunk
    parts: list[tuple[int, int, DecodedBatch]]


def read_decoded(path: str | Path, batch: int,
                 inspect: bool = False) -> Iterator[DecodedChunk | FrameBatch]:
    """The items of read_chunks(path), each classic-pcap read as a DecodedChunk decoded in
    batches of at most `batch` frames (FrameChunk.parts()), read and decoded by a reader
    process; with `inspect`, each batch's first payloads that cost most to inspect are
    inspected there too (DecodedBatch.learned: capture.flowcache.inspect_ahead). Raises
    CaptureFileError as read_chunks() does, after the same items; also when the reader
    process fails or is killed."""
    fds: list[int] = []
    try:
        ring = mmap.mmap(-1, SLOTS * SLOT_BYTES)
        fds += os.pipe()
        fds += os.pipe()
        pid = os.fork()
    except OSError as exc:  # no memory, files or processes to spare: read in this process
        for fd in fds:
            os.close(fd)
        log.warning("reading %s in the capture process (no reader process: %s)", path,
                    exc.strerror or exc)
        yield from _decoded_here(path, batch)
        return
    data_r, data_w, free_r, free_w = fds
    if pid == 0:  # the reader: never returns
        os.close(data_r)
        os.close(free_w)
        _reader(path, batch, inspect, ring, data_w, free_r)
    os.close(data_w)
    os.close(free_r)
    status = None  # the reader's, once it has exited
    try:
        with open(data_r, "rb", buffering=1 << 16) as data:
            while True:
                message = _receive(data)
                if message is None:
                    _, status = os.waitpid(pid, 0)
                    raise CaptureFileError(f"{path}: the process reading it ended "
                                           f"({_how(status)}) before the end of the file")
                kind = message[0]
                if kind == "end":
                    return
                if kind == "error":
                    raise CaptureFileError(message[1])
                if kind == "failed":
                    log.error("reading %s failed:\n%s", path, message[1])
                    raise CaptureFileError(f"{path}: reading failed: "
                                           f"{message[1].strip().splitlines()[-1]}")
                if kind != "slot":  # a pcapng batch, or a read too big for a slot
                    yield message[1]
                    continue
                _, slot, layout, linktype, fallbacks, learned = message
                yield _in_slot(ring, slot * SLOT_BYTES, layout, linktype, fallbacks, learned,
                               batch)
                try:  # the capture process is done with the slot
                    os.write(free_w, bytes((slot,)))
                except BrokenPipeError:  # the reader has sent everything and left
                    pass
    finally:
        os.close(free_w)
        if status is None:
            try:  # stopped early, or at the end: the reader is not needed any more
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        # (the shared memory is not closed here: arrays of the last read may still view it,
        # and numpy does not keep an mmap from closing under them; it goes with the last one)


def decode_read(chunk: FrameChunk, batch: int) -> DecodedChunk:
    """A read decoded in this process, in batches of at most `batch` frames (FrameChunk.parts),
    as the reader process hands it over."""
    return DecodedChunk(chunk, [(i, j, decode_chunk(chunk.buf, chunk.starts[i:j],
                                                    chunk.lengths[i:j], chunk.linktype))
                                for i, j in chunk.parts(batch)])


def _decoded_here(path, batch: int) -> Iterator[DecodedChunk | FrameBatch]:
    """What read_decoded() yields, read and decoded in this process."""
    for item in read_chunks(path):
        yield decode_read(item, batch) if type(item) is FrameChunk else item


def _reader(path, batch: int, inspect: bool, ring: mmap.mmap, data_w: int,
            free_r: int) -> None:
    """The reader process: send every item of read_chunks(path), then ("end",), or the error
    that ended it; exit when done or when the capture process has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    free = list(range(SLOTS))
    out = open(data_w, "wb", buffering=1 << 16)
    try:
        try:
            for item in read_chunks(path):
                if type(item) is not FrameChunk:
                    _send(out, ("batch", item))
                    continue
                decoded = decode_read(item, batch)
                columns = [item.starts, item.lengths, item.ts_ns, item.wire_lens]
                # first payloads are inspected here only while the capture process is the
                # slower one (it holds every slot): each process then does about as much
                ahead = inspect and not free and not select.select([free_r], [], [], 0)[0]
                for i, j, part in decoded.parts:
                    part.keys = flow_keys(part)  # (what the capture process would make next)
                    if ahead:
                        try:
                            part.learned = inspect_ahead(part, item.buf, item.starts[i:j],
                                                         item.lengths[i:j])
                        except Exception:  # noqa: BLE001 - a bug of ours: the capture
                            # process inspects these itself (the labels are the same)
                            log.exception("inspecting ahead failed: the capture process "
                                          "inspects every payload from here on")
                            inspect = ahead = False
                    columns += [*part.columns(), part.keys.view(_KEY_BYTES)]
                if _placed_size(len(item.buf), columns) > SLOT_BYTES:
                    _send(out, ("whole", decoded))
                    continue
                if not free:  # wait for the capture process to hand one back
                    slot = os.read(free_r, 1)
                    if not slot:
                        break
                    free.append(slot[0])
                slot = free.pop()
                layout = _place(ring, slot * SLOT_BYTES, item.buf, columns)
                _send(out, ("slot", slot, layout, item.linktype,
                            [part.fallback for _i, _j, part in decoded.parts],
                            [part.learned for _i, _j, part in decoded.parts]))
            else:
                _send(out, ("end",))
        except CaptureFileError as exc:
            _send(out, ("error", str(exc)))
        except (BrokenPipeError, ConnectionError):
            pass  # the capture process has gone
        except BaseException:  # a fault of ours: the capture process reports it
            _send(out, ("failed", traceback.format_exc()))
    except (BrokenPipeError, ConnectionError):
        pass
    finally:
        os._exit(0)


def _in_slot(ring: mmap.mmap, base: int, layout: list[tuple[int, str, tuple]], linktype: int,
             fallbacks: list, learned: list, batch: int) -> DecodedChunk:
    """The DecodedChunk that _place() put in the slot at `base`: views of the slot, no copy.
    Frames are sliced from the whole shared memory (their starts moved by `base`)."""
    starts, lengths, ts_ns, wire_lens, *columns = (
        np.ndarray(shape, dtype, ring, base + at) for at, dtype, shape in layout)
    chunk = FrameChunk(ring, starts + base, lengths, ts_ns, wire_lens, linktype)
    width = len(DecodedBatch.COLUMNS) + 1  # a part's columns, then its flow keys
    parts = []
    for k, ((i, j), fallback) in enumerate(zip(chunk.parts(batch), fallbacks)):
        *own, keys = columns[k * width:(k + 1) * width]
        part = DecodedBatch.of_columns(own, fallback, keys.view(FLOW_KEY_DTYPE))
        part.learned = learned[k]
        parts.append((i, j, part))
    return DecodedChunk(chunk, parts)


def _placed_size(buf_len: int, columns: list[np.ndarray]) -> int:
    return _aligned(buf_len) + sum(_aligned(column.nbytes) for column in columns)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _place(ring: mmap.mmap, base: int, buf: bytes,
           columns: list[np.ndarray]) -> list[tuple[int, str, tuple]]:
    """Copy buf (at `base`) and then the columns into the slot at `base`: the columns'
    (offset, dtype, shape)."""
    ring[base:base + len(buf)] = buf
    layout = []
    at = _aligned(len(buf))
    for column in columns:
        np.ndarray(column.shape, column.dtype, ring, base + at)[...] = column
        layout.append((at, column.dtype.str, column.shape))
        at += _aligned(column.nbytes)
    return layout


def _send(out: BinaryIO, message: tuple) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_LENGTH.pack(len(data)))
    out.write(data)
    out.flush()


def _receive(data: BinaryIO) -> tuple | None:
    """The next message, or None when the pipe ended before a whole one."""
    head = data.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    body = data.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def _how(status: int) -> str:
    """How the reader process ended, from its wait status."""
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
