"""The process: signal handling around the Application, the event loop, `--workers N`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from userservice.config import Settings
from userservice.server import workers
from userservice.server.errors import StartupError
from userservice.server.lifecycle import Application
from userservice.server.sqlite_lock import WorkerStore
from userservice.server.worker_metrics import ParentMetrics
from userservice.storage import storage_failure
from userservice.storage.sqlite.shared import SharedCommits

log = logging.getLogger("userservice.server")


async def serve(
    settings: Settings, shared: SharedCommits | None = None, metrics_socket: str | None = None
) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; return the exit code.

    shared and metrics_socket are set in a worker of `--workers N` (see _run_workers).

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
    app = Application(settings, shared, metrics_socket=metrics_socket)
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


def _run_loop(
    settings: Settings, shared: SharedCommits | None, metrics_socket: str | None = None
) -> int:
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
        return runner.run(serve(settings, shared, metrics_socket))


def _run_workers(settings: Settings) -> int:
    """Prepare what the workers share (port, schema, SQLite lock, /metrics), then supervise them."""
    try:
        worker_settings = workers.prepare(settings)
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    try:
        store = WorkerStore.prepare(settings)
    except Exception as error:
        line = storage_failure(error)
        if line is None:
            raise
        log.error("cannot start: %s", line)
        return 1
    metrics = None
    if settings.metrics_address:
        try:
            metrics = ParentMetrics(settings.metrics_address, settings.workers)
        except OSError as error:
            store.release()
            log.error(
                "cannot start: cannot serve metrics on %s: %s",
                settings.metrics_address,
                error.strerror or error,
            )
            return 1
        log.info("serving the workers' metrics", extra={"metrics_port": metrics.port})

    def serve_worker() -> int:
        # The parent serves /metrics; this worker serves its registry to the parent alone.
        socket_path = None if metrics is None else metrics.in_worker()
        return _run_loop(worker_settings, store.shared, socket_path)

    try:
        return workers.Supervisor(worker_settings, serve_worker, metrics).run()
    finally:
        if metrics is not None:
            metrics.close()
        store.release()
