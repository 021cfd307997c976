"""Calls between services: the second server calls the first through userservice.client.

The outer server is examples/gateway.py (the server chain's recovery and access log layers,
and a UserServiceClient with propagate=True); the inner one is either the real userservice
or a small recording servicer that notes, for each call it serves, the deadline left, the
metadata and the peer, and whether the call was cancelled under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from helpers.interceptor_harness import AccessLog
from helpers.servers import connect, eventually, make_settings, running_app
from helpers.tokens import bearer
from helpers.users import create
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from examples.gateway import Gateway, start
from user.v1 import user_pb2, user_service_pb2_grpc
from user.v1 import user_service_pb2 as pb
from userservice.client import UserServiceClient
from userservice.client.downstream import downstream_status
from userservice.client.propagation import BudgetSpentError
from userservice.interceptors.chain import InterceptorChain
from userservice.interceptors.logging import AccessLogInterceptor
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.recovery import RecoveryInterceptor
from userservice.observability import otel

HOLD = "hold"
FAIL = "fail-"
EDGE_REQUEST_ID = "edge-request-7f3a"
# grpc-timeout travels rounded up ("encoding may round up arbitrarily", grpc core's
# timeout_encoding.h), so a server can see a few milliseconds more than the client asked.
WIRE_ROUNDING = 0.1
SECRET = "inner secret detail"


@dataclasses.dataclass
class Seen:
    """One call the inner server served."""

    method: str
    remaining: float | None
    metadata: dict[str, str]
    peer: str


class Recorder(user_service_pb2_grpc.UserServiceServicer):
    """The inner server: records each call; ids starting `fail-` fail with that code."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.cancelled: list[str] = []

    def _record(self, method: str, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.seen.append(Seen(method, context.time_remaining(), metadata, context.peer()))

    async def _hold(self, method: str) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.append(method)
            raise

    async def GetUser(self, request: pb.GetUserRequest, context: Any) -> pb.GetUserResponse:
        self._record("GetUser", context)
        if request.id == HOLD:
            await self._hold("GetUser")
        if request.id.startswith(FAIL):
            await context.abort(grpc.StatusCode[request.id.removeprefix(FAIL)], SECRET)
        return pb.GetUserResponse(user=user_pb2.User(id=request.id))

    async def StreamUsers(self, request: pb.StreamUsersRequest, context: Any) -> None:
        self._record("StreamUsers", context)
        await context.write(pb.StreamUsersResponse(user=user_pb2.User(id="first")))
        if request.filter == HOLD:
            await self._hold("StreamUsers")


@dataclasses.dataclass
class Servers:
    """The recording inner server, the gateway in front of it, and a stub to the gateway."""

    recorder: Recorder
    inner_port: int
    client: UserServiceClient
    edge: user_service_pb2_grpc.UserServiceAsyncStub


@contextlib.asynccontextmanager
async def serving(servicer: Any) -> AsyncIterator[tuple[grpc.aio.Server, int]]:
    """Run servicer (behind the gateway's chain) on an ephemeral port."""
    server, port = await start(servicer)
    try:
        yield server, port
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def recording_inner() -> AsyncIterator[tuple[Recorder, int]]:
    """Run a Recorder on a plain grpc.aio server (any downstream service)."""
    recorder = Recorder()
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield recorder, port
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def through(gateway: type[Gateway] = Gateway) -> AsyncIterator[Servers]:
    """The recording inner server behind a gateway of class gateway."""
    async with recording_inner() as (recorder, inner_port):
        # The recorder serves no grpc.health.v1: no client-side health checking against it.
        client = UserServiceClient(f"127.0.0.1:{inner_port}", propagate=True, health_check=False)
        async with (
            client,
            serving(gateway(client)) as (_, port),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            edge = user_service_pb2_grpc.UserServiceStub(channel)
            yield Servers(recorder, inner_port, client, edge)


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[Servers]:
    """The recording inner server behind the example gateway."""
    async with through() as running:
        yield running


@pytest.mark.asyncio
async def test_inner_call_gets_what_is_left_of_the_edge_deadline(servers: Servers) -> None:
    metadata = (("x-request-id", EDGE_REQUEST_ID),)
    await servers.edge.GetUser(pb.GetUserRequest(id="u1"), timeout=1.0, metadata=metadata)
    (seen,) = servers.recorder.seen
    # The gateway's client asks for 5 s of its own; the edge gave the whole call 1 s.
    assert servers.client.timeout > 1.0
    assert seen.remaining is not None
    assert 0 < seen.remaining <= 1.0 + WIRE_ROUNDING
    assert seen.metadata["x-request-id"] == EDGE_REQUEST_ID


@pytest.mark.asyncio
async def test_without_an_edge_deadline_the_call_keeps_its_own(servers: Servers) -> None:
    await servers.edge.GetUser(pb.GetUserRequest(id="u1"))
    (seen,) = servers.recorder.seen
    assert seen.remaining is not None
    assert 1.0 < seen.remaining <= servers.client.timeout + WIRE_ROUNDING
    # The gateway's access layer chose a request id, and the inner call carries it.
    assert seen.metadata["x-request-id"]


class Spender(Gateway):
    """A gateway whose handler spends its whole budget in a blocking step before calling."""

    outcome: BaseException | None = None

    async def GetUser(self, request: pb.GetUserRequest, context: Any) -> pb.GetUserResponse:
        remaining = context.time_remaining()
        # Blocking the loop stands for CPU-bound work: nothing can cancel the handler while it
        # runs, so it reaches the next call with its deadline already past.
        time.sleep(remaining + 0.05)
        # The call runs in a task of its own (it copies this call's context), shielded: grpc
        # also cancels this handler now, and the outcome asserted is the call's, not that race's.
        call = asyncio.ensure_future(self.client.stub.GetUser(request, timeout=self.client.timeout))
        call.add_done_callback(Spender.record)
        return await asyncio.shield(call)

    @staticmethod
    def record(call: asyncio.Future[Any]) -> None:
        """Keep how the outgoing call ended."""
        Spender.outcome = call.exception() if not call.cancelled() else asyncio.CancelledError()


@pytest.mark.asyncio
async def test_a_spent_budget_is_refused_without_reaching_the_inner_server() -> None:
    async with through(Spender) as servers:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await servers.edge.GetUser(pb.GetUserRequest(id="u1"), timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        async def call_ended() -> bool:
            return Spender.outcome is not None

        await eventually(call_ended, "the gateway's outgoing call to end")
        outcome = Spender.outcome
        assert isinstance(outcome, BudgetSpentError)
        assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "not started" in (outcome.details() or "")
        assert servers.recorder.seen == []


@pytest.mark.asyncio
async def test_the_inner_call_is_cancelled_when_the_edge_gives_up(servers: Servers) -> None:
    call = servers.edge.GetUser(pb.GetUserRequest(id=HOLD))

    async def inner_started() -> bool:
        return bool(servers.recorder.seen)

    await eventually(inner_started, "the inner GetUser to start")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def inner_cancelled() -> bool:
        return servers.recorder.cancelled == ["GetUser"]

    await eventually(inner_cancelled, "the inner GetUser to be cancelled")


@pytest.mark.asyncio
async def test_an_inner_stream_is_cancelled_when_the_edge_gives_up(servers: Servers) -> None:
    call = servers.edge.StreamUsers(pb.StreamUsersRequest(filter=HOLD))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.user.id == "first"
    call.cancel()

    async def inner_cancelled() -> bool:
        return servers.recorder.cancelled == ["StreamUsers"]

    await eventually(inner_cancelled, "the inner StreamUsers to be cancelled")


class Leaver(Gateway):
    """A gateway whose handler opens an inner stream, reads one message and leaves it open."""

    left: Any = None

    async def GetUser(self, request: pb.GetUserRequest, context: Any) -> pb.GetUserResponse:
        call = self.client.stub.StreamUsers(pb.StreamUsersRequest(filter=HOLD))
        type(self).left = call
        response = await call.read()
        return pb.GetUserResponse(user=response.user)


@pytest.mark.asyncio
async def test_a_stream_left_open_by_a_handler_ends_with_its_call() -> None:
    async with through(Leaver) as servers:
        response = await servers.edge.GetUser(pb.GetUserRequest(id="u1"), timeout=5)
        assert response.user.id == "first"

        async def inner_cancelled() -> bool:
            return servers.recorder.cancelled == ["StreamUsers"]

        # Nothing cancels the handler's task (it returned): the stream ends because its call did.
        await eventually(inner_cancelled, "the stream the handler left open to end")
        assert Leaver.left.cancelled()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("downstream", "ours"),
    [
        ("INVALID_ARGUMENT", "INTERNAL"),
        ("OUT_OF_RANGE", "INTERNAL"),
        ("UNIMPLEMENTED", "INTERNAL"),
        ("PERMISSION_DENIED", "PERMISSION_DENIED"),
        ("ALREADY_EXISTS", "FAILED_PRECONDITION"),
        ("RESOURCE_EXHAUSTED", "UNAVAILABLE"),
        ("NOT_FOUND", "NOT_FOUND"),
    ],
)
async def test_downstream_failures_reach_the_edge_mapped(
    servers: Servers, downstream: str, ours: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await servers.edge.GetUser(pb.GetUserRequest(id=FAIL + downstream), timeout=5)
    assert raised.value.code().name == ours
    # The downstream's own message stays in the gateway's log.
    assert SECRET not in (raised.value.details() or "")
    assert raised.value.details()


def test_every_downstream_code_maps_to_a_code_for_our_caller() -> None:
    retryable = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    kept = {"DEADLINE_EXCEEDED", "CANCELLED", "ABORTED"}
    state = {"NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"}
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=SECRET)
        status = downstream_status(error, "the ledger")
        expected = (
            "UNAVAILABLE"
            if code.name in retryable
            else code.name
            if code.name in kept
            else "FAILED_PRECONDITION"
            if code.name in state
            else "INTERNAL"
        )
        assert status.code.name == expected, code
        assert "the ledger" in status.message
        assert SECRET not in status.message
        assert status.downstream_details == SECRET
        assert status.downstream_code is code


@pytest.mark.asyncio
async def test_through_the_real_userservice(sqlite_url: str, log: AccessLog) -> None:
    async with running_app(make_settings(sqlite_url)) as app:
        client = UserServiceClient(f"127.0.0.1:{app.port}", propagate=True)
        async with (
            client,
            serving(Gateway(client)) as (_, port),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            edge = user_service_pb2_grpc.UserServiceStub(channel)
            async with connect(app.port) as direct:
                user = await create(direct, "ada@example.com")
            metadata = (("authorization", bearer()), ("x-request-id", EDGE_REQUEST_ID))
            response = await edge.GetUser(
                pb.GetUserRequest(id=user.id), timeout=5, metadata=metadata
            )
            assert response.user.email == "ada@example.com"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await edge.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), metadata=metadata)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert missing.value.details() == "no such user"
            # The caller's token, forwarded, is what the userservice checks.
            with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                await edge.GetUser(pb.GetUserRequest(id=user.id))
            assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A request the userservice finds invalid is the gateway's fault, not the edge's.
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await edge.GetUser(pb.GetUserRequest(id="not an id"), metadata=metadata)
            assert invalid.value.code() == grpc.StatusCode.INTERNAL
    # The gateway's line and the userservice's line carry the edge's request id.
    lines = await log.wait(lambda line: line["request_id"] == EDGE_REQUEST_ID, count=6)
    assert {line["method"] for line in lines} == {"/user.v1.UserService/GetUser"}
    codes = sorted(line["code"] for line in lines)
    assert codes == ["INTERNAL", "INVALID_ARGUMENT", "NOT_FOUND", "NOT_FOUND", "OK", "OK"]


@pytest.mark.asyncio
async def test_pooled_channels_open_one_connection_each() -> None:
    async with recording_inner() as (recorder, port):
        for channels in (1, 3):
            recorder.seen.clear()
            pool = UserServiceClient(f"127.0.0.1:{port}", health_check=False, channels=channels)
            async with pool:
                for index in range(4 * channels):
                    await pool.get_user(f"u{index}")
            assert len({seen.peer for seen in recorder.seen}) == channels


@pytest.mark.asyncio
async def test_channels_without_a_pool_share_one_connection() -> None:
    # Why the pool sets grpc.use_local_subchannel_pool: channels with the same target and
    # arguments otherwise share grpc's global subchannel, hence one connection.
    async with recording_inner() as (recorder, port):
        clients = [UserServiceClient(f"127.0.0.1:{port}", health_check=False) for _ in range(3)]
        try:
            for index, each in enumerate(clients):
                await each.get_user(f"u{index}")
        finally:
            for each in clients:
                await each.close()
        assert len({seen.peer for seen in recorder.seen}) == 1


async def first_event(call: Any) -> pb.WatchUsersResponse:
    """Return a watch's first change event (skipping progress markers)."""
    while True:
        event = await call.read()
        assert event is not grpc.aio.EOF
        if event.sequence:
            return event  # type: ignore[no-any-return]


async def _open_watches(
    client: UserServiceClient, count: int
) -> tuple[list[Any], list[asyncio.Task[Any]]]:
    metadata = (("authorization", bearer()),)
    # From the start of the (fresh) history: a watch whose metadata arrived may not have
    # joined the live feed yet, and one opened "from now" could miss an event in between.
    request = pb.WatchUsersRequest(after_sequence=0)
    calls = [client.stub.WatchUsers(request, metadata=metadata) for _ in range(count)]
    # The server sends a watch's initial metadata as it opens: the stream is established.
    opened = [asyncio.ensure_future(call.initial_metadata()) for call in calls]
    return calls, opened


@pytest.mark.asyncio
async def test_300_streams_make_progress_through_a_pool(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, max_streams_per_principal=400, max_open_streams=400)
    async with running_app(settings) as app:
        target = f"127.0.0.1:{app.port}"
        # One connection: the server's MAX_CONCURRENT_STREAMS (256) open, the rest wait. (Without
        # health_check: client-side health checking holds one stream of its own, a Watch.)
        single = UserServiceClient(
            target, token=bearer().removeprefix("Bearer "), health_check=False
        )
        async with single:
            calls, opened = await _open_watches(single, 300)

            async def limit_reached() -> bool:
                return sum(task.done() for task in opened) >= 256

            await eventually(limit_reached, "256 watches to open", within=60)
            assert sum(task.done() for task in opened) == 256
            for call in calls:
                call.cancel()
            await asyncio.gather(*opened, return_exceptions=True)
        pool = UserServiceClient(target, token=bearer().removeprefix("Bearer "), channels=2)
        async with pool:
            calls, opened = await _open_watches(pool, 300)
            await asyncio.wait_for(asyncio.gather(*opened), 60)
            user = await pool.create_user("progress@example.com", "Progress")
            reads = [asyncio.ensure_future(first_event(call)) for call in calls]
            done, pending = await asyncio.wait(reads, timeout=60)
            assert not pending, f"{len(pending)} of 300 watches saw no event"
            assert all(task.result().user.id == user.id for task in done)
            for call in calls:
                call.cancel()


@pytest.mark.asyncio
async def test_the_trace_continues_through_the_gateway() -> None:
    exporter = InMemorySpanExporter()
    tracing = otel.from_environment({}, "1.2.3", exporter)
    layers = [RecoveryInterceptor(), tracing.interceptor(MethodMatcher(())), AccessLogInterceptor()]
    trace_id, edge_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with recording_inner() as (recorder, inner_port):
        client = UserServiceClient(f"127.0.0.1:{inner_port}", propagate=True, health_check=False)
        server = grpc.aio.server()
        user_service_pb2_grpc.add_UserServiceServicer_to_server(
            Gateway(client), InterceptorChain(layers).registrar(server)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with client, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                edge = user_service_pb2_grpc.UserServiceStub(channel)
                traceparent = f"00-{trace_id}-{edge_span}-01"
                await edge.GetUser(
                    pb.GetUserRequest(id="u1"), timeout=5, metadata=(("traceparent", traceparent),)
                )
        finally:
            await server.stop(None)
            await tracing.aclose()
    (gateway_span,) = exporter.get_finished_spans()
    assert f"{gateway_span.context.trace_id:032x}" == trace_id
    (seen,) = recorder.seen
    # The inner call continues the trace, as a child of the gateway's server span.
    version, inner_trace, parent, _ = seen.metadata["traceparent"].split("-")
    assert (version, inner_trace) == ("00", trace_id)
    assert parent == f"{gateway_span.context.span_id:016x}"
