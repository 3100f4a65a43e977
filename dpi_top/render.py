"""Snapshot -> rich renderables (no I/O): the panels of the view and the value formats."""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dpi_top.procs import ProcessState
from dpi_top.snapshot import PROTOCOL_ORDER, Snapshot

SPARK = "▁▂▃▄▅▆▇█"
PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}
TWO_COLUMNS_WIDTH = 120
SIDE_BY_SIDE_WIDTH = 80


# --- value formats ---------------------------------------------------------------------------

def _si(value: float, unit: str) -> str:
    """3 significant digits with an SI prefix: 9.88 Mbit/s, 512 bit/s, 1.20 GB."""
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(value) < 999.5 or prefix == "P":
            break
        value /= 1000
    if prefix == "" and value == int(value):
        return f"{int(value)} {unit}"
    digits = 2 if abs(value) < 9.995 else 1 if abs(value) < 99.95 else 0
    return f"{value:.{digits}f} {prefix}{unit}"


def fmt_bits(bytes_per_s: float) -> str:
    """A bytes-per-second value as bits per second (x8)."""
    return _si(bytes_per_s * 8, "bit/s")


def fmt_bytes(n: float) -> str:
    return _si(n, "B")


def fmt_count(n: float) -> str:
    return f"{int(n):,}"


def fmt_second(second: int) -> str:
    """An epoch second in local time, with its date."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(second))


def fmt_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def endpoint(address: str, port: int | None) -> str:
    """address:port, [v6]:port; the address alone without a port (0 for ICMP and others)."""
    if not port:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def proto_name(proto: int | None) -> str:
    return "?" if proto is None else PROTO_NAMES.get(proto, str(proto))


def sparkline(values: list[int]) -> str:
    """One block character per value, scaled to the largest; zero is a blank."""
    peak = max(values, default=0)
    if peak <= 0:
        return " " * len(values)
    top = len(SPARK) - 1
    return "".join(" " if v <= 0 else SPARK[min(top, int(v * top / peak + 0.5))] for v in values)


# --- panels ----------------------------------------------------------------------------------

def _table(*columns: str, right: tuple[int, ...] = (), wide: tuple[int, ...] = (0,)) -> Table:
    """Columns in `right` are right-aligned; those in `wide` take the spare width."""
    table = Table(box=None, expand=True, pad_edge=False, header_style="bold dim",
                  padding=(0, 1))
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if i in right else "left", overflow="fold",
                         ratio=1 if i in wide else None)
    return table


def header(snap: Snapshot, processes: list[ProcessState] | None = None,
           note: str = "") -> Text:
    text = Text()
    text.append("dpi_top", style="bold cyan")
    text.append(f"  {snap.redis_url}  ")
    if snap.second is not None:
        text.append("second shown: ", style="dim")
        text.append(fmt_second(snap.second), style="bold")
        if snap.stale:
            text.append(f"  (newest data in Redis, {fmt_age(snap.taken_at - snap.second)} old:"
                        " a replayed capture, or no traffic since)", style="yellow")
        else:
            text.append("  (last complete second)", style="dim")
    text.append(f"  refreshed {time.strftime('%H:%M:%S', time.localtime(snap.taken_at))}",
                style="dim")
    if processes and all(p.running for p in processes):
        text.append("  running: " + ", ".join(p.name for p in processes), style="green")
    if note:
        text.append(f"  {note}", style="bold yellow")
    return text


def throughput_panel(snap: Snapshot, width: int) -> Panel:
    """`width`: the panel's width; the sparklines show as many recent seconds as fit."""
    rate = snap.total
    room = max(10, width - 4 - 6 - 2)  # borders and padding, label column, its gap
    history, history_pps = snap.history[-room:], snap.history_pps[-room:]
    peak = max(history, default=0)
    figures = Text.assemble((fmt_bits(rate.bytes), "bold green"),
                            (f" ({fmt_count(rate.bytes)} bytes/s)   ", "dim"),
                            (f"{fmt_count(rate.packets)} pkt/s", "bold green"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="right", width=6)
    grid.add_column(no_wrap=True, overflow="crop")
    grid.add_row("bits/s", Text(sparkline(history), style="green"))
    grid.add_row("pkt/s", Text(sparkline(history_pps), style="cyan"))
    grid.add_row("", Text(f"last {len(history)} s, peak {fmt_bits(peak)}", style="dim"))
    return Panel(Group(figures, grid), title="Throughput", title_align="left")


def protocols_panel(snap: Snapshot) -> Panel:
    table = _table("proto", "bits/s", "pkt/s", "share", right=(1, 2, 3))
    total = snap.total.bytes or 1
    names = [p for p in PROTOCOL_ORDER if p in snap.protocols]
    names += sorted(p for p in snap.protocols if p not in PROTOCOL_ORDER)
    for name in names:
        rate = snap.protocols[name]
        if rate.bytes or rate.packets:
            table.add_row(name, fmt_bits(rate.bytes), fmt_count(rate.packets),
                          f"{100 * rate.bytes / total:.0f}%")
    if not table.row_count:
        table.add_row("(no frames in this second)", "", "", "")
    return Panel(table, title="Protocols (this second)", title_align="left")


def apps_panel(snap: Snapshot, top: int) -> Panel:
    table = _table("app", "bits/s", "pkt/s", "total", right=(1, 2, 3))
    table.columns[0].min_width = max((len(row.name) for row in snap.apps[:top]), default=3)
    for row in snap.apps[:top]:
        table.add_row(row.name, fmt_bits(row.rate.bytes), fmt_count(row.rate.packets),
                      fmt_bytes(row.total_bytes))
    if not snap.apps:
        table.add_row("(none yet)", "", "", "")
    return Panel(table, title="Applications" + window_note(snap), title_align="left")


def window_note(snap: Snapshot) -> str:
    """What the rankings count over, when it is not all time."""
    return "" if snap.window == "all" else f", last {snap.window} of capture time"


def ranking_panel(title: str, what: str, rows: list[tuple[str, float]], top: int) -> Panel:
    table = _table(what, "bytes", right=(1,))
    for name, score in rows[:top]:
        table.add_row(name, fmt_bytes(score))
    if not rows:
        table.add_row("(none yet)", "")
    return Panel(table, title=title, title_align="left")


def flows_panel(snap: Snapshot, top: int) -> Panel:
    table = _table("proto", "endpoints (first sender ->)", "app", "server name", "bytes",
                   "packets", right=(4, 5), wide=(3,))
    rows = [(proto_name(f.proto), f"{endpoint(f.src, f.sport)} -> {endpoint(f.dst, f.dport)}",
             f.app + ("?" if f.app_guess else ""), f.server_name, fmt_bytes(f.total_bytes),
             "" if f.packets is None else fmt_count(f.packets)) for f in snap.flows[:top]]
    table.columns[1].no_wrap = True  # endpoints on one line: the server name folds first
    for row in rows:
        table.add_row(*row)
    if not rows:
        table.add_row("", "(none yet)", "", "", "", "")
    return Panel(table, title=f"Top flows{window_note(snap)} (app? = port guess)",
                 title_align="left")


def _counter(label: str, value: int | None, bad: bool = True) -> Text:
    if value is None:
        return Text(f"{label} -", style="dim")
    style = "bold red" if bad and value else ""
    return Text.assemble((f"{label} ", "dim"), (fmt_count(value), style))


def health_panel(snap: Snapshot) -> Panel:
    cap, proc = snap.capture, snap.processor
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    if cap:
        grid.add_row("capture", Text("  ").join([
            _counter("frames", cap.get("capture_frames"), bad=False),
            _counter("dropped (buffer full)", cap.get("capture_dropped_buffer_full")),
            _counter("kernel drops", cap.get("capture_kernel_drops")),
            _counter("malformed", cap.get("capture_malformed")),
            _counter("delivery failed", cap.get("capture_delivery_failed")),
            _counter("parser errors", cap.get("capture_parser_errors")),
            _counter("inspections given up", cap.get("capture_inspect_budget_evictions"))]))
    else:
        grid.add_row("capture", Text("no stats yet (capture reports every STATS_INTERVAL_S)",
                                     style="dim"))
    if proc:
        grid.add_row("processor", Text("  ").join([
            _counter("records", proc.get("records"), bad=False),
            _counter("malformed frames", proc.get("malformed_frames")),
            _counter("malformed messages", proc.get("malformed_messages")),
            _counter("write errors", proc.get("write_errors")),
            _counter("rejected samples", proc.get("rejected_samples")),
            _counter("not set aside", proc.get("set_aside_failed")),
            _counter("offset resets", proc.get("offset_resets")),
            _counter("flows evicted", proc.get("flows_evicted"), bad=False),
            _counter("flows not stored", proc.get("flows_not_stored"), bad=False)]))
    else:
        grid.add_row("processor", Text("no counters yet", style="dim"))
    if snap.lag is not None:
        at_ms, lag = snap.lag
        grid.add_row("consumer lag", Text.assemble(
            (f"{fmt_count(lag)} message{'' if lag == 1 else 's'}",
             "bold red" if lag > 1000 else ""),
            (f"  (at {time.strftime('%H:%M:%S', time.localtime(at_ms / 1000))})", "dim")))
    else:
        grid.add_row("consumer lag", Text("not measured yet", style="dim"))
    return Panel(grid, title="Pipeline health", title_align="left")


def processes_panel(states: list[ProcessState]) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold")
    grid.add_column()
    failed = False
    for st in states:
        if st.running:
            grid.add_row(st.name, Text(f"running (pid {st.pid})", style="green"))
        elif st.pid is None:
            grid.add_row(st.name, Text("not running (no pid file)", style="yellow"))
        else:
            failed = True
            grid.add_row(st.name, Text.assemble(
                (f"EXITED (pid {st.pid}); last line of {st.log}: ", "bold red"),
                st.last_line or "(empty log)"))
    return Panel(grid, title="Processes", title_align="left",
                 border_style="red" if failed else "")


def message_panel(text: str, style: str) -> Panel:
    return Panel(Text(text, style=style), border_style=style)


def no_data_text(snap: Snapshot) -> str:
    if snap.newest_second is not None:
        return ("Data is arriving: the first complete second is not in Redis yet "
                f"(newest second {fmt_second(snap.newest_second)}).")
    return (f"No data yet in Redis at {snap.redis_url}: ts:global:bps has no samples. "
            "Is the flow processor running, and does capture see traffic?")


def top_rows(height: int | None) -> int:
    """Rows per ranking that fit a terminal of `height` lines (10 when unknown): the view
    takes about 20 lines plus 3 per row (rankings stack on each side)."""
    if height is None:
        return 10
    return max(3, min(10, (height - 20) // 3))


def _side_by_side(*columns: list[RenderableType]) -> Table:
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in columns:
        grid.add_column(ratio=1)
    grid.add_row(*(Group(*c) for c in columns))
    return grid


def render(snap: Snapshot, processes: list[ProcessState] | None = None, *,
           width: int = 160, top: int = 10, note: str = "") -> RenderableType:
    """The whole view. Wide terminals: two columns (rates left, rankings and health right);
    narrower ones: pairs of panels side by side. Top flows last, across the width."""
    parts: list[RenderableType] = [header(snap, processes, note)]
    if processes and not all(p.running for p in processes):
        parts.append(processes_panel(processes))
    if snap.error:
        parts.append(message_panel(f"{snap.error}; retrying every second.", "bold red"))
        return Group(*parts)
    for text in snap.notes:
        parts.append(Text(f"note: {text}", style="yellow"))
    if not snap.has_data:
        parts.append(message_panel(no_data_text(snap), "yellow"))
        parts.append(health_panel(snap))
        return Group(*parts)
    hosts = ranking_panel("Top hosts" + window_note(snap), "address", snap.hosts, top)
    domains = ranking_panel("Top domains" + window_note(snap), "server name", snap.domains, top)
    if width >= TWO_COLUMNS_WIDTH:
        left = [throughput_panel(snap, (width - 1) // 2), protocols_panel(snap),
                apps_panel(snap, top)]
        parts.append(_side_by_side(left, [hosts, domains, health_panel(snap)]))
    elif width >= SIDE_BY_SIDE_WIDTH:
        parts += [throughput_panel(snap, width),
                  _side_by_side([protocols_panel(snap)], [apps_panel(snap, top)]),
                  _side_by_side([hosts], [domains]), health_panel(snap)]
    else:
        parts += [throughput_panel(snap, width), protocols_panel(snap), apps_panel(snap, top),
                  hosts, domains, health_panel(snap)]
    parts.append(flows_panel(snap, top))
    return Group(*parts)
