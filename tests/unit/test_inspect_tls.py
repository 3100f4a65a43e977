"""capture.inspect.tls: ClientHello parsing, JA4 (FoxIO spec), reassembly and hostile input."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import struct
import time

import pytest

from capture.inspect.names import MAX_RAW, safe_name
from capture.inspect.tls import (
    MAX_STREAM,
    NEED_MORE,
    ClientHello,
    ja4,
    parse_handshake,
    parse_tls_stream,
)

# ---------------------------------------------------------------------------------------------
# ClientHello builder (bytes made by hand, no TLS library)
# ---------------------------------------------------------------------------------------------


def ext(ext_type: int, body: bytes = b"") -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    return ext(0x0000, struct.pack("!H", len(entry)) + entry)


def alpn_ext(*protocols: bytes) -> bytes:
    body = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(0x0010, struct.pack("!H", len(body)) + body)


def versions_ext(*versions: int) -> bytes:
    return ext(0x002B, bytes([2 * len(versions)]) + struct.pack(f"!{len(versions)}H", *versions))


def sig_algs_ext(*algs: int) -> bytes:
    return ext(0x000D, struct.pack("!H", 2 * len(algs)) + struct.pack(f"!{len(algs)}H", *algs))


def hello_body(ciphers, extensions, legacy=0x0303, session_id=b"\x5a" * 32,
               with_ext_block=True) -> bytes:
    body = struct.pack("!H", legacy) + bytes(range(32)) + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", 2 * len(ciphers)) + struct.pack(f"!{len(ciphers)}H", *ciphers)
    body += b"\x01\x00"  # compression methods: null
    if with_ext_block:
        exts = b"".join(extensions)
        body += struct.pack("!H", len(exts)) + exts
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes=None, version=0x0301) -> bytes:
    """The handshake message in TLS records of the given fragment sizes (one record if None)."""
    sizes = list(sizes or [len(message)])
    out, pos = b"", 0
    while pos < len(message):
        size = sizes.pop(0) if sizes else len(message) - pos
        frag = message[pos:pos + size]
        out += b"\x16" + struct.pack("!HH", version, len(frag)) + frag
        pos += size
    return out


# The worked example of the FoxIO JA4 specification (technical_details/JA4.md)
SPEC_CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013,
                0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
SPEC_EXT_ORDER = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023,
                  0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
SPEC_SIG_ALGS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
SPEC_JA4 = "t13d1516h2_8daaf6152771_e5627efa2ab1"


def spec_extensions(sni=b"example.com", alpn=(b"h2", b"http/1.1"), sig_algs=SPEC_SIG_ALGS,
                    versions=(0x0304, 0x0303), grease=False) -> list[bytes]:
    out = []
    for ext_type in SPEC_EXT_ORDER:
        if ext_type == 0x0000:
            out.append(sni_ext(sni))
        elif ext_type == 0x0010:
            out.append(alpn_ext(*alpn))
        elif ext_type == 0x000D:
            out.append(sig_algs_ext(*sig_algs))
        elif ext_type == 0x002B:
            out.append(versions_ext(*versions))
        else:
            out.append(ext(ext_type, b"\x00" * (ext_type % 5)))
    if grease:
        out.insert(0, ext(0x0A0A))
        out.append(ext(0xFAFA, b"\x00"))
    return out


def spec_hello(**kwargs) -> bytes:
    grease = kwargs.get("grease", False)
    ciphers = ([0x2A2A] if grease else []) + SPEC_CIPHERS
    return handshake(hello_body(ciphers, spec_extensions(**kwargs)))


def expected_ja4(prefix: str, ciphers, exts, sig_algs) -> str:
    """Independent JA4 b/c computation for the assertions."""
    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:12] if text else "000000000000"

    part_b = h(",".join(f"{c:04x}" for c in sorted(ciphers)))
    kept = sorted(e for e in exts if e not in (0, 0x10))
    raw_c = ",".join(f"{e:04x}" for e in kept)
    if kept and sig_algs:
        raw_c += "_" + ",".join(f"{s:04x}" for s in sig_algs)
    return f"{prefix}_{part_b}_{h(raw_c) if kept else '000000000000'}"


# ---------------------------------------------------------------------------------------------
# JA4
# ---------------------------------------------------------------------------------------------


def test_spec_example():
    hello = parse_tls_stream(records(spec_hello()))
    assert isinstance(hello, ClientHello)
    assert hello.ja4 == SPEC_JA4
    assert hello.sni == b"example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.versions == (0x0304, 0x0303)
    assert ja4(False, 0x0304, True, SPEC_CIPHERS, SPEC_EXT_ORDER, b"h2", []) == \
        "t13d1516h2_8daaf6152771_6d807ffa2a79"  # the spec's example without signature algorithms


def test_cached_fingerprint_parts_equal_fresh_ones_and_stay_bounded(monkeypatch):
    from capture.inspect import tls

    rnd = random.Random(5)
    tls.clear_fingerprint_cache()
    monkeypatch.setattr(tls, "MAX_CACHED_HASHES", 8)
    for _ in range(50):
        ciphers = rnd.sample(range(1, 0x1000), rnd.randrange(1, 20))
        exts = rnd.sample(range(1, 0x100), rnd.randrange(1, 20))
        sig_algs = rnd.sample(range(0x400, 0x900), rnd.randrange(0, 6))
        want = expected_ja4("t13d" + f"{len(ciphers):02d}{len(exts):02d}00", ciphers, exts,
                            sig_algs)
        for _twice in range(2):  # computed, then from the cache
            rnd.shuffle(exts)  # a client that shuffles its extensions hits the same entry
            assert ja4(False, 0x0304, True, ciphers, exts, None, sig_algs) == want
        assert len(tls._CIPHER_HASHES) <= 8 and len(tls._EXTENSION_HASHES) <= 8
    tls.clear_fingerprint_cache()
    assert not tls._CIPHER_HASHES and not tls._EXTENSION_HASHES


def test_hellos_parsed_with_cached_lists_equal_fresh_parses_and_caches_stay_bounded(
        monkeypatch):
    """Hellos whose cipher, ALPN, versions and signature lists vary (as a hostile client's
    would): each parse from the caches equals a parse with empty caches, and no cache grows
    past its bound."""
    from capture.inspect import tls

    rnd = random.Random(11)
    monkeypatch.setattr(tls, "MAX_CACHED_HASHES", 8)
    caches = (tls._CIPHER_HASHES, tls._EXTENSION_HASHES, tls._ALPN_LISTS, tls._VERSION_LISTS)
    for _ in range(60):
        ciphers = [rnd.choice((0x0A0A, 0x1301, 0x1302, 0xC02B, 0xC02F, 0x1A1A))
                   for _ in range(rnd.randrange(1, 6))]
        alpn = tuple(rnd.choice((b"h2", b"http/1.1", b"h3", b"x")) for _ in range(2))
        versions = [rnd.choice((0x0304, 0x0303, 0x2A2A)) for _ in range(rnd.randrange(1, 4))]
        algs = [rnd.choice((0x0403, 0x0804, 0x0401)) for _ in range(rnd.randrange(0, 4))]
        message = handshake(hello_body(ciphers, [sni_ext(b"a.example"), alpn_ext(*alpn),
                                                 versions_ext(*versions), sig_algs_ext(*algs)]))
        tls.clear_fingerprint_cache()
        fresh = parse_handshake(message, False)
        assert fresh == parse_handshake(message, False)  # the second parse uses the caches
        for _other in range(rnd.randrange(3)):  # other hellos in between fill the caches
            parse_handshake(handshake(hello_body([0x1301 + rnd.randrange(50)], [
                alpn_ext(bytes([97 + rnd.randrange(26)])),
                versions_ext(0x0300 + rnd.randrange(5))])), False)
        assert parse_handshake(message, False) == fresh
        offered = tuple(v for v in versions if v != 0x2A2A)
        assert fresh.alpn == tuple(p.decode() for p in alpn)
        assert fresh.versions == (offered or (0x0303,))
        assert all(len(cache) <= 8 for cache in caches)


def test_hostile_hellos_with_long_lists_are_not_cached():
    """Hellos of a thousand ciphers, extensions and hundreds of ALPN names each (no real
    stack offers such lists): their fingerprints come out right, computed afresh every time,
    and the caches keep nothing of them (each entry would be as big as the hello)."""
    from capture.inspect import tls

    tls.clear_fingerprint_cache()
    caches = (tls._CIPHER_HASHES, tls._EXTENSION_HASHES, tls._ALPN_LISTS, tls._VERSION_LISTS)
    for n in (1000, 1001, 1002):
        ciphers = list(range(0x0100, 0x0100 + n))
        exts = [0x1000 + i for i in range(n)]
        names = [b"p%d" % i for i in range(n // 4)]
        message = handshake(hello_body(ciphers, [ext(e) for e in exts] + [alpn_ext(*names)]))
        for _twice in range(2):
            hello = parse_handshake(message, False)
            assert hello.ja4 == expected_ja4("t12i9999p0", ciphers, exts + [0x10], [])
            assert hello.alpn == tuple(p.decode() for p in names[:tls.MAX_ALPN])
        assert all(len(key) <= tls.MAX_CACHED_KEY_BYTES for cache in caches for key in cache)
    assert not any(caches)


def test_grease_is_ignored_everywhere():
    hello = parse_tls_stream(records(spec_hello(
        grease=True, versions=(0x3A3A, 0x0304, 0x0303), sig_algs=[0x1A1A] + SPEC_SIG_ALGS)))
    assert hello.ja4 == SPEC_JA4
    assert hello.versions == (0x0304, 0x0303)


def test_bytes_like_input():
    stream = records(spec_hello())
    assert parse_tls_stream(bytearray(stream)).ja4 == SPEC_JA4
    assert parse_tls_stream(memoryview(stream)).ja4 == SPEC_JA4
    assert parse_handshake(memoryview(spec_hello()), False).ja4 == SPEC_JA4


def test_quic_prefix_and_handshake_entry_point():
    hello = parse_handshake(spec_hello(), quic=True)
    assert hello.ja4 == "q" + SPEC_JA4[1:]
    assert parse_handshake(spec_hello(), quic=False).ja4 == SPEC_JA4


def test_no_sni_and_ip_literal_sni():
    exts = [e for e in spec_extensions() if not e.startswith(b"\x00\x00")]
    hello = parse_handshake(handshake(hello_body(SPEC_CIPHERS, exts)), False)
    assert hello.sni is None
    assert hello.ja4.startswith("t13i1515h2_")
    # FoxIO: "d" whenever the SNI extension is there, even with an IP literal in it
    hello = parse_handshake(spec_hello(sni=b"192.0.2.1"), False)
    assert hello.sni == b"192.0.2.1"
    assert hello.ja4.startswith("t13d1516h2_")


@pytest.mark.parametrize("first_alpn, chars", [
    (b"h2", "h2"), (b"http/1.1", "h1"), (b"h3-29", "h9"), (b"h", "hh"), (b"spdy/3.1", "s1"),
    (b"\xab", "ab"), (b"\xab\xcd", "ad"), (b"0\xab", "3b"), (b"01\xab\xcd", "3d"),
    (b"0\xab\xcd1", "01"), (b"", "00"),
])
def test_alpn_characters(first_alpn, chars):
    hello = parse_handshake(spec_hello(alpn=(first_alpn, b"h2")), False)
    assert hello.ja4[8:10] == chars


def test_no_alpn_extension():
    exts = [e for e in spec_extensions() if not e.startswith(b"\x00\x10")]
    hello = parse_handshake(handshake(hello_body(SPEC_CIPHERS, exts)), False)
    assert hello.alpn == ()
    assert hello.ja4.startswith("t13d151500_")


def test_empty_lists_give_zero_hashes():
    # no cipher suites, no extensions at all (an old-style hello without the extension block)
    hello = parse_handshake(handshake(hello_body([], [], with_ext_block=False)), False)
    assert hello.ja4 == "t12i000000_000000000000_000000000000"
    assert hello.versions == (0x0303,)
    # only SNI and ALPN: the sorted extension list is empty
    hello = parse_handshake(handshake(hello_body([0x1301], [sni_ext(b"a.example"),
                                                            alpn_ext(b"h2")])), False)
    assert hello.ja4.endswith("_000000000000")
    assert hello.ja4.startswith("t12d0102h2_")


def test_counts_capped_at_99():
    ciphers = list(range(0x0100, 0x0100 + 150))
    exts = [ext(0x1000 + i) for i in range(120)]
    hello = parse_handshake(handshake(hello_body(ciphers, exts)), False)
    assert hello.ja4.startswith("t12i999900_")
    assert hello.ja4 == expected_ja4("t12i999900", ciphers, [0x1000 + i for i in range(120)], [])


@pytest.mark.parametrize("legacy, versions, code", [
    (0x0303, None, "12"), (0x0301, None, "10"), (0x0302, None, "11"), (0x0300, None, "s3"),
    (0x0303, (0x0304,), "13"), (0x0303, (0x0A0A, 0x0303, 0x0302), "12"),
    (0x0303, (0x0304, 0x7F1C), "00"),  # highest value is a TLS 1.3 draft: unknown
    (0xFEFD, None, "d2"), (0xFEFF, None, "d1"), (0x0303, (0x5A5A,), "12"),
])
def test_version_codes(legacy, versions, code):
    exts = [sni_ext(b"x.example")] + ([versions_ext(*versions)] if versions else [])
    hello = parse_handshake(handshake(hello_body([0x1301], exts, legacy=legacy)), False)
    assert hello.ja4[1:3] == code
    if versions and [v for v in versions if (v & 0x0F0F) != 0x0A0A]:
        assert hello.versions == tuple(v for v in versions if (v & 0x0F0F) != 0x0A0A)
    else:
        assert hello.versions == (legacy,)


def test_signature_algorithms_keep_wire_order():
    algs = [0x0601, 0x0403, 0x0804]
    exts = [sni_ext(b"x.example"), sig_algs_ext(*algs), ext(0x000A, b"\x00\x02\x00\x1d")]
    hello = parse_handshake(handshake(hello_body([0x1301, 0x1302], exts)), False)
    assert hello.ja4 == expected_ja4("t12d020300", [0x1301, 0x1302], [0, 0x0D, 0x0A], algs)


def test_names_are_the_wire_bytes_and_alpn_is_made_safe():
    # the SNI stays bytes (capture.batching makes every name text with names.safe_name());
    # ALPN names, which never leave capture, are shown with the same function
    hello = parse_handshake(spec_hello(sni=b"bad\x00name\x1b\xff.ex ample\t"), False)
    assert hello.sni == b"bad\x00name\x1b\xff.ex ample\t"
    hello = parse_handshake(spec_hello(alpn=(b"h2\x80", b"\x07")), False)
    assert hello.alpn == ("h2\\x80", "\\a")
    hello = parse_handshake(spec_hello(sni=b"x" * 1000), False)
    assert hello.sni == b"x" * MAX_RAW  # all that safe_name() reads
    assert safe_name(hello.sni) == "x" * 251 + "\\..."


# ---------------------------------------------------------------------------------------------
# The TCP stream: records, segments, NEED_MORE
# ---------------------------------------------------------------------------------------------


def test_split_across_records_and_segments():
    message = spec_hello()
    for sizes in ([1], [3], [4, 10], [100, 100, 100, 100], [len(message) - 1]):
        stream = records(message, sizes)
        results = [parse_tls_stream(stream[:cut]) for cut in range(len(stream) + 1)]
        assert all(r is NEED_MORE for r in results[:-1]), sizes
        assert results[-1].ja4 == SPEC_JA4
    # data after the hello (e.g. a ChangeCipherSpec, early data) does not matter
    stream = records(message, [50]) + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x10"
    assert parse_tls_stream(stream).ja4 == SPEC_JA4


def test_segment_by_segment_feed():
    stream = records(spec_hello(), [200])
    rng = random.Random(7)
    buf, seen = b"", []
    while len(buf) < len(stream):
        buf += stream[len(buf):len(buf) + rng.randint(1, 90)]
        seen.append(parse_tls_stream(buf))
    assert seen[-1].sni == b"example.com"
    assert all(r is NEED_MORE for r in seen[:-1])


@pytest.mark.parametrize("stream", [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x16\x02",  # SSLv2-style major version
    b"\x16\x03\x09",  # unknown minor version
    b"\x16\x03\x01\x00\x00",  # empty handshake record
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello
    b"\x16\x03\x01\x00\x04\x01\x00\x00\x05",  # ClientHello shorter than its fixed part
    b"\x15\x03\x03\x00\x02\x02\x28",  # alert
    b"\x16\x03\x01\xff\xff",  # record longer than TLS allows
])
def test_not_a_client_hello(stream):
    assert parse_tls_stream(stream) is None


def test_need_more_prefixes():
    for prefix in (b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02",
                   b"\x16\x03\x01\x02\x00", b"\x16\x03\x01\x02\x00\x01\x00\x01"):
        assert parse_tls_stream(prefix) is NEED_MORE, prefix
    assert parse_handshake(b"", False) is NEED_MORE
    assert parse_handshake(b"\x01\x00", False) is NEED_MORE
    assert parse_handshake(spec_hello()[:-1], True) is NEED_MORE
    assert parse_handshake(b"\x02\x00\x00\x30", True) is None


def test_other_record_before_hello_complete():
    message = spec_hello()
    stream = records(message[:100]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(message[100:])
    assert parse_tls_stream(stream) is None


def test_hello_that_can_never_fit():
    huge = b"\x01" + (MAX_STREAM).to_bytes(3, "big")
    assert parse_tls_stream(records(huge + b"\x03\x03" + bytes(100))) is None
    assert parse_handshake(huge + bytes(100), False) is None
    # a plausible hello still incomplete when the caller's buffer is full
    body_len = MAX_STREAM - 100
    stream = records(b"\x01" + body_len.to_bytes(3, "big") + bytes(MAX_STREAM), [16000, 16000])
    assert parse_tls_stream(stream[:MAX_STREAM]) is None
    assert parse_tls_stream(stream[:4000]) is NEED_MORE


def test_too_many_tiny_records():
    stream = records(spec_hello(), [1] * 70)
    assert parse_tls_stream(stream) is None  # more than MAX_RECORDS records before completion


# ---------------------------------------------------------------------------------------------
# Hostile hellos
# ---------------------------------------------------------------------------------------------


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def test_lengths_that_lie():
    message = spec_hello()
    body = 4  # offset of the ClientHello body in the handshake message
    sid = body + 34
    assert parse_handshake(_patch(message, sid, b"\x21"), False) is None  # session id 33
    assert parse_handshake(_patch(message, sid, b"\xff"), False) is None
    cs = sid + 33
    assert parse_handshake(_patch(message, cs, b"\x00\x03"), False) is None  # odd length
    assert parse_handshake(_patch(message, cs, b"\xff\xfe"), False) is None  # past the end
    comp = cs + 2 + 2 * len(SPEC_CIPHERS)
    assert parse_handshake(_patch(message, comp, b"\x00"), False) is None  # no methods
    assert parse_handshake(_patch(message, comp, b"\xff"), False) is None
    ext_block = comp + 2
    assert parse_handshake(_patch(message, ext_block, b"\xff\xff"), False) is None
    first_ext_len = ext_block + 4
    assert parse_handshake(_patch(message, first_ext_len, b"\xff\xff"), False) is None
    # a handshake length longer than the data: waits for more; shorter: cuts the hello short
    assert parse_handshake(_patch(message, 1, b"\x00\x10\x00"), False) is NEED_MORE
    assert parse_handshake(_patch(message, 1, b"\x00\x00\x30"), False) is None


def test_lies_inside_extensions_are_contained():
    bad_sni = ext(0x0000, b"\x00\x10\x00\x00\x20abc")  # entry longer than the list
    bad_alpn = ext(0x0010, b"\x00\x08\x05h2")  # list longer than the extension
    bad_sigs = ext(0x000D, b"\xff\xff\x04\x03")
    bad_versions = ext(0x002B, b"\xfe\x03\x04")
    hello = parse_handshake(handshake(hello_body(
        [0x1301], [bad_sni, bad_alpn, bad_sigs, bad_versions])), False)
    assert hello.sni is None
    assert hello.alpn == ()
    assert hello.versions == (0x0304,)
    assert hello.ja4.startswith("t13d0104")


def test_zero_length_everything():
    exts = [ext(0x0000), ext(0x0010), ext(0x000D), ext(0x002B), ext(0x0000, b"\x00\x00"),
            ext(0x0010, b"\x00\x00"), ext(0x000D, b"\x00\x00"), ext(0x002B, b"\x00")]
    hello = parse_handshake(handshake(hello_body([], exts, session_id=b"")), False)
    assert hello.sni is None and hello.alpn == ()
    assert hello.versions == (0x0303,)
    assert hello.ja4 == expected_ja4("t12d000800", [], [0, 0x10, 0x0D, 0x2B] * 2, [])
    assert parse_handshake(handshake(hello_body([], [sni_ext(b"")])), False).sni is None


def test_absurd_extension_count():
    exts = [ext(0x0005)] * 4000  # 16,000 bytes of empty extensions
    message = handshake(hello_body([0x1301], exts))
    start = time.perf_counter()
    hello = parse_handshake(message, False)
    assert time.perf_counter() - start < 0.5
    assert hello.ja4.startswith("t12i0199")


def _assert_valid(result):
    assert result is None or result is NEED_MORE or isinstance(result, ClientHello)
    if isinstance(result, ClientHello):
        assert len(result.ja4) == 36 and result.ja4.count("_") == 2


def test_random_inputs_never_raise():
    rng = random.Random(20240607)
    valid = records(spec_hello(grease=True), [120, 200])
    start = time.perf_counter()
    for i in range(10_000):
        kind = i % 4
        if kind == 0:  # plain random bytes
            data = rng.randbytes(rng.randint(0, 600))
        elif kind == 1:  # consistent record and hello framing around random hello contents
            if i & 4:  # fully random body
                body = b"\x03\x03" + rng.randbytes(rng.randint(0, 900))
            else:  # well-formed up to the extensions, which are random (types, bodies, and
                # now and then a lying length)
                exts = b""
                for _ in range(rng.randint(0, 30)):
                    ext_body = rng.randbytes(rng.randint(0, 12))
                    ext_len = len(ext_body) if rng.random() < 0.97 else rng.randrange(65536)
                    exts += struct.pack("!HH", rng.choice([0, 0x10, 0x0D, 0x2B, 0x0A0A,
                                                           rng.randrange(65536)]), ext_len)
                    exts += ext_body
                body = hello_body([rng.randrange(65536) for _ in range(rng.randint(0, 5))], [])
                body = body[:-2] + struct.pack("!H", len(exts)) + exts
            data = records(handshake(body), [rng.randint(1, 400) for _ in range(3)])
        elif kind == 2:  # a valid stream with random byte flips
            buf = bytearray(valid)
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        else:  # a valid stream cut at a random point, with random tail
            cut = rng.randrange(len(valid))
            data = valid[:cut] + rng.randbytes(rng.randint(0, 40))
        _assert_valid(parse_tls_stream(data))
        _assert_valid(parse_handshake(data[5:], bool(i & 1)))
    assert time.perf_counter() - start < 30


# ---------------------------------------------------------------------------------------------
# The nDPI corpus (../shared/corpus/ndpi): SNI and JA4 of every TLS-over-TCP ClientHello
# ---------------------------------------------------------------------------------------------

# capture -> {client endpoint: (SNI, JA4 per the FoxIO spec)}
TLS_CORPUS = {
    "443-safari.pcap": {
        "192.168.1.13:53031": ("www.ntop.org", "t12d2010h2_2a284e3b0c56_f05fdf8c38a9")},
    "tls_ech.pcapng": {
        "[2001:b07:a3d:c112:ce16:b409:3d0a:9177]:47460": (
            "performance.radar.cloudflare.com", "t13d1516h2_8daaf6152771_02713d6af862")},
    "ja3_lots_of_cipher_suites_2_anon.pcap": {
        "192.168.147.177:58496": ("192.69.136.179", "t12d990700_413fe4e0e24f_7b0ba9b4cf08")},
    "selfsigned.pcap": {
        "127.0.0.1:51607": ("localhost", "t12d6707h2_2955a3196ffa_c83f907a73d3")},
    "pops.pcapng": {
        "192.168.0.1:55077": ("pop.secureserver.net", "t12d280600_76ec540469e1_8b5687d2b2b8")},
    "steam.pcapng": {
        "192.168.88.231:54243": ("www.dota2.com", "t13d3213h1_85d9c3ed342d_e802cdec6a7f"),
        "192.168.88.231:57749": ("api.steampowered.com", "t13d3213h2_85d9c3ed342d_e802cdec6a7f"),
        "192.168.88.231:50983": ("ext3-sto1.steamserver.net",
                                 "t13d3213h2_85d9c3ed342d_e802cdec6a7f"),
        "192.168.88.231:42070": ("store.steampowered.com", "t13d1515h2_8daaf6152771_de4a06bb82e3"),
    },
    "tls_port_80.pcapng": {
        "57.91.202.194:50541": (None, "t12i550500_168bb377f8c8_a1e935682795")},
    "google_meet.pcapng": {
        "192.168.88.231:43268": ("meet.google.com", "t13d1516h2_8daaf6152771_02713d6af862")},
}
# Other captures with TLS ClientHellos: checked against nDPI (rendered as nDPI does) and tshark
TLS_CORPUS_MORE = ("android.pcap", "KakaoTalk_chat.pcap", "http_ipv6.pcap", "codm.pcap",
                   "4in6tunnel.pcap", "6in4tunnel.pcap", "vxlan.pcap", "whatsapp_login_chat.pcap")


def endpoint(addr16: bytes, ip_version: int, port: int) -> str:
    if ip_version == 4:
        return f"{ipaddress.IPv4Address(addr16[:4])}:{port}"
    return f"[{ipaddress.IPv6Address(addr16)}]:{port}"


def corpus_payloads(path: str):
    """(l4 proto, src endpoint, dst endpoint, payload, tcp seq, tcp flags) of every packet."""
    from capture.decode import decode_frame
    from capture.pcapfile import read_frames

    for _ts, _wire, frame, linktype in read_frames(path):
        d = decode_frame(frame, linktype)
        ipv, proto, src, dst, sport, dport, tcp_flags, l4 = d[0], d[1], d[2], d[3], d[4], d[5], \
            d[6], d[9]
        if l4 < 0 or proto not in (6, 17):
            continue
        end = d[10] if len(d) > 10 and d[10] > 0 else len(frame)  # IP end: no Ethernet padding
        if proto == 17:
            if end < l4 + 8:
                continue
            udp_len = int.from_bytes(frame[l4 + 4:l4 + 6], "big")
            payload = frame[l4 + 8:min(end, l4 + udp_len)] if udp_len >= 8 else frame[l4 + 8:end]
            seq = 0
        else:
            if end < l4 + 20:
                continue
            payload = frame[l4 + (frame[l4 + 12] >> 4) * 4:end]
            seq = int.from_bytes(frame[l4 + 4:l4 + 8], "big")
        yield proto, endpoint(src, ipv, sport), endpoint(dst, ipv, dport), bytes(payload), seq, \
            tcp_flags


def client_streams(path: str) -> dict:
    """client endpoint -> (server endpoint, segments in capture order as (offset, payload)).

    The client is the sender of the SYN, else of the first payload; offsets count from the
    SYN's sequence number + 1, else from the client's first payload.
    """
    conns: dict = {}  # endpoints -> [client, server, base seq or None, segments]
    for proto, src, dst, payload, seq, flags in corpus_payloads(path):
        if proto != 6:
            continue
        key = frozenset((src, dst))
        conn = conns.get(key)
        if flags & 0x12 == 0x02:  # SYN without ACK: src is the client
            if conn is None or conn[2] is None:
                conn = conns[key] = [src, dst, (seq + 1) & 0xFFFFFFFF, conn[3] if conn else []]
        if not payload:
            continue
        if conn is None:
            conn = conns[key] = [src, dst, seq, []]
        if src == conn[0]:
            conn[3].append(((seq - conn[2]) & 0xFFFFFFFF, payload))
    return {c: (server, segs) for c, server, _base, segs in conns.values() if segs}


def feed(segments) -> list:
    """Reassemble in order (as the flow dispatcher does), calling parse_tls_stream each time."""
    stream, results = b"", []
    pending = sorted(segments)
    for _ in range(len(pending)):
        progressed = False
        for offset, payload in pending:
            if offset <= len(stream) < offset + len(payload):
                stream += payload[len(stream) - offset:]
                progressed = True
        if not progressed:
            break
        results.append(parse_tls_stream(stream[:MAX_STREAM]))
        if results[-1] is not NEED_MORE:
            break
    return results


def ndpi_flows(corpus_dir: str, name: str) -> dict:
    """frozenset of the two endpoints -> {ja4, sni} from nDPI's result file."""
    import re

    out = {}
    with open(os.path.join(corpus_dir, "result", name + ".out")) as fh:
        for line in fh:
            m = re.match(r"\s+\d+\s+(TCP|UDP) (\S+) <?-> (\S+) \[", line)
            if not m:
                continue
            key = frozenset(_norm_endpoint(e) for e in m.group(2, 3))
            info = {}
            for field, rx in (("ja4", r"\[JA4: ([^\]]+)\]"), ("sni", r"\[Hostname/SNI: ([^\]]*)\]"),
                              ("qver", r"\[QUIC ver: ([^\]]*)\]")):
                found = re.search(rx, line)
                info[field] = found.group(1) if found else None
            out[key] = info
    return out


def _norm_endpoint(text: str) -> str:
    addr, port = text.rsplit(":", 1)
    ip = ipaddress.ip_address(addr.strip("[]"))
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def ndpi_rendering(hello: ClientHello) -> str:
    """Our JA4 as the nDPI build of the corpus prints it; its three systematic differences:

    * ALPN characters: the first two characters of the advertised ALPN list (joined with ","
      and with its last character dropped) instead of the first and last character of the first
      ALPN value: "http/1.1" -> "ht", a lone "h2" -> "h0", "h3-29" -> "h3";
    * "d" even when the hello has no SNI extension;
    * an empty extension list hashes the empty string (e3b0c44298fc) instead of "000000000000".
    """
    joined = ",".join(hello.alpn)[:-1]
    alpn = (joined[:1] or "0") + (joined[1:2] or "0") if hello.alpn else "00"
    text = hello.ja4[:3] + "d" + hello.ja4[4:8] + alpn + hello.ja4[10:]
    if text.endswith("_000000000000") and text[6:8] == "00":
        text = text[:-12] + hashlib.sha256(b"").hexdigest()[:12]
    return text


def truth_conversations(corpus_dir: str, name: str) -> dict:
    with open(os.path.join(corpus_dir, "truth", name + ".json")) as fh:
        truth = json.load(fh)
    out = {}
    for conv in truth["conversations"]:
        if conv["l4"] not in ("TCP", "UDP"):
            continue
        ini = conv["initiator"]
        res = conv["responder"]
        key = frozenset(_norm_endpoint(f"[{e['addr']}]:{e['port']}") for e in (ini, res))
        out[key] = conv.get("meta", {})
    return out


def version_names(versions) -> set:
    """Our supported_versions values named as in the truth files."""
    names = {0x0301: "TLS1.0", 0x0302: "TLS1.1", 0x0303: "TLS1.2", 0x0304: "TLS1.3"}
    return {names.get(v, f"TLS1.3-draft{v & 0xFF}" if v >> 8 == 0x7F else hex(v))
            for v in versions}


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(TLS_CORPUS) + list(TLS_CORPUS_MORE))
def test_corpus_client_hellos(name, corpus_dir):
    path = os.path.join(corpus_dir, "pcap", name)
    ndpi = ndpi_flows(corpus_dir, name)
    truth = truth_conversations(corpus_dir, name)
    expected = TLS_CORPUS.get(name, {})
    found = {}
    streams = client_streams(path)
    client_streams_server = {c: server for c, (server, _segs) in streams.items()}
    for client, (server, segments) in streams.items():
        results = feed(segments)
        if not results or not isinstance(results[-1], ClientHello):
            continue
        assert all(r is NEED_MORE for r in results[:-1])
        hello = found[client] = results[-1]
        shown = safe_name(hello.sni) if hello.sni else None  # as it leaves capture
        if client in expected:
            assert (shown, hello.ja4) == expected[client], client
        meta = truth.get(frozenset((client, server)), {})
        assert ([shown] if shown else []) == meta.get("tls_sni", []), client
        if "tls_ch_supported_versions" in meta:
            assert version_names(hello.versions) == \
                set(meta["tls_ch_supported_versions"]) - {"GREASE"}, client
        ndpi_ja4 = ndpi.get(frozenset((client, server)), {}).get("ja4")
        if ndpi_ja4:  # nDPI gives none for the IP-literal SNI of ja3_lots_of_cipher_suites
            assert ndpi_rendering(hello) == ndpi_ja4, client
    assert set(expected) <= set(found)
    # every client hello that tshark saw at the start of a TCP conversation was found too
    hellos = {key for key, meta in truth.items()
              if "client_hello" in meta.get("tls_handshake", []) and "quic_version" not in meta}
    assert hellos <= {frozenset((c, client_streams_server[c])) for c in found}
