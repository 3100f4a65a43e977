"""What dpi_top shows, read from Redis in one pipeline per refresh and kept in a Snapshot.

`fetch` sends the commands; `build` turns their replies into a Snapshot without any I/O, so
the choice of the second shown, the joins and the error wording are tested on plain values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

GLOBAL_BPS, GLOBAL_PPS = "ts:global:bps", "ts:global:pps"
LAG_SERIES = "ts:health:consumer_lag:count"
PROTOCOL_ORDER = ("TCP", "UDP", "ICMP", "ICMPV6", "OTHER")
HISTORY_S = 60  # seconds in the sparkline
# Samples asked per protocol/app series: the shown second plus the seconds after it that may
# already hold (partial) samples in a live run.
RECENT_SAMPLES = 8
# The second shown must have ended this long ago: the processor writes every second
# (FLUSH_INTERVAL_MS 1000), so a younger second may still be growing.
DEFAULT_SETTLE_S = 1.0
# Newest data older than this (wall clock) is shown as old: a replay or a stopped pipeline.
STALE_AFTER_S = 10.0

FLOW_FIELDS = ("src", "dst", "sport", "dport", "proto", "app", "server_name", "bytes", "packets",
               "app_guess")
CAPTURE_FIELDS = ("capture_frames", "capture_kernel_drops", "capture_dropped_buffer_full",
                  "capture_malformed", "capture_delivery_failed", "capture_parser_errors",
                  "capture_inspect_budget_evictions")
PROCESSOR_FIELDS = ("records", "malformed_frames", "malformed_messages", "write_errors",
                    "rejected_samples", "set_aside_failed", "offset_resets", "flows_evicted",
                    "flows_not_stored")


@dataclass(frozen=True)
class Rate:
    """One second of a bps/pps series pair: bytes and frames in that second."""

    bytes: int = 0
    packets: int = 0

    @property
    def bits(self) -> int:
        return self.bytes * 8


@dataclass(frozen=True)
class AppRow:
    name: str
    rate: Rate  # in the shown second
    total_bytes: float  # apps:top:bytes


@dataclass(frozen=True)
class FlowRow:
    id: str
    total_bytes: float  # flows:top:bytes score
    proto: int | None
    src: str
    sport: int | None
    dst: str
    dport: int | None
    app: str
    app_guess: bool
    server_name: str
    packets: int | None


@dataclass
class Snapshot:
    redis_url: str
    taken_at: float  # wall clock, epoch seconds
    error: str | None = None  # Redis unreachable or unusable: nothing else is filled
    second: int | None = None  # epoch second shown (the last complete one); None: no data yet
    newest_second: int | None = None  # newest sample of ts:global:bps
    total: Rate = field(default_factory=Rate)  # the shown second
    history: list[int] = field(default_factory=list)  # bytes per second, oldest first,
    #                                                    HISTORY_S seconds ending at `second`
    history_pps: list[int] = field(default_factory=list)
    protocols: dict[str, Rate] = field(default_factory=dict)
    apps: list[AppRow] = field(default_factory=list)
    hosts: list[tuple[str, float]] = field(default_factory=list)
    domains: list[tuple[str, float]] = field(default_factory=list)
    flows: list[FlowRow] = field(default_factory=list)
    capture: dict[str, int] = field(default_factory=dict)  # pipeline:capture
    processor: dict[str, int] = field(default_factory=dict)  # pipeline:processor
    window: str = "all"  # what the rankings count over (WINDOWS)
    lag: tuple[int, int] | None = None  # (epoch ms, messages) of the newest lag sample
    notes: list[str] = field(default_factory=list)  # e.g. a command Redis refused

    @property
    def has_data(self) -> bool:
        return self.second is not None

    @property
    def stale(self) -> bool:
        """The newest data is well behind the wall clock (a replayed capture, or no traffic)."""
        return self.newest_second is not None and (
            self.taken_at - (self.newest_second + 1) > STALE_AFTER_S)


# ---------------------------------------------------------------------------------------------
# Redis


def connect(url: str, timeout: float = 2.0) -> redis.Redis:
    """A client that gives up quickly: the view retries every refresh instead."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


WINDOWS = ("all", "5m", "1h", "24h")  # the top-N sets' windows of capture time


def top_key(kind: str, window: str) -> str:
    """The top-N set of hosts, apps or domains (bytes) for a window: hosts:top:bytes (all
    time), hosts:top:1h:bytes, ..."""
    return f"{kind}:top:bytes" if window == "all" else f"{kind}:top:{window}:bytes"


def queue_commands(pipe, top: int, window: str = "all") -> None:
    """The commands of one refresh, in the order `build` reads their replies. A window other
    than "all" ranks hosts, applications, domains and flows over that window of capture time
    (flows from their "TCP a:p -> b:p (id)" labels)."""
    count = HISTORY_S + RECENT_SAMPLES
    pipe.execute_command("TS.REVRANGE", GLOBAL_BPS, "-", "+", "COUNT", count)
    pipe.execute_command("TS.REVRANGE", GLOBAL_PPS, "-", "+", "COUNT", count)
    pipe.execute_command("TS.MREVRANGE", "-", "+", "COUNT", RECENT_SAMPLES,
                         "FILTER", "dimension=protocol")
    pipe.execute_command("TS.MREVRANGE", "-", "+", "COUNT", RECENT_SAMPLES,
                         "FILTER", "dimension=app")
    pipe.zrevrange(top_key("apps", window), 0, 49, withscores=True)
    pipe.zrevrange(top_key("hosts", window), 0, top - 1, withscores=True)
    pipe.zrevrange(top_key("domains", window), 0, top - 1, withscores=True)
    if window == "all":
        pipe.zrevrange("flows:top:bytes", 0, top - 1, withscores=True)
    else:
        pipe.zrevrange(f"flows:top:{window}:endpoints", 0, top - 1, withscores=True)
    pipe.hgetall("pipeline:capture")
    pipe.hgetall("pipeline:processor")
    pipe.execute_command("TS.GET", LAG_SERIES)


def fetch(client: redis.Redis, url: str, *, top: int = 10, settle_s: float = DEFAULT_SETTLE_S,
          now: float | None = None, window: str = "all") -> Snapshot:
    """One snapshot: one pipeline round trip. Never raises for Redis trouble: the snapshot's
    `error` says what went wrong, in one line."""
    taken_at = time.time() if now is None else now
    try:
        pipe = client.pipeline(transaction=False)
        queue_commands(pipe, top, window)
        replies = pipe.execute(raise_on_error=False)
        replies[FLOWS_REPLY] = join_flow_meta(client, replies[FLOWS_REPLY])
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return Snapshot(url, taken_at, error=f"Redis at {url} is not reachable ({_reason(exc)})")
    except redis.RedisError as exc:
        return Snapshot(url, taken_at, error=f"Redis at {url} cannot be read ({exc})")
    return build(replies, url, taken_at, settle_s=settle_s, window=window)


FLOWS_REPLY = 7  # index of the top flows' reply in queue_commands


def join_flow_meta(client: redis.Redis, top_flows) -> list | Exception:
    """[[id, score, [meta fields...]], ...] for the top flows: their hashes in a second round
    trip (plain reads, which a read-only Redis user may run; no script)."""
    if isinstance(top_flows, Exception) or not top_flows:
        return top_flows
    # a window's set holds labels "TCP a:p -> b:p (id)": the id ends them
    top_flows = [(member.rsplit("(", 1)[-1].rstrip(")"), score) for member, score in top_flows]
    pipe = client.pipeline(transaction=False)
    for flow_id, _score in top_flows:
        pipe.hmget(f"flow:{flow_id}:meta", *FLOW_FIELDS)
    metas = pipe.execute(raise_on_error=False)
    return [[flow_id, score, meta] for (flow_id, score), meta in zip(top_flows, metas)]


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    # redis-py says "Error 111 connecting to host:port. Connection refused." - keep the cause
    if "connecting to" in text and ". " in text:
        text = text.rsplit(". ", 1)[-1].rstrip(".") or text
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# Replies -> Snapshot (no I/O)


def build(replies: list, url: str, taken_at: float, *,
          settle_s: float = DEFAULT_SETTLE_S, window: str = "all") -> Snapshot:
    """The snapshot of one refresh from the replies of `queue_commands` (errors included)."""
    (bps_r, pps_r, proto_r, app_r, apps_top_r, hosts_r, domains_r, flows_r, capture_r,
     processor_r, lag_r) = replies
    snap = Snapshot(url, taken_at, window=window)
    for reply in replies:
        if isinstance(reply, redis.ConnectionError | redis.TimeoutError):
            snap.error = f"Redis at {url} is not reachable ({_reason(reply)})"
            return snap
        if isinstance(reply, Exception) and "unknown command" in str(reply).lower():
            snap.error = (f"Redis at {url} has no RedisTimeSeries module ({reply}): "
                          "point --redis-url at Redis Stack")
            return snap

    bps = _samples(bps_r, snap, GLOBAL_BPS)
    pps = _samples(pps_r, snap, GLOBAL_PPS)
    snap.capture = _counters(capture_r, CAPTURE_FIELDS)
    snap.processor = _counters(processor_r, PROCESSOR_FIELDS)
    if not isinstance(lag_r, Exception) and lag_r:
        snap.lag = (int(lag_r[0]), int(float(lag_r[1])))
    if bps:
        snap.newest_second = max(bps) // 1000
        snap.second = choose_second(sorted(bps), taken_at, settle_s)
    if snap.second is not None:
        shown_ms = snap.second * 1000
        snap.total = Rate(int(bps.get(shown_ms, 0)), int(pps.get(shown_ms, 0)))
        first = snap.second - HISTORY_S + 1
        snap.history = [int(bps.get(s * 1000, 0)) for s in range(first, snap.second + 1)]
        snap.history_pps = [int(pps.get(s * 1000, 0)) for s in range(first, snap.second + 1)]
        snap.protocols = _rates_at(proto_r, shown_ms, snap)
        app_rates = _rates_at(app_r, shown_ms, snap)
    else:
        app_rates = {}
    apps_top = _zset(apps_top_r, snap, "apps:top:bytes")
    snap.apps = _apps(app_rates, apps_top)
    snap.hosts = _zset(hosts_r, snap, "hosts:top:bytes")
    snap.domains = _zset(domains_r, snap, "domains:top:bytes")
    snap.flows = _flows(flows_r, snap)
    return snap


def choose_second(times_ms: list[int], now: float,
                  settle_s: float = DEFAULT_SETTLE_S) -> int | None:
    """The last complete second (epoch seconds) among sample times (ms, ascending), or None.

    The sample at T covers [T, T + 1 s). A second that ended less than `settle_s` ago (wall
    clock) may still be growing (settle 0: only the current second is); the newest sample older
    than that is shown. When every sample is older, as after a replay of a capture file, that
    is simply the newest sample, whatever its age. None: only seconds still being filled."""
    limit_ms = (now - settle_s - 1.0) * 1000
    complete = [t for t in times_ms if t <= limit_ms]
    return complete[-1] // 1000 if complete else None


def _samples(reply, snap: Snapshot, key: str) -> dict[int, float]:
    if isinstance(reply, Exception):
        if "does not exist" not in str(reply):  # a missing series is just "no data yet"
            snap.notes.append(f"{key}: {reply}")
        return {}
    return {int(ts): float(value) for ts, value in reply or ()}


def _series_replies(reply) -> list[tuple[str, list]]:
    """TS.MREVRANGE replies as (key, samples), for RESP2 (list) and RESP3 (map) clients."""
    if isinstance(reply, dict):
        return [(key, value[-1]) for key, value in reply.items()]
    return [(item[0], item[-1]) for item in reply or ()]


def _rates_at(reply, shown_ms: int, snap: Snapshot) -> dict[str, Rate]:
    """{name: Rate at shown_ms} from the ts:<dimension>:<name>:<metric> series replies."""
    if isinstance(reply, Exception):
        snap.notes.append(f"TS.MREVRANGE: {reply}")
        return {}
    cells: dict[str, list[int]] = {}
    for key, samples in _series_replies(reply):
        parts = key.split(":")
        if len(parts) < 4 or parts[-1] not in ("bps", "pps"):
            continue
        name = ":".join(parts[2:-1])
        cell = cells.setdefault(name, [0, 0])
        for ts, value in samples or ():
            if int(ts) == shown_ms:
                cell[parts[-1] == "pps"] = int(float(value))
    return {name: Rate(b, p) for name, (b, p) in cells.items()}


def _zset(reply, snap: Snapshot, key: str) -> list[tuple[str, float]]:
    if isinstance(reply, Exception):
        snap.notes.append(f"{key}: {reply}")
        return []
    return [(member, float(score)) for member, score in reply or ()]


def _counters(reply, names: tuple[str, ...]) -> dict[str, int]:
    if isinstance(reply, Exception) or not reply:
        return {}
    out = {name: 0 for name in names}
    for name, value in reply.items():
        try:
            out[name] = int(value)
        except ValueError:
            continue
    return out


def _apps(rates: dict[str, Rate], totals: list[tuple[str, float]]) -> list[AppRow]:
    total = dict(totals)
    names = [name for name, _ in totals]
    names += sorted(n for n, r in rates.items() if n not in total and (r.bytes or r.packets))
    return [AppRow(n, rates.get(n, Rate()), total.get(n, 0.0)) for n in names]


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _flows(reply, snap: Snapshot) -> list[FlowRow]:
    if isinstance(reply, Exception):
        snap.notes.append(f"top flows: {reply}")
        return []
    rows = []
    for flow_id, score, values in reply or ():
        meta = dict(zip(FLOW_FIELDS, values or ()))
        rows.append(FlowRow(
            id=flow_id, total_bytes=float(score), proto=_int(meta.get("proto")),
            src=meta.get("src") or "?", sport=_int(meta.get("sport")),
            dst=meta.get("dst") or "?", dport=_int(meta.get("dport")),
            app=meta.get("app") or "", app_guess=meta.get("app_guess") == "1",
            server_name=meta.get("server_name") or "",
            packets=_int(meta.get("packets")) if snap.window == "all" else None,
        ))
    return rows
