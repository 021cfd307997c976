"""PostgreSQL-only behaviour: replicas sharing one database, migrations, and outages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from helpers.servers import eventually, make_settings, running_app
from helpers.tcp_proxy import TcpProxy
from helpers.users import make_user

from userservice.config import Settings
from userservice.domain.errors import (
    CommitOutcomeUnknownError,
    ConcurrentConflictError,
    EmailAlreadyExistsError,
    EtagMismatchError,
    StorageBusyError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import SyncOutcome, User, UserChanges, UserFilter
from userservice.server.wiring import open_repository as open_postgres
from userservice.storage.migrations import backend_migrations
from userservice.storage.postgres import (
    PostgresUserRepository,
    SchemaNotReadyError,
    migrate_postgres,
)

pytestmark = pytest.mark.postgres

OpenRepository = Callable[..., Awaitable[PostgresUserRepository]]

ALL_MIGRATIONS = [migration.name for migration in backend_migrations("postgres")]
MIGRATION_LOCK_KEY = 0x7573_6572_7376_6331


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test PostgreSQL server."""
    async with TcpProxy("127.0.0.1", 5432) as running:
        yield running


@pytest_asyncio.fixture
async def open_repository(postgres_url: str, proxy: TcpProxy) -> AsyncIterator[OpenRepository]:
    """Open repositories ("replicas") on the test database; all are closed afterwards.

    It depends on the proxy fixture so that the proxy outlives every repository
    (fixtures tear down in reverse order), and teardown is not an outage.
    """
    opened: list[PostgresUserRepository] = []

    async def open_one(via_proxy: bool = False, **settings: Any) -> PostgresUserRepository:
        values: dict[str, Any] = {
            "db_pool_min_size": 1,
            "db_pool_max_size": 4,
            "db_connect_timeout_seconds": 2.0,
            "db_statement_timeout_seconds": 5.0,
            **settings,
        }
        url = proxy.url(postgres_url) if via_proxy else postgres_url
        repository = await open_postgres(url, settings=dataclasses.replace(Settings(), **values))
        opened.append(repository)
        return repository

    yield open_one
    for repository in opened:
        await repository.close()


async def fetchval(url: str, query: str, *args: object) -> Any:
    """Run one query on a connection of its own."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


# -- migrations ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_processes_migrating_at_once_apply_each_migration_once(postgres_url: str) -> None:
    script = (
        "import asyncio, json, sys\n"
        "from userservice.storage.postgres import migrate_postgres\n"
        "print(json.dumps(asyncio.run(migrate_postgres(sys.argv[1]))))\n"
    )
    # Holding the migration lock makes both processes queue behind it, so they
    # really contend instead of running one after the other by luck.
    holder = await asyncpg.connect(postgres_url, timeout=5)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                script,
                postgres_url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 30
        while True:
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            if waiting == 2:
                break
            assert time.monotonic() < deadline, "the migration processes never reached the lock"
            await asyncio.sleep(0.05)
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        outputs = await asyncio.wait_for(
            asyncio.gather(*(process.communicate() for process in processes)), 60
        )
    finally:
        await holder.close()

    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()
    applied = sorted((json.loads(stdout) for stdout, _ in outputs), key=len)
    assert applied == [[], ALL_MIGRATIONS]
    rows = await fetchval(postgres_url, "SELECT count(*) FROM schema_migrations")
    assert rows == len(ALL_MIGRATIONS)
    assert await migrate_postgres(postgres_url) == []


@pytest.mark.asyncio
async def test_open_refuses_an_unmigrated_database(
    postgres_url: str, open_repository: OpenRepository
) -> None:
    with pytest.raises(SchemaNotReadyError):
        await open_repository(migrate_on_start=False)
    assert await migrate_postgres(postgres_url) == ALL_MIGRATIONS
    repository = await open_repository(migrate_on_start=False)
    await repository.ping()


# -- replicas sharing one database ---------------------------------------------


@pytest.mark.asyncio
async def test_event_sequences_become_visible_in_order_under_concurrent_writers(
    open_repository: OpenRepository, proxy: TcpProxy
) -> None:
    # Writers reach the database through a proxy that delays every packet, which
    # widens the gap between taking a sequence and committing it.
    proxy.latency = 0.003
    writers = [await open_repository(via_proxy=True) for _ in range(2)]
    reader = await open_repository()
    seed = [await writers[0].create(make_user(f"seed{i}@example.com"), None, "") for i in range(8)]
    tasks_per_writer, writes_per_task = 8, 12
    total = len(seed) + len(writers) * tasks_per_writer * writes_per_task

    async def write(repository: PostgresUserRepository, task: int) -> None:
        for n in range(writes_per_task):
            if n % 3 == 2:
                target = seed[(task + n) % len(seed)]
                await repository.update(
                    target.id, UserChanges(display_name=f"n{n}"), None, now_us()
                )
            else:
                email = f"w{id(repository)}-{task}-{n}@example.com"
                await repository.create(make_user(email), None, "")

    writing = asyncio.gather(
        *(write(repository, task) for repository in writers for task in range(tasks_per_writer))
    )
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while len(seen) < total:
        assert time.monotonic() < deadline, f"saw {len(seen)} of {total} events"
        batch = await reader.events_after(seen[-1] if seen else 0, 1000)
        for event in batch:
            expected = seen[-1] + 1 if seen else 1
            # Lower would mean an event appeared behind the reader; higher, a gap
            # the reader skipped and would never come back for.
            assert event.sequence == expected, f"got {event.sequence} after {seen[-1:]}"
            seen.append(event.sequence)
        if writing.done() and not batch:
            writing.result()
    await writing
    assert seen == list(range(1, total + 1))
    assert await reader.events_after(total, 10) == []


@pytest.mark.asyncio
async def test_one_email_created_concurrently_on_two_replicas_succeeds_once(
    open_repository: OpenRepository,
) -> None:
    replicas = [await open_repository(), await open_repository()]
    spellings = ["race@example.com", "Race@Example.com", "RACE@EXAMPLE.COM", "race@EXAMPLE.com"]
    results = await asyncio.gather(
        *(
            replicas[n % 2].create(make_user(spellings[n % len(spellings)]), None, "")
            for n in range(20)
        ),
        return_exceptions=True,
    )
    created = [result for result in results if isinstance(result, User)]
    assert len(created) == 1
    assert all(isinstance(r, EmailAlreadyExistsError) for r in results if r is not created[0])
    page = await replicas[0].list_page(UserFilter(), None, 100, with_total=True)
    assert page.total_size == 1
    assert [e.user.id for e in await replicas[1].events_after(0, 100)] == [created[0].id]


@pytest.mark.asyncio
async def test_concurrent_updates_with_one_etag_on_two_replicas_have_one_winner(
    open_repository: OpenRepository,
) -> None:
    replicas = [await open_repository(), await open_repository()]
    user = await replicas[0].create(make_user("etag@example.com"), None, "")
    results = await asyncio.gather(
        *(
            replicas[n % 2].update(user.id, UserChanges(display_name=f"v{n}"), user.etag, now_us())
            for n in range(20)
        ),
        return_exceptions=True,
    )
    winners = [result for result in results if isinstance(result, User)]
    assert len(winners) == 1
    assert sum(isinstance(result, EtagMismatchError) for result in results) == 19
    stored = await replicas[1].get(user.id)
    assert stored == winners[0]
    assert stored.revision == 2


@pytest.mark.asyncio
async def test_a_request_id_retried_on_two_replicas_at_once_creates_one_user(
    open_repository: OpenRepository,
) -> None:
    replicas = [await open_repository(), await open_repository()]
    # Each retry builds a new candidate (new id); all must get the first one back.
    results = await asyncio.gather(
        *(
            replicas[n % 2].create(make_user("retry@example.com"), "request-1", "fingerprint")
            for n in range(10)
        )
    )
    assert len({user.id for user in results}) == 1
    assert len(await replicas[0].events_after(0, 100)) == 1


@pytest.mark.asyncio
async def test_concurrent_upserts_of_one_email_on_two_replicas_create_one_user(
    open_repository: OpenRepository,
) -> None:
    replicas = [await open_repository(), await open_repository()]
    results = await asyncio.gather(
        *(
            replicas[n % 2].upsert_by_email(make_user("Sync@example.com", display_name=f"n{n}"))
            for n in range(20)
        )
    )
    outcomes = [outcome for outcome, _ in results]
    assert outcomes.count(SyncOutcome.CREATED) == 1
    assert len({user.id for _, user in results}) == 1
    page = await replicas[0].list_page(UserFilter(), None, 100, with_total=True)
    assert page.total_size == 1


@pytest.mark.asyncio
async def test_create_many_is_one_batched_statement_with_per_row_errors(
    open_repository: OpenRepository, proxy: TcpProxy
) -> None:
    repository = await open_repository(via_proxy=True)
    taken = [
        await repository.create(make_user(f"taken{i}@example.com"), None, "") for i in range(50)
    ]
    batch: list[User] = []
    for i in range(1000):
        if i % 20 == 5:
            batch.append(make_user(f"TAKEN{i // 20}@example.com"))
        elif i % 20 == 9:
            batch.append(make_user(f"NEW{i - 1}@Example.com"))
        else:
            batch.append(make_user(f"new{i}@example.com"))
    latest_before = (await repository.event_bounds())[1]

    chunks_before = proxy.client_chunks
    results = await repository.create_many(batch)
    round_trips = proxy.client_chunks - chunks_before

    # One row at a time would need at least a thousand round trips.
    assert round_trips < 30
    assert len(results) == len(batch)
    for i, (user, result) in enumerate(zip(batch, results, strict=True)):
        if i % 20 in (5, 9):
            assert isinstance(result, EmailAlreadyExistsError), i
        else:
            assert result == user
    inserted = [result for result in results if isinstance(result, User)]
    assert len(inserted) == 900
    events = await repository.events_after(latest_before, 2000)
    assert [event.user.id for event in events] == [user.id for user in inserted]
    assert [event.sequence for event in events] == list(
        range(latest_before + 1, latest_before + 901)
    )
    page = await repository.list_page(UserFilter(), None, 1, with_total=True)
    assert page.total_size == len(taken) + 900


@pytest.mark.asyncio
async def test_a_write_on_one_replica_wakes_a_watcher_on_another(
    open_repository: OpenRepository,
) -> None:
    writer, watcher = await open_repository(), await open_repository()
    latest = (await watcher.event_bounds())[1]

    started = time.monotonic()
    await watcher.wait_for_events(latest, 0.3)
    assert time.monotonic() - started >= 0.25, "returned early with nothing new"

    waiting = asyncio.create_task(watcher.wait_for_events(latest, 10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    started = time.monotonic()
    await writer.create(make_user("wake@example.com"), None, "")
    await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - started < 2


@pytest.mark.asyncio
async def test_the_listener_reconnects_after_its_connection_is_cut(
    open_repository: OpenRepository, proxy: TcpProxy
) -> None:
    writer = await open_repository()
    watcher = await open_repository(via_proxy=True)
    await asyncio.sleep(0.2)
    await proxy.kill_connections()
    await asyncio.sleep(1.0)
    latest = (await watcher.event_bounds())[1]

    waiting = asyncio.create_task(watcher.wait_for_events(latest, 10))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await writer.create(make_user("again@example.com"), None, "")
    await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - started < 2


# -- retention ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_only_the_newest_events_are_retained(open_repository: OpenRepository) -> None:
    repository = await open_repository(event_retention=5)
    for i in range(12):
        await repository.create(make_user(f"r{i}@example.com"), None, "")
    assert await repository.event_bounds() == (7, 12)
    assert [event.sequence for event in await repository.events_after(0, 100)] == [
        8,
        9,
        10,
        11,
        12,
    ]

    await repository.create_many([make_user(f"b{i}@example.com") for i in range(8)])
    assert await repository.event_bounds() == (15, 20)

    smaller = await open_repository(event_retention=2)
    assert await smaller.event_bounds() == (18, 20)


@pytest.mark.asyncio
async def test_a_large_backlog_beyond_retention_is_pruned_in_the_background(
    postgres_url: str, open_repository: OpenRepository
) -> None:
    await migrate_postgres(postgres_url)
    backlog = 25_000
    conn = await asyncpg.connect(postgres_url, timeout=5)
    try:
        await conn.execute(
            "INSERT INTO user_events SELECT n, 1, 'id', 'e', 'n', 1, 0, 0, 1, 0"
            " FROM generate_series(1, $1::bigint) AS n",
            backlog,
        )
        await conn.execute("UPDATE event_sequence SET value = $1", backlog)
    finally:
        await conn.close()

    repository = await open_repository(event_retention=10)
    deadline = time.monotonic() + 20
    while await repository.event_bounds() != (backlog - 10, backlog):
        assert time.monotonic() < deadline, await repository.event_bounds()
        # Pruned from the bottom up: what remains is always one contiguous run.
        contiguous = await fetchval(
            postgres_url, "SELECT count(*) = max(sequence) - min(sequence) + 1 FROM user_events"
        )
        assert contiguous
        await asyncio.sleep(0.05)


# -- outages ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_calls_fail_fast_while_the_database_is_down_and_recover_after(
    open_repository: OpenRepository, proxy: TcpProxy
) -> None:
    repository = await open_repository(
        via_proxy=True, db_connect_timeout_seconds=1.0, db_pool_max_size=2
    )
    acknowledged = await repository.create(make_user("durable@example.com"), None, "")

    await proxy.stop()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: repository.get(acknowledged.id),
        lambda: repository.create(make_user("lost@example.com"), None, ""),
        repository.ping,
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            await call()
        assert time.monotonic() - started < 3

    await proxy.start()
    await repository.ping()
    assert await repository.get(acknowledged.id) == acknowledged
    assert await repository.get_by_email("lost@example.com") is None
    await repository.create(make_user("after@example.com"), None, "")


@pytest.mark.asyncio
async def test_calls_are_bounded_when_the_network_swallows_packets(
    open_repository: OpenRepository, proxy: TcpProxy
) -> None:
    repository = await open_repository(
        via_proxy=True,
        db_connect_timeout_seconds=1.0,
        db_statement_timeout_seconds=1.0,
        db_pool_max_size=2,
    )
    user = await repository.create(make_user("hang@example.com"), None, "")

    proxy.pause()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: repository.get(user.id),
        repository.ping,
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            await call()
        # At worst: the client-side statement limit (1 s + 1 s), then up to the
        # connect timeout (1 s) waiting for the query's cancellation, plus slack.
        assert time.monotonic() - started < 5
    proxy.resume()

    deadline = time.monotonic() + 15
    while True:
        try:
            assert await repository.get(user.id) == user
            break
        except StorageUnavailableError:
            assert time.monotonic() < deadline, "the pool never recovered"
            await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_the_repository_cannot_open_while_the_database_is_down(
    postgres_url: str, proxy: TcpProxy
) -> None:
    url = proxy.url(postgres_url)
    await proxy.stop()
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError):
        await migrate_postgres(url, connect_timeout=1.0)
    with pytest.raises(StorageUnavailableError):
        await open_postgres(url, settings=Settings(db_connect_timeout_seconds=1.0))
    assert time.monotonic() - started < 5


@pytest.mark.asyncio
async def test_statement_timeout_bounds_a_blocked_write(
    postgres_url: str, open_repository: OpenRepository
) -> None:
    repository = await open_repository(db_statement_timeout_seconds=0.5)
    user = await repository.create(make_user("locked@example.com"), None, "")
    blocker = await asyncpg.connect(postgres_url, timeout=5)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
            started = time.monotonic()
            # SQLSTATE 57014: the truth is "too slow", not "unavailable, retry".
            with pytest.raises(StorageTimeoutError):
                await repository.update(user.id, UserChanges(display_name="x"), None, now_us())
            assert time.monotonic() - started < 2
    finally:
        await blocker.close()
    assert await repository.get(user.id) == user


@pytest.mark.asyncio
async def test_cancelled_calls_roll_back_and_return_their_connections(
    postgres_url: str, open_repository: OpenRepository
) -> None:
    repository = await open_repository(db_pool_max_size=2)
    user = await repository.create(make_user("cancel@example.com"), None, "")
    blocker = await asyncpg.connect(postgres_url, timeout=5)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
            # Both pool connections wait on the row lock, as handlers past their deadline would.
            stuck = [
                asyncio.create_task(
                    repository.update(user.id, UserChanges(display_name="x"), None, now_us())
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0.3)
            for task in stuck:
                task.cancel()
            results = await asyncio.gather(*stuck, return_exceptions=True)
            assert all(isinstance(result, asyncio.CancelledError) for result in results)
            async with asyncio.timeout(3):
                reads = await asyncio.gather(repository.get(user.id), repository.get(user.id))
            assert list(reads) == [user, user]
    finally:
        await blocker.close()
    assert await repository.get(user.id) == user
    assert len(await repository.events_after(0, 10)) == 1


@pytest.mark.asyncio
async def test_close_is_idempotent_and_later_calls_fail(open_repository: OpenRepository) -> None:
    repository = await open_repository()
    await repository.close()
    await repository.close()
    with pytest.raises(StorageUnavailableError):
        await repository.get(new_user_id())
    with pytest.raises(StorageUnavailableError):
        await repository.ping()
    async with asyncio.timeout(1):
        await repository.wait_for_events(0, 30)


# -- queries ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_substring_filters_treat_like_wildcards_literally(
    open_repository: OpenRepository,
) -> None:
    repository = await open_repository()
    await repository.create(make_user("a_b@example.com", display_name="Ratio 100%"), None, "")
    await repository.create(make_user("axb@example.com", display_name="Ratio 1000"), None, "")
    await repository.create(make_user("a\\b@example.com", display_name="Back\\slash"), None, "")

    async def emails(user_filter: UserFilter) -> list[str]:
        page = await repository.list_page(user_filter, None, 10, with_total=True)
        assert page.total_size == len(page.users)
        return sorted(user.email for user in page.users)

    assert await emails(UserFilter(email_contains="A_B")) == ["a_b@example.com"]
    assert await emails(UserFilter(email_contains="\\")) == ["a\\b@example.com"]
    assert await emails(UserFilter(display_name_contains="0%")) == ["a_b@example.com"]
    assert await emails(UserFilter(display_name_contains="RATIO")) == [
        "a_b@example.com",
        "axb@example.com",
    ]
    assert await emails(UserFilter(email_equals="AXB@EXAMPLE.COM")) == ["axb@example.com"]


@pytest.mark.asyncio
async def test_a_saturated_pool_is_busy_not_down_and_pings_still_answer(
    postgres_url: str, open_repository: OpenRepository
) -> None:
    repository = await open_repository(db_pool_max_size=1, db_connect_timeout_seconds=0.5)
    user = await repository.create(make_user("busy@example.com"), None, "")
    blocker = await asyncpg.connect(postgres_url, timeout=5)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
            # The pool's only connection waits on the row lock.
            stuck = asyncio.create_task(
                repository.update(user.id, UserChanges(display_name="x"), None, now_us())
            )
            await until_a_backend_is(blocker, "wait_event_type = 'Lock'")
            started = time.monotonic()
            with pytest.raises(StorageBusyError):
                await repository.get(user.id)
            assert time.monotonic() - started < 2
            # The health ping has a connection of its own: overload is not an outage.
            await repository.ping()
        await stuck
    finally:
        await blocker.close()


@pytest.mark.asyncio
async def test_a_conflict_that_survives_the_retries_is_a_concurrent_conflict(
    postgres_url: str, open_repository: OpenRepository
) -> None:
    repository = await open_repository()
    user = await repository.create(make_user("conflict@example.com"), None, "")
    # A real serialization failure on every attempt; the sequence counts the attempts,
    # because nextval is not rolled back with them.
    conn = await asyncpg.connect(postgres_url, timeout=5)
    try:
        await conn.execute(
            """
            CREATE SEQUENCE conflict_attempts;
            CREATE FUNCTION always_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM nextval('conflict_attempts');
                RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
            END $$;
            CREATE TRIGGER users_conflict BEFORE UPDATE ON users
                FOR EACH ROW EXECUTE FUNCTION always_conflict();
            """
        )
        with pytest.raises(ConcurrentConflictError):
            await repository.update(user.id, UserChanges(display_name="x"), None, now_us())
        assert await conn.fetchval("SELECT last_value FROM conflict_attempts") == 3
    finally:
        await conn.close()
    assert await repository.get(user.id) == user


@pytest.mark.asyncio
async def test_a_connection_lost_during_commit_leaves_the_outcome_unknown(
    postgres_url: str, open_repository: OpenRepository, proxy: TcpProxy
) -> None:
    repository = await open_repository(via_proxy=True)
    conn = await asyncpg.connect(postgres_url, timeout=5)
    try:
        # A deferred constraint trigger runs inside COMMIT: it holds the commit open long
        # enough for the test to cut the connection exactly there.
        await conn.execute(
            """
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER users_slow_commit AFTER INSERT ON users
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
            """
        )
        user = make_user("unknown@example.com")
        write = asyncio.create_task(repository.create(user, None, ""))
        await until_a_backend_is(conn, "query ILIKE 'COMMIT%' AND state = 'active'")
        await proxy.kill_connections()
        with pytest.raises(CommitOutcomeUnknownError):
            await write
        # Here the commit did complete on the server: the client could not know which.
        async with asyncio.timeout(5):
            while await conn.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id) == 0:
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def until_a_backend_is(conn: asyncpg.Connection, condition: str) -> None:
    """Wait (5 s at most) until a backend of this database matches a pg_stat_activity condition."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"  # noqa: S608
        f" WHERE datname = current_database() AND pid <> pg_backend_pid() AND {condition}"
    )
    async with asyncio.timeout(5):
        while not await conn.fetchval(query):
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_database_outage_logs_warnings_that_name_the_error_without_a_stack(
    postgres_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(
        proxy.url(postgres_url),
        db_pool_min_size=2,
        db_connect_timeout_seconds=0.5,
        health_check_interval_seconds=0.2,
    )
    async with running_app(settings):
        await proxy.stop()
        lost = "PostgreSQL event listener lost; watchers poll until it is back"
        await eventually(
            lambda: _async_value(any(r.getMessage() == lost for r in caplog.records)),
            "the listener's loss is logged",
        )
        await asyncio.sleep(1.5)  # the pool's own reconnect attempts (1 s back-off) log too
        await proxy.start()
    outage = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.getMessage() == lost and "Error" in r.error for r in outage)  # type: ignore[attr-defined]
    # The listener and asyncpg's pool name the error in one line; no stack for an outage.
    assert [r.getMessage() for r in outage if r.exc_info] == []


async def _async_value(value: bool) -> bool:
    return value
