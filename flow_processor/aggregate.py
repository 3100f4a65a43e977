"""Per-second aggregation of packet records on capture time, per Kafka partition.

Everything a partition contributes between two flushes lives in its PartitionState, together
with the offset range it covers, so that a flush writes the sums and the offsets together.
"""

from __future__ import annotations

from flow_processor.flows import Flow, FlowTable
from packet_records import FLAG_MALFORMED, PROTO_NAMES

NS = 1_000_000_000


class PartitionState:
    def __init__(self, partition: int, base_offset: int | None, table: FlowTable):
        self.partition = partition
        self.base_offset = base_offset  # offset stored in Redis when this state began
        self.next_offset = base_offset  # offset after the last message aggregated
        self.table = table
        self.clock_ns = 0  # newest capture time seen on this partition
        self.clear()

    def clear(self) -> None:
        """Forget the aggregates (after they were written, or when they must be dropped)."""
        self.global_: dict[int, list[int]] = {}  # second -> [bytes, packets]
        self.protocols: dict[tuple[str, int], list[int]] = {}  # (PROTO, second) -> [b, p]
        self.flow_seconds: dict[tuple[str, int], list[int]] = {}  # (flow id, second) -> [b, p]
        self.dirty_flows: list[Flow] = []
        self.records = 0
        self.malformed_frames = 0
        self.malformed_messages = 0

    @property
    def pending(self) -> bool:
        return self.next_offset != self.base_offset

    def add_records(self, records) -> None:
        """Aggregate an iterator of record tuples (packet_records.RECORD field order)."""
        global_, protocols, flow_seconds = self.global_, self.protocols, self.flow_seconds
        flows, dirty = self.table.flows, self.dirty_flows
        proto_names = PROTO_NAMES
        count = malformed = 0
        clock = self.clock_ns
        for ts, wire, ipver, proto, _tcp, flags, sport, dport, src, dst, _app, _r, _n in records:
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
            if not ipver:
                continue  # no 5-tuple: counts in global and OTHER only
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
            if ts > flow.last_ns:
                flow.last_ns = ts
            elif ts < flow.first_ns:
                flow.first_ns = ts
            cell = flow_seconds.get((flow.id, sec))
            if cell is None:
                flow_seconds[(flow.id, sec)] = cell = [0, 0]
            cell[0] += wire
            cell[1] += 1
        self.clock_ns = clock
        self.records += count
        self.malformed_frames += malformed
