"""local_stack up's port choice: a free port is used, a taken one is named (or, when allowed,
replaced by a free one), before any server starts."""

from __future__ import annotations

import socket

import pytest

from local_stack.__main__ import choose_port
from local_stack.services import ServiceError, port_free


@pytest.fixture
def taken_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_free_port_is_kept():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert port_free(port)
    assert choose_port("redis", port, any_if_taken=False) == port
    assert choose_port("redis", None, any_if_taken=False) is None  # 0 / None: any free port


def test_a_taken_port_is_named_with_the_way_to_choose_another(taken_port):
    assert not port_free(taken_port)
    with pytest.raises(ServiceError) as err:
        choose_port("kafka", taken_port, any_if_taken=False)
    assert str(err.value) == (f"kafka: port {taken_port} on 127.0.0.1 is taken by another "
                              "program; choose another with KAFKA_PORT=N or --kafka-port N "
                              "(0: any free port)")


def test_a_taken_default_port_gives_way_to_a_free_one(taken_port, capsys):
    assert choose_port("redis", taken_port, any_if_taken=True) is None
    assert capsys.readouterr().err == (
        f"redis: port {taken_port} on 127.0.0.1 is taken; using a free port instead "
        "(REDIS_PORT=N or --redis-port N chooses one)\n")


def test_redis_user_urls_carry_each_users_password():
    from local_stack.__main__ import user_urls

    lines = user_urls("redis://127.0.0.1:6390/0",
                      {"admin": "a1", "processor": "p2", "grafana": "g3"})
    assert lines == ["REDIS_URL=redis://processor:p2@127.0.0.1:6390/0",
                     "REDIS_READER_URL=redis://grafana:g3@127.0.0.1:6390/0",
                     "REDIS_ADMIN_URL=redis://admin:a1@127.0.0.1:6390/0"]
