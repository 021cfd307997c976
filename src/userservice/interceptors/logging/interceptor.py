"""The access log layer: per RPC, its request id echoed, its metrics, one JSON line at the end.

One layer runs the three concerns of a call's completion, each kept in its own package:
the request id (``interceptors.requestid``: sent back in the trailers of every call, and in
the initial metadata of a stream as it opens), the RPC metrics (``interceptors.metrics``)
and the line itself (``line.py``, written by ``sink.py``). It also records the call in
``rpc_context`` (``enter_call``: the deadline and end that the client's propagation
interceptors carry to the calls a handler makes), as it is the layer every call passes.
The level of the ``userservice.access`` logger decides whether lines are written. With
tracing on, the line carries the call's trace and span ids (set by the tracing layer,
outside this one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final, cast

import grpc

from userservice.interceptors.handlers import (
    SERVER_STREAM,
    UNARY,
    Behaviour,
    Context,
    WrappingInterceptor,
    with_hook,
)
from userservice.interceptors.logging.line import LOGGER_NAME, LineFormat, quote
from userservice.interceptors.logging.sink import BufferedStderr
from userservice.interceptors.metrics import CountingContext, record_completion
from userservice.interceptors.recovery import final_code
from userservice.interceptors.requestid import announce_request_id, echo_request_id
from userservice.interceptors.status import error_reason
from userservice.metrics import ACCESS_LOG_ERRORS, MethodMetrics, method_metrics
from userservice.rpc_context import TRACE_LOG_FIELDS, enter_call, request_id

_log: Final = logging.getLogger(LOGGER_NAME)
_OK: Final = grpc.StatusCode.OK

Sink = Callable[[str], object]


class AccessLogInterceptor(WrappingInterceptor):
    """Logs every RPC once with its final code, records its metrics, echoes x-request-id."""

    def __init__(self, sink: Sink | None = None) -> None:
        """Write lines with sink (default: stderr, in short batches)."""
        super().__init__()
        self.stderr = BufferedStderr()
        self._sink = sink or self.stderr

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour:
        """Return behaviour with timing, counting and one access line at completion."""
        metrics = method_metrics(method, kind)
        line = LineFormat(method, kind)
        complete = self._complete
        if kind == UNARY:

            async def logged(request: Any, context: Context) -> Any:
                started = time.perf_counter()
                metrics.started += 1
                metrics.received += 1
                enter_call(context)
                correlation = request_id(context)
                code = _OK
                try:
                    echo_request_id(context, correlation)
                    response = await behaviour(request, context)
                    code = context.code() or _OK
                    return response
                except BaseException as error:
                    code = final_code(context, error)
                    raise
                finally:
                    complete(line, kind, metrics, context, correlation, started, code, 0, 0)

            return logged

        streams_requests = kind != SERVER_STREAM

        async def logged_stream(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            metrics.started += 1
            metrics.open_streams += 1
            enter_call(context)
            correlation = request_id(context)
            counting = CountingContext(context, metrics)
            if streams_requests:
                request = with_hook(request, counting.count_received)
            else:
                counting.count_received()
            code = _OK
            try:
                echo_request_id(context, correlation)
                await announce_request_id(context, correlation)
                response = await behaviour(request, cast(Context, counting))
                code = context.code() or _OK
                if response is not None and code is _OK:  # a client stream's single response
                    counting.count_sent()
                return response
            except BaseException as error:
                code = final_code(context, error)
                raise
            finally:
                metrics.open_streams -= 1
                received, sent = counting.received, counting.sent
                complete(line, kind, metrics, context, correlation, started, code, received, sent)

        return logged_stream

    def _complete(
        self,
        line: LineFormat,
        kind: str,
        metrics: MethodMetrics,
        context: Context,
        correlation: str,
        started: float,
        code: grpc.StatusCode,
        received: int,
        sent: int,
    ) -> None:
        # Whatever goes wrong here (a closed stderr, a full disk) must not fail the RPC.
        try:
            elapsed = time.perf_counter() - started
            record_completion(metrics, kind, code, elapsed)
            if not _log.isEnabledFor(logging.INFO):
                return
            extra = TRACE_LOG_FIELDS.get()
            if kind != UNARY:
                extra += f',"messages_received":{received},"messages_sent":{sent}'
            if code is not _OK:
                reason = error_reason(context.trailing_metadata()) or code.name
                extra += f',"reason":{quote(reason)}'
            self._sink(line.line(code.name, elapsed, context.peer(), correlation, extra))
        except Exception:
            ACCESS_LOG_ERRORS.inc()
