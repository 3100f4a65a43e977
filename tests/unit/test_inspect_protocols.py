"""Payload parsers of capture.inspect: DNS (dns.py), HTTP/SSH/SMTP/IMAP/POP3 (text.py) and
NTP/DHCP/DHCPv6 (udp.py), on crafted, truncated and hostile payloads."""

from __future__ import annotations

import random
import struct

import pytest

from capture.inspect import dns, text, udp
from capture.inspect.dns import parse_dns, read_name
from capture.inspect.names import MAX_RAW

NEED_MORE = text.NEED_MORE


# --------------------------------------------------------------------------------- builders
def qname(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    if raw in (b"", b"."):
        return b"\x00"
    return b"".join(bytes([len(label)]) + label for label in raw.split(b".")) + b"\x00"


def header(ident=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def query(name="www.example.com", qtype=1, qclass=1, **kw) -> bytes:
    return header(**kw) + qname(name) + struct.pack("!HH", qtype, qclass)


def response_with_pointers() -> bytes:
    """www.example.com A -> CNAME edge.example.com (compressed) -> A 192.0.2.1."""
    msg = header(flags=0x8180, qd=1, an=2) + qname("www.example.com") + b"\x00\x01\x00\x01"
    # answer 1: name = pointer to the question (offset 12), CNAME edge + pointer to example.com
    cname = b"\x04edge\xc0\x10"
    msg += b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(cname)) + cname
    # answer 2: name = pointer to the CNAME target just written
    target = len(msg) - len(cname)
    msg += struct.pack("!H", 0xC000 | target) + struct.pack("!HHIH", 1, 1, 300, 4)
    msg += bytes([192, 0, 2, 1])
    return msg


# --------------------------------------------------------------------------------- DNS
def test_query_name_type_class():
    msg = parse_dns(query("www.example.com", qtype=28))
    assert msg.name == b"www.example.com" and msg.qtype == 28 and msg.qclass == 1
    assert not msg.response and msg.opcode == 0 and msg.complete and msg.trailing == 0


def test_response_with_compression_pointers():
    msg = parse_dns(response_with_pointers())
    assert msg.response and msg.ancount == 2 and msg.complete and msg.trailing == 0
    assert msg.name == b"www.example.com"
    # the CNAME target reads through two pointers
    data = response_with_pointers()
    assert read_name(data, data.index(b"\x04edge"), True)[1] == b"edge.example.com"


def test_idn_names_keep_their_punycode_form():
    assert parse_dns(query("www.xn--mnich-kva.com")).name == b"www.xn--mnich-kva.com"


def test_root_name_and_case_kept():
    assert parse_dns(query(".", qtype=2)).name == b"<Root>"  # as tshark shows it
    assert parse_dns(query("HQ01.DIR.AD.DLA.MIL")).name == b"HQ01.DIR.AD.DLA.MIL"


def test_names_are_the_wire_bytes():
    """Parsers do not make text: capture.inspect.names.safe_name() does (test_inspect_names)."""
    raw = b"x\x00\x1b[31m\\\xff\xc3\xa9<b>.\x07\x7f"
    assert parse_dns(query(raw)).name == raw


def test_http_host_is_kept_up_to_what_safe_name_reads():
    host = b"h" * 5000
    req = text.parse_http_request(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert req.host == host[:MAX_RAW] and req.complete


def test_label_with_a_dot_is_not_escaped():
    msg = header() + b"\x03a.b\x03com\x00" + b"\x00\x01\x00\x01"
    assert parse_dns(msg).name == b"a.b.com"  # as tshark shows it


def test_compression_loop_is_rejected():
    # the question name is a pointer to itself
    assert parse_dns(header() + b"\xc0\x0c" + b"\x00\x01\x00\x01") is None
    # an answer whose name points at a pointer that points back at it
    msg = header(flags=0x8180, an=1) + qname("a.example") + b"\x00\x01\x00\x01"
    here = len(msg)
    msg += struct.pack("!H", 0xC000 | here) + struct.pack("!HHIH", 1, 1, 0, 0)
    assert parse_dns(msg) is None


def test_forward_pointer_is_rejected():
    msg = header() + b"\xc0\x20" + b"\x00\x01\x00\x01" + bytes(20) + b"\x01a\x00"
    assert parse_dns(msg) is None


def test_pointer_into_the_header_is_rejected():
    assert parse_dns(header() + b"\x01a\xc0\x02" + b"\x00\x01\x00\x01") is None


def _pointer_chain(jumps: int) -> bytes:
    """A query whose name is reached through `jumps` backward pointers (answers hold them)."""
    msg = header(flags=0x8180, an=jumps) + qname("chain.example") + b"\x00\x01\x00\x01"
    previous = 12
    for _ in range(jumps):
        here = len(msg)
        msg += struct.pack("!H", 0xC000 | previous) + struct.pack("!HHIH", 1, 1, 0, 0)
        previous = here
    # one more record whose name is the last pointer: it takes `jumps` + 1 pointer reads
    return msg


def test_pointer_jumps_are_bounded():
    msg = _pointer_chain(25)
    # the last records need more than 20 jumps: the message is refused, quickly
    assert parse_dns(msg) is None
    ok = _pointer_chain(19)
    assert parse_dns(ok).complete
    assert read_name(ok, len(ok) - 12, True)[1] == b"chain.example"


def test_label_longer_than_63_is_rejected():
    # a length byte of 64 is the 0x40 (extended) label type: not a name
    assert parse_dns(header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01") is None
    assert parse_dns(header() + b"\x80" + b"a" * 10 + b"\x00\x00\x01\x00\x01") is None
    assert parse_dns(query("a" * 63 + ".com")).name == b"a" * 63 + b".com"


def test_name_longer_than_255_is_rejected():
    long_name = ".".join(["a" * 63] * 4)  # 4 * 64 + 1 = 257 wire bytes
    assert parse_dns(query(long_name)) is None
    ok = ".".join(["a" * 63] * 3 + ["b" * 61])  # 255 wire bytes
    assert parse_dns(query(ok)).name == ok.encode()


def test_qdcount_65535_and_impossible_counts():
    assert parse_dns(header(qd=65535) + qname("a.b") + b"\x00\x01\x00\x01") is None
    assert parse_dns(header(qd=1, an=65535, ns=65535) + qname("a.b") + b"\x00\x01\x00\x01") \
        is None
    assert parse_dns(query(), max_questions=0) is None


def test_bad_opcode_is_rejected():
    assert parse_dns(query(flags=0x1800)) is None  # opcode 3 is unassigned
    assert parse_dns(query(flags=0x7800)) is None  # opcode 15


def test_truncated_messages_are_consistent_prefixes():
    full = response_with_pointers()
    assert parse_dns(full[:3]) is None
    short = parse_dns(full[:4])
    assert short is not None and not short.complete and short.name is None
    cut_in_name = parse_dns(full[:17])
    assert not cut_in_name.complete and cut_in_name.name is None
    cut_after_name = parse_dns(full[:30])  # name complete, type/class cut
    assert not cut_after_name.complete and cut_after_name.name is None
    cut_in_answers = parse_dns(full[:-3])
    assert cut_in_answers.name == b"www.example.com" and not cut_in_answers.complete


def test_trailing_bytes_are_reported():
    msg = parse_dns(query() + b"junk")
    assert msg.complete and msg.trailing == 4


def test_many_records_are_walked_only_up_to_the_bound():
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes(4)
    msg = header(flags=0x8180, an=200) + qname("a.example") + b"\x00\x01\x00\x01" + rr * 200
    res = parse_dns(msg)
    assert res.complete and res.ancount == 200 and res.trailing == 0


def test_dns_never_raises_on_random_or_mutated_input():
    rng = random.Random(1)
    seeds = [query(), response_with_pointers(), _pointer_chain(5)]
    for i in range(20000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[:rng.randrange(len(data) + 1)])
        res = parse_dns(data)
        assert res is None or isinstance(res, dns.DnsMessage)


# --------------------------------------------------------------------------------- HTTP
def test_http_request_with_host_and_port():
    req = text.parse_http_request(b"GET /a?b=1 HTTP/1.1\r\nUser-Agent: x\r\n"
                                  b"Host: toni.lan:31337\r\nAccept: */*\r\n\r\n")
    assert req == text.HttpRequest("GET", b"toni.lan:31337", True)


def test_http_host_bytes_as_tshark_delimits_them():
    req = text.parse_http_request(b"POST / HTTP/1.0\r\nhost:   a\x01b\xc3\xa9.com:80  \r\n\r\n")
    assert req.host == b"a\x01b\xc3\xa9.com:80  "  # leading blanks dropped, trailing kept
    req = text.parse_http_request(b"GET / HTTP/1.1\nHost: tab.com\t\n\n")
    assert req.host == b"tab.com\t"
    req = text.parse_http_request(b"GET / HTTP/1.1\r\nHost: x.com\r\nHost: y.com\r\n\r\n")
    assert req.host == b"x.com"


def test_http_without_host():
    assert text.parse_http_request(b"GET / HTTP/1.0\r\n\r\n") == text.HttpRequest("GET", None,
                                                                                  True)
    assert text.parse_http_request(b"GET / HTTP/1.1\r\nAccept: */*\r\n") == \
        text.HttpRequest("GET", None, False)
    # "Host :" (space before the colon) is not a Host header for tshark either
    assert text.parse_http_request(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n").host is None
    assert text.parse_http_request(b"GET / HTTP/1.1\r\nX-Host: a\r\n\r\n").host is None


def test_host_after_the_header_block_does_not_count():
    req = text.parse_http_request(b"GET / HTTP/1.1\r\nA: b\r\n\r\nHost: body.example\r\n")
    assert req == text.HttpRequest("GET", None, True)


@pytest.mark.parametrize("prefix", [b"G", b"GET", b"GET ", b"GET /index", b"GET /index ",
                                    b"GET /index HTTP", b"GET /index HTTP/1.", b"GET / HTTP/1.1",
                                    b"GET / HTTP/1.1\r", b"M-SEARCH * HTTP/1"])
def test_http_request_prefixes_need_more(prefix):
    assert text.parse_http_request(prefix) is NEED_MORE


@pytest.mark.parametrize("data", [b"get / HTTP/1.1\r\n", b"GET  / HTTP/1.1\r\n",
                                  b"GET / HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                  b"GET / SIP/2.0\r\n", b"GET /\r\n", b"\x16\x03\x01\x02\x00",
                                  b"G\x00", b"GET / HTTX", b"X" * 9000,
                                  b"INVITE sip:a@b SIP/2.0\r\n"])
def test_not_http_requests(data):
    assert text.parse_http_request(data) is None


def test_http_responses():
    assert text.is_http_response(b"HTTP/1.1 403 Forbidden\r\n") is True
    assert text.is_http_response(b"HTTP/1.0 200\r\n") is True
    assert text.is_http_response(b"HTTP/1.1 20") is NEED_MORE
    assert text.is_http_response(b"HTTP/1.1 2x0 OK\r\n") is False
    assert text.is_http_response(b"HTTP/2 200\r\n") is False
    assert text.is_http_response(b"RTSP/1.0 200 OK\r\n") is False


# --------------------------------------------------------------------------------- SSH
def test_ssh_banners():
    assert text.is_ssh_banner(b"SSH-2.0-OpenSSH_9.6\r\n") is True
    assert text.is_ssh_banner(b"SSH-1.99-Cisco-1.25\r\n") is True
    assert text.is_ssh_banner(b"SSH-2") is NEED_MORE
    assert text.is_ssh_banner(b"SSH-3.0-x") is False
    assert text.is_ssh_banner(b"SSX-2.0-x") is False


# --------------------------------------------------------------------------------- mail
def test_mail_greetings_and_commands():
    smtp_greeting = b"220 mx.example.com ESMTP Postfix\r\n"
    assert text.detect_mail(b"", smtp_greeting) == text.SMTP
    assert text.detect_mail(b"EHLO client.example\r\n", b"") == text.SMTP
    assert text.detect_mail(b"HELO x\r\n", b"220 ready\r\n") == text.SMTP
    assert text.detect_mail(b"", b"220 ready\r\n") is None  # FTP greets the same way
    assert text.detect_mail(b"USER anonymous\r\n", b"220 ProFTPD ready\r\n") is None
    assert text.detect_mail(b"", b"* OK [CAPABILITY IMAP4rev1] ready\r\n") == text.IMAP
    assert text.detect_mail(b"a1 CAPABILITY\r\n", b"* OK ready\r\n") == text.IMAP
    assert text.detect_mail(b"", b"* OK ready\r\n") is None
    assert text.detect_mail(b"", b"+OK POP3 server ready\r\n") == text.POP3
    assert text.detect_mail(b"CAPA\r\n", b"+OK hello\r\n") == text.POP3
    assert text.detect_mail(b"", b"+OK hello\r\n") is None
    assert text.detect_mail(b"\x16\x03\x01", b"\x16\x03\x03") is None


def test_starttls_offsets():
    smtp = b"EHLO a\r\nSTARTTLS\r\n"
    assert text.starttls_offset(text.SMTP, smtp) == len(smtp)
    assert text.starttls_offset(text.SMTP, smtp + b"\x16\x03\x01") == len(smtp)
    assert text.starttls_offset(text.SMTP, b"EHLO a\r\n") is NEED_MORE
    assert text.starttls_offset(text.SMTP, b"EHLO a\r\nMAIL FROM:<a@b>\r\n") is None
    imap = b"a1 CAPABILITY\r\na2 STARTTLS\r\n"
    assert text.starttls_offset(text.IMAP, imap) == len(imap)
    assert text.starttls_offset(text.IMAP, b"a1 LOGIN u p\r\n") is None
    assert text.starttls_offset(text.POP3, b"CAPA\r\nSTLS\r\n") == 12
    assert text.starttls_offset(text.POP3, b"USER bob\r\n") is None
    assert text.starttls_offset("HTTP", b"STARTTLS\r\n") is None


# --------------------------------------------------------------------------------- UDP
def ntp_packet(version=4, mode=3, stratum=0) -> bytes:
    return bytes([(version << 3) | mode, stratum, 6, 0xEC]) + bytes(44)


def dhcp_packet(op=1, cookie=udp.DHCP_COOKIE, options=b"\x35\x01\x01\x0c\x04host\xff") -> bytes:
    fixed = bytes([op, 1, 6, 0]) + b"\x12\x34\x56\x78" + bytes(20) + bytes(6) + bytes(10)
    fixed += bytes(64 + 128)
    assert len(fixed) == 236
    return fixed + cookie + options


def dhcpv6_packet(msg_type=1, options=None) -> bytes:
    if options is None:
        options = [(1, b"\x00\x01" + bytes(12)), (8, b"\x00\x00"), (6, b"\x00\x17\x00\x18")]
    body = b"".join(struct.pack("!HH", code, len(value)) + value for code, value in options)
    return bytes([msg_type]) + b"\xab\xcd\xef" + body


def test_ntp():
    assert udp.is_ntp(ntp_packet())
    assert udp.is_ntp(ntp_packet(version=3, mode=4, stratum=2))
    assert udp.is_ntp(ntp_packet(version=1, mode=1))
    assert udp.is_ntp(bytes([(2 << 3) | 6]) + bytes(11))  # NTP control message
    assert not udp.is_ntp(ntp_packet(version=0))
    assert not udp.is_ntp(ntp_packet(version=5))
    assert not udp.is_ntp(ntp_packet(mode=0))
    assert not udp.is_ntp(ntp_packet(stratum=200))
    assert not udp.is_ntp(ntp_packet()[:40])


def test_dhcp():
    assert udp.is_dhcp(dhcp_packet())
    assert udp.is_dhcp(dhcp_packet(op=2))
    assert not udp.is_dhcp(dhcp_packet(op=3))
    assert not udp.is_dhcp(dhcp_packet(cookie=b"\x63\x82\x53\x64"))
    assert not udp.is_dhcp(dhcp_packet()[:239])


def test_dhcpv6():
    assert udp.is_dhcpv6(dhcpv6_packet())
    assert udp.is_dhcpv6(dhcpv6_packet(msg_type=7, options=[]))
    relay = bytes([12, 0]) + bytes(32) + struct.pack("!HH", 9, 4) + b"abcd"
    assert udp.is_dhcpv6(relay)
    assert not udp.is_dhcpv6(dhcpv6_packet(msg_type=0))
    assert not udp.is_dhcpv6(dhcpv6_packet(msg_type=200))
    assert not udp.is_dhcpv6(dhcpv6_packet()[:-1])  # options do not fill the payload
    assert not udp.is_dhcpv6(dhcpv6_packet() + b"\x00")
    assert not udp.is_dhcpv6(b"\x01\x00")


def test_text_and_udp_parsers_never_raise():
    rng = random.Random(2)
    seeds = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"SSH-2.0-x\r\n",
             b"220 x ESMTP\r\n", b"* OK IMAP\r\n", b"+OK POP3\r\n", ntp_packet(), dhcp_packet(),
             dhcpv6_packet()]
    for i in range(10000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[:rng.randrange(len(data) + 1)])
        text.parse_http_request(data)
        text.is_http_response(data)
        text.is_ssh_banner(data)
        text.detect_mail(data, data)
        text.starttls_offset(rng.choice((text.SMTP, text.IMAP, text.POP3)), data)
        udp.is_ntp(data)
        udp.is_dhcp(data)
        udp.is_dhcpv6(data)
