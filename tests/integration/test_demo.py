"""`make demo` end to end (scripts/demo.sh in its own run directory, on free ports): the view
fills with applications and names from the generator's mix, names a service that died with
the last line of its log, and `demo.sh down` leaves no process of the demo behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.pipeline import REPO

pytestmark = [pytest.mark.integration, pytest.mark.live]

FILL_TIMEOUT_S = 30  # the brief: applications and names within 30 s


class Output:
    """A process's merged output, read in a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.text += line

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.text):
                return True
            time.sleep(0.2)
        return False


def _last_snapshot(text: str) -> str:
    return text.rsplit("dpi_top  redis://", 1)[-1]


def _filled(text: str) -> bool:
    snap = _last_snapshot(text)
    apps = [ln for ln in snap.splitlines() if ln.strip("│ ").split(" ")[0] in ("DNS", "HTTP",
                                                                               "TLS")]
    return len(apps) >= 3 and "www.example.com" in snap and "accounts.example.org" in snap


def _demo_processes(marker: str) -> list[int]:
    """Live processes whose environment carries this demo's run directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_shows_the_mix_names_a_dead_service_and_stops_cleanly(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("live capture needs root or CAP_NET_RAW (make test runs as root here)")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "KAFKA_TOPIC", "KAFKA_GROUP_ID",
                        "BPF_FILTER", "IFACE")}
    env.update(DEMO_RUN_DIR=str(run_dir), KAFKA_PORT="0", REDIS_PORT="0", COLUMNS="200")
    marker = f"DEMO_RUN_DIR={run_dir}"
    up = subprocess.Popen(["bash", "scripts/demo.sh", "up"], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    out = Output(up)
    try:
        started = time.monotonic()
        assert out.wait_for(_filled, FILL_TIMEOUT_S + 15), out.text[-5000:]
        print(f"applications and names shown after {time.monotonic() - started:.1f} s")
        assert "running: processor, capture, generator" in _last_snapshot(out.text)
        # the script, broker, processor, capture, generator (and its listeners), view; Redis
        # rewrites its environment (process title), so the pid files count too
        recorded = {int(p.read_text()) for p in run_dir.glob("*.pid")}
        assert len(recorded) == 6
        demo = set(_demo_processes(marker)) | recorded
        assert len(demo) >= 8

        generator = int((run_dir / "generator.pid").read_text())
        os.kill(generator, signal.SIGKILL)
        assert out.wait_for(lambda t: f"EXITED (pid {generator})" in _last_snapshot(t), 10)
        assert f"last line of {run_dir}/generator.log" in _last_snapshot(out.text)
        assert "running (pid" in _last_snapshot(out.text)  # the others still run

        down = subprocess.run(["bash", "scripts/demo.sh", "down"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
        out.thread.join(timeout=10)
        assert out.text.rstrip().endswith("demo: stopped by `make demo-down`"), out.text[-2000:]
        assert "Traceback" not in out.text
        deadline = time.monotonic() + 5  # the listeners of the killed generator notice it
        while _demo_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _demo_processes(marker) == []
        assert [pid for pid in demo if _alive(pid)] == []
        assert not list(run_dir.glob("*.pid"))
    finally:
        if up.poll() is None:
            subprocess.run(["bash", "scripts/demo.sh", "down"], cwd=REPO, env=env,
                           capture_output=True, timeout=60)
            up.wait(timeout=30)
