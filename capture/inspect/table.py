"""Which flows are being inspected, and what each record learns from it.

One FlowInspector per TCP/UDP flow, found by the direction-independent 5-tuple; once an
inspector is done, the flow keeps only its label. The table is bounded (oldest flows leave
first); a flow that left and comes back is inspected afresh.
"""

from __future__ import annotations

from collections import OrderedDict

from capture.inspect.flow import FlowInspector
from packet_records import APP_GUESS, META_FINGERPRINT, META_SERVER_NAME
from packet_records.apps import APP_ID

INSPECTED_PROTOCOLS = (6, 17)


class _Tracked:
    __slots__ = ("inspector", "client", "app_id", "app_flags", "done", "sent_name", "sent_fp")

    def __init__(self, inspector: FlowInspector, client: tuple):
        self.inspector = inspector
        self.client = client  # (address, port) of the flow's first sender
        self.app_id = APP_ID.get(inspector.app, 0)
        self.app_flags = APP_GUESS if inspector.guess else 0
        self.done = inspector.done
        self.sent_name = self.sent_fp = None


class InspectionTable:
    def __init__(self, max_flows: int = 262144):
        self.flows: OrderedDict[tuple, _Tracked] = OrderedDict()
        self.max_flows = max_flows

    def inspect(self, frame: bytes, decoded: tuple) -> tuple[int, int, list | None]:
        """(app id, app flags, new meta entries as (kind, text) or None) for one packet."""
        _v, proto, src, dst, sport, dport, _tf, _flags, _frag, l4_off, ip_end = decoded
        if (src, sport) <= (dst, dport):
            key = (proto, src, sport, dst, dport)
        else:
            key = (proto, dst, dport, src, sport)
        entry = self.flows.get(key)
        if entry is None:
            entry = _Tracked(FlowInspector(proto, sport, dport), (src, sport))
            self.flows[key] = entry
            if len(self.flows) > self.max_flows:
                self.flows.popitem(last=False)
        if entry.done:
            return entry.app_id, entry.app_flags, None
        if proto == 6:
            if len(frame) < l4_off + 13:
                return entry.app_id, entry.app_flags, None
            start = l4_off + (frame[l4_off + 12] >> 4) * 4
            seq = int.from_bytes(frame[l4_off + 4:l4_off + 8], "big")
            end = ip_end
        else:
            start, seq = l4_off + 8, None
            udp_len = int.from_bytes(frame[l4_off + 4:l4_off + 6], "big")
            end = min(ip_end, l4_off + udp_len) if udp_len >= 8 else ip_end
        if end <= start:
            return entry.app_id, entry.app_flags, None
        inspector = entry.inspector
        changed = inspector.feed(frame[start:end], (src, sport) == entry.client, seq)
        entry.done = inspector.done
        if not changed:
            return entry.app_id, entry.app_flags, None
        entry.app_id = APP_ID.get(inspector.app, 0)
        entry.app_flags = APP_GUESS if inspector.guess else 0
        meta = []
        if inspector.server_name and inspector.server_name != entry.sent_name:
            entry.sent_name = inspector.server_name
            meta.append((META_SERVER_NAME, inspector.server_name))
        if inspector.fingerprint and inspector.fingerprint != entry.sent_fp:
            entry.sent_fp = inspector.fingerprint
            meta.append((META_FINGERPRINT, inspector.fingerprint))
        return entry.app_id, entry.app_flags, meta or None
