"""Helpers for integration tests: run the real services as subprocesses, read Redis back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPV6", "OTHER")


@dataclass
class Stack:
    """Addresses of the real broker and Redis used by the tests."""

    kafka: str
    redis_url: str  # without a database number
    databases: int = 16

    def env(self, db: int, **extra: str) -> dict[str, str]:
        """Environment for one isolated pipeline: own topic, group and Redis database."""
        tag = uuid.uuid4().hex[:10]
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.kafka,
            KAFKA_TOPIC=f"test.{tag}",
            KAFKA_GROUP_ID=f"group-{tag}",
            REDIS_URL=f"{self.redis_url}/{db}",
            STATS_INTERVAL_S="60",
            PYTHONPATH=str(REPO),
        )
        env.update(extra)
        return env


def compose_config(tmp_path: Path) -> dict:
    """docker-compose.yml resolved as compose starts it when nothing is set: no .env file (an
    empty --env-file instead), no variables but PATH and an empty HOME."""
    compose = Path(sys.executable).parent / "docker-compose"
    assert compose.is_file(), f"{compose} is missing: make install puts it in the venv"
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run(
        [str(compose), "-f", str(REPO / "docker-compose.yml"), "--env-file", str(empty),
         "config", "--format", "json"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_module(module: str, env: dict, *args: str, timeout: float = 180,
               check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def replay(pcap: str | Path, env: dict, idle: float = 1.0) -> None:
    """capture --pcap FILE, then flow_processor --exit-when-idle: the documented replay."""
    run_module("capture", env, "--pcap", str(pcap))
    run_module("flow_processor", env, "--exit-when-idle", str(idle))


@dataclass
class PipelineState:
    """What the pipeline left in Redis, in the shapes the expectations use."""

    per_second: dict[int, tuple[int, int]] = field(default_factory=dict)  # sec -> (pkts, bytes)
    per_proto: dict[str, tuple[int, int]] = field(default_factory=dict)  # PROTO -> (pkts, bytes)
    flows: dict[tuple, dict] = field(default_factory=dict)  # (proto, ep_a, ep_b) -> meta hash
    top: dict[str, float] = field(default_factory=dict)  # flows:top:bytes
    per_app: dict[str, tuple[int, int]] = field(default_factory=dict)  # APP -> (pkts, bytes)
    top_apps: dict[str, float] = field(default_factory=dict)
    top_hosts: dict[str, float] = field(default_factory=dict)
    top_domains: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # pipeline:processor


def _series(r: redis.Redis, key: str) -> dict[int, int]:
    try:
        samples = r.execute_command("TS.RANGE", key, "-", "+")
    except redis.ResponseError:
        return {}
    return {int(ts) // 1000: int(float(value)) for ts, value in samples}


def read_state(redis_url: str) -> PipelineState:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    state = PipelineState()
    bps, pps = _series(r, "ts:global:bps"), _series(r, "ts:global:pps")
    state.per_second = {sec: (pps.get(sec, 0), bps.get(sec, 0)) for sec in set(bps) | set(pps)}
    for proto in PROTOCOLS:
        b = sum(_series(r, f"ts:protocol:{proto}:bps").values())
        p = sum(_series(r, f"ts:protocol:{proto}:pps").values())
        if b or p:
            state.per_proto[proto] = (p, b)
    for key in r.scan_iter("flow:*:meta", count=1000):
        meta = r.hgetall(key)
        meta["id"] = key.split(":")[1]
        ends = sorted([(meta["src"], int(meta["sport"])), (meta["dst"], int(meta["dport"]))])
        state.flows[(int(meta["proto"]), ends[0], ends[1])] = meta
    state.top = dict(r.zrange("flows:top:bytes", 0, -1, withscores=True))
    state.top_apps = dict(r.zrange("apps:top:bytes", 0, -1, withscores=True))
    state.top_hosts = dict(r.zrange("hosts:top:bytes", 0, -1, withscores=True))
    state.top_domains = dict(r.zrange("domains:top:bytes", 0, -1, withscores=True))
    for key in r.scan_iter("ts:app:*:bps"):
        app = key.split(":")[2]
        b = sum(_series(r, key).values())
        p = sum(_series(r, f"ts:app:{app}:pps").values())
        if b or p:
            state.per_app[app] = (p, b)
    state.counters = {k: int(v) for k, v in r.hgetall("pipeline:processor").items()}
    return state


def flow_totals(state: PipelineState) -> dict[tuple, tuple[int, int, tuple[str, int]]]:
    """(proto, ep_a, ep_b) -> (packets, bytes, initiator) as the pipeline stored them."""
    return {
        key: (int(m["packets"]), int(m["bytes"]), (m["src"], int(m["sport"])))
        for key, m in state.flows.items()
    }


def sum_per_second(state: PipelineState) -> Counter:
    total = Counter()
    for packets, size in state.per_second.values():
        total["packets"] += packets
        total["bytes"] += size
    return total
