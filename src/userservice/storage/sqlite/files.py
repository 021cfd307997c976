"""What opening a SQLite store acquires, and the order it is given back in."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from userservice.storage.migrations import backend_migrations
from userservice.storage.sqlite import queries, reads
from userservice.storage.sqlite.connection import connect, lock
from userservice.storage.sqlite.migrations import apply_migrations, require_migrated
from userservice.storage.sqlite.writes import backfill_keys


@dataclass(frozen=True, slots=True)
class StoreFiles:
    """The lock (-1: held by the parent), a connection per thread and the newest sequence."""

    path: Path
    lock_fd: int
    write_conn: sqlite3.Connection
    read_conn: sqlite3.Connection
    ping_conn: sqlite3.Connection
    latest_sequence: int


def open_files(
    path: Path,
    migrate: bool,
    event_retention: int,
    *,
    locked_by_parent: bool = False,
    synchronous: str = "NORMAL",
) -> StoreFiles:
    """Lock path (unless the supervising parent holds the lock), migrate and connect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as undo:
        lock_fd = -1
        if not locked_by_parent:
            lock_fd = lock(path)
            undo.callback(os.close, lock_fd)
        write_conn = connect(path, synchronous=synchronous)
        undo.callback(write_conn.close)
        if migrate:
            apply_migrations(write_conn, backend_migrations("sqlite"))
        else:
            require_migrated(write_conn)
        # Catches up at once when event_retention was lowered since the last run.
        write_conn.execute(queries.PRUNE_EVENTS, (event_retention,))
        # Rows from before migration 0002 (or written by older code since) get their key.
        backfill_keys(write_conn)
        read_conn = connect(path, query_only=True, synchronous=synchronous)
        undo.callback(read_conn.close)
        ping_conn = connect(path, query_only=True, synchronous=synchronous)
        latest = reads.event_bounds(write_conn)[1]
        undo.pop_all()
    return StoreFiles(path, lock_fd, write_conn, read_conn, ping_conn, latest)


def close_writer(files: StoreFiles) -> None:
    """Close the write connection and release the lock (on the writer thread)."""
    with contextlib.ExitStack() as stack:
        if files.lock_fd >= 0:
            stack.callback(os.close, files.lock_fd)
        stack.callback(files.write_conn.close)
        # Recommended before closing: refreshes planner statistics where they went stale.
        files.write_conn.execute("PRAGMA optimize")
