"""Datagram protocols recognised from one UDP payload: NTP, DHCP (BOOTP) and DHCPv6.

Each check is a content test; the caller also requires the protocol's port on one side of the
flow, as tshark does (these formats are too short or too loose to be told apart from random
bytes on an arbitrary port). Nothing raises on bad input; every loop is bounded.
"""

from __future__ import annotations

import struct

NTP_PORT = 123
DHCP_PORTS = frozenset((67, 68))
DHCPV6_PORTS = frozenset((546, 547))

NTP_MIN = 48  # header with the four timestamps
DHCP_MIN = 240  # BOOTP fixed part (236) + magic cookie
DHCP_COOKIE = b"\x63\x82\x53\x63"
DHCPV6_RELAY = frozenset((12, 13))  # RELAY-FORW, RELAY-REPL: 34-byte header
DHCPV6_MAX_TYPE = 36  # message types assigned by IANA (RFC 8415 and later)
MAX_OPTIONS = 128

_U16X2 = struct.Struct("!HH").unpack_from


def is_ntp(payload: bytes) -> bool:
    """An NTP (v1-v4) time packet: 48+ bytes, version 1..4, mode 1..5 (symmetric active /
    passive, client, server, broadcast), stratum 0..16. NTP control (mode 6) and private
    (mode 7) messages are shorter and count as NTP too when at least 12 bytes long."""
    if len(payload) < 12:
        return False
    first = payload[0]
    version = (first >> 3) & 7
    mode = first & 7
    if not 1 <= version <= 4:
        return False
    if mode in (6, 7):
        return True
    if mode == 0 or len(payload) < NTP_MIN:
        return False
    return payload[1] <= 16


def is_dhcp(payload: bytes) -> bool:
    """A BOOTP/DHCP message: op 1 (request) or 2 (reply), hardware address length <= 16,
    hops <= 32 and the DHCP magic cookie after the 236-byte fixed part."""
    return (len(payload) >= DHCP_MIN and payload[0] in (1, 2) and payload[2] <= 16
            and payload[3] <= 32 and payload[236:240] == DHCP_COOKIE)


def is_dhcpv6(payload: bytes) -> bool:
    """A DHCPv6 message: a known message type and options that exactly fill the payload."""
    if len(payload) < 4:
        return False
    msg_type = payload[0]
    if not 1 <= msg_type <= DHCPV6_MAX_TYPE:
        return False
    pos = 34 if msg_type in DHCPV6_RELAY else 4
    n = len(payload)
    if pos > n:
        return False
    for _ in range(MAX_OPTIONS):
        if pos == n:
            return True
        if pos + 4 > n:
            return False
        _code, length = _U16X2(payload, pos)
        pos += 4 + length
        if pos > n:
            return False
    return True  # more options than walked: consistent so far
