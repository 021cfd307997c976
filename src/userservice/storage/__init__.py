"""Storage backends for the UserRepository protocol, chosen by database URL."""

from __future__ import annotations

import sys
from pathlib import Path

from userservice.domain.errors import StorageUnavailableError
from userservice.domain.repository import UserRepository
from userservice.storage.migrations import MigrationError, SchemaNotReadyError
from userservice.storage.options import StoreOptions
from userservice.storage.sqlite import SqliteLockedError, open_sqlite
from userservice.storage.sqlite.shared import SharedCommits

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


async def open_repository(
    url: str, options: StoreOptions, *, shared: SharedCommits | None = None
) -> UserRepository:
    """Open the store the URL names: sqlite:///relative.db, sqlite:////absolute.db or postgresql://.

    shared is set in a worker of `--workers N` on SQLite (see storage/sqlite/shared.py).
    """
    if is_postgres_url(url):
        # Imported here so a SQLite deployment never loads the PostgreSQL driver.
        from userservice.storage.postgres import open_postgres

        return await open_postgres(url, options)
    return await open_sqlite(
        parse_sqlite_path(url),
        event_retention=options.event_retention,
        migrate=options.migrate_on_start,
        request_id_retention_seconds=options.request_id_retention_seconds,
        shared=shared,
        statement_timeout=options.statement_timeout_seconds,
        synchronous=options.sqlite_synchronous.upper(),
    )


def is_postgres_url(url: str) -> bool:
    """Tell whether the URL names a PostgreSQL database (otherwise it must be SQLite)."""
    return url.startswith(_POSTGRES_PREFIXES)


def is_database_url(url: str) -> bool:
    """Tell whether the URL names a store this service can open (by its scheme alone)."""
    return url.startswith(_SQLITE_PREFIX) or is_postgres_url(url)


def db_system(url: str) -> str:
    """Return the OpenTelemetry db.system.name of the store a database URL opens."""
    return "postgresql" if is_postgres_url(url) else "sqlite"


def parse_sqlite_path(url: str) -> Path:
    """Return the file a sqlite URL names: sqlite:///relative/to/cwd.db, sqlite:////absolute.db."""
    if not url.startswith(_SQLITE_PREFIX):
        scheme = url.partition(":")[0]
        # Only the scheme: a full URL may carry a password.
        raise ValueError(
            f"unsupported database URL scheme {scheme!r}; use sqlite:/// or postgresql://"
        )
    path = url.removeprefix(_SQLITE_PREFIX)
    if not path or "?" in path or path == ":memory:":
        raise ValueError(f"{url!r} does not name a database file")
    return Path(path).absolute()


def storage_failure(error: BaseException) -> str | None:
    """Return one line for a known failure to open or migrate storage, else None (a bug)."""
    if isinstance(error, SchemaNotReadyError):
        return f"schema not ready: {error}"
    if isinstance(error, MigrationError):
        return f"schema migrations: {error}"
    if isinstance(error, StorageUnavailableError | OSError):
        return f"database unreachable: {error}"
    if isinstance(error, SqliteLockedError):
        return f"database locked: {error}"
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(error, asyncpg.PostgresError):
        # SQLSTATE class 28 (authentication) and friends: the server's own message.
        return f"database refused the connection: {error}"
    return None


def migrate(url: str, options: StoreOptions) -> list[str]:
    """Apply pending migrations to the store url names (blocking); return the names applied."""
    if is_postgres_url(url):
        import asyncio

        from userservice.storage.postgres import migrate_postgres

        return asyncio.run(
            migrate_postgres(
                url,
                connect_timeout=options.connect_timeout_seconds,
                lock_timeout=options.migration_lock_timeout_seconds,
            )
        )
    from userservice.storage.sqlite import migrate_sqlite

    return migrate_sqlite(parse_sqlite_path(url))
