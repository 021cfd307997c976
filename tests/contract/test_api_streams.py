"""StreamUsers, ImportUsers, WatchUsers and SyncUsers through the real server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import code_pb2
from helpers.servers import Client, eventually, handled, next_event, rich_details
from helpers.tokens import bearer
from helpers.users import create, new_user

from user.v1 import user_pb2, user_service_pb2_grpc
from user.v1 import user_service_pb2 as pb
from userservice.server import Application


@pytest.mark.asyncio
async def test_stream_users_exports_matches_in_id_order(client: Client) -> None:
    admins = [
        await create(client, f"a{i}@example.com", role=user_pb2.USER_ROLE_ADMIN) for i in range(3)
    ]
    await create(client, "viewer@example.com")
    streamed = [
        item.user
        async for item in client.stub.StreamUsers(
            pb.StreamUsersRequest(filter="role = ADMIN"), metadata=client.metadata
        )
    ]
    assert streamed == sorted(admins, key=lambda user: user.id)


@pytest.mark.asyncio
async def test_stream_users_pages_through_more_than_one_batch(client: Client) -> None:
    requests = [
        pb.ImportUsersRequest(user=new_user(f"bulk{i:04d}@example.com")) for i in range(600)
    ]

    async def messages() -> AsyncIterator[pb.ImportUsersRequest]:
        for request in requests:
            yield request

    result = await client.stub.ImportUsers(messages(), metadata=client.metadata)
    assert result.created_count == 600
    ids = [
        item.user.id
        async for item in client.stub.StreamUsers(pb.StreamUsersRequest(), metadata=client.metadata)
    ]
    assert len(ids) == 600
    assert ids == sorted(ids)
    assert len(set(ids)) == 600


@pytest.mark.asyncio
async def test_stream_users_bad_filter_is_invalid(client: Client) -> None:
    call = client.stub.StreamUsers(pb.StreamUsersRequest(filter="nope"), metadata=client.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_import_commits_valid_rows_and_reports_each_rejection(client: Client) -> None:
    await create(client, "existing@example.com")
    users = [
        new_user("fresh1@example.com"),
        new_user("not-an-email"),
        new_user("EXISTING@example.com"),
        new_user("fresh2@example.com"),
        new_user("fresh1@EXAMPLE.com"),
        user_pb2.User(email="fresh3@example.com"),
        new_user("fresh3@example.com"),
    ]

    async def messages() -> AsyncIterator[pb.ImportUsersRequest]:
        for user in users:
            yield pb.ImportUsersRequest(user=user)

    result = await client.stub.ImportUsers(messages(), metadata=client.metadata)
    assert result.created_count == 3
    assert result.rejected_count == 4
    assert [(r.index, r.status.code) for r in result.rejections] == [
        (1, code_pb2.INVALID_ARGUMENT),
        (2, code_pb2.ALREADY_EXISTS),
        (4, code_pb2.ALREADY_EXISTS),
        (5, code_pb2.INVALID_ARGUMENT),
    ]
    assert all(r.status.details for r in result.rejections)
    listed = await client.stub.ListUsers(pb.ListUsersRequest(), metadata=client.metadata)
    assert sorted(u.email for u in listed.users) == [
        "existing@example.com",
        "fresh1@example.com",
        "fresh2@example.com",
        "fresh3@example.com",
    ]


@pytest.mark.asyncio
async def test_watch_reports_changes_live(client: Client) -> None:
    call = client.stub.WatchUsers(pb.WatchUsersRequest(), metadata=client.metadata)
    # The stream's initial metadata leaves the server before the watch takes its position
    # ("from now"), so a write right after it may fall before that position: sentinels are
    # written until one arrives live, and the ones after it are read, before the writes
    # under test start.
    live: asyncio.Queue[pb.WatchUsersResponse] = asyncio.Queue()

    async def read_all() -> None:
        while True:
            live.put_nowait(await next_event(call, 30))

    reader = asyncio.create_task(read_all())
    sentinels: list[str] = []
    first: pb.WatchUsersResponse | None = None
    while first is None:
        assert len(sentinels) < 50, "the watch never delivered a live event"
        sentinels.append((await create(client, f"sentinel{len(sentinels)}@example.com")).id)
        with contextlib.suppress(TimeoutError):
            first = await asyncio.wait_for(live.get(), 0.5)
    for _ in sentinels[sentinels.index(first.user.id) + 1 :]:
        await asyncio.wait_for(live.get(), 5)
    created = await create(client, "watched@example.com", display_name="Before")
    await client.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=created.id, display_name="After"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=client.metadata,
    )
    await client.stub.DeleteUser(pb.DeleteUserRequest(id=created.id), metadata=client.metadata)
    events = [await asyncio.wait_for(live.get(), 5) for _ in range(3)]
    reader.cancel()
    call.cancel()
    assert [e.type for e in events] == [
        user_pb2.USER_EVENT_TYPE_CREATED,
        user_pb2.USER_EVENT_TYPE_UPDATED,
        user_pb2.USER_EVENT_TYPE_DELETED,
    ]
    assert events[0].user == created
    assert events[1].user.display_name == "After"
    assert events[2].user.id == created.id
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == 3


@pytest.mark.asyncio
async def test_watch_resume_has_no_gap_and_no_duplicate(client: Client) -> None:
    for index in range(5):
        await create(client, f"before{index}@example.com")
    replay = client.stub.WatchUsers(
        pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata
    )
    first_three = [await next_event(replay) for _ in range(3)]
    replay.cancel()
    last_seen = first_three[-1].sequence
    # Changes keep happening while the client is away.
    for index in range(4):
        await create(client, f"while-away{index}@example.com")
    resumed = client.stub.WatchUsers(
        pb.WatchUsersRequest(after_sequence=last_seen), metadata=client.metadata
    )
    rest = [await next_event(resumed) for _ in range(6)]
    await create(client, "live@example.com")
    live = await next_event(resumed)
    resumed.cancel()
    sequences = [e.sequence for e in first_three + rest + [live]]
    assert sequences == list(range(sequences[0], sequences[0] + 10))
    assert live.user.email == "live@example.com"


@pytest.mark.asyncio
async def test_watch_from_the_future_is_out_of_range_with_the_latest_sequence(
    client: Client,
) -> None:
    await create(client, "only@example.com")
    call = client.stub.WatchUsers(
        pb.WatchUsersRequest(after_sequence=10_000), metadata=client.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = rich_details(caught.value)["ErrorInfo"]
    assert info.reason == "SEQUENCE_BEYOND_LATEST"
    assert info.metadata["latest_sequence"] == "1"


@pytest.mark.asyncio
async def test_watch_from_a_negative_sequence_is_invalid(client: Client) -> None:
    call = client.stub.WatchUsers(pb.WatchUsersRequest(after_sequence=-1), metadata=client.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_sync_answers_each_message_before_the_client_half_closes(client: Client) -> None:
    existing = await create(client, "sync-existing@example.com", display_name="Old")
    call = client.stub.SyncUsers(metadata=client.metadata)
    await call.write(pb.SyncUsersRequest(user=new_user("sync-new@example.com", "New")))
    created = await asyncio.wait_for(call.read(), 5)
    await call.write(pb.SyncUsersRequest(user=new_user("SYNC-existing@example.com", "Renamed")))
    updated = await asyncio.wait_for(call.read(), 5)
    await call.write(pb.SyncUsersRequest(user=new_user("sync-existing@example.com", "Renamed")))
    unchanged = await asyncio.wait_for(call.read(), 5)
    await call.write(pb.SyncUsersRequest(user=new_user("broken", "X")))
    failed = await asyncio.wait_for(call.read(), 5)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert [r.index for r in (created, updated, unchanged, failed)] == [0, 1, 2, 3]
    assert created.outcome == pb.SYNC_OUTCOME_CREATED
    assert updated.outcome == pb.SYNC_OUTCOME_UPDATED
    assert updated.user.id == existing.id
    assert updated.user.display_name == "Renamed"
    assert updated.user.email == existing.email
    assert unchanged.outcome == pb.SYNC_OUTCOME_UNCHANGED
    assert unchanged.user == updated.user
    assert failed.outcome == pb.SYNC_OUTCOME_FAILED
    assert failed.status.code == code_pb2.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_sync_flow_control_bounds_server_work_for_a_slow_reader(app: Application) -> None:
    """A client that writes but never reads stalls the server instead of making it buffer.

    The client turns BDP probing off so its HTTP/2 receive window stays at the
    64 KiB default: the bound is then reached within seconds instead of megabytes.
    (The client's own grpc buffers what it writes, so its writes still complete.)
    """
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        metadata = (("authorization", bearer()),)
        call = stub.SyncUsers(metadata=metadata)
        padding = "p" * 90
        total = 5_000

        async def write_all() -> None:
            for index in range(total):
                await call.write(
                    pb.SyncUsersRequest(user=new_user(f"slow{index}@example.com", padding))
                )

        writer = asyncio.create_task(write_all())
        seen: list[int] = []

        async def stalled() -> bool:
            listed = await stub.ListUsers(pb.ListUsersRequest(), metadata=metadata)
            seen.append(listed.total_size)
            return len(seen) >= 3 and seen[-1] == seen[-3] > 0

        try:
            # Polled until the count holds still (0.5 s), then shown to stay so for 1.5 s more.
            await eventually(
                stalled, "the server stalls on a reader that does not read", every=0.25
            )
            processed = seen[-1]
            await asyncio.sleep(1.5)
            again = (await stub.ListUsers(pb.ListUsersRequest(), metadata=metadata)).total_size
            assert again == processed, "the server kept processing without a reader"
            assert 0 < processed < total // 2
            # Reading again lets everything flow: the stall was flow control, not a hang.
            for index in range(total):
                response = await asyncio.wait_for(call.read(), 10)
                assert response.index == index
                assert response.outcome == pb.SYNC_OUTCOME_CREATED
            await writer
        finally:
            call.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_client_leaving_mid_stream_is_not_logged_as_a_server_error(
    app: Application, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails because the client cancelled is the client's choice, not a bug."""
    caplog.set_level(logging.INFO)
    method = "/user.v1.UserService/SyncUsers"
    cancelled_before = handled(method, "Canceled")
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        call = stub.SyncUsers(metadata=(("authorization", bearer()),))
        for index in range(400):
            await call.write(
                pb.SyncUsersRequest(user=new_user(f"gone{index}@example.com", "p" * 90))
            )
        await asyncio.sleep(1)  # the server is now blocked writing to a reader that never reads
        call.cancel()

    async def ended() -> bool:
        return handled(method, "Canceled") > cancelled_before

    await eventually(ended, "the server ended the abandoned SyncUsers call")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    lines = [r for r in caplog.records if r.name == "userservice.recovery"]
    assert lines == []


@pytest.mark.asyncio
async def test_import_reports_the_lowest_rejected_indices_even_from_a_later_flush(
    client: Client,
) -> None:
    await client.stub.CreateUser(
        pb.CreateUserRequest(user=new_user("taken@example.com")), metadata=client.metadata
    )

    async def messages() -> AsyncIterator[pb.ImportUsersRequest]:
        # Rows 0-9 are rejected by the store, at the final flush; 10-1209 by validation, at once.
        for _ in range(10):
            yield pb.ImportUsersRequest(user=new_user("taken@example.com"))
        for index in range(1200):
            yield pb.ImportUsersRequest(user=new_user(f"not-an-email-{index}"))

    result = await client.stub.ImportUsers(messages(), metadata=client.metadata)
    assert result.created_count == 0
    assert result.rejected_count == 1210
    assert [r.index for r in result.rejections] == list(range(1000))
    assert {r.status.code for r in result.rejections[:10]} == {code_pb2.ALREADY_EXISTS}
    assert {r.status.code for r in result.rejections[10:]} == {code_pb2.INVALID_ARGUMENT}
