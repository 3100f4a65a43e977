"""The live source's TPACKET_V3 ring on this machine's kernel: lo's outgoing copies dropped in the
kernel, drops counted exactly when the ring is full, whole big frames, VLAN tags the kernel took
off put back, capture timestamps."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.live]

PAYLOAD = 100
WIRE = 14 + 20 + 8 + PAYLOAD  # Ethernet header on lo + IPv4 + UDP + payload


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.fail("live capture needs root or CAP_NET_RAW (make test runs as root here)")


def read_until_idle(source, idle_polls: int = 5, limit_s: float = 30) -> list[tuple]:
    out, idle, deadline = [], 0, time.monotonic() + limit_s
    for item in source.frames(idle_timeout=0.1):
        if item is None:
            idle += 1
            if idle >= idle_polls or time.monotonic() > deadline:
                return out
            continue
        idle = 0
        out.append(item)
        if time.monotonic() > deadline:  # lo is shared: never wait for it to go quiet for long
            return out


def send(port: int, count: int, payload: int = PAYLOAD) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(count):
            sender.sendto(bytes(payload), ("127.0.0.1", port))


def udp_dport(frame: bytes) -> int:
    """The UDP destination port of an Ethernet/IPv4 (no options) frame, else -1: lo carries
    other traffic too, whose bytes may hold our port number at that offset."""
    if len(frame) < 42 or frame[12:15] != b"\x08\x00\x45" or frame[23] != 17:
        return -1
    return struct.unpack_from("!H", frame, 14 + 20 + 2)[0]


@pytest.mark.parametrize("iface", ["lo", ""])
def test_loopback_outgoing_copies_are_dropped_in_the_kernel(receiver, iface):
    """The kernel's own count of frames that passed the socket's program equals what was sent,
    not twice as much: the outgoing copies never reach the ring."""
    from capture.live import LiveSource

    port = receiver.getsockname()[1]
    source = LiveSource(iface, f"udp and dst port {port}", 8)
    try:
        source.read_drops()  # from zero
        send(port, 700)
        got = read_until_idle(source)
        assert source.read_drops() == 0
    finally:
        source.close()
    assert len(got) == 700
    assert source.kernel_packets == 700 and source.kernel_drops == 0


def test_without_a_filter_each_loopback_frame_is_read_once(receiver):
    """No BPF_FILTER: the socket still runs the pkttype check (lo carries other traffic too, so
    only our datagrams are counted)."""
    from capture.live import LiveSource

    port = receiver.getsockname()[1]
    source = LiveSource("lo", "", 8)
    try:
        send(port, 300)
        got = read_until_idle(source, limit_s=5)
    finally:
        source.close()
    mine = [item for item in got if udp_dport(item[2]) == port]
    assert len(mine) == 300
    assert {(wire, len(frame)) for _ts, wire, frame, _lt in mine} == {(WIRE, WIRE)}


def test_a_full_ring_counts_every_frame_it_drops(receiver):
    """A 1 MiB ring nobody reads while 20,000 frames arrive: what is read plus what the kernel
    reports dropped is exactly what was sent."""
    from capture.live import LiveSource

    port = receiver.getsockname()[1]
    source = LiveSource("lo", f"udp and dst port {port}", 1)
    try:
        assert source.block_size * source.blocks == 1024 * 1024
        send(port, 20_000)
        time.sleep(0.2)
        got = read_until_idle(source)
        source.read_drops()
    finally:
        source.close()
    assert source.kernel_drops > 0 and source.kernel_freezes > 0
    assert len(got) + source.kernel_drops == 20_000
    assert source.kernel_packets == 20_000
    assert all(udp_dport(frame) == port for _ts, _w, frame, _lt in got)


def test_big_frames_whole_and_timestamps_are_capture_times(receiver):
    from capture.decode import LINKTYPE_ETHERNET
    from capture.live import LiveSource

    port = receiver.getsockname()[1]
    source = LiveSource("lo", f"udp and dst port {port}", 8)
    try:
        before = time.time_ns()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for size in (0, 1, 1500, 9000, 60000):
                sender.sendto(bytes([size % 251]) * size, ("127.0.0.1", port))
        after = time.time_ns()
        got = read_until_idle(source)
    finally:
        source.close()
    assert [wire for _ts, wire, _f, _lt in got] == [42 + n for n in (0, 1, 1500, 9000, 60000)]
    for (ts, wire, frame, linktype), size in zip(got, (0, 1, 1500, 9000, 60000), strict=True):
        assert len(frame) == wire and linktype == LINKTYPE_ETHERNET
        assert frame[42:] == bytes([size % 251]) * size
        assert before <= ts <= after


@pytest.fixture
def veth_pair():
    """Two ends of a veth pair, up, without addresses (raw frames only); gone afterwards."""
    a, b = f"dpiva{os.getpid() % 10000}", f"dpivb{os.getpid() % 10000}"
    made = subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no veth here: {made.stderr.strip()}")
    try:
        for name in (a, b):
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        yield a, b
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True)


def test_vlan_tags_the_kernel_took_off_are_put_back(veth_pair, monkeypatch):
    """A tagged frame sent into a veth arrives at its peer with the tag moved out of the frame
    (skb vlan_tci; the ring's hv1 fields): the frame read is the frame sent, tag included, and
    the wire length counts it."""
    import capture.live as live

    class CountingTag:
        calls = 0

        @classmethod
        def pack(cls, tpid, tci):
            cls.calls += 1
            return struct.pack("!HH", tpid, tci)

    monkeypatch.setattr(live, "VLAN_TAG", CountingTag)
    tx_name, rx_name = veth_pair
    ethertype = 0x88B5  # IEEE local experimental: nothing else on the link sends it
    frames = [b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02" + struct.pack("!HHH", tpid, tci, ethertype)
              + bytes([i]) * 46 for i, (tpid, tci) in
              enumerate([(0x8100, 0x2005), (0x8100, 0x0FFF), (0x88A8, 0x0007)])]
    source = live.LiveSource(rx_name, f"ether[16:2] = {ethertype} or ether[12:2] = {ethertype}",
                             4)
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as tx:
            tx.bind((tx_name, 0))
            for frame in frames:
                tx.send(frame)
        got = read_until_idle(source, limit_s=5)
    finally:
        source.close()
    assert [(frame, wire) for _ts, wire, frame, _lt in got] == [(f, len(f)) for f in frames]
    assert CountingTag.calls == len(frames)  # the kernel had taken every tag off


def test_a_new_reader_goes_on_where_a_closed_one_stopped(receiver):
    """frames() stopped in the middle of a block (a generator closed): the next frames() gives
    the frames after the last one given, none twice and none lost. The datagrams go in groups
    of 10 a block (the kernel hands a partly filled block over at its timer's next tick), so the
    readers also stop at the last frame of a block."""
    from capture.live import BLOCK_TIMEOUT_MS, LiveSource

    port = receiver.getsockname()[1]
    source = LiveSource("lo", f"udp and dst port {port}", 32)  # 32 blocks
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i in range(100):
                sender.sendto(struct.pack("!I", i) + bytes(PAYLOAD - 4), ("127.0.0.1", port))
                if i % 10 == 9:
                    time.sleep(2.5 * BLOCK_TIMEOUT_MS / 1000)
        seen = []
        for stop_after in (3, 7, 10, 1, 14, 5):  # inside blocks, at their last frames, across
            reader = source.frames(idle_timeout=0.1)
            for item in reader:
                if item is not None:
                    seen.append(item)
                    stop_after -= 1
                    if stop_after == 0:
                        break
            reader.close()
        seen += read_until_idle(source)
    finally:
        source.close()
    assert [struct.unpack_from("!I", frame, 42)[0] for _ts, _w, frame, _lt in seen] == list(
        range(100))
