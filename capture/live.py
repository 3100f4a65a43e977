"""Live capture from a Linux AF_PACKET socket, filtered in the kernel by a BPF program.

Scapy compiles the BPF filter through libpcap and attaches it; frames are then read raw with
recvmsg (kernel timestamps, original length, VLAN tags from the packet auxdata) and never
dissected by Scapy. This is the single capture source behind `frames()`; a TPACKET_V3 ring can
replace it without touching the rest of the service.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from collections.abc import Iterator

from capture.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW
from packet_records.runtime import StartupError

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
AUXDATA = struct.Struct("=IIIHHHH")  # status, len, snaplen, mac, net, vlan_tci, vlan_tpid
TIMESPEC = struct.Struct("=qq")
MAX_FRAME = 262144


class LiveSource:
    def __init__(self, iface: str, bpf_filter: str, socket_buffer_mb: int):
        self.iface = iface
        if iface:
            try:
                ifindex = socket.if_nametoindex(iface)
            except OSError:
                raise StartupError(f"interface {iface!r} does not exist") from None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise StartupError(
                "no permission to open a capture socket: run as root or with CAP_NET_RAW"
            ) from None
        self.sock = sock
        size = socket_buffer_mb * 1024 * 1024
        try:  # past net.core.rmem_max, which CAP_NET_ADMIN allows
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        if bpf_filter:
            self._attach_filter(bpf_filter)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if iface:
            sock.bind((iface, ETH_P_ALL))
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            try:
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            except OSError as exc:  # not fatal: we still see traffic to and from this host
                log.warning("cannot set %s promiscuous: %s", iface, exc)
        self._drain()
        sock.setblocking(False)
        self.kernel_drops = 0

    def _attach_filter(self, bpf_filter: str) -> None:
        from scapy.arch.linux import attach_filter  # libpcap compiles the filter
        from scapy.error import Scapy_Exception

        try:
            attach_filter(self.sock, bpf_filter, self.iface or None)
        except (Scapy_Exception, OSError, ImportError) as exc:
            raise StartupError(f"invalid BPF_FILTER {bpf_filter!r}: {exc}") from None

    def _drain(self) -> None:
        """Drop what queued before the filter applied (the socket saw everything until then)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(MAX_FRAME)
        except BlockingIOError:
            pass

    def read_drops(self) -> int:
        """Kernel drops since the last call (PACKET_STATISTICS resets on read)."""
        stats = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        _packets, drops = struct.unpack("II", stats)
        self.kernel_drops += drops
        return drops

    def frames(self, idle_timeout: float = 0.1) -> Iterator[tuple | None]:
        """Yield (ts_ns, wire_len, frame, linktype), or None after idle_timeout without traffic."""
        sock = self.sock
        buf = bytearray(MAX_FRAME)
        view = memoryview(buf)
        recv = sock.recvmsg_into
        anc_size = socket.CMSG_SPACE(AUXDATA.size) + socket.CMSG_SPACE(TIMESPEC.size)
        while True:
            try:
                size, ancdata, _flags, addr = recv([buf], anc_size, socket.MSG_TRUNC)
            except BlockingIOError:
                select.select([sock], [], [], idle_timeout)
                yield None
                continue
            except InterruptedError:
                continue
            _ifname, _proto, pkttype, hatype, _hw = addr
            if pkttype == PACKET_OUTGOING and hatype == ARPHRD_LOOPBACK:
                continue  # loopback frames show up twice: keep the incoming copy, as libpcap does
            ts_ns = 0
            vlan = None
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack_from(data)
                    ts_ns = sec * 1_000_000_000 + nsec
                elif level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack_from(data)
                    if status & TP_STATUS_VLAN_VALID:
                        vlan = (tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100, tci)
            cap = min(size, MAX_FRAME)
            if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
                frame = bytes(view[:cap])
                if vlan is not None:  # the NIC took the tag off: put it back, as libpcap does
                    frame = frame[:12] + struct.pack("!HH", *vlan) + frame[12:]
                    size += 4
                yield ts_ns, size, frame, LINKTYPE_ETHERNET
            else:  # tun, sit, ipip, ppp ...: no link-layer header, the frame starts at IP
                yield ts_ns, size, bytes(view[:cap]), LINKTYPE_RAW

    def close(self) -> None:
        self.sock.close()
