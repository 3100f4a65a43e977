"""Capture's health counters: what each stats message reports, parser errors included."""

from __future__ import annotations

from capture.counters import CaptureCounters
from capture.inspect.flow import FlowInspector


def test_health_increments_report_what_each_counter_gained():
    counters = CaptureCounters()
    counters.frames, counters.kernel_drops = 10, 1
    first = counters.health_increments()
    assert first == {"capture_frames": 10, "capture_kernel_drops": 1, "capture_malformed": 0,
                     "capture_delivery_failed": 0, "capture_dropped_buffer_full": 0,
                     "capture_parser_errors": 0, "capture_inspect_budget_evictions": 0,
                     "capture_inspect_idle_expired": 0}
    counters.frames = 15
    assert counters.health_increments()["capture_frames"] == 5


def test_parser_errors_of_the_inspectors_are_exported(monkeypatch):
    monkeypatch.setattr(FlowInspector, "errors", 7)  # errors before these counters existed
    counters = CaptureCounters()
    assert counters.health_increments()["capture_parser_errors"] == 0
    FlowInspector.errors += 2
    assert counters.health_increments()["capture_parser_errors"] == 2
    assert "parser_errors=2" in counters.summary()
    assert counters.health_increments()["capture_parser_errors"] == 0


class BrokenParser(FlowInspector):
    __slots__ = ()

    def _feed_tcp(self, *_args):
        raise IndexError("a parser bug")


def test_a_parser_bug_ends_the_flow_inspection_and_is_exported(monkeypatch):
    monkeypatch.setattr(FlowInspector, "errors", 0)
    counters = CaptureCounters()
    inspector = BrokenParser(6, 40000, 443)
    inspector.feed(b"GET / HTTP/1.1\r\n", True, 1000)
    assert inspector.done
    assert counters.health_increments()["capture_parser_errors"] == 1
