"""Capture counters and the periodic summary line (never a log line per packet)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from capture.inspect.flow import FlowInspector

log = logging.getLogger("capture")


def _inspector_errors() -> int:
    return FlowInspector.errors


def _inspector_budget_evictions() -> int:
    return FlowInspector.budget_evictions


def _inspector_idle_expired() -> int:
    return FlowInspector.idle_expired


@dataclass
class CaptureCounters:
    frames: int = 0  # frames read from the source
    bytes: int = 0  # sum of their wire lengths
    malformed: int = 0  # frames the decoder could not fully decode (still sent, as OTHER if no IP)
    unsupported_link: int = 0  # frames of a link type the decoder does not know
    kernel_drops: int = 0  # frames the kernel dropped before we could read them (live)
    records_produced: int = 0  # records the broker acknowledged
    delivery_failed: int = 0  # records in messages the broker did not take
    delivery_failed_messages: int = 0
    dropped_buffer_full: int = 0  # records dropped because the producer buffer was full (live)
    # DPI parser failures (a parser bug: it ends that flow's inspection; the flow is still
    # counted). FlowInspector counts them for the whole process; this is the share since these
    # counters were made, refreshed by health_increments() and summary().
    parser_errors: int = 0
    _parser_errors_base: int = field(default_factory=_inspector_errors, repr=False)
    # unfinished DPI inspections given up to keep inspection state under INSPECT_MEMORY_MB, and
    # after INSPECT_IDLE_TIMEOUT_S without payload (the flows keep their label and still count)
    inspect_budget_evictions: int = 0
    inspect_idle_expired: int = 0
    _budget_evictions_base: int = field(default_factory=_inspector_budget_evictions, repr=False)
    _idle_expired_base: int = field(default_factory=_inspector_idle_expired, repr=False)
    _reported: dict = field(default_factory=dict, repr=False)

    # counters sent to the processor for the pipeline-health series (ts:health:<name>:count)
    HEALTH = {"frames": "capture_frames", "kernel_drops": "capture_kernel_drops",
              "malformed": "capture_malformed", "delivery_failed": "capture_delivery_failed",
              "dropped_buffer_full": "capture_dropped_buffer_full",
              "parser_errors": "capture_parser_errors",
              "inspect_budget_evictions": "capture_inspect_budget_evictions",
              "inspect_idle_expired": "capture_inspect_idle_expired"}

    def _sync_parser_errors(self) -> None:
        self.parser_errors = FlowInspector.errors - self._parser_errors_base
        self.inspect_budget_evictions = (FlowInspector.budget_evictions
                                         - self._budget_evictions_base)
        self.inspect_idle_expired = FlowInspector.idle_expired - self._idle_expired_base

    def health_increments(self) -> dict[str, int]:
        """What the health counters gained since the previous call."""
        self._sync_parser_errors()
        out = {}
        for attr, name in self.HEALTH.items():
            value = getattr(self, attr)
            out[name] = value - self._reported.get(attr, 0)
            self._reported[attr] = value
        return out

    def lost(self) -> int:
        return self.delivery_failed + self.dropped_buffer_full + self.kernel_drops

    def summary(self) -> str:
        self._sync_parser_errors()
        return " ".join(f"{k}={v}" for k, v in asdict(self).items() if not k.startswith("_"))

    def log_summary(self, prefix: str = "stats") -> None:
        log.info("%s %s", prefix, self.summary())
