"""capture.inspect.flow.FlowInspector: labels by content, port guesses, TCP reassembly,
STARTTLS, budgets, and hostile input."""

from __future__ import annotations

import random
import struct

import pytest

from capture.inspect.flow import MAX_BUFFER, MAX_PACKETS, FlowInspector
from packet_records.apps import APPS
from tests.unit.test_inspect_protocols import (
    dhcp_packet,
    dhcpv6_packet,
    ntp_packet,
    query,
    response_with_pointers,
)
from tests.unit.test_inspect_quic import crypto_frame, initial, tls_hello
from tests.unit.test_inspect_tls import SPEC_JA4, records, spec_hello

TCP, UDP = 6, 17
HELLO = records(spec_hello())  # ClientHello, SNI example.com, JA4 = SPEC_JA4


@pytest.fixture(autouse=True)
def no_swallowed_errors():
    """feed() turns a parser exception into done=True; none may happen here."""
    before = FlowInspector.errors
    yield
    assert FlowInspector.errors == before


class Tcp:
    """Feeds a FlowInspector like the capture loop: per-direction sequence numbers."""

    def __init__(self, client_port=40000, server_port=443, isn=(1000, 50000)):
        self.ins = FlowInspector(TCP, client_port, server_port)
        self.seq = list(isn)

    def send(self, data: bytes, from_client: bool = True, seq: int | None = None) -> bool:
        d = 0 if from_client else 1
        if seq is None:
            seq = self.seq[d]
            self.seq[d] = (seq + len(data)) & 0xFFFFFFFF
        return self.ins.feed(data, from_client, seq)


def udp(client_port: int, server_port: int, *datagrams: bytes, from_client=True):
    ins = FlowInspector(UDP, client_port, server_port)
    for d in datagrams:
        ins.feed(d, from_client, None)
    return ins


# ------------------------------------------------------------------------------ guesses
@pytest.mark.parametrize("proto, sport, dport, app", [
    (TCP, 40000, 443, "TLS"), (TCP, 40000, 80, "HTTP"), (TCP, 40000, 8080, "HTTP"),
    (TCP, 40000, 22, "SSH"), (TCP, 40000, 25, "SMTP"), (TCP, 40000, 143, "IMAP"),
    (TCP, 40000, 110, "POP3"), (TCP, 40000, 993, "TLS"), (UDP, 40000, 53, "DNS"),
    (UDP, 53, 40000, "DNS"), (UDP, 5353, 5353, "MDNS"), (UDP, 40000, 123, "NTP"),
    (UDP, 68, 67, "DHCP"), (UDP, 546, 547, "DHCPV6"), (UDP, 40000, 443, "QUIC"),
    (TCP, 40000, 5000, "UNKNOWN"), (UDP, 40000, 5000, "UNKNOWN"), (1, 0, 0, "UNKNOWN"),
])
def test_port_guess_before_any_payload(proto, sport, dport, app):
    ins = FlowInspector(proto, sport, dport)
    assert ins.app == app and ins.guess == (app != "UNKNOWN")
    assert ins.server_name is None and ins.fingerprint is None
    assert ins.done == (proto not in (TCP, UDP))


def test_empty_payloads_change_nothing():
    t = Tcp()
    assert t.send(b"") is False and t.ins.app == "TLS" and t.ins.guess and not t.ins.done


# ------------------------------------------------------------------------------ TLS
def test_tls_client_hello_in_one_segment():
    t = Tcp()
    assert t.send(HELLO) is True
    ins = t.ins
    assert (ins.app, ins.guess, ins.server_name, ins.fingerprint, ins.done) == (
        "TLS", False, "example.com", SPEC_JA4, True)
    assert t.send(b"\x17\x03\x03\x00\x10" + bytes(16)) is False  # done: nothing changes


def test_tls_on_any_port_and_replacing_a_wrong_guess():
    t = Tcp(server_port=80)
    assert t.ins.app == "HTTP" and t.ins.guess
    t.send(HELLO)
    assert t.ins.app == "TLS" and not t.ins.guess and t.ins.server_name == "example.com"


def test_tls_hello_over_segments_and_records():
    stream = records(spec_hello(), sizes=[100, 50])
    t = Tcp(server_port=8443)
    assert t.send(stream[:3]) is False  # too short to tell
    assert t.ins.app == "UNKNOWN"
    assert t.send(stream[3:60]) is True  # a record header: TLS, hello still incomplete
    assert t.ins.app == "TLS" and not t.ins.guess and t.ins.server_name is None
    assert not t.ins.done
    t.send(stream[60:140])
    assert t.ins.server_name is None
    assert t.send(stream[140:]) is True
    assert t.ins.server_name == "example.com" and t.ins.fingerprint == SPEC_JA4
    assert t.ins.done


def test_retransmissions_and_overlaps_are_dropped():
    t = Tcp()
    t.send(HELLO[:100], seq=1000)
    t.send(HELLO[:100], seq=1000)  # retransmission
    t.send(HELLO[50:150], seq=1050)  # overlap: only bytes 100..150 are new
    assert not t.ins.done
    t.send(HELLO[150:], seq=1150)
    assert t.ins.server_name == "example.com"


def test_segment_from_the_future_ends_that_direction():
    t = Tcp()
    t.send(HELLO[:100], seq=1000)
    t.send(HELLO[150:], seq=1150)  # bytes 100..150 missing
    t.send(HELLO[100:150], seq=1100)  # too late: reassembly of this direction ended
    assert t.ins.server_name is None and t.ins.app == "TLS"


def test_sequence_numbers_wrap():
    t = Tcp(isn=(0xFFFFFF00, 0))
    for i in range(0, len(HELLO), 100):
        t.send(HELLO[i:i + 100])
    assert t.ins.server_name == "example.com"


def test_mid_stream_tls_records_without_hello():
    t = Tcp(server_port=5223)
    t.send(b"\x17\x03\x03\x00\x20" + bytes(32) + b"\x17\x03\x03\x01\x00" + bytes(10))
    assert (t.ins.app, t.ins.guess, t.ins.server_name, t.ins.done) == ("TLS", False, None, True)


def test_server_hello_first():
    t = Tcp(server_port=3001)
    t.send(b"\x16\x03\x03\x00\x31\x02\x00\x00\x2d\x03\x03" + bytes(43), from_client=False)
    assert t.ins.app == "TLS" and not t.ins.guess


def test_not_tls_record_headers():
    t = Tcp(server_port=5000)
    t.send(b"\x17\x03\x09\x00\x20" + bytes(32))  # minor version 9
    assert t.ins.app == "UNKNOWN"


# ------------------------------------------------------------------------------ HTTP
def test_http_get_with_host():
    t = Tcp(server_port=80)
    assert t.send(b"GET / HTTP/1.1\r\nHost: google.com\r\nAccept: */*\r\n\r\n") is True
    assert (t.ins.app, t.ins.guess, t.ins.server_name, t.ins.done) == (
        "HTTP", False, "google.com", True)


def test_http_request_split_over_segments():
    """As in http-lines-split.pcap: the request line and the headers in several segments."""
    t = Tcp(server_port=31337)
    t.send(b"GET /index.html HT")
    assert t.ins.app == "UNKNOWN" and not t.ins.done
    t.send(b"TP/1.1\r\nUser-Agent: curl\r\n")
    assert t.ins.app == "HTTP" and t.ins.server_name is None and not t.ins.done
    t.send(b"Host: toni.lan:31337\r\n\r\n")
    assert t.ins.server_name == "toni.lan:31337" and t.ins.done


def test_http_without_host_is_done_at_the_end_of_headers():
    t = Tcp(server_port=80)
    t.send(b"GET / HTTP/1.0\r\nUser-Agent: x\r\n")
    assert t.ins.app == "HTTP" and not t.ins.done
    t.send(b"\r\n")
    assert t.ins.app == "HTTP" and t.ins.server_name is None and t.ins.done


def test_http_response_first():
    t = Tcp(client_port=8888, server_port=5060)
    t.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", from_client=False)
    assert t.ins.app == "HTTP" and not t.ins.guess and t.ins.server_name is None
    t.send(b"GET /x HTTP/1.1\r\nHost: 45.58.148.2\r\n\r\n")
    assert t.ins.server_name == "45.58.148.2"


def test_http_request_from_the_flow_responder():
    """The capture saw the server's packet first (roles reversed): the Host still counts."""
    t = Tcp(client_port=80, server_port=40000)
    t.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", from_client=False)
    assert t.ins.app == "HTTP" and t.ins.server_name == "a.example"


# ------------------------------------------------------------------------------ SSH
def test_ssh_banner_from_either_side():
    t = Tcp(server_port=8000)
    t.send(b"SSH-2.0-OpenSSH_8.9\r\n", from_client=False)
    assert (t.ins.app, t.ins.guess, t.ins.done) == ("SSH", False, True)
    t = Tcp(server_port=22)
    t.send(b"SSH-2.0-Go\r\n")
    assert t.ins.app == "SSH" and not t.ins.guess


# ------------------------------------------------------------------------------ mail
def test_smtp_starttls_keeps_the_label_and_reads_the_hello():
    t = Tcp(server_port=25)
    t.send(b"220 mx.example.com ESMTP\r\n", from_client=False)
    assert t.ins.app == "SMTP" and not t.ins.guess and not t.ins.done
    t.send(b"EHLO me.example\r\n")
    t.send(b"250-mx.example.com\r\n250 STARTTLS\r\n", from_client=False)
    t.send(b"STARTTLS\r\n")
    t.send(b"220 2.0.0 Ready to start TLS\r\n", from_client=False)
    assert not t.ins.done
    t.send(HELLO[:200])
    t.send(HELLO[200:])
    assert (t.ins.app, t.ins.server_name, t.ins.fingerprint, t.ins.done) == (
        "SMTP", "example.com", SPEC_JA4, True)


def test_smtp_without_starttls_is_done_at_mail_from():
    t = Tcp(server_port=2525)
    t.send(b"220 ready\r\n", from_client=False)
    assert t.ins.app == "UNKNOWN"  # FTP and SMTP greet alike
    t.send(b"EHLO me\r\n")
    assert t.ins.app == "SMTP"
    t.send(b"MAIL FROM:<a@example.com>\r\n")
    assert t.ins.done and t.ins.server_name is None


def test_imap_and_pop3():
    t = Tcp(server_port=143)
    t.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n", from_client=False)
    assert t.ins.app == "IMAP" and not t.ins.guess
    t.send(b"a1 STARTTLS\r\n")
    t.send(b"a1 OK Begin TLS\r\n", from_client=False)
    t.send(HELLO)
    assert t.ins.app == "IMAP" and t.ins.server_name == "example.com" and t.ins.done
    t = Tcp(server_port=110)
    t.send(b"+OK ready\r\n", from_client=False)
    assert t.ins.app == "POP3" and t.ins.guess  # a bare +OK alone decides nothing
    t.send(b"USER bob\r\n")
    assert t.ins.app == "POP3" and not t.ins.guess and t.ins.done


def test_ftp_is_not_mail():
    t = Tcp(server_port=21)
    t.send(b"220 ProFTPD Server ready\r\n", from_client=False)
    t.send(b"USER anonymous\r\n")
    assert t.ins.app == "UNKNOWN" and t.ins.done


# ------------------------------------------------------------------------------ DNS
def test_dns_over_udp_on_any_port():
    ins = udp(40000, 5300, query("www.example.com"))
    assert (ins.app, ins.guess, ins.server_name, ins.done) == (
        "DNS", False, "www.example.com", True)
    ins = udp(53, 40000, response_with_pointers(), from_client=True)  # response seen first
    assert ins.app == "DNS" and ins.server_name == "www.example.com"


def test_dns_first_query_name_is_kept():
    ins = FlowInspector(UDP, 40000, 53)
    ins.feed(query("first.example"), True, None)
    ins.feed(query("second.example"), True, None)
    assert ins.server_name == "first.example"


def test_mdns_first_question_and_answers_without_question():
    answer_only = (struct.pack("!HHHHHH", 0, 0x8400, 0, 1, 0, 0) + b"\x05_raop\x04_tcp\x05local"
                   b"\x00" + struct.pack("!HHIH", 12, 1, 120, 2) + b"\xc0\x0c")
    ins = udp(5353, 5353, answer_only)
    assert ins.app == "MDNS" and not ins.guess and ins.server_name is None and not ins.done
    ins.feed(query("_spotify-connect._tcp.local", qtype=12, qclass=0x8001), True, None)
    assert ins.server_name == "_spotify-connect._tcp.local" and ins.done


def test_dns_cut_short_on_port_53():
    """First IP fragments and snaplen-cut responses: tshark still labels them DNS."""
    full = response_with_pointers()
    ins = udp(53, 40000, full[:20])
    assert ins.app == "DNS" and not ins.guess and ins.server_name is None
    ins = udp(53, 40000, full[:4])
    assert ins.app == "DNS" and ins.guess  # only the port says it
    ins = udp(53, 40000, full[:-5])
    assert ins.server_name == "www.example.com"


def test_dns_lookalikes_off_port_are_not_dns():
    assert udp(40000, 5300, query() + b"x").app == "UNKNOWN"  # trailing byte
    assert udp(40000, 5300, query(qclass=9)).app == "UNKNOWN"
    assert udp(40000, 5300, response_with_pointers()[:-2]).app == "UNKNOWN"  # cut short
    assert udp(40000, 5300, query(an=1)).app == "UNKNOWN"
    # NetBIOS name service and LLMNR use the DNS format; tshark names them otherwise
    assert udp(137, 137, query()).app == "UNKNOWN"
    assert udp(40000, 5355, query()).app == "UNKNOWN"


def test_dns_over_tcp_split():
    msg = query("tcp.example", qtype=48)
    stream = struct.pack("!H", len(msg)) + msg
    t = Tcp(server_port=53)
    t.send(stream[:10])
    assert t.ins.app == "DNS" and t.ins.guess
    t.send(stream[10:])
    assert (t.ins.app, t.ins.guess, t.ins.server_name, t.ins.done) == (
        "DNS", False, "tcp.example", True)
    t = Tcp(server_port=5353)
    t.send(stream)
    assert t.ins.app == "DNS" and t.ins.server_name == "tcp.example"


# ------------------------------------------------------------------------------ UDP others
def test_ntp_dhcp_dhcpv6():
    ins = udp(40000, 123, ntp_packet())
    assert (ins.app, ins.guess, ins.done) == ("NTP", False, True)
    ins = udp(40000, 123, b"\xff" * 60)
    assert ins.app == "NTP" and ins.guess  # tshark labels any UDP/123 packet ntp
    assert udp(40000, 4000, ntp_packet()).app == "UNKNOWN"
    ins = udp(68, 67, dhcp_packet())
    assert (ins.app, ins.guess, ins.server_name) == ("DHCP", False, None)  # hostname: no
    ins = udp(546, 547, dhcpv6_packet())
    assert ins.app == "DHCPV6" and not ins.guess


def test_quic_initial():
    dg = initial(crypto_frame(0, tls_hello(sni=b"quic.example")))
    ins = udp(50000, 443, dg)
    assert ins.app == "QUIC" and not ins.guess
    assert ins.server_name == "quic.example" and ins.fingerprint.startswith("q13")
    ins = udp(50000, 4443, dg)
    assert ins.app == "QUIC" and ins.server_name == "quic.example"


def test_ssdp_host_is_a_server_name_but_not_a_label():
    ins = udp(50000, 1900, b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"
                           b"MAN: \"ssdp:discover\"\r\n\r\n")
    assert ins.app == "UNKNOWN" and ins.server_name == "239.255.255.250:1900" and ins.done


# ------------------------------------------------------------------------------ budgets
def test_packet_budget():
    t = Tcp(server_port=5000)
    for i in range(MAX_PACKETS - 1):
        t.send(bytes([0x99, i]) * 10)
        assert not t.ins.done or i > 0
    t = Tcp(server_port=5000)
    for i in range(MAX_PACKETS):
        t.send(b"\x00\x00\x99" + bytes(40), from_client=bool(i % 2))
    assert t.ins.done
    before = t.ins._packets
    assert t.send(HELLO) is False and t.ins._packets == before


def test_undecidable_streams_finish_early():
    t = Tcp(server_port=5000)
    t.send(b"\x99" * 50)
    assert not t.ins.done  # the server may still speak first (SSH, mail greetings)
    t.send(b"\x98" * 50, from_client=False)
    assert t.ins.done and t.ins.app == "UNKNOWN"


def test_buffer_budget_per_direction():
    t = Tcp(server_port=5000)
    t.send(b"\x99" * 9000)
    t.send(b"\x99" * 9000)
    assert len(t.ins._bufs[0]) == MAX_BUFFER and t.ins._closed[0] and not t.ins.done
    t.send(b"\x99" * 10)  # nothing more is kept from this direction
    assert len(t.ins._bufs[0]) == MAX_BUFFER
    # a header block that fills the buffer without a Host: HTTP, no name, done
    t = Tcp(server_port=80)
    t.send(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n")
    assert not t.ins.done
    t.send(b"X-Pad2: " + b"b" * 9000 + b"\r\n")
    assert (t.ins.app, t.ins.server_name, t.ins.done) == ("HTTP", None, True)


def test_udp_packet_budget():
    ins = FlowInspector(UDP, 40000, 40001)
    for _ in range(MAX_PACKETS):
        ins.feed(b"\x01\x02\x03", True, None)
    assert ins.done and ins.app == "UNKNOWN"


# ------------------------------------------------------------------------------ hostile
WELL_KNOWN = [(TCP, 443), (TCP, 80), (TCP, 22), (TCP, 25), (TCP, 143), (TCP, 110), (TCP, 53),
              (UDP, 53), (UDP, 5353), (UDP, 123), (UDP, 67), (UDP, 547), (UDP, 443)]


@pytest.mark.parametrize("proto, port", WELL_KNOWN)
def test_random_bytes_on_well_known_ports_stay_a_guess(proto, port):
    rng = random.Random(port)
    for _ in range(50):
        ins = FlowInspector(proto, rng.randrange(1024, 65536), port)
        guessed = ins.app
        for i in range(MAX_PACKETS):
            # first byte 0x99: not a TLS record, letter, DNS-over-TCP length < 12 ...
            data = b"\x99\x00\x05" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(40)))
            ins.feed(data, bool(i % 2), rng.getrandbits(32) if proto == TCP else None)
        assert ins.app == guessed and ins.guess and ins.server_name is None
        assert ins.done


def test_ten_thousand_random_payloads_never_raise_and_stay_bounded():
    rng = random.Random(20240601)
    seeds = [HELLO, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", query(), response_with_pointers(),
             b"SSH-2.0-x\r\n", b"220 x ESMTP\r\n", ntp_packet(), dhcp_packet()]
    flows = [FlowInspector(rng.choice((TCP, UDP)), rng.randrange(65536),
                           rng.choice((53, 80, 443, 123, 5353, 67, 25, rng.randrange(65536))))
             for _ in range(400)]
    seqs = [[rng.getrandbits(32), rng.getrandbits(32)] for _ in flows]
    for n in range(10000):
        k = rng.randrange(len(flows))
        ins = flows[k]
        if n % 3 == 0:
            payload = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 5)):
                payload[rng.randrange(len(payload))] = rng.getrandbits(8)
            payload = bytes(payload[:rng.randrange(1, len(payload) + 1)])
        else:
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 1500)))
        d = rng.randrange(2)
        seq = None
        if ins.proto == TCP:
            seq = seqs[k][d] if rng.random() < 0.8 else rng.getrandbits(32)
            seqs[k][d] = (seq + len(payload)) & 0xFFFFFFFF
        was_done = ins.done
        changed = ins.feed(payload, d == 0, seq)
        assert not (was_done and changed)
        assert ins._packets <= MAX_PACKETS
        if ins.proto == TCP and not ins.done:
            assert all(len(b) <= MAX_BUFFER for b in ins._bufs)
        if ins.done:
            assert ins._bufs is None and ins._quic is None  # no payload bytes kept
        assert ins.app in APPS
        if ins._packets == MAX_PACKETS:
            assert ins.done


# ------------------------------------------------------------------------------ early done
# A flow is done as soon as no protocol can still match it (not after MAX_PACKETS packets).
# matches nothing on any port, for good (as DNS over TCP: a 5-byte message, too short)
UNKNOWN_BYTES = b"\x00\x05\x99" + bytes(60)


def test_udp_done_once_the_first_datagram_of_each_side_matched_nothing():
    for port, app in ((8080, "UNKNOWN"), (443, "QUIC")):
        ins = FlowInspector(UDP, 40000, port)
        ins.feed(bytes(200), True, None)
        assert not ins.done  # the other side's first datagram may still tell (a DNS answer)
        ins.feed(bytes(18), False, None)
        assert ins.done and ins._packets == 2
        assert (ins.app, ins.guess) == (app, app != "UNKNOWN")  # a port guess stays


def test_udp_one_sided_flow_is_done_when_the_same_side_speaks_again():
    ins = FlowInspector(UDP, 40000, 5300)
    ins.feed(UNKNOWN_BYTES, True, None)
    assert not ins.done  # the other side may still answer
    ins.feed(query("late.example"), True, None)  # the same side again, unanswered: given up
    assert (ins.app, ins.server_name, ins.done, ins._packets) == ("UNKNOWN", None, True, 2)


def test_udp_unreadable_quic_long_header_keeps_its_side_open():
    """An Initial of a version this module does not know: the server's Version Negotiation
    labels QUIC, the client's next Initial (a known version) gives the SNI."""
    unknown = b"\xc3\x12\x34\x56\x78\x08" + bytes(8) + b"\x00" + bytes(1200)
    vn = b"\x80\x00\x00\x00\x00\x00\x08" + bytes(8) + struct.pack("!I", 1)
    ins = FlowInspector(UDP, 50000, 4443)
    ins.feed(unknown, True, None)
    ins.feed(UNKNOWN_BYTES, False, None)
    assert not ins.done and ins.app == "UNKNOWN"
    ins.feed(vn, False, None)
    assert ins.app == "QUIC" and not ins.guess and not ins.done
    ins.feed(initial(crypto_frame(0, tls_hello(sni=b"after.vn"))), True, None)
    assert ins.server_name == "after.vn" and ins.done


def test_quic_hello_over_two_initials_with_short_headers_between():
    hello = tls_hello(sni=b"two.example", pad=1500)
    ins = FlowInspector(UDP, 50000, 443)
    ins.feed(initial(crypto_frame(0, hello[:1000]), pn=0), True, None)
    assert ins.app == "QUIC" and not ins.guess and not ins.done
    ins.feed(b"\x40" + bytes(40), False, None)  # a server short-header packet
    assert not ins.done
    ins.feed(initial(crypto_frame(1000, hello[1000:]), pn=1), True, None)
    assert ins.server_name == "two.example" and ins.done


def test_udp_dns_without_a_name_is_done_when_each_side_had_none():
    ins = FlowInspector(UDP, 40000, 53)
    ins.feed(bytes(200), True, None)  # a consistent header on the DNS port: DNS, no question
    assert (ins.app, ins.guess, ins.done) == ("DNS", False, False)
    ins.feed(bytes(200), True, None)
    assert not ins.done  # only one side so far (mDNS announcements, then a query)
    ins.feed(bytes(18), False, None)
    assert ins.done and ins.server_name is None


def test_udp_dns_cut_short_on_port_53_then_the_answer_names_it():
    ins = FlowInspector(UDP, 40000, 53)
    ins.feed(query("cut.example")[:10], True, None)  # cut inside the header
    assert (ins.app, ins.guess, ins.server_name, ins.done) == ("DNS", False, None, False)
    ins.feed(response_with_pointers(), False, None)
    assert ins.server_name == "www.example.com" and ins.done


def test_tcp_dns_length_prefix_in_its_own_segment():
    msg = query("split.example")
    t = Tcp(server_port=5300)
    t.send(struct.pack("!H", len(msg)))
    t.send(UNKNOWN_BYTES, from_client=False)
    assert not t.ins.done  # two bytes of length prefix: the message may still be DNS
    t.send(msg)
    assert (t.ins.app, t.ins.server_name, t.ins.done) == ("DNS", "split.example", True)


def test_tcp_dns_name_from_the_other_stream():
    no_question = struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0)
    answer = response_with_pointers()
    t = Tcp(server_port=53)
    t.send(struct.pack("!H", 12) + no_question)
    assert (t.ins.app, t.ins.guess, t.ins.done) == ("DNS", False, False)
    t.send(struct.pack("!H", len(answer)), from_client=False)
    assert not t.ins.done
    t.send(answer, from_client=False)
    assert t.ins.server_name == "www.example.com" and t.ins.done
    t = Tcp(server_port=53)  # neither stream's first message names anything: done
    t.send(struct.pack("!H", 12) + no_question)
    t.send(struct.pack("!H", 12) + no_question, from_client=False)
    assert t.ins.done and t.ins.server_name is None


@pytest.mark.parametrize("reply, app", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "HTTP"),
    (b"\x17\x03\x03\x00\x20" + bytes(32), "TLS"),  # a stream seen from the middle
    (b"220 mx.example.com ESMTP\r\n", "SMTP"),
])
def test_tcp_the_server_may_answer_an_unknown_client(reply, app):
    t = Tcp(server_port=5000)
    for _ in range(3):
        t.send(UNKNOWN_BYTES)  # ruled out at once, the flow still waits for the server
    assert not t.ins.done
    t.send(reply, from_client=False)
    assert t.ins.app == app and not t.ins.guess and t.ins.server_name is None
    if app in ("SSH", "TLS", "HTTP"):  # HTTP: neither stream starts with a request
        assert t.ins.done


def test_tcp_mail_greeting_waits_for_the_client_line():
    t = Tcp(server_port=2525)
    t.send(b"220 mail.example.net ready\r\n", from_client=False)  # FTP or SMTP
    t.send(b"\x01\x02\x03\x04")  # no line yet: its first line may still be EHLO...
    assert not t.ins.done
    t.send(b" something\r\n")  # ...it is not
    assert t.ins.done and t.ins.app == "UNKNOWN"


def test_tcp_a_gap_ends_a_pending_stream():
    t = Tcp(server_port=5000)
    t.send(b"GET /inde")  # may still become a request line
    t.send(UNKNOWN_BYTES, from_client=False)
    assert not t.ins.done
    t.send(b"zzz", seq=t.seq[0] + 100)  # bytes missing: the stream start cannot grow
    assert t.ins.done and t.ins.app == "UNKNOWN"


def test_streams_are_not_parsed_again_once_ruled_out(monkeypatch):
    from capture.inspect import text
    calls = []
    real = text.parse_http_request
    monkeypatch.setattr(text, "parse_http_request", lambda b: calls.append(len(b)) or real(b))
    t = Tcp(server_port=5000)
    t.send(b"ZZZ not a request\r\n")
    for _ in range(5):
        t.send(b"more bytes\r\n")
        t.send(b"more bytes\r\n", seq=t.seq[0] - 12)  # a retransmission
    assert calls == [19] and not t.ins.done
    # HTTP known from a response: the response stream is not parsed as a request again
    t = Tcp(server_port=5000)
    t.send(b"HTTP/1.1 200 OK\r\n\r\n", from_client=False)
    calls.clear()
    for _ in range(5):
        t.send(b"x" * 100, from_client=False)
    assert calls == [] and t.ins.app == "HTTP" and not t.ins.done
    t.send(b"GET / HTTP/1.1\r\nHost: late.example\r\n\r\n")
    assert t.ins.server_name == "late.example" and t.ins.done


def test_payloadless_tcp_flows_keep_no_buffers():
    t = Tcp()
    assert t.ins._bufs is None and not t.ins.done
    t.send(b"\x99\x98")
    assert t.ins._bufs is not None
