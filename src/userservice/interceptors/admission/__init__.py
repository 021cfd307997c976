"""Admission: the service's own limits on work in progress, checked before any handler runs.

Three counters, all in-process (they bound this replica's memory and tasks, which is
what a replica can protect): unary calls in progress (``max_concurrent_rpcs``), streams
open (``max_open_streams``) and streams open per principal (``max_streams_per_principal``,
per peer host for a call without one). A call over a limit ends at once
``RESOURCE_EXHAUSTED`` with RetryInfo and ErrorInfo reason ``TOO_MANY_STREAMS`` (the
caller's own streams) or ``OVERLOADED`` (the replica's limits), so the access log and the
metrics record it like any other call. Public methods (health, reflection) are not counted
here: one token holding every stream must not take the pod out of its Service.

Their streams (health ``Watch``, reflection) have a budget of their own in
``PublicStreamAdmission``: open in total (``max_public_streams``) and per peer host
(``max_public_streams_per_peer``), refused with the same reasons. Being separate, an
anonymous flood cannot take authenticated callers' stream slots, nor they its. Unary
public calls (health ``Check``, ``List``) are never refused: a probe must always get an
answer. grpc's own ``maximum_concurrent_rpcs`` stays only as a much higher backstop,
because past it calls wait in grpc's backlog and are cancelled there before any
interceptor runs (unlogged, uncounted, health too); server.py sizes that backlog like it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from userservice.interceptors.handlers import UNARY, Behaviour, Context, WrappingInterceptor
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.status import Rejection, rejection
from userservice.rpc_context import PRINCIPAL, peer_host

# A unary slot frees within milliseconds; a stream slot only when some stream ends.
_UNARY_RETRY: Final = Duration(nanos=100_000_000)
_STREAM_RETRY: Final = Duration(seconds=1)


def _refusal(message: str, reason: str, limit: str, value: int, delay: Duration) -> Rejection:
    return rejection(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        reason,
        info={"limit": limit, "value": str(value)},
        details=[error_details_pb2.RetryInfo(retry_delay=delay)],
    )


def _peer_key(context: Context) -> str:
    return "h:" + peer_host(context.peer())


class StreamBudget:
    """Streams open in total and per key (a principal or a peer host), each under its limit."""

    def __init__(
        self, total: tuple[str, int], per_key: tuple[str, int], whose: str = "caller"
    ) -> None:
        """Allow total[1] streams and per_key[1] per key; the names are the settings' names."""
        (self._total_name, self.total), (self._per_key_name, self.per_key) = total, per_key
        self.open = 0
        self._by_key: Counter[str] = Counter()
        self._full = _refusal(
            f"server overloaded: {self.total} streams open; retry later",
            "OVERLOADED",
            self._total_name,
            self.total,
            _STREAM_RETRY,
        )
        self._too_many = _refusal(
            f"too many open streams for this {whose} (limit {self.per_key});"
            " close one or retry later",
            "TOO_MANY_STREAMS",
            self._per_key_name,
            self.per_key,
            _STREAM_RETRY,
        )

    def of(self, key: str) -> int:
        """Return how many streams key has open."""
        return self._by_key.get(key, 0)

    def admitting(self, behaviour: Behaviour, key_of: Callable[[Context], str]) -> Behaviour:
        """Return behaviour run only while key_of(context) and the total are under their limits."""
        by_key = self._by_key

        async def admitted(request: Any, context: Context) -> Any:
            key = key_of(context)
            if by_key[key] >= self.per_key:
                await self._too_many.abort(context)
            if self.open >= self.total:
                await self._full.abort(context)
            self.open += 1
            by_key[key] += 1
            try:
                return await behaviour(request, context)
            finally:
                self.open -= 1
                by_key[key] -= 1
                if by_key[key] <= 0:
                    del by_key[key]

        return admitted


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The three limits; each must be positive."""

    max_concurrent_rpcs: int
    max_open_streams: int
    max_streams_per_principal: int


class AdmissionInterceptor(WrappingInterceptor):
    """Admits a call only while this replica and its principal are under their limits."""

    def __init__(self, limits: AdmissionLimits, exempt: MethodMatcher) -> None:
        """Apply limits to every method but those matching exempt."""
        super().__init__()
        self.limits = limits
        self._exempt = exempt
        self.unary_in_progress = 0
        self.streams = StreamBudget(
            ("max_open_streams", limits.max_open_streams),
            ("max_streams_per_principal", limits.max_streams_per_principal),
        )
        self._overloaded = _refusal(
            f"server overloaded: {limits.max_concurrent_rpcs} calls in progress; retry shortly",
            "OVERLOADED",
            "max_concurrent_rpcs",
            limits.max_concurrent_rpcs,
            _UNARY_RETRY,
        )

    def streams_of(self, principal: str) -> int:
        """Return how many streams principal has open on this replica."""
        return self.streams.of("p:" + principal)

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the admission check (None for exempt methods)."""
        if self._exempt.matches(method):
            return None
        if kind == UNARY:
            return self._unary(behaviour)
        return self.streams.admitting(behaviour, _principal_key)

    def _unary(self, behaviour: Behaviour) -> Behaviour:
        async def admitted(request: Any, context: Context) -> Any:
            if self.unary_in_progress >= self.limits.max_concurrent_rpcs:
                await self._overloaded.abort(context)
            self.unary_in_progress += 1
            try:
                return await behaviour(request, context)
            finally:
                self.unary_in_progress -= 1

        return admitted


def _principal_key(context: Context) -> str:
    principal = PRINCIPAL.get()
    return "p:" + principal if principal is not None else _peer_key(context)


@dataclass(frozen=True, slots=True)
class PublicStreamLimits:
    """The public streams' budget: in total and per peer host; each must be positive."""

    max_public_streams: int
    max_public_streams_per_peer: int


class PublicStreamAdmission(WrappingInterceptor):
    """Admits a stream of a public method only while its peer host and all are under budget.

    Public methods carry no token, so their streams are counted per peer host, in a budget
    of their own. Unary public methods are left alone: a probe's Check is never refused.
    """

    def __init__(self, limits: PublicStreamLimits, public: MethodMatcher) -> None:
        """Apply limits to the streaming methods matching public."""
        super().__init__()
        self.limits = limits
        self._public = public
        self.streams = StreamBudget(
            ("max_public_streams", limits.max_public_streams),
            ("max_public_streams_per_peer", limits.max_public_streams_per_peer),
            whose="peer",
        )

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return a public stream behind its budget (None for every other method)."""
        if kind == UNARY or not self._public.matches(method):
            return None
        return self.streams.admitting(behaviour, _peer_key)
