"""flow_processor.aggregate.PartitionState.add_records: per-second sums and flows."""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from capture.batching import RecordBatcher
from capture.decode import decode_frame
from capture.pcapfile import read_frames
from flow_processor.aggregate import PartitionState
from flow_processor.flows import KEY_FORMAT, Flow, FlowTable, flow_id
from packet_records import (
    APP_GUESS,
    FLAG_HAS_META,
    FLAG_MALFORMED,
    FLAG_TRUNCATED,
    META_FINGERPRINT,
    META_SERVER_NAME,
    PROTO_NAMES,
    RECORD,
    Record,
    decode_batch,
    encode_batch,
)
from packet_records.apps import APP_ID
from tests.synthetic import write_synthetic_pcap

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
    state.sync_flows()  # (as a flush does before it reads the flows)
    return state


def flow_seconds(state: PartitionState) -> dict:
    """state.cells() as {(flow, second): [bytes, packets]}."""
    slot, sec, nbytes, packets = (c.tolist() for c in state.cells())
    return {(state.dirty_flows[s], t): [b, p] for s, t, b, p in zip(slot, sec, nbytes, packets)}


def seconds_by_flow_id(state: PartitionState) -> dict:
    """The flush's (flow, second) cells keyed by (flow id, second)."""
    return {(flow.id, sec): cell for (flow, sec), cell in flow_seconds(state).items()}


def held(state: PartitionState, flow: Flow) -> list[tuple[int, int, int]]:
    """(second, bytes, packets) the table holds for a flow without series."""
    return state.table.held.cells([flow.uid]).get(flow.uid, [])


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
    assert len(state.table) == 0 and flow_seconds(state) == {} and state.dirty_flows == []


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


def test_new_flows_per_record_of_the_last_aggregation():
    state = PartitionState(0, None, FlowTable(60 * S, 600 * S, 1000))
    assert state.new_flows_per_record == 1.0  # nothing known yet: taken as a scan's
    state.add_records(iter([rec(T, sport=p) for p in range(1000, 1010)]))  # a new flow each
    assert state.new_flows_per_record == 1.0
    # eight records of two flows seen before, and two of a new one: distinct flows per record
    # would be 3 / 10, flows new to the table are 1 / 10
    state.add_records(iter([rec(T + i, sport=1000 + i % 2) for i in range(8)]
                           + [rec(T + 9, sport=2000), rec(T + 9, sport=2000)]))
    assert state.new_flows_per_record == 1 / 10
    # a busy network's small batch: every record a distinct flow, but flows seen before
    state.add_records(iter([rec(T + 10, sport=p) for p in range(1000, 1010)]))
    assert state.new_flows_per_record == 0.0
    # records without a 5-tuple make no flow: they leave the figure as it was
    state.add_records(iter([rec(T, ipver=0, proto=0, sport=0, dport=0, src=MAC, dst=MAC)]))
    assert state.new_flows_per_record == 0.0
    # ... and beside records with one, they are not counted: one new flow of two records
    state.add_records(iter([rec(T + 11, ipver=0, proto=0, sport=0, dport=0, src=MAC, dst=MAC),
                            rec(T + 11, sport=3000), rec(T + 11, sport=3000)]))
    assert state.new_flows_per_record == 1 / 2
    # a flow that left the table (written, then idle past the timeout) is new when it comes back
    flushed(state)
    assert len(state.table.expire(T + 200 * S)) == 12 and len(state.table) == 0
    state.add_records(iter([rec(T + 200 * S, sport=1000)]))
    assert state.new_flows_per_record == 1.0


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
    assert (state.global_, state.protocols, flow_seconds(state), state.dirty_flows) == (
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
    assert flow.series and held(state, flow) == [] and flow.total_bytes == 100


def test_top_policy_holds_cells_until_the_flow_reaches_the_byte_threshold():
    state = state_with(rec(T, 100), rec(T + S, 50))
    (flow,) = state.table.flows.values()
    flushed(state, min_bytes=1000)
    assert not flow.series and held(state, flow) == [(SEC0, 100, 1), (SEC0 + 1, 50, 1)]
    assert flow.total_bytes == 150 and flow_seconds(state) == {} and flow.held_rows == 2
    state.add_records(iter([rec(T + S, 900), rec(T + 2 * S, 10)]))
    state.plan_series("top", 1000, [], 0, 60)
    assert flow.qualifies  # 1060 bytes: the held cells and these go out with this flush
    state.written()
    assert flow.series and held(state, flow) == [] and flow.total_bytes == 1060
    assert flow.held_rows == 0 and state.table.held.rows == 0


def test_a_second_held_from_two_flushes_is_summed():
    state = state_with(rec(T, 100))
    (flow,) = state.table.flows.values()
    flushed(state, min_bytes=1000)
    assert held(state, flow) == [(SEC0, 100, 1)] and flow.held_rows == 1
    state.add_records(iter([rec(T, 5)]))
    flushed(state, min_bytes=1000)
    assert held(state, flow) == [(SEC0, 105, 2)] and flow.held_rows == 2
    state.add_records(iter([rec(T + S, 7)]))
    flushed(state, min_bytes=1000)
    assert held(state, flow) == [(SEC0, 105, 2), (SEC0 + 1, 7, 1)]


def test_held_rows_of_flows_that_left_the_table_are_dropped():
    state = state_with(*(rec(T, 100, sport=port) for port in range(1, 11)))
    flushed(state, min_bytes=1000)
    assert state.table.held.rows == 10
    gone = state.table.expire(T + 3600 * S)  # all idle: they leave with their rows
    assert len(gone) == 10 and state.table.held.rows == 0
    assert all(f.held_rows == 0 for f in gone)


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


def test_flows_tied_at_the_edge_of_the_top_n_do_not_all_qualify():
    """A scan: thousands of equal one-packet flows. Beating the flow ranked just after the top
    N is what counts, so none of them gets series (each would cost Redis two series)."""
    state = state_with(*(rec(T, 60, sport=port) for port in range(1, 501)))
    state.plan_series("top", 10**6, [60.0] * 100, 100, 60)
    assert not any(f.qualifies for f in state.dirty_flows)
    state = state_with(rec(T, 61, sport=1), *(rec(T, 60, sport=port) for port in range(2, 501)))
    state.plan_series("top", 10**6, [60.0] * 99, 100, 60)
    assert [f.sport for f in state.dirty_flows if f.qualifies] == [1]


def test_fewer_flows_than_the_top_n_all_qualify():
    state = state_with(rec(T, 1, sport=1), rec(T, 2, sport=2))
    state.plan_series("top", 10**9, [], 100, 60)
    assert all(f.qualifies for f in state.dirty_flows)


def test_a_flow_holding_too_many_seconds_gets_its_series():
    state = state_with(*(rec(T + k * S, 10) for k in range(3)))
    (flow,) = state.dirty_flows
    flushed(state, max_held=3)
    assert not flow.series and len(held(state, flow)) == 3
    state.add_records(iter([rec(T + 2 * S, 10)]))  # a second it holds already: still 3
    state.plan_series("top", 10**9, [], 0, 3)
    assert not flow.qualifies
    state.add_records(iter([rec(T + 3 * S, 10)]))
    state.plan_series("top", 10**9, [], 0, 3)
    assert flow.qualifies


def test_one_packet_flows_past_the_limit_are_held_back_in_the_order_they_came():
    state = state_with(*(rec(T + port, 60, sport=port) for port in range(1, 6)),
                       rec(T + 10, 70, sport=9), rec(T + 11, 70, sport=9))  # two packets
    assert state.hold_back_probes(2) == 3
    assert {f.sport: f.unstored for f in state.flow_updates} == {
        1: False, 2: False, 3: True, 4: True, 5: True, 9: False}
    # an unstored flow never gets series, and holds no seconds for them
    state.plan_series("all", 0, [], 0, 60)
    assert [f.sport for f in state.dirty_flows if f.qualifies] == [1, 2, 9]
    state.written()
    assert state.table.held.rows == 0
    assert all(f.held_rows == 0 for f in state.table.flows.values())
    # one held back that has a packet again is written from its first packet on; one that
    # has not stays held back
    state.add_records(iter([rec(T + 90 * S, 50, sport=3), rec(T + 91 * S, 60, sport=7)]))
    assert state.hold_back_probes(2) == -1
    assert {f.sport: f.unstored for f in state.flow_updates} == {3: False, 7: False}
    (again,) = [f for f in state.flow_updates if f.sport == 3]
    assert (again.new, again.delta_bytes, again.delta_packets) == (True, 110, 2)
    assert state.promoted == {(again, SEC0 // 60): 60}
    assert [f.sport for f in state.table.flows.values() if f.unstored] == [4, 5]


def test_no_limit_holds_back_nothing():
    state = state_with(*(rec(T, 60, sport=port) for port in range(1, 100)))
    assert state.hold_back_probes(0) == 0
    assert not any(f.unstored for f in state.flow_updates)


def test_flow_sums_add_up_over_messages_until_a_flush_reads_them():
    """Many flows over several messages (more than the sums' first capacity): each flow's
    bytes, packets and first and last time, once synced, are those of all its records."""
    state = PartitionState(0, None, FlowTable(60 * S, 600 * S, 10_000))
    expected: dict[int, list[int]] = {}
    for message in range(3):
        records = []
        for port in range(message * 1000, message * 1000 + 2500):  # overlapping flows
            ts = T + (port % 7) * S + message
            records.append(rec(ts, 60 + port % 100, sport=port))
            got = expected.setdefault(port, [0, 0, ts, ts])
            got[0] += 60 + port % 100
            got[1] += 1
            got[2], got[3] = min(got[2], ts), max(got[3], ts)
        state.add_records(iter(records))
    state.sync_flows()
    flows = {f.sport: f for f in state.table.flows.values()}
    assert {port: [f.delta_bytes, f.delta_packets, f.first_ns, f.last_ns]
            for port, f in flows.items()} == expected
    state.sync_flows()  # again: nothing more to add
    assert sum(f.delta_packets for f in flows.values()) == 3 * 2500


# ----------------------------------------------------------------------------- the two parts
def test_a_series_only_write_keeps_the_flow_part_for_a_later_one():
    state = PartitionState(0, 10, FlowTable(60 * S, 600 * S, 1000))
    state.add_records(iter([rec(T, 100), rec(T + S, 50)]))
    state.next_offset = 12
    (flow,) = state.dirty_flows
    state.written(flows=False)
    assert (state.base_offset, state.flow_base) == (12, 10)
    assert not state.series_pending and state.flows_pending
    assert not flow.dirty and flow.updated and flow.new and flow.delta_bytes == 150
    assert state.flow_minutes == {(flow, SEC0 // 60): 150} and state.counted["records"] == 2
    state.add_records(iter([rec(T + 2 * S, 25)]))
    state.next_offset = 13
    state.written(flows=True)
    assert (state.base_offset, state.flow_base) == (13, 13) and not state.pending
    assert not flow.updated and not flow.new and flow.total_bytes == 175
    assert state.flow_updates == [] and state.flow_minutes == {}


def test_messages_before_the_series_offset_count_for_the_flow_part_only():
    """Restarted with the flow part at 10 and the series part at 12: messages 10 and 11 are
    read again, for the flow part only; from 12 on, for both."""
    state = PartitionState(0, 12, FlowTable(60 * S, 600 * S, 1000), flow_base=10)
    assert state.next_offset == 10 and not state.pending
    for offset, record in ((10, rec(T, 100)), (11, rec(T + S, 50))):
        state.add_records(iter([record]))
        state.replayed()
        state.next_offset = offset + 1
    assert state.global_ == {} and state.dirty_flows == [] and state.records == 0
    assert not state.series_pending and state.flows_pending
    state.add_records(iter([rec(T + 2 * S, 25)]))
    state.next_offset = 13
    assert state.series_pending and state.global_ == {SEC0 + 2: [25, 1]}
    (flow,) = state.flow_updates
    state.sync_flows()
    assert flow.delta_bytes == 175 and flow.delta_packets == 3
    state.fold()
    assert state.counted["records"] == 3 and state.flow_minutes == {(flow, SEC0 // 60): 175}


# ----------------------------------------------------------------------------- differential
# add_records works column-wise; this is the per-record loop it replaced, kept as the reference
# it must agree with field by field (dict contents and insertion order, flows and their labels).
def reference_add_records(state: PartitionState, records, meta=()) -> None:
    global_, protocols, flow_seconds = state.global_, state.protocols, {}
    flows, dirty = state.table.flows, state.dirty_flows
    count = malformed = 0
    clock = state.clock_ns
    for ts, wire, ipver, proto, _tcp, flags, sport, dport, src, dst, app, app_flags, _r \
            in records:
        count += 1
        if flags & FLAG_MALFORMED:
            malformed += 1
        if ts > clock:
            clock = ts
        sec = ts // S
        cell = global_.get(sec)
        if cell is None:
            global_[sec] = cell = [0, 0]
        cell[0] += wire
        cell[1] += 1
        name = PROTO_NAMES.get(proto, "OTHER") if ipver else "OTHER"
        cell = protocols.get((name, sec))
        if cell is None:
            protocols[(name, sec)] = cell = [0, 0]
        cell[0] += wire
        cell[1] += 1
        if not ipver:
            cell = state.no_flow.get(sec)
            if cell is None:
                state.no_flow[sec] = cell = [0, 0]
            cell[0] += wire
            cell[1] += 1
            continue
        if (src, sport) <= (dst, dport):
            key = struct.pack(KEY_FORMAT, ipver, proto, src, sport, dst, dport)
        else:
            key = struct.pack(KEY_FORMAT, ipver, proto, dst, dport, src, sport)
        flow = flows.get(key)
        if flow is None:
            flows[key] = flow = Flow(key, ipver, proto, src, sport, dst, dport, ts)
        if not flow.dirty:
            flow.dirty = True
            flow.slot = len(dirty)
            dirty.append(flow)
        if not flow.updated:
            flow.updated = True
            state.flow_updates.append(flow)
        flow.delta_bytes += wire
        flow.delta_packets += 1
        if app and (app != flow.app or flow.app_guess != bool(app_flags & APP_GUESS)):
            if not (app_flags & APP_GUESS and flow.app and not flow.app_guess):
                flow.app, flow.app_guess = app, bool(app_flags & APP_GUESS)
                flow.labels_changed = True
        if flags & FLAG_HAS_META:
            for entry_index, kind, text in meta:
                if entry_index != count - 1:
                    continue
                if kind == META_SERVER_NAME and text != flow.server_name:
                    flow.server_name = text
                    flow.labels_changed = True
                elif kind == META_FINGERPRINT and text != flow.fingerprint:
                    flow.fingerprint = text
                    flow.labels_changed = True
        if ts > flow.last_ns:
            flow.last_ns = ts
        elif ts < flow.first_ns:
            flow.first_ns = ts
        cell = flow_seconds.get((flow, sec))
        if cell is None:
            flow_seconds[(flow, sec)] = cell = [0, 0]
        cell[0] += wire
        cell[1] += 1
    state.clock_ns = clock
    state.records += count
    state.malformed_frames += malformed
    if flow_seconds:  # the cells as add_records keeps them: a chunk of columns
        state.flow_cells.append(tuple(np.array(column, dtype=np.int64) for column in zip(
            *((flow.slot, sec, b, p) for (flow, sec), (b, p) in flow_seconds.items()))))
        state.cells_summed = False


def snapshot(state: PartitionState) -> dict:
    """Everything add_records touches, flows by key, dicts as lists (their order counts)."""
    state.sync_flows()  # the flows' sums up to date, as every flush brings them

    def fields(flow: Flow) -> dict:  # (uid: a number of the process, not of the state)
        return {name: getattr(flow, name) for name in Flow.__slots__ if name != "uid"}

    return {
        "global": list(state.global_.items()),
        "protocols": list(state.protocols.items()),
        "no_flow": list(state.no_flow.items()),
        "flow_seconds": {(flow.key, sec): cell
                         for (flow, sec), cell in flow_seconds(state).items()},
        "held": {flow.key: held(state, flow) for flow in state.table.flows.values()},
        "dirty": [flow.key for flow in state.dirty_flows],
        "updates": [flow.key for flow in state.flow_updates],
        "table": [(key, fields(flow)) for key, flow in state.table.flows.items()],
        "counts": (state.records, state.malformed_frames, state.malformed_messages,
                   state.clock_ns),
    }


def assert_plain_ints(state: PartitionState) -> None:
    """No numpy scalars leak into what the sink writes and hashes."""
    cells = [*state.global_.items(), *state.protocols.items(), *state.no_flow.items(),
             *flow_seconds(state).items()]
    for key, cell in cells:
        sec = key if isinstance(key, int) else key[1]
        assert type(sec) is int and all(type(v) is int for v in cell), (key, cell)
    for flow in state.table.flows.values():
        assert all(type(getattr(flow, n)) is int for n in (
            "first_ns", "last_ns", "opened_ns", "delta_bytes", "delta_packets", "app", "sport",
            "dport", "proto")), flow.key
        assert type(flow.app_guess) is bool
        assert type(flow.key) is bytes and len(flow.key) == struct.calcsize(KEY_FORMAT)
    for (flow, _sec) in flow_seconds(state):
        assert state.table.flows[flow.key] is flow


def compare_on(messages, max_flows: int = 100_000, flush_every: int = 3,
               tuples_every: int = 0, check_every: int = 1) -> int:
    """Feed messages (bytes) to add_records and to the reference loop on two states, with
    flushes and table expiry in between, and compare the states after every check_every-th
    message, before and after every flush, and at the end. Returns the records fed."""
    fed = 0
    new = PartitionState(0, None, FlowTable(60 * S, 600 * S, max_flows))
    ref = PartitionState(0, None, FlowTable(60 * S, 600 * S, max_flows))
    for i, message in enumerate(messages):
        records, meta = decode_batch(message)
        if tuples_every and i % tuples_every == 0:
            new.add_records(iter(list(records)), meta)  # the tuple path of add_records
        else:
            new.add_records(records, meta)
        reference_add_records(ref, iter(records), meta)
        fed += len(records)
        flush = flush_every and i % flush_every == flush_every - 1
        if flush or i % check_every == 0 or i == len(messages) - 1:
            assert snapshot(new) == snapshot(ref), f"message {i}"
            assert_plain_ints(new)
        if flush:
            for state in (new, ref):
                state.plan_series("top", 5000, [], 10, 4)
                state.written()
                state.table.expire(state.clock_ns)
            assert snapshot(new) == snapshot(ref), f"flush after message {i}"
    return fed


def capture_messages(path, partitions: int = 4, per_message: int = 500) -> list[bytes]:
    """A capture file's messages as capture makes them (one list for all partitions: a
    partition's messages in their order, interleaved as produced)."""
    batcher = RecordBatcher(partitions, per_message, True, replay=True)
    for ts, wire, frame, linktype in read_frames(path):
        batcher.add(ts, wire, frame, decode_frame(frame, linktype))
    batcher.flush(final=True)
    return [message for _partition, message, _n in batcher.take()]


def by_partition(messages_with_partitions) -> dict:
    out: dict[int, list[bytes]] = {}
    for partition, message in messages_with_partitions:
        out.setdefault(partition, []).append(message)
    return out


@pytest.mark.parametrize("per_message, packets", [(1, 2000), (97, 20_000), (1000, 20_000)])
def test_matches_the_per_record_loop_on_the_synthetic_capture(tmp_path, per_message, packets):
    path = write_synthetic_pcap(tmp_path / "synthetic.pcap", packets, flows=packets // 13,
                                seconds=4, real_payloads=True)
    batcher = RecordBatcher(3, per_message, True, replay=True)
    for ts, wire, frame, linktype in read_frames(path):
        batcher.add(ts, wire, frame, decode_frame(frame, linktype))
    batcher.flush(final=True)
    parts = by_partition((p, m) for p, m, _n in batcher.take())
    fed = sum(compare_on(messages, flush_every=5 if per_message > 1 else 50,
                         tuples_every=7 if per_message > 1 else 0,
                         check_every=1 if per_message > 1 else 25)
              for messages in parts.values())
    assert fed == packets


CORPUS_PCAPS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "ndpi" / "pcap"


@pytest.mark.corpus
def test_matches_the_per_record_loop_on_the_corpus():
    if not CORPUS_PCAPS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS_PCAPS}")
    for pcap in sorted(CORPUS_PCAPS.iterdir()):
        batcher = RecordBatcher(2, 50, True, replay=True)
        for ts, wire, frame, linktype in read_frames(pcap):
            batcher.add(ts, wire, frame, decode_frame(frame, linktype))
        batcher.flush(final=True)
        for messages in by_partition((p, m) for p, m, _n in batcher.take()).values():
            compare_on(messages, flush_every=4)


def random_message(rnd: random.Random, base_ns: int, flows: int, size: int) -> bytes:
    """Records with every kind of oddity the contract allows: both directions, equal
    addresses and ports, IPv4 with bytes after the address, no 5-tuple, any flag bits, out of
    order and far apart times, labels that change, meta entries in any order."""
    v4 = [bytes(rnd.choice([(10, 0, 0, k), (192, 0, 2, k % 4), (198, 51, 100, 1)]))
          + bytes(12) for k in range(6)] + [bytes([10, 0, 0, 1]) + bytes([0, 0, 0, 1]) + bytes(8)]
    v6 = [bytes(15) + bytes([k]) for k in range(3)] + [b"\xfe\x80" + bytes(13) + b"\x01",
                                                       b"\xff" * 16, bytes([1]) + bytes(15)]
    ports = [0, 53, 80, 443, 40000, 40001, 65535]
    pool = []
    for _ in range(flows):
        ver = rnd.choice([4, 4, 6])
        addrs = v4 if ver == 4 else v6
        pool.append((ver, rnd.choice([6, 17, 1, 58, 47, 132, 0, 255]), rnd.choice(addrs),
                     rnd.choice(ports), rnd.choice(addrs), rnd.choice(ports)))
    records, meta = [], []
    names = ["a.example", "b.example", "", "t13d1516h2_x", "c.example"]
    for i in range(size):
        ts = base_ns + rnd.choice([0, 1, S // 2, S - 1, S, 2 * S + 7, -S // 3, -1, 40 * S])
        ts = max(ts, 0)
        flags = rnd.getrandbits(7) & ~FLAG_HAS_META if rnd.random() < 0.3 else 0
        if rnd.random() < 0.1:
            ver, proto, src, sport, dst, dport = 0, rnd.choice([0, 6]), MAC, 0, rnd.choice(
                [MAC, bytes(16)]), rnd.choice([0, 5])
        else:
            ver, proto, src, sport, dst, dport = rnd.choice(pool)
            if rnd.random() < 0.5:
                src, sport, dst, dport = dst, dport, src, sport
        app = rnd.choice([0, 0, 0, DNS, HTTP, TLS, 1])
        app_flags = rnd.choice([0, APP_GUESS]) if app else rnd.choice([0, 0, APP_GUESS])
        if rnd.random() < 0.15:
            flags |= FLAG_HAS_META
            for _ in range(rnd.randrange(1, 4)):
                meta.append((i, rnd.choice([META_SERVER_NAME, META_FINGERPRINT]),
                             rnd.choice(names)))
        elif rnd.random() < 0.03:  # an entry whose record lacks the flag: ignored
            meta.append((i, META_SERVER_NAME, "ignored.example"))
        records.append(RECORD.pack(ts, rnd.randrange(0, 70000), ver, proto, rnd.getrandbits(8),
                                   flags, sport, dport, src, dst, app, app_flags, 0))
    rnd.shuffle(meta)
    return encode_batch(records, meta)


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_per_record_loop_on_random_records(seed):
    rnd = random.Random(seed)
    base = T + rnd.randrange(0, 100) * S
    messages = []
    for _ in range(30):
        base += rnd.choice([0, S // 3, S, -S, 5 * S])
        messages.append(random_message(rnd, base, rnd.choice([1, 3, 20, 200]),
                                       rnd.choice([0, 1, 2, 5, 60, 400])))
    # (checked after some messages only: the flows' sums then add up over several messages
    # before a check or flush brings them into the flows)
    compare_on(messages, max_flows=rnd.choice([5, 1000]), flush_every=rnd.choice([0, 2, 5]),
               tuples_every=rnd.choice([0, 3]), check_every=rnd.choice([1, 4]))


def test_matches_the_per_record_loop_on_label_sequences():
    """Every sequence of three labels (inspected, guessed, none) on one flow, in one message
    and spread over messages."""
    labels = [(0, 0), (0, APP_GUESS), (TLS, 0), (TLS, APP_GUESS), (HTTP, 0), (HTTP, APP_GUESS)]
    for a in labels:
        for b in labels:
            for c in labels:
                recs = [RECORD.pack(*rec(T + k, app=app, app_flags=fl))
                        for k, (app, fl) in enumerate((a, b, c))]
                compare_on([encode_batch(recs)], flush_every=0)
                compare_on([encode_batch(recs[:1]), encode_batch(recs[1:])], flush_every=1)
