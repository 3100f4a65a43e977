"""capture.batch_decode against the reference decode_frame: every field of every frame.

Differential: crafted captures (tests/captures.py), the real corpus captures (when present),
and tens of thousands of random and mutated frames (bit flips, truncations, VLAN stacks,
lying lengths, every fast link type), decoded in batches and one by one.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from capture import batch_decode
from capture.batch_decode import (
    FAST_LINKTYPES,
    decode_batch,
    decode_batch_frames,
    decode_chunk,
    flow_keys,
)
from capture.decode import decode_frame
from capture.flowcache import FlowCache
from capture.pcapfile import CaptureFileError, read_frames
from packet_records import FLAG_TRUNCATED, RECORD
from tests.captures import write_captures

CORPUS = Path(os.path.dirname(__file__), "..", "..", "..", "shared", "corpus", "ndpi", "pcap")
FIELDS = ("ip_version", "ip_proto", "src", "dst", "sport", "dport", "tcp_flags", "flags",
          "frag_id", "l4_off", "ip_end")
ETH, SLL, SLL2, RAW, NULL, PPP, PPI = 1, 113, 276, 101, 0, 9, 192


def check(frames: list[bytes], linktypes, where: str = "") -> np.ndarray:
    """Decode in one batch and one by one; compare every field (the tuples and the columns).
    Returns the mask of the frames decoded by the batch path itself."""
    per_frame = linktypes if not isinstance(linktypes, int) else [linktypes] * len(frames)
    result = decode_batch(frames, linktypes)
    got = result.tuples()
    assert len(got) == len(frames)
    for i, (frame, lt, mine) in enumerate(zip(frames, per_frame, got)):
        ref = decode_frame(frame, lt)
        if mine != ref:
            diff = [f"{name}: batch {a!r} != ref {b!r}"
                    for name, a, b in zip(FIELDS, mine, ref) if a != b]
            pytest.fail(f"{where} frame {i} (linktype {lt}, fast={bool(result.fast[i])}, "
                        f"{frame[:96].hex()}): {'; '.join(diff)}")
        assert [type(x) for x in mine] == [type(x) for x in ref]
        # the columns say the same as the tuple
        assert result.ip_version[i] == ref[0] and result.ip_proto[i] == ref[1]
        assert result.src[i].tobytes() == ref[2] and result.dst[i].tobytes() == ref[3]
        assert (result.sport[i], result.dport[i], result.tcp_flags[i]) == ref[4:7]
        assert (result.flags[i], result.frag_id[i], result.l4_off[i], result.ip_end[i]) == ref[7:]
        assert result.caplen[i] == len(frame)
    assert decode_batch_frames(frames, linktypes) == got
    picked = list(range(len(frames)))[::-3]
    assert result.tuples(picked) == [got[i] for i in picked]
    lazy = result.lazy_tuples(np.array(picked, dtype=np.intp))
    for k in (list(range(len(picked))) if len(picked) < 300 else range(0, len(picked), 7)):
        assert lazy[k] == got[picked[k]]
        assert [type(x) for x in lazy[k]] == [type(x) for x in got[picked[k]]]
    return result.fast


# ------------------------------------------------------------------ frame builders (struct)
MAC = bytes.fromhex("02000000000b02000000000a")


def ipv4(proto: int, l4: bytes, *, options: bytes = b"", frag: int = 0x4000,
         total: int | None = None, ident: int = 0x1234) -> bytes:
    ihl = 5 + len(options) // 4
    size = 4 * ihl + len(l4) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, size, ident, frag, 64, proto, 0,
                       bytes([192, 0, 2, 10]), bytes([198, 51, 100, 20])) + options + l4


def ipv6(nh: int, l4: bytes, plen: int | None = None) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(l4) if plen is None else plen, nh, 64,
                       bytes.fromhex("20010db8" + "00" * 11 + "10"),
                       bytes.fromhex("20010db8" + "00" * 11 + "20")) + l4


def tcp(sport: int, dport: int, flags: int = 0x18, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(payload: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + payload


def eth(ethertype: int, l3: bytes, tags: tuple[int, ...] = ()) -> bytes:
    out = MAC
    for tpid in tags:
        out += struct.pack("!HH", tpid, 100)
    return out + struct.pack("!H", ethertype) + l3


def sll(ethertype: int, l3: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, bytes.fromhex("02000000000a0000"), ethertype) + l3


def sll2(ethertype: int, l3: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6,
                       bytes.fromhex("02000000000a0000")) + l3


def l3_variants(rnd: random.Random) -> list[tuple[int, bytes]]:
    """(EtherType, L3 packet) of every kind the batch path decodes or must hand over."""
    payload = bytes(rnd.randrange(256) for _ in range(rnd.choice((0, 1, 7, 40, 300))))
    sp, dp = rnd.randrange(65536), rnd.choice((53, 80, 443, 4789, 2152, 3544, rnd.randrange(65536)))
    opts = bytes(rnd.randrange(256) for _ in range(4 * rnd.randrange(1, 11)))
    v4 = [ipv4(6, tcp(sp, dp, rnd.randrange(256), payload)), ipv4(17, udp(sp, dp, payload)),
          ipv4(1, icmp(payload)), ipv4(132, udp(sp, dp)), ipv4(136, udp(sp, dp)),
          ipv4(rnd.randrange(256), payload),
          ipv4(6, tcp(sp, dp), options=opts), ipv4(17, udp(sp, dp, payload), options=opts),
          ipv4(17, udp(sp, dp, payload), frag=0x2000), ipv4(17, payload, frag=0x0010),
          ipv4(6, tcp(sp, dp), frag=0),
          ipv4(4, ipv4(6, tcp(sp, dp))), ipv4(41, ipv6(17, udp(sp, dp))),
          ipv4(47, struct.pack("!HH", 0, 0x0800) + ipv4(17, udp(sp, dp))),
          ipv4(17, udp(sp, 4789, b"\x08\0\0\0\0\0\0\0" + eth(0x0800, ipv4(6, tcp(1, 2))))),
          ipv4(6, tcp(sp, dp), total=rnd.choice((0, 10, 19, 20, 21, 40, 65535)))]
    v6 = [ipv6(6, tcp(sp, dp, rnd.randrange(256), payload)), ipv6(17, udp(sp, dp, payload)),
          ipv6(58, icmp(payload)), ipv6(rnd.randrange(256), payload),
          ipv6(0, b"\x11\0" + bytes(6) + udp(sp, dp)), ipv6(44, b"\x11\0\0\x01" + bytes(4)
                                                          + udp(sp, dp)),
          ipv6(60, b"\x06\0" + bytes(6) + tcp(sp, dp)), ipv6(41, ipv6(6, tcp(sp, dp))),
          ipv6(4, ipv4(17, udp(sp, dp))),
          ipv6(6, tcp(sp, dp), plen=rnd.choice((0, 1, 20, 65535)))]
    arp = bytes.fromhex("0001080006040001") + MAC[6:] + bytes(4) + bytes(10)
    other = [(0x0806, arp), (0x88CC, payload), (0x8864, b"\x11\0\0\x01\0\x16\0\x21"
                                                 + ipv4(17, udp(sp, dp))),
             (0x8847, b"\0\x01\x01\x40" + ipv4(6, tcp(sp, dp))), (rnd.randrange(65536), payload)]
    return [(0x0800, p) for p in v4] + [(0x86DD, p) for p in v6] + other


def valid_frames(rnd: random.Random) -> list[tuple[bytes, int]]:
    out = []
    tpids = (0x8100, 0x88A8, 0x9100, 0x9200)
    for ethertype, l3 in l3_variants(rnd):
        tags = tuple(rnd.choice(tpids) for _ in range(rnd.choice((0, 0, 1, 2, 3))))
        out.append((eth(ethertype, l3, tags), ETH))
        if rnd.random() < 0.3:
            out.append((sll(ethertype, l3), SLL))
        if rnd.random() < 0.3:
            out.append((sll2(ethertype, l3), SLL2))
        if ethertype in (0x0800, 0x86DD) and rnd.random() < 0.3:
            out.append((l3, rnd.choice((RAW, 12, 14, 228, 229))))
    return out


def mutate(rnd: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    kind = rnd.random()
    if kind < 0.45 and data:  # bit flips, mostly in the headers
        for _ in range(rnd.choice((1, 1, 2, 3, 8))):
            pos = rnd.randrange(min(len(data), 100))
            data[pos] ^= 1 << rnd.randrange(8)
    elif kind < 0.75:  # cut anywhere (most often inside the headers)
        del data[rnd.randrange(min(len(data), 100) + 1):]
    elif kind < 0.9 and data:  # a random byte
        data[rnd.randrange(min(len(data), 100))] = rnd.randrange(256)
    else:  # both
        if data:
            data[rnd.randrange(min(len(data), 100))] = rnd.randrange(256)
        del data[rnd.randrange(len(data) + 1):]
    return bytes(data)


# ------------------------------------------------------------------ the tests
def test_crafted_captures(tmp_path):
    frames, types = [], []
    for name, path in sorted(write_captures(tmp_path).items()):
        items = list(read_frames(path))
        check([f for _, _, f, _ in items], [lt for *_, lt in items], name)
        frames += [f for _, _, f, _ in items]
        types += [lt for *_, lt in items]
    # all files in one batch of mixed link types, and in small batches
    check(frames, types, "all crafted")
    for i in range(0, len(frames), 7):
        check(frames[i:i + 7], types[i:i + 7], f"crafted from {i}")


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")
def test_corpus_captures():
    paths = sorted(p for p in CORPUS.iterdir() if p.suffix in (".pcap", ".pcapng", ".cap"))
    assert paths
    total = fast = 0
    for path in paths:
        items = []
        try:
            items.extend(read_frames(path))
        except CaptureFileError:
            pass  # a damaged file: the frames before the damage still count
        for i in range(0, len(items), 1024):
            chunk = items[i:i + 1024]
            got = check([f for _, _, f, _ in chunk], [lt for *_, lt in chunk], path.name)
            total += len(chunk)
            fast += int(got.sum())
    assert total > 1000 and fast > 0


def test_valid_frames_take_the_fast_path():
    rnd = random.Random(1)
    sp, dp = 40000, 443
    frames = [eth(0x0800, ipv4(6, tcp(sp, dp))), eth(0x0800, ipv4(17, udp(sp, 53))),
              eth(0x0800, ipv4(1, icmp())), eth(0x86DD, ipv6(6, tcp(sp, dp, 0x02))),
              eth(0x86DD, ipv6(17, udp(sp, dp))), eth(0x86DD, ipv6(58, icmp())),
              eth(0x0800, ipv4(6, tcp(sp, dp)), (0x8100,)),
              eth(0x86DD, ipv6(17, udp(sp, dp)), (0x88A8, 0x8100)),
              eth(0x0800, ipv4(6, tcp(sp, dp), options=bytes(40))),
              eth(0x0800, ipv4(6, tcp(sp, dp))[:20 + 13]),  # TCP cut before its flags
              eth(0x0806, bytes(28)), eth(0x0800, ipv4(6, tcp(sp, dp)) + bytes(20))]  # padding
    fast = check(frames, ETH)
    assert fast.all()
    assert check([f[14:] for f in frames[:6]], RAW).all()
    assert check([sll(0x0800, ipv4(17, udp(sp, dp)))] * 3, SLL).all()
    assert check([sll2(0x86DD, ipv6(6, tcp(sp, dp)))] * 3, SLL2).all()
    # handed over: fragments, extension headers, tunnels, a third tag, PPPoE, MPLS
    slow = [eth(0x0800, ipv4(17, udp(sp, dp), frag=0x2000)),
            eth(0x86DD, ipv6(0, b"\x11\0" + bytes(6) + udp(sp, dp))),
            eth(0x0800, ipv4(17, udp(sp, 4789, bytes(8)))),
            eth(0x0800, ipv4(4, ipv4(6, tcp(sp, dp)))),
            eth(0x0800, ipv4(6, tcp(sp, dp)), (0x8100, 0x8100, 0x8100)),
            eth(0x8864, bytes(8)), eth(0x8847, bytes(8)), b"", MAC]
    assert not check(slow, ETH).any()
    assert rnd  # deterministic


@pytest.mark.parametrize("batch", [1, 2, 256, 4096])
def test_random_and_mutated_frames(batch):
    rnd = random.Random(batch)
    frames: list[tuple[bytes, int]] = []
    while len(frames) < 6000:
        for frame, lt in valid_frames(rnd):
            frames.append((frame, lt))
            for _ in range(2):
                frames.append((mutate(rnd, frame), lt))
    for _ in range(1000):  # random bytes, under every link type (fast or not)
        size = rnd.choice((0, 1, 13, 14, 15, 20, 33, 34, 54, 60, 100, rnd.randrange(200)))
        lt = rnd.choice(sorted(FAST_LINKTYPES) + [NULL, PPP, PPI, 147, 0xFFFF])
        frames.append((bytes(rnd.randrange(256) for _ in range(size)), lt))
    rnd.shuffle(frames)
    fast = 0
    for i in range(0, len(frames), batch):
        chunk = frames[i:i + batch]
        lts = [lt for _, lt in chunk]
        if len(set(lts)) == 1 and rnd.random() < 0.5:
            lts = lts[0]  # one link type for the whole batch
        fast += int(check([f for f, _ in chunk], lts, f"batch {i}").sum())
    assert len(frames) >= 7000
    assert fast > len(frames) // 4  # the fast path did most of the common frames


def test_empty_batch():
    assert decode_batch_frames([], ETH) == []
    assert len(decode_batch([], [])) == 0
    assert len(decode_chunk(b"", np.zeros(0, np.int64), np.zeros(0, np.int64), ETH)) == 0


def in_a_read(frames: list[bytes], rnd: random.Random, tail: int) -> tuple:
    """The frames as a read of a capture file holds them: each after 16 bytes of record
    header (random bytes here), the last one followed by `tail` bytes of the next record."""
    parts, starts, pos = [], [], 0
    for frame in frames:
        parts += [rnd.randbytes(16), frame]
        starts.append(pos + 16)
        pos += 16 + len(frame)
    parts.append(rnd.randbytes(tail))
    return (b"".join(parts), np.array(starts, dtype=np.int64),
            np.array([len(f) for f in frames], dtype=np.int64))


def check_chunk(frames: list[bytes], linktype: int, rnd: random.Random, tail: int) -> None:
    """decode_chunk() of frames in a read gives decode_batch() of the same frames, every
    column (whatever lies between and after the frames)."""
    buf, starts, lengths = in_a_read(frames, rnd, tail)
    got, ref = decode_chunk(buf, starts, lengths, linktype), decode_batch(frames, linktype)
    assert got.tuples() == ref.tuples()
    for name in FIELDS + ("caplen",):
        assert (getattr(got, name) == getattr(ref, name)).all(), name
    # a frame within reach of the end of a read goes to decode_frame (nothing is read past
    # it; a short read is copied with zeros after it instead)
    reach = batch_decode._PAD  # how far from its start a frame's fields may be read
    if len(buf) >= 4 * reach:
        assert not (got.fast & (starts > len(buf) - reach)).any()
    assert [i for i, _ in got.fallback] == np.flatnonzero(~got.fast).tolist()


@pytest.mark.parametrize("tail", [0, 5, 200])
def test_frames_decoded_in_place_in_a_read(tail):
    rnd = random.Random(tail)
    frames: list[tuple[bytes, int]] = []
    while len(frames) < 4000:
        for frame, lt in valid_frames(rnd):
            frames.append((frame, lt))
            frames.append((mutate(rnd, frame), lt))
    by_type: dict[int, list[bytes]] = {}
    for frame, lt in frames:
        by_type.setdefault(lt, []).append(frame)
    by_type[PPP] = [f for f, _ in frames[:50]]  # a link type decode_frame alone knows
    for lt, group in by_type.items():
        for size in (1, 2, 7, 300, len(group)):
            for i in range(0, min(len(group), 3 * size), size):
                check_chunk(group[i:i + size], lt, rnd, tail)
        # short frames at the very end of the read, and reads shorter than the windows
        short = [f[:rnd.randrange(1, 60)] for f in group[:40] if f]
        check_chunk(group[:20] + short, lt, rnd, tail)
        for frame in short[:10]:
            check_chunk([frame], lt, rnd, tail)


def test_records_match_the_batchers_packing(tmp_path):
    """records() gives, byte for byte, what RecordBatcher.add packs with RECORD.pack (before
    the flow's app label and a later fragment's ports, which the batcher supplies)."""
    rnd = random.Random(5)
    items = [item for path in sorted(write_captures(tmp_path).values())
             for item in read_frames(path)]
    for frame, lt in valid_frames(rnd) * 3:
        frame = mutate(rnd, frame) if rnd.random() < 0.5 else frame
        items.append((rnd.randrange(1 << 62), len(frame) + rnd.choice((0, 0, 1, 1500)), frame, lt))
    ts, wire, frames, types = (list(column) for column in zip(*items))
    result = decode_batch(frames, types)
    apps = [rnd.randrange(256) for _ in frames]
    app_flags = [rnd.randrange(2) for _ in frames]
    block = result.records(np.array(ts), np.array(wire), np.array(apps), np.array(app_flags))
    expected = b"".join(
        RECORD.pack(t, w, d[0], d[1], d[6], d[7] | (FLAG_TRUNCATED if len(f) < w else 0),
                    d[4], d[5], d[2], d[3], app, fl, 0)
        for f, lt, t, w, d, app, fl in zip(frames, types, ts, wire, result.tuples(), apps,
                                            app_flags))
    assert block.tobytes() == expected
    assert any(len(f) < w for f, w in zip(frames, wire))


def test_flow_keys_are_the_flow_cache_keys():
    """flow_keys() orders every frame's (address, port) pairs as FlowCache.get does, and each
    row's bytes are the key it files the flow under (random addresses, equal addresses,
    equal ports, both orders)."""
    rnd = random.Random(9)
    frames = [f for f, lt in valid_frames(rnd) * 20 if lt == ETH]
    frames += [eth(0x0800, ipv4(17, udp(p, q))) for p, q in ((5, 5), (7, 3), (3, 7))]
    frames += [eth(0x86DD, ipv6(6, tcp(rnd.randrange(65536), rnd.randrange(65536))))
               for _ in range(50)]
    frames += [eth(0x0800, ipv4(6, tcp(40000, 443))), eth(0x0800, ipv4(6, tcp(443, 40000)))] * 5
    result = decode_batch(frames, ETH)
    # random addresses too: write them into the columns (both orders, some equal)
    extra = decode_batch([eth(0x0800, ipv4(6, tcp(1, 2)))] * 400, ETH)
    extra.src[:] = np.frombuffer(rnd.randbytes(400 * 16), dtype=np.uint8).reshape(400, 16)
    extra.dst[:] = extra.src[::-1]
    extra.dst[::4] = extra.src[::4]
    extra.sport[:] = [rnd.randrange(65536) for _ in range(400)]
    extra.dport[:] = [rnd.choice((int(extra.sport[i]), rnd.randrange(65536))) for i in range(400)]
    extra.ip_proto[:] = [rnd.randrange(256) for _ in range(400)]
    for batch in (result, extra):
        keys = flow_keys(batch)
        rows = keys.view(f"V{keys.dtype.itemsize}").tolist()
        cache = FlowCache(12, False)
        for key, row, (_, proto, src, dst, sport, dport, *_rest) in zip(keys.tolist(), rows,
                                                                       batch.tuples()):
            if src < dst or (src == dst and sport <= dport):
                assert key == (proto, src, sport, dst, dport)
            else:
                assert key == (proto, dst, dport, src, sport)
            flow = cache.get(proto, src, sport, dst, dport)
            assert cache.flows[row] is flow is cache.get(proto, dst, dport, src, sport)
    assert len(flow_keys(decode_batch([], ETH))) == 0
