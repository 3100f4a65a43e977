"""python -m dpi_top against a real Redis: filled by a real end-to-end replay (capture --pcap,
then flow_processor), empty, unreachable; and the refreshing view, on a pipe and on a pty."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis

from dpi_top.render import endpoint, fmt_bits, fmt_bytes, fmt_count, fmt_second
from tests.pipeline import REPO, replay
from tests.synthetic import write_synthetic_pcap

pytestmark = pytest.mark.integration


def dpi_top(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "COLUMNS"}
    env["COLUMNS"] = "200"  # long names on one line, so the values below are found whole
    return subprocess.run([sys.executable, "-m", "dpi_top", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def replayed(stack, databases, tmp_path_factory):
    """Redis filled by a replay of a synthetic capture whose flows start with real DNS, HTTP,
    TLS and QUIC first payloads (so applications and server names are filled)."""
    pcap = write_synthetic_pcap(tmp_path_factory.mktemp("dpi_top") / "mix.pcap", packets=4000,
                                flows=200, seconds=30, real_payloads=True)
    db = databases.take()
    env = stack.env(db)
    replay(pcap, env)
    yield env
    databases.give(db)


def test_once_shows_the_values_in_redis(replayed):
    r = redis.Redis.from_url(replayed["REDIS_URL"], decode_responses=True)
    (newest_ms, newest_bytes), = r.execute_command("TS.REVRANGE", "ts:global:bps", "-", "+",
                                                   "COUNT", 1)
    (pps_ms, newest_packets), = r.execute_command("TS.REVRANGE", "ts:global:pps", "-", "+",
                                                  "COUNT", 1)
    assert pps_ms == newest_ms
    apps = r.zrevrange("apps:top:bytes", 0, 9, withscores=True)
    hosts = r.zrevrange("hosts:top:bytes", 0, 9, withscores=True)
    domains = r.zrevrange("domains:top:bytes", 0, 9, withscores=True)
    flows = r.zrevrange("flows:top:bytes", 0, 9, withscores=True)
    assert {"DNS", "HTTP", "TLS", "QUIC"} <= {name for name, _ in apps}
    assert len(hosts) == len(domains) == len(flows) == 10

    done = dpi_top(replayed, "--once")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    # a replay: its newest second, whatever its age, and said to be old
    assert f"second shown: {fmt_second(newest_ms // 1000)}" in out
    assert "newest data in Redis" in out
    b, p = int(float(newest_bytes)), int(float(newest_packets))
    assert f"{fmt_bits(b)} ({fmt_count(b)} bytes/s)   {fmt_count(p)} pkt/s" in out
    for name, score in apps + hosts + domains:
        assert any(name in line and fmt_bytes(score) in line for line in out.splitlines()), name
    for flow_id, score in flows:
        meta = r.hgetall(f"flow:{flow_id}:meta")
        ends = (f"{endpoint(meta['src'], int(meta['sport']))} -> "
                f"{endpoint(meta['dst'], int(meta['dport']))}")
        line = next((ln for ln in out.splitlines() if ends in ln), None)
        assert line is not None, ends
        assert fmt_bytes(score) in line and fmt_count(int(meta["packets"])) in line
        assert meta.get("server_name", "") in line and meta.get("app", "") in line
    counters = r.hgetall("pipeline:processor")
    assert f"records {fmt_count(int(counters['records']))}" in out


def test_once_on_an_empty_redis_says_there_is_no_data(pipeline_env):
    done = dpi_top(pipeline_env, "--once")
    assert done.returncode == 0, done.stderr
    assert f"No data yet in Redis at {pipeline_env['REDIS_URL']}" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_once_on_an_unreachable_redis_is_one_line_and_fails():
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    done = dpi_top(dict(os.environ), "--once", "--redis-url", url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"dpi_top: Redis at {url} is not reachable "
                                        "(Connection refused)"]


def test_view_keeps_retrying_an_unreachable_redis_and_stops_cleanly_on_sigterm():
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    env = dict(os.environ, REDIS_URL=url)
    proc = subprocess.Popen([sys.executable, "-m", "dpi_top", "--interval", "0.5"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out.count("is not reachable (Connection refused); retrying every second") >= 3
    assert err == "dpi_top: stopped\n"


def test_live_view_on_a_terminal_refreshes_live_data(pipeline_env):
    """Samples written at wall-clock seconds: the view (on a pty, full screen) shows the last
    complete one, not the second still being filled, and leaves the screen on SIGTERM."""
    r = redis.Redis.from_url(pipeline_env["REDIS_URL"])
    now = int(time.time())
    for sec in range(now - 5, now + 1):
        for key, value in (("ts:global:bps", 1000 * (sec - now + 10)), ("ts:global:pps", 7)):
            r.execute_command("TS.ADD", key, sec * 1000, value, "ON_DUPLICATE", "SUM")
    master, slave = pty.openpty()
    env = dict(pipeline_env, TERM="xterm", COLUMNS="160", LINES="50")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "dpi_top", "--once"], env=env, cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    screen = _read_all(master, proc, timeout=30)
    assert proc.returncode == 0, screen
    # settle 1 s: a snapshot taken at t shows the second that ended at least 1 s before t;
    # t lies between the start and the end of the process (slow to start on a busy machine)
    candidates = range(int(started) - 2, int(time.time()))
    assert any(fmt_second(s) in screen for s in candidates), screen
    assert "last complete second" in screen

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dpi_top"], env=env, cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    deadline = time.monotonic() + 3
    screen = ""
    while time.monotonic() < deadline:
        screen += _read(master, 0.2)
    proc.send_signal(signal.SIGTERM)
    screen += _read_all(master, proc, timeout=10)
    assert proc.returncode == 0
    assert "\x1b[?1049h" in screen and "\x1b[?1049l" in screen  # the alternate screen, left
    assert "Throughput" in screen and "dpi_top: stopped" in screen
    assert "Traceback" not in screen


def _read(fd: int, wait: float) -> str:
    if not select.select([fd], [], [], wait)[0]:
        return ""
    try:
        return os.read(fd, 65536).decode(errors="replace")
    except OSError:  # EIO: the other end is closed
        return ""


def _read_all(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    out, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = _read(fd, 0.2)
        out += chunk
        if not chunk and proc.poll() is not None:
            break
    proc.wait(timeout=5)
    os.close(fd)
    return out
