"""When the processor's series flush is due (every interval on live records, fewer and bigger
flushes on a backlog or a replay), and when it aggregates the records waiting for it."""

from __future__ import annotations

from flow_processor.consumer import (
    AGGREGATE_RECORDS,
    BACKLOG_FLUSH_FACTOR,
    REPLAY_FLUSH_FACTOR,
    SCAN_LIKE_NEW_FLOWS_PER_RECORD,
    aggregate_now,
    series_due,
)

EVERY = 1.0
NEXT = 100.0  # one interval after the last flush


def test_live_records_caught_up_flush_every_interval():
    assert not series_due(NEXT - 0.01, NEXT, EVERY, behind=False, live=True)
    assert series_due(NEXT, NEXT, EVERY, behind=False, live=True)


def test_a_replay_flushes_up_to_its_factor_of_intervals_apart():
    replay_at = NEXT + (REPLAY_FLUSH_FACTOR - 1) * EVERY
    assert REPLAY_FLUSH_FACTOR > 1
    assert not series_due(NEXT, NEXT, EVERY, behind=False, live=False)
    assert not series_due(replay_at - 0.01, NEXT, EVERY, behind=False, live=False)
    assert series_due(replay_at, NEXT, EVERY, behind=False, live=False)


def test_behind_on_a_backlog_flushes_up_to_its_factor_of_intervals_apart():
    backlog_at = NEXT + (BACKLOG_FLUSH_FACTOR - 1) * EVERY
    for live in (True, False):
        assert not series_due(backlog_at - 0.01, NEXT, EVERY, behind=True, live=live)
        assert series_due(backlog_at, NEXT, EVERY, behind=True, live=live)


def test_waiting_records_are_aggregated_once_they_are_enough_for_any_poll():
    for spread in (0.05, 1.0):
        for empty in (True, False):
            assert aggregate_now(AGGREGATE_RECORDS, spread, poll_empty=empty)
            assert not aggregate_now(AGGREGATE_RECORDS - 1, spread, poll_empty=False)


def test_an_empty_poll_aggregates_a_scans_records_only():
    few = AGGREGATE_RECORDS // 10
    assert aggregate_now(few, 1.0, poll_empty=True)
    assert aggregate_now(few, SCAN_LIKE_NEW_FLOWS_PER_RECORD, poll_empty=True)
    # records that come back to the same flows wait for more, or the next flush
    assert not aggregate_now(few, SCAN_LIKE_NEW_FLOWS_PER_RECORD - 0.01, poll_empty=True)
    assert not aggregate_now(few, 0.2, poll_empty=True)
