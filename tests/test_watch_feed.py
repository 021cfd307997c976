"""The change feed through the real server: one pump per process, bounded watchers, progress."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from support import Client, connect, make_settings, new_user, rich_details, running_app

from user.v1 import user_service_pb2 as pb
from userservice.server import Application


@contextlib.asynccontextmanager
async def serving(database_url: str, **overrides: object) -> AsyncIterator[Application]:
    async with running_app(make_settings(database_url, **overrides)) as app:
        yield app


async def create(client: Client, email: str) -> None:
    await client.stub.CreateUser(
        pb.CreateUserRequest(user=new_user(email)), metadata=client.metadata
    )


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
