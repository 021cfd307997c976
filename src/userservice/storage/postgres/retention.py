"""Background deletes on PostgreSQL: events beyond retention at start, expired request_ids."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import asyncpg

from userservice.domain.errors import StorageUnavailableError
from userservice.storage.maintenance import (
    EXPIRE_BACKLOG_PAUSE_SECONDS,
    EXPIRE_BATCH,
    ExpirySchedule,
)
from userservice.storage.postgres import queries

_PRUNE_PAUSE_SECONDS: Final = 0.05

_log = logging.getLogger(__name__)

Connect = Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]


class Housekeeping:
    """Runs the store's bounded background deletes, one task of each kind at a time."""

    def __init__(self, connect: Connect, event_retention: int, expiry: ExpirySchedule) -> None:
        """Delete through connections from connect, keeping event_retention events."""
        self._connect = connect
        self._retention = event_retention
        self._expiry = expiry
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiring: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Prune one batch now; a larger backlog (a lowered retention) in the background."""
        # Writes prune only the range they push out, so events beyond a lowered retention
        # are deleted here, where a large backlog cannot hold up (or time out) the start.
        if await self._prune_batch():
            self._spawn(self._prune_backlog(), "userservice-postgres-prune")

    def after_write(self) -> None:
        """Start a sweep of expired request_ids if one is due and none is running."""
        if self._closed or not self._expiry.due():
            return
        if self._expiring is not None and not self._expiring.done():
            return
        self._expiry.started()
        self._expiring = self._spawn(self._expire(), "userservice-postgres-expire-requests")

    async def close(self) -> None:
        """Cancel what is running and wait for it to stop."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _prune_batch(self) -> bool:
        async with self._connect() as conn:
            status = await conn.execute(
                queries.PRUNE_BATCH, self._retention, queries.PRUNE_BATCH_SIZE
            )
        return bool(status != "DELETE 0")

    async def _prune_backlog(self) -> None:
        try:
            while True:
                if not await self._prune_batch():
                    return
                # Spreads the deletes out so they do not compete with live writes.
                await asyncio.sleep(_PRUNE_PAUSE_SECONDS)
        except StorageUnavailableError:
            _log.warning("pruning old events stopped; the next start resumes it", exc_info=True)

    async def _expire(self) -> None:
        try:
            while not self._closed:
                async with self._connect() as conn:
                    status = await conn.execute(
                        queries.EXPIRE_REQUESTS, self._expiry.cutoff_us(), EXPIRE_BATCH
                    )
                if not self._expiry.swept(int(status.rpartition(" ")[2])):
                    return
                # Spreads a backlog's deletes out so they do not compete with live writes.
                await asyncio.sleep(EXPIRE_BACKLOG_PAUSE_SECONDS)
        except (StorageUnavailableError, asyncpg.PostgresError):
            # Only space is at stake: expired keys are ignored until a later sweep deletes them.
            _log.warning(
                "deleting expired request_ids failed; a later write retries", exc_info=True
            )
