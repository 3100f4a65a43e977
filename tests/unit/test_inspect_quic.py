"""capture.inspect.quic: Initial decryption (RFC 9001 / RFC 9369 vectors), CRYPTO reassembly,
draft / Google / gQUIC versions, hostile datagrams, and the nDPI corpus captures."""

from __future__ import annotations

import hmac
import os
import random
import struct
import time

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from capture.inspect.names import safe_name
from capture.inspect.quic import (
    MAX_CRYPTO,
    MAX_INITIALS,
    QuicResult,
    QuicState,
    parse_quic_datagram,
    version_name,
)
from capture.inspect.tls import ClientHello
from tests.unit.test_inspect_tls import (
    alpn_ext,
    corpus_payloads,
    expected_ja4,
    handshake,
    hello_body,
    ndpi_flows,
    ndpi_rendering,
    sig_algs_ext,
    sni_ext,
    truth_conversations,
    version_names,
    versions_ext,
)

# RFC 9001 Appendix A.2: the client Initial (DCID 8394c8f03e515708, packet number 2), protected
RFC_V1 = bytes.fromhex(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399"
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c"
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212"
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5"
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208"
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec"
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3"
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db"
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c"
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8"
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556"
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74"
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a"
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00"
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632"
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964"
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd"
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff"
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198"
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd"
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73"
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f"
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e"
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade"
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047"
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2"
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4"
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0"
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e"
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0"
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400"
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab"
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9"
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4"
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064"
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241"
    "e221af44860018ab0856972e194cd934"
)
# RFC 9369 Appendix A.2: the same ClientHello in a QUIC version 2 Initial
RFC_V2 = bytes.fromhex(
    "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485"
    "dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04"
    "9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d"
    "250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a"
    "12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500"
    "cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68"
    "18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33"
    "12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3"
    "d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd"
    "6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520"
    "bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045"
    "636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f"
    "ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12"
    "16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5"
    "4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4"
    "fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b"
    "8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7"
    "14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9"
    "9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91"
    "abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd"
    "80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db"
    "848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18"
    "d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15"
    "c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc"
    "7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61"
    "f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710"
    "10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b"
    "3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e"
    "06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce"
    "8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1"
    "34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1"
    "e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd"
    "5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3"
    "8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89"
    "d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53"
    "6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19"
    "9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b"
    "a18b2faa745b6fe189cf772a9f84cbfc"
)
RFC_DCID = bytes.fromhex("8394c8f03e515708")
# RFC 9001 Appendix A.2: the unprotected header and the CRYPTO frame (then 917 bytes of PADDING)
RFC_V1_HEADER = bytes.fromhex("c300000001088394c8f03e5157080000449e00000002")
RFC_V2_HEADER = bytes.fromhex("d36b3343cf088394c8f03e5157080000449e00000002")
RFC_PAYLOAD = bytes.fromhex(
    "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868"
    "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578"
    "616d706c652e636f6dff01000100000a00080006001d00170018001000070005"
    "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba"
    "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400"
    "0d0010000e0403050306030203080408050806002d00020101001c0002400100"
    "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000"
    "75300901100f088394c8f03e51570806048000ffff"
) + bytes(917)
# The RFC's ClientHello: 2 ciphers; 11 extensions; ALPN "alpn"; 7 signature algorithms
RFC_JA4 = expected_ja4(
    "q13d0211an", [0x1301, 0x1302],
    [0x0000, 0xFF01, 0x000A, 0x0010, 0x0005, 0x0033, 0x002B, 0x000D, 0x002D, 0x001C, 0x0039],
    [0x0403, 0x0503, 0x0603, 0x0203, 0x0804, 0x0805, 0x0806])

V1, V2 = 0x00000001, 0x6B3343CF
SALTS = {
    "v1": "38762cf7f55934b34d179ae6a4c80cadccbb7f0a",
    "v2": "0dede3def700a6db819381be6e269dcbf9bd2ed9",
    "d22": "7fbcdb0e7c66bbe9193a96cd21519ebd7a02644a",
    "d23": "c3eef712c72ebb5a11a7d2432bb46365bef9f502",
    "d29": "afbfec289993d24c9e9786f19c6111e04390a899",
    "q050": "504574efd066fe2f9d945cfcdbd3a7f0d3b56b45",
    "t050": "7ff579e5acd072915580304c43a2367c60488310",
    "t051": "7a4edef4e7ccee5fa4506c19124fc8ccda6e033d",
}


# ---------------------------------------------------------------------------------------------
# A client Initial encryptor for the tests (checked against the RFC packets below)
# ---------------------------------------------------------------------------------------------


def expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def client_keys(salt: str, dcid: bytes, v2: bool = False) -> tuple[bytes, bytes, bytes]:
    salt_bytes = bytes.fromhex(SALTS.get(salt, salt))
    secret = expand_label(hmac.digest(salt_bytes, dcid, "sha256"), b"client in", 32)
    prefix = b"quicv2 " if v2 else b"quic "
    return (expand_label(secret, prefix + b"key", 16), expand_label(secret, prefix + b"iv", 12),
            expand_label(secret, prefix + b"hp", 16))


def protect(keys, header: bytes, pn_len: int, pn: int, payload: bytes) -> bytes:
    """Header (with the plain packet number at its end) + payload -> the protected packet."""
    key, iv, hp = keys
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, payload, header)
    sample = sealed[4 - pn_len:20 - pn_len]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    out = bytearray(header)
    out[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        out[len(header) - pn_len + i] ^= mask[1 + i]
    return bytes(out) + sealed


def varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return struct.pack("!H", 0x4000 | value)
    return struct.pack("!I", 0x80000000 | value)


def crypto_frame(offset: int, data: bytes, frame_type: int = 0x06) -> bytes:
    return bytes([frame_type]) + varint(offset) + varint(len(data)) + data


def initial(payload: bytes, *, version: int = V1, salt: str = "v1", v2: bool = False,
            dcid: bytes = RFC_DCID, key_dcid: bytes | None = None, scid: bytes = b"\x01\x02",
            pn: int = 0, pn_len: int = 2, token: bytes = b"", pad_to: int = 1200,
            packet_type: int | None = None) -> bytes:
    """A protected client Initial (padded with PADDING frames to pad_to bytes)."""
    ptype = (1 if v2 else 0) if packet_type is None else packet_type
    head_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + len(varint(len(token))) + len(token) + 2
    payload += bytes(max(0, pad_to - head_len - pn_len - len(payload) - 16))
    length = pn_len + len(payload) + 16
    header = (bytes([0xC0 | ptype << 4 | (pn_len - 1)]) + struct.pack("!I", version)
              + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + varint(len(token))
              + token + struct.pack("!H", 0x4000 | length) + pn.to_bytes(pn_len, "big"))
    return protect(client_keys(salt, key_dcid or dcid, v2), header, pn_len, pn, payload)


def tls_hello(sni: bytes = b"quic.example", alpn: bytes = b"h3", pad: int = 0) -> bytes:
    exts = [sni_ext(sni), alpn_ext(alpn), versions_ext(0x0304), sig_algs_ext(0x0403, 0x0804),
            struct.pack("!HH", 0x0039, pad) + bytes(pad)]
    return handshake(hello_body([0x1301, 0x1302, 0x1303], exts, session_id=b""))


def chlo(tags: dict[bytes, bytes]) -> bytes:
    """A gQUIC CHLO handshake message: tag table (tag, end offset) then the values."""
    table, values = b"", b""
    for tag, value in tags.items():
        values += value
        table += tag + struct.pack("<I", len(values))
    return b"CHLO" + struct.pack("<HH", len(tags), 0) + table + values


def parse_all(datagrams, from_client=True, state=None):
    state = state or QuicState()
    return [parse_quic_datagram(d, state, from_client) for d in datagrams], state


# ---------------------------------------------------------------------------------------------
# RFC vectors
# ---------------------------------------------------------------------------------------------


def test_test_encryptor_reproduces_the_rfc_packets():
    assert [k.hex() for k in client_keys("v1", RFC_DCID)] == [  # RFC 9001 A.1
        "1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c",
        "9f50449e04a0e810283a1e9933adedd2"]
    assert [k.hex() for k in client_keys("v2", RFC_DCID, v2=True)] == [  # RFC 9369 A.1
        "8b1a0bc121284290a29e0971b5cd045d", "91f73e2351d8fa91660e909f",
        "45b95e15235d6f45a6b19cbcb0294ba9"]
    assert protect(client_keys("v1", RFC_DCID), RFC_V1_HEADER, 4, 2, RFC_PAYLOAD) == RFC_V1
    assert protect(client_keys("v2", RFC_DCID, True), RFC_V2_HEADER, 4, 2,
                   RFC_PAYLOAD) == RFC_V2


@pytest.mark.parametrize("packet, version", [(RFC_V1, "v1"), (RFC_V2, "v2")])
def test_rfc_client_initial(packet, version):
    state = QuicState()
    result = parse_quic_datagram(packet, state, True)
    assert isinstance(result, QuicResult)
    assert result.version == version
    assert result.sni == b"example.com"
    assert result.complete
    assert result.hello == ClientHello(b"example.com", ("alpn",), (0x0304,), RFC_JA4)
    # later datagrams of the flow: known QUIC, nothing more to learn
    assert parse_quic_datagram(b"\x41" + bytes(40), state, True) == result
    assert parse_quic_datagram(b"\x41" + bytes(40), state, False) == result


def test_bytes_like_datagrams():
    assert parse_quic_datagram(memoryview(RFC_V1), QuicState(), True).sni == b"example.com"
    assert parse_quic_datagram(bytearray(RFC_V2), QuicState(), True).sni == b"example.com"


@pytest.mark.parametrize("where", [0, 7, 12, 30, 200, 1199])  # flags, DCID, PN, payload, tag
def test_initial_that_does_not_decrypt(where):
    packet = bytearray(RFC_V1)
    packet[where] ^= 0x01 if where else 0x02  # first byte: flip a reserved/PN bit, not the form
    state = QuicState()
    result = parse_quic_datagram(bytes(packet), state, True)
    assert result is not None and result.hello is None and result.sni is None
    assert result.version == "v1" and not result.complete


def test_undecryptable_initials_are_bounded():
    packet = bytearray(RFC_V1)
    packet[300] ^= 0xFF
    results, state = parse_all([bytes(packet)] * (MAX_INITIALS + 3))
    assert all(r.hello is None for r in results)
    assert [r.complete for r in results][:MAX_INITIALS - 1] == [False] * (MAX_INITIALS - 1)
    assert results[-1].complete
    assert state.initials <= MAX_INITIALS


def test_truncated_headers_and_packets():
    for cut in range(len(RFC_V1)):
        assert parse_quic_datagram(RFC_V1[:cut], QuicState(), True) is None, cut


def test_random_datagrams_never_raise():
    rng = random.Random(90001)
    shared = QuicState()  # one hostile flow sending everything
    start = time.perf_counter()
    for i in range(10_000):
        kind = i % 5
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 1400))
        elif kind == 1:  # plausible v1 / v2 / draft long headers with random rest
            version = rng.choice([V1, V2, 0xFF00001D, 0x54303531, 0x51303436, 0x51303530, 0])
            data = bytes([rng.choice([0xC0, 0xC3, 0xD0, 0xE0, 0xF0, 0x80])]) + \
                struct.pack("!I", version) + rng.randbytes(rng.randint(0, 1300))
        elif kind == 2:  # the RFC packet with random damage
            buf = bytearray(RFC_V1 if i & 1 else RFC_V2)
            for _ in range(rng.randint(1, 6)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf[:rng.randint(1, len(buf))]) if i & 2 else bytes(buf)
        elif kind == 3:  # legacy gQUIC public headers
            data = bytes([rng.choice([0x09, 0x0D, 0x19, 0x29])]) + rng.randbytes(8) + \
                b"Q0" + str(rng.randint(10, 49)).encode() + rng.randbytes(rng.randint(0, 1300))
        else:  # valid packets with hostile CRYPTO frames inside
            frames = b"".join(crypto_frame(rng.randint(0, 20000), rng.randbytes(rng.randint(0, 50)))
                              for _ in range(rng.randint(0, 40)))
            data = initial(frames[:1100], pn=rng.randint(0, 3))
        for state in (QuicState(), shared):
            result = parse_quic_datagram(data, state, bool(i & 4))
            assert result is None or isinstance(result, QuicResult)
            assert len(state.crypto) <= MAX_CRYPTO
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------------------
# CRYPTO stream reassembly
# ---------------------------------------------------------------------------------------------


def test_client_hello_over_two_initials_in_either_order():
    hello = tls_hello(pad=1500)  # too big for one Initial
    first = initial(crypto_frame(0, hello[:1000]), pn=0)
    second = initial(crypto_frame(1000, hello[1000:]), pn=1)
    for order in ((first, second), (second, first)):
        (r1, r2), state = parse_all(order)
        assert r1.version == "v1" and r1.hello is None and not r1.complete
        assert r2.complete and r2.sni == b"quic.example"
        assert r2.hello.alpn == ("h3",)
        assert r2.hello.ja4.startswith("q13d0305h3_")


def test_shuffled_crypto_frames_with_ping_and_padding():
    hello = tls_hello()
    pieces = [(0, hello[:30]), (30, hello[30:90]), (90, hello[90:])]
    payload = b"\x01" + crypto_frame(*pieces[2]) + b"\x00\x00\x01" + crypto_frame(*pieces[0]) + \
        b"\x02\x05\x00\x00\x01" + crypto_frame(*pieces[1])  # PING, PADDING, ACK in between
    result = parse_quic_datagram(initial(payload), QuicState(), True)
    assert result.sni == b"quic.example" and result.complete


def test_overlapping_and_duplicated_fragments():
    hello = tls_hello()
    payload = crypto_frame(10, hello[10:60]) + crypto_frame(0, hello[:40]) + \
        crypto_frame(50, hello[50:]) + crypto_frame(0, hello[:5])
    assert parse_quic_datagram(initial(payload), QuicState(), True).sni == b"quic.example"


def test_frames_after_an_unexpected_frame_are_ignored():
    hello = tls_hello()
    payload = crypto_frame(0, hello[:50]) + b"\x1c\x00\x00\x00" + crypto_frame(50, hello[50:])
    result = parse_quic_datagram(initial(payload), QuicState(), True)
    assert result.version == "v1" and result.hello is None and not result.complete


def test_hostile_crypto_offsets_are_bounded():
    state = QuicState()
    far = crypto_frame(MAX_CRYPTO + 5, b"x" * 10) + crypto_frame(2**30, b"y")
    parse_quic_datagram(initial(far), state, True)
    assert len(state.crypto) == 0
    tiny = b"".join(crypto_frame(off, b"z") for off in range(1, 400, 2))  # 200 disjoint ranges
    parse_quic_datagram(initial(tiny, pn=1), state, True)
    assert len(state.ranges) <= 32 and len(state.crypto) < 400


def test_not_a_client_hello_in_crypto_stream():
    payload = crypto_frame(0, b"\x02\x00\x00\x30" + bytes(48))  # a ServerHello type
    result = parse_quic_datagram(initial(payload), QuicState(), True)
    assert result.version == "v1" and result.hello is None and result.complete


# ---------------------------------------------------------------------------------------------
# Packets, versions, headers
# ---------------------------------------------------------------------------------------------


def test_coalesced_initial_and_0rtt():
    hello = tls_hello()
    first = initial(crypto_frame(0, hello), pad_to=600)
    zero_rtt = bytes([0xD1]) + struct.pack("!I", V1) + b"\x08" + RFC_DCID + b"\x02\x01\x02" + \
        struct.pack("!H", 0x4000 | 600) + bytes(600)
    result = parse_quic_datagram(first + zero_rtt + bytes(20), QuicState(), True)
    assert result.sni == b"quic.example" and result.version == "v1"
    # the Initial second in the datagram
    result = parse_quic_datagram(zero_rtt + first, QuicState(), True)
    assert result.sni == b"quic.example"


def test_keys_after_retry_come_from_the_new_dcid():
    hello = tls_hello()
    state = QuicState()
    # first Initial (its CRYPTO data is cut) with the original DCID
    parse_quic_datagram(initial(crypto_frame(0, hello[:20])), state, True)
    # after a Retry the client uses the server's new CID, and keys derived from it
    new_dcid = bytes(range(16))
    second = initial(crypto_frame(0, hello), dcid=new_dcid, token=b"retry-token" * 4)
    assert parse_quic_datagram(second, state, True).sni == b"quic.example"


@pytest.mark.parametrize("version, salt, name", [
    (0xFF00001D, "d29", "draft-29"), (0xFF000020, "d29", "draft-32"),
    (0xFF00001B, "d23", "draft-27"), (0xFF000017, "d23", "draft-23"),
    (0xFF00001C, "d23", "draft-28"), (0xFF000016, "d22", "draft-22"),
    (0xFF000021, "v1", "draft-33"), (0xFACEB001, "d22", "mvfst-22"),
    (0xFACEB002, "d23", "mvfst-27"), (0xFACEB00E, "d23", "mvfst-exp"),
])
def test_draft_and_mvfst_versions(version, salt, name):
    packet = initial(crypto_frame(0, tls_hello()), version=version, salt=salt)
    result = parse_quic_datagram(packet, QuicState(), True)
    assert (result.version, result.sni, result.complete) == (name, b"quic.example", True)
    # the v1 salt does not open a draft-29 packet
    if salt != "v1":
        wrong = initial(crypto_frame(0, tls_hello()), version=version, salt="v1")
        assert parse_quic_datagram(wrong, QuicState(), True).hello is None


def test_v2_packet_type_bits():
    hello = crypto_frame(0, tls_hello())
    good = initial(hello, version=V2, salt="v2", v2=True)
    assert parse_quic_datagram(good, QuicState(), True).sni == b"quic.example"
    # with v1 type bits (0b00 = Retry in v2) the packet is not an Initial
    as_retry = initial(hello, version=V2, salt="v2", v2=True, packet_type=0)
    assert parse_quic_datagram(as_retry, QuicState(), True).hello is None


@pytest.mark.parametrize("version, salt, name", [
    (0x54303531, "t051", "T051"), (0x54303530, "t050", "T050")])
def test_google_t05x(version, salt, name):
    hello = tls_hello(alpn=b"h3-T051")
    payload = crypto_frame(0, hello, frame_type=0x08)  # gQUIC v50 frame numbering
    result = parse_quic_datagram(initial(payload, version=version, salt=salt), QuicState(), True)
    assert (result.version, result.sni) == (name, b"quic.example")
    assert result.hello.ja4.startswith("q13d0305h1_")


def test_google_q050_chlo():
    message = chlo({b"PAD\x00": bytes(20), b"SNI\x00": b"www.example.com", b"VER\x00": b"Q050"})
    packet = initial(crypto_frame(0, message, frame_type=0x08), version=0x51303530, salt="q050")
    result = parse_quic_datagram(packet, QuicState(), True)
    assert (result.version, result.sni, result.hello, result.complete) == \
        ("Q050", b"www.example.com", None, True)


def q046_packet(message: bytes, first: int = 0xC3) -> bytes:
    frame = b"\xa0\x01" + struct.pack("!H", len(message)) + message
    packet = bytes([first]) + b"Q046" + b"\x50" + bytes(range(8)) + b"\x00\x00\x00\x01" + \
        bytes(12) + frame
    return packet + bytes(1350 - len(packet))


def test_gquic_q046():
    message = chlo({b"PAD\x00": bytes(10), b"SNI\x00": b"play.example.com", b"STK\x00": b"tk"})
    state = QuicState()
    result = parse_quic_datagram(q046_packet(message), state, True)
    assert result == QuicResult("Q046", None, b"play.example.com", True)
    # the server's packets and the client's short headers keep the label
    assert parse_quic_datagram(b"\x43" + bytes(40), state, False) == result


def test_gquic_q046_hostile_chlo():
    for message in (chlo({b"SNI\x00": b"x"})[:-1],  # value cut short
                    b"CHLO" + struct.pack("<HH", 60000, 0) + bytes(100),  # absurd tag count
                    b"CHLO" + struct.pack("<HH", 2, 0) + b"PAD\x00" + struct.pack("<I", 9) +
                    b"SNI\x00" + struct.pack("<I", 3) + bytes(20),  # offsets going backwards
                    b"REJ\x00" + bytes(40), b""):
        result = parse_quic_datagram(q046_packet(message), QuicState(), True)
        assert result.version == "Q046" and result.sni is None


@pytest.mark.parametrize("number, flags", [(43, 0x09), (39, 0x09), (25, 0x0D), (33, 0x09)])
def test_gquic_legacy_public_header(number, flags):
    message = chlo({b"SNI\x00": b"www.example.it", b"VER\x00": b"Q0%d" % number})
    big_endian = number >= 39
    frame = b"\xa0\x01" + struct.pack("!H" if big_endian else "<H", len(message)) + message
    packet = bytes([flags]) + bytes(range(8)) + b"Q0%d" % number + b"\x01" + bytes(12) + \
        (b"\x00" if number < 34 else b"") + frame
    state = QuicState()
    result = parse_quic_datagram(packet + bytes(1350 - len(packet)), state, True)
    assert result == QuicResult(f"Q0{number}", None, b"www.example.it", True)
    assert parse_quic_datagram(b"\x0c" + bytes(30), state, False) == result


def test_short_headers_need_a_known_flow():
    state = QuicState()
    assert parse_quic_datagram(b"\x40" + bytes(60), state, True) is None
    assert parse_quic_datagram(b"\x5f" + os.urandom(1000), state, False) is None
    result = parse_quic_datagram(initial(crypto_frame(0, tls_hello()[:50])), state, True)
    assert not result.complete
    # the client sending 1-RTT packets means the handshake is over
    assert parse_quic_datagram(b"\x40" + bytes(60), state, True).complete


def test_server_packets():
    state = QuicState()
    server_initial = bytes([0xC1]) + struct.pack("!I", V1) + b"\x00\x08" + bytes(8) + \
        b"\x00" + struct.pack("!H", 0x4000 | 200) + bytes(200)
    result = parse_quic_datagram(server_initial, state, False)
    assert result == QuicResult("v1", None, None, False)
    negotiation = b"\x80" + bytes(4) + b"\x08" + bytes(8) + b"\x08" + bytes(8) + \
        struct.pack("!II", V1, 0xFF00001D)
    assert parse_quic_datagram(negotiation, QuicState(), False).version == "negotiation"
    assert parse_quic_datagram(negotiation[:-1], QuicState(), False) is None
    assert parse_quic_datagram(negotiation, QuicState(), True) is None


@pytest.mark.parametrize("datagram", [
    b"",
    b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01",
    b"\xc0\x00\x00\x00\x01",  # cut after the version
    b"\xc0\xde\xad\xbe\xef\x08" + bytes(1300),  # unknown version
    b"\xc0\x00\x00\x00\x01\x15" + bytes(1300),  # DCID longer than 20
    b"\x80\x00\x00\x00\x01\x08" + bytes(1300),  # fixed bit clear
    b"\xc0\x00\x00\x00\x01\x08" + bytes(8) + b"\x00\x00\x7f\xff" + bytes(100),  # length lies
    bytes([0xC0]) + b"\x1a\x2a\x3a\x4a" + b"\x08" + bytes(8) + b"\x00" + bytes(100),  # short
])
def test_not_quic(datagram):
    assert parse_quic_datagram(datagram, QuicState(), True) is None


def test_version_negotiation_forcing_version():
    packet = bytes([0xC0]) + b"\x1a\x2a\x3a\x4a" + b"\x08" + bytes(8) + b"\x00\x00" + \
        struct.pack("!H", 0x4000 | 1200) + bytes(1200)
    result = parse_quic_datagram(packet, QuicState(), True)
    assert result.version == "0x1a2a3a4a" and result.hello is None


def test_version_names():
    assert [version_name(v) for v in (1, V2, 0xFF00001D, 0xFF000010, 0x51303436, 0x54303531,
                                      0xFACEB002, 0x12345678)] == \
        ["v1", "v2", "draft-29", "draft-16", "Q046", "T051", "mvfst-27", "0x12345678"]


# ---------------------------------------------------------------------------------------------
# The nDPI corpus (../shared/corpus/ndpi)
# ---------------------------------------------------------------------------------------------

# capture -> {client endpoint: (version, SNI, JA4 per the FoxIO spec or None for gQUIC)}
QUIC_CORPUS = {
    "quic-27.pcap": {"[3ef4:2194:f4a6:3503:40cd:714:57:c4e4]:64229": (
        "draft-27", "play.google.com", "q13d0309h7_55b375c5d22e_f68d9329452a")},
    "quic-29.pcap": {"10.9.0.1:36588": (
        "draft-29", "localhost", "q13d0512h9_d55e91d5c3b2_cd318bf3b157")},
    "quic-v2.pcapng": {"[::1]:42086": ("v2", "test", "q13d0310h3_55b375c5d22e_0a3b52e28cea")},
    "quic_0RTT.pcap": {
        "192.168.2.100:51972": ("v1", "ssl.gstatic.com", "q13d0312h3_55b375c5d22e_73e2d9e6cde6"),
        "[::1]:60459": ("draft-28", "abcd", "q00d0310h2_55b375c5d22e_060ec1c6a056")},
    "quic_frags_ch_in_multiple_packets.pcapng": {"[::1]:58822": (
        "v1", None, "q00i0307h4_55b375c5d22e_af0a630e9e67")},
    "quic_q46.pcap": {"172.29.42.236:38292": ("Q046", "play.google.com", None)},
    "quic_t51.pcap": {"187.227.136.152:55356": (
        "T051", "www.google.com", "q13d0308h1_55b375c5d22e_e7bc1e4f333e")},
    "google_meet.pcapng": {"192.168.88.231:59369": (
        "v1", "meet.google.com", "q13d0311h3_55b375c5d22e_5a1f323ef56d")},
    "dlt_ppp.pcap": {"193.167.0.252:44083": (
        "draft-29", "server4", "q00d0308h9_55b375c5d22e_23ed935430f2")},
    "http_ipv6.pcap": {"[2a00:d40:1:3:7aac:c0ff:fea7:d4c]:45931": ("Q025", "www.google.it", None)},
}


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(QUIC_CORPUS))
def test_corpus_quic(name, corpus_dir):
    flows: dict = {}  # endpoints -> [client, server, state, last result]
    for proto, src, dst, payload, _seq, _flags in corpus_payloads(
            os.path.join(corpus_dir, "pcap", name)):
        if proto != 17:
            continue
        flow = flows.setdefault(frozenset((src, dst)), [src, dst, QuicState(), None])
        result = parse_quic_datagram(payload, flow[2], src == flow[0])
        if result is not None:
            flow[3] = result
    ndpi = ndpi_flows(corpus_dir, name)
    truth = truth_conversations(corpus_dir, name)
    found = {client: (server, result, state.initials) for client, server, state, result
             in flows.values() if result is not None}
    assert set(found) == set(QUIC_CORPUS[name])
    for client, (version, sni, ja4) in QUIC_CORPUS[name].items():
        server, result, initials = found[client]
        shown = safe_name(result.sni) if result.sni else None  # as it leaves capture
        assert (result.version, shown, result.complete) == (version, sni, True), client
        # Initial packets decrypted: the ClientHello of quic_frags spans two
        assert initials == (2 if "frags" in name else 0 if result.hello is None else 1)
        assert (result.hello.ja4 if result.hello else None) == ja4, client
        meta = truth[frozenset((client, server))]
        assert result.version in meta.get("quic_version", []) + meta.get("gquic_version", [])
        assert ([sni] if sni else []) == meta.get("tls_sni", meta.get("gquic_sni", []))
        if result.hello:
            assert version_names(result.hello.versions) == \
                set(meta["tls_ch_supported_versions"]) - {"GREASE"}
            info = ndpi[frozenset((client, server))]
            assert ndpi_rendering(result.hello) == info["ja4"], client
