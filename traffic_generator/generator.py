"""The send loop: bursts as the token bucket allows, a sleep only when it is empty, a rate line
every REPORT_INTERVAL_S, and a stop on COUNT, DURATION_S, SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from traffic_generator.pacing import TokenBucket, bucket_capacity, burst_size

if TYPE_CHECKING:
    from traffic_generator.senders import SendErrors

log = logging.getLogger("traffic_generator")


class Sender(Protocol):
    """What the loop drives (senders.UdpSender, senders.MixSender)."""

    kinds: tuple[str, ...]  # names of the counted kinds of message, () when there is one
    sent: int  # sends that succeeded
    errors: SendErrors  # sends that failed: .count
    description: str

    def send(self, n: int) -> None: ...

    def breakdown(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after every burst."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(_signum, _frame):
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


@dataclass(frozen=True)
class RunResult:
    sent: int
    errors: int
    seconds: float
    target_rate: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """The final line: key=value pairs, stable for scripts (the bench reads it)."""
        parts = [f"sent={self.sent}", f"errors={self.errors}", f"seconds={self.seconds:.3f}",
                 f"rate={self.rate:.1f}", f"target={self.target_rate}"]
        parts += [f"{kind}={n}" for kind, n in self.breakdown.items()]
        return "final " + " ".join(parts)


def run(sender: Sender, rate: int, *, count: int = 0, duration_s: float = 0,
        report_interval_s: float = 5.0, stop: StopFlag | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep) -> RunResult:
    """Send at `rate` until `count` sends (0: no limit), `duration_s` (0: none) or a stop."""
    stop = stop or StopFlag()
    bucket = TokenBucket(rate, bucket_capacity(rate), clock)
    take, delay, send = bucket.take, bucket.delay, sender.send
    cap = burst_size(rate)
    start = bucket.last
    deadline = start + duration_s if duration_s else math.inf
    remaining = count or -1  # -1: never reaches 0
    report = _Reporter(sender, rate, start, report_interval_s)
    next_report = report.due
    while not stop.requested:
        n = take(cap if remaining < 0 or remaining > cap else remaining)
        if n:
            send(n)
            remaining -= n
            if remaining == 0:
                break
        else:
            sleep(min(delay(), max(0.0, deadline - bucket.last)))
        now = bucket.last
        if now >= deadline:
            break
        if now >= next_report:
            next_report = report(now)
    seconds = clock() - start
    return RunResult(sender.sent, sender.errors.count, seconds, rate, sender.breakdown())


class _Reporter:
    """Logs the rate achieved since the previous line."""

    def __init__(self, sender: Sender, rate: int, start: float, interval: float) -> None:
        self.sender, self.rate, self.interval = sender, rate, interval
        self.last_time, self.last_sent, self.last_errors = start, 0, 0
        self.last_breakdown = sender.breakdown()
        self.due = start + interval

    def __call__(self, now: float) -> float:
        sender = self.sender
        sent, errors, breakdown = sender.sent, sender.errors.count, sender.breakdown()
        seconds = now - self.last_time
        kinds = " ".join(f"{kind}={n - self.last_breakdown.get(kind, 0)}"
                         for kind, n in breakdown.items())
        log.info("sent %d in %.1fs: %.0f/s (target %d/s), %d errors%s%s",
                 sent - self.last_sent, seconds, (sent - self.last_sent) / seconds, self.rate,
                 errors - self.last_errors, ", " if kinds else "", kinds)
        self.last_time, self.last_sent, self.last_errors = now, sent, errors
        self.last_breakdown = breakdown
        self.due += self.interval
        if self.due <= now:  # the loop stalled for more than an interval
            self.due = now + self.interval
        return self.due
