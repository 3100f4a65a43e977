"""Rate control: a token bucket on a monotonic clock, taken from in bursts."""

from __future__ import annotations

import time
from typing import Callable

BURST_WINDOW_S = 0.005  # a burst carries at most this much time's worth of packets


def burst_capacity(rate: float, window_s: float = BURST_WINDOW_S) -> int:
    """Largest burst the bucket may hold at `rate`: `window_s` worth of packets, at least one."""
    return max(1, int(rate * window_s))


class TokenBucket:
    """Tokens accrue at `rate` per second up to `capacity`; one token sends one packet.

    The bucket starts empty, so n packets take n / rate seconds from the first `take`. A sender
    that falls behind loses the tokens above `capacity`: it never makes up for lost time with a
    burst larger than the capacity.
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
        n = int(tokens)
        if n > limit:
            n = limit
        self.tokens = tokens - n
        return n

    def delay(self) -> float:
        """Seconds from the latest refill until the next whole token (0 if one is there)."""
        missing = 1.0 - self.tokens
        return missing / self.rate if missing > 0 else 0.0
