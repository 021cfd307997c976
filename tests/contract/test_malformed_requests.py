"""Request bytes that do not parse: INVALID_ARGUMENT (MALFORMED_REQUEST), in every RPC kind.

Sent through a real channel with identity serializers, so the server gets exactly these bytes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from helpers.interceptor_harness import AccessLog
from helpers.servers import make_settings, rich_details, running_app
from helpers.tokens import bearer
from helpers.users import new_user
from prometheus_client import REGISTRY

from user.v1 import user_service_pb2
from userservice.server import Application

# A string field holding invalid UTF-8: one of the shapes the wire fuzzer found answered UNKNOWN.
BAD = b"\x0a\x02\xff\xfe"
GOOD_IMPORT = user_service_pb2.ImportUsersRequest(user=new_user("a@x.com")).SerializeToString()
GOOD_SYNC = user_service_pb2.SyncUsersRequest(user=new_user("b@x.com")).SerializeToString()
REQUEST_ID = "malformed-test-1"


def _identity(raw: bytes) -> bytes:
    return raw


# method, kind, messages sent, index of the bad one in a request stream (None: unary request).
CASES: list[tuple[str, str, Sequence[bytes], int | None]] = [
    ("/user.v1.UserService/GetUser", "unary", [BAD], None),
    ("/user.v1.UserService/UpdateUser", "unary", [b"\x12\x05\x0a\x03\xc3\x28x"], None),
    ("/user.v1.UserService/StreamUsers", "server_stream", [b"\x0a\xff\xff\xff\xff\x0f"], None),
    ("/user.v1.UserService/WatchUsers", "server_stream", [b"\x08"], None),
    ("/user.v1.UserService/ImportUsers", "client_stream", [GOOD_IMPORT, GOOD_IMPORT, BAD], 2),
    ("/user.v1.UserService/SyncUsers", "bidi_stream", [GOOD_SYNC, BAD, GOOD_SYNC], 1),
    ("/grpc.health.v1.Health/Check", "unary", [BAD], None),
    ("/grpc.health.v1.Health/Watch", "server_stream", [BAD], None),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "bidi_stream", [BAD], 0),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi_stream", [BAD], 0),
]


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[Application]:
    """The real server over a fresh SQLite file."""
    settings = make_settings(f"sqlite:///{tmp_path / 'u.db'}", reflection=True)
    async with running_app(settings) as app:
        yield app


async def call_raw(
    channel: grpc.aio.Channel, method: str, kind: str, messages: Sequence[bytes], metadata: Any
) -> tuple[grpc.StatusCode, list[bytes], grpc.aio.AioRpcError | None]:
    """Call method with raw request bytes; return the code, responses received and the error."""
    received: list[bytes] = []
    try:
        if kind == "unary":
            received.append(
                await channel.unary_unary(method, _identity, _identity)(
                    messages[0], metadata=metadata, timeout=10
                )
            )
        elif kind == "server_stream":
            call = channel.unary_stream(method, _identity, _identity)(
                messages[0], metadata=metadata, timeout=10
            )
            async for response in call:
                received.append(response)
        elif kind == "client_stream":
            received.append(
                await channel.stream_unary(method, _identity, _identity)(
                    iter(messages), metadata=metadata, timeout=10
                )
            )
        else:
            call = channel.stream_stream(method, _identity, _identity)(
                iter(messages), metadata=metadata, timeout=10
            )
            async for response in call:
                received.append(response)
    except grpc.aio.AioRpcError as error:
        return error.code(), received, error
    return grpc.StatusCode.OK, received, None


def _malformed_count(method: str) -> float:
    service, _, name = method.lstrip("/").partition("/")
    labels = {"grpc_service": service, "grpc_method": name}
    return REGISTRY.get_sample_value("userservice_malformed_requests_total", labels) or 0.0


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "kind", "messages", "index"), CASES)
async def test_malformed_message_is_invalid_argument_logged_once_and_counted(
    server: Application,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    method: str,
    kind: str,
    messages: Sequence[bytes],
    index: int | None,
) -> None:
    access = AccessLog(capsys, caplog)
    caplog.set_level(logging.DEBUG)
    before = _malformed_count(method)
    metadata = (("authorization", bearer()), ("x-request-id", REQUEST_ID))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, received, error = await call_raw(channel, method, kind, messages, metadata)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error is not None
    info: error_details_pb2.ErrorInfo = rich_details(error)["ErrorInfo"]
    assert info.reason == "MALFORMED_REQUEST"
    assert info.domain == "userservice"
    assert info.metadata["request_id"] == REQUEST_ID
    assert REQUEST_ID in (error.details() or "")
    if index is None:
        assert "message_index" not in info.metadata
    else:
        assert info.metadata["message_index"] == str(index)
    # Nothing of the parser's own words reaches the caller.
    for leak in ("DecodeError", "Error parsing", "user.v1", "grpc.health", "UTF-8"):
        assert leak not in (error.details() or "")
    if method.endswith("SyncUsers"):
        assert len(received) == 1  # the message before the bad one was answered
    warnings = [record for record in caplog.records if record.name == "userservice.decoding"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].exc_info is None
    assert REQUEST_ID in warnings[0].getMessage()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert _malformed_count(method) == before + 1
    [line] = await access.wait(lambda line: line["method"] == method)
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["reason"] == "MALFORMED_REQUEST"
    assert line["request_id"] == REQUEST_ID
    assert "Traceback" not in access.raw


@pytest.mark.asyncio
async def test_rows_before_a_malformed_import_message_are_not_half_committed(
    server: Application,
) -> None:
    metadata = (("authorization", bearer()),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, _, _ = await call_raw(
            channel, "/user.v1.UserService/ImportUsers", "client_stream",
            [GOOD_IMPORT, BAD], metadata,
        )  # fmt: skip
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        listing = user_service_pb2.ListUsersRequest().SerializeToString()
        _, [raw], _ = await call_raw(
            channel, "/user.v1.UserService/ListUsers", "unary", [listing], metadata
        )
        # The import failed as a whole: its batch of valid rows was never flushed.
        assert user_service_pb2.ListUsersResponse.FromString(raw).total_size == 0
        code, _, _ = await call_raw(
            channel, "/user.v1.UserService/ImportUsers", "client_stream", [GOOD_IMPORT], metadata
        )
        assert code is grpc.StatusCode.OK
        _, [raw], _ = await call_raw(
            channel, "/user.v1.UserService/ListUsers", "unary", [listing], metadata
        )
        assert user_service_pb2.ListUsersResponse.FromString(raw).total_size == 1


@pytest.mark.asyncio
async def test_unauthenticated_garbage_is_refused_before_it_costs_a_warning(
    server: Application, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, _, _ = await call_raw(channel, "/user.v1.UserService/GetUser", "unary", [BAD], ())
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert not [record for record in caplog.records if record.name == "userservice.decoding"]


@pytest.mark.asyncio
async def test_a_message_with_unknown_fields_is_not_malformed(server: Application) -> None:
    # Field 99 (unknown to GetUserRequest) is skipped, as proto3 requires: the id is still checked.
    raw = b"\x0a\x03abc" + b"\x98\x06\x01"
    metadata = (("authorization", bearer()),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        code, _, error = await call_raw(
            channel, "/user.v1.UserService/GetUser", "unary", [raw], metadata
        )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert error is not None
    assert rich_details(error)["ErrorInfo"].reason == "INVALID_FIELD"
