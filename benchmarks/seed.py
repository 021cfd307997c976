"""Seed SQLite files with N users fast: rows written straight into the migrated schema.

Going through the service (CreateUser or ImportUsers) would take minutes for a million rows;
plain `executemany` into a file migrated by the service's own migrations takes seconds. The
rows have the schema's shape (storage/rows.py INSERT_COLUMNS); the change log stays empty,
which no read the benchmark makes depends on. Seeded files are cached under `.bench/`, keyed
by the row count and the migrations' checksums, so a rerun copies instead of seeding.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from userservice.domain.ids import new_user_id
from userservice.domain.model import Role, User
from userservice.storage import migrations
from userservice.storage.rows import INSERT_COLUMNS, insert_fields
from userservice.storage.sqlite import migrate_sqlite

_BATCH = 50_000
# Bump when the rows written below change shape, so stale cached files are not reused.
_SEED_VERSION = "2"


def _schema_key() -> str:
    digest = hashlib.sha256(f"{_SEED_VERSION}|{INSERT_COLUMNS}".encode())
    for migration in migrations.backend_migrations("sqlite"):
        digest.update(migration.checksum.encode())
    return digest.hexdigest()[:12]


def _rows(count: int, start_us: int) -> Iterator[tuple[object, ...]]:
    # Ids from one process come out strictly increasing, so rows go in in key order and
    # the b-trees are filled by appending.
    for index in range(count):
        email = f"user{index:07d}@bench.example"
        created = start_us + index
        # Through the store's own row mapping, so every derived key follows the domain's rules.
        user = User(
            new_user_id(), email, f"Bench User {index}", Role(index % 3 + 1), created, created, 1
        )
        yield insert_fields(user)


def _write(path: Path, count: int) -> None:
    migrate_sqlite(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # A scratch file that is renamed into place only when complete: durability is moot.
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        placeholders = ", ".join("?" * len(INSERT_COLUMNS.split(",")))
        insert = f"INSERT INTO users ({INSERT_COLUMNS}) VALUES ({placeholders})"  # noqa: S608
        rows = _rows(count, start_us=1_767_225_600_000_000)
        conn.execute("BEGIN")
        while batch := list(itertools.islice(rows, _BATCH)):
            conn.executemany(insert, batch)
        conn.execute("COMMIT")
        # One self-contained file to cache and copy; each server turns WAL on in its copy.
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()


def seeded_file(cache_dir: Path, count: int) -> Path:
    """Return a cached SQLite file holding `count` users, seeding it first if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"users-{count}-{_schema_key()}.db"
    if path.exists():
        return path
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    started = time.monotonic()
    try:
        _write(scratch, count)
        os.replace(scratch, path)
    finally:
        for leftover in scratch.parent.glob(f"{scratch.name}*"):
            leftover.unlink(missing_ok=True)
    print(
        f"[bench] seeded {count} users into {path} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return path


def copy_seeded(source: Path, target: Path) -> Path:
    """Copy a seeded file to `target` (the server writes WAL and lock files next to it)."""
    shutil.copyfile(source, target)
    return target


def user_ids(path: Path, positions: list[int]) -> list[str]:
    """Return the ids at these 0-based positions of the listing order (id order)."""
    wanted = set(positions)
    found: dict[int, str] = {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        # One pass over the primary key: OFFSET would rescan from the start for each one.
        cursor = conn.execute("SELECT id FROM users ORDER BY id")
        for position, (user_id,) in enumerate(cursor):
            if position in wanted:
                found[position] = user_id
                if len(found) == len(wanted):
                    break
    finally:
        conn.close()
    return [found[p] for p in positions if p in found]


async def _seed_postgres(admin_url: str, url: str, database: str, source: Path) -> None:
    import asyncpg

    from userservice.storage.postgres.migrations import migrate_postgres

    admin = await asyncpg.connect(admin_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    await migrate_postgres(url)
    columns = [column.strip() for column in INSERT_COLUMNS.split(",")]
    lite = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    conn = await asyncpg.connect(url, timeout=10)
    try:
        cursor = lite.execute(f"SELECT {INSERT_COLUMNS} FROM users ORDER BY id")  # noqa: S608
        while batch := cursor.fetchmany(_BATCH):
            await conn.copy_records_to_table("users", records=batch, columns=columns)
        # Fresh statistics, as a long-running database has: the planner then picks the
        # indexes every query of the bench is meant to use.
        await conn.execute("VACUUM ANALYZE users")
    finally:
        await conn.close()
        lite.close()


def seed_postgres(admin_url: str, database: str, source: Path) -> str:
    """Create `database` beside admin_url's, migrate it, copy source's users; return its URL."""
    url = f"{admin_url.rpartition('/')[0]}/{database}"
    started = time.monotonic()
    asyncio.run(_seed_postgres(admin_url, url, database, source))
    print(
        f"[bench] PostgreSQL database {database} seeded from {source.name} in "
        f"{time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return url


async def _drop_postgres(admin_url: str, database: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(admin_url, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


def drop_postgres(admin_url: str, database: str) -> None:
    """Drop a database seed_postgres created (its servers may still be connected)."""
    asyncio.run(_drop_postgres(admin_url, database))
