"""Opening a SQLite store: the file locked, migrated and its threads started."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from userservice.storage.maintenance import ExpirySchedule
from userservice.storage.sqlite.files import open_files
from userservice.storage.sqlite.repository import SqliteUserRepository
from userservice.storage.sqlite.shared import SharedCommits

DEFAULT_CACHE_SIZE: Final = 10_000
DEFAULT_EVENT_RETENTION: Final = 100_000
DEFAULT_REQUEST_ID_RETENTION_SECONDS: Final = 86_400.0


async def open_sqlite(
    path: Path,
    *,
    event_retention: int = DEFAULT_EVENT_RETENTION,
    migrate: bool = True,
    cache_size: int = DEFAULT_CACHE_SIZE,
    request_id_retention_seconds: float = DEFAULT_REQUEST_ID_RETENTION_SECONDS,
    shared: SharedCommits | None = None,
    statement_timeout: float | None = None,
    synchronous: str = "NORMAL",
) -> SqliteUserRepository:
    """Open (creating it if needed) the database file at path for this process alone.

    With shared, this process is one of the workers a parent forked: the parent holds the
    file's lock and has migrated it, and the workers keep their caches exact through shared.
    statement_timeout bounds each read and each write transaction (None: unbounded);
    synchronous is the connections' PRAGMA synchronous (NORMAL or FULL).
    """
    if event_retention < 1 or cache_size < 0:
        raise ValueError("event_retention must be positive and cache_size not negative")
    expiry = ExpirySchedule(request_id_retention_seconds)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
    try:
        files = await asyncio.get_running_loop().run_in_executor(
            writer,
            functools.partial(
                open_files,
                path,
                migrate and shared is None,
                event_retention,
                locked_by_parent=shared is not None,
                synchronous=synchronous,
            ),
        )
    except BaseException:
        writer.shutdown(wait=False)
        reader.shutdown(wait=False)
        raise
    return SqliteUserRepository(
        files,
        writer,
        reader,
        event_retention=event_retention,
        cache_size=cache_size,
        expiry=expiry,
        shared=shared,
        statement_timeout=statement_timeout,
    )
