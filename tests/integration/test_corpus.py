"""The 45 real captures of ../shared/corpus replayed end to end through the real broker and
Redis, compared value for value with the independent tshark truth files (tunnels included:
flows and protocols are those of the innermost IP header)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import SHARED_CORPUS
from tests.pipeline import flow_totals

pytestmark = [pytest.mark.integration, pytest.mark.corpus]

L4_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPv6": 58, "ESP": 50, "GRE": 47, "AH": 51,
              "SCTP": 132, "IPv6-NoNxt": 59, "IGMP": 2}
BUCKETS = {"non-IP": "OTHER", "other": "OTHER", "ICMPv6": "ICMPV6"}


def _captures() -> list[str]:
    pcap_dir = os.path.join(SHARED_CORPUS, "pcap")
    return sorted(os.listdir(pcap_dir)) if os.path.isdir(pcap_dir) else []


def truth_of(corpus_dir: str, name: str) -> dict:
    with open(os.path.join(corpus_dir, "truth", name + ".json")) as fh:
        return json.load(fh)


def expected_per_proto(truth: dict) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for name, v in truth["per_l4"].items():
        cell = out.setdefault(BUCKETS.get(name, name), [0, 0])
        cell[0] += v["packets"]
        cell[1] += v["bytes"]
    return {k: tuple(v) for k, v in out.items()}


def conversation_key(conv: dict) -> tuple:
    """(IP protocol number, endpoint, endpoint) of a truth conversation, endpoints sorted."""
    proto = L4_NUMBERS.get(conv["l4"]) or int(conv["l4"].split("-")[1])
    ends = sorted([(conv["initiator"]["addr"], conv["initiator"]["port"]),
                   (conv["responder"]["addr"], conv["responder"]["port"])])
    return (proto, ends[0], ends[1])


def expected_flows(truth: dict) -> dict[tuple, tuple[int, int, tuple[str, int]]]:
    return {
        conversation_key(c): (c["packets"], c["bytes"],
                              (c["initiator"]["addr"], c["initiator"]["port"]))
        for c in truth["conversations"]
        if c["l4"] != "non-IP"  # no 5-tuple: these frames count in global and OTHER only
    }


@pytest.mark.parametrize("name", _captures())
def test_per_second_totals_equal_tshark(name, corpus_states, corpus_dir):
    truth = truth_of(corpus_dir, name)
    expected = {int(s): (v["packets"], v["bytes"]) for s, v in truth["per_second"].items()}
    assert corpus_states[name].per_second == expected


@pytest.mark.parametrize("name", _captures())
def test_per_protocol_and_flows_equal_tshark(name, corpus_states, corpus_dir):
    truth = truth_of(corpus_dir, name)
    state = corpus_states[name]
    assert state.per_proto == expected_per_proto(truth)
    assert flow_totals(state) == expected_flows(truth)
    # flows:top:bytes holds every flow with its total bytes
    assert {m["id"]: float(m["bytes"]) for m in state.flows.values()} == state.top
    assert state.counters.get("records") == truth["total_packets"]
