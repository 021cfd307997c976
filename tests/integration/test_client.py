"""userservice.client against real servers: typed errors, retries, health checking, TLS, tokens."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import jwt
import pytest
from helpers.pki import tls_settings
from helpers.ports import free_port
from helpers.servers import eventually, make_settings, refused, running_app
from helpers.tcp_proxy import TcpProxy
from helpers.tokens import bearer

from user.v1 import user_pb2
from userservice.client import (
    AbortedError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UserServiceClient,
)
from userservice.health import NOT_SERVING, SERVING
from userservice.server import Application

TOKEN = bearer().removeprefix("Bearer ")


@pytest.mark.asyncio
async def test_crud_through_the_client(app: Application) -> None:
    async with UserServiceClient(f"127.0.0.1:{app.port}", token=TOKEN) as client:
        created = await client.create_user("ada@example.com", "Ada", user_pb2.USER_ROLE_EDITOR)
        assert (await client.get_user(created.id)).email == "ada@example.com"
        updated = await client.update_user(
            user_pb2.User(id=created.id, display_name="Ada L.", etag=created.etag),
            ["display_name"],
        )
        assert updated.display_name == "Ada L."
        assert updated.role == user_pb2.USER_ROLE_EDITOR
        assert [user.id async for user in client.iter_users(page_size=1)] == [created.id]
        assert [user.id async for user in client.stream_users()] == [created.id]
        batch = await client.batch_get_users([created.id, str(uuid.uuid4())])
        assert [user.id for user in batch.users] == [created.id]
        with pytest.raises(AbortedError) as stale:
            await client.delete_user(created.id, etag=created.etag)
        assert stale.value.reason == "ETAG_MISMATCH"
        await client.delete_user(created.id, etag=updated.etag)
        with pytest.raises(NotFoundError) as missing:
            await client.get_user(created.id)
        assert missing.value.reason == "USER_NOT_FOUND"
        assert missing.value.domain == "userservice"
        assert missing.value.resource_name == created.id


@pytest.mark.asyncio
async def test_create_sends_a_request_id_so_a_replay_returns_the_first_result(
    app: Application,
) -> None:
    async with UserServiceClient(f"127.0.0.1:{app.port}", token=TOKEN) as client:
        key = str(uuid.uuid4())
        first = await client.create_user("grace@example.com", "Grace", request_id=key)
        again = await client.create_user("grace@example.com", "Grace", request_id=key)
        assert again.id == first.id


@pytest.mark.asyncio
async def test_errors_carry_reason_and_field_violations(app: Application) -> None:
    async with UserServiceClient(f"127.0.0.1:{app.port}", token=TOKEN) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.create_user("not-an-email", "")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_FIELD"
    assert {v.field for v in caught.value.violations} == {"user.email", "user.display_name"}
    async with UserServiceClient(f"127.0.0.1:{app.port}", token="garbage") as client:
        with pytest.raises(UnauthenticatedError):
            await client.get_user(str(uuid.uuid4()))


@pytest.mark.asyncio
async def test_resource_exhausted_waits_out_retry_info(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, rate_limit_rps=4, rate_limit_burst=1)
    async with running_app(settings) as app:
        async with UserServiceClient(f"127.0.0.1:{app.port}", token=TOKEN) as client:
            created = await client.create_user("ada@example.com", "Ada")
            # The bucket is empty: the client waits the RetryInfo delay (~0.25 s) and succeeds.
            assert (await client.get_user(created.id)).id == created.id
        # A deadline shorter than the delay surfaces the error with its RetryInfo.
        async with UserServiceClient(f"127.0.0.1:{app.port}", token=TOKEN, timeout=0.1) as hasty:
            with pytest.raises(ResourceExhaustedError) as caught:
                await hasty.get_user(created.id)
    assert caught.value.retry_delay is not None
    assert 0 < caught.value.retry_delay <= 1


@pytest.mark.asyncio
async def test_a_not_serving_replica_leaves_the_rotation(tmp_path: Path) -> None:
    """Two replicas with their own databases: a user in A only tells who answered."""
    settings_a = make_settings(f"sqlite:///{tmp_path / 'a.db'}")
    settings_b = make_settings(f"sqlite:///{tmp_path / 'b.db'}")
    async with running_app(settings_a) as a, running_app(settings_b) as b:
        async with UserServiceClient(f"127.0.0.1:{a.port}", token=TOKEN) as only_a:
            user = await only_a.create_user("ada@example.com", "Ada")
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        async with UserServiceClient(target, token=TOKEN) as client:

            async def answered_by_a(calls: int) -> int:
                hits = 0
                for _ in range(calls):
                    try:
                        await client.get_user(user.id)
                        hits += 1
                    except NotFoundError:
                        pass
                return hits

            assert 0 < await answered_by_a(20) < 20  # round_robin over both
            await b.health.set(NOT_SERVING)

            async def only_a() -> bool:
                return await answered_by_a(20) == 20

            async def both() -> bool:
                return await answered_by_a(20) < 20

            await eventually(only_a, "B's health Watch took it out of the rotation")
            assert await answered_by_a(20) == 20  # and it stays out
            await b.health.set(SERVING)
            await eventually(both, "B back in the rotation once SERVING")


@pytest.mark.asyncio
async def test_tls_and_mtls_with_call_credentials(
    sqlite_url: str,
    pki: dict[str, Path | bytes],
    tmp_path: Path,
) -> None:
    for name in ("client.pem", "client.key"):
        (tmp_path / name).write_bytes(bytes(pki[name]))  # type: ignore[arg-type]
    settings = make_settings(sqlite_url, **tls_settings(pki, client_ca=True))
    async with running_app(settings) as app:
        async with UserServiceClient(
            f"localhost:{app.port}",
            token=TOKEN,
            root_certificates=str(pki["ca.pem"]),
            client_certificate=tmp_path / "client.pem",
            client_key=tmp_path / "client.key",
        ) as client:
            created = await client.create_user("ada@example.com", "Ada")
            assert (await client.get_user(created.id)).id == created.id
        async with UserServiceClient(
            f"localhost:{app.port}", token=TOKEN, root_certificates=str(pki["ca.pem"]), timeout=2
        ) as no_client_cert:
            with pytest.raises(UnavailableError):
                await no_client_cert.get_user(created.id)


@pytest.mark.asyncio
async def test_a_token_source_rides_as_metadata_over_tls(
    sqlite_url: str,
    pki: dict[str, Path | bytes],
) -> None:
    settings = make_settings(sqlite_url, **tls_settings(pki, client_ca=False))
    async with (
        running_app(settings) as app,
        UserServiceClient(
            f"localhost:{app.port}", token=lambda: TOKEN, root_certificates=str(pki["ca.pem"])
        ) as client,
    ):
        created = await client.create_user("ada@example.com", "Ada")
        assert (await client.get_user(created.id)).id == created.id


@pytest.mark.asyncio
async def test_watch_yields_events_in_order(app: Application) -> None:
    async with UserServiceClient(f"127.0.0.1:{app.port}", token=TOKEN) as client:
        events = client.watch_users(after_sequence=0)
        created = [await client.create_user(f"u{i}@example.com", f"U {i}") for i in range(3)]
        seen = [await asyncio.wait_for(anext(events), 5) for _ in created]
        await events.aclose()
    assert [event.user.id for event in seen] == [user.id for user in created]
    assert [event.sequence for event in seen] == sorted(event.sequence for event in seen)


@pytest.mark.asyncio
async def test_a_dns_target_reaches_the_server(app: Application) -> None:
    # localhost may resolve to ::1 as well, where nothing listens: round_robin skips it.
    async with UserServiceClient(f"dns:///localhost:{app.port}", token=TOKEN) as client:
        created = await client.create_user("ada@example.com", "Ada")
        assert (await client.get_user(created.id)).id == created.id


def _write_token(path: Path, header: str) -> None:
    # Renamed over the old file, as the kubelet updates a projected token.
    temporary = path.with_suffix(".tmp")
    temporary.write_text(header.removeprefix("Bearer ") + "\n")
    temporary.replace(path)


@pytest.mark.asyncio
async def test_a_token_file_rewritten_between_calls_is_picked_up(
    app: Application, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    _write_token(token_file, bearer(["users.read"]))
    async with UserServiceClient(f"127.0.0.1:{app.port}", token_file=token_file) as client:
        with pytest.raises(PermissionDeniedError):
            await client.create_user("ada@example.com", "Ada")
        _write_token(token_file, bearer(["users.read", "users.write"]))
        created = await client.create_user("ada@example.com", "Ada")
        # Briefly absent (a volume swapping it): the token read last is kept.
        token_file.unlink()
        assert (await client.get_user(created.id)).id == created.id
    with pytest.raises(ValueError, match="not both"):
        UserServiceClient("127.0.0.1:1", token=TOKEN, token_file=token_file)


@pytest.mark.asyncio
async def test_a_token_callable_plain_or_async_is_asked_before_every_call(
    app: Application,
) -> None:
    current = [bearer(["users.read"]).removeprefix("Bearer ")]
    asked: list[str] = []

    def plain() -> str:
        asked.append("plain")
        return current[0]

    async def awaited() -> str:
        asked.append("async")
        return current[0]

    for source in (plain, awaited):
        current[0] = bearer(["users.read"]).removeprefix("Bearer ")
        async with UserServiceClient(f"127.0.0.1:{app.port}", token=source) as client:
            with pytest.raises(PermissionDeniedError):
                await client.create_user(f"{source.__name__}@example.com", "Ada")
            current[0] = TOKEN
            created = await client.create_user(f"{source.__name__}@example.com", "Ada")
            assert [user.id async for user in client.stream_users()][-1] == created.id
    assert asked == ["plain"] * 3 + ["async"] * 3


@pytest.mark.asyncio
async def test_a_watch_resumes_across_its_tokens_expiry_without_a_gap_or_a_repeat(
    database_url: str,
) -> None:
    short = bearer(ttl=3).removeprefix("Bearer ")
    current = [short]
    expired_before = refused("TOKEN_EXPIRED")
    settings = make_settings(database_url, auth_leeway_seconds=1.0)
    async with (
        running_app(settings) as app,
        UserServiceClient(f"127.0.0.1:{app.port}", token=lambda: current[0]) as client,
    ):
        events = client.watch_users(after_sequence=0)
        sequences: list[int] = []

        async def write_and_read(first: int) -> None:
            for index in range(first, first + 3):
                await client.create_user(f"u{index}@example.com", f"U {index}")
            while len(sequences) < first + 3:
                event = await asyncio.wait_for(anext(events), 10)
                if not event.HasField("progress"):
                    sequences.append(event.sequence)

        await write_and_read(0)
        # The source refreshes before the token ends, as a kubelet or a token agent does.
        current[0] = TOKEN
        claims = jwt.decode(short, options={"verify_signature": False})
        await asyncio.sleep(max(0.0, claims["exp"] + 1.0 - time.time()) + 0.3)
        await write_and_read(3)
        await events.aclose()
    assert sequences == list(range(1, 7))
    assert refused("TOKEN_EXPIRED") == expired_before + 1, "the watch did not outlive its token"


@pytest.mark.asyncio
async def test_a_watch_whose_source_keeps_the_expired_token_raises(sqlite_url: str) -> None:
    short = bearer(ttl=2).removeprefix("Bearer ")
    asked: list[str] = []

    def same_token() -> str:
        asked.append(short)
        return short

    settings = make_settings(sqlite_url, auth_leeway_seconds=0.5)
    async with (
        running_app(settings) as app,
        UserServiceClient(f"127.0.0.1:{app.port}", token=same_token) as client,
    ):

        async def watch_to_the_end() -> None:
            async with asyncio.timeout(15):
                async for _ in client.watch_users(after_sequence=0):
                    pass

        with pytest.raises(UnauthenticatedError) as ended:
            await watch_to_the_end()
    assert ended.value.reason == "TOKEN_EXPIRED"
    assert len(asked) == 2  # the stream's own token, then once more to see it unchanged


@pytest.mark.asyncio
async def test_a_watch_resumes_across_a_server_restart_from_the_point_the_server_named(
    database_url: str,
) -> None:
    # The watch starts "from now" and is sent no event before its server stops: only the
    # server's last_sequence tells the client where to resume, and events written while no
    # server answers on its port must still arrive, once each and in order.
    port = free_port()
    settings = make_settings(database_url, listen_address=f"127.0.0.1:{port}")
    async with UserServiceClient(f"127.0.0.1:{port}", token=TOKEN) as client:
        async with running_app(settings) as app:
            await client.create_user("before@example.com", "Before")
            events = client.watch_users()
            first = asyncio.create_task(anext(events))
            service = app._service
            assert service is not None
            feed = service._feed

            async def watching() -> bool:
                return feed.watcher_count == 1

            await eventually(watching, "the watch reached the server")
        # Another server on the same database, on a port the client does not know.
        async with (
            running_app(make_settings(database_url)) as other,
            UserServiceClient(f"127.0.0.1:{other.port}", token=TOKEN) as writer,
        ):
            for index in range(3):
                await writer.create_user(f"meanwhile{index}@example.com", f"M {index}")
        async with running_app(settings):
            seen = [await asyncio.wait_for(first, 30)]
            seen += [await asyncio.wait_for(anext(events), 10) for _ in range(2)]
            await client.create_user("after@example.com", "After")
            seen.append(await asyncio.wait_for(anext(events), 10))
            await events.aclose()
    assert [event.sequence for event in seen] == [2, 3, 4, 5]
    assert [event.user.email for event in seen] == [
        "meanwhile0@example.com",
        "meanwhile1@example.com",
        "meanwhile2@example.com",
        "after@example.com",
    ]


@pytest.mark.asyncio
async def test_a_watch_cut_by_the_network_after_a_progress_marker_resumes_after_it(
    database_url: str,
) -> None:
    # A lost connection names no resume point: the client resumes after the last position it
    # was given, here a progress marker's (whose own sequence field is 0, the oldest event).
    settings = make_settings(database_url, watch_progress_seconds=0.2)
    async with (
        running_app(settings) as app,
        TcpProxy("127.0.0.1", app.port) as proxy,
        UserServiceClient(f"127.0.0.1:{proxy.port}", token=TOKEN) as client,
    ):
        for index in range(2):
            await client.create_user(f"u{index}@example.com", f"U {index}")
        events = client.watch_users(after_sequence=0)
        seen = [await asyncio.wait_for(anext(events), 5) for _ in range(3)]
        assert [event.sequence for event in seen[:2]] == [1, 2]
        assert seen[2].progress.latest_sequence == 2
        await proxy.kill_connections()
        await client.create_user("after@example.com", "After")
        following = await asyncio.wait_for(anext(events), 10)
        while following.HasField("progress"):
            following = await asyncio.wait_for(anext(events), 10)
        await events.aclose()
    assert (following.sequence, following.user.email) == (3, "after@example.com")
