"""Erasure: a deleted user's email and display name leave every event, record and feed memory.

Through the real server on both stores, and then straight at the database rows: the events
keep their ids, types, sequences and times (so a replay stays gap-free), the idempotency
records lose their personal fields, and the change feed's window and pages are erased too.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from helpers.servers import Client, connect, make_settings, rich_details, running_app
from helpers.users import new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import EventType, UserEvent
from userservice.server import Application
from userservice.server.wiring import open_repository
from userservice.storage.migrations import backend_migrations
from userservice.storage.postgres.migrations import apply_migrations as apply_postgres
from userservice.storage.sqlite.connection import connect as sqlite_connect
from userservice.storage.sqlite.migrations import apply_migrations as apply_sqlite

CREATED = user_pb2.USER_EVENT_TYPE_CREATED
UPDATED = user_pb2.USER_EVENT_TYPE_UPDATED
DELETED = user_pb2.USER_EVENT_TYPE_DELETED
# Personal data of the user the tests delete: two emails and two names, none a substring
# of anything else the tests write.
FIRST_EMAIL = "erase.me@example.com"
SECOND_EMAIL = "erased.later@example.com"
FIRST_NAME = "Secret Name"
SECOND_NAME = "Renamed Secret"
SUBJECT = "idp|erase-me-subject"
PERSONAL = (
    FIRST_EMAIL,
    SECOND_EMAIL,
    FIRST_NAME,
    SECOND_NAME,
    SUBJECT,
    "erase.me",
    "erased.later",
)


@contextlib.asynccontextmanager
async def serving(database_url: str) -> AsyncIterator[tuple[Application, Client]]:
    async with running_app(make_settings(database_url)) as app, connect(app.port) as client:
        yield app, client


async def create_update(client: Client, request_id: str) -> user_pb2.User:
    """Create the user to erase (with request_id and a subject), change its email and name."""
    user = new_user(FIRST_EMAIL, FIRST_NAME)
    user.subject = SUBJECT
    created = await client.stub.CreateUser(
        pb.CreateUserRequest(user=user, request_id=request_id), metadata=client.metadata
    )
    updated = await client.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=created.user.id, email=SECOND_EMAIL, display_name=SECOND_NAME),
            update_mask=field_mask_pb2.FieldMask(paths=["email", "display_name"]),
        ),
        metadata=client.metadata,
    )
    return updated.user


async def replay(client: Client, through: int) -> list[pb.WatchUsersResponse]:
    """Return WatchUsers{after_sequence: 0}'s events up to sequence `through`."""
    call = client.stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata)
    events: list[pb.WatchUsersResponse] = []
    while not events or events[-1].sequence < through:
        response = await asyncio.wait_for(call.read(), 10)
        assert response is not grpc.aio.EOF
        if not response.HasField("progress"):
            events.append(response)
    call.cancel()
    return events


async def raw_rows(database_url: str) -> list[str]:
    """Return every row of the three data tables as text, straight from the database."""
    # Constant table names, never input: hence the S608 waivers.
    tables = ("users", "user_events", "create_requests")
    if database_url.startswith("sqlite:///"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            return [
                repr(row)
                for table in tables
                for row in conn.execute(f"SELECT * FROM {table}")  # noqa: S608
            ]
        finally:
            conn.close()
    pg = await asyncpg.connect(database_url)
    try:
        return [
            str(row[0])
            for table in tables
            for row in await pg.fetch(f"SELECT t::text FROM {table} t")  # noqa: S608
        ]
    finally:
        await pg.close()


async def personal_fields(database_url: str, user_id: str) -> list[tuple[str, ...]]:
    """Return (email, display_name, subject) of user_id's events and its records' fields."""
    events = " ".join(
        [
            "SELECT email, display_name, subject FROM user_events",
            "WHERE user_id = {}",
            "ORDER BY sequence",
        ]
    )
    records = " ".join(
        [
            "SELECT email, display_name, fingerprint, subject FROM create_requests",
            "WHERE user_id = {}",
        ]
    )
    if database_url.startswith("sqlite:///"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            return [
                tuple(row)
                for query in (events, records)
                for row in conn.execute(query.format("?"), (user_id,))
            ]
        finally:
            conn.close()
    pg = await asyncpg.connect(database_url)
    try:
        return [
            tuple(row)
            for query in (events, records)
            for row in await pg.fetch(query.format("$1"), user_id)
        ]
    finally:
        await pg.close()


async def noop() -> None:
    """Wait for nothing: a delete on the reader itself is known to it when it returns."""


def leaked(texts: list[str]) -> list[str]:
    return [text for text in texts if any(secret in text for secret in PERSONAL)]


@pytest.mark.asyncio
async def test_a_delete_erases_the_users_personal_data_from_replays_and_rows(
    database_url: str,
) -> None:
    async with serving(database_url) as (_app, client):
        kept = await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user("kept@example.com", "Kept Person")),
            metadata=client.metadata,
        )
        request_id = str(uuid.uuid4())
        user = await create_update(client, request_id)
        await client.stub.DeleteUser(
            pb.DeleteUserRequest(id=user.id, etag=user.etag), metadata=client.metadata
        )
        events = await replay(client, 4)

    assert [event.sequence for event in events] == [1, 2, 3, 4], "gap-free, nothing dropped"
    assert [(event.type, event.user.id) for event in events] == [
        (CREATED, kept.user.id),
        (CREATED, user.id),
        (UPDATED, user.id),
        (DELETED, user.id),
    ]
    assert (events[0].user.email, events[0].user.display_name) == (
        "kept@example.com",
        "Kept Person",
    )
    for event in events[1:]:
        assert (event.user.email, event.user.display_name, event.user.subject) == ("", "", "")
        assert event.event_time.ToMicroseconds() > 0
    assert events[2].user.etag == events[3].user.etag == user.etag, "the rest stays"
    assert events[3].user.role == user.role
    assert not leaked(await raw_rows(database_url))
    assert await personal_fields(database_url, user.id) == [("", "", None)] * 3 + [
        ("", "", "", None)
    ]


@pytest.mark.asyncio
async def test_a_retried_create_of_a_deleted_user_is_not_found_and_a_new_request_id_creates(
    database_url: str,
) -> None:
    async with serving(database_url) as (_app, client):
        request_id = str(uuid.uuid4())
        first = await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user(FIRST_EMAIL, FIRST_NAME), request_id=request_id),
            metadata=client.metadata,
        )
        await client.stub.DeleteUser(
            pb.DeleteUserRequest(id=first.user.id), metadata=client.metadata
        )
        for retry in (new_user(FIRST_EMAIL, FIRST_NAME), new_user("other@example.com", "Other")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.stub.CreateUser(
                    pb.CreateUserRequest(user=retry, request_id=request_id),
                    metadata=client.metadata,
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            info = rich_details(caught.value)["ErrorInfo"]
            assert (info.domain, info.reason) == ("userservice", "CREATED_USER_DELETED")
            assert "new request_id" in (caught.value.details() or "")
        again = await client.stub.CreateUser(
            pb.CreateUserRequest(
                user=new_user(FIRST_EMAIL, FIRST_NAME), request_id=str(uuid.uuid4())
            ),
            metadata=client.metadata,
        )
        assert again.user.id != first.user.id
        assert again.user.email == FIRST_EMAIL


@pytest.mark.asyncio
async def test_a_delete_that_fails_on_its_etag_erases_nothing(database_url: str) -> None:
    async with serving(database_url) as (_app, client):
        request_id = str(uuid.uuid4())
        user = await create_update(client, request_id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.DeleteUser(
                pb.DeleteUserRequest(id=user.id, etag="1-1"), metadata=client.metadata
            )
        assert caught.value.code() == grpc.StatusCode.ABORTED
        events = await replay(client, 2)
        assert [(e.user.email, e.user.display_name) for e in events] == [
            (FIRST_EMAIL, FIRST_NAME),
            (SECOND_EMAIL, SECOND_NAME),
        ]
        fields = await personal_fields(database_url, user.id)
        assert fields[:2] == [
            (FIRST_EMAIL, FIRST_NAME, SUBJECT),
            (SECOND_EMAIL, SECOND_NAME, SUBJECT),
        ]
        assert fields[2][:2] == (FIRST_EMAIL, FIRST_NAME)
        assert fields[2][2], "the fingerprint stays"
        assert fields[2][3] == SUBJECT
        same = new_user(FIRST_EMAIL, FIRST_NAME)
        same.subject = SUBJECT
        retried = await client.stub.CreateUser(
            pb.CreateUserRequest(user=same, request_id=request_id), metadata=client.metadata
        )
        assert (retried.user.id, retried.user.email) == (user.id, FIRST_EMAIL)


@pytest.mark.asyncio
async def test_a_live_watcher_opened_before_the_delete_gets_the_deletion_erased(
    database_url: str,
) -> None:
    async with serving(database_url) as (_app, client):
        user = await create_update(client, str(uuid.uuid4()))
        call = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata
        )
        seen = [await asyncio.wait_for(call.read(), 10) for _ in range(2)]
        assert [event.user.email for event in seen] == [FIRST_EMAIL, SECOND_EMAIL]
        await client.stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=client.metadata)
        deletion = await asyncio.wait_for(call.read(), 10)
        call.cancel()
        assert (deletion.sequence, deletion.type, deletion.user.id) == (3, DELETED, user.id)
        assert (deletion.user.email, deletion.user.display_name) == ("", "")


async def buffered_then_deleted(
    reader: Application, writer: Client, user_id: str, learned: Callable[[], Awaitable[None]]
) -> list[UserEvent]:
    """Fill a watcher's store page on reader, delete user_id through writer, drain the page.

    learned() returns once reader can know of the delete.
    """
    service = reader._service
    assert service is not None
    watcher = service._feed.watch(0)
    try:
        # Its first read takes the whole log from the store into its page and hands out one.
        first = await watcher.next(10)
        assert first is not None
        assert first.user.email == FIRST_EMAIL
        await writer.stub.DeleteUser(pb.DeleteUserRequest(id=user_id), metadata=writer.metadata)
        await learned()
        events = [first]
        while events[-1].type != EventType.DELETED:
            event = await watcher.next(10)
            assert event is not None, "the deletion did not arrive"
            events.append(event)
        return events
    finally:
        watcher.close()


@pytest.mark.asyncio
async def test_events_a_watcher_buffered_before_the_delete_are_erased_before_delivery(
    database_url: str,
) -> None:
    async with serving(database_url) as (app, client):
        user = await create_update(client, str(uuid.uuid4()))
        events = await buffered_then_deleted(app, client, user.id, noop)
    assert [(event.sequence, event.type) for event in events] == [
        (1, EventType.CREATED),
        (2, EventType.UPDATED),
        (3, EventType.DELETED),
    ]
    assert [(e.user.email, e.user.display_name) for e in events[1:]] == [("", "")] * 2


@pytest.mark.asyncio
async def test_events_in_the_shared_window_are_erased_before_delivery(database_url: str) -> None:
    async with serving(database_url) as (app, client):
        service = app._service
        assert service is not None
        feed = service._feed
        watcher = feed.watch(0)
        try:
            # Nothing to send yet: the watcher follows the window from here.
            assert await watcher.next(0.05) is None
            user = await create_update(client, str(uuid.uuid4()))
            # Both events are in the window, not in a page of the watcher's own.
            first = await watcher.next(10)
            assert first is not None
            assert first.user.email == FIRST_EMAIL
            assert feed.watcher_count == 1
            await client.stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=client.metadata)
            events = [first]
            while events[-1].type != EventType.DELETED:
                event = await watcher.next(10)
                assert event is not None, "the deletion did not arrive"
                events.append(event)
        finally:
            watcher.close()
    assert [(event.sequence, event.type) for event in events] == [
        (1, EventType.CREATED),
        (2, EventType.UPDATED),
        (3, EventType.DELETED),
    ]
    assert [(e.user.email, e.user.display_name) for e in events[1:]] == [("", "")] * 2


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_another_replica_erases_its_buffers_and_replays_erased(postgres_url: str) -> None:
    async with (
        serving(postgres_url) as (writer, writer_client),
        serving(postgres_url) as (
            reader,
            reader_client,
        ),
    ):
        user = await create_update(writer_client, str(uuid.uuid4()))
        # A live watcher on the reader: once it has the deletion, that replica knows of it.
        live = reader_client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=2), metadata=reader_client.metadata
        )

        async def deletion_arrived() -> None:
            while True:
                response = await asyncio.wait_for(live.read(), 10)
                assert response is not grpc.aio.EOF
                if response.type == DELETED:
                    assert (response.user.email, response.user.display_name) == ("", "")
                    return

        events = await buffered_then_deleted(reader, writer_client, user.id, deletion_arrived)
        live.cancel()
        assert [e.user.email for e in events] == [FIRST_EMAIL, "", ""]
        assert [event.user.id for event in events] == [user.id] * 3
        replayed = await replay(reader_client, 3)
        assert [(e.sequence, e.user.email, e.user.display_name) for e in replayed] == [
            (1, "", ""),
            (2, "", ""),
            (3, "", ""),
        ]
        assert writer is not reader


@pytest.mark.asyncio
async def test_the_sqlite_file_keeps_no_bytes_of_an_erased_user(sqlite_url: str) -> None:
    async with serving(sqlite_url) as (_app, client):
        user = await create_update(client, str(uuid.uuid4()))
        await client.stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=client.metadata)
    # The server's close checkpoints the write-ahead log into the file and removes it.
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    contents = path.read_bytes()
    assert [secret for secret in PERSONAL if secret.encode() in contents] == []


async def store_before_0004(database_url: str, kept_id: str, gone_id: str) -> None:
    """Migrate below 0004 and write, as older code did, a kept user and a deleted one's rows."""
    users = "INSERT INTO users (id, email, email_normalized, display_name, role, create_time_us,"
    users += " update_time_us, revision) VALUES ({})"
    events = "INSERT INTO user_events (sequence, type, user_id, email, display_name, role,"
    events += " create_time_us, update_time_us, revision, event_time_us) VALUES ({})"
    records = "INSERT INTO create_requests (request_id, fingerprint, user_id, email,"
    records += " display_name, role, create_time_us, update_time_us, revision, created_us)"
    records += " VALUES ({})"
    # Records: request id, fingerprint, user id, email, name; role, times, revision, created.
    record_rest = (1, 1, 1, 1, now_us())
    rows = [
        (users, (kept_id, "kept@example.com", "kept@example.com", "Kept Person", 1, 1, 1, 1)),
        (events, (1, 1, kept_id, "kept@example.com", "Kept Person", 1, 1, 1, 1, 1)),
        (events, (2, 1, gone_id, FIRST_EMAIL, FIRST_NAME, 1, 2, 2, 1, 2)),
        (events, (3, 3, gone_id, FIRST_EMAIL, FIRST_NAME, 1, 2, 2, 1, 3)),
        (records, (str(uuid.uuid4()), "fp-kept", kept_id, "kept@example.com", "Kept Person")),
        (records, (str(uuid.uuid4()), "fp-gone", gone_id, FIRST_EMAIL, FIRST_NAME)),
    ]
    rows = [(sql, (*values, *record_rest) if sql is records else values) for sql, values in rows]
    backend = "sqlite" if database_url.startswith("sqlite:///") else "postgres"
    older = [m for m in backend_migrations(backend) if m.version < 4]
    if database_url.startswith("sqlite:///"):
        conn = sqlite_connect(Path(database_url.removeprefix("sqlite:///")))
        try:
            apply_sqlite(conn, older)
            for sql, values in rows:
                conn.execute(sql.format(", ".join("?" * len(values))), values)
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(database_url)
    try:
        await apply_postgres(pg, older)
        for sql, values in rows:
            await pg.execute(
                sql.format(", ".join(f"${n}" for n in range(1, len(values) + 1))), *values
            )
        await pg.execute("UPDATE event_sequence SET value = 3")
    finally:
        await pg.close()


@pytest.mark.asyncio
@pytest.mark.upgrades_across("0004_erasure")
async def test_migration_0004_erases_the_users_deleted_before_it(database_url: str) -> None:
    kept_id, gone_id = new_user_id(), new_user_id()
    await store_before_0004(database_url, kept_id, gone_id)
    repository = await open_repository(database_url)
    await repository.close()
    assert await personal_fields(database_url, gone_id) == [("", "", None)] * 2 + [
        ("", "", "", None)
    ]
    assert await personal_fields(database_url, kept_id) == [
        ("kept@example.com", "Kept Person", None),
        ("kept@example.com", "Kept Person", "fp-kept", None),
    ]
    assert not leaked(await raw_rows(database_url))
