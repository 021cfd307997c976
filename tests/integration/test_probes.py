"""The probe listener and the liveness entry, through the real server and a real process."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from helpers.servers import make_settings, rich_details, running_app, suite_env
from helpers.tokens import bearer

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc
from userservice.config import ConfigError
from userservice.health import LIVENESS
from userservice.server import Application, StartupError

SERVICE = "user.v1.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROBE = "127.0.0.1:0"


async def check(port: int, service: str, timeout: float = 5) -> int:
    """Return the status of service as a kubelet probe asks for it: a new plaintext channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        return int(reply.status)


@pytest.mark.asyncio
async def test_the_probe_listener_serves_health_alone(database_url: str) -> None:
    settings = make_settings(
        database_url, probe_address=PROBE, reflection=True, max_public_streams_per_peer=1
    )
    async with running_app(settings) as app:
        assert app.probe_port
        assert app.probe_port != app.port
        for service in ("", SERVICE, LIVENESS):
            assert await check(app.probe_port, service) == SERVING
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.probe_port}") as probe,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as main,
        ):
            health = health_pb2_grpc.HealthStub(probe)
            listed = await health.List(health_pb2.HealthListRequest(), timeout=5)
            assert set(listed.statuses) == {"", SERVICE, LIVENESS}
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
            assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
            # Neither the API nor reflection is served there, even with a valid token.
            with pytest.raises(grpc.aio.AioRpcError) as api:
                await user_service_pb2_grpc.UserServiceStub(probe).GetUser(
                    pb.GetUserRequest(id="x"), metadata=(("authorization", bearer()),), timeout=5
                )
            assert api.value.code() is grpc.StatusCode.UNIMPLEMENTED
            reflection = reflection_pb2_grpc.ServerReflectionStub(probe).ServerReflectionInfo()
            with pytest.raises(grpc.aio.AioRpcError) as reflected:
                await reflection.read()
            assert reflected.value.code() is grpc.StatusCode.UNIMPLEMENTED
            # Its Watch streams count in the same public budget as the main port's.
            held = health_pb2_grpc.HealthStub(main).Watch(health_pb2.HealthCheckRequest())
            assert (await asyncio.wait_for(held.read(), 5)).status == SERVING
            refused = health.Watch(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await asyncio.wait_for(refused.read(), 5)
            assert over.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rich_details(over.value)["ErrorInfo"].reason == "TOO_MANY_STREAMS"
            held.cancel()


@pytest.mark.asyncio
async def test_liveness_stays_serving_through_the_drain_and_stops_with_the_server(
    database_url: str,
) -> None:
    settings = make_settings(database_url, probe_address=PROBE, shutdown_drain_seconds=3)
    app = Application(settings)
    await app.start()
    assert app.probe_port is not None
    stopping = asyncio.create_task(app.stop())
    try:
        # Readiness turns NOT_SERVING at once, and liveness stays SERVING through the drain:
        # a pod being drained must not be restarted.
        for _ in range(100):
            if await check(app.probe_port, SERVICE) == NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert await check(app.probe_port, "") == NOT_SERVING
        assert await check(app.probe_port, LIVENESS) == SERVING
        assert not stopping.done(), "the drain ended before liveness was checked"
        await asyncio.wait_for(stopping, 15)
    finally:
        await stopping
    # The probe listener stopped with the server.
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await check(app.probe_port, LIVENESS, timeout=2)
    assert gone.value.code() is grpc.StatusCode.UNAVAILABLE


# Starts the real application in its own process, then, on the test's word, blocks its event
# loop as a handler calling blocking code would: a test harness, not a hook in the service.
STUCK_LOOP = """
import asyncio, sys, time
from userservice.config import load_settings
from userservice.server import Application

async def main() -> None:
    app = Application(load_settings())
    await app.start()
    print(app.port, app.probe_port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("blocking", flush=True)
    time.sleep(60)

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_a_stuck_event_loop_fails_liveness_while_tcp_still_connects(
    tmp_path: Path,
) -> None:
    env = suite_env(
        USERSERVICE_DATABASE_URL=f"sqlite:///{tmp_path / 'userservice.db'}",
        USERSERVICE_LISTEN_ADDRESS="127.0.0.1:0",
        USERSERVICE_PROBE_ADDRESS=PROBE,
    )
    with (tmp_path / "server.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            STUCK_LOOP,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        ports = await asyncio.wait_for(process.stdout.readline(), 30)
        assert ports, (tmp_path / "server.log").read_text()
        _, probe_port = map(int, ports.split())
        assert await check(probe_port, LIVENESS) == SERVING
        process.stdin.write(b"block\n")
        await process.stdin.drain()
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"blocking\n"
        with pytest.raises(grpc.aio.AioRpcError) as stuck:
            await check(probe_port, LIVENESS, timeout=2)
        assert stuck.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # A tcpSocket probe would still pass: grpc's own threads accept connections.
        with socket.create_connection(("127.0.0.1", probe_port), timeout=2):
            pass
        assert process.returncode is None
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def test_public_budget_and_probe_settings_are_validated(sqlite_url: str) -> None:
    with pytest.raises(ConfigError, match="USERSERVICE_MAX_PUBLIC_STREAMS_PER_PEER must not be"):
        make_settings(sqlite_url, max_public_streams=10, max_public_streams_per_peer=11)
    with pytest.raises(ConfigError, match="USERSERVICE_MAX_PUBLIC_STREAMS must be positive"):
        make_settings(sqlite_url, max_public_streams=0)
    with pytest.raises(ConfigError, match="USERSERVICE_PROBE_ADDRESS must be host:port"):
        make_settings(sqlite_url, probe_address="50052")
    with pytest.raises(ConfigError, match="USERSERVICE_PROBE_ADDRESS needs USERSERVICE_WORKERS=1"):
        make_settings(sqlite_url, probe_address=PROBE, listen_address="127.0.0.1:50051", workers=2)


@pytest.mark.asyncio
async def test_a_taken_probe_port_fails_the_start_and_releases_the_main_port(
    sqlite_url: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = Application(make_settings(sqlite_url, probe_address=f"127.0.0.1:{port}"))
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await app.start()
    # The main server it had started is stopped again: its port can be bound at once.
    assert app.port
    with socket.socket() as again:
        again.bind(("127.0.0.1", app.port))
