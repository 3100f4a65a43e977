"""Per-flow state of the capture service, found by the direction-independent 5-tuple: the
flow's Kafka partition (computed once per flow, not per packet) and, until it is done, the
flow's L7 inspector. The cache is bounded (oldest flows leave first); a flow that left and
comes back is inspected afresh.
"""

from __future__ import annotations

from collections import OrderedDict

from capture.inspect.flow import FlowInspector
from packet_records import APP_GUESS, META_FINGERPRINT, META_SERVER_NAME, partition_for
from packet_records.apps import APP_ID

INSPECTED_PROTOCOLS = (6, 17)


class CachedFlow:
    __slots__ = ("partition", "inspector", "client", "app", "app_flags", "sent_name", "sent_fp")

    def __init__(self, partition: int, inspector: FlowInspector | None, client: tuple):
        self.partition = partition
        self.inspector = inspector  # None once done (or for flows that are not inspected)
        self.client = client  # (address, port) of the flow's first sender
        self.app = APP_ID.get(inspector.app, 0) if inspector else 0
        self.app_flags = APP_GUESS if inspector and inspector.guess else 0
        self.sent_name = self.sent_fp = None


class FlowCache:
    def __init__(self, partitions: int, inspect: bool, max_flows: int = 262144):
        self.partitions = partitions
        self.inspect_payloads = inspect
        self.flows: OrderedDict[tuple, CachedFlow] = OrderedDict()
        self.max_flows = max_flows

    def get(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> CachedFlow:
        if src < dst or (src == dst and sport <= dport):
            key = (proto, src, sport, dst, dport)
        else:
            key = (proto, dst, dport, src, sport)
        flow = self.flows.get(key)
        if flow is None:
            inspector = None
            if self.inspect_payloads and proto in INSPECTED_PROTOCOLS:
                inspector = FlowInspector(proto, sport, dport)
            partition = partition_for(src, dst, sport, dport, proto, self.partitions)
            flow = self.flows[key] = CachedFlow(partition, inspector, (src, sport))
            if len(self.flows) > self.max_flows:
                self.flows.popitem(last=False)
        return flow

    @staticmethod
    def inspect(flow: CachedFlow, frame: bytes, decoded: tuple) -> list | None:
        """Feed one packet's payload to the flow's inspector; return new meta entries as
        (kind, text), or None."""
        proto, src, sport, l4_off, ip_end = decoded[1], decoded[2], decoded[4], decoded[9], \
            decoded[10]
        if proto == 6:
            if len(frame) < l4_off + 13:
                return None
            start = l4_off + (frame[l4_off + 12] >> 4) * 4
            seq = int.from_bytes(frame[l4_off + 4:l4_off + 8], "big")
            end = ip_end
        else:
            start, seq = l4_off + 8, None
            udp_len = int.from_bytes(frame[l4_off + 4:l4_off + 6], "big")
            end = min(ip_end, l4_off + udp_len) if udp_len >= 8 else ip_end
        if end <= start:
            return None  # no payload (a TCP handshake or ACK)
        inspector = flow.inspector
        changed = inspector.feed(frame[start:end], (src, sport) == flow.client, seq)
        if inspector.done:
            flow.inspector = None  # its label stays on the flow; its buffers go
        if not changed:
            return None
        flow.app = APP_ID.get(inspector.app, 0)
        flow.app_flags = APP_GUESS if inspector.guess else 0
        meta = []
        if inspector.server_name and inspector.server_name != flow.sent_name:
            flow.sent_name = inspector.server_name
            meta.append((META_SERVER_NAME, inspector.server_name))
        if inspector.fingerprint and inspector.fingerprint != flow.sent_fp:
            flow.sent_fp = inspector.fingerprint
            meta.append((META_FINGERPRINT, inspector.fingerprint))
        return meta or None
