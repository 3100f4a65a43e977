"""Capture as docker-compose.yml starts it, and every way it can fail at start: one clear line and
exit 2 for a bad filter, a directory or a compressed file, a broker that is not there, an
out-of-range setting; --help that lists the environment and touches nothing."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from capture.counters import CaptureCounters
from capture.pcapfile import read_frames
from capture.producer import RecordProducer
from capture.settings import CaptureSettings
from packet_records import RECORD, encode_batch
from packet_records.topics import ensure_topics
from tests.captures import write_captures
from tests.pipeline import REPO, compose_config, read_state, run_module

pytestmark = pytest.mark.integration

SENT = 2000
PAYLOAD = 64


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("live capture needs root or CAP_NET_RAW (make test runs as root here)")


def compose_capture_env(tmp_path: Path) -> dict[str, str]:
    """The environment docker-compose.yml gives the capture service when nothing is set."""
    environment = compose_config(tmp_path)["services"]["capture"]["environment"]
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def start_capture(env: dict, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as fh:
        capture = subprocess.Popen([sys.executable, "-m", "capture", *args], env=env, cwd=REPO,
                                   stderr=fh)
    deadline = time.monotonic() + 60
    while "capturing from" not in log.read_text():
        assert capture.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "capture did not start"
        time.sleep(0.1)
    return capture


def stop_capture(capture: subprocess.Popen, log: Path) -> str:
    """SIGTERM, as compose stops it; the final summary line."""
    capture.send_signal(signal.SIGTERM)
    assert capture.wait(60) == 0, log.read_text()[-3000:]
    return log.read_text().splitlines()[-1]


# ----------------------------------------------------------------------------- compose defaults
@pytest.mark.live
def test_capture_starts_with_compose_defaults_and_counts_every_packet(pipeline_env, tmp_path):
    need_root()
    compose = compose_capture_env(tmp_path)
    assert compose["IFACE"] == "" and compose["BPF_FILTER"], compose  # the case that once failed
    env = dict(compose, PATH=os.environ["PATH"])
    # Replaced: the broker's address (compose's localhost:29092 is not this test's broker), and
    # the topic, so that this test's processor reads only what this capture produced.
    env["KAFKA_BOOTSTRAP_SERVERS"] = pipeline_env["KAFKA_BOOTSTRAP_SERVERS"]
    env["KAFKA_TOPIC"] = pipeline_env["KAFKA_TOPIC"]
    # The test broker speaks plain text: compose's credentials for its own broker do not apply.
    for key in [k for k in env if k.startswith(("KAFKA_SECURITY_", "KAFKA_SASL_", "KAFKA_SSL_"))]:
        del env[key]
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))  # a listener, so the kernel answers no ICMP unreachables
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    port = receiver.getsockname()[1]  # unique: other traffic on this machine is another flow
    log = tmp_path / "capture.log"
    capture = start_capture(env, log)
    assert "capturing from every interface" in log.read_text()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i in range(SENT):
                sender.sendto(bytes(PAYLOAD), ("127.0.0.1", port))
                if i % 200 == 199:
                    time.sleep(0.01)  # stay well inside the socket buffers
        time.sleep(1.0)
    finally:
        final = stop_capture(capture, log)
        receiver.close()
    run_module("flow_processor", pipeline_env, "--exit-when-idle", "1")
    state = read_state(pipeline_env["REDIS_URL"])
    ours = [m for m in state.flows.values()
            if m["proto"] == "17" and m["dst"] == "127.0.0.1" and int(m["dport"]) == port]
    assert len(ours) == 1, (final, ours)
    wire = 14 + 20 + 8 + PAYLOAD  # Ethernet header on lo + IPv4 + UDP + payload
    assert (int(ours[0]["packets"]), int(ours[0]["bytes"])) == (SENT, SENT * wire), final


@pytest.mark.live
@pytest.mark.parametrize("iface", ["", "lo"])
def test_invalid_bpf_filter_is_one_line_naming_it_and_why(iface, pipeline_env):
    need_root()
    bad = "not (tcp port 9092 or"
    env = dict(pipeline_env, IFACE=iface, BPF_FILTER=bad,
               KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")  # fails before the broker
    proc = run_module("capture", env, check=False, timeout=60)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (f"capture: invalid BPF_FILTER {bad!r}: "
                                     "can't parse filter expression: syntax error")


# ----------------------------------------------------------------------------- files
def test_pcap_directory_is_one_line(pipeline_env, tmp_path):
    env = dict(pipeline_env, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")
    proc = run_module("capture", env, "--pcap", str(tmp_path), check=False, timeout=60)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (f"capture: {tmp_path} is a directory: give one pcap or "
                                     "pcapng file")


def test_gzip_capture_is_one_line_saying_to_decompress_it(pipeline_env, tmp_path):
    pcap = write_captures(tmp_path)["eth_ipv4"]
    packed = tmp_path / "eth_ipv4.pcap.gz"
    packed.write_bytes(gzip.compress(pcap.read_bytes()))
    env = dict(pipeline_env, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")
    proc = run_module("capture", env, "--pcap", str(packed), check=False, timeout=60)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"capture: {packed} is gzip-compressed: decompress it first "
                           f"(gunzip {packed})"), line


def test_compressed_capture_streamed_through_stdin_is_replayed(pipeline_env, tmp_path):
    """What the gzip message suggests: zcat FILE | python -m capture --pcap /dev/stdin."""
    pcap = write_captures(tmp_path)["eth_ipv4"]
    frames = sum(1 for _ in read_frames(pcap))
    proc = subprocess.run([sys.executable, "-m", "capture", "--pcap", "/dev/stdin"],
                          env=pipeline_env, cwd=REPO, input=pcap.read_bytes(),
                          capture_output=True, timeout=120)  # input=: stdin is a pipe
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert f"records_produced={frames} " in stderr.splitlines()[-1]


# ----------------------------------------------------------------------------- the reader process
# `--pcap` reads and decodes the file in a second process: it must stop with capture, and its
# death must end capture with one line, not a hang or a traceback.
def endless_stream(tmp_path: Path) -> tuple[Path, threading.Thread, list[int]]:
    """A named pipe fed a pcap that never ends (the same frames over and over) until its
    reader goes; returns the pipe, the feeding thread and [frames written]."""
    fifo = tmp_path / "stream.pcap"
    os.mkfifo(fifo)
    pcap = write_captures(tmp_path)["eth_ipv4"].read_bytes()
    head, records = pcap[:24], pcap[24:] * 50
    count = sum(1 for _ in read_frames(write_captures(tmp_path)["eth_ipv4"])) * 50
    written = [0]

    def feed() -> None:
        try:
            with open(fifo, "wb") as out:
                out.write(head)
                while True:
                    out.write(records)
                    written[0] += count
        except (BrokenPipeError, OSError):
            pass  # capture has gone

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return fifo, thread, written


def child_pids(pid: int) -> set[int]:
    children = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            children.update(int(child) for child in fh.read().split())
    return children


def final_counts(stderr: str) -> tuple[int, int]:
    final = next(line for line in reversed(stderr.splitlines()) if "final frames=" in line)
    return (int(final.split("final frames=")[1].split()[0]),
            int(final.split("records_produced=")[1].split()[0]))


def test_a_replay_stopped_midway_stops_its_reader_and_delivers_what_it_read(pipeline_env,
                                                                          tmp_path):
    fifo, feeder, written = endless_stream(tmp_path)
    log = tmp_path / "capture.log"
    capture = start_capture(pipeline_env, log, "--pcap", str(fifo))
    readers = child_pids(capture.pid)
    assert len(readers) == 1
    while written[0] < 20_000:  # well into the stream
        time.sleep(0.05)
    stop_capture(capture, log)
    frames, produced = final_counts(log.read_text())
    assert 0 < frames == produced
    for pid in readers:
        assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped
    feeder.join(10)
    assert not feeder.is_alive()


def test_a_reader_process_killed_ends_capture_with_one_line(pipeline_env, tmp_path):
    fifo, feeder, written = endless_stream(tmp_path)
    log = tmp_path / "capture.log"
    capture = start_capture(pipeline_env, log, "--pcap", str(fifo))
    (reader,) = child_pids(capture.pid)
    while written[0] < 20_000:
        time.sleep(0.05)
    os.kill(reader, signal.SIGKILL)
    assert capture.wait(60) == 1
    stderr = log.read_text()
    assert stderr.splitlines()[-1] == (f"capture: {fifo}: the process reading it ended (killed "
                                       "by signal 9) before the end of the file")
    assert "Traceback" not in stderr
    frames, produced = final_counts(stderr)
    assert 0 < frames == produced  # what was read before is delivered
    feeder.join(10)


# ----------------------------------------------------------------------------- --help
def test_topics_help_prints_help_and_creates_nothing(pipeline_env):
    topic = pipeline_env["KAFKA_TOPIC"]
    proc = run_module("packet_records.topics", pipeline_env, "--help", timeout=60)
    assert "usage: python -m packet_records.topics" in proc.stdout
    assert "environment variables:" in proc.stdout and "KAFKA_TOPIC" in proc.stdout
    admin = AdminClient({"bootstrap.servers": pipeline_env["KAFKA_BOOTSTRAP_SERVERS"]})
    assert not {topic, f"{topic}.deadletter"} & set(admin.list_topics(timeout=15).topics)
    # and it needs no broker at all
    env = dict(pipeline_env, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")
    proc = run_module("packet_records.topics", env, "--help", timeout=10)
    assert proc.stderr == "" and "environment variables:" in proc.stdout


def test_capture_help_lists_its_environment_variables(pipeline_env):
    env = dict(pipeline_env, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")
    proc = run_module("capture", env, "--help", timeout=30)
    assert proc.stdout.startswith("usage: python -m capture")
    help_vars = proc.stdout.split("environment variables:", 1)[1]
    for name in CaptureSettings.model_fields:
        assert f"  {name.upper()} " in help_vars
    assert proc.stderr == ""


# ----------------------------------------------------------------------------- the broker
@pytest.mark.parametrize("live", [False, True], ids=["pcap", "live"])
def test_broker_unreachable_at_start_is_one_line(live, pipeline_env, tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    env = dict(pipeline_env, KAFKA_BOOTSTRAP_SERVERS=address, IFACE="lo", BPF_FILTER="udp")
    if live:
        need_root()
        args = []
    else:
        args = ["--pcap", str(write_captures(tmp_path)["eth_ipv4"])]
    proc = run_module("capture", env, *args, check=False, timeout=60)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        f"capture: Kafka broker at {address} not reachable (Connect to ipv4#{address} failed: "
        "Connection refused); check KAFKA_BOOTSTRAP_SERVERS")


def test_a_message_the_producer_refuses_is_counted_and_capture_goes_on(pipeline_env):
    """produce() raises for a partition the topic does not have: counted, not a traceback."""
    settings = CaptureSettings(kafka_bootstrap_servers=pipeline_env["KAFKA_BOOTSTRAP_SERVERS"],
                               kafka_topic=pipeline_env["KAFKA_TOPIC"])
    partitions = ensure_topics(settings.kafka_bootstrap_servers, settings.kafka_topic)
    counters = CaptureCounters()
    producer = RecordProducer(settings, counters, block=True)
    record = RECORD.pack(time.time_ns(), 100, 4, 17, 0, 0, 1000, 53, bytes(16), bytes(16),
                         0, 0, 0xFFFF)
    assert producer.send(0, encode_batch([record]), 1)
    assert producer.close(timeout=30) == 0  # the producer now knows the topic's partitions
    assert not producer.send(partitions + 5, encode_batch([record, record]), 2)
    assert producer.send(1, encode_batch([record]), 1)
    assert producer.close(timeout=30) == 0
    assert (counters.records_produced, counters.delivery_failed,
            counters.delivery_failed_messages) == (2, 2, 1)


# ----------------------------------------------------------------------------- settings
@pytest.mark.live
def test_largest_socket_buffer_accepted_works(pipeline_env, tmp_path):
    need_root()
    env = dict(pipeline_env, IFACE="lo", BPF_FILTER="udp port 9", SOCKET_BUFFER_MB="1024")
    log = tmp_path / "capture.log"
    final = stop_capture(start_capture(env, log), log)
    assert "kernel_drops=0" in final


def test_socket_buffer_beyond_the_kernel_limit_is_refused_at_start(pipeline_env):
    env = dict(pipeline_env, SOCKET_BUFFER_MB="2048")
    proc = run_module("capture", env, check=False, timeout=30)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(
        "capture: invalid configuration: SOCKET_BUFFER_MB: Input should be less than or equal "
        "to 1024")
