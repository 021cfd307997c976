"""Differential test: the same users and filters on SQLite and PostgreSQL give the same rows.

Both stores must answer every filter exactly as the domain's rule (UserFilter.matches) does,
also for text where case folding is hard: non-ASCII letters, ß, Turkish dotted and dotless
i, Greek sigma, combining marks, compatibility forms, and SQL LIKE's wildcards (% _ \\).
Derandomized, a bounded number of examples, one SQLite file and one PostgreSQL database for
the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from helpers.databases import fresh_postgres_database
from hypothesis import given, settings
from hypothesis import strategies as st

from userservice.domain.errors import FieldViolation
from userservice.domain.filtering import format_filter, parse_filter
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import Role, User, UserChanges, UserFilter, email_key, search_key
from userservice.domain.repository import UserRepository
from userservice.domain.validation import check_display_name, check_email
from userservice.server.wiring import open_repository
from userservice.storage.migrations import backend_migrations
from userservice.storage.postgres.migrations import apply_migrations as apply_postgres
from userservice.storage.rows import BACKFILL_BATCH
from userservice.storage.sqlite.connection import connect
from userservice.storage.sqlite.migrations import apply_migrations as apply_sqlite

# Letters whose case folding differs between Python, SQLite's ASCII-only LIKE and a
# database collation's lower(): each is here because some pair of those disagrees on it.
HARD_LETTERS = (
    "aAeEiIkKsSzZ"
    "éÉèÈ\u0301"  # precomposed and a combining acute accent
    "ßẞ"  # sharp s, and its capital
    "İ\u0131iI"  # Turkish dotted and dotless i
    "Σ\u03c3ς\u039f\u0394"  # Greek capital, medial and final sigma; omicron, delta
    "\u212a\u212b"  # Kelvin sign, Angstrom sign (fold to ASCII k, to å)
    "ﬁǅ\u210c"  # a ligature, a title-case digraph, a compatibility capital
)
NAME_ALPHABET = HARD_LETTERS + " %_\\-"
EMAIL_LOCAL_ALPHABET = "aAeEkKéÉßİ\u0131Σς\u212a%_-"
EMAIL_DOMAINS = ("example.com", "Example.ORG", "exämple.de")
# A run in CI; USERSERVICE_DIFFERENTIAL_EXAMPLES=5000 (say) searches longer on demand.
EXAMPLES = int(os.environ.get("USERSERVICE_DIFFERENTIAL_EXAMPLES", "100"))


T = TypeVar("T")
Check = Callable[[str, str, list[FieldViolation]], str]


def _valid(check: Check, value: str) -> str | None:
    """The value as the service would store it, or None when validation refuses it."""
    violations: list[FieldViolation] = []
    result = check(value, "field", violations)
    return None if violations else result


display_names = (
    st.text(NAME_ALPHABET, min_size=1, max_size=12)
    .map(lambda name: _valid(check_display_name, name))
    .filter(lambda name: name is not None)
)
emails = (
    st.tuples(st.text(EMAIL_LOCAL_ALPHABET, min_size=1, max_size=8), st.sampled_from(EMAIL_DOMAINS))
    .map(lambda parts: _valid(check_email, f"{parts[0]}@{parts[1]}"))
    .filter(lambda email: email is not None)
)
user_fields = st.lists(
    st.tuples(emails, display_names, st.sampled_from(Role)),
    max_size=10,
    unique_by=lambda fields: email_key(str(fields[0])),
)


@st.composite
def _fragment(draw: st.DrawFn, sources: list[str]) -> str:
    """Part of a stored value (so filters match), in a random case, or free text."""
    from_source = draw(st.booleans())
    if sources and from_source:
        source = draw(st.sampled_from(sources))
        start = draw(st.integers(0, len(source)))
        end = draw(st.integers(start, len(source)))
        part = source[start:end]
        return draw(st.sampled_from([part, part.upper(), part.lower(), part.swapcase()]))
    return draw(st.text(NAME_ALPHABET, max_size=4))


def _sometimes(strategy: st.SearchStrategy[T], percent: int) -> st.SearchStrategy[T | None]:
    """The strategy's value in about percent% of draws, else None (the term left out)."""
    return st.integers(1, 100).flatmap(lambda n: strategy if n <= percent else st.none())


@st.composite
def _filter_text(draw: st.DrawFn, users: list[User]) -> str:
    """Filter-language text: a random UserFilter written out by the domain's formatter."""
    names = [user.display_name for user in users]
    addresses = [user.email for user in users]
    user_filter = UserFilter(
        role=draw(_sometimes(st.sampled_from(Role), 15)),
        role_not=draw(_sometimes(st.sampled_from(Role), 15)),
        email_equals=draw(_sometimes(st.sampled_from(addresses or ["x@example.com"]), 10)),
        email_contains=draw(_sometimes(_fragment(addresses), 35)),
        display_name_contains=draw(_sometimes(_fragment(names), 75)),
    )
    return format_filter(user_filter)


class Stores:
    """Both stores, opened once for the run; each example replaces the users they hold."""

    def __init__(self, sqlite: UserRepository, postgres: UserRepository) -> None:
        """Hold an open repository of each kind."""
        self.sqlite = sqlite
        self.postgres = postgres
        self.ids: list[str] = []

    async def replace_users(self, users: list[User]) -> None:
        """Delete what the previous example stored, then store users in both."""
        for repository in (self.sqlite, self.postgres):
            for user_id in self.ids:
                await repository.delete(user_id, None, now_us())
            results = await repository.create_many(users)
            assert results == users
        self.ids = [user.id for user in users]

    async def rename(self, user: User, name: str, by_upsert: bool) -> User:
        """Give user a new display name in both, by UpdateUser's or SyncUsers' write."""
        renamed = replace(user, display_name=name)
        for repository in (self.sqlite, self.postgres):
            if by_upsert:
                candidate = replace(renamed, id=new_user_id(), update_time_us=now_us())
                await repository.upsert_by_email(candidate)
            else:
                await repository.update(user.id, UserChanges(display_name=name), None, now_us())
        return renamed


async def _all_ids(repository: UserRepository, user_filter: UserFilter, limit: int) -> list[str]:
    """Page through every match; the first page's total must equal the number of matches."""
    ids: list[str] = []
    after: str | None = None
    total = -1
    while True:
        page = await repository.list_page(user_filter, after, limit, with_total=after is None)
        total = page.total_size if after is None else total
        ids.extend(user.id for user in page.users)
        if not page.has_more:
            break
        after = page.users[-1].id
    assert total == len(ids)
    return ids


@contextlib.contextmanager
def _both_stores(tmp_path: Path) -> Iterator[tuple[asyncio.Runner, Stores]]:
    with asyncio.Runner() as runner, contextlib.ExitStack() as stack:
        postgres_url = runner.run(_enter(stack, runner, fresh_postgres_database()))
        sqlite = runner.run(open_repository(f"sqlite:///{tmp_path / 'differential.db'}"))
        stack.callback(lambda: runner.run(sqlite.close()))
        postgres = runner.run(open_repository(postgres_url))
        stack.callback(lambda: runner.run(postgres.close()))
        yield runner, Stores(sqlite, postgres)


async def _enter(
    stack: contextlib.ExitStack,
    runner: asyncio.Runner,
    manager: contextlib.AbstractAsyncContextManager[str],
) -> str:
    value = await manager.__aenter__()
    stack.callback(lambda: runner.run(manager.__aexit__(None, None, None)))
    return value


def test_sqlite_postgres_and_the_domain_rule_agree(tmp_path: Path) -> None:
    """Random users and filters: both stores return exactly the rows UserFilter.matches keeps."""
    with _both_stores(tmp_path) as (runner, stores):

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
        @given(data=st.data(), fields=user_fields, limit=st.integers(1, 4))
        def check(data: st.DataObject, fields: list[tuple[str, str, Role]], limit: int) -> None:
            now = now_us()
            users = sorted(
                (
                    User(new_user_id(), email, name, role, now, now, 1)
                    for email, name, role in fields
                ),
                key=lambda user: user.id,
            )
            runner.run(stores.replace_users(users))
            # Updates and upserts write the key too, not only inserts.
            renames = st.tuples(st.integers(0, len(users) - 1), display_names, st.booleans())
            for index, name, by_upsert in data.draw(
                st.lists(renames, max_size=3) if users else st.just([])
            ):
                users[index] = runner.run(stores.rename(users[index], str(name), by_upsert))
            for _ in range(3):
                user_filter = parse_filter(data.draw(_filter_text(users), label="filter"))
                expected = [user.id for user in users if user_filter.matches(user)]
                on_sqlite = runner.run(_all_ids(stores.sqlite, user_filter, limit))
                on_postgres = runner.run(_all_ids(stores.postgres, user_filter, limit))
                assert on_sqlite == expected, "SQLite differs from the domain rule"
                assert on_postgres == expected, "PostgreSQL differs from the domain rule"

        check()


OLD_INSERT = (
    "INSERT INTO users (id, email, email_normalized, display_name, role,"
    " create_time_us, update_time_us, revision) VALUES ({})"
)


async def _store_with_pre_0002_rows(url: str, users: list[User]) -> None:
    """Migrate url to 0001 only and insert users as code of that schema did (no key)."""
    rows = [(u.id, u.email, u.email.lower(), u.display_name, int(u.role), 1, 1, 1) for u in users]
    if url.startswith("sqlite:///"):
        conn = connect(Path(url.removeprefix("sqlite:///")))
        try:
            apply_sqlite(conn, backend_migrations("sqlite")[:1])
            with conn:
                conn.execute("BEGIN")
                conn.executemany(OLD_INSERT.format(", ".join("?" * 8)), rows)
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await apply_postgres(pg, backend_migrations("postgres")[:1])
        await pg.executemany(OLD_INSERT.format(", ".join(f"${n}" for n in range(1, 9))), rows)
    finally:
        await pg.close()


@pytest.mark.asyncio
@pytest.mark.upgrades_across("0002_display_name_key")
async def test_rows_from_before_the_key_column_are_keyed_at_open(database_url: str) -> None:
    """Open migrates to 0002 and keys old rows (several batches): filters then match them."""
    names = ["ΟΔΟΣ", "Straße", "İstanbul", "Ångström", "e\u0301te", "50%_off\\", "plain"]
    users = [
        User(
            new_user_id(), f"u{index}@example.com", names[index % len(names)], Role.VIEWER, 1, 1, 1
        )
        for index in range(2 * BACKFILL_BATCH + 7)
    ]
    await _store_with_pre_0002_rows(database_url, users)
    repository = await open_repository(database_url)
    try:
        for fragment in ("ς", "STRASSE", "i\u0307st", "\u212bng", "ét", "%_", "PLAIN", "zzz"):
            user_filter = UserFilter(display_name_contains=fragment.lower())
            expected = sorted(user.id for user in users if user_filter.matches(user))
            assert await _all_ids(repository, user_filter, 500) == expected, fragment
    finally:
        await repository.close()


def test_folding_examples() -> None:
    """The domain rule's folding, on the cases the generated text exists to reach."""
    assert search_key("STRASSE") == search_key("straße") == search_key("STRAẞE")
    assert search_key("\u03c3") in search_key("ΟΔΟΣ")  # a final sigma folds like any sigma
    assert search_key("e\u0301") == search_key("é") == search_key("É")  # composed or not
    assert search_key("\u212a") == "k"
    assert search_key("ﬁ") == "fi"
    assert search_key("\u210c") == "h"
    assert search_key("%_\\") == "%_\\"
