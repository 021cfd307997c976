"""The current call's remaining time, bound by the transport so the store can answer in time."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

TimeRemaining = Callable[[], float | None]

_time_remaining: ContextVar[TimeRemaining | None] = ContextVar("time_remaining", default=None)


def bind_time_remaining(source: TimeRemaining) -> Token[TimeRemaining | None]:
    """Make source (seconds left, None for no deadline) the current call's clock."""
    return _time_remaining.set(source)


def unbind_time_remaining(token: Token[TimeRemaining | None]) -> None:
    """Undo bind_time_remaining once the call's handler returns."""
    _time_remaining.reset(token)


def time_remaining() -> float | None:
    """Return the seconds the current call has left, or None without a deadline or call."""
    source = _time_remaining.get()
    return None if source is None else source()
