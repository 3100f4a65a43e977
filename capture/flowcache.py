"""Per-flow state of the capture service, found by the direction-independent 5-tuple: the
flow's Kafka partition (computed once per flow, not per packet) and, until it is done, the
flow's L7 inspector. The cache is bounded (oldest flows leave first); a flow that left and
comes back is inspected afresh.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from capture.inspect.flow import FlowInspector
from packet_records import APP_GUESS, META_FINGERPRINT, META_SERVER_NAME, partition_for
from packet_records.apps import APP_ID

INSPECTED_PROTOCOLS = (6, 17)
_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from


class CachedFlow:
    __slots__ = ("partition", "inspector", "client_addr", "client_port", "app", "app_flags",
                 "sent_name", "sent_fp")

    def __init__(self, partition: int, inspector: FlowInspector | None, client_addr: bytes,
                 client_port: int):
        self.partition = partition
        self.inspector = inspector  # None once done (or for flows that are not inspected)
        self.client_addr = client_addr  # the flow's first sender
        self.client_port = client_port
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
            flow = self.flows[key] = CachedFlow(partition, inspector, src, sport)
            if len(self.flows) > self.max_flows:
                self.flows.popitem(last=False)
        return flow

    @staticmethod
    def inspect(flow: CachedFlow, frame: bytes, decoded: tuple) -> list | None:
        """Feed one packet's payload to the flow's inspector; return new meta entries as
        (kind, bytes), or None. The bytes are those taken from the packet (the JA4, made here,
        as ASCII): RecordBatcher turns each into text with names.safe_name()."""
        l4_off, end = decoded[9], decoded[10]
        if decoded[1] == 6:
            if len(frame) < l4_off + 13:
                return None
            start = l4_off + (frame[l4_off + 12] >> 4) * 4
            if end <= start:
                return None  # no payload (a TCP handshake or ACK): the common case
            seq = _U32(frame, l4_off + 4)[0]
        else:
            start, seq = l4_off + 8, None
            udp_len = _U16(frame, l4_off + 4)[0] if len(frame) >= l4_off + 6 else 0
            if udp_len >= 8 and l4_off + udp_len < end:
                end = l4_off + udp_len
            if end <= start:
                return None
        inspector = flow.inspector
        from_client = decoded[4] == flow.client_port and decoded[2] == flow.client_addr
        changed = inspector.feed(frame[start:end], from_client, seq)
        if inspector.done:
            flow.inspector = None  # its label stays on the flow; its buffers go
        if not changed:
            return None
        flow.app = APP_ID.get(inspector.app, 0)
        flow.app_flags = APP_GUESS if inspector.guess else 0
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
