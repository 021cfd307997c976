"""The users columns both stores name, and the mapping between a row and a domain User.

Every statement that names user columns is built from the lists here, once, when the store's
queries module is imported: a new column is named in this module and in a migration per store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from userservice.domain.model import Role, User, email_key, search_key
from userservice.domain.operations import Operation

# Every user column but the id, in the order user_fields() and user_from_row() rely on, with
# its PostgreSQL type (the batch statements bind one typed array per column). SQL texts
# interpolate only these constants, never a value.
USER_DATA_TYPES: Final = (
    ("email", "text"),
    ("display_name", "text"),
    ("role", "smallint"),
    ("create_time_us", "bigint"),
    ("update_time_us", "bigint"),
    ("revision", "bigint"),
    ("subject", "text"),
)
# The columns of personal data, which a delete erases from the user's earlier events and
# idempotency records: the fields User.erased() clears.
PERSONAL_DATA: Final = ("email", "display_name", "subject")

USER_DATA: Final = ", ".join(name for name, _ in USER_DATA_TYPES)
USER_COLUMNS: Final = f"id, {USER_DATA}"
# The same fields as kept in the event log and the idempotency table, keyed by user_id.
SNAPSHOT_COLUMNS: Final = f"user_id, {USER_DATA}"
# The users table's insert columns: USER_COLUMNS plus the two keys the domain computes
# (the unique email key, the display-name search key), last.
INSERT_TYPES: Final = (
    ("id", "text"),
    *USER_DATA_TYPES,
    ("email_normalized", "text"),
    ("display_name_key", "text"),
)
INSERT_COLUMNS: Final = ", ".join(name for name, _ in INSERT_TYPES)
# Where each personal column's value stands in user_fields().
_PERSONAL_INDEXES: Final = tuple(
    1 + [name for name, _ in USER_DATA_TYPES].index(column) for column in PERSONAL_DATA
)


def placeholders(columns: str, style: str = "?", first: int = 1) -> str:
    """Return one bound-parameter mark per column: `?, ?` for SQLite, `$1, $2` for PostgreSQL."""
    count = len(columns.split(","))
    if style == "?":
        return ", ".join("?" * count)
    return ", ".join(f"${number}" for number in range(first, first + count))


def assignments(columns: Sequence[str], mark: str, first: int) -> str:
    """Return `a = $2, b = $3` (mark "$") or `a = ?2, b = ?3` (mark "?", SQLite's numbered form)."""
    return ", ".join(f"{column} = {mark}{first + index}" for index, column in enumerate(columns))


# Rows whose missing display_name_key one backfill transaction computes (see backfill_keys).
BACKFILL_BATCH: Final = 1_000


def user_fields(user: User) -> tuple[str, str, str, int, int, int, int, str | None]:
    """Return a user's values in USER_COLUMNS (and SNAPSHOT_COLUMNS) order."""
    return (
        user.id,
        user.email,
        user.display_name,
        int(user.role),
        user.create_time_us,
        user.update_time_us,
        user.revision,
        stored_subject(user.subject),
    )


def stored_subject(subject: str) -> str | None:
    """Return the column value of a subject: NULL for none, so the unique index skips it."""
    return subject or None


def insert_fields(user: User) -> tuple[str, str, str, int, int, int, int, str | None, str, str]:
    """Return a user's values in INSERT_COLUMNS order."""
    return (*user_fields(user), email_key(user.email), search_key(user.display_name))


def personal_fields(user: User) -> tuple[Any, ...]:
    """Return a user's values in PERSONAL_DATA order (of an erased user: what erasure writes)."""
    fields = user_fields(user)
    return tuple(fields[index] for index in _PERSONAL_INDEXES)


def backfilled_keys(rows: Sequence[Any]) -> list[tuple[str, str, str]]:
    """Return (search key, id, display name) for rows of (id, display name) lacking a key."""
    return [(search_key(str(name)), str(user_id), str(name)) for user_id, name in rows]


# A role by its stored number: a dict lookup costs a fraction of calling the enum, once
# per row of every page. Any other number is left to the enum, which refuses it as before
# (every role is non-zero, so none reads as missing).
_ROLES: Final = {int(role): role for role in Role}


def user_from_row(row: Sequence[Any]) -> User:
    """Build a User from a row whose first columns are USER_COLUMNS or SNAPSHOT_COLUMNS."""
    return User(
        str(row[0]),
        str(row[1]),
        str(row[2]),
        _ROLES.get(row[3]) or Role(row[3]),
        int(row[4]),
        int(row[5]),
        int(row[6]),
        row[7] or "",
    )


# The operations columns, in the order operation_fields() and operation_from_row() use.
OPERATION_COLUMNS: Final = (
    "name, kind, owner, request, metadata, done, result, error, cancel_requested,"
    " lease_owner, lease_expiry_us, create_time_us, update_time_us"
)


def operation_fields(
    operation: Operation,
) -> tuple[str, str, str, str, str, bool, str | None, str | None, bool, str, int, int, int]:
    """Return an operation's values in OPERATION_COLUMNS order."""
    return (
        operation.name,
        operation.kind,
        operation.owner,
        operation.request,
        operation.metadata,
        operation.done,
        operation.result,
        operation.error,
        operation.cancel_requested,
        operation.lease_owner,
        operation.lease_expiry_us,
        operation.create_time_us,
        operation.update_time_us,
    )


def operation_from_row(row: Sequence[Any]) -> Operation:
    """Build an Operation from a row of OPERATION_COLUMNS."""
    return Operation(
        name=str(row[0]),
        kind=str(row[1]),
        owner=str(row[2]),
        request=str(row[3]),
        metadata=str(row[4]),
        done=bool(row[5]),
        result=None if row[6] is None else str(row[6]),
        error=None if row[7] is None else str(row[7]),
        cancel_requested=bool(row[8]),
        lease_owner=str(row[9]),
        lease_expiry_us=int(row[10]),
        create_time_us=int(row[11]),
        update_time_us=int(row[12]),
    )
