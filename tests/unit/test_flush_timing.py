"""When the processor's series flush is due: every interval on live records, fewer and bigger
flushes on a backlog or a replay."""

from __future__ import annotations

from flow_processor.consumer import BACKLOG_FLUSH_FACTOR, REPLAY_FLUSH_FACTOR, series_due

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
