"""`serve --workers 2` through real processes: shared port, shared store, supervision."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.ports import free_port
from helpers.processes import Samples, env_for, scrape
from helpers.servers import run_userservice
from helpers.tokens import bearer

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc as pb_grpc


def workers_env(database_url: str, port: int, **extra: str) -> dict[str, str]:
    env = env_for(
        database_url,
        port,
        USERSERVICE_WORKERS="2",
        USERSERVICE_LOG_LEVEL="WARNING",
        USERSERVICE_WATCH_PROGRESS_SECONDS="0.2",
        **extra,
    )
    # The parent draws one page-token key for all its workers when none is configured.
    if database_url.startswith("sqlite"):
        env.pop("USERSERVICE_PAGE_TOKEN_SECRET")
    return env


def children(pid: int) -> set[int]:
    """The live child processes of pid."""
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return {int(child) for child in listing.read().split()}


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _tcp_connections() -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of every TCP socket on this machine."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                rows.append((local, remote, int(fields[9])))
    return rows


def serving_worker(client_port: int, server_port: int, workers: set[int]) -> int | None:
    """Return the worker whose socket is the far end of this client's connection."""
    for local, remote, inode in _tcp_connections():
        if local == server_port and remote == client_port:
            for pid in workers:
                if inode in _socket_inodes(pid):
                    return pid
    return None


def client_ports(server_port: int) -> set[int]:
    """Local ports of this test process's connections to the server."""
    mine = _socket_inodes(os.getpid())
    return {
        local
        for local, remote, inode in _tcp_connections()
        if remote == server_port and inode in mine
    }


def running(pid: int) -> bool:
    """Whether pid is a live process (an unreaped zombie has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@contextlib.asynccontextmanager
async def workers_server(
    database_url: str, port: int, **extra: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "userservice", "serve", env=workers_env(database_url, port, **extra)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    await asyncio.sleep(0.1)
        async with asyncio.timeout(10):
            while len(children(process.pid)) < 2:
                await asyncio.sleep(0.05)
        yield process
    finally:
        if process.returncode is None:
            # The workers first: a killed parent would leave them serving, orphaned.
            for pid in children(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


async def one_stub_per_worker(
    stack: contextlib.AsyncExitStack, port: int, workers: set[int]
) -> dict[int, pb_grpc.UserServiceStub]:
    """Open connections until each worker serves one (the kernel picks, by connection)."""
    stubs: dict[int, pb_grpc.UserServiceStub] = {}
    for _ in range(64):
        if len(stubs) == len(workers):
            return stubs
        before = client_ports(port)
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
        )
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        [client_port] = client_ports(port) - before
        worker = serving_worker(client_port, port, workers)
        if worker is not None and worker not in stubs:
            stubs[worker] = pb_grpc.UserServiceStub(channel)
    pytest.fail(f"64 connections never reached every worker of {workers}")


@pytest.mark.asyncio
async def test_a_write_through_one_worker_is_read_and_watched_through_another(
    database_url: str,
) -> None:
    port = free_port()
    metadata = (("authorization", bearer()),)
    async with workers_server(database_url, port) as server, contextlib.AsyncExitStack() as stack:
        workers = children(server.pid)
        assert len(workers) == 2
        first, second = (await one_stub_per_worker(stack, port, workers)).values()
        watch = second.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=metadata)
        created = (
            await first.CreateUser(
                pb.CreateUserRequest(user=user_pb2.User(email="w@example.com", display_name="W")),
                metadata=metadata,
            )
        ).user
        # Read (and cache) on the second worker, change on the first, read again: the
        # second worker's cache must not serve the old user.
        seen = await second.GetUser(pb.GetUserRequest(id=created.id), metadata=metadata)
        assert seen.user == created
        await first.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=created.id, display_name="Changed"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=metadata,
        )
        again = await second.GetUser(pb.GetUserRequest(id=created.id), metadata=metadata)
        assert again.user.display_name == "Changed"
        events = []
        async with asyncio.timeout(10):
            while len(events) < 2:
                message = await watch.read()
                if not message.HasField("progress"):
                    events.append((message.sequence, message.type, message.user.display_name))
        watch.cancel()
        assert events == [(1, 1, "W"), (2, 2, "Changed")]
        # Page tokens are signed with a key every worker shares.
        await first.CreateUser(
            pb.CreateUserRequest(user=user_pb2.User(email="x@example.com", display_name="X")),
            metadata=metadata,
        )
        page = await first.ListUsers(pb.ListUsersRequest(page_size=1), metadata=metadata)
        rest = await second.ListUsers(
            pb.ListUsersRequest(page_size=1, page_token=page.next_page_token), metadata=metadata
        )
        assert len(rest.users) == 1
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0


@pytest.mark.asyncio
async def test_a_delete_through_one_worker_is_watched_and_replayed_erased_through_another(
    sqlite_url: str,
) -> None:
    port = free_port()
    metadata = (("authorization", bearer()),)
    async with workers_server(sqlite_url, port) as server, contextlib.AsyncExitStack() as stack:
        first, second = (await one_stub_per_worker(stack, port, children(server.pid))).values()
        created = (
            await first.CreateUser(
                pb.CreateUserRequest(
                    user=user_pb2.User(email="gone@example.com", display_name="Gone Soon")
                ),
                metadata=metadata,
            )
        ).user
        watch = second.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=metadata)

        async def next_event() -> pb.WatchUsersResponse:
            while True:
                message = await asyncio.wait_for(watch.read(), 10)
                if not message.HasField("progress"):
                    return message

        assert (await next_event()).user.email == "gone@example.com"
        await first.DeleteUser(pb.DeleteUserRequest(id=created.id), metadata=metadata)
        deletion = await next_event()
        watch.cancel()
        assert (deletion.sequence, deletion.type, deletion.user.id) == (2, 3, created.id)
        assert (deletion.user.email, deletion.user.display_name) == ("", "")
        replay = second.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=metadata)
        replayed = [await asyncio.wait_for(replay.read(), 10) for _ in range(2)]
        replay.cancel()
        assert [(m.sequence, m.user.id, m.user.email, m.user.display_name) for m in replayed] == [
            (1, created.id, "", ""),
            (2, created.id, "", ""),
        ]


@pytest.mark.asyncio
async def test_sigterm_drains_every_worker_and_the_parent_exits_0(sqlite_url: str) -> None:
    port = free_port()
    async with workers_server(sqlite_url, port) as server:
        workers = children(server.pid)
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists()


@pytest.mark.asyncio
async def test_workers_of_a_killed_parent_drain_and_exit(sqlite_url: str) -> None:
    port = free_port()
    async with workers_server(sqlite_url, port) as server:
        workers = children(server.pid)
        server.kill()
        await server.wait()
        async with asyncio.timeout(30):
            while any(running(pid) for pid in workers):
                await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_killed_worker_is_restarted_and_the_service_goes_on(sqlite_url: str) -> None:
    port = free_port()
    async with workers_server(sqlite_url, port) as server:
        workers = children(server.pid)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(15):
            while True:
                now = children(server.pid)
                if len(now) == 2 and victim not in now:
                    break
                await asyncio.sleep(0.05)
        assert server.returncode is None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0


@pytest.mark.asyncio
async def test_workers_on_a_taken_port_exit_1_with_one_line(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    async with workers_server(sqlite_url, port) as server:
        other = f"sqlite:///{tmp_path / 'other.db'}"
        code, output = await run_userservice("serve", env=workers_env(other, port))
        assert code == 1, output
        assert "Traceback" not in output, output
        assert "cannot start: cannot listen on 127.0.0.1:" in output
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0


@pytest.mark.asyncio
async def test_workers_need_a_fixed_port(sqlite_url: str) -> None:
    code, output = await run_userservice("serve", env=workers_env(sqlite_url, 0))
    assert code == 2, output
    assert "USERSERVICE_WORKERS above 1 needs a fixed port" in output


def get_user_calls(samples: Samples) -> float:
    """grpc_server_handled_total of GetUser answered OK, as one scrape says."""
    labels = {
        "grpc_type": "unary",
        "grpc_service": "user.v1.UserService",
        "grpc_method": "GetUser",
        "grpc_code": "OK",
    }
    return samples.get(("grpc_server_handled_total", frozenset(labels.items())), 0.0)


def scrape_errors(samples: Samples) -> dict[str, float]:
    """userservice_metrics_scrape_errors_total by worker label."""
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "userservice_metrics_scrape_errors_total"
    }


async def get_user(stub: pb_grpc.UserServiceStub, user_id: str, times: int) -> None:
    metadata = (("authorization", bearer()),)
    for _ in range(times):
        await stub.GetUser(pb.GetUserRequest(id=user_id), metadata=metadata)


@pytest.mark.asyncio
async def test_one_scrape_counts_the_calls_of_every_worker(database_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    metrics = {"USERSERVICE_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    async with (
        workers_server(database_url, port, **metrics) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        first, second = (await one_stub_per_worker(stack, port, children(server.pid))).values()
        created = (
            await first.CreateUser(
                pb.CreateUserRequest(user=user_pb2.User(email="m@example.com", display_name="M")),
                metadata=(("authorization", bearer()),),
            )
        ).user
        # Each stub's connection reaches a different worker: 3 calls on one, 4 on the other.
        await get_user(first, created.id, 3)
        await get_user(second, created.id, 4)
        samples = await scrape(metrics_port)
        assert get_user_calls(samples) == 7
        started = {
            "grpc_type": "unary",
            "grpc_service": "user.v1.UserService",
            "grpc_method": "GetUser",
        }
        assert samples[("grpc_server_started_total", frozenset(started.items()))] == 7
        # Per-process series: the parent's own, and one per worker under its index.
        cpu = {
            dict(labels).get("worker")
            for (name, labels) in samples
            if name == "process_cpu_seconds_total"
        }
        assert cpu == {None, "0", "1"}
        assert scrape_errors(samples) == {"0": 0.0, "1": 0.0}
        # Both workers report SERVING: the merged gauge is 1, not the sum 2.
        whole_server = frozenset({("grpc_service", "")})
        assert samples[("userservice_health_status", whole_server)] == 1.0
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0


@pytest.mark.asyncio
async def test_a_stuck_or_killed_worker_keeps_its_counted_calls(sqlite_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    metrics = {"USERSERVICE_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    async with (
        workers_server(sqlite_url, port, **metrics) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        stubs = await one_stub_per_worker(stack, port, children(server.pid))
        victim, other = stubs
        created = (
            await stubs[other].CreateUser(
                pb.CreateUserRequest(user=user_pb2.User(email="k@example.com", display_name="K")),
                metadata=(("authorization", bearer()),),
            )
        ).user
        await get_user(stubs[victim], created.id, 2)
        await get_user(stubs[other], created.id, 3)
        assert get_user_calls(await scrape(metrics_port)) == 5
        # A worker that cannot answer: the scrape is served anyway, with its last answer.
        os.kill(victim, signal.SIGSTOP)
        try:
            samples = await scrape(metrics_port)
        finally:
            os.kill(victim, signal.SIGKILL)
        assert get_user_calls(samples) == 5
        assert sorted(scrape_errors(samples).values()) == [0.0, 1.0]
        async with asyncio.timeout(15):
            while True:
                now = children(server.pid)
                if len(now) == 2 and victim not in now:
                    break
                await asyncio.sleep(0.05)
        # The dead worker's calls stay counted; the restarted one's and the other's add up.
        for stub in (await one_stub_per_worker(stack, port, now)).values():
            await get_user(stub, created.id, 1)
        assert get_user_calls(await scrape(metrics_port)) == 7
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0
