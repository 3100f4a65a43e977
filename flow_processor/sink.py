"""Writing aggregates to Redis exactly once.

Each partition's offset lives in Redis next to the data (key pipeline:offsets:<group>:<topic>:
<partition>). A flush WATCHes the offset keys of the partitions it writes, checks that each still
holds the offset this process started its aggregates from, and writes every sum, flow update and
the new offsets in one MULTI/EXEC. So a write lands whole or not at all, a replay after a crash
starts exactly after what was written, and a process that lost a partition to another (a fence)
finds a different offset there and drops what it had instead of counting it twice.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError, WatchError
from redis.retry import Retry

from flow_processor.aggregate import PartitionState
from flow_processor.flows import Flow
from flow_processor.settings import ProcessorSettings
from packet_records import PROTOCOLS, STATS_COUNTERS
from packet_records.apps import APPS
from packet_records.runtime import StartupError

log = logging.getLogger(__name__)

MADD_CHUNK = 2000  # samples per TS.MADD
FLOWS_PER_CALL = 1000  # flows per call of flows.lua (a call blocks Redis while it runs)
FLOWS_LUA = Path(__file__).with_name("flows.lua")
APP_SERIES = tuple(f"ts:app:{app}" for app in APPS)  # by app id
METRICS = (("bps", 0), ("pps", 1))  # series suffix, index in the [bytes, packets] cells
TOP_FLOWS = "flows:top:bytes"
TOP_APPS, TOP_HOSTS, TOP_DOMAINS = "apps:top:bytes", "hosts:top:bytes", "domains:top:bytes"
TOP_SETS = (TOP_FLOWS, "flows:top:endpoints", TOP_APPS, TOP_HOSTS, TOP_DOMAINS)
COUNTERS = "pipeline:processor"
PROCESSOR_COUNTERS = ("records", "malformed_frames", "malformed_messages", "rejected_samples",
                      "write_errors", "set_aside_failed", "offset_resets")
LAG_SERIES = "ts:health:consumer_lag:count"
# Replies of a Redis that is up but refuses writes for now (out of memory, a failed save
# with stop-writes-on-bgsave-error, a replica, loading a dataset): wait, as for an outage.
REFUSING_PREFIXES = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS")
# Loss of the connection, and refusals: the processor pauses and retries both.
REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OutOfMemoryError, ReadOnlyError)


def redis_refusing(exc: BaseException) -> bool:
    """Is this error Redis being unavailable for writes for now, rather than a bug?"""
    if isinstance(exc, REDIS_UNAVAILABLE):
        return True
    # redis-py prefixes errors inside a transaction with "Command # N (...) caused error: "
    reply = str(exc).rsplit("caused error: ", 1)[-1]
    return isinstance(exc, ResponseError) and reply.startswith(REFUSING_PREFIXES)
CAPTURE_COUNTERS = "pipeline:capture"  # totals of the capture stats messages


def ns_text(ns: int) -> str:
    """Epoch seconds with nanosecond digits, as tshark prints frame.time_epoch."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


@dataclass
class WriteResult:
    written: list[PartitionState] = field(default_factory=list)
    fenced: list[tuple[PartitionState, int | None]] = field(default_factory=list)
    rejected_samples: int = 0
    write_errors: int = 0


class RedisSink:
    def __init__(self, settings: ProcessorSettings):
        self.settings = settings
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=30, socket_connect_timeout=5,
            retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self.offset_prefix = f"pipeline:offsets:{settings.kafka_group_id}:{settings.kafka_topic}:"
        # the topic's id (it changes when the topic is recreated) each partition's offset is of
        self.topic_id_prefix = (f"pipeline:topic_id:{settings.kafka_group_id}:"
                                f"{settings.kafka_topic}:")
        self.created: set[str] = set()
        self.flows_script = self.redis.register_script(FLOWS_LUA.read_text())

    def check(self) -> None:
        """Fail at start with one clear line when Redis or RedisTimeSeries is missing, or the
        address answers with something that is not Redis; then create the aggregate series."""
        where = redact_url(self.settings.redis_url)
        probe = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5,
                                     socket_connect_timeout=5)
        try:
            probe.ping()
            probe.execute_command("TS.INFO", "pipeline:probe:none")
        except ResponseError as exc:
            text = str(exc).lower()
            if "unknown command" in text:
                raise StartupError(
                    f"Redis at {where} has no RedisTimeSeries module (use Redis Stack)") from None
            if "key does not exist" not in text and not redis_refusing(exc):
                raise StartupError(f"Redis at {where} refused the check: {exc}") from None
        except redis.AuthenticationError as exc:
            raise StartupError(f"Redis at {where} refused the credentials: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StartupError(f"Redis at {where} not reachable (or not Redis): {exc}") from None
        except redis.RedisError as exc:  # a protocol error: something else listens there
            raise StartupError(f"{where} does not answer like Redis: {exc}") from None
        finally:
            probe.close()
        delay, told = 0.5, False
        while True:  # a Redis that refuses writes for now (full, failed save): wait for it
            try:
                self.ensure_series()
                return
            except redis.RedisError as exc:
                if not redis_refusing(exc):
                    raise
                if not told:
                    log.warning("Redis cannot take writes (%s): waiting for it", exc)
                    told = True
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    def ensure_series(self) -> None:
        """Create the aggregate and health series, also again when Redis was emptied while we
        ran, so that dashboards show "no data" instead of errors before the first traffic."""
        if self.created and not self.redis.exists("ts:global:pps"):
            log.warning("the aggregate series are gone (Redis was emptied?): creating them again")
            self.created.clear()
        self._create_series(self._series_to_create())

    def stored_offset(self, partition: int) -> int | None:
        return self.stored_offsets([partition])[0]

    def stored_offsets(self, partitions: list[int]) -> list[int | None]:
        values = self.redis.mget([self.offset_prefix + str(p) for p in partitions])
        return [int(v) if v is not None else None for v in values]

    def stored_topic_ids(self, partitions: list[int]) -> list[str | None]:
        values = self.redis.mget([self.topic_id_prefix + str(p) for p in partitions])
        return [v.decode() if v is not None else None for v in values]

    # -- series creation -------------------------------------------------------------------

    def _series_to_create(self) -> list[tuple[str, int, dict]]:
        """The aggregate series this process has not created yet (flow series: flows.lua)."""
        out = []
        aggregate_retention = self.settings.series_retention_ms
        for metric, _ in METRICS:
            out.append((f"ts:global:{metric}", aggregate_retention,
                        {"dimension": "global", "metric": metric}))
            for proto in PROTOCOLS:
                out.append((f"ts:protocol:{proto}:{metric}", aggregate_retention,
                            {"dimension": "protocol", "protocol": proto, "metric": metric}))
            for app in APPS:
                out.append((f"ts:app:{app}:{metric}", aggregate_retention,
                            {"dimension": "app", "app": app, "metric": metric}))
        for name in STATS_COUNTERS:
            out.append((f"ts:health:{name}:count", 0, {"dimension": "health", "metric": name}))
        # global/pps goes last: ensure_series takes its presence for "all were created"
        out.sort(key=lambda item: item[0] == "ts:global:pps")
        return [item for item in out if item[0] not in self.created]

    def _create_series(self, series: list[tuple[str, int, dict]]) -> None:
        if not series:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, retention, labels in series:
            args = ["TS.CREATE", key, "RETENTION", retention, "DUPLICATE_POLICY", "SUM", "LABELS"]
            for name, value in labels.items():
                args += [name, value]
            pipe.execute_command(*args)
        pipe.execute_command("TS.CREATE", LAG_SERIES, "RETENTION", 7 * 86_400_000,
                             "DUPLICATE_POLICY", "LAST", "LABELS", "dimension", "health",
                             "metric", "consumer_lag")
        results = pipe.execute(raise_on_error=False)
        if isinstance(results[-1], Exception) and "already exists" not in str(results[-1]):
            raise results[-1]
        for (key, _, _), result in zip(series, results):
            if isinstance(result, Exception) and "already exists" not in str(result):
                raise result
            self.created.add(key)

    # -- the transaction -------------------------------------------------------------------

    def write(self, states: list[PartitionState]) -> WriteResult:
        """Write the aggregates of these partitions with their offsets, exactly once."""
        self._create_series(self._series_to_create())
        keys = [self.offset_prefix + str(s.partition) for s in states]
        while True:
            result = WriteResult()
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    stored = [int(v) if v is not None else None for v in pipe.mget(keys)]
                    writable = []
                    for state, offset in zip(states, stored):
                        if offset == state.base_offset:
                            writable.append(state)
                        elif offset == state.next_offset:
                            result.written.append(state)  # our earlier EXEC landed, reply lost
                        else:
                            result.fenced.append((state, offset))
                    if not writable:
                        pipe.unwatch()
                        return result
                    pipe.multi()
                    sample_commands = self._queue_writes(pipe, writable)
                    replies = pipe.execute(raise_on_error=False)
                except WatchError:
                    continue  # an offset moved under us: look again
            result.rejected_samples = self._count_rejected(replies, sample_commands)
            failed = [r for r in replies[:len(replies) - sample_commands]
                      if isinstance(r, Exception)]
            if failed:  # a bug, not bad data: say it loudly (the rest of the EXEC landed)
                result.write_errors = len(failed)
                log.error("%d commands of a flush failed, first: %s", len(failed), failed[0])
            result.written.extend(writable)
            return result

    def _queue_writes(self, pipe, states: list[PartitionState]) -> int:
        """Queue the whole flush; return how many TS.MADD commands end the replies."""
        for state in states:
            for (name, sec), value in state.health.items():
                pipe.execute_command("TS.ADD", f"ts:health:{name}:count", sec * 1000, value,
                                     "ON_DUPLICATE", "SUM", "LABELS", "dimension", "health",
                                     "metric", name)
            for name, value in state.capture_totals.items():
                pipe.hincrby(CAPTURE_COUNTERS, name, value)
        # flows first: flows.lua creates the series of new flows that TS.MADD then writes
        self._queue_flows(pipe, [f for state in states for f in state.dirty_flows])
        unknown = sum(cell[0] for state in states for cell in state.no_flow.values())
        if unknown:
            pipe.zincrby(TOP_APPS, unknown, "UNKNOWN")
        counters = {
            "records": sum(s.records for s in states),
            "malformed_frames": sum(s.malformed_frames for s in states),
            "malformed_messages": sum(s.malformed_messages for s in states),
        }
        for name, value in counters.items():
            if value:
                pipe.hincrby(COUNTERS, name, value)
        for state in states:
            pipe.set(self.offset_prefix + str(state.partition), state.next_offset)
            if state.topic_id:
                pipe.set(self.topic_id_prefix + str(state.partition), state.topic_id)
        return self._queue_samples(pipe, states)

    def _queue_samples(self, pipe, states: list[PartitionState]) -> int:
        """TS.MADD every sample of the flush. Aggregate series are summed across partitions
        first (each duplicate would re-encode a chunk) and go oldest first, so a retention
        window never refuses an older sample written after a newer one. A flow lives on one
        partition: its (flow, second) cells are already unique and in capture order."""
        totals: dict[tuple[int, str], list[int]] = {}

        def add(sec: int, series: str, cell: list[int]) -> None:
            total = totals.get((sec, series))
            if total is None:
                totals[(sec, series)] = [cell[0], cell[1]]
            else:
                total[0] += cell[0]
                total[1] += cell[1]

        args: list = []
        for state in states:
            for sec, cell in state.global_.items():
                add(sec, "ts:global", cell)
            for (proto, sec), cell in state.protocols.items():
                add(sec, f"ts:protocol:{proto}", cell)
            for sec, cell in state.no_flow.items():
                add(sec, "ts:app:UNKNOWN", cell)
            app_keys = APP_SERIES
            for (flow, sec), cell in state.flow_seconds.items():
                ms = sec * 1000
                args += (flow.bps_key, ms, cell[0], flow.pps_key, ms, cell[1])
                add(sec, app_keys[flow.app], cell)
        for (sec, series), cell in sorted(totals.items()):
            ms = sec * 1000
            args += (series + ":bps", ms, cell[0], series + ":pps", ms, cell[1])
        commands = 0
        step = 3 * MADD_CHUNK
        for start in range(0, len(args), step):
            pipe.execute_command("TS.MADD", *args[start:start + step])
            commands += 1
        return commands

    def _queue_flows(self, pipe, flows: list[Flow]) -> None:
        s = self.settings
        for start in range(0, len(flows), FLOWS_PER_CALL):
            args: list = [s.flow_series_retention_ms, s.flow_series_chunk_bytes]
            for f in flows[start:start + FLOWS_PER_CALL]:
                args += [f.id, f.delta_bytes, f.delta_packets, ns_text(f.last_ns), int(f.new),
                         f.src, f.dst, f.sport, f.dport, f.proto, ns_text(f.first_ns),
                         int(f.labels_changed), APPS[f.app], int(f.app_guess),
                         f.server_name or "", f.fingerprint or "", f.label]
            self.flows_script(args=args, client=pipe)

    @staticmethod
    def _count_rejected(replies: list, madd_commands: int) -> int:
        rejected = 0
        for reply in replies[len(replies) - madd_commands:]:
            if isinstance(reply, Exception):
                raise reply  # a whole TS.MADD refused: a bug, not bad data
            for item in reply:
                if isinstance(item, Exception):
                    rejected += 1
                    if rejected == 1:
                        log.warning("RedisTimeSeries refused a sample: %s", item)
        return rejected

    # -- after a write ---------------------------------------------------------------------

    def expire_flows(self, flows: list[Flow]) -> None:
        """Flows that left the table: their keys expire flow_ttl_s later unless they return."""
        if not flows:
            return
        pipe = self.redis.pipeline(transaction=False)
        ttl = self.settings.flow_ttl_s
        for flow in flows:
            for key in (f"flow:{flow.id}:meta", f"ts:flow:{flow.id}:bps", f"ts:flow:{flow.id}:pps"):
                pipe.expire(key, ttl)
        pipe.execute()

    def trim_top(self) -> None:
        """Keep the top-N sets bounded (hosts and domains grow with every new name)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in TOP_SETS:
            pipe.zremrangebyrank(key, 0, -(self.settings.top_flows_kept + 1))
        pipe.execute()

    def record_lag(self, lag: int) -> None:
        """Consumer lag of the whole group now (a gauge: every member computes the same)."""
        self.redis.execute_command(
            "TS.ADD", LAG_SERIES, "*", lag, "ON_DUPLICATE", "LAST",
            "RETENTION", 7 * 86_400_000, "LABELS", "dimension", "health", "metric",
            "consumer_lag")

    def reset_data(self) -> int:
        """Delete every key of this database but the stored offsets and topic ids: the figures
        start from zero and nothing already in the topic is read again."""
        keep = (b"pipeline:offsets:", b"pipeline:topic_id:")
        removed = 0
        batch: list[bytes] = []
        for key in self.redis.scan_iter(count=1000):
            if not key.startswith(keep):
                batch.append(key)
            if len(batch) >= 1000:
                removed += self.redis.unlink(*batch)
                batch = []
        if batch:
            removed += self.redis.unlink(*batch)
        self.created.clear()
        return removed

    def add_counters(self, counts: dict[str, int]) -> None:
        """Add to pipeline:processor counters kept outside the flush transaction (errors)."""
        pipe = self.redis.pipeline(transaction=False)
        for name, value in counts.items():
            pipe.hincrby(COUNTERS, name, value)
        pipe.execute()


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, credentials = head.partition("://")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{tail}"

