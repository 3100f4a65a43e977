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

``done`` becomes True (and the capture loop stops feeding) as soon as nothing more can be
learned, at the latest after MAX_PACKETS packets with payload (MAX_BUFFER bytes are kept per
direction):

* the label is decided and the name / fingerprint it can carry is known, or can no longer
  come: an HTTP header block ended without Host (or neither stream starts with a request),
  the first DNS message of each direction had no question, a mail client went on without
  STARTTLS;
* TCP, nothing decided: the start of each direction's stream has ruled out every protocol
  above (no parser can still match more bytes of it: a partial request line or record header
  still can, and so can a first segment of only the 2-byte DNS length prefix), and no mail
  dialogue can still start (a greeting whose client has not sent its first line yet). A
  direction that has sent nothing yet keeps the flow open: the server may speak first (SSH,
  mail greetings, an HTTP error answering an unknown request, TLS records of a stream seen
  from the middle). A direction whose reassembly ended (a gap, the buffer full) cannot
  change its verdict any more.
* UDP, nothing decided: the first datagram of each direction matched nothing (one that looks
  like a QUIC long header of a version or key this module cannot read does not count: the
  same side's next datagram may still be QUIC). Each protocol above shows itself in the first
  datagram each side sends (a QUIC client's first datagram is its Initial, a DNS query and
  its answer both carry the question). So a side whose first datagram matched nothing is not
  looked at again: when it sends again before the other side has spoken, the flow is done (a
  one-way stream: syslog, RTP, a scan) instead of being matched up to MAX_PACKETS times.

Each stream's verdict is kept, so a TCP segment re-parses only its own stream, and only while
that stream can still match; a segment that adds no bytes (a retransmission) parses nothing.
Nothing raises on hostile payloads.
"""

from __future__ import annotations

import struct

from capture.inspect import quic, text, tls
from capture.inspect.dns import parse_dns
from capture.inspect.names import safe_name
from capture.inspect.udp import DHCP_PORTS, DHCPV6_PORTS, NTP_PORT, is_dhcp, is_dhcpv6, is_ntp

TCP, UDP = 6, 17
MAX_PACKETS = 12  # packets with payload inspected per flow
MAX_BUFFER = 16 * 1024  # reassembled bytes kept per direction
# What a flow's reassembly (or QUIC) state costs beyond its buffers, as held_bytes() counts it:
# the tuple and per-direction lists of the TCP state (or a QUIC flow's keys and ranges) and
# the allocator's share, rounded up
STATE_BYTES = 1024
# The Initial keys of a QUIC flow (AEAD and header-protection contexts in OpenSSL), per
# (version, DCID): measured as the RSS of unfinished QUIC flows, rounded up
QUIC_KEY_BYTES = 4096

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

# UDP: what the flow's ports allow (the union over both ports), computed once per flow
_P_DNS, _P_MDNS, _P_NOT_DNS, _P_DHCP, _P_DHCPV6, _P_NTP = 1, 2, 4, 8, 16, 32
_UDP_PORT_ROLES = {DNS_PORT: _P_DNS, MDNS_PORT: _P_MDNS, NTP_PORT: _P_NTP,
                   **{p: _P_NOT_DNS for p in NOT_DNS_PORTS}, **{p: _P_DHCP for p in DHCP_PORTS},
                   **{p: _P_DHCPV6 for p in DHCPV6_PORTS}}

_SEQ_MASK = 0xFFFFFFFF
_SEQ_HALF = 1 << 31
_U16 = struct.Struct("!H").unpack_from
NEED_MORE = text.NEED_MORE

# TCP stages after the label is known
_DETECT, _TLS_HELLO, _HTTP_HOST, _MAIL, _STARTTLS, _DNS_NAME = range(6)
# _seen[d], TCP: the length of direction d's stream when it was last matched (it is matched
# again only once it has grown), or RULED_OUT: the stream can no longer match anything (stage
# _DETECT), start with a request (_HTTP_HOST) or give a DNS name (_DNS_NAME). UDP: RULED_OUT
# once a datagram of direction d matched nothing (or, DNS known, had no name).
RULED_OUT = -1

# First bytes of a stream that may start a mail client's first command (SMTP's, matched
# case-insensitively) or a mail server's greeting ("220", "* OK", "+OK"): text.detect_mail()
# and _mail_pending() can only answer for a flow whose streams start with one of these.
_MAIL_FIRST = frozenset(b"EeHhMmSs2*+")


class FlowInspector:
    """Application label, server name and TLS fingerprint of one flow (see the module doc).

    client: the sender of the flow's first packet (from_client=True in feed()).
    """

    errors = 0  # parser exceptions caught by feed() (a bug: each ends that flow's inspection)
    # inspections given up by capture.flowcache.FlowCache (process-wide, like errors): to keep
    # the bytes held by unfinished inspectors under the budget, and after the idle timeout
    budget_evictions = 0
    idle_expired = 0

    __slots__ = ("proto", "client_port", "server_port", "app", "guess", "raw_name",
                 "fingerprint", "done", "_packets", "_bufs", "_next", "_closed", "_stage",
                 "_dir", "_tls_off", "_quic", "_seen", "_roles")

    def __init__(self, proto: int, client_port: int, server_port: int):
        self.proto = proto
        self.client_port = client_port
        self.server_port = server_port
        # the server name's bytes as the parser took them from the packet (at most
        # names.MAX_RAW): capture.batching makes the text with names.safe_name()
        self.raw_name: bytes | None = None
        self.fingerprint: str | None = None
        self.done = proto not in (TCP, UDP)
        self._packets = 0
        self._stage = _DETECT
        self._dir = 0  # TCP: the direction (0 client, 1 server) the label's evidence came from
        self._tls_off = 0
        self._quic: quic.QuicState | None = None
        # TCP: the reassembly state is made with the first payload (many flows carry none)
        self._bufs = self._next = self._closed = None
        if proto == TCP:
            self._seen = None
            guesses = TCP_PORT_GUESS
        else:
            if proto == UDP:
                self._seen = [0, 0]
                self._roles = (_UDP_PORT_ROLES.get(client_port, 0)
                               | _UDP_PORT_ROLES.get(server_port, 0))
                guesses = UDP_PORT_GUESS
            else:
                self._seen = None
                guesses = {}
        app = guesses.get(server_port) or guesses.get(client_port)
        self.app = app or UNKNOWN
        self.guess = app is not None

    def held_bytes(self) -> int:
        """Bytes this unfinished inspector holds beyond its empty self (0 for most flows): the
        TCP reassembly buffers (as allocated) or the QUIC state's CRYPTO bytes and keys, plus
        STATE_BYTES for the objects around them. FlowCache charges it to its byte budget."""
        bufs = self._bufs
        if bufs is not None:
            return bufs[0].__sizeof__() + bufs[1].__sizeof__() + STATE_BYTES
        state = self._quic
        if state is not None:
            return state.crypto.__sizeof__() + STATE_BYTES + QUIC_KEY_BYTES * len(state.keys)
        return 0

    @property
    def server_name(self) -> str | None:
        """The server name as it leaves capture: names.safe_name(raw_name)."""
        raw = self.raw_name
        return None if raw is None else safe_name(raw)

    def __repr__(self) -> str:
        return (f"FlowInspector(app={self.app!r}, guess={self.guess}, "
                f"server_name={self.server_name!r}, fingerprint={self.fingerprint!r}, "
                f"done={self.done})")

    # ------------------------------------------------------------------------------ feed
    def feed(self, payload: bytes, from_client: bool, tcp_seq: int | None) -> bool:
        """Inspect one packet's L4 payload; True when app, guess, raw_name or fingerprint
        changed."""
        if self.done or not payload:
            return False
        before = (self.app, self.guess, self.raw_name, self.fingerprint)
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
        return (self.app, self.guess, self.raw_name, self.fingerprint) != before

    @classmethod
    def first_payload(cls, proto: int, client_port: int, server_port: int,
                      payload: bytes) -> tuple | None:
        """What a new inspector of this flow learns from the client's first payload, when it
        is done after it (nearly every flow's ClientHello or QUIC Initial): the (app, guess,
        raw_name, fingerprint) that take_first() gives an inspector that has seen no payload
        yet, instead of parsing it again. None when that inspection goes on (or fails: feed()
        counts the error where the flow is inspected). capture.reader_process computes these
        ahead, in the process that reads the file."""
        inspector = cls(proto, client_port, server_port)
        errors = cls.errors
        inspector.feed(payload, True, None)
        if not inspector.done or cls.errors != errors:
            cls.errors = errors
            return None
        return inspector.app, inspector.guess, inspector.raw_name, inspector.fingerprint

    @property
    def fresh(self) -> bool:
        """No payload fed yet: feed() of the client's first payload is first_payload()'s."""
        return self._packets == 0 and not self.done

    def take_first(self, learned: tuple) -> bool:
        """feed() of the client's first payload to a fresh inspector, from what
        first_payload() learned of it (the same payload, the same ports): done after it."""
        before = (self.app, self.guess, self.raw_name, self.fingerprint)
        self.app, self.guess, self.raw_name, self.fingerprint = learned
        self._packets = 1
        self.done = True
        self._bufs = self._quic = None
        return learned != before

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
        bufs = self._bufs
        if bufs is None:  # the flow's first payload
            if d == 0 and self._first_segment(payload):
                return  # decided and done: no reassembly state needed
            bufs = self._bufs = (bytearray(), bytearray())
            self._next: list[int | None] = [None, None]
            self._closed = [False, False]
            self._seen = [0, 0]
        closed = self._closed
        first_bytes = not bufs[d]
        was_closed = closed[d]
        if not self._append(d, payload, seq):
            if closed[0] and closed[1]:
                self.done = True
            elif closed[d] and not was_closed and self._stage == _DETECT:
                self._tcp_detect(d, None)  # a gap ended this stream: its verdict is final
            return
        stage = self._stage
        if stage == _DETECT:
            # the common case, one segment so far: no copy of the buffer
            self._tcp_detect(d, payload if first_bytes and len(bufs[d]) == len(payload)
                             else None)
        elif stage == _TLS_HELLO:
            if d == self._dir:
                self._tls_hello(bytes(bufs[d]))
        elif stage == _HTTP_HOST:
            self._http_host()
        elif stage == _MAIL or stage == _STARTTLS:
            if d == self._dir:
                self._mail(bytes(bufs[d]))
        elif stage == _DNS_NAME:
            seen = self._seen
            if seen[d] != RULED_OUT:
                verdict = self._tcp_dns(bytes(bufs[d]))
                if verdict is not NEED_MORE:
                    seen[d] = RULED_OUT  # its first message is whole: it has no name
                    if seen[1 - d] == RULED_OUT:
                        self.done = True  # neither stream's first message can give a name
        if self._closed[0] and self._closed[1]:
            self.done = True

    def _first_segment(self, payload: bytes) -> bool:
        """The client's first segment holds a whole ClientHello or HTTP request header (the
        common case): decide as _tcp_match() would, without building the reassembly state.
        False leaves everything to the general path (which parses the segment again: only
        for a segment that looks like a whole hello or header block and is not one)."""
        first = payload[0]
        if first == 0x16:
            hello = tls.parse_tls_stream(payload)
            if not hello:  # NEED_MORE or not a hello: the general path looks again
                return False
            self._decide(TLS)
            self._set_hello(hello)
        elif 0x41 <= first <= 0x5A and payload.endswith(b"\r\n\r\n"):  # a whole header
            req = text.parse_http_request(payload)
            if not isinstance(req, text.HttpRequest) or not req.complete:
                return False
            self._decide(HTTP)
            if req.host is not None:
                self.raw_name = req.host
        else:
            return False
        self.done = True
        return True

    def _tcp_detect(self, new: int, data: bytes | None) -> None:
        """Match the start of both streams against every TCP protocol; decide on the first
        match. Only a stream that grew since it was last matched is matched again (the
        verdict of every parser on a stream start is final once it is not NEED_MORE); data is
        direction new's stream when the caller has it as bytes."""
        bufs, seen = self._bufs, self._seen
        for d in (0, 1):
            n = len(bufs[d])
            if seen[d] == RULED_OUT or seen[d] == n:
                continue
            seen[d] = n
            if n < 2:
                continue
            verdict = self._tcp_match(d, data if d == new and data is not None
                                      else bytes(bufs[d]))
            if verdict is True:
                return
            if verdict is False:
                seen[d] = RULED_OUT
        c, s = bufs
        if (c and c[0] in _MAIL_FIRST) or (s and s[0] in _MAIL_FIRST):
            heads = (bytes(c[:512]), bytes(s[:512]))  # all that detect_mail() looks at
            for d in (0, 1):
                mail = text.detect_mail(heads[d], heads[1 - d])
                if mail is not None:
                    self._decide(mail)
                    self._dir = d  # the direction that carries the client's commands
                    self._stage = _MAIL
                    self._mail(bytes(bufs[d]))
                    return
        self._detect_done()

    def _detect_done(self) -> None:
        """done when neither stream can still become anything this module knows: each is
        ruled out, or its reassembly ended (its verdict cannot change any more)."""
        seen, closed = self._seen, self._closed
        if (seen[0] == RULED_OUT or closed[0]) and (seen[1] == RULED_OUT or closed[1]):
            c, s = self._bufs
            if not (_mail_pending(c, s) or _mail_pending(s, c)):
                self.done = True

    def _tcp_match(self, d: int, data: bytes) -> bool | str:
        """Match one stream start (at least 2 bytes) against the protocols one stream shows
        alone: True when decided (stage set), NEED_MORE, or False (final for this stream)."""
        first = data[0]
        if first == 0x16:
            hello = tls.parse_tls_stream(data)
            if hello is tls.NEED_MORE:
                self._dir = d
                self._stage = _TLS_HELLO
                if _tls_records(data) is True:
                    self._decide(TLS)
                    return True
                return NEED_MORE
            if hello is not None:
                self._decide(TLS)
                self._set_hello(hello)
                self.done = True
                return True
        if 20 <= first <= 24:
            verdict = _tls_records(data)
            if verdict is True:
                self._decide(TLS)
                self.done = True  # no ClientHello at the start of this stream
            return verdict
        pending = False
        if first == 0x53:  # "S"
            verdict = text.is_ssh_banner(data)
            if verdict is True:
                self._decide(SSH)
                self.done = True
                return True
            pending = verdict is NEED_MORE
        elif first == 0x48:  # "H"
            verdict = text.is_http_response(data)
            if verdict is True:
                self._decide(HTTP)
                self._stage = _HTTP_HOST
                self._http_host()
                return True
            pending = verdict is NEED_MORE
        if 0x41 <= first <= 0x5A:  # an upper-case method token
            req = text.parse_http_request(data)
            if req is NEED_MORE:
                pending = True
            elif req is not None:
                self._decide(HTTP)
                self._stage = _HTTP_HOST
                self._http_request(req)
                return True
        verdict = self._tcp_dns(data)
        if verdict is True:
            if not self.done:  # DNS without a name in this stream's (whole) first message
                self._seen[d] = RULED_OUT
                if self._seen[1 - d] == RULED_OUT:
                    self.done = True  # nor can the other stream's first message give one
            return True
        return NEED_MORE if pending or verdict is NEED_MORE else False

    def _set_hello(self, hello: tls.ClientHello) -> None:
        if hello.sni:
            self.raw_name = hello.sni
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
            self.raw_name = req.host
        if req.complete:
            self.done = True

    def _http_host(self) -> None:
        """HTTP is known: find the Host of the request at the start of either stream. A
        stream that does not start with a request never will (parse_http_request() answers
        None only for good): it is not parsed again, and when neither stream can start with
        one, no Host can come."""
        seen = self._seen
        for d in (0, 1):
            if seen[d] == RULED_OUT:
                continue
            buf = self._bufs[d]
            if not buf:
                continue
            if 0x41 <= buf[0] <= 0x5A:
                req = text.parse_http_request(bytes(buf))
                if isinstance(req, text.HttpRequest):
                    self._http_request(req)
                    return
                if req is NEED_MORE:
                    continue
            seen[d] = RULED_OUT
        if seen[0] == RULED_OUT and seen[1] == RULED_OUT:
            self.done = True

    def _tcp_dns(self, data: bytes) -> bool | str:
        """DNS over TCP at the start of data (2-byte length prefix, then the message)."""
        n = len(data)
        if n < 2:
            return NEED_MORE
        size = _U16(data, 0)[0]
        if size < 12:
            return False
        if n < 6:  # the length prefix alone (often a segment of its own): parse_dns needs 4
            return NEED_MORE
        on_port = DNS_PORT in (self.client_port, self.server_port)
        # off the DNS port only a standard query (opcode 0) with one question counts: fixed by
        # the header, so a stream whose header says otherwise can stop here
        if not on_port and n >= 8 and (data[4] & 0x78 or data[6] or data[7] != 1):
            return False
        msg = parse_dns(data[2:2 + size], 16 if on_port else 1, walk_records=not on_port)
        if msg is None:
            return False
        whole = n >= 2 + size
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
            self.raw_name = msg.name
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
        """Every datagram is matched until the label is decided or the flow is done: each
        protocol shows itself in the first datagram each side sends (a QUIC client's first is
        its Initial, a DNS query and its answer both carry the question), so the flow is done
        once the first datagram of each side has ruled everything out (_seen[d] RULED_OUT), or
        for DNS, has shown no name. A side that matched nothing and speaks again before the
        other side has spoken ends the flow (nothing it sends can tell more)."""
        app = self.app
        if app != UNKNOWN and not self.guess:  # known: only a name or a hello is missing
            if app == QUIC:
                self._quic_datagram(payload, from_client)
            elif app in (DNS, MDNS):
                # a name needs a question, whole: 12 header bytes, a name, type and class
                if len(payload) >= 17 and (payload[4] or payload[5]):
                    self._udp_dns(payload)
                if not self.done:
                    self._side_done(from_client)
            return
        if self._seen[0 if from_client else 1] == RULED_OUT and self._quic is None:
            self.done = True  # this side again, the other still silent: a one-way flow
            return
        roles = self._roles
        pending = False
        first = payload[0]
        # DNS: on its ports any consistent message; elsewhere (_strict_dns) only a whole
        # standard query (opcode 0) with one question: 12 header bytes, a name, type and class
        if not roles & _P_NOT_DNS and (roles & (_P_DNS | _P_MDNS) or (
                len(payload) >= 17 and not payload[2] & 0x78 and not payload[4]
                and payload[5] == 1)):
            verdict = self._udp_dns(payload)
            if verdict is True:
                if not self.done:  # DNS, but this first message has no name
                    self._side_done(from_client)
                return
            pending = verdict is NEED_MORE
        if roles & _P_DHCP and is_dhcp(payload):
            self._decide(DHCP)
            self.done = True
            return
        if roles & _P_DHCPV6 and is_dhcpv6(payload):
            self._decide(DHCPV6)
            self.done = True
            return
        if roles & _P_NTP and is_ntp(payload):
            self._decide(NTP)
            self.done = True
            return
        if 0x41 <= first <= 0x5A:
            # HTTP over UDP (SSDP): tshark names it otherwise, but the Host is a server name
            req = text.parse_http_request(payload)
            if isinstance(req, text.HttpRequest):
                if req.host is not None:
                    self.raw_name = req.host
                self.done = True
                return
        # A fresh QuicState answers only for a long header (0x80) or, from the client, a
        # gQUIC public header with the version flag (flags & 0xCB == 0x09): skip the rest
        if self._quic is not None or first & 0x80 or (from_client and first & 0xCB == 0x09):
            if self._quic_datagram(payload, from_client):
                return
            # a long header this module could not read (an unknown version, an Initial that
            # did not decrypt): this side's next datagrams may still be QUIC
            pending = pending or (first & 0xC0 == 0xC0 and len(payload) >= 7
                                  and payload[5] <= quic.MAX_CID)
        if not pending:
            self._side_done(from_client)

    def _side_done(self, from_client: bool) -> None:
        """This side's datagram told all its side can tell: done once both sides have."""
        seen = self._seen
        seen[0 if from_client else 1] = RULED_OUT
        if seen[0] == seen[1]:
            self.done = True

    def _udp_dns(self, payload: bytes) -> bool | str:
        """DNS in one datagram: True when it is (decided), NEED_MORE for a consistent DNS
        header cut short on a DNS port (only the port says DNS), else False. Not called on
        the NetBIOS / LLMNR ports."""
        roles = self._roles
        mdns = roles & _P_MDNS
        on_port = roles & (_P_DNS | _P_MDNS)
        msg = parse_dns(payload, 64 if mdns else 16 if on_port else 1,
                        walk_records=not on_port)
        if msg is None:
            return False
        whole = msg.complete and not msg.trailing
        if not on_port:
            if not (whole and _strict_dns(msg)):
                return False
        elif not (whole or msg.name is not None or len(payload) >= 6):
            # cut short inside the header: consistent, but only the port says DNS
            return NEED_MORE
        if self.guess or self.app not in (DNS, MDNS):
            self._decide(MDNS if mdns else DNS)
        if msg.name is not None and self.raw_name is None:
            self.raw_name = msg.name
            self.done = True
        return True

    def _quic_datagram(self, payload: bytes, from_client: bool) -> bool:
        """True when the datagram is QUIC (the label is decided)."""
        if self._quic is None:
            self._quic = quic.QuicState()
        res = quic.parse_quic_datagram(payload, self._quic, from_client)
        if res is None:
            return False
        if self.app != QUIC or self.guess:
            self._decide(QUIC)
        if res.sni:
            self.raw_name = res.sni
        if res.hello is not None:
            self.fingerprint = res.hello.ja4
        if res.complete:
            self.done = True
        return True


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
