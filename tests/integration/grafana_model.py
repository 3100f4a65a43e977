"""What Grafana 11 does with the data frames of the Redis data source, without Grafana.

The dashboard's panels and its $flow variable depend on Grafana behaviour as much as on Redis:
the variable's regex with named groups makes each option's text and value; a table's
transformations (reduce, extract fields, sort, organize, calculate field, filter by value)
make its columns; a data link is interpolated from a table cell. This module reproduces those
parts of Grafana 11.5 (the version compose pins) closely enough to check them against a real
Redis in the tests, following Grafana's sources:

- variables: the plugin's metricFindQuery (src/datasource/datasource.ts: every value of the
  last field of the last frame becomes {text: value}), then Grafana's
  metricNamesToVariableValues (regex applied to the value; named groups `text` and `value`;
  uniqBy value; sort), stringToJsRegex (`/body/flags`, else `^body$`);
- transformations: reduce (seriesToRows), extractFields (format regexp, Grafana 11.4+),
  sortBy, organize (exclude, order, rename), calculateField (binary), filterByValue;
- field display names (calculateFieldDisplayName) and field config (defaults, then overrides
  by name, regexp, frame refId or type);
- data links: ${__value.raw}, ${__value.text}, ${__data.fields[...]}, ${__field.name},
  ${__series.name}, ${__url_time_range} and dashboard variables.

Anything else raises NotEmulated, so that a dashboard change the check cannot follow fails
loudly instead of passing unchecked. Pure functions, no I/O.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.integration.dashboard_queries import (
    Field,
    Frame,
    NotEmulated,
    PanelError,
    run_target,
)

# ------------------------------------------------------------------------------------------
# JavaScript regular expressions (Grafana's stringToJsRegex) in Python
# ------------------------------------------------------------------------------------------

_JS_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "g": 0}


class JsRegex:
    """A JavaScript RegExp: `pattern` (Python), `global_` (the g flag)."""

    def __init__(self, source: str, flags: str = ""):
        bad = set(flags) - set(_JS_FLAGS)
        if bad:
            raise NotEmulated(f"regex flags {''.join(sorted(bad))!r} are not emulated")
        # (?<name>...) is a named group in JavaScript, (?P<name>...) in Python
        python = re.sub(r"\(\?<(?=[A-Za-z_$])", "(?P<", source)
        if "\\k<" in python:
            raise NotEmulated("named back references are not emulated")
        pattern_flags = 0
        for flag in flags:
            pattern_flags |= _JS_FLAGS[flag]
        self.pattern = re.compile(python, pattern_flags)
        self.global_ = "g" in flags

    def exec_all(self, text: str) -> list[re.Match]:
        """Grafana's getAllMatches: one exec, or every one for a global regex."""
        if not self.global_:
            match = self.pattern.search(text)
            return [match] if match else []
        out = []
        for match in self.pattern.finditer(text):
            out.append(match)
            if match.group(0) == "":
                break
        return out


def js_regex(text: str) -> JsRegex:
    """Grafana's stringToJsRegex."""
    if not text.startswith("/"):
        return JsRegex("^" + text + "$")
    match = re.match(r"^/(.*?)/(g?i?m?y?s?)$", text, re.DOTALL)
    if not match:
        raise ValueError(f"'{text}' is not a valid regular expression.")
    return JsRegex(match.group(1), match.group(2))


def _groups(match: re.Match) -> dict[str, str | None] | None:
    """match.groups in JavaScript: undefined without named groups."""
    return match.groupdict() if match.re.groupindex else None


# ------------------------------------------------------------------------------------------
# JavaScript values
# ------------------------------------------------------------------------------------------

def js_number(value: Any) -> float:
    """Number(value) for what frames hold (numbers, strings, null, undefined = missing)."""
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text == "":
        return 0.0
    if re.fullmatch(r"[+-]?Infinity", text):
        return -math.inf if text.startswith("-") else math.inf
    if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", text):
        return float(text)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return float(int(text, 16))
    return math.nan


def js_string(value: Any) -> str:
    """String(value) for numbers and strings."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    return str(value)


# ------------------------------------------------------------------------------------------
# Template variables
# ------------------------------------------------------------------------------------------

def metric_find_values(frames: list[Frame]) -> list[dict]:
    """The plugin's metricFindQuery: lastValueFrom over every field of every frame, so the
    values of the last field of the last frame, each as {text: value}."""
    fields = [f for frame in frames for f in frame.fields]
    if not fields:
        raise PanelError("no elements in sequence")  # rxjs EmptyError: the variable fails
    return [{"text": value} for value in fields[-1].values]


def variable_options(variable: Mapping[str, Any], metric_names: list[dict]) -> list[dict]:
    """Grafana's metricNamesToVariableValues: [{"text": ..., "value": ...}] in option order."""
    regex = js_regex(variable["regex"]) if variable.get("regex") else None
    options: list[dict] = []
    for item in metric_names:
        text = item.get("text") if item.get("text") is not None else item.get("value")
        value = item.get("value") if item.get("value") is not None else item.get("text")
        text, value = js_string(text), js_string(value)
        if regex:
            matches = regex.exec_all(value)
            if not matches:
                continue
            value_group = next((m for m in matches if (_groups(m) or {}).get("value")), None)
            text_group = next((m for m in matches if (_groups(m) or {}).get("text")), None)
            first = next((m for m in matches if m.re.groups >= 1), None)
            if value_group or text_group:
                value = (_groups(value_group)["value"] if value_group
                         else _groups(text_group)["text"])
                text = (_groups(text_group)["text"] if text_group
                        else _groups(value_group)["value"])
            elif len(matches) > 1 and first:
                options += [{"text": m.group(1), "value": m.group(1)} for m in matches]
                continue
            elif first:
                text = value = first.group(1)
        options.append({"text": text, "value": value})
    unique, seen = [], set()
    for option in options:  # lodash uniqBy(options, 'value')
        if option["value"] not in seen:
            seen.add(option["value"])
            unique.append(option)
    sort = int(variable.get("sort") or 0)
    if sort == 0:
        return unique
    if sort in (1, 2):  # alphabetical
        return sorted(unique, key=lambda o: o["text"], reverse=sort == 2)
    raise NotEmulated(f"variable sort {sort} is not emulated")


def query_variable_options(client, variable: Mapping[str, Any],
                           current: Mapping[str, str] | None = None) -> list[dict]:
    """Options of a query variable of this data source, as the dashboard's picker lists them;
    its query is interpolated with the values of the variables before it (current)."""
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if not query:
        return []
    target = {"refId": variable["name"], "query": query}
    return variable_options(variable, metric_find_values(run_target(client, target, current)))


def custom_variable_options(variable: Mapping[str, Any]) -> list[dict]:
    """Grafana's custom variable: values separated by commas (\\, is a comma inside one),
    each `text : value` or a bare value."""
    options = []
    for item in re.findall(r"(?:\\,|[^,])+", variable.get("query") or ""):
        item = item.replace("\\,", ",")
        pair = re.match(r"^\s*(.+)\s:\s(.+)$", item)
        if pair:
            options.append({"text": pair.group(1).strip(), "value": pair.group(2).strip()})
        else:
            options.append({"text": item.strip(), "value": item.strip()})
    return options


def options_of_variable(client, variable: Mapping[str, Any],
                        current: Mapping[str, str] | None = None) -> list[dict]:
    """Options of a dashboard variable of a type the dashboard uses (query or custom)."""
    kind = variable.get("type")
    if kind == "custom":
        return custom_variable_options(variable)
    if kind == "query":
        return query_variable_options(client, variable, current)
    raise NotEmulated(f"variable type {kind!r} is not emulated")


def dashboard_variables(client, dashboard: Mapping[str, Any]) -> dict[str, list[dict]]:
    """name -> options of every variable, in dashboard order, each query interpolated with
    what the variables before it hold on first view (their first option)."""
    options: dict[str, list[dict]] = {}
    current: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        found = options_of_variable(client, variable, current)
        options[variable["name"]] = found
        current[variable["name"]] = found[0]["value"] if found else ""
    return options


# ------------------------------------------------------------------------------------------
# Field names and field config
# ------------------------------------------------------------------------------------------

def _unique_field_name(field: Field, frame: Frame | None) -> str:
    dupes, found_self = 0, False
    for other in frame.fields if frame else []:
        if other is field:
            found_self = True
            if dupes:
                dupes += 1
                break
        elif other.name == field.name:
            dupes += 1
            if found_self:
                break
    return f"{field.name} {dupes}" if dupes else field.name


def _format_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ", ".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


def display_name(field: Field, frame: Frame | None, frames: list[Frame] | None = None) -> str:
    """Grafana's getFieldDisplayName (calculateFieldDisplayName)."""
    if field.display_name:
        return field.display_name
    if field.config.get("displayName"):
        return field.config["displayName"]
    if field.type == "time" and not field.labels:
        return field.name or "Time"
    parts: list[str] = []
    names_differ = bool(frames) and any(frames[i].name != frames[i - 1].name
                                        for i in range(1, len(frames)))
    frame_added = labels_added = False
    if names_differ and frame and frame.name:
        parts.append(frame.name)
        frame_added = True
    if field.name and field.name != "Value":
        parts.append(field.name)
    if field.labels:
        labels = _format_labels(field.labels)
        if labels:
            parts.append(labels)
            labels_added = True
    if frame and not frame_added and not labels_added and field.name == "Value" and frame.name:
        parts.append(frame.name)
    name = " ".join(parts) if parts else (field.name or "Value")
    if name == field.name:
        name = _unique_field_name(field, frame)
    return name


def _matches(matcher: Mapping[str, Any], field: Field, frame: Frame, frames: list[Frame]) -> bool:
    kind, option = matcher.get("id"), matcher.get("options")
    if kind == "byName":
        return display_name(field, frame, frames) == option
    if kind == "byRegexp":
        return js_regex(str(option)).pattern.search(display_name(field, frame, frames)) is not None
    if kind == "byFrameRefID":
        return frame.ref_id == option
    if kind == "byType":
        return field.type == option
    raise NotEmulated(f"field matcher {kind!r} is not emulated")


def field_config(panel: Mapping[str, Any], field: Field, frame: Frame,
                 frames: list[Frame]) -> dict:
    """The field's config once Grafana applied the panel's defaults and overrides."""
    source = panel.get("fieldConfig") or {}
    config = copy.deepcopy(field.config)
    for key, value in (source.get("defaults") or {}).items():
        config.setdefault(key, copy.deepcopy(value))
    for override in source.get("overrides") or []:
        if _matches(override["matcher"], field, frame, frames):
            for prop in override.get("properties") or []:
                config[prop["id"]] = copy.deepcopy(prop.get("value"))
    return config


def _find_field(frame: Frame, name: str, frames: list[Frame]) -> Field | None:
    for f in frame.fields:
        if f.name == name or display_name(f, frame, frames) == name:
            return f
    return None


# ------------------------------------------------------------------------------------------
# Transformations
# ------------------------------------------------------------------------------------------

_REDUCER_NAMES = {"lastNotNull": "Last *", "last": "Last", "max": "Max", "min": "Min",
                  "sum": "Total", "mean": "Mean", "firstNotNull": "First *", "first": "First"}


def _reduce_values(values: list, reducer: str) -> Any:
    present = [v for v in values
               if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if reducer == "lastNotNull":
        return present[-1] if present else None
    if reducer == "firstNotNull":
        return present[0] if present else None
    if reducer == "last":
        return values[-1] if values else None
    if reducer == "first":
        return values[0] if values else None
    numbers = [v for v in present if isinstance(v, (int, float))]
    if reducer == "sum":
        return float(sum(numbers))
    if reducer == "max":
        return max(numbers) if numbers else None
    if reducer == "min":
        return min(numbers) if numbers else None
    if reducer == "mean":
        return sum(numbers) / len(numbers) if numbers else None
    raise NotEmulated(f"reducer {reducer!r} is not emulated")


def _reduce(frames: list[Frame], options: Mapping[str, Any]) -> list[Frame]:
    if (options.get("mode") or "seriesToRows") != "seriesToRows" or options.get("fields") \
            or options.get("labelsToFields"):
        raise NotEmulated(f"reduce options {dict(options)} are not emulated")
    reducers = options.get("reducers") or []
    for reducer in reducers:
        if reducer not in _REDUCER_NAMES:
            raise NotEmulated(f"reducer {reducer!r} is not emulated")
    out = []
    for frame in frames:
        source = [f for f in frame.fields if f.type != "time"]
        names = [display_name(f, frame, frames) for f in source]
        fields = [Field("Field", names, "string")]
        for reducer in reducers:
            fields.append(Field(_REDUCER_NAMES[reducer],
                                [_reduce_values(f.values, reducer) for f in source], "other"))
        out.append(Frame(frame.name, fields, frame.ref_id))
    if len(out) > 1:  # mergeResults: one frame, rows of every series
        merged = Frame(out[0].name, [Field(f.name, [], f.type) for f in out[0].fields],
                       out[0].ref_id)
        for frame in out:
            for target, f in zip(merged.fields, frame.fields):
                target.values.extend(f.values)
        out = [merged]
    return out


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _extract_fields(frames: list[Frame], options: Mapping[str, Any]) -> list[Frame]:
    fmt = options.get("format") or "auto"
    if fmt != "regexp":
        raise NotEmulated(f"extractFields format {fmt!r} is not emulated")
    source_name = options.get("source")
    text = str(options.get("regExp") or "")
    regex = js_regex(text) if text.startswith("/") else JsRegex("(?<NewField>.*)")
    out = []
    for frame in frames:
        source = _find_field(frame, source_name, frames) if source_name else None
        if source is None:
            out.append(frame)
            continue
        count = frame.length
        names: list[str] = []
        columns: dict[str, list] = {}
        for i in range(count):
            value = source.values[i] if i < len(source.values) else None
            if not isinstance(value, str):
                parsed = value if isinstance(value, dict) else None
            elif regex.global_:  # String.match with the g flag: no groups
                parsed = None
            else:
                match = regex.pattern.search(value)
                parsed = _groups(match) if match else None
            if parsed is None:
                continue
            for key, val in parsed.items():
                if key not in columns:
                    columns[key] = [None] * count
                    names.append(key)
                columns[key][i] = val
        new = []
        for name in names:
            first = next((v for v in columns[name] if v is not None), None)
            new.append(Field(name, columns[name], _value_type(first) if first is not None
                             else "other"))
        if options.get("keepTime"):
            time = _find_field(frame, "Time", frames) or _find_field(frame, "time", frames)
            if time:
                new.insert(0, time)
        fields = new if options.get("replace") else frame.fields + new
        out.append(Frame(frame.name, fields, frame.ref_id))
    return out


def _sort_key(value: Any):
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, str(value))


def _sort_by(frames: list[Frame], options: Mapping[str, Any]) -> list[Frame]:
    sort = (options.get("sort") or [{}])[0]
    if not sort.get("field"):
        return frames
    out = []
    for frame in frames:
        key_field = _find_field(frame, sort["field"], frames)
        if key_field is None:
            out.append(frame)
            continue
        order = sorted(range(frame.length), key=lambda i: _sort_key(key_field.values[i]),
                       reverse=bool(sort.get("desc")))
        fields = [Field(f.name, [f.values[i] for i in order], f.type, f.labels, f.config,
                        f.display_name) for f in frame.fields]
        out.append(Frame(frame.name, fields, frame.ref_id))
    return out


def _organize(frames: list[Frame], options: Mapping[str, Any]) -> list[Frame]:
    exclude = {k for k, v in (options.get("excludeByName") or {}).items() if v}
    index = options.get("indexByName") or {}
    rename = options.get("renameByName") or {}
    if options.get("includeByName"):
        raise NotEmulated("organize includeByName is not emulated")
    out = []
    for frame in frames:
        fields = [f for f in frame.fields if display_name(f, frame, frames) not in exclude]
        if index:
            positions = [index.get(display_name(f, frame, frames)) for f in fields]
            positions = [i if isinstance(i, int) and not isinstance(i, bool) else math.inf
                         for i in positions]
            fields = [f for _, f in sorted(zip(positions, fields), key=lambda item: item[0])]
        renamed = []
        for f in fields:
            to = rename.get(display_name(f, frame, frames))
            if isinstance(to, str) and to:
                f = Field(f.name, f.values, f.type, f.labels, {**f.config, "displayName": to}, to)
            renamed.append(f)
        out.append(Frame(frame.name, renamed, frame.ref_id))
    return out


def _divide(a: float, b: float) -> float:
    if b:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


_BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": _divide}


def _binary_value(value: Any, names: list[str]) -> dict:
    """Grafana's checkBinaryValueType: the old string form to {matcher} or {fixed}."""
    if isinstance(value, str):
        if math.isnan(js_number(value)) or value in names:
            return {"matcher": {"id": "byName", "options": value}}
        return {"fixed": value}
    return dict(value or {})


def _operand(frame: Frame, value: Mapping[str, Any], frames: list[Frame]) -> list | None:
    matcher = value.get("matcher") or {}
    if matcher.get("id") == "byName":
        for f in frame.fields:
            if display_name(f, frame, frames) == matcher.get("options"):
                return [1.0 if v is True else 0.0 if v is False else v for v in f.values]
    elif matcher:
        raise NotEmulated(f"calculateField matcher {matcher} is not emulated")
    fixed = value.get("fixed", matcher.get("options", ""))
    number = re.match(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", str(fixed))
    if number:  # parseFloat
        return [float(number.group(0))] * frame.length
    return None


def _calculate_field(frames: list[Frame], options: Mapping[str, Any]) -> list[Frame]:
    if options.get("mode") != "binary":
        raise NotEmulated(f"calculateField mode {options.get('mode')!r} is not emulated")
    binary = options.get("binary") or {}
    names = [f.name for frame in frames for f in frame.fields]
    left, right = _binary_value(binary.get("left", ""), names), \
        _binary_value(binary.get("right", ""), names)
    operator = _BINARY.get(binary.get("operator", "+"))
    if operator is None or (left.get("matcher") or {}).get("id") == "byType":
        raise NotEmulated(f"calculateField binary {binary} is not emulated")
    time_series = options.get("timeSeries") is not False
    if time_series and right.get("fixed") is None and len(frames) > 1:
        raise NotEmulated("calculateField joining several frames is not emulated")
    alias = options.get("alias") or (
        f"{(left.get('matcher') or {}).get('options', left.get('fixed', ''))} "
        f"{binary.get('operator', '+')} "
        f"{(right.get('matcher') or {}).get('options', right.get('fixed', ''))}").replace("$", "")
    out = []
    for frame in frames:
        a, b = _operand(frame, left, frames), _operand(frame, right, frames)
        if a is None or b is None:
            if not options.get("replaceFields"):
                out.append(frame)
            continue
        values = [operator(js_number(x), js_number(y)) for x, y in zip(a, b)]
        new = Field(alias, values, "number")
        if options.get("replaceFields"):
            time = next((f for f in frame.fields if f.type == "time"), None)
            fields = [time, new] if time and time_series else [new]
        else:
            fields = frame.fields + [new]
        out.append(Frame(frame.name, fields, frame.ref_id))
    return out


def _value_matcher(config: Mapping[str, Any]):
    kind, opts = config.get("id"), config.get("options") or {}

    def numeric(value: Any) -> float:
        return js_number(value) if not isinstance(value, (int, float)) else float(value)

    if kind == "greater":
        return lambda v: not math.isnan(numeric(v)) and numeric(v) > opts.get("value", 0)
    if kind == "lower":
        return lambda v: not math.isnan(numeric(v)) and numeric(v) < opts.get("value", 0)
    if kind == "isNull":
        return lambda v: v is None
    if kind == "isNotNull":
        return lambda v: v is not None
    raise NotEmulated(f"value matcher {kind!r} is not emulated")


def _filter_by_value(frames: list[Frame], options: Mapping[str, Any]) -> list[Frame]:
    filters = options.get("filters") or []
    if not filters:
        return frames
    match_all = options.get("match") == "all"
    include = (options.get("type") or "include") == "include"
    out = []
    for frame in frames:
        by_name = {display_name(f, frame, frames): i for i, f in enumerate(frame.fields)}
        tests = [(by_name.get(flt["fieldName"], -1), _value_matcher(flt["config"]))
                 for flt in filters]
        rows = []
        for i in range(frame.length):
            results = [ix >= 0 and m(frame.fields[ix].values[i]) for ix, m in tests]
            matching = all(results) if match_all else any(results)
            if matching == include:
                rows.append(i)
        fields = [Field(f.name, [f.values[i] for i in rows], f.type, f.labels, f.config,
                        f.display_name) for f in frame.fields]
        out.append(Frame(frame.name, fields, frame.ref_id))
    return out


TRANSFORMATIONS = {
    "reduce": _reduce,
    "extractFields": _extract_fields,
    "sortBy": _sort_by,
    "organize": _organize,
    "calculateField": _calculate_field,
    "filterByValue": _filter_by_value,
}


def apply_transformations(frames: list[Frame], transformations: list[Mapping[str, Any]],
                          variables: Mapping[str, str] | None = None) -> list[Frame]:
    for transformation in transformations or []:
        if transformation.get("disabled"):
            continue
        kind = transformation.get("id")
        if kind not in TRANSFORMATIONS:
            raise NotEmulated(f"transformation {kind!r} is not emulated")
        frames = TRANSFORMATIONS[kind](frames, transformation.get("options") or {})
    return frames


def panel_frames(client, panel: Mapping[str, Any], variables: Mapping[str, str] | None = None,
                 start: int | str = "-", end: int | str = "+") -> list[Frame]:
    """Every target of the panel run as the plugin does, then the panel's transformations."""
    frames: list[Frame] = []
    for target in panel.get("targets") or []:
        frames += run_target(client, target, variables, start, end)
    return apply_transformations(frames, panel.get("transformations") or [], variables)


# ------------------------------------------------------------------------------------------
# Data links
# ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\$\{([^}]+)\}|\$(\w+)")


def interpolate_link(url: str, frame: Frame, frames: list[Frame], field: Field, row: int,
                     variables: Mapping[str, str] | None = None,
                     time_range: tuple[str, str] = ("now-15m", "now")) -> str:
    """A data link's URL for one cell, as Grafana interpolates it."""
    variables = variables or {}

    def cell_of(name: str) -> str:
        target = _find_field(frame, name, frames)
        if target is None and name.isdigit():
            index = int(name)
            target = frame.fields[index] if index < len(frame.fields) else None
        if target is None:
            return ""
        return js_string(target.values[row])

    def replace(match: re.Match) -> str:
        expr = match.group(1) or match.group(2)
        name, _, fmt = expr.partition(":")
        if name == "__value.raw":
            return js_string(field.values[row])
        if name == "__value.text":
            return js_string(field.values[row])
        if name == "__url_time_range":
            return f"from={time_range[0]}&to={time_range[1]}"
        if name == "__field.name":
            return display_name(field, frame, frames)
        if name == "__series.name":
            return frame.name
        fields_ref = re.fullmatch(r"__data\.fields(?:\.(\w+)|\[\"([^\"]+)\"\]|\['([^']+)'\])",
                                  name)
        if fields_ref:
            return cell_of(next(g for g in fields_ref.groups() if g is not None))
        if name.startswith("__"):
            raise NotEmulated(f"link variable ${{{expr}}} is not emulated")
        if name in variables:
            if fmt not in ("", "raw", "text"):
                raise NotEmulated(f"variable format {fmt!r} is not emulated")
            return str(variables[name])
        return match.group(0)

    return _TOKEN.sub(replace, url)


def panel_links(panel: Mapping[str, Any], frames: list[Frame],
                variables: Mapping[str, str] | None = None) -> list[tuple[str, int, str]]:
    """(field display name, row, URL) for every data link of every cell of the panel."""
    out = []
    for frame in frames:
        for field in frame.fields:
            links = field_config(panel, field, frame, frames).get("links") or []
            for link in links:
                for row in range(len(field.values)):
                    out.append((display_name(field, frame, frames), row,
                                interpolate_link(link["url"], frame, frames, field, row,
                                                 variables)))
    return out


def link_target(url: str) -> tuple[str, dict[str, str]]:
    """(dashboard uid, {variable: value}) of an internal link /d/<uid>/<slug>?var-x=..."""
    parts = urlsplit(url)
    match = re.fullmatch(r"/d/([^/]+)(?:/[^/]*)?", parts.path)
    if not match:
        raise ValueError(f"{url!r} is not a link to a dashboard")
    query = parse_qs(parts.query, keep_blank_values=True)
    return match.group(1), {k[4:]: v[-1] for k, v in query.items() if k.startswith("var-")}
