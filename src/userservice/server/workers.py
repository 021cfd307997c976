"""`--workers N`: a parent that forks N serving processes on one port and supervises them.

The parent forks before any gRPC object exists (grpc's examples/python/multiprocessing):
each worker builds its own server, with SO_REUSEPORT so the kernel spreads connections (not
calls) across them, and opens its own store. The parent migrates the schema once, holds the
SQLite file's lock for all of them and shares a page-token key, then only forwards signals
and watches its children:

- SIGTERM/SIGINT is forwarded; every worker runs the full shutdown sequence; the parent exits
  0 once all have exited 0 (a second signal is forwarded too: workers then exit at once).
- A worker that exits 1 or 2 during its start-up (a configuration or start-up error) would
  fail again: the others are stopped (not restarted) and the parent exits with that code.
- A worker that dies later (killed, crashed) is restarted after a back-off that doubles with
  each death in a row (0.5 s up to 30 s), so one bad process does not take the pod down and a
  crash loop does not spin.
- A worker whose parent dies (SIGKILL, OOM kill) is sent SIGTERM by the kernel
  (PR_SET_PDEATHSIG) and drains as on any SIGTERM, instead of serving on unsupervised.

Whatever else the parent runs (the public /metrics, server/worker_metrics.py) is a Companion:
told before and after each fork, and of each worker's end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Final, Protocol

from userservice.config import Settings
from userservice.domain.pagination import random_page_token_secret

log = logging.getLogger(__name__)

_STARTUP_SECONDS: Final = 10.0
_MAX_BACKOFF_SECONDS: Final = 30.0
# A worker that lived this long before dying starts the back-off from the beginning.
_STABLE_SECONDS: Final = 60.0


@dataclasses.dataclass
class _Worker:
    index: int
    started: float


class Companion(Protocol):
    """What the parent runs beside its workers, kept out of their way at each fork."""

    def before_fork(self) -> None:
        """Stop every thread of the parent: a fork copies locks other threads hold."""

    def after_fork(self, index: int, pid: int) -> None:
        """In the parent: worker index now runs as pid; resume."""

    def ended(self, pid: int) -> None:
        """In the parent: the worker pid has exited."""


class Supervisor:
    """Forks and watches the workers; run() returns the parent's exit code."""

    def __init__(
        self,
        settings: Settings,
        serve_worker: Callable[[], int],
        companion: Companion | None = None,
    ) -> None:
        """Run serve_worker in each of settings.workers forked processes, beside companion."""
        self._settings = settings
        self._serve_worker = serve_worker
        self._companion = companion
        self._workers: dict[int, _Worker] = {}
        self._signals: list[int] = []
        self._deaths_in_a_row = 0

    def run(self) -> int:
        """Fork the workers, then supervise until they have all exited."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._forward)
        for index in range(self._settings.workers):
            self._spawn(index)
        failure = 0
        while self._workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            if self._companion is not None:
                self._companion.ended(pid)
            code = os.waitstatus_to_exitcode(status)
            # Stopping (a signal, or a sibling that could not start): nothing is restarted.
            if self._signals or failure:
                failure = failure or (0 if code == 0 else abs(code))
                continue
            log.error("worker %d (pid %d) exited with %d", worker.index, pid, code)
            lived = time.monotonic() - worker.started
            if code in (1, 2) and lived < _STARTUP_SECONDS:
                # It could not start; its siblings cannot either, and restarts would loop.
                failure = code
                self._stop_all(signal.SIGTERM)
                continue
            if lived > _STABLE_SECONDS:
                self._deaths_in_a_row = 0
            self._restart(worker.index)
        return failure

    def _spawn(self, index: int) -> None:
        if self._companion is not None:
            self._companion.before_fork()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _stop_with_parent(parent_pid)
                # Until serve() installs its own: a stop during start-up is a clean exit.
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, _stop_before_serving)
                code = self._serve_worker()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            finally:
                logging.shutdown()
                os._exit(code)
        self._workers[pid] = _Worker(index, time.monotonic())
        if self._companion is not None:
            self._companion.after_fork(index, pid)
        log.info("worker %d started (pid %d)", index, pid)

    def _restart(self, index: int) -> None:
        backoff = min(_MAX_BACKOFF_SECONDS, 0.5 * 2**self._deaths_in_a_row)
        self._deaths_in_a_row += 1
        log.warning("restarting worker %d in %.1f s", index, backoff)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not self._signals:
            time.sleep(min(0.1, deadline - time.monotonic()))
        if not self._signals:
            self._spawn(index)

    def _forward(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)
        self._stop_all(signum)

    def _stop_all(self, signum: int) -> None:
        for pid in list(self._workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue


def _stop_before_serving(signum: int, frame: object) -> None:
    raise SystemExit(0)


_PR_SET_PDEATHSIG: Final = 1


def _stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send this worker SIGTERM when its parent dies (Linux; elsewhere a no-op)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    # The parent may have died between fork() and prctl(): then no signal would ever come.
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def prepare(settings: Settings) -> Settings:
    """Check that the port is free and return the settings every worker gets."""
    host, _, port = settings.listen_address.rpartition(":")
    _require_free_port(host.strip("[]"), int(port))
    # One key for all, or a page token from one worker would be refused by the others.
    secret = settings.page_token_secret or random_page_token_secret()
    return dataclasses.replace(settings, page_token_secret=secret, migrate_on_start=False)


def _require_free_port(host: str, port: int) -> None:
    """Fail now if another process listens there: with SO_REUSEPORT a bind would not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host or "::", port))
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
