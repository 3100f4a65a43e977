"""A scan through the whole pipeline: one-packet flows past PROBE_FLOWS_STORED get no keys of
their own, and everything else stays exact against tshark's reading of the same capture."""

from __future__ import annotations

from collections import Counter

import pytest
import redis
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from tests.pipeline import read_state, replay
from tests.reference import read_capture

pytestmark = pytest.mark.integration

SCANNER = "203.0.113.7"
TARGETS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
PORTS = 1000  # per target: 3,000 one-packet flows
STORED = 10  # PROBE_FLOWS_STORED: per flow write of a partition
PARTITIONS = 12
T0 = 1_700_000_000
ETHER = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}  # (no ARP lookups by scapy)


@pytest.fixture(scope="module")
def scan_capture(tmp_path_factory):
    """SYNs to every port of three hosts, with 40 ordinary flows (a 3-way handshake, data
    both ways) between them, over 10 s."""
    frames = []
    probes = [(target, port) for port in range(1, PORTS + 1) for target in TARGETS]
    for i, (target, port) in enumerate(probes):
        syn = (Ether(**ETHER) / IP(src=SCANNER, dst=target)
               / TCP(sport=40000 + i % 20000, dport=port, flags="S", seq=i))
        syn.time = T0 + i * 10 / len(probes)
        frames.append(syn)
        if i % 75 == 0:  # an ordinary flow among the probes
            client, n = f"192.0.2.{1 + i // 75}", i // 75
            for k, (src, dst, sport, dport, flags, size) in enumerate((
                    (client, TARGETS[0], 50000 + n, 443, "S", 0),
                    (TARGETS[0], client, 443, 50000 + n, "SA", 0),
                    (client, TARGETS[0], 50000 + n, 443, "A", 0),
                    (client, TARGETS[0], 50000 + n, 443, "PA", 300 + n),
                    (TARGETS[0], client, 443, 50000 + n, "PA", 1200 + n))):
                frame = Ether(**ETHER) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport,
                                                             flags=flags)
                if size:
                    frame = frame / Raw(bytes(size))
                frame.time = syn.time + 0.001 * (k + 1)
                frames.append(frame)
        if i % 500 == 0:  # and a one-packet UDP flow
            frame = (Ether(**ETHER) / IP(src=SCANNER, dst=TARGETS[1])
                     / UDP(sport=5000 + i, dport=161))
            frame.time = syn.time + 0.0005
            frames.append(frame)
    path = tmp_path_factory.mktemp("scan") / "scan.pcap"
    wrpcap(str(path), frames)
    return path, read_capture(path)


def test_a_scan_leaves_keys_for_a_bounded_number_of_probes_and_exact_figures(pipeline_env,
                                                                               scan_capture):
    path, ref = scan_capture
    # flow hashes only at the first write of each partition and once nothing is left to read:
    # at most two flow writes a partition
    env = dict(pipeline_env, PROBE_FLOWS_STORED=str(STORED), FLOW_WRITE_INTERVAL_MS="600000",
               FLUSH_MAX_FLOWS="1000000")
    replay(path, env)
    state = read_state(env["REDIS_URL"])
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)

    # every frame counts in the series, per second and per protocol
    assert state.per_second == ref.per_second
    assert state.per_proto == ref.per_proto
    assert state.counters["records"] == ref.total_packets

    convs = {(a, b): c for (_proto, a, b), c in ref.conversations.items()}
    probes = {k for k, c in convs.items() if c.packets == 1}
    assert len(probes) == len(TARGETS) * PORTS + 6
    stored = {(k[1], k[2]): m for k, m in state.flows.items()}
    # every flow of more than one packet has its hash, and every hash is exact
    assert {k for k in convs if k not in probes} <= set(stored)
    for key, meta in stored.items():
        conv = convs[key]
        assert (int(meta["packets"]), int(meta["bytes"])) == (conv.packets, conv.bytes)
        assert (meta["src"], int(meta["sport"])) == conv.initiator
    # the probes: a bounded number got keys, the others were counted
    stored_probes = len(probes & set(stored))
    assert STORED <= stored_probes <= 2 * STORED * PARTITIONS
    assert state.counters["flows_not_stored"] == len(probes) - stored_probes
    # the flows in the top-N sets are those with hashes, with their exact totals
    ids = {m["id"]: int(m["bytes"]) for m in stored.values()}
    assert {member: int(score) for member, score in state.top.items()} == ids
    endpoints = r.zrange("flows:top:endpoints", 0, -1, withscores=True)
    assert sorted(int(score) for _m, score in endpoints) == sorted(ids.values())
    # the hosts and applications count every frame of every flow, stored or not
    hosts: Counter = Counter()
    for (a, b), conv in convs.items():
        hosts[a[0]] += conv.bytes
        if b[0] != a[0]:
            hosts[b[0]] += conv.bytes
    assert {h: int(v) for h, v in state.top_hosts.items()} == dict(hosts)
    assert sum(state.top_apps.values()) == ref.total_bytes
    # and the scan left no key of its own beyond those flows
    assert sum(1 for _ in r.scan_iter("flow:*", count=1000)) == len(stored)


def test_a_probe_held_back_gets_its_keys_from_its_first_packet_when_it_has_more(
        pipeline_env, tmp_path):
    """Probes held back by early flow writes, 20 of them answered 30 s later (read by later
    polls): those get hashes, top-N entries and windows that count their first packet too."""
    frames = []
    for i in range(600):
        syn = (Ether(**ETHER) / IP(src=SCANNER, dst=TARGETS[i % 3])
               / TCP(sport=40000 + i, dport=1 + i, flags="S"))
        syn.time = T0 + i * 0.01
        frames.append(syn)
    for i in range(0, 600, 30):
        answer = (Ether(**ETHER) / IP(src=TARGETS[i % 3], dst=SCANNER)
                  / TCP(sport=1 + i, dport=40000 + i, flags="SA") / Raw(bytes(i)))
        answer.time = T0 + 30 + i * 0.01
        frames.append(answer)
    path = tmp_path / "answered.pcap"
    wrpcap(str(path), frames)
    ref = read_capture(path)
    env = dict(pipeline_env, PROBE_FLOWS_STORED="1", RECORDS_PER_MESSAGE="10",
               MAX_POLL_RECORDS="20", FLUSH_INTERVAL_MS="10", FLOW_WRITE_INTERVAL_MS="10")
    replay(path, env)
    state = read_state(env["REDIS_URL"])
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    assert state.per_second == ref.per_second
    convs = {(a, b): c for (_proto, a, b), c in ref.conversations.items()}
    stored = {(k[1], k[2]): m for k, m in state.flows.items()}
    answered = {k for k, c in convs.items() if c.packets == 2}
    assert len(answered) == 20 and answered <= set(stored)
    for key, meta in stored.items():
        conv = convs[key]
        assert (int(meta["packets"]), int(meta["bytes"])) == (conv.packets, conv.bytes)
        assert (meta["src"], int(meta["sport"])) == conv.initiator
        assert float(meta["first_seen"]) == pytest.approx(float(conv.first_ts), abs=1e-6)
    unanswered_stored = len(set(stored) - answered)
    assert unanswered_stored < 600 - 20  # some were held back ...
    assert state.counters["flows_not_stored"] == 600 - 20 - unanswered_stored
    ids = {m["id"]: int(m["bytes"]) for m in stored.values()}
    assert {member: int(score) for member, score in state.top.items()} == ids
    # ... and the windows count every byte of the flows they hold (the replay spans one hour)
    window = {member.rsplit("(", 1)[1].rstrip(")"): int(score)
              for member, score in r.zrange("flows:top:1h:endpoints", 0, -1, withscores=True)}
    assert window == ids
