"""`userservice serve` processes: their environment, start-up, stop and logs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from helpers.ports import free_port
from helpers.servers import suite_env

SERVING = health_pb2.HealthCheckResponse.SERVING


def env_for(database_url: str, port: int | None = None, **extra: str) -> dict[str, str]:
    """Return a server's environment: database_url, 127.0.0.1:port (a free port if None)."""
    settings = {
        "USERSERVICE_LISTEN_ADDRESS": f"127.0.0.1:{free_port() if port is None else port}",
        "USERSERVICE_DATABASE_URL": database_url,
    }
    return suite_env(**{**settings, **extra})


PAGE_TOKEN_SECRET = "replica-page-token-secret-0123456789abcdef"
STARTUP_SECONDS = 20.0
STOP_SECONDS = 10.0


@dataclasses.dataclass
class Replica:
    """One `userservice serve` process and where it listens and logs."""

    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    def log(self) -> str:
        """Return what the process has logged so far."""
        return self.log_path.read_text(errors="replace")


async def start_serving(env: Mapping[str, str], port: int, log_path: Path) -> Replica:
    """Start `userservice serve` with exactly env (listening on port), logging to log_path."""
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "userservice",
            "serve",
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    return Replica(process, port, log_path)


def replica_env(database_url: str, port: int = 0, **extra: str) -> dict[str, str]:
    """Return the environment of a replica: only the settings given here, none inherited."""
    settings = {
        # Shared by every replica, or a page token would only work where it was issued.
        "USERSERVICE_PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
        # Replica races fire bursts from one principal; limits are tested elsewhere.
        "USERSERVICE_RATE_LIMIT_RPS": "0",
        "USERSERVICE_SHUTDOWN_GRACE_SECONDS": "2",
    }
    return env_for(database_url, port, **{**settings, **extra})


def channel_to(port: int, ca_pem: bytes | None) -> grpc.aio.Channel:
    """A channel to 127.0.0.1:port: plaintext, or TLS trusting ca_pem for "localhost"."""
    if ca_pem is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(root_certificates=ca_pem),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )


async def wait_serving(
    replica: Replica, ca_pem: bytes | None = None, *, within: float = STARTUP_SECONDS
) -> None:
    """Wait until the replica's health Check answers SERVING, or fail with its log.

    ca_pem: the replica serves TLS with a certificate for "localhost" issued by it.
    """
    deadline = time.monotonic() + within
    async with channel_to(replica.port, ca_pem) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == SERVING:
                    return
            if time.monotonic() > deadline or replica.process.returncode is not None:
                raise AssertionError(
                    f"replica on port {replica.port} never served:\n{replica.log()}"
                )
            await asyncio.sleep(0.1)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM a process, and kill it if it has not exited within STOP_SECONDS."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()


def assert_stopped_cleanly(replica: Replica) -> None:
    """Check that a replica stopped by SIGTERM exited 0 and logged no error on the way."""
    log = replica.log()
    assert replica.process.returncode == 0, log
    assert '"level":"ERROR"' not in log, log


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Every sample of a scrape, keyed by sample name and labels."""


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def scrape(port: int) -> Samples:
    """Return what a process's /metrics on 127.0.0.1:port serves, keyed by name and labels."""
    text = await asyncio.to_thread(_metrics_text, port)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
