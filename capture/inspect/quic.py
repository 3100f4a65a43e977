"""QUIC client Initial inspection: version, TLS ClientHello (SNI, ALPN, JA4) or gQUIC CHLO SNI.

parse_quic_datagram(datagram, state, from_client) looks at one UDP payload of a flow. It handles

* IETF long-header packets of QUIC v1 (RFC 9000/9001), v2 (RFC 9369), drafts 22-34, mvfst
  (0xfaceb00x) and Google's T050/T051/Q050 (IETF header, Google salts): the client's Initial
  packets are unprotected (header protection with AES-ECB, AES-128-GCM with the client Initial
  key derived from the Destination Connection ID), their CRYPTO frames are reassembled in the
  per-flow QuicState (bounded to MAX_CRYPTO bytes and MAX_INITIALS packets) and the ClientHello
  is parsed by capture.inspect.tls.parse_handshake. Q050 carries a CHLO instead of a ClientHello.
* Google QUIC Q046 (IETF-like flags byte, cleartext CHLO) and the legacy gQUIC public header
  (Q024-Q045, cleartext CHLO): the SNI comes from the CHLO's "SNI\\0" tag.
* Coalesced packets in one datagram, Version Negotiation packets, and short-header packets of a
  flow already known to be QUIC.

It never raises: a datagram that is not QUIC gives None, a QUIC Initial that does not decrypt
gives a QuicResult whose hello is None. Every loop is bounded by the datagram length and by the
MAX_* constants below.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from capture.inspect.names import MAX_RAW
from capture.inspect.tls import NEED_MORE, ClientHello, parse_handshake

__all__ = ["QuicState", "QuicResult", "parse_quic_datagram", "version_name"]

MAX_CRYPTO = 16 * 1024  # CRYPTO stream bytes kept per flow
MAX_INITIALS = 6  # client Initial packets inspected per flow (a ClientHello needs 1-3)
MAX_RANGES = 32  # disjoint CRYPTO fragments tracked (Chrome shuffles a handful per packet)
MAX_COALESCED = 8  # QUIC packets walked in one datagram
MAX_FRAMES = 512  # frames walked in one decrypted packet
MAX_CID = 20  # RFC 9000 connection ID limit (all supported versions)
MAX_CHLO_TAGS = 128
MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 14.1: a client Initial datagram is padded to 1200 bytes

V1, V2 = 0x00000001, 0x6B3343CF
Q046, Q050, T050, T051 = 0x51303436, 0x51303530, 0x54303530, 0x54303531

_SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
_SALT_V2 = bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")
_SALT_D22 = bytes.fromhex("7fbcdb0e7c66bbe9193a96cd21519ebd7a02644a")
_SALT_D23 = bytes.fromhex("c3eef712c72ebb5a11a7d2432bb46365bef9f502")
_SALT_D29 = bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899")
_SALT_Q050 = bytes.fromhex("504574efd066fe2f9d945cfcdbd3a7f0d3b56b45")
_SALT_T050 = bytes.fromhex("7ff579e5acd072915580304c43a2367c60488310")
_SALT_T051 = bytes.fromhex("7a4edef4e7ccee5fa4506c19124fc8ccda6e033d")

# Frame layouts inside decrypted Initials
_FRAMES_IETF, _FRAMES_GOOGLE = 0, 1
# What the CRYPTO stream carries
_HS_TLS, _HS_CHLO = 0, 1


class _Version(NamedTuple):
    name: str
    salt: bytes
    v2: bool  # "quicv2 " HKDF labels and the RFC 9369 long packet type numbering
    frames: int
    handshake: int


def _build_versions() -> dict[int, _Version]:
    table = {
        V1: _Version("v1", _SALT_V1, False, _FRAMES_IETF, _HS_TLS),
        V2: _Version("v2", _SALT_V2, True, _FRAMES_IETF, _HS_TLS),
        0xFACEB001: _Version("mvfst-22", _SALT_D22, False, _FRAMES_IETF, _HS_TLS),
        0xFACEB002: _Version("mvfst-27", _SALT_D23, False, _FRAMES_IETF, _HS_TLS),
        0xFACEB00E: _Version("mvfst-exp", _SALT_D23, False, _FRAMES_IETF, _HS_TLS),
        T050: _Version("T050", _SALT_T050, False, _FRAMES_GOOGLE, _HS_TLS),
        T051: _Version("T051", _SALT_T051, False, _FRAMES_GOOGLE, _HS_TLS),
        Q050: _Version("Q050", _SALT_Q050, False, _FRAMES_GOOGLE, _HS_CHLO),
    }
    for draft in range(22, 35):
        salt = (_SALT_D22 if draft <= 22 else _SALT_D23 if draft <= 28
                else _SALT_D29 if draft <= 32 else _SALT_V1)
        table[0xFF000000 | draft] = _Version(f"draft-{draft}", salt, False, _FRAMES_IETF, _HS_TLS)
    return table


_VERSIONS = _build_versions()


def known_versions() -> set[int]:
    """The versions whose long-header Initials this module reads (the legacy gQUIC public
    header aside)."""
    return set(_VERSIONS) | {Q046}

# NamedTuple construction through its Python-level __new__ costs twice tuple.__new__
_new = tuple.__new__
_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_U16LE = struct.Struct("<H").unpack_from
_U32LE = struct.Struct("<I").unpack_from


_ZEROS = memoryview(bytes(2048))


def _skip_padding(p: bytes, pos: int) -> int:
    """Where the run of PADDING (zero bytes) at p[pos] ends; len(p) when it reaches the end
    of the packet, as it usually does (checked by one memcmp; a regex search cost ~70
    instructions a byte)."""
    n = len(p)
    if n - pos <= len(_ZEROS) and p.endswith(_ZEROS[:n - pos]):
        return n
    return n - len(p[pos:].lstrip(b"\x00"))


def version_name(version: int) -> str:
    """Human name of a QUIC version number ("v1", "draft-29", "Q046", "0x1a2a3a4a", ...)."""
    known = _VERSIONS.get(version)
    if known is not None:
        return known.name
    if (version & 0xFFFFFF00) == 0xFF000000:
        return f"draft-{version & 0xFF}"
    if _is_gquic(version):
        return version.to_bytes(4, "big").decode("ascii")
    return f"0x{version:08x}"


def _is_gquic(version: int) -> bool:
    """Google QUIC version tags: "Q0dd" / "T0dd" in ASCII."""
    top = version >> 16
    if top not in (0x5130, 0x5430):  # "Q0", "T0"
        return False
    d1, d2 = (version >> 8) & 0xFF, version & 0xFF
    return 0x30 <= d1 <= 0x39 and 0x30 <= d2 <= 0x39


def _is_forcing_vn(version: int) -> bool:
    """RFC 9000 15: versions 0x?a?a?a?a are reserved to exercise version negotiation."""
    return (version & 0x0F0F0F0F) == 0x0A0A0A0A


class QuicResult(NamedTuple):
    version: str  # "v1", "v2", "draft-29", "mvfst-27", "Q046", "T051", "0x1a2a3a4a" (a version
    # that forces negotiation), "negotiation" (only a server's Version Negotiation was seen)
    hello: ClientHello | None  # the client's TLS ClientHello once complete (IETF QUIC, T05x)
    sni: bytes | None  # hello.sni, or the gQUIC CHLO "SNI" tag (bytes as sent)
    complete: bool  # nothing more to learn from this flow's later datagrams


class QuicState:
    """Per-flow QUIC inspection state: Initial keys, CRYPTO stream reassembly, the outcome."""

    __slots__ = ("is_quic", "version", "hello", "sni", "complete", "initials", "key_dcid",
                 "keys", "crypto", "ranges", "largest_pn")

    def __init__(self) -> None:
        self.is_quic = False
        self.version: str | None = None
        self.hello: ClientHello | None = None
        self.sni: bytes | None = None
        self.complete = False
        self.initials = 0  # client Initial packets inspected
        self.key_dcid: bytes | None = None  # DCID of the client's first Initial (key material)
        self.keys: dict = {}  # (version, dcid) -> (aead, hp encryptor, iv as int), at most 2
        self.crypto = bytearray()  # CRYPTO stream bytes (offsets beyond MAX_CRYPTO dropped)
        self.ranges: list[list[int]] = []  # sorted disjoint [start, end) received in crypto
        self.largest_pn = -1

    def result(self) -> QuicResult:
        return _new(QuicResult, (self.version or "unknown", self.hello, self.sni, self.complete))

    def __repr__(self) -> str:
        return (f"QuicState(version={self.version!r}, sni={self.sni!r}, "
                f"complete={self.complete}, initials={self.initials})")


def parse_quic_datagram(datagram: bytes, state: QuicState,
                        from_client: bool) -> QuicResult | None:
    """Inspect one UDP payload of a flow; None when it is not (recognisably) QUIC."""
    try:
        if type(datagram) is not bytes:
            datagram = bytes(datagram)  # bytearray / memoryview
        return _parse_datagram(datagram, state, from_client)
    except Exception:  # noqa: BLE001 - hostile input must never escape as an exception
        return state.result() if state.is_quic else None


def _known(state: QuicState) -> QuicResult | None:
    return state.result() if state.is_quic else None


def _parse_datagram(dg: bytes, state: QuicState, from_client: bool) -> QuicResult | None:
    size = len(dg)
    if size == 0:
        return _known(state)
    first = dg[0]
    if not first & 0x80:
        if from_client and _legacy_gquic(dg, state):
            return state.result()
        if state.is_quic and from_client:
            state.complete = True  # the client sends 1-RTT packets: the handshake is over
        return _known(state)
    if size < 7:
        return _known(state)
    version = _U32(dg, 1)[0]
    if version == 0:
        return _version_negotiation(dg, state, from_client)
    if version == Q046:
        return _gquic_q046(dg, state, from_client)
    info = _VERSIONS.get(version)
    if info is None:
        if _is_forcing_vn(version) and from_client and size >= MIN_INITIAL_DATAGRAM \
                and _long_header(dg, 0, size, False) is not None:
            _mark(state, version_name(version))
            return state.result()
        return _known(state)
    pos = 0
    seen = False
    for _ in range(MAX_COALESCED):
        header = _long_header(dg, pos, size, info.v2)
        if header is None:
            break
        ptype, dcid, pn_offset, end = header
        if ptype == 0:  # Initial
            if from_client:
                if _client_initial(dg, pos, pn_offset, end, dcid, version, info, state):
                    seen = True
                elif size >= MIN_INITIAL_DATAGRAM or state.is_quic:
                    seen = True  # looks like an Initial but does not decrypt: still QUIC
            else:
                seen = True
        elif ptype == 2 and from_client:  # Handshake from the client: Initials are done
            seen = True
            state.complete = True
        else:
            seen = True
        pos = end
        if pos >= size or not dg[pos] & 0x80 or pos + 5 > size or _U32(dg, pos + 1)[0] != version:
            break  # padding, a short-header packet, or garbage after the last long header
    if not seen:
        return _known(state)
    state.version = info.name
    state.is_quic = True
    return state.result()


def _mark(state: QuicState, name: str) -> None:
    state.is_quic = True
    if state.version is None:
        state.version = name


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """QUIC variable-length integer at data[pos]; (-1, end) when it does not fit before end."""
    if pos >= end:
        return -1, end
    first = data[pos]
    if first < 0x40:  # the common 1-byte form
        return first, pos + 1
    length = 1 << (first >> 6)
    if pos + length > end:
        return -1, end
    if length == 2:
        return ((first & 0x3F) << 8) | data[pos + 1], pos + 2
    return (int.from_bytes(data[pos:pos + length], "big") & ((1 << (8 * length - 2)) - 1),
            pos + length)


def _long_header(dg: bytes, pos: int, size: int, v2: bool) -> tuple | None:
    """(packet type as in v1, DCID, packet number offset, packet end) or None when malformed.

    Packet types are normalised to v1 numbering: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry.
    """
    if pos + 7 > size:
        return None
    first = dg[pos]
    if not first & 0x80 or not first & 0x40:  # long header with the fixed bit
        return None
    ptype = (first >> 4) & 3
    if v2:
        ptype = (ptype - 1) & 3  # RFC 9369: Initial 0b01, 0-RTT 0b10, Handshake 0b11, Retry 0b00
    dcid_len = dg[pos + 5]
    if dcid_len > MAX_CID:
        return None
    off = pos + 6 + dcid_len
    if off + 1 > size:
        return None
    dcid = dg[pos + 6:off]
    scid_len = dg[off]
    if scid_len > MAX_CID:
        return None
    off += 1 + scid_len
    if off > size:
        return None
    if ptype == 3:  # Retry: the rest of the datagram
        return ptype, dcid, size, size
    if ptype == 0:
        token_len, off = _varint(dg, off, size)
        if token_len < 0 or off + token_len > size:
            return None
        off += token_len
    length, off = _varint(dg, off, size)
    if length < 0 or off + length > size or length < 20:  # PN (1-4) + sample/tag room
        return None
    return ptype, dcid, off, off + length


_ECB = modes.ECB()
try:  # the Rust binding behind Cipher.encryptor(), without its checks: half the cost per flow
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    def _ecb_encryptor(key: bytes):
        return _rust_openssl.ciphers.create_encryption_ctx(algorithms.AES(key), _ECB)

    _ecb_encryptor(bytes(16))
except Exception:  # noqa: BLE001 - another cryptography version: the public API
    def _ecb_encryptor(key: bytes):
        return Cipher(algorithms.AES(key), _ECB).encryptor()


def _initial_keys(state: QuicState, version: int, info: _Version, dcid: bytes) -> tuple:
    cache_key = (version, dcid)
    keys = state.keys.get(cache_key)
    if keys is None:
        initial = _hmac(_salt_pads(info.salt), dcid)  # HKDF-Extract
        client = _hmac(_hmac_pads(initial), _CLIENT_IN)[:32]
        client_pads = _hmac_pads(client)
        key_info, iv_info, hp_info = _V2_INFO if info.v2 else _V1_INFO
        keys = (AESGCM(_hmac(client_pads, key_info)[:16]),
                _ecb_encryptor(_hmac(client_pads, hp_info)[:16]),
                int.from_bytes(_hmac(client_pads, iv_info)[:12], "big"))
        if len(state.keys) >= 2:
            state.keys.clear()
        state.keys[cache_key] = keys
    return keys


# HMAC-SHA256 (RFC 2104) from the key's inner and outer pad hashes, computed once per key and
# copied per message: the client secret keys three HKDF-Expand-Label calls and each version's
# salt every flow's HKDF-Extract. Measured with valgrind: 60% of the instructions of five
# hmac.digest() calls, whose OpenSSL digest lookup dominates for messages this short.
try:  # CPython's own SHA-256 (3.11: _sha256, 3.12+: _sha2), without OpenSSL's EVP layer: its
    # copy() is a struct copy. Per QUIC flow, 10% fewer instructions in the key schedule and
    # 15-25% less time in it, measured in the capture loop (where OpenSSL's code is cold)
    from _sha256 import sha256
except ImportError:
    try:
        from _sha2 import sha256
    except ImportError:
        from hashlib import sha256
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _hmac_pads(key: bytes) -> tuple:
    """Inner and outer hashes of a key of at most 64 bytes (the salts and secrets here)."""
    key = key.ljust(64, b"\x00")
    return sha256(key.translate(_IPAD)), sha256(key.translate(_OPAD))


def _hmac(pads: tuple, message: bytes) -> bytes:
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


_SALT_PADS: dict[bytes, tuple] = {}


def _salt_pads(salt: bytes) -> tuple:
    pads = _SALT_PADS.get(salt)
    if pads is None:
        pads = _SALT_PADS[salt] = _hmac_pads(salt)
    return pads


def _label_info(label: bytes, length: int) -> bytes:
    """The HKDF info of TLS 1.3 HKDF-Expand-Label (empty context) with the counter byte of the
    first (only) output block: lengths up to 32 take one SHA-256 block."""
    full = b"tls13 " + label
    return struct.pack("!HB", length, len(full)) + full + b"\x00\x01"


_CLIENT_IN = _label_info(b"client in", 32)
_V1_INFO = tuple(_label_info(b"quic " + name, n) for name, n in ((b"key", 16), (b"iv", 12),
                                                                  (b"hp", 16)))
_V2_INFO = tuple(_label_info(b"quicv2 " + name, n) for name, n in ((b"key", 16), (b"iv", 12),
                                                                    (b"hp", 16)))


def _decode_pn(truncated: int, pn_bits: int, largest: int) -> int:
    """RFC 9000 Appendix A.3 packet number reconstruction."""
    expected = largest + 1
    win = 1 << pn_bits
    hwin = win >> 1
    candidate = (expected & ~(win - 1)) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def _unprotect(dg: bytes, start: int, pn_offset: int, end: int, keys: tuple,
               largest: int) -> tuple[bytes, int] | None:
    aead, hp, iv = keys
    if pn_offset + 20 > end:
        return None
    mask = hp.update(dg[pn_offset + 4:pn_offset + 20])
    first = dg[start] ^ (mask[0] & 0x0F)
    pn_len = (first & 3) + 1
    if pn_offset + pn_len + 16 > end:
        return None
    truncated = (int.from_bytes(dg[pn_offset:pn_offset + pn_len], "big")
                 ^ int.from_bytes(mask[1:1 + pn_len], "big"))
    pn_bytes = truncated.to_bytes(pn_len, "big")
    pn = _decode_pn(truncated, pn_len * 8, largest)
    aad = bytes((first,)) + dg[start + 1:pn_offset] + pn_bytes
    nonce = (iv ^ pn).to_bytes(12, "big")
    try:
        return aead.decrypt(nonce, dg[pn_offset + pn_len:end], aad), pn
    except InvalidTag:
        return None


def _client_initial(dg: bytes, start: int, pn_offset: int, end: int, dcid: bytes,
                    version: int, info: _Version, state: QuicState) -> bool:
    """Decrypt one client Initial and feed its CRYPTO frames; False when it does not decrypt."""
    if state.complete:
        return True
    if state.initials >= MAX_INITIALS:
        state.complete = True
        return True
    state.initials += 1
    if state.key_dcid is None:
        state.key_dcid = dcid
    plain = None
    for key_dcid in (state.key_dcid, dcid) if dcid != state.key_dcid else (dcid,):
        # Initial keys come from the first Initial's DCID; after a Retry, from the new DCID
        plain = _unprotect(dg, start, pn_offset, end,
                           _initial_keys(state, version, info, key_dcid), state.largest_pn)
        if plain is not None:
            state.key_dcid = key_dcid
            break
    if plain is None:
        if state.initials >= MAX_INITIALS:
            state.complete = True
        return False
    payload, pn = plain
    if pn > state.largest_pn:
        state.largest_pn = pn
    if info.frames == _FRAMES_IETF:
        _ietf_frames(payload, state)
    else:
        _google_frames(payload, state)
    _try_hello(state, info)
    if not state.complete and state.initials >= MAX_INITIALS:
        state.complete = True
    return True


def _ietf_frames(p: bytes, state: QuicState) -> None:
    """Walk PADDING, PING, ACK and CRYPTO frames; stop at anything else."""
    n = len(p)
    pos = 0
    for _ in range(MAX_FRAMES):
        if pos >= n:
            return
        ftype = p[pos]
        if ftype == 0x00:  # PADDING run
            pos = _skip_padding(p, pos)
        elif ftype == 0x01:  # PING
            pos += 1
        elif ftype in (0x02, 0x03):  # ACK (with ECN counts for 0x03)
            pos = _skip_ack(p, pos + 1, n, ftype == 0x03)
            if pos < 0:
                return
        elif ftype == 0x06:  # CRYPTO
            offset, pos = _varint(p, pos + 1, n)
            length, pos = _varint(p, pos, n)
            if offset < 0 or length < 0 or pos + length > n:
                return
            _add_crypto(state, offset, p[pos:pos + length])
            pos += length
        else:  # CONNECTION_CLOSE or a frame an Initial may not carry: stop here
            return


def _skip_ack(p: bytes, pos: int, n: int, ecn: bool) -> int:
    largest, pos = _varint(p, pos, n)
    delay, pos = _varint(p, pos, n)
    count, pos = _varint(p, pos, n)
    first_range, pos = _varint(p, pos, n)
    if min(largest, delay, count, first_range) < 0 or count > n:
        return -1
    for _ in range(count):
        gap, pos = _varint(p, pos, n)
        rng, pos = _varint(p, pos, n)
        if gap < 0 or rng < 0:
            return -1
    if ecn:
        for _ in range(3):
            value, pos = _varint(p, pos, n)
            if value < 0:
                return -1
    return pos


def _google_frames(p: bytes, state: QuicState) -> None:
    """T05x/Q050 Initials: gQUIC frames, the crypto stream in frame type 0x08 (as nDPI)."""
    n = len(p)
    pos = 0
    for _ in range(MAX_FRAMES):
        if pos >= n:
            return
        ftype = p[pos]
        if ftype == 0x00:
            pos = _skip_padding(p, pos)
        elif ftype in (0x40, 0x60):  # gQUIC ACK: skipped by its usual size, as nDPI does
            pos += 6 if ftype == 0x40 else 9
        elif ftype == 0x08:
            offset, pos = _varint(p, pos + 1, n)
            length, pos = _varint(p, pos, n)
            if offset < 0 or length < 0 or pos + length > n:
                return
            _add_crypto(state, offset, p[pos:pos + length])
            pos += length
        else:
            return


def _add_crypto(state: QuicState, offset: int, data: bytes) -> None:
    """Store a CRYPTO fragment (clipped to MAX_CRYPTO) and merge its byte range."""
    if not data or offset >= MAX_CRYPTO:
        return
    end = min(offset + len(data), MAX_CRYPTO)
    ranges = state.ranges
    if len(ranges) <= 1 and offset == (ranges[0][1] if ranges else 0) == len(state.crypto):
        # in order: the first fragment, or the one that continues the only range
        state.crypto += data[:end - offset]
        if ranges:
            ranges[0][1] = end
        else:
            state.ranges = [[0, end]]
        return
    if len(ranges) >= MAX_RANGES and not any(s <= offset and end <= e for s, e in ranges):
        return  # too fragmented: a hostile client, keep what we have
    buf = state.crypto
    if len(buf) < end:
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data[:end - offset]
    merged: list[list[int]] = []
    placed = False
    for s, e in ranges:
        if e < offset:
            merged.append([s, e])
        elif s > end:
            if not placed:
                merged.append([offset, end])
                placed = True
            merged.append([s, e])
        else:
            offset, end = min(s, offset), max(e, end)
    if not placed:
        merged.append([offset, end])
    state.ranges = merged


def _try_hello(state: QuicState, info: _Version) -> None:
    ranges = state.ranges
    if not ranges or ranges[0][0] != 0:
        return
    data = bytes(state.crypto[:ranges[0][1]])
    if info.handshake == _HS_CHLO:
        sni = _chlo_sni(data)
        if sni is not NEED_MORE:
            state.sni = sni
            state.complete = True
        return
    hello = parse_handshake(data, True)
    if hello is NEED_MORE:
        if len(data) >= MAX_CRYPTO:
            state.complete = True
        return
    state.hello = hello
    state.sni = hello.sni if hello is not None else None
    state.complete = True


def _chlo_sni(data: bytes):
    """SNI of a gQUIC CHLO message; None when absent or not a CHLO; NEED_MORE when cut short."""
    if len(data) < 8:
        return NEED_MORE if b"CHLO".startswith(data[:4]) else None
    if data[:4] != b"CHLO":
        return None
    num_tags = _U16LE(data, 4)[0]
    values = 8 + 8 * num_tags
    prev = 0
    for i in range(min(num_tags, MAX_CHLO_TAGS)):
        entry = 8 + 8 * i
        if entry + 8 > len(data):
            return NEED_MORE
        tag = data[entry:entry + 4]
        end = _U32LE(data, entry + 4)[0]
        if end < prev:
            return None
        if tag == b"SNI\x00":
            if values + end > len(data):
                return NEED_MORE
            raw = data[values + prev:values + end]
            return raw[:MAX_RAW] or None
        prev = end
    return None


def _gquic_stream_chlo(p: bytes, pos: int, big_endian: bool) -> bytes | None | object:
    """SNI from the first gQUIC STREAM frame of stream 1 (the crypto stream) at p[pos:]."""
    n = len(p)
    pos = _skip_padding(p, pos)
    if pos >= n:
        return None
    if p[pos] in (0x40, 0x60):  # an ACK before the STREAM frame: skipped as nDPI does
        pos += 6 if p[pos] == 0x40 else 9
    if pos >= n:
        return None
    ftype = p[pos]
    if not ftype & 0x80:  # not a STREAM frame
        return None
    sid_len = (ftype & 0x03) + 1
    off_len = (ftype >> 2) & 0x07
    off_len = off_len + 1 if off_len else 0
    pos += 1
    if pos + sid_len + off_len > n:
        return None
    sid = int.from_bytes(p[pos:pos + sid_len], "big" if big_endian else "little")
    pos += sid_len
    pos += off_len
    if sid != 1:  # stream 1 carries the handshake; a second CHLO (after REJ) has offset > 0
        return None
    if ftype & 0x20:  # data length present
        if pos + 2 > n:
            return None
        length = _U16(p, pos)[0] if big_endian else _U16LE(p, pos)[0]
        pos += 2
        data = p[pos:pos + length]
    else:
        data = p[pos:]
    sni = _chlo_sni(data)
    return None if sni is NEED_MORE else sni


def _gquic_q046(dg: bytes, state: QuicState, from_client: bool) -> QuicResult | None:
    """Q046: flags byte 0b11TT00PP, version, DCID/SCID lengths as nibbles, cleartext CHLO."""
    first = dg[0]
    if len(dg) < 30 or not first & 0x40:
        return _known(state)
    cid_lens = dg[5]
    dcil, scil = cid_lens >> 4, cid_lens & 0x0F
    dcil = dcil + 3 if dcil else 0
    scil = scil + 3 if scil else 0
    pos = 6 + dcil + scil
    pn_len = (first & 0x03) + 1
    pos += pn_len + 12  # packet number, then the 12-byte message authentication hash
    if pos > len(dg):
        return _known(state)
    _mark(state, "Q046")
    state.version = "Q046"
    if from_client and (first & 0x30) == 0 and not state.complete:  # Initial
        sni = _gquic_stream_chlo(dg, pos, True)
        state.sni = sni if sni is not None else state.sni
        state.complete = True
    return state.result()


def _legacy_gquic(dg: bytes, state: QuicState) -> bool:
    """gQUIC public header (Q024-Q045) with the version flag: CHLO in the first packet."""
    flags = dg[0]
    # version flag and 8-byte connection ID (0x0c in old versions, 0x08 since the nonce bit 0x04
    # appeared: clients never send a nonce), no reset, no multipath bit
    if (flags & 0x09) != 0x09 or flags & 0xC2 or len(dg) < 13 + 1 + 12:
        return False
    version = _U32(dg, 9)[0]
    if not _is_gquic(version) or (version >> 24) != 0x51:  # "Q"
        return False
    number = int(dg[11:13])
    if number >= 46:  # Q046 and later use the long header (handled elsewhere)
        return False
    pn_len = (1, 2, 4, 6)[(flags >> 4) & 0x03]
    pos = 13 + pn_len
    if number < 34:
        pos += 1  # private flags byte
    pos += 12  # message authentication hash of cleartext packets
    if pos > len(dg):
        return False
    _mark(state, version_name(version))
    if not state.complete:
        sni = _gquic_stream_chlo(dg, pos, number >= 39)
        state.sni = sni if sni is not None else state.sni
        state.complete = True
    return True


def _version_negotiation(dg: bytes, state: QuicState, from_client: bool) -> QuicResult | None:
    """Version Negotiation (version 0, server to client): CIDs then a list of 32-bit versions."""
    if from_client:
        return _known(state)
    size = len(dg)
    off = 5
    dcid_len = dg[off]
    off += 1 + dcid_len
    if off >= size:
        return _known(state)
    scid_len = dg[off]
    off += 1 + scid_len
    rest = size - off
    if rest < 4 or rest % 4:
        return _known(state)
    _mark(state, "negotiation")
    return state.result()
