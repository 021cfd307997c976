"""SQLite connections: the single-process lock, pragmas, transactions and driver error mapping."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from userservice.domain.errors import StorageTimeoutError, StorageUnavailableError

BUSY_TIMEOUT_MS: Final = 5_000
SYNCHRONOUS_MODES: Final = ("NORMAL", "FULL")
"""PRAGMA synchronous values the store accepts (WAL mode): NORMAL, or FULL for power-loss safety."""
# SQLite virtual-machine instructions between two budget checks: a scan calls the handler
# (which takes the GIL) every millisecond or two of its work, too rarely to cost anything
# measurable, and often enough that a statement stops soon after its budget.
_PROGRESS_INSTRUCTIONS: Final = 20_000
# Primary result codes that mean the file cannot be used right now, as opposed to a bad query.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


class SqliteLockedError(RuntimeError):
    """The database file is already open in another process (or another repository)."""


def connect(
    path: Path, *, query_only: bool = False, synchronous: str = "NORMAL"
) -> sqlite3.Connection:
    """Open path in WAL mode with the pragmas every connection of this store uses."""
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) where they belong.
    # check_same_thread is off because a connection is opened on the writer thread and
    # then used by exactly one executor thread.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # A delete's erasure must not leave the old bytes in the file: SQLite then zeroes
        # freed cells and freelist pages instead of leaving them for reuse (see docs/storage.md).
        conn.execute("PRAGMA secure_delete = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"SQLite database {path} cannot use WAL mode (got {mode!r})")
        if query_only:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def lock(path: Path) -> int:
    """Take the exclusive lock that makes this process the file's only user; return its fd."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SqliteLockedError(
            f"SQLite database {path} is already in use (lock {lock_path} held by pid {holder}); "
            "the SQLite store serves a single process: stop the other one, "
            "or use PostgreSQL to run several replicas"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class StatementBudget:
    """SQLite's statement_timeout: statements run inside running() stop once it is spent.

    A progress handler checks the clock every few thousand virtual-machine instructions
    and interrupts the statement past the deadline; the driver then raises
    OperationalError (SQLITE_INTERRUPT), which storage_errors turns into
    StorageTimeoutError, as PostgreSQL's statement_timeout is. Statements run outside
    running() (opening, migrations) have no budget, nor do those after an interrupt (the
    ROLLBACK that must follow it).
    """

    __slots__ = ("_deadline", "_seconds")

    def __init__(self, conn: sqlite3.Connection, seconds: float | None) -> None:
        """Give conn's statements seconds each time running() is entered; None: no budget."""
        self._seconds = seconds
        self._deadline: float | None = None
        if seconds is not None:
            conn.set_progress_handler(self._spent, _PROGRESS_INSTRUCTIONS)

    def _spent(self) -> int:
        deadline = self._deadline
        if deadline is None or time.monotonic() <= deadline:
            return 0
        # One interrupt per budget: the ROLLBACK that follows it must run to the end.
        self._deadline = None
        return 1

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Run the body's statements within the budget (on the connection's own thread)."""
        if self._seconds is None:
            yield
            return
        self._deadline = time.monotonic() + self._seconds
        try:
            yield
        finally:
            self._deadline = None


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Run the body in one transaction: commit if it returns, roll back if anything raises."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn the driver's I/O and locking failures into StorageUnavailableError.

    An interrupted statement is StorageTimeoutError: its budget (StatementBudget) was
    spent. The other interrupt, of a read whose caller gave up, reaches no one.
    """
    try:
        yield
    except sqlite3.OperationalError as error:
        # Errors raised by the sqlite3 module itself carry no result code.
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_INTERRUPT:
            raise StorageTimeoutError() from error
        if code in _UNAVAILABLE_CODES:
            raise StorageUnavailableError(f"SQLite database unavailable: {error}") from error
        raise
