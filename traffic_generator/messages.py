"""Wire bytes built by hand, for the mix mode and the synthetic captures of the tests and
benchmarks: DNS queries and answers, HTTP/1.1 requests and responses, a TLS ClientHello with
SNI and the alert a refusing server sends back, and a QUIC v1 client Initial carrying such a
ClientHello (RFC 9001 protection; the mix mode does not send it)."""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DNS_NAMES = ("example.com", "www.example.org", "api.example.net", "cdn.example.com",
             "mail.example.org", "login.example.net", "static.example.com", "news.example.org")
HTTP_HOSTS = ("www.example.com", "api.example.org", "static.example.net", "shop.example.com")
HTTP_PATHS = ("/", "/index.html", "/api/v1/items?page=2", "/static/app.js", "/images/logo.png")
TLS_NAMES = ("www.example.com", "accounts.example.org", "cdn.example.net", "video.example.com")

QTYPE_A, QTYPE_AAAA, QCLASS_IN = 1, 28, 1
_DNS_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_ANSWER_ADDRESSES = {QTYPE_A: bytes((93, 184, 215, 14)),
                     QTYPE_AAAA: bytes.fromhex("26062800021f0cb2000000000000001e")}


# --- DNS -----------------------------------------------------------------------------------

def encode_name(name: str) -> bytes:
    """A domain name as DNS labels (RFC 1035 3.1): length-prefixed labels, then a zero."""
    labels = name.rstrip(".").encode("ascii").split(b".")
    if any(not 0 < len(label) < 64 for label in labels):
        raise ValueError(f"bad DNS name {name!r}: labels must be 1..63 bytes")
    encoded = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    if len(encoded) > 255:
        raise ValueError(f"bad DNS name {name!r}: longer than 255 bytes")
    return encoded


def dns_query(name: str, query_id: int, qtype: int = QTYPE_A) -> bytes:
    """A standard recursive query for one name (RD set, one question, class IN)."""
    return (_DNS_HEADER.pack(query_id & 0xFFFF, 0x0100, 1, 0, 0, 0)
            + encode_name(name) + struct.pack("!HH", qtype, QCLASS_IN))


def dns_response(query: bytes) -> bytes:
    """The answer to `query`: an A or AAAA record for its name, else an empty NOERROR.

    Raises ValueError when `query` is not a single-question DNS query.
    """
    if len(query) < _DNS_HEADER.size + 5:
        raise ValueError("too short for a DNS query")
    query_id, flags, qdcount = _DNS_HEADER.unpack_from(query)[:3]
    if flags & 0x8000 or qdcount != 1:
        raise ValueError("not a single-question query")
    end = _DNS_HEADER.size
    while (length := query[end]) != 0:
        if length > 63:
            raise ValueError("compressed or bad label in the question")
        end += length + 1
        if end >= len(query):
            raise ValueError("question runs past the end")
    end += 5  # the zero label, then qtype and qclass
    if end > len(query):
        raise ValueError("question runs past the end")
    question = query[_DNS_HEADER.size:end]
    qtype, qclass = struct.unpack_from("!HH", query, end - 4)
    address = _ANSWER_ADDRESSES.get(qtype) if qclass == QCLASS_IN else None
    flags = 0x8180 | (flags & 0x0100)  # QR, RA, RD copied; opcode QUERY, rcode NOERROR
    header = _DNS_HEADER.pack(query_id, flags, 1, 1 if address else 0, 0, 0)
    if address is None:
        return header + question
    # the owner name is a pointer to the question's name at offset 12
    return header + question + struct.pack("!HHHIH", 0xC00C, qtype, QCLASS_IN, 60,
                                           len(address)) + address


# --- HTTP ----------------------------------------------------------------------------------

def http_get(host: str, path: str = "/") -> bytes:
    """An HTTP/1.1 GET on a keep-alive connection."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: dpi-traffic-generator/0.1\r\nAccept: */*\r\n"
            "Connection: keep-alive\r\n\r\n").encode("ascii")


HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                 b"Connection: keep-alive\r\n\r\nok\n")


# --- TLS -----------------------------------------------------------------------------------

TLS_CONTENT_HANDSHAKE, TLS_CONTENT_ALERT = 0x16, 0x15
TLS_HANDSHAKE_CLIENT_HELLO = 0x01
TLS_EXT_SERVER_NAME = 0x0000
# TLS 1.3 suites, then the ECDHE TLS 1.2 ones a current browser offers
_CIPHER_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
                  0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
_GROUPS = (0x001D, 0x0017, 0x0018)  # x25519, secp256r1, secp384r1
_SIGNATURE_ALGORITHMS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
_ALPN = (b"h2", b"http/1.1")
# handshake_failure, fatal: what a server answers when it will not go on
TLS_ALERT_HANDSHAKE_FAILURE = bytes((TLS_CONTENT_ALERT, 3, 3, 0, 2, 2, 40))


def _u16_list(values: tuple[int, ...]) -> bytes:
    return struct.pack(f"!H{len(values)}H", 2 * len(values), *values)


def _extension(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def tls_client_hello(server_name: str, random: bytes | None = None,
                     session_id: bytes | None = None, key_share: bytes | None = None,
                     alpn_protocols: tuple[bytes, ...] = _ALPN) -> bytes:
    """One TLS record holding a ClientHello that offers TLS 1.3 and 1.2, with SNI.

    The layout is RFC 8446 4.1.2 (record version 0x0301, legacy_version 0x0303, a 32-byte
    session id for middlebox compatibility); the key share is random bytes, not a real key.
    """
    random = os.urandom(32) if random is None else random
    session_id = os.urandom(32) if session_id is None else session_id
    key_share = os.urandom(32) if key_share is None else key_share
    if len(random) != 32 or len(session_id) > 32 or len(key_share) != 32:
        raise ValueError("random and key share take 32 bytes, a session id at most 32")
    host = server_name.encode("ascii")
    server_name_list = struct.pack("!BH", 0, len(host)) + host  # name_type host_name
    alpn = b"".join(bytes((len(p),)) + p for p in alpn_protocols)
    share = struct.pack("!HH", 0x001D, len(key_share)) + key_share
    extensions = b"".join((
        _extension(TLS_EXT_SERVER_NAME, struct.pack("!H", len(server_name_list))
                   + server_name_list),
        _extension(0x0017, b""),  # extended_master_secret
        _extension(0xFF01, b"\x00"),  # renegotiation_info, empty
        _extension(0x000A, _u16_list(_GROUPS)),  # supported_groups
        _extension(0x000B, b"\x01\x00"),  # ec_point_formats: uncompressed
        _extension(0x0023, b""),  # session_ticket, empty
        _extension(0x0010, struct.pack("!H", len(alpn)) + alpn),  # ALPN
        _extension(0x000D, _u16_list(_SIGNATURE_ALGORITHMS)),  # signature_algorithms
        _extension(0x002B, b"\x04\x03\x04\x03\x03"),  # supported_versions: 1.3, 1.2
        _extension(0x002D, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
        _extension(0x0033, struct.pack("!H", len(share)) + share),  # key_share
    ))
    body = b"".join((
        b"\x03\x03", random,
        bytes((len(session_id),)), session_id,
        _u16_list(_CIPHER_SUITES),
        b"\x01\x00",  # compression methods: null
        struct.pack("!H", len(extensions)), extensions,
    ))
    handshake = bytes((TLS_HANDSHAKE_CLIENT_HELLO,)) + len(body).to_bytes(3, "big") + body
    return struct.pack("!BHH", TLS_CONTENT_HANDSHAKE, 0x0301, len(handshake)) + handshake


# --- QUIC ----------------------------------------------------------------------------------

QUIC_V1 = 0x00000001
_QUIC_V1_SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")  # RFC 9001 5.2
QUIC_INITIAL_SIZE = 1200  # RFC 9000 14.1: a client pads its first datagram to 1200 bytes


def _hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00\x01"
    return hmac.digest(secret, info, "sha256")[:length]


def _varint(value: int) -> bytes:
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return struct.pack("!H", 0x4000 | value)
    return struct.pack("!I", 0x80000000 | value)


def quic_initial(server_name: str, dcid: bytes | None = None, scid: bytes | None = None,
                 packet_number: int = 0) -> bytes:
    """A QUIC v1 client Initial datagram of QUIC_INITIAL_SIZE bytes: one CRYPTO frame with a
    TLS 1.3 ClientHello (SNI, ALPN h3), PADDING, AES-128-GCM packet protection and header
    protection with the Initial keys of the DCID (RFC 9001 5)."""
    dcid = os.urandom(8) if dcid is None else dcid
    scid = os.urandom(8) if scid is None else scid
    hello = tls_client_hello(server_name, alpn_protocols=(b"h3",))[5:]  # no record layer
    frames = b"\x06" + _varint(0) + _varint(len(hello)) + hello  # CRYPTO at offset 0
    pn_len = 4
    header_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + 1 + 2 + pn_len  # token length 0
    plain_len = QUIC_INITIAL_SIZE - header_len - 16  # 16: the AEAD tag
    if len(frames) > plain_len:
        raise ValueError("the ClientHello does not fit one Initial")
    frames += bytes(plain_len - len(frames))  # PADDING frames
    header = (bytes((0xC0 | (pn_len - 1),)) + struct.pack("!I", QUIC_V1)
              + bytes((len(dcid),)) + dcid + bytes((len(scid),)) + scid + b"\x00"
              + struct.pack("!H", 0x4000 | (pn_len + plain_len + 16))
              + packet_number.to_bytes(pn_len, "big"))
    secret = _hkdf_expand_label(hmac.digest(_QUIC_V1_SALT, dcid, "sha256"), b"client in", 32)
    key = _hkdf_expand_label(secret, b"quic key", 16)
    iv = _hkdf_expand_label(secret, b"quic iv", 12)
    hp = _hkdf_expand_label(secret, b"quic hp", 16)
    nonce = (int.from_bytes(iv, "big") ^ packet_number).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, frames, header)
    # header protection: the sample starts 4 bytes after the packet number's first byte
    pn_offset = len(header) - pn_len
    sample = sealed[4 - pn_len:4 - pn_len + 16]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    protected = bytearray(header)
    protected[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        protected[pn_offset + i] ^= mask[1 + i]
    return bytes(protected) + sealed
