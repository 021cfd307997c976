"""Wiring and lifecycle: storage, domain, gRPC server, interceptors, health, metrics, traces.

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
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2_grpc

import userservice
from userservice import workers
from userservice.config import Settings, previous_secrets, replica_scan_limit
from userservice.domain.errors import StorageUnavailableError
from userservice.domain.pagination import PageTokenCodec
from userservice.domain.repository import UserRepository
from userservice.domain.scans import ScanGate
from userservice.domain.service import UserService
from userservice.health import SERVING, HealthServicer, monitor_storage
from userservice.interceptors.chain import InterceptorChain, build_chain
from userservice.interceptors.keys import KeyFetchError
from userservice.logs import quiet_library_logs
from userservice.metrics import (
    MetricsServer,
    publish_build_info,
    publish_health,
    start_metrics_server,
)
from userservice.observability.storage import instrument
from userservice.observability.tracing import TracingUnavailableError, start_tracing
from userservice.policy import SERVICE_NAME
from userservice.reflection import enable_reflection
from userservice.storage import (
    is_postgres_url,
    open_repository,
    parse_sqlite_path,
    storage_failure,
)
from userservice.storage import migrate as storage_migrate
from userservice.storage.sqlite.connection import lock as sqlite_lock
from userservice.storage.sqlite.shared import SharedCommits
from userservice.tls import ReloadingServerCredentials, TlsFilesError
from userservice.transport.servicer import register

if TYPE_CHECKING:
    from userservice.observability.otel import Tracing

log = logging.getLogger("userservice.server")

HEALTH_PING_TIMEOUT_SECONDS = 2.0
# A health request is a service name; a response, a status (List: a few of them).
PROBE_MESSAGE_BYTES = 64 * 1024


class StartupError(RuntimeError):
    """The server could not start (port taken, database unreachable or locked, schema not ready)."""


def _storage_startup_error(error: Exception) -> StartupError | None:
    """Return the one-line StartupError for a known failure to open storage, else None."""
    line = storage_failure(error)
    return None if line is None else StartupError(line)


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Return the server channel arguments; the README explains each choice."""
    return [
        # A second server on a taken port must fail, not silently share it; only the
        # workers of one parent share theirs (the parent checked that it was free).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", 256),
        # Calls grpc has taken but grpc.aio has not yet handed to the chain (it asks for one at
        # a time, and none past the backstop) wait in a backlog, which grpc sheds at random past
        # 1000 and entirely past 3000 by default: CANCELLED, unlogged, uncounted, health checks
        # too. Sized like the backstop, a burst (10,000 health Watches) reaches our admission
        # layers, which refuse it logged and counted.
        ("grpc.server.max_pending_requests", grpc_backstop(settings)),
        ("grpc.server.max_pending_requests_hard_limit", grpc_backstop(settings)),
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


def probe_channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Return the probe listener's channel arguments: the server's, unshared, small messages."""
    own = {
        "grpc.so_reuseport": 0,
        "grpc.max_receive_message_length": PROBE_MESSAGE_BYTES,
        "grpc.max_send_message_length": PROBE_MESSAGE_BYTES,
    }
    return [(name, own.get(name, value)) for name, value in channel_options(settings)]


def grpc_backstop(settings: Settings) -> int:
    """Return grpc's own concurrency limit: far above the admission layers', a last resort.

    grpc refuses calls over it before any interceptor runs, health checks included, so it
    must never be the limit that bites; it only bounds memory if admission itself is flooded.
    Every limit of ours counts: unary calls, streams, and public (health, reflection) streams.
    """
    ours = settings.max_concurrent_rpcs + settings.max_open_streams + settings.max_public_streams
    return 4 * ours + 1000


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    try:
        reloading = ReloadingServerCredentials(
            settings.tls_cert_file,
            settings.tls_key_file,
            settings.tls_client_ca_file,
            settings.reload_check_seconds,
        )
    except TlsFilesError as error:
        raise StartupError(str(error)) from error
    return reloading.credentials()


def page_token_codec(settings: Settings) -> PageTokenCodec:
    """Return the codec signing with the current secret and accepting the previous ones."""
    if not settings.page_token_secret:
        # Development or SQLite (one process): tokens need not survive a restart.
        return PageTokenCodec(os.urandom(32))
    previous = [secret.encode() for secret in previous_secrets(settings)]
    return PageTokenCodec(settings.page_token_secret.encode(), previous)


class Application:
    """The running service: start() brings it up, stop() runs the shutdown sequence."""

    def __init__(
        self,
        settings: Settings,
        shared: SharedCommits | None = None,
        *,
        tracing: Tracing | None = None,
    ) -> None:
        """Prepare to serve settings; tracing, if not given, comes from the OTEL_* environment.

        shared is set in a worker of `--workers N` on SQLite (storage/sqlite/shared.py).
        """
        self.settings = settings
        self._shared = shared
        self.health = HealthServicer([SERVICE_NAME])
        self._tracing = tracing
        self.port = 0
        self.probe_port: int | None = None
        self._repository: UserRepository | None = None
        self._service: UserService | None = None
        self._chain: InterceptorChain | None = None
        self._server: grpc.aio.Server | None = None
        self._probe_server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None
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
            store = await open_repository(
                settings.database_url, settings=settings, shared=self._shared
            )
        except Exception as error:
            known = _storage_startup_error(error)
            if known is None:
                raise
            raise known from error
        spans = None
        if self._tracing is not None:
            spans = self._tracing.storage_spans(_db_system(settings.database_url))
        self._repository = instrument(store, spans)
        self._service = UserService(
            self._repository,
            page_token_codec(settings),
            watch_progress_seconds=settings.watch_progress_seconds,
            watch_buffer_size=settings.watch_buffer_events,
            scans=ScanGate(settings.max_scans_per_principal, replica_scan_limit(settings)),
        )
        try:
            self._chain = await build_chain(settings, self._tracing)
        except KeyFetchError as error:
            raise StartupError(str(error)) from error
        server = grpc.aio.server(
            options=channel_options(settings),
            maximum_concurrent_rpcs=grpc_backstop(settings),
        )
        self._server = server
        # The chain is applied once per method as the servicers register, not per call.
        registrar: Any = self._chain.registrar(server)
        register(registrar, self._service)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        if settings.reflection:
            enable_reflection(registrar, [SERVICE_NAME, "grpc.health.v1.Health"])
        credentials = _server_credentials(settings)
        self.port = _bind(server, settings.listen_address, credentials)
        await server.start()
        if settings.probe_address:
            await self._start_probe_server(self._chain)
        if settings.metrics_address:
            try:
                self._metrics = start_metrics_server(settings.metrics_address)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on {settings.metrics_address}: {error.strerror or error}"
                ) from error
        await self.health.set(SERVING)
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
        self.probe_port = _bind(probe, settings.probe_address, None)
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
        await self._close_resources()
        log.info("stopped")

    async def _close_after_failed_start(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
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
        if self._chain is not None:
            closers.append(("interceptors", self._chain.aclose))
        if self._repository is not None:
            closers.append(("storage", self._repository.close))
        if self._tracing is not None:
            # Last, so spans of the calls that ended during shutdown are exported.
            closers.append(("tracing", self._tracing.aclose))
        self._metrics = self._chain = self._repository = self._tracing = None
        for name, close in closers:
            try:
                await close()
            except Exception as error:
                log.error("closing %s failed: %s: %s", name, type(error).__name__, error)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind address (with TLS when credentials are given); return the port or raise StartupError."""
    port = 0
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        log.debug("bind failed", exc_info=error)
    if port == 0:
        raise StartupError(f"cannot listen on {address} (in use or invalid)")
    return port


def _db_system(database_url: str) -> str:
    """Return the db.system.name of the store a database URL opens."""
    return "postgresql" if database_url.startswith("postgres") else "sqlite"


def _as_async(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def closing() -> None:
        close()

    return closing


async def serve(settings: Settings, shared: SharedCommits | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; return the exit code.

    The handlers are installed before start-up work begins, so a signal during start-up
    stops it cleanly (and so they exist when the process is PID 1, for which the kernel
    ignores default-action signals). A second signal during shutdown exits at once.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop_requested.is_set():
            log.error("second %s during shutdown: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    app = Application(settings, shared)
    starting = asyncio.ensure_future(app.start())
    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StartupError):
            await starting
        log.info("stopped during start-up")
        return 0
    try:
        starting.result()
    except StartupError as error:
        stopping.cancel()
        log.error("cannot start: %s", error)
        return 1
    await stopping
    await app.stop()
    return 0


def run(settings: Settings) -> int:
    """Serve in this process, or in settings.workers forked ones; return the exit code."""
    if settings.workers > 1:
        return _run_workers(settings)
    return _run_loop(settings, None)


def _run_loop(settings: Settings, shared: SharedCommits | None) -> int:
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
        return runner.run(serve(settings, shared))


def _run_workers(settings: Settings) -> int:
    """Prepare what the workers share (port, schema, SQLite lock), then supervise them."""
    try:
        worker_settings = workers.prepare(settings)
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    lock_fd: int | None = None
    shared = None
    try:
        if settings.migrate_on_start:
            storage_migrate(settings)
        if not is_postgres_url(settings.database_url):
            # Held by the parent for all its workers: still one server group per file.
            lock_fd = sqlite_lock(parse_sqlite_path(settings.database_url))
            shared = SharedCommits()
    except Exception as error:
        line = storage_failure(error)
        if line is None:
            raise
        log.error("cannot start: %s", line)
        return 1
    try:
        supervisor = workers.Supervisor(worker_settings, lambda: _run_loop(worker_settings, shared))
        return supervisor.run()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
