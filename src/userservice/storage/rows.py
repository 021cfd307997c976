"""The users columns both stores select, and the mapping between a row and a domain User."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from userservice.domain.model import Role, User, email_key, search_key

# The order user_fields() and user_from_row() rely on; SQL texts interpolate only these
# constants, never a value.
USER_DATA: Final = "email, display_name, role, create_time_us, update_time_us, revision, subject"
USER_COLUMNS: Final = f"id, {USER_DATA}"
# The same fields as kept in the event log and the idempotency table, keyed by user_id.
SNAPSHOT_COLUMNS: Final = f"user_id, {USER_DATA}"
# The users table's insert columns: USER_COLUMNS plus the two keys the domain computes
# (the unique email key, the display-name search key), last.
INSERT_COLUMNS: Final = f"{USER_COLUMNS}, email_normalized, display_name_key"


def placeholders(columns: str, style: str = "?", first: int = 1) -> str:
    """Return one bound-parameter mark per column: `?, ?` for SQLite, `$1, $2` for PostgreSQL."""
    count = len(columns.split(","))
    if style == "?":
        return ", ".join("?" * count)
    return ", ".join(f"${number}" for number in range(first, first + count))


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


def backfilled_keys(rows: Sequence[Any]) -> list[tuple[str, str, str]]:
    """Return (search key, id, display name) for rows of (id, display name) lacking a key."""
    return [(search_key(str(name)), str(user_id), str(name)) for user_id, name in rows]


# A role by its stored number: a dict lookup costs a fraction of calling the enum, once
# per row of every page. Any other number is left to the enum, which refuses it as before
# (every role is non-zero, so none reads as missing).
_ROLES: Final = {int(role): role for role in Role}


def user_from_row(row: Sequence[Any]) -> User:
    """Build a User from a row whose first eight columns are USER_COLUMNS or SNAPSHOT_COLUMNS."""
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
