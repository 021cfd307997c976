"""Runs the shared migration plan on PostgreSQL under an advisory lock, with a lock_timeout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import asyncpg

from userservice.domain.errors import StorageUnavailableError
from userservice.storage import migrations
from userservice.storage.migrations import Migration, MigrationError, SchemaNotReadyError
from userservice.storage.postgres import queries
from userservice.storage.postgres.connection import UNAVAILABLE_ERRORS, close_connection

# "usersvc1": the session advisory lock that serialises migration runs.
__all__ = ["SchemaNotReadyError", "apply_migrations", "migrate_postgres", "require_migrated"]

MIGRATION_LOCK_KEY: Final = 0x7573_6572_7376_6331
DEFAULT_LOCK_TIMEOUT_SECONDS: Final = 10.0

_log = logging.getLogger(__name__)


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str | None]:
    """Return the recorded versions and checksums; {} before the first migration."""
    try:
        rows = await conn.fetch(queries.SELECT_APPLIED)
    except asyncpg.UndefinedTableError:
        return {}
    except asyncpg.UndefinedColumnError:
        # Migrated before checksums were recorded: every row reads as unrecorded.
        rows = await conn.fetch("SELECT version, NULL AS checksum FROM schema_migrations")
    return {int(row[0]): row[1] for row in rows}


async def require_migrated(conn: asyncpg.Connection) -> None:
    """Raise SchemaNotReadyError or MigrationError unless every migration is applied, unedited."""
    migrations.require_ready(
        migrations.backend_migrations("postgres"), await applied_versions(conn)
    )


async def apply_migrations(
    conn: asyncpg.Connection,
    available: Sequence[Migration],
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
) -> list[str]:
    """Apply the pending migrations in order under the advisory lock; return their names."""
    # Held for the whole run: a second replica waits here, then finds nothing to do.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        # Set after the advisory lock, which may rightly wait for another runner: a
        # migration that cannot take its table lock fails fast instead of queueing every
        # query behind its ACCESS EXCLUSIVE request.
        await conn.execute(f"SET lock_timeout = {max(1, round(lock_timeout * 1000))}")
        await conn.execute(queries.CREATE_MIGRATIONS_TABLE)
        await conn.execute(queries.ADD_CHECKSUM_COLUMN)
        plan = migrations.plan(available, await applied_versions(conn))
        for migration in plan.unrecorded:
            await conn.execute(queries.RECORD_CHECKSUM, migration.checksum, migration.version)
        applied: list[str] = []
        for migration in plan.pending:
            try:
                await _apply(conn, migration)
            except asyncpg.exceptions.LockNotAvailableError as error:
                raise MigrationError(
                    f"migration {migration.name} could not take a lock within "
                    f"{lock_timeout:g}s (lock_timeout): another session holds one on its "
                    "table; nothing of it was applied, retry when that session is done"
                    if migration.transactional
                    else f"migration {migration.name} could not take a lock within "
                    f"{lock_timeout:g}s; it is not transactional, so check what it left"
                ) from error
            _log.info("applied migration", extra={"migration": migration.name})
            applied.append(migration.name)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("RESET lock_timeout")
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    record = (migration.version, migration.name, migration.checksum)
    if migration.transactional:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(queries.RECORD_MIGRATION, *record)
        return
    # One statement per query: a multi-statement query is an implicit transaction, which
    # CREATE INDEX CONCURRENTLY refuses.
    for statement in migrations.split_statements(migration.sql):
        await conn.execute(statement)
    await conn.execute(queries.RECORD_MIGRATION, *record)


async def migrate_postgres(
    url: str,
    *,
    connect_timeout: float = 5.0,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
) -> list[str]:
    """Connect, apply pending migrations under an advisory lock; return the names applied."""
    available = migrations.backend_migrations("postgres")
    try:
        conn = await asyncpg.connect(
            url,
            timeout=connect_timeout,
            server_settings={"application_name": "userservice-migrate"},
        )
    except UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError(f"cannot reach PostgreSQL to migrate: {error}") from error
    try:
        return await apply_migrations(conn, available, lock_timeout=lock_timeout)
    except UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError(f"PostgreSQL failed during migration: {error}") from error
    finally:
        await close_connection(conn, connect_timeout)
