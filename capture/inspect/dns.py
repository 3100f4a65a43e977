"""DNS message parsing for flow labelling: header sanity, the first question name, and a
bounded walk over the resource records to check that the message is self-consistent.

Payloads are hostile: nothing here raises on bad input, every loop is bounded (at most
MAX_POINTER_JUMPS compression pointers per name, pointers must point backwards, labels of at
most 63 bytes, names of at most 255 wire bytes, at most MAX_RECORDS records walked).

Names are returned as bytes, as tshark 4.0 joins them for ``dns.qry.name``: the labels' bytes
joined with "." (a "." inside a label is kept as is: tshark does not escape it either), the root
name as b"<Root>". capture.inspect.names.safe_name() makes them text (it writes control bytes
as tshark's format_text() does for DNS names).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

MAX_POINTER_JUMPS = 20
MAX_LABEL = 63
MAX_NAME = 255  # wire bytes of a name, length octets included
MAX_RECORDS = 64  # records walked per message to check its consistency
HEADER_LEN = 12

_HEADER = struct.Struct("!HHHHHH").unpack_from
_U16 = struct.Struct("!H").unpack_from
_TYPE_CLASS = struct.Struct("!HH").unpack_from
_RR_TAIL = struct.Struct("!HHIH").unpack_from  # type, class, ttl, rdlength

# Opcodes in use: QUERY, IQUERY (obsolete), STATUS, NOTIFY, UPDATE, DSO
OPCODES = frozenset((0, 1, 2, 4, 5, 6))

# NamedTuple construction through its Python-level __new__ costs twice tuple.__new__
_new = tuple.__new__

# Outcomes of a name walk besides a name: the message ends inside the name, or it is invalid
TRUNCATED = -1
INVALID = -2
ROOT = b"<Root>"  # the root name, as tshark shows it


class DnsMessage(NamedTuple):
    """What parse_dns() found. name/qtype/qclass are those of the first question (None when
    the message has no complete first question). complete: the whole message (header, every
    question and record, up to MAX_RECORDS of them) parsed and ended exactly at the end of
    the payload; False when the payload ends early (a truncated capture or IP fragment)."""

    response: bool
    opcode: int
    rcode: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int
    name: bytes | None
    qtype: int | None
    qclass: int | None
    complete: bool
    trailing: int = 0


def parse_dns(msg: bytes, max_questions: int = 16, walk_records: bool = True
              ) -> DnsMessage | None:
    """Parse a DNS message (UDP payload, or a TCP message without its length prefix).

    Returns None when the bytes are not a consistent DNS message; a DnsMessage with
    complete=False when everything present is consistent but the payload ends early.
    walk_records=False stops after the questions once the first name is read (on the DNS
    ports the question decides: checking every answer record would only cost time).
    """
    n = len(msg)
    if n < 4:
        return None
    flags = _U16(msg, 2)[0]
    opcode = (flags >> 11) & 0xF
    if opcode not in OPCODES:
        return None
    response = bool(flags & 0x8000)
    rcode = flags & 0xF
    if n < HEADER_LEN:
        # a header cut short: only what there is can be checked
        if n >= 6 and _U16(msg, 4)[0] > max_questions:
            return None
        return _new(DnsMessage, (response, opcode, rcode, 0, 0, 0, 0, None, None, None, False, 0))
    _ident, _flags, qd, an, ns, ar = _HEADER(msg, 0)
    if qd > max_questions:
        return None
    # every question takes >= 5 bytes and every record >= 11: counts the payload cannot hold
    # are a lie (allowing for a truncated payload, the counts must still fit a 64 KiB message)
    if qd * 5 + (an + ns + ar) * 11 > 65535 - HEADER_LEN:
        return None
    pos = HEADER_LEN
    name = qtype = qclass = None
    for i in range(qd):
        end, text = read_name(msg, pos, i == 0)
        if end == INVALID:
            return None
        if end == TRUNCATED or end + 4 > n:
            return _new(DnsMessage, (response, opcode, rcode, qd, an, ns, ar, name, qtype, qclass,
                                     False, 0))
        if i == 0:
            name = text
            qtype, qclass = _TYPE_CLASS(msg, end)
        pos = end + 4
    if not walk_records and name is not None:
        return _new(DnsMessage, (response, opcode, rcode, qd, an, ns, ar, name, qtype, qclass,
                                 True, 0))
    records = an + ns + ar
    for _ in range(min(records, MAX_RECORDS)):
        end, _text = read_name(msg, pos, False)
        if end == INVALID:
            return None
        if end == TRUNCATED or end + 10 > n:
            return _new(DnsMessage, (response, opcode, rcode, qd, an, ns, ar, name, qtype, qclass,
                                     False, 0))
        rdlength = _RR_TAIL(msg, end)[3]
        pos = end + 10 + rdlength
        if pos > n:
            return _new(DnsMessage, (response, opcode, rcode, qd, an, ns, ar, name, qtype, qclass,
                                     False, 0))
    trailing = n - pos if records <= MAX_RECORDS else 0
    return _new(DnsMessage, (response, opcode, rcode, qd, an, ns, ar, name, qtype, qclass, True,
                             trailing))


def read_name(msg: bytes, pos: int, want_text: bool) -> tuple[int, bytes | None]:
    """Walk the name at pos. Returns (offset just after the name in the message, the name's
    bytes (see the module docstring) when want_text, else None), or (TRUNCATED, None) /
    (INVALID, None)."""
    n = len(msg)
    end = -1  # where the name ends in the message (after the first pointer, if any)
    jumps = 0
    wire = 0
    labels: list[bytes] | None = [] if want_text else None
    while True:
        if pos >= n:
            return TRUNCATED, None
        length = msg[pos]
        if length == 0:
            wire += 1
            if wire > MAX_NAME:
                return INVALID, None
            if end < 0:
                end = pos + 1
            break
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                return TRUNCATED, None
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            # a pointer must point backwards, into the message body, and at most 20 of them
            if target >= pos or target < HEADER_LEN or jumps >= MAX_POINTER_JUMPS:
                return INVALID, None
            jumps += 1
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if kind:  # 0x40 extended and 0x80 reserved label types
            return INVALID, None
        wire += length + 1
        if wire > MAX_NAME:
            return INVALID, None
        if pos + 1 + length > n:
            return TRUNCATED, None
        if labels is not None:
            labels.append(msg[pos + 1:pos + 1 + length])
        pos += 1 + length
    if labels is None:
        return end, None
    if not labels:
        return end, ROOT
    return end, b".".join(labels)
