"""Live capture from a Linux AF_PACKET socket with a TPACKET_V3 memory-mapped ring, filtered in
the kernel by a BPF program.

libpcap (through Scapy's bindings) compiles the BPF filter for the link type of the frames the
socket sees; we put a check of our own in front of it (lo's outgoing copies are dropped in the
kernel, as every loopback frame shows up twice) and attach it. The kernel writes the frames that
pass into a ring of blocks shared with this process (PACKET_RX_RING, TPACKET_V3): we wait for a
block with poll(), copy it out at once and hand it back, and read the headers of all its frames
with numpy (tpacket3_hdr: timestamps, captured and original length, VLAN tag the NIC took off;
the sockaddr_ll after it: the interface type). The block goes to the capture loop as one batch,
its frames decoded where they lie, as a read of a capture file is. No system call and no bytes
object per frame, and frames are never dissected by Scapy. The kernel counts what it could not
put in the ring (PACKET_STATISTICS, tpacket_stats_v3). On a loopback flood of 100,000 frames a
second, capture used 1.75 CPU-seconds a million frames this way, 4.1 when it made a bytes object
of every frame and decoded them in batches of 1024 (bench/bench_live.py, the same host).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import socket
import struct
from collections.abc import Iterator

import numpy as np

from capture.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW
from capture.pcapfile import FrameBatch, FrameChunk, frames_of
from packet_records.runtime import StartupError

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
MAX_FRAME = 262144  # the snap length our filter programs return
DLT_EN10MB, DLT_RAW = 1, 12  # libpcap's link types: Ethernet, raw IP

# The ring: SOCKET_BUFFER_MB of blocks of BLOCK_MAX bytes (smaller when the ring is small, so
# that it holds at least MIN_BLOCKS); the kernel hands a block over when it is full, or at the
# next tick of a BLOCK_TIMEOUT_MS timer once it holds a frame. For TPACKET_V3 the frame size is
# only a hint (frames are packed in a block one after the other, each as long as it needs).
# The timeout bounds how long a frame waits in the kernel when traffic is light, and how much
# the ring can absorb while this process does not read: a block the timer hands over partly
# filled still takes a whole block, so the ring holds at least blocks x timeout of traffic.
# Measured (bench/bench_live.py): with 20 ms, 64 blocks held only 1.3 s at 100k-200k pps, and
# a capturer kept off its CPU by other work for longer lost frames tcpdump (1 s timeout) kept;
# with 100 ms, blocks of 1 MiB fill before the timer above about 55k pps (106-byte frames).
BLOCK_MAX, BLOCK_MIN, MIN_BLOCKS = 1 << 20, 1 << 17, 8
BLOCK_TIMEOUT_MS = 100
FRAME_HINT = 2048
TPACKET_REQ3 = struct.Struct("=7I")  # block_size, block_nr, frame_size, frame_nr,
#                                      retire_blk_tov, sizeof_priv, feature_req_word
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status,
# num_pkts, offset_to_first_pkt, ...
BLOCK_STATUS_OFFSET = 8
BLOCK_HDR = struct.Struct("=III")  # block_status, num_pkts, offset_to_first_pkt
BLOCK_STATUS = struct.Struct("=I")
# struct tpacket3_hdr (48 bytes): tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len,
# tp_status, tp_mac, (tp_net), hv1 (tp_rxhash), tp_vlan_tci, tp_vlan_tpid, padding; then at
# TPACKET_ALIGN(48) = 48 the struct sockaddr_ll: (family, protocol, ifindex), sll_hatype.
FRAME_HDR = struct.Struct("=6IH2x4xIH18xH")
NEXT_OFFSET = struct.Struct("=I")  # tp_next_offset alone
# the same fields as numpy reads them from every frame of a block at once (block_batch())
FRAME_FIELDS = np.dtype({
    "names": ["sec", "nsec", "snaplen", "len", "status", "mac", "tci", "tpid", "hatype"],
    "formats": ["=u4"] * 5 + ["=u2", "=u4", "=u2", "=u2"],
    "offsets": [4, 8, 12, 16, 20, 24, 32, 36, 56],
    "itemsize": FRAME_HDR.size,
})
VLAN_TAG = struct.Struct("!HH")
TPACKET_STATS_V3 = struct.Struct("=III")  # tp_packets, tp_drops, tp_freeze_q_cnt

# classic BPF
BPF_LD_IMM, BPF_JEQ_K, BPF_JA, BPF_RET_K = 0x00, 0x15, 0x05, 0x06
SKF_AD_OFF, SKF_AD_PKTTYPE, SKF_AD_HATYPE = -0x1000, 4, 28
BPF_LD_PKTTYPE = (0x20, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF)  # ld [pkttype]
BPF_LD_HATYPE = (0x20, 0, 0, (SKF_AD_OFF + SKF_AD_HATYPE) & 0xFFFFFFFF)  # ld [hatype]
# Dropped before the user's filter runs: frames that lo sends (each one comes back in as well;
# libpcap keeps the incoming copy). Outgoing frames of other interfaces are kept.
DROP_LOOPBACK_OUTGOING = [
    BPF_LD_PKTTYPE,
    (BPF_JEQ_K, 0, 3, PACKET_OUTGOING),  # not outgoing: -> the filter
    BPF_LD_HATYPE,
    (BPF_JEQ_K, 0, 1, ARPHRD_LOOPBACK),  # outgoing, not on a loopback interface: -> the filter
    (BPF_RET_K, 0, 0, 0),  # drop
    (BPF_LD_IMM, 0, 0, 0),  # A = 0: the filter starts as the kernel starts a program
]
ACCEPT_ALL = [(BPF_RET_K, 0, 0, MAX_FRAME)]

Insn = tuple[int, int, int, int]  # code, jt, jf, k


class LiveSource:
    def __init__(self, iface: str, bpf_filter: str, socket_buffer_mb: int):
        self.iface = iface
        ifindex = 0
        if iface:
            try:
                ifindex = socket.if_nametoindex(iface)
            except OSError:
                raise StartupError(f"interface {iface!r} does not exist") from None
        try:  # protocol 0: the socket receives nothing until bound below, filter and ring set
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise StartupError(
                "no permission to open a capture socket: run as root or with CAP_NET_RAW"
            ) from None
        self.sock = sock
        self.ring: mmap.mmap | None = None
        self.kernel_drops = self.kernel_packets = self.kernel_freezes = 0
        self._next_block = 0  # the block batches() reads next
        self._rest: list[tuple] = []  # frames(): the frames of a block not given yet
        try:
            hatype = None
            if iface:
                sock.bind((iface, 0))  # the interface only, not yet a protocol: no frames
                hatype = sock.getsockname()[3]
            self._attach_filter(bpf_filter, hatype)
            self._map_ring(socket_buffer_mb)
            _bind(sock, ifindex)  # from here on, frames that pass the filter fill the ring
        except BaseException:
            self.close()
            raise
        if iface:
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            try:
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            except OSError as exc:  # not fatal: we still see traffic to and from this host
                log.warning("cannot set %s promiscuous: %s", iface, exc)

    def _attach_filter(self, bpf_filter: str, hatype: int | None) -> None:
        """Compile the filter for the frames this socket sees, as frames() reads them, behind
        the check that drops lo's outgoing copies."""
        try:
            if not bpf_filter:
                program = ACCEPT_ALL
            elif hatype is not None:
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
        program = without_loopback_outgoing(program)
        code = b"".join(struct.pack("HBBI", *insn) for insn in program)
        insns = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("HP", len(program), ctypes.addressof(insns))  # struct sock_fprog
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        except OSError as exc:
            raise StartupError(f"the kernel refused BPF_FILTER {bpf_filter!r}: "
                               f"{exc.strerror}") from None

    def _map_ring(self, ring_mb: int) -> None:
        size = ring_mb * 1024 * 1024
        block = BLOCK_MAX
        while block > BLOCK_MIN and block * MIN_BLOCKS > size:
            block //= 2
        nblocks = max(size // block, 2)
        self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        req = TPACKET_REQ3.pack(block, nblocks, FRAME_HINT, block // FRAME_HINT * nblocks,
                                BLOCK_TIMEOUT_MS, 0, 0)
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.ring = mmap.mmap(self.sock.fileno(), block * nblocks, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise StartupError(f"cannot set up a capture ring of {nblocks} blocks of "
                               f"{block // 1024} KiB (SOCKET_BUFFER_MB={ring_mb}): "
                               f"{exc.strerror}") from None
        self.block_size, self.blocks = block, nblocks

    def read_drops(self) -> int:
        """Kernel drops since the last call (PACKET_STATISTICS resets on read): frames that
        passed the filter when the ring was full. Also adds up the frames that passed the filter
        (kernel_packets, drops included) and the times the ring was full (kernel_freezes)."""
        stats = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size)
        packets, drops, freezes = TPACKET_STATS_V3.unpack(stats)
        self.kernel_packets += packets
        self.kernel_drops += drops
        self.kernel_freezes += freezes
        return drops

    def batches(self, idle_timeout: float = 0.1) -> Iterator[FrameChunk | FrameBatch | None]:
        """Yield the frames of each block the kernel hands over, as one batch (block_batch():
        columns over a copy of the block, taken at once); None after idle_timeout without
        traffic. Each block goes back to the kernel as soon as it is copied."""
        ring = self.ring
        unpack_block, release = BLOCK_HDR.unpack_from, BLOCK_STATUS.pack_into
        next_offset, unpack_frame = NEXT_OFFSET.unpack_from, FRAME_HDR.unpack_from
        block_size, blocks = self.block_size, self.blocks
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR)
        timeout_ms = max(int(idle_timeout * 1000), 0)
        index = self._next_block
        while True:
            base = index * block_size
            status, count, offset = unpack_block(ring, base + BLOCK_STATUS_OFFSET)
            if not status & TP_STATUS_USER:
                for _fd, events in poller.poll(timeout_ms):
                    if events & select.POLLERR:
                        self._socket_error()
                status, count, offset = unpack_block(ring, base + BLOCK_STATUS_OFFSET)
                if not status & TP_STATUS_USER:
                    yield None
                    continue
            # where each frame's header lies: a chain of offsets, walked here (one small read
            # a frame); numpy reads the headers themselves
            offsets = [0] * count
            for k in range(count):
                offsets[k] = offset
                offset += next_offset(ring, base + offset)[0]
            if count:
                last = offsets[-1]
                header = unpack_frame(ring, base + last)
                length = header[6] + header[3]  # the last frame's tp_mac + tp_snaplen
                block = ring[base:base + last + max(length, FRAME_FIELDS.itemsize)]
            release(ring, base + BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)  # to the kernel
            index = index + 1 if index + 1 < blocks else 0
            self._next_block = index
            if count:
                yield block_batch(block, offsets)

    def frames(self, idle_timeout: float = 0.1) -> Iterator[tuple | None]:
        """Yield (ts_ns, wire_len, frame, linktype) of every frame of batches(), or None after
        idle_timeout without traffic. Closed inside a block, the next frames() goes on after
        the last frame given."""
        rest = self._rest  # frames of the last block not given yet, the next one last
        while rest:
            yield rest.pop()
        for batch in self.batches(idle_timeout):
            if batch is None:
                yield None
                continue
            rest.extend(frames_of(batch))
            rest.reverse()
            while rest:
                yield rest.pop()

    def _socket_error(self) -> None:
        """poll() reported an error on the socket (e.g. the interface went down): log and clear
        it, and go on waiting, as frames come again once the interface is back."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.warning("capture socket on %s: %s", self.iface or "every interface",
                        os.strerror(err))

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.sock.close()


def block_batch(block: bytes, offsets: list[int]) -> FrameChunk | FrameBatch:
    """The frames whose tpacket3 headers lie at `offsets` in a copy of a ring block, in order.
    Frames of one link type whose VLAN tags are where they were on the wire (nearly every
    block) come as a FrameChunk: their headers read by numpy, the frames left where they lie
    in the block (the capture loop decodes them there, as it does a read of a capture file).
    A block with a frame whose tag the kernel took off (it is put back: the frame is copied)
    or with frames of both kinds of link comes from block_frames(), frame by frame."""
    at = np.array(offsets, dtype=np.int64)
    headers = np.ndarray((len(block) - FRAME_FIELDS.itemsize + 1,), FRAME_FIELDS, block,
                         strides=(1,))[at]
    hatype = headers["hatype"]
    ethernet = (hatype == ARPHRD_ETHER) | (hatype == ARPHRD_LOOPBACK)
    tag_off = (headers["status"] & TP_STATUS_VLAN_VALID) != 0
    if (tag_off & ethernet).any() or not (ethernet.all() or not ethernet.any()):
        ts_ns, wire_lens, frames, linktypes = zip(*block_frames(block, offsets))
        return FrameBatch(list(ts_ns), list(wire_lens), list(frames), list(linktypes))
    ts_ns = headers["sec"].astype(np.int64) * 1_000_000_000 + headers["nsec"]
    return FrameChunk(block, at + headers["mac"], headers["snaplen"].astype(np.int64), ts_ns,
                      headers["len"].astype(np.int64),
                      LINKTYPE_ETHERNET if ethernet[0] else LINKTYPE_RAW)


def block_frames(block: bytes, offsets: list[int]) -> list[tuple]:
    """(ts_ns, wire_len, frame, linktype) of the frames whose tpacket3 headers lie at `offsets`
    in a copy of a ring block, one by one (block_batch() gives the same, by numpy)."""
    unpack_frame, vlan_tag = FRAME_HDR.unpack_from, VLAN_TAG.pack
    out = []
    for offset in offsets:
        (_next, sec, nsec, snaplen, wire_len, frame_status, mac, tci, tpid,
         hatype) = unpack_frame(block, offset)
        frame = block[offset + mac:offset + mac + snaplen]
        if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
            if frame_status & TP_STATUS_VLAN_VALID:  # the NIC took the tag off: put it back,
                # as libpcap does
                if not frame_status & TP_STATUS_VLAN_TPID_VALID:
                    tpid = 0x8100
                frame = frame[:12] + vlan_tag(tpid, tci) + frame[12:]
                wire_len += 4
            out.append((sec * 1_000_000_000 + nsec, wire_len, frame, LINKTYPE_ETHERNET))
        else:  # tun, sit, ipip, ppp ...: no link-layer header, it starts at IP
            out.append((sec * 1_000_000_000 + nsec, wire_len, frame, LINKTYPE_RAW))
    return out


def _bind(sock: socket.socket, ifindex: int) -> None:
    """bind() to every protocol on `ifindex` (0: every interface, which Python's bind cannot
    name)."""
    sll = struct.pack("=HHiHBB8s", socket.AF_PACKET, socket.htons(ETH_P_ALL), ifindex, 0, 0, 0,
                      b"")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.bind(sock.fileno(), ctypes.c_char_p(sll), len(sll)) != 0:
        err = ctypes.get_errno()
        raise StartupError(f"cannot bind the capture socket: {os.strerror(err)}")


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


def without_loopback_outgoing(program: list[Insn]) -> list[Insn]:
    """`program` behind DROP_LOOPBACK_OUTGOING. Jumps in classic BPF are relative and only go
    forward, so the program's own jumps stay as they are; the check's jumps land on its last
    instruction, which clears A and falls through to the program's first."""
    return [*DROP_LOOPBACK_OUTGOING, *program]


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
