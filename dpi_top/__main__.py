"""python -m dpi_top: the pipeline's figures in a terminal, read from Redis every second.

Shows the last complete second's throughput (bits/s and packets/s, a 60 s sparkline),
protocols, applications, top hosts, domains and flows, and the pipeline's health counters.
Says so when Redis is unreachable (and keeps retrying) or holds no data yet.
--once prints one snapshot and exits: 0, or 1 when Redis cannot be read.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from dpi_top.procs import watch
from dpi_top.render import render, top_rows
from dpi_top.snapshot import DEFAULT_SETTLE_S, WINDOWS, Snapshot, connect, fetch
from packet_records.security import redact_url

DEFAULT_URL = "redis://localhost:6379/0"
PLAIN_WIDTH = 140  # columns used when the output is not a terminal (COLUMNS overrides)


class Stopped(Exception):
    """SIGTERM/SIGHUP: leave the screen cleanly."""


def _stop(_signum, _frame):
    raise Stopped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpi_top", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or DEFAULT_URL,
                   help="Redis Stack to read (default: $REDIS_URL or %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot and exit (0; 1 when Redis cannot be read)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--top", type=int, default=0,
                   help="rows per ranking (default: what fits the terminal, at most 10)")
    p.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, metavar="SECONDS",
                   help="a second is complete once it ended this long ago (default %(default)s;"
                        " the processor writes every second). Old data (a replay) is shown"
                        " from its newest second")
    p.add_argument("--window", choices=WINDOWS, default="all",
                   help="rank hosts, applications, domains and flows by their bytes over all"
                        " time (default) or the last 5 minutes, hour or 24 hours of capture"
                        " time")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="directory of <name>.pid and <name>.log files of processes to watch")
    p.add_argument("--watch", action="append", default=[], metavar="NAME",
                   help="a process to watch in --run-dir (repeatable); when it is gone the view"
                        " says so with the last line of its log")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.top < 0 or args.settle < 0:
        p.error("--interval must be > 0, --top and --settle >= 0")
    if args.watch and args.run_dir is None:
        p.error("--watch needs --run-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        client = connect(args.redis_url)
    except ValueError as exc:
        print(f"dpi_top: invalid Redis URL {redact_url(args.redis_url)!r}: {exc}",
              file=sys.stderr)
        return 2
    from rich.console import Console

    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        width = PLAIN_WIDTH
    console = Console(width=width)
    if args.once:
        return once(client, args, console)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        if console.is_terminal:
            live(client, args, console)
        else:
            plain(client, args, console)
    except (KeyboardInterrupt, Stopped):
        pass
    print("dpi_top: stopped", file=sys.stderr)
    return 0


def snapshot(client, args) -> tuple[Snapshot, list]:
    snap = fetch(client, redact_url(args.redis_url), top=10, settle_s=args.settle,
                 window=args.window)
    processes = watch(args.run_dir, args.watch) if args.watch else []
    return snap, processes


def view(console, snap: Snapshot, processes: list, top: int = 0):
    """The renderable for the live screen: `top` rows per ranking (0: what fits, at most 10);
    when the terminal is too short for it all, the header says how much is cut."""
    width, height = console.size.width, console.size.height
    rows = top or top_rows(height)
    renderable = render(snap, processes, width=width, top=rows)
    lines = len(console.render_lines(renderable, console.options, pad=False))
    if lines <= height:
        return renderable
    note = f"(terminal too short: {lines - height} lines cut at the bottom)"
    return render(snap, processes, width=width, top=rows, note=note)


def printed(console, snap: Snapshot, processes: list, top: int = 0):
    """The renderable for printing (--once, or output that is not a terminal): it scrolls,
    so every ranking gets `top` rows (0: 10)."""
    return render(snap, processes, width=console.size.width, top=top or 10)


def once(client, args, console) -> int:
    try:
        snap, processes = snapshot(client, args)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"dpi_top: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if snap.error:
        print(f"dpi_top: {snap.error}", file=sys.stderr)
        return 1
    console.print(printed(console, snap, processes, args.top))
    return 0


def _ticks(interval: float):
    """Yield once per interval, on a fixed schedule (no drift)."""
    next_at = time.monotonic()
    while True:
        yield
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()


def _safe_view(client, args, console, layout=view):
    try:
        snap, processes = snapshot(client, args)
        return layout(console, snap, processes, args.top)
    except (KeyboardInterrupt, Stopped):
        raise
    except Exception as exc:  # noqa: BLE001 - shown in the view, which keeps refreshing
        from rich.text import Text

        return Text(f"dpi_top: {type(exc).__name__}: {exc} (retrying)", style="bold red")


def live(client, args, console) -> None:
    from rich.live import Live

    with Live(console=console, screen=True, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as screen:
        for _ in _ticks(args.interval):
            screen.update(_safe_view(client, args, console), refresh=True)


def plain(client, args, console) -> None:
    """Not a terminal: one snapshot after another, for a log."""
    for _ in _ticks(args.interval):
        console.print(_safe_view(client, args, console, printed))
        console.rule()


if __name__ == "__main__":
    sys.exit(main())
