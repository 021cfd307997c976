"""PostgreSQL implementation of UserRepository (asyncpg), safe for many replicas on one database.

Schema changes are numbered SQL files under sql/postgres/, applied by a ~50-line
runner (migrate_postgres) rather than alembic or yoyo: both would need a second,
synchronous driver next to asyncpg and sqlite3 just for migrations. Each file runs
in its own transaction and is recorded in schema_migrations, all under one advisory
lock, so replicas starting together apply every migration exactly once.

Event sequences come from a one-row counter whose row lock each writer takes as the
last statement of its transaction, so sequences become visible in commit order and
a watcher that has read sequence N never later finds a committed event below N.
Writers NOTIFY in the same transaction; one LISTEN connection per process wakes
wait_for_events, which falls back to polling at its timeout if a notice is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg

from userservice.config import Settings
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

__all__ = [
    "PostgresUserRepository",
    "SchemaNotReadyError",
    "migrate_postgres",
    "open_postgres",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Everything that means "the database cannot be reached or cannot serve right now";
# callers see StorageUnavailableError (gRPC UNAVAILABLE) and may retry.
_UNAVAILABLE_ERRORS: Final = (
    OSError,  # refused, reset, unreachable, DNS; TimeoutError is an OSError too
    asyncpg.InterfaceError,  # connection closed or pool closing (see _connection)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, cannot connect now, timeout
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # connected to a standby during failover
)

_EVENTS_CHANNEL: Final = "user_events"
_EMAIL_INDEX: Final = "users_email_normalized_key"
# "usersvc1": the session advisory lock that serialises migration runs.
_MIGRATION_LOCK_KEY: Final = 0x7573_6572_7376_6331
_MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
_TRANSACTION_ATTEMPTS: Final = 3
_UPSERT_ATTEMPTS: Final = 5
_LISTENER_KEEPALIVE_SECONDS: Final = 10.0
_LISTENER_MAX_BACKOFF: Final = 5.0
_PING_TIMEOUT_SECONDS: Final = 2.0
_CLOSE_TIMEOUT_SECONDS: Final = 5.0
# Expired request_ids are deleted in the background, started by a write at most once
# per interval per replica; a full batch means a backlog, worked off one batch per pause.
_EXPIRE_INTERVAL_SECONDS: Final = 60.0
_EXPIRE_BACKLOG_PAUSE_SECONDS: Final = 0.05
_EXPIRE_BATCH: Final = 1_000

_SELECT_USER: Final = """
SELECT id, email, display_name, role, create_time_us, update_time_us, revision
FROM users WHERE id = $1
"""

_SELECT_USERS: Final = """
SELECT id, email, display_name, role, create_time_us, update_time_us, revision
FROM users WHERE id = ANY($1::text[])
"""

_SELECT_USER_BY_EMAIL: Final = """
SELECT id, email, display_name, role, create_time_us, update_time_us, revision
FROM users WHERE email_normalized = $1
"""

_LOCK_USER: Final = """
SELECT id, email, display_name, role, create_time_us, update_time_us, revision
FROM users WHERE id = $1 FOR UPDATE
"""

_LOCK_USER_BY_EMAIL: Final = """
SELECT id, email, display_name, role, create_time_us, update_time_us, revision
FROM users WHERE email_normalized = $1 FOR UPDATE
"""

_LIST_COLUMNS: Final = "id, email, display_name, role, create_time_us, update_time_us, revision"

_INSERT_USER: Final = """
INSERT INTO users (id, email, email_normalized, display_name, role,
                   create_time_us, update_time_us, revision)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

_UPSERT_INSERT: Final = """
INSERT INTO users (id, email, email_normalized, display_name, role,
                   create_time_us, update_time_us, revision)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (email_normalized) DO NOTHING
RETURNING id
"""

_INSERT_MANY: Final = """
INSERT INTO users (id, email, email_normalized, display_name, role,
                   create_time_us, update_time_us, revision)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[],
                     $6::bigint[], $7::bigint[], $8::bigint[])
ON CONFLICT (email_normalized) DO NOTHING
RETURNING id
"""

# Claims a new key, or takes over an expired one ($11 is the cutoff) in place. On a
# conflict DO UPDATE waits for the row's writer, then locks the row's newest version
# and tests the WHERE on it even when it declines to update; so of replicas racing on
# one expired key exactly one takes it over, and the rest find a live row they hold
# locked, which no sweep can delete before they read it.
_CLAIM_REQUEST: Final = """
INSERT INTO create_requests (request_id, fingerprint, user_id, email, display_name, role,
                             create_time_us, update_time_us, revision, created_us)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (request_id) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, user_id = EXCLUDED.user_id, email = EXCLUDED.email,
    display_name = EXCLUDED.display_name, role = EXCLUDED.role,
    create_time_us = EXCLUDED.create_time_us, update_time_us = EXCLUDED.update_time_us,
    revision = EXCLUDED.revision, created_us = EXCLUDED.created_us
WHERE create_requests.created_us < $11
RETURNING request_id
"""

_SELECT_REQUEST: Final = """
SELECT fingerprint, user_id AS id, email, display_name, role,
       create_time_us, update_time_us, revision
FROM create_requests WHERE request_id = $1
"""

_UPDATE_USER: Final = """
UPDATE users SET email = $2, email_normalized = $3, display_name = $4, role = $5,
                 update_time_us = $6, revision = $7
WHERE id = $1
"""

# One statement, issued last so the counter's row lock (which orders commits)
# is held only for this statement and the COMMIT. It allocates a block of
# sequences, appends the events, drops the events that fall out of retention
# and queues the NOTIFY, all in the writer's transaction. Retention deletes the
# range this block pushes out, plus a small slack that catches rows a
# concurrent writer committed after this statement's snapshot was taken;
# a bounded range keeps the scan off the dead index entries of earlier prunes.
_APPEND_EVENTS: Final = """
WITH allocated AS (
    UPDATE event_sequence SET value = value + cardinality($1::smallint[])
    RETURNING value AS last, value - cardinality($1::smallint[]) AS previous
),
inserted AS (
    INSERT INTO user_events (sequence, type, user_id, email, display_name, role,
                             create_time_us, update_time_us, revision, event_time_us)
    SELECT a.previous + e.ord, e.type, e.user_id, e.email, e.display_name, e.role,
           e.create_time_us, e.update_time_us, e.revision, e.event_time_us
    FROM allocated AS a,
         unnest($1::smallint[], $2::text[], $3::text[], $4::text[], $5::smallint[],
                $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
             WITH ORDINALITY AS e(type, user_id, email, display_name, role,
                                  create_time_us, update_time_us, revision,
                                  event_time_us, ord)
    WHERE a.previous + e.ord > a.last - $10::bigint
),
pruned AS (
    DELETE FROM user_events
    WHERE sequence > (SELECT previous FROM allocated) - $10::bigint - 64
      AND sequence <= (SELECT last FROM allocated) - $10::bigint
)
SELECT last, pg_notify('user_events', last::text) FROM allocated
"""

# Deletes the oldest events beyond retention, at most $2 + 1 of them, from the
# bottom up so that what remains is always a contiguous run of sequences.
_PRUNE_BATCH: Final = """
DELETE FROM user_events
WHERE sequence <= LEAST((SELECT min(sequence) FROM user_events) + $2::bigint,
                        (SELECT value FROM event_sequence) - $1::bigint)
"""
_PRUNE_BATCH_SIZE: Final = 10_000

# The oldest keys expired before $1, at most $2, off the created_us index. SKIP LOCKED
# passes over a key a create is taking over (or another replica's sweep holds), and the
# locking read re-tests created_us on a row changed since the snapshot, so a key claimed
# anew is never deleted.
_EXPIRE_REQUESTS: Final = """
DELETE FROM create_requests
WHERE request_id = ANY(ARRAY(
    SELECT request_id FROM create_requests
    WHERE created_us < $1
    ORDER BY created_us
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
"""

_SELECT_EVENTS: Final = """
SELECT sequence, type, event_time_us, user_id AS id, email, display_name, role,
       create_time_us, update_time_us, revision
FROM user_events WHERE sequence > $1 ORDER BY sequence LIMIT $2
"""

_CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaNotReadyError(RuntimeError):
    """The database lacks migrations this code needs; run `userservice migrate`."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Migration:
    version: int
    name: str
    sql: str


def _load_migrations() -> list[_Migration]:
    directory = importlib.resources.files("userservice.storage") / "sql" / "postgres"
    found: dict[int, _Migration] = {}
    for entry in directory.iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            continue
        version = int(match[1])
        if version in found:
            raise RuntimeError(f"two PostgreSQL migrations share version {version}")
        found[version] = _Migration(
            version, entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")
        )
    return [found[version] for version in sorted(found)]


async def migrate_postgres(url: str, *, connect_timeout: float = 5.0) -> list[str]:
    """Apply pending migrations under an advisory lock; return the names applied."""
    migrations = _load_migrations()
    try:
        conn = await asyncpg.connect(
            url,
            timeout=connect_timeout,
            server_settings={"application_name": "userservice-migrate"},
        )
    except _UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError(f"cannot reach PostgreSQL to migrate: {error}") from error
    try:
        # Held for the whole run: a second replica waits here, then finds nothing to do.
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        try:
            await conn.execute(_CREATE_MIGRATIONS_TABLE)
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            applied_before = {int(row["version"]) for row in rows}
            applied: list[str] = []
            for migration in migrations:
                if migration.version in applied_before:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                _log.info("applied migration", extra={"migration": migration.name})
                applied.append(migration.name)
            return applied
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    except _UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError(f"PostgreSQL failed during migration: {error}") from error
    finally:
        await _close_connection(conn, connect_timeout)


async def open_postgres(url: str, *, settings: Settings | None = None) -> PostgresUserRepository:
    """Connect a pool (migrating first if settings say so) and start the event listener."""
    settings = settings or Settings()
    if settings.migrate_on_start:
        await migrate_postgres(url, connect_timeout=settings.db_connect_timeout_seconds)
    options = _ConnectOptions.from_settings(settings)
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            max_inactive_connection_lifetime=300.0,
            **options.connect_kwargs("userservice"),
        )
    except _UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError(f"cannot reach PostgreSQL: {error}") from error
    repository = PostgresUserRepository(
        pool,
        url=url,
        options=options,
        event_retention=settings.event_retention,
        request_id_retention_seconds=settings.request_id_retention_seconds,
    )
    try:
        await repository._start()
    except BaseException:
        await repository.close()
        raise
    return repository


@dataclasses.dataclass(frozen=True, slots=True)
class _ConnectOptions:
    connect_timeout: float
    statement_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> _ConnectOptions:
        return cls(settings.db_connect_timeout_seconds, settings.db_statement_timeout_seconds)

    def connect_kwargs(self, application_name: str) -> dict[str, Any]:
        statement_ms = str(max(1, round(self.statement_timeout * 1000)))
        return {
            "timeout": self.connect_timeout,
            # The server stops runaway statements; the client-side limit is a
            # little longer so it only fires when the server cannot answer at all.
            "command_timeout": self.statement_timeout + 1.0,
            "server_settings": {
                "application_name": application_name,
                "statement_timeout": statement_ms,
                # A client that stalls inside a transaction would otherwise hold
                # the event counter's row lock and stop every writer.
                "idle_in_transaction_session_timeout": statement_ms,
            },
        }


class PostgresUserRepository:
    """UserRepository on PostgreSQL; build it with open_postgres."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        url: str,
        options: _ConnectOptions,
        event_retention: int,
        request_id_retention_seconds: float,
    ) -> None:
        """Wrap an asyncpg pool; open_postgres does this and starts the listener."""
        self._pool = pool
        self._url = url
        self._options = options
        self._retention = event_retention
        self._request_retention_us = max(1, round(request_id_retention_seconds * 1_000_000))
        # A retention shorter than the interval is swept as often as it expires rows.
        self._expire_interval = min(_EXPIRE_INTERVAL_SECONDS, request_id_retention_seconds)
        self._next_expire = 0.0  # loop time, so the first write starts a sweep
        self._expire_task: asyncio.Task[None] | None = None
        self._closed = False
        self._latest_sequence = 0
        self._changed = asyncio.Event()
        self._listener_task: asyncio.Task[None] | None = None
        self._listener_failures = 0
        self._prune_task: asyncio.Task[None] | None = None
        # Queries of the event log so far: the change feed keeps it at one per wake-up.
        self.event_reads = 0

    async def _start(self) -> None:
        async with self._connection() as conn:
            try:
                rows = await conn.fetch("SELECT version FROM schema_migrations")
            except asyncpg.UndefinedTableError:
                rows = []
            missing = {m.version for m in _load_migrations()} - {int(r["version"]) for r in rows}
            if missing:
                raise SchemaNotReadyError(
                    f"PostgreSQL schema lacks migrations {sorted(missing)}; "
                    "run `userservice migrate`"
                )
            self._latest_sequence = int(await conn.fetchval("SELECT value FROM event_sequence"))
        self._listener_task = asyncio.create_task(
            self._listen_forever(), name="userservice-postgres-listener"
        )
        # Writes prune only the range they push out, so events beyond a lowered
        # event_retention are deleted here: one batch now, any backlog in the
        # background so that a large one cannot hold up (or time out) the start.
        if await self._prune_batch():
            self._prune_task = asyncio.create_task(
                self._prune_backlog(), name="userservice-postgres-prune"
            )

    # -- writes ---------------------------------------------------------------

    async def create(self, user: User, request_id: str | None, fingerprint: str) -> User:
        """Insert a user; a repeated request_id returns the first result (see the protocol)."""

        async def work(conn: asyncpg.Connection) -> tuple[User, int]:
            if request_id is not None:
                claimed = await conn.fetchval(
                    _CLAIM_REQUEST,
                    request_id,
                    fingerprint,
                    user.id,
                    user.email,
                    user.display_name,
                    int(user.role),
                    user.create_time_us,
                    user.update_time_us,
                    user.revision,
                    user.create_time_us,
                    now_us() - self._request_retention_us,
                )
                if claimed is None:
                    # A live key: ON CONFLICT waited for its writer to commit and locked
                    # the row, so this statement's fresh snapshot sees it.
                    row = await conn.fetchrow(_SELECT_REQUEST, request_id)
                    if row is None:
                        raise StorageUnavailableError("request_id expired while in use; retry")
                    if row["fingerprint"] != fingerprint:
                        raise RequestIdReusedError()
                    return _user_from_row(row), 0
            await _insert_user(conn, user)
            last = await self._append_events(conn, [(EventType.CREATED, user, user.update_time_us)])
            return user, last

        return await self._transact(work)

    async def create_many(self, users: Sequence[User]) -> list[User | DomainError]:
        """Insert a batch with one statement in one transaction; per row the user or its error."""
        results: list[User | DomainError] = [EmailAlreadyExistsError() for _ in users]
        seen: set[str] = set()
        candidates: list[tuple[int, User]] = []
        for index, user in enumerate(users):
            normalized = _normalize_email(user.email)
            if normalized not in seen:
                seen.add(normalized)
                candidates.append((index, user))
        if not candidates:
            return results
        # Inserting in email order makes concurrent batches wait on each other's
        # unique-index entries in one direction only, so they cannot deadlock.
        ordered = sorted(candidates, key=lambda item: _normalize_email(item[1].email))

        async def work(conn: asyncpg.Connection) -> tuple[set[str], int]:
            batch = [user for _, user in ordered]
            rows = await conn.fetch(
                _INSERT_MANY,
                [u.id for u in batch],
                [u.email for u in batch],
                [_normalize_email(u.email) for u in batch],
                [u.display_name for u in batch],
                [int(u.role) for u in batch],
                [u.create_time_us for u in batch],
                [u.update_time_us for u in batch],
                [u.revision for u in batch],
            )
            inserted = {str(row["id"]) for row in rows}
            events = [
                (EventType.CREATED, user, user.update_time_us)
                for _, user in candidates
                if user.id in inserted
            ]
            return inserted, await self._append_events(conn, events)

        inserted = await self._transact(work)
        for index, user in candidates:
            if user.id in inserted:
                results[index] = user
        return results

    async def update(
        self, user_id: str, changes: UserChanges, expected_etag: str | None, now_us: int
    ) -> User:
        """Apply changes under a row lock after checking the etag."""

        async def work(conn: asyncpg.Connection) -> tuple[User, int]:
            updated = (await _lock_user(conn, user_id, expected_etag)).changed(changes, now_us)
            await _write_user(conn, updated)
            last = await self._append_events(
                conn, [(EventType.UPDATED, updated, updated.update_time_us)]
            )
            return updated, last

        return await self._transact(work)

    async def delete(self, user_id: str, expected_etag: str | None, now_us: int) -> None:
        """Delete a user under a row lock after checking the etag."""

        async def work(conn: asyncpg.Connection) -> tuple[None, int]:
            current = await _lock_user(conn, user_id, expected_etag)
            await conn.execute("DELETE FROM users WHERE id = $1", user_id)
            event_time = current.deletion_time(now_us)
            return None, await self._append_events(conn, [(EventType.DELETED, current, event_time)])

        await self._transact(work)

    async def upsert_by_email(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Create the candidate or update the user holding its email, atomically."""
        normalized = _normalize_email(candidate.email)

        async def work(conn: asyncpg.Connection) -> tuple[tuple[SyncOutcome, User], int]:
            # The insert either wins the email or waits for whoever holds it; the
            # locked read then sees that user, unless it was deleted meanwhile.
            for _ in range(_UPSERT_ATTEMPTS):
                inserted = await conn.fetchval(_UPSERT_INSERT, *_user_values(candidate))
                if inserted is not None:
                    last = await self._append_events(
                        conn, [(EventType.CREATED, candidate, candidate.update_time_us)]
                    )
                    return (SyncOutcome.CREATED, candidate), last
                row = await conn.fetchrow(_LOCK_USER_BY_EMAIL, normalized)
                if row is not None:
                    break
            else:
                raise StorageUnavailableError("upsert kept racing with deletes; retry")
            outcome, updated = _user_from_row(row).synced(candidate)
            if outcome is SyncOutcome.UNCHANGED:
                return (outcome, updated), 0
            await _write_user(conn, updated)
            last = await self._append_events(
                conn, [(EventType.UPDATED, updated, updated.update_time_us)]
            )
            return (SyncOutcome.UPDATED, updated), last

        return await self._transact(work)

    # -- reads ----------------------------------------------------------------

    async def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SELECT_USER, user_id)
        return None if row is None else _user_from_row(row)

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User]:
        """Return the users among these ids that exist, keyed by id."""
        if not user_ids:
            return {}
        async with self._connection() as conn:
            rows = await conn.fetch(_SELECT_USERS, list(user_ids))
        users = (_user_from_row(row) for row in rows)
        return {user.id: user for user in users}

    async def get_by_email(self, email: str) -> User | None:
        """Return the user whose email equals this one without regard to case."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SELECT_USER_BY_EMAIL, _normalize_email(email))
        return None if row is None else _user_from_row(row)

    async def list_page(
        self, user_filter: UserFilter, after_id: str | None, limit: int, with_total: bool
    ) -> Page:
        """Return one keyset page in id order, with the exact match count if asked."""
        conditions, args = _filter_sql(user_filter)
        where = " AND ".join(conditions) if conditions else "true"
        # Separate texts with and without the keyset bound: a generic plan for
        # "$n IS NULL OR id > $n" could not start its index scan at the bound.
        keyset = "" if after_id is None else f" AND id > ${len(args) + 1}"
        page_args = [*args, *([] if after_id is None else [after_id]), max(limit, 0) + 1]
        # Only fixed fragments and $n placeholders are interpolated; values travel as arguments.
        page_sql = (
            f"SELECT {_LIST_COLUMNS} FROM users WHERE {where}{keyset}"  # noqa: S608
            f" ORDER BY id LIMIT ${len(page_args)}"
        )
        count_sql = f"SELECT count(*) FROM users WHERE {where}"  # noqa: S608
        async with self._connection() as conn:
            if with_total:
                # One snapshot for both, so the total agrees with the page.
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    rows = await conn.fetch(page_sql, *page_args)
                    total = await conn.fetchval(count_sql, *args)
            else:
                rows = await conn.fetch(page_sql, *page_args)
                total = 0
        users = [_user_from_row(row) for row in rows[: max(limit, 0)]]
        return Page(users=users, has_more=len(rows) > limit, total_size=int(total))

    async def events_after(self, sequence: int, limit: int) -> list[UserEvent]:
        """Return up to limit events with sequence above the given one, ascending."""
        self.event_reads += 1
        if limit <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(_SELECT_EVENTS, sequence, limit)
        return [
            UserEvent(
                sequence=int(row["sequence"]),
                type=EventType(row["type"]),
                user=_user_from_row(row),
                event_time_us=int(row["event_time_us"]),
            )
            for row in rows
        ]

    async def event_bounds(self) -> tuple[int, int]:
        """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT min(sequence), max(sequence) FROM user_events")
        if row is None or row[0] is None:
            return 0, 0
        return int(row[0]) - 1, int(row[1])

    async def wait_for_events(self, after_sequence: int, timeout: float) -> None:
        """Return once an event after after_sequence may exist, or after timeout seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._latest_sequence <= after_sequence and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return

    async def ping(self) -> None:
        """Run SELECT 1 within a short timeout; raise StorageUnavailableError if it fails."""
        timeout = min(_PING_TIMEOUT_SECONDS, self._options.connect_timeout)
        async with self._connection(timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)

    async def close(self) -> None:
        """Stop the listener and close the pool; later calls raise StorageUnavailableError."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        running = (self._listener_task, self._prune_task, self._expire_task)
        tasks = [task for task in running if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                await self._pool.close()
        except (TimeoutError, *_UNAVAILABLE_ERRORS):
            # Pool.close terminates every connection itself when it fails.
            _log.warning("PostgreSQL pool did not close cleanly", exc_info=True)
            self._pool.terminate()

    # -- plumbing -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise StorageUnavailableError("the PostgreSQL repository is closed")
        acquire_timeout = self._options.connect_timeout if timeout is None else timeout
        lost = True
        try:
            # The timeout covers waiting for a free connection and reconnecting a
            # dead one; the pool takes the connection back even when cancelled.
            async with self._pool.acquire(timeout=acquire_timeout) as conn:
                try:
                    yield conn
                except asyncpg.InterfaceError:
                    lost = conn.is_closed()
                    raise
        except _UNAVAILABLE_ERRORS as error:
            # On a live connection an InterfaceError is a bug (bad arguments, a
            # concurrent use), which must surface rather than pass for an outage.
            if isinstance(error, asyncpg.InterfaceError) and not lost:
                raise
            # Clients see the generic message; the cause stays chained for the logs.
            raise StorageUnavailableError() from error

    async def _transact(
        self, work: Callable[[asyncpg.Connection], Awaitable[tuple[_T, int]]]
    ) -> _T:
        for attempt in range(1, _TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._connection() as conn, conn.transaction():
                    result, last_sequence = await work(conn)
            except asyncpg.exceptions.TransactionRollbackError as error:
                # Deadlock or serialization failure: nothing was written, so rerun.
                if attempt == _TRANSACTION_ATTEMPTS:
                    raise StorageUnavailableError() from error
                await asyncio.sleep(random.uniform(0, 0.01 * attempt))
                continue
            if last_sequence:
                # Local watchers need not wait for the NOTIFY round trip.
                self._wake(last_sequence)
            self._start_expiry()
            return result
        raise AssertionError("unreachable")

    async def _append_events(
        self, conn: asyncpg.Connection, events: Sequence[tuple[EventType, User, int]]
    ) -> int:
        if not events:
            return 0
        last = await conn.fetchval(
            _APPEND_EVENTS,
            [int(kind) for kind, _, _ in events],
            [user.id for _, user, _ in events],
            [user.email for _, user, _ in events],
            [user.display_name for _, user, _ in events],
            [int(user.role) for _, user, _ in events],
            [user.create_time_us for _, user, _ in events],
            [user.update_time_us for _, user, _ in events],
            [user.revision for _, user, _ in events],
            [event_time for _, _, event_time in events],
            self._retention,
        )
        return int(last)

    async def _prune_batch(self) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(_PRUNE_BATCH, self._retention, _PRUNE_BATCH_SIZE)
        return bool(status != "DELETE 0")

    async def _prune_backlog(self) -> None:
        try:
            while True:
                if not await self._prune_batch():
                    return
                # Spreads the deletes out so they do not compete with live writes.
                await asyncio.sleep(0.05)
        except StorageUnavailableError:
            _log.warning("pruning old events stopped; the next start resumes it", exc_info=True)

    def _start_expiry(self) -> None:
        """Start a background sweep of expired request_ids if one is due and none is running."""
        loop = asyncio.get_running_loop()
        if self._closed or loop.time() < self._next_expire:
            return
        if self._expire_task is not None and not self._expire_task.done():
            return
        self._next_expire = loop.time() + self._expire_interval
        self._expire_task = asyncio.create_task(
            self._expire_requests(), name="userservice-postgres-expire-requests"
        )

    async def _expire_requests(self) -> None:
        try:
            while not self._closed:
                cutoff = now_us() - self._request_retention_us
                async with self._connection() as conn:
                    status = await conn.execute(_EXPIRE_REQUESTS, cutoff, _EXPIRE_BATCH)
                if int(status.rpartition(" ")[2]) < _EXPIRE_BATCH:
                    return
                # Spreads a backlog's deletes out so they do not compete with live writes.
                await asyncio.sleep(_EXPIRE_BACKLOG_PAUSE_SECONDS)
        except (StorageUnavailableError, asyncpg.PostgresError):
            # Only space is at stake: expired keys are ignored until a later sweep deletes them.
            _log.warning(
                "deleting expired request_ids failed; a later write retries", exc_info=True
            )

    def _wake(self, sequence: int) -> None:
        self._latest_sequence = max(self._latest_sequence, sequence)
        waiters, self._changed = self._changed, asyncio.Event()
        waiters.set()

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._wake(int(payload))

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen_once()
            except Exception:
                if self._listener_failures == 0:
                    _log.warning(
                        "PostgreSQL event listener lost; watchers poll until it is back",
                        exc_info=True,
                    )
                self._listener_failures += 1
            backoff = min(0.1 * 2 ** min(self._listener_failures, 10), _LISTENER_MAX_BACKOFF)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))

    async def _listen_once(self) -> None:
        conn = await asyncpg.connect(
            self._url, **self._options.connect_kwargs("userservice-listener")
        )
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(_EVENTS_CHANNEL, self._on_notification)
            # Notices sent while nobody listened are gone: wake anyone behind. The
            # value is assigned, not maxed, so that after a restore of an older
            # backup watchers wait again instead of spinning on a stale high mark;
            # a write that commits after this read still NOTIFYs this listener.
            self._latest_sequence = int(await conn.fetchval("SELECT value FROM event_sequence"))
            self._wake(self._latest_sequence)
            if self._listener_failures:
                _log.info("PostgreSQL event listener reconnected")
                self._listener_failures = 0
            while not lost.is_set():
                # A periodic query notices a connection that died without a word.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_LISTENER_KEEPALIVE_SECONDS):
                        await lost.wait()
                if not lost.is_set():
                    await conn.fetchval("SELECT 1")
            raise ConnectionResetError("the listener connection closed")
        finally:
            conn.terminate()


def _normalize_email(email: str) -> str:
    return email_key(email)


def _user_values(user: User) -> tuple[str, str, str, str, int, int, int, int]:
    return (
        user.id,
        user.email,
        _normalize_email(user.email),
        user.display_name,
        int(user.role),
        user.create_time_us,
        user.update_time_us,
        user.revision,
    )


def _user_from_row(row: Any) -> User:
    return User(
        id=str(row["id"]),
        email=str(row["email"]),
        display_name=str(row["display_name"]),
        role=Role(row["role"]),
        create_time_us=int(row["create_time_us"]),
        update_time_us=int(row["update_time_us"]),
        revision=int(row["revision"]),
    )


def _is_email_conflict(error: asyncpg.UniqueViolationError) -> bool:
    return bool(error.constraint_name == _EMAIL_INDEX)


async def _insert_user(conn: asyncpg.Connection, user: User) -> None:
    try:
        await conn.execute(_INSERT_USER, *_user_values(user))
    except asyncpg.UniqueViolationError as error:
        if _is_email_conflict(error):
            raise EmailAlreadyExistsError() from None
        raise


async def _write_user(conn: asyncpg.Connection, user: User) -> None:
    try:
        await conn.execute(
            _UPDATE_USER,
            user.id,
            user.email,
            _normalize_email(user.email),
            user.display_name,
            int(user.role),
            user.update_time_us,
            user.revision,
        )
    except asyncpg.UniqueViolationError as error:
        if _is_email_conflict(error):
            raise EmailAlreadyExistsError() from None
        raise


async def _lock_user(conn: asyncpg.Connection, user_id: str, expected_etag: str | None) -> User:
    row = await conn.fetchrow(_LOCK_USER, user_id)
    if row is None:
        raise UserNotFoundError(user_id)
    current = _user_from_row(row)
    current.require_etag(expected_etag)
    return current


def _like_contains(needle: str) -> str:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _filter_sql(user_filter: UserFilter) -> tuple[list[str], list[object]]:
    conditions: list[str] = []
    args: list[object] = []

    def param(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if user_filter.role is not None:
        conditions.append(f"role = {param(int(user_filter.role))}::smallint")
    if user_filter.role_not is not None:
        conditions.append(f"role <> {param(int(user_filter.role_not))}::smallint")
    if user_filter.email_equals is not None:
        conditions.append(f"email_normalized = {param(_normalize_email(user_filter.email_equals))}")
    if user_filter.email_contains is not None:
        pattern = _like_contains(_normalize_email(user_filter.email_contains))
        conditions.append(f"email_normalized LIKE {param(pattern)} ESCAPE '\\'")
    if user_filter.display_name_contains is not None:
        pattern = _like_contains(user_filter.display_name_contains)
        conditions.append(f"lower(display_name) LIKE lower({param(pattern)}) ESCAPE '\\'")
    return conditions, args


async def _close_connection(conn: asyncpg.Connection, timeout: float) -> None:
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=timeout)
    except (TimeoutError, *_UNAVAILABLE_ERRORS):
        conn.terminate()
