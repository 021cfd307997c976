"""Admission: the service's own limits on work in progress, checked before any handler runs.

Three counters, all in-process (they bound this replica's memory and tasks, which is
what a replica can protect): unary calls in progress (``max_concurrent_rpcs``), streams
open (``max_open_streams``) and streams open per principal (``max_streams_per_principal``,
per peer host for a call without one). A call over a limit ends at once
``RESOURCE_EXHAUSTED`` with RetryInfo and ErrorInfo reason ``TOO_MANY_STREAMS`` (the
caller's own streams) or ``OVERLOADED`` (the replica's limits), so the access log and the
metrics record it like any other call. Exempt methods (health, reflection) are never
counted nor refused: one token holding every stream must not take the pod out of its
Service. grpc's own ``maximum_concurrent_rpcs`` stays only as a much higher backstop,
because it refuses calls before any interceptor runs (unlogged, uncounted, health too).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from userservice.interceptors._call import PRINCIPAL
from userservice.interceptors._handlers import UNARY, Behaviour, Context, WrappingInterceptor
from userservice.interceptors._status import Rejection, rejection
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.ratelimit import peer_host

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
        self.streams_open = 0
        self._streams_by_key: Counter[str] = Counter()
        self._overloaded = _refusal(
            f"server overloaded: {limits.max_concurrent_rpcs} calls in progress; retry shortly",
            "OVERLOADED",
            "max_concurrent_rpcs",
            limits.max_concurrent_rpcs,
            _UNARY_RETRY,
        )
        self._streams_full = _refusal(
            f"server overloaded: {limits.max_open_streams} streams open; retry later",
            "OVERLOADED",
            "max_open_streams",
            limits.max_open_streams,
            _STREAM_RETRY,
        )
        self._too_many = _refusal(
            f"too many open streams for this caller (limit {limits.max_streams_per_principal});"
            " close one or retry later",
            "TOO_MANY_STREAMS",
            "max_streams_per_principal",
            limits.max_streams_per_principal,
            _STREAM_RETRY,
        )

    def streams_of(self, principal: str) -> int:
        """Return how many streams principal has open on this replica."""
        return self._streams_by_key.get("p:" + principal, 0)

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the admission check (None for exempt methods)."""
        if self._exempt.matches(method):
            return None
        if kind == UNARY:
            return self._unary(behaviour)
        return self._stream(behaviour)

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

    def _stream(self, behaviour: Behaviour) -> Behaviour:
        by_key = self._streams_by_key

        async def admitted(request: Any, context: Context) -> Any:
            principal = PRINCIPAL.get()
            key = "p:" + principal if principal is not None else "h:" + peer_host(context.peer())
            if by_key[key] >= self.limits.max_streams_per_principal:
                await self._too_many.abort(context)
            if self.streams_open >= self.limits.max_open_streams:
                await self._streams_full.abort(context)
            self.streams_open += 1
            by_key[key] += 1
            try:
                return await behaviour(request, context)
            finally:
                self.streams_open -= 1
                by_key[key] -= 1
                if by_key[key] <= 0:
                    del by_key[key]

        return admitted
