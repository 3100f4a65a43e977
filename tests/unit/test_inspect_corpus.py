"""FlowInspector against tshark on the 45 real captures of ../shared/corpus (nDPI's test suite).

Every capture goes through capture.pcapfile.read_frames and capture.decode.decode_frame, one
FlowInspector per bidirectional 5-tuple (client = sender of the first packet), fed like the
capture loop feeds it. For every conversation tshark labels with one of our protocols, our label
must agree for at least 98% of them, and our server name must be one of the names tshark shows
for the conversation (tls_sni, else http_host, else gquic_sni, else dns_qry_name: the truth
lists them sorted, so a conversation with several DNS queries accepts any of them; ours is the
first query's). Where tshark shows no name, we must show none either.

Run as a script for the whole table: python -m tests.unit.test_inspect_corpus
"""

from __future__ import annotations

import ipaddress
import json
import random
import shutil
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from capture.decode import decode_frame
from capture.inspect.dns import parse_dns
from capture.inspect.flow import FlowInspector
from capture.inspect.names import safe_name
from capture.pcapfile import read_frames
from tests.unit.test_inspect_names import unescape

pytestmark = pytest.mark.corpus

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "ndpi"

# our label -> tshark's names for it
AGREES = {"DNS": {"dns"}, "MDNS": {"mdns"}, "HTTP": {"http"}, "TLS": {"tls"},
          "QUIC": {"quic", "gquic"}, "SSH": {"ssh"}, "NTP": {"ntp"}, "DHCP": {"dhcp"},
          "DHCPV6": {"dhcpv6"}, "SMTP": {"smtp"}, "IMAP": {"imap"}, "POP3": {"pop"}}
TARGETS = frozenset().union(*AGREES.values())
NAME_FIELDS = ("tls_sni", "http_host", "gquic_sni", "dns_qry_name")
L4 = {6: "TCP", 17: "UDP"}

# Conversations where our label may differ from tshark's, with the reason. Keys: (capture,
# truth conversation key). None needed today; the 12 conversations that agree only through a
# port guess (tshark labels them by port as well) are listed by report().
LABEL_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _addr(version: int, raw: bytes) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def _truth_key(conv: dict) -> tuple:
    ends = frozenset(((conv["initiator"]["addr"], conv["initiator"]["port"]),
                      (conv["responder"]["addr"], conv["responder"]["port"])))
    return conv["l4"], ends


def inspect_capture(path: Path) -> dict[tuple, FlowInspector]:
    """One FlowInspector per (l4 name, {endpoint, endpoint}), fed like the capture loop."""
    flows: dict[tuple, FlowInspector] = {}
    clients: dict[tuple, tuple] = {}
    for _ts, _wire, frame, linktype in read_frames(path):
        decoded = decode_frame(frame, linktype)
        version, proto, src, dst, sport, dport = decoded[:6]
        l4_off, ip_end = decoded[9], decoded[10]
        if proto not in L4 or l4_off < 0:
            continue
        a, b = (_addr(version, src), sport), (_addr(version, dst), dport)
        key = (L4[proto], frozenset((a, b)))
        inspector = flows.get(key)
        if inspector is None:
            inspector = flows[key] = FlowInspector(proto, sport, dport)
            clients[key] = a
        if inspector.done:
            continue
        end = min(ip_end, len(frame)) if ip_end >= 0 else len(frame)
        if proto == 6:
            if len(frame) < l4_off + 13:
                continue
            start = l4_off + (frame[l4_off + 12] >> 4) * 4
            seq = struct.unpack_from("!I", frame, l4_off + 4)[0]
        else:
            if len(frame) < l4_off + 8:
                continue
            start, seq = l4_off + 8, None
            udp_len = struct.unpack_from("!H", frame, l4_off + 4)[0]
            if udp_len >= 8:
                end = min(end, l4_off + udp_len)
        if end > start:
            inspector.feed(bytes(frame[start:end]), a == clients[key], seq)
    return flows


def expected_names(meta: dict) -> list[str]:
    for field in NAME_FIELDS:
        if meta.get(field):
            return meta[field]
    return []


def compare(corpus: Path = CORPUS) -> dict:
    """Labels and names of every capture against its truth file."""
    out = {"labelled": 0, "agreed": 0, "label_diffs": [], "name_diffs": [], "excepted": [],
           "extra_labels": [], "guess_only": [], "names_checked": 0,
           "agreed_by_guess": []}
    for pcap in sorted((corpus / "pcap").iterdir()):
        truth = json.loads((corpus / "truth" / (pcap.name + ".json")).read_text())
        flows = inspect_capture(pcap)
        for conv in truth["conversations"]:
            if conv["l4"] not in ("TCP", "UDP"):
                continue
            ins = flows.get(_truth_key(conv))
            app = ins.app if ins else "UNKNOWN"
            tag = f"{pcap.name} {conv['key']}"
            guess = bool(ins and ins.guess)
            where = f"{tag}: tshark {conv['app']}, ours {app}{' (guess)' if guess else ''}"
            if conv["app"] in TARGETS:
                out["labelled"] += 1
                if conv["app"] in AGREES.get(app, ()):
                    out["agreed"] += 1
                    if guess:
                        out["agreed_by_guess"].append(where)
                elif (pcap.name, conv["key"]) in LABEL_EXCEPTIONS:
                    out["excepted"].append(f"{where} [{LABEL_EXCEPTIONS[pcap.name, conv['key']]}]")
                else:
                    out["label_diffs"].append(where)
            elif app != "UNKNOWN":
                out["guess_only" if ins.guess else "extra_labels"].append(where)
            names = expected_names(conv["meta"])
            ours = ins.server_name if ins else None
            if names or ours is not None:
                out["names_checked"] += 1
                if (ours not in names) if names else ours is not None:
                    out["name_diffs"].append(f"{tag}: tshark {names}, ours {ours!r}")
    return out


def report(res: dict) -> str:
    lines = [f"labels: {res['agreed']}/{res['labelled']} agree "
             f"({100 * res['agreed'] / max(res['labelled'], 1):.1f}%), "
             f"{len(res['excepted'])} justified exceptions; "
             f"names: {res['names_checked'] - len(res['name_diffs'])}/{res['names_checked']} exact"]
    for title, key in (("label differences", "label_diffs"), ("justified exceptions", "excepted"),
                       ("name differences", "name_diffs"),
                       ("agreeing only through a port guess (tshark labels these by port too)",
                        "agreed_by_guess"),
                       ("labelled by content where tshark has none of our protocols",
                        "extra_labels"),
                       ("port guesses where tshark has none of our protocols", "guess_only")):
        if res[key]:
            lines.append(f"-- {title} ({len(res[key])}):")
            lines.extend("   " + x for x in res[key])
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results() -> dict:
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    return compare()


def test_labels_agree_with_tshark(results):
    print("\n" + report(results))
    assert results["labelled"] > 250
    assert (results["agreed"] + len(results["excepted"])) / results["labelled"] >= 0.98
    assert results["agreed"] / results["labelled"] >= 0.98, report(results)


def test_server_names_exact(results):
    assert not results["name_diffs"], report(results)


def test_no_content_label_where_tshark_has_another_protocol(results):
    assert not results["extra_labels"], report(results)


def _random_label(rng: random.Random, valid: bool) -> bytes:
    """Label bytes mixing printable ASCII, controls, invalid UTF-8 (unless valid: then no
    backslash either) and valid UTF-8 of code points that Python's Unicode database knows
    (GLib's may be newer: unassigned code points can differ in printability between the two,
    which is not what this test is about)."""
    out = bytearray()
    while len(out) < rng.randint(1, 30):
        r = rng.random()
        if r < 0.25:
            if not valid:
                out.append(rng.randint(0x80, 0xFF))
        elif r < 0.4:
            out.append(rng.randint(0, 0x1F))
        elif r < 0.55:
            cp = rng.choice((rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                             rng.randint(0x10000, 0x10FFFF)))
            if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) != "Cn":
                out += chr(cp).encode()
        else:
            c = rng.randint(0x20, 0x7F)
            if not (valid and c == 0x5C):
                out.append(c)
    return bytes(out[:63])


def _escaped_like_safe_name(shown: str) -> str:
    """tshark's text with the non-ASCII characters it shows raw and str.isprintable() refuses
    escaped as safe_name() escapes them."""
    return "".join(c if c.isascii() or c.isprintable()
                   else f"\\u{ord(c):04X}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08X}"
                   for c in shown)


def test_dns_names_are_shown_like_tshark(tmp_path):
    """Random query names through tshark (the corpus's reference) and through parse_dns and
    names.safe_name(), the text that leaves capture. A name of valid UTF-8 without a backslash
    reads exactly as tshark shows it, except that safe_name() also escapes the non-ASCII
    characters str.isprintable() refuses and tshark shows raw (non-ASCII spaces, line and
    paragraph separators, private use). Any other name reads back to its exact bytes, where
    tshark shows U+FFFD for invalid UTF-8 and a backslash as itself."""
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not installed")
    rng = random.Random(11)
    records, raws, ours = [], [], []
    for i in range(1500):
        labels = [_random_label(rng, i % 2 == 0) for _ in range(rng.randint(1, 3))]
        name = b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
        msg = struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
        raws.append(b".".join(labels))
        ours.append(safe_name(parse_dns(msg).name))
        udp = struct.pack("!HHHH", 1024 + i, 53, 8 + len(msg), 0) + msg
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                         bytes((192, 0, 2, 1)), bytes((192, 0, 2, 2)))
        records.append(struct.pack("<IIII", 1_700_000_000 + i, 0, len(ip + udp), len(ip + udp))
                       + ip + udp)
    path = tmp_path / "names.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
                     + b"".join(records))
    proc = subprocess.run([tshark, "-n", "-r", str(path), "-T", "fields", "-e", "dns.qry.name"],
                          capture_output=True, timeout=120)
    shown = proc.stdout.decode("utf-8").split("\n")[:len(ours)]
    assert len(shown) == len(ours)
    diffs, compared = [], 0
    for raw, o, t in zip(raws, ours, shown):
        try:
            raw.decode("utf-8")
            valid = b"\\" not in raw
        except UnicodeDecodeError:
            valid = False
        if valid:
            compared += 1
            if o != _escaped_like_safe_name(t):
                diffs.append((raw, o, t))
        elif unescape(o) != (raw, False):
            diffs.append((raw, o, t))
    assert compared >= 700 and not diffs, diffs[:5]


if __name__ == "__main__":
    sys.exit(print(report(compare())))
