"""Per-flow state of the capture service, found by the direction-independent 5-tuple: the
flow's Kafka partition (computed once per flow, not per packet) and, until it is done, the
flow's L7 inspector. The cache is bounded (oldest flows leave first); a flow that left and
comes back is inspected afresh.

Memory is bounded three ways:

* entries: at most max_flows (262144). An entry (its key: 37 bytes as flow_keys() lays them
  out, the CachedFlow and the objects it holds, its share of the dict and OrderedDict) takes
  about 375 bytes; an unfinished inspector with no reassembly state yet (a flow that sent no
  payload) adds about 200 (tracemalloc, bench/bench_inspect_memory.py): at most about 150 MB
  at the bound, 100 MB once the inspections have ended.
* bytes of inspection state: an inspector that holds reassembly buffers or QUIC state (see
  FlowInspector.held_bytes()) is charged against memory_bytes (INSPECT_MEMORY_MB) for all
  flows together. Over the budget, the inspections that have waited longest for their next
  payload are given up (FlowInspector.budget_evictions counts them) until it holds again.
* time: an unfinished inspection that got no payload for idle_timeout_ns of capture time
  (INSPECT_IDLE_TIMEOUT_S) is given up too (FlowInspector.idle_expired).

The FlowIndex (the labels found with numpy for RecordBatcher.add_batch) adds 80 bytes a flow:
5 MB up to 65,536 flows, 21 MB at the bound.

A flow whose inspection is given up keeps the label it had (a port guess, UNKNOWN, or a label
whose name never completed) and is not inspected again while it stays in the cache. The
bookkeeping happens only for packets with payload fed to an unfinished inspector: done flows
(nearly every packet) pay nothing for it.

What a record takes from its flow (partition, app, app flags, and whether the flow is still
inspected) is kept as one int, CachedFlow.label, so that RecordBatcher.add_batch reads a whole
batch's at once (FlowCache.find_labels, numpy; FlowCache.labels gives the same, one dict
look-up per frame) and packs the records with numpy.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable
from itertools import islice

import numpy as np

from capture.batch_decode import FLOW_KEY_DTYPE, DecodedBatch, flow_keys
from capture.inspect import quic
from capture.inspect.flow import FlowInspector
from packet_records import APP_GUESS, META_FINGERPRINT, META_SERVER_NAME, partition_for
from packet_records.apps import APP_ID

INSPECTED_PROTOCOLS = (6, 17)
_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
# a flow's key: protocol, then the lower (address, port) and the higher, as bytes: one row of
# capture.batch_decode.flow_keys() (RecordBatcher.add_batch finds a batch's flows with those)
_KEY = struct.Struct(">B16sH16sH").pack
assert struct.calcsize(">B16sH16sH") == FLOW_KEY_DTYPE.itemsize
INSPECTED = 1 << 48  # in CachedFlow.label: the flow is still inspected (its label may change)
NOT_CACHED = -1  # FlowCache.labels() of a flow not in the cache (INSPECTED set as well)
_NO_SLOT, _GONE = -1, -2  # CachedFlow.slot: none yet, evicted from the cache
INDEX_MIN = 65536  # a FlowIndex's capacity at first (unless max_flows is smaller)


def label_of(partition: int, app: int, app_flags: int, inspected: bool = False) -> int:
    """What a record takes from its flow, as one int (CachedFlow.label)."""
    return partition | app << 32 | app_flags << 40 | (INSPECTED if inspected else 0)


def payload_of(frame: bytes, decoded: tuple) -> tuple[int, int] | None:
    """(start, end) in the frame of the L4 payload of a TCP or UDP packet (decode_frame()
    tuple), trimmed to the UDP length; None when there is none (or no L4 header)."""
    l4_off, end = decoded[9], decoded[10]
    if l4_off < 0:
        return None
    if decoded[1] == 6:
        if len(frame) < l4_off + 13:
            return None
        start = l4_off + (frame[l4_off + 12] >> 4) * 4
    else:
        start = l4_off + 8
        udp_len = _U16(frame, l4_off + 4)[0] if len(frame) >= l4_off + 6 else 0
        if udp_len >= 8 and l4_off + udp_len < end:
            end = l4_off + udp_len
    return (start, end) if end > start else None


# QUIC versions whose long-header Initials FlowInspector reads (inspect_ahead() looks for them)
_QUIC_VERSIONS = np.array(sorted(quic.known_versions()), dtype=np.uint32)


def inspect_ahead(batch: DecodedBatch, buf: bytes, starts: np.ndarray,
                  lengths: np.ndarray) -> dict[int, tuple]:
    """FlowInspector.first_payload() of the frames (buf[starts[i]:starts[i] + lengths[i]],
    decoded in `batch`) that may be a flow's first payload and cost the most to inspect: TLS
    ClientHellos and QUIC Initials (key derivation, decryption), the first one of each flow in
    the batch; by frame index, those done after it. A reader process works these out while
    the capture process does the rest: RecordBatcher.add_batch hands them to
    FlowCache.inspect(), which uses one only where that frame is the client's first payload
    to the flow's inspector, so the labels are those of inspecting it there."""
    u8 = np.frombuffer(buf, np.uint8)
    l4, proto = batch.l4_off, batch.ip_proto
    tcp = (proto == 6) & (l4 >= 0) & (l4 + 20 <= lengths)
    udp = (proto == 17) & (l4 >= 0) & (l4 + 8 <= lengths)
    if not len(u8) or not (tcp | udp).any():
        return {}
    # (every byte read is inside its frame; 0 stands for the others: read, then not used)
    data_offset = u8[np.where(tcp, starts + l4 + 12, 0)] >> 4
    offset = np.where(tcp, l4 + data_offset.astype(np.int64) * 4, l4 + 8)
    room = np.minimum(batch.ip_end, lengths) - offset  # payload bytes (about: payload_of)
    some = (tcp | udp) & (room >= 6)
    at = np.where(some, starts + offset, 0)
    first, sixth = u8[at], u8[np.where(some, at + 5, 0)]
    hello = tcp & some & (first == 0x16) & (sixth == 1)
    version = np.zeros(len(at), dtype=np.uint32)
    for k in (1, 2, 3, 4):
        version |= u8[np.where(some, at + k, 0)].astype(np.uint32) << (32 - 8 * k)
    initial = udp & some & ((first & 0xC0) == 0xC0) & np.isin(version, _QUIC_VERSIONS)
    rows = np.flatnonzero(hello | initial)
    if not len(rows):
        return {}
    keys = batch.keys if batch.keys is not None else flow_keys(batch)
    _, firsts = np.unique(keys.view(f"V{keys.dtype.itemsize}")[rows], return_index=True)
    rows = rows[np.sort(firsts)]
    learned = {}
    for row, decoded, start, length in zip(rows.tolist(), batch.tuples(rows),
                                           starts[rows].tolist(), lengths[rows].tolist()):
        frame = buf[start:start + length]
        span = payload_of(frame, decoded)
        if span is not None:
            got = FlowInspector.first_payload(decoded[1], decoded[4], decoded[5],
                                              frame[span[0]:span[1]])
            if got is not None:
                learned[row] = got
    return learned


class CachedFlow:
    __slots__ = ("partition", "inspector", "client_addr", "client_port", "app", "app_flags",
                 "sent_name", "sent_fp", "held", "last_ns", "label", "slot",
                 "index_labels")

    def __init__(self, partition: int, inspector: FlowInspector | None, client_addr: bytes,
                 client_port: int):
        self.partition = partition
        self.inspector = inspector  # None once done (or for flows that are not inspected)
        self.client_addr = client_addr  # the flow's first sender
        self.client_port = client_port
        self.app = APP_ID.get(inspector.app, 0) if inspector else 0
        self.app_flags = APP_GUESS if inspector and inspector.guess else 0
        self.sent_name = self.sent_fp = None
        self.held = 0  # bytes of inspection state charged to the budget (FlowCache.held_bytes)
        self.last_ns = 0  # capture time of the last payload fed to the unfinished inspector
        self.label = 0
        # its slot in the cache's FlowIndex (set there), and that index's labels
        self.slot: int = _NO_SLOT
        self.index_labels: np.ndarray | None = None
        self.relabel()

    def relabel(self) -> None:
        """label: partition, app, app_flags and whether it is inspected, as label_of() packs
        them (RecordBatcher.add_batch reads them all at once); set whenever one changes."""
        self.label = label_of(self.partition, self.app, self.app_flags,
                              self.inspector is not None)
        if self.slot >= 0:
            self.index_labels[self.slot] = self.label

    def settle(self) -> None:
        """The inspection is over (done or given up): the flow's label stays as it is."""
        self.inspector = None
        self.relabel()


_NOT_CACHED = CachedFlow(0, None, b"", 0)  # FlowCache.labels() of a flow not in the cache
_NOT_CACHED.label = NOT_CACHED

_KEY_SIZE = FLOW_KEY_DTYPE.itemsize
# 8-byte words that cover a key (the last one overlaps the one before)
_OFFSETS = (0, 8, 16, 24, _KEY_SIZE - 8)
# odd 64-bit multipliers of the index's hash, one per word
_MIX = [np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                               0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63)]


def _words(keys: np.ndarray) -> list[np.ndarray]:
    """The words of every row of keys ((n, 37) uint8, C-contiguous), one uint64 column (a
    view, no copy) per word: numpy works faster along columns than along short rows."""
    return [np.ndarray((len(keys),), np.uint64, keys, offset, (_KEY_SIZE,))
            for offset in _OFFSETS]


def _home(words: list[np.ndarray], bits: int) -> np.ndarray:
    """The place in a table of 2**bits of the keys of _words(): the top bits of a
    multiplicative hash."""
    h = words[0] * _MIX[0]
    for word, mix in zip(words[1:], _MIX[1:]):
        h += word * mix
    h *= _MIX[0]
    return (h >> np.uint64(64 - bits)).astype(np.intp)


class FlowIndex:
    """The cached flows' labels, found for a whole batch of keys at once with numpy
    (FlowCache.find_labels), as FlowCache.labels() finds them one by one in the dict: a dict
    look-up in a cache of many flows costs cache misses one after the other (0.4 us a frame
    at 65,000 flows), numpy's gathers overlap theirs.

    Each flow entered has a slot (taken in turn, modulo the capacity, which is at least the
    number of flows cached: flows in the cache never share one) that holds its key and label;
    CachedFlow.relabel() writes the label, an evicted flow's becomes NOT_CACHED. A table, 8
    places a slot, holds at the key's place (its hash) the slot of the last flow entered
    there: a key whose place holds another key's slot (a collision, or an evicted flow's
    key) is not found here, the dict is asked (a few percent of the keys).
    Memory: 48 bytes a slot, 32 for its table places: 80 bytes a flow."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys = np.zeros((len(_OFFSETS), capacity), dtype=np.uint64)  # by word
        self.labels = np.full(capacity, NOT_CACHED, dtype=np.int64)
        self.bits = (8 * capacity - 1).bit_length()
        self.table = np.full(1 << self.bits, -1, dtype=np.int32)  # a slot, -1: none
        self.next = 0  # the slot of the next flow, modulo capacity

    def enter(self, keys: list[bytes], flows: list[CachedFlow]) -> None:
        """Give every flow (all in the cache, in the order they entered it) its slot and
        its place in the table."""
        n = len(flows)
        slots = np.arange(self.next, self.next + n) % self.capacity
        self.next = (self.next + n) % self.capacity
        words = _words(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(n, _KEY_SIZE))
        for column, word in zip(self.keys, words):
            column[slots] = word
        self.labels[slots] = [flow.label for flow in flows]
        for flow, slot in zip(flows, slots.tolist()):
            flow.slot, flow.index_labels = slot, self.labels
        self.table[_home(words, self.bits)] = slots  # (of flows with the same place, one)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The label of every row of keys ((n, 37) uint8, C-contiguous), NOT_CACHED where
        none is cached; and the rows whose place holds another key (not found: ask the
        dict)."""
        words = _words(keys)
        slots = self.table[_home(words, self.bits)]
        taken = slots >= 0
        slots = np.maximum(slots, 0)
        same = words[0] == self.keys[0][slots]
        for word, column in zip(words[1:], self.keys[1:]):
            same &= word == column[slots]
        labels = np.where(same, self.labels[slots], NOT_CACHED)
        return labels, np.flatnonzero(taken & ~same)


class FlowCache:
    def __init__(self, partitions: int, inspect: bool, max_flows: int = 262144,
                 memory_bytes: int = 64 << 20, idle_timeout_ns: int = 30_000_000_000):
        self.partitions = partitions
        self.inspect_payloads = inspect
        self.flows: OrderedDict[bytes, CachedFlow] = OrderedDict()  # _KEY -> flow
        self.max_flows = max_flows
        self.memory_bytes = memory_bytes
        self.idle_timeout_ns = idle_timeout_ns
        # flows whose unfinished inspector holds state (held > 0), least recently fed first
        self.active: OrderedDict[CachedFlow, None] = OrderedDict()
        self.held_bytes = 0  # sum of their held
        # the labels by key for find_labels(); the flows (and keys) entered since, waiting for
        # their slots (two lists: no tuple a flow)
        self.index: FlowIndex | None = None
        self.entering: list[CachedFlow] = []
        self.entering_keys: list[bytes] = []

    def get(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> CachedFlow:
        if src < dst or (src == dst and sport <= dport):
            key = _KEY(proto, src, sport, dst, dport)
        else:
            key = _KEY(proto, dst, dport, src, sport)
        flow = self.flows.get(key)
        if flow is None:
            inspector = None
            if self.inspect_payloads and proto in INSPECTED_PROTOCOLS:
                inspector = FlowInspector(proto, sport, dport)
            partition = partition_for(src, dst, sport, dport, proto, self.partitions)
            flow = self.flows[key] = CachedFlow(partition, inspector, src, sport)
            if self.index is not None:
                if len(self.entering) >= self.max_flows:
                    # find_labels() has not come for as many new flows as the cache holds
                    # (light live traffic: small batches go frame by frame): the next one
                    # rebuilds the index instead, and no flow the cache has evicted (with
                    # its inspector) stays referenced here
                    self.index, self.entering, self.entering_keys = None, [], []
                else:
                    self.entering.append(flow)
                    self.entering_keys.append(key)
            if len(self.flows) > self.max_flows:
                _, old = self.flows.popitem(last=False)
                if old.held:
                    self._release(old)
                if old.slot >= 0:  # its key no longer finds a label
                    old.index_labels[old.slot] = NOT_CACHED
                old.slot = _GONE
        return flow

    def labels(self, keys: Iterable[bytes]) -> list[int]:
        """The label of the flow of every key (flow_keys() rows as bytes), NOT_CACHED where
        there is none: RecordBatcher.add_batch packs the records of the frames of flows that
        are not inspected by itself. Nothing enters the cache."""
        find = self.flows.get
        return [find(key, _NOT_CACHED).label for key in keys]

    def find_labels(self, keys: np.ndarray) -> np.ndarray:
        """labels() of every row of keys (flow_keys() as (n, 37) uint8, C-contiguous), as an
        int64 array, found with numpy (FlowIndex) and, for the few it cannot tell, the
        dict. Nothing enters the cache."""
        index = self.index
        if index is None or len(self.flows) > index.capacity:
            index = self._rebuild()
        elif self.entering:
            # Flows leave the cache oldest first, so the cached ones are the last len(flows)
            # to have entered: of those entered since, the last ones.
            live = min(len(self.entering), len(self.flows))
            if live:
                index.enter(self.entering_keys[-live:], self.entering[-live:])
            self.entering, self.entering_keys = [], []
        labels, others = index.find(keys)
        if len(others):
            find = self.flows.get
            rows = np.ascontiguousarray(keys[others]).view(f"V{_KEY_SIZE}").ravel().tolist()
            labels[others] = [find(key, _NOT_CACHED).label for key in rows]
        return labels

    def _rebuild(self) -> FlowIndex:
        """A new FlowIndex of every cached flow: at first use, and when the flows outgrow it
        (its capacity grows fourfold, up to max_flows: 5 MB at first, 21 MB at the default
        bound)."""
        self.entering, self.entering_keys = [], []
        n = len(self.flows)
        self.index = index = FlowIndex(max(n, min(max(INDEX_MIN, 4 * n), self.max_flows)))
        if self.flows:
            index.enter(list(self.flows), list(self.flows.values()))
        return index

    def survive(self, keys: Iterable[bytes], inserts: int) -> bool:
        """Whether the flows of these keys that are cached now still are after at most
        `inserts` more flows enter: an insertion past max_flows evicts the oldest entry, and
        get() does not reorder, so the entries at risk are the first ones."""
        room = self.max_flows - len(self.flows)
        if inserts <= room:
            return True
        evictions = inserts - room
        if evictions >= len(self.flows):
            return False  # the new flows themselves could go
        return set(islice(self.flows, evictions)).isdisjoint(keys)

    def _release(self, flow: CachedFlow) -> None:
        """Forget the flow's inspection state (its inspector goes with it)."""
        del self.active[flow]
        self.held_bytes -= flow.held
        flow.held = flow.last_ns = 0  # small ints: shared objects, nothing left per flow
        flow.settle()

    def _give_up(self, budget: bool) -> None:
        """Give up the inspection that waited longest for a payload (the label stays)."""
        flow = next(iter(self.active))
        self._release(flow)
        if budget:
            FlowInspector.budget_evictions += 1
        else:
            FlowInspector.idle_expired += 1

    def expire(self, now_ns: int) -> None:
        """Give up the unfinished inspections that got no payload for idle_timeout_ns."""
        active, limit = self.active, now_ns - self.idle_timeout_ns
        while active and next(iter(active)).last_ns < limit:
            self._give_up(False)

    def _charge(self, flow: CachedFlow, inspector: FlowInspector, ts_ns: int) -> None:
        """Bookkeeping after a payload fed to an unfinished inspector."""
        held = inspector.held_bytes()
        starts = not flow.held
        if starts:
            if not held:
                return  # no state beyond the inspector itself (most UDP flows)
            self.active[flow] = None
        else:
            self.active.move_to_end(flow)
        self.held_bytes += held - flow.held
        flow.held = held
        flow.last_ns = ts_ns
        if starts:
            self.expire(ts_ns)  # amortised: one look at the oldest per flow that starts holding
        while self.held_bytes > self.memory_bytes:
            self._give_up(True)

    def inspect(self, flow: CachedFlow, frame: bytes, decoded: tuple, ts_ns: int = 0,
                learned: tuple | None = None) -> list | None:
        """Feed one packet's payload to the flow's inspector; return new meta entries as
        (kind, bytes), or None. The bytes are those taken from the packet (the JA4, made here,
        as ASCII): RecordBatcher turns each into text with names.safe_name(). `learned`: what
        FlowInspector.first_payload() learned of this packet's payload, when known (used if
        it is the client's first payload to the inspector)."""
        span = payload_of(frame, decoded)
        if span is None:
            return None  # no payload (a TCP handshake or ACK): the common case
        inspector = flow.inspector
        from_client = decoded[4] == flow.client_port and decoded[2] == flow.client_addr
        if learned is not None and from_client and inspector.fresh:
            changed = inspector.take_first(learned)
        else:
            start, end = span
            seq = _U32(frame, decoded[9] + 4)[0] if decoded[1] == 6 else None
            changed = inspector.feed(frame[start:end], from_client, seq)
        if inspector.done:
            flow.inspector = None  # its label stays on the flow; its buffers go
            if flow.held:
                self._release(flow)
        else:
            self._charge(flow, inspector, ts_ns)  # (which may give this inspection up)
        if changed:
            flow.app = APP_ID.get(inspector.app, 0)
            flow.app_flags = APP_GUESS if inspector.guess else 0
        if changed or flow.inspector is None:
            flow.relabel()  # (the label it leaves with, once done)
        if not changed:
            return None
        meta = []
        raw_name = inspector.raw_name
        if raw_name and raw_name != flow.sent_name:
            flow.sent_name = raw_name
            meta.append((META_SERVER_NAME, raw_name))
        fingerprint = inspector.fingerprint
        if fingerprint and fingerprint != flow.sent_fp:
            flow.sent_fp = fingerprint
            meta.append((META_FINGERPRINT, fingerprint.encode("ascii")))
        return meta or None
