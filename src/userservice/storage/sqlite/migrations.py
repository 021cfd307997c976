"""Runs the shared migration plan on a SQLite file: one transaction per file unless marked."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from userservice.storage import migrations
from userservice.storage.migrations import Migration
from userservice.storage.sqlite import queries
from userservice.storage.sqlite.connection import connect, lock, transaction


def applied_versions(conn: sqlite3.Connection) -> dict[int, str | None]:
    """Return the recorded versions and their checksums; {} before the first migration."""
    if conn.execute(queries.HAS_MIGRATIONS_TABLE).fetchone() is None:
        return {}
    columns = {row[0] for row in conn.execute(queries.MIGRATION_COLUMNS)}
    if "checksum" not in columns:
        # A file migrated before checksums were recorded: every row reads as unrecorded.
        return {row[0]: None for row in conn.execute("SELECT version FROM schema_migrations")}
    return {row[0]: row[1] for row in conn.execute(queries.SELECT_APPLIED)}


def apply_migrations(conn: sqlite3.Connection, available: Sequence[Migration]) -> list[str]:
    """Apply what the plan says is pending, in order; return the names applied.

    The caller holds the file's exclusive lock, so no other runner interleaves.
    """
    conn.execute(queries.CREATE_MIGRATIONS_TABLE)
    if "checksum" not in {row[0] for row in conn.execute(queries.MIGRATION_COLUMNS)}:
        conn.execute(queries.ADD_CHECKSUM_COLUMN)
    plan = migrations.plan(available, applied_versions(conn))
    with transaction(conn):
        for migration in plan.unrecorded:
            conn.execute(queries.RECORD_CHECKSUM, (migration.checksum, migration.version))
    applied = []
    for migration in plan.pending:
        record = (migration.version, migration.name, migration.checksum)
        if migration.transactional:
            with transaction(conn):
                for statement in statements(migration.sql):
                    conn.execute(statement)
                conn.execute(queries.RECORD_MIGRATION, record)
        else:
            # Autocommit: each statement commits on its own (VACUUM refuses a transaction).
            for statement in migrations.split_statements(migration.sql):
                conn.execute(statement)
            conn.execute(queries.RECORD_MIGRATION, record)
        applied.append(migration.name)
    return applied


def migrate_sqlite(path: Path) -> list[str]:
    """Bring the database at path to the latest schema; return the names of applied migrations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    available = migrations.backend_migrations("sqlite")
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, lock(path))
        conn = connect(path)
        stack.callback(conn.close)
        return apply_migrations(conn, available)


def require_migrated(conn: sqlite3.Connection) -> None:
    """Raise MigrationError unless every packaged migration is applied, unedited."""
    migrations.require_ready(migrations.backend_migrations("sqlite"), applied_versions(conn))


def statements(script: str) -> Iterator[str]:
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
