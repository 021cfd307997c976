"""Admission through the real server: per-principal and global limits, health never shed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from interceptor_harness import AccessLog
from prometheus_client import REGISTRY
from support import bearer, eventually, handled, make_settings, new_user, rich_details, running_app

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc

WATCH = "/user.v1.UserService/WatchUsers"


@contextlib.asynccontextmanager
async def watches(
    stub: user_service_pb2_grpc.UserServiceStub, subject: str, count: int
) -> AsyncIterator[list[Any]]:
    """Open count WatchUsers streams as subject, each established (initial metadata seen)."""
    metadata = (("authorization", bearer(subject=subject)),)
    calls = [stub.WatchUsers(pb.WatchUsersRequest(), metadata=metadata) for _ in range(count)]
    try:
        for call in calls:
            await asyncio.wait_for(call.initial_metadata(), 5)
        yield calls
    finally:
        for call in calls:
            call.cancel()


async def refused_watch(stub: user_service_pb2_grpc.UserServiceStub, subject: str) -> Any:
    call = stub.WatchUsers(
        pb.WatchUsersRequest(), metadata=(("authorization", bearer(subject=subject)),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 5)
    return caught.value


def handled_count(method: str, code: str) -> float:
    """Sum every counter sample for method with this code, whatever the metric's name."""
    service, _, name = method.lstrip("/").partition("/")
    total = 0.0
    for family in REGISTRY.collect():
        if family.type != "counter":
            continue
        for sample in family.samples:
            labels = set(sample.labels.values())
            if {service, name, code} <= labels and sample.name.endswith("_total"):
                total += sample.value
    return total


def refusals(log: AccessLog) -> list[dict[str, Any]]:
    log._drain()
    return [
        line for line in log.lines
        if line["method"] == WATCH and line["code"] == "RESOURCE_EXHAUSTED"
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_one_principal_over_its_limit_while_health_and_others_go_on(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    settings = make_settings(sqlite_url, max_streams_per_principal=3, max_open_streams=10)
    refused_before = handled_count(WATCH, "ResourceExhausted")
    closed_before = handled(WATCH, "Canceled")
    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        async with watches(stub, "flooder", 3):
            error = await refused_watch(stub, "flooder")
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            details = rich_details(error)
            assert details["ErrorInfo"].reason == "TOO_MANY_STREAMS"
            assert details["ErrorInfo"].metadata["limit"] == "max_streams_per_principal"
            assert details["RetryInfo"].retry_delay.seconds == 1
            # Health Check and Watch are never shed, nor is anyone else.
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await asyncio.wait_for(watch.read(), 5)).status == reply.status
            watch.cancel()
            other = (("authorization", bearer(subject="other")),)
            created = await stub.CreateUser(
                pb.CreateUserRequest(user=new_user("other@example.com")), metadata=other
            )
            assert created.user.id
            async with watches(stub, "other", 1):
                pass

        async def all_closed() -> bool:
            return handled(WATCH, "Canceled") >= closed_before + 4

        # Streams closed give their slots back (once the server has ended them).
        await eventually(all_closed, "the four watches ended on the server")
        async with watches(stub, "flooder", 3):
            pass
    refused = refusals(log)
    assert len(refused) == 1
    assert refused[0]["reason"] == "TOO_MANY_STREAMS"
    assert refused[0]["principal"] == "flooder"
    assert handled_count(WATCH, "ResourceExhausted") == refused_before + 1


@pytest.mark.asyncio
async def test_the_global_stream_limit_refuses_overloaded(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    settings = make_settings(sqlite_url, max_streams_per_principal=2, max_open_streams=3)
    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        async with watches(stub, "a", 2), watches(stub, "b", 1):
            error = await refused_watch(stub, "c")
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            info = rich_details(error)["ErrorInfo"]
            assert (info.reason, info.metadata["limit"]) == ("OVERLOADED", "max_open_streams")
            assert "RetryInfo" in rich_details(error)
            # Unary calls have their own limit and still pass.
            metadata = (("authorization", bearer(subject="c")),)
            await stub.CreateUser(
                pb.CreateUserRequest(user=new_user("c@example.com")), metadata=metadata
            )
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert [line["reason"] for line in refusals(log)] == ["OVERLOADED"]


@pytest.mark.asyncio
async def test_unary_calls_over_the_limit_are_overloaded(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, max_concurrent_rpcs=1)
    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        metadata = (("authorization", bearer()),)
        calls = [
            stub.CreateUser(
                pb.CreateUserRequest(user=new_user(f"u{index}@example.com")), metadata=metadata
            )
            for index in range(100)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert refused, "100 concurrent writes never overlapped"
        for error in refused:
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            info = rich_details(error)["ErrorInfo"]
            assert (info.reason, info.metadata["limit"]) == ("OVERLOADED", "max_concurrent_rpcs")
        assert len(refused) < 100
