"""The provisioned dashboard: identity, data source, and a known Redis command for every query."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.dashboard_queries import (
    UnknownCommand,
    dashboard_panels,
    dashboard_targets,
    redis_command_for,
    variable_targets,
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
        command = redis_command_for(target, variables={"flow": "f00d"})
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
