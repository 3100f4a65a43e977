"""Ring blocks read by numpy (capture.live.block_batch) give the frames the per-frame reader
(block_frames) gives, value for value: blocks laid out as the kernel lays out TPACKET_V3 blocks
(tpacket3_hdr, sockaddr_ll, frames one after the other at 16-byte aligned offsets), with the
cases that take the per-frame path (VLAN tags the kernel took off, both kinds of link in one
block) and random ones. The ring on this machine's kernel is tested in
tests/integration/test_live_ring.py."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from capture.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW
from capture.live import (
    ARPHRD_ETHER,
    ARPHRD_LOOPBACK,
    FRAME_HDR,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    block_batch,
    block_frames,
)
from capture.pcapfile import FrameBatch, FrameChunk, frames_of

ARPHRD_NONE = 0xFFFE  # tun
MAC_OFFSET = 66  # where the kernel puts an Ethernet frame after its headers (a 2-byte pad)


def make_block(frames: list[dict], first: int = 48) -> tuple[bytes, list[int]]:
    """A block holding `frames` (dicts of sec, nsec, len, status, tci, tpid, hatype, data,
    mac), each header at a 16-byte aligned offset after the one before; and those offsets."""
    block = bytearray(first)
    offsets = []
    for k, f in enumerate(frames):
        offset = len(block)
        mac = f.get("mac", MAC_OFFSET)
        size = -(-(mac + len(f["data"])) // 16) * 16
        last = k == len(frames) - 1
        header = FRAME_HDR.pack(0 if last else size, f["sec"], f["nsec"], len(f["data"]),
                                f["len"], f["status"], mac, f["tci"], f["tpid"], f["hatype"])
        block += header + bytes(mac - len(header)) + f["data"]
        block += bytes(offset + size - len(block))
        offsets.append(offset)
    return bytes(block), offsets


def frame(rnd: random.Random, **over) -> dict:
    data = rnd.randbytes(rnd.choice([14, 42, 60, 106, 1514, rnd.randrange(1, 9000)]))
    f = {"sec": rnd.randrange(2**32), "nsec": rnd.randrange(10**9), "status": 1,
         "tci": rnd.randrange(2**16), "tpid": rnd.choice([0x8100, 0x88A8]),
         "hatype": ARPHRD_ETHER, "data": data}
    f["len"] = len(data) + rnd.choice([0, 0, 0, 4, 1000])  # snapped frames too
    f.update(over)
    return f


def batch_frames(batch) -> list[tuple]:
    """(ts_ns, wire_len, frame, linktype) of each frame of a FrameChunk or FrameBatch."""
    return list(frames_of(batch))


def test_a_block_of_ethernet_frames_is_read_in_place():
    rnd = random.Random(1)
    frames = [frame(rnd, hatype=rnd.choice([ARPHRD_ETHER, ARPHRD_LOOPBACK])) for _ in range(500)]
    block, offsets = make_block(frames)
    batch = block_batch(block, offsets)
    assert type(batch) is FrameChunk and batch.linktype == LINKTYPE_ETHERNET
    assert batch.buf is block  # the frames are not copied
    expected = [(f["sec"] * 10**9 + f["nsec"], f["len"], f["data"], LINKTYPE_ETHERNET)
                for f in frames]
    assert batch_frames(batch) == block_frames(block, offsets) == expected
    assert batch.ts_ns.dtype == batch.wire_lens.dtype == batch.lengths.dtype == np.int64


def test_a_block_of_frames_without_a_link_header_is_raw_ip():
    rnd = random.Random(2)
    frames = [frame(rnd, hatype=ARPHRD_NONE, mac=48 + rnd.choice([16, 32])) for _ in range(50)]
    block, offsets = make_block(frames)
    batch = block_batch(block, offsets)
    assert type(batch) is FrameChunk and batch.linktype == LINKTYPE_RAW
    assert batch_frames(batch) == block_frames(block, offsets)
    assert [f for _, _, f, _ in block_frames(block, offsets)] == [f["data"] for f in frames]


def test_tags_the_kernel_took_off_are_put_back_frame_by_frame():
    rnd = random.Random(3)
    frames = [frame(rnd) for _ in range(20)]
    frames[7]["status"] |= TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID
    frames[9]["status"] |= TP_STATUS_VLAN_VALID  # no TPID given: 802.1Q
    frames[9]["data"] = bytes(range(20))
    block, offsets = make_block(frames)
    batch = block_batch(block, offsets)
    assert type(batch) is FrameBatch
    got = batch_frames(batch)
    assert got == block_frames(block, offsets)
    f = frames[7]
    assert got[7][2] == f["data"][:12] + struct.pack("!HH", f["tpid"], f["tci"]) + f["data"][12:]
    assert got[7][1] == f["len"] + 4
    assert got[9][2][12:16] == struct.pack("!HH", 0x8100, frames[9]["tci"])
    assert [g[2] for k, g in enumerate(got) if k not in (7, 9)] == [
        f["data"] for k, f in enumerate(frames) if k not in (7, 9)]


def test_a_block_with_both_kinds_of_link_goes_frame_by_frame():
    rnd = random.Random(4)
    frames = [frame(rnd, hatype=rnd.choice([ARPHRD_ETHER, ARPHRD_NONE])) for _ in range(40)]
    block, offsets = make_block(frames)
    batch = block_batch(block, offsets)
    assert type(batch) is FrameBatch
    assert batch_frames(batch) == block_frames(block, offsets)
    assert {lt for _, _, _, lt in batch_frames(batch)} == {LINKTYPE_ETHERNET, LINKTYPE_RAW}


@pytest.mark.parametrize("seed", range(30))
def test_random_blocks_read_by_numpy_equal_frame_by_frame(seed):
    rnd = random.Random(seed)
    kinds = rnd.choice([[ARPHRD_ETHER], [ARPHRD_LOOPBACK, ARPHRD_ETHER], [ARPHRD_NONE],
                        [ARPHRD_ETHER, ARPHRD_NONE]])
    tagged = rnd.random() < 0.3
    frames = []
    for _ in range(rnd.randrange(1, 300)):
        f = frame(rnd, hatype=rnd.choice(kinds), mac=rnd.choice([MAC_OFFSET, 80, 130]))
        if tagged and rnd.random() < 0.1:
            f["status"] |= TP_STATUS_VLAN_VALID | rnd.choice([0, TP_STATUS_VLAN_TPID_VALID])
        frames.append(f)
    block, offsets = make_block(frames, first=rnd.choice([48, 64, 96]))
    assert batch_frames(block_batch(block, offsets)) == block_frames(block, offsets)
