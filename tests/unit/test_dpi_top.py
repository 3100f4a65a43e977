"""dpi_top without Redis: the second shown, replies -> snapshot, value formats, rendering, and
the watched processes of a run directory."""

from __future__ import annotations

import subprocess
import sys

import redis
from rich.console import Console

from dpi_top.procs import watch
from dpi_top.render import (
    endpoint,
    fmt_age,
    fmt_bits,
    fmt_bytes,
    fmt_count,
    fmt_second,
    render,
    sparkline,
    top_rows,
)
from dpi_top.snapshot import HISTORY_S, Rate, Snapshot, build, choose_second

URL = "redis://example:6379/0"
NOW = 1_800_000_010.4  # wall clock of the fake refreshes
MISSING = redis.ResponseError("TSDB: the key does not exist")


def text(renderable, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


# --- the second shown ------------------------------------------------------------------------

def test_live_series_show_the_newest_second_that_ended_settle_ago():
    # samples up to the second being filled (…010); with 1 s to settle …008 is the last
    # complete second at 010.4 (…009 ended 0.4 s ago: the processor may still add to it)
    times = [(1_800_000_000 + s) * 1000 for s in range(11)]
    assert choose_second(times, NOW, settle_s=1.0) == 1_800_000_008
    # settle 0: only the current second is incomplete
    assert choose_second(times, NOW, settle_s=0) == 1_800_000_009
    assert choose_second(times, 1_800_000_011.0, settle_s=0) == 1_800_000_010


def test_replayed_capture_shows_its_newest_second_whatever_its_age():
    times = [1_700_000_000_000, 1_700_000_001_000, 1_700_000_090_000]
    assert choose_second(times, NOW) == 1_700_000_090


def test_only_seconds_being_filled_show_nothing_yet():
    assert choose_second([1_800_000_010_000], NOW) is None


# --- replies -> snapshot ---------------------------------------------------------------------

def replies(**over):
    """Replies of queue_commands for a small live data set (RESP3 shapes, as redis-py 8)."""
    base = {
        "bps": [[1_800_000_009_000, 5000.0], [1_800_000_008_000, 125000.0],
                [1_800_000_006_000, 1000.0]],
        "pps": [[1_800_000_009_000, 5.0], [1_800_000_008_000, 100.0],
                [1_800_000_006_000, 2.0]],
        "proto": {
            "ts:protocol:TCP:bps": [{}, {"aggregators": []}, [[1_800_000_008_000, 100000.0]]],
            "ts:protocol:TCP:pps": [{}, {"aggregators": []}, [[1_800_000_008_000, 60.0]]],
            "ts:protocol:UDP:bps": [{}, {"aggregators": []}, [[1_800_000_009_000, 5000.0],
                                                              [1_800_000_008_000, 25000.0]]],
            "ts:protocol:UDP:pps": [{}, {"aggregators": []}, [[1_800_000_008_000, 40.0]]],
            "ts:protocol:ICMP:bps": [{}, {"aggregators": []}, []],
        },
        "app": {
            "ts:app:TLS:bps": [{}, {}, [[1_800_000_008_000, 90000.0]]],
            "ts:app:TLS:pps": [{}, {}, [[1_800_000_008_000, 50.0]]],
            "ts:app:DNS:bps": [{}, {}, [[1_800_000_008_000, 25000.0]]],
            "ts:app:DNS:pps": [{}, {}, [[1_800_000_008_000, 40.0]]],
            "ts:app:SSH:bps": [{}, {}, [[1_800_000_008_000, 10000.0]]],
        },
        "apps_top": [["TLS", 9.0e6], ["DNS", 2.5e5]],
        "hosts": [["10.0.0.1", 1.2e7], ["2001:db8::1", 3.0e5]],
        "domains": [["www.example.com", 8.0e6]],
        "flows": [["ab12", "9000000", ["10.0.0.1", "10.0.0.2", "50000", "443", "6", "TLS",
                                       "www.example.com", "9000000", "7000", "0"]],
                  ["cd34", "700", ["2001:db8::1", "2001:db8::2", "0", "0", "58", None, None,
                                   "700", "7", None]]],
        "capture": {"capture_frames": "1000", "capture_kernel_drops": "3"},
        "processor": {"records": "1000", "write_errors": "0"},
        "lag": [1_800_000_009_500, 12.0],
    }
    base.update(over)
    return [base[k] for k in ("bps", "pps", "proto", "app", "apps_top", "hosts", "domains",
                              "flows", "capture", "processor", "lag")]


def test_snapshot_of_live_data():
    snap = build(replies(), URL, NOW)
    assert snap.error is None and snap.has_data and not snap.stale
    assert (snap.second, snap.newest_second) == (1_800_000_008, 1_800_000_009)
    assert snap.total == Rate(125000, 100) and snap.total.bits == 1_000_000
    assert len(snap.history) == len(snap.history_pps) == HISTORY_S
    assert snap.history[-3:] == [1000, 0, 125000]  # the silent second 007 is a zero
    assert snap.history_pps[-1] == 100
    assert snap.protocols == {"TCP": Rate(100000, 60), "UDP": Rate(25000, 40), "ICMP": Rate()}
    # ranked by apps:top:bytes; an app seen only in its series comes after
    assert [(a.name, a.rate, a.total_bytes) for a in snap.apps] == [
        ("TLS", Rate(90000, 50), 9.0e6), ("DNS", Rate(25000, 40), 2.5e5),
        ("SSH", Rate(10000, 0), 0.0)]
    assert snap.hosts == [("10.0.0.1", 1.2e7), ("2001:db8::1", 3.0e5)]
    tls, icmp6 = snap.flows
    assert (tls.src, tls.sport, tls.dst, tls.dport, tls.proto, tls.app, tls.server_name,
            tls.packets, tls.app_guess) == ("10.0.0.1", 50000, "10.0.0.2", 443, 6, "TLS",
                                            "www.example.com", 7000, False)
    assert (icmp6.app, icmp6.server_name, icmp6.total_bytes) == ("", "", 700.0)
    assert snap.capture["capture_kernel_drops"] == 3 and snap.capture["capture_malformed"] == 0
    assert snap.processor["rejected_samples"] == 0
    assert snap.lag == (1_800_000_009_500, 12)


def test_resp2_shaped_mrange_replies_read_the_same():
    resp2 = [["ts:protocol:TCP:bps", [], [[1_800_000_008_000, b"100000"]]],
             ["ts:protocol:TCP:pps", [], [[1_800_000_008_000, b"60"]]]]
    snap = build(replies(proto=resp2), URL, NOW)
    assert snap.protocols == {"TCP": Rate(100000, 60)}


def test_replayed_data_is_shown_from_its_newest_second_and_called_old():
    snap = build(replies(bps=[[1_700_000_090_000, 80.0], [1_700_000_089_000, 96250.0]],
                         pps=[[1_700_000_090_000, 1.0]]), URL, NOW)
    assert snap.second == 1_700_000_090 and snap.total == Rate(80, 1) and snap.stale
    assert "newest data in Redis" in text(render(snap))


def test_empty_redis_is_no_data_not_an_error():
    snap = build(replies(bps=MISSING, pps=MISSING, proto={}, app={}, apps_top=[], hosts=[],
                         domains=[], flows=[], capture={}, processor={}, lag=MISSING),
                 URL, NOW)
    assert snap.error is None and not snap.has_data and snap.notes == []
    out = text(render(snap))
    assert f"No data yet in Redis at {URL}" in out and "Throughput" not in out


def test_unreachable_and_moduleless_redis_are_one_line_errors():
    down = redis.ConnectionError("Error 111 connecting to example:6379. Connection refused.")
    snap = build(replies(bps=down, pps=down), URL, NOW)
    assert snap.error == f"Redis at {URL} is not reachable (Connection refused)"
    assert "retrying" in text(render(snap))
    plain = redis.ResponseError("unknown command 'TS.REVRANGE', with args beginning with: ")
    snap = build(replies(bps=plain, pps=plain, proto=plain, app=plain, lag=plain), URL, NOW)
    assert snap.error.startswith(f"Redis at {URL} has no RedisTimeSeries module")


# --- formats and rendering -------------------------------------------------------------------

def test_value_formats():
    assert fmt_bits(1_234_567) == "9.88 Mbit/s"  # bytes/s x 8
    assert fmt_bits(80) == "640 bit/s" and fmt_bits(0) == "0 bit/s"
    assert fmt_bits(125_000_000) == "1.00 Gbit/s"
    assert fmt_bytes(999) == "999 B" and fmt_bytes(999.6) == "1.00 kB"
    assert fmt_bytes(7_838_051) == "7.84 MB" and fmt_bytes(45_500) == "45.5 kB"
    assert fmt_count(1_234_567) == "1,234,567"
    assert endpoint("10.0.0.1", 443) == "10.0.0.1:443"
    assert endpoint("2001:db8::1", 53) == "[2001:db8::1]:53"
    assert endpoint("10.0.0.1", 0) == "10.0.0.1"
    assert fmt_age(59) == "59 s" and fmt_age(3 * 86400 + 5) == "3 d"
    assert sparkline([0, 1, 2, 4, 8]) == " ▂▃▅█" and sparkline([0, 0]) == "  "
    assert top_rows(None) == 10 and top_rows(24) == 3 and top_rows(60) == 10


def test_render_shows_every_panel_with_its_values():
    snap = build(replies(), URL, NOW)
    for width in (160, 100):  # two columns, one column
        out = text(render(snap, width=width), width)
        for value in ("1.00 Mbit/s", "(125,000 bytes/s)", "100 pkt/s", fmt_second(1_800_000_008),
                      "TCP", "800 kbit/s", "TLS", "720 kbit/s", "9.00 MB", "10.0.0.1",
                      "12.0 MB", "2001:db8::1", "www.example.com", "8.00 MB",
                      "10.0.0.1:50000 -> 10.0.0.2:443", "2001:db8::1 -> 2001:db8::2", "7,000",
                      "kernel drops 3", "12 messages", "last complete second"):
            assert value in out, (width, value)


def test_processes_panel_names_the_dead_with_their_last_log_line(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "capture.pid").write_text(f"{dead.pid}\n")
    (tmp_path / "capture.log").write_text(
        "starting\ncapture: no permission to open a capture socket\n\n")
    (tmp_path / "processor.pid").write_text(f"{subprocess.os.getpid()}\n")
    states = watch(tmp_path, ["processor", "capture", "generator"])
    assert [(s.name, s.running, s.failed) for s in states] == [
        ("processor", True, False), ("capture", False, True), ("generator", False, False)]
    assert states[1].last_line == "capture: no permission to open a capture socket"
    out = text(render(build(replies(), URL, NOW), states), width=400)
    assert "EXITED" in out and "capture: no permission to open a capture socket" in out
    assert "not running (no pid file)" in out


def test_snapshot_defaults_render_without_data():
    out = text(render(Snapshot(URL, NOW)))
    assert "No data yet" in out
