"""PurgeUsers as a long-running operation, and google.longrunning.Operations, on both stores.

A purge here deletes 5 users per batch and pauses between batches
(purge_batch_interval_seconds), so a purge of 40 users takes several batches: its progress,
a cancel and a restart land in the middle of it without any sleep in the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import google.longrunning.operations_proto_pb2 as operations_pb2
import grpc
import pytest
from helpers.servers import (
    connect,
    eventually,
    make_settings,
    rich_details,
    running_app,
    violated_fields,
)
from helpers.tokens import token
from helpers.users import new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.client import (
    FailedPreconditionError,
    NotFoundError,
    OperationCancelledError,
    PermissionDeniedError,
    PurgeOperation,
    UserServiceClient,
)
from userservice.client.operations import OperationsStub
from userservice.config import Settings
from userservice.server import Application
from userservice.server.wiring import open_repository

pytestmark = pytest.mark.asyncio

DOOMED = 40
KEPT = 7
BATCH = 5
DOOMED_FILTER = 'email : "doomed"'


def slow_purge(database_url: str, **overrides: Any) -> Settings:
    """Return settings whose purges take DOOMED / BATCH batches with a pause between them."""
    slow = {
        "purge_batch_size": BATCH,
        "purge_batch_interval_seconds": 0.1,
        "operation_lease_seconds": 2.0,
    }
    return make_settings(database_url, **{**slow, **overrides})


@contextlib.asynccontextmanager
async def shipped_client(
    port: int, subject: str = "tester", scopes: tuple[str, ...] | None = None
) -> AsyncIterator[UserServiceClient]:
    """Return the shipped client with a token for subject (every scope unless given)."""
    minted = token(subject) if scopes is None else token(subject, scopes)
    async with UserServiceClient(f"127.0.0.1:{port}", token=minted, timeout=10) as client:
        yield client


async def fill(client: UserServiceClient) -> None:
    """Create DOOMED users the purge filter matches and KEPT users it does not."""
    doomed = [new_user(f"doomed{index}@example.com") for index in range(DOOMED)]
    kept = [new_user(f"kept{index}@example.com") for index in range(KEPT)]
    result = await client.import_users([*doomed, *kept])
    assert result.created_count == DOOMED + KEPT


async def count(client: UserServiceClient, filter: str = "") -> int:
    """Return how many users match filter."""
    return (await client.list_users(filter=filter, page_size=1)).total_size


async def mid_way(operation: PurgeOperation) -> pb.PurgeUsersMetadata:
    """Return the purge's progress once it has purged some users but not all."""

    async def purged_some() -> pb.PurgeUsersMetadata | None:
        await operation.refresh()
        return operation.metadata if operation.metadata.purged_count else None

    return await eventually(purged_some, "the purge deleted its first batch")


async def test_purge_runs_to_completion_with_progress_and_result(database_url: str) -> None:
    async with running_app(slow_purge(database_url)) as app, shipped_client(app.port) as client:
        await fill(client)
        operation = await client.purge_users(DOOMED_FILTER)
        assert operation.name.startswith("operations/")
        assert not operation.done
        progress = await mid_way(operation)
        # Observed mid-way: some purged, the rest still there, the matched count known.
        assert not operation.done
        assert progress.matched_count == DOOMED
        assert 0 < progress.purged_count < DOOMED
        assert progress.start_time.ToMicroseconds() <= progress.update_time.ToMicroseconds()
        seen: list[int] = []
        result = await operation.wait(30, on_progress=lambda m: seen.append(m.purged_count))
        assert result.purged_count == DOOMED
        assert seen == sorted(seen)
        assert seen[-1] == DOOMED
        assert operation.metadata.purged_count == DOOMED
        assert await count(client, DOOMED_FILTER) == 0
        assert await count(client) == KEPT
        # The deletions are DeleteUser's: a DELETED event each, the personal data erased.
        deleted = [
            event
            async for event in _events(client, DOOMED + KEPT)
            if event.type == user_pb2.USER_EVENT_TYPE_DELETED
        ]
        assert len(deleted) == DOOMED
        assert all(event.user.email == "" for event in deleted)


async def _events(client: UserServiceClient, skip: int) -> AsyncIterator[pb.WatchUsersResponse]:
    """Yield the retained events after the first skip (the creations), up to the latest."""
    latest = skip + DOOMED
    async for event in client.watch_users(after_sequence=skip, resume=False):
        if event.sequence:
            yield event
        if event.sequence >= latest:
            return


async def test_cancel_ends_the_operation_cancelled_and_stops_deleting(database_url: str) -> None:
    async with running_app(slow_purge(database_url)) as app, shipped_client(app.port) as client:
        await fill(client)
        operation = await client.purge_users(DOOMED_FILTER)
        await mid_way(operation)
        await operation.cancel()
        with pytest.raises(OperationCancelledError) as cancelled:
            await operation.wait(30)
        assert cancelled.value.code == grpc.StatusCode.CANCELLED
        assert operation.operation.error.code == 1
        assert cancelled.value.reason == "OPERATION_CANCELLED"
        purged = operation.metadata.purged_count
        assert 0 < purged < DOOMED
        # Nothing more is deleted once it ended: what is left is what it did not purge.
        assert await count(client, DOOMED_FILTER) == DOOMED - purged
        await operation.cancel()  # cancelling a finished operation changes nothing
        await operation.refresh()
        assert operation.operation.error.code == 1


async def test_a_restart_in_the_middle_resumes_and_finishes(database_url: str) -> None:
    settings = slow_purge(database_url)
    first = Application(settings)
    await first.start()
    try:
        async with shipped_client(first.port) as client:
            await fill(client)
            operation = await client.purge_users(DOOMED_FILTER)
            before = await mid_way(operation)
    finally:
        await first.stop()
    assert 0 < before.purged_count < DOOMED
    # Stopped between batches: unfinished, its progress recorded, its lease released.
    store = await open_repository(settings.database_url, settings=settings)
    try:
        left = await store.get_operation(operation.name)
    finally:
        await store.close()
    assert left is not None
    assert not left.done
    assert left.lease_expiry_us == 0
    # A new server on the same database takes the operation over and finishes it.
    async with running_app(settings) as second, shipped_client(second.port) as client:
        resumed = await client.purge_operation(operation.name)
        assert resumed.metadata.purged_count >= before.purged_count
        result = await resumed.wait(30)
        assert result.purged_count == DOOMED
        assert resumed.metadata.matched_count == DOOMED
        assert await count(client, DOOMED_FILTER) == 0
        assert await count(client) == KEPT


async def test_another_replica_resumes_an_operation_whose_lease_expired(
    postgres_url: str,
) -> None:
    # The first runner stops renewing without releasing its lease (as a killed process
    # would); a second server sharing the database resumes it once the lease runs out.
    settings = slow_purge(postgres_url, operation_lease_seconds=1.0)
    first = Application(settings)
    await first.start()
    stopped = False
    try:
        async with shipped_client(first.port) as client:
            await fill(client)
            operation = await client.purge_users(DOOMED_FILTER)
            await mid_way(operation)
            # The runner's task ends without releasing: cancelled as a crash would end it.
            service = first._operations
            assert service is not None
            for runner in list(service._runners.values()):
                runner.cancel()
            service._closed = True  # no release, no new runner here
            await operation.refresh()
            assert not operation.done
        async with running_app(settings) as second, shipped_client(second.port) as client:
            resumed = await client.purge_operation(operation.name)
            assert (await resumed.wait(30)).purged_count <= DOOMED
            assert await count(client, DOOMED_FILTER) == 0
            assert resumed.metadata.matched_count == resumed.metadata.purged_count
        await first.stop()
        stopped = True
    finally:
        if not stopped:
            await first.stop()


async def test_wait_returns_when_done_and_respects_its_timeout(database_url: str) -> None:
    # Eight batches 0.5 s apart: the purge outlasts the two short waits.
    config = slow_purge(database_url, purge_batch_interval_seconds=0.5)
    async with running_app(config) as app, connect(app.port) as raw:
        operations = OperationsStub(raw.channel)
        await raw.stub.ImportUsers(_imports(DOOMED), metadata=raw.metadata, timeout=30)
        started = await raw.stub.PurgeUsers(
            pb.PurgeUsersRequest(filter=DOOMED_FILTER), metadata=raw.metadata, timeout=10
        )
        name = started.name
        # A short timeout: the answer is the operation as it is, not an error.
        request = operations_pb2.WaitOperationRequest(name=name)
        request.timeout.FromMilliseconds(50)
        waited = await operations.WaitOperation(request, metadata=raw.metadata, timeout=10)
        assert waited.name == name
        assert not waited.done
        # No timeout, a short call deadline: answered before the deadline, not DEADLINE_EXCEEDED.
        untimed = operations_pb2.WaitOperationRequest(name=name)
        waited = await operations.WaitOperation(untimed, metadata=raw.metadata, timeout=2.0)
        assert not waited.done
        # Long enough: returns once done, with the result.
        request.timeout.FromSeconds(30)
        finished = await operations.WaitOperation(request, metadata=raw.metadata, timeout=40)
        assert finished.done
        response = pb.PurgeUsersResponse()
        assert finished.response.Unpack(response)
        assert response.purged_count == DOOMED
        # A negative timeout is the caller's mistake.
        request.timeout.FromSeconds(-1)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await operations.WaitOperation(request, metadata=raw.metadata, timeout=10)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(failure.value) == ["timeout"]


async def _imports(n: int) -> AsyncIterator[pb.ImportUsersRequest]:
    for index in range(n):
        yield pb.ImportUsersRequest(user=new_user(f"doomed{index}@example.com"))


async def test_get_list_and_delete(database_url: str) -> None:
    fast = make_settings(database_url, purge_batch_size=BATCH)
    async with running_app(fast) as app, shipped_client(app.port) as client:
        await fill(client)
        first = await client.purge_users('email : "doomed1"')
        await first.wait(30)
        second = await client.purge_users('email : "kept"')
        await second.wait(30)
        ops = client.operations
        md = (("authorization", f"Bearer {token()}"),)
        listed = await ops.ListOperations(
            operations_pb2.ListOperationsRequest(name="operations", page_size=1),
            metadata=md,
            timeout=10,
        )
        assert [op.name for op in listed.operations] == [first.name]
        assert listed.next_page_token
        page_two = await ops.ListOperations(
            operations_pb2.ListOperationsRequest(
                name="operations", page_size=1, page_token=listed.next_page_token
            ),
            metadata=md,
            timeout=10,
        )
        assert [op.name for op in page_two.operations] == [second.name]
        assert not page_two.next_page_token
        running = await ops.ListOperations(
            operations_pb2.ListOperationsRequest(filter="done = false"), metadata=md, timeout=10
        )
        assert list(running.operations) == []
        done = await ops.ListOperations(
            operations_pb2.ListOperationsRequest(filter="done=true"), metadata=md, timeout=10
        )
        assert len(done.operations) == 2
        await first.delete()
        with pytest.raises(NotFoundError) as gone:
            await first.refresh()
        assert gone.value.reason == "OPERATION_NOT_FOUND"
        assert gone.value.resource_name == first.name
        with pytest.raises(NotFoundError):
            await first.delete()
        await second.refresh()
        assert second.done


async def test_deleting_an_unfinished_operation_is_a_failed_precondition(
    database_url: str,
) -> None:
    async with running_app(slow_purge(database_url)) as app, shipped_client(app.port) as client:
        await fill(client)
        operation = await client.purge_users(DOOMED_FILTER)
        with pytest.raises(FailedPreconditionError) as refused:
            await operation.delete()
        assert refused.value.reason == "OPERATION_NOT_DONE"
        await operation.cancel()
        with pytest.raises(OperationCancelledError):
            await operation.wait(30)
        await operation.delete()


async def test_only_the_creator_or_an_admin_sees_an_operation(database_url: str) -> None:
    async with running_app(slow_purge(database_url)) as app, shipped_client(app.port) as admin:
        await fill(admin)
        operation = await admin.purge_users(DOOMED_FILTER)
        reader = ("users.read", "users.write")
        async with shipped_client(app.port, "someone-else", reader) as other:
            with pytest.raises(NotFoundError):
                await other.purge_operation(operation.name)
            with pytest.raises(NotFoundError):
                await PurgeOperation(
                    other.operations, other._run_unary, operation.operation
                ).cancel()
            listed = await other.operations.ListOperations(
                operations_pb2.ListOperationsRequest(),
                metadata=(("authorization", f"Bearer {token('someone-else', reader)}"),),
                timeout=10,
            )
            assert list(listed.operations) == []
            # Starting one takes users.admin.
            with pytest.raises(PermissionDeniedError):
                await other.purge_users(DOOMED_FILTER)
        # Another admin sees it (and so may cancel it).
        async with shipped_client(app.port, "another-admin") as second_admin:
            seen = await second_admin.purge_operation(operation.name)
            await seen.cancel()
        with pytest.raises(OperationCancelledError):
            await operation.wait(30)


async def test_invalid_requests_name_the_field(database_url: str) -> None:
    async with running_app(make_settings(database_url)) as app, connect(app.port) as raw:
        for bad_filter in ("", "   ", "color = red", 'email : "x" OR role = 1'):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await raw.stub.PurgeUsers(
                    pb.PurgeUsersRequest(filter=bad_filter), metadata=raw.metadata, timeout=10
                )
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad_filter
            assert violated_fields(failure.value) == ["filter"]
        operations = OperationsStub(raw.channel)
        for request, field in (
            (operations_pb2.ListOperationsRequest(filter="done = maybe"), "filter"),
            (operations_pb2.ListOperationsRequest(name="users"), "name"),
            (operations_pb2.ListOperationsRequest(page_size=-1), "page_size"),
            (operations_pb2.ListOperationsRequest(page_token="forged"), "page_token"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await operations.ListOperations(request, metadata=raw.metadata, timeout=10)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert violated_fields(failure.value) == [field]
        # A name this service never issues names nothing.
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await operations.GetOperation(
                operations_pb2.GetOperationRequest(name="users/1"),
                metadata=raw.metadata,
                timeout=10,
            )
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert rich_details(failure.value)["ErrorInfo"].reason == "OPERATION_NOT_FOUND"


async def test_operations_need_a_token_with_their_scope(database_url: str) -> None:
    async with running_app(make_settings(database_url)) as app, connect(app.port) as raw:
        operations = OperationsStub(raw.channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await operations.ListOperations(operations_pb2.ListOperationsRequest(), timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Every Operations method takes users.read (policy.OPERATIONS_SCOPES).
        writer_only = (("authorization", f"Bearer {token(scopes=['users.write'])}"),)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await operations.GetOperation(
                operations_pb2.GetOperationRequest(name="operations/x"),
                metadata=writer_only,
                timeout=10,
            )
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rich_details(failure.value)["ErrorInfo"].reason == "SCOPE_MISSING"


async def test_operations_are_rate_limited_like_every_method(sqlite_url: str) -> None:
    # Each Operations method costs 1 (policy.OPERATIONS_SCOPES): a burst of 2 takes two calls.
    config = make_settings(sqlite_url, rate_limit_rps=0.001, rate_limit_burst=2)
    async with running_app(config) as app, connect(app.port) as raw:
        operations = OperationsStub(raw.channel)
        request = operations_pb2.ListOperationsRequest()
        for _ in range(2):
            await operations.ListOperations(request, metadata=raw.metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await operations.ListOperations(request, metadata=raw.metadata, timeout=10)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
