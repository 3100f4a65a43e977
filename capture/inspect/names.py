"""The one text form of every name taken from a packet (HTTP Host, TLS/QUIC SNI, DNS query
name, ALPN protocol names): safe_name(raw bytes) -> str.

Parsers return the name's bytes as they were on the wire; nothing else turns packet bytes into
text. capture.batching applies safe_name() to every meta entry where it is appended to a
message, so no name leaves capture without it (capture.inspect.flow.FlowInspector.server_name
shows the same text for tests and logs).

The text is unambiguous, printable and short:

* UTF-8 is decoded; a printable character stays as it is (IDN names in UTF-8, mDNS instance
  names), and a printable ASCII name without a backslash (nearly every real name) comes out
  exactly as it went in, as tshark shows it.
* Escapes, as tshark 4.0's format_text() writes them for DNS names: ``\\a \\b \\t \\n \\v \\f
  \\r`` for those controls, ``\\ooo`` (three octal digits) for the other C0 controls and DEL,
  ``\\uXXXX`` / ``\\UXXXXXXXX`` for every other non-printable code point (C1 controls,
  format characters such as bidi overrides and zero-width spaces, line and paragraph
  separators, non-ASCII spaces, private use, unassigned: what str.isprintable() refuses).
* Two additions make it unambiguous where tshark is not: a backslash is written ``\\\\``, and
  a byte that is not part of valid UTF-8 (a stray byte >= 0x80, a cut sequence, an overlong
  form, an encoded surrogate) is written ``\\xNN`` instead of tshark's U+FFFD (which loses the
  byte and reads the same as a real U+FFFD). ``\\xNN`` is always a byte >= 0x80: an ASCII
  byte is always valid UTF-8.
* At most MAX_NAME_BYTES (255) UTF-8 bytes, the most one meta entry of the record format holds
  (packet_records.encode_batch): 255 characters for an ASCII name, so every DNS name (253
  characters at most) and every real SNI fits whole. A longer text is cut after a whole
  character or escape (never inside one) and ends with TRUNCATED (``\\...``), which no name
  can otherwise produce (a backslash from the packet is ``\\\\``). Only the first
  MAX_NAME_BYTES + 1 raw bytes matter: each raw byte gives at least one byte of text.

So ``\\`` in the text always starts one of: ``\\\\``, ``\\a`` ``\\b`` ``\\t`` ``\\n`` ``\\v``
``\\f`` ``\\r``, ``\\ooo``, ``\\xNN``, ``\\uXXXX``, ``\\UXXXXXXXX``, or the final ``\\...``.

How tshark 4.0 itself shows odd bytes (``-T fields``), for comparison: ``dns.qry.name`` as
above but with U+FFFD for invalid UTF-8 and a bare backslash; ``http.host`` and the TLS/gQUIC
SNI as ASCII with every byte >= 0x80 as U+FFFD, a tab as ``\\t`` and the other control bytes
(ESC, BEL, ...) raw, straight to the terminal (checked with tshark 4.0.17). Names with such
bytes differ from tshark's on purpose; all others are equal (tests/integration/
test_corpus_dpi.py; tests/unit/test_inspect_corpus.py compares random DNS names with tshark's).

Markup (``< > " ' &``) is left as it is, deliberately: those characters are printable, legal in
DNS labels and (``' &``) in an HTTP Host, and the name is data stored in Redis, read by
redis-cli, Grafana, scripts and JSON exports. Escaping for one renderer (HTML entities, say)
would corrupt the name for every other one (Grafana, which renders cell values as text, would
show ``&amp;``), would make such names differ from tshark's, and cannot cover every context
anyway (URLs, Lua, CSV each need their own). Each renderer escapes for its own context, as
Grafana's table and stat panels do; what this function guarantees is that no name carries a
control character (no terminal escape sequence, no NUL, no line break) or an invisible or
direction-changing character.
"""

from __future__ import annotations

MAX_NAME_BYTES = 255
"""Longest text of a name in UTF-8 bytes (one meta entry of the record format)."""
MAX_RAW = MAX_NAME_BYTES + 1
"""Raw bytes that decide the text: safe_name(raw) == safe_name(raw[:MAX_RAW]) (a caller may
keep only that many)."""
TRUNCATED = "\\..."
"""Ends a text that was cut to fit MAX_NAME_BYTES."""

_C_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r"}
# The text of each ASCII character
_ASCII = [_C_ESCAPES.get(c) or f"\\{c:03o}" if c < 0x20 or c == 0x7F
          else "\\\\" if c == 0x5C else chr(c) for c in range(128)]
_CUT = MAX_NAME_BYTES - len(TRUNCATED)


def safe_name(raw: bytes) -> str:
    """The text of a name taken from a packet (see the module docstring)."""
    if len(raw) <= MAX_NAME_BYTES and raw.isascii():
        text = raw.decode("ascii")
        if text.isprintable() and "\\" not in text:  # for ASCII: 0x20-0x7e, no backslash
            return text
    return _escape(raw)


def _escape(raw: bytes) -> str:
    raw = raw[:MAX_RAW]
    # invalid bytes come out as the lone surrogates U+DC80-U+DCFF (valid UTF-8 has none)
    text = raw.decode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES and text.isprintable() and "\\" not in text:
        return text  # printable non-ASCII UTF-8: the text is the raw bytes, so it fits
    pieces: list[str] = []
    size = 0  # UTF-8 bytes of pieces
    cut = -1  # number of pieces that fit with TRUNCATED after them
    for ch in text:
        cp = ord(ch)
        if cp < 0x80:
            piece = _ASCII[cp]
            n = len(piece)
        elif 0xDC80 <= cp <= 0xDCFF:
            piece = f"\\x{cp - 0xDC00:02X}"
            n = 4
        elif ch.isprintable():
            piece = ch
            n = 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
        else:
            piece = f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"
            n = len(piece)
        if cut < 0 and size + n > _CUT:
            cut = len(pieces)
        size += n
        if size > MAX_NAME_BYTES:
            return "".join(pieces[:cut]) + TRUNCATED
        pieces.append(piece)
    return "".join(pieces)
