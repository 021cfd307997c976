"""SQLite UserRepository: one writer thread, one reader thread and an exact read cache.

The store serves a single process (an exclusive lock file enforces it). That is
what makes the in-process cache exact rather than time-limited: every write
passes through this object and refreshes the cache once it has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar, TypeVarTuple

from userservice.domain.errors import (
    DomainError,
    EmailAlreadyExistsError,
    RequestIdReusedError,
    StorageUnavailableError,
    UserNotFoundError,
)
from userservice.domain.ids import now_us
from userservice.domain.model import (
    EventType,
    Page,
    Role,
    SyncOutcome,
    User,
    UserChanges,
    UserEvent,
    UserFilter,
    email_key,
)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_CACHE_SIZE: Final = 10_000
DEFAULT_EVENT_RETENTION: Final = 100_000
DEFAULT_REQUEST_ID_RETENTION_SECONDS: Final = 86_400.0
_BUSY_TIMEOUT_MS: Final = 5_000
_PRUNE_INTERVAL: Final = 1_000
# Expired request_ids are deleted inside a write at most once per interval and at most a
# batch at a time (about 3 ms), so no request pays for a long delete. A full batch means
# a backlog (a lowered retention, a table from before keys expired), which later writes
# then work off one batch per pause.
_EXPIRE_INTERVAL_SECONDS: Final = 60.0
_EXPIRE_BACKLOG_PAUSE_SECONDS: Final = 0.05
_EXPIRE_BATCH: Final = 1_000
_CLOSED: Final = "the SQLite repository is closed"
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

# SQL text is assembled only from these constant column lists (hence the S608 waivers);
# every value is a bound parameter. The order is the one _values and _to_user rely on.
_USER_DATA = "email, display_name, role, create_time_us, update_time_us, revision"
_USER_COLUMNS = f"id, {_USER_DATA}"
_SNAPSHOT_COLUMNS = f"user_id, {_USER_DATA}"

_SELECT_USER = f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?"  # noqa: S608
_SELECT_USER_BY_EMAIL = f"SELECT {_USER_COLUMNS} FROM users WHERE email_normalized = ?"  # noqa: S608
# json_each binds any number of ids as one parameter, so the statement text never varies.
_SELECT_USERS = f"SELECT {_USER_COLUMNS} FROM users WHERE id IN (SELECT value FROM json_each(?))"  # noqa: S608
_SELECT_PAGE = f"SELECT {_USER_COLUMNS} FROM users{{where}} ORDER BY id LIMIT ?"  # noqa: S608
_COUNT_USERS = "SELECT count(*) FROM users{where}"
_INSERT_USER = (
    f"INSERT INTO users ({_USER_COLUMNS}, email_normalized) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    " ON CONFLICT (email_normalized) DO NOTHING"
)
_UPDATE_USER = (
    "UPDATE users SET email = ?, email_normalized = ?, display_name = ?, role = ?,"
    " update_time_us = ?, revision = ? WHERE id = ?"
)
_DELETE_USER = "DELETE FROM users WHERE id = ?"
_INSERT_EVENT = (
    f"INSERT INTO user_events (type, event_time_us, {_SNAPSHOT_COLUMNS})"  # noqa: S608
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING sequence"
)
_SELECT_EVENTS = (
    f"SELECT sequence, type, event_time_us, {_SNAPSHOT_COLUMNS} FROM user_events"  # noqa: S608
    " WHERE sequence > ? ORDER BY sequence LIMIT ?"
)
# Two subqueries, because SQLite answers a lone min() or max() from the index but scans for both.
_EVENT_BOUNDS = (
    "SELECT (SELECT min(sequence) FROM user_events), (SELECT max(sequence) FROM user_events)"
)
_PRUNE_EVENTS = (
    "DELETE FROM user_events WHERE sequence <= (SELECT max(sequence) FROM user_events) - ?"
)
# An expired key reads as unknown, whether or not the sweep has deleted its row yet.
_SELECT_REQUEST = (
    f"SELECT fingerprint, {_SNAPSHOT_COLUMNS} FROM create_requests"  # noqa: S608
    " WHERE request_id = ? AND created_us >= ?"
)
# REPLACE can only ever meet an expired row: a live one was found by _SELECT_REQUEST
# in the same transaction and answered the request instead.
_INSERT_REQUEST = (
    "INSERT OR REPLACE INTO create_requests"  # noqa: S608
    f" (request_id, fingerprint, created_us, {_SNAPSHOT_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLite has no DELETE ... LIMIT by default; the oldest keys come off the created_us index.
_EXPIRE_REQUESTS = (
    "DELETE FROM create_requests WHERE request_id IN (SELECT request_id FROM create_requests"
    " WHERE created_us < ? ORDER BY created_us LIMIT ?)"
)
_PING = "SELECT 1 FROM schema_migrations LIMIT 1"

_CREATE_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
)
_HAS_MIGRATIONS_TABLE = (
    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
)
_IS_APPLIED = "SELECT 1 FROM schema_migrations WHERE version = ?"
_SELECT_APPLIED = "SELECT version FROM schema_migrations"
_RECORD_MIGRATION = "INSERT INTO schema_migrations (version, name) VALUES (?, ?)"


class SqliteLockedError(RuntimeError):
    """The database file is already open in another process (or another repository)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change, read from sql/sqlite/NNNN_name.sql."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Return the packaged SQLite migrations in version order."""
    folder = resources.files("userservice.storage").joinpath("sql", "sqlite")
    migrations = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            name = entry.name.removesuffix(".sql")
            migrations.append(Migration(int(name.split("_", 1)[0]), name, entry.read_text("utf-8")))
    migrations.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in migrations]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two SQLite migrations share a version number: {versions}")
    return migrations


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; return their names."""
    conn.execute(_CREATE_MIGRATIONS_TABLE)
    applied = []
    for migration in migrations:
        # The check runs inside the write transaction, so two runners cannot both apply one.
        with _transaction(conn):
            if conn.execute(_IS_APPLIED, (migration.version,)).fetchone() is not None:
                continue
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(_RECORD_MIGRATION, (migration.version, migration.name))
            applied.append(migration.name)
    return applied


def migrate_sqlite(path: Path) -> list[str]:
    """Bring the database at path to the latest schema; return the names of applied migrations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, _lock(path))
        conn = _connect(path)
        stack.callback(conn.close)
        return apply_migrations(conn, load_migrations())


async def open_sqlite(
    path: Path,
    *,
    event_retention: int = DEFAULT_EVENT_RETENTION,
    migrate: bool = True,
    cache_size: int = DEFAULT_CACHE_SIZE,
    request_id_retention_seconds: float = DEFAULT_REQUEST_ID_RETENTION_SECONDS,
) -> SqliteUserRepository:
    """Open (creating it if needed) the database file at path for this process alone."""
    if event_retention < 1 or cache_size < 0:
        raise ValueError("event_retention must be positive and cache_size not negative")
    if not request_id_retention_seconds > 0:
        raise ValueError("request_id_retention_seconds must be positive")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
    try:
        files = await asyncio.get_running_loop().run_in_executor(
            writer, _open_files, path, migrate, event_retention
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
        request_id_retention_seconds=request_id_retention_seconds,
    )


@dataclass(frozen=True, slots=True)
class _Files:
    """What open_sqlite acquired: the lock, both connections and the newest event sequence."""

    path: Path
    lock_fd: int
    write_conn: sqlite3.Connection
    read_conn: sqlite3.Connection
    latest_sequence: int


class SqliteUserRepository:
    """UserRepository on one SQLite file for one process; create it with open_sqlite."""

    def __init__(
        self,
        files: _Files,
        writer: ThreadPoolExecutor,
        reader: ThreadPoolExecutor,
        *,
        event_retention: int,
        cache_size: int,
        request_id_retention_seconds: float,
    ) -> None:
        self._files = files
        self._loop = asyncio.get_running_loop()
        # A sqlite3 connection is used by one thread at a time; giving each its own
        # thread also serialises all writes without any lock contention.
        self._writer = writer
        self._reader = reader
        self._event_retention = event_retention
        self._prune_interval = min(_PRUNE_INTERVAL, event_retention)
        self._events_since_prune = 0  # writer thread only
        self._request_retention_us = max(1, round(request_id_retention_seconds * 1_000_000))
        # A retention shorter than the interval is swept as often as it expires rows.
        self._expire_interval = min(_EXPIRE_INTERVAL_SECONDS, request_id_retention_seconds)
        self._next_expire = 0.0  # writer thread only; monotonic, so the first write sweeps
        # The read running on the reader thread, shared with the loop thread to interrupt it.
        self._reading_lock = threading.Lock()
        self._reading: object | None = None
        # Everything below belongs to the event loop thread, so it needs no lock.
        self._cache: OrderedDict[str, User] = OrderedDict()
        self._cache_size = cache_size
        self._write_generation = 0
        self._latest_sequence = files.latest_sequence
        self._events_arrived = asyncio.Event()
        self._closed = False
        # Queries of the event log so far: the change feed keeps it at one per wake-up.
        self.event_reads = 0

    @property
    def path(self) -> Path:
        """The database file."""
        return self._files.path

    async def create(self, user: User, request_id: str | None, fingerprint: str) -> User:
        """Insert a user; a request_id seen before returns its first result (see the protocol)."""
        return await self._write(_create, user, request_id, fingerprint, self._request_retention_us)

    async def create_many(self, users: Sequence[User]) -> list[User | DomainError]:
        """Insert a batch in one transaction; a taken email fails only its own row."""
        if not users:
            return []
        return await self._write(_create_many, users)

    async def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None; a cache hit costs no thread hop."""
        self._check_open()
        cached = self._cache.get(user_id)
        if cached is not None:
            self._cache.move_to_end(user_id)
            return cached
        generation = self._write_generation
        user = await self._read(_fetch_user, _SELECT_USER, user_id)
        if user is not None:
            self._remember(user, generation)
        return user

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User]:
        """Return the users among these ids that exist; only cache misses reach the file."""
        self._check_open()
        found: dict[str, User] = {}
        missing: list[str] = []
        for user_id in dict.fromkeys(user_ids):
            cached = self._cache.get(user_id)
            if cached is None:
                missing.append(user_id)
            else:
                self._cache.move_to_end(user_id)
                found[user_id] = cached
        if missing:
            generation = self._write_generation
            for user in await self._read(_fetch_users, missing):
                found[user.id] = user
                self._remember(user, generation)
        return found

    async def get_by_email(self, email: str) -> User | None:
        """Return the user whose email equals this one without regard to case."""
        generation = self._write_generation
        user = await self._read(_fetch_user, _SELECT_USER_BY_EMAIL, email_key(email))
        if user is not None:
            self._remember(user, generation)
        return user

    async def list_page(
        self, user_filter: UserFilter, after_id: str | None, limit: int, with_total: bool
    ) -> Page:
        """Return up to limit matching users with id > after_id, in id order."""
        return await self._read(_select_page, user_filter, after_id, limit, with_total)

    async def update(
        self, user_id: str, changes: UserChanges, expected_etag: str | None, now_us: int
    ) -> User:
        """Apply changes atomically; update_time becomes max(now_us, previous + 1)."""
        return await self._write(_update, user_id, changes, expected_etag, now_us)

    async def delete(self, user_id: str, expected_etag: str | None, now_us: int) -> None:
        """Delete a user. Raises UserNotFoundError or EtagMismatchError."""
        await self._write(_delete, user_id, expected_etag, now_us)

    async def upsert_by_email(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Create candidate, or set display_name and role on the user with its email."""
        return await self._write(_upsert_by_email, candidate)

    async def events_after(self, sequence: int, limit: int) -> list[UserEvent]:
        """Return up to limit events with sequence > the given one, ascending."""
        self.event_reads += 1
        return await self._read(_select_events, sequence, limit)

    async def event_bounds(self) -> tuple[int, int]:
        """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
        return await self._read(_event_bounds)

    async def wait_for_events(self, after_sequence: int, timeout: float) -> None:
        """Return once an event after after_sequence may exist, or after timeout seconds."""
        self._check_open()
        if self._latest_sequence > after_sequence:
            return
        arrived = self._events_arrived
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await arrived.wait()

    async def ping(self) -> None:
        """Raise StorageUnavailableError unless the file answers a trivial query."""
        await self._read(_ping)

    async def close(self) -> None:
        """Finish queued work, close both connections, stop the threads and release the lock."""
        if self._closed:
            return
        self._closed = True
        self._events_arrived.set()
        self._cache.clear()
        try:
            await self._loop.run_in_executor(self._reader, self._files.read_conn.close)
            await self._loop.run_in_executor(self._writer, _close_writer, self._files)
        except BaseException:
            self._reader.shutdown(wait=False)
            self._writer.shutdown(wait=False)
            raise
        # Both threads are idle now, so joining them takes microseconds, not a blocking wait.
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailableError(_CLOSED)

    def _remember(self, user: User, generation: int) -> None:
        # A write committed after this read began may not be in what it returned;
        # caching it then could resurrect the old state, so only an undisturbed read caches.
        if generation == self._write_generation and not self._closed:
            self._put(user)

    def _put(self, user: User) -> None:
        self._cache[user.id] = user
        self._cache.move_to_end(user.id)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _read(self, query: Callable[[sqlite3.Connection, *Ts], T], *args: *Ts) -> T:
        self._check_open()
        job = object()

        def run() -> T:
            with self._reading_lock:
                self._reading = job
            try:
                return query(self._files.read_conn, *args)
            finally:
                with self._reading_lock:
                    self._reading = None

        with _storage_errors():
            try:
                return await self._loop.run_in_executor(self._reader, run)
            except asyncio.CancelledError:
                self._interrupt_read(job)
                raise

    def _interrupt_read(self, job: object) -> None:
        """Stop job's query if it is the one running: its caller gave up (deadline, cancel).

        A job still queued was cancelled with its future. The lock keeps the check and the
        interrupt together, so a later caller's query is never the one interrupted.
        """
        with self._reading_lock:
            if self._reading is job:
                self._files.read_conn.interrupt()

    async def _write(self, work: Callable[[_Writes, *Ts], T], *args: *Ts) -> T:
        self._check_open()
        with _storage_errors():
            return await self._loop.run_in_executor(
                self._writer, lambda: self._transact(work, *args)
            )

    def _transact(self, work: Callable[[_Writes, *Ts], T], *args: *Ts) -> T:
        """Run work in one write transaction on the writer thread, then publish its effects."""
        writes = _Writes(self._files.write_conn)
        with _transaction(writes.conn):
            result = work(writes, *args)
            self._events_since_prune += writes.events
            if self._events_since_prune >= self._prune_interval:
                writes.conn.execute(_PRUNE_EVENTS, (self._event_retention,))
                self._events_since_prune = 0
            if time.monotonic() >= self._next_expire:
                self._expire_requests(writes.conn)
        if writes.events:
            # Scheduled before this function returns, so the cache is current by the time
            # the caller resumes, and still applied if the caller was cancelled meanwhile.
            self._loop.call_soon_threadsafe(self._committed, writes.cache, writes.last_sequence)
        return result

    def _expire_requests(self, conn: sqlite3.Connection) -> None:
        """Delete one bounded batch of expired request_ids; schedule the next sweep."""
        cutoff = now_us() - self._request_retention_us
        deleted = conn.execute(_EXPIRE_REQUESTS, (cutoff, _EXPIRE_BATCH)).rowcount
        pause = _EXPIRE_BACKLOG_PAUSE_SECONDS if deleted >= _EXPIRE_BATCH else self._expire_interval
        self._next_expire = time.monotonic() + pause

    def _committed(self, cache: dict[str, User | None], last_sequence: int) -> None:
        self._write_generation += 1
        for user_id, user in cache.items():
            if user is None:
                self._cache.pop(user_id, None)
            else:
                self._put(user)
        self._latest_sequence = last_sequence
        self._events_arrived.set()
        self._events_arrived = asyncio.Event()


class _Writes:
    """One write transaction's connection and effects: cache changes and appended events."""

    __slots__ = ("cache", "conn", "events", "last_sequence")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.cache: dict[str, User | None] = {}
        self.events = 0
        self.last_sequence = 0

    def insert(self, user: User) -> bool:
        """Insert a user unless its email is taken; tell whether it was inserted."""
        cursor = self.conn.execute(_INSERT_USER, (*_values(user), email_key(user.email)))
        return cursor.rowcount == 1

    def overwrite(self, user: User) -> None:
        """Overwrite the stored row of user.id with user."""
        values = (user.email, email_key(user.email), user.display_name, int(user.role))
        try:
            self.conn.execute(_UPDATE_USER, (*values, user.update_time_us, user.revision, user.id))
        except sqlite3.IntegrityError as error:
            if "users.email_normalized" in str(error):
                raise EmailAlreadyExistsError() from None
            raise

    def event(self, event_type: EventType, user: User, event_time_us: int) -> None:
        """Append a change event in this transaction."""
        row = self.conn.execute(_INSERT_EVENT, (int(event_type), event_time_us, *_values(user)))
        self.last_sequence = row.fetchone()[0]
        self.events += 1


def _create(
    writes: _Writes, user: User, request_id: str | None, fingerprint: str, retention_us: int
) -> User:
    now = now_us()
    if request_id is not None:
        row = writes.conn.execute(_SELECT_REQUEST, (request_id, now - retention_us)).fetchone()
        if row is not None:
            if row[0] != fingerprint:
                raise RequestIdReusedError()
            return _to_user(row[1:])
    if not writes.insert(user):
        raise EmailAlreadyExistsError()
    if request_id is not None:
        writes.conn.execute(_INSERT_REQUEST, (request_id, fingerprint, now, *_values(user)))
    writes.event(EventType.CREATED, user, user.create_time_us)
    writes.cache[user.id] = user
    return user


def _create_many(writes: _Writes, users: Sequence[User]) -> list[User | DomainError]:
    # New ids cannot be cached yet, and caching a bulk import would only push out hot entries.
    results: list[User | DomainError] = []
    for user in users:
        if writes.insert(user):
            writes.event(EventType.CREATED, user, user.create_time_us)
            results.append(user)
        else:
            results.append(EmailAlreadyExistsError())
    return results


def _update(
    writes: _Writes, user_id: str, changes: UserChanges, expected_etag: str | None, now: int
) -> User:
    updated = _current(writes, user_id, expected_etag).changed(changes, now)
    writes.overwrite(updated)
    writes.event(EventType.UPDATED, updated, updated.update_time_us)
    writes.cache[user_id] = updated
    return updated


def _delete(writes: _Writes, user_id: str, expected_etag: str | None, now: int) -> None:
    current = _current(writes, user_id, expected_etag)
    writes.conn.execute(_DELETE_USER, (user_id,))
    writes.event(EventType.DELETED, current, current.deletion_time(now))
    writes.cache[user_id] = None


def _upsert_by_email(writes: _Writes, candidate: User) -> tuple[SyncOutcome, User]:
    # Reading first is safe here: BEGIN IMMEDIATE and the single writer exclude any other write.
    current = _fetch_user(writes.conn, _SELECT_USER_BY_EMAIL, email_key(candidate.email))
    if current is None:
        if not writes.insert(candidate):
            raise EmailAlreadyExistsError()
        writes.event(EventType.CREATED, candidate, candidate.create_time_us)
        writes.cache[candidate.id] = candidate
        return SyncOutcome.CREATED, candidate
    outcome, updated = current.synced(candidate)
    if outcome is SyncOutcome.UNCHANGED:
        return outcome, current
    writes.overwrite(updated)
    writes.event(EventType.UPDATED, updated, updated.update_time_us)
    writes.cache[updated.id] = updated
    return SyncOutcome.UPDATED, updated


def _current(writes: _Writes, user_id: str, expected_etag: str | None) -> User:
    """Return the stored user the caller may change, or raise not-found / etag mismatch."""
    current = _fetch_user(writes.conn, _SELECT_USER, user_id)
    if current is None:
        raise UserNotFoundError(user_id)
    current.require_etag(expected_etag)
    return current


def _fetch_user(conn: sqlite3.Connection, sql: str, key: str) -> User | None:
    row = conn.execute(sql, (key,)).fetchone()
    return None if row is None else _to_user(row)


def _fetch_users(conn: sqlite3.Connection, user_ids: list[str]) -> list[User]:
    return [_to_user(row) for row in conn.execute(_SELECT_USERS, (json.dumps(user_ids),))]


def _select_page(
    conn: sqlite3.Connection,
    user_filter: UserFilter,
    after_id: str | None,
    limit: int,
    with_total: bool,
) -> Page:
    limit = max(limit, 0)  # a negative LIMIT would mean "no limit" to SQLite
    clauses, params = _filter_clauses(user_filter)
    page_clauses, page_params = list(clauses), list(params)
    if after_id is not None:
        page_clauses.append("id > ?")
        page_params.append(after_id)
    # One read transaction, so the page and its total come from the same snapshot.
    with _transaction(conn, "BEGIN"):
        rows = conn.execute(
            _SELECT_PAGE.format(where=_where(page_clauses)), (*page_params, limit + 1)
        ).fetchall()
        total = 0
        if with_total:
            total = conn.execute(_COUNT_USERS.format(where=_where(clauses)), params).fetchone()[0]
    return Page([_to_user(row) for row in rows[:limit]], len(rows) > limit, total)


def _filter_clauses(user_filter: UserFilter) -> tuple[list[str], list[object]]:
    clauses: list[str] = []
    params: list[object] = []

    def match(clause: str, value: object) -> None:
        clauses.append(clause)
        params.append(value)

    if user_filter.role is not None:
        match("role = ?", int(user_filter.role))
    if user_filter.role_not is not None:
        match("role != ?", int(user_filter.role_not))
    if user_filter.email_equals is not None:
        match("email_normalized = ?", email_key(user_filter.email_equals))
    if user_filter.email_contains is not None:
        match("email_normalized LIKE ? ESCAPE '\\'", _contains(user_filter.email_contains))
    if user_filter.display_name_contains is not None:
        fragment = user_filter.display_name_contains
        # LIKE folds only ASCII case; lower-casing every row in Python costs about four
        # times as much, so only a fragment that is not pure ASCII pays for it.
        column = "display_name" if fragment.isascii() else "unicode_lower(display_name)"
        match(f"{column} LIKE ? ESCAPE '\\'", _contains(fragment))
    return clauses, params


def _contains(value: str) -> str:
    """Return a LIKE pattern matching value anywhere, lower-cased, its wildcards made literal."""
    escaped = value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(clauses: list[str]) -> str:
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


def _select_events(conn: sqlite3.Connection, sequence: int, limit: int) -> list[UserEvent]:
    rows = conn.execute(_SELECT_EVENTS, (sequence, max(limit, 0)))
    return [UserEvent(row[0], EventType(row[1]), _to_user(row[3:]), row[2]) for row in rows]


def _event_bounds(conn: sqlite3.Connection) -> tuple[int, int]:
    oldest, latest = conn.execute(_EVENT_BOUNDS).fetchone()
    return (0, 0) if latest is None else (oldest - 1, latest)


def _ping(conn: sqlite3.Connection) -> None:
    conn.execute(_PING).fetchall()


def _values(user: User) -> tuple[str, str, str, int, int, int, int]:
    return (
        user.id,
        user.email,
        user.display_name,
        int(user.role),
        user.create_time_us,
        user.update_time_us,
        user.revision,
    )


def _to_user(row: Sequence[Any]) -> User:
    return User(row[0], row[1], row[2], Role(row[3]), row[4], row[5], row[6])


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
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
def _storage_errors() -> Iterator[None]:
    """Turn the driver's I/O and locking failures into StorageUnavailableError."""
    try:
        yield
    except sqlite3.OperationalError as error:
        # Errors raised by the sqlite3 module itself carry no result code.
        if getattr(error, "sqlite_errorcode", 0) & 0xFF in _UNAVAILABLE_CODES:
            raise StorageUnavailableError(f"SQLite database unavailable: {error}") from error
        raise


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into single statements (sqlite3 runs one per execute)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    leftover = [line for line in pending.splitlines() if line.strip()]
    if any(not line.lstrip().startswith("--") for line in leftover):
        raise ValueError(f"migration ends in an incomplete statement: {pending.strip()!r}")


def _lock(path: Path) -> int:
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


def _connect(path: Path, *, query_only: bool = False) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) where they belong.
    # check_same_thread is off because a connection is opened on the writer thread and
    # then used by exactly one executor thread.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"SQLite database {path} cannot use WAL mode (got {mode!r})")
        if query_only:
            conn.execute("PRAGMA query_only = ON")
            # SQLite's own lower() only folds ASCII; filters must match "É" with "é" too.
            conn.create_function("unicode_lower", 1, str.lower, deterministic=True)
    except BaseException:
        conn.close()
        raise
    return conn


def _open_files(path: Path, migrate: bool, event_retention: int) -> _Files:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as undo:
        lock_fd = _lock(path)
        undo.callback(os.close, lock_fd)
        write_conn = _connect(path)
        undo.callback(write_conn.close)
        if migrate:
            apply_migrations(write_conn, load_migrations())
        else:
            _require_migrated(write_conn, path)
        # Catches up at once when event_retention was lowered since the last run.
        write_conn.execute(_PRUNE_EVENTS, (event_retention,))
        read_conn = _connect(path, query_only=True)
        latest = _event_bounds(write_conn)[1]
        undo.pop_all()
    return _Files(path, lock_fd, write_conn, read_conn, latest)


def _require_migrated(conn: sqlite3.Connection, path: Path) -> None:
    applied: set[int] = set()
    if conn.execute(_HAS_MIGRATIONS_TABLE).fetchone() is not None:
        applied = {row[0] for row in conn.execute(_SELECT_APPLIED)}
    pending = [m.name for m in load_migrations() if m.version not in applied]
    if pending:
        raise RuntimeError(
            f"SQLite database {path} lacks migrations {pending}; "
            "run `userservice migrate` or enable migrate_on_start"
        )


def _close_writer(files: _Files) -> None:
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, files.lock_fd)
        stack.callback(files.write_conn.close)
        # Recommended before closing: refreshes planner statistics where they went stale.
        files.write_conn.execute("PRAGMA optimize")
