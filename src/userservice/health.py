"""grpc.health.v1 whose Watch streams end when the server shuts down, and the storage monitor.

grpcio-health-checking's aio servicer keeps Watch streams open until the server
cancels them at the end of the grace period, which makes every shutdown take
the full grace. This one reports NOT_SERVING to watchers, then ends their
streams with OK so clients reconnect elsewhere at once.

Readiness follows the database, not the load: ``monitor_storage`` turns the status
NOT_SERVING only after several consecutive failed pings, so one slow ping (a busy
pool, a long scan) does not move this pod's load onto the others, which would then
saturate too.

Liveness follows neither: the ``liveness`` entry is SERVING whenever a Check is answered at
all, through a database outage and through the shutdown drain. The answer comes from the
event loop, so a loop that is stuck (a blocking call, a busy loop) cannot give it, and the
kubelet's probe times out and restarts the pod; a TCP probe would still pass, since grpc's
own threads keep accepting connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from userservice.rpc_context import with_request_id

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
OVERALL = ""
LIVENESS: Final = "liveness"
"""The entry a liveness probe asks for: SERVING whenever the event loop answers."""

_log: Final = logging.getLogger("userservice.health")


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Serving status per service name ('' is the whole server), with Check, List and Watch.

    Besides the services given, it answers for LIVENESS, which is always SERVING.
    """

    def __init__(self, services: list[str]) -> None:
        self._statuses: dict[str, int] = dict.fromkeys([OVERALL, *services], NOT_SERVING)
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Return the current status, or NOT_FOUND for an unknown service."""
        status = self._current(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {request.service!r}",
                with_request_id(()),
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Return the status of every service this server reports on, '' included."""
        response = health_pb2.HealthListResponse()
        for service, status in self._statuses.items():
            response.statuses[service].status = status
        response.statuses[LIVENESS].status = SERVING
        return response

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Send the status now and on every change, until shutdown ends the stream."""
        last_sent: int | None = None
        while True:
            status = self._current(request.service, SERVICE_UNKNOWN)
            if status != last_sent:
                # Written outside the lock: a slow reader must not hold up set().
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last_sent = status
            if self._shutting_down:
                return
            async with self._changed:
                current = self._current(request.service, SERVICE_UNKNOWN)
                if current == last_sent and not self._shutting_down:
                    await self._changed.wait()

    def _current(self, service: str, unknown: int | None = None) -> int | None:
        if service == LIVENESS:
            return int(SERVING)
        return self._statuses.get(service, unknown)

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

    @property
    def services(self) -> tuple[str, ...]:
        """The service names readiness reports on, '' (the whole server) first (not LIVENESS)."""
        return tuple(self._statuses)

    def status_of(self, service: str) -> int:
        """Return the status of one of the services."""
        return self._statuses[service]

    async def shut_down(self) -> None:
        """Report NOT_SERVING for good (but LIVENESS) and end every Watch stream once told."""
        async with self._changed:
            for service in self._statuses:
                self._statuses[service] = NOT_SERVING
            self._shutting_down = True
            self._changed.notify_all()


async def monitor_storage(
    health: HealthServicer,
    ping: Callable[[], Awaitable[None]],
    *,
    failures: int,
    interval: float,
    timeout: float,
    errors: tuple[type[BaseException], ...],
) -> None:
    """Ping until cancelled: NOT_SERVING after failures failed pings in a row, SERVING again."""
    caught: tuple[type[BaseException], ...] = (*errors, TimeoutError)
    failed = 0
    while True:
        await asyncio.sleep(interval)
        try:
            async with asyncio.timeout(timeout):
                await ping()
        except caught as error:
            failed += 1
            _log.warning(
                "storage ping failed (%d of %d before NOT_SERVING): %s",
                failed,
                failures,
                type(error).__name__,
                extra={"consecutive_failures": failed},
            )
            if failed >= failures and health.status() != NOT_SERVING:
                _log.warning("storage unreachable: reporting NOT_SERVING")
                await health.set(NOT_SERVING)
            continue
        if failed and health.status() != SERVING:
            _log.warning("storage reachable again: reporting SERVING")
            await health.set(SERVING)
        failed = 0
