"""Start-up failures and signals through the real `userservice serve` process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from helpers.ports import free_port
from helpers.processes import STARTUP_SECONDS, Replica, env_for, wait_serving
from helpers.servers import eventually, make_settings, run_userservice, running_app
from helpers.tcp_proxy import TcpProxy


def assert_one_clear_line(output: str, expected: str) -> None:
    assert "Traceback" not in output, output
    matching = [line for line in output.splitlines() if expected in line]
    assert len(matching) == 1, output


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "content", "expected"),
    [
        ("USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE", b"{not json", "cannot load"),
        (
            "USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE",
            b"-----BEGIN PUBLIC KEY-----\nxx\n",
            "cannot load",
        ),
        ("USERSERVICE_TLS_CERT_FILE", b"not a certificate", "cannot parse"),
    ],
)
async def test_an_unparsable_file_is_a_configuration_error(
    tmp_path: Path, setting: str, content: bytes, expected: str
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    extra = {setting: str(bad)}
    if setting == "USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE":
        extra["USERSERVICE_AUTH_JWT_SECRET"] = ""
    else:
        extra["USERSERVICE_TLS_KEY_FILE"] = str(bad)
    env = env_for(f"sqlite:///{tmp_path / 'db.sqlite'}", free_port(), **extra)
    code, output = await run_userservice("serve", env=env)
    assert code == 2, output
    assert_one_clear_line(output, expected)
    assert setting in output


@pytest.mark.asyncio
async def test_a_locked_sqlite_file_exits_1_with_one_line(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url)):
        code, output = await run_userservice("serve", env=env_for(sqlite_url, free_port()))
    assert code == 1, output
    assert_one_clear_line(output, "cannot start: database locked")


@pytest.mark.asyncio
async def test_a_taken_metrics_port_exits_1_and_closes_what_it_opened(sqlite_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        port = free_port()
        env = env_for(sqlite_url, port, USERSERVICE_METRICS_ADDRESS=metrics)
        code, output = await run_userservice("serve", env=env)
    assert code == 1, output
    assert_one_clear_line(output, "cannot start: cannot serve metrics on")
    # The database and the gRPC port were released: a normal start works at once.
    async with running_app(make_settings(sqlite_url, listen_address=f"127.0.0.1:{port}")):
        pass


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_schema_not_ready_exits_1(postgres_url: str) -> None:
    env = env_for(postgres_url, free_port(), USERSERVICE_MIGRATE_ON_START="false")
    code, output = await run_userservice("serve", env=env)
    assert code == 1, output
    assert_one_clear_line(output, "cannot start: schema not ready")


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_postgres_authentication_error_exits_1(postgres_url: str) -> None:
    base, _, database = postgres_url.rpartition("/")
    url = base.replace("postgres@", "no_such_role_here@") + "/" + database
    code, output = await run_userservice("serve", env=env_for(url, free_port()))
    assert code == 1, output
    assert_one_clear_line(output, "cannot start:")
    assert "no_such_role_here" in output


async def _serve(*command: str, env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("wb") as log_file:
        return await asyncio.create_subprocess_exec(
            *command, env=env, stdout=log_file, stderr=log_file
        )


async def _ended(process: asyncio.subprocess.Process, within: float) -> int:
    try:
        return await asyncio.wait_for(process.wait(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_sigterm_during_start_up_stops_cleanly(postgres_url: str, tmp_path: Path) -> None:
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        proxy.pause()  # connecting to the database hangs: start-up is under way
        env = env_for(
            proxy.url(postgres_url), free_port(), USERSERVICE_DB_CONNECT_TIMEOUT_SECONDS="30"
        )
        log_path = tmp_path / "server.log"
        process = await _serve(
            sys.executable, "-m", "userservice", "serve", env=env, log_path=log_path
        )

        # Connecting to the database is start-up work: the signal handlers are in place by then.
        async def connecting() -> bool:
            return proxy.accepted > 0

        await eventually(connecting, "the server connects to the database", within=STARTUP_SECONDS)
        assert process.returncode is None, log_path.read_text()
        process.send_signal(signal.SIGTERM)
        code = await _ended(process, 10)
        proxy.resume()
    output = log_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output
    assert "stopped during start-up" in output


@pytest.mark.asyncio
async def test_a_second_signal_during_shutdown_exits_at_once(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = env_for(sqlite_url, port, USERSERVICE_SHUTDOWN_DRAIN_SECONDS="30")
    log_path = tmp_path / "server.log"
    process = await _serve(sys.executable, "-m", "userservice", "serve", env=env, log_path=log_path)
    await wait_serving(Replica(process, port, log_path), within=20)
    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert process.returncode is None  # draining for 30 s
    process.send_signal(signal.SIGINT)
    code = await _ended(process, 5)
    assert code == 128 + signal.SIGINT, log_path.read_text()
    assert "second SIGINT during shutdown" in log_path.read_text()


def _child_of(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root")
@pytest.mark.asyncio
async def test_sigterm_stops_the_server_running_as_pid_1(sqlite_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = env_for(sqlite_url, port)
    log_path = tmp_path / "server.log"
    command = ("unshare", "--pid", "--fork", sys.executable, "-m", "userservice", "serve")
    process = await _serve(*command, env=env, log_path=log_path)
    await wait_serving(Replica(process, port, log_path), within=20)
    server_pid = _child_of(process.pid)
    status = Path(f"/proc/{server_pid}/status").read_text()
    namespace_pids = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    assert namespace_pids.split()[-1] == "1"  # PID 1 in its own namespace
    os.kill(server_pid, signal.SIGTERM)
    code = await _ended(process, 15)
    assert code == 0, log_path.read_text()
    assert "shutting down" in log_path.read_text()
