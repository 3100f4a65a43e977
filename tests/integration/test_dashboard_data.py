"""The Grafana dashboard against Redis filled by a real end-to-end run (capture -> broker ->
processor -> Redis): every panel query as the Redis data source plugin sends it returns data,
the $flow variable lists readable flows whose values are flow ids with keys, every data link
leads to a flow that exists, first/last seen show as dates, and the counters panels show every
counter. Grafana's part (variable regex, transformations, links) is reproduced by
tests/integration/grafana_model.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import redis

from capture.counters import CaptureCounters
from flow_processor import sink
from packet_records import PROTO_NAMES
from tests.integration.dashboard_queries import (
    dashboard_panels,
    frames_have_data,
    plugin_client,
    run_target,
)
from tests.integration.grafana_model import (
    dashboard_variables,
    display_name,
    field_config,
    link_target,
    options_of_variable,
    panel_frames,
    panel_links,
    query_variable_options,
)
from tests.pipeline import REPO, run_module
from tests.synthetic import write_synthetic_pcap

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "grafana" / "dashboards" / "dpi-realtime.json"
FLOW_ID = re.compile(r"[0-9a-f]{16}")
PROCESSOR_COUNTERS = list(sink.PROCESSOR_COUNTERS)
CAPTURE_COUNTERS = list(CaptureCounters.HEALTH.values())


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def variables_of(client, dash: dict) -> dict[str, list[dict]]:
    """name -> options of every variable, as the dashboard's pickers list them."""
    return dashboard_variables(client, dash)


def first_values(options: dict[str, list[dict]]) -> dict[str, str]:
    """What each variable holds on first view: its first option ("" when it has none)."""
    return {name: (opts[0]["value"] if opts else "") for name, opts in options.items()}


def readable_label(meta: dict) -> str:
    def end(addr: str, port: str) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

    proto = PROTO_NAMES.get(int(meta["proto"]), meta["proto"])
    return f"{proto} {end(meta['src'], meta['sport'])} -> {end(meta['dst'], meta['dport'])}"


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
    client = plugin_client(filled_redis)
    variables = first_values(variables_of(client, dashboard()))
    assert variables["flow"], "the $flow variable has no option after a run"
    empty, count = [], 0
    for panel in dashboard_panels(DASHBOARD):
        for target in panel.get("targets") or []:
            count += 1
            if not frames_have_data(run_target(client, target, variables)):
                empty.append(f"panel {panel['id']} {panel['title']!r} target {target['refId']}")
    assert count >= 20
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_flow_variable_shows_readable_flows_and_holds_their_ids(filled_redis):
    client = plugin_client(filled_redis)
    r = redis.Redis.from_url(filled_redis, decode_responses=True)
    options = variables_of(client, dashboard())["flow"]
    # the top 20 flows, biggest first (flows of equal bytes may come in any order)
    everything = r.zrevrange("flows:top:bytes", 0, -1, withscores=True)
    assert len(options) == min(20, len(everything))
    scores = [r.zscore("flows:top:bytes", o["value"]) for o in options]
    assert None not in scores and scores == sorted(scores, reverse=True)
    assert scores[-1] >= (everything[20][1] if len(everything) > 20 else 0)
    for option in options:
        fid, text = option["value"], option["text"]
        assert FLOW_ID.fullmatch(fid), f"value {fid!r} is not a bare flow id"
        meta = r.hgetall(f"flow:{fid}:meta")
        assert meta, f"flow:{fid}:meta does not exist"
        assert r.exists(f"ts:flow:{fid}:bps", f"ts:flow:{fid}:pps") == 2
        assert text == readable_label(meta), (text, meta)
        assert fid not in text


def test_every_link_leads_to_an_existing_flow(filled_redis):
    client = plugin_client(filled_redis)
    r = redis.Redis.from_url(filled_redis, decode_responses=True)
    dash = dashboard()
    names = {v["name"] for v in dash["templating"]["list"]}
    variables = first_values(variables_of(client, dash))
    panels = dashboard_panels(DASHBOARD)
    links = []
    for panel in panels:
        frames = panel_frames(client, panel, variables)
        links += [(panel, *link) for link in panel_links(panel, frames, variables)]
    assert len(links) >= 10, "the top flows table links each of its 10 rows"
    for panel, column, row, url in links:
        where = f"panel {panel['title']!r} column {column!r} row {row}: {url}"
        uid, values = link_target(url)
        assert uid == dash["uid"], where
        assert values and set(values) <= names, where
        if "flow" in values:
            assert FLOW_ID.fullmatch(values["flow"]), where
            assert r.exists(f"flow:{values['flow']}:meta"), where
        # every panel that reads a linked variable gets data for the linked value
        for target_panel in panels:
            uses = json.dumps(target_panel.get("targets") or [])
            if any(f"${name}" in uses or f"${{{name}" in uses for name in values):
                frames = panel_frames(client, target_panel, {**variables, **values})
                assert frames_have_data(frames), f"{where}: {target_panel['title']!r} is empty"


def test_every_top_n_window_shows_the_same_traffic_as_all_time(filled_redis):
    """The capture spans 10 s: the last 5 minutes, hour and day of it hold everything, so
    each window's top panels and flow picker show what all time shows."""
    client = plugin_client(filled_redis)
    dash = dashboard()
    window = next(v for v in dash["templating"]["list"] if v["name"] == "window")
    choices = [o["value"] for o in options_of_variable(client, window)]
    assert choices == ["top", "top:5m", "top:1h", "top:24h"]
    top_panels = [p for p in dashboard_panels(DASHBOARD)
                  if "$window" in json.dumps(p.get("targets"))
                  or "${window}" in json.dumps(p.get("targets"))]
    assert len(top_panels) == 4
    shown = {}
    for choice in choices:
        flows = query_variable_options(client, dash["templating"]["list"][1], {"window": choice})
        frames = [panel_frames(client, p, {"window": choice, "flow": flows[0]["value"]})
                  for p in top_panels]
        assert all(frames_have_data(f) for f in frames), choice
        shown[choice] = ([o["value"] for o in flows],
                         [[f.values for frame in fs for f in frame.fields] for fs in frames])
    assert shown["top:5m"] == shown["top:1h"] == shown["top:24h"] == shown["top"]


def test_flow_panel_shows_first_and_last_seen_as_dates(filled_redis):
    client = plugin_client(filled_redis)
    r = redis.Redis.from_url(filled_redis, decode_responses=True)
    dash = dashboard()
    variables = first_values(variables_of(client, dash))
    meta = r.hgetall(f"flow:{variables['flow']}:meta")
    [panel] = [p for p in dashboard_panels(DASHBOARD) if "flow:$flow:meta" in json.dumps(p)]
    [frame] = panel_frames(client, panel, variables)
    shown = {display_name(f, frame, [frame]): f for f in frame.fields}
    assert "first_seen" not in shown and "last_seen" not in shown
    for column, key in (("First seen", "first_seen"), ("Last seen", "last_seen")):
        field = shown[column]
        assert field_config(panel, field, frame, [frame])["unit"].startswith("dateTime")
        assert field.values == [pytest.approx(float(meta[key]) * 1000, abs=1)]  # epoch ms


def test_counters_panels_show_every_counter(filled_redis):
    client = plugin_client(filled_redis)
    wanted = {"pipeline:processor": PROCESSOR_COUNTERS, "pipeline:capture": CAPTURE_COUNTERS}
    seen = {}
    for panel in dashboard_panels(DASHBOARD):
        for target in panel.get("targets") or []:
            if target.get("keyName") in wanted:
                assert target["field"].split() == wanted[target["keyName"]], panel["title"]
                [frame] = run_target(client, target)
                seen[target["keyName"]] = {f.name: f.type for f in frame.fields}
    assert set(seen) == set(wanted)
    for key, fields in seen.items():  # a stat panel shows numbers only: "" is a missing field
        missing = [name for name, kind in fields.items() if kind != "number"]
        assert not missing, f"{key} lacks {missing}: the panel cannot show them"


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
