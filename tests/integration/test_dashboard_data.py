"""Every query of every panel of the Grafana dashboard, as the Redis data source plugin sends
it, against Redis filled by a real end-to-end run (capture -> broker -> processor -> Redis):
each one must return data."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.integration.dashboard_queries import dashboard_targets, redis_command_for
from tests.pipeline import REPO, run_module
from tests.synthetic import write_synthetic_pcap

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "grafana" / "dashboards" / "dpi-realtime.json"


def has_data(command: list, reply) -> bool:
    name = command[0].upper()
    if name == "TS.MRANGE":  # [[key, labels, samples], ...]: some series with samples
        return any(series[2] for series in reply)
    if name == "HMGET":
        return any(value is not None for value in reply)
    return bool(reply)


@pytest.fixture(scope="module")
def filled_redis(stack, databases, tmp_path_factory) -> str:
    """A replay of a capture whose flows open with real DNS, HTTP and TLS payloads; the
    processor reports its lag every second."""
    pcap = write_synthetic_pcap(Path(tmp_path_factory.mktemp("dash")) / "mix.pcap", 20_000,
                                flows=400, seconds=10, real_payloads=True)
    db = databases.take()
    env = stack.env(db, STATS_INTERVAL_S="1")
    run_module("capture", env, "--pcap", str(pcap))
    run_module("flow_processor", env, "--exit-when-idle", "3")
    yield env["REDIS_URL"]
    databases.give(db)


def test_every_panel_query_returns_data(filled_redis):
    r = redis.Redis.from_url(filled_redis, decode_responses=True)
    top_flow = r.zrevrange("flows:top:bytes", 0, 0)[0]
    empty = []
    targets = dashboard_targets(DASHBOARD)
    assert len(targets) >= 20
    for title, panel_id, target in targets:
        command = redis_command_for(target, variables={"flow": top_flow})
        reply = r.execute_command(*command)
        if not has_data(command, reply):
            empty.append(f"panel {panel_id} {title!r}: {' '.join(map(str, command))}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_top_flows_panel_shows_endpoints(filled_redis):
    r = redis.Redis.from_url(filled_redis, decode_responses=True)
    (label, score), = r.zrevrange("flows:top:endpoints", 0, 0, withscores=True)
    fid, bytes_ = r.zrevrange("flows:top:bytes", 0, 0, withscores=True)[0]
    meta = r.hgetall(f"flow:{fid}:meta")
    assert label.endswith(f"({fid})") and score == bytes_ == float(meta["bytes"])
    assert f"{meta['src']}:{meta['sport']}" in label or f"[{meta['src']}]:{meta['sport']}" in label


def test_applications_and_domains_come_from_payloads(filled_redis):
    r = redis.Redis.from_url(filled_redis, decode_responses=True)
    apps = dict(r.zrange("apps:top:bytes", 0, -1, withscores=True))
    assert {"DNS", "HTTP", "TLS"} <= set(apps)
    domains = r.zrange("domains:top:bytes", 0, -1)
    assert any(d.startswith("site") and d.endswith(".example.org") for d in domains)  # SNI
    assert any(d.startswith("www") for d in domains)  # HTTP Host
    assert any(d.startswith("host") for d in domains)  # DNS query name
