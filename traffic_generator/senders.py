"""What the generator sends, one burst at a time: UDP datagrams to a target, or the DNS, HTTP
and TLS mix to the local listeners. Payloads are built once; a burst is a loop of sends."""

from __future__ import annotations

import logging
import random
import select
import socket
import struct
from collections import deque
from itertools import cycle, islice

from packet_records.runtime import StartupError
from traffic_generator.listeners import LocalServers, UdpSink
from traffic_generator.messages import (
    DNS_NAMES,
    HTTP_HOSTS,
    HTTP_PATHS,
    QTYPE_A,
    QTYPE_AAAA,
    TLS_NAMES,
    dns_query,
    http_get,
    tls_client_hello,
)

log = logging.getLogger("traffic_generator")

MIX_KINDS = ("dns", "http", "tls")
MIX_PATTERN = (0, 1, 0, 2, 1, 0, 1, 2, 0, 1)  # indexes into MIX_KINDS: 4 dns, 4 http, 2 tls
DNS_FLOWS = 4  # client sockets the queries spread over
DNS_QUERIES = 256  # pre-built queries (names, ids, A/AAAA) sent in turn
HTTP_CONNECTIONS = 4  # keep-alive connections, one Host each
REQUESTS_PER_CONNECTION = 1000  # then the connection is closed and a new one opened
TLS_OPEN = 32  # refused handshakes left open before they are reset
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


class SendErrors:
    """Failed sends: counted, and the first of each kind logged (never a line per packet)."""

    def __init__(self) -> None:
        self.count = 0
        self._seen: set = set()

    def note(self, exc: OSError) -> None:
        self.count += 1
        kind = exc.errno or type(exc).__name__
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning("send failed: %s (counted; this error is not logged again)", exc)


def resolve(host: str, port: int) -> tuple[int, tuple]:
    """The address family and socket address of host:port for UDP; StartupError if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise StartupError(f"TARGET_HOST {host!r} does not resolve ({reason})") from None
    family, _, _, _, address = infos[0]
    return family, address


def build_payload(size: int) -> bytes:
    pattern = b"dpi-pipeline synthetic load "
    return (pattern * (size // len(pattern) + 1))[:size]


class UdpSender:
    """Datagrams of one pre-built payload, round robin over `flows` connected UDP sockets.

    When the target is a local address nobody listens on, a sink of ours receives them (see
    listeners.UdpSink): otherwise every datagram would draw an ICMP port unreachable and every
    other send would fail with ECONNREFUSED."""

    kinds: tuple[str, ...] = ()

    def __init__(self, host: str, port: int, flows: int, payload_size: int) -> None:
        family, address = resolve(host, port)
        self.sent = 0
        self.errors = SendErrors()
        self._socks: list[socket.socket] = []
        try:
            self.sink = UdpSink.open(family, address)
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        if self.sink is not None:
            self.sink.start()
        try:
            for _ in range(flows):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                self._socks.append(sock)
                sock.connect(address)
        except OSError as exc:
            self.close()
            raise StartupError(f"cannot send to {host}:{port}: {exc.strerror or exc}") from None
        self._payload = build_payload(payload_size)
        self._sends = cycle([sock.send for sock in self._socks])
        where = (f"[{address[0]}]:{address[1]}" if family == socket.AF_INET6
                 else f"{address[0]}:{address[1]}")
        self.description = (f"udp: {payload_size}-byte datagrams to {where} from {flows} flows"
                            + (" (received by a sink of ours)" if self.sink else ""))

    def send(self, n: int) -> None:
        payload = self._payload
        failed = 0
        for send in islice(self._sends, n):
            try:
                send(payload)
            except OSError as exc:  # ECONNREFUSED from an earlier ICMP unreachable, ENOBUFS...
                failed += 1
                self.errors.note(exc)
        self.sent += n - failed

    def breakdown(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []
        if self.sink is not None:
            self.sink.stop()
            self.sink = None


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class MixSender:
    """DNS queries, keep-alive HTTP GETs and TLS ClientHellos (one connection each), interleaved
    as MIX_PATTERN says; replies are read (and dropped) after every burst."""

    kinds = MIX_KINDS

    def __init__(self, servers: LocalServers) -> None:
        self._servers = servers
        self.sent = 0
        self.errors = SendErrors()
        self.counts = [0] * len(MIX_KINDS)
        self._poll = select.poll()
        self._readers: dict[int, socket.socket] = {}  # fd -> socket whose replies we drain

        self._dns_socks = []
        for _ in range(DNS_FLOWS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(servers.addresses["dns"])
            self._dns_socks.append(sock)
            self._watch(sock)
        ids = random.Random(0x5EED)
        self._dns = cycle([
            (self._dns_socks[i % DNS_FLOWS].send,
             dns_query(DNS_NAMES[i % len(DNS_NAMES)], ids.randrange(1 << 16),
                       QTYPE_AAAA if i % 4 == 3 else QTYPE_A))
            for i in range(DNS_QUERIES)
        ])

        self._http_address = servers.addresses["http"]
        self._http: list[socket.socket | None] = [None] * HTTP_CONNECTIONS
        self._http_used = [0] * HTTP_CONNECTIONS
        self._http_requests = [cycle([http_get(HTTP_HOSTS[i % len(HTTP_HOSTS)], path)
                                      for path in HTTP_PATHS]) for i in range(HTTP_CONNECTIONS)]
        self._http_next = 0

        self._tls_address = servers.addresses["tls"]
        self._hellos = cycle([tls_client_hello(name) for _ in range(4) for name in TLS_NAMES])
        self._tls_open: deque[socket.socket] = deque()

        self._pattern = cycle(MIX_PATTERN)
        self._units = (self._send_dns, self._send_http, self._send_tls)
        self.description = ("mix: DNS to {0[0]}:{0[1]}, HTTP to {1[0]}:{1[1]}, TLS to {2[0]}:{2[1]}"
                            " (dns:http:tls = 4:4:2)").format(
            servers.addresses["dns"], self._http_address, self._tls_address)

    def send(self, n: int) -> None:
        units, counts = self._units, self.counts
        failed = 0
        for kind in islice(self._pattern, n):
            try:
                units[kind]()
                counts[kind] += 1
            except OSError as exc:
                failed += 1
                self.errors.note(exc)
        self.sent += n - failed
        self._drain()

    def breakdown(self) -> dict[str, int]:
        return dict(zip(MIX_KINDS, self.counts))

    def _send_dns(self) -> None:
        send, query = next(self._dns)
        send(query)

    def _send_http(self) -> None:
        i = self._http_next
        self._http_next = (i + 1) % HTTP_CONNECTIONS
        sock = self._http[i]
        if sock is None or self._http_used[i] >= REQUESTS_PER_CONNECTION:
            sock = self._open_http(i)
        self._http_used[i] += 1
        try:
            sock.sendall(next(self._http_requests[i]))
        except OSError:
            self._close_http(sock)
            raise

    def _send_tls(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect(self._tls_address)
            sock.sendall(next(self._hellos))
        except OSError:
            sock.close()
            raise
        self._tls_open.append(sock)
        if len(self._tls_open) > TLS_OPEN:
            _reset(self._tls_open.popleft())

    def _open_http(self, i: int) -> socket.socket:
        old = self._http[i]
        if old is not None:
            self._close_http(old)
        sock = socket.create_connection(self._http_address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._http[i] = sock
        self._http_used[i] = 0
        self._watch(sock)
        return sock

    def _close_http(self, sock: socket.socket) -> None:
        i = self._http.index(sock)
        self._http[i] = None
        self._unwatch(sock)
        sock.close()

    def _watch(self, sock: socket.socket) -> None:
        self._readers[sock.fileno()] = sock
        self._poll.register(sock, select.POLLIN)

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._readers.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def _drain(self) -> None:
        """Read whatever replies arrived; an HTTP connection the server closed is dropped."""
        for fd, _ in self._poll.poll(0):
            sock = self._readers.get(fd)
            if sock is None:
                continue
            try:
                while sock.recv(65536, socket.MSG_DONTWAIT):
                    pass
                closed = sock.type == socket.SOCK_STREAM  # b"" on TCP: the server closed
            except BlockingIOError:
                closed = False
            except OSError:  # a reset connection; on UDP a late ECONNREFUSED
                closed = sock.type == socket.SOCK_STREAM
            if closed and sock in self._http:
                self._close_http(sock)

    def close(self) -> None:
        for sock in self._tls_open:
            _reset(sock)
        self._tls_open.clear()
        for sock in [s for s in self._http if s is not None]:
            self._close_http(sock)
        for sock in self._dns_socks:
            sock.close()
        self._servers.stop()


def open_sender(mode: str, host: str, port: int, flows: int,
                payload_size: int) -> UdpSender | MixSender:
    """The sender for `mode`, its sockets open; StartupError when it cannot send at all."""
    if mode == "udp":
        return UdpSender(host, port, flows, payload_size)
    try:
        servers = LocalServers()
    except OSError as exc:
        raise StartupError(f"cannot start the local listeners: {exc}") from None
    servers.start()
    try:
        return MixSender(servers)
    except OSError as exc:
        servers.stop()
        raise StartupError(f"cannot reach the local listeners: {exc}") from None
