"""The SQLite store's long-running operations: SQL and the functions the threads run."""

from __future__ import annotations

import sqlite3
from typing import Final

from userservice.domain.operations import Operation
from userservice.storage.rows import (
    OPERATION_COLUMNS,
    operation_fields,
    operation_from_row,
    placeholders,
)
from userservice.storage.sqlite.writes import WriteTransaction

# Assembled only from the constant column list (hence the S608 waivers); every value is a
# bound parameter.
INSERT: Final = (
    f"INSERT INTO operations ({OPERATION_COLUMNS})"  # noqa: S608
    f" VALUES ({placeholders(OPERATION_COLUMNS)})"
)
SELECT: Final = f"SELECT {OPERATION_COLUMNS} FROM operations WHERE name = ?"  # noqa: S608
# A NULL parameter leaves its condition out, so one text serves every listing.
LIST: Final = (
    f"SELECT {OPERATION_COLUMNS} FROM operations"  # noqa: S608
    " WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR done = ?2) AND name > ?3"
    " ORDER BY name LIMIT ?4"
)
RENEW: Final = (
    f"UPDATE operations SET metadata = ?, lease_expiry_us = ?, update_time_us = ?"  # noqa: S608
    f" WHERE name = ? AND lease_owner = ? AND NOT done RETURNING {OPERATION_COLUMNS}"
)
FINISH: Final = (
    "UPDATE operations SET done = 1, metadata = ?, result = ?, error = ?, update_time_us = ?,"
    " lease_expiry_us = 0 WHERE name = ? AND lease_owner = ? AND NOT done"
)
CANCEL: Final = (
    "UPDATE operations SET cancel_requested = 1, update_time_us = ? WHERE name = ? AND NOT done"
)
DELETE: Final = "DELETE FROM operations WHERE name = ? AND done"
CLAIM: Final = (
    "UPDATE operations SET lease_owner = ?, lease_expiry_us = ?"  # noqa: S608
    " WHERE name IN (SELECT name FROM operations WHERE NOT done AND lease_expiry_us < ?"
    f" ORDER BY name LIMIT ?) RETURNING {OPERATION_COLUMNS}"
)


def get(conn: sqlite3.Connection, name: str) -> Operation | None:
    """Return the operation with this name, or None."""
    row = conn.execute(SELECT, (name,)).fetchone()
    return None if row is None else operation_from_row(row)


def list_page(
    conn: sqlite3.Connection, owner: str | None, done: bool | None, after: str | None, limit: int
) -> list[Operation]:
    """Return up to limit operations after after, in name order, as selected."""
    rows = conn.execute(LIST, (owner, done, after or "", max(limit, 0)))
    return [operation_from_row(row) for row in rows]


def create(writes: WriteTransaction, operation: Operation) -> None:
    """Insert an operation."""
    writes.conn.execute(INSERT, operation_fields(operation))


def renew(
    writes: WriteTransaction, name: str, owner: str, metadata: str, expiry_us: int, now_us: int
) -> Operation | None:
    """Store progress and the new lease expiry if owner holds the lease."""
    row = writes.conn.execute(RENEW, (metadata, expiry_us, now_us, name, owner)).fetchone()
    return None if row is None else operation_from_row(row)


def finish(
    writes: WriteTransaction,
    name: str,
    owner: str,
    metadata: str,
    result: str | None,
    error: str | None,
    now_us: int,
) -> bool:
    """Mark the operation done if owner holds the lease."""
    values = (metadata, result, error, now_us, name, owner)
    return writes.conn.execute(FINISH, values).rowcount == 1


def cancel(writes: WriteTransaction, name: str, now_us: int) -> None:
    """Set cancel_requested unless the operation is done."""
    writes.conn.execute(CANCEL, (now_us, name))


def delete(writes: WriteTransaction, name: str) -> bool:
    """Delete the operation if it is done."""
    return writes.conn.execute(DELETE, (name,)).rowcount == 1


def claim(
    writes: WriteTransaction, owner: str, now_us: int, expiry_us: int, limit: int
) -> list[Operation]:
    """Take over up to limit unfinished operations whose lease expired."""
    rows = writes.conn.execute(CLAIM, (owner, expiry_us, now_us, limit)).fetchall()
    return [operation_from_row(row) for row in rows]
