"""Writing aggregates to Redis exactly once.

Each partition's offset lives in Redis next to the data (key pipeline:offsets:<group>:<topic>:
<partition>). A flush WATCHes the offset keys of the partitions it writes, checks that each still
holds the offset this process started its aggregates from, and writes the per-second sums, the
new offsets and its flow updates in one MULTI/EXEC. So a write lands whole or not at all, a
replay after a crash starts exactly after what was written, and a process that lost a partition
to another (a fence) finds a different offset there and drops what it had instead of counting
it twice.

The flow updates (flow hashes, top-N sets, TTLs) are the bulk of a flush: the transaction only
pushes them to a journal list (pipeline:journal2:<group>:<topic>), as entries of at most
JOURNAL_FLOWS flows (MessagePack: it packs and unpacks in two thirds of the time of JSON), and
the entries are then applied and removed by short script calls (journal.lua). So no single
command holds Redis for long whatever a flush holds, and an entry is applied exactly once: its
push landed with the offsets, its application with its removal.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError, WatchError
from redis.retry import Retry

from flow_processor.aggregate import PartitionState
from flow_processor.flows import Flow, sum_by_key
from flow_processor.settings import ProcessorSettings
from packet_records import PROTOCOLS, STATS_COUNTERS
from packet_records.apps import APPS
from packet_records.runtime import StartupError
from packet_records.security import redact_url

log = logging.getLogger(__name__)

MADD_CHUNK = 2000  # samples per TS.MADD
# A partition's samples past the first MADD_CHUNK go to the write journal in entries of
# JOURNAL_SAMPLES, applied one script call each: a sample older than its series' newest is
# rewritten into a compressed chunk (30-100 us, not 1), and records spread over thousands of
# past seconds (an old capture replayed into a running pipeline, or a forged message) made
# one transaction of hundreds of thousands of them that held Redis for over a minute
JOURNAL_SAMPLES = 500
# Flows per journal entry: applying one (about 10 Redis calls a flow) holds Redis for 5-10 ms
# (more on a machine short of CPU); other clients get in between entries
JOURNAL_FLOWS = 500
JOURNAL_INCREMENTS = 1000  # top-N increments of hosts, applications, domains per entry
# A drain call applies journal entries until they add up to this many bytes: with one entry a
# call, the writer thread waited for the processor's thread (Python's GIL) before each call
# while the processor built the rest of a flush, and Redis sat half idle through the end of a
# replay (65,000 flows: 194 calls, 75 now). Entries of this many bytes hold Redis for 10-30 ms
# (twice as many: up to 50).
DRAIN_BYTES = 128 * 1024
PREPARE_CHUNK = 2000  # commands per pipeline that creates flow series before a transaction
TRIM_CHUNK = 10000  # members removed from a top-N set per command
# A flush is cut into transactions of about this cost, whole partitions each: the samples of
# its TS.MADD (about 1 us each in Redis) and JOURNAL_ENTRY_COST a journal entry pushed
TRANSACTION_COST = 20000
JOURNAL_ENTRY_COST = 50
# A partition's write of at least this many journal entries (more than JOURNAL_FLOWS flows,
# or flows and top-N increments) ends its group: streamed to the writer thread, Redis applies
# it while the next partitions' are built (20,000 flows replayed: all in Redis 1.7-2.1 s after
# capture's exit instead of 1.9-2.3 s with groups of 8 entries, which made 12 partitions of
# 1,700 flows one group, built before any of it was sent)
SEND_AT_ONCE_ENTRIES = 2
TOP_LUA = Path(__file__).with_name("top.lua")
JOURNAL_LUA = Path(__file__).with_name("journal.lua")
APP_SERIES = tuple(f"ts:app:{app}" for app in APPS)  # by app id
METRICS = (("bps", 0), ("pps", 1))  # series suffix, index in the [bytes, packets] cells
TOP_FLOWS = "flows:top:bytes"
# Sets with time windows, in the order of top.lua's SETS
WINDOWED_SETS = (("hosts", "bytes"), ("apps", "bytes"), ("domains", "bytes"),
                 ("flows", "endpoints"))
WINDOWS = ("5m", "1h", "24h")
TOP_SETS = (TOP_FLOWS, *(f"{a}:top:{b}" for a, b in WINDOWED_SETS),
            *(f"{a}:top:{w}:{b}" for a, b in WINDOWED_SETS for w in WINDOWS))
COUNTERS = "pipeline:processor"
PROCESSOR_COUNTERS = ("records", "malformed_frames", "malformed_messages", "rejected_samples",
                      "write_errors", "set_aside_failed", "offset_resets", "flows_evicted",
                      "flows_not_stored")
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


def both_offsets(values: list) -> list[tuple[int | None, int | None]]:
    """Pairs (series offset, flow offset) from the series offsets followed by the flow offsets
    of the same partitions. Offsets stored before the flow part had its own are both."""
    half = len(values) // 2
    return [(s, s if f is None else f) for s, f in zip(values[:half], values[half:])]


def _increments(members: dict) -> list:
    """{member: increment} as top.lua takes it: [increment, member, ...], zeros left out."""
    return [x for member, value in members.items() if value for x in (value, member)]


def _by_increments(groups: list, limit: int) -> list[list]:
    """top.lua groups in consecutive runs of at most `limit` increments (a bigger group
    alone)."""
    runs: list[list] = []
    count = 0
    for group in groups:
        n = len(group[2]) // 2
        if not runs or count + n > limit:
            runs.append([])
            count = 0
        runs[-1].append(group)
        count += n
    return runs


# journal.lua's flat flow fields for labels not changed, and for a write that is not a flow's
# first
_NO_LABELS = (0, 0, "", "")
_NOT_FIRST = (0, 0, 0, 0, 0, 0)


def ns_text(ns: int) -> str:
    """Epoch seconds with nanosecond digits, as tshark prints frame.time_epoch (cut from the
    decimal digits: a quarter of the time of dividing, for two of these a flow)."""
    digits = str(ns).rjust(10, "0")
    return f"{digits[:-9]}.{digits[-9:]}"


class Recorder:
    """Stands in for a pipeline while a write is built: keeps the commands to send later."""

    def __init__(self) -> None:
        self.commands: list[tuple] = []

    def execute_command(self, *args) -> None:
        self.commands.append(args)


@dataclass
class PartitionWrite:
    """One partition's flush, built and ready to send. It is sent while the processor reads on,
    and sent again as it is after an error: the offset fence makes it land exactly once."""
    state: PartitionState
    partition: int
    base_offset: int | None  # the offset Redis must hold for this write to apply
    next_offset: int | None  # the offset it stores
    before: list[tuple]  # series creation and TTLs, outside the transaction (idempotent)
    commands: list[tuple]  # its part of the MULTI/EXEC
    madd: int  # how many TS.MADD end `commands`
    cost: int  # what its part of the transaction costs Redis (TRANSACTION_COST)
    flow_base: int | None = None  # the same two for the flow part's offset
    flow_next: int | None = None


@dataclass
class WriteResult:
    written: list[PartitionWrite] = field(default_factory=list)
    fenced: list[tuple[PartitionWrite, int | None]] = field(default_factory=list)
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
        # the flow part's offsets (flow hashes, top-N sets, counters; see journal.lua): never
        # after the series part's; a replay reads from them, for the flow part only up to those
        self.flow_offset_prefix = (f"pipeline:flow_offsets:{settings.kafka_group_id}:"
                                   f"{settings.kafka_topic}:")
        # the topic's id (it changes when the topic is recreated) each partition's offset is of
        self.topic_id_prefix = (f"pipeline:topic_id:{settings.kafka_group_id}:"
                                f"{settings.kafka_topic}:")
        self.created: set[str] = set()
        self.created_counters = False
        self.journal = f"pipeline:journal2:{settings.kafka_group_id}:{settings.kafka_topic}"
        # the JSON entries of earlier versions: applied too (first), never written. A key of
        # their own: a member of an earlier version (a rolling upgrade) cannot read MessagePack
        self.json_journal = (f"pipeline:journal:{settings.kafka_group_id}:"
                             f"{settings.kafka_topic}")
        # top.lua's functions, and the journal's 'drain' (journal.lua), in one script; it is
        # only called outside transactions (where redis-py loads it again after a restart)
        self.script = self.redis.register_script(TOP_LUA.read_text() + "\n"
                                                 + JOURNAL_LUA.read_text())
        self.errors_told: set[str] = set()  # _key_in_the_way()
        self.flows_not_stored = 0  # by this process (PROBE_FLOWS_STORED), for its log lines
        # FLOW_SERIES=top: flows this process gave series to, by id, with their totals then
        # (the highest FLOW_SERIES_TOP): they count among the top (top_scores) before their
        # flow write puts them in flows:top:bytes
        self.series_given: dict[str, int] = {}

    def check(self) -> None:
        """Fail at start with one clear line when Redis or RedisTimeSeries is missing, or the
        address answers with something that is not Redis; then create the aggregate series
        and apply what is left in the journal."""
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
                failed = self.drain_journal()  # what a processor that stopped left to apply
                if failed:
                    self.add_counters({"write_errors": failed})
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
        if not self.created_counters or not self.redis.exists(COUNTERS):
            pipe = self.redis.pipeline(transaction=False)
            for name in PROCESSOR_COUNTERS:  # every counter shows, as 0 until it counts
                pipe.hsetnx(COUNTERS, name, 0)
            pipe.execute()
            self.created_counters = True

    def stored_offsets(self, partitions: list[int]) -> list[int | None]:
        """The series part's stored offsets."""
        values = self.redis.mget([self.offset_prefix + str(p) for p in partitions])
        return [int(v) if v is not None else None for v in values]

    def stored_offset_pairs(self, partitions: list[int]) -> list[tuple[int | None, int | None]]:
        """(series part, flow part) stored offsets of each partition (both_offsets)."""
        values = self.redis.mget([self.offset_prefix + str(p) for p in partitions]
                                 + [self.flow_offset_prefix + str(p) for p in partitions])
        return both_offsets([int(v) if v is not None else None for v in values])

    def stored_topic_ids(self, partitions: list[int]) -> list[str | None]:
        values = self.redis.mget([self.topic_id_prefix + str(p) for p in partitions])
        return [v.decode() if v is not None else None for v in values]

    # -- series creation -------------------------------------------------------------------

    def _series_to_create(self) -> list[tuple[str, int, dict]]:
        """The aggregate series this process has not created yet (flow series: _prepare_flows)."""
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

    # -- the transactions ------------------------------------------------------------------

    def top_scores(self) -> dict[str, float]:
        """The current top FLOW_SERIES_TOP flows, flow id -> total bytes (FLOW_SERIES=top
        decides with them): those of flows:top:bytes and of the flows this process gave
        series to (series_given), which reach that set with their flow write only. Without
        the latter, every flush of every partition would give its own top flows series while
        flows:top:bytes still lacks them (a replay's flows are written at its end): 65,000
        short flows replayed end to end gave about 5,000 flows series instead of 100."""
        s = self.settings
        if s.flow_series != "top" or not s.flow_series_top:
            return {}
        top = dict(self.series_given)
        for member, score in self.redis.zrevrange(TOP_FLOWS, 0, s.flow_series_top - 1,
                                                  withscores=True):
            member = member.decode()
            top[member] = max(score, top.get(member, 0))
        return top

    def _count_given(self, top: dict[str, float], chosen: list) -> None:
        """Flows that got series (plan_series) join the top scores, the highest kept."""
        if not chosen:
            return
        for flow, total in chosen:
            top[flow.id] = max(total, top.get(flow.id, 0))
        n = self.settings.flow_series_top
        if len(top) > n:
            kept = sorted(top.items(), key=lambda item: item[1], reverse=True)[:n]
            top.clear()
            top.update(kept)
        self.series_given = dict(top)

    def prepare(self, states: list[PartitionState], flows: bool = True,
                ) -> list[list[PartitionWrite]]:
        """Build the writes of these partitions' aggregates with their offsets, and clear the
        aggregates (they live on in the writes until these land): the series part, and with
        flows the flow part too (a partition's first write and one restarting at the topic's
        earliest offset always have it: both offsets are stored from there on). A flush
        with many samples is cut into several MULTI/EXEC (the groups returned), each holding
        whole partitions (at least one) and fenced by WATCH on their offset keys."""
        return list(self.prepare_groups(states, flows))

    def prepare_groups(self, states: list[PartitionState], flows: bool = True,
                       ) -> Iterator[list[PartitionWrite]]:
        """prepare(), a group at a time: each is complete when yielded, so it can be sent
        while the next is built."""
        self._create_series(self._series_to_create())
        s = self.settings
        scores = self.top_scores()
        # a partition's first write stores where its flow part starts (the first message read)
        # and leaves the flows for a later write: each flow of a replay is then written once
        # or twice, not once more at the start
        plans = [(state, flows or state.reset or (state.flow_base is None
                                                  and state.flow_start is None))
                 for state in states]
        for state, with_flows in plans:
            if with_flows:
                self.flows_not_stored += state.hold_back_probes(s.probe_flows_stored)
        least = self.least_new_top_total([state for state, with_flows in plans if with_flows])
        group: list[PartitionWrite] = []
        cost = 0
        for state, with_flows in plans:
            flow_next = (state.next_offset if with_flows else state.flow_base
                         if state.flow_base is not None else state.flow_start)
            self._count_given(scores, state.plan_series(
                s.flow_series, s.flow_series_min_bytes, list(scores.values()), s.flow_series_top,
                s.flow_series_max_held))
            before, commands = Recorder(), Recorder()
            self._prepare_flows(state.dirty_flows, before)
            series = state.series_pending
            madd, write_cost, entries = self._queue_writes(commands, state, series, with_flows,
                                                           flow_next, least)
            write = PartitionWrite(
                state, state.partition, state.base_offset,
                state.next_offset if series else state.base_offset, before.commands,
                commands.commands, madd, write_cost, state.flow_base, flow_next)
            state.written(with_flows)
            if group and cost + write.cost > TRANSACTION_COST:
                yield group
                group, cost = [], 0
            group.append(write)
            cost += write.cost
            if entries >= SEND_AT_ONCE_ENTRIES:  # Redis starts on it while the rest is built
                yield group
                group, cost = [], 0
        if group:
            yield group

    def execute(self, groups: list[list[PartitionWrite]], close_newest: bool,
                open_from: int | None = None) -> WriteResult:
        """Send built writes, group after group, apply the journal they filled, then move the
        top-N windows on and trim the top-N sets to TOP_FLOWS_KEPT (after every flush: under
        a scan, sets left to grow for seconds made every increment dearer, 3.3 against 1.7 us
        a ZINCRBY). Safe to call again with the same writes after an error."""
        result = WriteResult()
        for group in groups:
            self.write_group(group, result)
        self.finish_write(result, close_newest, open_from)
        return result

    def write_group(self, group: list[PartitionWrite], result: WriteResult) -> None:
        """Send one group of a flush and apply the journal entries it pushed."""
        for write in group:
            self._send_before(write.before)
        self._write_group(group, result)
        result.write_errors += self.drain_journal()

    def finish_write(self, result: WriteResult, close_newest: bool,
                     open_from: int | None = None) -> None:
        """After a flush's groups: what is left of the journal (a stopped processor's), the
        top-N windows moved on, the top-N sets trimmed."""
        result.write_errors += self.drain_journal()
        self.advance_windows(close_newest, open_from=open_from)
        self.trim_top()

    def _prepare_flows(self, flows: list[Flow], out: Recorder) -> None:
        """Before the transaction, outside it: create the series of flows that get them now
        and (re)set the TTL of their keys. An empty series changes no value, so this needs no
        fence; done here it keeps TS.CREATE (the dearest command) out of the transactions,
        in short pipelines that let other clients in between."""
        ttl = self.settings.flow_ttl_s
        refresh_before = time.monotonic() - ttl / 4
        s = self.settings
        for f in flows:
            if (f.series or f.qualifies) and not f.series_ready:
                for key, metric in ((f.bps_key, "bps"), (f.pps_key, "pps")):
                    out.execute_command(
                        "TS.CREATE", key, "RETENTION", s.flow_series_retention_ms, "CHUNK_SIZE",
                        s.flow_series_chunk_bytes, "DUPLICATE_POLICY", "SUM", "LABELS",
                        "dimension", "flow", "flow_id", f.id, "metric", metric)
                    out.execute_command("EXPIRE", key, ttl)
                f.series_ready = True  # sent before the flush's transaction, or again with it
            elif f.series_ready and f.ttl_at < refresh_before:
                out.execute_command("EXPIRE", f.bps_key, ttl)
                out.execute_command("EXPIRE", f.pps_key, ttl)

    def _send_before(self, commands: list[tuple]) -> None:
        for start in range(0, len(commands), PREPARE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for args in commands[start:start + PREPARE_CHUNK]:
                pipe.execute_command(*args)
            for reply in pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception) and "already exists" not in str(reply):
                    raise reply

    def _write_group(self, writes: list[PartitionWrite], result: WriteResult) -> None:
        """One MULTI/EXEC for these partitions, fenced by WATCH on their offset keys."""
        keys = [self.offset_prefix + str(w.partition) for w in writes]
        keys += [self.flow_offset_prefix + str(w.partition) for w in writes]
        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    values = [int(v) if v is not None else None for v in pipe.mget(keys)]
                    writable = []
                    for write, stored in zip(writes, both_offsets(values)):
                        if stored == (write.base_offset, write.flow_base):
                            writable.append(write)
                        elif stored == (write.next_offset, write.flow_next):
                            result.written.append(write)  # our earlier EXEC landed, reply lost
                        else:
                            result.fenced.append((write, stored))
                    if not writable:
                        pipe.unwatch()
                        return
                    pipe.multi()
                    madd_at: list[int] = []  # positions of the TS.MADD replies
                    for write in writable:
                        for args in write.commands:
                            pipe.execute_command(*args)
                        end = len(pipe.command_stack)
                        madd_at.extend(range(end - write.madd, end))
                    replies = pipe.execute(raise_on_error=False)
                except WatchError:
                    continue  # an offset moved under us: look again
            madd = set(madd_at)
            result.rejected_samples += self._count_rejected([replies[i] for i in madd_at])
            failed = [r for i, r in enumerate(replies)
                      if i not in madd and isinstance(r, Exception)]
            if failed:  # a bug, not bad data: say it loudly (the rest of the EXEC landed)
                result.write_errors += len(failed)
                log.error("%d commands of a flush failed, first: %s", len(failed), failed[0])
            result.written.extend(writable)
            return

    def _queue_writes(self, pipe: Recorder, state: PartitionState, series: bool,
                      flows: bool, flow_offset: int | None,
                      least: int = 0) -> tuple[int, int, int]:
        """Record one partition's flush (its series part's offset when series, its flow part
        when flows, and the flow part's offset, flow_offset, when it moves); return how many
        TS.MADD commands end it, what it costs (TRANSACTION_COST) and how many journal entries
        it pushes."""
        for (name, sec), value in state.health.items():
            pipe.execute_command("TS.ADD", f"ts:health:{name}:count", sec * 1000, value,
                                 "ON_DUPLICATE", "SUM", "LABELS", "dimension", "health",
                                 "metric", name)
        for name, value in state.capture_totals.items():
            pipe.execute_command("HINCRBY", CAPTURE_COUNTERS, name, value)
        samples = self._samples(state)
        held, step = 3 * MADD_CHUNK, 3 * JOURNAL_SAMPLES  # the transaction applies `held`
        # the rest as text (a Lua number has 14 digits); before the flow updates, whose last
        # entry's counters say that all before it landed
        entries = [msgpack.packb({"samples": list(map(str, samples[at:at + step]))})
                   for at in range(held, len(samples), step)]
        if flows:
            entries += self._journal_entries(state, least)
        if entries:
            pipe.execute_command("RPUSH", self.journal, *entries)
        # with the series offset, the flow offset is stored too even when it stays: where
        # Redis has none (data reset, offsets of an older version) it is read as the series
        # offset, which this write moves on past flow updates not written yet
        if flow_offset != state.flow_base or (series and flow_offset is not None):
            pipe.execute_command("SET", self.flow_offset_prefix + str(state.partition),
                                 flow_offset)
        if series:
            pipe.execute_command("SET", self.offset_prefix + str(state.partition),
                                 state.next_offset)
        if state.topic_id:
            pipe.execute_command("SET", self.topic_id_prefix + str(state.partition),
                                 state.topic_id)
        own = samples[:held]
        if own:
            pipe.execute_command("TS.MADD", *own)
        return (1 if own else 0), len(own) // 3 + JOURNAL_ENTRY_COST * len(entries), len(entries)

    def least_new_top_total(self, states: list[PartitionState]) -> int:
        """The least total a flow whose hash this flush makes needs to enter flows:top:bytes
        and flows:top:endpoints (journal.lua), 0 for any: the TOP_FLOWS_KEPT-th largest bytes
        of the flows written for the first time in these partitions' flow parts. Such a
        flow's total is its bytes, so at least TOP_FLOWS_KEPT flows of the flush end up above
        one below it (in the sets, or trimmed from them by larger ones): it would be trimmed.
        A flow whose hash exists already (a flow that left the table and came back) may have
        a larger total: its hash's total decides, as before. (Should another member have
        taken a partition of the flush meanwhile, its flows land with that member's write:
        until then the sets may lack flows this one left out.) A replay's 65,000 flows,
        written at its end, made 2 x 29,000 ZADD members of which 2 x 10,000 stay."""
        kept = self.settings.top_flows_kept
        sizes: dict[str, int] = {}  # by flow id: a flow on two partitions is one member
        for state in states:
            state.sync_flows()
            for f in state.flow_updates:
                if f.new and not f.unstored:
                    sizes[f.id] = sizes.get(f.id, 0) + f.delta_bytes
        if len(sizes) <= kept:
            return 0
        return int(np.partition(np.fromiter(sizes.values(), np.int64, len(sizes)),
                                len(sizes) - kept)[-kept])

    def _journal_entries(self, state: PartitionState, least: int = 0) -> list[bytes]:
        """The flush's flow updates, top-N sums and TTLs as journal entries (journal.lua): the
        flows in entries of at most JOURNAL_FLOWS, with their flows:top:endpoints sums and
        TTLs; then the sums of hosts, applications and domains in entries of at most
        JOURNAL_INCREMENTS; the last entry also carries the counters.

        The top-N sets, with their time windows, are summed here per member and minute of
        capture time: one increment per member the flush touches in a minute (not one per flow
        or second). A flow hash's TTL is set on its first write and renewed when it was not
        for a quarter of FLOW_TTL_S."""
        ttl = self.settings.flow_ttl_s
        now = time.monotonic()
        refresh_before = now - ttl / 4
        state.fold()  # the series part's flow bytes and counts join the flow part
        newest = max(max((minute for _flow, minute in state.flow_minutes), default=0),
                     max(state.no_flow_minutes, default=0))
        # the flows with keys of their own (hashes, flows:top sets); every flow's bytes count
        # for its hosts, application and domain
        flows = [f for f in state.flow_updates if not f.unstored]
        # minute -> {member: bytes} for hosts, apps, domains (top.lua's SETS 1-3)
        shared: dict[int, tuple[dict, dict, dict]] = {}
        by_flow: list[dict[int, dict]] = [{} for _ in range(0, len(flows), JOURNAL_FLOWS)]
        entry_of = {f: i // JOURNAL_FLOWS for i, f in enumerate(flows)}
        label_of = {f: f.label for f in flows}  # (made per call: one each)
        apps = APPS
        for (f, minute), b in state.flow_minutes.items():
            sets = shared.get(minute)
            if sets is None:
                shared[minute] = sets = ({}, {}, {})
            hosts, by_app, domains = sets
            hosts[f.src] = hosts.get(f.src, 0) + b
            if f.dst != f.src:
                hosts[f.dst] = hosts.get(f.dst, 0) + b
            app = apps[f.app]
            by_app[app] = by_app.get(app, 0) + b
            if f.server_name:
                domains[f.server_name] = domains.get(f.server_name, 0) + b
            if not f.unstored:
                endpoints = by_flow[entry_of[f]].setdefault(minute, {})
                label = label_of[f]
                endpoints[label] = endpoints.get(label, 0) + b
        for (f, minute), b in state.promoted.items():  # a first packet held back before
            endpoints = by_flow[entry_of[f]].setdefault(minute, {})
            label = label_of[f]
            endpoints[label] = endpoints.get(label, 0) + b
        for minute, b in state.no_flow_minutes.items():
            sets = shared.get(minute)
            if sets is None:
                shared[minute] = sets = ({}, {}, {})
            sets[1]["UNKNOWN"] = sets[1].get("UNKNOWN", 0) + b
        # [newest minute, top-N groups, TTL, keys to EXPIRE, old flows, counters, flows,
        # least new top total] (journal.lua)
        entries = []
        for i, sums in enumerate(by_flow):
            chunk = flows[i * JOURNAL_FLOWS:(i + 1) * JOURNAL_FLOWS]
            # (the all-time flows:top:endpoints takes each flow's total with its hash update)
            groups = [(minute, 4, _increments(members), 1)
                      for minute, members in sorted(sums.items())]
            # flows over many minutes (records spread over days of capture time) make many
            # groups: past JOURNAL_INCREMENTS increments, they go in entries of their own
            runs = _by_increments(groups, JOURNAL_INCREMENTS) or [[]]
            entries.append([newest, runs[0], ttl, [], [], [],
                            self._flow_entries(chunk, label_of, now, refresh_before), least])
            entries += [[newest, run, ttl, [], [], []] for run in runs[1:]]
        groups, count = [], 0
        for minute, sets in sorted(shared.items()):
            for index, members in enumerate(sets, start=1):
                items = _increments(members)
                for at in range(0, len(items), 2 * JOURNAL_INCREMENTS):
                    groups.append((minute, index, items[at:at + 2 * JOURNAL_INCREMENTS]))
                    count += min(len(items) - at, 2 * JOURNAL_INCREMENTS) // 2
                    if count >= JOURNAL_INCREMENTS:
                        entries.append([newest, groups, ttl, [], [], []])
                        groups, count = [], 0
        if groups:
            entries.append([newest, groups, ttl, [], [], []])
        counters = [[name, value] for name, value in state.counted.items() if value]
        if counters:
            if not entries:
                entries.append([newest, [], ttl, [], [], []])
            entries[-1][5] = counters
        return [msgpack.packb(entry) for entry in entries]

    def _samples(self, state: PartitionState) -> list:
        """Every sample of the flush as TS.MADD arguments (key, timestamp, value, ...):
        aggregate series oldest first (a retention window never refuses an older sample
        written after a newer one), then the flows'. A flow lives on one partition: its
        (flow, second) cells are already unique."""
        totals: dict[tuple[int, str], list[int]] = {}

        def add(sec: int, series: str, cell: list[int]) -> None:
            total = totals.get((sec, series))
            if total is None:
                totals[(sec, series)] = [cell[0], cell[1]]
            else:
                total[0] += cell[0]
                total[1] += cell[1]

        for sec, cell in state.global_.items():
            add(sec, "ts:global", cell)
        for (proto, sec), cell in state.protocols.items():
            add(sec, f"ts:protocol:{proto}", cell)
        for sec, cell in state.no_flow.items():
            add(sec, "ts:app:UNKNOWN", cell)
        flow_args: list = []
        dirty = state.dirty_flows
        slot, sec, nbytes, packets = state.cells()
        if len(slot):
            # per application and second: the cells summed column-wise
            app = np.fromiter([f.app for f in dirty], np.int64, len(dirty))[slot]
            for a, second, b, p in zip(*sum_by_key(app, sec, nbytes, packets)):
                add(second, APP_SERIES[a], (b, p))
            # cells held until a flow qualified (its first seconds), then the flush's own
            held = state.table.held.take([f.uid for f in dirty if f.qualifies and f.held_rows])
            for flow in dirty:
                if flow.qualifies and flow.held_rows:
                    flow.held_rows = 0
                    for second, b, p in held.get(flow.uid, ()):
                        ms = second * 1000
                        flow_args += (flow.bps_key, ms, b, flow.pps_key, ms, p)
            wanted = np.fromiter([f.series or f.qualifies for f in dirty], bool, len(dirty))[slot]
            if wanted.any():
                for s, second, b, p in zip(slot[wanted].tolist(), sec[wanted].tolist(),
                                           nbytes[wanted].tolist(), packets[wanted].tolist()):
                    flow, ms = dirty[s], second * 1000
                    flow_args += (flow.bps_key, ms, b, flow.pps_key, ms, p)
        args: list = []
        for (sec, series), cell in sorted(totals.items()):
            ms = sec * 1000
            args += (series + ":bps", ms, cell[0], series + ":pps", ms, cell[1])
        args += flow_args
        return args

    @staticmethod
    def _flow_entries(flows: list[Flow], label_of: dict[Flow, str], now: float,
                      refresh_before: float) -> list:
        """journal.lua's updates of these flows' hashes, flows:top:bytes and the all-time
        flows:top:endpoints (label_of: each flow's member there), in its flat form: FIELDS
        values a flow. A hash's TTL is set on its first write (the hash exists from there on)
        and renewed when it was last set before refresh_before."""
        apps = APPS
        flat: list = []
        for f in flows:
            labels = ((apps[f.app], int(f.app_guess), f.server_name or "", f.fingerprint or "")
                      if f.labels_changed else _NO_LABELS)
            fixed = ((f.src, f.dst, f.sport, f.dport, f.proto, ns_text(f.first_ns)) if f.new
                     else _NOT_FIRST)
            renew = f.new or f.ttl_at < refresh_before
            if renew:
                f.ttl_at = now
            flat += (f.id, f.delta_bytes, f.delta_packets, ns_text(f.last_ns), *labels, *fixed,
                     label_of[f], int(renew))
        return flat

    @staticmethod
    def _count_rejected(madd_replies: list) -> int:
        rejected = 0
        for reply in madd_replies:
            if isinstance(reply, Exception):
                raise reply  # a whole TS.MADD refused: a bug, not bad data
            for item in reply:
                if isinstance(item, Exception):
                    rejected += 1
                    if rejected == 1:
                        log.warning("RedisTimeSeries refused a sample: %s", item)
        return rejected

    # -- after a write ---------------------------------------------------------------------

    def advance_windows(self, close_newest: bool, max_steps: int = 2000,
                        open_from: int | None = None) -> bool:
        """Move the top-N windows on after a flush (top.lua 'advance'): close the minutes
        before the newest one (the newest too when close_newest: nothing more to read), and
        subtract what left each window. One short script call per step, so other clients get
        in between; at most max_steps now, the rest after the next flush. True when done."""
        args = ["advance", "1" if close_newest else "0", self.settings.top_flows_kept, TRIM_CHUNK,
                "" if open_from is None else open_from]
        try:
            for _ in range(max_steps):
                if not self.script(args=args):
                    return True
        except ResponseError as exc:  # a key of another type in the way: the rest goes on
            if redis_refusing(exc):
                raise
            self._key_in_the_way("the top-N windows cannot move on", exc)
        return False

    def _key_in_the_way(self, what: str, exc: Exception) -> None:
        """Say once (per distinct error) that a key the processor writes is not what it
        should be; the write path goes on without that part."""
        text = str(exc)
        if text not in self.errors_told:
            self.errors_told.add(text)
            log.error("%s: %s (a key of another type in the way? the rest is written)", what,
                      text)

    def drain_journal(self) -> int:
        """Apply the journal's entries, oldest first, about DRAIN_BYTES of them a script call
        (journal.lua): what this process's flushes pushed, or what a processor that stopped
        left behind. Returns how many could not be applied (each logged: a bug or a key of
        another type in the way, not bad data; the entries after it are applied all the
        same)."""
        failed = 0
        args = ["drain", self.settings.top_flows_kept, DRAIN_BYTES]
        for journal in (self.json_journal, self.journal):
            while True:
                left = self.script(keys=[journal], args=args)
                if isinstance(left, list):
                    left, error = left
                    failed += 1
                    log.error("a write journal entry could not be applied: %s",
                              error.decode(errors="replace") if isinstance(error, bytes)
                              else error)
                if not left:
                    break
        return failed

    def trim_top(self) -> None:
        """Keep the top-N sets bounded (hosts and domains grow with every new name): remove
        what is beyond TOP_FLOWS_KEPT, at most TRIM_CHUNK members a command, one command a
        round trip (a pipeline of them would hold Redis for all of them: under a scan that
        was seconds; this way other clients get in between). The buckets of the time windows
        that still grow (the open minutes, the newest hours) are trimmed too: the others were
        trimmed while they grew."""
        kept = self.settings.top_flows_kept
        keys = list(TOP_SETS)
        pipe = self.redis.pipeline(transaction=False)
        for a, _b in WINDOWED_SETS:
            pipe.zrange(f"top:window:open:{a}", 0, -1)
            pipe.zrange(f"top:window:hours:{a}", -2, -1)
        replies = pipe.execute()
        for (a, b), open_minutes, hours in zip(WINDOWED_SETS, replies[::2], replies[1::2]):
            keys += [f"{a}:top:min:{int(m)}:{b}" for m in open_minutes]
            keys += [f"{a}:top:hour:{int(h)}:{b}" for h in hours]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zcard(key)
        sizes = pipe.execute(raise_on_error=False)
        for key, size in zip(keys, sizes):
            if isinstance(size, Exception):
                if redis_refusing(size):
                    raise size
                self._key_in_the_way(f"{key} cannot be trimmed", size)
                continue
            excess = size - kept
            while excess > 0:
                n = min(excess, TRIM_CHUNK)
                self.redis.zremrangebyrank(key, 0, n - 1)
                excess -= n

    def record_lag(self, lag: int) -> None:
        """Consumer lag of the whole group now (a gauge: every member computes the same)."""
        self.redis.execute_command(
            "TS.ADD", LAG_SERIES, "*", lag, "ON_DUPLICATE", "LAST",
            "RETENTION", 7 * 86_400_000, "LABELS", "dimension", "health", "metric",
            "consumer_lag")

    def reset_data(self) -> int:
        """Delete every key of this database but the series part's stored offsets and the
        topic ids: the figures start from zero and nothing already in the topic is read again
        (the flow part's offsets and journal go too: the flow part starts where the series
        part is)."""
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
        self.created_counters = False
        return removed

    def add_counters(self, counts: dict[str, int]) -> None:
        """Add to pipeline:processor counters kept outside the flush transaction (errors)."""
        pipe = self.redis.pipeline(transaction=False)
        for name, value in counts.items():
            pipe.hincrby(COUNTERS, name, value)
        pipe.execute()


class BackgroundWriter:
    """Sends one flush's writes on its own thread while the processor reads and aggregates the
    next (Redis works on flush N while Python builds N+1; the socket waits let the other thread
    run). A flush's groups are sent as they are built (start(), add() each, finish()): Redis
    applies the first partitions' writes while the last are built. At most one flush is in
    flight: settle() waits for it before the next is sent, so writes land in order."""

    _END = None  # after a flush's last group in the queue

    def __init__(self, sink: RedisSink):
        self.sink = sink
        # the flush in flight: its groups (all of them once finish() was called), whether it
        # closes the newest minute, the minute kept open; not landed yet
        self.pending: tuple[list, bool, int | None] | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.outcome: WriteResult | BaseException | None = None

    def start(self, close_newest: bool, open_from: int | None = None) -> None:
        assert self.pending is None, "settle() the write in flight first"
        self.pending = ([], close_newest, open_from)
        self.outcome = None
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        self.thread.start()

    def add(self, group: list[PartitionWrite]) -> None:
        self.pending[0].append(group)
        self.queue.put(group)

    def finish(self) -> None:
        self.queue.put(self._END)

    def _run(self) -> None:
        try:
            result = WriteResult()
            while (group := self.queue.get()) is not self._END:
                self.sink.write_group(group, result)
            _groups, close_newest, open_from = self.pending
            self.sink.finish_write(result, close_newest, open_from)
            self.outcome = result
        except BaseException as exc:  # noqa: BLE001 - handed to the processor's thread
            self.outcome = exc

    def settle(self) -> WriteResult | None:
        """Wait for the write in flight and return its result (None: nothing was in flight).
        A write that failed raises its error here once, and is then sent again, in this
        thread, by every later call until it lands."""
        if self.pending is None:
            return None
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            outcome = self.outcome
            if isinstance(outcome, BaseException):
                raise outcome
        else:
            outcome = self.sink.execute(*self.pending)
        self.pending = self.outcome = None
        return outcome
