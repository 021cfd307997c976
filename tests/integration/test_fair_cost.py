"""Fair cost for expensive reads: scan filters are capped per principal and per replica."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from helpers.servers import eventually, make_settings, rich_details, running_app
from helpers.tokens import bearer
from helpers.users import new_user

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc
from userservice.config import ConfigError, Settings, load_settings, replica_scan_limit
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import Role, User, UserFilter
from userservice.server import Application

# A substring no row holds: every row is read to rule it out, and counted for the total.
SCAN_FILTER = 'display_name : "nobody has this name"'
SEED_ROWS = 30_000


async def seed(app: Application, count: int = SEED_ROWS) -> list[str]:
    """Insert count users straight through the app's store; return their ids in order."""
    assert app.repository is not None
    ids: list[str] = []
    for start in range(0, count, 1000):
        timestamp = now_us()
        batch = [
            User(
                new_user_id(),
                f"u{i}@example.com",
                f"User {i}",
                Role.VIEWER,
                timestamp,
                timestamp,
                1,
            )
            for i in range(start, min(start + 1000, count))
        ]
        results = await app.repository.create_many(batch)
        assert all(isinstance(result, User) for result in results)
        ids.extend(user.id for user in batch)
    return ids


def stub_for(channel: grpc.aio.Channel) -> user_service_pb2_grpc.UserServiceStub:
    return user_service_pb2_grpc.UserServiceStub(channel)


def as_subject(subject: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", bearer(subject=subject)),)


def assert_too_many_scans(error: grpc.aio.AioRpcError, limit: str) -> None:
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rich_details(error)
    assert details["ErrorInfo"].reason == "TOO_MANY_SCANS"
    assert details["ErrorInfo"].domain == "userservice"
    assert details["ErrorInfo"].metadata["limit"] == limit
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0


@contextlib.asynccontextmanager
async def held_scans(
    stub: user_service_pb2_grpc.UserServiceStub, subject: str, count: int
) -> AsyncIterator[None]:
    """Hold count scans open as subject: StreamUsers calls read up to their first message."""
    calls = [
        stub.StreamUsers(
            pb.StreamUsersRequest(filter='email : "example.com"'), metadata=as_subject(subject)
        )
        for _ in range(count)
    ]
    try:
        for call in calls:
            first = await asyncio.wait_for(call.read(), 10)
            assert first is not grpc.aio.EOF
        yield
    finally:
        for call in calls:
            call.cancel()


@pytest.mark.asyncio
async def test_scans_are_capped_per_principal_and_per_replica_and_freed_when_they_end(
    database_url: str,
) -> None:
    settings = make_settings(
        database_url, max_scans_per_principal=2, max_scans=3, db_pool_max_size=5
    )
    async with running_app(settings) as app:
        await seed(app)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = stub_for(channel)
            scan = pb.ListUsersRequest(filter=SCAN_FILTER)
            async with held_scans(stub, "alice", 2):
                # Alice's third scan is hers too many; other reads of hers are not scans.
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ListUsers(scan, metadata=as_subject("alice"), timeout=5)
                assert_too_many_scans(caught.value, "max_scans_per_principal")
                plain = pb.ListUsersRequest(filter="role = USER_ROLE_VIEWER", page_size=5)
                listed = await stub.ListUsers(plain, metadata=as_subject("alice"), timeout=5)
                assert len(listed.users) == 5

                async with held_scans(stub, "bob", 1):
                    # The replica holds three: carol, under her own cap, is refused too.
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.ListUsers(scan, metadata=as_subject("carol"), timeout=5)
                    assert_too_many_scans(caught.value, "max_scans")
                # Bob's stream was cancelled: once the server has seen it, his scan no
                # longer counts.
                found = await eventually(lambda: admitted(stub, scan, "carol"), "carol's scan")
                assert (list(found.users), found.total_size) == ([], 0)
            # Alice's streams ended: her scans run again.
            await eventually(lambda: admitted(stub, scan, "alice"), "alice's scan")


async def admitted(
    stub: user_service_pb2_grpc.UserServiceStub, request: pb.ListUsersRequest, subject: str
) -> pb.ListUsersResponse | None:
    """Return the page, or None while the scan is refused TOO_MANY_SCANS."""
    try:
        return await stub.ListUsers(request, metadata=as_subject(subject), timeout=10)
    except grpc.aio.AioRpcError as error:
        if rich_details(error)["ErrorInfo"].reason != "TOO_MANY_SCANS":
            raise
        return None


@pytest.mark.asyncio
async def test_a_scan_flood_is_refused_past_the_cap_while_a_bystander_reads_and_watches(
    database_url: str,
) -> None:
    settings = make_settings(
        database_url, max_scans_per_principal=2, max_scans=3, db_pool_max_size=4
    )
    async with running_app(settings) as app:
        ids = await seed(app)
        # The oldest users: on SQLite long evicted from the read cache, so GetUser reads the
        # file through the same reader thread the scans use.
        cold_ids = ids[:2000]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as flood_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as bystander_channel,
        ):
            flood, bystander = stub_for(flood_channel), stub_for(bystander_channel)
            flooder, reader = as_subject("flooder"), as_subject("bystander")
            outcomes: collections.Counter[str] = collections.Counter()
            stop = asyncio.Event()

            async def flood_scans() -> None:
                request = pb.ListUsersRequest(filter=SCAN_FILTER)
                while not stop.is_set():
                    try:
                        await flood.ListUsers(request, metadata=flooder, timeout=30)
                        outcomes["OK"] += 1
                    except grpc.aio.AioRpcError as error:
                        assert_too_many_scans(error, "max_scans_per_principal")
                        outcomes["TOO_MANY_SCANS"] += 1
                        # Bounds the load this test puts on a shared machine; the
                        # refusal itself came at once.
                        await asyncio.sleep(0.02)

            watch = bystander.WatchUsers(pb.WatchUsersRequest(), metadata=reader)
            await asyncio.wait_for(watch.initial_metadata(), 5)
            flooders = [asyncio.create_task(flood_scans()) for _ in range(24)]
            try:
                started = time.monotonic()
                reads = 0
                created = 0
                while time.monotonic() - started < 4 or outcomes["OK"] < 2:
                    assert time.monotonic() - started < 60, (
                        f"the flood made no progress: {outcomes}"
                    )
                    for user_id in cold_ids[reads % len(cold_ids) :][:20]:
                        got = await bystander.GetUser(
                            pb.GetUserRequest(id=user_id), metadata=reader, timeout=2
                        )
                        assert got.user.id == user_id
                        reads += 1
                    made = await bystander.CreateUser(
                        pb.CreateUserRequest(user=new_user(f"watched{created}@example.com")),
                        metadata=reader,
                        timeout=2,
                    )
                    created += 1
                    event = await asyncio.wait_for(watch.read(), 2)
                    assert event is not grpc.aio.EOF
                    assert event.user.id == made.user.id
            finally:
                stop.set()
                await asyncio.gather(*flooders, return_exceptions=True)
                watch.cancel()
            for task in flooders:
                task.result()  # an unexpected status fails the test here
            assert outcomes["TOO_MANY_SCANS"] > 0, outcomes
            assert outcomes["OK"] >= 2, outcomes


def test_scan_limits_are_validated_and_keep_postgres_connections_back() -> None:
    base = {"USERSERVICE_AUTH_JWT_SECRET": "x" * 32, "USERSERVICE_DEV": "true"}
    with pytest.raises(ConfigError, match="USERSERVICE_MAX_SCANS_PER_PRINCIPAL must be positive"):
        load_settings({**base, "USERSERVICE_MAX_SCANS_PER_PRINCIPAL": "0"})
    with pytest.raises(ConfigError, match="must not exceed USERSERVICE_MAX_SCANS"):
        load_settings({**base, "USERSERVICE_MAX_SCANS_PER_PRINCIPAL": "5"})
    postgres = "postgresql://127.0.0.1/db"
    assert (
        replica_scan_limit(Settings(database_url=postgres, max_scans=4, db_pool_max_size=10)) == 4
    )
    assert replica_scan_limit(Settings(database_url=postgres, max_scans=4, db_pool_max_size=4)) == 3
    assert replica_scan_limit(Settings(database_url=postgres, max_scans=4, db_pool_max_size=1)) == 1
    assert replica_scan_limit(Settings(max_scans=4, db_pool_max_size=1)) == 4


def test_only_substring_terms_make_a_scan() -> None:
    assert UserFilter(email_contains="example").is_scan
    assert UserFilter(display_name_contains="ada", role=Role.ADMIN).is_scan
    assert not UserFilter().is_scan
    assert not UserFilter(role=Role.ADMIN, role_not=Role.VIEWER, email_equals="a@b.io").is_scan
