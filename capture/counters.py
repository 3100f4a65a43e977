"""Capture counters and the periodic summary line (never a log line per packet)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger("capture")


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

    def lost(self) -> int:
        return self.delivery_failed + self.dropped_buffer_full + self.kernel_drops

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())

    def log_summary(self, prefix: str = "stats") -> None:
        log.info("%s %s", prefix, self.summary())
