"""grpc.health.v1 whose Watch streams end when the server shuts down.

grpcio-health-checking's aio servicer keeps Watch streams open until the server
cancels them at the end of the grace period, which makes every shutdown take
the full grace. This one reports NOT_SERVING to watchers, then ends their
streams with OK so clients reconnect elsewhere at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
OVERALL = ""


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Serving status per service name ('' is the whole server), with Check and Watch."""

    def __init__(self, services: list[str]) -> None:
        self._statuses: dict[str, int] = dict.fromkeys([OVERALL, *services], NOT_SERVING)
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Return the current status, or NOT_FOUND for an unknown service."""
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Send the status now and on every change, until shutdown ends the stream."""
        last_sent: int | None = None
        while True:
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last_sent:
                # Written outside the lock: a slow reader must not hold up set().
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last_sent = status
            if self._shutting_down:
                return
            async with self._changed:
                current = self._statuses.get(request.service, SERVICE_UNKNOWN)
                if current == last_sent and not self._shutting_down:
                    await self._changed.wait()

    async def set(self, status: int) -> None:
        """Set every service's status (ignored once shutting down)."""
        if self._shutting_down:
            return
        async with self._changed:
            for service in self._statuses:
                self._statuses[service] = status
            self._changed.notify_all()

    def status(self) -> int:
        """Return the overall status."""
        return self._statuses[OVERALL]

    async def shut_down(self) -> None:
        """Report NOT_SERVING for good and end every Watch stream after it is told."""
        async with self._changed:
            for service in self._statuses:
                self._statuses[service] = NOT_SERVING
            self._shutting_down = True
            self._changed.notify_all()
