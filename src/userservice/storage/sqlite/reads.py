"""The SQLite store's reads, run on the reader thread (or inside a write, on the writer's)."""

from __future__ import annotations

import json
import sqlite3

from userservice.domain.model import EventType, Page, User, UserEvent, UserFilter
from userservice.storage.filters import CompiledFilter, Dialect, compile_filter
from userservice.storage.rows import user_from_row
from userservice.storage.sqlite import queries
from userservice.storage.sqlite.connection import transaction

DIALECT = Dialect(
    placeholder=lambda _index: "?",
    contains=lambda column, fragment: f"instr({column}, {fragment}) > 0",
)


def fetch_user(conn: sqlite3.Connection, sql: str, key: str) -> User | None:
    """Run a one-row user query keyed by key."""
    row = conn.execute(sql, (key,)).fetchone()
    return None if row is None else user_from_row(row)


def fetch_users(conn: sqlite3.Connection, user_ids: list[str]) -> list[User]:
    """Return the users among these ids that exist."""
    rows = conn.execute(queries.SELECT_USERS, (json.dumps(user_ids),))
    return [user_from_row(row) for row in rows]


def select_page(
    conn: sqlite3.Connection,
    user_filter: UserFilter,
    after_id: str | None,
    limit: int,
    with_total: bool,
) -> Page:
    """Return one keyset page in id order and, if asked, the count from the same snapshot."""
    limit = max(limit, 0)  # a negative LIMIT would mean "no limit" to SQLite
    compiled = compile_filter(user_filter, DIALECT)
    page = CompiledFilter(list(compiled.conditions), list(compiled.params))
    if after_id is not None:
        page.conditions.append("id > ?")
        page.params.append(after_id)
    page_sql = queries.SELECT_PAGE.format(where=page.where())
    total = 0
    if with_total:
        # One read transaction, so the page and its total come from the same snapshot.
        with transaction(conn, "BEGIN"):
            rows = conn.execute(page_sql, (*page.params, limit + 1)).fetchall()
            count_sql = queries.COUNT_USERS.format(where=compiled.where())
            total = conn.execute(count_sql, compiled.params).fetchone()[0]
    else:
        # A single statement reads one snapshot by itself: no BEGIN and COMMIT around it.
        rows = conn.execute(page_sql, (*page.params, limit + 1)).fetchall()
    return Page([user_from_row(row) for row in rows[:limit]], len(rows) > limit, total)


def select_events(conn: sqlite3.Connection, sequence: int, limit: int) -> list[UserEvent]:
    """Return up to limit events after sequence, ascending."""
    rows = conn.execute(queries.SELECT_EVENTS, (sequence, max(limit, 0)))
    # Counted from the end: the snapshot columns before them may grow.
    return [UserEvent(row[-3], EventType(row[-2]), user_from_row(row), row[-1]) for row in rows]


def event_bounds(conn: sqlite3.Connection) -> tuple[int, int]:
    """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
    oldest, latest = conn.execute(queries.EVENT_BOUNDS).fetchone()
    return (0, 0) if latest is None else (oldest - 1, latest)


def ping(conn: sqlite3.Connection) -> None:
    """Run the trivial query health checks use."""
    conn.execute(queries.PING).fetchall()
