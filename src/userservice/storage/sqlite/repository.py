"""SQLite UserRepository: one writer thread, one reader thread and an exact read cache.

The store serves a single process (an exclusive lock file enforces it). That is what makes
the in-process cache exact rather than time-limited: every write passes through this
object and refreshes the cache once it has committed. It is also the store's change feed:
a commit wakes wait_for_events in-process, with no query.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar, TypeVarTuple

from userservice.domain.errors import DomainError, StorageUnavailableError
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
from userservice.storage.maintenance import EXPIRE_BATCH, ExpirySchedule
from userservice.storage.signal import SequenceSignal
from userservice.storage.sqlite import operations, queries, reads, writes
from userservice.storage.sqlite.cache import ReadCache
from userservice.storage.sqlite.connection import StatementBudget, storage_errors, transaction
from userservice.storage.sqlite.files import StoreFiles, close_writer
from userservice.storage.sqlite.reader import ReaderThread
from userservice.storage.sqlite.shared import SharedCommits

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_PRUNE_INTERVAL: Final = 1_000
_CLOSED: Final = "the SQLite repository is closed"


class SqliteUserRepository:
    """UserRepository on one SQLite file for one process; create it with open_sqlite."""

    def __init__(
        self,
        files: StoreFiles,
        writer: ThreadPoolExecutor,
        reader: ThreadPoolExecutor,
        *,
        event_retention: int,
        cache_size: int,
        expiry: ExpirySchedule,
        shared: SharedCommits | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        """Serve from what open_sqlite opened; the executors each own one connection."""
        self._files = files
        self._loop = asyncio.get_running_loop()
        # A sqlite3 connection is used by one thread at a time; giving each its own
        # thread also serialises all writes without any lock contention.
        self._writer = writer
        self._reader = ReaderThread(reader, files.read_conn, statement_timeout)
        self._write_budget = StatementBudget(files.write_conn, statement_timeout)
        # Health pings get a thread and connection of their own, so a long scan on the
        # reader never reads as an outage.
        self._pinger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-ping")
        self._event_retention = event_retention
        self._prune_interval = min(_PRUNE_INTERVAL, event_retention)
        self._events_since_prune = 0  # writer thread only
        self._expiry = expiry  # writer thread only
        # Everything below belongs to the event loop thread, so it needs no lock.
        self._cache = ReadCache(cache_size)
        self._shared = shared
        self._seen_commits = 0 if shared is None else shared.commits
        self._commits = SequenceSignal(
            files.latest_sequence, None if shared is None else lambda: shared.latest_sequence
        )
        self._closed = False
        self.event_reads = 0
        """Queries of the event log so far: the change feed keeps it at one per wake-up."""

    @property
    def path(self) -> Path:
        """The database file."""
        return self._files.path

    async def create(self, user: User, request_id: str | None, fingerprint: str) -> User:
        """Insert a user; a request_id seen before returns its first result (see the protocol)."""
        retention_us = self._expiry.retention_us
        return await self._write(writes.create, user, request_id, fingerprint, retention_us)

    async def create_many(self, users: Sequence[User]) -> list[User | DomainError]:
        """Insert a batch in one transaction; a taken email fails only its own row."""
        if not users:
            return []
        return await self._write(writes.create_many, users)

    async def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None; a cache hit costs no thread hop."""
        self._check_open()
        self._sync_shared()
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        generation = self._cache.generation
        user = await self._read(reads.fetch_user, queries.SELECT_USER, user_id)
        if user is not None:
            self._remember(user, generation)
        return user

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User]:
        """Return the users among these ids that exist; only cache misses reach the file."""
        self._check_open()
        self._sync_shared()
        found: dict[str, User] = {}
        missing: list[str] = []
        for user_id in dict.fromkeys(user_ids):
            cached = self._cache.get(user_id)
            if cached is None:
                missing.append(user_id)
            else:
                found[user_id] = cached
        if missing:
            generation = self._cache.generation
            for user in await self._read(reads.fetch_users, missing):
                found[user.id] = user
                self._remember(user, generation)
        return found

    async def get_by_email(self, email: str) -> User | None:
        """Return the user whose email equals this one without regard to case."""
        generation = self._cache.generation
        sql = queries.SELECT_USER_BY_EMAIL
        user = await self._read(reads.fetch_user, sql, email_key(email))
        if user is not None:
            self._remember(user, generation)
        return user

    async def list_page(
        self, user_filter: UserFilter, after_id: str | None, limit: int, with_total: bool
    ) -> Page:
        """Return up to limit matching users with id > after_id, in id order."""
        return await self._read(reads.select_page, user_filter, after_id, limit, with_total)

    async def update(
        self,
        user_id: str,
        changes: UserChanges,
        expected_etag: str | None,
        now_us: int,
        *,
        caller: Caller = OPERATOR,
    ) -> User:
        """Apply changes atomically; update_time becomes max(now_us, previous + 1)."""
        return await self._write(writes.update, user_id, changes, expected_etag, now_us, caller)

    async def delete(
        self, user_id: str, expected_etag: str | None, now_us: int, *, caller: Caller = OPERATOR
    ) -> None:
        """Delete a user if caller may (Caller.writable) and the etag matches."""
        await self._write(writes.delete, user_id, expected_etag, now_us, caller)

    async def delete_users(self, user_ids: Sequence[str], now_us: int) -> list[str]:
        """Delete these users in one transaction as the operator; return the ids deleted."""
        if not user_ids:
            return []
        return await self._write(writes.delete_many, user_ids, now_us)

    # -- long-running operations ------------------------------------------------

    async def create_operation(self, operation: Operation) -> None:
        """Insert a new operation."""
        await self._write(operations.create, operation)

    async def get_operation(self, name: str) -> Operation | None:
        """Return the operation with this name, or None."""
        return await self._read(operations.get, name)

    async def list_operations(
        self, owner: str | None, done: bool | None, after_name: str | None, limit: int
    ) -> list[Operation]:
        """Return up to limit operations after after_name in name order, as selected."""
        return await self._read(operations.list_page, owner, done, after_name, limit)

    async def renew_operation(
        self, name: str, lease_owner: str, metadata: str, lease_expiry_us: int, now_us: int
    ) -> Operation | None:
        """Store progress and extend the lease; None if lease_owner does not hold it."""
        return await self._write(
            operations.renew, name, lease_owner, metadata, lease_expiry_us, now_us
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
        return await self._write(
            operations.finish, name, lease_owner, metadata, result, error, now_us
        )

    async def cancel_operation(self, name: str, now_us: int) -> None:
        """Set cancel_requested on the operation if it is not done."""
        await self._write(operations.cancel, name, now_us)

    async def delete_operation(self, name: str) -> bool:
        """Delete the operation if it is done."""
        return await self._write(operations.delete, name)

    async def claim_operations(
        self, lease_owner: str, now_us: int, lease_expiry_us: int, limit: int
    ) -> list[Operation]:
        """Take over up to limit unfinished operations whose lease expired."""
        return await self._write(operations.claim, lease_owner, now_us, lease_expiry_us, limit)

    async def upsert_by_email(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Create candidate, or set display_name and role on the user with its email."""
        return await self._write(writes.upsert_by_email, candidate)

    async def events_after(self, sequence: int, limit: int) -> list[UserEvent]:
        """Return up to limit events with sequence > the given one, ascending."""
        self.event_reads += 1
        return await self._read(reads.select_events, sequence, limit)

    async def event_bounds(self) -> tuple[int, int]:
        """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
        return await self._read(reads.event_bounds)

    async def wait_for_events(self, after_sequence: int, timeout: float) -> None:
        """Return once an event after after_sequence may exist, or after timeout seconds."""
        self._check_open()
        await self._commits.wait(after_sequence, timeout)

    async def ping(self) -> None:
        """Raise StorageUnavailableError unless the file answers a trivial query."""
        self._check_open()
        with storage_errors():
            await self._loop.run_in_executor(self._pinger, reads.ping, self._files.ping_conn)

    async def close(self) -> None:
        """Finish queued work, close the connections, stop the threads and release the lock."""
        if self._closed:
            return
        self._closed = True
        self._commits.close()
        self._cache.clear()
        executors = (self._pinger, self._reader.executor, self._writer)
        try:
            await self._loop.run_in_executor(self._pinger, self._files.ping_conn.close)
            await self._loop.run_in_executor(self._reader.executor, self._files.read_conn.close)
            await self._loop.run_in_executor(self._writer, close_writer, self._files)
        except BaseException:
            for executor in executors:
                executor.shutdown(wait=False)
            raise
        # The threads are idle now, so joining them takes microseconds, not a blocking wait.
        for executor in executors:
            executor.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailableError(_CLOSED)

    def _sync_shared(self) -> None:
        """Drop the cache if another worker committed since this process last looked."""
        if self._shared is not None:
            commits = self._shared.commits
            if commits != self._seen_commits:
                self._seen_commits = commits
                self._cache.invalidate()

    def _remember(self, user: User, generation: int) -> None:
        self._sync_shared()
        self._cache.remember(user, generation)

    async def _read(self, query: Callable[[sqlite3.Connection, *Ts], T], *args: *Ts) -> T:
        self._check_open()
        return await self._reader.run(query, *args)

    async def _write(self, work: Callable[[writes.WriteTransaction, *Ts], T], *args: *Ts) -> T:
        self._check_open()
        with storage_errors():
            return await self._loop.run_in_executor(
                self._writer, lambda: self._transact(work, *args)
            )

    def _transact(self, work: Callable[[writes.WriteTransaction, *Ts], T], *args: *Ts) -> T:
        """Run work in one write transaction on the writer thread, then publish its effects."""
        transaction_effects = writes.WriteTransaction(self._files.write_conn)
        conn = transaction_effects.conn
        # The budget covers the transaction's statements; COMMIT and ROLLBACK run outside it.
        with transaction(conn), self._write_budget.running():
            result = work(transaction_effects, *args)
            self._events_since_prune += transaction_effects.events
            if self._events_since_prune >= self._prune_interval:
                conn.execute(queries.PRUNE_EVENTS, (self._event_retention,))
                self._events_since_prune = 0
            if self._expiry.due():
                deleted = conn.execute(
                    queries.EXPIRE_REQUESTS, (self._expiry.cutoff_us(), EXPIRE_BATCH)
                ).rowcount
                self._expiry.swept(deleted)
        if transaction_effects.events:
            # Bumped before the caller hears of the commit, so any worker's read that starts
            # after that sees it.
            commits = (
                0
                if self._shared is None
                else self._shared.committed(transaction_effects.last_sequence)
            )
            # Scheduled before this function returns, so the cache is current by the time
            # the caller resumes, and still applied if the caller was cancelled meanwhile.
            self._loop.call_soon_threadsafe(
                self._committed,
                transaction_effects.cache,
                transaction_effects.last_sequence,
                commits,
            )
        return result

    def _committed(self, cache: dict[str, User | None], last_sequence: int, commits: int) -> None:
        if self._shared is None or commits == self._seen_commits + 1:
            # Only this process committed since the last look: its own effects are exact.
            self._seen_commits = max(self._seen_commits, commits)
            if not self._closed:
                self._cache.committed(cache)
        else:
            # Another worker committed before this commit was applied here, or after it and
            # already seen by _sync_shared: this commit's rows may be older than theirs, so
            # applying them could serve an overwritten user until the next write. Everything
            # up to this commit is in the file; forget the cache instead.
            self._seen_commits = max(self._seen_commits, commits)
            self._cache.invalidate()
        self._commits.advance(last_sequence)
