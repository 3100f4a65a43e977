"""Application labels and server names of the 45 real captures, end to end through the real
broker and Redis, against tshark's labels and names per conversation (the truth files)."""

from __future__ import annotations

import pytest

from tests.integration.test_corpus import conversation_key, truth_of

pytestmark = [pytest.mark.integration, pytest.mark.corpus]

# our label -> the tshark protocol names it agrees with
AGREES = {"DNS": {"dns"}, "MDNS": {"mdns"}, "HTTP": {"http"}, "TLS": {"tls"},
          "QUIC": {"quic", "gquic"}, "SSH": {"ssh"}, "NTP": {"ntp"}, "DHCP": {"dhcp"},
          "DHCPV6": {"dhcpv6"}, "SMTP": {"smtp"}, "IMAP": {"imap"}, "POP3": {"pop"}}
TARGETS = set().union(*AGREES.values())
NAME_FIELDS = ("tls_sni", "http_host", "gquic_sni", "dns_qry_name")


def expected_name(meta: dict) -> list[str]:
    """The names tshark saw for the conversation, from the field our server_name stands for."""
    for field in NAME_FIELDS:
        if meta.get(field):
            return meta[field]
    return []


def compare(corpus_dir: str, corpus_states: dict) -> tuple[int, int, list[str], list[str]]:
    labelled = agreed = 0
    label_diffs, name_diffs = [], []
    for name in sorted(corpus_states):
        truth = truth_of(corpus_dir, name)
        ours = corpus_states[name].flows
        for conv in truth["conversations"]:
            if conv["l4"] == "non-IP":
                continue
            meta = ours.get(conversation_key(conv), {})
            app = meta.get("app", "UNKNOWN")
            if conv["app"] in TARGETS:
                labelled += 1
                if conv["app"] in AGREES.get(app, ()):
                    agreed += 1
                else:
                    label_diffs.append(f"{name} {conv['key']}: tshark {conv['app']}, ours {app}")
            names = expected_name(conv["meta"])
            if names and meta.get("server_name") not in names:
                name_diffs.append(f"{name} {conv['key']}: tshark {names}, "
                                  f"ours {meta.get('server_name')}")
    return labelled, agreed, label_diffs, name_diffs


def test_labels_agree_with_tshark_and_names_are_exact(corpus_dir, corpus_states):
    labelled, agreed, label_diffs, name_diffs = compare(corpus_dir, corpus_states)
    report = "\n".join(label_diffs + name_diffs)
    print(f"\nlabels: {agreed}/{labelled} agree ({100 * agreed / labelled:.1f}%)\n{report}")
    assert labelled > 200
    assert agreed / labelled >= 0.98, report
    assert not name_diffs, report


def test_flow_hashes_carry_labels(corpus_states):
    state = corpus_states["443-safari.pcap"]
    (flow,) = state.flows.values()
    assert flow["app"] == "TLS" and flow["server_name"] == "www.ntop.org"
    assert flow["fingerprint"] == "t12d2010h2_2a284e3b0c56_f05fdf8c38a9"  # nDPI's JA4 too


def test_top_sets_and_app_series_add_up(corpus_states):
    for name in ("android.pcap", "KakaoTalk_chat.pcap", "6in4tunnel.pcap"):
        state = corpus_states[name]
        total = sum(b for _, b in state.per_second.values())
        assert sum(state.top_apps.values()) == total, name
        assert sum(b for _, b in state.per_app.values()) == total, name
        # every flow's bytes count for both of its endpoints
        flows_bytes = sum(int(m["bytes"]) for m in state.flows.values())
        same_ends = sum(int(m["bytes"]) for m in state.flows.values() if m["src"] == m["dst"])
        assert sum(state.top_hosts.values()) == 2 * flows_bytes - same_ends, name

