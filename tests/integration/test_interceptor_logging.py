"""Access log: one JSON line per RPC with its final code; x-request-id echoed; no personal data."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.interceptor_harness import (
    BIDI_STREAM,
    BY_KIND,
    CLIENT_STREAM,
    SERVER_STREAM,
    UNARY,
    AccessLog,
    Harness,
    serve,
    settings,
)
from helpers.tokens import token
from prometheus_client import REGISTRY

from userservice.rpc_context import MAX_REQUEST_ID_LENGTH, valid_request_id

LOG_ERRORS = "userservice_access_log_errors_total"

# What each kind receives and sends for a plain echo, and the counts the line must carry.
ECHO = {
    UNARY: ([b"x"], None),
    SERVER_STREAM: ([b"x"], (1, 3)),
    CLIENT_STREAM: ([b"a", b"b", b"c", b"d"], (4, 1)),
    BIDI_STREAM: ([b"a", b"b"], (2, 2)),
}


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    """A server under the full chain (no rate limit)."""
    async with serve(settings()) as running:
        yield running


@pytest.mark.asyncio
@pytest.mark.parametrize("style", ["generator", "writer"])
@pytest.mark.parametrize("kind", [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM])
async def test_one_line_per_rpc_with_its_fields(
    harness: Harness, log: AccessLog, kind: str, style: str
) -> None:
    requests, counts = ECHO[kind]
    result = await harness.call(
        BY_KIND[kind], *requests, token=token("user-42"), style=style,
        metadata=[("x-request-id", "req-abc")],
    )  # fmt: skip
    assert result.code is grpc.StatusCode.OK
    line = await log.one(BY_KIND[kind])
    assert line["logger"] == "userservice.access"
    assert line["level"] == "INFO"
    assert line["method"] == f"/user.v1.UserService/{BY_KIND[kind]}"
    assert line["kind"] == kind
    assert line["code"] == "OK"
    assert line["principal"] == "user-42"
    assert line["request_id"] == "req-abc"
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert 0 <= line["duration_ms"] < 5000
    assert line["time"].endswith("Z")
    assert "reason" not in line
    if counts is None:
        assert "messages_received" not in line
    else:
        assert (line["messages_received"], line["messages_sent"]) == counts


@pytest.mark.asyncio
async def test_request_id_given_is_echoed_in_trailing_metadata(harness: Harness) -> None:
    result = await harness.call(
        "GetUser", b"x", token=token(), metadata=[("x-request-id", "given-1")]
    )
    assert result.trailing_metadata["x-request-id"] == "given-1"
    # Not in a unary call's initial metadata: that would cost grpc.aio a batch of its own.
    assert "x-request-id" not in result.initial_metadata


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM])
async def test_a_stream_gets_the_request_id_at_once_and_with_its_status(
    harness: Harness, kind: str
) -> None:
    result = await harness.call(
        BY_KIND[kind], b"x", token=token(), metadata=[("x-request-id", "stream-1")]
    )
    assert result.initial_metadata["x-request-id"] == "stream-1"
    assert result.trailing_metadata["x-request-id"] == "stream-1"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "given",
    [None, "", "x" * (MAX_REQUEST_ID_LENGTH + 1)],
    ids=["absent", "empty", "too-long"],
)
async def test_request_id_is_generated_when_absent_or_invalid(
    harness: Harness, log: AccessLog, given: str | None
) -> None:
    metadata = [] if given is None else [("x-request-id", given)]
    result = await harness.call("GetUser", b"x", token=token(), metadata=metadata)
    generated = result.trailing_metadata["x-request-id"]
    assert isinstance(generated, str)
    assert len(generated) == 24
    assert generated != given
    assert (await log.one("GetUser"))["request_id"] == generated


@pytest.mark.parametrize(
    ("value", "valid"),
    [("a-1_B.c:d", True), ("x" * MAX_REQUEST_ID_LENGTH, True), ("with space", True),
     ("tab\there", False), ("é", False), ("del\x7f", False), ("nl\n", False)],
)  # fmt: skip
def test_request_id_validation(value: str, valid: bool) -> None:
    # grpc clients refuse control characters in metadata, so this is checked directly.
    assert valid_request_id(value) is valid


@pytest.mark.asyncio
async def test_request_id_is_returned_on_failures_too(harness: Harness) -> None:
    result = await harness.call("GetUser", b"x", metadata=[("x-request-id", "failing-1")])
    assert result.code is grpc.StatusCode.UNAUTHENTICATED
    # An abort's trailers keep the request id beside its own (www-authenticate here).
    assert result.trailing_metadata["x-request-id"] == "failing-1"
    assert "www-authenticate" in result.trailing_metadata


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM])
async def test_failure_reason_is_the_error_info_reason(
    harness: Harness, log: AccessLog, kind: str
) -> None:
    result = await harness.call(BY_KIND[kind], b"abort", token=token())
    assert result.code is grpc.StatusCode.NOT_FOUND
    line = await log.one(BY_KIND[kind])
    assert (line["code"], line["reason"]) == ("NOT_FOUND", "USER_NOT_FOUND")


@pytest.mark.asyncio
async def test_failure_reason_falls_back_to_the_code(harness: Harness, log: AccessLog) -> None:
    await harness.call("GetUser", b"set-code-raise", token=token())
    line = await log.one("GetUser")
    assert (line["code"], line["reason"]) == ("FAILED_PRECONDITION", "FAILED_PRECONDITION")


@pytest.mark.asyncio
async def test_unexpected_exception_is_logged_with_the_code_recovery_sends(
    harness: Harness, log: AccessLog
) -> None:
    await harness.call("StreamUsers", b"raise-after", token=token())
    line = await log.one("StreamUsers")
    assert (line["code"], line["reason"]) == ("INTERNAL", "INTERNAL")
    assert line["messages_sent"] == 2


@pytest.mark.asyncio
async def test_no_personal_data_or_token_in_the_line(harness: Harness, log: AccessLog) -> None:
    secret_token = token("subject-1")
    for payload in (b"alice@example.com", b"abort", b"raise"):
        await harness.call("GetUser", payload, token=secret_token)
    await log.wait(count=3)
    assert "alice" not in log.raw
    assert "example.com" not in log.raw
    assert secret_token not in log.raw
    assert secret_token.split(".")[1] not in log.raw
    assert "SELECT" not in log.raw


@pytest.mark.asyncio
async def test_hostile_request_id_is_escaped(harness: Harness, log: AccessLog) -> None:
    hostile = '"},"code":"OK","x":"\\'
    result = await harness.call("GetUser", b"x", metadata=[("x-request-id", hostile)])
    assert result.code is grpc.StatusCode.UNAUTHENTICATED
    line = await log.one("GetUser")
    assert line["request_id"] == hostile
    assert line["code"] == "UNAUTHENTICATED"


@pytest.mark.asyncio
async def test_health_calls_are_logged_without_principal(harness: Harness, log: AccessLog) -> None:
    stub = health_pb2_grpc.HealthStub(harness.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    line = await log.one("Check")
    assert line["method"] == "/grpc.health.v1.Health/Check"
    assert (line["code"], line["principal"]) == ("OK", None)


@pytest.mark.asyncio
async def test_a_broken_log_sink_does_not_fail_the_rpc(
    harness: Harness, log: AccessLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    before = REGISTRY.get_sample_value(LOG_ERRORS) or 0.0
    result = await harness.call("GetUser", b"x", token=token())
    assert result.code is grpc.StatusCode.OK
    assert result.responses == [b"x"]
    # Access lines are written in short batches: wait for this one's flush.
    for _ in range(100):
        if REGISTRY.get_sample_value(LOG_ERRORS) != before:
            break
        await asyncio.sleep(0.01)
    assert REGISTRY.get_sample_value(LOG_ERRORS) == before + 1


@pytest.mark.asyncio
async def test_level_above_info_silences_the_access_log(
    harness: Harness, log: AccessLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice.access")
    await harness.call("GetUser", b"x", token=token())
    with pytest.raises(AssertionError):
        await log.wait(timeout=0.3)


def test_line_shape_matches_the_json_formatter() -> None:
    from userservice.interceptors.logging.line import access_line as _line
    from userservice.logs import JsonFormatter

    line = json.loads(_line("/p.S/M", "unary", "OK", 0.0012345, "ipv4:1.2.3.4:5", "r", ""))
    record = logging.LogRecord("userservice.access", logging.INFO, "", 0, "x", (), None)
    formatted = json.loads(JsonFormatter().format(record))
    assert list(line)[:4] == list(formatted)[:4] == ["time", "level", "logger", "message"]
    assert len(line["time"]) == len(formatted["time"])
    assert line["duration_ms"] == 1.234
    assert line["message"] == "/p.S/M OK"
