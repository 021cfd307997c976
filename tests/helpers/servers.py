"""Test helpers: start the real Application on an ephemeral loopback port and call it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from helpers.tokens import (
    ALL_SCOPES,
    TEST_AUDIENCE,
    TEST_ISSUER,
    TEST_JWT_SECRET,
    TEST_PAGE_TOKEN_SECRET,
    bearer,
)
from user.v1 import user_service_pb2, user_service_pb2_grpc
from userservice.config import Settings
from userservice.server import Application

T = TypeVar("T")


def suite_env(**settings: str) -> dict[str, str]:
    """Return this process's environment without USERSERVICE_*, plus the suite's auth settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSERVICE_")}
    env.update(
        {
            "USERSERVICE_AUTH_JWT_SECRET": TEST_JWT_SECRET,
            "USERSERVICE_AUTH_ISSUER": TEST_ISSUER,
            "USERSERVICE_AUTH_AUDIENCE": TEST_AUDIENCE,
            "USERSERVICE_PAGE_TOKEN_SECRET": TEST_PAGE_TOKEN_SECRET,
        }
    )
    env.update(settings)
    return env


def make_settings(database_url: str, **overrides: Any) -> Settings:
    """Return validated settings for a test server on 127.0.0.1:0."""
    base = Settings(
        listen_address="127.0.0.1:0",
        database_url=database_url,
        auth_jwt_secret=TEST_JWT_SECRET,
        auth_issuer=TEST_ISSUER,
        auth_audience=TEST_AUDIENCE,
        page_token_secret=TEST_PAGE_TOKEN_SECRET,
        rate_limit_rps=0,
        shutdown_grace_seconds=5,
        uvloop=False,
        log_level="DEBUG",
    )
    return dataclasses.replace(base, **overrides).validate()


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Application]:
    """Start the real server and stop it with the full shutdown sequence afterwards."""
    app = Application(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@dataclasses.dataclass
class Client:
    """A real channel to a test server, with a stub and default call metadata."""

    channel: grpc.aio.Channel
    stub: user_service_pb2_grpc.UserServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]


@contextlib.asynccontextmanager
async def connect(port: int, scopes: Sequence[str] = ALL_SCOPES) -> AsyncIterator[Client]:
    """Open a channel to 127.0.0.1:port carrying a token with the given scopes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        yield Client(channel, stub, (("authorization", bearer(scopes)),))


def rich_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """Decode the google.rpc details of a failed call, keyed by detail type name."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: dict[str, Any] = {}
    if status is None:
        return found
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Return the field paths of a BadRequest detail."""
    bad_request = rich_details(error).get("BadRequest")
    return [violation.field for violation in bad_request.field_violations] if bad_request else []


async def run_to_end(*argv: str, within: float, **options: Any) -> tuple[int, bytes]:
    """Run argv to its end (killed after `within` s); return its code and stdout+stderr."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, **options
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output


async def run_userservice(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run a `userservice` command to completion (30 s at most); return its code and output."""
    code, output = await run_to_end(sys.executable, "-m", "userservice", *args, within=30, env=env)
    return code, output.decode(errors="replace")


async def eventually(
    check: Callable[[], Awaitable[T]], what: str, *, within: float = 10.0, every: float = 0.05
) -> T:
    """Return check()'s first truthy result, polling every `every` s; fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what} (last: {result!r})")
        await asyncio.sleep(every)


def handled(method: str, code: str) -> float:
    """Return grpc_server_handled_total for a full method name and code name in this process."""
    from prometheus_client import REGISTRY

    service, _, name = method.lstrip("/").partition("/")
    labels = {"grpc_service": service, "grpc_method": name, "grpc_code": code}
    return sum(
        REGISTRY.get_sample_value("grpc_server_handled_total", {"grpc_type": kind, **labels}) or 0.0
        for kind in ("unary", "client_stream", "server_stream", "bidi_stream")
    )


def refused(reason: str) -> float:
    """Return userservice_refusals_total for an ErrorInfo reason in this process."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("userservice_refusals_total", {"reason": reason}) or 0.0


async def next_event(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    timeout: float = 5.0,
) -> user_service_pb2.WatchUsersResponse:
    """Read the next event of a watch within timeout seconds."""
    event = await asyncio.wait_for(call.read(), timeout)
    assert event is not grpc.aio.EOF, "the watch ended"
    return event  # type: ignore[return-value]
