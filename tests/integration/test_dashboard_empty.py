"""The dashboard on first view, before any traffic: every panel query and the $flow variable
run without a Redis error (a red panel in Grafana) and panels show "No data", both on an empty
Redis (Grafana up before the processor) and once the processor has started on an empty
topic."""

from __future__ import annotations

import json

import pytest
import redis

from packet_records import PROTOCOLS
from packet_records.apps import APPS
from tests.integration.dashboard_queries import (
    PanelError,
    dashboard_panels,
    frames_have_data,
    plugin_client,
)
from tests.integration.grafana_model import options_of_variable, panel_frames
from tests.pipeline import REPO, run_module

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "grafana" / "dashboards" / "dpi-realtime.json"
PROCESSOR_COUNTERS = ("records", "malformed_frames", "malformed_messages", "rejected_samples",
                      "write_errors")


def show_dashboard(url: str) -> dict[str, list]:
    """Load the dashboard as Grafana would: the variables, then every panel. Returns
    {"errors": [...], "data": [...]}: panels in red, panels that show something."""
    client = plugin_client(url)
    dashboard = json.loads(DASHBOARD.read_text())
    errors, data, variables = [], [], {}
    for variable in dashboard["templating"]["list"]:
        try:
            options = options_of_variable(client, variable, variables)
        except PanelError as exc:
            errors.append(f"variable ${variable['name']}: {exc}")
            options = []
        variables[variable["name"]] = options[0]["value"] if options else ""
    for panel in dashboard_panels(DASHBOARD):
        if panel.get("type") == "row":
            continue
        try:
            frames = panel_frames(client, panel, variables)
        except PanelError as exc:
            errors.append(f"panel {panel['id']} {panel['title']!r}: {exc}")
            continue
        if frames_have_data(frames):
            data.append(panel["title"])
    return {"errors": errors, "data": data}


@pytest.fixture
def empty_env(stack, databases):
    db = databases.take()
    yield stack.env(db, STATS_INTERVAL_S="1")
    databases.give(db)


def test_empty_redis_shows_no_data_and_no_error(empty_env):
    shown = show_dashboard(empty_env["REDIS_URL"])
    assert not shown["errors"], "\n".join(shown["errors"])
    assert not shown["data"], f"panels with data in an empty Redis: {shown['data']}"


@pytest.fixture
def started_processor(empty_env) -> str:
    """The processor started on an empty topic and an empty Redis, idle until it exits."""
    run_module("flow_processor", empty_env, "--exit-when-idle", "2", timeout=120)
    return empty_env["REDIS_URL"]


def test_no_error_once_the_processor_started_without_traffic(started_processor):
    shown = show_dashboard(started_processor)
    assert not shown["errors"], "\n".join(shown["errors"])
    # zeros of the counters and the lag gauge are worth showing; nothing else has data yet
    unexpected = [t for t in shown["data"]
                  if t not in ("Processor counters", "Consumer lag")]
    assert not unexpected, f"panels with data before any traffic: {unexpected}"


def test_processor_creates_aggregate_series_and_counters_at_start(started_processor):
    """What the processor writes at start so that the overview, protocol and application
    panels show zeros from the first flush and the counters panel shows every counter."""
    r = redis.Redis.from_url(started_processor, decode_responses=True)
    expected = {"ts:global:bps", "ts:global:pps"}
    expected |= {f"ts:protocol:{p}:{m}" for p in PROTOCOLS for m in ("bps", "pps")}
    expected |= {f"ts:app:{a}:{m}" for a in APPS for m in ("bps", "pps")}
    missing = sorted(k for k in expected if not r.exists(k))
    assert not missing, f"series not created at start: {missing}"
    counters = r.hgetall("pipeline:processor")
    assert set(PROCESSOR_COUNTERS) <= set(counters), f"pipeline:processor holds {counters}"
