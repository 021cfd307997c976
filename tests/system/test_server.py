"""Server lifecycle through real processes and ports: config, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.ports import free_port
from helpers.processes import env_for, start_serving, wait_serving
from helpers.servers import (
    Client,
    connect,
    eventually,
    handled,
    make_settings,
    run_userservice,
    running_app,
)
from helpers.tokens import bearer
from helpers.users import new_user

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc
from userservice.config import DEV_JWT_SECRET
from userservice.health import LIVENESS
from userservice.server import Application, StartupError

SERVICE = "user.v1.UserService"


def service_env(database: Path, port: int, **extra: str) -> dict[str, str]:
    return env_for(f"sqlite:///{database}", port, **{"USERSERVICE_UVLOOP": "true", **extra})


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, Path]]:
    """Start `userservice serve` as a real process and wait until it answers health checks."""
    port = free_port()
    log_path = tmp_path / "server.log"
    env = service_env(
        tmp_path / "db.sqlite",
        port,
        USERSERVICE_SHUTDOWN_DRAIN_SECONDS="1",
        USERSERVICE_SHUTDOWN_GRACE_SECONDS="10",
    )
    replica = await start_serving(env, port, log_path)
    process = replica.process
    try:
        await wait_serving(replica, within=20)
        yield process, port, log_path
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.asyncio
async def test_health_reports_serving_for_server_and_service(app: Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE, LIVENESS):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await health.List(health_pb2.HealthListRequest())
        assert {name: listed.statuses[name].status for name in listed.statuses} == {
            "": health_pb2.HealthCheckResponse.SERVING,
            SERVICE: health_pb2.HealthCheckResponse.SERVING,
            LIVENESS: health_pb2.HealthCheckResponse.SERVING,
        }


async def _reflection_services(port: int) -> tuple[grpc.StatusCode, list[str]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        names: list[str] = []
        # An UNIMPLEMENTED answer can arrive before the request is written.
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            async for response in call:
                names += [service.name for service in response.list_services_response.service]
        return await call.code(), names


@pytest.mark.asyncio
async def test_reflection_is_off_by_default(app: Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        # Nothing is written: the server answers an unknown method from its headers alone, and
        # a request written while that answer is on its way can end the call INTERNAL instead.
        code = await asyncio.wait_for(call.code(), 10)
    assert code == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.asyncio
async def test_reflection_lists_the_service_when_enabled(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url, reflection=True)) as app:
        code, names = await _reflection_services(app.port)
    assert code == grpc.StatusCode.OK
    assert SERVICE in names


@pytest.mark.asyncio
async def test_a_second_server_on_a_taken_port_fails_to_start(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with running_app(make_settings(sqlite_url)) as app:
        taken = make_settings(
            f"sqlite:///{tmp_path / 'other.db'}", listen_address=f"127.0.0.1:{app.port}"
        )
        with pytest.raises(StartupError, match="cannot listen"):
            await Application(taken).start()


@pytest.mark.asyncio
async def test_shutdown_ends_health_watch_after_not_serving(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url)) as app:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE)
        )
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(app.stop())
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 10)
        await channel.close()


@pytest.mark.asyncio
async def test_shutdown_ends_user_watches_with_unavailable(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url)) as app, connect(app.port) as client:
        watch = client.stub.WatchUsers(pb.WatchUsersRequest(), metadata=client.metadata)
        await asyncio.wait_for(watch.initial_metadata(), 5)
        started = time.monotonic()
        await app.stop()
        assert time.monotonic() - started < 4, "a watch held shutdown for the whole grace period"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_deadline_ends_a_watch_with_deadline_exceeded(client: Client) -> None:
    stub = client.stub
    started = time.monotonic()
    call = stub.WatchUsers(pb.WatchUsersRequest(), metadata=client.metadata, timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


@pytest.mark.asyncio
async def test_a_cancelled_import_commits_nothing_it_had_not_finished(client: Client) -> None:
    stub, metadata = client.stub, client.metadata
    method = "/user.v1.UserService/ImportUsers"
    cancelled_before = handled(method, "Canceled")
    call = stub.ImportUsers(metadata=metadata)
    for index in range(10):
        await call.write(pb.ImportUsersRequest(user=new_user(f"cancel{index}@example.com")))
    call.cancel()

    async def ended() -> bool:
        return handled(method, "Canceled") > cancelled_before

    # Once the server has ended the call, nothing more of it can be committed.
    await eventually(ended, "the server ended the cancelled import")
    listed = await stub.ListUsers(pb.ListUsersRequest(), metadata=metadata)
    assert listed.total_size == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"USERSERVICE_REFLECTION": "maybe"}, "USERSERVICE_REFLECTION must be true or false"),
        ({"USERSERVICE_LISTEN_ADDRESS": "nowhere"}, "USERSERVICE_LISTEN_ADDRESS must be host:port"),
        ({"USERSERVICE_DATABASE_URL": "mysql://x"}, "USERSERVICE_DATABASE_URL must start with"),
        ({"USERSERVICE_SHUTDOWN_GRACE_SECONDS": "soon"}, "is not a valid float"),
        (
            {"USERSERVICE_AUTH_JWT_SECRET": DEV_JWT_SECRET},
            "refusing to start with the development JWT secret",
        ),
        ({"USERSERVICE_AUTH_JWT_SECRET": ""}, "authentication is required"),
        (
            {"USERSERVICE_AUTH_ISSUER": "", "USERSERVICE_AUTH_AUDIENCE": ""},
            "USERSERVICE_AUTH_ISSUER and USERSERVICE_AUTH_AUDIENCE are required outside "
            "development",
        ),
        (
            {"USERSERVICE_AUTH_AUDIENCE": "", "USERSERVICE_AUTH_ALLOW_ANY_ISSUER_AUDIENCE": " "},
            "USERSERVICE_AUTH_ISSUER and USERSERVICE_AUTH_AUDIENCE are required outside",
        ),
        (
            {
                "USERSERVICE_DATABASE_URL": "postgresql://127.0.0.1:1/none",
                "USERSERVICE_PAGE_TOKEN_SECRET": "",
            },
            "USERSERVICE_PAGE_TOKEN_SECRET is required on PostgreSQL outside development",
        ),
        (
            {
                "USERSERVICE_AUTH_JWT_SECRET": "",
                "USERSERVICE_AUTH_JWKS_URL": "http://idp.example.com/jwks.json",
            },
            "USERSERVICE_AUTH_JWKS_URL must be an https:// URL",
        ),
    ],
)
async def test_bad_configuration_exits_non_zero_with_a_clear_message(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    code, output = await run_userservice(
        "serve", env=service_env(tmp_path / "db", free_port(), **env)
    )
    assert code == 2
    assert message in output
    assert output.startswith("userservice: configuration error: ")
    assert len(output.strip().splitlines()) == 1, output


@pytest.mark.asyncio
async def test_development_secret_is_accepted_for_a_development_run(tmp_path: Path) -> None:
    env = service_env(
        tmp_path / "db.sqlite", free_port(), USERSERVICE_AUTH_JWT_SECRET=DEV_JWT_SECRET
    )
    code, output = await run_userservice("token", "--subject", "dev", "--dev", "true", env=env)
    assert code == 0
    assert output.count(".") == 2


@pytest.mark.asyncio
async def test_token_refuses_a_ttl_the_server_would_reject(tmp_path: Path) -> None:
    env = service_env(tmp_path / "db.sqlite", free_port())
    code, output = await run_userservice("token", "--subject", "s", "--ttl", "25h", env=env)
    assert code == 2
    assert "--ttl exceeds USERSERVICE_AUTH_MAX_TOKEN_LIFETIME_SECONDS (86400 s)" in output
    code, output = await run_userservice("token", "--subject", "s", "--ttl", "24h", env=env)
    assert code == 0, output


@pytest.mark.asyncio
async def test_migrate_needs_no_auth_settings_and_is_idempotent(tmp_path: Path) -> None:
    env = service_env(tmp_path / "db.sqlite", free_port(), USERSERVICE_AUTH_JWT_SECRET="")
    code, output = await run_userservice("migrate", env=env)
    assert code == 0, output
    assert "0001_init" in output
    code, output = await run_userservice("migrate", env=env)
    assert code == 0, output
    assert "0001_init" not in output


@pytest.mark.asyncio
async def test_port_in_use_exits_non_zero(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, output = await run_userservice("serve", env=service_env(tmp_path / "db.sqlite", port))
    assert code == 1
    assert "cannot listen" in output


@pytest.mark.asyncio
async def test_sigterm_lets_in_flight_rpcs_finish_refuses_new_ones_and_exits_zero(
    served: tuple[asyncio.subprocess.Process, int, Path],
) -> None:
    process, port, log_path = served
    metadata = (("authorization", bearer()),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        in_flight = stub.ImportUsers(metadata=metadata)
        await in_flight.write(pb.ImportUsersRequest(user=new_user("inflight1@example.com")))
        process.send_signal(signal.SIGTERM)

        async def going_away() -> bool:
            status = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            return status.status == health_pb2.HealthCheckResponse.NOT_SERVING

        # During the drain delay the server still answers, but says it is going away.
        await eventually(going_away, "health NOT_SERVING after SIGTERM", within=5)

        async def refused() -> grpc.StatusCode | None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
                try:
                    await user_service_pb2_grpc.UserServiceStub(fresh).GetUser(
                        pb.GetUserRequest(id="0" * 8 + "-0000-7000-8000-" + "0" * 12),
                        metadata=metadata,
                        timeout=2,
                    )
                except grpc.aio.AioRpcError as error:
                    return error.code() if error.code() is grpc.StatusCode.UNAVAILABLE else None
            return None

        # After the drain the server refuses new work while the import is still open.
        await eventually(refused, "new calls refused UNAVAILABLE after the drain", within=10)
        await in_flight.write(pb.ImportUsersRequest(user=new_user("inflight2@example.com")))
        await in_flight.done_writing()
        result = await asyncio.wait_for(in_flight, 10)
        assert result.created_count == 2
    assert await asyncio.wait_for(process.wait(), 15) == 0
    log = log_path.read_text()
    assert '"message":"shutting down"' in log
    assert '"message":"stopped"' in log
