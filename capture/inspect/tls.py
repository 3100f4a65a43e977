"""TLS ClientHello parsing and the JA4 client fingerprint, for hostile input.

Two entry points:

* parse_tls_stream(stream): the client->server TCP byte stream from its start (reassembled by the
  caller, possibly incomplete). The ClientHello may span several TLS records and TCP segments.
* parse_handshake(data, quic): TLS handshake messages without the record layer (the QUIC CRYPTO
  stream from offset 0).

Both return NEED_MORE while the bytes seen so far are the start of a ClientHello that is not
complete yet, None when the input is not a (well-formed) ClientHello, else a ClientHello.

Every length read from the input is checked against the bytes actually there; nothing raises on
bad input, every loop is bounded by the input length (itself bounded by MAX_STREAM), and no
Scapy is used. JA4 follows the FoxIO specification
(github.com/FoxIO-LLC/ja4/blob/main/technical_details/JA4.md); see ja4() for the details.
"""

from __future__ import annotations

import struct
from hashlib import sha256
from typing import NamedTuple

from capture.inspect.names import MAX_RAW, safe_name

__all__ = ["NEED_MORE", "ClientHello", "parse_tls_stream", "parse_handshake", "ja4", "is_grease"]


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __bool__(self) -> bool:  # a pending answer is not a result
        return False


NEED_MORE = _NeedMore()
"""Sentinel: the bytes so far start a ClientHello that is not complete yet."""

MAX_STREAM = 16 * 1024
"""The caller keeps at most this many bytes of the stream: a hello that cannot fit is not one."""
MAX_RECORDS = 64  # TLS records walked before giving up (a ClientHello needs 1, rarely 2-3)
MAX_ALPN = 16  # ALPN values kept

HANDSHAKE_RECORD = 0x16
CLIENT_HELLO = 0x01
EXT_SNI, EXT_ALPN, EXT_SIG_ALGS, EXT_SUPPORTED_VERSIONS = 0x0000, 0x0010, 0x000D, 0x002B

# NamedTuple construction through its Python-level __new__ costs twice tuple.__new__
_new = tuple.__new__
_U16 = struct.Struct("!H").unpack_from
_U16_PAIR = struct.Struct("!HH").unpack_from
_HS_HEADER = struct.Struct("!BBH").unpack_from  # type, 24-bit length as high byte + low 16 bits
_REC_HEADER = struct.Struct("!BBBH").unpack_from  # type, major, minor, length

_VERSION_CODES = {
    0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2",
    0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3",
}
_ALNUM = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_EMPTY_HASH = "000000000000"
_TWO_DIGITS = [f"{i:02d}" for i in range(100)]
_GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))
# The ClientHello extension loop looks each type up once: 0 for GREASE (left out of JA4), an
# action for the four extensions whose bodies are read, absent for every other type
EXT_SNI_ACTION, EXT_ALPN_ACTION, EXT_SIG_ALGS_ACTION, EXT_VERSIONS_ACTION = 1, 2, 3, 4
_EXT_ACTIONS = {**dict.fromkeys(_GREASE, 0), EXT_SNI: EXT_SNI_ACTION, EXT_ALPN: EXT_ALPN_ACTION,
                EXT_SIG_ALGS: EXT_SIG_ALGS_ACTION, EXT_SUPPORTED_VERSIONS: EXT_VERSIONS_ACTION}


class ClientHello(NamedTuple):
    sni: bytes | None  # first host_name of the server_name extension, as sent (None: absent/empty)
    alpn: tuple[str, ...]  # advertised ALPN protocols, in order (as names.safe_name() shows them)
    versions: tuple[int, ...]  # supported_versions without GREASE, else (legacy_version,)
    ja4: str


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x0a0a, 0x1a1a, ..., 0xfafa."""
    return value in _GREASE


def _alpn_chars(first: bytes) -> str:
    """JA4 a-section ALPN: first and last character, hex digits when either is not alnum."""
    if not first:
        return "00"
    if first[0] in _ALNUM and first[-1] in _ALNUM:
        return chr(first[0]) + chr(first[-1])
    hexed = first.hex()
    return hexed[0] + hexed[-1]


def ja4(quic: bool, version: int, has_sni: bool, ciphers: list[int], extensions: list[int],
        first_alpn: bytes | None, sig_algs: list[int]) -> str:
    """JA4 from the ClientHello fields, GREASE already removed from every list.

    version is the highest supported_versions value (else the legacy version); extensions are
    in wire order and include SNI and ALPN (counted in section a, dropped from the c hash);
    sig_algs are in wire order. Empty cipher or (sorted, SNI/ALPN-less) extension lists give
    "000000000000" as the spec says.
    """
    return _fingerprint(quic, version, has_sni, _cipher_part(_pack_u16(ciphers)), extensions,
                        first_alpn, _pack_u16(sig_algs))


def _fingerprint(quic: bool, version: int, has_sni: bool, cipher_part: tuple[int, str],
                 extensions: list[int], first_alpn: bytes | None, raw_sig_algs: bytes) -> str:
    """ja4() with the cipher list as its (count, hash) and the signature algorithms as their
    wire bytes: _client_hello() never unpacks either list once its hash is cached."""
    n_ciphers, part_b = cipher_part
    n_exts = len(extensions)
    head = ("q" if quic else "t") + _VERSION_CODES.get(version, "00") + ("d" if has_sni else "i") \
        + _TWO_DIGITS[n_ciphers if n_ciphers < 99 else 99] \
        + _TWO_DIGITS[n_exts if n_exts < 99 else 99] \
        + (_alpn_chars(first_alpn) if first_alpn is not None else "00")
    part_c = _EMPTY_HASH
    exts = [e for e in extensions if e != EXT_SNI and e != EXT_ALPN]
    if exts:
        exts.sort()  # sorted, so that clients that shuffle their extensions hit the cache
        raw_exts = _pack_u16(exts)
        key = len(raw_exts).to_bytes(4, "big") + raw_exts + raw_sig_algs  # (where one ends)
        part_c = _EXTENSION_HASHES.get(key)
        if part_c is None:
            sig_algs = _u16_list(raw_sig_algs, 0, len(raw_sig_algs))
            # one pack + hex for both lists: the comma between them becomes the "_" separator
            raw_c = _hex_list(exts + sig_algs)
            if sig_algs:
                cut = 5 * len(exts) - 1
                raw_c = raw_c[:cut] + b"_" + raw_c[cut + 1:]
            part_c = sha256(raw_c).hexdigest()[:12]
            _remember(_EXTENSION_HASHES, key, part_c)
    return f"{head}_{part_b}_{part_c}"


def _cipher_part(raw: bytes) -> tuple[int, str]:
    """(count, JA4 b hash) of a cipher_suites list given as its wire bytes (GREASE left out)."""
    part = _CIPHER_HASHES.get(raw)
    if part is None:
        ciphers = _u16_list(raw, 0, len(raw))
        part = (len(ciphers),
                sha256(_hex_list(sorted(ciphers))).hexdigest()[:12] if ciphers else _EMPTY_HASH)
        _remember(_CIPHER_HASHES, raw, part)
    return part


# The two hashed parts of JA4, by the wire bytes of the cipher list and by the sorted extension
# types with the wire bytes of the signature algorithms. A network's clients are a handful of
# TLS stacks offering the same lists on every connection (GREASE values vary: a few entries
# per stack), so after the first hello of each, unpacking, hex encoding and SHA-256 (about half
# of a hello's parse, by valgrind) are a lookup. Bounded: full, a cache starts over; and only
# keys of at most MAX_CACHED_KEY_BYTES are kept (real stacks offer lists of tens of bytes, a
# hostile 16 KB hello's lists would make each entry as big: 4,096 of them took 650 MB).
MAX_CACHED_HASHES = 4096
MAX_CACHED_KEY_BYTES = 512
_CIPHER_HASHES: dict[bytes, tuple[int, str]] = {}
_EXTENSION_HASHES: dict[bytes, str] = {}
# Likewise the ALPN and supported_versions lists, by their bytes
_ALPN_LISTS: dict[bytes, tuple] = {}
_VERSION_LISTS: dict[bytes, tuple[int, ...]] = {}


def _remember(cache: dict, key: bytes, value) -> None:
    if len(key) > MAX_CACHED_KEY_BYTES:
        return
    if len(cache) >= MAX_CACHED_HASHES:
        cache.clear()
    cache[key] = value


def clear_fingerprint_cache() -> None:
    """Forget the cached JA4 parts and lists (the benchmark starts each pass cold)."""
    for cache in (_CIPHER_HASHES, _EXTENSION_HASHES, _ALPN_LISTS, _VERSION_LISTS):
        cache.clear()


def _pack_u16(values: list[int]) -> bytes:
    return struct.pack(f"!{len(values)}H", *values)


def _hex_list(values: list[int]) -> bytes:
    """b"0a0b,1301,..." : 4-digit lower-case hex, comma separated."""
    return _pack_u16(values).hex(",", 2).encode()


_U16_ARRAYS: dict[int, object] = {}  # count -> Struct("!{count}H").unpack_from


def _u16_list(data: bytes, start: int, end: int) -> list[int]:
    """Non-GREASE 16-bit values of data[start:end] (an odd trailing byte is ignored)."""
    count = (end - start) >> 1
    if count <= 0:
        return []
    unpack = _U16_ARRAYS.get(count)
    if unpack is not None:
        values = unpack(data, start)
    elif count <= 128:  # the lengths real hellos use: at most 128 cached unpackers
        unpack = _U16_ARRAYS[count] = struct.Struct(f"!{count}H").unpack_from
        values = unpack(data, start)
    else:
        values = struct.unpack_from(f"!{count}H", data, start)
    if _GREASE.isdisjoint(values):
        return list(values)
    return [v for v in values if v not in _GREASE]


def _client_hello(data: bytes, pos: int, end: int, quic: bool) -> ClientHello | None:
    """Parse the ClientHello body data[pos:end] (end within data). None when malformed."""
    # legacy_version(2) random(32) session_id<0..32>
    if end - pos < 35:
        return None
    legacy_version = _U16(data, pos)[0]
    if data[pos] != 3 and (data[pos] & 0xFE) != 0xFE:  # SSL3/TLS or DTLS major versions
        return None
    pos += 34
    sid_len = data[pos]
    if sid_len > 32:
        return None
    pos += 1 + sid_len
    # cipher_suites<2..2^16-2>
    if pos + 2 > end:
        return None
    cs_len = _U16(data, pos)[0]
    pos += 2
    if cs_len & 1 or pos + cs_len > end:
        return None
    cipher_part = _cipher_part(data[pos:pos + cs_len])
    pos += cs_len
    # legacy_compression_methods<1..2^8-1>
    if pos + 1 > end:
        return None
    comp_len = data[pos]
    pos += 1 + comp_len
    if comp_len == 0 or pos > end:
        return None
    extensions: list[int] = []
    sni: bytes | None = None
    has_sni = False
    alpn: tuple[str, ...] = ()
    first_alpn: bytes | None = None
    raw_sig_algs = b""
    versions: tuple[int, ...] | None = None
    if pos < end:  # extensions<8..2^16-1> (absent in old hellos)
        if pos + 2 > end:
            return None
        ext_end = pos + 2 + _U16(data, pos)[0]
        pos += 2
        if ext_end > end:  # the extension block lies about its length
            return None
        actions, pair, append = _EXT_ACTIONS, _U16_PAIR, extensions.append
        while pos < ext_end:
            # reads past ext_end give a body_end past it too; past the data, struct raises
            # (callers catch it: malformed)
            ext_type, ext_len = pair(data, pos)
            body_end = pos + 4 + ext_len
            if body_end > ext_end:
                return None
            action = actions.get(ext_type)
            if action is None:  # most extensions: only their type counts (in JA4)
                append(ext_type)
            elif action:
                append(ext_type)
                pos += 4
                if action == EXT_SNI_ACTION:
                    if not has_sni:
                        has_sni = True
                        sni = _server_name(data, pos, body_end)
                elif action == EXT_ALPN_ACTION:
                    if first_alpn is None:
                        alpn, first_alpn = _alpn_list(data[pos:body_end])
                elif action == EXT_SIG_ALGS_ACTION:
                    if ext_len >= 2:
                        list_end = min(pos + 2 + _U16(data, pos)[0], body_end)
                        raw_sig_algs = data[pos + 2:list_end]
                elif ext_len >= 1 and versions is None:  # supported_versions
                    versions = _version_list(data[pos + 1:min(pos + 1 + data[pos], body_end)])
            pos = body_end
    if not versions:
        versions = (legacy_version,)
    fingerprint = _fingerprint(quic, max(versions), has_sni, cipher_part, extensions,
                               first_alpn, raw_sig_algs)
    return _new(ClientHello, (sni, alpn, versions, fingerprint))


def _server_name(data: bytes, pos: int, end: int) -> bytes | None:
    """First host_name in a server_name extension body; None when empty or malformed."""
    if pos + 2 > end:
        return None
    list_end = min(pos + 2 + _U16(data, pos)[0], end)
    pos += 2
    while pos + 3 <= list_end:
        name_type = data[pos]
        name_len = _U16(data, pos + 1)[0]
        pos += 3
        if pos + name_len > list_end:
            return None
        if name_type == 0:
            if name_len == 0:
                return None
            return data[pos:pos + min(name_len, MAX_RAW)]
        pos += name_len
    return None


def _alpn_list(body: bytes) -> tuple[tuple[str, ...], bytes]:
    """(ALPN protocol names, the first one's raw bytes) of an ALPN extension body, cached by
    the body's bytes: a network's clients offer a few lists."""
    known = _ALPN_LISTS.get(body)
    if known is None:
        names: list[str] = []
        first = _alpn(body, 0, len(body), names)
        known = (tuple(names), first)
        _remember(_ALPN_LISTS, body, known)
    return known


def _version_list(raw: bytes) -> tuple[int, ...]:
    """supported_versions without GREASE from the list's bytes, cached by them."""
    known = _VERSION_LISTS.get(raw)
    if known is None:
        known = tuple(_u16_list(raw, 0, len(raw)))
        _remember(_VERSION_LISTS, raw, known)
    return known


def _alpn(data: bytes, pos: int, end: int, out: list[str]) -> bytes:
    """Fill out with the ALPN protocol names; return the first one's raw bytes (b"" if none)."""
    first = b""
    if pos + 2 > end:
        return first
    list_end = min(pos + 2 + _U16(data, pos)[0], end)
    pos += 2
    while pos < list_end:
        name_len = data[pos]
        pos += 1
        if pos + name_len > list_end:
            break
        name = data[pos:pos + name_len]
        if not out:
            first = name
        if len(out) < MAX_ALPN:
            out.append(safe_name(name))
        pos += name_len
    return first


def parse_handshake(data: bytes, quic: bool) -> ClientHello | None | _NeedMore:
    """Parse the ClientHello at the start of `data` (handshake messages, no record layer)."""
    try:
        if type(data) is not bytes:
            data = bytes(data)  # bytearray / memoryview from a reassembly buffer
        if not data:
            return NEED_MORE
        if data[0] != CLIENT_HELLO:
            return None
        if len(data) < 4:
            return NEED_MORE
        _t, len_hi, len_lo = _HS_HEADER(data, 0)
        hello_len = (len_hi << 16) | len_lo
        if hello_len > MAX_STREAM - 4 or hello_len < 38:
            return None
        if len(data) < 4 + hello_len:
            return NEED_MORE
        return _client_hello(data, 4, 4 + hello_len, quic)
    except Exception:  # noqa: BLE001 - hostile input must never escape as an exception
        return None


def parse_tls_stream(stream: bytes) -> ClientHello | None | _NeedMore:
    """Parse the ClientHello at the start of a client->server TLS-over-TCP byte stream."""
    try:
        if type(stream) is not bytes:
            stream = bytes(stream)  # bytearray / memoryview from a reassembly buffer
        return _parse_stream(stream)
    except Exception:  # noqa: BLE001 - hostile input must never escape as an exception
        return None


def _parse_stream(stream: bytes) -> ClientHello | None | _NeedMore:
    size = len(stream)
    if size == 0:
        return NEED_MORE
    if stream[0] != HANDSHAKE_RECORD:
        return None
    if size < 5:  # check the record header bytes that are there
        if size >= 2 and stream[1] != 3:
            return None
        if size >= 3 and stream[2] > 4:
            return None
        return NEED_MORE
    _type, major, minor, rec_len = _REC_HEADER(stream, 0)
    if major != 3 or minor > 4 or rec_len == 0 or rec_len > 16384 + 2048:
        return None
    body_end = 5 + rec_len
    if rec_len >= 4 and body_end <= size:
        # Fast path: the whole ClientHello in the first record, no copy
        if stream[5] != CLIENT_HELLO:
            return None
        hello_len = (stream[6] << 16) | _U16(stream, 7)[0]
        if hello_len < 38 or hello_len > MAX_STREAM - 9:
            return None
        if 9 + hello_len <= body_end:
            return _client_hello(stream, 9, 9 + hello_len, False)
    # Slow path: gather handshake bytes from consecutive records (the last one maybe partial)
    parts: list[bytes] = []
    have = 0
    need = -1  # handshake bytes needed (4 + ClientHello length) once the header is known
    pos = 0
    for _ in range(MAX_RECORDS):
        if pos >= size:
            break
        if stream[pos] != HANDSHAKE_RECORD:
            return None  # anything but a handshake record before the hello is complete
        if pos + 5 > size:
            if size - pos >= 2 and stream[pos + 1] != 3:
                return None
            break
        _type, major, minor, rec_len = _REC_HEADER(stream, pos)
        if major != 3 or minor > 4 or rec_len == 0 or rec_len > 16384 + 2048:
            return None
        start = pos + 5
        stop = min(start + rec_len, size)
        if stop > start:
            parts.append(stream[start:stop])
            have += stop - start
        pos = start + rec_len
        if need < 0 and have >= 1:
            first = parts[0][0]
            if first != CLIENT_HELLO:
                return None
            if have >= 4:
                head = b"".join(parts)[:4]
                hello_len = (head[1] << 16) | _U16(head, 2)[0]
                if hello_len < 38 or hello_len > MAX_STREAM - 9:
                    return None
                need = 4 + hello_len
        if need >= 0 and have >= need:
            data = b"".join(parts)
            return _client_hello(data, 4, need, False)
        if pos > size:
            break
    else:
        return None  # too many records without a complete hello: not a real client
    if size >= MAX_STREAM:
        return None  # the caller keeps no more bytes: the hello will never complete
    return NEED_MORE
