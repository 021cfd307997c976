"""Behaviour only the SQLite store has: pragmas, migrations, the process lock and the read cache."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from helpers import servers as support
from helpers.servers import make_settings, rich_details, running_app
from helpers.users import make_user, new_user

from user.v1 import user_service_pb2 as pb
from userservice.config import ConfigError, Settings
from userservice.domain.errors import (
    EmailAlreadyExistsError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import (
    EventType,
    Role,
    SyncOutcome,
    User,
    UserChanges,
    UserFilter,
    search_key,
)
from userservice.server.wiring import open_repository
from userservice.storage import parse_sqlite_path
from userservice.storage.migrations import Migration, backend_migrations
from userservice.storage.sqlite import (
    SqliteLockedError,
    SqliteUserRepository,
    migrate_sqlite,
    open_sqlite,
)
from userservice.storage.sqlite.connection import connect, storage_errors
from userservice.storage.sqlite.migrations import apply_migrations
from userservice.storage.sqlite.shared import SharedCommits


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "userservice.db"


@pytest_asyncio.fixture
async def repo(db_path: Path) -> AsyncIterator[SqliteUserRepository]:
    repository = await open_sqlite(db_path)
    try:
        yield repository
    finally:
        await repository.close()


def raw_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file directly, past the repository and its cache."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


async def insert_slow_rows(path: Path, count: int) -> None:
    """Create the store at path and insert count users straight into the file.

    Their names are long, so that a substring no row holds takes a while to rule out.
    """
    await (await open_sqlite(path)).close()
    timestamp = now_us()
    name = "Ünïcode " + "ü" * 40
    key = search_key(name)
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO users (id, email, email_normalized, display_name, display_name_key,"
            " role, create_time_us, update_time_us, revision)"
            " VALUES (?, ?, ?, ?, ?, 1, ?, ?, 1)",
            (
                (
                    f"{index:08d}-0000-7000-8000-000000000000",
                    f"u{index}@x.io",
                    f"u{index}@x.io",
                    name,
                    key,
                    timestamp,
                    timestamp,
                )
                for index in range(count)
            ),
        )
    conn.close()


# -- URLs and files --------------------------------------------------------------------


def test_parse_sqlite_path_reads_three_slashes_as_relative_and_four_as_absolute() -> None:
    assert parse_sqlite_path("sqlite:///var/users.db") == Path.cwd() / "var" / "users.db"
    assert parse_sqlite_path("sqlite:////srv/users.db") == Path("/srv/users.db")
    for bad in ("sqlite://users.db", "sqlite:///", "sqlite:///:memory:", "sqlite:///a.db?x=1"):
        with pytest.raises(ValueError, match=r"sqlite|database"):
            parse_sqlite_path(bad)


@pytest.mark.asyncio
async def test_open_repository_creates_the_parent_directory_and_uses_settings(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nested" / "dir" / "users.db"

    repo = await open_repository(f"sqlite:///{path}", settings=Settings(event_retention=7))
    try:
        assert isinstance(repo, SqliteUserRepository)
        assert repo.path == path
    finally:
        await repo.close()
    assert path.is_file()


@pytest.mark.asyncio
async def test_open_repository_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="'mysql'") as error:
        await open_repository("mysql://root:hunter2@db/users")
    assert "hunter2" not in str(error.value)


def test_connections_use_wal_normal_sync_foreign_keys_and_a_busy_timeout(db_path: Path) -> None:
    db_path.parent.mkdir()
    conn = connect(db_path)
    try:
        pragmas = {
            name: conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    finally:
        conn.close()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "busy_timeout": 5000,
    }


# -- migrations ---------------------------------------------------------------------------


def test_migrate_records_versions_and_is_idempotent(db_path: Path) -> None:
    names = [migration.name for migration in backend_migrations("sqlite")]
    assert names[0] == "0001_init"
    assert migrate_sqlite(db_path) == names
    assert migrate_sqlite(db_path) == []

    rows = raw_rows(db_path, "SELECT * FROM schema_migrations ORDER BY version")
    assert [(row[0], row[1]) for row in rows] == [(int(name[:4]), name) for name in names]
    assert [row[3] for row in rows] == [m.checksum for m in backend_migrations("sqlite")]
    (_, _, applied_at, _) = rows[0]
    assert isinstance(applied_at, str)
    assert applied_at.endswith("Z")
    tables = {row[0] for row in raw_rows(db_path, "SELECT name FROM sqlite_master")}
    assert {"users", "user_events", "create_requests"} <= tables


def test_a_failing_migration_rolls_back_and_earlier_ones_stay(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    good = Migration.from_text(
        1,
        "0001_good",
        """
        CREATE TABLE t (x INTEGER); -- a comment with a ; inside
        CREATE TRIGGER t_double AFTER INSERT ON t BEGIN
            UPDATE t SET x = x * 2 WHERE rowid = new.rowid;
        END;
        -- trailing comment
        """,
    )
    bad = Migration.from_text(
        2, "0002_bad", "CREATE TABLE half (y INTEGER);\nSELECT * FROM missing;"
    )
    try:
        with pytest.raises(sqlite3.OperationalError, match="missing"):
            apply_migrations(conn, [good, bad])
        conn.execute("INSERT INTO t VALUES (21)")
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
        assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half'").fetchall()
        assert not conn.in_transaction

        assert apply_migrations(conn, [good]) == []
    finally:
        conn.close()


@pytest.mark.asyncio
async def test_opening_without_migrating_requires_the_current_schema(db_path: Path) -> None:
    with pytest.raises(RuntimeError, match="userservice migrate"):
        await open_sqlite(db_path, migrate=False)

    migrate_sqlite(db_path)
    repo = await open_repository(f"sqlite:///{db_path}", settings=Settings(migrate_on_start=False))
    await repo.close()


# -- the single-process lock ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_second_open_of_the_same_file_fails_until_the_first_closes(db_path: Path) -> None:
    first = await open_sqlite(db_path)
    try:
        with pytest.raises(SqliteLockedError, match=f"pid {os.getpid()}"):
            await open_sqlite(db_path)
        with pytest.raises(SqliteLockedError):
            migrate_sqlite(db_path)
    finally:
        await first.close()

    second = await open_sqlite(db_path)
    await second.close()


@pytest.mark.asyncio
async def test_another_process_cannot_open_a_file_in_use(db_path: Path) -> None:
    script = (
        "import asyncio, sys; from pathlib import Path;"
        "from userservice.storage.sqlite import open_sqlite;"
        "asyncio.run(open_sqlite(Path(sys.argv[1])))"
    )
    repo = await open_sqlite(db_path)
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script, str(db_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        await repo.close()

    assert result.returncode != 0
    assert "SqliteLockedError" in result.stderr
    assert "already in use" in result.stderr


# -- the read cache ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cached_reads_never_outlive_a_write(repo: SqliteUserRepository) -> None:
    user = await repo.create(make_user("ann@example.com", "Ann"), None, "fp")
    assert await repo.get(user.id) == user
    assert await repo.get_many([user.id]) == {user.id: user}

    updated = await repo.update(user.id, UserChanges(display_name="Annie"), None, now_us())
    assert await repo.get(user.id) == updated
    assert await repo.get_many([user.id]) == {user.id: updated}

    _, synced = await repo.upsert_by_email(make_user("ANN@example.com", "Synced"))
    assert synced.display_name == "Synced"
    assert await repo.get(user.id) == synced
    assert await repo.get_by_email("ann@example.com") == synced

    imported = [make_user("bob@example.com"), make_user("ann@example.com")]
    results = await repo.create_many(imported)
    assert results[0] == imported[0]
    assert await repo.get_many([user.id, imported[0].id, imported[1].id]) == {
        user.id: synced,
        imported[0].id: imported[0],
    }

    await repo.delete(user.id, None, now_us())
    assert await repo.get(user.id) is None
    assert await repo.get_many([user.id]) == {}


@pytest.mark.asyncio
async def test_a_read_that_raced_a_write_does_not_cache_the_old_state(db_path: Path) -> None:
    repo = await open_sqlite(db_path)
    user = await repo.create(make_user(), None, "fp")
    await repo.close()

    for round_ in range(20):
        repo = await open_sqlite(db_path)  # a cold cache each round
        try:
            reading = asyncio.create_task(repo.get(user.id))
            await asyncio.sleep(0)  # the read is now on the reader thread
            writing = asyncio.create_task(
                repo.update(user.id, UserChanges(display_name=f"Round {round_}"), None, now_us())
            )
            await asyncio.sleep(0)
            # Blocks the loop on purpose: both threads finish before either result is
            # handled, the order in which a stale read could overwrite the fresh entry.
            time.sleep(0.02)
            await asyncio.gather(reading, writing)

            assert await repo.get(user.id) == writing.result()
        finally:
            await repo.close()


@pytest.mark.asyncio
async def test_a_write_whose_caller_was_cancelled_still_refreshes_the_cache(
    repo: SqliteUserRepository,
) -> None:
    user = await repo.create(make_user(), None, "fp")
    assert await repo.get(user.id) == user
    writing = asyncio.create_task(
        repo.update(user.id, UserChanges(display_name="Committed"), None, now_us())
    )
    await asyncio.sleep(0)  # the write is now queued for the writer thread
    time.sleep(0.05)  # blocks the loop on purpose: the write commits before the cancel

    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert await repo.event_bounds() == (0, 2)

    cached = await repo.get(user.id)
    assert cached is not None
    assert (cached.display_name, cached.revision) == ("Committed", 2)


@pytest.mark.asyncio
async def test_a_worker_never_caches_its_own_commit_over_a_newer_one_of_another(
    db_path: Path,
) -> None:
    """Two repositories on one file and one SharedCommits stand in for two `--workers`.

    Worker A commits, worker B commits a newer version of the same user, and A's loop
    notices B's commit (a read) before A's own commit is applied to its cache. A must
    then serve B's version, not its own older one.
    """
    migrate_sqlite(db_path)
    shared = SharedCommits()
    worker_a = await open_sqlite(db_path, shared=shared)
    try:
        user = await worker_a.create(make_user(), None, "fp")
        assert await worker_a.get(user.id) == user  # cached in A

        a_writes = asyncio.ensure_future(
            worker_a.update(user.id, UserChanges(display_name="Older, by A"), None, now_us())
        )
        await asyncio.sleep(0)  # A's write is on A's writer thread
        # Blocks A's loop on purpose: A's commit is applied to its cache only once the
        # loop runs again, after B's commit and the read below.
        deadline = time.monotonic() + 10
        while shared.commits < 2:
            assert time.monotonic() < deadline, "worker A's write never committed"
            time.sleep(0.001)

        newer: list[User] = []

        async def worker_b_writes() -> None:
            worker_b = await open_sqlite(db_path, shared=shared)
            try:
                changes = UserChanges(display_name="Newer, by B")
                newer.append(await worker_b.update(user.id, changes, None, now_us()))
            finally:
                await worker_b.close()

        other = threading.Thread(target=asyncio.run, args=(worker_b_writes(),))
        other.start()
        other.join(30)
        assert newer, "worker B's write did not finish"

        # The read sees B's bump first, then A's own commit lands on A's loop.
        assert await worker_a.get(user.id) == newer[0]
        await a_writes
        assert a_writes.result().display_name == "Older, by A"
        assert await worker_a.get(user.id) == newer[0]
        assert await worker_a.get_many([user.id]) == {user.id: newer[0]}
    finally:
        await worker_a.close()


@pytest.mark.asyncio
async def test_cache_hits_need_no_reader_thread(repo: SqliteUserRepository) -> None:
    cached = await repo.create(make_user("ann@example.com"), None, "fp")
    [uncached] = await repo.create_many([make_user("bob@example.com")])
    assert isinstance(uncached, User)
    release = threading.Event()
    repo._reader.executor.submit(release.wait, 10)
    try:
        assert await asyncio.wait_for(repo.get(cached.id), 1) == cached
        # Health pings have their own thread and connection: a long scan is not an outage.
        await asyncio.wait_for(repo.ping(), 1)
        assert await asyncio.wait_for(repo.get_many([cached.id]), 1) == {cached.id: cached}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(repo.get(uncached.id)), 0.1)
    finally:
        release.set()


@pytest.mark.asyncio
async def test_the_cache_is_bounded_and_stays_correct(db_path: Path) -> None:
    repo = await open_sqlite(db_path, cache_size=3)
    try:
        users = [await repo.create(make_user(f"u{i}@example.com"), None, "fp") for i in range(10)]
        for user in users:
            assert await repo.get(user.id) == user
        assert len(repo._cache) == 3
        assert await repo.get_many([user.id for user in users]) == {user.id: user for user in users}
        assert len(repo._cache) == 3
    finally:
        await repo.close()


@pytest.mark.asyncio
async def test_concurrent_reads_and_writes_leave_the_cache_equal_to_the_file(
    repo: SqliteUserRepository,
) -> None:
    users = [await repo.create(make_user(f"u{i}@example.com"), None, "fp") for i in range(5)]

    async def churn(user: User, worker: int) -> None:
        for step in range(20):
            await repo.get(user.id)
            changes = UserChanges(display_name=f"w{worker} s{step}", role=Role(step % 3 + 1))
            await repo.update(user.id, changes, None, now_us())
            await repo.get_many([other.id for other in users])

    await asyncio.gather(*(churn(user, worker) for user in users for worker in range(4)))

    stored = (await repo.list_page(UserFilter(), None, 100, with_total=False)).users
    assert [await repo.get(user.id) for user in stored] == stored
    assert {user.revision for user in stored} == {1 + 4 * 20}
    _, latest = await repo.event_bounds()
    assert latest == 5 + 5 * 4 * 20
    events = await repo.events_after(0, 1000)
    assert [event.sequence for event in events] == list(range(1, latest + 1))


# -- errors, retention, lifecycle -----------------------------------------------------------------


# Text a batch insert must store exactly: quotes and backslashes, astral and combining
# characters, a line separator, an escape-like "\u0000" and, in a batch of its own, a NUL.
AWKWARD_NAMES = ['quo"te', "back\\slash", "emoji 🙂", "\u2028x", "e\u0301", "語", "\\u0000", "ﬀ"]


@pytest.mark.asyncio
@pytest.mark.parametrize("names", [AWKWARD_NAMES, [*AWKWARD_NAMES, "nul\x00x"]])
async def test_a_batch_stores_its_text_and_events_exactly(
    repo: SqliteUserRepository, db_path: Path, names: list[str]
) -> None:
    users = [make_user(f"u{index}@Example.com", name) for index, name in enumerate(names)]
    results = await repo.create_many([*users, make_user("U0@example.COM")])
    assert results[:-1] == users
    assert isinstance(results[-1], EmailAlreadyExistsError)
    stored = raw_rows(db_path, "SELECT id, display_name, email_normalized FROM users ORDER BY id")
    assert stored == [(u.id, u.display_name, u.email.lower()) for u in users]
    events = await repo.events_after(0, 100)
    assert [(e.sequence, e.type, e.user) for e in events] == [
        (sequence, EventType.CREATED, user) for sequence, user in enumerate(users, start=1)
    ]


@pytest.mark.asyncio
async def test_unexpected_database_errors_propagate_and_roll_back(
    repo: SqliteUserRepository,
) -> None:
    user = await repo.create(make_user("ann@example.com"), None, "fp")
    same_id = User(user.id, "other@example.com", "Other", Role.VIEWER, 1, 1, 1)

    with pytest.raises(sqlite3.IntegrityError):
        await repo.create(same_id, None, "fp")
    with pytest.raises(sqlite3.IntegrityError):
        await repo.create_many([make_user("new@example.com"), same_id])

    assert await repo.get_by_email("new@example.com") is None
    assert await repo.event_bounds() == (0, 1)


def test_io_failures_become_storage_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailableError), storage_errors():
        sqlite3.connect(tmp_path / "missing" / "dir.db")
    conn = sqlite3.connect(":memory:")
    try:
        with pytest.raises(sqlite3.OperationalError, match="no such table"), storage_errors():
            conn.execute("SELECT * FROM absent")
    finally:
        conn.close()


@pytest.mark.asyncio
async def test_retention_prunes_in_batches_and_on_open(db_path: Path) -> None:
    repo = await open_sqlite(db_path, event_retention=10)
    try:
        users = [make_user(f"u{i}@example.com") for i in range(25)]
        await repo.create_many(users[:9])
        assert await repo.event_bounds() == (0, 9)
        await repo.create_many(users[9:])
        assert await repo.event_bounds() == (15, 25)
    finally:
        await repo.close()

    repo = await open_sqlite(db_path, event_retention=3)
    try:
        assert await repo.event_bounds() == (22, 25)
    finally:
        await repo.close()


@pytest.mark.asyncio
async def test_display_name_filter_folds_non_ascii_case(repo: SqliteUserRepository) -> None:
    await repo.create(make_user("e@example.com", "ÉMILE Zola"), None, "fp")

    page = await repo.list_page(UserFilter(display_name_contains="émile"), None, 10, True)

    assert [user.display_name for user in page.users] == ["ÉMILE Zola"]


@pytest.mark.asyncio
async def test_close_wakes_waiters_and_releases_everything(db_path: Path) -> None:
    repo = await open_sqlite(db_path)
    await repo.create(make_user(), None, "fp")
    waiter = asyncio.create_task(repo.wait_for_events(1, 30))
    await asyncio.sleep(0.01)

    await asyncio.gather(repo.close(), repo.close())

    await asyncio.wait_for(waiter, 1)
    for call in (repo.ping(), repo.get(new_user_id()), repo.create(make_user(), None, "fp")):
        with pytest.raises(StorageUnavailableError):
            await call
    assert not [t for t in threading.enumerate() if t.name.startswith("sqlite-")]
    reopened = await open_sqlite(db_path)
    try:
        [event] = await reopened.events_after(0, 10)
        assert event.user.email == "ann@example.com"
        _, latest = await reopened.event_bounds()
        assert latest == 1
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_upsert_that_changes_nothing_writes_nothing(repo: SqliteUserRepository) -> None:
    _, user = await repo.upsert_by_email(make_user("ann@example.com", "Ann"))

    outcome, same = await repo.upsert_by_email(make_user("ann@example.com", "Ann"))

    assert (outcome, same) == (SyncOutcome.UNCHANGED, user)
    assert raw_rows(repo.path, "SELECT revision FROM users") == [(1,)]


@pytest.mark.asyncio
async def test_a_cancelled_read_is_interrupted_not_left_running(db_path: Path) -> None:
    """The caller gave up (deadline or cancel): the reader thread stops its query."""
    await insert_slow_rows(db_path, 600_000)
    repository = await open_sqlite(db_path)
    try:
        # A substring no row holds is tested against every row: a slow scan on purpose.
        slow_filter = UserFilter(display_name_contains="ñ")
        started = time.monotonic()
        await repository.list_page(slow_filter, None, 10, with_total=True)
        full_scan = time.monotonic() - started
        assert full_scan > 0.2, "the scan is too fast to show an interrupt"

        scan = asyncio.create_task(repository.list_page(slow_filter, None, 10, with_total=True))
        await asyncio.sleep(0.05)
        scan.cancel()
        started = time.monotonic()
        # Served by the same reader thread: it only answers once the scan has stopped.
        assert await repository.get_many([new_user_id()]) == {}
        assert time.monotonic() - started < full_scan / 3
        with pytest.raises(asyncio.CancelledError):
            await scan
        # The interrupt ended only the abandoned query: the connection still serves reads.
        page = await repository.list_page(UserFilter(), None, 5, with_total=False)
        assert len(page.users) == 5
    finally:
        await repository.close()


# -- the statement budget and durability -------------------------------------------------


@pytest.mark.asyncio
async def test_a_scan_past_the_statement_budget_ends_storage_timeout_and_the_reader_goes_on(
    db_path: Path,
) -> None:
    """USERSERVICE_DB_STATEMENT_TIMEOUT_SECONDS bounds SQLite statements as it does PostgreSQL's."""
    await insert_slow_rows(db_path, 200_000)
    settings = make_settings(f"sqlite:///{db_path}", db_statement_timeout_seconds=0.005)
    async with running_app(settings) as app, support.connect(app.port) as client:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.ListUsers(
                pb.ListUsersRequest(filter='display_name : "ñ"'),
                metadata=client.metadata,
                timeout=30,
            )
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        details = rich_details(caught.value)
        assert details["ErrorInfo"].reason == "STORAGE_TIMEOUT"
        assert "RetryInfo" not in details
        assert time.monotonic() - started < 5
        # Point reads and writes fit the budget, and the interrupted read's transaction was
        # rolled back: the reader's connection serves the next read.
        user_id = "00000042-0000-7000-8000-000000000000"
        got = await client.stub.GetUser(pb.GetUserRequest(id=user_id), metadata=client.metadata)
        assert got.user.email == "u42@x.io"
        created = await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user("budget@example.com")), metadata=client.metadata
        )
        assert created.user.email == "budget@example.com"


@pytest.mark.asyncio
@pytest.mark.parametrize(("setting", "pragma"), [(None, 1), ("FULL", 2), ("full", 2)])
async def test_the_synchronous_setting_reaches_every_connection_of_the_store(
    db_path: Path, setting: str | None, pragma: int
) -> None:
    overrides = {} if setting is None else {"sqlite_synchronous": setting}
    async with running_app(make_settings(f"sqlite:///{db_path}", **overrides)) as app:
        files = app.repository._files  # type: ignore[union-attr]
        for conn in (files.write_conn, files.read_conn, files.ping_conn):
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == pragma


def test_the_synchronous_setting_accepts_only_normal_or_full() -> None:
    with pytest.raises(ConfigError, match="USERSERVICE_SQLITE_SYNCHRONOUS must be NORMAL or FULL"):
        make_settings("sqlite:///x.db", sqlite_synchronous="OFF")


@pytest.mark.asyncio
async def test_a_write_transaction_past_the_budget_rolls_back_whole_and_the_writer_goes_on(
    db_path: Path,
) -> None:
    repository = await open_sqlite(db_path, statement_timeout=0.002)
    try:
        batch = [make_user(f"u{index}@example.com", f"User {index}") for index in range(20_000)]
        with pytest.raises(StorageTimeoutError):
            await repository.create_many(batch)
        assert raw_rows(db_path, "SELECT count(*) FROM users") == [(0,)]
        assert await repository.event_bounds() == (0, 0)
        created = await repository.create(make_user("after@example.com"), None, "fp")
        assert await repository.get(created.id) == created
    finally:
        await repository.close()
