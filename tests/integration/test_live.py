"""Live capture on the loopback interface with a BPF filter: a known number of packets sent,
every one of them in Redis, with exact byte counts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.pipeline import REPO, read_state, run_module

pytestmark = [pytest.mark.integration, pytest.mark.live]

SENT = 3000
PAYLOAD = 100


def test_live_capture_on_loopback_counts_every_packet(pipeline_env, receiver, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("live capture needs root or CAP_NET_RAW (make test runs as root here)")
    port = receiver.getsockname()[1]
    env = dict(pipeline_env, IFACE="lo", BPF_FILTER=f"udp and dst port {port}")
    log = tmp_path / "capture.log"
    with open(log, "w") as fh:
        capture = subprocess.Popen([sys.executable, "-m", "capture"], env=env, cwd=REPO,
                                   stderr=fh)
    try:
        deadline = time.monotonic() + 60
        while "capturing from lo" not in log.read_text():
            assert capture.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "capture did not start"
            time.sleep(0.1)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(SENT):
            sender.sendto(bytes(PAYLOAD), ("127.0.0.1", port))
            if i % 200 == 199:
                time.sleep(0.01)  # stay well inside the socket buffers
        sender.close()
        time.sleep(1.0)
    finally:
        capture.send_signal(signal.SIGTERM)
        assert capture.wait(60) == 0, log.read_text()
    final = log.read_text().splitlines()[-1]
    assert "kernel_drops=0" in final and f"records_produced={SENT}" in final, final
    run_module("flow_processor", env, "--exit-when-idle", "1")
    state = read_state(env["REDIS_URL"])
    wire = 14 + 20 + 8 + PAYLOAD  # Ethernet header on lo + IPv4 + UDP + payload
    assert sum(p for p, _ in state.per_second.values()) == SENT
    assert state.per_proto == {"UDP": (SENT, SENT * wire)}
    (flow,) = state.flows.values()
    assert (int(flow["packets"]), int(flow["bytes"])) == (SENT, SENT * wire)
    assert int(flow["dport"]) == port


# ----------------------------------------------------------------------------- the BPF program
# LiveSource alone, on this machine's kernel: which frames the filter lets through.
def frames_until_idle(source, idle_polls: int = 5) -> list[tuple]:
    out, idle = [], 0
    for item in source.frames(idle_timeout=0.1):
        if item is None:
            idle += 1
            if idle >= idle_polls:
                return out
            continue
        idle = 0
        out.append(item)
    return out


def test_filter_on_every_interface_keeps_each_loopback_packet_once(receiver):
    """IFACE empty, as compose's default: the filter is compiled for Ethernet-framed frames (lo
    and NICs), and lo's outgoing copies are still dropped."""
    if os.geteuid() != 0:
        pytest.fail("live capture needs root or CAP_NET_RAW (make test runs as root here)")
    from capture.decode import LINKTYPE_ETHERNET
    from capture.live import LiveSource

    port = receiver.getsockname()[1]
    source = LiveSource("", f"udp and dst port {port}", 8)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(500):
                sender.sendto(bytes(PAYLOAD), ("127.0.0.1", port))
        got = frames_until_idle(source)
    finally:
        source.close()
    assert len(got) == 500
    assert {(wire, linktype) for _ts, wire, _f, linktype in got} == {
        (14 + 20 + 8 + PAYLOAD, LINKTYPE_ETHERNET)}


@pytest.fixture
def tun_interface():
    """(name, peer address) of a tun interface (no link-layer header: frames start at the IP
    header) with a route to the peer (benchmark range); it disappears when its fd closes."""
    import fcntl
    import struct

    tunsetiff, iff_tun, iff_no_pi = 0x400454CA, 0x0001, 0x1000
    name = f"dpitest{os.getpid() % 100000}"
    net = f"198.18.{os.getpid() % 250}"  # each test run its own addresses
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", name.encode(), iff_tun | iff_no_pi))
    except OSError as exc:
        pytest.skip(f"no tun device here: {exc}")
    try:
        for cmd in (["ip", "addr", "add", f"{net}.1", "peer", f"{net}.2", "dev", name],
                    ["ip", "link", "set", name, "up"]):
            subprocess.run(cmd, check=True, capture_output=True)
        yield name, f"{net}.2"
    finally:
        os.close(fd)


@pytest.mark.parametrize("iface", ["", "tun"])
def test_filter_applies_to_interfaces_without_an_ethernet_header(tun_interface, receiver, iface):
    """Frames of a tun interface start at the IP header: on every interface the socket's
    program dispatches on the interface type, and IFACE=tun0 compiles for raw IP."""
    if os.geteuid() != 0:
        pytest.fail("live capture needs root or CAP_NET_RAW (make test runs as root here)")
    from capture.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW
    from capture.live import LiveSource

    name, peer = tun_interface
    port = receiver.getsockname()[1]
    source = LiveSource(name if iface else "", f"udp and dst port {port}", 8)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(100):
                sender.sendto(bytes(PAYLOAD), (peer, port))  # out through the tun
                sender.sendto(bytes(PAYLOAD), ("127.0.0.1", port))  # over lo
        got = frames_until_idle(source)
    finally:
        source.close()
    seen = {}
    for _ts, wire, _frame, linktype in got:
        seen[linktype, wire] = seen.get((linktype, wire), 0) + 1
    expected = {(LINKTYPE_RAW, 20 + 8 + PAYLOAD): 100}
    if not iface:
        expected[LINKTYPE_ETHERNET, 14 + 20 + 8 + PAYLOAD] = 100
    assert seen == expected
