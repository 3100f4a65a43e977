"""Delivery guarantees with real processes: kill -9 in the middle of a replay, a rebalance
between two processors, a Redis outage; every count still exact (no frame lost, none twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from packet_records import STATS_MAGIC, decode_batch, decode_stats
from tests.pipeline import REPO, read_state, run_module
from tests.reference import read_capture
from tests.synthetic import write_synthetic_pcap

pytestmark = pytest.mark.integration

PACKETS = 300_000


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory):
    path = write_synthetic_pcap(tmp_path_factory.mktemp("big") / "big.pcap", PACKETS,
                                flows=3000, seconds=30)
    return path, read_capture(path)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_orphans():
    """A failing test must not leave its processors running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start_processor(env: dict, *args: str, log: str = os.devnull) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "flow_processor", *args], env=env,
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=fh)
    STARTED.append(proc)
    return proc


def written_records(env: dict) -> int:
    r = redis.Redis.from_url(env["REDIS_URL"])
    return int(r.hget("pipeline:processor", "records") or 0)


def series_ahead_of_flows(env: dict) -> bool:
    """Has some partition's series part been written past its flow part (flow hashes, top-N
    sets and counters go on a slower cadence)? A restart then reads those messages again for
    the flow part only."""
    r = redis.Redis.from_url(env["REDIS_URL"])
    where = f"{env['KAFKA_GROUP_ID']}:{env['KAFKA_TOPIC']}"
    series = r.mget([f"pipeline:offsets:{where}:{p}" for p in range(12)])
    flows = r.mget([f"pipeline:flow_offsets:{where}:{p}" for p in range(12)])
    return any(s is not None and f is not None and int(s) > int(f)
               for s, f in zip(series, flows))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_exact(env: dict, ref) -> None:
    state = read_state(env["REDIS_URL"])
    assert state.per_second == ref.per_second
    assert state.per_proto == ref.per_proto
    flows = {(k[1], k[2]): (int(m["packets"]), int(m["bytes"])) for k, m in state.flows.items()}
    expected = {(a, b): (c.packets, c.bytes) for (_p, a, b), c in ref.conversations.items()}
    assert flows == expected
    assert state.counters["records"] == ref.total_packets


def slow_env(pipeline_env: dict) -> dict:
    # small polls and frequent flushes: many transactions, so a kill lands between two of them;
    # the flow part every 200 ms, so a kill lands with the series part ahead of it
    return dict(pipeline_env, MAX_POLL_RECORDS="1000", FLUSH_INTERVAL_MS="20",
                FLOW_WRITE_INTERVAL_MS="200")


def test_kill_9_in_the_middle_then_restart_is_exact(pipeline_env, big_capture):
    path, ref = big_capture
    # messages of 100 records, one a poll: the replay lasts long enough to be caught midway
    env = dict(slow_env(pipeline_env), RECORDS_PER_MESSAGE="100", MAX_POLL_RECORDS="100")
    run_module("capture", env, "--pcap", str(path))
    proc = start_processor(env)
    wait_for(lambda: series_ahead_of_flows(env) or proc.poll() is not None, 60,
             "series written past the flows")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    in_series = sum(pkts for pkts, _bytes in read_state(env["REDIS_URL"]).per_second.values())
    assert 0 < in_series, "the kill must land after a first write"
    assert written_records(env) < PACKETS, "the kill must land before the flows are all written"
    run_module("flow_processor", env, "--exit-when-idle", "1")
    assert_exact(env, ref)


def test_rebalance_and_kill_between_two_processors_is_exact(pipeline_env, big_capture, tmp_path):
    path, ref = big_capture
    log = tmp_path / "second.log"
    env = slow_env(pipeline_env)
    run_module("capture", env, "--pcap", str(path))
    first = start_processor(env)
    wait_for(lambda: written_records(env) > 0, 60, "the first processor's writes")
    second = start_processor(env, "--exit-when-idle", "2", log=str(log))  # joins: a rebalance
    wait_for(lambda: "assigned partitions" in log.read_text(), 30, "the second processor's join")
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)  # its partitions go back to the second after the session
    first.wait(10)
    assert second.wait(240) == 0
    assert_exact(env, ref)


def test_redis_outage_pauses_and_resumes_exactly(stack, big_capture, tmp_path):
    """Redis stopped mid-replay (a real server of our own, killed and restarted on the same
    port and data): the processor pauses, retries with backoff, resumes; counts stay exact."""
    from local_stack.services import start_redis

    path, ref = big_capture
    workdir = tmp_path / "redis"
    rds = start_redis(workdir=workdir)
    port = rds.port
    # messages of 100 records, one a poll: the replay lasts long enough for Redis to stop
    # after its first flow write and before its last (read at full speed, a replay's flows
    # can all come in one write, at its end)
    env = dict(slow_env(stack.env(0, REDIS_URL=f"{rds.url}")), RECORDS_PER_MESSAGE="100",
               MAX_POLL_RECORDS="100")
    try:
        run_module("capture", env, "--pcap", str(path))
        log = tmp_path / "processor.log"
        proc = start_processor(env, "--exit-when-idle", "2", log=str(log))
        wait_for(lambda: written_records(env) > 0, 60, "a first write")
        r = redis.Redis.from_url(env["REDIS_URL"])
        r.save()  # keep what was written: the restarted server loads it from disk
        r.shutdown(save=True)
        time.sleep(3)  # the processor keeps failing to write meanwhile
        rds = start_redis(port=port, workdir=workdir)
        assert proc.wait(240) == 0
        assert "paused" in log.read_text()
        assert_exact(env, ref)
    finally:
        rds.stop()


def test_a_replay_ends_with_a_mark_on_every_partition_after_its_records(pipeline_env, tmp_path):
    """capture --pcap sends, after the last records of each partition, a stats message with
    replay_end and no counters: each processor writes its flows once it has read them all
    (without it, after a second with nothing to read)."""
    path = write_synthetic_pcap(tmp_path / "small.pcap", 5000, flows=200, seconds=5)
    run_module("capture", pipeline_env, "--pcap", str(path))
    topic = pipeline_env["KAFKA_TOPIC"]
    consumer = Consumer({"bootstrap.servers": pipeline_env["KAFKA_BOOTSTRAP_SERVERS"],
                         "group.id": "end-mark-reader", "enable.auto.commit": False})
    partitions = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    messages: list[list] = [[] for _ in range(partitions)]
    deadline = time.monotonic() + 60
    while sum(map(len, messages)) < sum(ends) and time.monotonic() < deadline:
        for msg in consumer.consume(100, timeout=0.5):
            if msg.error() is None:
                messages[msg.partition()].append(msg.value())
    consumer.close()
    records = 0
    for values in messages:
        marks = [i for i, value in enumerate(values) if value[:4] == STATS_MAGIC
                 and decode_stats(value)[3]]
        assert marks == [len(values) - 1]  # one, the last
        assert decode_stats(values[-1])[2] == {}  # the counters went with the final stats
        batches = [decode_batch(value)[0] for value in values if value[:4] != STATS_MAGIC]
        assert all(batch.replay for batch in batches)  # (flows are written at the mark)
        records += sum(map(len, batches))
    assert records == 5000
