"""The Application: start() brings the service up, stop() runs the fixed shutdown sequence.

Shutdown is one fixed sequence (see Application.stop): health NOT_SERVING (but the
liveness entry) and health Watch streams ended → drain delay → server.stop(grace), the
probe listener's with it, while open WatchUsers streams are ended → interceptors and
storage closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2_grpc

import userservice
from userservice.config import Settings
from userservice.domain.errors import StorageUnavailableError
from userservice.domain.longrunning import OperationService
from userservice.domain.repository import UserRepository
from userservice.domain.service import UserService
from userservice.health import SERVING, HealthServicer, monitor_storage
from userservice.interceptors.auth.keys import KeyFetchError
from userservice.interceptors.chain import InterceptorChain
from userservice.logs import quiet_library_logs
from userservice.metrics import (
    MetricsServer,
    publish_build_info,
    publish_health,
    start_metrics_server,
)
from userservice.observability.storage import instrument
from userservice.observability.tracing import TracingUnavailableError, start_tracing
from userservice.policy import OPERATIONS_SERVICE_NAME, SERVICE_NAME
from userservice.reflection import enable_reflection
from userservice.server import wiring
from userservice.server.channel import (
    bind,
    channel_options,
    grpc_backstop,
    probe_channel_options,
    server_credentials,
)
from userservice.server.errors import StartupError
from userservice.server.worker_metrics import WorkerExporter
from userservice.storage import db_system, storage_failure
from userservice.storage.sqlite.shared import SharedCommits
from userservice.transport.operations import register_operations
from userservice.transport.servicer import register

if TYPE_CHECKING:
    from userservice.observability.otel import Tracing

log = logging.getLogger("userservice.server")

HEALTH_PING_TIMEOUT_SECONDS = 2.0


def _storage_startup_error(error: Exception) -> StartupError | None:
    """Return the one-line StartupError for a known failure to open storage, else None."""
    line = storage_failure(error)
    return None if line is None else StartupError(line)


class Application:
    """The running service: start() brings it up, stop() runs the shutdown sequence."""

    def __init__(
        self,
        settings: Settings,
        shared: SharedCommits | None = None,
        *,
        tracing: Tracing | None = None,
        metrics_socket: str | None = None,
    ) -> None:
        """Prepare to serve settings; tracing, if not given, comes from the OTEL_* environment.

        shared is set in a worker of `--workers N` on SQLite (storage/sqlite/shared.py), and
        metrics_socket in each worker when its parent serves /metrics: the worker then serves
        its registry there, to the parent alone (server/worker_metrics.py).
        """
        self.settings = settings
        self._shared = shared
        self.health = HealthServicer([SERVICE_NAME])
        self._tracing = tracing
        self.port = 0
        self.probe_port: int | None = None
        self._repository: UserRepository | None = None
        self._service: UserService | None = None
        self._operations: OperationService | None = None
        self._chain: InterceptorChain | None = None
        self._server: grpc.aio.Server | None = None
        self._probe_server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None
        self._metrics_socket = metrics_socket
        self._exporter: WorkerExporter | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def repository(self) -> UserRepository | None:
        """The open store, once started."""
        return self._repository

    @property
    def metrics_port(self) -> int | None:
        """Return the bound metrics port, if metrics are served."""
        return self._metrics.port if self._metrics else None

    async def start(self) -> None:
        """Open storage, bind the port and report SERVING; raise StartupError on failure."""
        try:
            await self._start()
        except BaseException:
            # Cancelled (a signal during start-up) or failed: close what was opened.
            await self._close_after_failed_start()
            raise

    async def _start(self) -> None:
        settings = self.settings
        quiet_library_logs()
        publish_build_info()
        for service in self.health.services:
            publish_health(service, partial(self._serving, service))
        if self._tracing is None:
            try:
                self._tracing = start_tracing(os.environ, userservice.__version__)
            except TracingUnavailableError as error:
                raise StartupError(f"cannot trace: {error}") from error
        try:
            store = await wiring.open_repository(
                settings.database_url, settings=settings, shared=self._shared
            )
        except Exception as error:
            known = _storage_startup_error(error)
            if known is None:
                raise
            raise known from error
        spans = None
        if self._tracing is not None:
            spans = self._tracing.storage_spans(db_system(settings.database_url))
        self._repository = instrument(store, spans)
        self._service = UserService(
            self._repository,
            wiring.codec(settings),
            watch_progress_seconds=settings.watch_progress_seconds,
            watch_window_size=settings.watch_buffer_events,
            scans=wiring.scan_gate(settings),
        )
        self._operations = OperationService(
            self._repository,
            self._service,
            wiring.codec(settings),
            wiring.operation_options(settings),
        )
        try:
            self._chain = await wiring.build_chain(settings, self._tracing)
        except KeyFetchError as error:
            raise StartupError(str(error)) from error
        server = grpc.aio.server(
            options=channel_options(settings),
            maximum_concurrent_rpcs=grpc_backstop(settings),
        )
        self._server = server
        # The chain is applied once per method as the servicers register, not per call.
        registrar: Any = self._chain.registrar(server)
        register(registrar, self._service, self._operations)
        register_operations(registrar, self._operations)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        if settings.reflection:
            enable_reflection(
                registrar, [SERVICE_NAME, OPERATIONS_SERVICE_NAME, "grpc.health.v1.Health"]
            )
        credentials = server_credentials(settings)
        self.port = bind(server, settings.listen_address, credentials)
        await server.start()
        if settings.probe_address:
            await self._start_probe_server(self._chain)
        if self._metrics_socket is not None:
            try:
                self._exporter = WorkerExporter(self._metrics_socket)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics to the parent on {self._metrics_socket}: "
                    f"{error.strerror or error}"
                ) from error
        elif settings.metrics_address:
            try:
                self._metrics = start_metrics_server(settings.metrics_address)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_address}: {error.strerror or error}"
                ) from error
        await self.health.set(SERVING)
        # Resumes the operations whose runner stopped (here before a restart, or elsewhere).
        self._operations.start()
        self._monitor = asyncio.create_task(
            monitor_storage(
                self.health,
                self._repository.ping,
                failures=settings.health_failures,
                interval=settings.health_check_interval_seconds,
                timeout=HEALTH_PING_TIMEOUT_SECONDS,
                errors=(StorageUnavailableError,),
            ),
            name="storage-health",
        )
        log.info(
            "serving",
            extra={
                "address": settings.listen_address,
                "port": self.port,
                "tls": credentials is not None,
                "reflection": settings.reflection,
                "database": settings.database_url.split(":", 1)[0],
                "metrics_port": self.metrics_port,
                "probe_port": self.probe_port,
                "tracing": self._tracing is not None,
            },
        )

    async def _start_probe_server(self, chain: InterceptorChain) -> None:
        """Serve health alone, in plaintext, on the probe address: kubelet probes have no TLS.

        It runs on this event loop, like every call, so a stuck loop fails the probe. Under the
        same chain as the main server, its calls are logged and its streams share the public
        budget.
        """
        settings = self.settings
        probe = grpc.aio.server(
            options=probe_channel_options(settings),
            maximum_concurrent_rpcs=grpc_backstop(settings),
        )
        self._probe_server = probe
        registrar: Any = chain.registrar(probe)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        self.probe_port = bind(probe, settings.probe_address, None)
        await probe.start()

    def _serving(self, service: str) -> bool:
        return bool(self.health.status_of(service) == SERVING)

    async def stop(self) -> None:
        """Run the shutdown sequence once; later calls wait for the first to finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        settings = self.settings
        log.info(
            "shutting down",
            extra={
                "drain_seconds": settings.shutdown_drain_seconds,
                "grace_seconds": settings.shutdown_grace_seconds,
            },
        )
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.health.shut_down()
        if settings.shutdown_drain_seconds > 0:
            await asyncio.sleep(settings.shutdown_drain_seconds)
        servers = [server for server in (self._server, self._probe_server) if server is not None]
        if servers:
            # The probe listener stops with the server: liveness is answered until then.
            stopping = asyncio.gather(
                *(server.stop(settings.shutdown_grace_seconds) for server in servers)
            )
            # Watches never finish by themselves: end them so clients resume elsewhere.
            if self._service is not None:
                await self._service.begin_shutdown()
            await stopping
        if self._operations is not None:
            # Their leases released, the operations running here resume on another replica.
            await self._operations.close()
        await self._close_resources()
        log.info("stopped")

    async def _close_after_failed_start(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self._operations is not None:
            await self._operations.close()
        for server in (self._server, self._probe_server):
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.stop(0)
        await self._close_resources()

    async def _close_resources(self) -> None:
        """Run every closer; one that fails is logged and never skips the others."""
        closers: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self._metrics is not None:
            metrics = self._metrics
            closers.append(("metrics", _as_async(metrics.close)))
        if self._exporter is not None:
            closers.append(("metrics", _as_async(self._exporter.close)))
        if self._chain is not None:
            closers.append(("interceptors", self._chain.aclose))
        if self._repository is not None:
            closers.append(("storage", self._repository.close))
        if self._tracing is not None:
            # Last, so spans of the calls that ended during shutdown are exported.
            closers.append(("tracing", self._tracing.aclose))
        self._metrics = self._chain = self._repository = self._tracing = None
        self._exporter = None
        for name, close in closers:
            try:
                await close()
            except Exception as error:
                log.error("closing %s failed: %s: %s", name, type(error).__name__, error)


def _as_async(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def closing() -> None:
        close()

    return closing
