"""Rate control: a token bucket on a monotonic clock, taken from in bursts."""

from __future__ import annotations

import time
from collections.abc import Callable

BURST_WINDOW_S = 0.005  # one burst carries at most this much time's worth of packets
CATCH_UP_WINDOW_S = 0.05  # a stall this long is made up for (in bursts); longer ones lose packets
_EPSILON = 1e-3  # clock rounding (monotonic values are large) must not hold back a whole token


def burst_size(rate: float, window_s: float = BURST_WINDOW_S) -> int:
    """Largest burst sent at once at `rate`: `window_s` worth of packets, at least one."""
    return max(1, int(rate * window_s))


def bucket_capacity(rate: float, window_s: float = CATCH_UP_WINDOW_S) -> int:
    """Tokens the bucket keeps at `rate`: `window_s` worth, at least one burst."""
    return max(burst_size(rate), int(rate * window_s))


class TokenBucket:
    """Tokens accrue at `rate` per second up to `capacity`; one token sends one packet.

    The bucket starts empty, so n packets take n / rate seconds from the first `take`. A sender
    stalled (descheduled, blocked in a send) for less than capacity / rate seconds gets the
    missed tokens back and catches up; the tokens above `capacity` are lost, so a long stall is
    never followed by a flood.
    """

    __slots__ = ("rate", "capacity", "tokens", "last", "_clock")

    def __init__(self, rate: float, capacity: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError(f"rate must be > 0 and capacity >= 1 (got {rate}, {capacity})")
        self.rate = rate
        self.capacity = capacity
        self.tokens = 0.0
        self._clock = clock
        self.last = clock()  # time of the latest refill

    def take(self, limit: int) -> int:
        """Refill from the clock, then take up to `limit` whole tokens; return how many."""
        now = self._clock()
        tokens = self.tokens + (now - self.last) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.last = now
        n = int(tokens + _EPSILON)
        if n > limit:
            n = limit
        self.tokens = tokens - n
        return n

    def delay(self) -> float:
        """Seconds from the latest refill until the next whole token (0 if one is there)."""
        missing = 1.0 - self.tokens
        return missing / self.rate if missing > 0 else 0.0
