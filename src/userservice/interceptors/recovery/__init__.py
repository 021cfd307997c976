"""Recovery: an unexpected exception becomes INTERNAL with a correlation id, never a stack trace.

Deliberate endings pass through untouched: ``context.abort()`` (it raises AbortError in
grpc.aio, see grpc#36009), cancellation (client cancel or deadline), and a read or write
that failed because the peer had already ended the call. grpc.aio reports that last one
as its internal ``ExecuteBatchError``, which it raises for other batch failures too: it
counts as the peer's doing only when the call really was cancelled or its deadline has
passed, and is otherwise a failure like any other. The full stack trace of a real
failure goes to the ``userservice.recovery`` log with the request id the client is shown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, NoReturn

import grpc

from userservice.interceptors.handlers import (
    Behaviour,
    Context,
    WrappingInterceptor,
    call_ended,
    is_batch_error,
    peer_ended,
)
from userservice.rpc_context import request_id, with_request_id

_log: Final = logging.getLogger("userservice.recovery")


def _deadline_passed(context: Context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def final_code(context: Context, error: BaseException) -> grpc.StatusCode:
    """Return the status a call that raised error ends with, once recovery has handled it."""
    if isinstance(error, asyncio.CancelledError) or (is_batch_error(error) and call_ended(context)):
        if _deadline_passed(context):
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    # A handler may set_code() and then raise: grpc.aio keeps that code, and so do we.
    if code is not None and code is not grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.INTERNAL


async def _recover(method: str, context: Context, error: Exception) -> NoReturn:
    correlation = request_id(context)
    _log.error(
        "unhandled %s in %s",
        type(error).__name__,
        method,
        exc_info=error,
        extra={"method": method, "request_id": correlation},
    )
    code = final_code(context, error)
    if code is grpc.StatusCode.INTERNAL:
        message = f"internal error (request id {correlation})"
    else:
        message = context.details() or f"{code.name.lower()} (request id {correlation})"
    # The exception text may hold anything (emails, SQL): the client only gets the message.
    await context.abort(code, message, with_request_id(()))


class RecoveryInterceptor(WrappingInterceptor):
    """Outermost interceptor: no exception reaches grpc.aio, which would send its text."""

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour:
        """Return behaviour with unexpected exceptions turned into INTERNAL."""

        async def recovered(request: Any, context: Context) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                if await peer_ended(context, error):
                    # grpc.aio treats CancelledError as a cancelled call: no status, a debug line.
                    raise asyncio.CancelledError from error
                await _recover(method, context, error)

        return recovered
