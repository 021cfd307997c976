"""Rate limiting: a token bucket per principal (per peer host without one), charged at call start.

A stream is charged once, when it opens, and never cut mid-way. Over the limit the call
ends RESOURCE_EXHAUSTED with RetryInfo (when enough tokens will be back) and ErrorInfo
reason RATE_LIMITED. Buckets live in-process (``LocalLimiter``) or in Redis, shared by
every replica (``ratelimit_redis.RedisLimiter``); both implement ``Limiter``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple, Protocol

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from userservice.interceptors._call import PRINCIPAL
from userservice.interceptors._handlers import Behaviour, Context, WrappingInterceptor
from userservice.interceptors._status import Rejection, rejection
from userservice.interceptors.matcher import MethodMatcher

_SERVICE: Final = "/user.v1.UserService/"
METHOD_COSTS: Final[Mapping[str, float]] = {
    # Bulk streams do the work of many unary calls; everything else costs 1.
    _SERVICE + "ImportUsers": 20.0,
    _SERVICE + "SyncUsers": 20.0,
    _SERVICE + "StreamUsers": 5.0,
}


class Decision(NamedTuple):
    """A limiter's answer: allowed, or denied with the seconds until a retry can succeed."""

    allowed: bool
    retry_after: float


ALLOWED: Final = Decision(True, 0.0)


class Limiter(Protocol):
    """Takes cost tokens from key's bucket, or says how long until it could."""

    async def limit(self, key: str, cost: float) -> Decision:
        """Return whether a call costing cost may proceed for key."""
        ...


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


def peer_host(peer: str) -> str:
    """Return the host part of a gRPC peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...)."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer


def _exhausted(retry_after: float) -> Rejection:
    delay = Duration()
    delay.FromNanoseconds(math.ceil(max(retry_after, 0.001) * 1000) * 1_000_000)
    return rejection(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"rate limit exceeded; retry in {delay.ToMilliseconds() / 1000:.3f}s",
        "RATE_LIMITED",
        details=[error_details_pb2.RetryInfo(retry_delay=delay)],
    )


class RateLimitInterceptor(WrappingInterceptor):
    """Charges each call's cost to its principal's bucket before the handler runs."""

    def __init__(
        self,
        limiter: Limiter,
        public: MethodMatcher,
        *,
        burst: float,
        costs: Mapping[str, float] = METHOD_COSTS,
    ) -> None:
        """Exempt methods matching public; costs above burst are capped so they can pass."""
        super().__init__()
        self._limit = limiter.limit
        self._public = public
        self._burst = burst
        self._costs = costs

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the bucket check (None for exempt methods)."""
        if self._public.matches(method):
            return None
        cost = min(self._costs.get(method, 1.0), self._burst)
        limit = self._limit

        async def limited(request: Any, context: Context) -> Any:
            principal = PRINCIPAL.get()
            key = "p:" + principal if principal is not None else "h:" + peer_host(context.peer())
            decision = await limit(key, cost)
            if not decision.allowed:
                await _exhausted(decision.retry_after).abort(context)
            return await behaviour(request, context)

        return limited
