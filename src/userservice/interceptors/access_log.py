"""Access log and RPC metrics: one JSON line per RPC at completion, with its final code.

The line has the shape of ``userservice.logs.JsonFormatter`` output (time, level, logger,
message, then fields) but is formatted and written to stderr here in one step: a record
through the logging machinery and JsonFormatter costs ~10 µs, this ~1 µs, on every RPC.
The level of the ``userservice.access`` logger still decides whether lines are written.
Lines hold no personal data: no request bodies, tokens, emails or status messages, only
the ErrorInfo reason (or the code name) of a failure. The request id (the caller's valid
``x-request-id`` or a fresh one) is sent back in the initial metadata. With tracing on, the
line carries the call's trace and span ids (set by the tracing layer, outside this one).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
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
from userservice.interceptors.recovery import final_code
from userservice.interceptors.status import error_reason
from userservice.metrics import ACCESS_LOG_ERRORS, MethodMetrics
from userservice.rpc_context import PRINCIPAL, REQUEST_ID_KEY, TRACE_LOG_FIELDS, request_id

LOGGER_NAME: Final = "userservice.access"
_log: Final = logging.getLogger(LOGGER_NAME)
_OK: Final = grpc.StatusCode.OK
_quote: Final[Callable[[str], str]] = encode_basestring_ascii
# The formatted second changes once a second; strftime on every line would not be free.
_second: list[Any] = [-1, ""]

Sink = Callable[[str], object]


class BufferedStderr:
    """Writes access lines to stderr in batches: at most FLUSH_SECONDS late, FLUSH_LINES at once.

    grpc.aio completes about one RPC per event-loop turn, so writing per line (or per
    turn) costs one system call per RPC, which measured as the largest single cost of the
    access log. Like nginx's ``access_log ... buffer= flush=``, lines wait a little and go
    out together; the chain flushes what is left when the server stops. A crash can lose
    at most the last FLUSH_SECONDS of access lines (errors are logged unbuffered).
    """

    FLUSH_LINES: Final = 256
    FLUSH_SECONDS: Final = 0.05

    def __init__(self) -> None:
        """Start with nothing pending."""
        self._pending: list[str] = []

    def __call__(self, line: str) -> None:
        """Queue line; the first line of a batch schedules its flush."""
        if not self._pending:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            except RuntimeError:
                sys.stderr.write(line)
                return
        self._pending.append(line)
        if len(self._pending) >= self.FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Write every pending line now."""
        if self._pending:
            lines, self._pending = self._pending, []
            try:
                # Looked up per write so a replaced sys.stderr (tests, daemons) is honoured.
                sys.stderr.write("".join(lines))
                sys.stderr.flush()
            except Exception:
                ACCESS_LOG_ERRORS.inc(len(lines))


def _timestamp(now: float) -> str:
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


class _CountingContext:
    """Delegates to the real context, counting stream messages read and written.

    The metric series move with each message, not at the end of the call, so a long-lived
    stream (WatchUsers) shows its traffic while it is open.
    """

    __slots__ = ("_context", "_received", "_sent", "received", "sent")

    def __init__(self, context: Context, metrics: MethodMetrics) -> None:
        self._context = context
        self._received = metrics.received
        self._sent = metrics.sent
        self.received = 0
        self.sent = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def count_received(self, message: Any = None) -> None:
        self.received += 1
        self._received.inc()

    def count_sent(self) -> None:
        self.sent += 1
        self._sent.inc()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self.count_received()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self.count_sent()


class AccessLogInterceptor(WrappingInterceptor):
    """Logs every RPC once with its final code, records its metrics, echoes x-request-id."""

    def __init__(self, sink: Sink | None = None) -> None:
        """Write lines with sink (default: stderr, in short batches)."""
        super().__init__()
        self.stderr = BufferedStderr()
        self._sink = sink or self.stderr

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour:
        """Return behaviour with timing, counting and one access line at completion."""
        metrics = MethodMetrics(method, kind)
        complete = self._complete
        if kind == UNARY:
            count_started, count_received = metrics.started.inc, metrics.received.inc

            async def logged(request: Any, context: Context) -> Any:
                started = time.perf_counter()
                count_started()
                count_received()
                correlation = request_id(context)
                code = _OK
                try:
                    # In the trailers, which ride with the status at no cost: initial metadata
                    # would be a batch of its own (~15-20 µs per unary call).
                    context.set_trailing_metadata(((REQUEST_ID_KEY, correlation),))
                    response = await behaviour(request, context)
                    code = context.code() or _OK
                    return response
                except BaseException as error:
                    code = final_code(context, error)
                    raise
                finally:
                    complete(method, kind, metrics, context, correlation, started, code, 0, 0)

            return logged

        streams_requests = kind != SERVER_STREAM
        open_streams = metrics.open_streams

        async def logged_stream(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            metrics.started.inc()
            open_streams.inc()
            correlation = request_id(context)
            counting = _CountingContext(context, metrics)
            if streams_requests:
                request = with_hook(request, counting.count_received)
            else:
                counting.count_received()
            code = _OK
            try:
                context.set_trailing_metadata(((REQUEST_ID_KEY, correlation),))
                # A stream also sends it at once: its client learns the call is established
                # before the first message (a watch may have none for long), for one batch per
                # stream rather than per message.
                await context.send_initial_metadata(((REQUEST_ID_KEY, correlation),))
                response = await behaviour(request, cast(Context, counting))
                code = context.code() or _OK
                if response is not None and code is _OK:  # a client stream's single response
                    counting.count_sent()
                return response
            except BaseException as error:
                code = final_code(context, error)
                raise
            finally:
                open_streams.dec()
                received, sent = counting.received, counting.sent
                complete(method, kind, metrics, context, correlation, started, code, received, sent)

        return logged_stream

    def _complete(
        self,
        method: str,
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
            metrics.handled(code).inc()
            metrics.seconds.observe(elapsed)
            if kind == UNARY and code is _OK:  # as go-grpc-prometheus: a failed call sent nothing
                metrics.sent.inc()
            if not _log.isEnabledFor(logging.INFO):
                return
            extra = TRACE_LOG_FIELDS.get()
            if kind != UNARY:
                extra += f',"messages_received":{received},"messages_sent":{sent}'
            if code is not _OK:
                reason = error_reason(context.trailing_metadata()) or code.name
                extra += f',"reason":{_quote(reason)}'
            self._sink(_line(method, kind, code.name, elapsed, context.peer(), correlation, extra))
        except Exception:
            ACCESS_LOG_ERRORS.inc()


def _line(
    method: str, kind: str, code: str, elapsed: float, peer: str, correlation: str, extra: str
) -> str:
    # Formatted by hand: ten times cheaper than a dict through json.dumps. Every string
    # that did not come from this module goes through _quote (JSON escaping, in C).
    principal = PRINCIPAL.get()
    quoted_method = _quote(method)
    return (
        f'{{"time":"{_timestamp(time.time())}","level":"INFO","logger":"{LOGGER_NAME}",'
        f'"message":{quoted_method[:-1]} {code}","method":{quoted_method},"kind":"{kind}",'
        f'"code":"{code}","duration_ms":{elapsed * 1000:.3f},"peer":{_quote(peer)},'
        f'"principal":{"null" if principal is None else _quote(principal)},'
        f'"request_id":{_quote(correlation)}{extra}}}\n'
    )
