"""Who may write which user, through the real server on both stores.

users.admin may do anything; users.write alone is self-service on the user whose subject is the
token's sub. The `client` fixture's token has every scope (an admin, subject "tester").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from helpers.servers import Client, connect, make_settings, rich_details, running_app
from helpers.tokens import bearer
from helpers.users import new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.domain.ids import new_user_id, now_us
from userservice.storage import parse_sqlite_path
from userservice.storage.migrations import backend_migrations
from userservice.storage.postgres import migrations as postgres_migrations
from userservice.storage.sqlite import migrations as sqlite_migrations

WRITER = ("users.read", "users.write")
Metadata = tuple[tuple[str, str], ...]


def as_subject(subject: str, scopes: Sequence[str] = WRITER) -> Metadata:
    """Return call metadata for a token of subject with scopes (by default users.write)."""
    return (("authorization", bearer(scopes, subject)),)


def owned(email: str, subject: str = "", role: int = 0) -> user_pb2.User:
    """Return a User message to create with a subject."""
    user = new_user(email, role=role)
    user.subject = subject
    return user


async def create(
    client: Client, user: user_pb2.User, metadata: Metadata, request_id: str = ""
) -> user_pb2.User:
    """Create user as the caller metadata names."""
    request = pb.CreateUserRequest(user=user, request_id=request_id)
    return (await client.stub.CreateUser(request, metadata=metadata)).user


async def update(
    client: Client, user: user_pb2.User, paths: Sequence[str], metadata: Metadata
) -> user_pb2.User:
    """Apply a masked update as the caller metadata names."""
    request = pb.UpdateUserRequest(user=user, update_mask=field_mask_pb2.FieldMask(paths=paths))
    return (await client.stub.UpdateUser(request, metadata=metadata)).user


async def get(client: Client, user_id: str) -> user_pb2.User:
    """Read a user back as the admin."""
    response = await client.stub.GetUser(pb.GetUserRequest(id=user_id), metadata=client.metadata)
    return response.user


async def all_users(client: Client) -> list[user_pb2.User]:
    """Return every stored user, read as the admin."""
    page = await client.stub.ListUsers(pb.ListUsersRequest(page_size=100), metadata=client.metadata)
    return list(page.users)


def refused(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    """Assert the status and ErrorInfo reason of a refusal; return its ErrorInfo metadata."""
    assert error.code() == code, error
    info = rich_details(error)["ErrorInfo"]
    assert (info.domain, info.reason) == ("userservice", reason)
    return dict(info.metadata)


@pytest.mark.asyncio
async def test_a_write_caller_creates_its_own_user_with_the_tokens_subject(client: Client) -> None:
    alice = as_subject("alice")
    created = await create(client, new_user("alice@example.com"), alice)
    assert (created.subject, created.role) == ("alice", user_pb2.USER_ROLE_VIEWER)
    assert await get(client, created.id) == created
    # Naming its own subject and the default role is the same request.
    bob = await create(
        client, owned("bob@example.com", "bob", user_pb2.USER_ROLE_VIEWER), as_subject("bob")
    )
    assert (bob.subject, bob.role) == ("bob", user_pb2.USER_ROLE_VIEWER)


@pytest.mark.asyncio
async def test_a_second_user_for_one_subject_is_already_exists(client: Client) -> None:
    first = await create(client, new_user("alice@example.com"), as_subject("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(client, new_user("alice2@example.com"), as_subject("alice"))
    refused(caught.value, grpc.StatusCode.ALREADY_EXISTS, "SUBJECT_ALREADY_EXISTS")
    # An admin cannot give the subject a second user either.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(client, owned("other@example.com", "alice"), client.metadata)
    refused(caught.value, grpc.StatusCode.ALREADY_EXISTS, "SUBJECT_ALREADY_EXISTS")
    assert await all_users(client) == [first]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("user", "field"),
    [
        (owned("a@example.com", "bob"), "user.subject"),
        (owned("a@example.com", role=user_pb2.USER_ROLE_EDITOR), "user.role"),
        (owned("a@example.com", role=user_pb2.USER_ROLE_ADMIN), "user.role"),
    ],
    ids=["another-subject", "editor", "admin"],
)
async def test_a_write_caller_cannot_set_role_or_another_subject_on_create(
    client: Client, user: user_pb2.User, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(client, user, as_subject("alice"), request_id=str(uuid.uuid4()))
    metadata = refused(caught.value, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ONLY_FIELD")
    assert metadata == {"field": field}
    assert await all_users(client) == []


@pytest.mark.asyncio
async def test_a_write_caller_updates_and_deletes_its_own_user(client: Client) -> None:
    alice = as_subject("alice")
    mine = await create(client, new_user("alice@example.com"), alice)
    renamed = await update(
        client,
        user_pb2.User(id=mine.id, email="ALICE@example.org", display_name="Alice"),
        ["email", "display_name"],
        alice,
    )
    assert (renamed.email, renamed.display_name) == ("ALICE@example.org", "Alice")
    # Read, change, write the whole message back: role and subject keep their values.
    whole = await get(client, mine.id)
    whole.display_name = "Alice L."
    replaced = await update(client, whole, ["*"], alice)
    assert (replaced.display_name, replaced.subject) == ("Alice L.", "alice")
    whole = await get(client, mine.id)
    whole.display_name = "Alice M."
    last = await update(client, whole, [], alice)
    assert last.display_name == "Alice M."
    await client.stub.DeleteUser(pb.DeleteUserRequest(id=mine.id, etag=last.etag), metadata=alice)
    assert await all_users(client) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("paths", "fields", "field"),
    [
        (["role"], {"role": user_pb2.USER_ROLE_ADMIN}, "user.role"),
        (["display_name", "role"], {"display_name": "X", "role": 2}, "user.role"),
        (["subject"], {"subject": "mallory"}, "user.subject"),
        (["subject"], {"subject": ""}, "user.subject"),
        (["*"], {"role": user_pb2.USER_ROLE_ADMIN}, "user.role"),
        (["*"], {"subject": ""}, "user.subject"),
        ([], {"role": user_pb2.USER_ROLE_EDITOR}, "user.role"),
        ([], {"subject": "mallory"}, "user.subject"),
    ],
    ids=[
        "role",
        "name-and-role",
        "subject",
        "clear-subject",
        "star-role",
        "star-clears-subject",
        "empty-mask-role",
        "empty-mask-subject",
    ],
)
async def test_a_write_caller_cannot_change_role_or_subject_of_its_own_user(
    client: Client, paths: list[str], fields: dict[str, object], field: str
) -> None:
    alice = as_subject("alice")
    mine = await create(client, new_user("alice@example.com"), alice)
    sent = user_pb2.User()
    sent.CopyFrom(mine)
    for name, value in fields.items():
        setattr(sent, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(client, sent, paths, alice)
    metadata = refused(caught.value, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ONLY_FIELD")
    assert metadata == {"field": field}
    assert await get(client, mine.id) == mine


def probe_answer(error: grpc.aio.AioRpcError, user_id: str) -> tuple[object, ...]:
    """Return everything a refusal tells the caller, with the id it echoes masked."""
    details = rich_details(error)
    info = details.pop("ErrorInfo")
    return (
        error.code(),
        (error.details() or "").replace(user_id, "<id>"),
        info.reason,
        tuple(sorted(info.metadata.items())),
        tuple(sorted(details)),
    )


@pytest.mark.asyncio
async def test_someone_elses_user_and_a_missing_one_are_refused_alike(client: Client) -> None:
    alice = as_subject("alice")
    await create(client, new_user("alice@example.com"), alice)
    bobs = await create(client, new_user("bob@example.com"), as_subject("bob"))
    nobodys = await create(client, new_user("nobody@example.com"), client.metadata)
    assert nobodys.subject == ""
    missing = str(uuid.uuid4())
    answers = set()
    for user_id, etag in [
        (bobs.id, ""),
        (bobs.id, "stale-etag"),
        (bobs.id, bobs.etag),
        (nobodys.id, ""),
        (missing, ""),
        (missing, "stale-etag"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await update(
                client,
                user_pb2.User(id=user_id, display_name="Mine now", etag=etag),
                ["display_name"],
                alice,
            )
        answers.add(probe_answer(caught.value, user_id))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.DeleteUser(
                pb.DeleteUserRequest(id=user_id, etag=etag), metadata=alice
            )
        answers.add(probe_answer(caught.value, user_id))
    assert answers == {
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "user '<id>' is not the caller's own user, or does not exist",
            "NOT_OWNER",
            (),
            (),
        )
    }
    assert await get(client, bobs.id) == bobs
    assert await get(client, nobodys.id) == nobodys


@pytest.mark.asyncio
async def test_an_admin_may_set_subject_and_role_on_any_user(client: Client) -> None:
    carol = await create(
        client, owned("carol@example.com", "carol", user_pb2.USER_ROLE_ADMIN), client.metadata
    )
    assert (carol.subject, carol.role) == ("carol", user_pb2.USER_ROLE_ADMIN)
    moved = await update(
        client,
        user_pb2.User(id=carol.id, subject="dave", role=user_pb2.USER_ROLE_EDITOR),
        ["subject", "role"],
        client.metadata,
    )
    assert (moved.subject, moved.role) == ("dave", user_pb2.USER_ROLE_EDITOR)
    # "*" replaces every field: an empty subject leaves the user to no one.
    cleared = await update(
        client,
        user_pb2.User(
            id=carol.id, email=moved.email, display_name="C", role=user_pb2.USER_ROLE_VIEWER
        ),
        ["*"],
        client.metadata,
    )
    assert cleared.subject == ""
    # An admin's own token subject plays no part: it may write a user it does not own.
    owned_by_dave = await create(client, new_user("dave@example.com"), as_subject("dave"))
    await client.stub.DeleteUser(
        pb.DeleteUserRequest(id=owned_by_dave.id), metadata=client.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.DeleteUser(
            pb.DeleteUserRequest(id=str(uuid.uuid4())), metadata=client.metadata
        )
    refused(caught.value, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    # A write caller's token with users.admin too is an admin.
    admin_alice = as_subject("alice", ("users.write", "users.admin"))
    made = await create(client, owned("x@example.com", "zed", 3), admin_alice)
    assert (made.subject, made.role) == ("zed", user_pb2.USER_ROLE_ADMIN)


@pytest.mark.asyncio
async def test_the_owner_changes_with_the_subject(client: Client) -> None:
    alice = as_subject("alice")
    mine = await create(client, new_user("alice@example.com"), alice)
    await update(client, user_pb2.User(id=mine.id, subject="alice-2"), ["subject"], client.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(client, user_pb2.User(id=mine.id, display_name="Still mine?"), [], alice)
    refused(caught.value, grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER")
    renamed = await update(
        client, user_pb2.User(id=mine.id, display_name="Alice 2"), [], as_subject("alice-2")
    )
    assert (renamed.display_name, renamed.subject) == ("Alice 2", "alice-2")
    # The old subject has no user now, so it may create one again.
    again = await create(client, new_user("alice-again@example.com"), alice)
    assert again.subject == "alice"


async def events_from_start(client: Client, count: int) -> AsyncIterator[pb.WatchUsersResponse]:
    """Yield the first count events of the log."""
    call = client.stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata)
    seen = 0
    try:
        async for response in call:
            if response.HasField("progress"):
                continue
            yield response
            seen += 1
            if seen == count:
                return
    finally:
        call.cancel()


@pytest.mark.asyncio
async def test_an_update_racing_a_reassignment_is_checked_against_the_row_it_writes(
    client: Client,
) -> None:
    alice = as_subject("alice")
    mine = await create(client, new_user("alice@example.com"), alice)
    rounds = 20
    owner_updates = 0
    for round_ in range(rounds):
        new_owner, old_owner = ("bob", "alice") if round_ % 2 == 0 else ("alice", "bob")
        results = await asyncio.gather(
            update(
                client,
                user_pb2.User(id=mine.id, display_name=f"round {round_}"),
                ["display_name"],
                as_subject(old_owner),
            ),
            update(
                client, user_pb2.User(id=mine.id, subject=new_owner), ["subject"], client.metadata
            ),
            return_exceptions=True,
        )
        written, moved = results
        assert isinstance(moved, user_pb2.User), moved
        if isinstance(written, user_pb2.User):
            owner_updates += 1
        else:
            assert isinstance(written, grpc.aio.AioRpcError)
            refused(written, grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER")
    # Every update the old owner got through was applied while it still owned the user: the
    # event of each display-name change carries the subject that was checked.
    events = [event async for event in events_from_start(client, 1 + rounds + owner_updates)]
    assert events[0].user.subject == "alice"
    renames = [
        event
        for before, event in itertools.pairwise(events)
        if event.user.display_name != before.user.display_name
    ]
    assert len(renames) == owner_updates
    for event in renames:
        round_ = int(event.user.display_name.split()[1])
        assert event.user.subject == ("alice" if round_ % 2 == 0 else "bob"), event


@pytest.mark.asyncio
async def test_a_retried_create_keeps_its_subject_and_another_caller_cannot_replay_it(
    client: Client,
) -> None:
    key = str(uuid.uuid4())
    first = await create(client, new_user("alice@example.com"), as_subject("alice"), key)
    again = await create(client, new_user("alice@example.com"), as_subject("alice"), key)
    assert again == first
    assert again.subject == "alice"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(client, new_user("alice@example.com"), as_subject("bob"), key)
    refused(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert await all_users(client) == [first]


@pytest.mark.asyncio
async def test_import_and_sync_store_subjects_and_keep_them_unique(client: Client) -> None:
    taken = await create(client, new_user("taken@example.com"), as_subject("taken"))

    async def rows() -> AsyncIterator[pb.ImportUsersRequest]:
        for user in [
            owned("one@example.com", "one"),
            owned("dup@example.com", "one"),
            owned("two@example.com", "taken"),
            owned("three@example.com"),
        ]:
            yield pb.ImportUsersRequest(user=user)

    result = await client.stub.ImportUsers(rows(), metadata=client.metadata)
    assert (result.created_count, result.rejected_count) == (2, 2)
    assert [(r.index, r.status.code) for r in result.rejections] == [
        (1, grpc.StatusCode.ALREADY_EXISTS.value[0]),
        (2, grpc.StatusCode.ALREADY_EXISTS.value[0]),
    ]
    assert {user.email: user.subject for user in await all_users(client)} == {
        "taken@example.com": "taken",
        "one@example.com": "one",
        "three@example.com": "",
    }

    async def syncs() -> AsyncIterator[pb.SyncUsersRequest]:
        for user in [
            owned("three@example.com", "three"),  # sets the missing subject
            owned("three@example.com"),  # an empty subject leaves it
            owned("one@example.com", "taken"),  # someone else's: fails this item only
            owned("four@example.com", "four"),
            owned("five@example.com", "four"),  # a new user for a taken subject fails alone
        ]:
            yield pb.SyncUsersRequest(user=user)

    answers = [answer async for answer in client.stub.SyncUsers(syncs(), metadata=client.metadata)]
    assert [answer.outcome for answer in answers] == [
        pb.SYNC_OUTCOME_UPDATED,
        pb.SYNC_OUTCOME_UNCHANGED,
        pb.SYNC_OUTCOME_FAILED,
        pb.SYNC_OUTCOME_CREATED,
        pb.SYNC_OUTCOME_FAILED,
    ]
    for failed in (answers[2], answers[4]):
        assert failed.status.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
        assert "subject" in failed.status.message
    assert {user.email: user.subject for user in await all_users(client)} == {
        "taken@example.com": "taken",
        "one@example.com": "one",
        "three@example.com": "three",
        "four@example.com": "four",
    }
    assert (await get(client, taken.id)).subject == "taken"


@pytest.mark.asyncio
async def test_a_read_caller_still_reads_every_user_and_writes_none(client: Client) -> None:
    mine = await create(client, new_user("alice@example.com"), as_subject("alice"))
    reader = as_subject("alice", ("users.read",))
    fetched = await client.stub.GetUser(pb.GetUserRequest(id=mine.id), metadata=reader)
    assert fetched.user == mine
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(client, user_pb2.User(id=mine.id, display_name="X"), [], reader)
    refused(caught.value, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")


OLD_ROW = (
    "INSERT INTO users (id, email, email_normalized, display_name, display_name_key, role,"
    " create_time_us, update_time_us, revision) VALUES ({})"
)


async def store_a_user_before_subjects(database_url: str) -> str:
    """Migrate the database only up to 0002, store one user as that schema did; return its id."""
    user_id, timestamp = new_user_id(), now_us()
    row = (user_id, "old@example.com", "old@example.com", "Old", "old", 1, timestamp, timestamp, 1)
    if database_url.startswith("sqlite:"):
        path = parse_sqlite_path(database_url)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            sqlite_migrations.apply_migrations(conn, backend_migrations("sqlite")[:2])
            conn.execute(OLD_ROW.format(", ".join("?" * len(row))), row)
        return user_id
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        await postgres_migrations.apply_migrations(conn, backend_migrations("postgres")[:2])
        placeholders = ", ".join(f"${n}" for n in range(1, len(row) + 1))
        await conn.execute(OLD_ROW.format(placeholders), *row)
    finally:
        await conn.close()
    return user_id


@pytest.mark.asyncio
@pytest.mark.upgrades_across("0003_user_subject")
async def test_users_from_before_subjects_belong_to_no_one_until_an_admin_says(
    database_url: str,
) -> None:
    user_id = await store_a_user_before_subjects(database_url)
    async with running_app(make_settings(database_url)) as app, connect(app.port) as client:
        old = await get(client, user_id)
        assert (old.email, old.subject) == ("old@example.com", "")
        old_owner = as_subject("old")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await update(client, user_pb2.User(id=user_id, display_name="Mine?"), [], old_owner)
        refused(caught.value, grpc.StatusCode.PERMISSION_DENIED, "NOT_OWNER")
        await update(client, user_pb2.User(id=user_id, subject="old"), ["subject"], client.metadata)
        claimed = await update(
            client, user_pb2.User(id=user_id, display_name="Mine"), [], old_owner
        )
        assert (claimed.display_name, claimed.subject) == ("Mine", "old")
