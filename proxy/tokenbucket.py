"""A token bucket: the rate limit behind ``limits.rate`` and ``limits.requests``.

The bucket holds at most ``burst`` tokens and gains ``rate`` tokens a second;
each event takes one, and an event that finds none is refused. Pure: every
call is given the time (``now``, seconds on any monotonic clock), so tests
drive it with numbers instead of sleeping.
"""

from __future__ import annotations


class TokenBucket:
    """``burst`` tokens at most, ``rate`` more each second; full at the start."""

    def __init__(self, *, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there
        will be (nothing is taken then)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now``."""
        self._refill(now)
        return self.tokens

    def reconfigure(self, *, rate: float, burst: int, now: float) -> None:
        """New rate and burst from ``now`` on: what was earned until now at
        the old rate is kept, up to the new burst (a reload neither refills
        the bucket nor takes what it holds beyond the new size)."""
        self._refill(now)
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, float(burst))
