"""Bidirectional flows: keys, deterministic ids, and the per-partition flow table."""

from __future__ import annotations

import hashlib
import socket
import struct

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
    def end(addr: str, port: int) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

    name = PROTO_NAMES.get(proto, str(proto))
    return f"{name} {end(src, sport)} -> {end(dst, dport)} ({fid})"


class Flow:
    """One flow as this process knows it since the flow entered its table."""

    __slots__ = ("_id", "key", "src", "dst", "sport", "dport", "proto",
                 "first_ns", "last_ns", "opened_ns", "delta_bytes", "delta_packets", "new", "dirty",
                 "updated", "unstored",
                 "app", "app_guess", "server_name", "fingerprint", "labels_changed",
                 "total_bytes", "series", "series_ready", "qualifies", "held", "ttl_at")

    def __init__(self, key: tuple | bytes, ipver: int, proto: int, src: bytes, sport: int,
                 dst: bytes, dport: int, ts_ns: int):
        self._id: str | None = None  # made when first needed: most of a scan's flows never are
        self.key = key
        # src is the sender of the first frame seen of the flow (kept in Redis with HSETNX)
        self.src, self.dst = address_text(ipver, src), address_text(ipver, dst)
        self.sport, self.dport, self.proto = sport, dport, proto
        self.first_ns = self.last_ns = self.opened_ns = ts_ns
        self.delta_bytes = self.delta_packets = 0
        self.new = True  # meta not yet initialised in Redis by this table entry
        # dirty: in the per-second sums not yet written; updated: has bytes, labels or a first
        # write not yet in its hash (written on a slower cadence, see sink.py)
        self.dirty = self.updated = False
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
        # qualifies: chosen by the flush being written; held: per-second cells written before
        # the flow qualified, kept here until it does (aggregate.held_cells: None, one
        # (second, bytes, packets) tuple, or {second: [bytes, packets]}).
        self.series = False
        self.series_ready = False
        self.qualifies = False
        self.held: tuple[int, int, int] | dict[int, list[int]] | None = None
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


class FlowTable:
    """Flows of one partition, with idle and active timeouts on capture time and a size bound
    (the process's bound is shared between its partitions' tables: see evict_oldest)."""

    def __init__(self, idle_ns: int, active_ns: int, max_flows: int):
        self.flows: dict[bytes, Flow] = {}  # by key (KEY_FORMAT)
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
        return list(chosen.values())


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
