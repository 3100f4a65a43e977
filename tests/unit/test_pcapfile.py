"""capture.pcapfile.read_frames: pcap and pcapng variants, and every way a file can be bad."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from capture.pcapfile import CaptureFileError, FrameChunk, read_batches, read_chunks, read_frames
from tests.captures import write_pcap
from tests.fakes import RecordingProducer

T0 = 1_700_000_000 * 10**9 + 123_456_789  # ns; the last three digits survive only in ns files
FRAMES = [bytes(range(60)), b"\xaa" * 100, b"\x55" * 42]


def recs(n: int = 3) -> list[tuple[int, bytes, int]]:
    return [(T0 + i * 10**9, FRAMES[i], len(FRAMES[i])) for i in range(n)]


def read_until_error(path) -> list:
    """Frames yielded before read_frames raises CaptureFileError (which it must)."""
    got = []
    with pytest.raises(CaptureFileError):
        for frame in read_frames(path):
            got.append(frame)
    return got


# ----------------------------------------------------------------------------- classic pcap
@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcap_microseconds(tmp_path, endian):
    path = write_pcap(tmp_path / "us.pcap", 1, recs(), endian=endian)
    assert list(read_frames(path)) == [
        (T0 // 1000 * 1000 + i * 10**9, len(f), f, 1) for i, f in enumerate(FRAMES)
    ]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcap_nanoseconds(tmp_path, endian):
    path = write_pcap(tmp_path / "ns.pcap", 101, recs(), nano=True, endian=endian)
    assert [(ts, lt) for ts, _w, _f, lt in read_frames(path)] == [
        (T0, 101), (T0 + 10**9, 101), (T0 + 2 * 10**9, 101)
    ]


def test_pcap_snaplen_keeps_the_wire_length(tmp_path):
    path = write_pcap(tmp_path / "snap.pcap", 1, recs(), snaplen=50)
    frames = list(read_frames(path))
    assert [(w, f) for _ts, w, f, _lt in frames] == [(len(f), f[:50]) for f in FRAMES]


def test_pcap_fcs_bits_of_the_link_type_are_ignored(tmp_path):
    path = write_pcap(tmp_path / "fcs.pcap", 1 | 0x1 << 26 | 0x2 << 28, recs(1))
    assert [lt for *_, lt in read_frames(path)] == [1]


# ----------------------------------------------------------------------------- pcapng builders
def block(btype: int, body: bytes, e: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    size = len(body) + 12
    return struct.pack(e + "II", btype, size) + body + struct.pack(e + "I", size)


def option(code: int, value: bytes, e: str = "<") -> bytes:
    return struct.pack(e + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(e: str = "<") -> bytes:
    return block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), e)


def idb(linktype: int, tsresol: int | None = None, tsoffset: int | None = None,
        e: str = "<") -> bytes:
    opts = b""
    if tsresol is not None:
        opts += option(9, bytes((tsresol,)), e)
    if tsoffset is not None:
        opts += option(14, struct.pack(e + "q", tsoffset), e)
    if opts:
        opts += option(0, b"", e)
    return block(1, struct.pack(e + "HHI", linktype, 0, 0) + opts, e)


def epb(iface: int, ticks: int, data: bytes, wire: int | None = None, e: str = "<") -> bytes:
    wire = len(data) if wire is None else wire
    head = struct.pack(e + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), wire)
    return block(6, head + data, e)


def spb(data: bytes, wire: int | None = None) -> bytes:
    return block(3, struct.pack("<I", len(data) if wire is None else wire) + data)


def write(tmp_path, *blocks: bytes, name: str = "f.pcapng"):
    path = tmp_path / name
    path.write_bytes(b"".join(blocks))
    return path


# ----------------------------------------------------------------------------- pcapng
SEC = 1_700_000_000


@pytest.mark.parametrize("tsresol, tsoffset, ticks, expected_ns", [
    (None, None, SEC * 10**6 + 123_456, SEC * 10**9 + 123_456_000),  # default: microseconds
    (6, None, SEC * 10**6 + 123_456, SEC * 10**9 + 123_456_000),
    (9, None, SEC * 10**9 + 123_456_789, SEC * 10**9 + 123_456_789),
    (3, None, SEC * 10**3 + 5, SEC * 10**9 + 5_000_000),
    (12, None, 10**15 + 123_456_789_999, 10**12 + 123_456_789),  # picoseconds
    (0x80 | 10, None, SEC * 1024 + 512, SEC * 10**9 + 500_000_000),  # 2^-10 s
    (0x80 | 20, None, SEC * 2**20 + 1, SEC * 10**9 + 953),  # 2^-20 s, floored
    (9, 100, SEC * 10**9 + 7, (SEC + 100) * 10**9 + 7),  # if_tsoffset in seconds
    (None, -SEC, SEC * 10**6 + 2_500_000, 2_500_000_000),  # negative offset
])
def test_pcapng_timestamp_resolution_and_offset(tmp_path, tsresol, tsoffset, ticks, expected_ns):
    path = write(tmp_path, shb(), idb(1, tsresol, tsoffset), epb(0, ticks, FRAMES[0]))
    assert [ts for ts, *_ in read_frames(path)] == [expected_ns]


def test_pcapng_two_interfaces_with_own_link_type_and_resolution(tmp_path):
    path = write(
        tmp_path, shb(), idb(1, tsresol=9), idb(101, tsresol=6),
        epb(0, SEC * 10**9 + 1, FRAMES[0]),
        epb(1, SEC * 10**6 + 2, FRAMES[1], wire=1500),
        epb(0, SEC * 10**9 + 3, FRAMES[2]),
    )
    assert list(read_frames(path)) == [
        (SEC * 10**9 + 1, 60, FRAMES[0], 1),
        (SEC * 10**9 + 2000, 1500, FRAMES[1], 101),
        (SEC * 10**9 + 3, 42, FRAMES[2], 1),
    ]


def test_pcapng_sections_restart_interfaces_and_byte_order(tmp_path):
    path = write(
        tmp_path,
        shb(), idb(1, tsresol=9), epb(0, 10, FRAMES[0]),
        shb(">"), idb(113, tsresol=9, e=">"), idb(276, e=">"), epb(0, 20, FRAMES[1], e=">"),
        epb(1, 30, FRAMES[2], e=">"),
        shb(), idb(101), epb(0, 40, FRAMES[0]),
    )
    assert [(ts, lt, f) for ts, _w, f, lt in read_frames(path)] == [
        (10, 1, FRAMES[0]), (20, 113, FRAMES[1]), (30_000, 276, FRAMES[2]),
        (40_000, 101, FRAMES[0]),
    ]


def test_pcapng_simple_packet_block_has_no_timestamp(tmp_path):
    path = write(tmp_path, shb(), idb(101), idb(1), spb(FRAMES[1]), spb(FRAMES[2][:20], wire=42))
    assert list(read_frames(path)) == [(0, 100, FRAMES[1], 101), (0, 42, FRAMES[2][:20], 101)]


def test_pcapng_times_a_record_cannot_hold_become_time_0(tmp_path, caplog):
    """Past 2262 (a record's int64 nanoseconds) or before 1970 (a negative interface time
    offset): time 0, as a packet without a time, with a warning; the other packets keep
    theirs."""
    path = write(tmp_path, shb(), idb(1), epb(0, SEC * 10**6, FRAMES[0]),
                 epb(0, 0xFFFFFFFF << 32, FRAMES[1]), epb(0, SEC * 10**6 + 1, FRAMES[2]),
                 idb(1, tsoffset=-2 * SEC), epb(1, SEC * 10**6, FRAMES[0]))
    with caplog.at_level("WARNING", logger="capture.pcapfile"):
        got = [(ts, f) for ts, _w, f, _lt in read_frames(path)]
    assert got == [(SEC * 10**9, FRAMES[0]), (0, FRAMES[1]), (SEC * 10**9 + 1000, FRAMES[2]),
                   (0, FRAMES[0])]
    assert "2 packets with times before 1970 or past 2262" in caplog.text


def test_pcapng_obsolete_packet_block(tmp_path):
    body = struct.pack("<HHIIII", 0, 0, 0, 5, 3, 3) + b"abc"
    path = write(tmp_path, shb(), idb(1), block(2, body))
    assert list(read_frames(path)) == [(5000, 3, b"abc", 1)]


def test_pcapng_unknown_blocks_are_skipped(tmp_path):
    nrb, isb = block(4, b"\0" * 4), block(5, struct.pack("<III", 0, 0, 0))
    path = write(tmp_path, shb(), nrb, idb(1), isb, epb(0, 1, FRAMES[0]), block(0xBAD, b"x"))
    assert [f for _ts, _w, f, _lt in read_frames(path)] == [FRAMES[0]]


# ----------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path):
    with pytest.raises(CaptureFileError):
        list(read_frames(tmp_path / "absent.pcap"))


def test_empty_file(tmp_path):
    (tmp_path / "empty.pcap").write_bytes(b"")
    assert read_until_error(tmp_path / "empty.pcap") == []


def test_random_bytes(tmp_path):
    (tmp_path / "random.pcap").write_bytes(random.Random(1234).randbytes(4096))
    assert read_until_error(tmp_path / "random.pcap") == []


@pytest.mark.parametrize("size", [3, 12, 23])
def test_pcap_header_cut_short(tmp_path, size):
    good = write_pcap(tmp_path / "good.pcap", 1, recs()).read_bytes()
    (tmp_path / "short.pcap").write_bytes(good[:size])
    assert read_until_error(tmp_path / "short.pcap") == []


@pytest.mark.parametrize("cut", [10, 42 + 8], ids=["inside-data", "inside-record-header"])
def test_pcap_cut_record_yields_the_frames_before_the_damage(tmp_path, cut):
    good = write_pcap(tmp_path / "good.pcap", 1, recs()).read_bytes()
    (tmp_path / "cut.pcap").write_bytes(good[:-cut])
    assert [f for _ts, _w, f, _lt in read_until_error(tmp_path / "cut.pcap")] == FRAMES[:2]


def test_pcap_absurd_record_length_is_an_error(tmp_path):
    good = write_pcap(tmp_path / "good.pcap", 1, recs(1)).read_bytes()
    bad = good[:24] + struct.pack("<IIII", 0, 0, 2**31, 2**31) + good[40:]
    (tmp_path / "bad.pcap").write_bytes(bad)
    assert read_until_error(tmp_path / "bad.pcap") == []


def test_pcapng_cut_block_yields_the_frames_before_the_damage(tmp_path):
    data = shb() + idb(1) + epb(0, 1, FRAMES[0]) + epb(0, 2, FRAMES[1])
    path = write(tmp_path, data[:-7])
    assert [f for _ts, _w, f, _lt in read_until_error(path)] == [FRAMES[0]]


def test_pcapng_bad_byte_order_magic(tmp_path):
    bad = bytearray(shb())
    bad[8:12] = b"\x01\x02\x03\x04"
    assert read_until_error(write(tmp_path, bytes(bad), idb(1), epb(0, 1, FRAMES[0]))) == []


def test_pcapng_packet_of_an_undeclared_interface(tmp_path):
    path = write(tmp_path, shb(), idb(1), epb(0, 1, FRAMES[0]), epb(1, 2, FRAMES[1]))
    assert [f for _ts, _w, f, _lt in read_until_error(path)] == [FRAMES[0]]


def test_pcapng_captured_length_past_the_block(tmp_path):
    bad = bytearray(epb(0, 2, FRAMES[1]))
    bad[20:24] = struct.pack("<I", 5000)  # captured length
    path = write(tmp_path, shb(), idb(1), epb(0, 1, FRAMES[0]), bytes(bad))
    assert [f for _ts, _w, f, _lt in read_until_error(path)] == [FRAMES[0]]


def test_pcapng_packet_block_too_short_for_its_fields(tmp_path):
    path = write(tmp_path, shb(), idb(1), epb(0, 1, FRAMES[0]), struct.pack("<III", 6, 12, 12))
    assert [f for _ts, _w, f, _lt in read_until_error(path)] == [FRAMES[0]]


@pytest.mark.parametrize("after", [b"", epb(0, 5, b"abc")], ids=["last-block", "before-a-packet"])
def test_pcapng_interface_option_longer_than_its_block(tmp_path, after):
    bad_idb = block(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 14, 8))  # no value
    path = write(tmp_path, shb(), bad_idb, after)
    frames = []
    try:
        for frame in read_frames(path):
            frames.append(frame)
    except CaptureFileError:
        pass  # rejecting the file is fine; ignoring the broken option is fine too
    assert [ts for ts, *_ in frames] in ([], [5000])


# ----------------------------------------------------------------------------- not a capture
def test_directory_is_refused(tmp_path):
    with pytest.raises(CaptureFileError, match="is a directory"):
        list(read_frames(tmp_path))


@pytest.mark.parametrize("compress, tool", [("gzip", "gunzip"), ("bz2", "bunzip2"),
                                             ("lzma", "unxz")])
def test_compressed_capture_says_to_decompress_it(tmp_path, compress, tool):
    import importlib

    good = write_pcap(tmp_path / "good.pcap", 1, recs()).read_bytes()
    path = tmp_path / "capture.pcap.z"
    path.write_bytes(importlib.import_module(compress).compress(good))
    with pytest.raises(CaptureFileError, match=f"decompress it first \\({tool} {path}\\)"):
        list(read_frames(path))


def test_a_pipe_is_read_like_a_file(tmp_path):
    import os
    import threading

    data = write_pcap(tmp_path / "good.pcap", 1, recs()).read_bytes()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(data))
    writer.start()
    try:
        assert [f for _ts, _w, f, _lt in read_frames(fifo)] == FRAMES
    finally:
        writer.join(10)


# ----------------------------------------------------------------------------- changed under us
# A file truncated under an mmap raises SIGBUS on access; read_frames reads with plain reads,
# so these end with a CaptureFileError (or the old contents), never a dead process.
SMALL_CHUNK = 4096


def big_capture(tmp_path, n: int = 200) -> tuple:
    frames = [bytes([i % 256]) * (60 + i % 90) for i in range(n)]
    path = write_pcap(tmp_path / "big.pcap", 1, [(T0 + i, f, len(f)) for i, f in enumerate(frames)])
    return path, frames


def complete_records(path, limit: int, start: int = 24) -> int:
    """How many records of a little-endian pcap, from the one at byte `start` on, end within
    `limit` bytes of the read that begins there (at byte 0 for the first record)."""
    data, pos, n = path.read_bytes(), start, 0
    limit = min(limit + (0 if start == 24 else start), len(data))
    while pos + 16 <= limit and pos + 16 + struct.unpack_from("<I", data, pos + 8)[0] <= limit:
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
        n += 1
    return n


@pytest.mark.parametrize("cut", [3 * SMALL_CHUNK + 5, 3 * SMALL_CHUNK + 24 + 8])
def test_file_truncated_while_read_ends_with_one_error(tmp_path, monkeypatch, cut):
    import os

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    expected = complete_records(path, cut)
    reader = read_frames(path)
    got = [next(reader)[2]]  # the first chunk is read
    os.truncate(path, cut)
    with pytest.raises(CaptureFileError, match="cut short"):
        for item in reader:
            got.append(item[2])
    assert got == frames[:expected] and 0 < expected < len(frames)


def test_file_rewritten_while_read_ends_with_one_error(tmp_path, monkeypatch):
    """`cp other.pcap big.pcap` while it is read: the same file, new (here: shorter) content."""
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    other = write_pcap(tmp_path / "other.pcap", 1, recs()).read_bytes()
    reader = read_frames(path)
    got = [next(reader)[2]]
    with open(path, "r+b") as fh:  # what cp does: truncate, then write
        fh.truncate(0)
        fh.write(other)
    with pytest.raises(CaptureFileError):
        for item in reader:
            got.append(item[2])
    assert got == frames[:len(got)]  # what was read before the change is intact


def test_file_replaced_by_rename_while_read_is_read_to_its_end(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    reader = read_frames(path)
    got = [next(reader)[2]]
    os.replace(write_pcap(tmp_path / "other.pcap", 1, recs()), path)  # the open file lives on
    got += [item[2] for item in reader]
    assert got == frames


# ----------------------------------------------------------------------------- read_batches
# read_frames() and read_batches() parse each chunk's records at once; whatever the chunk size,
# they must give exactly what a plain record-by-record reading of the whole file gives.
def reference_frames(data: bytes) -> list:
    """(ts_ns, wire_len, frame, linktype) of every packet of a whole, sound capture, record by
    record (the reading read_frames did before it parsed chunks as a whole)."""
    from capture.pcapfile import _parse_idb

    out = []
    if data[:4] != b"\x0a\x0d\x0d\x0a":
        e = "<" if struct.unpack_from("<I", data)[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        magic, network = struct.unpack_from(e + "I", data)[0], struct.unpack_from(e + "I", data,
                                                                                  20)[0]
        scale = 1 if magic == 0xA1B23C4D else 1000
        pos = 24
        while pos < len(data):
            sec, frac, incl, orig = struct.unpack_from(e + "IIII", data, pos)
            out.append((sec * 10**9 + frac * scale, max(orig, incl),
                        data[pos + 16:pos + 16 + incl], network & 0x03FFFFFF))
            pos += 16 + incl
        return out
    pos, e, interfaces = 0, "<", []
    while pos < len(data):
        btype = struct.unpack_from(e + "I", data, pos)[0]
        if btype == 0x0A0D0D0A:
            e = "<" if data[pos + 8:pos + 12] == struct.pack("<I", 0x1A2B3C4D) else ">"
            interfaces = []
        blen = struct.unpack_from(e + "I", data, pos + 4)[0]
        body, end = pos + 8, pos + blen - 4
        if btype == 1:
            interfaces.append(_parse_idb(data, body, end, e, "idb"))
        elif btype in (6, 2):
            fmt = e + ("IIIII" if btype == 6 else "HxxIIII")
            iface, hi, lo, cap, orig = struct.unpack_from(fmt, data, body)
            itf = interfaces[iface]
            out.append((itf.to_ns(hi << 32 | lo), max(orig, cap),
                        data[body + 20:body + 20 + cap], itf.linktype))
        elif btype == 3:
            orig = struct.unpack_from(e + "I", data, body)[0]
            out.append((0, orig, data[body + 4:body + 4 + min(orig, end - body - 4)],
                        interfaces[0].linktype))
        pos += blen
    return out


def flattened(path) -> list:
    out = []
    for ts, wire, frames, linktypes in read_batches(path):
        assert frames and len(ts) == len(wire) == len(frames)
        if isinstance(linktypes, int):
            linktypes = [linktypes] * len(frames)
        out += zip(ts, wire, frames, linktypes)
    return out


@pytest.fixture(scope="module")
def sound_captures(tmp_path_factory) -> list:
    from pathlib import Path

    from tests.captures import write_captures
    from tests.conftest import SHARED_CORPUS
    from tests.synthetic import write_synthetic_pcap

    tmp = tmp_path_factory.mktemp("sound")
    paths = sorted(write_captures(tmp).values())
    paths.append(write_synthetic_pcap(tmp / "synthetic.pcap", 3000, flows=200, real_payloads=True))
    corpus = Path(SHARED_CORPUS, "pcap")
    if corpus.is_dir():
        paths += sorted(corpus.iterdir())
    return paths


@pytest.mark.parametrize("chunk", [1, 61, 4096, 1 << 20])
def test_frames_and_batches_equal_a_record_by_record_reading(sound_captures, monkeypatch, chunk):
    monkeypatch.setattr("capture.pcapfile.CHUNK", chunk)
    for path in sound_captures:
        expected = reference_frames(path.read_bytes())
        assert list(read_frames(path)) == expected, path
        assert flattened(path) == expected, path


@pytest.mark.parametrize("chunk", [1, 61, 4096, 1 << 20])
def test_chunks_hold_the_frames_of_the_batches(sound_captures, monkeypatch, chunk):
    monkeypatch.setattr("capture.pcapfile.CHUNK", chunk)
    for path in sound_captures:
        batches = list(read_batches(path))
        chunks = list(read_chunks(path))
        assert len(chunks) == len(batches), path
        for got, batch in zip(chunks, batches):
            if type(got) is not FrameChunk:  # pcapng
                assert got == batch
                continue
            assert got.as_batch() == batch
            assert got.ts_ns.dtype == got.wire_lens.dtype == np.int64
            frames = got.frames()
            assert len(frames) == len(batch.frames) and list(frames) == batch.frames
            assert [frames[i] for i in range(len(frames))] == batch.frames
            rows = np.arange(len(frames))[::-2]
            assert frames.pick(rows) == [batch.frames[i] for i in rows]
            assert list(got.frames(1, 3)) == batch.frames[1:3] == list(frames[1:3])


def test_batches_of_a_pcap_have_one_link_type_and_end_at_each_read(tmp_path, monkeypatch):
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    batches = list(read_batches(path))
    assert [f for b in batches for f in b.frames] == frames
    assert all(b.linktypes == 1 for b in batches)
    sizes = [len(b.frames) for b in batches]
    assert len(batches) > 5 and sizes[0] == complete_records(path, SMALL_CHUNK)


def test_a_record_cut_by_a_read_starts_the_next_read(tmp_path, monkeypatch):
    """Each read of a file after the first starts at the record the read before it cut short
    (those bytes are read again): no batch of one record joined from two reads."""
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    chunks = list(read_chunks(path))
    assert [f for chunk in chunks for f in chunk.frames()] == frames
    offset = 24
    for chunk in chunks:
        assert len(chunk.starts) == complete_records(path, SMALL_CHUNK, offset)
        offset += sum(16 + n for n in chunk.lengths.tolist())
    assert offset == path.stat().st_size
    assert min(len(chunk.starts) for chunk in chunks[:-1]) > 1


def test_each_full_read_asks_the_kernel_for_a_chunk_further_on(tmp_path, monkeypatch):
    """A file not in the page cache is read from disk ahead of the reads: each full read asks
    for the chunk READ_AHEAD past its start (each chunk once, in order)."""
    import os

    import capture.pcapfile as pcapfile

    monkeypatch.setattr(pcapfile, "CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(pcapfile, "READ_AHEAD", 4 * SMALL_CHUNK)
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(
        (offset, length, advice)))
    path, frames = big_capture(tmp_path)
    chunks = list(read_chunks(path))
    assert [f for chunk in chunks for f in chunk.frames()] == frames
    # read k starts at byte 0 (k = 0) or at the first record of chunk k: it asks for the
    # chunk at that start + READ_AHEAD (CHUNK further on than the end of the read); the last
    # read, short of a whole CHUNK, asks for nothing
    starts = [0] + [24 + sum(16 + n for chunk in chunks[:k] for n in chunk.lengths.tolist())
                    for k in range(1, len(chunks))]
    assert advised == [(start + 4 * SMALL_CHUNK, SMALL_CHUNK, os.POSIX_FADV_WILLNEED)
                       for start in starts[:-1]]
    assert len(advised) >= 5


def test_a_pipe_joins_a_cut_record_to_the_bytes_it_misses(tmp_path, monkeypatch):
    """A pipe cannot seek back: a record cut by a read is joined with the rest of it."""
    import os
    import threading

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()))
    writer.start()
    try:
        chunks = list(read_chunks(fifo))
    finally:
        writer.join(10)
    assert [f for chunk in chunks for f in chunk.frames()] == frames
    assert [len(chunk.starts) for chunk in chunks][1::2].count(1) > 3  # the joined records


def test_a_file_cut_before_a_record_read_in_part_ends_with_one_error(tmp_path, monkeypatch):
    """Truncated below the start of the record the last read cut short: the read from that
    record's start finds nothing, which is damage, not the end of the file."""
    import os

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    reader = read_chunks(path)
    first = next(reader)
    cut = 24 + sum(16 + n for n in first.lengths.tolist())  # where the cut record starts
    os.truncate(path, cut - 100)
    with pytest.raises(CaptureFileError, match="cut short"):
        next(reader)


@pytest.mark.parametrize("cut", [3 * SMALL_CHUNK + 5, 3 * SMALL_CHUNK + 24 + 8])
def test_batches_of_a_file_truncated_while_read_end_with_one_error(tmp_path, monkeypatch, cut):
    import os

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    expected = complete_records(path, cut)
    reader = read_batches(path)
    got = list(next(reader).frames)  # the first chunk is read
    os.truncate(path, cut)
    with pytest.raises(CaptureFileError, match="cut short"):
        for batch in reader:
            got += batch.frames
    assert got == frames[:expected] and 0 < expected < len(frames)


def test_pcapng_batches_end_with_the_packets_before_the_damage(tmp_path):
    packets = [epb(0, i, FRAMES[i % 3]) for i in range(5)]
    data = shb() + idb(1) + b"".join(packets) + struct.pack("<III", 6, 7, 0)  # a corrupt length
    path = tmp_path / "bad.pcapng"
    path.write_bytes(data)
    batches = []
    with pytest.raises(CaptureFileError, match="is corrupt"):
        for batch in read_batches(path):
            batches.append(batch)
    assert [b.frames for b in batches] == [[FRAMES[i % 3] for i in range(5)]]
    assert batches[0].linktypes == [1] * 5


# ----------------------------------------------------------------------------- pump of batches
def pumped(items, decode_batch: int, monkeypatch) -> tuple:
    from types import SimpleNamespace

    from capture import __main__ as capture_main
    from capture.batching import RecordBatcher
    from capture.counters import CaptureCounters

    monkeypatch.setattr(capture_main, "DECODE_BATCH", decode_batch)
    monkeypatch.setattr(capture_main, "CHUNK_DECODE_BATCH", decode_batch)
    settings = SimpleNamespace(batch_interval_ms=10**9, stats_interval_s=10**9)
    producer, counters = RecordingProducer(), CaptureCounters()
    error = None
    try:
        capture_main.pump(items, RecordBatcher(12, 100, True, replay=True), producer, counters,
                          settings)
    except CaptureFileError as exc:
        error = str(exc)
    return producer.sent, (counters.frames, counters.bytes, counters.malformed,
                           counters.unsupported_link), error


@pytest.mark.parametrize("size", [7, 1024])
def test_pump_of_batches_equals_pump_of_frames(sound_captures, tmp_path, monkeypatch, size):
    from itertools import chain

    mixed_types = tmp_path / "mixed.pcapng"  # a link type we do not decode, among others
    mixed_types.write_bytes(shb() + idb(147) + idb(1) + b"".join(
        epb(i % 2, i, FRAMES[i % 3]) for i in range(20)))
    paths = [write_pcap(tmp_path / "user.pcap", 147, recs()), *sound_captures[:40], mixed_types]
    frames = pumped(chain.from_iterable(map(read_frames, paths)), size, monkeypatch)
    batches = pumped(chain.from_iterable(map(read_batches, paths)), size, monkeypatch)
    assert frames[1][0] > 1000 and frames[1][2] > 0 and frames[1][3] > 0
    assert batches == frames
    # read in place (classic pcap, among pcapng batches), as `python -m capture --pcap` does
    chunks = pumped(chain.from_iterable(map(read_chunks, paths)), size, monkeypatch)
    assert chunks == frames


def test_pump_of_a_cut_file_delivers_the_frames_before_the_damage(tmp_path, monkeypatch):
    path, frames = big_capture(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 30])
    by_frames = pumped(read_frames(path), 64, monkeypatch)
    by_batches = pumped(read_batches(path), 64, monkeypatch)
    assert by_batches == by_frames
    assert pumped(read_chunks(path), 64, monkeypatch) == by_frames
    assert by_batches[1][0] == len(frames) - 1 and "cut short" in by_batches[2]


# ----------------------------------------------------------------------------- reader process
# `python -m capture --pcap` reads and decodes in a reader process (capture.reader_process):
# it must hand over exactly what read_chunks() and decode_chunk() give in this process.
def assert_same_decoded(got, expected, batch: int, keys: bool = True) -> None:
    """A read_decoded() item equals a read_chunks() item decoded here in batches of `batch`;
    with keys, each batch's flow keys came with it (made by the reader) and are the same."""
    from capture.batch_decode import FLOW_KEY_DTYPE, DecodedBatch, decode_chunk, flow_keys
    from capture.reader_process import DecodedChunk

    if type(expected) is not FrameChunk:  # pcapng
        assert got == expected
        return
    assert type(got) is DecodedChunk
    chunk = got.chunk
    assert chunk.linktype == expected.linktype
    for name in ("lengths", "ts_ns", "wire_lens"):
        assert np.array_equal(getattr(chunk, name), getattr(expected, name)), name
    assert list(chunk.frames()) == list(expected.frames())
    assert [(i, j) for i, j, _ in got.parts] == expected.parts(batch)
    for i, j, decoded in got.parts:
        reference = decode_chunk(expected.buf, expected.starts[i:j], expected.lengths[i:j],
                                 expected.linktype)
        for name in DecodedBatch.COLUMNS:
            assert np.array_equal(getattr(decoded, name), getattr(reference, name)), name
        assert decoded.fallback == reference.fallback
        assert decoded.tuples() == reference.tuples()
        if keys:
            assert decoded.keys is not None and decoded.keys.dtype == FLOW_KEY_DTYPE
            assert decoded.keys.tobytes() == flow_keys(reference).tobytes()
        else:
            assert decoded.keys is None


def decoded_until_error(path, batch: int, pause: float = 0.0) -> tuple[list, str | None]:
    """Every read_decoded() item compared with read_chunks() as it comes (a slot is handed back
    once the next item is asked for); then the error both end with, if any."""
    import time

    from capture.reader_process import read_decoded

    expected, error = list_until_error(read_chunks(path))
    got, count = None, 0
    try:
        for item in read_decoded(path, batch):
            time.sleep(pause)  # the reader runs ahead meanwhile: it must not touch this slot
            assert_same_decoded(item, expected[count], batch)
            count += 1
    except CaptureFileError as exc:
        got = str(exc)
    assert count == len(expected)
    assert got == error
    return expected, error


def list_until_error(items) -> tuple[list, str | None]:
    out = []
    try:
        for item in items:
            out.append(item)
    except CaptureFileError as exc:
        return out, str(exc)
    return out, None


@pytest.mark.parametrize("batch", [7, 16384])
def test_reader_process_hands_over_what_is_read_and_decoded_here(sound_captures, batch):
    for path in sound_captures:
        decoded_until_error(path, batch)


def test_reader_process_inspects_first_payloads_ahead_while_the_capture_process_is_slower(
        tmp_path, monkeypatch):
    """With inspection on, a reader whose capture process holds every slot (it is the slower
    one) inspects each batch's ClientHellos and QUIC Initials ahead: what inspect_ahead()
    gives here; a capture process that keeps up takes none (it would wait for them)."""
    import time

    from capture.flowcache import inspect_ahead
    from capture.reader_process import read_decoded
    from tests.synthetic import write_synthetic_pcap

    monkeypatch.setattr("capture.pcapfile.CHUNK", 1 << 16)
    path = write_synthetic_pcap(tmp_path / "hellos.pcap", 6000, flows=600, real_payloads=True)
    expected, _ = list_until_error(read_chunks(path))
    for pause in (0.05, 0.0):
        learned = []
        for k, item in enumerate(read_decoded(path, 512, inspect=True)):
            time.sleep(pause)  # slower than the reader: it gets no slot back meanwhile
            assert_same_decoded(item, expected[k], 512)
            chunk = expected[k]
            for i, j, decoded in item.parts:
                if decoded.learned is not None:
                    assert decoded.learned == inspect_ahead(decoded, chunk.buf,
                                                            chunk.starts[i:j],
                                                            chunk.lengths[i:j])
                    learned.append(decoded.learned)
        if pause:
            assert len(learned) >= len(expected) - 4  # all but the reads of the first slots
            assert sum(map(len, learned)) > 20
            hello = [v for part in learned for v in part.values()]
            assert {v[0] for v in hello} >= {"TLS", "QUIC"}


def test_reader_process_reuses_its_slots_only_once_handed_back(tmp_path, monkeypatch):
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path, 2000)
    expected, _ = decoded_until_error(path, 64, pause=0.002)
    assert len(expected) > 4 * 4  # several times round the slots


def test_reader_process_sends_a_read_too_big_for_a_slot_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("capture.reader_process.SLOT_BYTES", 2 * SMALL_CHUNK)
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    frames = [bytes([i % 256]) * (60 + i % 90) for i in range(300)]
    frames[100] = b"\x01" * (5 * SMALL_CHUNK)  # a read of its own, bigger than a slot
    path = write_pcap(tmp_path / "big.pcap", 1, [(T0 + i, f, len(f))
                                                 for i, f in enumerate(frames)])
    expected, _ = decoded_until_error(path, 64)
    assert max(len(chunk.buf) for chunk in expected) > 2 * SMALL_CHUNK


@pytest.mark.parametrize("cut", [3 * SMALL_CHUNK + 5, 3 * SMALL_CHUNK + 24 + 8])
def test_reader_process_of_a_cut_file_ends_with_the_same_error(tmp_path, monkeypatch, cut):
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    expected, error = decoded_until_error(path, 64)
    assert expected and "cut short" in error


@pytest.mark.parametrize("content", [b"", b"not a capture at all", b"\x1f\x8b\x08\x00"])
def test_reader_process_of_a_bad_file_fails_at_once(tmp_path, content):
    from capture.reader_process import read_decoded

    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureFileError) as raised:
        next(read_decoded(path, 64))
    with pytest.raises(CaptureFileError) as reference:
        next(read_chunks(path))
    assert str(raised.value) == str(reference.value)


def child_pids() -> set[int]:
    """The child processes of this process (the broker and Redis of other tests among them)."""
    import os

    children = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
            children.update(int(pid) for pid in fh.read().split())
    return children


def started_reader(tmp_path, monkeypatch) -> tuple:
    """read_decoded() of a capture of many reads, its first item taken; and the reader's pid."""
    from capture.reader_process import read_decoded

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, _frames = big_capture(tmp_path, 2000)
    before = child_pids()
    reader = read_decoded(path, 64)
    next(reader)
    (pid,) = child_pids() - before
    return reader, pid


def test_reader_process_killed_ends_the_reading_with_one_error(tmp_path, monkeypatch):
    import os
    import signal

    reader, pid = started_reader(tmp_path, monkeypatch)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(CaptureFileError, match="killed by signal 9"):
        for _ in reader:
            pass


def test_reader_process_stops_when_the_reading_is_given_up(tmp_path, monkeypatch):
    import os

    reader, pid = started_reader(tmp_path, monkeypatch)
    reader.close()
    assert not os.path.exists(f"/proc/{pid}")  # ended and reaped, not a zombie


def test_a_fault_in_the_reader_process_is_reported_with_its_traceback(tmp_path, monkeypatch,
                                                                      caplog):
    from capture import reader_process

    original, calls = reader_process.decode_chunk, []

    def failing(*args):
        calls.append(1)
        if len(calls) > 2:
            raise ValueError("decoder fault")
        return original(*args)

    monkeypatch.setattr(reader_process, "decode_chunk", failing)  # (before the fork)
    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path)
    got = []
    with pytest.raises(CaptureFileError, match="reading failed: ValueError: decoder fault"):
        for item in reader_process.read_decoded(path, 1 << 20):  # a decoding a read
            got += list(item.chunk.frames())
    first_two = sum(len(chunk.starts) for chunk in list(read_chunks(path))[:2])
    assert got == frames[:first_two]
    assert "Traceback" in caplog.text and "decoder fault" in caplog.text


@pytest.mark.parametrize("size", [7, 1024])
def test_pump_of_what_the_reader_process_decoded_equals_pump_of_frames(
        sound_captures, tmp_path, monkeypatch, size):
    from itertools import chain

    from capture.reader_process import read_decoded

    paths = [write_pcap(tmp_path / "user.pcap", 147, recs()), *sound_captures[:40]]
    frames = pumped(chain.from_iterable(map(read_frames, paths)), size, monkeypatch)
    decoded = pumped(chain.from_iterable(read_decoded(path, size) for path in paths), size,
                     monkeypatch)
    assert frames[1][0] > 1000
    assert decoded == frames
    path, _ = big_capture(tmp_path)
    path.write_bytes(path.read_bytes()[:-30])  # cut: the frames before the damage, the error
    assert pumped(read_decoded(path, 64), 64, monkeypatch) == pumped(read_frames(path), 64,
                                                                   monkeypatch)


def test_without_a_reader_process_the_file_is_read_here_alike(tmp_path, monkeypatch, caplog):
    """fork() refused (no memory or processes to spare): the same items, read in-process."""
    import os

    from capture.reader_process import read_decoded

    def refused():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("capture.pcapfile.CHUNK", SMALL_CHUNK)
    path, frames = big_capture(tmp_path, 1000)
    fds_before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", refused)
    expected, _ = list_until_error(read_chunks(path))
    got = list(read_decoded(path, 64))
    assert len(got) == len(expected) > 4
    for item, chunk in zip(got, expected):
        assert_same_decoded(item, chunk, 64, keys=False)  # (made by the batcher, as before)
    assert "no reader process: Resource temporarily unavailable" in caplog.text
    assert len(os.listdir("/proc/self/fd")) == fds_before  # its pipes closed


def test_a_failure_inspecting_ahead_leaves_the_inspection_to_the_capture_process(
        tmp_path, monkeypatch, capfd):
    """inspect_ahead() only saves the capture process work: if it fails (a bug), the reader
    says so once and goes on without it, and every read still comes over whole."""
    import logging
    import sys
    import time

    from capture.reader_process import read_decoded
    from tests.synthetic import write_synthetic_pcap

    def broken(*_args):
        raise ValueError("broken on purpose")

    monkeypatch.setattr("capture.reader_process.inspect_ahead", broken)
    monkeypatch.setattr("capture.pcapfile.CHUNK", 1 << 16)
    path = write_synthetic_pcap(tmp_path / "hellos.pcap", 3000, flows=300, real_payloads=True)
    expected, _ = list_until_error(read_chunks(path))
    count = 0
    # (the reader's log lines reach the file descriptor, as the service logs to stderr)
    handler = logging.StreamHandler(sys.stderr)
    reader_log = logging.getLogger("capture.reader_process")
    reader_log.addHandler(handler)
    try:
        for k, item in enumerate(read_decoded(path, 512, inspect=True)):
            time.sleep(0.05)  # the capture process is the slower one: the reader inspects ahead
            assert_same_decoded(item, expected[k], 512)
            assert all(decoded.learned is None for _i, _j, decoded in item.parts)
            count += 1
    finally:
        reader_log.removeHandler(handler)
    assert count == len(expected) > 4
    assert capfd.readouterr().err.count("inspecting ahead failed") == 1
