"""A UserRepository wrapper that times every storage operation and, with tracing, spans it.

It wraps whatever store ``open_repository`` returns and forwards every attribute, so the
stores themselves know nothing of metrics. Each coroutine method is wrapped on its first
use and then stored on the wrapper: later calls find it as a plain attribute, and its
histogram series (``userservice_storage_seconds{operation}``) is resolved once.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Final, cast

from userservice.domain.repository import UserRepository
from userservice.metrics import storage_seconds

SpanFactory = Callable[[str], AbstractContextManager[object] | None]
"""Given an operation, a context manager for its child span, or None for no span."""

UNTIMED: Final = frozenset({"wait_for_events", "close"})
"""Operations left as they are: waiting is their job, so their time says nothing of storage."""


class InstrumentedRepository:
    """Forwards to a store, recording each operation's time (and span, given a factory)."""

    def __init__(self, inner: UserRepository, span: SpanFactory | None = None) -> None:
        """Wrap inner; span, when given, opens a child span per operation."""
        self.inner = inner
        self._span = span

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in UNTIMED or not inspect.iscoroutinefunction(attribute):
            return attribute
        wrapped = _timed(name, attribute, self._span)
        # Found directly from now on: __getattr__ runs only for missing attributes.
        setattr(self, name, wrapped)
        return wrapped


def instrument(repository: UserRepository, span: SpanFactory | None = None) -> UserRepository:
    """Return repository with storage metrics (and spans, given a span factory)."""
    return cast(UserRepository, InstrumentedRepository(repository, span))


def _timed(
    operation: str, call: Callable[..., Awaitable[Any]], span: SpanFactory | None
) -> Callable[..., Awaitable[Any]]:
    observe = storage_seconds(operation).observe
    clock = time.perf_counter
    if span is None:

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await call(*args, **kwargs)
            finally:
                observe(clock() - started)

        return timed

    async def traced(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        manager = span(operation)
        try:
            if manager is None:
                return await call(*args, **kwargs)
            with manager:
                return await call(*args, **kwargs)
        finally:
            observe(clock() - started)

    return traced
