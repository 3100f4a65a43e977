"""Captures of our own making (IPv6 extension headers, VLAN/QinQ, fragments, snap-length
truncation, lying IP lengths, every supported link type, pcapng with two interfaces,
nanosecond and big-endian files) replayed end to end and compared with tshark's reading."""

from __future__ import annotations

import pytest

from tests.captures import write_captures
from tests.pipeline import flow_totals
from tests.reference import read_capture

pytestmark = pytest.mark.integration

def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return sorted(write_captures(tmp))


PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPV6": 58}


@pytest.mark.parametrize("name", _names())
def test_crafted_capture_equals_tshark(name, crafted_files, crafted_states):
    ref = read_capture(crafted_files[name])
    state = crafted_states[name]
    assert state.per_second == ref.per_second
    assert state.per_proto == ref.per_proto
    expected = {}
    for (proto, a, b), conv in ref.conversations.items():
        expected[(PROTO_NUMBERS.get(proto, proto), a, b)] = (conv.packets, conv.bytes,
                                                            conv.initiator)
    got = {(k[0] if k[0] in PROTO_NUMBERS.values() else "OTHER", k[1], k[2]): v
           for k, v in flow_totals(state).items()}
    assert got == expected
