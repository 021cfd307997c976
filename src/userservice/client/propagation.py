"""Client interceptors that carry a server call's deadline, request id and trace to its calls.

grpcio for Python does not propagate a server call's deadline to the calls its handler
makes (the hook is stubbed out in open-source grpcio): without these, every downstream call
starts a fresh budget. Installed on a channel (``UserServiceClient(propagate=True)``, or
``grpc.aio.insecure_channel(..., interceptors=propagation_interceptors())`` for any stub),
each outgoing call made inside a server call whose chain recorded it (the access log layer
sets ``rpc_context.INCOMING_CALL``):

- gets ``timeout = min(its own timeout, what is left of the incoming deadline)``;
- is refused locally, with ``DEADLINE_EXCEEDED`` and no network I/O, when nothing is left;
- carries the incoming call's ``x-request-id`` (unless it sets its own);
- is cancelled when the incoming call ends, if it is still running (streams: an awaited
  unary call is already cancelled with the handler's task).

Every outgoing call, inside a server call or not, carries the current trace context when
OpenTelemetry is loaded (the tracing layer imports it when tracing is on): the global
propagator (``OTEL_PROPAGATORS``, W3C trace context by default) writes ``traceparent``.
Without OpenTelemetry loaded nothing is imported and nothing is written.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any, Final

import grpc

from userservice.rpc_context import INCOMING_CALL, REQUEST_ID, REQUEST_ID_KEY

_PROPAGATE_MODULE: Final = "opentelemetry.propagate"


class BudgetSpentError(grpc.aio.AioRpcError):
    """DEADLINE_EXCEEDED raised before a call starts: the incoming call's deadline has passed."""

    def __init__(self, method: str) -> None:
        """Describe the refused call to method."""
        super().__init__(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=f"not started: the incoming call's deadline has passed ({method})",
        )


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _trace_headers() -> dict[str, str]:
    # Looked up, not imported: with tracing off the service never imports OpenTelemetry.
    propagate = sys.modules.get(_PROPAGATE_MODULE)
    if propagate is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def propagated(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """Return details with the incoming call's budget, request id and trace applied.

    Raises BudgetSpentError when the incoming call has no time left.
    """
    incoming = INCOMING_CALL.get()
    timeout = details.timeout
    if incoming is not None:
        remaining = incoming.remaining()
        if remaining is not None:
            if remaining <= 0:
                raise BudgetSpentError(_method_name(details.method))
            if timeout is None or remaining < timeout:
                timeout = remaining
    request_id = REQUEST_ID.get()
    trace = _trace_headers()
    if timeout == details.timeout and request_id is None and not trace:
        return details
    # A copy: the caller may have passed a Metadata object of its own, reused across calls.
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if request_id is not None and metadata.get(REQUEST_ID_KEY) is None:
        metadata.add(REQUEST_ID_KEY, request_id)
    for key, value in trace.items():
        if metadata.get(key) is None:
            metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


def _follow(call: Any) -> Any:
    incoming = INCOMING_CALL.get()
    if incoming is not None:
        incoming.follow(call)
    return call


class PropagatingUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Propagation for unary calls."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Start the call with the propagated deadline and metadata."""
        return _follow(await continuation(propagated(client_call_details), request))


class PropagatingUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    """Propagation for server-streaming calls."""

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Start the stream with the propagated deadline and metadata; it ends with the call."""
        return _follow(await continuation(propagated(client_call_details), request))


class PropagatingStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    """Propagation for client-streaming calls."""

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        """Start the stream with the propagated deadline and metadata; it ends with the call."""
        return _follow(await continuation(propagated(client_call_details), request_iterator))


class PropagatingStreamStream(grpc.aio.StreamStreamClientInterceptor):
    """Propagation for bidirectional streams."""

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Iterable[Any] | AsyncIterable[Any],
    ) -> Any:
        """Start the stream with the propagated deadline and metadata; it ends with the call."""
        return _follow(await continuation(propagated(client_call_details), request_iterator))


def propagation_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Return the four interceptors, for ``grpc.aio.*_channel(..., interceptors=...)``."""
    return [
        PropagatingUnaryUnary(),
        PropagatingUnaryStream(),
        PropagatingStreamUnary(),
        PropagatingStreamStream(),
    ]
