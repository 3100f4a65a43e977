"""The Redis commands behind the Grafana dashboards, without Grafana.

A panel target of the Redis data source plugin (redis-datasource, RedisGrafana/
grafana-redis-datasource 2.x) is a JSON object such as
``{"command": "ts.mrange", "filter": "dimension=protocol metric=bps", "legend": "protocol"}``.
`redis_command_for` turns one target into the command the plugin's backend sends, so that a
test can run it against a real Redis Stack and check that every panel gets data; the
`*_targets` functions list the targets of a dashboard file. Pure functions: no I/O besides
reading the dashboard file.

Where the plugin sends the dashboard's time range (TS.RANGE, TS.MRANGE), the command uses
`start`/`end` (default "-" and "+", the whole series). Template variables ($flow, ${flow})
are replaced from `variables`, as Grafana does before the query reaches the plugin.

`plugin_frames` turns a Redis reply into the data frames the plugin's backend returns for that
target (pkg/redis-*.go of redis-datasource 2.2.0: field names, float parsing, empty replies),
and `run_target` runs a target against a real Redis the way the plugin does (RESP2, a Redis
error becomes the panel's red error, `PanelError`). What Grafana then does with the frames
(transformations, variables, data links) is in tests/integration/grafana_model.py.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Commands whose only argument is the key (plugin: queryKeyCommand, querySMembers, ...).
KEY_ONLY = {
    "get": "GET", "ttl": "TTL", "type": "TYPE", "hlen": "HLEN", "hkeys": "HKEYS",
    "hgetall": "HGETALL", "llen": "LLEN", "scard": "SCARD", "smembers": "SMEMBERS",
    "xlen": "XLEN", "ts.get": "TS.GET", "ts.info": "TS.INFO",
}
# Target fields Grafana passes through template substitution (plugin: applyTemplateVariables).
TEMPLATED = ("keyName", "query", "field", "filter", "legend", "value")
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")


class UnknownCommand(ValueError):
    """A target whose command this module (and so the dashboard check) does not know."""


def substitute(text: str, variables: Mapping[str, str] | None) -> str:
    """Replace $name and ${name} by their values; unknown variables stay as they are."""
    if not variables or "$" not in text:
        return text

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return str(variables[name]) if name in variables else match.group(0)

    return VARIABLE.sub(value, text)


def _required(target: Mapping[str, Any], name: str) -> str:
    value = target.get(name)
    if value is None or str(value).strip() == "":
        raise ValueError(f"{target.get('command')!r} target {target.get('refId')!r} "
                         f"needs a non-empty {name!r}")
    return str(value)


def _words(text: str, what: str) -> list[str]:
    """Split like the plugin (shell quoting rules, bitbucket.org/creachadair/shell)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} is not valid: {exc}") from None
    if not words:
        raise ValueError(f"{what} is empty")
    return words


def _aggregation(target: Mapping[str, Any]) -> list:
    aggregation = target.get("aggregation") or ""
    if not aggregation:
        return []
    bucket = target.get("bucket")
    if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket <= 0:
        raise ValueError(f"target {target.get('refId')!r}: aggregation {aggregation!r} needs "
                         f"an integer bucket > 0 (milliseconds), got {bucket!r}")
    return ["AGGREGATION", aggregation.upper(), bucket]


def redis_command_for(target: Mapping[str, Any], start: int | str = "-", end: int | str = "+",
                      variables: Mapping[str, str] | None = None) -> list:
    """The Redis command (as a list of arguments) the plugin sends for this panel target.

    Raises UnknownCommand for a command not listed here and ValueError for a target that
    lacks what its command needs.
    """
    target = {k: (substitute(v, variables) if k in TEMPLATED and isinstance(v, str) else v)
              for k, v in target.items()}
    if target.get("query"):  # the plugin's CLI mode, also used by query variables
        return _words(target["query"], "query")
    command = str(target.get("command") or "").strip()
    if not command:
        raise UnknownCommand(f"target {target.get('refId')!r} has neither command nor query")
    name = command.lower()
    if name in KEY_ONLY:
        return [KEY_ONLY[name], _required(target, "keyName")]
    if name == "ts.range":
        return ["TS.RANGE", _required(target, "keyName"), start, end, *_aggregation(target)]
    if name == "ts.mrange":
        args = ["TS.MRANGE", start, end, *_aggregation(target), "WITHLABELS", "FILTER",
                *_words(_required(target, "filter"), "filter")]
        group = target.get("tsGroupByLabel") or ""
        if group:
            args += ["GROUPBY", group, "REDUCE", _required(target, "tsReducer").upper()]
        return args
    if name == "ts.mget":
        return ["TS.MGET", "WITHLABELS", "FILTER", *_words(_required(target, "filter"), "filter")]
    if name == "ts.queryindex":
        return ["TS.QUERYINDEX", *_words(_required(target, "filter"), "filter")]
    if name == "hget":
        return ["HGET", _required(target, "keyName"), _required(target, "field")]
    if name == "hmget":
        return ["HMGET", _required(target, "keyName"),
                *_words(_required(target, "field"), "field")]
    if name == "zrange":
        # ZRANGE key min max [BYSCORE|BYLEX] WITHSCORES; no zrangeQuery = index range.
        by = str(target.get("zrangeQuery") or "").upper()
        if by not in ("", "BYSCORE", "BYLEX"):
            raise ValueError(f"target {target.get('refId')!r}: zrangeQuery {by!r} is not "
                             "BYSCORE, BYLEX or empty")
        return ["ZRANGE", _required(target, "keyName"), _required(target, "min"),
                _required(target, "max"), *([by] if by else []), "WITHSCORES"]
    if name == "info":
        section = target.get("section") or ""
        return ["INFO", *([section] if section else [])]
    raise UnknownCommand(f"target {target.get('refId')!r}: command {command!r} is not known "
                         "to tests/integration/dashboard_queries.py")


def _walk(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels") or [])  # a collapsed row holds its panels


def dashboard_panels(path: str | Path) -> list[dict]:
    """Every panel of a dashboard file, rows and the panels nested in rows included."""
    dashboard = json.loads(Path(path).read_text())
    return list(_walk(dashboard.get("panels") or []))


def dashboard_targets(path: str | Path) -> list[tuple[str, int, dict]]:
    """(panel title, panel id, target) for every query target of every panel."""
    return [(panel.get("title", ""), panel.get("id"), target)
            for panel in dashboard_panels(path) for target in panel.get("targets") or []]


def variable_targets(path: str | Path) -> list[tuple[str, dict]]:
    """(variable name, target) for every query variable, as the plugin receives it."""
    dashboard = json.loads(Path(path).read_text())
    out = []
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):  # newer Grafana stores {"query": "...", "refId": ...}
            query = query.get("query")
        out.append((variable["name"], {"refId": variable["name"], "query": query or "",
                                       "datasource": variable.get("datasource")}))
    return out


# ------------------------------------------------------------------------------------------
# What the plugin's backend makes of the reply: data frames
# ------------------------------------------------------------------------------------------

@dataclass
class Field:
    """A data frame field as Grafana's frontend receives it. type: time, number, string, other.
    display_name: Grafana's field.state.displayName once a transformation (rename) set it."""

    name: str
    values: list
    type: str = "other"
    labels: dict[str, str] | None = None
    config: dict = field(default_factory=dict)
    display_name: str | None = None


@dataclass
class Frame:
    name: str
    fields: list[Field]
    ref_id: str = ""

    @property
    def length(self) -> int:
        return max((len(f.values) for f in self.fields), default=0)


class PanelError(Exception):
    """What the panel shows as a red error (a Redis error reply, or one the plugin makes)."""


class NotEmulated(ValueError):
    """A reply, transformation or link these helpers do not reproduce: teach them first."""


_GO_FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)",
                       re.IGNORECASE)


def go_float(text: str) -> float | None:
    """strconv.ParseFloat(text, 64) of the plugin: the float, or None where Go fails."""
    if not _GO_FLOAT.fullmatch(text):
        return None
    value = float(text)
    return None if math.isinf(value) and not re.search("inf", text, re.IGNORECASE) else value


def _value_field(name: str, value: str) -> Field:
    """The plugin's createFrameValue: a float where the text parses as one, else the text."""
    number = go_float(value)
    if number is None:
        return Field(name, [value], "string")
    return Field(name, [number], "number")


def _text(item) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)


def _flatten(items: list) -> list[str]:
    """The plugin's parseInterfaceValue (CLI mode and variables)."""
    out = []
    for item in items:
        if isinstance(item, (bytes, str)):
            out.append(_text(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
        elif isinstance(item, list):
            out.extend(_flatten(item) or ["(empty array)"])
        else:
            raise PanelError("Unsupported array return type")
    return out


def _samples(frame: Frame, rows: list, bucket: int, fill: bool) -> None:
    """Append TS.RANGE/TS.MRANGE samples; `fill` adds 0 for each missing bucket (plugin)."""
    times, values = frame.fields[0].values, frame.fields[1].values
    previous = None
    for ts, value in rows:
        ts = int(ts)
        if fill and bucket:
            if previous is not None:
                while ts - previous > bucket:
                    previous += bucket
                    times.append(previous)
                    values.append(0.0)
            previous = ts
        times.append(ts)
        values.append(go_float(_text(value)) or 0.0)


def plugin_frames(target: Mapping[str, Any], reply) -> list[Frame]:
    """The data frames the plugin returns for `target` (templated already) given the RESP2
    reply of redis_command_for(target)."""
    ref = str(target.get("refId") or "")
    key = str(target.get("keyName") or "")
    if target.get("query"):  # queryCustomCommand
        if reply is None:
            raise PanelError("Wrong command")
        if isinstance(reply, int) and not isinstance(reply, bool):
            return [Frame(key, [Field("Value", [reply], "number")], ref)]
        if isinstance(reply, (bytes, str)):
            lines = _text(reply).replace("\r\n", "\n").split("\n")
            if len(lines) == 1:
                return [Frame(key, [_value_field("Value", lines[0])], ref)]
            return [Frame(key, [Field("Value", lines, "string")], ref)]
        if isinstance(reply, list):
            return [Frame(key, [Field("Value", _flatten(reply), "string")], ref)]
        raise PanelError("Unsupported return type")
    name = str(target.get("command") or "").lower()
    if name == "zrange":  # queryZRange: one field per member, named by it
        flat = [_text(x) for pair in reply for x in (pair if isinstance(pair, list) else [pair])]
        fields = [_value_field(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return [Frame(name, fields, ref)]
    if name == "hmget":  # queryHMGet: a missing field (or key) reads as ""
        names = _words(str(target["field"]), "field")
        values = ["" if v is None else _text(v) for v in reply]
        return [Frame(name, [_value_field(n, v) for n, v in zip(names, values)], ref)]
    bucket, fill = int(target.get("bucket") or 0), bool(target.get("fill"))
    if name == "ts.range":
        value_field = Field(str(target.get("value") or ""), [], "number")
        frame = Frame(str(target.get("legend") or key), [Field("time", [], "time"), value_field],
                      ref)
        _samples(frame, reply, bucket, fill)
        return [frame]
    if name == "ts.mrange":
        legend, value = str(target.get("legend") or ""), str(target.get("value") or "")
        frames = []
        for series_key, raw_labels, rows in reply:
            labels = {_text(k): _text(v) for k, v in raw_labels}
            frame = Frame(labels.get(legend, "") if legend else _text(series_key),
                          [Field("time", [], "time"),
                           Field(labels.get(value, "") if value else "", [], "number",
                                 None if legend else labels)], ref)
            _samples(frame, rows, bucket, fill)
            frames.append(frame)
        return frames
    raise NotEmulated(f"frames of command {name!r} are not emulated")


def plugin_client(url: str):
    """A client that talks to Redis as the plugin does (RESP2) and returns raw replies."""
    import redis

    client = redis.Redis.from_url(url, protocol=2, decode_responses=True)
    client.response_callbacks.clear()
    return client


def run_target(client, target: Mapping[str, Any], variables: Mapping[str, str] | None = None,
               start: int | str = "-", end: int | str = "+") -> list[Frame]:
    """Run one panel or variable target against Redis as Grafana and the plugin do."""
    import redis

    command = redis_command_for(target, start, end, variables)
    templated = {k: (substitute(v, variables) if k in TEMPLATED and isinstance(v, str) else v)
                 for k, v in target.items()}
    try:
        reply = client.execute_command(*command)
    except redis.ResponseError as exc:
        raise PanelError(str(exc)) from None
    return plugin_frames(templated, reply)


def frames_have_data(frames: list[Frame]) -> bool:
    """Some value that is not time, not null and not the plugin's "" for a missing field."""
    return any(v is not None and v != "" for frame in frames for f in frame.fields
               if f.type != "time" for v in f.values)
