"""Storage floors: the queries the service's stores run, without the service's layers.

`python -m benchmarks.bare_server --store URL` answers from these instead of from memory, so
a scenario's ratio to its floor shows what *our* code costs on top of the same storage work:

- SQLite runs the store's own SQL on the store's own pragmas, the way the store runs it:
  reads (pages, batches) one at a time on a reader thread with its own connection, writes in
  one `BEGIN IMMEDIATE` transaction each on a writer thread, and GetUser from a dict of rows,
  as the store answers it from its exact cache once warm (a miss reads on the reader thread);
- PostgreSQL runs the store's SQL through an asyncpg pool of the service's default size:
  GetUser and pages one statement each, a create or an import batch the user insert and the
  event append in one transaction.

WatchUsers fans out as the service's change feed does: one pump per process reads the new
events once per wake-up (a commit here for SQLite, a NOTIFY for PostgreSQL) and hands each
response, built once, to every watcher's queue.

What these leave out is the service's own work: validation, the domain, page-token signing,
auth, the interceptors, metrics and the access log. Each row becomes a protobuf `User` of the
shape the service returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import grpc

from user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from userservice.domain.ids import new_user_id
from userservice.storage.postgres import queries as pg
from userservice.storage.rows import INSERT_TYPES, USER_COLUMNS, USER_DATA_TYPES
from userservice.storage.sqlite import queries as lite
from userservice.storage.sqlite.connection import connect

Row = Sequence[Any]
Context = grpc.aio.ServicerContext[Any, Any]
# The service's defaults: the PostgreSQL pool, the event retention, the stores' batches.
POOL_MIN, POOL_MAX = 2, 10
EVENT_RETENTION = 100_000
STREAM_BATCH = 256
IMPORT_BATCH = 500
WATCH_BATCH = 256
WATCH_POLL_SECONDS = 5.0
_CREATED = 1  # EventType.CREATED
_INSERT_NAMES = [name for name, _ in INSERT_TYPES]
# A column this floor does not fill (one a service added since) gets its type's empty value,
# as its migration's default gives existing rows.
_EMPTY: dict[str, Any] = {"text": "", "bigint": 0, "smallint": 0}
_SNAPSHOT_WIDTH = 1 + len(USER_DATA_TYPES)  # an event's snapshot: the id, then the user data
_CREATE_TIME = _INSERT_NAMES.index("create_time_us")
_EMAIL_KEY = _INSERT_NAMES.index("email_normalized")
_PG_PAGE = f"SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"  # noqa: S608
_PG_FIRST_PAGE = f"SELECT {USER_COLUMNS} FROM users ORDER BY id LIMIT $1"  # noqa: S608
_LITE_PAGE = lite.SELECT_PAGE.format(where=" WHERE id > ?")
_LITE_FIRST_PAGE = lite.SELECT_PAGE.format(where="")


def fill_user(message: user_pb2.User, row: Row) -> None:
    """Write a USER_COLUMNS row into message (id, email, name, role, times, etag)."""
    message.id = row[0]
    message.email = row[1]
    message.display_name = row[2]
    message.role = row[3]
    updated = row[5]
    seconds, micros = divmod(row[4], 1_000_000)
    message.create_time.seconds, message.create_time.nanos = seconds, micros * 1000
    seconds, micros = divmod(updated, 1_000_000)
    message.update_time.seconds, message.update_time.nanos = seconds, micros * 1000
    message.etag = f"{row[6]:x}-{updated:x}"


def new_row(user: user_pb2.User) -> tuple[Any, ...]:
    """The users row (INSERT_COLUMNS order) of a user to create, keys lower-cased."""
    now = time.time_ns() // 1000
    email = user.email
    known: dict[str, Any] = {
        "id": new_user_id(),
        "email": email,
        "display_name": user.display_name,
        "role": int(user.role),
        "create_time_us": now,
        "update_time_us": now,
        "revision": 1,
        "subject": None,
        "email_normalized": email.lower(),
        "display_name_key": user.display_name.lower(),
    }
    return tuple(known[name] if name in known else _EMPTY[kind] for name, kind in INSERT_TYPES)


def created_event(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The CREATED event of a users row: type, event time, then its snapshot columns."""
    return (_CREATED, row[_CREATE_TIME], *row[:_SNAPSHOT_WIDTH])


class Store(Protocol):
    """The storage work of each RPC a floor answers."""

    async def events_after(self, sequence: int, limit: int) -> list[Row]:
        """Up to limit event rows after sequence (snapshot columns, sequence, type, time)."""

    async def latest_sequence(self) -> int:
        """The newest event's sequence."""

    async def wait_for_events(self, timeout: float) -> None:
        """Return once an event may have been committed since the last call, or on timeout."""

    async def get(self, user_id: str) -> Row | None:
        """The user row with this id."""

    async def page(self, after_id: str | None, limit: int) -> list[Row]:
        """Up to limit rows after after_id, in id order."""

    async def create(self, row: tuple[Any, ...]) -> None:
        """Insert one user and its event in one transaction."""

    async def create_many(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert a batch of users and their events in one transaction."""

    async def close(self) -> None:
        """Release connections and threads."""


class SqliteStore:
    """The SQLite store's queries on a reader and a writer thread, a dict for warm GetUser."""

    def __init__(self, path: Path) -> None:
        """Open path's reader and writer connections, each owned by its own thread."""
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor-reader")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor-writer")
        self._read_conn = connect(path, query_only=True)
        self._write_conn = connect(path)
        self._cache: dict[str, Row] = {}
        self._loop = asyncio.get_running_loop()
        self._committed = asyncio.Event()

    async def events_after(self, sequence: int, limit: int) -> list[Row]:
        """The store's event query on the reader thread."""
        # Cleared before the read: a commit after this point wakes the next wait.
        self._committed.clear()
        return await self._loop.run_in_executor(self._reader, self._events, sequence, limit)

    def _events(self, sequence: int, limit: int) -> list[Row]:
        return self._read_conn.execute(lite.SELECT_EVENTS, (sequence, limit)).fetchall()

    async def latest_sequence(self) -> int:
        """max(sequence) on the reader thread."""
        return await self._loop.run_in_executor(self._reader, self._latest)

    def _latest(self) -> int:
        return int(self._read_conn.execute(lite.EVENT_BOUNDS).fetchone()[1] or 0)

    async def wait_for_events(self, timeout: float) -> None:
        """Woken in-process by a commit, as the store's change feed is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._committed.wait(), timeout)

    async def get(self, user_id: str) -> Row | None:
        """From the dict once read, as the store's cache answers; else on the reader thread."""
        row = self._cache.get(user_id)
        if row is None:
            row = await self._loop.run_in_executor(self._reader, self._fetch, user_id)
            if row is not None:
                self._cache[user_id] = row
        return row

    def _fetch(self, user_id: str) -> Row | None:
        found: Row | None = self._read_conn.execute(lite.SELECT_USER, (user_id,)).fetchone()
        return found

    async def page(self, after_id: str | None, limit: int) -> list[Row]:
        """One keyset page in a read transaction on the reader thread."""
        return await self._loop.run_in_executor(self._reader, self._page, after_id, limit)

    def _page(self, after_id: str | None, limit: int) -> list[Row]:
        conn = self._read_conn
        conn.execute("BEGIN")
        try:
            if after_id is None:
                return conn.execute(_LITE_FIRST_PAGE, (limit,)).fetchall()
            return conn.execute(_LITE_PAGE, (after_id, limit)).fetchall()
        finally:
            conn.execute("COMMIT")

    async def create(self, row: tuple[Any, ...]) -> None:
        """Insert the user and its event in one transaction on the writer thread."""
        await self._loop.run_in_executor(self._writer, self._create, row)
        self._committed.set()

    def _create(self, row: tuple[Any, ...]) -> None:
        conn = self._write_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(lite.INSERT_USER, row)
            conn.execute(lite.INSERT_EVENT, created_event(row)).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def create_many(self, rows: list[tuple[Any, ...]]) -> None:
        """The store's import batch: taken emails, then one executemany per table."""
        await self._loop.run_in_executor(self._writer, self._create_many, rows)
        self._committed.set()

    def _create_many(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._write_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            keys = json.dumps([row[_EMAIL_KEY] for row in rows])
            taken = {found[0] for found in conn.execute(lite.SELECT_TAKEN_EMAILS, (keys,))}
            new = [row for row in rows if row[_EMAIL_KEY] not in taken]
            conn.executemany(lite.INSERT_USER, new)
            conn.executemany(lite.INSERT_EVENTS, [created_event(row) for row in new])
            conn.execute(lite.LAST_SEQUENCE).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close both connections on their threads and stop the threads."""
        await self._loop.run_in_executor(self._reader, self._read_conn.close)
        await self._loop.run_in_executor(self._writer, self._write_conn.close)
        self._reader.shutdown()
        self._writer.shutdown()


class PostgresStore:
    """The PostgreSQL store's queries through an asyncpg pool of the service's size."""

    def __init__(self, pool: Any, listener: Any) -> None:
        """Use an open asyncpg pool, and listener (a connection of its own) for NOTIFY."""
        self._pool = pool
        self._listener = listener
        self._notified = asyncio.Event()

    async def _listen(self) -> None:
        await self._listener.add_listener("user_events", self._notify)

    def _notify(self, *_: object) -> None:
        self._notified.set()

    async def events_after(self, sequence: int, limit: int) -> list[Row]:
        """The store's event query on a pooled connection."""
        self._notified.clear()  # before the read: a later NOTIFY wakes the next wait
        rows: list[Row] = await self._pool.fetch(pg.SELECT_EVENTS, sequence, limit)
        return rows

    async def latest_sequence(self) -> int:
        """The event counter."""
        return int(await self._pool.fetchval(pg.SELECT_LATEST_SEQUENCE))

    async def wait_for_events(self, timeout: float) -> None:
        """Woken by the NOTIFY every commit sends, as the store's listener is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._notified.wait(), timeout)

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect the pool."""
        import asyncpg

        pool = await asyncpg.create_pool(url, min_size=POOL_MIN, max_size=POOL_MAX)
        store = cls(pool, await asyncpg.connect(url))
        await store._listen()
        return store

    async def get(self, user_id: str) -> Row | None:
        """One statement on a pooled connection."""
        row: Row | None = await self._pool.fetchrow(pg.SELECT_USER, user_id)
        return row

    async def page(self, after_id: str | None, limit: int) -> list[Row]:
        """One keyset page, one statement."""
        if after_id is None:
            rows: list[Row] = await self._pool.fetch(_PG_FIRST_PAGE, limit)
        else:
            rows = await self._pool.fetch(_PG_PAGE, after_id, limit)
        return rows

    async def create(self, row: tuple[Any, ...]) -> None:
        """The user insert and the event append in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(pg.INSERT_USER, *row)
            await conn.fetchval(pg.APPEND_EVENTS, *_event_arrays([row]))

    async def create_many(self, rows: list[tuple[Any, ...]]) -> None:
        """The store's import batch: one unnest insert, then the events of the rows inserted."""
        columns = list(zip(*rows, strict=True))
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = {
                found[0]
                for found in await conn.fetch(pg.INSERT_MANY, *(list(column) for column in columns))
            }
            new = [row for row in rows if row[0] in inserted]
            await conn.fetchval(pg.APPEND_EVENTS, *_event_arrays(new))

    async def close(self) -> None:
        """Close the listener and the pool."""
        await self._listener.close()
        await self._pool.close()


def _event_arrays(rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """APPEND_EVENTS' parameters for CREATED events of these users rows: the retention, then
    one array per event column (type, event time, then the row's USER_COLUMNS)."""
    events = [created_event(row) for row in rows]
    return (EVENT_RETENTION, *(list(column) for column in zip(*events, strict=True)))


async def open_store(url: str) -> Store:
    """Open the floor for a sqlite:///path or postgresql:// URL."""
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresStore.open(url)
    raise ValueError(f"--store must be sqlite:///path or postgresql://..., not {url!r}")


class StoreUserService(user_service_pb2_grpc.UserServiceServicer):
    """Answers each call from the storage work the service's store does for it."""

    def __init__(self, store: Store, after_ids: dict[str, str]) -> None:
        """Serve from store; after_ids maps each page token the bench sends to its position."""
        self._store = store
        self._after_ids = after_ids
        self._feed = Feed(store)

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> user_service_pb2.GetUserResponse:
        """Read the user; NOT_FOUND if it does not exist."""
        row = await self._store.get(request.id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        response = user_service_pb2.GetUserResponse()
        fill_user(response.user, row)
        return response

    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: Context
    ) -> user_service_pb2.CreateUserResponse:
        """Insert the user and its event; answer with the row written."""
        row = new_row(request.user)
        await self._store.create(row)
        response = user_service_pb2.CreateUserResponse()
        fill_user(response.user, row)
        return response

    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: Context
    ) -> user_service_pb2.ListUsersResponse:
        """Read one keyset page (one row more, to know whether another follows)."""
        after = self._after_ids.get(request.page_token) if request.page_token else None
        limit = request.page_size or 50
        rows = await self._store.page(after, limit + 1)
        response = user_service_pb2.ListUsersResponse()
        users = response.users
        for row in rows[:limit]:
            fill_user(users.add(), row)
        if len(rows) > limit:
            # As long as the service's signed keyset token; not a usable token.
            response.next_page_token = "e" * 130
        return response

    async def StreamUsers(
        self, request: user_service_pb2.StreamUsersRequest, context: Context
    ) -> AsyncIterator[user_service_pb2.StreamUsersResponse]:
        """Every user in id order, read in keyset batches as the service does."""
        after: str | None = None
        while True:
            rows = await self._store.page(after, STREAM_BATCH)
            for row in rows:
                response = user_service_pb2.StreamUsersResponse()
                fill_user(response.user, row)
                yield response
            if len(rows) < STREAM_BATCH:
                return
            after = rows[-1][0]

    async def ImportUsers(
        self, request_iterator: AsyncIterator[user_service_pb2.ImportUsersRequest], context: Context
    ) -> user_service_pb2.ImportUsersResponse:
        """Insert the stream's users in batches."""
        count = await import_batches(self._store, request_iterator)
        return user_service_pb2.ImportUsersResponse(created_count=count)

    async def WatchUsers(
        self, request: user_service_pb2.WatchUsersRequest, context: Context
    ) -> AsyncIterator[user_service_pb2.WatchUsersResponse]:
        """Events from now on, from the one pump (no replay: the bench watches from now)."""
        await context.send_initial_metadata(())
        queue = await self._feed.attach()
        try:
            while True:
                yield await queue.get()
        finally:
            self._feed.detach(queue)


class Feed:
    """One pump reading new events once per wake-up and queueing each for every watcher."""

    def __init__(self, store: Store) -> None:
        """Fan out store's events."""
        self._store = store
        self._queues: set[asyncio.Queue[user_service_pb2.WatchUsersResponse]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._cursor = 0

    async def attach(self) -> asyncio.Queue[user_service_pb2.WatchUsersResponse]:
        """A queue of every event committed from now on."""
        if self._pump is None:
            self._cursor = await self._store.latest_sequence()
            self._pump = asyncio.create_task(self._run())
        queue: asyncio.Queue[user_service_pb2.WatchUsersResponse] = asyncio.Queue()
        self._queues.add(queue)
        return queue

    def detach(self, queue: asyncio.Queue[user_service_pb2.WatchUsersResponse]) -> None:
        """Stop feeding queue."""
        self._queues.discard(queue)

    async def _run(self) -> None:
        while True:
            rows = await self._store.events_after(self._cursor, WATCH_BATCH)
            for row in rows:
                response = user_service_pb2.WatchUsersResponse(sequence=row[-3], type=row[-2])
                fill_user(response.user, row)
                seconds, micros = divmod(row[-1], 1_000_000)
                response.event_time.seconds, response.event_time.nanos = seconds, micros * 1000
                for queue in self._queues:
                    queue.put_nowait(response)
            if rows:
                self._cursor = rows[-1][-3]
            if len(rows) < WATCH_BATCH:
                await self._store.wait_for_events(WATCH_POLL_SECONDS)


async def import_batches(
    store: Store, requests: AsyncIterator[Any], batch_size: int = IMPORT_BATCH
) -> int:
    """Insert a stream's users in batches, one batch committing while the next is read."""
    count = 0
    batch: list[tuple[Any, ...]] = []
    committing: asyncio.Future[None] | None = None
    async for request in requests:
        batch.append(new_row(request.user))
        count += 1
        if len(batch) >= batch_size:
            if committing is not None:
                await committing
            committing = asyncio.ensure_future(store.create_many(batch))
            batch = []
    if committing is not None:
        await committing
    if batch:
        await store.create_many(batch)
    return count
