"""Replays of many captures, several pipelines side by side (each with its own topic, group and
Redis database), read back into PipelineState objects for the tests to compare."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.pipeline import PipelineState, read_state, replay

PARALLEL = 4


def replay_all(stack, databases, paths: dict[str, Path]) -> dict[str, PipelineState]:
    def one(item):
        name, path = item
        db = databases.take()
        try:
            env = stack.env(db)
            replay(path, env)
            return name, read_state(env["REDIS_URL"])
        finally:
            databases.give(db)

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(pool.map(one, sorted(paths.items())))


@pytest.fixture(scope="session")
def corpus_states(stack, databases, corpus_dir) -> dict[str, PipelineState]:
    pcaps = {p.name: p for p in sorted(Path(corpus_dir, "pcap").iterdir())}
    return replay_all(stack, databases, pcaps)


@pytest.fixture(scope="session")
def crafted_files(tmp_path_factory) -> dict[str, Path]:
    from tests.captures import write_captures

    return write_captures(tmp_path_factory.mktemp("crafted"))


@pytest.fixture(scope="session")
def crafted_states(stack, databases, crafted_files) -> dict[str, PipelineState]:
    return replay_all(stack, databases, crafted_files)


@pytest.fixture
def receiver():
    """A UDP listener on 127.0.0.1 for live tests, so the kernel answers no ICMP unreachables."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    yield sock
    sock.close()
