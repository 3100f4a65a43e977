"""DNS message parsing for flow labelling: header sanity, the first question name, and a
bounded walk over the resource records to check that the message is self-consistent.

Payloads are hostile: nothing here raises on bad input, every loop is bounded (at most
MAX_POINTER_JUMPS compression pointers per name, pointers must point backwards, labels of at
most 63 bytes, names of at most 255 wire bytes, at most MAX_RECORDS records walked).

Names are returned in tshark's text form (tshark 4.0 ``dns.qry.name``): labels joined with
".", the bytes shown as tshark's format_text() shows them: printable ASCII as is; \\a \\b \\f
\\n \\r \\t \\v and other ASCII controls as \\ooo octal; UTF-8 sequences decoded (invalid ones
become U+FFFD), non-printable code points as \\uXXXX / \\UXXXXXXXX; the root name as <Root>.
A "." inside a label is kept as is (tshark does not escape it either).
"""

from __future__ import annotations

import struct
import unicodedata
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
    name: str | None
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


def read_name(msg: bytes, pos: int, want_text: bool) -> tuple[int, str | None]:
    """Walk the name at pos. Returns (offset just after the name in the message, text or
    None), or (TRUNCATED, None) / (INVALID, None)."""
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
        return end, "<Root>"
    return end, tshark_text(b".".join(labels))


_C_ESCAPES = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}
_REPLACEMENT = "\ufffd"
_NON_PRINTABLE = frozenset(("Cc", "Cf", "Cn", "Cs"))  # GLib's g_unichar_isprint() is False


def tshark_text(raw: bytes) -> str:
    """Bytes as tshark 4.0's format_text() shows them (see the module docstring)."""
    if raw.isascii():
        text = raw.decode("ascii")
        if text.isprintable():
            return text
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c < 0x80:
            if 0x20 <= c < 0x7F:
                out.append(chr(c))
            else:
                out.append(_C_ESCAPES.get(c) or f"\\{c:03o}")
            i += 1
            continue
        # a lead byte of a (possibly obsolete 5- or 6-byte) UTF-8 sequence
        if c & 0xE0 == 0xC0:
            need, cp = 1, c & 0x1F
        elif c & 0xF0 == 0xE0:
            need, cp = 2, c & 0x0F
        elif c & 0xF8 == 0xF0:
            need, cp = 3, c & 0x07
        elif c & 0xFC == 0xF8:
            need, cp = 4, c & 0x03
        elif c & 0xFE == 0xFC:
            need, cp = 5, c & 0x01
        else:  # a continuation byte without a lead, or 0xFE / 0xFF
            out.append(_REPLACEMENT)
            i += 1
            continue
        j = i + 1
        while need and j < n and raw[j] & 0xC0 == 0x80:
            cp = (cp << 6) | (raw[j] & 0x3F)
            j += 1
            need -= 1
        i = j
        if need or 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF:
            out.append(_REPLACEMENT)  # cut short, a surrogate or beyond Unicode
        elif unicodedata.category(chr(cp)) in _NON_PRINTABLE:
            out.append(f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}")
        else:
            out.append(chr(cp))
    return "".join(out)
