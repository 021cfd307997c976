"""Per-call state: request id, principal and scopes, invocation metadata.

Set by the interceptors, read by them, by the transport (who is calling), by health and by
tracing; public so that none of those reaches into an interceptor's module.

grpc.aio runs the interceptors and the handler of one RPC in one task with its own
contextvars.Context, so a value set by an inner wrapper is visible to the outer ones
once the inner call returns or raises.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from typing import Any, Final, TypeAlias

import grpc

# A string, because grpc's runtime classes are not all subscriptable (only the stubs are).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

REQUEST_ID_KEY: Final = "x-request-id"
MAX_REQUEST_ID_LENGTH: Final = 128

REQUEST_ID: Final[ContextVar[str | None]] = ContextVar("userservice_request_id", default=None)
PRINCIPAL: Final[ContextVar[str | None]] = ContextVar("userservice_principal", default=None)
SCOPES: Final[ContextVar[frozenset[str]]] = ContextVar("userservice_scopes", default=frozenset())
"""The verified token's scopes, next to its subject in PRINCIPAL (which keys limits and logs)."""
TRACE_LOG_FIELDS: Final[ContextVar[str]] = ContextVar("userservice_trace_log_fields", default="")
"""The access line's trace fields (``,"trace_id":...,"span_id":...``), set by the tracing layer."""
_METADATA: Final[ContextVar[Any]] = ContextVar("userservice_metadata", default=None)


class IncomingCall:
    """The server call being handled: its deadline, and the outgoing calls that follow it.

    The access log layer sets one per call (INCOMING_CALL); the client's propagation
    interceptors (userservice.client.propagation) read it to bound the calls a handler
    makes. The absolute deadline is read from grpc on first use, not per call: most calls
    never make one.
    """

    __slots__ = ("_context", "_deadline", "_ended", "_outgoing")

    def __init__(self, context: Context) -> None:
        """Describe the call context serves."""
        self._context = context
        # -1.0: not read from grpc yet (a deadline on the monotonic clock is never negative).
        self._deadline: float | None = -1.0
        self._outgoing: set[Any] | None = None
        self._ended = False

    @property
    def deadline(self) -> float | None:
        """The call's deadline on time.monotonic()'s clock, or None if it has none."""
        deadline = self._deadline
        if deadline is not None and deadline < 0:
            remaining = self._context.time_remaining()
            deadline = self._deadline = (
                None if remaining is None else time.monotonic() + max(remaining, 0.0)
            )
        return deadline

    def remaining(self) -> float | None:
        """Return the seconds the call has left (<= 0 once spent), or None without a deadline."""
        deadline = self.deadline
        return None if deadline is None else deadline - time.monotonic()

    def follow(self, call: Any) -> None:
        """Cancel call (an outgoing grpc.aio call) when this call ends, unless it ended first.

        A call awaited in the handler is cancelled with the handler's task anyway; a stream
        kept open across awaits (or handed to another task) is not, so it is tracked here.
        """
        if self._ended:
            call.cancel()
            return
        outgoing = self._outgoing
        if outgoing is None:
            outgoing = self._outgoing = set()
            # The stubs name a class of their own here; grpc takes any callable of the context.
            self._context.add_done_callback(self._end)  # type: ignore[arg-type]
        outgoing.add(call)
        call.add_done_callback(outgoing.discard)

    def _end(self, _context: Any) -> None:
        self._ended = True
        outgoing, self._outgoing = self._outgoing or set(), None
        for call in outgoing:
            call.cancel()


INCOMING_CALL: Final[ContextVar[IncomingCall | None]] = ContextVar(
    "userservice_incoming_call", default=None
)
"""The server call this task serves (set once per call by the access log layer), or None."""


def enter_call(context: Context) -> None:
    """Record context as the call this task serves: one object and one contextvar set."""
    INCOMING_CALL.set(IncomingCall(context))


def invocation_metadata(context: Context) -> Any:
    """Return the call's invocation metadata, fetched from grpc once per call."""
    metadata = _METADATA.get()
    if metadata is None:
        metadata = context.invocation_metadata() or ()
        _METADATA.set(metadata)
    return metadata


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    """Return the first text value of key in invocation metadata, or None."""
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value if isinstance(value, str) else None
    return None


def valid_request_id(value: str) -> bool:
    """Return whether a caller's request id is safe to log and echo: short printable ASCII."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


def new_request_id() -> str:
    """Return a fresh 96-bit hex id: unique enough to correlate, not a secret (no syscall)."""
    return f"{random.getrandbits(96):024x}"


def request_id(context: Context) -> str:
    """Return the call's request id: the caller's x-request-id if valid, else a fresh one."""
    current = REQUEST_ID.get()
    if current is None:
        given = metadata_value(invocation_metadata(context), REQUEST_ID_KEY)
        current = given if given is not None and valid_request_id(given) else new_request_id()
        REQUEST_ID.set(current)
    return current


def with_request_id(
    trailing_metadata: Sequence[tuple[str, str | bytes]],
) -> tuple[tuple[str, str | bytes], ...]:
    """Return trailing metadata for an abort, with the call's x-request-id first.

    An abort's trailing metadata replaces what the access log set, so every abort passes
    its metadata through here to keep the request id in the trailers of every status.
    """
    current = REQUEST_ID.get()
    if current is None:
        return tuple(trailing_metadata)
    return ((REQUEST_ID_KEY, current), *trailing_metadata)


def peer_host(peer: str) -> str:
    """Return the host part of a gRPC peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5, unix:...)."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer
