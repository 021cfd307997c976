"""The UserRepository contract, run against every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from helpers.users import make_user

from userservice.config import Settings
from userservice.domain.errors import (
    EmailAlreadyExistsError,
    EtagMismatchError,
    RequestIdReusedError,
    StorageUnavailableError,
    UserNotFoundError,
)
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import (
    EventType,
    Role,
    SyncOutcome,
    User,
    UserChanges,
    UserFilter,
)
from userservice.domain.repository import UserRepository
from userservice.server.wiring import open_repository
from userservice.storage import parse_sqlite_path

REQUEST_ID = "0190a7c2-8f4e-7b3a-9c1d-2e3f4a5b6c7d"
# Short enough for real sleeps, long enough that a key just claimed stays live for the test.
SHORT_RETENTION = 0.3
EVERYONE = UserFilter()


@pytest_asyncio.fixture
async def repo(database_url: str) -> AsyncIterator[UserRepository]:
    repository = await open_repository(database_url)
    try:
        yield repository
    finally:
        await repository.close()


async def all_users(repo: UserRepository, user_filter: UserFilter = EVERYONE) -> list[User]:
    page = await repo.list_page(user_filter, None, 1000, with_total=False)
    assert not page.has_more
    return page.users


async def event_count(repo: UserRepository) -> int:
    oldest, latest = await repo.event_bounds()
    return latest - oldest


@contextlib.asynccontextmanager
async def retaining_request_ids(database_url: str, seconds: float) -> AsyncIterator[UserRepository]:
    """Open a repository that remembers request_ids for this long, and close it afterwards."""
    settings = Settings(request_id_retention_seconds=seconds)
    repository = await open_repository(database_url, settings=settings)
    try:
        yield repository
    finally:
        await repository.close()


async def stored_request_ids(database_url: str) -> set[str]:
    """Read the keys in create_requests directly, past the repository."""
    query = "SELECT request_id FROM create_requests"
    if database_url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(parse_sqlite_path(database_url))) as conn:
            return {row[0] for row in conn.execute(query)}
    import asyncpg

    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        return {row[0] for row in await conn.fetch(query)}
    finally:
        await conn.close()


async def insert_expired_request_ids(database_url: str, count: int) -> None:
    """Store count keys first used at the epoch, as a table from before keys expired would."""
    rows = [(f"old-{n}", "fp", new_user_id(), "e", "n", 1, 1, 1, 1, 1, None) for n in range(count)]
    # Columns named: a field added later gets its column's default.
    insert = (
        "INSERT INTO create_requests (request_id, fingerprint, user_id, email, display_name,"
        " role, create_time_us, update_time_us, revision, created_us, subject) VALUES ({})"
    )
    if database_url.startswith("sqlite:"):
        with contextlib.closing(sqlite3.connect(parse_sqlite_path(database_url))) as conn, conn:
            conn.executemany(insert.format(", ".join("?" * 11)), rows)
        return
    import asyncpg

    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        await conn.executemany(insert.format(", ".join(f"${n}" for n in range(1, 12))), rows)
    finally:
        await conn.close()


# -- create and read ----------------------------------------------------------


@pytest.mark.asyncio
async def test_create_then_read_by_id_ids_and_email(repo: UserRepository) -> None:
    ann = await repo.create(make_user("Ann@Example.com"), None, "fp")
    bob = await repo.create(make_user("bob@example.com", "Bob", Role.ADMIN), None, "fp2")

    assert await repo.get(ann.id) == ann
    assert await repo.get(new_user_id()) is None
    assert await repo.get_many([ann.id, bob.id, ann.id, new_user_id()]) == {
        ann.id: ann,
        bob.id: bob,
    }
    assert await repo.get_many([]) == {}
    assert await repo.get_by_email("ANN@example.COM") == ann
    assert await repo.get_by_email("nobody@example.com") is None


@pytest.mark.asyncio
async def test_email_is_unique_without_regard_to_case(repo: UserRepository) -> None:
    stored = await repo.create(make_user("Ann@Example.com"), None, "fp")

    with pytest.raises(EmailAlreadyExistsError):
        await repo.create(make_user("ann@EXAMPLE.com"), None, "fp")

    assert await all_users(repo) == [stored]
    assert stored.email == "Ann@Example.com"


@pytest.mark.asyncio
async def test_concurrent_creates_of_one_email_store_exactly_one(repo: UserRepository) -> None:
    spellings = ["race@example.com", "RACE@example.com", "Race@Example.COM", "race@EXAMPLE.com"]

    results = await asyncio.gather(
        *(repo.create(make_user(spellings[i % 4]), None, "fp") for i in range(20)),
        return_exceptions=True,
    )

    winners = [result for result in results if isinstance(result, User)]
    losers = [result for result in results if isinstance(result, EmailAlreadyExistsError)]
    assert (len(winners), len(losers)) == (1, 19)
    assert await all_users(repo) == winners
    assert await event_count(repo) == 1


@pytest.mark.asyncio
async def test_request_id_replays_the_first_create(repo: UserRepository) -> None:
    first = await repo.create(make_user("ann@example.com"), REQUEST_ID, "fingerprint-a")

    again = await repo.create(make_user("ann@example.com"), REQUEST_ID, "fingerprint-a")
    with pytest.raises(RequestIdReusedError):
        await repo.create(make_user("other@example.com"), REQUEST_ID, "fingerprint-b")

    assert again == first
    assert await all_users(repo) == [first]
    assert await event_count(repo) == 1


@pytest.mark.asyncio
async def test_request_id_replays_the_user_as_created_then(repo: UserRepository) -> None:
    first = await repo.create(make_user(), REQUEST_ID, "fp")
    await repo.update(first.id, UserChanges(display_name="Renamed"), None, now_us())

    assert await repo.create(make_user(), REQUEST_ID, "fp") == first


# -- request_id retention -------------------------------------------------------


@pytest.mark.asyncio
async def test_request_id_replays_the_first_create_within_its_retention(
    database_url: str,
) -> None:
    async with retaining_request_ids(database_url, 1.5) as repo:
        first = await repo.create(make_user("ann@example.com"), REQUEST_ID, "fingerprint-a")
        await asyncio.sleep(SHORT_RETENTION)

        again = await repo.create(make_user("ann@example.com"), REQUEST_ID, "fingerprint-a")
        with pytest.raises(RequestIdReusedError):
            await repo.create(make_user("bob@example.com"), REQUEST_ID, "fingerprint-b")
        users = await all_users(repo)

    assert again == first
    assert users == [first]
    assert await stored_request_ids(database_url) == {REQUEST_ID}


@pytest.mark.asyncio
async def test_an_expired_request_id_is_a_fresh_key(database_url: str) -> None:
    async with retaining_request_ids(database_url, SHORT_RETENTION) as repo:
        first = await repo.create(make_user("ann@example.com"), REQUEST_ID, "fingerprint-a")
        await asyncio.sleep(SHORT_RETENTION + 0.1)

        # The first result is not replayed: the same input is a new create, and its email is taken.
        with pytest.raises(EmailAlreadyExistsError):
            await repo.create(make_user("ann@example.com"), REQUEST_ID, "fingerprint-a")
        # Other input is no reuse of an expired key; the key now belongs to this create.
        second = await repo.create(make_user("bob@example.com"), REQUEST_ID, "fingerprint-b")
        retried = await repo.create(make_user("bob@example.com"), REQUEST_ID, "fingerprint-b")
        with pytest.raises(RequestIdReusedError):
            await repo.create(make_user("carl@example.com"), REQUEST_ID, "fingerprint-a")
        users = await all_users(repo)
        events = await event_count(repo)

    assert (second.email, retried) == ("bob@example.com", second)
    assert sorted(user.id for user in users) == sorted([first.id, second.id])
    assert events == 2


@pytest.mark.asyncio
async def test_concurrent_retries_of_an_expired_request_id_create_one_user(
    database_url: str,
) -> None:
    settings = Settings(request_id_retention_seconds=SHORT_RETENTION)
    replicas = [await open_repository(database_url, settings=settings)]
    try:
        if not database_url.startswith("sqlite:"):
            # SQLite serves one process; PostgreSQL replicas race on one database.
            replicas.append(await open_repository(database_url, settings=settings))
        first = await replicas[0].create(make_user("ann@example.com"), REQUEST_ID, "fp-a")
        await asyncio.sleep(SHORT_RETENTION + 0.1)

        # Each retry is a new candidate with the same email: a second insert would fail.
        results = await asyncio.gather(
            *(
                replicas[n % len(replicas)].create(make_user("bob@example.com"), REQUEST_ID, "fp-b")
                for n in range(10)
            )
        )
        events = await event_count(replicas[0])
    finally:
        for replica in replicas:
            await replica.close()

    assert len({user.id for user in results}) == 1
    assert results[0].id != first.id
    assert events == 2


@pytest.mark.asyncio
async def test_expired_request_ids_are_deleted_as_writes_go_on(database_url: str) -> None:
    keys = [str(uuid.uuid4()) for _ in range(4)]
    async with retaining_request_ids(database_url, SHORT_RETENTION) as repo:
        for n, key in enumerate(keys[:3]):
            await repo.create(make_user(f"user{n}@example.com"), key, "fp")
        assert await stored_request_ids(database_url) == set(keys[:3])
        await asyncio.sleep(SHORT_RETENTION + 0.1)

        await repo.create(make_user("last@example.com"), keys[3], "fp")

        deadline = time.monotonic() + 1
        while (stored := await stored_request_ids(database_url)) != {keys[3]}:
            assert time.monotonic() < deadline, stored
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_backlog_of_expired_request_ids_is_deleted_in_batches(database_url: str) -> None:
    async with retaining_request_ids(database_url, 60) as repo:
        await insert_expired_request_ids(database_url, 2_500)

        deadline = time.monotonic() + 1.5
        n = 0
        while stored := await stored_request_ids(database_url):
            assert time.monotonic() < deadline, len(stored)
            await repo.create(make_user(f"user{n}@example.com"), None, "fp")
            n += 1
            await asyncio.sleep(0.02)


# -- update and delete ----------------------------------------------------------


@pytest.mark.asyncio
async def test_update_applies_changes_and_advances_revision(repo: UserRepository) -> None:
    user = await repo.create(make_user(), None, "fp")
    later = user.update_time_us + 1_000_000

    updated = await repo.update(
        user.id, UserChanges(display_name="Annie", role=Role.EDITOR), user.etag, later
    )

    assert updated == User(
        user.id, user.email, "Annie", Role.EDITOR, user.create_time_us, later, user.revision + 1
    )
    assert updated.etag != user.etag
    assert await repo.get(user.id) == updated


@pytest.mark.asyncio
async def test_update_time_advances_even_when_the_clock_does_not(repo: UserRepository) -> None:
    user = await repo.create(make_user(), None, "fp")

    first = await repo.update(user.id, UserChanges(display_name="B"), None, user.update_time_us)
    second = await repo.update(user.id, UserChanges(display_name="C"), None, 0)

    assert first.update_time_us == user.update_time_us + 1
    assert second.update_time_us == user.update_time_us + 2
    assert len({user.etag, first.etag, second.etag}) == 3


@pytest.mark.asyncio
async def test_update_with_a_stale_etag_changes_nothing(repo: UserRepository) -> None:
    user = await repo.create(make_user(), None, "fp")
    await repo.update(user.id, UserChanges(display_name="New"), user.etag, now_us())
    current = await repo.get(user.id)

    with pytest.raises(EtagMismatchError):
        await repo.update(user.id, UserChanges(display_name="Lost"), user.etag, now_us())

    assert await repo.get(user.id) == current


@pytest.mark.asyncio
async def test_update_of_a_missing_user_fails(repo: UserRepository) -> None:
    with pytest.raises(UserNotFoundError):
        await repo.update(new_user_id(), UserChanges(display_name="X"), None, now_us())


@pytest.mark.asyncio
async def test_update_to_a_taken_email_fails_but_own_case_change_succeeds(
    repo: UserRepository,
) -> None:
    ann = await repo.create(make_user("ann@example.com"), None, "fp")
    await repo.create(make_user("bob@example.com"), None, "fp")

    with pytest.raises(EmailAlreadyExistsError):
        await repo.update(ann.id, UserChanges(email="BOB@example.com"), None, now_us())
    assert await repo.get(ann.id) == ann

    recased = await repo.update(ann.id, UserChanges(email="ANN@example.com"), None, now_us())
    assert recased.email == "ANN@example.com"
    assert await repo.get_by_email("ann@EXAMPLE.com") == recased


@pytest.mark.asyncio
async def test_delete_checks_the_etag_and_logs_the_last_state_erased(
    repo: UserRepository,
) -> None:
    user = await repo.create(make_user(), None, "fp")
    updated = await repo.update(user.id, UserChanges(role=Role.ADMIN), None, now_us())
    _, before = await repo.event_bounds()

    with pytest.raises(EtagMismatchError):
        await repo.delete(user.id, user.etag, now_us())
    assert await repo.get(user.id) == updated

    deleted_at = updated.update_time_us + 5
    await repo.delete(user.id, updated.etag, deleted_at)

    assert await repo.get(user.id) is None
    [event] = await repo.events_after(before, 10)
    assert (event.type, event.user, event.event_time_us) == (
        EventType.DELETED,
        updated.erased(),
        deleted_at,
    )
    with pytest.raises(UserNotFoundError):
        await repo.delete(user.id, None, now_us())


@pytest.mark.asyncio
async def test_a_deleted_users_email_can_be_reused(repo: UserRepository) -> None:
    user = await repo.create(make_user(), None, "fp")
    await repo.delete(user.id, None, now_us())

    again = await repo.create(make_user(), None, "fp")

    assert await repo.get_by_email(user.email) == again


# -- upsert and batches -----------------------------------------------------------


@pytest.mark.asyncio
async def test_upsert_by_email_creates_updates_or_leaves_alone(repo: UserRepository) -> None:
    outcome, created = await repo.upsert_by_email(make_user("Ann@example.com", "Ann"))
    assert outcome == SyncOutcome.CREATED
    _, events_before = await repo.event_bounds()

    same = make_user("ann@EXAMPLE.com", "Ann", at=created.update_time_us + 10)
    assert await repo.upsert_by_email(same) == (SyncOutcome.UNCHANGED, created)
    assert (await repo.event_bounds())[1] == events_before

    change = make_user("ANN@example.com", "Annie", Role.ADMIN, at=created.update_time_us - 10)
    outcome, updated = await repo.upsert_by_email(change)

    assert outcome == SyncOutcome.UPDATED
    assert updated == User(
        created.id,
        "Ann@example.com",
        "Annie",
        Role.ADMIN,
        created.create_time_us,
        created.update_time_us + 1,
        created.revision + 1,
    )
    assert await repo.get(created.id) == updated
    assert len(await all_users(repo)) == 1


@pytest.mark.asyncio
async def test_concurrent_upserts_of_one_email_create_one_user(repo: UserRepository) -> None:
    results = await asyncio.gather(
        *(repo.upsert_by_email(make_user("sync@example.com", f"Name {i}")) for i in range(10))
    )

    assert [outcome for outcome, _ in results].count(SyncOutcome.CREATED) == 1
    assert len({user.id for _, user in results}) == 1
    assert len(await all_users(repo)) == 1


@pytest.mark.asyncio
async def test_create_many_fails_only_the_rows_with_taken_emails(repo: UserRepository) -> None:
    existing = await repo.create(make_user("taken@example.com"), None, "fp")
    batch = [
        make_user("one@example.com"),
        make_user("TAKEN@example.com"),
        make_user("two@example.com"),
        make_user("One@Example.com"),
    ]

    results = await repo.create_many(batch)

    assert results[0] == batch[0]
    assert isinstance(results[1], EmailAlreadyExistsError)
    assert results[2] == batch[2]
    assert isinstance(results[3], EmailAlreadyExistsError)
    assert {user.id for user in await all_users(repo)} == {existing.id, batch[0].id, batch[2].id}
    events = await repo.events_after(0, 10)
    assert [(event.type, event.user) for event in events] == [
        (EventType.CREATED, existing),
        (EventType.CREATED, batch[0]),
        (EventType.CREATED, batch[2]),
    ]
    assert await repo.create_many([]) == []


# -- listing ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_list_page_walks_the_keyset_in_id_order(repo: UserRepository) -> None:
    created = await repo.create_many([make_user(f"user{i}@example.com") for i in range(7)])
    ids = sorted(user.id for user in created if isinstance(user, User))

    seen: list[str] = []
    after: str | None = None
    flags = []
    while True:
        page = await repo.list_page(EVERYONE, after, 3, with_total=True)
        assert page.total_size == 7
        seen += [user.id for user in page.users]
        flags.append(page.has_more)
        if not page.has_more:
            break
        after = page.users[-1].id

    assert seen == ids
    assert flags == [True, True, False]
    untotalled = await repo.list_page(EVERYONE, ids[5], 3, with_total=False)
    assert ([user.id for user in untotalled.users], untotalled.has_more) == ([ids[6]], False)
    assert untotalled.total_size == 0


@pytest.mark.asyncio
async def test_list_page_filters_and_counts_matches_not_the_page(repo: UserRepository) -> None:
    await repo.create_many(
        [
            make_user("alice@corp.example", "Alice Admin", Role.ADMIN),
            make_user("Bob@Corp.Example", "Bob Builder", Role.EDITOR),
            make_user("carol@home.example", "Carol", Role.VIEWER),
            make_user("dave@corp.example", "Dave", Role.VIEWER),
        ]
    )

    async def emails(user_filter: UserFilter) -> list[str]:
        return sorted(user.email for user in await all_users(repo, user_filter))

    assert await emails(UserFilter(role=Role.VIEWER)) == ["carol@home.example", "dave@corp.example"]
    assert await emails(UserFilter(role_not=Role.VIEWER)) == [
        "Bob@Corp.Example",
        "alice@corp.example",
    ]
    assert await emails(UserFilter(email_equals="BOB@corp.example")) == ["Bob@Corp.Example"]
    assert await emails(UserFilter(email_contains="CORP")) == [
        "Bob@Corp.Example",
        "alice@corp.example",
        "dave@corp.example",
    ]
    assert await emails(UserFilter(display_name_contains="bUiLd")) == ["Bob@Corp.Example"]
    assert await emails(UserFilter(email_contains="corp", role_not=Role.ADMIN)) == [
        "Bob@Corp.Example",
        "dave@corp.example",
    ]
    page = await repo.list_page(UserFilter(email_contains="corp"), None, 1, with_total=True)
    assert (len(page.users), page.has_more, page.total_size) == (1, True, 3)


@pytest.mark.asyncio
async def test_contains_filters_treat_like_wildcards_literally(repo: UserRepository) -> None:
    names = ["100% sure", "100 sure", "snake_case", "snakeXcase", "back\\slash", "backslash"]
    await repo.create_many([make_user(f"u{i}@example.com", name) for i, name in enumerate(names)])
    await repo.create(make_user("under_score@example.com"), None, "fp")
    await repo.create(make_user("underXscore@example.com"), None, "fp")

    async def names_containing(fragment: str) -> list[str]:
        matches = await all_users(repo, UserFilter(display_name_contains=fragment))
        return sorted(user.display_name for user in matches)

    assert await names_containing("%") == ["100% sure"]
    assert await names_containing("0%") == ["100% sure"]
    assert await names_containing("_") == ["snake_case"]
    assert await names_containing("\\") == ["back\\slash"]
    matches = await all_users(repo, UserFilter(email_contains="r_s"))
    assert [user.email for user in matches] == ["under_score@example.com"]


# -- the change log -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_events_record_every_change_in_sequence_order(repo: UserRepository) -> None:
    assert await repo.event_bounds() == (0, 0)
    assert await repo.events_after(0, 10) == []

    user = await repo.create(make_user(), None, "fp")
    updated = await repo.update(user.id, UserChanges(display_name="B"), None, now_us())
    await repo.delete(user.id, None, updated.update_time_us + 1)

    events = await repo.events_after(0, 10)
    assert [event.sequence for event in events] == [1, 2, 3]
    # The delete erased the user's personal data from its earlier events too.
    assert [(event.type, event.user) for event in events] == [
        (EventType.CREATED, user.erased()),
        (EventType.UPDATED, updated.erased()),
        (EventType.DELETED, updated.erased()),
    ]
    assert events[0].event_time_us == user.create_time_us
    assert events[1].event_time_us == updated.update_time_us
    assert await repo.event_bounds() == (0, 3)
    assert await repo.events_after(1, 1) == [events[1]]
    assert await repo.events_after(3, 10) == []


@pytest.mark.asyncio
async def test_failed_writes_append_no_events(repo: UserRepository) -> None:
    ann = await repo.create(make_user("ann@example.com"), REQUEST_ID, "fp")
    await repo.create(make_user("bob@example.com"), None, "fp")
    bounds = await repo.event_bounds()

    failures: list[tuple[Callable[[], Awaitable[object]], type[Exception]]] = [
        (lambda: repo.create(make_user("ANN@example.com"), None, "fp"), EmailAlreadyExistsError),
        (lambda: repo.create(make_user(), REQUEST_ID, "other"), RequestIdReusedError),
        (
            lambda: repo.update(ann.id, UserChanges(email="bob@example.com"), None, now_us()),
            EmailAlreadyExistsError,
        ),
        (
            lambda: repo.update(ann.id, UserChanges(display_name="X"), "stale", now_us()),
            EtagMismatchError,
        ),
        (
            lambda: repo.update(new_user_id(), UserChanges(display_name="X"), None, now_us()),
            UserNotFoundError,
        ),
        (lambda: repo.delete(ann.id, "stale", now_us()), EtagMismatchError),
        (lambda: repo.delete(new_user_id(), None, now_us()), UserNotFoundError),
    ]
    for call, error in failures:
        with pytest.raises(error):
            await call()

    assert await repo.event_bounds() == bounds
    assert await repo.get(ann.id) == ann


@pytest.mark.asyncio
async def test_event_retention_drops_the_oldest_events(database_url: str) -> None:
    retention = 5
    repo = await open_repository(database_url, settings=Settings(event_retention=retention))
    try:
        for i in range(4 * retention):
            await repo.create(make_user(f"user{i}@example.com"), None, "fp")

        oldest, latest = await repo.event_bounds()
        events = await repo.events_after(oldest, 100)
    finally:
        await repo.close()

    assert latest == 4 * retention
    assert oldest > 0
    assert latest - oldest <= 2 * retention
    assert [event.sequence for event in events] == list(range(oldest + 1, latest + 1))


@pytest.mark.asyncio
async def test_wait_for_events_wakes_on_a_write(repo: UserRepository) -> None:
    _, latest = await repo.event_bounds()
    waiter = asyncio.create_task(repo.wait_for_events(latest, 10))
    await asyncio.sleep(0.05)
    assert not waiter.done()

    started = time.monotonic()
    await repo.create(make_user(), None, "fp")
    await asyncio.wait_for(waiter, 5)

    assert time.monotonic() - started < 5
    assert len(await repo.events_after(latest, 10)) == 1


@pytest.mark.asyncio
async def test_wait_for_events_times_out_or_returns_at_once(repo: UserRepository) -> None:
    await repo.create(make_user(), None, "fp")

    started = time.monotonic()
    await repo.wait_for_events(0, 10)
    assert time.monotonic() - started < 1

    started = time.monotonic()
    await repo.wait_for_events(1, 0.2)
    assert 0.15 < time.monotonic() - started < 5


# -- lifecycle -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_ping_answers_and_close_is_idempotent(database_url: str) -> None:
    repo = await open_repository(database_url)
    await repo.ping()

    await repo.close()
    await repo.close()

    with pytest.raises(StorageUnavailableError):
        await repo.get(new_user_id())
