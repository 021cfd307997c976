"""The PostgreSQL store's reads, each on a connection lent by the pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from userservice.domain.model import EventType, Page, User, UserEvent, UserFilter
from userservice.storage.filters import Dialect, compile_filter
from userservice.storage.postgres import queries
from userservice.storage.rows import USER_COLUMNS, user_from_row

DIALECT: Final = Dialect(
    placeholder=lambda index: f"${index}",
    contains=lambda column, fragment: f"strpos({column}, {fragment}) > 0",
    role_type="::smallint",
)


async def fetch_user(conn: asyncpg.Connection, sql: str, key: str) -> User | None:
    """Run a one-row user query keyed by key."""
    row = await conn.fetchrow(sql, key)
    return None if row is None else user_from_row(row)


async def fetch_users(conn: asyncpg.Connection, user_ids: Sequence[str]) -> dict[str, User]:
    """Return the users among these ids that exist, keyed by id."""
    users = (user_from_row(row) for row in await conn.fetch(queries.SELECT_USERS, list(user_ids)))
    return {user.id: user for user in users}


async def select_page(
    conn: asyncpg.Connection,
    user_filter: UserFilter,
    after_id: str | None,
    limit: int,
    with_total: bool,
) -> Page:
    """Return one keyset page in id order and, if asked, the count from the same snapshot."""
    compiled = compile_filter(user_filter, DIALECT)
    args = list(compiled.params)
    # Separate texts with and without the keyset bound: a generic plan for
    # "$n IS NULL OR id > $n" could not start its index scan at the bound.
    keyset = []
    if after_id is not None:
        args.append(after_id)
        keyset.append(f"id > ${len(args)}")
    args.append(max(limit, 0) + 1)
    # Only fixed fragments and $n placeholders are interpolated; values travel as arguments.
    page_sql = (
        f"SELECT {USER_COLUMNS} FROM users{compiled.where(*keyset)}"  # noqa: S608
        f" ORDER BY id LIMIT ${len(args)}"
    )
    total = 0
    if with_total:
        count_sql = f"SELECT count(*) FROM users{compiled.where()}"  # noqa: S608
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(page_sql, *args)
            total = int(await conn.fetchval(count_sql, *compiled.params))
    else:
        rows = await conn.fetch(page_sql, *args)
    users = [user_from_row(row) for row in rows[: max(limit, 0)]]
    return Page(users=users, has_more=len(rows) > limit, total_size=total)


async def select_events(conn: asyncpg.Connection, sequence: int, limit: int) -> list[UserEvent]:
    """Return up to limit events after sequence, ascending."""
    rows = await conn.fetch(queries.SELECT_EVENTS, sequence, limit)
    # Counted from the end: the snapshot columns before them may grow.
    return [
        UserEvent(int(row[-3]), EventType(row[-2]), user_from_row(row), int(row[-1]))
        for row in rows
    ]


async def event_bounds(conn: asyncpg.Connection) -> tuple[int, int]:
    """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
    row = await conn.fetchrow(queries.EVENT_BOUNDS)
    if row is None or row[0] is None:
        return 0, 0
    return int(row[0]) - 1, int(row[1])
