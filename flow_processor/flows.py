"""Bidirectional flows: keys, deterministic ids, and the per-partition flow table."""

from __future__ import annotations

import hashlib
import itertools
import socket
import struct

import numpy as np

from packet_records import PROTO_NAMES


def flow_id(key: tuple | bytes) -> str:
    """Deterministic digest of a canonical flow key: the same in every process and run. The
    key is (ipver, proto, a, aport, b, bport), or those packed as KEY_FORMAT (a table key)."""
    if not isinstance(key, bytes):
        key = struct.pack(KEY_FORMAT, *key)
    return hashlib.blake2b(key, digest_size=8).hexdigest()


KEY_FORMAT = "!BB16sH16sH"  # a flow table key, and what a flow id digests


def address_text(ipver: int, raw: bytes) -> str:
    """RFC 5952 text of a record address (IPv4 lives in the first 4 bytes). A busy address
    is in many flows: they share one string (the cache is bounded by emptying it)."""
    if ipver == 4:
        raw = raw[:4]
    text = _ADDRESSES.get(raw)
    if text is None:
        if len(_ADDRESSES) >= ADDRESS_CACHE:
            _ADDRESSES.clear()
        text = socket.inet_ntop(socket.AF_INET if ipver == 4 else socket.AF_INET6, raw)
        _ADDRESSES[raw] = text
    return text


ADDRESS_CACHE = 65536
_ADDRESSES: dict[bytes, str] = {}


def endpoints_label(proto: int, src: str, sport: int, dst: str, dport: int, fid: str) -> str:
    """'TCP 192.0.2.1:51000 -> 198.51.100.2:443 (id)': a flow as the top-N panel shows it."""
    name = PROTO_NAMES.get(proto, str(proto))
    return f"{name} {_end(src, sport)} -> {_end(dst, dport)} ({fid})"


def _end(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class Flow:
    """One flow as this process knows it since the flow entered its table."""

    __slots__ = ("_id", "key", "uid", "src", "dst", "sport", "dport", "proto",
                 "first_ns", "last_ns", "opened_ns", "delta_bytes", "delta_packets", "new", "dirty",
                 "slot", "updated", "unstored",
                 "app", "app_guess", "server_name", "fingerprint", "labels_changed",
                 "total_bytes", "series", "series_ready", "qualifies", "held_rows", "ttl_at")

    def __init__(self, key: tuple | bytes, ipver: int, proto: int, src: bytes, sport: int,
                 dst: bytes, dport: int, ts_ns: int):
        self._id: str | None = None  # made when first needed: most of a scan's flows never are
        self.key = key
        self.uid = next(_UIDS)  # this table entry's number: its rows in HeldCells
        # src is the sender of the first frame seen of the flow (kept in Redis with HSETNX)
        self.src, self.dst = address_text(ipver, src), address_text(ipver, dst)
        self.sport, self.dport, self.proto = sport, dport, proto
        self.first_ns = self.last_ns = self.opened_ns = ts_ns
        self.delta_bytes = self.delta_packets = 0
        self.new = True  # meta not yet initialised in Redis by this table entry
        # dirty: in the per-second sums not yet written; updated: has bytes, labels or a first
        # write not yet in its hash (written on a slower cadence, see sink.py)
        self.dirty = self.updated = False
        self.slot = 0  # while dirty: its index in PartitionState.dirty_flows (cell columns)
        # unstored: a one-packet flow past PROBE_FLOWS_STORED at its first write: it gets no
        # keys of its own until it has another packet (its bytes count everywhere else)
        self.unstored = False
        self.app = 0  # packet_records.apps id; 0 = UNKNOWN
        self.app_guess = False
        self.server_name: str | None = None
        self.fingerprint: str | None = None
        self.labels_changed = False  # app, server_name or fingerprint to write
        self.total_bytes = 0  # bytes of this table entry written to its hash
        # Per-flow series (FLOW_SERIES): series is True once this entry's series are written
        # (FLOW_SERIES=all: from the start); series_ready once they were created in Redis;
        # qualifies: chosen by the flush being written; held_rows: its rows in the table's
        # HeldCells (per-second cells written before it qualified, kept until it does).
        self.series = False
        self.series_ready = False
        self.qualifies = False
        self.held_rows = 0
        self.ttl_at = 0.0  # monotonic time the TTL of the flow's keys was last set

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = flow_id(self.key)
        return self._id

    # made when needed, not held: a flow table holds up to MAX_FLOWS flows, most flows never
    # get series (FLOW_SERIES=top), and the label is needed once a flush that writes the flow
    @property
    def label(self) -> str:
        return endpoints_label(self.proto, self.src, self.sport, self.dst, self.dport, self.id)

    @property
    def bps_key(self) -> str:
        return f"ts:flow:{self.id}:bps"

    @property
    def pps_key(self) -> str:
        return f"ts:flow:{self.id}:pps"


_UIDS = itertools.count(1)


class HeldCells:
    """The per-second cells of a table's flows that have no series yet (FLOW_SERIES=top),
    written to the aggregate series already and kept for the flow's own series should it
    qualify: rows of (flow uid, second, bytes, packets) held column-wise, a flush's at a time.
    A second a flow had in two flushes has two rows (take() sums them). Rows of flows that
    left the table are dropped once they are half of all."""

    def __init__(self):
        self.columns: list[tuple[np.ndarray, ...]] = []  # (uid, sec, bytes, packets) chunks
        self.rows = 0
        self.gone: list[int] = []  # uids of flows that left the table with rows here
        self.gone_rows = 0

    def add(self, uid: np.ndarray, sec: np.ndarray, nbytes: np.ndarray,
            packets: np.ndarray) -> None:
        if len(uid):
            self.columns.append((uid, sec, nbytes, packets))
            self.rows += len(uid)
            if len(self.columns) > 64:  # (flushes where nothing was taken or dropped)
                self._merged()

    def _merged(self) -> tuple[np.ndarray, ...]:
        if len(self.columns) != 1:
            empty = np.empty(0, np.int64)
            self.columns = [tuple(np.concatenate(c) for c in zip(*self.columns))
                            if self.columns else (empty,) * 4]
        return self.columns[0]

    def _rows_of(self, uids: list[int]) -> np.ndarray:
        """A mask over the merged rows: those of these flows."""
        return np.isin(self._merged()[0], np.array(uids, dtype=np.int64))

    def cells(self, uids: list[int]) -> dict[int, list[tuple[int, int, int]]]:
        """uid -> [(second, bytes, packets)] held for these flows, by second, one a second."""
        return self._cells(uids)[1]

    def take(self, uids: list[int]) -> dict[int, list[tuple[int, int, int]]]:
        """cells(uids), removed from here."""
        mine, cells = self._cells(uids)
        if mine is not None:
            self._keep(~mine)
        return cells

    def _cells(self, uids: list[int]) -> tuple[np.ndarray | None, dict]:
        if not self.rows or not uids:
            return None, {}
        mine = self._rows_of(uids)
        uid, sec, nbytes, packets = (column[mine] for column in self._merged())
        cells: dict[int, list[tuple[int, int, int]]] = {}
        for u, s, b, p in zip(*sum_by_key(uid, sec, nbytes, packets)):
            cells.setdefault(u, []).append((s, b, p))
        return mine, cells

    def seconds(self, uids: list[int]) -> dict[int, set[int]]:
        """uid -> the seconds held for that flow."""
        held: dict[int, set[int]] = {u: set() for u in uids}
        if self.rows and uids:
            mine = self._rows_of(uids)
            uid, sec = (column[mine] for column in self._merged()[:2])
            for u, s in zip(uid.tolist(), sec.tolist()):
                held[u].add(s)
        return held

    def forget(self, flows: list) -> None:
        """These flows left the table: their rows are of no use any more."""
        for f in flows:
            if f.held_rows:
                self.gone.append(f.uid)
                self.gone_rows += f.held_rows
                f.held_rows = 0
        if self.gone_rows and 2 * self.gone_rows >= self.rows:
            self._keep(~self._rows_of(self.gone))
            self.gone, self.gone_rows = [], 0

    def _keep(self, mask: np.ndarray) -> None:
        self.columns = [tuple(column[mask] for column in self._merged())]
        self.rows = int(np.count_nonzero(mask))


def sum_by_key(major: np.ndarray, minor: np.ndarray, nbytes: np.ndarray, packets: np.ndarray,
               ) -> tuple[list[int], list[int], list[int], list[int]]:
    """Rows summed per (major, minor), in the order of major, then minor; as lists of ints."""
    if not len(major):
        return [], [], [], []
    order = np.lexsort((minor, major))
    major, minor = major[order], minor[order]
    start = np.empty(len(major), dtype=bool)
    start[0] = True
    start[1:] = (major[1:] != major[:-1]) | (minor[1:] != minor[:-1])
    starts = np.flatnonzero(start)
    return (major[starts].tolist(), minor[starts].tolist(),
            np.add.reduceat(nbytes[order], starts).tolist(),
            np.add.reduceat(packets[order], starts).tolist())


class FlowTable:
    """Flows of one partition, with idle and active timeouts on capture time and a size bound
    (the process's bound is shared between its partitions' tables: see evict_oldest)."""

    def __init__(self, idle_ns: int, active_ns: int, max_flows: int):
        self.flows: dict[bytes, Flow] = {}  # by key (KEY_FORMAT)
        self.held = HeldCells()
        self.idle_ns, self.active_ns, self.max_flows = idle_ns, active_ns, max_flows

    def __len__(self) -> int:
        return len(self.flows)

    def expire(self, now_ns: int) -> list[Flow]:
        """Remove and return flows idle or open too long at capture time now_ns, then the
        oldest entries when the table is over its bound (dicts keep insertion order)."""
        gone = [f for f in self.flows.values()
                if not (f.dirty or f.updated) and (now_ns - f.last_ns > self.idle_ns
                                    or now_ns - f.opened_ns > self.active_ns)]
        for f in gone:
            del self.flows[f.key]
        if len(self.flows) > self.max_flows:
            for key in list(self.flows)[: len(self.flows) - self.max_flows]:
                flow = self.flows[key]
                if not (flow.dirty or flow.updated):
                    gone.append(self.flows.pop(key))
        self.held.forget(gone)
        return gone

    def evict_oldest(self, count: int) -> list[Flow]:
        """Remove and return up to `count` of the oldest entries that are not dirty (the
        processor's MAX_FLOWS bound, shared between the tables of its partitions). Flows
        without series go first: under a scan the oldest entries are often the long-lived
        flows an operator follows, and one re-entering the table would start its per-flow
        decision again."""
        chosen: dict[bytes, Flow] = {}
        for spare_series in (True, False):
            if len(chosen) >= count:
                break
            for key, flow in self.flows.items():  # oldest first (insertion order)
                if (not (flow.dirty or flow.updated) and not (spare_series and flow.series)
                        and key not in chosen):
                    chosen[key] = flow
                    if len(chosen) >= count:
                        break
        for key in chosen:
            del self.flows[key]
        gone = list(chosen.values())
        self.held.forget(gone)
        return gone


def evict_over_bound(tables: list[FlowTable], max_flows: int) -> list[Flow]:
    """Keep the flows of all these tables (one process) within max_flows: each table gives
    up its oldest clean entries in proportion to its size. Returns the flows removed."""
    total = sum(len(t) for t in tables)
    excess = total - max_flows
    gone: list[Flow] = []
    if excess <= 0:
        return gone
    for table in sorted(tables, key=len, reverse=True):
        share = -(-excess * len(table) // total)  # ceiling
        gone += table.evict_oldest(min(share, excess - len(gone)))
        if len(gone) >= excess:
            break
    return gone
