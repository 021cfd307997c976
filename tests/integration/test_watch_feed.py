"""The change feed through the real server: one pump per process, bounded watchers, progress."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from helpers.servers import connect, make_settings, rich_details, running_app
from helpers.users import create, new_user

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc as pb_grpc
from userservice.server import Application


@contextlib.asynccontextmanager
async def serving(database_url: str, **overrides: object) -> AsyncIterator[Application]:
    async with running_app(make_settings(database_url, **overrides)) as app:
        yield app


@pytest.mark.asyncio
async def test_an_idle_watch_gets_progress_with_the_latest_sequence(database_url: str) -> None:
    async with (
        serving(database_url, watch_progress_seconds=0.2) as app,
        connect(app.port) as client,
    ):
        call = client.stub.WatchUsers(pb.WatchUsersRequest(), metadata=client.metadata)
        first = await asyncio.wait_for(call.read(), 5)
        assert first.HasField("progress")
        assert (first.sequence, first.progress.latest_sequence) == (0, 0)
        await create(client, "p@example.com")
        event = await asyncio.wait_for(call.read(), 5)
        assert (event.sequence, event.type, event.HasField("progress")) == (1, 1, False)
        idle = await asyncio.wait_for(call.read(), 5)
        assert idle.progress.latest_sequence == 1
        call.cancel()


@pytest.mark.asyncio
async def test_after_sequence_zero_replays_from_the_oldest_retained_event(
    database_url: str,
) -> None:
    async with serving(database_url, event_retention=5) as app, connect(app.port) as client:
        for index in range(12):
            await create(client, f"r{index}@example.com")
        call = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata
        )
        sequences: list[int] = []
        while not sequences or sequences[-1] < 12:
            sequences.append((await asyncio.wait_for(call.read(), 5)).sequence)
        call.cancel()
        assert sequences[0] > 1, "retention pruned the first events"
        assert sequences == list(range(sequences[0], 13))
        expired = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=1), metadata=client.metadata
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await expired.read()
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert rich_details(caught.value)["ErrorInfo"].reason == "SEQUENCE_EXPIRED"


def live_watchers(app: Application) -> int:
    """How many watchers the process's one pump fans out to."""
    service = app._service
    assert service is not None
    return service._feed.watcher_count


async def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_300_watchers_get_every_write_in_order_for_one_store_read_per_write(
    database_url: str,
) -> None:
    watchers, writes, per_channel = 300, 100, 100
    async with (
        serving(database_url, max_streams_per_principal=watchers + 10) as app,
        contextlib.AsyncExitStack() as stack,
    ):
        # One HTTP/2 connection carries at most 256 concurrent streams (channel_options),
        # and channels with equal arguments share one unless each keeps its own pool.
        writer = await stack.enter_async_context(connect(app.port))
        stubs = [
            pb_grpc.UserServiceStub(
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(
                        f"127.0.0.1:{app.port}", options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
            )
            for _ in range(watchers // per_channel)
        ]
        calls = [
            stubs[index // per_channel].WatchUsers(pb.WatchUsersRequest(), metadata=writer.metadata)
            for index in range(watchers)
        ]
        await wait_until(lambda: live_watchers(app) == watchers)
        repository = app.repository
        assert repository is not None
        reads_before = repository.event_reads  # type: ignore[attr-defined]

        async def collect(call: Any) -> list[int]:
            sequences: list[int] = []
            while len(sequences) < writes:
                message = await call.read()
                if not message.HasField("progress"):
                    sequences.append(message.sequence)
            call.cancel()
            return sequences

        readers = [asyncio.create_task(collect(call)) for call in calls]
        for index in range(writes):
            await create(writer, f"w{index}@example.com")
        async with asyncio.timeout(60):
            received = await asyncio.gather(*readers)
        reads = repository.event_reads - reads_before  # type: ignore[attr-defined]

    assert all(sequences == list(range(1, writes + 1)) for sequences in received)
    # The pump reads each committed event once per wake-up, whatever the watcher count
    # (W queries per write would be 30,000 here).
    assert reads <= writes + 2, reads


async def read_until_it_ends(call: Any, sequences: list[int]) -> None:
    """Append the sequence of every event the call delivers until it ends (30 s at most)."""
    async with asyncio.timeout(30):
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                pytest.fail("the watch ended without an error")
            if not message.HasField("progress"):
                sequences.append(message.sequence)


@pytest.mark.asyncio
async def test_a_watcher_that_stops_reading_is_ended_at_its_bound_and_resumes_without_a_gap(
    database_url: str,
) -> None:
    total = 3000
    # No BDP probing on the slow reader's channel: the stream's flow-control window stays
    # at its initial 64 KiB, so a reader that stops soon stops the server's writes too.
    async with (
        serving(database_url, watch_buffer_events=8) as app,
        connect(app.port) as writer,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}", options=[("grpc.http2.bdp_probe", 0)]
        ) as channel,
    ):
        stub = pb_grpc.UserServiceStub(channel)
        slow = stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=writer.metadata)
        await wait_until(lambda: live_watchers(app) == 1)

        async def requests() -> AsyncIterator[pb.ImportUsersRequest]:
            for index in range(total):
                yield pb.ImportUsersRequest(user=new_user(f"slow{index:05d}@example.com"))

        await writer.stub.ImportUsers(requests(), metadata=writer.metadata)
        # Only now does the slow watcher read: what was sent before it was ended, then
        # the status naming the last sequence it was sent.
        received: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_until_it_ends(slow, received)
        error = ended.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = rich_details(error)["ErrorInfo"]
        assert info.reason == "WATCHER_TOO_SLOW"
        last_sequence = int(info.metadata["last_sequence"])
        assert received == list(range(1, last_sequence + 1))
        assert last_sequence < total, "the watcher was not ended at its bound"

        resumed = stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=last_sequence), metadata=writer.metadata
        )
        async with asyncio.timeout(30):
            while (received[-1] if received else 0) < total:
                message = await resumed.read()
                if not message.HasField("progress"):
                    received.append(message.sequence)
        resumed.cancel()
    assert received == list(range(1, total + 1))
