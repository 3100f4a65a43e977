"""The generator's own servers. Mix mode: on 127.0.0.1, a DNS responder (UDP), an HTTP/1.1 server
and a TCP server that answers a TLS ClientHello with a handshake_failure alert. Udp mode: a sink
on TARGET_HOST:TARGET_PORT when that is a local address nobody listens on, so the datagrams
are received instead of drawing an ICMP port unreachable each (twice the frames on the wire)
and failing every other send with ECONNREFUSED.

The sockets are bound in the generator (so their ports are known before anything is sent) and
served by a child process, which keeps the sender's core for the sender.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import selectors
import signal
import socket

from traffic_generator.messages import HTTP_RESPONSE, TLS_ALERT_HANDSHAKE_FAILURE, dns_response

log = logging.getLogger("traffic_generator")

LOOPBACK = "127.0.0.1"
BACKLOG = 4096
RECEIVE_BUFFER = 4 << 20  # the kernel caps it at net.core.rmem_max
DATAGRAMS_PER_WAKE = 256  # bounded work per readiness event, so TCP clients are not starved


class LocalServers:
    """Bound listening sockets; `start` hands them to a serving child process."""

    def __init__(self) -> None:
        self.dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dns.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.dns.bind((LOOPBACK, 0))
        self.http = socket.create_server((LOOPBACK, 0), backlog=BACKLOG)
        self.tls = socket.create_server((LOOPBACK, 0), backlog=BACKLOG)
        self.addresses = {"dns": self.dns.getsockname(), "http": self.http.getsockname(),
                          "tls": self.tls.getsockname()}
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> None:
        """Fork the serving process (call it before any thread starts), then drop our copies."""
        self._process = _fork(serve, (self.dns, self.http, self.tls, os.getpid()),
                              "traffic_generator-listeners")
        for sock in (self.dns, self.http, self.tls):
            sock.close()

    def stop(self) -> None:
        process, self._process = self._process, None
        _end(process)


class UdpSink:
    """Reads and drops the udp mode's datagrams on their target (a local address)."""

    def __init__(self, family: int, address: tuple) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.sock.bind(address)
        except OSError:
            self.sock.close()
            raise
        self._process: multiprocessing.process.BaseProcess | None = None

    @classmethod
    def open(cls, family: int, address: tuple) -> UdpSink | None:
        """A sink on `address`; None when the address is not this host's (EADDRNOTAVAIL: the
        datagrams leave the host) or a socket is bound there already (its owner receives)."""
        try:
            return cls(family, address)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                log.warning("cannot listen on the target %s (%s): where nothing else listens, "
                            "each datagram draws an ICMP port unreachable", address[:2],
                            exc.strerror)
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EACCES):
                return None
            raise

    def start(self) -> None:
        """Fork the draining process (before any thread starts), then drop our copy."""
        self._process = _fork(drain, (self.sock, os.getpid()), "traffic_generator-udp-sink")
        self.sock.close()

    def stop(self) -> None:
        process, self._process = self._process, None
        _end(process)


def _fork(target, args: tuple, name: str) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, name=name,
                                                          daemon=True)
    process.start()
    return process


def _end(process: multiprocessing.process.BaseProcess | None) -> None:
    if process is None:
        return
    process.terminate()
    process.join(timeout=2)
    if process.is_alive():
        process.kill()
        process.join()


def drain(sock: socket.socket, parent_pid: int) -> None:
    """Receive and drop datagrams until terminated or until the generator is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the generator, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock.settimeout(1.0)
    buffer = bytearray(65536)
    recv_into = sock.recv_into
    while True:
        try:
            recv_into(buffer)
        except TimeoutError:
            if os.getppid() != parent_pid:
                return  # the generator died without stopping us
        except OSError:
            continue


def serve(dns: socket.socket, http: socket.socket, tls: socket.socket, parent_pid: int) -> None:
    """Serve the three sockets until terminated or until the generator is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the generator, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _Servers(dns, http, tls).run(parent_pid)


class _Servers:
    def __init__(self, dns: socket.socket, http: socket.socket, tls: socket.socket) -> None:
        self.selector = selectors.DefaultSelector()
        self.pending: dict[socket.socket, bytes] = {}  # HTTP request bytes not yet answered
        for sock, handler in ((dns, self.answer_dns), (http, self.accept_http),
                              (tls, self.accept_tls)):
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, handler)

    def run(self, parent_pid: int) -> None:
        select = self.selector.select
        while True:
            events = select(timeout=1.0)
            if not events and os.getppid() != parent_pid:
                return  # the generator died without stopping us
            for key, _ in events:
                key.data(key.fileobj)

    def answer_dns(self, sock: socket.socket) -> None:
        for _ in range(DATAGRAMS_PER_WAKE):
            try:
                query, peer = sock.recvfrom(4096)
            except BlockingIOError:
                return
            except OSError:
                continue
            try:
                sock.sendto(dns_response(query), peer)
            except (ValueError, IndexError, OSError):
                continue  # not a query we answer, or the client is gone

    def _accept(self, listener: socket.socket, handler) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError:
                continue  # e.g. the client reset before we accepted
            conn.setblocking(False)
            self.selector.register(conn, selectors.EVENT_READ, handler)
            if handler == self.serve_http:
                self.pending[conn] = b""

    def accept_http(self, listener: socket.socket) -> None:
        self._accept(listener, self.serve_http)

    def accept_tls(self, listener: socket.socket) -> None:
        self._accept(listener, self.refuse_tls)

    def _close(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        self.pending.pop(conn, None)
        conn.close()

    def serve_http(self, conn: socket.socket) -> None:
        """Answer every complete request head (pipelined requests included) with a 200."""
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        buffered = self.pending[conn] + data
        requests = buffered.count(b"\r\n\r\n")
        if requests:
            buffered = buffered[buffered.rindex(b"\r\n\r\n") + 4:]
            try:
                conn.sendall(HTTP_RESPONSE * requests)
            except OSError:  # BlockingIOError included: a client that does not read
                self._close(conn)
                return
        if len(buffered) > 65536:
            self._close(conn)  # no request head is that long
            return
        self.pending[conn] = buffered

    def refuse_tls(self, conn: socket.socket) -> None:
        """Answer the first bytes (the ClientHello) with a fatal alert, then close."""
        try:
            data = conn.recv(65536)
            if data:
                conn.send(TLS_ALERT_HANDSHAKE_FAILURE)
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)
