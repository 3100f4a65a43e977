"""Self-check of the test tooling: tests/reference.py (tshark) against the crafted captures
and against the independent corpus truth (../shared/corpus, make_truth.py pass 1)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (reference, captures)
from captures import write_bad_files, write_captures
from reference import conv_key, read_capture

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
CORPUS = (
    Path(os.environ.get("DPI_CORPUS", Path(__file__).resolve().parents[3] / "shared" / "corpus"))
    / "ndpi"
)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    files = write_captures(tmp_path_factory.mktemp("crafted"))
    return {name: read_capture(path) for name, path in files.items()}


def test_crafted_totals_are_consistent(crafted):
    for name, ref in crafted.items():
        assert ref.total_packets >= 5, name
        assert len(ref.per_second) >= 5, name
        for buckets in (ref.per_second, ref.per_proto):
            assert tuple(map(sum, zip(*buckets.values()))) == (ref.total_packets, ref.total_bytes)


def test_crafted_edge_cases(crafted):
    snap = crafted["snaplen64"]
    assert (snap.total_bytes, snap.total_captured_bytes) == (6 * 1500 + 2 * 54, 6 * 64 + 2 * 54)
    trunc = crafted["truncated_frames"]
    assert trunc.per_proto == {"TCP": (3, 202), "OTHER": (2, 148)}  # wire length kept
    frags = crafted["ipv4_fragments"].conversations
    assert frags[conv_key("UDP", ("192.0.2.10", 40010), ("198.51.100.20", 7))].packets == 4
    icmp = frags[conv_key("ICMP", ("192.0.2.10", 0), ("198.51.100.20", 0))]
    assert (icmp.packets, icmp.initiator) == (3, ("198.51.100.20", 0))  # last-first delivery
    assert frags[conv_key("UDP", ("192.0.2.30", 0), ("198.51.100.40", 0))].packets == 1  # orphan
    assert next(iter(crafted["ipv6_fragments"].conversations.values())).packets == 5
    assert crafted["nanosecond"].per_second[1700001600][0] == 2  # x.999999999 stays in x
    assert crafted["tunnels"].per_proto == {"TCP": (2, 148), "UDP": (2, 292), "ICMP": (2, 196)}
    assert crafted["eth_ipv4"].per_proto["ICMP"][0] == 3  # ICMP error quoting UDP


def test_bad_files_are_written(tmp_path):
    files = write_bad_files(tmp_path)
    assert files["empty"].stat().st_size == 0
    assert read_capture(files["cut_last_record"], strict=False).total_packets == 2
    with pytest.raises(RuntimeError):
        read_capture(files["random_bytes"])


def _expected(truth):
    """Truth JSON mapped onto the Reference shapes (5 protocol buckets, no non-IP flows)."""
    bucket = {"TCP": "TCP", "UDP": "UDP", "ICMP": "ICMP", "ICMPv6": "ICMPV6"}
    per_proto = {}
    for l4, v in truth["per_l4"].items():
        p, b = per_proto.get(bucket.get(l4, "OTHER"), (0, 0))
        per_proto[bucket.get(l4, "OTHER")] = (p + v["packets"], b + v["bytes"])
    convs = {}
    for c in sorted(truth["conversations"], key=lambda c: c["first_frame"]):
        if c["l4"] == "non-IP":
            continue
        ini = (c["initiator"]["addr"], c["initiator"]["port"])
        key = conv_key(
            bucket.get(c["l4"], "OTHER"), ini, (c["responder"]["addr"], c["responder"]["port"])
        )
        p, b, first = convs.get(key, (0, 0, ini))  # several "other" protocols may merge
        convs[key] = (p + c["packets"], b + c["bytes"], first)
    per_second = {int(s): (v["packets"], v["bytes"]) for s, v in truth["per_second"].items()}
    return per_second, per_proto, convs


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not present")
@pytest.mark.parametrize(
    "name", sorted(p.name for p in (CORPUS / "pcap").glob("*")) if CORPUS.is_dir() else []
)
def test_reference_matches_corpus_truth(name):
    truth = json.loads((CORPUS / "truth" / f"{name}.json").read_text())
    ref = read_capture(CORPUS / "pcap" / name)
    per_second, per_proto, convs = _expected(truth)
    assert (ref.total_packets, ref.total_bytes) == (truth["total_packets"], truth["total_bytes"])
    assert ref.per_second == per_second
    assert ref.per_proto == per_proto
    assert {k: (c.packets, c.bytes, c.initiator) for k, c in ref.conversations.items()} == convs
