"""The SQLite store's reader thread: one connection, and queries stopped when callers give up."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, TypeVarTuple

from userservice.storage.sqlite.connection import StatementBudget, storage_errors

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class ReaderThread:
    """Runs read queries one at a time on its own thread and connection."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        conn: sqlite3.Connection,
        statement_timeout: float | None = None,
    ) -> None:
        """Read through conn, used only from executor's single thread.

        Each read gets statement_timeout seconds (None: unbounded) before it is interrupted.
        """
        self.executor = executor
        self._conn = conn
        self._budget = StatementBudget(conn, statement_timeout)
        # The read running on the thread, shared with the loop thread to interrupt it.
        self._running_lock = threading.Lock()
        self._running: object | None = None

    async def run(self, query: Callable[[sqlite3.Connection, *Ts], T], *args: *Ts) -> T:
        """Run query(conn, *args) on the thread; a cancelled caller or a spent budget stops it."""
        job = object()

        def run() -> T:
            with self._running_lock:
                self._running = job
            try:
                with self._budget.running():
                    return query(self._conn, *args)
            finally:
                with self._running_lock:
                    self._running = None

        with storage_errors():
            try:
                return await asyncio.get_running_loop().run_in_executor(self.executor, run)
            except asyncio.CancelledError:
                self._interrupt(job)
                raise

    def _interrupt(self, job: object) -> None:
        """Stop job's query if it is the one running: its caller gave up (deadline, cancel).

        A job still queued was cancelled with its future. The lock keeps the check and the
        interrupt together, so a later caller's query is never the one interrupted.
        """
        with self._running_lock:
            if self._running is job:
                self._conn.interrupt()
