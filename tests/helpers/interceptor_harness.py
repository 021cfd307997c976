"""A real grpc.aio server under the real interceptor chain, for the interceptor tests.

The test-only service answers on the UserService method names, in the kinds their
descriptors declare (so each method's proto policy applies), with raw bytes instead of
protobuf messages and, chosen by the ``x-test-style`` metadata, in both aio styles: async
generators / request iterators ("generator", the default) or ``context.read()`` /
``context.write()`` ("writer"); "plain" and "sync" add plain-function behaviours for unary
and server-stream methods. The first request message is a command: ``raise``, ``abort``,
``raise-after`` (fail after two responses), ``set-code-raise``, ``slow``, ``whoami`` (reply
with the principal), ``fill-then-abort`` (server streams: write until flow control holds,
then abort); anything else is echoed. The real grpcio-health-checking aio servicer is served
too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # the class under test
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_status import rpc_status

from helpers.tokens import TEST_AUDIENCE, TEST_ISSUER, TEST_JWT_SECRET
from userservice import policy
from userservice.config import Settings
from userservice.interceptors.auth import current_principal
from userservice.interceptors.chain import InterceptorChain
from userservice.server.wiring import build_chain

SERVICE = policy.SERVICE_NAME
STYLE_KEY = "x-test-style"
UNLISTED = "ForgetEveryone"
LEAK = "boom: alice@example.com tried SELECT * FROM users"

UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM = (
    "unary",
    "server_stream",
    "client_stream",
    "bidi_stream",
)
_KIND_OF = {
    (False, False): UNARY,
    (False, True): SERVER_STREAM,
    (True, False): CLIENT_STREAM,
    (True, True): BIDI_STREAM,
}
# Every method of the service, by the kind its descriptor declares, and one it does not have.
KINDS: dict[str, str] = {
    method.name: _KIND_OF[method.client_streaming, method.server_streaming]
    for method in policy.SERVICE.methods
}
KINDS[UNLISTED] = UNARY
# One method per kind, for tests that cover "all four kinds".
BY_KIND = {
    UNARY: "GetUser",
    SERVER_STREAM: "StreamUsers",
    CLIENT_STREAM: "ImportUsers",
    BIDI_STREAM: "SyncUsers",
}
assert {f"/{SERVICE}/{name}" for name in KINDS} - set(policy.METHODS) == {f"/{SERVICE}/{UNLISTED}"}

Context = grpc.aio.ServicerContext[Any, Any]


def refused_requests(kind: str) -> tuple[bytes, ...]:
    """Request messages for a call the server refuses before reading any.

    A grpc.aio client whose write is in flight when such a status arrives may report
    INTERNAL "Internal error from Core" instead of it (grpc/grpc#36066), so calls that
    stream requests send none: the refusal never depends on them.
    """
    return () if kind in (CLIENT_STREAM, BIDI_STREAM) else (b"x",)


def settings(**overrides: Any) -> Settings:
    """Return valid Settings for tests: HS256 secret, no rate limit unless overridden."""
    values: dict[str, Any] = {
        "auth_jwt_secret": TEST_JWT_SECRET,
        "auth_issuer": TEST_ISSUER,
        "auth_audience": TEST_AUDIENCE,
        "rate_limit_rps": 0.0,
    }
    values.update(overrides)
    return dataclasses.replace(Settings(), **values).validate()


async def abort_not_found(context: Context) -> None:
    """Abort like a real handler: NOT_FOUND with ErrorInfo USER_NOT_FOUND via grpcio-status."""
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="user alice@example.com not found")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="USER_NOT_FOUND", domain="userservice")
    )
    await context.abort_with_status(rpc_status.to_status(status))


async def _command(message: bytes, context: Context) -> None:
    if message == b"raise":
        raise RuntimeError(LEAK)
    if message == b"abort":
        await abort_not_found(context)
    if message == b"set-code-raise":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("precondition failed")
        raise ValueError(LEAK)
    if message == b"slow":
        await asyncio.sleep(60)
    if message == b"fill-then-abort":
        # Writes until flow control holds a message (the client reads nothing), then aborts:
        # the abort's status waits behind that message until the client reads.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                while True:
                    await context.write(b"x" * 1000)
        await abort_not_found(context)
    if message == b"batch-error":
        # grpc.aio's own batch failure, raised while the call is alive: not the peer's doing.
        raise cygrpc.ExecuteBatchError('Failed "execute_batch": (<_SendMessage>,)')


async def _unary(request: bytes, context: Context) -> bytes:
    await _command(request, context)
    if request == b"raise-after":
        raise RuntimeError(LEAK)
    if request == b"whoami":
        return (current_principal() or "").encode()
    return request


async def _server_stream_generator(request: bytes, context: Context) -> AsyncIterator[bytes]:
    await _command(request, context)
    for index in range(3):
        if index == 2 and request == b"raise-after":
            raise RuntimeError(LEAK)
        yield request


async def _server_stream_writer(request: bytes, context: Context) -> None:
    await _command(request, context)
    for index in range(3):
        if index == 2 and request == b"raise-after":
            raise RuntimeError(LEAK)
        await context.write(request)


async def _consume(message: bytes, index: int, context: Context) -> None:
    if index == 0:
        await _command(message, context)
    if message == b"raise-after":
        raise RuntimeError(LEAK)


async def _client_stream_iterator(requests: AsyncIterator[bytes], context: Context) -> bytes:
    count = 0
    async for message in requests:
        await _consume(message, count, context)
        count += 1
    return b"count=%d" % count


async def _client_stream_reader(requests: Any, context: Context) -> bytes:
    count = 0
    while (message := await context.read()) is not grpc.aio.EOF:
        await _consume(message, count, context)
        count += 1
    return b"count=%d" % count


async def _bidi_generator(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
    count = 0
    async for message in requests:
        await _consume(message, count, context)
        count += 1
        yield message


async def _bidi_writer(requests: Any, context: Context) -> None:
    count = 0
    while (message := await context.read()) is not grpc.aio.EOF:
        await _consume(message, count, context)
        count += 1
        await context.write(message)


def _server_stream_sync(request: bytes, context: Context) -> Iterator[bytes]:
    yield from [request] * 3


_HANDLERS: dict[tuple[str, str], grpc.RpcMethodHandler[Any, Any]] = {
    # "plain": a plain function returning a coroutine or an async generator, and "sync": a
    # plain generator. grpc.aio alone would treat both as thread-pool sync handlers.
    (UNARY, "plain"): grpc.unary_unary_rpc_method_handler(lambda r, c: _unary(r, c)),
    (SERVER_STREAM, "plain"): grpc.unary_stream_rpc_method_handler(
        lambda r, c: _server_stream_generator(r, c)
    ),
    (SERVER_STREAM, "sync"): grpc.unary_stream_rpc_method_handler(_server_stream_sync),
    (UNARY, "generator"): grpc.unary_unary_rpc_method_handler(_unary),
    (UNARY, "writer"): grpc.unary_unary_rpc_method_handler(_unary),
    (SERVER_STREAM, "generator"): grpc.unary_stream_rpc_method_handler(_server_stream_generator),
    (SERVER_STREAM, "writer"): grpc.unary_stream_rpc_method_handler(_server_stream_writer),
    (CLIENT_STREAM, "generator"): grpc.stream_unary_rpc_method_handler(_client_stream_iterator),
    (CLIENT_STREAM, "writer"): grpc.stream_unary_rpc_method_handler(_client_stream_reader),
    (BIDI_STREAM, "generator"): grpc.stream_stream_rpc_method_handler(_bidi_generator),
    (BIDI_STREAM, "writer"): grpc.stream_stream_rpc_method_handler(_bidi_writer),
}


class ProbeService(grpc.GenericRpcHandler):
    """Serves every KINDS method; the handler style is picked from the x-test-style metadata."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the shared handler for the method's kind and the requested style."""
        service, _, name = handler_call_details.method.lstrip("/").partition("/")
        if service != SERVICE or name not in KINDS:
            return None
        style = "generator"
        for key, value in handler_call_details.invocation_metadata or ():
            if key == STYLE_KEY and isinstance(value, str):
                style = value
        return _HANDLERS.get((KINDS[name], style))


@dataclass
class Result:
    """Everything a client saw of one call."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    initial_metadata: dict[str, str | bytes]
    trailing_metadata: dict[str, str | bytes]
    status: status_pb2.Status | None

    def detail(self, kind: type[Message]) -> Any:
        """Return the first status detail of the given type, or None."""
        for packed in self.status.details if self.status is not None else ():
            message = kind()
            if packed.Unpack(message):
                return message
        return None

    @property
    def reason(self) -> str | None:
        """Return the ErrorInfo reason, if the status carries one."""
        info = self.detail(error_details_pb2.ErrorInfo)
        return None if info is None else str(info.reason)


@dataclass
class Harness:
    """A running server, a client channel to it, and the health servicer behind it."""

    server: grpc.aio.Server
    channel: grpc.aio.Channel
    port: int
    health: HealthServicer
    chain: InterceptorChain

    async def call(
        self,
        method: str,
        *requests: bytes,
        token: str | None = None,
        style: str = "generator",
        metadata: Iterable[tuple[str, str]] = (),
        timeout: float = 10.0,
    ) -> Result:
        """Call method of the probe service with requests (one for unary requests)."""
        call_metadata = [(STYLE_KEY, style), *metadata]
        if token is not None:
            call_metadata.append(("authorization", f"Bearer {token}"))
        return await invoke(
            self.channel, f"/{SERVICE}/{method}", KINDS[method], list(requests),
            call_metadata, timeout,
        )  # fmt: skip


async def invoke(
    channel: grpc.aio.Channel,
    path: str,
    kind: str,
    requests: list[bytes],
    metadata: Sequence[tuple[str, str]],
    timeout: float,
) -> Result:
    """Make one call of any kind with raw bytes and collect what the client saw."""
    # Raw bytes, no serializers: the stubs' generics cannot express that.
    untyped: Any = channel
    call: Any
    if kind == UNARY:
        call = untyped.unary_unary(path)(requests[0], metadata=metadata, timeout=timeout)
    elif kind == SERVER_STREAM:
        call = untyped.unary_stream(path)(requests[0], metadata=metadata, timeout=timeout)
    elif kind == CLIENT_STREAM:
        call = untyped.stream_unary(path)(iter(requests), metadata=metadata, timeout=timeout)
    else:
        call = untyped.stream_stream(path)(iter(requests), metadata=metadata, timeout=timeout)
    responses: list[bytes] = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        if kind in (UNARY, CLIENT_STREAM):
            responses.append(await call)
        else:
            async for response in call:
                responses.append(response)
    return Result(
        code=await call.code(),
        details=await call.details(),
        responses=responses,
        initial_metadata=dict(await call.initial_metadata() or ()),
        trailing_metadata=dict(await call.trailing_metadata() or ()),
        status=await rpc_status.aio.from_call(call),
    )


@contextlib.asynccontextmanager
async def serve(config: Settings, chain: InterceptorChain | None = None) -> AsyncIterator[Harness]:
    """Run the probe and health services on 127.0.0.1:0 under the chain built from config."""
    chain = chain or await build_chain(config)
    server = grpc.aio.server()
    # Registered as the real server registers its services: each handler wrapped once.
    registrar: Any = chain.registrar(server)
    registrar.add_generic_rpc_handlers((ProbeService(),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(server, channel, port, health, chain)
    finally:
        await channel.close()
        await server.stop(None)
        await chain.aclose()


class AccessLog:
    """Collects access log lines from captured stderr, waiting for lines still to come."""

    def __init__(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        """Enable the access logger at INFO (caplog restores it) and read captured stderr."""
        caplog.set_level(logging.INFO, logger="userservice.access")
        self._capsys = capsys
        self.lines: list[dict[str, Any]] = []
        self.raw = ""

    def _drain(self) -> None:
        text = self._capsys.readouterr().err
        self.raw += text
        for line in text.splitlines():
            if '"logger":"userservice.access"' in line:
                self.lines.append(json.loads(line))

    async def wait(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda line: True,
        count: int = 1,
        timeout: float = 2.0,
    ) -> list[dict[str, Any]]:
        """Return the lines matching predicate once there are count of them (or fail)."""
        for _ in range(int(timeout / 0.01)):
            self._drain()
            found = [line for line in self.lines if predicate(line)]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"expected {count} access lines, got {self.lines}")

    async def one(self, method: str) -> dict[str, Any]:
        """Return the single access line for method (by short name)."""
        lines = await self.wait(lambda line: line["method"].endswith("/" + method))
        assert len(lines) == 1, lines
        return lines[0]
