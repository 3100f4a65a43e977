"""traffic_generator: token bucket and send loop (fake clock), settings refused at start, the
hand-built DNS and TLS bytes read back by Scapy, and runs of `python -m traffic_generator` on
loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from capture.inspect.flow import FlowInspector
from traffic_generator.generator import StopFlag, run
from traffic_generator.messages import (
    TLS_ALERT_HANDSHAKE_FAILURE,
    dns_query,
    dns_response,
    encode_name,
    http_get,
    quic_initial,
    tls_client_hello,
)
from traffic_generator.pacing import TokenBucket, bucket_capacity, burst_size
from traffic_generator.settings import GeneratorSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_ENV = {name.upper() for name in GeneratorSettings.model_fields}


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class FakeErrors:
    count = 0


class FakeSender:
    """Records bursts; optionally takes `cost_s` of fake time per packet."""

    kinds = ()

    def __init__(self, clock: FakeClock, cost_s: float = 0.0) -> None:
        self.clock, self.cost_s = clock, cost_s
        self.sent = 0
        self.errors = FakeErrors()
        self.bursts: list[int] = []

    def send(self, n: int) -> None:
        self.bursts.append(n)
        self.sent += n
        self.clock.now += n * self.cost_s

    def breakdown(self) -> dict[str, int]:
        return {}


# --- token bucket ----------------------------------------------------------------------------

def test_bucket_starts_empty_and_accrues_at_rate():
    clock = FakeClock()
    bucket = TokenBucket(1000, capacity=5, clock=clock)
    assert bucket.take(100) == 0
    clock.now += 0.0015  # 1.5 tokens
    assert bucket.take(100) == 1
    clock.now += 0.0005  # the half left over plus half a token
    assert bucket.take(100) == 1
    assert bucket.take(100) == 0


def test_bucket_caps_bursts_at_capacity_and_respects_limit():
    clock = FakeClock()
    bucket = TokenBucket(1000, capacity=5, clock=clock)
    clock.now += 1.0  # a second idle: 1000 tokens accrued, only 5 kept
    assert bucket.take(3) == 3
    assert bucket.take(100) == 2
    assert bucket.take(100) == 0


def test_bucket_delay_is_time_to_next_token():
    clock = FakeClock()
    bucket = TokenBucket(200, capacity=1, clock=clock)
    bucket.take(1)
    assert bucket.delay() == pytest.approx(1 / 200)
    clock.now += 0.002  # 0.4 token
    bucket.take(1)
    assert bucket.delay() == pytest.approx(0.6 / 200)


def test_bucket_refuses_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(0, capacity=1)
    with pytest.raises(ValueError):
        TokenBucket(10, capacity=0.5)


def test_bursts_are_five_milliseconds_worth_and_bucket_fifty():
    assert (burst_size(1), burst_size(1000), burst_size(5000), burst_size(200_000)) == (
        1, 5, 25, 1000)
    assert (bucket_capacity(1), bucket_capacity(1000), bucket_capacity(200_000)) == (
        1, 50, 10_000)


@pytest.mark.parametrize("rate", [1, 999, 5000, 200_000])
def test_run_holds_rate_for_duration(rate):
    clock = FakeClock()
    sender = FakeSender(clock)
    result = run(sender, rate, duration_s=2.0, clock=clock, sleep=clock.sleep)
    assert abs(result.sent - 2 * rate) <= 1
    assert max(sender.bursts) <= burst_size(rate)
    assert result.rate == pytest.approx(rate, rel=0.01, abs=1)


def test_run_stops_after_count_exactly():
    clock = FakeClock()
    sender = FakeSender(clock)
    result = run(sender, 5000, count=1234, clock=clock, sleep=clock.sleep)
    assert result.sent == sum(sender.bursts) == 1234
    assert result.seconds == pytest.approx(1234 / 5000, rel=0.01)


def test_run_stops_on_stop_flag():
    clock = FakeClock()
    stop = StopFlag()

    class Stopping(FakeSender):
        def send(self, n):
            super().send(n)
            if self.sent >= 100:
                stop.requested = True

    sender = Stopping(clock)
    result = run(sender, 1000, stop=stop, clock=clock, sleep=clock.sleep)
    assert 100 <= result.sent < 100 + burst_size(1000)


def test_slow_sender_gets_no_catch_up_flood():
    clock = FakeClock()
    sender = FakeSender(clock, cost_s=2 / 10_000)  # can do only half of 10000/s
    result = run(sender, 10_000, duration_s=1.0, clock=clock, sleep=clock.sleep)
    assert max(sender.bursts) <= burst_size(10_000)
    assert result.rate == pytest.approx(5000, rel=0.02)


class StallingSender(FakeSender):
    """Loses `stall_s` of fake time once, after `after` packets (a descheduled process)."""

    def __init__(self, clock: FakeClock, stall_s: float, after: int) -> None:
        super().__init__(clock)
        self.stall_s, self.after = stall_s, after

    def send(self, n: int) -> None:
        super().send(n)
        if self.after and self.sent >= self.after:
            self.after = 0
            self.clock.now += self.stall_s


def test_short_stall_is_made_up_in_bursts():
    clock = FakeClock()
    sender = StallingSender(clock, stall_s=0.03, after=2000)
    result = run(sender, 10_000, duration_s=1.0, clock=clock, sleep=clock.sleep)
    assert abs(result.sent - 10_000) <= 1  # the 300 packets missed were sent after the stall
    assert max(sender.bursts) <= burst_size(10_000)


def test_long_stall_is_not_followed_by_a_flood():
    clock = FakeClock()
    sender = StallingSender(clock, stall_s=0.5, after=2000)
    result = run(sender, 10_000, duration_s=1.0, clock=clock, sleep=clock.sleep)
    # 0.5 s lost; only the bucket's 50 ms worth is made up for
    assert abs(result.sent - (5000 + bucket_capacity(10_000))) <= 1
    assert max(sender.bursts) <= burst_size(10_000)


def test_run_reports_every_interval(caplog):
    clock = FakeClock()
    with caplog.at_level("INFO", logger="traffic_generator"):
        run(FakeSender(clock), 1000, duration_s=3.5, report_interval_s=1.0, clock=clock,
            sleep=clock.sleep)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    for line in lines:
        sent, rate = re.match(r"sent (\d+) in 1\.0s: (\d+)/s \(target 1000/s\), 0 errors$",
                              line).groups()
        assert abs(int(sent) - 1000) <= 1 and abs(int(rate) - 1000) <= 1


# --- wire bytes ------------------------------------------------------------------------------

def test_dns_query_parses_with_scapy():
    from scapy.layers.dns import DNS

    for name, qtype in (("example.com", 1), ("www.example.org", 28), ("a.b.c.example.net", 1)):
        msg = DNS(dns_query(name, 0xBEEF, qtype))
        assert (msg.id, msg.qr, msg.rd, msg.qdcount, msg.ancount) == (0xBEEF, 0, 1, 1, 0)
        assert msg.qd[0].qname == name.encode() + b"."
        assert (msg.qd[0].qtype, msg.qd[0].qclass) == (qtype, 1)


def test_dns_response_parses_with_scapy():
    from scapy.layers.dns import DNS

    answer = DNS(dns_response(dns_query("www.example.org", 7)))
    assert (answer.id, answer.qr, answer.rcode, answer.ancount) == (7, 1, 0, 1)
    assert answer.an[0].rrname == b"www.example.org."
    assert answer.an[0].rdata == "93.184.215.14"
    with pytest.raises(ValueError):
        dns_response(b"\x00" * 5)


def test_dns_names_are_checked():
    assert encode_name("example.com") == b"\x07example\x03com\x00"
    for bad in ("", "a..b", "x" * 64 + ".com", ".".join(["abcdefgh"] * 30)):
        with pytest.raises(ValueError):
            encode_name(bad)


def _sni_by_hand(record: bytes) -> bytes:
    """Walk the ClientHello's lengths (RFC 8446 4.1.2) down to the server_name extension."""
    content, _, length = struct.unpack_from("!BHH", record)
    assert (content, length) == (0x16, len(record) - 5)
    assert record[5] == 1 and int.from_bytes(record[6:9], "big") == len(record) - 9
    pos = 9 + 2 + 32
    pos += 1 + record[pos]  # session id
    pos += 2 + struct.unpack_from("!H", record, pos)[0]  # cipher suites
    pos += 1 + record[pos]  # compression methods
    (ext_total,) = struct.unpack_from("!H", record, pos)
    pos += 2
    assert pos + ext_total == len(record)
    sni = None
    while pos < len(record):
        ext_type, ext_len = struct.unpack_from("!HH", record, pos)
        if ext_type == 0:
            list_len, name_type, name_len = struct.unpack_from("!HBH", record, pos + 4)
            assert (list_len, name_type, ext_len) == (name_len + 3, 0, name_len + 5)
            sni = record[pos + 9:pos + 9 + name_len]
        pos += 4 + ext_len
    assert pos == len(record)
    return sni


def test_client_hello_lengths_are_consistent():
    for name in ("www.example.com", "x.io", "a-much-longer-name.cdn.example.net"):
        assert _sni_by_hand(tls_client_hello(name)) == name.encode()


def test_client_hello_parses_with_scapy_tls():
    pytest.importorskip("cryptography", reason="Scapy's TLS layer needs cryptography")
    from scapy.layers.tls.all import TLS
    from scapy.layers.tls.extensions import TLS_Ext_ServerName, TLS_Ext_SupportedVersion_CH
    from scapy.layers.tls.handshake import TLSClientHello

    record = TLS(tls_client_hello("www.example.com"))
    assert record.type == 22 and record.len == len(record.original) - 5
    hello = record.msg[0]
    assert isinstance(hello, TLSClientHello)
    assert hello.version == 0x0303 and len(hello.sid) == 32
    sni = hello.getlayer(TLS_Ext_ServerName)
    assert [s.servername for s in sni.servernames] == [b"www.example.com"]
    assert 0x0304 in hello.getlayer(TLS_Ext_SupportedVersion_CH).versions
    alert = TLS(TLS_ALERT_HANDSHAKE_FAILURE)
    assert alert.type == 21


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_quic_initial_decrypts_in_tshark(tmp_path):
    """tshark, an independent reader, removes the protection with the DCID's Initial keys and
    reads the ClientHello inside."""
    from scapy.all import IP, UDP, Ether, wrpcap

    datagram = quic_initial("video.example.net", dcid=bytes.fromhex("0011223344556677"))
    assert len(datagram) == 1200
    path = tmp_path / "initial.pcap"
    wrpcap(str(path), [Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=50000, dport=443)
                       / datagram])
    fields = ["quic.version", "quic.long.packet_type", "quic.dcid",
              "tls.handshake.extensions_server_name", "tls.handshake.extensions_alpn_str"]
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields",
                          *[arg for f in fields for arg in ("-e", f)]],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().split("\t") == ["0x00000001", "0", "0011223344556677",
                                        "video.example.net", "h3"]
    inspector = FlowInspector(17, 50000, 443)
    inspector.feed(datagram, True, None)
    assert (inspector.app, inspector.guess, inspector.server_name) == ("QUIC", False,
                                                                       "video.example.net")
    assert inspector.fingerprint.startswith("q13d") and inspector.fingerprint[8:10] == "h3"


def test_http_get_has_host_header():
    request = http_get("api.example.org", "/v1")
    assert request.startswith(b"GET /v1 HTTP/1.1\r\nHost: api.example.org\r\n")
    assert request.endswith(b"\r\n\r\n") and b"keep-alive" in request


# --- the command -----------------------------------------------------------------------------

def generator(env: dict[str, str], timeout: float = 60, **popen) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "traffic_generator"], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout, **popen)


def final_fields(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("final ")
    return dict(item.split("=", 1) for item in last.split()[1:])


@pytest.mark.parametrize("env, variable", [
    ({"RATE_PER_SECOND": "0"}, "RATE_PER_SECOND"),
    ({"RATE_PER_SECOND": "5000000"}, "RATE_PER_SECOND"),
    ({"PAYLOAD_SIZE": "70000"}, "PAYLOAD_SIZE"),
    ({"PAYLOAD_SIZE": "-1"}, "PAYLOAD_SIZE"),
    ({"MODE": "tcp"}, "MODE"),
    ({"TARGET_PORT": "0"}, "TARGET_PORT"),
    ({"COUNT": "many"}, "COUNT"),
])
def test_bad_settings_stop_with_one_line(env, variable):
    done = generator(env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("traffic_generator: invalid configuration: ")
    assert variable in lines[0]
    assert done.stdout == ""


def test_unresolvable_target_stops_with_one_line():
    done = generator({"TARGET_HOST": "no-such-host.invalid", "COUNT": "10"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "TARGET_HOST 'no-such-host.invalid' does not resolve" in lines[0]


def test_defaults(monkeypatch):
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    s = GeneratorSettings()
    assert (s.rate_per_second, s.payload_size, s.target_host, s.target_port, s.mode) == (
        5000, 1300, "127.0.0.1", 9999, "udp")
    assert (s.count, s.duration_s, s.report_interval_s) == (0, 0, 5.0)
    assert all(info.description for info in GeneratorSettings.model_fields.values())


def test_help_lists_the_environment():
    done = subprocess.run([sys.executable, "-m", "traffic_generator", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert all(name in done.stdout for name in SETTINGS_ENV)


class UdpSink:
    """Counts datagrams (and their sizes) arriving on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.sizes: dict[int, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._count, daemon=True)
        self.thread.start()

    def _count(self) -> None:
        buffer = bytearray(65536)
        while True:
            try:
                n = self.sock.recv_into(buffer)
            except TimeoutError:
                if self.done.is_set():
                    return
                continue
            self.sizes[n] = self.sizes.get(n, 0) + 1

    def close(self) -> dict[int, int]:
        self.done.set()
        self.thread.join(timeout=10)
        self.sock.close()
        return self.sizes


@pytest.mark.timeout(60)
def test_udp_mode_delivers_count_datagrams_of_payload_size():
    sink = UdpSink()
    done = generator({"MODE": "udp", "COUNT": "2000", "PAYLOAD_SIZE": "700",
                      "TARGET_PORT": str(sink.port), "RATE_PER_SECOND": "10000"})
    sizes = sink.close()
    assert done.returncode == 0, done.stderr
    assert sizes == {700: 2000}
    fields = final_fields(done.stdout)
    assert (fields["sent"], fields["errors"], fields["target"]) == ("2000", "0", "10000")
    assert 0.1 < float(fields["seconds"]) < 5


class IcmpUnreachables:
    """Counts ICMP port-unreachable messages about UDP datagrams sent to 127.0.0.1:`port`, read
    from a raw ICMP socket (root or CAP_NET_RAW; `available` is False without)."""

    def __init__(self, port: int) -> None:
        self.port, self.count = port, 0
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except PermissionError:
            self.sock = None
            return
        self.sock.settimeout(0.05)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._count, daemon=True)
        self.thread.start()

    @property
    def available(self) -> bool:
        return self.sock is not None

    def _count(self) -> None:
        while not self.done.is_set():
            try:
                packet = self.sock.recv(65536)
            except TimeoutError:
                continue
            ihl = (packet[0] & 0x0F) * 4
            icmp_type, code = packet[ihl], packet[ihl + 1]
            inner = packet[ihl + 8:]  # the offending datagram's IP header and 8 bytes after it
            if icmp_type != 3 or code != 3 or len(inner) < 28 or inner[9] != socket.IPPROTO_UDP:
                continue
            inner_ihl = (inner[0] & 0x0F) * 4
            dport = struct.unpack_from("!H", inner, inner_ihl + 2)[0]
            if inner[16:20] == bytes((127, 0, 0, 1)) and dport == self.port:
                self.count += 1

    def close(self) -> int:
        if self.sock is not None:
            time.sleep(0.3)  # the last replies are in flight
            self.done.set()
            self.thread.join(timeout=10)
            self.sock.close()
        return self.count


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(60)
def test_udp_mode_default_target_gets_a_listener():
    """The defaults (127.0.0.1, a port nobody listens on): the generator receives its own
    datagrams, so no send fails and the kernel sends no ICMP port unreachable (which would
    double the frames every test and demo sees)."""
    port = _free_udp_port()
    icmp = IcmpUnreachables(port)
    done = generator({"COUNT": "3000", "RATE_PER_SECOND": "10000", "TARGET_PORT": str(port)})
    unreachables = icmp.close()
    assert done.returncode == 0, done.stderr
    fields = final_fields(done.stdout)
    assert (fields["sent"], fields["errors"]) == ("3000", "0")
    assert f"to 127.0.0.1:{port} from 8 flows (received by a sink of ours)" in done.stderr
    assert "send failed" not in done.stderr
    if icmp.available:
        assert unreachables == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))  # the sink is gone with the generator


@pytest.mark.timeout(60)
def test_udp_mode_leaves_a_taken_port_to_its_owner():
    sink = UdpSink()  # already bound: the generator must not (and cannot) listen there
    done = generator({"COUNT": "500", "RATE_PER_SECOND": "10000", "TARGET_PORT": str(sink.port)})
    sizes = sink.close()
    assert done.returncode == 0, done.stderr
    assert sizes == {1300: 500}
    assert "sink of ours" not in done.stderr


@pytest.mark.timeout(60)
def test_udp_mode_counts_refused_sends():
    """A port held by a socket that takes datagrams from one peer only: every other sender draws
    ICMP port unreachable (seen by the sniffer when root: it works) and ECONNREFUSED."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    holder.connect(("127.0.0.1", 9))  # receives from 127.0.0.1:9 only
    port = holder.getsockname()[1]
    icmp = IcmpUnreachables(port)
    try:
        done = generator({"COUNT": "200", "TARGET_PORT": str(port), "RATE_PER_SECOND": "2000"})
    finally:
        unreachables = icmp.close()
        holder.close()
    assert done.returncode == 0, done.stderr
    fields = final_fields(done.stdout)
    assert int(fields["errors"]) > 0
    assert int(fields["sent"]) + int(fields["errors"]) == 200
    assert done.stderr.count("Connection refused") == 1  # logged once, not per packet
    if icmp.available:
        assert unreachables >= int(fields["sent"]) // 2


@pytest.mark.timeout(60)
def test_mix_mode_counts_add_up():
    done = generator({"MODE": "mix", "COUNT": "300", "RATE_PER_SECOND": "3000"})
    assert done.returncode == 0, done.stderr
    fields = final_fields(done.stdout)
    kinds = {k: int(fields[k]) for k in ("dns", "http", "tls")}
    assert sum(kinds.values()) == 300 == int(fields["sent"])
    assert fields["errors"] == "0"
    assert all(n > 0 for n in kinds.values()), kinds


@pytest.mark.timeout(60)
def test_sigterm_stops_with_final_line():
    full = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    sink = UdpSink()
    full.update({"TARGET_PORT": str(sink.port), "RATE_PER_SECOND": "1000"})
    proc = subprocess.Popen([sys.executable, "-m", "traffic_generator"], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=10)
    sink.close()
    assert proc.returncode == 0, stderr
    assert int(final_fields(stdout)["sent"]) > 0
