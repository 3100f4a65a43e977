"""Per-flow application labelling from the first payloads of a flow.

The capture loop creates one FlowInspector per TCP or UDP flow and feeds it each packet's L4
payload (trimmed to the IP/UDP length) until ``done``. The inspector decides the application
from the content, never from the port alone:

* TCP: each direction is reassembled in sequence order (in-order bytes only: retransmitted
  bytes are dropped, a segment from the future ends that direction's reassembly; the first
  data segment seen in a direction sets its start) into at most MAX_BUFFER bytes, and the
  start of each stream is matched against TLS (ClientHello through capture.inspect.tls, or
  TLS record headers when the capture starts after the hello), HTTP/1.x requests and
  responses, the SSH banner, DNS over TCP, and the SMTP / IMAP / POP3 dialogues (whose
  STARTTLS upgrade keeps the mail label, as tshark does, and gives the SNI and JA4 of the
  ClientHello that follows).
* UDP: each datagram is matched against DNS (mDNS on port 5353), DHCP, DHCPv6, NTP and QUIC
  (capture.inspect.quic). DNS is recognised on any port when the whole message parses to its
  last byte as a standard query with one question (or its answer); on ports 53/5353 any
  consistent message counts, even one cut short (snaplen, first IP fragment). DHCP, DHCPv6
  and NTP also need their port on one side, as tshark does. An HTTP request over UDP (SSDP)
  gives its Host as the server name, without a label (tshark calls it SSDP).

A well-known server port gives a label before any content is seen, with ``guess`` True (a TCP
flow on 443 with no payload yet is TLS, guessed); content evidence replaces it. A guess that
content never confirms stays a guess (tshark labels such flows by port too).

Budgets: at most MAX_PACKETS packets with payload per flow and MAX_BUFFER bytes per direction
are looked at; then ``done`` is True and the capture loop stops feeding. Nothing raises on
hostile payloads.
"""

from __future__ import annotations

import struct

from capture.inspect import quic, text, tls
from capture.inspect.dns import parse_dns
from capture.inspect.udp import DHCP_PORTS, DHCPV6_PORTS, NTP_PORT, is_dhcp, is_dhcpv6, is_ntp

TCP, UDP = 6, 17
MAX_PACKETS = 12  # packets with payload inspected per flow
MAX_BUFFER = 16 * 1024  # reassembled bytes kept per direction

UNKNOWN, DNS, HTTP, TLS, QUIC, SSH = "UNKNOWN", "DNS", "HTTP", "TLS", "QUIC", "SSH"
NTP, DHCP, DHCPV6, MDNS = "NTP", "DHCP", "DHCPV6", "MDNS"
SMTP, IMAP, POP3 = text.SMTP, text.IMAP, text.POP3

DNS_PORT, MDNS_PORT = 53, 5353
# DNS-format protocols that tshark names otherwise (NetBIOS name service, LLMNR): never DNS
NOT_DNS_PORTS = frozenset((137, 5355))

# Labels given by a well-known port before (or without) content evidence: guess=True
TCP_PORT_GUESS = {80: HTTP, 8080: HTTP, 443: TLS, 465: TLS, 853: TLS, 993: TLS, 995: TLS,
                  22: SSH, 25: SMTP, 587: SMTP, 143: IMAP, 110: POP3, 53: DNS}
UDP_PORT_GUESS = {53: DNS, 5353: MDNS, 123: NTP, 67: DHCP, 68: DHCP, 546: DHCPV6,
                  547: DHCPV6, 443: QUIC}

_SEQ_MASK = 0xFFFFFFFF
_SEQ_HALF = 1 << 31
_U16 = struct.Struct("!H").unpack_from
NEED_MORE = text.NEED_MORE

# TCP stages after the label is known
_DETECT, _TLS_HELLO, _HTTP_HOST, _MAIL, _STARTTLS, _DNS_NAME = range(6)


class FlowInspector:
    """Application label, server name and TLS fingerprint of one flow (see the module doc).

    client: the sender of the flow's first packet (from_client=True in feed()).
    """

    errors = 0  # parser exceptions caught by feed() (a bug: each ends that flow's inspection)

    __slots__ = ("proto", "client_port", "server_port", "app", "guess", "server_name",
                 "fingerprint", "done", "_packets", "_bufs", "_next", "_closed", "_stage",
                 "_dir", "_tls_off", "_quic")

    def __init__(self, proto: int, client_port: int, server_port: int):
        self.proto = proto
        self.client_port = client_port
        self.server_port = server_port
        self.server_name: str | None = None
        self.fingerprint: str | None = None
        self.done = proto not in (TCP, UDP)
        self._packets = 0
        self._stage = _DETECT
        self._dir = 0  # TCP: the direction (0 client, 1 server) the label's evidence came from
        self._tls_off = 0
        self._quic: quic.QuicState | None = None
        if proto == TCP:
            self._bufs = (bytearray(), bytearray())
            self._next: list[int | None] = [None, None]
            self._closed = [False, False]
        else:
            self._bufs = self._next = self._closed = None
        guesses = TCP_PORT_GUESS if proto == TCP else UDP_PORT_GUESS if proto == UDP else {}
        app = guesses.get(server_port) or guesses.get(client_port)
        self.app = app or UNKNOWN
        self.guess = app is not None

    def __repr__(self) -> str:
        return (f"FlowInspector(app={self.app!r}, guess={self.guess}, "
                f"server_name={self.server_name!r}, fingerprint={self.fingerprint!r}, "
                f"done={self.done})")

    # ------------------------------------------------------------------------------ feed
    def feed(self, payload: bytes, from_client: bool, tcp_seq: int | None) -> bool:
        """Inspect one packet's L4 payload; True when app, guess, server_name or fingerprint
        changed."""
        if self.done or not payload:
            return False
        before = (self.app, self.guess, self.server_name, self.fingerprint)
        self._packets += 1
        try:
            if self.proto == TCP:
                self._feed_tcp(payload, 0 if from_client else 1, tcp_seq)
            else:
                self._feed_udp(payload, from_client)
        except Exception:  # noqa: BLE001 - a parser bug must not stop the capture loop
            FlowInspector.errors += 1
            self.done = True
        if self._packets >= MAX_PACKETS:
            self.done = True
        if self.done:  # the capture loop may keep the inspector: keep no payload bytes
            self._bufs = self._quic = None
        return (self.app, self.guess, self.server_name, self.fingerprint) != before

    def _decide(self, app: str) -> None:
        self.app = app
        self.guess = False

    # ------------------------------------------------------------------------------ TCP
    def _append(self, d: int, payload: bytes, seq: int | None) -> bool:
        """Add a segment to direction d's stream; False when it adds no bytes."""
        if self._closed[d]:
            return False
        if seq is not None:
            nxt = self._next[d]
            if nxt is not None:
                gap = (seq - nxt) & _SEQ_MASK
                if gap:
                    if gap < _SEQ_HALF:  # bytes are missing before this segment
                        self._closed[d] = True
                        return False
                    overlap = (nxt - seq) & _SEQ_MASK
                    if overlap >= len(payload):
                        return False  # a retransmission of bytes already kept
                    payload = payload[overlap:]
            else:
                nxt = seq
            self._next[d] = (nxt + len(payload)) & _SEQ_MASK
        buf = self._bufs[d]
        room = MAX_BUFFER - len(buf)
        if len(payload) >= room:
            payload = payload[:room]
            self._closed[d] = True
        buf += payload
        return True

    def _feed_tcp(self, payload: bytes, d: int, seq: int | None) -> None:
        first_bytes = not self._bufs[d]
        if not self._append(d, payload, seq):
            if self._closed[0] and self._closed[1]:
                self.done = True
            return
        bufs = self._bufs
        # the common case, one segment so far: no copy of the buffer
        data = payload if first_bytes and len(bufs[d]) == len(payload) else bytes(bufs[d])
        stage = self._stage
        if stage == _DETECT:
            other = bytes(bufs[1 - d])
            if d == 0:
                self._tcp_detect(data, other)
            else:
                self._tcp_detect(other, data)
        elif stage == _TLS_HELLO:
            if d == self._dir:
                self._tls_hello(data)
        elif stage == _HTTP_HOST:
            self._http_host()
        elif stage == _MAIL or stage == _STARTTLS:
            if d == self._dir:
                self._mail(data)
        elif stage == _DNS_NAME:
            self._tcp_dns(data)
        if self._closed[0] and self._closed[1]:
            self.done = True

    def _tcp_detect(self, c: bytes, s: bytes) -> None:
        """Match the start of both streams (c: client's, s: server's) against every TCP
        protocol; decide on the first match."""
        pending = False
        for d, data in ((0, c), (1, s)):
            if len(data) < 2:
                pending = True
                continue
            first = data[0]
            if first == 0x16:
                hello = tls.parse_tls_stream(data)
                if hello is tls.NEED_MORE:
                    self._dir = d
                    self._stage = _TLS_HELLO
                    if _tls_records(data) is True:
                        self._decide(TLS)
                        return
                    pending = True
                    continue
                if hello is not None:
                    self._decide(TLS)
                    self._set_hello(hello)
                    self.done = True
                    return
            if 20 <= first <= 24:
                verdict = _tls_records(data)
                if verdict is True:
                    self._decide(TLS)
                    self.done = True  # no ClientHello at the start of this stream
                    return
                pending = pending or verdict is NEED_MORE
                continue
            if first == 0x53:  # "S"
                verdict = text.is_ssh_banner(data)
                if verdict is True:
                    self._decide(SSH)
                    self.done = True
                    return
                pending = pending or verdict is NEED_MORE
            if first == 0x48:  # "H"
                verdict = text.is_http_response(data)
                if verdict is True:
                    self._decide(HTTP)
                    self._stage = _HTTP_HOST
                    self._http_host()
                    return
                pending = pending or verdict is NEED_MORE
            if 0x41 <= first <= 0x5A:  # an upper-case method token
                req = text.parse_http_request(data)
                if req is NEED_MORE:
                    pending = True
                elif req is not None:
                    self._decide(HTTP)
                    self._stage = _HTTP_HOST
                    self._http_request(req)
                    return
            verdict = self._tcp_dns(data)
            if verdict is True:
                return
            pending = pending or verdict is NEED_MORE
        for d, (client, server) in enumerate(((c, s), (s, c))):
            mail = text.detect_mail(client, server)
            if mail is not None:
                self._decide(mail)
                self._dir = d  # the direction that carries the client's commands
                self._stage = _MAIL
                self._mail(client)
                return
        if not pending and not _mail_pending(c, s) and not _mail_pending(s, c):
            self.done = True  # neither stream can still become anything this module knows

    def _set_hello(self, hello: tls.ClientHello) -> None:
        if hello.sni:
            self.server_name = hello.sni
        self.fingerprint = hello.ja4

    def _tls_hello(self, data: bytes) -> None:
        """The stream started like a ClientHello: wait for the rest of it."""
        hello = tls.parse_tls_stream(data)
        if hello is tls.NEED_MORE:
            if self.app != TLS and _tls_records(data) is True:
                self._decide(TLS)
            return
        if hello is not None:
            self._decide(TLS)
            self._set_hello(hello)
        elif self.app != TLS and _tls_records(data) is True:
            self._decide(TLS)
        elif self.app != TLS:
            self._stage = _DETECT  # not TLS after all: look again from the start
            return
        self.done = True

    def _http_request(self, req: text.HttpRequest) -> None:
        if req.host is not None:
            self.server_name = req.host
        if req.complete:
            self.done = True

    def _http_host(self) -> None:
        """HTTP is known: find the Host of the request at the start of either stream."""
        for buf in self._bufs:
            if buf and 0x41 <= buf[0] <= 0x5A:
                req = text.parse_http_request(bytes(buf))
                if isinstance(req, text.HttpRequest):
                    self._http_request(req)
                    return

    def _tcp_dns(self, data: bytes) -> bool | str:
        """DNS over TCP at the start of data (2-byte length prefix, then the message)."""
        size = _U16(data, 0)[0]
        if size < 12:
            return False
        on_port = DNS_PORT in (self.client_port, self.server_port)
        msg = parse_dns(data[2:2 + size], 16 if on_port else 1)
        if msg is None:
            return False
        whole = len(data) >= 2 + size
        if on_port:
            ok = msg.name is not None or (whole and msg.complete)
        else:
            ok = whole and msg.complete and not msg.trailing and _strict_dns(msg)
        if not ok:
            return False if whole else NEED_MORE
        if self.app != DNS or self.guess:
            self._decide(DNS)
            self._stage = _DNS_NAME
        if msg.name is not None:
            self.server_name = msg.name
            self.done = True
        return True

    def _mail(self, data: bytes) -> None:
        """SMTP/IMAP/POP3 known: follow the client until STARTTLS and parse the ClientHello
        after it (the label stays the mail protocol)."""
        if self._stage == _MAIL:
            off = text.starttls_offset(self.app, data)
            if off is NEED_MORE:
                return
            if off is None:
                self.done = True
                return
            self._tls_off = off
            self._stage = _STARTTLS
        if len(data) <= self._tls_off:
            return
        hello = tls.parse_tls_stream(data[self._tls_off:])
        if hello is tls.NEED_MORE:
            return
        if hello is not None:
            self._set_hello(hello)
        self.done = True

    # ------------------------------------------------------------------------------ UDP
    def _feed_udp(self, payload: bytes, from_client: bool) -> None:
        app = self.app
        if app != UNKNOWN and not self.guess:  # known: only a name or a hello is missing
            if app == QUIC:
                self._quic_datagram(payload, from_client)
            elif app in (DNS, MDNS):
                self._udp_dns(payload)
            return
        ports = (self.client_port, self.server_port)
        if self._udp_dns(payload):
            return
        if DHCP_PORTS.intersection(ports) and is_dhcp(payload):
            self._decide(DHCP)
            self.done = True
            return
        if DHCPV6_PORTS.intersection(ports) and is_dhcpv6(payload):
            self._decide(DHCPV6)
            self.done = True
            return
        if NTP_PORT in ports and is_ntp(payload):
            self._decide(NTP)
            self.done = True
            return
        if 0x41 <= payload[0] <= 0x5A:
            # HTTP over UDP (SSDP): tshark names it otherwise, but the Host is a server name
            req = text.parse_http_request(payload)
            if isinstance(req, text.HttpRequest):
                if req.host is not None:
                    self.server_name = req.host
                self.done = True
                return
        self._quic_datagram(payload, from_client)

    def _udp_dns(self, payload: bytes) -> bool:
        ports = (self.client_port, self.server_port)
        if NOT_DNS_PORTS.intersection(ports):
            return False
        mdns = MDNS_PORT in ports
        on_port = mdns or DNS_PORT in ports
        msg = parse_dns(payload, 64 if mdns else 16 if on_port else 1)
        if msg is None:
            return False
        whole = msg.complete and not msg.trailing
        if not on_port:
            if not (whole and _strict_dns(msg)):
                return False
        elif not (whole or msg.name is not None or len(payload) >= 6):
            # cut short inside the header: consistent, but only the port says DNS
            return False
        if self.guess or self.app not in (DNS, MDNS):
            self._decide(MDNS if mdns else DNS)
        if msg.name is not None and self.server_name is None:
            self.server_name = msg.name
            self.done = True
        return True

    def _quic_datagram(self, payload: bytes, from_client: bool) -> None:
        if self._quic is None:
            self._quic = quic.QuicState()
        res = quic.parse_quic_datagram(payload, self._quic, from_client)
        if res is None:
            return
        if self.app != QUIC or self.guess:
            self._decide(QUIC)
        if res.sni:
            self.server_name = res.sni
        if res.hello is not None:
            self.fingerprint = res.hello.ja4
        if res.complete:
            self.done = True


# ---------------------------------------------------------------------------------- helpers
def _strict_dns(msg) -> bool:
    """A DNS message off the DNS ports: one question of class IN/CH/HS/ANY, a standard query
    or its answer, and a query carries no answer or authority records."""
    if msg.qdcount != 1 or msg.opcode != 0 or msg.qclass not in (1, 3, 4, 255):
        return False
    if not msg.response and (msg.ancount or msg.nscount or msg.arcount > 2 or msg.rcode):
        return False
    return True


_TLS_MAX_RECORD = 16384 + 2048


def _tls_records(data: bytes) -> bool | str:
    """TLS record headers at the start of data (content type 20-24, version 3.0-3.4, a
    length a record can have), checked for up to 4 consecutive records: True, False, or
    NEED_MORE when fewer than 5 bytes are there."""
    pos, n = 0, len(data)
    for _ in range(4):
        if pos + 5 > n:
            if pos:
                return True
            head = data[pos:]
            if (head[0] < 20 or head[0] > 24 or (len(head) > 1 and head[1] != 3)
                    or (len(head) > 2 and head[2] > 4)):
                return False
            return NEED_MORE
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = _U16(data, pos + 3)[0]
        if not 20 <= ctype <= 24 or major != 3 or minor > 4 or not 0 < length <= _TLS_MAX_RECORD:
            return False
        pos += 5 + length
        if pos >= n:
            return True
    return True


def _mail_pending(client: bytes, server: bytes) -> bool:
    """A greeting that may be SMTP, IMAP or POP3, and the client's first command line (which
    decides) has not come yet."""
    return server[:3] in (b"220", b"* O", b"+OK") and b"\n" not in client
