"""PostgreSQL UserRepository (asyncpg), safe for many replicas on one database.

Event sequences come from a one-row counter whose row lock each writer takes as the last
statement of its transaction, so sequences become visible in commit order and a watcher
that has read sequence N never later finds a committed event below N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final, TypeVar

import asyncpg

from userservice.domain.errors import (
    CommitOutcomeUnknownError,
    ConcurrentConflictError,
    DomainError,
    StorageUnavailableError,
)
from userservice.domain.model import (
    OPERATOR,
    Caller,
    Page,
    SyncOutcome,
    User,
    UserChanges,
    UserEvent,
    UserFilter,
    email_key,
)
from userservice.domain.operations import Operation
from userservice.storage.maintenance import ExpirySchedule
from userservice.storage.postgres import operations, queries, reads, writes
from userservice.storage.postgres.connection import (
    UNAVAILABLE_ERRORS,
    ConnectOptions,
    acquire,
    close_connection,
    translated_errors,
)
from userservice.storage.postgres.listener import EventListener
from userservice.storage.postgres.migrations import require_migrated
from userservice.storage.postgres.retention import Housekeeping

_T = TypeVar("_T")

_TRANSACTION_ATTEMPTS: Final = 3
_PING_TIMEOUT_SECONDS: Final = 2.0
_CLOSE_TIMEOUT_SECONDS: Final = 5.0

_log = logging.getLogger(__name__)


class PostgresUserRepository:
    """UserRepository on PostgreSQL; build it with open_postgres."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        url: str,
        options: ConnectOptions,
        event_retention: int,
        expiry: ExpirySchedule,
    ) -> None:
        """Wrap an asyncpg pool; open_postgres does this and starts the listener."""
        self._pool = pool
        self._url = url
        self._options = options
        self._retention = event_retention
        self._expiry = expiry
        self._closed = False
        self._listener = EventListener(url, options, 0)
        self._listener_task: asyncio.Task[None] | None = None
        self._housekeeping = Housekeeping(self._connection, event_retention, expiry)
        # Health pings use a connection of their own, so a saturated pool reads as
        # overload (the calls waiting fail as STORAGE_BUSY), never as an outage.
        self._ping_conn: asyncpg.Connection | None = None
        self._ping_lock = asyncio.Lock()
        self.event_reads = 0
        """Queries of the event log so far: the change feed keeps it at one per wake-up."""

    async def _start(self) -> None:
        async with self._connection() as conn:
            await require_migrated(conn)
            # Rows from before migration 0002 (or from older replicas) get their filter key.
            await writes.backfill_keys(conn)
            latest = int(await conn.fetchval(queries.SELECT_LATEST_SEQUENCE))
        self._listener.signal.reset(latest)
        self._listener_task = asyncio.create_task(
            self._listener.run(), name="userservice-postgres-listener"
        )
        await self._housekeeping.start()

    # -- writes ---------------------------------------------------------------

    async def create(self, user: User, request_id: str | None, fingerprint: str) -> User:
        """Insert a user; a repeated request_id returns the first result (see the protocol)."""
        cutoff = self._expiry.cutoff_us()
        return await self._transact(
            lambda conn: writes.create(conn, user, request_id, fingerprint, cutoff, self._retention)
        )

    async def create_many(self, users: Sequence[User]) -> list[User | DomainError]:
        """Insert a batch with one statement in one transaction; per row the user or its error."""
        if not users:
            return []
        return await self._transact(lambda conn: writes.create_many(conn, users, self._retention))

    async def update(
        self,
        user_id: str,
        changes: UserChanges,
        expected_etag: str | None,
        now_us: int,
        *,
        caller: Caller = OPERATOR,
    ) -> User:
        """Apply changes under a row lock after checking the caller and the etag."""
        return await self._transact(
            lambda conn: writes.update(
                conn, user_id, changes, expected_etag, now_us, self._retention, caller
            )
        )

    async def delete(
        self, user_id: str, expected_etag: str | None, now_us: int, *, caller: Caller = OPERATOR
    ) -> None:
        """Delete a user under a row lock after checking the caller and the etag."""
        await self._transact(
            lambda conn: writes.delete(
                conn, user_id, expected_etag, now_us, self._retention, caller
            )
        )

    async def delete_users(self, user_ids: Sequence[str], now_us: int) -> list[str]:
        """Delete these users in one transaction as the operator; return the ids deleted."""
        if not user_ids:
            return []
        return await self._transact(
            lambda conn: writes.delete_many(conn, user_ids, now_us, self._retention)
        )

    # -- long-running operations ------------------------------------------------
    # Single statements, each its own transaction: no event is appended, so they go
    # around _transact and its wake-up of the watchers.

    async def create_operation(self, operation: Operation) -> None:
        """Insert a new operation."""
        async with self._connection() as conn:
            await operations.create(conn, operation)

    async def get_operation(self, name: str) -> Operation | None:
        """Return the operation with this name, or None."""
        async with self._connection() as conn:
            return await operations.get(conn, name)

    async def list_operations(
        self, owner: str | None, done: bool | None, after_name: str | None, limit: int
    ) -> list[Operation]:
        """Return up to limit operations after after_name in name order, as selected."""
        async with self._connection() as conn:
            return await operations.list_page(conn, owner, done, after_name, limit)

    async def renew_operation(
        self, name: str, lease_owner: str, metadata: str, lease_expiry_us: int, now_us: int
    ) -> Operation | None:
        """Store progress and extend the lease; None if lease_owner does not hold it."""
        async with self._connection() as conn:
            return await operations.renew(
                conn, name, lease_owner, metadata, lease_expiry_us, now_us
            )

    async def finish_operation(
        self,
        name: str,
        lease_owner: str,
        metadata: str,
        result: str | None,
        error: str | None,
        now_us: int,
    ) -> bool:
        """Mark the operation done; False if lease_owner does not hold its lease."""
        async with self._connection() as conn:
            return await operations.finish(conn, name, lease_owner, metadata, result, error, now_us)

    async def cancel_operation(self, name: str, now_us: int) -> None:
        """Set cancel_requested on the operation if it is not done."""
        async with self._connection() as conn:
            await operations.cancel(conn, name, now_us)

    async def delete_operation(self, name: str) -> bool:
        """Delete the operation if it is done."""
        async with self._connection() as conn:
            return await operations.delete(conn, name)

    async def claim_operations(
        self, lease_owner: str, now_us: int, lease_expiry_us: int, limit: int
    ) -> list[Operation]:
        """Take over up to limit unfinished operations whose lease expired."""
        async with self._connection() as conn:
            return await operations.claim(conn, lease_owner, now_us, lease_expiry_us, limit)

    async def upsert_by_email(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Create the candidate or update the user holding its email, atomically."""
        return await self._transact(
            lambda conn: writes.upsert_by_email(conn, candidate, self._retention)
        )

    # -- reads ----------------------------------------------------------------

    async def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None."""
        async with self._connection() as conn:
            return await reads.fetch_user(conn, queries.SELECT_USER, user_id)

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User]:
        """Return the users among these ids that exist, keyed by id."""
        if not user_ids:
            return {}
        async with self._connection() as conn:
            return await reads.fetch_users(conn, user_ids)

    async def get_by_email(self, email: str) -> User | None:
        """Return the user whose email equals this one without regard to case."""
        async with self._connection() as conn:
            return await reads.fetch_user(conn, queries.SELECT_USER_BY_EMAIL, email_key(email))

    async def list_page(
        self, user_filter: UserFilter, after_id: str | None, limit: int, with_total: bool
    ) -> Page:
        """Return one keyset page in id order, with the exact match count if asked."""
        async with self._connection() as conn:
            return await reads.select_page(conn, user_filter, after_id, limit, with_total)

    # -- change feed ----------------------------------------------------------

    async def events_after(self, sequence: int, limit: int) -> list[UserEvent]:
        """Return up to limit events with sequence above the given one, ascending."""
        self.event_reads += 1
        if limit <= 0:
            return []
        async with self._connection() as conn:
            return await reads.select_events(conn, sequence, limit)

    async def event_bounds(self) -> tuple[int, int]:
        """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
        async with self._connection() as conn:
            return await reads.event_bounds(conn)

    async def wait_for_events(self, after_sequence: int, timeout: float) -> None:
        """Return once an event after after_sequence may exist, or after timeout seconds."""
        await self._listener.wait(after_sequence, timeout)

    # -- lifecycle ------------------------------------------------------------

    async def ping(self) -> None:
        """Run SELECT 1 on the health connection; raise StorageUnavailableError if it fails."""
        if self._closed:
            raise StorageUnavailableError("the PostgreSQL repository is closed")
        timeout = min(_PING_TIMEOUT_SECONDS, self._options.connect_timeout)
        async with self._ping_lock:
            try:
                if self._ping_conn is None or self._ping_conn.is_closed():
                    self._ping_conn = await asyncpg.connect(
                        self._url, **self._options.connect_kwargs("userservice-health")
                    )
                with translated_errors(self._ping_conn):
                    await self._ping_conn.fetchval(queries.PING, timeout=timeout)
            except (*UNAVAILABLE_ERRORS, StorageUnavailableError) as error:
                if self._ping_conn is not None:
                    self._ping_conn.terminate()
                    self._ping_conn = None
                raise StorageUnavailableError() from error

    async def close(self) -> None:
        """Stop the listener and close the pool; later calls raise StorageUnavailableError."""
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        if self._listener_task is not None:
            self._listener_task.cancel()
            await asyncio.gather(self._listener_task, return_exceptions=True)
        await self._housekeeping.close()
        async with self._ping_lock:
            if self._ping_conn is not None:
                await close_connection(self._ping_conn, _CLOSE_TIMEOUT_SECONDS)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                await self._pool.close()
        except (TimeoutError, *UNAVAILABLE_ERRORS):
            # Pool.close terminates every connection itself when it fails.
            _log.warning("PostgreSQL pool did not close cleanly", exc_info=True)
            self._pool.terminate()

    # -- plumbing -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise StorageUnavailableError("the PostgreSQL repository is closed")
        async with acquire(self._pool, self._options.connect_timeout) as conn:
            yield conn

    async def _transact(
        self, work: Callable[[asyncpg.Connection], Awaitable[tuple[_T, int]]]
    ) -> _T:
        """Run work in a transaction, rerunning it after a lost race; wake local watchers."""
        for attempt in range(1, _TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._connection() as conn:
                    result, last_sequence = await _in_transaction(conn, work)
            except asyncpg.exceptions.TransactionRollbackError as error:
                # Deadlock or serialization failure: nothing was written, so rerun.
                if attempt == _TRANSACTION_ATTEMPTS:
                    raise ConcurrentConflictError() from error
                await asyncio.sleep(random.uniform(0, 0.01 * attempt))
                continue
            if last_sequence:
                # Local watchers need not wait for the NOTIFY round trip.
                self._listener.wake(last_sequence)
            self._housekeeping.after_write()
            return result
        raise AssertionError("unreachable")


async def _in_transaction(
    conn: asyncpg.Connection, work: Callable[[asyncpg.Connection], Awaitable[tuple[_T, int]]]
) -> tuple[_T, int]:
    """Run work and COMMIT; a connection lost during COMMIT leaves the outcome unknown."""
    committing = False
    try:
        async with conn.transaction():
            result = await work(conn)
            # Whatever fails after this line failed in COMMIT, run by the block's exit.
            committing = True
    except (*UNAVAILABLE_ERRORS, asyncpg.exceptions.QueryCanceledError) as error:
        if committing:
            # The server may have committed before the connection went: say so, since a
            # blind retry could apply the change twice.
            raise CommitOutcomeUnknownError() from error
        raise
    return result
