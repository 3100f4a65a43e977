"""Per-second aggregation of packet records on capture time, per Kafka partition.

Everything a partition contributes between two flushes lives in its PartitionState, together
with the offset range it covers, so that a flush writes the sums and the offsets together. It
has two parts with an offset each: the per-second sums (written by every flush), and the flow
updates (flow hashes, top-N sums, counters), written by every flush or less often (see
sink.py). The flow part's offset is never after the series part's.
"""

from __future__ import annotations

import operator
import struct

import numpy as np

from flow_processor.flows import KEY_FORMAT, Flow, FlowTable, sum_by_key
from packet_records import (
    APP_GUESS,
    FLAG_HAS_META,
    FLAG_MALFORMED,
    META_FINGERPRINT,
    META_SERVER_NAME,
    PROTO_NAMES,
    PROTOCOLS,
    RECORD,
    RECORD_DTYPE,
    MalformedMessage,
)

NS = 1_000_000_000
# A counter's total in one flush (an HINCRBY of pipeline:capture): 2**53, where a capture
# counting 10 million frames a second would take 28 years
MAX_FLUSH_COUNTER = 1 << 53
_SLOT = operator.attrgetter("slot")
_UID = operator.attrgetter("uid")
# L4 bucket of each IP protocol number as an index into PROTOCOLS (records with a 5-tuple)
_OTHER = PROTOCOLS.index("OTHER")
_PROTO_CODE = np.full(256, _OTHER, dtype=np.int64)
for _number, _name in PROTO_NAMES.items():
    _PROTO_CODE[_number] = PROTOCOLS.index(_name)
# RECORD_DTYPE's addresses as big-endian 64-bit halves: numbers that order as the bytes do
_ADDRESS_HALVES = np.dtype({
    "names": ["src_hi", "src_lo", "dst_hi", "dst_lo"], "formats": [">u8"] * 4,
    "offsets": [RECORD_DTYPE.fields["src"][1], RECORD_DTYPE.fields["src"][1] + 8,
                RECORD_DTYPE.fields["dst"][1], RECORD_DTYPE.fields["dst"][1] + 8],
    "itemsize": RECORD_DTYPE.itemsize})
# A flow table key: the canonical 5-tuple packed as flows.KEY_FORMAT (what its id digests)
_KEY = np.dtype([("ipver", "u1"), ("proto", "u1"), ("a", "V16"), ("aport", ">u2"),
                 ("b", "V16"), ("bport", ">u2")])
_KEY_BYTES = np.dtype(f"V{_KEY.itemsize}")
assert _KEY.itemsize == struct.calcsize(KEY_FORMAT)


class SlotSums:
    """Bytes, packets and first and last capture time of the dirty flows, by slot (a flow's
    index in PartitionState.dirty_flows), since the flows last took them (take()): a
    message's per-flow sums are added by numpy in one step, and each Flow object is visited
    once a flush, not once a message it has records in."""

    def __init__(self) -> None:
        self.bytes = np.zeros(0, np.int64)
        self.packets = np.zeros(0, np.int64)
        self.first = np.zeros(0, np.int64)
        self.last = np.zeros(0, np.int64)
        self.used = 0  # slots below this may hold sums

    def add(self, slots: np.ndarray, used: int, nbytes: np.ndarray, packets: np.ndarray,
            first: np.ndarray, last: np.ndarray) -> None:
        """Sums of distinct slots (all below `used`)."""
        if used > len(self.bytes):
            size = max(used, 2 * len(self.bytes), 1024)
            grown = []
            for column, empty in ((self.bytes, 0), (self.packets, 0), (self.first, _NO_FIRST),
                                  (self.last, _NO_LAST)):
                wider = np.full(size, empty, np.int64)
                wider[:len(column)] = column
                grown.append(wider)
            self.bytes, self.packets, self.first, self.last = grown
        self.used = max(self.used, used)
        self.bytes[slots] += nbytes
        self.packets[slots] += packets
        self.first[slots] = np.minimum(self.first[slots], first)
        self.last[slots] = np.maximum(self.last[slots], last)

    def take(self, flows: list[Flow]) -> None:
        """Move the sums into the flows (flows[slot]), and start again from none."""
        used = self.used
        if not used:
            return
        for flow, nbytes, packets, first, last in zip(
                flows, self.bytes[:used].tolist(), self.packets[:used].tolist(),
                self.first[:used].tolist(), self.last[:used].tolist()):
            if packets:
                flow.delta_bytes += nbytes
                flow.delta_packets += packets
                if last > flow.last_ns:
                    flow.last_ns = last
                if first < flow.first_ns:
                    flow.first_ns = first
        self.bytes[:used] = self.packets[:used] = 0
        self.first[:used] = _NO_FIRST
        self.last[:used] = _NO_LAST
        self.used = 0


_NO_FIRST, _NO_LAST = np.iinfo(np.int64).max, np.iinfo(np.int64).min


class PartitionState:
    def __init__(self, partition: int, base_offset: int | None, table: FlowTable,
                 flow_base: int | None = None):
        self.partition = partition
        # offsets stored in Redis when this state began: of the series part, of the flow part
        self.base_offset = base_offset
        self.flow_base = flow_base if flow_base is not None else base_offset
        # after the last message aggregated: the flow part's offset when the parts differ
        # (the messages between the two count for the flow part only: replay())
        self.next_offset = self.flow_base
        # the offset of the last message read since this state began or restarted: what the
        # consumer's position is checked against (Processor.read_past_markers)
        self.last_read: int | None = None
        self.series_from = base_offset  # messages before this are in the series already
        # the offset of the first message read while no flow offset was stored: where the
        # flow part starts (a partition's first write stores it, and writes flows later)
        self.flow_start: int | None = None
        self.table = table
        self.clock_ns = 0  # newest capture time seen on this partition
        self.topic_id: str | None = None  # id of the topic the offsets belong to, once known
        self.reset = False  # the partition restarts at the topic's earliest offset: store it
        # no records read since a replay's end mark (capture sends one to every partition
        # after a file's last records): nothing more of that replay comes on this partition
        self.at_replay_end = False
        # messages read and validated, not aggregated yet (the processor's handle_all):
        # (message, value, records, meta entries) each, and their records
        self.waiting: list[tuple] = []
        self.waiting_records = 0
        # flows the last aggregation with 5-tuples created in the table, per record with a
        # 5-tuple: near 1 when each record is a flow of its own (a scan), low once records
        # come back to flows the table holds; a flow expired or evicted and seen again is new
        self.new_flows_per_record = 1.0
        self.clear()
        self.clear_flows()

    def clear_flows(self) -> None:
        """Forget the flow part (after it was written)."""
        self.flow_updates: list[Flow] = []  # flows with bytes, labels or a first write to write
        # (flow uid, minute, bytes) columns of each fold, summed once by flow_minutes
        self.minute_chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._flow_minutes: dict[tuple[Flow, int], int] | None = {}
        self.no_flow_minutes: dict[int, int] = {}  # minute -> bytes without a 5-tuple
        # (flow, minute) -> bytes of flows held back before (hold_back_probes) that get their
        # keys with this write: their first packet, counted in the host, app and domain sets
        # already, goes to the flows:top windows now
        self.promoted: dict[tuple[Flow, int], int] = {}
        self.counted: dict[str, int] = {"records": 0, "malformed_frames": 0,
                                        "malformed_messages": 0, "flows_not_stored": 0}

    def clear(self) -> None:
        """Forget the series part (after it was written, or when it must be dropped)."""
        self.global_: dict[int, list[int]] = {}  # second -> [bytes, packets]
        self.protocols: dict[tuple[str, int], list[int]] = {}  # (PROTO, second) -> [b, p]
        # (flow, second) cells as column chunks (slot, second, bytes, packets), a flow's slot
        # being its index in dirty_flows; cells() sums them per (flow, second)
        self.flow_cells: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.cells_summed = False  # flow_cells is one chunk, a cell a row, by slot and second
        self.no_flow: dict[int, list[int]] = {}  # second -> [b, p] of frames without a 5-tuple
        self.dirty_flows: list[Flow] = []
        # their bytes, packets and capture times since sync_flows() (taken by every flush)
        self.slot_sums = SlotSums()
        self.health: dict[tuple[str, int], int] = {}  # (ts:health name, second) -> increment
        self.capture_totals: dict[str, int] = {}  # health name -> increment
        self.folded = False  # its flow sums and counts were added to the flow part
        self.records = 0
        self.malformed_frames = 0
        self.malformed_messages = 0

    def add_stats(self, ts_ns: int, counters: dict[str, int]) -> None:
        """A capture stats message: counter increments at that (wall-clock) second. One that
        would take a flush's total of a counter past MAX_FLUSH_COUNTER is refused whole
        (MalformedMessage): each increment is bounded, but forged messages summed past 2**63
        made the flush's HINCRBY of that counter fail, real counts with it."""
        totals = self.capture_totals
        if any(totals.get(name, 0) + value > MAX_FLUSH_COUNTER
               for name, value in counters.items()):
            raise MalformedMessage("stats counters past what a flush can count")
        sec = ts_ns // NS
        for name, value in counters.items():  # zeros too: "no drops" is worth a point
            self.health[(name, sec)] = self.health.get((name, sec), 0) + value
            self.capture_totals[name] = self.capture_totals.get(name, 0) + value

    @property
    def series_pending(self) -> bool:
        """Has the series part something to write (its offset to move on)?"""
        return self.reset or (self.next_offset is not None and self.next_offset != self.base_offset
                              and (self.series_from is None or self.next_offset > self.series_from))

    @property
    def flows_pending(self) -> bool:
        return self.reset or (self.next_offset is not None and self.next_offset != self.flow_base)

    @property
    def pending(self) -> bool:
        return self.series_pending or self.flows_pending

    def restart_at_earliest(self, offset: int) -> None:
        """The topic was recreated or its log reset: count everything from `offset` on, and
        store both offsets at the next flush."""
        self.next_offset = self.series_from = offset
        self.last_read = None
        self.reset = True

    def sync_flows(self) -> None:
        """Bring the dirty flows' bytes, packets and capture times (Flow.delta_bytes,
        delta_packets, first_ns, last_ns) up to date with what add_records() took: a flush
        does it before it reads them."""
        self.slot_sums.take(self.dirty_flows)

    def fold(self) -> None:
        """Add the series part's flow bytes per minute and its counts to the flow part (once;
        the series part keeps them for its own write)."""
        self.sync_flows()
        if self.folded:
            return
        self.folded = True
        dirty = self.dirty_flows
        slot, sec, nbytes, _packets = self.cells()
        if len(slot):  # cells come by slot, then second: a (slot, minute) is a run of rows
            minute = sec // 60
            start = np.ones(len(slot), dtype=bool)
            start[1:] = (slot[1:] != slot[:-1]) | (minute[1:] != minute[:-1])
            at = np.flatnonzero(start)
            uid = np.fromiter(map(_UID, dirty), np.int64, len(dirty))
            self.minute_chunks.append((uid[slot[at]], minute[at], np.add.reduceat(nbytes, at)))
            self._flow_minutes = None
        no_flow = self.no_flow_minutes
        for sec, cell in self.no_flow.items():
            no_flow[sec // 60] = no_flow.get(sec // 60, 0) + cell[0]
        counted = self.counted
        counted["records"] += self.records
        counted["malformed_frames"] += self.malformed_frames
        counted["malformed_messages"] += self.malformed_messages

    @property
    def flow_minutes(self) -> dict[tuple[Flow, int], int]:
        """(flow, minute of capture time) -> bytes of the flow part: the folds' columns summed
        here, once a flow write rather than once a flush (each flush of a replay of many
        long flows folds nearly all of them)."""
        if self._flow_minutes is None:
            uid, minute, nbytes = (np.concatenate(c) for c in zip(*self.minute_chunks))
            self.minute_chunks = [(uid, minute, nbytes)]
            by_uid = {f.uid: f for f in self.flow_updates}  # (every folded flow is one)
            self._flow_minutes = {
                (by_uid[u], m): b for u, m, b, _b in zip(*sum_by_key(uid, minute, nbytes, nbytes))}
        return self._flow_minutes

    def replayed(self) -> None:
        """What was aggregated so far came from messages before series_from, read again for
        the flow part only (their per-second sums are in Redis already): keep the flow part,
        drop the rest."""
        self.fold()
        for flow in self.dirty_flows:
            flow.dirty = False
        self.clear()

    def add_records(self, records, meta: list[tuple[int, int, str]] = ()) -> None:
        """Aggregate the records of one message and its meta entries.

        records: what decode_batch returns (its RECORD_DTYPE `array` is used), a RECORD_DTYPE
        array, or an iterable of record tuples (packet_records.RECORD field order). The work is
        column-wise: Python runs once per distinct second, flow and (flow, second) of the
        message, not per record. The result is the one of taking the records one by one in
        message order (tests/unit/test_aggregate.py keeps that loop as its reference): dicts
        gain their keys in the order the records first meet them, a flow's labels change in
        record order, meta entries apply to the flow of their record."""
        batch = getattr(records, "array", records)
        if not isinstance(batch, np.ndarray):
            batch = records_array(batch)
        n = len(batch)
        if not n:
            return
        ts = batch["ts_ns"]
        wire = batch["wire_len"].astype(np.int64)
        ipver = batch["ip_version"]
        flags = batch["flags"]
        self.records += n
        self.malformed_frames += int(np.count_nonzero(flags & FLAG_MALFORMED))
        newest = int(ts.max())
        if newest > self.clock_ns:
            self.clock_ns = newest
        sec = ts // NS
        _add_cells(self.global_, *_sums(sec, wire))
        code = np.where(ipver != 0, _PROTO_CODE[batch["ip_proto"]], _OTHER)
        keys, sums, packets = _sums(sec * 8 + code, wire)
        _add_cells(self.protocols, [(PROTOCOLS[k & 7], k >> 3) for k in keys], sums, packets)
        has_flow = ipver != 0
        if has_flow.all():
            rows = None
        else:
            no_flow = ~has_flow
            _add_cells(self.no_flow, *_sums(sec[no_flow], wire[no_flow]))
            rows = np.flatnonzero(has_flow)
            if not len(rows):
                return
            batch, sec, wire = batch[rows], sec[rows], wire[rows]
        known = len(self.table)
        flows, record_flow = self._add_flows(batch, sec, wire)
        self.new_flows_per_record = (len(self.table) - known) / len(batch)
        if meta:  # in record order; a record's entries in their order
            index = np.array([entry[0] for entry in meta], dtype=np.int64)
            order = np.argsort(index, kind="stable")
            index = index[order]
            named = (flags[index] & FLAG_HAS_META != 0) & (ipver[index] != 0)
            order, index = order[named], index[named]
            if rows is not None:
                index = np.searchsorted(rows, index)  # every such record has a 5-tuple
            for entry, owner in zip(order.tolist(), record_flow[index].tolist()):
                _index, kind, text = meta[entry]
                _apply_meta(flows[owner], kind, text)

    def _add_flows(self, batch: np.ndarray, sec: np.ndarray, wire: np.ndarray,
                   ) -> tuple[list[Flow], np.ndarray]:
        """The flow part of add_records for records that all have a 5-tuple: returns the flows
        in the order the records first meet them, and each record's index into that list."""
        m = len(batch)
        ts = batch["ts_ns"]
        ipver, proto = batch["ip_version"], batch["ip_proto"]
        sport, dport = batch["sport"], batch["dport"]
        halves = batch.view(_ADDRESS_HALVES)
        src_hi, src_lo = halves["src_hi"].astype(np.uint64), halves["src_lo"].astype(np.uint64)
        dst_hi, dst_lo = halves["dst_hi"].astype(np.uint64), halves["dst_lo"].astype(np.uint64)
        # canonical key: (src, sport) <= (dst, dport) as the bytes compare, else reversed
        forward = (src_hi < dst_hi) | ((src_hi == dst_hi) & (
            (src_lo < dst_lo) | ((src_lo == dst_lo) & (sport <= dport))))
        a_hi, b_hi = np.where(forward, src_hi, dst_hi), np.where(forward, dst_hi, src_hi)
        a_lo, b_lo = np.where(forward, src_lo, dst_lo), np.where(forward, dst_lo, src_lo)
        ports = np.where(forward, sport.astype(np.uint64) << 16 | dport,
                         dport.astype(np.uint64) << 16 | sport)
        small = ipver.astype(np.uint64) << 40 | proto.astype(np.uint64) << 32 | ports
        # sort by flow key, then second; stable: each (flow, second) starts with its first record
        order = np.lexsort((sec, small, b_lo, b_hi, a_lo, a_hi))
        flow_start = np.zeros(m, dtype=bool)
        flow_start[0] = True
        changed = flow_start[1:]  # a view: the record's key differs from the one before it
        for column in (a_hi, a_lo, b_hi, b_lo, small):
            column = column[order]
            changed |= column[1:] != column[:-1]
        s_sec = sec[order]
        cell_start = flow_start.copy()
        cell_start[1:] |= s_sec[1:] != s_sec[:-1]
        flow_starts, cell_starts = np.flatnonzero(flow_start), np.flatnonzero(cell_start)
        s_wire, s_ts = wire[order], ts[order]
        # flows numbered in the order their first records come (a flow's group is sorted by
        # second first: its first record is the lowest index of the group)
        first = np.minimum.reduceat(order, flow_starts)
        rank = np.argsort(first)
        number = np.empty(len(rank), dtype=np.int64)
        number[rank] = np.arange(len(rank))
        sorted_flow = number[np.cumsum(flow_start) - 1]
        record_flow = np.empty(m, dtype=np.int64)
        record_flow[order] = sorted_flow
        nbytes = np.add.reduceat(s_wire, flow_starts)[rank]
        packets = np.diff(flow_starts, append=m)[rank]
        oldest = np.minimum.reduceat(s_ts, flow_starts)[rank]
        newest = np.maximum.reduceat(s_ts, flow_starts)[rank]
        first = first[rank]
        # look the flows up by their packed keys (one bytes object each), then create the
        # new ones
        fwd = forward[first]
        src, dst = batch["src"][first], batch["dst"][first]
        sp, dp = sport[first], dport[first]
        packed = np.empty(len(first), _KEY)
        packed["ipver"], packed["proto"] = ipver[first], proto[first]
        packed["a"], packed["aport"] = np.where(fwd, src, dst), np.where(fwd, sp, dp)
        packed["b"], packed["bport"] = np.where(fwd, dst, src), np.where(fwd, dp, sp)
        keys = packed.view(_KEY_BYTES).tolist()
        table = self.table.flows
        flows: list[Flow] = list(map(table.get, keys))
        if None in flows:
            self._create_flows(flows, keys, batch[first], ts[first])
        # the flows not dirty yet take the next slots; the sums go by slot (sync_flows())
        dirty, updates = self.dirty_flows, self.flow_updates
        for flow in [flow for flow in flows if not flow.dirty]:
            flow.dirty = True
            flow.slot = len(dirty)
            dirty.append(flow)
            if not flow.updated:  # cleared with dirty or before (a flow write is a flush)
                flow.updated = True
                updates.append(flow)
        slots = np.fromiter(map(_SLOT, flows), np.int64, len(flows))
        self.slot_sums.add(slots, len(dirty), nbytes, packets, oldest, newest)
        # (flow, second) cells as columns: no Python object a cell
        self.flow_cells.append((slots[sorted_flow[cell_starts]], s_sec[cell_starts],
                                np.add.reduceat(s_wire, cell_starts),
                                np.diff(cell_starts, append=m)))
        self.cells_summed = False
        self._label_flows(flows, record_flow, batch["app"], batch["app_flags"])
        return flows, record_flow

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The series part's (flow, second) cells, each once: int64 columns slot (the flow's
        index in dirty_flows), second, bytes, packets; by slot, then second."""
        chunks = self.flow_cells
        if not chunks:
            empty = np.empty(0, np.int64)
            return empty, empty, empty, empty
        if not self.cells_summed:
            slot, sec, nbytes, packets = (np.concatenate(c) if len(chunks) > 1 else c[0]
                                          for c in zip(*chunks))
            lo, hi = int(sec.min()), int(sec.max())
            span = hi - lo + 1
            dense = len(self.dirty_flows) * span
            # a sum per possible (slot, second), when there are few (float sums: exact below
            # 2**53 bytes), else a sort
            if dense <= 4 * len(slot) + 65536 and int(nbytes.sum()) < 2**53:
                key = slot * span + (sec - lo)
                count = np.bincount(key, minlength=dense)
                at = np.flatnonzero(count)
                cells = (at // span, at % span + lo,
                         np.bincount(key, nbytes, dense)[at].astype(np.int64),
                         np.bincount(key, packets, dense)[at].astype(np.int64))
            else:  # seconds far apart (capture times are whatever the wire says)
                cells = tuple(np.array(c, dtype=np.int64)
                              for c in sum_by_key(slot, sec, nbytes, packets))
            self.flow_cells = [cells]
            self.cells_summed = True
        return self.flow_cells[0]

    def _create_flows(self, flows: list, keys: list[bytes], first: np.ndarray,
                      first_ts: np.ndarray) -> None:
        """Create the flows not in the table (None in flows), in the order of their first
        records: first (the records) and first_ts (their times) give the sender and time."""
        table = self.table.flows
        missing = [i for i, flow in enumerate(flows) if flow is None]
        for i, ipver, proto, src, sport, dst, dport, ts in zip(
                missing, first["ip_version"][missing].tolist(),
                first["ip_proto"][missing].tolist(), first["src"][missing].tolist(),
                first["sport"][missing].tolist(), first["dst"][missing].tolist(),
                first["dport"][missing].tolist(), first_ts[missing].tolist()):
            key = keys[i]
            table[key] = flows[i] = Flow(key, ipver, proto, src, sport, dst, dport, ts)

    @staticmethod
    def _label_flows(flows: list[Flow], record_flow: np.ndarray, app: np.ndarray,
                     app_flags: np.ndarray) -> None:
        """Application labels of the records, per flow in record order. A record that repeats
        its flow's previous label changes nothing, so only the changes are looked at."""
        labelled = np.flatnonzero(app)
        if not len(labelled):
            return
        label = app[labelled].astype(np.int64) << 1 | (app_flags[labelled] & APP_GUESS)
        owner = record_flow[labelled]
        by_flow = np.argsort(owner, kind="stable")
        owner, label = owner[by_flow], label[by_flow]
        change = np.ones(len(owner), dtype=bool)
        change[1:] = (owner[1:] != owner[:-1]) | (label[1:] != label[:-1])
        for f, value in zip(owner[change].tolist(), label[change].tolist()):
            flow = flows[f]
            new, guess = value >> 1, bool(value & 1)
            if new != flow.app or flow.app_guess != guess:
                if not (guess and flow.app and not flow.app_guess):
                    flow.app, flow.app_guess = new, guess
                    flow.labels_changed = True

    # -- which flows get keys, per-flow series policy, what a written flush leaves behind ----

    def hold_back_probes(self, stored: int) -> int:
        """Before a flow write: the flows of this write that are new and hold one packet (what
        a scan makes) get keys of their own up to `stored` of them (0: all), in the order
        they came; the others are marked unstored (Flow.unstored) and get none while they
        hold that one packet. A flow held back earlier that has packets again gets its keys
        now, with that first packet (its bytes, in the minute it came, go to the flows:top
        windows through `promoted`). Flows with series keep their keys. Returns the change
        in the flows without keys (held back now, less those that get keys now), counted in
        flows_not_stored."""
        self.sync_flows()
        change = seen = 0
        for f in self.flow_updates:
            if f.unstored:
                if f.delta_packets:  # a later packet: the flow is written from its first on
                    f.unstored, f.new = False, True
                    self.promoted[(f, f.opened_ns // (60 * NS))] = f.total_bytes
                    f.delta_bytes += f.total_bytes
                    f.delta_packets += 1
                    f.total_bytes = 0
                    change -= 1
            elif stored and f.new and f.delta_packets == 1 and not f.series:
                seen += 1
                if seen > stored:
                    f.unstored = True
                    change += 1
        self.counted["flows_not_stored"] += change
        return change

    def plan_series(self, policy: str, min_bytes: int, top_scores: list[float], top_n: int,
                    max_held: int) -> list[tuple[Flow, int]]:
        """Decide which flows without series get them with this flush (flow.qualifies).

        FLOW_SERIES=all: every flow. top: a flow qualifies once its bytes reach min_bytes, or
        would rank among the top_n of flows:top:bytes (its current top scores, top_scores,
        together with the totals of this flush's flows: it must beat the one ranked just
        after the top_n, so flows tied at the edge, as in a scan of equal flows, do not all
        get series), or holds more than max_held seconds (the bound of what is held here).
        Deterministic for a given state: a flush retried after an error decides the same
        way. Returns the flows that qualify under `top` with their totals (RedisSink counts
        them among the top until flows:top:bytes holds them)."""
        self.sync_flows()
        flows = [f for f in self.dirty_flows if not (f.series or f.unstored)]
        if not flows:
            return []
        if policy == "all":
            for f in flows:
                f.qualifies = True
            return []
        totals = [f.total_bytes + f.delta_bytes for f in flows]
        ranked = sorted([*top_scores, *totals], reverse=True)
        beat = None  # a total above this ranks among the top_n
        if top_n:
            beat = ranked[top_n] if len(ranked) > top_n else -1  # few flows: all in the top
        # seconds held with this flush's: counted one by one only for the flows whose held rows
        # and cells of this flush could pass max_held (a second held from two flushes is two
        # rows)
        near: dict[Flow, int] = {}
        if max_held:
            slot, sec, _b, _p = self.cells()
            cells = np.bincount(slot, minlength=len(self.dirty_flows)).tolist()
            near_flows = [f for f in flows if f.held_rows + cells[f.slot] > max_held]
            if near_flows:
                held = self.table.held.seconds([f.uid for f in near_flows])
                is_near = np.zeros(len(self.dirty_flows), dtype=bool)
                is_near[[f.slot for f in near_flows]] = True
                mine = is_near[slot]
                dirty = self.dirty_flows
                for s, second in zip(slot[mine].tolist(), sec[mine].tolist()):
                    held[dirty[s].uid].add(second)
                near = {f: len(held[f.uid]) for f in near_flows}
        chosen = []
        for f, total in zip(flows, totals):
            f.qualifies = (total >= min_bytes or (beat is not None and total > beat)
                           or near.get(f, 0) > max_held)
            if f.qualifies:
                chosen.append((f, total))
        return chosen

    def written(self, flows: bool = True) -> None:
        """The flush landed in Redis: hold the cells of flows without series and clear the
        series part; with flows (the flow part was written too), move the deltas into the
        flows' totals and clear the flow part."""
        series = self.series_pending  # (not while messages are read again for flows only)
        self.fold()
        dirty = self.dirty_flows
        if dirty:
            slot, sec, nbytes, packets = self.cells()
            hold = np.fromiter([not (f.series or f.qualifies or f.unstored) for f in dirty],
                               bool, len(dirty))[slot]
            if hold.any():
                slot = slot[hold]
                uid = np.fromiter(map(_UID, dirty), np.int64, len(dirty))
                self.table.held.add(uid[slot], sec[hold], nbytes[hold], packets[hold])
                for s, rows in enumerate(np.bincount(slot, minlength=len(dirty)).tolist()):
                    if rows:
                        dirty[s].held_rows += rows
        qualified = []
        for flow in dirty:
            if flow.qualifies:
                flow.series, flow.qualifies = True, False
                if flow.held_rows:  # (the sink took them, with the flush's samples)
                    qualified.append(flow.uid)
                    flow.held_rows = 0
            flow.dirty = False
        if qualified:
            self.table.held.take(qualified)
        self.clear()
        if series:
            self.base_offset = self.series_from = self.next_offset
        if flows:
            for flow in self.flow_updates:
                flow.total_bytes += flow.delta_bytes
                flow.updated = flow.new = flow.labels_changed = False
                flow.delta_bytes = flow.delta_packets = 0
            self.clear_flows()
            self.flow_base = self.next_offset
        elif self.flow_base is None:
            self.flow_base = self.flow_start
        self.reset = False


def _apply_meta(flow: Flow, kind: int, text: str) -> None:
    """A name found in one of the flow's records."""
    if kind == META_SERVER_NAME and text != flow.server_name:
        flow.server_name = text
        flow.labels_changed = True
    elif kind == META_FINGERPRINT and text != flow.fingerprint:
        flow.fingerprint = text
        flow.labels_changed = True


def records_array(records) -> np.ndarray:
    """Record tuples (packet_records.RECORD field order) as a RECORD_DTYPE array."""
    return np.frombuffer(b"".join([RECORD.pack(*r) for r in records]), RECORD_DTYPE)


def _sums(keys: np.ndarray, wire: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """(distinct keys, their byte sums, their record counts), keys in first-seen order."""
    if keys[0] == keys[-1] and (keys == keys[0]).all():  # the usual message: one second
        return [int(keys[0])], [int(wire.sum())], [len(keys)]
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    start = np.empty(len(keys), dtype=bool)
    start[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=start[1:])
    starts = np.flatnonzero(start)
    rank = np.argsort(order[starts])
    return (ordered[starts][rank].tolist(), np.add.reduceat(wire[order], starts)[rank].tolist(),
            np.diff(starts, append=len(keys))[rank].tolist())


def _add_cells(cells: dict, keys: list, sums: list[int], packets: list[int]) -> None:
    for key, b, p in zip(keys, sums, packets):
        cell = cells.get(key)
        if cell is None:
            cells[key] = [b, p]
        else:
            cell[0] += b
            cell[1] += p
