"""Rate limiting: a token bucket per principal (per peer host without one), charged at call start.

Over the limit a call ends RESOURCE_EXHAUSTED with RetryInfo (when enough tokens will be
back) and ErrorInfo reason RATE_LIMITED. What a call costs is its method's
``(user.v1.method_policy)`` proto option, read by ``userservice.policy``: ``cost`` when it
starts (1 unless declared), ``scan_cost`` more when the request's filter is a scan, and
for the bulk write streams ``message_cost`` for each message after the first. Those
streams are *paced* rather than cut when the bucket is empty: the next message is not
read until the tokens are back, so HTTP/2 flow control pushes back on the client, and the
call's deadline still ends the wait. A limiter that cannot decide (Redis down, failing
closed) ends the call UNAVAILABLE with reason RATE_LIMITER_UNAVAILABLE: the caller is not
over any limit. Buckets live in-process (``LocalLimiter``) or in Redis, shared by every
replica (``ratelimit.redis.RedisLimiter``); both implement ``Limiter`` (limiter.py).
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
    WrappingInterceptor,
    hook_messages,
)
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.ratelimit.limiter import Decision, Limiter
from userservice.interceptors.ratelimit.local import LocalLimiter
from userservice.interceptors.status import Rejection, rejection
from userservice.policy import METHODS, MethodPolicy
from userservice.rpc_context import PRINCIPAL, Context, peer_host

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


class RateLimitInterceptor(WrappingInterceptor):
    """Charges each call's cost to its principal's bucket before the handler runs."""

    def __init__(
        self,
        limiter: Limiter,
        public: MethodMatcher,
        *,
        burst: float,
        policies: Mapping[str, MethodPolicy] = METHODS,
    ) -> None:
        """Exempt methods matching public; costs above burst are capped so they can pass."""
        super().__init__()
        self._limit = limiter.limit
        # An in-process bucket answers at once: no coroutine per call to ask it.
        self._take = limiter.take if isinstance(limiter, LocalLimiter) else None
        self._public = public
        self._burst = burst
        self._policies = policies

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the bucket check (None for exempt methods)."""
        if self._public.matches(method):
            return None
        # A method without a policy costs 1: the auth interceptor refuses it anyway.
        policy = self._policies.get(method)
        base_cost = 1.0 if policy is None else policy.cost
        cost = min(base_cost, self._burst)
        extra = None if policy is None else policy.scan_cost
        scan_cost = min(base_cost + extra, self._burst) if extra else None
        message_cost = policy.message_cost if policy is not None and policy.message_cost else None
        paced = message_cost is not None and kind in (CLIENT_STREAM, BIDI_STREAM)
        limit, take = self._limit, self._take

        async def limited(request: Any, context: Context) -> Any:
            principal = PRINCIPAL.get()
            key = "p:" + principal if principal is not None else "h:" + peer_host(context.peer())
            charged = cost
            if scan_cost is not None and is_scan_request(request):
                charged = scan_cost
            decision = take(key, charged) if take is not None else await limit(key, charged)
            if not decision.allowed:
                await _refusal(decision).abort(context)
            if paced:
                assert message_cost is not None
                pacer = _Pacer(limit, key, min(message_cost, self._burst), context)
                request, context = hook_messages(request, context, pacer.charge)
            return await behaviour(request, context)

        return limited
