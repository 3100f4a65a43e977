"""The processes a demo started, watched through its run directory: `<dir>/<name>.pid` holds
the pid and `<dir>/<name>.log` the process's output (as scripts/demo.sh writes them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TAIL_BYTES = 8192


@dataclass(frozen=True)
class ProcessState:
    name: str
    pid: int | None  # None: no pid file (not started, or stopped)
    running: bool
    last_line: str  # last non-empty line of the log ("" when there is none)
    log: Path

    @property
    def failed(self) -> bool:
        """Started, and gone: the view says so with the last line of its log."""
        return self.pid is not None and not self.running


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def last_line(path: Path) -> str:
    """The last non-empty line of a log file, without terminal escapes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        line = _ANSI.sub("", line).strip()
        if line:
            return line
    return ""


def watch(run_dir: Path, names: list[str]) -> list[ProcessState]:
    states = []
    for name in names:
        log = run_dir / f"{name}.log"
        try:
            pid = int((run_dir / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        running = pid is not None and alive(pid)
        states.append(ProcessState(name, pid, running, "" if running else last_line(log), log))
    return states
