"""flow_processor.flows: flow ids, address text, and the flow table's expiry."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flow_processor.flows import Flow, FlowTable, HeldCells, address_text, flow_id

ROOT = Path(__file__).resolve().parents[2]
A4 = socket.inet_aton("192.0.2.10") + bytes(12)
B4 = socket.inet_aton("198.51.100.20") + bytes(12)
A6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
T = 1_700_000_000 * 10**9
S = 10**9
KEY = (4, 6, A4, 40000, B4, 80)


# ----------------------------------------------------------------------------- flow_id
def test_flow_id_is_a_stable_16_hex_digit_digest_of_the_key():
    # flow ids name Redis keys that outlive a release: this value must never change
    assert flow_id(KEY) == flow_id(list(KEY)) == "3a530b54b7618cff"


@pytest.mark.parametrize("other", [
    (4, 17, A4, 40000, B4, 80), (4, 6, A4, 40001, B4, 80), (4, 6, A4, 40000, B4, 81),
    (6, 6, A4, 40000, B4, 80), (4, 6, B4, 40000, A4, 80),
])
def test_flow_id_differs_for_any_other_key(other):
    assert flow_id(other) != flow_id(KEY)


def test_flow_id_is_the_same_in_another_process_with_another_hash_seed():
    code = ("import socket; from flow_processor.flows import flow_id;"
            f"print(flow_id((4, 6, {A4!r}, 40000, {B4!r}, 80)))")
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == flow_id(KEY)


# ----------------------------------------------------------------------------- address_text
@pytest.mark.parametrize("ipver, raw, text", [
    (4, A4, "192.0.2.10"),
    (4, socket.inet_aton("10.0.0.1") + b"\xff" * 12, "10.0.0.1"),  # only the first 4 bytes
    (6, A6, "2001:db8::10"),
    (6, "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),  # leading zeros dropped
    (6, "2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  # one 0 field is not shortened
    (6, "2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),  # first of two equal runs
    (6, "2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),  # the longest run
    (6, "FE80::ABCD", "fe80::abcd"),  # lower case
    (6, "::", "::"),
    (6, "::1", "::1"),
    (6, "::ffff:192.0.2.1", "::ffff:192.0.2.1"),  # IPv4-mapped: mixed notation
])
def test_address_text_is_rfc_5952(ipver, raw, text):
    if isinstance(raw, str):
        raw = socket.inet_pton(socket.AF_INET6, raw)
    assert address_text(ipver, raw) == text


def test_new_flow_fields():
    flow = Flow(KEY, 4, 6, B4, 80, A4, 40000, T)
    assert (flow.id, flow.key, flow.src, flow.dst) == (flow_id(KEY), KEY, "198.51.100.20",
                                                       "192.0.2.10")
    assert (flow.sport, flow.dport, flow.proto) == (80, 40000, 6)
    assert flow.first_ns == flow.last_ns == flow.opened_ns == T
    assert (flow.delta_bytes, flow.delta_packets, flow.new, flow.dirty) == (0, 0, True, False)
    assert (flow.app, flow.server_name, flow.fingerprint, flow.labels_changed) == (
        0, None, None, False)


# ----------------------------------------------------------------------------- FlowTable.expire
def table_with(*flows: tuple[int, int, bool], max_flows: int = 100) -> tuple[FlowTable, list]:
    """A table of flows given as (opened_ns, last_ns, dirty), inserted in this order."""
    table = FlowTable(idle_ns=10 * S, active_ns=100 * S, max_flows=max_flows)
    entries = []
    for port, (opened, last, dirty) in enumerate(flows, start=1000):
        key = (4, 6, A4, port, B4, 80)
        flow = Flow(key, 4, 6, A4, port, B4, 80, opened)
        flow.last_ns, flow.dirty = last, dirty
        table.flows[key] = flow
        entries.append(flow)
    return table, entries


def test_idle_flow_expires_after_the_idle_timeout():
    table, (flow,) = table_with((T, T, False))
    assert table.expire(T + 10 * S) == [] and len(table) == 1
    assert table.expire(T + 10 * S + 1) == [flow] and len(table) == 0


def test_active_flow_expires_after_the_active_timeout():
    table, (flow,) = table_with((T, T + 95 * S, False))
    assert table.expire(T + 100 * S) == []
    assert table.expire(T + 100 * S + 1) == [flow] and len(table) == 0


def test_recent_flows_stay():
    table, _ = table_with((T, T + 5 * S, False), (T + 3 * S, T + 3 * S, False))
    assert table.expire(T + 12 * S) == [] and len(table) == 2


def test_dirty_flows_never_expire():
    table, (idle, active, clean) = table_with((T, T, True), (T, T + 99 * S, True), (T, T, False))
    assert table.expire(T + 1000 * S) == [clean]
    assert list(table.flows.values()) == [idle, active]


def test_size_bound_drops_the_oldest_entries():
    table, flows = table_with(*[(T + i, T + i, False) for i in range(5)], max_flows=3)
    assert table.expire(T + 5) == flows[:2]
    assert list(table.flows.values()) == flows[2:]


def test_size_bound_never_drops_dirty_flows():
    table, flows = table_with((T, T, True), (T + 1, T + 1, False), (T + 2, T + 2, True),
                              max_flows=1)
    assert table.expire(T + 3) == [flows[1]]
    assert list(table.flows.values()) == [flows[0], flows[2]]


def test_the_process_bound_is_shared_by_the_tables_of_its_partitions():
    from flow_processor.flows import evict_over_bound

    big, big_flows = table_with(*[(T + i, T + i, False) for i in range(6)])
    small, small_flows = table_with((T, T, False), (T + 1, T + 1, True))
    gone = evict_over_bound([big, small], 5)
    assert len(gone) == 3 and len(big) + len(small) == 5
    assert gone[:2] == big_flows[:2] and not any(f.dirty for f in gone)
    assert evict_over_bound([big, small], 5) == []


def test_evict_oldest_skips_dirty_flows():
    table, flows = table_with((T, T, True), (T + 1, T + 1, False), (T + 2, T + 2, False))
    assert table.evict_oldest(1) == [flows[1]] and len(table) == 2


def test_evict_oldest_spares_flows_with_series_while_others_can_go():
    table, flows = table_with(*[(T + i, T + i, False) for i in range(5)])
    flows[0].series = flows[2].series = True  # long-lived flows an operator follows
    assert table.evict_oldest(2) == [flows[1], flows[3]]
    assert table.evict_oldest(2) == [flows[4], flows[0]]  # then the oldest, series or not
    assert list(table.flows.values()) == [flows[2]]


def test_series_keys_follow_the_flow_id():
    flow = Flow(KEY, 4, 6, B4, 80, A4, 40000, T)
    assert (flow.bps_key, flow.pps_key) == (f"ts:flow:{flow.id}:bps", f"ts:flow:{flow.id}:pps")


def test_address_text_ignores_the_bytes_after_an_ipv4_address_and_shares_strings():
    v4 = bytes([192, 0, 2, 1]) + bytes(12)
    assert address_text(4, v4) == address_text(4, bytes([192, 0, 2, 1]) + b"x" * 12) == "192.0.2.1"
    assert address_text(6, v4) == "c000:201::"  # the same 16 bytes as an IPv6 address
    assert address_text(4, v4) is address_text(4, v4)


# ----------------------------------------------------------------------------- held cells
def test_held_cells_sum_each_flows_seconds_across_flushes_and_take_removes_them():
    held = HeldCells()
    for flush in range(70):  # past the chunk count that merges them
        second = 100 + flush // 2  # each second in two flushes
        held.add(np.array([1, 2]), np.array([second, second]), np.array([10, 20]),
                 np.array([1, 2]))
    assert held.rows == 140 and len(held.columns) <= 64
    assert held.cells([2])[2] == [(100 + k, 40, 4) for k in range(35)]
    assert held.seconds([1, 3]) == {1: set(range(100, 135)), 3: set()}
    taken = held.take([1])
    assert taken[1] == [(100 + k, 20, 2) for k in range(35)] and held.rows == 70
    assert held.cells([1]) == {} and len(held.cells([2])[2]) == 35


def test_held_cells_of_flows_gone_are_dropped_once_they_are_half():
    held = HeldCells()
    flows = [Flow(KEY, 4, 6, A4, 40000 + i, B4, 80, T) for i in range(4)]
    for f in flows:
        held.add(np.array([f.uid] * 3), np.array([1, 2, 3]), np.array([5, 5, 5]),
                 np.array([1, 1, 1]))
        f.held_rows = 3
    held.forget(flows[:1])
    assert held.rows == 12 and held.gone_rows == 3  # a quarter: kept for now
    held.forget(flows[1:2])
    assert held.rows == 6 and held.gone == [] and held.gone_rows == 0
    assert set(held.cells([f.uid for f in flows])) == {flows[2].uid, flows[3].uid}
