"""In-process token buckets, one per key: the limit of a single replica."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from userservice.interceptors.ratelimit.limiter import ALLOWED, Decision


class LocalLimiter:
    """In-process token buckets: O(1) per call, memory bounded by max_keys."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Refill rate tokens per second into buckets holding at most burst."""
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, updated_at]

    def __len__(self) -> int:
        """Return the number of buckets held."""
        return len(self._buckets)

    async def limit(self, key: str, cost: float) -> Decision:
        """Take cost tokens from key's bucket if it holds them."""
        return self.take(key, cost)

    def take(self, key: str, cost: float) -> Decision:
        """limit() without the coroutine: the rate limit layer calls this on every call."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict(now)
            bucket = self._buckets[key] = [self._burst, now]
        else:
            bucket[0] = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return ALLOWED
        return Decision(False, (cost - bucket[0]) / self._rate)

    def _evict(self, now: float) -> None:
        # A full bucket carries no state: dropping it changes nothing for its key.
        full = [
            key
            for key, (tokens, updated_at) in self._buckets.items()
            if tokens + (now - updated_at) * self._rate >= self._burst
        ]
        for key in full:
            del self._buckets[key]
        # Keep a tenth free so sweeps stay rare (amortised O(1)) even when every bucket is
        # busy; the oldest buckets then go, at worst handing their keys a fresh burst.
        excess = len(self._buckets) - int(self._max_keys * 0.9)
        for key in list(itertools.islice(self._buckets, max(0, excess))):
            del self._buckets[key]
