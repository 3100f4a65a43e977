"""The provisioned dashboard: identity, data source, a known Redis command for every query,
what it promises operators, and the emulation of the plugin and Grafana the integration tests
use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration.dashboard_queries import (
    Field,
    Frame,
    NotEmulated,
    PanelError,
    UnknownCommand,
    dashboard_panels,
    dashboard_targets,
    plugin_frames,
    redis_command_for,
    variable_targets,
)
from tests.integration.grafana_model import (
    apply_transformations,
    display_name,
    field_config,
    interpolate_link,
    link_target,
    metric_find_values,
    panel_links,
    variable_options,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "dpi-realtime.json"
DATASOURCE_UID = "redis-dpi"


def test_dashboard_identity():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "DPI Real-Time Flow Metrics"
    assert dashboard["uid"] == "dpi-realtime"
    assert dashboard["refresh"] in ("1s", "5s")
    assert dashboard["time"] == {"from": "now-15m", "to": "now"}


def test_panel_ids_are_unique_and_every_query_uses_the_redis_datasource():
    panels = dashboard_panels(DASHBOARD)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
    targets = dashboard_targets(DASHBOARD)
    for title, _id, target in targets:
        assert target["datasource"]["uid"] == DATASOURCE_UID, title
    for name, target in variable_targets(DASHBOARD):
        assert target["datasource"]["uid"] == DATASOURCE_UID, name


def test_every_target_translates_to_a_redis_command():
    targets = dashboard_targets(DASHBOARD)
    assert len(targets) >= 20
    for title, _id, target in targets:
        command = redis_command_for(target, variables={"flow": "f00d", "window": "top:1h"})
        assert command and all(isinstance(arg, (str, int)) for arg in command), title
        assert "$" not in " ".join(map(str, command)), title
    for _name, target in variable_targets(DASHBOARD):
        assert redis_command_for(target)[0] == "ZREVRANGE"


@pytest.mark.parametrize("target, expected", [
    ({"command": "ts.range", "keyName": "ts:global:bps"}, ["TS.RANGE", "ts:global:bps", "-", "+"]),
    ({"command": "ts.range", "keyName": "ts:global:bps", "aggregation": "sum", "bucket": 1000},
     ["TS.RANGE", "ts:global:bps", "-", "+", "AGGREGATION", "SUM", 1000]),
    ({"command": "ts.mrange", "filter": "dimension=protocol metric=bps"},
     ["TS.MRANGE", "-", "+", "WITHLABELS", "FILTER", "dimension=protocol", "metric=bps"]),
    ({"command": "ts.mrange", "filter": "dimension=app", "tsGroupByLabel": "app",
      "tsReducer": "sum"},
     ["TS.MRANGE", "-", "+", "WITHLABELS", "FILTER", "dimension=app",
      "GROUPBY", "app", "REDUCE", "SUM"]),
    ({"command": "zrange", "keyName": "flows:top:bytes", "min": "-10", "max": "-1"},
     ["ZRANGE", "flows:top:bytes", "-10", "-1", "WITHSCORES"]),
    ({"command": "zrange", "keyName": "z", "min": "0", "max": "+inf", "zrangeQuery": "BYSCORE"},
     ["ZRANGE", "z", "0", "+inf", "BYSCORE", "WITHSCORES"]),
    ({"command": "hgetall", "keyName": "pipeline:processor"}, ["HGETALL", "pipeline:processor"]),
    ({"command": "hmget", "keyName": "flow:$flow:meta", "field": "src dst"},
     ["HMGET", "flow:f00d:meta", "src", "dst"]),
    ({"query": "ZREVRANGE flows:top:bytes 0 19"}, ["ZREVRANGE", "flows:top:bytes", "0", "19"]),
])
def test_translation(target, expected):
    assert redis_command_for(target, variables={"flow": "f00d"}) == expected


def test_time_range_and_bad_targets():
    assert redis_command_for({"command": "ts.range", "keyName": "k"}, 1000, 2000)[2:] == [1000,
                                                                                       2000]
    with pytest.raises(UnknownCommand):
        redis_command_for({"command": "zrevrangebyscore", "keyName": "k"})
    with pytest.raises(UnknownCommand):
        redis_command_for({"refId": "A"})
    with pytest.raises(ValueError):
        redis_command_for({"command": "ts.mrange", "filter": ""})
    with pytest.raises(ValueError):
        redis_command_for({"command": "ts.range", "keyName": "k", "aggregation": "avg"})


def test_nested_row_panels_are_walked(tmp_path):
    nested = {"panels": [{"type": "row", "id": 1, "title": "R", "collapsed": True, "panels": [
        {"type": "stat", "id": 2, "title": "S", "targets": [
            {"refId": "A", "command": "ts.get", "keyName": "ts:global:pps"}]}]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(nested))
    [(title, panel_id, target)] = dashboard_targets(path)
    assert (title, panel_id) == ("S", 2)
    assert redis_command_for(target) == ["TS.GET", "ts:global:pps"]


# ------------------------------------------------------------------------------------------
# What the dashboard promises operators (checked on the file; the integration tests run it)
# ------------------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_descriptions_are_written_for_operators():
    stale = re.compile(r"issue|#\d|filled once|until then|\bwe\b|\bteam\b|todo|tbd|the seed",
                       re.IGNORECASE)
    dashboard = _dashboard()
    texts = [("dashboard", dashboard.get("description", ""))]
    texts += [(f"variable {v['name']}", v.get("description", ""))
              for v in dashboard["templating"]["list"]]
    texts += [(f"panel {p['title']}", p.get("description", "")) for p in dashboard_panels(DASHBOARD)
              if p["type"] != "row"]
    for where, text in texts:
        assert text.strip(), f"{where} has no description"
        assert not stale.search(text), f"{where}: {text!r}"


def test_time_series_are_selected_by_labels():
    """TS.RANGE on a key that does not exist yet is a red error; TS.MRANGE returns nothing."""
    for title, _id, target in dashboard_targets(DASHBOARD):
        if target.get("type") == "timeSeries":
            assert target["command"] == "ts.mrange", title
            assert "dimension=" in target["filter"], title


def test_flow_variable_shows_labels_and_holds_ids():
    [variable] = [v for v in _dashboard()["templating"]["list"] if v["name"] == "flow"]
    assert variable["query"].split()[:2] == ["ZREVRANGE", "flows:${window}:endpoints"]
    label = "UDP [2001:db8::1]:5353 -> [ff02::fb]:5353 (0123456789abcdef)"
    assert variable_options(variable, [{"text": label}]) == [
        {"text": "UDP [2001:db8::1]:5353 -> [ff02::fb]:5353", "value": "0123456789abcdef"}]
    assert variable_options(variable, [{"text": "not a flow label"}]) == []
    titles = [p["title"] for p in dashboard_panels(DASHBOARD) if "flow" in p["title"].lower()]
    assert titles and all("${flow:text}" in t for t in titles if "$flow" in t or "{flow" in t)
    assert all("${window:text}" in t for t in titles if "Top" in t), titles


def test_capture_panels_cover_every_capture_health_counter():
    from capture.counters import CaptureCounters

    names = set(CaptureCounters.HEALTH.values())
    assert "capture_parser_errors" in names
    fields, filters = set(), ""
    for _title, _id, target in dashboard_targets(DASHBOARD):
        if target.get("keyName") == "pipeline:capture":
            fields |= set(target["field"].split())
        filters += " " + str(target.get("filter") or "")
    assert fields == names
    for name in names:
        assert re.search(rf"metric=(\(|[^ ]*,)?{name}\b", filters), name


def test_processor_counters_panel_shows_every_counter():
    [target] = [t for _, _, t in dashboard_targets(DASHBOARD)
                if t.get("keyName") == "pipeline:processor"]
    from flow_processor.sink import PROCESSOR_COUNTERS

    assert target["field"].split() == list(PROCESSOR_COUNTERS)


# ------------------------------------------------------------------------------------------
# The emulation of the plugin and of Grafana the integration tests rely on
# ------------------------------------------------------------------------------------------

def test_plugin_frames_follow_the_plugin():
    zrange = plugin_frames({"command": "zrange", "refId": "A"}, ["a (1)", "10", "b", "2.5"])
    assert [(f.name, f.values, f.type) for f in zrange[0].fields] == [
        ("a (1)", [10.0], "number"), ("b", [2.5], "number")]
    hmget = plugin_frames({"command": "hmget", "field": "src bytes x"}, ["10.0.0.1", "5", None])
    assert [(f.name, f.values, f.type) for f in hmget[0].fields] == [
        ("src", ["10.0.0.1"], "string"), ("bytes", [5.0], "number"), ("x", [""], "string")]
    mrange = plugin_frames(
        {"command": "ts.mrange", "legend": "protocol", "value": "metric", "refId": "B",
         "bucket": 1000, "fill": True},
        [["ts:protocol:TCP:bps", [["protocol", "TCP"], ["metric", "bps"]],
          [[1000, "3"], [3000, "4"]]]])
    assert [(f.name, f.values) for f in mrange[0].fields] == [
        ("time", [1000, 2000, 3000]), ("bps", [3.0, 0.0, 4.0])]
    assert (mrange[0].name, mrange[0].ref_id) == ("TCP", "B")
    assert plugin_frames({"command": "ts.mrange", "legend": "x"}, []) == []
    cli = plugin_frames({"query": "ZREVRANGE z 0 1"}, ["x", ["y", []]])
    assert cli[0].fields[0].values == ["x", "y", "(empty array)"]
    with pytest.raises(PanelError):
        plugin_frames({"query": "HMGET h a"}, [None])
    assert metric_find_values(plugin_frames({"query": "ZREVRANGE z 0 1"}, [])) == []


def test_variable_regex_follows_grafana():
    # after the examples of Grafana's "Filter variables with regex" page (metricNamesToVariable
    # Values: without a capture group the whole value stays; with one, the group's text)
    names = [{"text": t} for t in ("backend_01", "backend_02", "backend_03", "backend_04")]
    assert [o["value"] for o in variable_options({"regex": "/_0[12]$/"}, names)] == [
        "backend_01", "backend_02"]
    assert [o["value"] for o in variable_options({"regex": "/(01|02)$/"}, names)] == ["01", "02"]
    assert [o["value"] for o in variable_options({"regex": "/.*(01|02)/"}, names)] == ["01", "02"]
    named = [{"text": 'up{instance="a:9090",job="prometheus"} 1'},
             {"text": 'up{instance="b:9093",job="alertmanager"} 1'}]
    assert variable_options({"regex": '/.*instance="(?<text>[^"]*).*job="(?<value>[^"]*)/'},
                            named) == [{"text": "a:9090", "value": "prometheus"},
                                       {"text": "b:9093", "value": "alertmanager"}]
    assert variable_options({"regex": "backend_0[12]"}, names)[1]["value"] == "backend_02"
    assert variable_options({}, [{"text": "a"}, {"text": "a"}]) == [{"text": "a", "value": "a"}]
    assert variable_options({"regex": "/(?<value>b|a)/g"}, [{"text": "ab"}]) == [
        {"text": "a", "value": "a"}]


def test_top_flows_table_and_its_link():
    [panel] = [p for p in dashboard_panels(DASHBOARD)
               if any(t.get("keyName") == "flows:${window}:endpoints"
                      for t in p.get("targets", []))]
    frames = plugin_frames(panel["targets"][0], [
        "UDP 10.0.0.1:53 -> 10.0.0.2:5353 (00000000000000aa)", "100",
        "TCP [2001:db8::1]:80 -> [2001:db8::2]:1234 (1e10000000000000)", "900"])
    frames = apply_transformations(frames, panel["transformations"])
    [frame] = frames
    columns = {display_name(f, frame, frames): f.values for f in frame.fields}
    assert columns == {"Flow": ["TCP [2001:db8::1]:80 -> [2001:db8::2]:1234",
                                "UDP 10.0.0.1:53 -> 10.0.0.2:5353"],
                       "Flow ID": ["1e10000000000000", "00000000000000aa"],
                       "Bytes": [900.0, 100.0]}
    links = panel_links(panel, frames, {"window": "top:1h"})  # the link keeps the window
    assert [(column, link_target(url)) for column, _row, url in links] == [
        ("Flow ID", ("dpi-realtime", {"flow": "1e10000000000000", "window": "top:1h"})),
        ("Flow ID", ("dpi-realtime", {"flow": "00000000000000aa", "window": "top:1h"}))]
    empty = apply_transformations(plugin_frames(panel["targets"][0], []),
                                  panel["transformations"])
    assert all(frame.length == 0 for frame in empty)  # "No data"


def test_flow_panel_dates_and_no_data_for_a_missing_flow():
    [panel] = [p for p in dashboard_panels(DASHBOARD)
               if any(t.get("keyName") == "flow:$flow:meta" for t in p.get("targets", []))]
    target = panel["targets"][0]
    names = target["field"].split()
    meta = {"src": "10.0.0.1", "bytes": "1500", "packets": "3",
            "first_seen": "1700000000.123456789", "last_seen": "1700000001.000000001"}
    [frame] = apply_transformations(plugin_frames(target, [meta.get(n) for n in names]),
                                    panel["transformations"])
    shown = {display_name(f, frame, [frame]): f for f in frame.fields}
    assert shown["First seen"].values == [pytest.approx(1700000000123.457)]
    assert shown["Last seen"].values == [pytest.approx(1700000001000.0)]
    assert field_config(panel, shown["First seen"], frame, [frame])["unit"] == "dateTimeAsIso"
    missing = apply_transformations(plugin_frames(target, [None] * len(names)),
                                    panel["transformations"])
    assert all(frame.length == 0 for frame in missing)  # "No data", not a row of blanks


def test_link_interpolation():
    frame = Frame("t", [Field("id", ["abc"], "string"), Field("Flow ID", ["f00d"], "string")])
    url = interpolate_link("/d/x/y?var-a=${__value.raw}&var-b=${__data.fields[\"Flow ID\"]}"
                           "&var-c=$other&${__url_time_range}", frame, [frame],
                           frame.fields[0], 0, {"other": "o"})
    assert link_target(url) == ("x", {"a": "abc", "b": "f00d", "c": "o"})
    with pytest.raises(NotEmulated):
        interpolate_link("${__unknown}", frame, [frame], frame.fields[0], 0)
    with pytest.raises(NotEmulated):
        apply_transformations([frame], [{"id": "groupBy", "options": {}}])
