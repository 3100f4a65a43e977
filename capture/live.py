"""Live capture from a Linux AF_PACKET socket, filtered in the kernel by a BPF program.

libpcap (through Scapy's bindings) compiles the BPF filter for the link type of the frames the
socket sees, and we attach it; frames are then read raw with recvmsg (kernel timestamps,
original length, VLAN tags from the packet auxdata) and never dissected by Scapy. This is the
single capture source behind `frames()`; a TPACKET_V3 ring can replace it without touching the
rest of the service.
"""

from __future__ import annotations

import ctypes
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
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
AUXDATA = struct.Struct("=IIIHHHH")  # status, len, snaplen, mac, net, vlan_tci, vlan_tpid
TIMESPEC = struct.Struct("=qq")
MAX_FRAME = 262144
DLT_EN10MB, DLT_RAW = 1, 12  # libpcap's link types: Ethernet, raw IP
# classic BPF: load the interface's ARPHRD type (a Linux ancillary field), compare, jump, return
BPF_LD_HATYPE = (0x20, 0, 0, (-0x1000 + 28) & 0xFFFFFFFF)  # ld [SKF_AD_OFF + SKF_AD_HATYPE]
BPF_JEQ_K, BPF_JA, BPF_RET_K = 0x15, 0x05, 0x06

Insn = tuple[int, int, int, int]  # code, jt, jf, k


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
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if iface:
            sock.bind((iface, ETH_P_ALL))
        if bpf_filter:
            self._attach_filter(bpf_filter)
        if iface:
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            try:
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            except OSError as exc:  # not fatal: we still see traffic to and from this host
                log.warning("cannot set %s promiscuous: %s", iface, exc)
        self._drain()
        sock.setblocking(False)
        self.kernel_drops = 0

    def _attach_filter(self, bpf_filter: str) -> None:
        """Compile the filter for the frames this socket sees, as frames() reads them."""
        try:
            if self.iface:
                hatype = self.sock.getsockname()[3]
                dlt = DLT_EN10MB if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else DLT_RAW
                program = _compile(bpf_filter, dlt)
            else:  # every interface: Ethernet (and loopback) frames, and raw IP (tun, ppp ...)
                ethernet = _compile(bpf_filter, DLT_EN10MB)
                try:
                    raw = _compile(bpf_filter, DLT_RAW)
                except ValueError as exc:  # e.g. `ether host ...`: it cannot apply to raw IP
                    log.warning("BPF_FILTER applies to Ethernet frames only (%s): frames of "
                                "interfaces without an Ethernet header (tun, ppp ...) are not "
                                "captured", exc)
                    raw = [(BPF_RET_K, 0, 0, 0)]
                program = by_link_type(ethernet, raw)
        except ValueError as exc:
            raise StartupError(f"invalid BPF_FILTER {bpf_filter!r}: {exc}") from None
        code = b"".join(struct.pack("HBBI", *insn) for insn in program)
        insns = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("HP", len(program), ctypes.addressof(insns))  # struct sock_fprog
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        except OSError as exc:
            raise StartupError(f"the kernel refused BPF_FILTER {bpf_filter!r}: "
                               f"{exc.strerror}") from None

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


def _compile(expression: str, dlt: int) -> list[Insn]:
    """libpcap's BPF program for frames of link type `dlt`; ValueError(libpcap's reason)."""
    try:
        from scapy.libs import winpcapy as pcap
        from scapy.libs.structures import bpf_program
    except OSError:  # scapy loads libpcap when imported
        raise StartupError(
            "BPF_FILTER needs libpcap to compile it (Debian: apt-get install libpcap0.8)"
        ) from None
    handle = pcap.pcap_open_dead(dlt, MAX_FRAME)
    program = bpf_program()
    try:
        if pcap.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1,
                             0xFFFFFFFF) < 0:
            raise ValueError(pcap.pcap_geterr(handle).decode(errors="replace"))
        insns = [(i.code, i.jt, i.jf, i.k & 0xFFFFFFFF)
                 for i in program.bf_insns[:program.bf_len]]
        pcap.pcap_freecode(ctypes.byref(program))
        return insns
    finally:
        pcap.pcap_close(handle)


def by_link_type(ethernet: list[Insn], raw: list[Insn]) -> list[Insn]:
    """One program for a socket on every interface: `ethernet` for frames of Ethernet and
    loopback interfaces, `raw` for the others, whose frames start at the IP header."""
    return [
        BPF_LD_HATYPE,
        (BPF_JEQ_K, 1, 0, ARPHRD_ETHER),  # -> the jump to `ethernet`
        (BPF_JEQ_K, 0, 1, ARPHRD_LOOPBACK),  # -> the jump to `ethernet`, else `raw`
        (BPF_JA, 0, 0, len(raw)),
        *raw,
        *ethernet,
    ]
