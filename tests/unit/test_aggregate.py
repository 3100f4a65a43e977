"""flow_processor.aggregate.PartitionState.add_records: per-second sums and flows."""

from __future__ import annotations

import socket

import pytest

from flow_processor.aggregate import PartitionState
from flow_processor.flows import FlowTable, flow_id
from packet_records import (
    APP_GUESS,
    FLAG_HAS_META,
    FLAG_MALFORMED,
    FLAG_TRUNCATED,
    META_FINGERPRINT,
    META_SERVER_NAME,
    Record,
)
from packet_records.apps import APP_ID

A4 = socket.inet_aton("192.0.2.10") + bytes(12)
B4 = socket.inet_aton("198.51.100.20") + bytes(12)
A6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
B6 = socket.inet_pton(socket.AF_INET6, "2001:db8::20")
MAC = bytes.fromhex("02000000000a") + bytes(10)
S = 10**9
SEC0 = 1_700_000_000
T = SEC0 * S


def rec(ts, wire=100, src=A4, sport=40000, dst=B4, dport=80, proto=6, ipver=4, flags=0,
        app=0, app_flags=0):
    return Record(ts, wire, ipver, proto, 0, flags, sport, dport, src, dst, app, app_flags, 0)


def state_with(*records, meta=()) -> PartitionState:
    state = PartitionState(0, None, FlowTable(60 * S, 600 * S, 1000))
    state.add_records(iter(records), list(meta))
    return state


def seconds_by_flow_id(state: PartitionState) -> dict:
    """state.flow_seconds keyed by (flow id, second)."""
    return {(flow.id, sec): cell for (flow, sec), cell in state.flow_seconds.items()}


# ----------------------------------------------------------------------------- per-second sums
def test_global_and_protocol_sums_per_capture_second_out_of_order():
    state = state_with(
        rec(T + S // 5, 100),  # second 0, TCP
        rec(T + 3 * S // 2, 200, proto=17, sport=5000, dport=53),  # second 1, UDP
        rec(T + 9 * S // 10, 300),  # back in second 0
        rec(T + 2 * S, 50, proto=1, sport=0, dport=0),  # second 2, ICMP
        rec(T + S, 25),  # back in second 1
    )
    assert state.global_ == {SEC0: [400, 2], SEC0 + 1: [225, 2], SEC0 + 2: [50, 1]}
    assert state.protocols == {
        ("TCP", SEC0): [400, 2], ("UDP", SEC0 + 1): [200, 1], ("TCP", SEC0 + 1): [25, 1],
        ("ICMP", SEC0 + 2): [50, 1],
    }


def test_second_boundary_floors_the_capture_time():
    state = state_with(rec(T - 1, 10), rec(T, 20))
    assert state.global_ == {SEC0 - 1: [10, 1], SEC0: [20, 1]}


@pytest.mark.parametrize("ipver, proto, name", [
    (4, 6, "TCP"), (6, 6, "TCP"), (4, 17, "UDP"), (4, 1, "ICMP"), (6, 58, "ICMPV6"),
    (4, 47, "OTHER"), (6, 132, "OTHER"), (4, 50, "OTHER"), (0, 0, "OTHER"), (0, 6, "OTHER"),
])
def test_protocol_bucket(ipver, proto, name):
    assert state_with(rec(T, 60, proto=proto, ipver=ipver)).protocols == {(name, SEC0): [60, 1]}


def test_non_ip_frames_count_but_make_no_flow():
    state = state_with(rec(T, 60, src=MAC, dst=MAC, sport=0, dport=0, proto=0, ipver=0))
    assert state.global_ == state.no_flow == {SEC0: [60, 1]} and state.records == 1
    assert len(state.table) == 0 and state.flow_seconds == {} and state.dirty_flows == []


def test_other_ip_protocols_do_make_flows():
    state = state_with(rec(T, 60, proto=47, sport=0, dport=0))
    (flow,) = state.table.flows.values()
    assert (flow.proto, flow.src, flow.dst) == (47, "192.0.2.10", "198.51.100.20")


# ----------------------------------------------------------------------------- flows
def test_both_directions_are_one_flow():
    state = state_with(rec(T, 100), rec(T + 1, 1500, B4, 80, A4, 40000), rec(T + S, 40))
    (flow,) = state.table.flows.values()
    assert (flow.delta_packets, flow.delta_bytes) == (3, 1640)
    assert seconds_by_flow_id(state) == {(flow.id, SEC0): [1600, 2], (flow.id, SEC0 + 1): [40, 1]}
    assert state.no_flow == {}
    assert state.dirty_flows == [flow] and flow.dirty


def test_flow_id_does_not_depend_on_which_direction_came_first():
    forward = state_with(rec(T, src=A6, sport=41000, dst=B6, dport=443, ipver=6))
    backward = state_with(rec(T, src=B6, sport=443, dst=A6, dport=41000, ipver=6))
    (f1,), (f2,) = forward.table.flows.values(), backward.table.flows.values()
    assert f1.id == f2.id == flow_id(f1.key) and f1.key == f2.key


def test_distinct_flows_get_distinct_ids():
    state = state_with(rec(T), rec(T, sport=40001), rec(T, proto=17), rec(T, dst=A4))
    ids = {f.id for f in state.table.flows.values()}
    assert len(state.table) == len(ids) == 4


@pytest.mark.parametrize("first, src, dst, sport, dport", [
    (rec(T, src=A4, sport=40000, dst=B4, dport=80), "192.0.2.10", "198.51.100.20", 40000, 80),
    (rec(T, src=B4, sport=80, dst=A4, dport=40000), "198.51.100.20", "192.0.2.10", 80, 40000),
])
def test_flow_source_is_the_sender_of_the_first_record(first, src, dst, sport, dport):
    reply = rec(T + 1, src=first.dst, sport=first.dport, dst=first.src, dport=first.sport)
    (flow,) = state_with(first, reply).table.flows.values()
    assert (flow.src, flow.dst, flow.sport, flow.dport) == (src, dst, sport, dport)


def test_ipv6_flow_addresses_are_text():
    (flow,) = state_with(rec(T, src=B6, dst=A6, ipver=6)).table.flows.values()
    assert (flow.src, flow.dst) == ("2001:db8::20", "2001:db8::10")


def test_first_and_last_ns_are_the_min_and_max_capture_time():
    state = state_with(*(rec(T + k * S) for k in (5, 3, 9, 4)))
    (flow,) = state.table.flows.values()
    assert (flow.opened_ns, flow.first_ns, flow.last_ns) == (T + 5 * S, T + 3 * S, T + 9 * S)
    assert state.clock_ns == T + 9 * S


def test_clean_flow_in_the_table_becomes_dirty_again_once():
    state = state_with(rec(T))
    (flow,) = state.dirty_flows
    flow.dirty = False
    state.clear()
    state.add_records(iter([rec(T + S), rec(T + 2 * S)]))
    assert state.dirty_flows == [flow] and len(state.table) == 1


def test_successive_calls_accumulate():
    state = state_with(rec(T, 10))
    state.add_records(iter([rec(T + 1, 20), rec(T - S, 5)]))
    assert state.global_ == {SEC0: [30, 2], SEC0 - 1: [5, 1]}
    assert state.records == 3 and state.clock_ns == T + 1


# ----------------------------------------------------------------------------- malformed
def test_malformed_frames_are_counted_and_still_aggregated():
    state = state_with(
        rec(T, 60, flags=FLAG_MALFORMED),
        rec(T, 60, flags=FLAG_MALFORMED | FLAG_TRUNCATED, ipver=0, proto=0),
        rec(T, 60, flags=FLAG_TRUNCATED),
        rec(T, 60),
    )
    assert (state.records, state.malformed_frames, state.malformed_messages) == (4, 2, 0)
    assert state.global_ == {SEC0: [240, 4]}


def test_clear_forgets_the_aggregates_but_not_the_flows():
    state = state_with(rec(T, 60, flags=FLAG_MALFORMED))
    state.clear()
    assert (state.global_, state.protocols, state.flow_seconds, state.dirty_flows) == (
        {}, {}, {}, [])
    assert (state.records, state.malformed_frames, len(state.table)) == (0, 0, 1)


# ----------------------------------------------------------------------------- labels
DNS, HTTP, TLS = APP_ID["DNS"], APP_ID["HTTP"], APP_ID["TLS"]


def test_first_application_label_is_taken():
    (flow,) = state_with(rec(T), rec(T + 1, app=TLS)).table.flows.values()
    assert (flow.app, flow.app_guess, flow.labels_changed) == (TLS, False, True)


def test_unlabelled_records_keep_the_flow_label():
    (flow,) = state_with(rec(T, app=TLS), rec(T + 1)).table.flows.values()
    assert flow.app == TLS


def test_a_port_guess_does_not_replace_an_inspected_label():
    (flow,) = state_with(rec(T, app=TLS), rec(T + 1, app=HTTP, app_flags=APP_GUESS)
                         ).table.flows.values()
    assert (flow.app, flow.app_guess) == (TLS, False)


def test_an_inspected_label_replaces_a_port_guess():
    (flow,) = state_with(rec(T, app=HTTP, app_flags=APP_GUESS), rec(T + 1, app=TLS)
                         ).table.flows.values()
    assert (flow.app, flow.app_guess) == (TLS, False)


def test_meta_entries_go_to_the_flow_of_their_record():
    records = [rec(T, sport=1), rec(T, sport=2, flags=FLAG_HAS_META), rec(T, sport=3)]
    meta = [(1, META_SERVER_NAME, "www.example.org"), (1, META_FINGERPRINT, "t13d1516h2_x")]
    flows = {f.sport: f for f in state_with(*records, meta=meta).table.flows.values()}
    assert (flows[2].server_name, flows[2].fingerprint) == ("www.example.org", "t13d1516h2_x")
    assert flows[2].labels_changed and not flows[1].labels_changed
    assert flows[1].server_name is None and flows[3].server_name is None


def test_meta_entries_without_the_record_flag_are_ignored():
    (flow,) = state_with(rec(T), meta=[(0, META_SERVER_NAME, "x.example")]).table.flows.values()
    assert flow.server_name is None


# ----------------------------------------------------------------------------- per-flow series
def flushed(state: PartitionState, policy="top", min_bytes=10**9, scores=(), top_n=0,
            max_held=60) -> None:
    """What a flush does to the state once Redis took it."""
    state.plan_series(policy, min_bytes, list(scores), top_n, max_held)
    state.written()


def test_all_policy_gives_every_flow_its_series_at_once():
    state = state_with(rec(T, 100))
    (flow,) = state.dirty_flows
    state.plan_series("all", 10**9, [], 0, 60)
    assert flow.qualifies
    state.written()
    assert flow.series and flow.held is None and flow.total_bytes == 100


def test_top_policy_holds_cells_until_the_flow_reaches_the_byte_threshold():
    state = state_with(rec(T, 100), rec(T + S, 50))
    (flow,) = state.table.flows.values()
    flushed(state, min_bytes=1000)
    assert not flow.series and flow.held == {SEC0: [100, 1], SEC0 + 1: [50, 1]}
    assert flow.total_bytes == 150 and state.flow_seconds == {}
    state.add_records(iter([rec(T + S, 900), rec(T + 2 * S, 10)]))
    state.plan_series("top", 1000, [], 0, 60)
    assert flow.qualifies  # 1060 bytes: the held cells and these go out with this flush
    state.written()
    assert flow.series and flow.held is None and flow.total_bytes == 1060


def test_a_flush_that_did_not_land_changes_nothing():
    state = state_with(rec(T, 100))
    (flow,) = state.dirty_flows
    state.plan_series("top", 50, [], 0, 60)
    state.plan_series("top", 50, [], 0, 60)  # retried after an error: the same decision
    assert flow.qualifies and not flow.series and flow.total_bytes == 0


def test_top_policy_takes_the_top_n_of_the_set_and_the_flush():
    state = state_with(rec(T, 100, sport=1), rec(T, 300, sport=2), rec(T, 200, sport=3))
    flows = {f.sport: f for f in state.table.flows.values()}
    state.plan_series("top", 10**9, [1000.0, 250.0], 3, 60)  # ranked: 1000 300 250 200 100
    assert [flows[p].qualifies for p in (1, 2, 3)] == [False, True, False]


def test_fewer_flows_than_the_top_n_all_qualify():
    state = state_with(rec(T, 1, sport=1), rec(T, 2, sport=2))
    state.plan_series("top", 10**9, [], 100, 60)
    assert all(f.qualifies for f in state.dirty_flows)


def test_a_flow_holding_too_many_seconds_gets_its_series():
    state = state_with(*(rec(T + k * S, 10) for k in range(3)))
    (flow,) = state.dirty_flows
    flushed(state, max_held=3)
    assert not flow.series and len(flow.held) == 3
    state.add_records(iter([rec(T + 3 * S, 10)]))
    state.plan_series("top", 10**9, [], 0, 3)
    assert flow.qualifies


def test_write_cost_counts_flows_and_cells():
    state = state_with(rec(T), rec(T + S), rec(T, sport=1))
    assert state.write_cost == 4 * 2 + 3
