"""Top-N time windows (last 5 minutes, hour, day of capture time) against a real Redis.

Two checks: top.lua alone against a model of its definition (random increments in random
order, clock jumps), and a replay of a capture spanning 26 hours whose windows must equal the
sums tshark gives for the same frames.
"""

from __future__ import annotations

import random
import subprocess
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import redis

from dpi_top.snapshot import connect, fetch
from flow_processor import sink
from packet_records import PROTO_NAMES
from tests.pipeline import run_module
from tests.synthetic import write_synthetic_pcap

SETS = sink.WINDOWED_SETS
# window name -> (size, unit in minutes)
WINDOWS = {"5m": (5, 1), "1h": (60, 1), "24h": (24, 60)}


def in_window(name: str, minute: int, closed: int) -> bool:
    """Is this minute in the window once the minutes up to `closed` are closed?"""
    size, unit = WINDOWS[name]
    return minute <= closed and minute // unit > closed // unit - size


@pytest.fixture
def db(stack, databases):
    number = databases.take()
    yield redis.Redis.from_url(f"{stack.redis_url}/{number}")
    databases.give(number)


def zset(r: redis.Redis, key: str) -> dict[str, int]:
    return {m.decode(): int(s) for m, s in r.zrange(key, 0, -1, withscores=True)}


@pytest.mark.parametrize("seed, interleaved", [(11, False), (12, False), (13, False),
                                               (14, True), (15, True), (16, True)])
def test_windows_equal_the_sum_of_their_minutes_in_any_order(db, seed, interleaved):
    """Whatever order increments arrive in (late partitions, clock jumps of hours and days),
    and whether the newest minute is closed or not, each window holds exactly the increments
    of its closed minutes, and only the buckets still in a window remain. Interleaved: the
    windows move on a few steps at a time between increments (as when another processor
    writes while one moves them on), so increments come for minutes being closed too."""
    script = db.register_script(sink.TOP_LUA.read_text())
    rnd = random.Random(seed)
    seen: list[tuple[int, int, str, int]] = []  # (minute, set index, member, value)
    closed = 0  # the last closed minute
    start = 29_000_000
    minutes = [start + rnd.randrange(0, 3000) for _ in range(40)]
    minutes += [start + 1440 * 3 + rnd.randrange(0, 50) for _ in range(5)]  # days later
    for step in range(120):
        batch = []
        for _ in range(rnd.randrange(1, 8)):
            minute = rnd.choice(minutes) + rnd.randrange(-3, 4)
            batch.append((minute, rnd.randrange(1, 5), f"m{rnd.randrange(12)}",
                          rnd.randrange(1, 1000)))
        newest = max(m for m, *_ in batch)
        groups = [[minute, index, [value, member]] for minute, index, member, value in batch]
        script(args=["add", newest, orjson.dumps(groups), 60, "[]"])
        seen += batch
        clock = max(m for m, *_ in seen)
        assert int(db.get("top:window:clock")) == clock
        close_newest = rnd.random() < 0.3
        check = not (step % 10 and step != 119)
        steps, budget = 0, rnd.randrange(0, 4) if interleaved and not check else None
        while (budget is None or steps < budget) and script(
                args=["advance", "1" if close_newest else "0", 1000, 100]):
            steps += 1
            assert steps < 10_000
        # a closed minute stays closed (data for it goes straight into the windows)
        closed = max(closed, clock if close_newest else clock - 1)
        if interleaved:  # data for minutes being closed, their buckets in some windows only
            late = []
            for index, (a, _b) in enumerate(SETS, start=1):
                if db.llen(f"top:window:pending:{a}") and rnd.random() < 0.8:
                    late.append((int(db.get(f"top:window:closing:{a}")), index,
                                 f"m{rnd.randrange(12)}", rnd.randrange(1, 1000)))
            if late:
                groups = [[minute, index, [value, member]] for minute, index, member, value in late]
                script(args=["add", clock, orjson.dumps(groups), 60, "[]"])
                seen += late
        if not check:
            continue
        for index, (a, b) in enumerate(SETS, start=1):
            # (moved on a few steps at a time, a set may have closed the newest minute of an
            # earlier step while the others have not)
            set_closed = int(db.get(f"top:window:closed:{a}") or -1) if interleaved else closed
            for name in WINDOWS:
                expected: dict[str, int] = defaultdict(int)
                for minute, i, member, value in seen:
                    if i == index and in_window(name, minute, set_closed):
                        expected[member] += value
                assert zset(db, f"{a}:top:{name}:{b}") == dict(expected), (step, a, name)
            alltime: dict[str, int] = defaultdict(int)
            for _minute, i, member, value in seen:
                if i == index:
                    alltime[member] += value
            assert zset(db, f"{a}:top:{b}") == dict(alltime)
    # buckets are deleted once they leave the widest window of their unit
    closed_of = {a: int(db.get(f"top:window:closed:{a}") or -1) for a, _b in SETS}
    for raw in db.scan_iter(match="*:top:min:*"):  # open, or closed and in the hour window
        a, _top, _min, minute, _b = raw.decode().split(":")
        assert int(minute) > closed_of[a] or in_window("1h", int(minute), closed_of[a]), raw
    for raw in db.scan_iter(match="*:top:hour:*"):
        a, _top, _hour, hour, _b = raw.decode().split(":")
        assert in_window("24h", int(hour) * 60, closed_of[a]), raw


def test_minutes_no_window_will_hold_go_to_the_all_time_sets_only(db):
    """Increments spread over 3,000 minutes of two days and a half, in one flush, on a fresh
    Redis: the minutes before the oldest hour the 24 h window can hold once the clock's
    minute closes open no bucket (thousands of buckets to open and close one by one took
    minutes), and the windows and all-time sets are exact all the same."""
    script = db.register_script(sink.TOP_LUA.read_text())
    start = 29_000_000
    seen = [(start + m, 1 + m % 4, f"m{m % 7}", 1 + m % 13) for m in range(0, 3600, 1)
            if m % 6 != 5]
    clock = max(m for m, *_ in seen)
    groups = [[minute, index, [value, member]] for minute, index, member, value in seen]
    script(args=["add", clock, orjson.dumps(groups), 60, "[]"])
    oldest_hour = (clock - 1) // 60 - 23
    buckets = {int(raw.decode().split(":")[3]) for raw in db.scan_iter(match="*:top:min:*")}
    assert buckets and min(buckets) // 60 == oldest_hour
    steps = 0
    while script(args=["advance", "0", 1000, 100]):
        steps += 1
    assert steps <= 10 * len(buckets) + 100
    for index, (a, b) in enumerate(SETS, start=1):
        for name in WINDOWS:
            expected: dict[str, int] = defaultdict(int)
            for minute, i, member, value in seen:
                if i == index and in_window(name, minute, clock - 1):
                    expected[member] += value
            assert zset(db, f"{a}:top:{name}:{b}") == dict(expected), (a, name)
        alltime: dict[str, int] = defaultdict(int)
        for _minute, i, member, value in seen:
            if i == index:
                alltime[member] += value
        assert zset(db, f"{a}:top:{b}") == dict(alltime)


def tshark_frames(pcap: Path) -> list[tuple[int, int, int, str, int, str, int]]:
    """(epoch second, wire length, ip protocol, src, sport, dst, dport) of every IP frame."""
    out = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-T", "fields", "-E", "separator=/t",
         "-e", "frame.time_epoch", "-e", "frame.len", "-e", "ip.proto", "-e", "ipv6.nxt",
         "-e", "ip.src", "-e", "ipv6.src", "-e", "ip.dst", "-e", "ipv6.dst",
         "-e", "tcp.srcport", "-e", "udp.srcport", "-e", "tcp.dstport", "-e", "udp.dstport"],
        capture_output=True, text=True, check=True).stdout
    frames = []
    for line in out.splitlines():
        ts, wire, p4, p6, s4, s6, d4, d6, ts_, us, td, ud = line.split("\t")
        frames.append((int(ts.split(".")[0]), int(wire), int(p4 or p6), s4 or s6,
                       int(ts_ or us or 0), d4 or d6, int(td or ud or 0)))
    return frames


def flow_key(proto: int, a: str, aport: int, b: str, bport: int) -> tuple:
    return (proto, *sorted([(a, aport), (b, bport)]))


def label_key(label: str) -> tuple[tuple, str]:
    """('TCP a:p -> b:p (id)') -> (flow key, id)."""
    head, fid = label.rsplit(" (", 1)
    name, src, _arrow, dst = head.split(" ")
    numbers = {v: k for k, v in PROTO_NAMES.items()}

    def end(text: str) -> tuple[str, int]:
        addr, port = text.rsplit(":", 1)
        return addr.strip("[]"), int(port)

    return flow_key(numbers[name], *end(src), *end(dst)), fid.rstrip(")")


def test_replayed_windows_equal_tshark_sums(stack, databases, tmp_path):
    """26 hours of capture replayed through the pipeline in many small flushes: every
    window of hosts, applications, domains and flows equals the sum tshark gives for the
    frames of its minutes (hosts and flows), or of its flows' labels (applications,
    domains: the labels inspection gives, from each flow's hash)."""
    pcap = write_synthetic_pcap(tmp_path / "day.pcap", 30_000, flows=300, seconds=26 * 3600,
                                real_payloads=True)
    number = databases.take()
    try:
        # a flow entry re-opened after a timeout does not know its server name again (only
        # its first packets carry it): here every flow keeps one entry for the whole day
        env = stack.env(number, FLUSH_INTERVAL_MS="50", MAX_POLL_RECORDS="500",
                        FLOW_IDLE_TIMEOUT_S="86400", FLOW_ACTIVE_TIMEOUT_S="604800")
        run_module("capture", env, "--pcap", str(pcap))
        run_module("flow_processor", env, "--exit-when-idle", "2")
        r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
        frames = tshark_frames(pcap)
        clock = max(sec for sec, *_ in frames) // 60
        assert int(r.get("top:window:clock")) == clock
        ids = dict(label_key(label) for label in r.zrange("flows:top:endpoints", 0, -1))
        labels = {}
        for fid in set(ids.values()):
            meta = r.hgetall(f"flow:{fid}:meta")
            labels[fid] = (meta.get("app", "UNKNOWN"), meta.get("server_name"))
        for name in [*WINDOWS, None]:
            hosts: dict[str, int] = defaultdict(int)
            flows: dict[tuple, int] = defaultdict(int)
            apps: dict[str, int] = defaultdict(int)
            domains: dict[str, int] = defaultdict(int)
            for sec, wire, proto, src, sport, dst, dport in frames:
                if name and not in_window(name, sec // 60, clock):
                    continue
                hosts[src] += wire
                if dst != src:
                    hosts[dst] += wire
                key = flow_key(proto, src, sport, dst, dport)
                flows[key] += wire
                app, domain = labels[ids[key]]
                apps[app] += wire
                if domain:
                    domains[domain] += wire
            middle = f":{name}" if name else ""
            assert {k: int(v) for k, v in r.zrange(f"hosts:top{middle}:bytes", 0, -1,
                                                   withscores=True)} == hosts, name
            got_flows = {label_key(k)[0]: int(v) for k, v in
                         r.zrange(f"flows:top{middle}:endpoints", 0, -1, withscores=True)}
            assert got_flows == flows, name
            assert {k: int(v) for k, v in r.zrange(f"apps:top{middle}:bytes", 0, -1,
                                                   withscores=True)} == apps, name
            assert {k: int(v) for k, v in r.zrange(f"domains:top{middle}:bytes", 0, -1,
                                                   withscores=True)} == domains, name
            if name == "5m":
                assert 0 < sum(flows.values()) < sum(w for _s, w, *_ in frames) / 100
            # the terminal view ranks the same window
            snap = fetch(connect(env["REDIS_URL"]), "test", top=5, window=name or "all")
            assert snap.error is None
            assert [score for _h, score in snap.hosts] == sorted(hosts.values())[::-1][:5]
            assert [f.total_bytes for f in snap.flows] == sorted(flows.values())[::-1][:5]
            assert all(f.src for f in snap.flows), "every ranked flow is joined to its hash"
    finally:
        databases.give(number)


def test_a_minute_a_partition_is_still_in_stays_open(db):
    """'advance' with an open_from minute (the oldest minute a partition may still bring data
    for) closes only the minutes before it; without one, every minute before the newest."""
    script = db.register_script(sink.TOP_LUA.read_text())
    groups = [[100, 1, [5, "a"]], [101, 1, [7, "b"]], [102, 1, [9, "c"]]]
    script(args=["add", 102, orjson.dumps(groups), 60, "[]"])
    while script(args=["advance", "0", 1000, 100, 101]):
        pass
    assert [int(m) for m in db.zrange("top:window:open:hosts", 0, -1)] == [101, 102]
    assert zset(db, "hosts:top:5m:bytes") == {"a": 5}
    script(args=["add", 102, orjson.dumps([[101, 1, [1, "b"]]]), 60, "[]"])  # one increment
    assert zset(db, "hosts:top:min:101:bytes") == {"b": 8}
    while script(args=["advance", "0", 1000, 100, ""]):
        pass
    assert [int(m) for m in db.zrange("top:window:open:hosts", 0, -1)] == [102]
    assert zset(db, "hosts:top:5m:bytes") == {"a": 5, "b": 8}
