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
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
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
