"""Independent reference reader for capture files, built on tshark.

Runs tshark once per file (IP defragmentation and TCP reassembly OFF, so every frame is
attributed using only the headers really present in it) and computes the numbers the
pipeline must reproduce.  Definitions (same as the corpus truth, make_truth.py pass 1):

* bytes are frame.len (original wire length, link-layer header included), not caplen;
* per_second keys are floor(epoch seconds), taken from tshark's decimal text (no float
  rounding at x.999999999);
* the flow-defining IP header is the innermost one that is not quoted inside an ICMP/ICMPv6
  error (tshark decodes IP-in-IP, 6in4, GRE, VXLAN, Teredo ... itself), its L4 is the
  header right after it (IPv6 extension headers skipped);
* per_proto buckets: TCP, UDP, ICMP, ICMPV6, OTHER (non-IP frames, other IP protocols, and
  frames whose IP header is truncated so that tshark shows no addresses);
* conversations are bidirectional, endpoints sorted, addresses in RFC 5952 text, port 0
  for protocols without ports (ports for TCP/UDP/SCTP only), initiator = sender of the
  first frame; non-first IP fragments join the flow of the first fragment with the same
  (src, dst, IP protocol, IP id / IPv6 ident) even when that first fragment comes later in
  the file, and form a port-0 flow when it never comes.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field

PROTOS = ("TCP", "UDP", "ICMP", "ICMPV6", "OTHER")
# one tshark column per field; multi-occurrence values (tunnels, ICMP quotes) joined by AGG
FIELDS = (
    "frame.number", "frame.time_epoch", "frame.len", "frame.cap_len", "frame.protocols",
    "ip.src", "ip.dst", "ip.proto", "ip.id", "ip.flags.mf", "ip.frag_offset",
    "ipv6.src", "ipv6.dst", "ipv6.nxt",
    "ipv6.fraghdr.nxt", "ipv6.fraghdr.ident", "ipv6.fraghdr.offset",
    "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "sctp.srcport", "sctp.dstport",
)  # fmt: skip
AGG = "\x1f"  # never inside a value
# no defragmentation / reassembly: every frame is judged by the headers it really carries
TSHARK_ARGS = (
    "-n", "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE",
    "-o", "tcp.desegment_tcp_streams:FALSE",
    "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=" + AGG,
    "-E", "separator=/t", "-E", "quote=n",
)  # fmt: skip
IPV6_EXT = {
    "ipv6.hopopts", "ipv6.routing", "ipv6.fraghdr", "ipv6.dstopts", "ipv6.shim6",
    "ipv6.mipv6", "ipv6.routing.srh", "ipv6.routing.rpl",
}  # fmt: skip
L4_TOKENS = {"tcp": "TCP", "udp": "UDP", "sctp": "OTHER", "icmp": "ICMP", "icmpv6": "ICMPV6"}
PROTO_NUMBERS = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPV6"}

Endpoint = tuple[str, int]
ConvKey = tuple[str, Endpoint, Endpoint]


@dataclass(frozen=True)
class Conv:
    packets: int
    bytes: int  # sum of wire lengths
    initiator: Endpoint  # (addr, port) that sent the first frame
    first_ts: float  # epoch seconds of the first / last frame (file order)
    last_ts: float


@dataclass
class Reference:
    total_packets: int = 0
    total_bytes: int = 0  # sum of frame.len (wire length)
    total_captured_bytes: int = 0  # sum of frame.cap_len (bytes stored in file)
    per_second: dict[int, tuple[int, int]] = field(default_factory=dict)  # (packets, bytes)
    per_proto: dict[str, tuple[int, int]] = field(default_factory=dict)  # keys from PROTOS
    conversations: dict[ConvKey, Conv] = field(default_factory=dict)


def conv_key(proto: str, a: Endpoint, b: Endpoint) -> ConvKey:
    """Key with sorted endpoints; addresses must already be canonical text."""
    return (proto, *sorted([a, b]))


def _tshark_rows(path, tshark, strict):
    cmd = [tshark, "-r", str(path), *TSHARK_ARGS]
    for f in FIELDS:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace")
    if strict and proc.returncode != 0:
        raise RuntimeError(f"tshark failed on {path} (rc={proc.returncode}): {proc.stderr}")
    for line in proc.stdout.splitlines():
        vals = line.split("\t") + [""] * len(FIELDS)
        yield {f: vals[i].split(AGG) if vals[i] else [] for i, f in enumerate(FIELDS)}


def _nth(row, name, i):
    vals = row[name]
    return vals[i] if i is not None and 0 <= i < len(vals) else None


def _int(v):
    try:
        return int(v, 0)  # handles "0x1234" and decimal
    except (TypeError, ValueError):
        return None


def _locate(tokens):
    """Flow-defining IP layer in frame.protocols: (net, net_i, net_pos, l4, l4_i, frag_i)
    where *_i are occurrence indexes into tshark's multi-valued fields, or None if no IP."""
    seen, net = Counter(), None
    for pos, tok in enumerate(tokens):
        if tok in ("ip", "ipv6"):
            net = [tok, seen[tok], pos, None, None, None]  # a deeper header wins (tunnels)
        elif net and net[3] is None:
            if tok == "ipv6.fraghdr" and net[0] == "ipv6":
                net[5] = seen[tok]
            elif tok in L4_TOKENS:
                skip = IPV6_EXT | {"ah"} if net[0] == "ipv6" else set()
                if all(t in skip for t in tokens[net[2] + 1 : pos]):  # directly after IP
                    net[3], net[4] = tok, seen[tok]
                    if tok.startswith("icmp"):
                        break  # what follows is quoted inside an ICMP error
        seen[tok] += 1
    return net


def _classify(row, tokens, net):
    """-> (bucket, src, dst, sport, dport, frag_id, non_first_fragment) or None if no usable
    IP header."""
    kind, i, pos, l4, l4_i, frag_i = net
    src, dst = _nth(row, kind + ".src", i), _nth(row, kind + ".dst", i)
    if src is None or dst is None:  # IP header truncated / bogus: no addresses
        return None
    src, dst = ipaddress.ip_address(src).compressed, ipaddress.ip_address(dst).compressed
    if kind == "ip":
        proto = _nth(row, "ip.proto", i)
        offset = _int(_nth(row, "ip.frag_offset", i)) or 0
        is_frag = _nth(row, "ip.flags.mf", i) in ("1", "True", "true") or offset > 0
        frag_id = (src, dst, proto, _nth(row, "ip.id", i))
    else:
        is_frag = frag_i is not None
        proto = _nth(row, "ipv6.fraghdr.nxt", frag_i)
        offset = _int(_nth(row, "ipv6.fraghdr.offset", frag_i)) or 0
        frag_id = (src, dst, proto, _nth(row, "ipv6.fraghdr.ident", frag_i))
        if proto is None and tokens[pos + 1 : pos + 2] and tokens[pos + 1] not in IPV6_EXT:
            proto = _nth(row, "ipv6.nxt", i)  # no extension header: base next-header
    sport = dport = 0
    if l4:
        bucket = L4_TOKENS[l4]
        if l4 in ("tcp", "udp", "sctp"):
            sport = _int(_nth(row, l4 + ".srcport", l4_i)) or 0
            dport = _int(_nth(row, l4 + ".dstport", l4_i)) or 0
    else:  # no L4 header decoded (e.g. non-first fragment)
        bucket = PROTO_NUMBERS.get(_int(proto), "OTHER")
    return bucket, src, dst, sport, dport, frag_id if is_frag else None, is_frag and offset > 0


def read_capture(path, *, tshark: str = "tshark", strict: bool = True) -> Reference:
    """Reference numbers for one capture.  strict=False keeps whatever tshark managed to
    read from a damaged file instead of raising."""
    ref = Reference()
    per_sec, per_proto = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    convs: dict[ConvKey, list] = {}
    first_frag: dict[tuple, ConvKey] = {}  # fragment id -> flow of its first fragment
    pending = []  # non-first fragments seen before their first

    def account(key, src_ep, fnum, ts, flen):
        # [packets, bytes, initiator, (first frame, ts), (last frame, ts)]
        c = convs.setdefault(key, [0, 0, src_ep, (fnum, ts), (fnum, ts)])
        c[0] += 1
        c[1] += flen
        c[3], c[4] = min(c[3], (fnum, ts)), max(c[4], (fnum, ts))

    for row in _tshark_rows(path, tshark, strict):
        fnum, ts_text = int(row["frame.number"][0]), row["frame.time_epoch"][0]
        flen, clen = int(row["frame.len"][0]), int(row["frame.cap_len"][0])
        ref.total_packets += 1
        ref.total_bytes += flen
        ref.total_captured_bytes += clen
        sec = per_sec[int(ts_text.split(".")[0])]
        sec[0] += 1
        sec[1] += flen
        tokens = row["frame.protocols"][0].split(":") if row["frame.protocols"] else []
        net = _locate(tokens)
        flow = _classify(row, tokens, net) if net else None
        bucket = flow[0] if flow else "OTHER"
        per_proto[bucket][0] += 1
        per_proto[bucket][1] += flen
        if flow is None:
            continue
        bucket, src, dst, sport, dport, frag_id, non_first = flow
        ts = float(ts_text)
        if non_first:
            if frag_id in first_frag:
                account(first_frag[frag_id], (src, 0), fnum, ts, flen)
            else:
                pending.append((frag_id, bucket, src, dst, fnum, ts, flen))
            continue
        key = conv_key(bucket, (src, sport), (dst, dport))
        account(key, (src, sport), fnum, ts, flen)
        if frag_id is not None:
            first_frag.setdefault(frag_id, key)

    # late attachment: the first fragment may come later in the file, or never (ports 0)
    for frag_id, bucket, src, dst, fnum, ts, flen in pending:
        key = first_frag.get(frag_id) or conv_key(bucket, (src, 0), (dst, 0))
        account(key, (src, 0), fnum, ts, flen)

    ref.per_second = {s: tuple(v) for s, v in sorted(per_sec.items())}
    ref.per_proto = {p: tuple(per_proto[p]) for p in PROTOS if p in per_proto}
    ref.conversations = {k: Conv(c[0], c[1], c[2], c[3][1], c[4][1]) for k, c in convs.items()}
    return ref


if __name__ == "__main__":  # python tests/reference.py CAPTURE...
    import sys

    for p in sys.argv[1:]:
        r = read_capture(p, strict=False)
        print(
            f"== {p}: {r.total_packets} packets, {r.total_bytes} bytes "
            f"({r.total_captured_bytes} captured)"
        )
        print("   per_second", r.per_second)
        print("   per_proto ", r.per_proto)
        for k, c in r.conversations.items():
            print(
                f"   {k[0]:6} {k[1][0]}:{k[1][1]} <-> {k[2][0]}:{k[2][1]}  "
                f"{c.packets} pkts {c.bytes} B from {c.initiator[0]}:{c.initiator[1]} "
                f"[{c.first_ts:.6f} .. {c.last_ts:.6f}]"
            )
