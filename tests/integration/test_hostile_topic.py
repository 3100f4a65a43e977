"""Anyone who can write to the topic: hostile messages between valid batches never stop a
processor and never change the valid batches' totals; a recreated topic and an emptied Redis
are noticed and handled, not skipped silently."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import zlib

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from packet_records import (
    CHECKSUM,
    HEADER,
    MAGIC,
    RECORD,
    VERSION,
    Record,
    encode_batch,
    encode_stats,
)
from tests.pipeline import REPO, read_state, run_module

pytestmark = pytest.mark.integration

SEC0 = 1_700_000_000
A = socket.inet_aton("192.0.2.1") + bytes(12)
B = socket.inet_aton("198.51.100.2") + bytes(12)


def valid_batch(i: int, records: int = 50) -> bytes:
    """A replayed batch: `records` UDP packets of 100 bytes in second SEC0 + i % 5."""
    rows = [RECORD.pack(*Record((SEC0 + i % 5) * 10**9 + j, 100, 4, 17, 0, 0, 1000 + i % 7, 53,
                                A, B, 1, 0, 0)) for j in range(records)]
    return encode_batch(rows, replay=True)


def signed(body: bytes) -> bytes:
    return body + CHECKSUM.pack(zlib.crc32(body))


def bad_messages() -> list[bytes]:
    rng = random.Random(12)
    good = valid_batch(0, records=3)
    record = Record(SEC0 * 10**9, 100, 4, 17, 0, 0, 1, 2, A, B, 0, 0, 0)

    def batch(rec: Record, replay: bool = True) -> bytes:
        return encode_batch([RECORD.pack(*rec)], replay=replay)

    now_ns = time.time_ns()
    bad = [
        os.urandom(1000),
        b"",
        signed(HEADER.pack(MAGIC, VERSION, 1, 9) + good[HEADER.size:-CHECKSUM.size]),  # count up
        signed(HEADER.pack(MAGIC, VERSION, 1, 1) + good[HEADER.size:-CHECKSUM.size]),  # count down
        signed(good[:-CHECKSUM.size - 2] + b"\x05\x00"),  # meta count that lies
        batch(record._replace(app=200)),
        os.urandom(5 * 1024 * 1024),
        signed(HEADER.pack(MAGIC, VERSION, 1, 65535) + os.urandom(5 * 1024 * 1024)),
        batch(record._replace(ts_ns=10**9), replay=False),  # live, yet from 1970
        batch(record._replace(ts_ns=2**63 - 1)),  # the year 2262
        batch(record._replace(ts_ns=now_ns + 10**9 * 86400 * 365)),  # next year
        batch(record._replace(wire_len=2**32 - 1)),  # 4 GB on the wire
        encode_stats("h", now_ns, {f"capture_c{i}": 1 for i in range(20000)}),
        encode_stats("h", now_ns, {"capture_frames": 2**62}),
        encode_stats("h", now_ns, {"capture_frames\x1b[31m\x00": 1}),
    ]
    real = [valid_batch(i, records=4) for i in range(10)]
    for _ in range(1000):
        flipped = bytearray(rng.choice(real))
        bit = rng.randrange(len(flipped) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad.append(bytes(flipped))
    return bad


def produce(env: dict, values: list[tuple[int, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
                         "message.max.bytes": 16 * 1024 * 1024, "linger.ms": 5})
    for partition, value in values:
        while True:
            try:
                producer.produce(env["KAFKA_TOPIC"], value, partition=partition)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(30) == 0


def start_processor(env: dict, *args: str, log=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flow_processor", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_hostile_messages_never_stop_a_processor_and_valid_totals_stay_exact(pipeline_env,
                                                                              tmp_path):
    run_module("packet_records.topics", pipeline_env)
    bad = bad_messages()
    valid = [valid_batch(i) for i in range(60)]
    rng = random.Random(3)
    stream = [(i % 12, v) for i, v in enumerate(valid)] + [(rng.randrange(12), b) for b in bad]
    rng.shuffle(stream)
    produce(pipeline_env, stream)
    logs = [tmp_path / f"processor{i}.log" for i in range(3)]
    procs = []
    for path in logs:
        with open(path, "w") as fh:
            procs.append(start_processor(pipeline_env, "--exit-when-idle", "3", log=fh))
    try:
        codes = [p.wait(240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0], "\n".join(path.read_text()[-2000:] for path in logs)
    state = read_state(pipeline_env["REDIS_URL"])
    expected = {}
    for i in range(60):
        sec = SEC0 + i % 5
        packets, size = expected.get(sec, (0, 0))
        expected[sec] = (packets + 50, size + 5000)
    assert state.per_second == expected
    assert state.counters["records"] == 60 * 50
    assert state.counters["malformed_messages"] == len(bad)
    r = redis.Redis.from_url(pipeline_env["REDIS_URL"], decode_responses=True)
    health = [k for k in r.scan_iter("ts:health:*")]
    assert len(health) < 20, health  # 20,000 forged counter names created nothing
    set_aside = count_set_aside(pipeline_env)
    assert set_aside == len(bad)


def test_unreadable_messages_transactions_and_forged_counters_stop_nothing(pipeline_env,
                                                                           tmp_path):
    """A compressed message that will not decompress (90 MB of zeros in 3 KB of zstd) is set
    aside and read past, not fetched again forever; the markers of a committed and of an
    aborted transaction do not keep the lag above 0 (--exit-when-idle exits); forged capture
    counters that add up past what HINCRBY takes are refused, and the real count lands."""
    run_module("packet_records.topics", pipeline_env)
    topic, servers = pipeline_env["KAFKA_TOPIC"], pipeline_env["KAFKA_BOOTSTRAP_SERVERS"]
    produce(pipeline_env, [(0, valid_batch(0))])
    bomb = Producer({"bootstrap.servers": servers, "compression.type": "zstd",
                     "message.max.bytes": 10**9})
    bomb.produce(topic, bytes(90_000_000), partition=0)
    assert bomb.flush(30) == 0
    for i, commit in ((1, True), (2, False)):
        tx = Producer({"bootstrap.servers": servers, "transactional.id": f"{topic}-{i}"})
        tx.init_transactions(30)
        tx.begin_transaction()
        tx.produce(topic, valid_batch(i), partition=i)
        tx.commit_transaction(30) if commit else tx.abort_transaction(30)
    now_ns, forged = time.time_ns(), 2**48 - 1
    produce(pipeline_env, [(0, valid_batch(3)), (2, valid_batch(4))]
            + [(3, encode_stats("capture", now_ns, {"capture_frames": 1000}))]
            + [(3, encode_stats("x", now_ns, {"capture_frames": forged}))] * 40)
    log = tmp_path / "processor.log"
    with open(log, "w") as fh:
        proc = start_processor(pipeline_env, "--exit-when-idle", "3", log=fh)
    try:
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    state = read_state(pipeline_env["REDIS_URL"])
    expected = {}
    for i in (0, 1, 3, 4):  # 2 was aborted
        packets, size = expected.get(SEC0 + i % 5, (0, 0))
        expected[SEC0 + i % 5] = (packets + 50, size + 5000)
    assert state.per_second == expected
    assert state.counters.get("write_errors", 0) == 0, log.read_text()[-3000:]
    frames = int(redis.Redis.from_url(pipeline_env["REDIS_URL"]).hget("pipeline:capture",
                                                                       "capture_frames"))
    taken = (frames - 1000) // forged  # whole forged messages, besides the real 1000
    assert frames == 1000 + taken * forged and taken < 40
    assert state.counters["malformed_messages"] == 1 + 40 - taken
    assert count_set_aside(pipeline_env) == 1 + 40 - taken


def count_set_aside(env: dict) -> int:
    consumer = Consumer({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
                         "group.id": f"dlq-{os.getpid()}-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                         "enable.partition.eof": False})
    consumer.subscribe([env["KAFKA_TOPIC"] + ".deadletter"])
    seen = 0
    idle_until = time.monotonic() + 20
    while time.monotonic() < idle_until:
        messages = [m for m in consumer.consume(500, timeout=0.5) if m.error() is None]
        if messages:
            seen += len(messages)
            idle_until = time.monotonic() + 3
    consumer.close()
    return seen


def written(env: dict) -> int:
    r = redis.Redis.from_url(env["REDIS_URL"])
    return int(r.hget("pipeline:processor", "records") or 0)


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_a_recreated_topic_is_detected_and_its_data_counted(pipeline_env, tmp_path):
    env = dict(pipeline_env, STATS_INTERVAL_S="1")
    run_module("packet_records.topics", env)
    produce(env, [(i % 12, valid_batch(i)) for i in range(48)])  # 4 messages per partition
    log = tmp_path / "processor.log"
    fh = open(log, "w")  # noqa: SIM115 - shared by the restarted processor
    procs = [start_processor(env, log=fh)]

    def written_restarting() -> int:
        # librdkafka can crash when a topic is deleted under its consumer (seen with the local
        # broker): restart the processor then, as compose does (restart: on-failure)
        if procs[-1].poll() is not None:
            procs.append(start_processor(env, log=fh))
        return written(env)

    try:
        wait_for(lambda: written(env) == 48 * 50, 60, "the first data in Redis")
        admin = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]})
        for future in admin.delete_topics([env["KAFKA_TOPIC"]]).values():
            future.result()
        time.sleep(1)
        run_module("packet_records.topics", env)
        produce(env, [(i % 12, valid_batch(i)) for i in range(24)])  # 2 per partition
        wait_for(lambda: written_restarting() == 72 * 50, 90, "the new topic's data in Redis")
        time.sleep(3)  # nothing more comes in: no message was counted twice
        assert written_restarting() == 72 * 50
    finally:
        code = stop(procs[-1])
        fh.close()
    assert code == 0, log.read_text()[-3000:]
    counters = read_state(env["REDIS_URL"]).counters
    assert counters["offset_resets"] >= 12, log.read_text()[-3000:]
    assert "earliest offset" in log.read_text()


def test_an_emptied_redis_gets_its_series_back_and_exact(pipeline_env, tmp_path):
    env = dict(pipeline_env, STATS_INTERVAL_S="1")
    run_module("packet_records.topics", env)
    produce(env, [(i % 12, valid_batch(i)) for i in range(24)])
    log = tmp_path / "processor.log"
    with open(log, "w") as fh:
        proc = start_processor(env, log=fh)
    r = redis.Redis.from_url(env["REDIS_URL"])
    try:
        wait_for(lambda: written(env) == 24 * 50, 60, "the data in Redis")
        r.flushdb()
        wait_for(lambda: r.exists("ts:global:pps", "ts:protocol:UDP:bps", "ts:app:DNS:bps") == 3,
                 30, "the aggregate series again")
        wait_for(lambda: written(env) == 24 * 50, 60, "the data in Redis again")
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    state = read_state(env["REDIS_URL"])
    expected = {}
    for i in range(24):
        packets, size = expected.get(SEC0 + i % 5, (0, 0))
        expected[SEC0 + i % 5] = (packets + 50, size + 5000)
    assert state.per_second == expected


@pytest.mark.parametrize("refusal", ["OOM", "MISCONF"])
def test_redis_refusing_writes_pauses_the_processor_then_it_resumes_exactly(
        refusal, pipeline_env, tmp_path):
    run_module("packet_records.topics", pipeline_env)
    admin = redis.Redis.from_url(pipeline_env["REDIS_URL"])
    saved = admin.config_get("maxmemory", "maxmemory-policy", "save", "rdb-key-save-delay",
                             "stop-writes-on-bgsave-error")
    log = tmp_path / "processor.log"
    produce(pipeline_env, [(i % 12, valid_batch(i)) for i in range(12)])
    with open(log, "w") as fh:
        proc = start_processor(pipeline_env, "--exit-when-idle", "2", log=fh)
    try:
        wait_for(lambda: written(pipeline_env) == 12 * 50, 60, "the first data in Redis")
        if refusal == "OOM":
            admin.config_set("maxmemory-policy", "noeviction")
            # below what Redis holds, so its next write is refused whatever the timing
            admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) // 2)
        else:
            fail_a_background_save(admin)
        produce(pipeline_env, [(i % 12, valid_batch(i)) for i in range(12, 36)])
        wait_for(lambda: "cannot take writes" in log.read_text(), 60, "the processor to pause")
        # a flush is several transactions, each with its partitions' offsets: those before
        # the refusal may have landed; nothing more lands while Redis refuses, and the rest
        # comes exactly once
        paused_at = written(pipeline_env)
        time.sleep(3)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert written(pipeline_env) == paused_at
        assert 12 * 50 <= paused_at < 36 * 50 and paused_at % 50 == 0
    finally:
        admin.config_set("maxmemory", saved["maxmemory"])
        admin.config_set("maxmemory-policy", saved["maxmemory-policy"])
        admin.config_set("rdb-key-save-delay", saved["rdb-key-save-delay"])
        if refusal == "MISCONF":
            admin.bgsave()  # a good save lifts the refusal
            wait_for(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "ok", 30,
                     "a good background save")
        admin.config_set("save", saved["save"])
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("cannot take writes") == 1, text[-3000:]  # once per episode
    state = read_state(pipeline_env["REDIS_URL"])
    assert state.counters["records"] == 36 * 50
    assert sum(p for p, _ in state.per_second.values()) == 36 * 50


def fail_a_background_save(admin: redis.Redis) -> None:
    """Make Redis refuse writes with MISCONF: a background save that dies, while saving is
    configured and stop-writes-on-bgsave-error is on (its default)."""
    admin.config_set("stop-writes-on-bgsave-error", "yes")
    admin.config_set("save", "3600 1")
    admin.config_set("rdb-key-save-delay", 1_000_000)  # the child takes ages per key
    admin.set("pipeline:test:filler", "x")
    admin.bgsave()
    pid = admin.info("server")["process_id"]
    wait_for(lambda: children(pid), 10, "the save child")
    for child in children(pid):
        os.kill(child, 9)
    wait_for(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err", 10,
             "the failed save")
    with pytest.raises(redis.ResponseError, match="MISCONF"):
        admin.set("pipeline:test:filler", "y")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def test_reset_data_starts_the_figures_from_zero_without_reading_the_topic_again(pipeline_env):
    run_module("packet_records.topics", pipeline_env)
    produce(pipeline_env, [(i % 12, valid_batch(i)) for i in range(12)])
    run_module("flow_processor", pipeline_env, "--exit-when-idle", "1")
    assert written(pipeline_env) == 12 * 50
    proc = run_module("flow_processor", pipeline_env, "--reset-data")
    assert "offsets kept" in proc.stdout
    assert read_state(pipeline_env["REDIS_URL"]).per_second == {}
    produce(pipeline_env, [(i % 12, valid_batch(i)) for i in range(12)])  # the same replay
    run_module("flow_processor", pipeline_env, "--exit-when-idle", "1")
    state = read_state(pipeline_env["REDIS_URL"])
    assert state.counters["records"] == 12 * 50  # once, not twice
    assert sum(p for p, _ in state.per_second.values()) == 12 * 50
