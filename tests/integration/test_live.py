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


@pytest.fixture
def receiver():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # a listener, so the kernel answers no ICMP unreachables
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    yield sock
    sock.close()


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
