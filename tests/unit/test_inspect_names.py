"""capture.inspect.names.safe_name(): the one text form of names taken from packets (escaped,
unambiguous, length-capped), and the choke point in capture.batching that applies it to every
name before it leaves capture."""

from __future__ import annotations

import random
import re
import struct

import pytest

from capture.batching import RecordBatcher
from capture.inspect.flow import FlowInspector
from capture.inspect.names import MAX_NAME_BYTES, MAX_RAW, TRUNCATED, safe_name
from packet_records import META_FINGERPRINT, META_SERVER_NAME, decode_batch
from tests.unit.test_inspect_tls import records, spec_hello

# ------------------------------------------------------------------------------ the inverse
_C = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "\\": 0x5C}
_ESCAPE = re.compile(r"\\(?:([abtnvfr\\])|([0-7]{3})|x([0-9A-F]{2})|u([0-9A-F]{4})"
                     r"|U([0-9A-F]{8})|(\.\.\.)$)")


def unescape(text: str) -> tuple[bytes, bool]:
    """The raw bytes a safe_name() text stands for, and whether it was cut. Fails on any
    backslash that is not one of the documented escapes (the text would be ambiguous)."""
    out = bytearray()
    pos, cut = 0, False
    while pos < len(text):
        ch = text[pos]
        if ch != "\\":
            out += ch.encode("utf-8")
            pos += 1
            continue
        m = _ESCAPE.match(text, pos)
        assert m is not None, f"undocumented escape at {pos} in {text!r}"
        c, octal, byte, u4, u8, dots = m.groups()
        if c:
            out.append(_C[c])
        elif octal:
            value = int(octal, 8)
            assert value < 0x20 or value == 0x7F, text  # only controls are written in octal
            out.append(value)
        elif byte:
            assert int(byte, 16) >= 0x80, text  # an ASCII byte is always valid UTF-8
            out.append(int(byte, 16))
        elif u4 or u8:
            cp = int(u4 or u8, 16)
            assert cp >= 0x80 and not chr(cp).isprintable(), text
            assert (u4 is not None) == (cp <= 0xFFFF), text
            out += chr(cp).encode("utf-8")
        else:
            cut = True
        pos = m.end()
    return bytes(out), cut


def check(raw: bytes) -> str:
    """safe_name(raw), checked against every promise of the module."""
    text = safe_name(raw)
    assert isinstance(text, str)
    assert len(text.encode("utf-8")) <= MAX_NAME_BYTES
    assert text.isprintable() or not text  # no control, format, separator or surrogate
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", text)
    assert safe_name(raw[:MAX_RAW]) == text
    back, cut = unescape(text)
    if cut:
        assert raw.startswith(back) and len(raw) > len(back)
        assert len(text.encode("utf-8")) > MAX_NAME_BYTES - 4 - 10  # cut only as far as needed
    else:
        assert back == raw
    return text


# ------------------------------------------------------------------------------ the text
@pytest.mark.parametrize("raw", [
    b"www.example.com", b"toni.lan:31337", b"[2001:db8::1]:8080", b"a b.com", b"<Root>",
    b"_spotify-connect._tcp.local", b"HQ01.DIR.AD.DLA.MIL", b"", b"x" * MAX_NAME_BYTES])
def test_clean_ascii_names_are_unchanged(raw):
    assert check(raw) == raw.decode()


@pytest.mark.parametrize("raw, shown", [
    (b"x\x00y.com", "x\\000y.com"),
    (b"x\x01\x7fy.com", "x\\001\\177y.com"),
    (b"tab\tx.nl\nx", "tab\\tx.nl\\nx"),
    (b"\x07\x08\x0b\x0c\x0d\x1b", "\\a\\b\\v\\f\\r\\033"),
    (b"evil\x1b[2J\x1b]0;title\x07.com", "evil\\033[2J\\033]0;title\\a.com"),  # terminal
    (b"\xc2\x85z", "\\u0085z"),  # C1 (NEL), valid UTF-8
    (b"\xc2\x9b31m", "\\u009B31m"),  # C1 CSI
])
def test_control_characters_are_escaped(raw, shown):
    assert check(raw) == shown


def test_every_single_byte_and_code_point_gives_printable_text():
    for b in range(256):
        check(bytes([b]))
        check(b"a" + bytes([b]) + b"z")
    for cp in list(range(0x80, 0x800)) + list(range(0x2000, 0x2100)) + [0xFEFF, 0xE000,
                                                                       0xE0001, 0x10FFFF]:
        check(chr(cp).encode("utf-8"))


@pytest.mark.parametrize("raw, shown", [
    (b"\xff\xfe", "\\xFF\\xFE"),
    (b"\x80z", "\\x80z"),
    (b"\xc3az", "\\xC3az"),  # a lead byte without its continuation
    (b"\xe2\x82z", "\\xE2\\x82z"),  # cut short
    (b"\xc0\xafz", "\\xC0\\xAFz"),  # overlong "/" (tshark decodes it: we do not)
    (b"\xc0\x80z", "\\xC0\\x80z"),  # overlong NUL
    (b"\xed\xa0\x80z", "\\xED\\xA0\\x80z"),  # an encoded surrogate
    (b"\xf8\x88\x80\x80\x80z", "\\xF8\\x88\\x80\\x80\\x80z"),  # obsolete 5-byte form
    (b"\xf4\x90\x80\x80z", "\\xF4\\x90\\x80\\x80z"),  # beyond U+10FFFF
    ("caf\xe9".encode("latin-1"), "caf\\xE9"),  # Latin-1, not UTF-8
    (b"\xef\xbf\xbd", "\ufffd"),  # a real U+FFFD stays one: it cannot be taken for a byte
])
def test_invalid_utf8_bytes_are_escaped_one_by_one(raw, shown):
    assert check(raw) == shown


@pytest.mark.parametrize("raw, shown", [
    (b"a\\b", "a\\\\b"),
    (b"\\x41.example", "\\\\x41.example"),  # looks like an escape: it is not one
    (b"\\...", "\\\\..."),  # looks like the cut mark: it is not one
    (b"a\\\x01", "a\\\\\\001"),
])
def test_backslash_is_escaped(raw, shown):
    assert check(raw) == shown


@pytest.mark.parametrize("raw, shown", [
    ("café.example".encode(), "café.example"),
    ("例え.テスト".encode(), "例え.テスト"),
    ("Jörg’s iPhone._airplay._tcp.local".encode(), "Jörg’s iPhone._airplay._tcp.local"),
    (b"\xf0\x9f\x98\x80z", "\U0001F600z"),
    (b"\xe2\x80\x8bz", "\\u200Bz"),  # zero-width space: invisible
    ("paypal\u202emoc.evil".encode(), "paypal\\u202Emoc.evil"),  # right-to-left override
    ("a\u00a0b".encode(), "a\\u00A0b"),  # no-break space: reads as a space
    ("a\u2028b".encode(), "a\\u2028b"),  # line separator
    ("a\ue000b".encode(), "a\\uE000b"),  # private use
    (b"\xf3\xa0\x80\x81z", "\\U000E0001z"),  # tag character
])
def test_non_ascii_printable_kept_invisible_escaped(raw, shown):
    assert check(raw) == shown


@pytest.mark.parametrize("raw", [
    b"<script>alert(1)</script>", b"a&b'c\"d", b"<Root>", b"x.com:80/<b>",
    b"&lt;img src=x onerror=alert(1)&gt;"])
def test_markup_is_left_as_plain_text(raw):
    # deliberate (see the module docstring): renderers escape for their own context
    assert check(raw) == raw.decode()


# ------------------------------------------------------------------------------ the length
def test_length_cap_on_ascii():
    assert check(b"x" * 255) == "x" * 255
    assert check(b"x" * 256) == "x" * 251 + TRUNCATED
    assert check(b"x" * 100_000) == "x" * 251 + TRUNCATED
    assert len(check(b"y" * 1000).encode()) == MAX_NAME_BYTES
    # a DNS name is at most 253 characters, an SNI too: they always fit whole
    assert check(b"a" * 253) == "a" * 253


def test_length_cap_never_cuts_a_character_or_an_escape():
    # 3-byte characters: 85 of them are 255 bytes, 86 are cut to 83 and the mark
    assert check("€".encode() * 85) == "€" * 85
    assert check("€".encode() * 86) == "€" * 83 + TRUNCATED
    # escapes of 4 bytes: 63 fit with the mark (252 + 4 = 256 would not)
    text = check(b"\x01" * 100)
    assert text == "\\001" * 62 + TRUNCATED
    text = check(b"a" + b"\xff" * 100)
    assert text == "a" + "\\xFF" * 62 + TRUNCATED
    text = check(b"ab" + "\u202e".encode() * 50)  # \u202E: 6 bytes each
    assert text == "ab" + "\\u202E" * 41 + TRUNCATED
    # a multi-byte character cut by the raw limit is never shown as stray bytes
    for n in range(240, 260):
        text = check(b"a" * n + "€".encode() * 5)
        assert "\\x" not in text


def test_random_names_keep_every_promise():
    rng = random.Random(5)
    pieces = [b"a", b"Z", b".", b"-", b"\\", b"<", b"&", b"\x00", b"\x1b", b"\x7f", b"\xff",
              b"\x80", b"\xc3", "é".encode(), "€".encode(), "\u202e".encode(),
              "\U0001F600".encode(), b"\xc2\x85", "\u00a0".encode()]
    for _ in range(4000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 120)))
        check(raw)
    for _ in range(2000):
        check(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))))


# ------------------------------------------------------------------------------ choke point
def _frame(payload: bytes, proto: int, sport: int, dport: int) -> tuple[bytes, tuple]:
    """An Ethernet/IPv4 frame with a TCP or UDP payload, and its decode_frame tuple."""
    src, dst = bytes((192, 0, 2, 1)) + bytes(12), bytes((192, 0, 2, 2)) + bytes(12)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    frame = bytes(14) + bytes(20) + l4 + payload
    decoded = (4, proto, src, dst, sport, dport, 0x18 if proto == 6 else 0, 0, 0, 34, len(frame))
    return frame, decoded


def _meta_of(payload: bytes, proto: int, sport: int, dport: int) -> list[tuple[int, str]]:
    batcher = RecordBatcher(1, 1000, inspect=True)
    frame, decoded = _frame(payload, proto, sport, dport)
    batcher.add(1_700_000_000 * 10**9, len(frame), frame, decoded)
    return [(kind, text) for _index, kind, text in batcher.pending_meta[0]]


HOSTILE = b"a\x1b[31m\x07\x00\\<b>\xff" + "é".encode()


def test_http_host_leaves_capture_escaped():
    request = b"GET / HTTP/1.1\r\nHost: " + HOSTILE + b":80\r\n\r\n"
    assert _meta_of(request, 6, 40000, 80) == [
        (META_SERVER_NAME, "a\\033[31m\\a\\000\\\\<b>\\xFFé:80")]


def test_dns_name_leaves_capture_escaped():
    name = b"".join(bytes([len(x)]) + x for x in (HOSTILE, b"com")) + b"\x00"
    query = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"
    assert _meta_of(query, 17, 40000, 53) == [
        (META_SERVER_NAME, "a\\033[31m\\a\\000\\\\<b>\\xFFé.com")]


def test_sni_leaves_capture_escaped_and_long_names_are_capped():
    hello = records(spec_hello(sni=HOSTILE))
    (name, fingerprint) = _meta_of(hello, 6, 40000, 443)
    assert name == (META_SERVER_NAME, "a\\033[31m\\a\\000\\\\<b>\\xFFé")
    assert fingerprint[0] == META_FINGERPRINT and fingerprint[1].startswith("t13d")
    (name, _fp) = _meta_of(records(spec_hello(sni=b"\x1b" * 2000)), 6, 40000, 443)
    assert name == (META_SERVER_NAME, "\\033" * 62 + TRUNCATED)


def test_inspector_keeps_bytes_and_shows_the_same_text():
    ins = FlowInspector(6, 40000, 80)
    ins.feed(b"GET / HTTP/1.1\r\nHost: " + b"h\x00" * 5000 + b"\r\n\r\n", True, 1)
    assert ins.raw_name == (b"h\x00" * 5000)[:MAX_RAW]  # bounded: a hostile Host is not kept
    assert ins.server_name == safe_name(ins.raw_name) == "h\\000" * 50 + "h" + TRUNCATED


def test_names_cross_the_record_format_whole():
    """The capped text always fits one meta entry: encode_batch never has to cut it (a cut
    there could end inside an escape)."""
    batcher = RecordBatcher(1, 1000, inspect=True)
    hosts = [b"\xff" * 300, "€".encode() * 100, b"\x1b" * 70 + b"x" * 200, b"ok.example"]
    for i, host in enumerate(hosts):
        frame, decoded = _frame(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 6, 40000 + i,
                                80)
        batcher.add(1_700_000_000 * 10**9 + i, len(frame), frame, decoded)
    batcher.flush(final=True)
    ((_partition, message, _count),) = batcher.take()
    _records, meta = decode_batch(message)
    assert [text for _index, _kind, text in meta] == [safe_name(h) for h in hosts]
    assert [text.endswith(TRUNCATED) for _i, _k, text in meta] == [True, True, True, False]
