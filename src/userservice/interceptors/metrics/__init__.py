"""RPC metrics per method, as go-grpc-prometheus names them: started, handled, messages, time.

Recorded by the access log layer (``interceptors.logging``), which sees every call's final
code; the series themselves are defined in ``userservice.metrics``.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from userservice.interceptors.handlers import UNARY
from userservice.metrics import MethodMetrics
from userservice.rpc_context import Context

_OK: Final = grpc.StatusCode.OK


class CountingContext:
    """Delegates to the real context, counting stream messages read and written.

    The metric series move with each message, not at the end of the call, so a long-lived
    stream (WatchUsers) shows its traffic while it is open.
    """

    __slots__ = ("_context", "_metrics", "received", "sent")

    def __init__(self, context: Context, metrics: MethodMetrics) -> None:
        """Count into metrics the messages passing through context."""
        self._context = context
        self._metrics = metrics
        self.received = 0
        self.sent = 0

    def __getattr__(self, name: str) -> Any:
        """Everything else is the real context's."""
        return getattr(self._context, name)

    def count_received(self, message: Any = None) -> None:
        """Count one message received (a request stream's hook, or a unary request)."""
        self.received += 1
        self._metrics.received += 1

    def count_sent(self) -> None:
        """Count one message sent."""
        self.sent += 1
        self._metrics.sent += 1

    async def read(self) -> Any:
        """Read the next request message, counting it."""
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self.count_received()
        return message

    async def write(self, message: Any) -> None:
        """Write a response message, counting it."""
        await self._context.write(message)
        self.count_sent()


def record_completion(
    metrics: MethodMetrics, kind: str, code: grpc.StatusCode, elapsed: float
) -> None:
    """Record a finished call: its code and duration, and a unary call's one response."""
    metrics.handle(code)
    metrics.seconds.observe(elapsed)
    if kind == UNARY and code is _OK:  # as go-grpc-prometheus: a failed call sent nothing
        metrics.sent += 1
