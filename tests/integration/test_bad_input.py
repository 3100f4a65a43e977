"""Bad input never crashes a service and is never dropped silently: bad capture files, garbage
on the topic, invalid configuration, and servers that are not there."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka import Consumer, Producer

from packet_records import RECORD, encode_batch
from tests.captures import write_bad_files
from tests.pipeline import read_state, run_module

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return write_bad_files(tmp_path_factory.mktemp("bad"))


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("name", ["empty", "random_bytes", "short_header"])
def test_unreadable_capture_file_is_one_clear_error(name, bad_files, pipeline_env):
    proc = run_module("capture", pipeline_env, "--pcap", str(bad_files[name]), check=False)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("capture: ")


def test_missing_capture_file_is_one_clear_error(pipeline_env, tmp_path):
    proc = run_module("capture", pipeline_env, "--pcap", str(tmp_path / "nope.pcap"), check=False)
    assert proc.returncode == 2
    assert "No such file" in one_line(proc.stderr)


def test_file_cut_short_sends_what_it_read_then_fails(bad_files, pipeline_env):
    proc = run_module("capture", pipeline_env, "--pcap", str(bad_files["cut_last_record"]),
                      check=False)
    assert proc.returncode == 1
    assert "cut short" in proc.stderr.splitlines()[-1]
    run_module("flow_processor", pipeline_env, "--exit-when-idle", "1")
    state = read_state(pipeline_env["REDIS_URL"])
    assert sum(p for p, _ in state.per_second.values()) == 2  # tshark reads 2 packets too


def test_unknown_link_type_counts_frames_as_other(bad_files, pipeline_env):
    proc = run_module("capture", pipeline_env, "--pcap", str(bad_files["unknown_linktype"]))
    assert "link type 147 is not supported" in proc.stderr
    run_module("flow_processor", pipeline_env, "--exit-when-idle", "1")
    state = read_state(pipeline_env["REDIS_URL"])
    total = sum(p for p, _ in state.per_second.values())
    assert total > 0
    assert state.per_proto == {"OTHER": (total, sum(b for _, b in state.per_second.values()))}
    assert state.counters["malformed_frames"] == total


def test_garbage_on_the_topic_is_counted_and_set_aside(pipeline_env):
    topic = pipeline_env["KAFKA_TOPIC"]
    bootstrap = pipeline_env["KAFKA_BOOTSTRAP_SERVERS"]
    run_module("packet_records.topics", pipeline_env)
    good = RECORD.pack(1_700_000_000_123_000_000, 100, 4, 17, 0, 0, 1000, 53,
                       bytes([192, 0, 2, 1]) + bytes(12), bytes([192, 0, 2, 2]) + bytes(12),
                       0, 0, 0)
    valid = encode_batch([good, good], replay=True)
    garbage = [b"", b"hello", b'{"json": true}', valid[:-3], b"DPIR\x09\x00\x01\x00",
               valid + b"trailing"]
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in [valid, *garbage, valid]:
        producer.produce(topic, value, partition=3)
    assert producer.flush(10) == 0
    run_module("flow_processor", pipeline_env, "--exit-when-idle", "1")
    state = read_state(pipeline_env["REDIS_URL"])
    assert state.per_second == {1_700_000_000: (4, 400)}
    assert state.counters["malformed_messages"] == len(garbage)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-reader",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([f"{topic}.deadletter"])
    aside = []
    for _ in range(60):
        aside += [m for m in consumer.consume(10, timeout=0.5) if m.error() is None]
        if len(aside) >= len(garbage):
            break
    consumer.close()
    assert sorted(m.value() or b"" for m in aside) == sorted(garbage)
    assert all(dict(m.headers())["error"] for m in aside)


@pytest.mark.parametrize("module,variable,value", [
    ("capture", "RECORDS_PER_MESSAGE", "0"),
    ("capture", "KAFKA_COMPRESSION", "brotli"),
    ("capture", "BATCH_INTERVAL_MS", "soon"),
    ("flow_processor", "MAX_POLL_RECORDS", "-5"),
    ("flow_processor", "REDIS_URL", "http://localhost:6379"),
    ("flow_processor", "FLOW_IDLE_TIMEOUT_S", "0"),
])
def test_invalid_configuration_is_one_line_at_start(module, variable, value, pipeline_env):
    env = dict(pipeline_env, **{variable: value})
    proc = run_module(module, env, check=False, timeout=30)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"{module}: invalid configuration: {variable}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broker_absent_at_start_is_one_clear_error(pipeline_env, bad_files, tmp_path):
    from tests.captures import write_captures

    pcap = write_captures(tmp_path)["eth_ipv4"]
    env = dict(pipeline_env, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port()}")
    proc = run_module("capture", env, "--pcap", str(pcap), check=False, timeout=60)
    assert proc.returncode == 2
    assert "not reachable" in proc.stderr.splitlines()[-1]


def test_redis_absent_at_start_is_one_clear_error(pipeline_env):
    env = dict(pipeline_env, REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    proc = run_module("flow_processor", env, check=False, timeout=60)
    assert proc.returncode == 2
    assert "not reachable" in one_line(proc.stderr)


@pytest.mark.parametrize("server", ["kafka", "silent"])
def test_redis_url_that_is_not_redis_is_one_line_within_seconds(server, pipeline_env):
    """REDIS_URL pointing at the Kafka broker, or at a port that accepts and never answers."""
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        if server == "kafka":
            address = pipeline_env["KAFKA_BOOTSTRAP_SERVERS"].split(",")[0]
        else:
            address = f"127.0.0.1:{silent.getsockname()[1]}"
        env = dict(pipeline_env, REDIS_URL=f"redis://{address}/0")
        started = time.monotonic()
        proc = run_module("flow_processor", env, check=False, timeout=60)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith("flow_processor: ") and "Redis" in line, line
    assert took < 15, f"took {took:.1f} s"


def test_processor_help_lists_its_environment(pipeline_env):
    proc = run_module("flow_processor", pipeline_env, "--help")
    for variable in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "FLUSH_INTERVAL_MS",
                     "LIVE_TIME_WINDOW_S", "KAFKA_SASL_USERNAME"):
        assert variable in proc.stdout
