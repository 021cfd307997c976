"""/metrics after real calls of every kind: the go-grpc-prometheus series and the service's own."""

from __future__ import annotations

import asyncio
import platform
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.servers import connect, make_settings, running_app
from helpers.tokens import bearer
from helpers.users import new_user
from prometheus_client.parser import text_string_to_metric_families

import userservice
from user.v1 import user_service_pb2 as pb
from userservice.metrics import GO_CODE_NAMES

SERVICE = "user.v1.UserService"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Go's codes.Code.String(), in code order: what the standard dashboards filter on.
GO_NAMES = [
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
]  # fmt: skip


def test_grpc_code_labels_are_spelled_as_go_spells_them() -> None:
    by_number = {code.value[0]: name for code, name in GO_CODE_NAMES.items()}
    assert [by_number[number] for number in range(17)] == GO_NAMES
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)


def _scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def scrape(port: int) -> Samples:
    """Return every sample /metrics serves, keyed by name and labels."""
    text = await asyncio.to_thread(_scrape_text, port)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rpc(kind: str, method: str, service: str = SERVICE, **more: str) -> dict[str, str]:
    """The labels of one method's series."""
    return {"grpc_type": kind, "grpc_service": service, "grpc_method": method, **more}


def value(samples: Samples, name: str, labels: dict[str, str]) -> float:
    """Return a sample's value, 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll check until it holds, failing after timeout seconds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not await check():
        assert loop.time() < give_up, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_metrics_after_calls_of_every_kind(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url,
        metrics_address="127.0.0.1:0",
        rate_limit_rps=0.01,
        rate_limit_burst=100,
        max_streams_per_principal=1,
    )
    async with running_app(settings) as app, connect(app.port) as client:
        assert app.metrics_port is not None
        port, md = app.metrics_port, client.metadata
        stub = client.stub
        before = await scrape(port)

        ada = (
            await stub.CreateUser(pb.CreateUserRequest(user=new_user("ada@x.org")), metadata=md)
        ).user
        await stub.GetUser(pb.GetUserRequest(id=ada.id), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetUser(
                pb.GetUserRequest(id="019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70"), metadata=md
            )
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        streamed = [item async for item in stub.StreamUsers(pb.StreamUsersRequest(), metadata=md)]

        async def imports() -> AsyncIterator[pb.ImportUsersRequest]:
            for i in range(3):
                yield pb.ImportUsersRequest(user=new_user(f"import{i}@x.org"))

        imported = await stub.ImportUsers(imports(), metadata=md)

        async def syncs() -> AsyncIterator[pb.SyncUsersRequest]:
            for email in ("ada@x.org", "grace@x.org"):
                yield pb.SyncUsersRequest(user=new_user(email, display_name="Synced"))

        synced = [reply async for reply in stub.SyncUsers(syncs(), metadata=md)]
        await health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest())

        # Refusals of each layer: auth (no token), admission (a second stream of one
        # principal over max_streams_per_principal=1), the rate limit (a drained bucket).
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.GetUser(pb.GetUserRequest(id=ada.id))
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
        watch = stub.WatchUsers(pb.WatchUsersRequest(), metadata=md)
        watching = rpc("server_stream", "WatchUsers")

        # Series are process-wide and earlier tests' servers added to them: compare to before.
        open_before = value(before, "userservice_open_streams", watching)

        async def watch_open() -> bool:
            now = value(await scrape(port), "userservice_open_streams", watching)
            return now == open_before + 1

        await until(watch_open)
        with pytest.raises(grpc.aio.AioRpcError) as second:
            async for _ in stub.WatchUsers(pb.WatchUsersRequest(), metadata=md):
                pass
        assert second.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        watch.cancel()
        greedy = (("authorization", bearer(subject="greedy")),)
        refused = None
        for _ in range(101):  # the burst is 100: one of these is refused at the latest
            try:
                await stub.GetUser(pb.GetUserRequest(id=ada.id), metadata=greedy)
            except grpc.aio.AioRpcError as error:
                refused = error.code()
                break
        assert refused is grpc.StatusCode.RESOURCE_EXHAUSTED

        watch_handled = rpc("server_stream", "WatchUsers", grpc_code="Canceled")
        handled_before = value(before, "grpc_server_handled_total", watch_handled)

        async def watch_ended() -> bool:
            now = value(await scrape(port), "grpc_server_handled_total", watch_handled)
            return now == handled_before + 1

        await until(watch_ended)
        after = await scrape(port)

    def delta(name: str, labels: dict[str, str]) -> float:
        return value(after, name, labels) - value(before, name, labels)

    get = rpc("unary", "GetUser")
    ok_gets = delta("grpc_server_handled_total", {**get, "grpc_code": "OK"})
    assert ok_gets >= 1
    assert delta("grpc_server_handled_total", {**get, "grpc_code": "NotFound"}) == 1
    assert delta("grpc_server_handled_total", {**get, "grpc_code": "Unauthenticated"}) == 1
    assert delta("grpc_server_handled_total", {**get, "grpc_code": "ResourceExhausted"}) == 1
    assert delta("grpc_server_started_total", get) == ok_gets + 3
    # Unary: one message received per call, one sent per call that succeeded.
    assert delta("grpc_server_msg_received_total", get) == delta("grpc_server_started_total", get)
    assert delta("grpc_server_msg_sent_total", get) == ok_gets
    assert delta("grpc_server_handling_seconds_count", get) == delta(
        "grpc_server_started_total", get
    )
    assert delta("grpc_server_handling_seconds_bucket", {**get, "le": "+Inf"}) == delta(
        "grpc_server_handling_seconds_count", get
    )

    stream = rpc("server_stream", "StreamUsers")
    assert delta("grpc_server_handled_total", {**stream, "grpc_code": "OK"}) == 1
    assert delta("grpc_server_msg_received_total", stream) == 1
    assert delta("grpc_server_msg_sent_total", stream) == len(streamed) == 1
    client_stream = rpc("client_stream", "ImportUsers")
    assert imported.created_count == 3
    assert delta("grpc_server_handled_total", {**client_stream, "grpc_code": "OK"}) == 1
    assert delta("grpc_server_msg_received_total", client_stream) == 3
    assert delta("grpc_server_msg_sent_total", client_stream) == 1
    bidi = rpc("bidi_stream", "SyncUsers")
    assert delta("grpc_server_handled_total", {**bidi, "grpc_code": "OK"}) == 1
    assert delta("grpc_server_msg_received_total", bidi) == 2
    assert delta("grpc_server_msg_sent_total", bidi) == len(synced) == 2
    assert delta("grpc_server_started_total", watching) == 2
    assert delta("grpc_server_handled_total", {**watching, "grpc_code": "ResourceExhausted"}) == 1
    assert value(after, "userservice_open_streams", watching) == open_before
    check = rpc("unary", "Check", service="grpc.health.v1.Health")
    assert delta("grpc_server_handled_total", {**check, "grpc_code": "OK"}) >= 1

    for reason in ("TOKEN_MISSING", "TOO_MANY_STREAMS", "RATE_LIMITED"):
        assert delta("userservice_refusals_total", {"reason": reason}) == 1, reason
    assert delta("userservice_refusals_total", {"reason": "OVERLOADED"}) == 0

    # Storage: every GetUser that reached the store is one get; imports one batch insert.
    assert delta("userservice_storage_seconds_count", {"operation": "get"}) == ok_gets + 1
    assert delta("userservice_storage_seconds_count", {"operation": "create"}) == 1
    assert delta("userservice_storage_seconds_count", {"operation": "create_many"}) >= 1
    assert delta("userservice_storage_seconds_count", {"operation": "upsert_by_email"}) == 2
    assert delta("userservice_storage_seconds_sum", {"operation": "get"}) > 0

    assert value(after, "userservice_health_status", {"grpc_service": ""}) == 1
    assert value(after, "userservice_health_status", {"grpc_service": SERVICE}) == 1
    build = {
        "version": userservice.__version__,
        "python_version": platform.python_version(),
        "grpc_version": grpc.__version__,
    }
    assert value(after, "userservice_build_info", build) == 1


@pytest.mark.asyncio
async def test_health_status_follows_the_health_service(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, metrics_address="127.0.0.1:0")
    async with running_app(settings) as app:
        assert app.metrics_port is not None
        port = app.metrics_port
        serving = await scrape(port)
        await app.health.shut_down()
        stopped = await scrape(port)
    assert value(serving, "userservice_health_status", {"grpc_service": SERVICE}) == 1
    assert value(stopped, "userservice_health_status", {"grpc_service": SERVICE}) == 0
    assert value(stopped, "userservice_health_status", {"grpc_service": ""}) == 0
