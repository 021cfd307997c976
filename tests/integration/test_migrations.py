"""One migration runner on both backends: names, checksums, order, no-transaction files, locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from helpers.databases import fresh_postgres_database
from helpers.ports import free_port
from helpers.processes import env_for
from helpers.servers import run_userservice

from userservice.storage import parse_sqlite_path
from userservice.storage.migrations import (
    MigrationError,
    backend_migrations,
    load_migrations,
    split_statements,
)
from userservice.storage.postgres import migrations as postgres_migrations
from userservice.storage.sqlite import migrations as sqlite_migrations
from userservice.storage.sqlite.connection import connect

# One runner per backend with the same shape: (folder of migrations) -> names applied.
Runner = Callable[[Path], Awaitable[list[str]]]
Query = Callable[[str], Awaitable[list[tuple[object, ...]]]]


class Backend:
    """Apply migrations from a folder to one fresh database and query it."""

    def __init__(self, runner: Runner, query: Query, name: str) -> None:
        self.run = runner
        self.query = query
        self.name = name


@pytest_asyncio.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "migrations.db"
        conn = connect(path)

        async def run_sqlite(folder: Path) -> list[str]:
            return sqlite_migrations.apply_migrations(conn, load_migrations(folder))

        async def query_sqlite(sql: str) -> list[tuple[object, ...]]:
            return [tuple(row) for row in conn.execute(sql)]

        try:
            yield Backend(run_sqlite, query_sqlite, "sqlite")
        finally:
            conn.close()
        return
    async with fresh_postgres_database() as url:
        pg = await asyncpg.connect(url)
        try:
            yield Backend(*postgres_backend(pg), "postgres")
        finally:
            await pg.close()


def postgres_backend(pg: asyncpg.Connection) -> tuple[Runner, Query]:
    """Return the runner and query functions over one PostgreSQL connection."""

    async def run_postgres(folder: Path) -> list[str]:
        return await postgres_migrations.apply_migrations(
            pg, load_migrations(folder), lock_timeout=0.3
        )

    async def query_postgres(sql: str) -> list[tuple[object, ...]]:
        return [tuple(row) for row in await pg.fetch(sql)]

    return run_postgres, query_postgres


TABLES = {
    "sqlite": "SELECT name FROM sqlite_master WHERE name = '{name}'",
    "postgres": "SELECT tablename FROM pg_tables WHERE tablename = '{name}'",
}


# The first migration of most cases, and the versions a run recorded.
FIRST = "CREATE TABLE t (x INTEGER);"
APPLIED = "SELECT version FROM schema_migrations"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Return the (not yet created) folder of migrations of one case."""
    return tmp_path / "sql"


def write(folder: Path, name: str, sql: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(sql, encoding="utf-8")


@pytest.mark.asyncio
async def test_migrations_apply_in_order_once_with_their_checksums(
    backend: Backend, folder: Path
) -> None:
    write(folder, "0002_second.sql", "INSERT INTO t (x) VALUES (2);")
    write(folder, "0001_first.sql", "CREATE TABLE t (x INTEGER);\nINSERT INTO t (x) VALUES (1);")
    assert await backend.run(folder) == ["0001_first", "0002_second"]
    assert await backend.run(folder) == []
    rows = await backend.query("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
    expected = [(m.version, m.name, m.checksum) for m in load_migrations(folder)]
    assert rows == expected
    assert await backend.query("SELECT x FROM t ORDER BY x") == [(1,), (2,)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad_name", ["2_short.sql", "0003-dash.sql", "0003_Upper.sql", "notes.txt"]
)
async def test_a_file_with_a_bad_name_is_an_error_naming_it(
    backend: Backend, folder: Path, bad_name: str
) -> None:
    write(folder, "0001_first.sql", FIRST)
    write(folder, bad_name, "CREATE TABLE u (y INTEGER);")
    with pytest.raises(MigrationError, match=bad_name.replace(".", r"\.")):
        await backend.run(folder)
    # Nothing ran: the error comes from reading the folder, before any statement.
    assert await backend.query(TABLES[backend.name].format(name="t")) == []


@pytest.mark.asyncio
async def test_two_files_with_one_version_are_an_error(backend: Backend, folder: Path) -> None:
    write(folder, "0001_first.sql", FIRST)
    write(folder, "0001_again.sql", "CREATE TABLE u (y INTEGER);")
    with pytest.raises(MigrationError, match="share version 1"):
        await backend.run(folder)


@pytest.mark.asyncio
async def test_an_edited_applied_migration_stops_the_run(backend: Backend, folder: Path) -> None:
    write(folder, "0001_first.sql", FIRST)
    assert await backend.run(folder) == ["0001_first"]
    write(folder, "0001_first.sql", "CREATE TABLE t (x INTEGER, y INTEGER);")
    write(folder, "0002_second.sql", "CREATE TABLE u (y INTEGER);")
    with pytest.raises(MigrationError, match="0001_first was edited after it was applied"):
        await backend.run(folder)
    # The new migration behind it did not run either.
    assert await backend.query(APPLIED) == [(1,)]


@pytest.mark.asyncio
async def test_a_new_file_below_an_applied_version_is_an_error(
    backend: Backend, folder: Path
) -> None:
    write(folder, "0002_second.sql", "CREATE TABLE u (y INTEGER);")
    assert await backend.run(folder) == ["0002_second"]
    write(folder, "0001_first.sql", FIRST)
    with pytest.raises(MigrationError, match="renumber it above 0002"):
        await backend.run(folder)


@pytest.mark.asyncio
async def test_a_failing_migration_leaves_nothing_half_applied(
    backend: Backend, folder: Path
) -> None:
    write(folder, "0001_first.sql", FIRST)
    write(folder, "0002_broken.sql", "CREATE TABLE half (y INTEGER);\nSELECT * FROM missing;")
    with pytest.raises(Exception, match="missing"):
        await backend.run(folder)
    assert await backend.query(APPLIED) == [(1,)]
    assert await backend.query(TABLES[backend.name].format(name="half")) == []


@pytest.mark.asyncio
async def test_a_no_transaction_migration_runs_statements_a_transaction_would_refuse(
    backend: Backend, folder: Path
) -> None:
    write(folder, "0001_first.sql", FIRST)
    # Both statements fail inside a transaction block: that is what the marker is for.
    refused = (
        "VACUUM;"
        if backend.name == "sqlite"
        else "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x_idx ON t (x);"
    )
    write(
        folder,
        "0002_outside.sql",
        f"-- Runs outside a transaction.\n-- migrate: no-transaction\n{refused}\n",
    )
    assert load_migrations(folder)[1].transactional is False
    assert await backend.run(folder) == ["0001_first", "0002_outside"]
    assert await backend.query("SELECT version FROM schema_migrations ORDER BY 1") == [(1,), (2,)]
    if backend.name == "postgres":
        valid = await backend.query(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_idx'::regclass"
        )
        assert valid == [(True,)]


@pytest.mark.asyncio
async def test_the_same_statement_without_the_marker_fails_whole(
    backend: Backend, folder: Path
) -> None:
    write(folder, "0001_first.sql", FIRST)
    refused = "VACUUM;" if backend.name == "sqlite" else "CREATE INDEX CONCURRENTLY t_x ON t (x);"
    write(folder, "0002_inside.sql", refused)
    with pytest.raises(Exception, match="transaction"):
        await backend.run(folder)
    assert await backend.query(APPLIED) == [(1,)]


@pytest.mark.asyncio
async def test_a_history_recorded_without_checksums_is_adopted(
    backend: Backend, folder: Path
) -> None:
    write(folder, "0001_first.sql", FIRST)
    # The table as releases before checksums created it, with 0001 applied.
    await backend.query(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL)"
    )
    await backend.query("INSERT INTO schema_migrations (version, name) VALUES (1, '0001_first')")
    await backend.query("CREATE TABLE t (x INTEGER)")
    assert await backend.run(folder) == []
    [(checksum,)] = await backend.query("SELECT checksum FROM schema_migrations")
    assert checksum == load_migrations(folder)[0].checksum


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_postgres_migrations_give_up_on_a_held_table_lock(
    postgres_url: str, folder: Path
) -> None:
    write(folder, "0001_first.sql", FIRST)
    write(folder, "0002_alter.sql", "ALTER TABLE t ADD COLUMN y INTEGER;")
    runner = await asyncpg.connect(postgres_url)
    holder = await asyncpg.connect(postgres_url)
    try:
        await postgres_migrations.apply_migrations(runner, load_migrations(folder)[:1])
        # A long transaction reading t: ALTER TABLE would queue behind it, and every
        # query on t behind the ALTER, if the migration waited without a limit.
        await holder.execute("BEGIN; LOCK TABLE t IN ACCESS SHARE MODE")
        started = time.monotonic()
        with pytest.raises(MigrationError, match=r"0002_alter could not take a lock within 0.3s"):
            await postgres_migrations.apply_migrations(
                runner, load_migrations(folder), lock_timeout=0.3
            )
        assert time.monotonic() - started < 5
        await holder.execute("ROLLBACK")
        assert await runner.fetchval("SELECT max(version) FROM schema_migrations") == 1
        # The advisory lock was given back: a later run applies it.
        assert await postgres_migrations.apply_migrations(runner, load_migrations(folder)) == [
            "0002_alter"
        ]
    finally:
        await holder.close()
        await runner.close()


def test_split_statements_keeps_comments_with_their_statement() -> None:
    script = (
        "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY a ON t (x);\n\n-- b\nDROP INDEX b;\n"
    )
    assert split_statements(script) == [
        "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY a ON t (x);",
        "-- b\nDROP INDEX b;",
    ]


def test_the_packaged_migrations_load_for_both_backends() -> None:
    for name in ("sqlite", "postgres"):
        migrations = backend_migrations(name)
        assert migrations[0].name == "0001_init"
        assert all(m.transactional for m in migrations)


# -- through `userservice serve` and `userservice migrate` ------------------------------


async def forge_checksum(database_url: str) -> None:
    """Make the recorded checksum of 0001_init differ, as an edited file would."""
    sql = "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1"
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(parse_sqlite_path(database_url))
        with contextlib.closing(conn), conn:
            conn.execute(sql)
        return
    pg = await asyncpg.connect(database_url)
    try:
        await pg.execute(sql)
    finally:
        await pg.close()


@pytest.mark.asyncio
async def test_serve_refuses_an_edited_applied_migration_in_one_line(database_url: str) -> None:
    code, output = await run_userservice("migrate", env=env_for(database_url))
    assert code == 0, output
    await forge_checksum(database_url)
    for extra in ({}, {"USERSERVICE_MIGRATE_ON_START": "false"}):
        code, output = await run_userservice("serve", env=env_for(database_url, **extra))
        assert code == 1, output
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if "cannot start: schema migrations" in line]
        assert len(lines) == 1, output
        assert "0001_init was edited after it was applied" in lines[0]
    code, output = await run_userservice("migrate", env=env_for(database_url))
    assert code == 1, output
    assert "Traceback" not in output, output
    assert "cannot migrate: schema migrations: migration 0001_init was edited" in output


@pytest.mark.asyncio
async def test_migrate_reports_a_locked_sqlite_file_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    path = parse_sqlite_path(url)
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        code, output = await run_userservice("migrate", env=env_for(url))
    finally:
        os.close(lock_fd)
    assert code == 1, output
    assert "Traceback" not in output, output
    assert "userservice: cannot migrate: database locked" in output


@pytest.mark.asyncio
async def test_migrate_reports_an_unreachable_postgres_in_one_line() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    code, output = await run_userservice(
        "migrate", env=env_for(url, USERSERVICE_DB_CONNECT_TIMEOUT_SECONDS="1")
    )
    assert code == 1, output
    assert "Traceback" not in output, output
    assert "userservice: cannot migrate: database unreachable" in output


@pytest.mark.asyncio
async def test_schema_not_ready_is_reported_with_the_pending_names(database_url: str) -> None:
    env = env_for(database_url, USERSERVICE_MIGRATE_ON_START="false")
    code, output = await run_userservice("serve", env=env)
    assert code == 1, output
    pending = str([migration.name for migration in backend_migrations("sqlite")])
    assert f"cannot start: schema not ready: the schema lacks migrations {pending}" in output
