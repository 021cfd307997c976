"""PostgreSQL in production: several server processes on one database, outages, migrations.

Everything here goes through real servers and real client channels: `userservice serve`
subprocesses sharing one fresh database, or an in-process Application whose database
connections pass through a TcpProxy that the tests stop, start, pause and resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.ports import free_port
from helpers.processes import (
    Replica,
    assert_stopped_cleanly,
    replica_env,
    start_serving,
    stop_process,
    wait_serving,
)
from helpers.servers import (
    Client,
    connect,
    make_settings,
    next_event,
    rich_details,
    run_userservice,
    running_app,
)
from helpers.tcp_proxy import TcpProxy
from helpers.users import create, import_users, new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.server import Application

pytestmark = pytest.mark.postgres

SERVICE = "user.v1.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CREATED = user_pb2.USER_EVENT_TYPE_CREATED
UPDATED = user_pb2.USER_EVENT_TYPE_UPDATED
DELETED = user_pb2.USER_EVENT_TYPE_DELETED
# WatchUsers falls back to polling every 5 s; anything well below that came by NOTIFY.
PROMPT_SECONDS = 2.0


# -- server processes ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serving_replicas(
    database_url: str, directory: Path, count: int, **extra: str
) -> AsyncIterator[list[Replica]]:
    """Start count `userservice serve` processes on one database; stop them all afterwards."""
    replicas: list[Replica] = []
    try:
        for index in range(count):
            port = free_port()
            log_path = directory / f"replica{index}.log"
            env = replica_env(database_url, port, **extra)
            replicas.append(await start_serving(env, port, log_path))
        # Started together, so that they also race each other's migrations.
        await asyncio.gather(*(wait_serving(replica) for replica in replicas))
        yield replicas
    finally:
        await asyncio.gather(*(stop_process(replica.process) for replica in replicas))


@pytest_asyncio.fixture
async def two_replicas(postgres_url: str, tmp_path: Path) -> AsyncIterator[tuple[Client, Client]]:
    """Two server processes on one fresh database, with a client connected to each."""
    async with (
        serving_replicas(postgres_url, tmp_path, 2) as replicas,
        connect(replicas[0].port) as client_a,
        connect(replicas[1].port) as client_b,
    ):
        yield client_a, client_b
    for replica in replicas:
        assert_stopped_cleanly(replica)


# -- calls --------------------------------------------------------------------


async def rename(client: Client, user_id: str, display_name: str, etag: str = "") -> user_pb2.User:
    """Change a user's display name, under an etag precondition if one is given."""
    response = await client.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user_id, display_name=display_name, etag=etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=client.metadata,
        timeout=10,
    )
    return response.user


async def delete(client: Client, user_id: str) -> None:
    """Delete a user."""
    await client.stub.DeleteUser(
        pb.DeleteUserRequest(id=user_id), metadata=client.metadata, timeout=10
    )


def reason(error: grpc.aio.AioRpcError) -> str:
    """Return the ErrorInfo reason of a failed call ('' if it has none)."""
    info = rich_details(error).get("ErrorInfo")
    return str(info.reason) if info is not None else ""


async def status_codes(calls: Sequence[Awaitable[object]]) -> list[grpc.StatusCode]:
    """Await calls together and return each one's status code; only RPC errors are expected."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    codes: list[grpc.StatusCode] = []
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            codes.append(result.code())
        elif isinstance(result, BaseException):
            raise result
        else:
            codes.append(grpc.StatusCode.OK)
    return codes


# -- two replicas on one database ---------------------------------------------


@pytest.mark.asyncio
async def test_a_watch_on_one_replica_sees_changes_made_on_another_promptly(
    two_replicas: tuple[Client, Client],
) -> None:
    writer, watcher = two_replicas
    # From sequence 0 on a fresh database: no change can slip in before the watch starts.
    call = watcher.stub.WatchUsers(
        pb.WatchUsersRequest(after_sequence=0), metadata=watcher.metadata, timeout=30
    )
    await asyncio.wait_for(call.initial_metadata(), 5)
    latencies: list[float] = []
    events: list[pb.WatchUsersResponse] = []

    async def change_then_receive(change: Awaitable[object]) -> None:
        # The pause lets the watcher go back to waiting, so only a notification
        # from the other replica (or the 5 s poll) can wake it for this change.
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await change
        events.append(await next_event(call, timeout=6))
        latencies.append(time.monotonic() - started)

    await change_then_receive(create(writer, "watched@example.com", "Before"))
    user_id = events[0].user.id
    await change_then_receive(rename(writer, user_id, "After"))
    await change_then_receive(delete(writer, user_id))
    call.cancel()

    assert [event.type for event in events] == [CREATED, UPDATED, DELETED]
    assert [event.user.id for event in events] == [user_id] * 3
    # Delivered before the delete, the first two keep the name; the deletion carries none.
    assert [event.user.display_name for event in events] == ["Before", "After", ""]
    sequences = [event.sequence for event in events]
    assert sequences == sorted(set(sequences)), sequences
    assert max(latencies) < PROMPT_SECONDS, f"events took {latencies} s: was NOTIFY lost?"


@pytest.mark.asyncio
async def test_a_watch_resumed_on_another_replica_has_no_gap_and_no_duplicate(
    two_replicas: tuple[Client, Client],
) -> None:
    client_a, client_b = two_replicas
    users = [await create(client_a, f"resume{index}@example.com") for index in range(5)]
    first = client_a.stub.WatchUsers(
        pb.WatchUsersRequest(after_sequence=0), metadata=client_a.metadata, timeout=30
    )
    seen = [await next_event(first) for _ in range(3)]
    first.cancel()
    assert [(e.type, e.user.id) for e in seen] == [(CREATED, u.id) for u in users[:3]]

    # Changes keep happening on both replicas while the client is away.
    await rename(client_b, users[0].id, "Renamed on B")
    sixth = await create(client_a, "away-a@example.com")
    await delete(client_b, users[1].id)
    seventh = await create(client_b, "away-b@example.com")

    resumed = client_b.stub.WatchUsers(
        pb.WatchUsersRequest(after_sequence=seen[-1].sequence),
        metadata=client_b.metadata,
        timeout=30,
    )
    backlog = [await next_event(resumed) for _ in range(6)]
    live_user = await create(client_a, "live@example.com")
    live = await next_event(resumed, timeout=PROMPT_SECONDS)
    # Nothing may follow: a duplicate would show up here.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(resumed.read(), 0.5)
    resumed.cancel()

    assert [(e.type, e.user.id) for e in [*backlog, live]] == [
        (CREATED, users[3].id),
        (CREATED, users[4].id),
        (UPDATED, users[0].id),
        (CREATED, sixth.id),
        (DELETED, users[1].id),
        (CREATED, seventh.id),
        (CREATED, live_user.id),
    ]
    assert backlog[2].user.display_name == "Renamed on B"
    sequences = [event.sequence for event in [*seen, *backlog, live]]
    assert sequences == list(range(sequences[0], sequences[0] + 10)), sequences


@pytest.mark.asyncio
async def test_a_reader_on_replica_b_sees_all_of_a_burst_imported_through_replica_a(
    two_replicas: tuple[Client, Client],
) -> None:
    client_a, client_b = two_replicas
    total = 5000
    call = client_b.stub.WatchUsers(pb.WatchUsersRequest(), metadata=client_b.metadata)
    # One event first: the watch is open on B before the import begins.
    await create(client_b, "opened@example.com")
    received = [(await next_event(call)).sequence]

    async def read_all() -> None:
        # As fast as it can, while the import runs; the watch must not end.
        while len(received) <= total:
            message = await call.read()
            assert message is not grpc.aio.EOF, "the watch ended"
            if not message.HasField("progress"):
                received.append(message.sequence)

    reading = asyncio.create_task(read_all())
    await import_users(client_a, total, "burst")
    async with asyncio.timeout(120):
        await reading
    call.cancel()
    assert received == list(range(received[0], received[0] + total + 1))


@pytest.mark.asyncio
async def test_one_email_created_concurrently_on_two_replicas_succeeds_once(
    two_replicas: tuple[Client, Client],
) -> None:
    clients = two_replicas
    # One address in 20 spellings: uniqueness ignores case.
    emails = [
        "".join(ch.upper() if index >> bit & 1 else ch for bit, ch in enumerate("racer"))
        + "@example.com"
        for index in range(20)
    ]
    assert len(set(emails)) == 20
    results = await asyncio.gather(
        *(create(clients[index % 2], email) for index, email in enumerate(emails)),
        return_exceptions=True,
    )

    winners = [result for result in results if isinstance(result, user_pb2.User)]
    losers = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(winners) == 1, results
    assert len(losers) == 19, results
    assert {(error.code(), reason(error)) for error in losers} == {
        (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_EXISTS")
    }
    for client in clients:
        listed = await client.stub.ListUsers(
            pb.ListUsersRequest(), metadata=client.metadata, timeout=10
        )
        assert listed.total_size == 1
        assert [user.id for user in listed.users] == [winners[0].id]


@pytest.mark.asyncio
async def test_concurrent_updates_with_one_etag_on_two_replicas_have_one_winner(
    two_replicas: tuple[Client, Client],
) -> None:
    clients = two_replicas
    original = await create(clients[0], "contended@example.com", "Original")
    results = await asyncio.gather(
        *(
            rename(clients[index % 2], original.id, f"Writer {index}", original.etag)
            for index in range(10)
        ),
        return_exceptions=True,
    )

    winners = [result for result in results if isinstance(result, user_pb2.User)]
    losers = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(winners) == 1, results
    assert len(losers) == 9, results
    assert {(error.code(), reason(error)) for error in losers} == {
        (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    }
    for client in clients:
        stored = await client.stub.GetUser(
            pb.GetUserRequest(id=original.id), metadata=client.metadata, timeout=10
        )
        assert stored.user == winners[0]
        assert stored.user.etag != original.etag


@pytest.mark.asyncio
async def test_page_tokens_work_on_every_replica_sharing_the_secret(
    two_replicas: tuple[Client, Client], postgres_url: str
) -> None:
    clients = two_replicas
    created = [await create(clients[index % 2], f"page{index}@example.com") for index in range(7)]

    listed: list[str] = []
    first_token = token = ""
    for page in range(10):
        # Alternate replicas: every token is redeemed on the replica that did not issue it.
        client = clients[page % 2]
        response = await client.stub.ListUsers(
            pb.ListUsersRequest(page_size=2, page_token=token),
            metadata=client.metadata,
            timeout=10,
        )
        assert response.total_size == 7
        listed += [user.id for user in response.users]
        token = response.next_page_token
        first_token = first_token or token
        if not token:
            break
    assert listed == sorted(user.id for user in created)

    # Control: a server with another secret refuses the token, so sharing it is what works.
    other = make_settings(postgres_url, page_token_secret="another-secret-0123456789abcdef")
    async with running_app(other) as app, connect(app.port) as stranger:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stranger.stub.ListUsers(
                pb.ListUsersRequest(page_size=2, page_token=first_token),
                metadata=stranger.metadata,
                timeout=10,
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == "INVALID_PAGE_TOKEN"


# -- database outages ---------------------------------------------------------


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test PostgreSQL server."""
    async with TcpProxy("127.0.0.1", 5432) as running:
        yield running


@pytest_asyncio.fixture
async def proxied_app(postgres_url: str, proxy: TcpProxy) -> AsyncIterator[Application]:
    """Run the real server in-process, reaching PostgreSQL only through the proxy."""
    settings = make_settings(
        proxy.url(postgres_url), db_connect_timeout_seconds=1, db_statement_timeout_seconds=2
    )
    async with running_app(settings) as app:
        try:
            yield app
        finally:
            # Shutting down is not part of an outage: give the server its database back.
            proxy.resume()
            await proxy.start()


async def health_statuses(port: int) -> set[int]:
    """Return the health statuses of the server ('') and of the service, on a new channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answers = [
            await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
            for name in ("", SERVICE)
        ]
    return {answer.status for answer in answers}


async def wait_health(port: int, status: int, within: float) -> None:
    """Wait until both health names report status, failing after within seconds."""
    started = time.monotonic()
    while await health_statuses(port) != {status}:
        assert time.monotonic() - started < within, f"health never became {status}"
        await asyncio.sleep(0.1)


def assert_storage_unavailable(error: grpc.aio.AioRpcError) -> None:
    """Check that a call failed as a retryable storage outage, with rich details."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    details = rich_details(error)
    assert details["ErrorInfo"].reason == "STORAGE_UNAVAILABLE"
    assert "RetryInfo" in details


@pytest.mark.asyncio
async def test_a_database_outage_is_reported_fast_and_the_server_recovers_by_itself(
    proxied_app: Application, proxy: TcpProxy
) -> None:
    port = proxied_app.port
    async with connect(port) as client, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as other:
        stub, metadata = client.stub, client.metadata
        acknowledged = await create(client, "durable@example.com")
        watch = health_pb2_grpc.HealthStub(other).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=60
        )
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING

        await proxy.stop()
        # The monitor pings every second, each ping bounded by the 1 s connect timeout.
        await wait_health(port, NOT_SERVING, within=5)
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING

        # Lambdas, because a grpc.aio call starts as soon as it is made.
        during: list[Callable[[], Awaitable[object]]] = [
            lambda: stub.GetUser(
                pb.GetUserRequest(id=acknowledged.id), metadata=metadata, timeout=3
            ),
            lambda: stub.CreateUser(
                pb.CreateUserRequest(user=new_user("lost@example.com")),
                metadata=metadata,
                timeout=3,
            ),
            lambda: stub.ListUsers(pb.ListUsersRequest(), metadata=metadata, timeout=3),
        ]
        for call in during:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert time.monotonic() - started < 3
            assert_storage_unavailable(caught.value)

        await proxy.start()
        # No restart: the monitor notices by itself that the database is back.
        await wait_health(port, SERVING, within=10)
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
        watch.cancel()

        stored = await stub.GetUser(
            pb.GetUserRequest(id=acknowledged.id), metadata=metadata, timeout=5
        )
        assert stored.user == acknowledged
        await create(client, "after@example.com")
        listed = await stub.ListUsers(pb.ListUsersRequest(), metadata=metadata, timeout=5)
        assert sorted(user.email for user in listed.users) == [
            "after@example.com",
            "durable@example.com",
        ]


@pytest.mark.asyncio
async def test_a_database_that_swallows_packets_does_not_hold_calls_past_their_deadline(
    proxied_app: Application, proxy: TcpProxy
) -> None:
    port = proxied_app.port
    async with connect(port) as client:
        stub, metadata = client.stub, client.metadata
        user = await create(client, "held@example.com")

        proxy.pause()
        started = time.monotonic()
        codes = await status_codes(
            [
                stub.GetUser(pb.GetUserRequest(id=user.id), metadata=metadata, timeout=2),
                stub.CreateUser(
                    pb.CreateUserRequest(user=new_user("held2@example.com")),
                    metadata=metadata,
                    timeout=2,
                ),
                stub.ListUsers(pb.ListUsersRequest(), metadata=metadata, timeout=2),
            ]
        )
        assert time.monotonic() - started < 2.5
        expected = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
        assert set(codes) <= expected, codes

        # Still paused: what needs no database is answered at once.
        started = time.monotonic()
        assert await health_statuses(port) <= {SERVING, NOT_SERVING}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUser(pb.GetUserRequest(id="not-an-id"), metadata=metadata, timeout=1)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Far below the 2 s a call that needs the database would take.
        assert time.monotonic() - started < 1.5

        proxy.resume()
        await wait_health(port, SERVING, within=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                stored = await stub.GetUser(
                    pb.GetUserRequest(id=user.id), metadata=metadata, timeout=2
                )
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("reads never succeeded again after the pause")
        assert stored.user == user
        await create(client, "after-pause@example.com")


# -- migrations ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_migrate_commands_both_succeed_and_a_server_then_serves(
    postgres_url: str, tmp_path: Path
) -> None:
    env = replica_env(postgres_url)
    results = await asyncio.gather(
        run_userservice("migrate", env=env), run_userservice("migrate", env=env)
    )
    for code, output in results:
        assert code == 0, output

    connection = await asyncpg.connect(postgres_url, timeout=5)
    try:
        versions = await connection.fetch("SELECT version FROM schema_migrations")
    finally:
        await connection.close()
    assert versions
    # The advisory lock made the second run find nothing left to do: each applied once.
    applied = sum(output.count('"message":"applied migration"') for _, output in results)
    assert applied == len(versions)

    async with (
        serving_replicas(postgres_url, tmp_path, 1, USERSERVICE_MIGRATE_ON_START="false") as (
            replica,
        ),
        connect(replica.port) as client,
    ):
        user = await create(client, "migrated@example.com")
        stored = await client.stub.GetUser(
            pb.GetUserRequest(id=user.id), metadata=client.metadata, timeout=5
        )
        assert stored.user == user
        watch = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata, timeout=10
        )
        event = await next_event(watch)
        watch.cancel()
        assert (event.type, event.user.id) == (CREATED, user.id)
    assert_stopped_cleanly(replica)
    assert "applied migration" not in replica.log()
