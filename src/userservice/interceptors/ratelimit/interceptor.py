"""Rate limiting: a token bucket per principal (per peer host without one), charged at call start.

Over the limit a call ends RESOURCE_EXHAUSTED with RetryInfo (when enough tokens will be
back) and ErrorInfo reason RATE_LIMITED. A ListUsers or StreamUsers request whose filter
is a scan (``SCAN_COSTS``) pays more than a point read. The bulk write streams
(``MESSAGE_COSTS``) also pay for each message after the first, and are *paced* rather
than cut when the bucket is empty: the next message is not read until the tokens are
back, so HTTP/2 flow control pushes back on the client, and the call's deadline still
ends the wait. A limiter that cannot decide (Redis down, failing closed) ends the call
UNAVAILABLE with reason RATE_LIMITER_UNAVAILABLE: the caller is not over any limit.
Buckets live in-process (``LocalLimiter``) or in Redis, shared by every replica
(``ratelimit.redis.RedisLimiter``); both implement ``Limiter`` (limiter.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from userservice.domain.errors import InvalidArgumentError
from userservice.domain.filtering import parse_filter
from userservice.interceptors.handlers import (
    BIDI_STREAM,
    CLIENT_STREAM,
    Behaviour,
    Context,
    WrappingInterceptor,
    with_hook,
)
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.ratelimit.limiter import Decision, Limiter
from userservice.interceptors.status import Rejection, rejection
from userservice.rpc_context import PRINCIPAL, peer_host

_SERVICE: Final = "/user.v1.UserService/"
METHOD_COSTS: Final[Mapping[str, float]] = {
    # Bulk streams do the work of many unary calls; everything else costs 1.
    _SERVICE + "ImportUsers": 20.0,
    _SERVICE + "SyncUsers": 20.0,
    _SERVICE + "StreamUsers": 5.0,
}
SCAN_COSTS: Final[Mapping[str, float]] = {
    # Charged on top when the request's filter is a scan (UserFilter.is_scan): one such
    # call can read the whole table, where a point read reads one row.
    _SERVICE + "ListUsers": 10.0,
    _SERVICE + "StreamUsers": 10.0,
}
MESSAGE_COSTS: Final[Mapping[str, float]] = {
    # One upsert per message after the first, like a unary write.
    _SERVICE + "ImportUsers": 1.0,
    _SERVICE + "SyncUsers": 1.0,
}
# A paced stream re-checks its bucket at least this often, so a refill is noticed soon.
MAX_PACE_SECONDS: Final = 1.0


def is_scan_request(request: Any) -> bool:
    """Tell whether a request's filter is a scan, by the domain's rule (False if it has none).

    A filter that does not parse is not charged as a scan: the handler refuses it.
    """
    text = getattr(request, "filter", None)
    if not isinstance(text, str) or not text:
        return False
    try:
        return parse_filter(text).is_scan
    except InvalidArgumentError:
        return False


def _exhausted(retry_after: float) -> Rejection:
    delay = Duration()
    delay.FromNanoseconds(math.ceil(max(retry_after, 0.001) * 1000) * 1_000_000)
    return rejection(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"rate limit exceeded; retry in {delay.ToMilliseconds() / 1000:.3f}s",
        "RATE_LIMITED",
        details=[error_details_pb2.RetryInfo(retry_delay=delay)],
    )


def _undecided(retry_after: float) -> Rejection:
    delay = Duration()
    delay.FromNanoseconds(math.ceil(max(retry_after, 0.001) * 1000) * 1_000_000)
    return rejection(
        grpc.StatusCode.UNAVAILABLE,
        "rate limiter unavailable; retry later",
        "RATE_LIMITER_UNAVAILABLE",
        details=[error_details_pb2.RetryInfo(retry_delay=delay)],
    )


def _refusal(decision: Decision) -> Rejection:
    return (
        _undecided(decision.retry_after) if decision.undecided else _exhausted(decision.retry_after)
    )


class _Pacer:
    """Charges each message of a stream after the first, waiting while the bucket is empty."""

    __slots__ = ("_context", "_cost", "_first", "_key", "_limit")

    def __init__(
        self, limit: Callable[[str, float], Any], key: str, cost: float, context: Context
    ) -> None:
        self._limit = limit
        self._key = key
        self._cost = cost
        self._context = context
        self._first = True

    def charge(self, message: Any) -> Awaitable[None] | None:
        """Return None for the first message (it is free), else what pays for this one."""
        if self._first:
            self._first = False
            return None
        return self.pay()

    async def pay(self) -> None:
        """Return once the message just read (after the first) is paid for."""
        while True:
            decision: Decision = await self._limit(self._key, self._cost)
            if decision.allowed:
                return
            if decision.undecided:
                await _refusal(decision).abort(self._context)
            # Bounded: the deadline cancels this sleep and ends the call DEADLINE_EXCEEDED.
            await asyncio.sleep(min(max(decision.retry_after, 0.001), MAX_PACE_SECONDS))


class _PacedContext:
    """A servicer context whose read() pays for each message before handing it over."""

    __slots__ = ("_context", "_pacer")

    def __init__(self, context: Context, pacer: _Pacer) -> None:
        self._context = context
        self._pacer = pacer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        """Read the next message, waiting for its tokens."""
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            paying = self._pacer.charge(message)
            if paying is not None:
                await paying
        return message


class RateLimitInterceptor(WrappingInterceptor):
    """Charges each call's cost to its principal's bucket before the handler runs."""

    def __init__(
        self,
        limiter: Limiter,
        public: MethodMatcher,
        *,
        burst: float,
        costs: Mapping[str, float] = METHOD_COSTS,
        message_costs: Mapping[str, float] = MESSAGE_COSTS,
        scan_costs: Mapping[str, float] = SCAN_COSTS,
    ) -> None:
        """Exempt methods matching public; costs above burst are capped so they can pass."""
        super().__init__()
        self._limit = limiter.limit
        self._public = public
        self._burst = burst
        self._costs = costs
        self._message_costs = message_costs
        self._scan_costs = scan_costs

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the bucket check (None for exempt methods)."""
        if self._public.matches(method):
            return None
        base_cost = self._costs.get(method, 1.0)
        cost = min(base_cost, self._burst)
        extra = self._scan_costs.get(method)
        scan_cost = None if extra is None else min(base_cost + extra, self._burst)
        message_cost = self._message_costs.get(method)
        paced = message_cost is not None and kind in (CLIENT_STREAM, BIDI_STREAM)
        limit = self._limit

        async def limited(request: Any, context: Context) -> Any:
            principal = PRINCIPAL.get()
            key = "p:" + principal if principal is not None else "h:" + peer_host(context.peer())
            charged = cost
            if scan_cost is not None and is_scan_request(request):
                charged = scan_cost
            decision = await limit(key, charged)
            if not decision.allowed:
                await _refusal(decision).abort(context)
            if paced:
                assert message_cost is not None
                pacer = _Pacer(limit, key, min(message_cost, self._burst), context)
                if hasattr(request, "__aiter__"):
                    request = with_hook(request, pacer.charge)
                context = _PacedContext(context, pacer)  # type: ignore[assignment]
            return await behaviour(request, context)

        return limited
