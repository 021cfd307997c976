"""A stream lives no longer than its token: it ends UNAUTHENTICATED at the token's exp + leeway.

The API's streams run on the real server over both stores; the interceptor's handling of both
handler styles (async generator and read()/write()) runs on the interceptor harness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest
from helpers.interceptor_harness import (
    BIDI_STREAM,
    BY_KIND,
    CLIENT_STREAM,
    KINDS,
    SERVER_STREAM,
    SERVICE,
    STYLE_KEY,
    AccessLog,
    Harness,
    serve,
    settings,
)
from helpers.servers import connect, handled, make_settings, refused, rich_details, running_app
from helpers.tokens import bearer, token
from helpers.users import new_user

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc as pb_grpc

LEEWAY = 1.0
# The end must come at the token's end, give or take a loaded machine's event-loop lag.
EARLY, LATE = 0.1, 1.0
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def ends_at(raw: str, leeway: float = LEEWAY) -> float:
    """Return the instant a token (or an authorization header value) stops being accepted."""
    claims = jwt.decode(raw.removeprefix("Bearer "), options={"verify_signature": False})
    return float(claims["exp"]) + leeway


async def sleep_until(instant: float) -> None:
    """Sleep until the wall clock reaches instant."""
    await asyncio.sleep(max(0.0, instant - time.time()))


async def read_until_error(call: Any, received: list[Any]) -> tuple[grpc.aio.AioRpcError, float]:
    """Read a response stream into received until it fails (30 s at most); return how, when."""
    async with asyncio.timeout(30):
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                received.append(message)
        except grpc.aio.AioRpcError as error:
            return error, time.time()
    raise AssertionError(f"the stream ended OK after {len(received)} messages")


def assert_expired(error: grpc.aio.AioRpcError, ended: float, deadline: float) -> None:
    """Assert the call ended TOKEN_EXPIRED, as an auth failure does, at deadline."""
    assert error.code() is UNAUTHENTICATED, error
    assert error.details() == "bearer token expired"
    assert rich_details(error)["ErrorInfo"].reason == "TOKEN_EXPIRED"
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["www-authenticate"] == 'Bearer realm="userservice", error="invalid_token"'
    assert deadline - EARLY <= ended <= deadline + LATE, ended - deadline


def sequences(events: list[pb.WatchUsersResponse]) -> list[int]:
    """Return the sequences of the events among messages (progress markers left out)."""
    return [event.sequence for event in events if not event.HasField("progress")]


async def create(stub: pb_grpc.UserServiceStub, metadata: Any, email: str) -> None:
    """Create one user."""
    await stub.CreateUser(pb.CreateUserRequest(user=new_user(email)), metadata=metadata)


async def total_users(stub: pb_grpc.UserServiceStub, metadata: Any) -> int:
    """Return how many users exist."""
    return (await stub.ListUsers(pb.ListUsersRequest(), metadata=metadata)).total_size


@pytest.mark.asyncio
async def test_a_watch_ends_when_its_token_expires_and_one_with_a_valid_token_goes_on(
    database_url: str,
) -> None:
    short = bearer(ttl=3)
    deadline = ends_at(short)
    async with (
        running_app(make_settings(database_url, auth_leeway_seconds=LEEWAY)) as app,
        connect(app.port) as client,
    ):
        expiring = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=0), metadata=(("authorization", short),)
        )
        lasting = client.stub.WatchUsers(
            pb.WatchUsersRequest(after_sequence=0), metadata=client.metadata
        )
        seen: list[pb.WatchUsersResponse] = []
        reader = asyncio.create_task(read_until_error(expiring, seen))
        await create(client.stub, client.metadata, "before@example.com")
        await sleep_until(deadline + 0.1)
        # Created once the token has ended: the expiring watch must not deliver it.
        await create(client.stub, client.metadata, "after@example.com")
        error, ended = await reader
        assert_expired(error, ended, deadline)
        assert sequences(seen) == [1]
        received: list[int] = []
        async with asyncio.timeout(10):
            while received != [1, 2]:
                message = await lasting.read()
                received += sequences([message])
        lasting.cancel()


@pytest.mark.asyncio
async def test_an_export_held_open_by_a_slow_reader_ends_when_its_token_expires(
    database_url: str,
) -> None:
    total = 3000
    async with (
        running_app(make_settings(database_url, auth_leeway_seconds=LEEWAY)) as app,
        connect(app.port) as client,
        # No BDP probing: the 64 KiB window stays, so the server soon waits on the reader.
        grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}", options=[("grpc.http2.bdp_probe", 0)]
        ) as channel,
    ):

        async def users() -> AsyncIterator[pb.ImportUsersRequest]:
            for index in range(total):
                yield pb.ImportUsersRequest(user=new_user(f"u{index:05d}@example.com", "p" * 90))

        await client.stub.ImportUsers(users(), metadata=client.metadata)
        expired_before = refused("TOKEN_EXPIRED")
        short = bearer(ttl=3)
        deadline = ends_at(short)
        call = pb_grpc.UserServiceStub(channel).StreamUsers(
            pb.StreamUsersRequest(), metadata=(("authorization", short),)
        )
        received: list[pb.StreamUsersResponse] = []
        hurry = asyncio.Event()

        async def read_slowly() -> tuple[grpc.aio.AioRpcError, float]:
            while not hurry.is_set():
                message = await call.read()
                assert message is not grpc.aio.EOF, "the export ran to its end"
                received.append(message)
                await asyncio.sleep(0.02)
            return await read_until_error(call, received)

        reader = asyncio.create_task(read_slowly())
        try:
            # The server ends the stream (refuses it further) at the token's end, while the
            # reader is still far behind.
            async with asyncio.timeout(deadline + 10 - time.time()):
                while refused("TOKEN_EXPIRED") == expired_before:
                    await asyncio.sleep(0.01)
            assert deadline - EARLY <= time.time() <= deadline + LATE
            # Ids grow with time and the export goes in id order: had the export gone on, this
            # user would be its last.
            await create(client.stub, client.metadata, "late@example.com")
            hurry.set()
            error, _ = await reader
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        # What was in flight when the token ended still arrives; then the status.
        assert error.code() is UNAUTHENTICATED
        assert rich_details(error)["ErrorInfo"].reason == "TOKEN_EXPIRED"
        assert 0 < len(received) < total
        assert "late@example.com" not in {response.user.email for response in received}


@pytest.mark.asyncio
async def test_an_import_kept_open_ends_when_its_token_expires(database_url: str) -> None:
    short = bearer(ttl=3)
    deadline = ends_at(short)
    release = asyncio.Event()
    async with (
        running_app(make_settings(database_url, auth_leeway_seconds=LEEWAY)) as app,
        connect(app.port) as client,
    ):

        async def users() -> AsyncIterator[pb.ImportUsersRequest]:
            yield pb.ImportUsersRequest(user=new_user("first@example.com"))
            await sleep_until(deadline + 0.3)
            yield pb.ImportUsersRequest(user=new_user("late@example.com"))
            await release.wait()

        call = client.stub.ImportUsers(users(), metadata=(("authorization", short),))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await asyncio.wait_for(call, 30)
            assert_expired(raised.value, time.time(), deadline)
        finally:
            release.set()
            call.cancel()
        # The batch being read when the stream ended is not committed, the late user least of all.
        assert await total_users(client.stub, client.metadata) == 0


@pytest.mark.asyncio
async def test_a_sync_kept_open_ends_when_its_token_expires(database_url: str) -> None:
    short = bearer(ttl=3)
    deadline = ends_at(short)
    async with (
        running_app(make_settings(database_url, auth_leeway_seconds=LEEWAY)) as app,
        connect(app.port) as client,
    ):
        call = client.stub.SyncUsers(metadata=(("authorization", short),))
        await call.write(pb.SyncUsersRequest(user=new_user("first@example.com")))
        answered = [await call.read()]
        assert answered[0].outcome == pb.SYNC_OUTCOME_CREATED
        error, ended = await read_until_error(call, answered)
        assert_expired(error, ended, deadline)
        # The call is over: what the client would send next goes nowhere.
        with pytest.raises(asyncio.InvalidStateError):
            await call.write(pb.SyncUsersRequest(user=new_user("late@example.com")))
        assert await total_users(client.stub, client.metadata) == 1


async def hold_open(
    harness: Harness, kind: str, style: str, raw: str, release: asyncio.Event
) -> tuple[grpc.aio.AioRpcError, float, list[bytes]]:
    """Open a stream of kind that stays open (a slow handler, or requests never half-closed).

    Return how and when it failed, and what it delivered first.
    """

    async def requests() -> AsyncIterator[bytes]:
        yield b"x"
        await release.wait()

    metadata = ((STYLE_KEY, style), ("authorization", f"Bearer {raw}"))
    path = f"/{SERVICE}/{BY_KIND[kind]}"
    untyped: Any = harness.channel
    responses: list[bytes] = []
    if kind == SERVER_STREAM:
        call = untyped.unary_stream(path)(b"slow", metadata=metadata)
    elif kind == BIDI_STREAM:
        call = untyped.stream_stream(path)(requests(), metadata=metadata)
    else:
        call = untyped.stream_unary(path)(requests(), metadata=metadata)
        try:
            async with asyncio.timeout(30):
                responses.append(await call)
        except grpc.aio.AioRpcError as error:
            return error, time.time(), responses
        raise AssertionError("the client stream ended OK")
    error, ended = await read_until_error(call, responses)
    return error, ended, responses


@pytest.mark.asyncio
@pytest.mark.parametrize("style", ["generator", "writer"])
@pytest.mark.parametrize("kind", [SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM])
async def test_every_kind_of_stream_in_either_style_ends_at_its_tokens_end(
    kind: str, style: str
) -> None:
    leeway = 0.5
    raw, lasting = token(ttl=2), token()
    deadline = ends_at(raw, leeway)
    release = asyncio.Event()
    async with serve(settings(auth_leeway_seconds=leeway)) as harness:
        untouched = asyncio.create_task(hold_open(harness, kind, style, lasting, release))
        try:
            error, ended, responses = await hold_open(harness, kind, style, raw, release)
            assert error.code() is UNAUTHENTICATED
            assert rich_details(error)["ErrorInfo"].reason == "TOKEN_EXPIRED"
            assert deadline - EARLY <= ended <= deadline + LATE
            assert responses == ([b"x"] if kind == BIDI_STREAM else [])
            await asyncio.sleep(0.2)
            assert not untouched.done(), "a stream whose token is valid was ended"
        finally:
            release.set()
            untouched.cancel()
            await asyncio.gather(untouched, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_stream_ended_by_its_token_is_logged_and_counted(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    method = f"/{SERVICE}/WatchUsers"
    assert KINDS["WatchUsers"] == SERVER_STREAM
    counted = handled(method, "Unauthenticated")
    async with serve(settings(auth_leeway_seconds=0.5)) as harness:
        result = await harness.call("WatchUsers", b"slow", token=token("watcher", ttl=1))
    assert result.code is UNAUTHENTICATED
    assert result.reason == "TOKEN_EXPIRED"
    line = await log.one("WatchUsers")
    assert (line["code"], line["reason"], line["principal"]) == (
        "UNAUTHENTICATED",
        "TOKEN_EXPIRED",
        "watcher",
    )
    assert handled(method, "Unauthenticated") == counted + 1


@pytest.mark.asyncio
async def test_a_status_still_being_sent_when_the_token_ends_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    leeway = 0.5
    raw = token(ttl=2)
    deadline = ends_at(raw, leeway)
    metadata = (("authorization", f"Bearer {raw}"),)
    async with (
        serve(settings(auth_leeway_seconds=leeway)) as harness,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{harness.port}", options=[("grpc.http2.bdp_probe", 0)]
        ) as channel,
    ):
        untyped: Any = channel
        call = untyped.unary_stream(f"/{SERVICE}/WatchUsers")(b"fill-then-abort", metadata=metadata)
        # Nothing is read until the token has ended: the handler's NOT_FOUND is then still
        # waiting behind the message flow control holds.
        await sleep_until(deadline + 0.3)
        error, _ = await read_until_error(call, [])
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert rich_details(error)["ErrorInfo"].reason == "USER_NOT_FOUND"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
