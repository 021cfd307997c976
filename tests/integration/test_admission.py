"""Admission through the real server: per-principal and global limits, the public streams'
budget (per peer host, in total), health Check never shed."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from helpers.interceptor_harness import AccessLog
from helpers.servers import connect, eventually, handled, make_settings, rich_details, running_app
from helpers.tcp_proxy import TcpProxy
from helpers.tokens import bearer
from helpers.users import new_user
from prometheus_client import REGISTRY

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


HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
SERVING = health_pb2.HealthCheckResponse.SERVING
# A channel of its own, with its own connection (channels otherwise share one per target).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
PER_PEER = ("TOO_MANY_STREAMS", "max_public_streams_per_peer")
IN_TOTAL = ("OVERLOADED", "max_public_streams")


async def first_answer(call: Any) -> Any:
    """Return a stream's first message, or the error that ended it."""
    try:
        return await call.read()
    except grpc.aio.AioRpcError as error:
        return error


def public_refusal(answer: Any) -> tuple[str, str]:
    """Return (reason, limit) of a refusal by the public stream budget; fail on anything else."""
    assert isinstance(answer, grpc.aio.AioRpcError), answer
    assert answer.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    details = rich_details(answer)
    info = details["ErrorInfo"]
    assert info.domain == "userservice"
    assert details["RetryInfo"].retry_delay.seconds == 1
    return str(info.reason), str(info.metadata["limit"])


async def health_watches(channel: grpc.aio.Channel, count: int) -> list[Any]:
    """Open count health Watch streams without a token, each answered SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    calls = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(count)]
    for call in calls:
        assert (await asyncio.wait_for(call.read(), 5)).status == SERVING
    return calls


async def refused_health_watch(channel: grpc.aio.Channel) -> tuple[str, str]:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    return public_refusal(await asyncio.wait_for(first_answer(watch), 5))


def access_lines(log: AccessLog, method: str, code: str) -> list[dict[str, Any]]:
    log._drain()
    return [line for line in log.lines if line["method"] == method and line["code"] == code]


def refusal_count(reason: str) -> float:
    return REGISTRY.get_sample_value("userservice_refusals_total", {"reason": reason}) or 0.0


@pytest.mark.asyncio
async def test_an_anonymous_health_watch_flood_is_refused_by_the_public_budget(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Thirty peer hosts (127.0.0.1 and 29 proxies from 127.0.0.2-30), four connections each:
    # with the default budgets (20 per peer, 500 in all) either limit can refuse a stream.
    flood, peers, channels_per_peer = 10_000, [f"127.0.0.{n}" for n in range(1, 31)], 4
    log = AccessLog(capsys, caplog)
    settings = make_settings(sqlite_url)
    budget, per_peer = settings.max_public_streams, settings.max_public_streams_per_peer
    assert per_peer * len(peers) > budget
    refused_before = handled(HEALTH_WATCH, "ResourceExhausted")
    reasons_before = refusal_count("TOO_MANY_STREAMS") + refusal_count("OVERLOADED")
    calls: list[tuple[str, Any]] = []
    async with running_app(settings) as app, contextlib.AsyncExitStack() as stack:
        targets = {peers[0]: f"127.0.0.1:{app.port}"}
        for source in peers[1:]:
            # The server sees this proxy's connections come from another peer host.
            proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", app.port, source=source))
            targets[source] = f"127.0.0.1:{proxy.port}"
        channels = {
            peer: [
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
                )
                for _ in range(channels_per_peer)
            ]
            for peer, target in targets.items()
        }
        for index in range(flood):
            peer = peers[index % len(peers)]
            channel = channels[peer][index // len(peers) % channels_per_peer]
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            calls.append((peer, watch))
        try:
            answers = asyncio.gather(*(first_answer(call) for _, call in calls))

            async def flood_refused() -> bool:
                return handled(HEALTH_WATCH, "ResourceExhausted") >= refused_before + 1000

            await eventually(flood_refused, "the flood being refused", within=60)
            # Meanwhile probes are answered, and an authenticated caller from a flooding
            # peer host is served, its stream too: the flood holds none of its slots.
            async with connect(app.port) as client:
                health = health_pb2_grpc.HealthStub(client.channel)
                assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == (
                    SERVING
                )
                created = await client.stub.CreateUser(
                    pb.CreateUserRequest(user=new_user("during-flood@example.com")),
                    metadata=client.metadata,
                    timeout=10,
                )
                assert created.user.id
                users = client.stub.WatchUsers(pb.WatchUsersRequest(), metadata=client.metadata)
                await asyncio.wait_for(users.initial_metadata(), 10)
                users.cancel()
            results = await asyncio.wait_for(answers, 120)
        finally:
            for _, call in calls:
                call.cancel()
    accepted: Counter[str] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    for (peer, _), answer in zip(calls, results, strict=True):
        if isinstance(answer, grpc.aio.AioRpcError):
            reasons[public_refusal(answer)] += 1
        else:
            assert answer.status == SERVING
            accepted[peer] += 1
    # Exactly the budget was admitted, no peer host over its share; every other stream was
    # refused by our layer (its ErrorInfo), none by grpc's backstop or otherwise.
    assert sum(accepted.values()) == budget
    assert max(accepted.values()) <= per_peer
    assert set(reasons) <= {PER_PEER, IN_TOTAL}
    assert sum(reasons.values()) == flood - budget
    # Logged and counted like any other call.
    lines = access_lines(log, HEALTH_WATCH, "RESOURCE_EXHAUSTED")
    assert len(lines) == flood - budget
    assert {line["reason"] for line in lines} <= {PER_PEER[0], IN_TOTAL[0]}
    assert handled(HEALTH_WATCH, "ResourceExhausted") == refused_before + flood - budget
    reasons_after = refusal_count("TOO_MANY_STREAMS") + refusal_count("OVERLOADED")
    assert reasons_after == reasons_before + flood - budget


@pytest.mark.asyncio
async def test_public_streams_are_capped_per_peer_and_apart_from_callers_streams(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    settings = make_settings(
        sqlite_url,
        max_public_streams=5,
        max_public_streams_per_peer=3,
        max_open_streams=2,
        max_streams_per_principal=2,
    )
    async with (
        running_app(settings) as app,
        TcpProxy("127.0.0.1", app.port, source="127.0.0.2") as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=OWN_CONNECTION) as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=OWN_CONNECTION) as second,
    ):
        from_first = await health_watches(first, 3)
        assert await refused_health_watch(first) == PER_PEER
        from_second = await health_watches(second, 2)
        assert await refused_health_watch(second) == IN_TOTAL
        assert await refused_health_watch(first) == PER_PEER
        stub = user_service_pb2_grpc.UserServiceStub(first)
        # A full public budget takes none of the callers' slots: theirs fill up by themselves
        # (the third is refused for the caller's own limit, so the first two were admitted).
        async with watches(stub, "caller", 2):
            error = await refused_watch(stub, "caller")
            assert rich_details(error)["ErrorInfo"].reason == "TOO_MANY_STREAMS"
            # Probes are never refused, however full both budgets are.
            for channel in (first, second):
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == SERVING
            # And full callers' budgets take no public slot: one given back is taken again.
            from_second.pop().cancel()

            async def slot_back() -> bool:
                watch = health_pb2_grpc.HealthStub(second).Watch(health_pb2.HealthCheckRequest())
                answer = await asyncio.wait_for(first_answer(watch), 5)
                if isinstance(answer, grpc.aio.AioRpcError):
                    assert public_refusal(answer) == IN_TOTAL
                    return False
                from_second.append(watch)
                return True

            await eventually(slot_back, "a public slot given back and taken again")
        for call in (*from_first, *from_second):
            call.cancel()
    lines = access_lines(log, HEALTH_WATCH, "RESOURCE_EXHAUSTED")
    assert [line["reason"] for line in lines[:3]] == [PER_PEER[0], IN_TOTAL[0], PER_PEER[0]]
    assert {line["principal"] for line in lines} == {None}
    assert [line["peer"].split(":")[1] for line in lines[:3]] == [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.1",
    ]


@pytest.mark.asyncio
async def test_reflection_streams_count_in_the_public_budget(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url, reflection=True, max_public_streams=10, max_public_streams_per_peer=2
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    def reflection(channel: grpc.aio.Channel, method: str) -> Any:
        return channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()

    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        held = []
        for method in (REFLECTION_V1, REFLECTION_V1ALPHA):
            call = reflection(channel, method)
            await call.write(request)
            answer = await asyncio.wait_for(call.read(), 5)
            assert answer.list_services_response.service
            held.append(call)
        # Both versions count, in the same budget as health Watch.
        third = reflection(channel, REFLECTION_V1)
        assert public_refusal(await asyncio.wait_for(first_answer(third), 5)) == PER_PEER
        assert await refused_health_watch(channel) == PER_PEER
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == SERVING
        for call in held:
            call.cancel()
