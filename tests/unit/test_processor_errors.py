"""Which Redis errors pause the processor, which counters capture may send, and how the
processor writes capture times and Redis URLs."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from capture.counters import CaptureCounters
from flow_processor.sink import ns_text, redact_url, redis_refusing
from packet_records import STATS_COUNTERS


@pytest.mark.parametrize("exc", [
    ConnectionError("gone"), TimeoutError("slow"),
    OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ReadOnlyError("You can't write against a read only replica."),
    ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."),
    ResponseError("LOADING Redis is loading the dataset in memory"),
    ResponseError("Command # 2 (HINCRBY pipeline:processor records 1200) of pipeline caused "
                  "error: MISCONF Redis is configured to save RDB snapshots"),
])
def test_refusals_and_outages_pause_the_processor(exc):
    assert redis_refusing(exc)


@pytest.mark.parametrize("exc", [
    ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ResponseError("ERR unknown command 'TS.MADD'"),
    ValueError("not redis"),
])
def test_bugs_are_not_taken_for_refusals(exc):
    assert not redis_refusing(exc)


def test_capture_sends_only_counters_the_processor_accepts():
    assert set(CaptureCounters.HEALTH.values()) <= set(STATS_COUNTERS)


@pytest.mark.parametrize("url, shown", [
    ("redis://processor:s3cret@redis:6379/0", "redis://processor:***@redis:6379/0"),
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
])
def test_passwords_never_appear_in_messages(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("ns", [0, 7, 123_456_789, 999_999_999, 10**9, 1_700_000_018_089_300_000,
                                2**64 - 1])
def test_capture_times_read_as_tshark_prints_them(ns):
    assert ns_text(ns) == f"{ns // 10**9}.{ns % 10**9:09d}"
