"""From decoded frames to packed records, batched per Kafka partition.

RecordBatcher.add() takes one decoded frame; add_batch() a batch decoded by
capture.batch_decode (what the capture loop uses): it gives the same messages, byte for byte
and in the same order, packing with numpy the records of the frames whose flow is known and no
longer inspected (nearly all), labelling the others as add() would in their turn, and putting
each partition's records in its messages as numpy rows, not one bytes object a record.

Non-first IP fragments carry no L4 header. Like tshark's conversation table, they belong to the
flow of the first fragment with the same (addresses, protocol, IP id): FragmentTracker remembers
the first fragments' ports, and holds back a non-first fragment that arrives before its first
fragment for a short while (bounded in count and capture time) before it goes out with ports 0.
A second first fragment with the same IP id inside the reassembly timeout is an overlap (or an
attack) on the same datagram: the later fragments stay with the first one, as in tshark.

No fragment payload is kept: a held fragment is its record's fields (about 0.5 KB with its key,
at most FRAGMENTS_HELD of them, 4096 by default: 2 MB), and a remembered first fragment's ports
take about 0.3 KB (at most 65536: 20 MB). Payload bytes held for inspection are bounded by the
flow cache (capture.flowcache: INSPECT_MEMORY_MB, INSPECT_IDLE_TIMEOUT_S).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from capture.batch_decode import FEW_FRAMES, FLOW_KEY_DTYPE, DecodedBatch, flow_keys
from capture.flowcache import INSPECTED, FlowCache, payload_of
from capture.inspect.names import safe_name
from packet_records import (
    FLAG_FRAGMENT,
    FLAG_HAS_META,
    FLAG_LATER_FRAGMENT,
    FLAG_MALFORMED,
    FLAG_TRUNCATED,
    MAX_WIRE_LEN,
    RECORD,
    encode_packed,
)

_pack = RECORD.pack
_ROW = np.dtype(f"V{RECORD.size}")  # a packed record as one value
_FLOW_KEY_VOID = np.dtype(f"V{FLOW_KEY_DTYPE.itemsize}")  # a FlowCache key, listed as bytes
_PARTITION = 0xFFFFFFFF  # a flow's partition in its label (capture.flowcache.label_of)
_LOOK, _ADD = -1, -2  # add_batch(): turns of the frames it does not pack at once


def _label_fields(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition, app and app flags of flow labels (capture.flowcache.label_of)."""
    return labels & _PARTITION, (labels >> 32) & 0xFF, (labels >> 40) & 0xFF


class FragmentTracker:
    def __init__(self, max_flows: int = 65536, max_held: int = 4096, hold_ns: int = 2_000_000_000,
                 reassembly_ns: int = 30_000_000_000):
        self.ports: OrderedDict[tuple, tuple[int, int, int]] = OrderedDict()  # sport, dport, ts
        self.held: OrderedDict[tuple, list] = OrderedDict()
        self.held_count = 0
        self.max_flows, self.max_held, self.hold_ns = max_flows, max_held, hold_ns
        self.reassembly_ns = reassembly_ns

    def first_fragment(self, key: tuple, sport: int, dport: int, ts_ns: int) -> list:
        """Remember the ports of a first fragment; return the held fragments it releases."""
        known = self.ports.get(key)
        if known is None or ts_ns - known[2] > self.reassembly_ns:
            self.ports[key] = (sport, dport, ts_ns)
            self.ports.move_to_end(key)
            if len(self.ports) > self.max_flows:
                self.ports.popitem(last=False)
        released = self.held.pop(key, None)
        if released:
            self.held_count -= len(released)
            return released
        return []

    def ports_of(self, key: tuple, ts_ns: int) -> tuple[int, int, int] | None:
        known = self.ports.get(key)
        if known is not None and ts_ns - known[2] > self.reassembly_ns:
            return None  # an old datagram's id, reused
        return known

    def hold(self, key: tuple, item) -> list:
        """Hold a non-first fragment; return fragments pushed out by the bound (ports 0)."""
        self.held.setdefault(key, []).append(item)
        self.held_count += 1
        out = []
        while self.held_count > self.max_held:
            _, items = self.held.popitem(last=False)
            self.held_count -= len(items)
            out.extend(items)
        return out

    def expire(self, now_ns: int | None) -> list:
        """Fragments held longer than hold_ns of capture time (all of them when now_ns is None)."""
        out = []
        while self.held:
            key, items = next(iter(self.held.items()))
            if now_ns is not None and now_ns - items[0][0] < self.hold_ns:
                break
            del self.held[key]
            self.held_count -= len(items)
            out.extend(items)
        return out


def _believed(wire: np.ndarray, batch: DecodedBatch) -> np.ndarray:
    """The wire lengths of a batch, none past MAX_WIRE_LEN: a longer one (an original length
    in a capture file that lies, or a "frame" bigger than any link carries) is not believed,
    as RecordBatcher.add does not: the frame counts its captured bytes (at most MAX_WIRE_LEN)
    and is flagged malformed, in the batch's columns and in its fallback tuples."""
    over = wire > MAX_WIRE_LEN
    wire = np.where(over, np.minimum(batch.caplen, MAX_WIRE_LEN), wire)
    batch.flags[over] |= FLAG_MALFORMED
    batch.fallback = [(i, decoded[:7] + (decoded[7] | FLAG_MALFORMED,) + decoded[8:])
                      if over[i] else (i, decoded) for i, decoded in batch.fallback]
    return wire


def _label_late(records: np.ndarray, parts: np.ndarray, late: list[int],
                labels: list[int]) -> None:
    """add_batch(): records `late` take the final labels of their flows (`labels`)."""
    if late:
        at = np.array(late, dtype=np.intp)
        parts[at], records["app"][at], records["app_flags"][at] = _label_fields(
            np.array(labels, dtype=np.int64))


class RecordBatcher:
    """Packs one record per frame (with its L7 label when inspection is on) and groups them
    into one message per partition."""

    def __init__(self, partitions: int, records_per_message: int, inspect: bool = True,
                 replay: bool = False, inspect_memory_mb: float = 64,
                 inspect_idle_timeout_s: float = 30.0, fragments_held: int = 4096):
        self.partitions = partitions
        self.replay = replay  # frames from a capture file: batches say so (their times are old)
        self.records_per_message = records_per_message
        # per partition: the records of its next message, packed (one record in each bytes
        # from add(), any number in each numpy slice from add_batch()), and how many they are
        self.pending: list[list[bytes | np.ndarray]] = [[] for _ in range(partitions)]
        self.counts = [0] * partitions
        self.pending_meta: list[list[tuple[int, int, str]]] = [[] for _ in range(partitions)]
        self.ready: list[tuple[int, bytes, int]] = []  # (partition, message, record count)
        self.fragments = FragmentTracker(max_held=fragments_held)
        self.flows = FlowCache(partitions, inspect, memory_bytes=int(inspect_memory_mb * (1 << 20)),
                               idle_timeout_ns=int(inspect_idle_timeout_s * 1e9))
        self.last_ts = 0

    def add(self, ts_ns: int, wire_len: int, frame: bytes, decoded: tuple) -> None:
        ipver, proto, src, dst, sport, dport, tcp_flags, flags, frag_id, l4_off, _end = decoded
        if wire_len > MAX_WIRE_LEN:  # not believed (see _believed)
            wire_len = min(len(frame), MAX_WIRE_LEN)
            flags |= FLAG_MALFORMED
        if len(frame) < wire_len:
            flags |= FLAG_TRUNCATED
        self.last_ts = ts_ns
        if flags & FLAG_FRAGMENT:
            key = (src, dst, proto, frag_id)
            if not flags & FLAG_LATER_FRAGMENT:
                for held in self.fragments.first_fragment(key, sport, dport, ts_ns):
                    self._emit(*held, sport, dport)
            else:
                known = self.fragments.ports_of(key, ts_ns)
                if known is None:
                    item = (ts_ns, wire_len, ipver, proto, src, dst, tcp_flags, flags)
                    for old in self.fragments.hold(key, item):
                        self._emit(*old, 0, 0)
                    return
                sport, dport = known[0], known[1]
        self._emit(ts_ns, wire_len, ipver, proto, src, dst, tcp_flags, flags, sport, dport,
                   frame if l4_off >= 0 else None, decoded)

    def add_batch(self, ts_ns: Sequence[int], wire_lens: Sequence[int], frames: Sequence[bytes],
                  batch: DecodedBatch) -> int:
        """add() every frame of a decoded batch (capture.batch_decode), in order: the same
        records, messages and state as add() frame by frame, with per-frame Python work only
        where add() has some to do. Records are packed by numpy, with the partition and label
        of their flow found in the flow cache by the batch's flow_keys(); a frame whose flow
        was not cached then, or inspected, looks again when its turn comes, and add() takes
        it if it has something to do there: a flow to enter in the cache, a payload to feed
        to the flow's inspector. add() takes the IP fragments too, and every frame of a batch
        of at most FEW_FRAMES. The frames that looked again do what add() does but keep
        their record in the batch's array (_flow_of()), so that every record between two
        fragments goes to the partitions' messages at once, as numpy rows (_place()).
        `frames` may be a capture.pcapfile.FrameSlices (frames still in the read of a file),
        `ts_ns` and `wire_lens` int64 arrays. Returns the sum of the records' wire lengths."""
        n = len(frames)
        if n == 0:
            return 0
        flows, add = self.flows, self.add
        # (columns of a FrameChunk are arrays already)
        ts = ts_ns if isinstance(ts_ns, np.ndarray) else np.fromiter(ts_ns, np.int64, n)
        wire = wire_lens if isinstance(wire_lens, np.ndarray) else np.fromiter(wire_lens,
                                                                                np.int64, n)
        if wire.max() > MAX_WIRE_LEN:
            wire = _believed(wire, batch)
        wire_bytes = int(wire.sum())
        if n <= FEW_FRAMES:  # add() one by one costs less than numpy's fixed costs
            for item in zip(ts.tolist(), wire.tolist(), frames, batch.tuples()):
                add(*item)
            return wire_bytes
        keys = batch.keys if batch.keys is not None else flow_keys(batch)
        labels = flows.find_labels(keys.view(np.uint8).reshape(n, keys.dtype.itemsize))
        keys = keys.view(_FLOW_KEY_VOID)  # each row: the bytes of its FlowCache key
        # the turn of each frame: its partition (the record is packed), _LOOK (look again),
        # _ADD (an IP fragment: add(); its own ports are 0, not its flow's)
        turns = np.where(labels & INSPECTED, _LOOK, labels & _PARTITION)
        turns[(batch.flags & FLAG_FRAGMENT) != 0] = _ADD
        deferred = np.flatnonzero(turns < 0)
        # Each add() enters at most one flow in the cache, plus one per held fragment it
        # releases or pushes out (held before this batch, or in it by another add()). Near
        # the cache's bound, a flow packed here could be evicted by an earlier frame's and
        # come back afresh in add() frame by frame: then the whole batch takes that path.
        # (Far from the bound, survive() is True at once: no need for every key as bytes.)
        inserts = 2 * len(deferred) + self.fragments.held_count
        if (len(deferred) and inserts > flows.max_flows - len(flows.flows)
                and not flows.survive(keys.tolist(), inserts)):
            for item in zip(ts.tolist(), wire.tolist(), frames, batch.tuples()):
                add(*item)
            return wire_bytes
        _, app, app_flags = _label_fields(labels)
        records = batch.records(ts, wire, app.astype(np.uint8), app_flags.astype(np.uint8))
        parts = turns  # the partition of every record, once the deferred frames have theirs
        # frames in a read of the file (capture.pcapfile.FrameSlices) are sliced from it only
        # when they are looked at: not those of flows whose inspection ended in this batch
        buf = getattr(frames, "buf", None)
        if buf is not None:
            at = frames.starts[deferred]
            firsts, ends = at.tolist(), (at + frames.lengths[deferred]).tolist()
        else:
            firsts, ends = deferred.tolist(), None
        find = flows.flows.get
        # first payloads inspected ahead (capture.reader_process), by frame
        learned = batch.learned or {}
        start = 0  # the records from here on are not placed in their batches yet
        meta: list[tuple[int, int, str]] = []  # (row, kind, text) of the records from start
        rows: list[int] = []  # frames looked at again since start: their flows' labels
        labelled: list[tuple[int, int, int, int]] = []  # (partition, app, app flags, flags)
        # Once a flow is seen inspected to the end, its label is final (nothing changes it in
        # this batch): its later frames take it all at once (late: those frames, late_labels:
        # the labels)
        final: dict[bytes, int] = {}  # flow key -> final label
        late: list[int] = []
        late_labels: list[int] = []
        # (what the frames that are not late need is listed for all, a tuple made each)
        t_list, w_list = ts[deferred].tolist(), wire[deferred].tolist()
        flag_list, tuples = records["flags"][deferred].tolist(), batch.lazy_tuples(deferred)
        for k, (i, key, turn) in enumerate(zip(deferred.tolist(), keys[deferred].tolist(),
                                               turns[deferred].tolist())):
            if turn != _ADD:
                label = final.get(key)
                if label is not None:
                    late.append(i)
                    late_labels.append(label)
                    continue
            t, w, flag, decoded = t_list[k], w_list[k], flag_list[k], tuples[k]
            a = firsts[k]  # the frame: buf[a:ends[k]] in a read of a file, else frames[a]
            if turn == _ADD:  # the records before it go first, as add() may close batches
                _label_late(records, parts, late, late_labels)
                late, late_labels = [], []
                self._place(records, parts, meta, rows, labelled, start, i)
                meta, rows, labelled = [], [], []
                add(t, w, buf[a:ends[k]] if buf is not None else frames[a], decoded)
                start = i + 1
                continue
            # as add() would: the flow cached now (or enter it), its inspector fed the
            # payload (if it has one and is still there), its label on the record
            flow = find(key)
            if flow is not None and flow.inspector is None:
                frame = None  # inspected to the end: only its label is needed
            else:
                frame = buf[a:ends[k]] if buf is not None else frames[a]
            names = None
            if flow is None:
                flow, names = self._flow_of(t, decoded[1], decoded[2], decoded[3], decoded[4],
                                            decoded[5], frame if decoded[9] >= 0 else None,
                                            decoded, learned.get(i))
            elif (frame is not None and decoded[9] >= 0
                  and payload_of(frame, decoded) is not None):  # (its inspector is there)
                names = flows.inspect(flow, frame, decoded, t, learned.get(i))
            if names:
                flag |= FLAG_HAS_META
                meta.extend((i, kind, safe_name(raw)) for kind, raw in names)
            rows.append(i)
            labelled.append((flow.partition, flow.app, flow.app_flags, flag))
            if flow.inspector is None:
                final[key] = flow.label
        _label_late(records, parts, late, late_labels)
        self._place(records, parts, meta, rows, labelled, start, n)
        self.last_ts = int(ts[-1])
        return wire_bytes

    def _place(self, records: np.ndarray, parts: np.ndarray, meta: list, rows: list[int],
               labelled: list, a: int, b: int) -> None:
        """Put records[a:b] (of add_batch) in the batches of their partitions parts[a:b], as
        add() would one by one: the same batches, closed in the same order. `rows` of them
        take (partition, app, app flags, flags) from `labelled` first; `meta` holds the
        (row, kind, text) entries of these records."""
        if rows:
            at = np.array(rows, dtype=np.intp)
            got = np.array(labelled, dtype=np.int64)
            parts[at] = got[:, 0]
            records["app"][at] = got[:, 1]
            records["app_flags"][at] = got[:, 2]
            records["flags"][at] = got[:, 3]
        if a >= b:
            return
        part = parts[a:b]
        # each partition's records in frame order, one partition after the other
        # (partitions as 16-bit numbers: numpy sorts those by radix, 5x faster than int64)
        order = np.argsort(part.astype(np.uint16) if self.partitions <= 1 << 16 else part,
                           kind="stable")
        sizes = np.bincount(part, minlength=self.partitions).tolist()
        # (as rows of plain bytes: numpy takes them a whole row at a time; slices of them go
        # into the messages as they are, no bytes object made for each partition's records)
        data = records[a:b].view(_ROW).take(order)
        limit = self.records_per_message
        if meta:  # each entry at the place of its record in `order`
            place = np.empty(b - a, dtype=np.intp)
            place[order] = np.arange(b - a)
            places = place[[row - a for row, _, _ in meta]].tolist()
            # (place, entry number, kind, text): in place order, a record's entries as given
            meta = sorted((place, number, kind, text)
                          for number, (place, (_row, kind, text)) in enumerate(zip(places, meta)))
        m_at = 0  # the next meta entry
        closed = []  # (row of the record that filled the batch, partition, message)
        j = 0
        for p, k in enumerate(sizes):
            if not k:
                continue
            end = j + k
            batch_p, meta_p, have = self.pending[p], self.pending_meta[p], self.counts[p]
            while j < end:
                take = min(end - j, limit - have)
                batch_p.append(data[j:j + take])
                while m_at < len(meta) and meta[m_at][0] < j + take:
                    q, _, kind, text = meta[m_at]
                    meta_p.append((have + q - j, kind, text))
                    m_at += 1
                have += take
                j += take
                if have == limit:
                    closed.append((int(order[j - 1]), p,
                                   encode_packed(have, batch_p, meta_p, self.replay)))
                    batch_p, meta_p, have = [], [], 0
                    self.pending[p], self.pending_meta[p] = batch_p, meta_p
            self.counts[p] = have
        closed.sort(key=lambda c: c[0])
        self.ready.extend((p, message, limit) for _, p, message in closed)

    def _flow_of(self, ts_ns, proto, src, dst, sport, dport, frame, decoded, learned=None):
        """The flow of a record (entered in the cache if new) and the meta entries (kind, raw
        bytes) its inspector found in `frame`, when given (a packet with an L4 header);
        `learned`: FlowCache.inspect()'s."""
        flow = self.flows.get(proto, src, sport, dst, dport)
        if flow.inspector is not None and frame is not None:
            return flow, self.flows.inspect(flow, frame, decoded, ts_ns, learned)
        return flow, None

    def _emit(self, ts_ns, wire_len, ipver, proto, src, dst, tcp_flags, flags, sport, dport,
              frame=None, decoded=None):
        """Pack one record into its flow's partition batch; `frame` (with `decoded`) is given
        when the packet has an L4 header the flow's inspector may want."""
        flow, meta = self._flow_of(ts_ns, proto, src, dst, sport, dport, frame, decoded)
        partition = flow.partition
        if meta:
            flags |= FLAG_HAS_META
            index = self.counts[partition]
            # The one place where names enter a message: every entry's bytes (taken from the
            # packet) become text through safe_name(), so none leaves capture unescaped
            self.pending_meta[partition].extend((index, kind, safe_name(raw)) for kind, raw in meta)
        self.pending[partition].append(_pack(ts_ns, wire_len, ipver, proto, tcp_flags, flags,
                                             sport, dport, src, dst, flow.app, flow.app_flags, 0))
        self.counts[partition] += 1
        if self.counts[partition] >= self.records_per_message:
            self._close(partition)

    def _close(self, partition: int) -> None:
        count = self.counts[partition]
        message = encode_packed(count, self.pending[partition], self.pending_meta[partition],
                                self.replay)
        self.ready.append((partition, message, count))
        self.pending[partition] = []
        self.pending_meta[partition] = []
        self.counts[partition] = 0

    def flush(self, final: bool = False) -> None:
        """Close every partial batch (and, when final, release every held fragment); give up
        the inspections idle since INSPECT_IDLE_TIMEOUT_S of capture time."""
        if self.flows.active:
            self.flows.expire(self.last_ts)
        for held in self.fragments.expire(None if final else self.last_ts):
            self._emit(*held, 0, 0)
        for partition, batch in enumerate(self.pending):
            if batch:
                self._close(partition)

    def take(self) -> list[tuple[int, bytes, int]]:
        ready, self.ready = self.ready, []
        return ready
