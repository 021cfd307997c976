"""The PostgreSQL store's long-running operations: SQL and the statements that run it."""

from __future__ import annotations

from typing import Final

import asyncpg

from userservice.domain.operations import Operation
from userservice.storage.rows import (
    OPERATION_COLUMNS,
    operation_fields,
    operation_from_row,
    placeholders,
)

# Assembled only from the constant column list (hence the S608 waivers); every value is a
# bound parameter.
INSERT: Final = (
    f"INSERT INTO operations ({OPERATION_COLUMNS})"  # noqa: S608
    f" VALUES ({placeholders(OPERATION_COLUMNS, '$')})"
)
SELECT: Final = f"SELECT {OPERATION_COLUMNS} FROM operations WHERE name = $1"  # noqa: S608
# A NULL parameter leaves its condition out, so one text serves every listing.
LIST: Final = (
    f"SELECT {OPERATION_COLUMNS} FROM operations"  # noqa: S608
    " WHERE ($1::text IS NULL OR owner = $1) AND ($2::boolean IS NULL OR done = $2)"
    " AND name > $3 ORDER BY name LIMIT $4"
)
RENEW: Final = (
    "UPDATE operations SET metadata = $1, lease_expiry_us = $2, update_time_us = $3"  # noqa: S608
    f" WHERE name = $4 AND lease_owner = $5 AND NOT done RETURNING {OPERATION_COLUMNS}"
)
FINISH: Final = (
    "UPDATE operations SET done = true, metadata = $1, result = $2, error = $3,"
    " update_time_us = $4, lease_expiry_us = 0"
    " WHERE name = $5 AND lease_owner = $6 AND NOT done"
)
CANCEL: Final = (
    "UPDATE operations SET cancel_requested = true, update_time_us = $1"
    " WHERE name = $2 AND NOT done"
)
DELETE: Final = "DELETE FROM operations WHERE name = $1 AND done"
# SKIP LOCKED: replicas sweeping at once each take different operations, none waits.
CLAIM: Final = (
    "UPDATE operations SET lease_owner = $1, lease_expiry_us = $2"  # noqa: S608
    " WHERE name IN (SELECT name FROM operations WHERE NOT done AND lease_expiry_us < $3"
    " ORDER BY name LIMIT $4 FOR UPDATE SKIP LOCKED)"
    f" RETURNING {OPERATION_COLUMNS}"
)


async def get(conn: asyncpg.Connection, name: str) -> Operation | None:
    """Return the operation with this name, or None."""
    row = await conn.fetchrow(SELECT, name)
    return None if row is None else operation_from_row(row)


async def list_page(
    conn: asyncpg.Connection, owner: str | None, done: bool | None, after: str | None, limit: int
) -> list[Operation]:
    """Return up to limit operations after after, in name order, as selected."""
    rows = await conn.fetch(LIST, owner, done, after or "", max(limit, 0))
    return [operation_from_row(row) for row in rows]


async def create(conn: asyncpg.Connection, operation: Operation) -> None:
    """Insert an operation."""
    await conn.execute(INSERT, *operation_fields(operation))


async def renew(
    conn: asyncpg.Connection, name: str, owner: str, metadata: str, expiry_us: int, now_us: int
) -> Operation | None:
    """Store progress and the new lease expiry if owner holds the lease."""
    row = await conn.fetchrow(RENEW, metadata, expiry_us, now_us, name, owner)
    return None if row is None else operation_from_row(row)


async def finish(
    conn: asyncpg.Connection,
    name: str,
    owner: str,
    metadata: str,
    result: str | None,
    error: str | None,
    now_us: int,
) -> bool:
    """Mark the operation done if owner holds the lease."""
    status = await conn.execute(FINISH, metadata, result, error, now_us, name, owner)
    return bool(status == "UPDATE 1")


async def cancel(conn: asyncpg.Connection, name: str, now_us: int) -> None:
    """Set cancel_requested unless the operation is done."""
    await conn.execute(CANCEL, now_us, name)


async def delete(conn: asyncpg.Connection, name: str) -> bool:
    """Delete the operation if it is done."""
    return bool(await conn.execute(DELETE, name) == "DELETE 1")


async def claim(
    conn: asyncpg.Connection, owner: str, now_us: int, expiry_us: int, limit: int
) -> list[Operation]:
    """Take over up to limit unfinished operations whose lease expired."""
    rows = await conn.fetch(CLAIM, owner, expiry_us, now_us, limit)
    return [operation_from_row(row) for row in rows]
