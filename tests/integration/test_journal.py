"""The write journal (flow_processor/journal.lua) against a real Redis.

A flush's transaction stores its offsets and pushes its flow updates to the journal as
entries; each entry is then applied and removed by one script call. The updates must land
exactly once whether the writer applies every entry, stops between two of them and another
process finishes, or sends the same flush again after an error.
"""

from __future__ import annotations

import socket

import msgpack
import orjson
import pytest
import redis

from flow_processor import sink
from flow_processor.aggregate import PartitionState
from flow_processor.flows import FlowTable
from flow_processor.settings import ProcessorSettings
from packet_records import Record

S = 10**9
T = 1_700_000_000 * S
A4 = socket.inet_aton("192.0.2.10") + bytes(12)
B4 = socket.inet_aton("198.51.100.20") + bytes(12)
FLOWS = 25


@pytest.fixture
def settings(stack, databases):
    number = databases.take()
    yield ProcessorSettings(redis_url=f"{stack.redis_url}/{number}", kafka_topic="t",
                            kafka_group_id="g")
    databases.give(number)


@pytest.fixture
def kept_10(stack, databases):
    """Settings whose top-N sets keep 10 members (TOP_FLOWS_KEPT)."""
    number = databases.take()
    yield ProcessorSettings(redis_url=f"{stack.redis_url}/{number}", kafka_topic="t",
                            kafka_group_id="g", top_flows_kept=10)
    databases.give(number)


def flush_of_flows(count: int) -> PartitionState:
    """A partition holding `count` flows of 3 frames each over two seconds (flow i: frames of
    100 + i bytes), read up to offset 10."""
    state = PartitionState(0, None, FlowTable(60 * S, 600 * S, 10_000))
    records = [Record(T + second * S + i, 100 + i, 4, 6, 0, 0, 1000 + i, 80, A4, B4, 0, 0, 0)
               for i in range(count) for second in (0, 0, 1)]
    state.add_records(iter(records))
    state.next_offset = 10
    return state


def test_entries_land_once_across_a_stop_and_a_resend(settings, monkeypatch):
    monkeypatch.setattr(sink, "JOURNAL_FLOWS", 7)
    first = sink.RedisSink(settings)
    first.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    state = flush_of_flows(FLOWS)
    ids = {flow.id: flow.sport for flow in state.dirty_flows}
    groups = first.prepare([state])
    # the transaction lands with its offset; the writer applies two of the four entries and stops
    result = sink.WriteResult()
    for group in groups:
        for write in group:
            first._send_before(write.before)
        first._write_group(group, result)
    assert int(r.get("pipeline:offsets:g:t:0")) == 10
    assert r.llen(first.journal) == 5  # 25 flows, 7 an entry; then the hosts and apps
    assert r.exists(*(f"flow:{fid}:meta" for fid in ids)) == 0
    first.script(keys=[first.journal], args=["drain", 10])
    first.script(keys=[first.journal], args=["drain", 10])
    assert r.llen(first.journal) == 3
    assert r.hget("pipeline:processor", "records") == "0"  # the last entry carries it
    # the next processor to start applies the rest; the same flush sent again (an error made
    # the writer retry it) is seen as landed by the offset fence and changes nothing
    sink.RedisSink(settings).check()
    again = first.execute(groups, close_newest=True)
    assert [w.partition for w in again.written] == [0] and not again.fenced
    assert r.llen(first.journal) == 0
    assert int(r.hget("pipeline:processor", "records")) == 3 * FLOWS
    for fid, sport in ids.items():
        size = 100 + sport - 1000
        meta = r.hgetall(f"flow:{fid}:meta")
        assert (int(meta["bytes"]), int(meta["packets"])) == (3 * size, 3)
        assert meta["src"] == "192.0.2.10" and meta["sport"] == str(sport)
        assert r.ttl(f"flow:{fid}:meta") > 0
        assert float(r.zscore("flows:top:bytes", fid)) == 3 * size
    total = sum(3 * (100 + i) for i in range(FLOWS))
    assert float(r.zscore("hosts:top:bytes", "192.0.2.10")) == total
    assert float(r.zscore("hosts:top:bytes", "198.51.100.20")) == total
    assert float(r.zscore("hosts:top:5m:bytes", "192.0.2.10")) == total  # closed at the end
    pps = r.execute_command("TS.RANGE", "ts:global:pps", "-", "+")
    assert [(int(t), int(v)) for t, v in pps] == [(T // 10**6, 2 * FLOWS),
                                                  (T // 10**6 + 1000, FLOWS)]


def test_samples_past_what_a_transaction_applies_land_once_through_the_journal(
        stack, databases, monkeypatch):
    """A flush of records spread over 300 seconds (an old capture replayed into a running
    pipeline, or a forged message, spreads them over thousands): its transaction applies the
    first MADD_CHUNK samples, the rest go to the journal in entries of JOURNAL_SAMPLES, which
    land exactly once across a stop and a resend. Samples older than a series' retention
    allows are refused and counted, in the transaction and in the entries alike."""
    monkeypatch.setattr(sink, "MADD_CHUNK", 50)
    monkeypatch.setattr(sink, "JOURNAL_SAMPLES", 20)
    monkeypatch.setattr(sink, "JOURNAL_INCREMENTS", 2)  # the flow's 6 minutes: 3 entries
    number = databases.take()
    settings = ProcessorSettings(redis_url=f"{stack.redis_url}/{number}", kafka_topic="t",
                                 kafka_group_id="g", series_retention_ms=60_000)
    try:
        first = sink.RedisSink(settings)
        first.ensure_series()
        r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        newer = T // 10**6 + 320_000  # a running pipeline has a newer second already
        for metric in ("bps", "pps"):
            r.execute_command("TS.ADD", f"ts:global:{metric}", newer, 1)
        state = PartitionState(0, None, FlowTable(600 * S, 6000 * S, 10_000))
        state.add_records(iter([Record(T + second * S, 100, 4, 6, 0, 0, 1000, 80, A4, B4, 0,
                                       0, 0) for second in range(300)]))
        state.next_offset = 10
        groups = first.prepare([state], flows=False)
        (write,), = groups
        madd = [args for args in write.commands if args[0] == "TS.MADD"]
        assert [len(args) for args in madd] == [1 + 3 * 50]
        (pushed,) = [args[2:] for args in write.commands if args[0] == "RPUSH"]
        entries = [msgpack.unpackb(e) for e in pushed]
        of_samples = [e["samples"] for e in entries if isinstance(e, dict)]
        windows = [e[1] for e in entries[len(of_samples):]]
        assert [[g[0] - windows[0][0][0] for g in w if g[1] == 4] for w in windows[:3]] == [
            [0, 1], [2, 3], [4, 5]]  # the flow's minutes, at most 2 increments an entry
        sizes = [len(samples) // 3 for samples in of_samples]
        assert sizes[:-1] == [20] * (len(sizes) - 1) and 0 < sizes[-1] <= 20
        assert 50 + sum(sizes) == 2 * 300 * 4  # global, TCP, UNKNOWN, and the flow's series
        assert all(isinstance(e, dict) for e in entries[:len(of_samples)])  # before the flows
        result = sink.WriteResult()
        first._send_before(write.before)  # the flow's series
        first._write_group(groups[0], result)
        assert int(r.get("pipeline:offsets:g:t:0")) == 10
        first.script(keys=[first.journal], args=["drain", 10])  # then the writer stops
        sink.RedisSink(settings).check()  # the next processor applies the rest
        again = first.execute(groups, close_newest=True)  # and a resend changes nothing
        assert [w.partition for w in again.written] == [0] and not again.fenced
        assert r.llen(first.journal) == 0
        for metric, value in (("bps", 100), ("pps", 1)):
            kept = r.execute_command("TS.RANGE", f"ts:global:{metric}", "-", "+")
            assert [(int(t), int(float(v))) for t, v in kept] == [
                (T // 10**6 + second * 1000, value) for second in range(260, 300)] + [
                (newer, 1)]
        refused = 2 * 260  # global bps and pps before the newer second's retention
        in_redis = int(r.hget("pipeline:processor", "rejected_samples") or 0)
        assert result.rejected_samples + in_redis == refused
        assert 0 < result.rejected_samples < refused  # some in the transaction, some not
        (flow,) = state.table.flows.values()  # its series keeps a day: every second, once
        assert float(r.zscore("flows:top:1h:endpoints", flow.label)) == 300 * 100
        assert float(r.zscore("flows:top:endpoints", flow.label)) == 300 * 100
        assert float(r.zscore("hosts:top:1h:bytes", "192.0.2.10")) == 300 * 100
        kept = r.execute_command("TS.RANGE", f"ts:flow:{flow.id}:pps", "-", "+")
        assert [int(float(v)) for _t, v in kept] == [1] * 300
    finally:
        databases.give(number)


def test_a_set_an_entry_grows_past_twice_its_bound_is_cut_back_while_draining(
        kept_10, monkeypatch):
    """Under a scan every flow of a flush is a new member: the drain keeps the top-N sets
    near TOP_FLOWS_KEPT entry by entry (the highest members stay), not only after the flush."""
    monkeypatch.setattr(sink, "JOURNAL_FLOWS", 7)
    writer = sink.RedisSink(kept_10)
    writer.ensure_series()
    r = redis.Redis.from_url(kept_10.redis_url, decode_responses=True)
    state = flush_of_flows(70)
    sizes = {flow.id: 3 * (100 + flow.sport - 1000) for flow in state.dirty_flows}
    result = sink.WriteResult()
    for group in writer.prepare([state]):
        writer._write_group(group, result)
    largest = 0
    while writer.script(keys=[writer.journal], args=["drain", 10]):
        largest = max(largest, r.zcard("flows:top:bytes"), r.zcard("flows:top:endpoints"))
    assert 10 <= largest <= 20
    kept = r.zrange("flows:top:bytes", 0, -1, withscores=True)
    assert sorted(score for _m, score in kept)[-5:] == sorted(sizes.values())[-5:]
    assert all(sizes[member] == score for member, score in kept)


def test_a_flow_trimmed_from_the_top_sets_comes_back_with_its_total(kept_10):
    """flows:top:bytes and flows:top:endpoints keep the TOP_FLOWS_KEPT largest flows; one
    trimmed from them that grows later ranks by its whole total (its hash's), not by the
    bytes since it was trimmed."""
    writer = sink.RedisSink(kept_10)
    writer.ensure_series()
    r = redis.Redis.from_url(kept_10.redis_url, decode_responses=True)
    state = flush_of_flows(30)  # flow i: 3 frames of 100 + i bytes
    (small,) = [f for f in state.dirty_flows if f.sport == 1000]
    writer.execute(writer.prepare([state]), close_newest=True)
    assert r.zcard("flows:top:bytes") == r.zcard("flows:top:endpoints") == 10
    assert r.zscore("flows:top:bytes", small.id) is None  # 300 bytes: trimmed
    state.add_records(iter([Record(T + 2 * S, 1000, 4, 6, 0, 0, 1000, 80, A4, B4, 0, 0, 0)]))
    state.next_offset = 11
    writer.execute(writer.prepare([state]), close_newest=True)
    assert int(r.hget(f"flow:{small.id}:meta", "bytes")) == 300 + 1000
    assert float(r.zscore("flows:top:bytes", small.id)) == 1300
    assert float(r.zscore("flows:top:endpoints", small.label)) == 1300
    assert r.zrevrange("flows:top:bytes", 0, 0) == [small.id]  # the largest now


def test_flows_below_a_full_top_sets_lowest_kept_score_are_left_out_and_the_top_stays_exact(
        kept_10):
    """Once flows:top:bytes holds TOP_FLOWS_KEPT flows, a flow whose total is below the lowest
    of them is not added (a scan of small flows costs no ZADD each); one that grows past it
    is, with its whole total, and the set's highest are always the largest flows."""
    writer = sink.RedisSink(kept_10)
    writer.ensure_series()
    r = redis.Redis.from_url(kept_10.redis_url, decode_responses=True)
    state = PartitionState(0, None, FlowTable(60 * S, 600 * S, 10_000))
    totals: dict[int, int] = {}

    def flush(sizes: dict[int, int], offset: int) -> None:  # {source port: frame bytes}
        state.add_records(iter([Record(T + offset * S, size, 4, 6, 0, 0, port, 80, A4, B4,
                                       0, 0, 0) for port, size in sizes.items()]))
        state.next_offset = offset
        writer.execute(writer.prepare([state]), close_newest=True)
        for port, size in sizes.items():
            totals[port] = totals.get(port, 0) + size

    flush({port: 1000 + port for port in range(10)}, 1)  # 10 flows of 1,000-1,009 bytes
    flush({port: 500 for port in range(100, 130)}, 2)  # 30 smaller ones: none gets in
    assert r.zcard("flows:top:bytes") == r.zcard("flows:top:endpoints") == 10
    flush({100: 700, 5: 100}, 3)  # one of them passes the lowest (1,200 > 1,000), one grows
    ids = {flow.sport: flow.id for flow in state.table.flows.values()}
    top = r.zrevrange("flows:top:bytes", 0, 9, withscores=True)
    largest = sorted(totals.items(), key=lambda item: -item[1])[:10]
    assert top == [(ids[port], float(total)) for port, total in largest]
    assert r.zscore("flows:top:bytes", ids[100]) == 1200
    for port, total in totals.items():  # every hash is exact, in the set or not
        assert int(r.hget(f"flow:{ids[port]}:meta", "bytes")) == total


def test_flows_a_flush_makes_below_its_top_kept_are_left_out_of_the_top_sets(kept_10):
    """A flush of more new flows than TOP_FLOWS_KEPT, over several partitions (a replay's
    flows, written at its end): a flow whose hash it makes and whose bytes are below the
    TOP_FLOWS_KEPT-th largest of them is not added to the flows:top sets (it would be trimmed
    after the flush); a flow whose hash exists already (it left the table and came back)
    ranks by its hash's total. The sets hold the largest flows exactly, before any trim."""
    writer = sink.RedisSink(kept_10)
    writer.ensure_series()
    r = redis.Redis.from_url(kept_10.redis_url, decode_responses=True)
    states = []
    for partition in (0, 1):  # 12 flows each, flow i: 3 frames of 100 + 10 * i (+5) bytes
        state = PartitionState(partition, None, FlowTable(60 * S, 600 * S, 10_000))
        state.add_records(iter([
            Record(T + second * S + i, 100 + 10 * i + 5 * partition, 4, 6, 0, 0,
                   1000 + 100 * partition + i, 80, A4, B4, 0, 0, 0)
            for i in range(12) for second in (0, 0, 1)]))
        state.next_offset = 10
        states.append(state)
    flows = [f for state in states for f in state.dirty_flows]
    totals = {f.id: 3 * (100 + 10 * (f.sport % 100) + 5 * (f.sport // 1100)) for f in flows}
    (back,) = [f for f in flows if f.sport == 1000]  # the smallest, with an earlier hash
    r.hset(f"flow:{back.id}:meta", mapping={"src": "192.0.2.10", "bytes": 5000, "packets": 9})
    totals[back.id] += 5000
    assert writer.least_new_top_total(states) == sorted(
        3 * (100 + 10 * i + 5 * p) for i in range(12) for p in (0, 1))[-10]
    result = sink.WriteResult()
    for group in writer.prepare(states):
        writer._write_group(group, result)
    assert writer.drain_journal() == 0  # no trim after the flush yet
    largest = sorted(totals.items(), key=lambda item: -item[1])
    # the 10 largest new flows, and the flow that came back, first among them
    assert r.zrevrange("flows:top:bytes", 0, -1, withscores=True) == [
        (fid, float(total)) for fid, total in largest[:11]]
    labels = {f.id: f.label for f in flows}
    assert r.zrevrange("flows:top:endpoints", 0, -1, withscores=True) == [
        (labels[fid], float(total)) for fid, total in largest[:11]]
    for fid, total in totals.items():  # every hash is exact
        assert int(r.hget(f"flow:{fid}:meta", "bytes")) == total


def test_a_drain_call_applies_entries_up_to_its_byte_budget(settings, monkeypatch):
    """One script call applies entries until they add up to the bytes it is given (at least
    one; an entry of samples alone); a call without a budget applies one."""
    monkeypatch.setattr(sink, "JOURNAL_FLOWS", 7)
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    result = sink.WriteResult()
    for group in writer.prepare([flush_of_flows(FLOWS)]):
        writer._write_group(group, result)
    entries = redis.Redis.from_url(settings.redis_url).lrange(writer.journal, 0, -1)
    assert len(entries) == 5
    two = len(entries[0]) + len(entries[1])
    assert writer.script(keys=[writer.journal], args=["drain", 10, two]) == 3
    assert writer.script(keys=[writer.journal], args=["drain", 10, 1]) == 2
    assert writer.script(keys=[writer.journal], args=["drain", 10]) == 1
    assert writer.script(keys=[writer.journal], args=["drain", 10, 10**9]) == 0
    assert int(r.hget("pipeline:processor", "records")) == 3 * FLOWS
    # an entry of samples (each up to 100 us when older than its series' newest) gets a call
    # of its own, after other entries or before them; an empty entry is counted and removed
    # (the flow entries go in again: only the calls count here)
    ms = T // 10**6
    r.rpush(writer.journal, *entries[:2],
            *(msgpack.packb({"samples": ["ts:global:pps", str(ms + i), "1"]}) for i in range(2)),
            entries[2], b"")
    assert writer.script(keys=[writer.journal], args=["drain", 10, 10**9]) == 4  # 2 entries
    assert writer.script(keys=[writer.journal], args=["drain", 10, 10**9]) == 3  # a sample
    assert writer.script(keys=[writer.journal], args=["drain", 10, 10**9]) == 2  # a sample
    assert writer.drain_journal() == 1 and r.llen(writer.journal) == 0  # the empty one
    assert len(r.execute_command("TS.RANGE", "ts:global:pps", ms, ms + 1)) == 2


def test_entries_of_the_earlier_form_a_flow_an_array_are_applied_as_before(settings):
    """Entries pushed by an earlier version (a flow an array, TTLs in the keys to EXPIRE, no
    endpoints member; JSON, in the journal key of the versions before MessagePack) left
    across an upgrade are applied as that version applied them."""
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    new = ["00000000000000aa", 300, 3, "2.000000000", ["TLS", 1, "example.org", "t13d"],
           ["192.0.2.10", "198.51.100.20", 1000, 443, 6, "1.000000000"]]
    known = ["00000000000000bb", 50, 1, "3.000000000", 0, 0]
    r.hset("flow:00000000000000bb:meta", mapping={"src": "192.0.2.1", "bytes": 100,
                                                   "packets": 2, "app": "DNS"})
    r.rpush(writer.json_journal, orjson.dumps(
        [1, [[1, 4, [300, "TCP 192.0.2.10:1000 -> 198.51.100.20:443 (00000000000000aa)"]]],
         600, ["flow:00000000000000aa:meta"], [new, known], [["records", 4]]]))
    assert writer.drain_journal() == 0  # none failed
    assert r.llen(writer.json_journal) == 0
    assert r.hgetall("flow:00000000000000aa:meta") == {
        "src": "192.0.2.10", "dst": "198.51.100.20", "sport": "1000", "dport": "443",
        "proto": "6", "first_seen": "1.000000000", "bytes": "300", "packets": "3",
        "last_seen": "2.000000000", "app": "TLS", "app_guess": "1",
        "server_name": "example.org", "fingerprint": "t13d"}
    assert 0 < r.ttl("flow:00000000000000aa:meta") <= 600
    assert r.hgetall("flow:00000000000000bb:meta") == {
        "src": "192.0.2.1", "bytes": "150", "packets": "3", "app": "DNS",
        "last_seen": "3.000000000"}
    assert r.ttl("flow:00000000000000bb:meta") == -1  # not in the keys to EXPIRE
    assert r.zrange("flows:top:bytes", 0, -1, withscores=True) == [
        ("00000000000000bb", 150.0), ("00000000000000aa", 300.0)]
    assert r.zrange("flows:top:min:1:endpoints", 0, -1, withscores=True) == [
        ("TCP 192.0.2.10:1000 -> 198.51.100.20:443 (00000000000000aa)", 300.0)]
    assert r.hget("pipeline:processor", "records") == "4"


def flat_flow(fid: str, nbytes: int, packets: int, src: str, endpoints: str) -> list:
    """One flow of an entry in journal.lua's flat form: its first write from this table entry
    (src given), sent by src to 198.51.100.20:443, no labels."""
    return [fid, nbytes, packets, "2.000000000", 0, 0, "", "", src, "198.51.100.20", 1000, 443,
            6, "1.000000000", endpoints, 1]


def test_first_writes_make_whole_hashes_keep_an_existing_src_and_add_what_is_listed_twice(
        settings):
    """A flow's first write makes its hash with every field, unless the hash exists (an
    earlier table entry of the flow): then its first sender stays and the bytes add up. A
    flow or a top-N member listed twice in an entry gets both updates, as one at a time.
    (Entries in JSON, as the previous version pushed them, and MessagePack alike.)"""
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    r.hset("flow:00000000000000cc:meta", mapping={"src": "198.51.100.20", "bytes": 100,
                                                   "packets": 1})
    fresh_twice = [*flat_flow("00000000000000aa", 300, 3, "192.0.2.10", "a"),
                   *flat_flow("00000000000000aa", 20, 1, "192.0.2.99", "a")]
    known_and_new = [*flat_flow("00000000000000cc", 50, 1, "192.0.2.10", "c"),
                     *flat_flow("00000000000000dd", 70, 2, "192.0.2.10", "d")]
    hosts = [[1, 1, [5, "192.0.2.10", 7, "192.0.2.10", 3, "198.51.100.20"]]]
    r.rpush(writer.journal, orjson.dumps([1, hosts, 600, [], [], [], fresh_twice]),
            msgpack.packb([1, [], 600, [], [], [["records", 7]], known_and_new]))
    assert writer.drain_journal() == 0  # none failed
    fixed = {"dst": "198.51.100.20", "sport": "1000", "dport": "443", "proto": "6",
             "first_seen": "1.000000000", "last_seen": "2.000000000"}
    assert r.hgetall("flow:00000000000000aa:meta") == {
        **fixed, "src": "192.0.2.10", "bytes": "320", "packets": "4"}
    assert r.hgetall("flow:00000000000000cc:meta") == {
        "src": "198.51.100.20", "bytes": "150", "packets": "2", "last_seen": "2.000000000"}
    assert r.hgetall("flow:00000000000000dd:meta") == {
        **fixed, "src": "192.0.2.10", "bytes": "70", "packets": "2"}
    assert all(0 < r.ttl(f"flow:00000000000000{x}:meta") <= 600 for x in ("aa", "cc", "dd"))
    for key in ("hosts:top:bytes", "hosts:top:min:1:bytes"):
        assert r.zrange(key, 0, -1, withscores=True) == [
            ("198.51.100.20", 3.0), ("192.0.2.10", 12.0)]
    assert r.zrange("flows:top:bytes", 0, -1, withscores=True) == [
        ("00000000000000dd", 70.0), ("00000000000000cc", 150.0), ("00000000000000aa", 320.0)]
    assert r.hget("pipeline:processor", "records") == "7"


def test_an_entry_that_cannot_be_applied_is_counted_and_does_not_stop_the_rest(settings,
                                                                             caplog):
    """A damaged entry, or a key of another type in the way (an operator's SET on a top-N
    set): the entry is logged and counted as a write error, and the entries after it land."""
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    r.set("domains:top:bytes", "in the way")
    good = flush_of_flows(3)
    groups = writer.prepare([good])
    r.rpush(writer.journal, b"{not json")  # before the flush's own entries
    result = writer.execute(groups, close_newest=True)
    assert result.write_errors == 1 and r.llen(writer.journal) == 0
    assert "could not be applied" in caplog.text
    assert int(r.hget("pipeline:processor", "records")) == 9
    assert r.zcard("flows:top:bytes") == 3
    r.delete("domains:top:bytes")
    r.rpush(writer.journal, orjson.dumps(
        [1, [[1, 3, [5, "example.org"]]], 60, [], [], [["records", 1]]]))
    r.set("domains:top:bytes", "in the way")
    assert writer.drain_journal() == 1  # the increment met a string: counted, removed
    assert r.llen(writer.journal) == 0 and int(r.hget("pipeline:processor", "records")) == 9


def test_a_partitions_first_write_stores_where_its_flow_part_starts(settings):
    """A first write (nothing stored yet) stores the series and, as the flow part's offset,
    the first message read: the flows wait for a later write (or for the next owner, who reads
    those messages again for them)."""
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    state = flush_of_flows(3)
    state.flow_start = 4  # the first message this partition read
    ids = [flow.id for flow in state.dirty_flows]
    writer.execute(writer.prepare([state], flows=False), close_newest=False)
    assert (r.get("pipeline:offsets:g:t:0"), r.get("pipeline:flow_offsets:g:t:0")) == ("10", "4")
    assert r.exists(*(f"flow:{fid}:meta" for fid in ids)) == 0 and r.llen(writer.journal) == 0
    assert (state.base_offset, state.flow_base) == (10, 4) and state.flows_pending
    writer.execute(writer.prepare([state], flows=True), close_newest=True)
    assert r.get("pipeline:flow_offsets:g:t:0") == "10"
    assert [int(r.hget(f"flow:{fid}:meta", "packets")) for fid in ids] == [3, 3, 3]
    assert int(r.hget("pipeline:processor", "records")) == 9


def partition_of_flows(partition: int, count: int) -> PartitionState:
    """flush_of_flows() for another partition: flow i sends from port 2000 * partition + i."""
    state = PartitionState(partition, None, FlowTable(60 * S, 600 * S, 10_000))
    base = 2000 * (partition + 1)
    state.add_records(iter([Record(T + second * S + i, 100 + i, 4, 6, 0, 0, base + i, 80, A4,
                                   B4, 0, 0, 0)
                            for i in range(count) for second in (0, 0, 1)]))
    state.next_offset = 10
    return state


def test_a_flush_streamed_group_by_group_lands_once_after_an_error_mid_stream(settings,
                                                                             monkeypatch):
    """The processor hands a flush to the writer thread a group at a time, while it builds the
    next: when the second group fails, settle() raises that error once and the next settle()
    sends the whole flush again; the group that had landed is seen as landed (offset fence)."""
    monkeypatch.setattr(sink, "JOURNAL_FLOWS", 7)
    monkeypatch.setattr(sink, "SEND_AT_ONCE_ENTRIES", 1)  # every partition a group of its own
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    states = [partition_of_flows(p, FLOWS) for p in range(3)]
    ports = {flow.id: flow.sport for st in states for flow in st.dirty_flows}
    calls = []
    write_group = writer.write_group

    def failing_once(group, result):
        calls.append([w.partition for w in group])
        if len(calls) == 2:
            raise redis.ConnectionError("connection lost")
        write_group(group, result)

    monkeypatch.setattr(writer, "write_group", failing_once)
    background = sink.BackgroundWriter(writer)
    background.start(close_newest=True)
    groups = 0
    for group in writer.prepare_groups(states):
        background.add(group)
        groups += 1
    background.finish()
    assert groups == 3
    with pytest.raises(redis.ConnectionError):
        background.settle()
    assert calls == [[0], [1]]  # the writer stopped at the error
    assert r.get("pipeline:offsets:g:t:0") == "10" and r.get("pipeline:offsets:g:t:1") is None
    result = background.settle()  # sent again, whole, in this thread
    assert sorted(w.partition for w in result.written) == [0, 1, 2] and not result.fenced
    assert background.settle() is None
    for p in range(3):
        assert r.get(f"pipeline:offsets:g:t:{p}") == "10"
    assert r.llen(writer.journal) == 0
    assert int(r.hget("pipeline:processor", "records")) == 3 * 3 * FLOWS
    for fid, sport in ports.items():
        size = 100 + sport % 2000
        meta = r.hgetall(f"flow:{fid}:meta")
        assert (int(meta["bytes"]), int(meta["packets"])) == (3 * size, 3), fid
        assert float(r.zscore("flows:top:bytes", fid)) == 3 * size
    total = 3 * sum(3 * (100 + i) for i in range(FLOWS))
    assert float(r.zscore("hosts:top:bytes", "192.0.2.10")) == total


def test_a_series_flush_where_redis_has_no_flow_offset_keeps_the_flow_part_to_write(settings):
    """After --reset-data (or offsets of an older version) Redis holds the series offset only,
    and the flow offset is read as that one. A flush of the series part alone must store the
    flow offset where it stays: else Redis reads it as the new series offset, and the flow
    part's own write, fenced on the old one, passed for one that had landed and was dropped."""
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    r.set("pipeline:offsets:g:t:0", 5)  # no pipeline:flow_offsets:g:t:0
    stored = writer.stored_offset_pairs([0])[0]
    assert stored == (5, 5)
    state = PartitionState(0, stored[0], FlowTable(60 * S, 600 * S, 10_000), stored[1])
    state.add_records(iter([Record(T + i, 100 + i, 4, 6, 0, 0, 1000 + i, 80, A4, B4, 0, 0, 0)
                            for i in range(FLOWS)]))
    state.next_offset = 6
    writer.execute(writer.prepare([state], flows=False), close_newest=False)
    assert writer.stored_offset_pairs([0])[0] == (6, 5)
    result = writer.execute(writer.prepare([state], flows=True), close_newest=True)
    assert [w.partition for w in result.written] == [0] and not result.fenced
    assert writer.stored_offset_pairs([0])[0] == (6, 6)
    assert int(r.hget("pipeline:processor", "records")) == FLOWS
    assert len(r.keys("flow:*:meta")) == FLOWS


def test_flows_given_series_count_among_the_top_before_their_flow_write(stack, databases):
    """FLOW_SERIES=top gives series to flows that would rank among the top FLOW_SERIES_TOP of
    flows:top:bytes. Flows get into that set with their flow write, later than their series
    (a replay's flows are written at its end): the flows that got series count among the top
    meanwhile, across partitions and flushes, or every partition's every flush would give its
    own top flows series."""
    number = databases.take()
    settings = ProcessorSettings(redis_url=f"{stack.redis_url}/{number}", kafka_topic="t",
                                 kafka_group_id="g", flow_series_top=5,
                                 flow_series_min_bytes=10**9)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    writer = sink.RedisSink(settings)
    writer.ensure_series()
    states = [PartitionState(p, None, FlowTable(60 * S, 600 * S, 10_000)) for p in (0, 1)]

    def flush(offset: int, sizes: dict[int, list[int]]) -> set[str]:
        """A series-only flush of flows of these sizes (one frame each); the flows given
        series."""
        for state in states:
            state.flow_start = 0  # (not a first write: those write the flow part too)
            state.add_records(iter([
                Record(T + offset * S, size, 4, 6, 0, 0, 10_000 * offset + i, 80 + state.partition,
                       A4, B4, 0, 0, 0) for i, size in enumerate(sizes[state.partition])]))
            state.next_offset = offset
        writer.execute(writer.prepare(states, flows=False), close_newest=False)
        assert not r.exists("flows:top:bytes")  # no flow write yet
        return {key.split(":")[2] for key in r.keys("ts:flow:*:bps")}

    try:
        # partition 0: 100, 200, ... 2000 bytes; partition 1: 110, 210, ... 2010. The top 5 of
        # both: 2010, 2000, 1910, 1900, 1810 (partition 0 gives its top 5 series, partition 1
        # the three of them above 1800: the 6th once 1600-2000 have series)
        first = flush(1, {0: list(range(100, 2001, 100)), 1: list(range(110, 2011, 100))})
        assert len(first) == 8
        # smaller flows in a later flush: none of them reaches the top
        assert flush(2, {0: list(range(10, 1000, 50)), 1: list(range(20, 1000, 50))}) == first
        # one bigger flow does
        assert len(flush(3, {0: [5000], 1: [100]})) == 9
    finally:
        databases.give(number)
