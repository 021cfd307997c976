"""Wiring and lifecycle: storage, domain, gRPC server, interceptors, health, metrics.

Shutdown is one fixed sequence (see Application.stop): health NOT_SERVING and
health Watch streams ended → drain delay → server.stop(grace) while open
WatchUsers streams are ended → interceptors and storage closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from user.v1 import user_service_pb2
from userservice.config import Settings
from userservice.domain.errors import StorageUnavailableError
from userservice.domain.pagination import PageTokenCodec
from userservice.domain.repository import UserRepository
from userservice.domain.service import UserService
from userservice.health import NOT_SERVING, SERVING, HealthServicer
from userservice.interceptors.chain import InterceptorChain, build_chain
from userservice.metrics import MetricsServer, start_metrics_server
from userservice.reflection import enable_reflection
from userservice.storage import open_repository
from userservice.transport.servicer import register

log = logging.getLogger("userservice.server")

SERVICE_NAME = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
HEALTH_CHECK_INTERVAL_SECONDS = 1.0
HEALTH_PING_TIMEOUT_SECONDS = 2.0


class StartupError(RuntimeError):
    """The server could not start (port taken, bad TLS files, database unreachable)."""


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Return the server channel arguments; the README explains each choice."""
    return [
        # A second server on a taken port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", 256),
        # Detect dead peers behind NATs and load balancers.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keepalive enforcement: clients may ping at most every 10 s, and get
        # GOAWAY(too_many_pings) after two strikes instead of draining the CPU.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Recycle connections so clients rebalance across replicas (L4 balancers
        # pin an HTTP/2 connection to one pod for its lifetime).
        ("grpc.max_connection_idle_ms", 5 * 60_000),
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    client_ca = (
        Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class Application:
    """The running service: start() brings it up, stop() runs the shutdown sequence."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = HealthServicer([SERVICE_NAME])
        self.port = 0
        self._repository: UserRepository | None = None
        self._service: UserService | None = None
        self._chain: InterceptorChain | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def metrics_port(self) -> int | None:
        """Return the bound metrics port, if metrics are served."""
        return self._metrics.port if self._metrics else None

    async def start(self) -> None:
        """Open storage, bind the port and report SERVING; raise StartupError on failure."""
        settings = self.settings
        try:
            self._repository = await open_repository(settings.database_url, settings=settings)
        except StorageUnavailableError as error:
            raise StartupError(f"database unreachable: {error}") from error
        key = settings.page_token_secret.encode() or os.urandom(32)
        self._service = UserService(self._repository, PageTokenCodec(key))
        self._chain = await build_chain(settings)
        server = grpc.aio.server(
            interceptors=self._chain.interceptors,
            options=channel_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._server = server
        register(server, self._service)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            enable_reflection(server, [SERVICE_NAME, "grpc.health.v1.Health"])
        credentials = _server_credentials(settings)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(settings.listen_address)
            else:
                self.port = server.add_secure_port(settings.listen_address, credentials)
        except RuntimeError as error:
            self.port = 0
            log.debug("bind failed", exc_info=error)
        if self.port == 0:
            await self._close_resources()
            raise StartupError(f"cannot listen on {settings.listen_address} (in use or invalid)")
        await server.start()
        if settings.metrics_address:
            self._metrics = start_metrics_server(settings.metrics_address)
        await self.health.set(SERVING)
        self._monitor = asyncio.create_task(self._watch_storage(), name="storage-health")
        log.info(
            "serving",
            extra={
                "address": settings.listen_address,
                "port": self.port,
                "tls": credentials is not None,
                "reflection": settings.reflection,
                "database": settings.database_url.split(":", 1)[0],
                "metrics_port": self.metrics_port,
            },
        )

    async def _watch_storage(self) -> None:
        """Follow the database's reachability in the health status, without a restart."""
        assert self._repository is not None
        while True:
            await asyncio.sleep(HEALTH_CHECK_INTERVAL_SECONDS)
            try:
                async with asyncio.timeout(HEALTH_PING_TIMEOUT_SECONDS):
                    await self._repository.ping()
                healthy = True
            except (StorageUnavailableError, TimeoutError):
                healthy = False
            status = SERVING if healthy else NOT_SERVING
            if status != self.health.status():
                log.warning("storage %s", "reachable again" if healthy else "unreachable")
                await self.health.set(status)

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
        if self._server is not None:
            stopping = asyncio.ensure_future(self._server.stop(settings.shutdown_grace_seconds))
            # Watches never finish by themselves: end them so clients resume elsewhere.
            if self._service is not None:
                self._service.begin_shutdown()
            await stopping
        await self._close_resources()
        log.info("stopped")

    async def _close_resources(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._chain is not None:
            await self._chain.aclose()
        if self._repository is not None:
            await self._repository.close()


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; return the exit code."""
    app = Application(settings)
    try:
        await app.start()
    except StartupError as error:
        log.error("cannot start: %s", error)
        return 1
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    await app.stop()
    return 0


def run(settings: Settings) -> int:
    """Run serve() on a fresh event loop (uvloop when enabled and installed)."""
    loop_factory = None
    if settings.uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using the default event loop")
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(settings))
