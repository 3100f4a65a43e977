"""Line-oriented (text) protocols recognised from the first bytes of a TCP stream:
HTTP/1.x requests and responses, the SSH version banner, and the SMTP, IMAP and POP3
greetings and commands (with their STARTTLS upgrade).

Every function takes the reassembled bytes of one direction from the start of the stream and
answers with a result, None (not this protocol) or NEED_MORE (consistent so far, the answer
needs more bytes). Nothing raises on bad input and every scan is bounded by the caller's
buffer limit and the constants below.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from capture.inspect.names import MAX_RAW

NEED_MORE = "NEED_MORE"  # sentinel: a consistent prefix, decide later

# NamedTuple construction through its Python-level __new__ costs twice tuple.__new__
_new = tuple.__new__
MAX_LINE = 8192  # the request line or status line must end within this many bytes
MAX_HEADERS = 16384  # header bytes scanned for Host

# --------------------------------------------------------------------------------- HTTP/1.x
# request line: method token, one space, target (no spaces/controls), " HTTP/1.x"
_REQUEST_LINE = re.compile(rb"([A-Z][A-Z0-9_-]{1,31}) ([\x21-\x7e\x80-\xff]+) HTTP/1\.[0-9]\r?\n")
_METHOD = re.compile(rb"[A-Z][A-Z0-9_-]{0,31}")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_VERSION_PREFIX = re.compile(rb"H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?")
_RESPONSE_LINE = re.compile(rb"HTTP/1\.[0-9] [0-9]{3}[ \r\n]")
_RESPONSE_LINE_PREFIX = re.compile(
    rb"H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9](?: [0-9]{0,3})?)?)?)?)?)?)?)?")
_HOST = re.compile(rb"\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)


class HttpRequest(NamedTuple):
    method: str
    # the Host header's value, bytes as sent (leading blanks dropped, trailing ones kept, as
    # tshark's http.host; its first names.MAX_RAW bytes, all that names.safe_name() reads, the
    # one function that makes it text), None if absent
    host: bytes | None
    complete: bool  # the header block ended (or Host was found): nothing more to learn


def parse_http_request(buf: bytes) -> HttpRequest | None | str:
    """An HTTP/1.x request at the start of buf."""
    m = _REQUEST_LINE.match(buf)
    if m is None:
        if len(buf) < MAX_LINE and b"\n" not in buf and _request_line_prefix(buf):
            return NEED_MORE
        return None
    method = m.group(1).decode("ascii")
    head = buf[m.end() - 1:MAX_HEADERS]  # from the request line's "\n"
    end = head.find(b"\n\r\n")
    end_lf = head.find(b"\n\n")
    if end < 0 or (0 <= end_lf < end):
        end = end_lf
    block = head if end < 0 else head[:end + 1]
    h = _HOST.search(block)
    if h is not None:
        return _new(HttpRequest, (method, h.group(1)[:MAX_RAW], True))
    if end >= 0 or len(buf) >= MAX_HEADERS:
        return _new(HttpRequest, (method, None, True))
    return _new(HttpRequest, (method, None, False))


def _request_line_prefix(buf: bytes) -> bool:
    """buf (without a newline) can still grow into a request line."""
    parts = buf.split(b" ", 2)
    if not _METHOD.fullmatch(parts[0]):
        return False
    if len(parts) == 1:
        return True
    if len(parts) == 2:
        return not parts[1] or _TARGET.fullmatch(parts[1]) is not None
    return (_TARGET.fullmatch(parts[1]) is not None
            and (not parts[2] or _VERSION_PREFIX.fullmatch(parts[2]) is not None))


def is_http_response(buf: bytes) -> bool | str:
    """An HTTP/1.x status line at the start of buf: True, False or NEED_MORE."""
    if _RESPONSE_LINE.match(buf):
        return True
    if len(buf) < 13 and _RESPONSE_LINE_PREFIX.fullmatch(buf):
        return NEED_MORE
    return False


# --------------------------------------------------------------------------------- SSH
_SSH_BANNER = re.compile(rb"SSH-[12]\.[0-9]{1,2}-")
_SSH_PREFIX = re.compile(rb"S(?:S(?:H(?:-(?:[12](?:\.[0-9]{0,2})?)?)?)?)?")


def is_ssh_banner(buf: bytes) -> bool | str:
    """The SSH identification string ("SSH-2.0-...", "SSH-1.99-...") at the start of buf."""
    if _SSH_BANNER.match(buf):
        return True
    if len(buf) < 9 and _SSH_PREFIX.fullmatch(buf):
        return NEED_MORE
    return False


# --------------------------------------------------------------------------------- mail
SMTP, IMAP, POP3 = "SMTP", "IMAP", "POP3"

_SMTP_GREETING = re.compile(rb"220[ -]")
_SMTP_CLIENT = re.compile(rb"(?:EHLO|HELO)[ \r\n]|(?:MAIL FROM:|STARTTLS\r?\n)", re.IGNORECASE)
_IMAP_GREETING = re.compile(rb"\* (?:OK|PREAUTH|BYE)[ \r\n]", re.IGNORECASE)
_IMAP_CLIENT = re.compile(
    rb"[\x21-\x7e]{1,32} (?:CAPABILITY|LOGIN|AUTHENTICATE|STARTTLS|ID|NOOP|LOGOUT|SELECT|"
    rb"EXAMINE|LIST|LSUB|NAMESPACE|ENABLE|STATUS)[ \r\n]", re.IGNORECASE)
_POP3_GREETING = re.compile(rb"\+OK[ \r\n]", re.IGNORECASE)
_POP3_CLIENT = re.compile(
    rb"(?:USER|PASS|APOP|AUTH|CAPA|STLS|STAT|LIST|RETR|UIDL|TOP|QUIT|NOOP|DELE)[ \r\n]",
    re.IGNORECASE)


def detect_mail(client: bytes, server: bytes) -> str | None:
    """SMTP, IMAP or POP3 from the server's greeting and the client's first command.

    The greeting alone decides when it names the protocol ("ESMTP", "IMAP", "POP3"); a
    "220" greeting alone does not (FTP greets the same way). SMTP's EHLO/HELO decides alone.
    """
    greeting = server[:512]
    first = client[:256]
    if _SMTP_CLIENT.match(first):
        return SMTP
    if _SMTP_GREETING.match(greeting):
        line = greeting.split(b"\n", 1)[0].upper()
        if b"SMTP" in line:
            return SMTP
        return None
    if _IMAP_GREETING.match(greeting):
        line = greeting.split(b"\n", 1)[0].upper()
        if b"IMAP" in line or _IMAP_CLIENT.match(first):
            return IMAP
        return None
    if _POP3_GREETING.match(greeting):
        line = greeting.split(b"\n", 1)[0].upper()
        if b"POP" in line or _POP3_CLIENT.match(first):
            return POP3
        return None
    return None


_STARTTLS = {
    SMTP: re.compile(rb"(?:^|\n)STARTTLS\r?\n", re.IGNORECASE),
    IMAP: re.compile(rb"(?:^|\n)[\x21-\x7e]{1,32} STARTTLS\r?\n", re.IGNORECASE),
    POP3: re.compile(rb"(?:^|\n)STLS\r?\n", re.IGNORECASE),
}
# commands after which the client no longer upgrades this session in practice
_NO_UPGRADE = {
    SMTP: re.compile(rb"(?:^|\n)(?:MAIL FROM:|AUTH |DATA\r?\n|QUIT\r?\n)", re.IGNORECASE),
    IMAP: re.compile(rb"(?:^|\n)[\x21-\x7e]{1,32} (?:LOGIN|AUTHENTICATE|SELECT|LOGOUT)[ \r\n]",
                     re.IGNORECASE),
    POP3: re.compile(rb"(?:^|\n)(?:USER|PASS|APOP|AUTH|RETR|QUIT)[ \r\n]", re.IGNORECASE),
}


def starttls_offset(app: str, client: bytes) -> int | None | str:
    """Where TLS starts in the client stream of a mail session: the offset just after the
    STARTTLS (POP3: STLS) command line; None when the client went on in plain text (it
    authenticated or sent mail without upgrading); NEED_MORE while it may still come."""
    pattern = _STARTTLS.get(app)
    if pattern is None:
        return None
    m = pattern.search(client)
    if m is not None:
        return m.end()
    if _NO_UPGRADE[app].search(client):
        return None
    return NEED_MORE
