"""Decoding: request bytes that do not parse end the call INVALID_ARGUMENT (MALFORMED_REQUEST).

grpc.aio deserializes a unary request before any interceptor runs, and a streamed one
while the handler iterates, and answers a parse failure with ``UNKNOWN`` carrying the
exception's class and the message type (unlogged, uncounted, no request id) or, mid-stream,
lets it reach recovery as ``INTERNAL`` with a traceback. Malformed bytes are the caller's
fault, so the chain gives every handler a tolerant deserializer that returns a
:class:`Malformed` marker instead of raising, and this layer, innermost, turns the marker
into ``INVALID_ARGUMENT`` with ErrorInfo reason ``MALFORMED_REQUEST`` and the request id:
for a unary request before the handler runs, for a streamed one at the message that does
not parse (earlier messages were already handled). Each one is one WARNING line without a
traceback and one increment of ``userservice_malformed_requests_total``; the access log
records the call like any other. Being inside auth, an unauthenticated caller's garbage
is refused ``UNAUTHENTICATED`` first and writes no warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, NoReturn

import grpc

from userservice.interceptors.handlers import (
    BIDI_STREAM,
    CLIENT_STREAM,
    Behaviour,
    Context,
    WrappingInterceptor,
    hook_messages,
    is_batch_error,
)
from userservice.interceptors.status import rejection
from userservice.metrics import MALFORMED_REQUESTS
from userservice.rpc_context import request_id

MALFORMED_REQUEST: Final = "MALFORMED_REQUEST"
_log: Final = logging.getLogger("userservice.decoding")

Deserializer = Callable[[bytes], Any]


class Malformed:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("error", "size")

    def __init__(self, error: str, size: int) -> None:
        """Record the parse failure's exception class name and the message's size in bytes."""
        self.error = error
        self.size = size


def tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """Return deserializer returning a Malformed marker instead of raising (None stays None)."""
    if deserializer is None or getattr(deserializer, "_tolerant", False):
        return deserializer
    parse = deserializer

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as error:
            # Only the caller's bytes went in: whatever the parser raised, they are at fault.
            return Malformed(type(error).__name__, len(raw))

    deserialize._tolerant = True  # type: ignore[attr-defined]
    return deserialize


async def _reject(
    method: str, context: Context, malformed: Malformed, index: int | None
) -> NoReturn:
    correlation = request_id(context)
    where = "request" if index is None else f"request stream message {index}"
    _log.warning(
        "malformed %s to %s (%s, %d bytes, request id %s)",
        where,
        method,
        malformed.error,
        malformed.size,
        correlation,
        extra={"method": method, "request_id": correlation},
    )
    MALFORMED_REQUESTS.labels(*method.lstrip("/").partition("/")[::2]).inc()
    info = {"request_id": correlation}
    if index is not None:
        info["message_index"] = str(index)
    answer = rejection(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"malformed {where}: not a valid protobuf message (request id {correlation})",
        MALFORMED_REQUEST,
        info=info,
    )
    try:
        await answer.abort(context)
    except grpc.aio.AbortError:
        raise
    except Exception as error:
        # Sending a status fails only on a call core already ended: the caller cancelled a
        # stream it had read enough of (its cancellation may land here a while later).
        if is_batch_error(error):
            raise asyncio.CancelledError from error
        raise


class _StreamCheck:
    """The per-message check that ends a request stream at its first malformed message."""

    __slots__ = ("_context", "_index", "_method")

    def __init__(self, method: str, context: Context) -> None:
        self._method = method
        self._context = context
        self._index = 0

    def check(self, message: Any) -> Awaitable[None] | None:
        """Return None for a message that parsed, else the rejection that ends the call."""
        index = self._index
        self._index = index + 1
        if isinstance(message, Malformed):
            return _reject(self._method, self._context, message, index)
        return None


class DecodingInterceptor(WrappingInterceptor):
    """Innermost layer: a request message that did not parse ends the call INVALID_ARGUMENT."""

    def wrap_deserializer(self, method: str, deserializer: Deserializer | None) -> Any:
        """Return the tolerant form of deserializer, whose markers wrap() turns into errors."""
        return tolerant(deserializer)

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour:
        """Return behaviour that never sees a Malformed marker."""
        if kind in (CLIENT_STREAM, BIDI_STREAM):

            async def checked_stream(requests: Any, context: Context) -> Any:
                # One check, so one message count, whichever style the handler reads in.
                check = _StreamCheck(method, context)
                return await behaviour(*hook_messages(requests, context, check.check))

            return checked_stream

        async def checked(request: Any, context: Context) -> Any:
            if isinstance(request, Malformed):
                await _reject(method, context, request, None)
            return await behaviour(request, context)

        return checked
