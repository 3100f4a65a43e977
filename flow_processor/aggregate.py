"""Per-second aggregation of packet records on capture time, per Kafka partition.

Everything a partition contributes between two flushes lives in its PartitionState, together
with the offset range it covers, so that a flush writes the sums and the offsets together.
"""

from __future__ import annotations

from flow_processor.flows import Flow, FlowTable
from packet_records import (
    APP_GUESS,
    FLAG_HAS_META,
    FLAG_MALFORMED,
    META_FINGERPRINT,
    META_SERVER_NAME,
    PROTO_NAMES,
)

NS = 1_000_000_000


class PartitionState:
    def __init__(self, partition: int, base_offset: int | None, table: FlowTable):
        self.partition = partition
        self.base_offset = base_offset  # offset stored in Redis when this state began
        self.next_offset = base_offset  # offset after the last message aggregated
        self.table = table
        self.clock_ns = 0  # newest capture time seen on this partition
        self.topic_id: str | None = None  # id of the topic the offsets belong to, once known
        self.clear()

    def clear(self) -> None:
        """Forget the aggregates (after they were written, or when they must be dropped)."""
        self.global_: dict[int, list[int]] = {}  # second -> [bytes, packets]
        self.protocols: dict[tuple[str, int], list[int]] = {}  # (PROTO, second) -> [b, p]
        self.flow_seconds: dict[tuple[Flow, int], list[int]] = {}  # (flow, second) -> [b, p]
        self.no_flow: dict[int, list[int]] = {}  # second -> [b, p] of frames without a 5-tuple
        self.dirty_flows: list[Flow] = []
        self.health: dict[tuple[str, int], int] = {}  # (ts:health name, second) -> increment
        self.capture_totals: dict[str, int] = {}  # health name -> increment
        self.reset = False  # the partition restarts at the topic's earliest offset: store it
        self.records = 0
        self.malformed_frames = 0
        self.malformed_messages = 0

    def add_stats(self, ts_ns: int, counters: dict[str, int]) -> None:
        """A capture stats message: counter increments at that (wall-clock) second."""
        sec = ts_ns // NS
        for name, value in counters.items():  # zeros too: "no drops" is worth a point
            self.health[(name, sec)] = self.health.get((name, sec), 0) + value
            self.capture_totals[name] = self.capture_totals.get(name, 0) + value

    @property
    def pending(self) -> bool:
        return self.next_offset != self.base_offset or self.reset

    def add_records(self, records, meta: list[tuple[int, int, str]] = ()) -> None:
        """Aggregate an iterator of record tuples (packet_records.RECORD field order) and the
        meta entries of their message."""
        global_, protocols, flow_seconds = self.global_, self.protocols, self.flow_seconds
        flows, dirty = self.table.flows, self.dirty_flows
        proto_names = PROTO_NAMES
        count = malformed = 0
        clock = self.clock_ns
        for ts, wire, ipver, proto, _tcp, flags, sport, dport, src, dst, app, app_flags, _r \
                in records:
            count += 1
            if flags & FLAG_MALFORMED:
                malformed += 1
            if ts > clock:
                clock = ts
            sec = ts // NS
            cell = global_.get(sec)
            if cell is None:
                global_[sec] = cell = [0, 0]
            cell[0] += wire
            cell[1] += 1
            name = proto_names.get(proto, "OTHER") if ipver else "OTHER"
            cell = protocols.get((name, sec))
            if cell is None:
                protocols[(name, sec)] = cell = [0, 0]
            cell[0] += wire
            cell[1] += 1
            if not ipver:  # no 5-tuple: counts in global, OTHER and the UNKNOWN application
                cell = self.no_flow.get(sec)
                if cell is None:
                    self.no_flow[sec] = cell = [0, 0]
                cell[0] += wire
                cell[1] += 1
                continue
            if (src, sport) <= (dst, dport):
                key = (ipver, proto, src, sport, dst, dport)
            else:
                key = (ipver, proto, dst, dport, src, sport)
            flow = flows.get(key)
            if flow is None:
                flows[key] = flow = Flow(key, ipver, proto, src, sport, dst, dport, ts)
            if not flow.dirty:
                flow.dirty = True
                dirty.append(flow)
            flow.delta_bytes += wire
            flow.delta_packets += 1
            if app and (app != flow.app or flow.app_guess != bool(app_flags & APP_GUESS)):
                if not (app_flags & APP_GUESS and flow.app and not flow.app_guess):
                    flow.app, flow.app_guess = app, bool(app_flags & APP_GUESS)
                    flow.labels_changed = True
            if flags & FLAG_HAS_META:
                _apply_meta(flow, meta, count - 1)
            if ts > flow.last_ns:
                flow.last_ns = ts
            elif ts < flow.first_ns:
                flow.first_ns = ts
            cell = flow_seconds.get((flow, sec))
            if cell is None:
                flow_seconds[(flow, sec)] = cell = [0, 0]
            cell[0] += wire
            cell[1] += 1
        self.clock_ns = clock
        self.records += count
        self.malformed_frames += malformed


    # -- per-flow series policy and what a written flush leaves behind -----------------------

    def plan_series(self, policy: str, min_bytes: int, top_scores: list[float], top_n: int,
                    max_held: int) -> None:
        """Decide which flows without series get them with this flush (flow.qualifies).

        FLOW_SERIES=all: every flow. top: a flow qualifies once its bytes reach min_bytes, or
        would rank among the top_n of flows:top:bytes (its current top scores, top_scores,
        together with the totals of this flush's flows), or holds more than max_held seconds
        (the bound of what is held here). Deterministic for a given state: a flush retried
        after an error decides the same way."""
        flows = [f for f in self.dirty_flows if not f.series]
        if not flows:
            return
        if policy == "all":
            for f in flows:
                f.qualifies = True
            return
        totals = [f.total_bytes + f.delta_bytes for f in flows]
        ranked = sorted([*top_scores, *totals], reverse=True)
        threshold = min_bytes
        if top_n and len(ranked) >= top_n:
            threshold = min(threshold, ranked[top_n - 1])
        elif top_n:
            threshold = 0  # fewer flows than top_n: every one is in the top
        held_seconds: dict[Flow, int] = {}
        if max_held:
            for (flow, sec) in self.flow_seconds:
                if not flow.series:
                    held_seconds[flow] = held_seconds.get(flow, 0) + (
                        1 if flow.held is None or sec not in flow.held else 0)
        for f, total in zip(flows, totals):
            f.qualifies = (total >= threshold or (max_held and len(f.held or ())
                                                  + held_seconds.get(f, 0) > max_held))

    def written(self) -> None:
        """The flush landed in Redis: move deltas into the flows' totals, hold the cells of
        flows without series, then clear the aggregates."""
        for (flow, sec), cell in self.flow_seconds.items():
            if not flow.series and not flow.qualifies:
                held = flow.held
                if held is None:
                    flow.held = held = {}
                old = held.get(sec)
                if old is None:
                    held[sec] = [cell[0], cell[1]]
                else:
                    old[0] += cell[0]
                    old[1] += cell[1]
        for flow in self.dirty_flows:
            if flow.qualifies:
                flow.series, flow.qualifies, flow.held = True, False, None
            flow.total_bytes += flow.delta_bytes
            flow.dirty = flow.new = flow.labels_changed = False
            flow.delta_bytes = flow.delta_packets = 0
        self.clear()
        self.base_offset = self.next_offset

    @property
    def write_cost(self) -> int:
        """Rough size of the transaction this state's flush makes (flows and cells)."""
        return 4 * len(self.dirty_flows) + len(self.flow_seconds)


def _apply_meta(flow: Flow, meta: list[tuple[int, int, str]], index: int) -> None:
    """Take the names found in record `index` (meta entries are few: a linear scan is fine)."""
    for entry_index, kind, text in meta:
        if entry_index != index:
            continue
        if kind == META_SERVER_NAME and text != flow.server_name:
            flow.server_name = text
            flow.labels_changed = True
        elif kind == META_FINGERPRINT and text != flow.fingerprint:
            flow.fingerprint = text
            flow.labels_changed = True
