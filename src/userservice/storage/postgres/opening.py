"""Opening a PostgreSQL store: migrated if asked, a pool connected, the event listener started."""

from __future__ import annotations

import asyncpg

from userservice.domain.errors import StorageUnavailableError
from userservice.storage.maintenance import ExpirySchedule
from userservice.storage.options import StoreOptions
from userservice.storage.postgres.connection import UNAVAILABLE_ERRORS, ConnectOptions
from userservice.storage.postgres.migrations import migrate_postgres
from userservice.storage.postgres.repository import PostgresUserRepository


async def open_postgres(url: str, options: StoreOptions) -> PostgresUserRepository:
    """Connect a pool (migrating first if options say so) and start the event listener."""
    if options.migrate_on_start:
        await migrate_postgres(
            url,
            connect_timeout=options.connect_timeout_seconds,
            lock_timeout=options.migration_lock_timeout_seconds,
        )
    connect = ConnectOptions(options.connect_timeout_seconds, options.statement_timeout_seconds)
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=options.pool_min_size,
            max_size=options.pool_max_size,
            max_inactive_connection_lifetime=300.0,
            **connect.connect_kwargs("userservice"),
        )
    except UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError(f"cannot reach PostgreSQL: {error}") from error
    repository = PostgresUserRepository(
        pool,
        url=url,
        options=connect,
        event_retention=options.event_retention,
        expiry=ExpirySchedule(options.request_id_retention_seconds),
    )
    try:
        await repository._start()
    except BaseException:
        await repository.close()
        raise
    return repository
