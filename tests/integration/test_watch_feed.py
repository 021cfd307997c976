"""The change feed through the real server: one pump, one shared window, catch-up, progress."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from helpers.servers import connect, make_settings, rich_details, running_app
from helpers.users import create, import_users

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


async def read_sequences(call: Any, until: int, received: list[int]) -> None:
    """Append the sequence of every event the call delivers until it has sent until (60 s)."""
    async with asyncio.timeout(60):
        while (received[-1] if received else 0) < until:
            message = await call.read()
            if message is grpc.aio.EOF:
                pytest.fail("the watch ended without an error")
            if not message.HasField("progress"):
                received.append(message.sequence)


def pages_read(app: Application) -> int:
    """How many store pages the process's watchers read while replaying or catching up."""
    service = app._service
    assert service is not None
    return service._feed.pages_read


def slow_channel(port: int) -> grpc.aio.Channel:
    """A channel whose streams' flow-control window stays at its initial 64 KiB.

    Without BDP probing a reader that stops soon stops the server's writes too, so the
    server-side watcher really falls behind instead of grpc buffering for it.
    """
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)])


@pytest.mark.asyncio
async def test_a_watcher_that_pauses_far_past_the_window_then_reads_on_gets_everything(
    database_url: str,
) -> None:
    total = 3000
    async with (
        serving(database_url, watch_buffer_events=8) as app,
        connect(app.port) as writer,
        slow_channel(app.port) as channel,
    ):
        stub = pb_grpc.UserServiceStub(channel)
        slow = stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=writer.metadata)
        await wait_until(lambda: live_watchers(app) == 1)
        pages_before = pages_read(app)
        await import_users(writer, total, "slow")
        # Only now does the slow watcher read: it is thousands of events behind a window of 8.
        received: list[int] = []
        await read_sequences(slow, total, received)
        slow.cancel()
        assert pages_read(app) > pages_before, "the watcher never read the store to catch up"
    assert received == list(range(1, total + 1))


def store_reads_peak(app: Application) -> int:
    """The most store reads the process's watchers ever had in flight at once."""
    service = app._service
    assert service is not None
    return service._feed.store_reads_peak


@pytest.mark.asyncio
async def test_a_storm_of_replaying_watchers_reads_the_store_a_few_at_a_time(
    database_url: str,
) -> None:
    watchers, total = 40, 1500
    async with (
        serving(
            database_url, watch_buffer_events=8, max_streams_per_principal=watchers + 10
        ) as app,
        connect(app.port) as client,
    ):
        await import_users(client, total, "storm")
        # Every watcher asks for the whole history at once, as a fleet's resumed watches do.
        calls = [
            client.stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata)
            for _ in range(watchers)
        ]
        received: list[list[int]] = [[] for _ in calls]
        await asyncio.gather(
            *(read_sequences(call, total, into) for call, into in zip(calls, received, strict=True))
        )
        for call in calls:
            call.cancel()
        peak = store_reads_peak(app)
    assert all(sequences == list(range(1, total + 1)) for sequences in received)
    assert 1 <= peak <= 4, peak


@pytest.mark.asyncio
async def test_a_watcher_whose_position_falls_out_of_retention_is_ended_out_of_range(
    database_url: str,
) -> None:
    total, retention = 3000, 100
    async with (
        serving(database_url, watch_buffer_events=8, event_retention=retention) as app,
        connect(app.port) as writer,
        slow_channel(app.port) as channel,
    ):
        stub = pb_grpc.UserServiceStub(channel)
        slow = stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=writer.metadata)
        await wait_until(lambda: live_watchers(app) == 1)
        await import_users(writer, total, "gone")
        received: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_sequences(slow, total, received)
    error = ended.value
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert rich_details(error)["ErrorInfo"].reason == "SEQUENCE_EXPIRED"
    # What it was sent before its position was pruned came in order, with no gap.
    assert received == list(range(1, len(received) + 1))
    assert len(received) < total - retention


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_reader_on_replica_b_sees_all_of_an_import_through_replica_a(
    postgres_url: str,
) -> None:
    # A window of 16 on B: the reader falls out of it and catches up from the store, many
    # times, while the import runs (system/test_replicas.py runs it with two processes and
    # the default window).
    total = 5000
    async with (
        serving(postgres_url) as replica_a,
        serving(postgres_url, watch_buffer_events=16) as replica_b,
        connect(replica_a.port) as writer,
        connect(replica_b.port) as reader,
    ):
        call = reader.stub.WatchUsers(pb.WatchUsersRequest(), metadata=reader.metadata)
        await wait_until(lambda: live_watchers(replica_b) == 1)
        received: list[int] = []
        # The reader reads as fast as it can while the import runs, not after it.
        reading = asyncio.create_task(read_sequences(call, total, received))
        await import_users(writer, total, "burst")
        await reading
        call.cancel()
    assert received == list(range(1, total + 1))


@pytest.mark.asyncio
async def test_a_watch_ended_by_shutdown_names_the_last_sequence_it_was_sent(
    database_url: str,
) -> None:
    async with serving(database_url) as app, connect(app.port) as client:
        for index in range(2):
            await create(client, f"s{index}@example.com")
        sent_one = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=1), metadata=client.metadata
        )
        assert (await asyncio.wait_for(sent_one.read(), 5)).sequence == 2
        # From now, and sent nothing: its position is where it began.
        sent_none = client.stub.WatchUsers(pb.WatchUsersRequest(), metadata=client.metadata)
        await wait_until(lambda: live_watchers(app) == 2)
        stopping = asyncio.create_task(app.stop())
        ends: list[grpc.aio.AioRpcError] = []
        for call in (sent_one, sent_none):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 10)
            ends.append(ended.value)
        await stopping
    for error in ends:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        info = rich_details(error)["ErrorInfo"]
        assert (info.reason, info.metadata["last_sequence"]) == ("SHUTTING_DOWN", "2")
