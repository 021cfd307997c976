"""Recovery: unexpected exceptions become INTERNAL with a request id; deliberate endings pass."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from helpers.interceptor_harness import (
    BIDI_STREAM,
    BY_KIND,
    CLIENT_STREAM,
    LEAK,
    SERVER_STREAM,
    UNARY,
    AccessLog,
    Harness,
    serve,
    settings,
)
from helpers.tokens import token

KINDS = [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM]
STYLES = ["generator", "writer"]


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    """A server under the full chain (no rate limit)."""
    async with serve(settings()) as running:
        yield running


@pytest.mark.asyncio
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", KINDS)
async def test_exception_becomes_internal_with_request_id(
    harness: Harness, kind: str, style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="userservice.recovery")
    result = await harness.call(
        BY_KIND[kind], b"raise", token=token(), style=style, metadata=[("x-request-id", "rid-1")]
    )
    assert result.code is grpc.StatusCode.INTERNAL
    assert result.details == "internal error (request id rid-1)"
    assert "alice" not in result.details
    assert "Traceback" not in result.details
    assert result.trailing_metadata["x-request-id"] == "rid-1"
    records = [r for r in caplog.records if r.name == "userservice.recovery"]
    assert len(records) == 1
    assert records[0].request_id == "rid-1"  # type: ignore[attr-defined]
    assert records[0].exc_info is not None
    assert LEAK in str(records[0].exc_info[1])


@pytest.mark.asyncio
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", [SERVER_STREAM, BIDI_STREAM])
async def test_exception_after_messages_still_ends_internal(
    harness: Harness, kind: str, style: str
) -> None:
    requests = [b"raise-after"] if kind == SERVER_STREAM else [b"a", b"b", b"raise-after"]
    result = await harness.call(BY_KIND[kind], *requests, token=token(), style=style)
    assert result.responses == ([b"raise-after"] * 2 if kind == SERVER_STREAM else [b"a", b"b"])
    assert result.code is grpc.StatusCode.INTERNAL
    assert result.details.startswith("internal error (request id ")


@pytest.mark.asyncio
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", KINDS)
async def test_abort_passes_through_untouched(
    harness: Harness, kind: str, style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="userservice.recovery")
    result = await harness.call(BY_KIND[kind], b"abort", token=token(), style=style)
    assert result.code is grpc.StatusCode.NOT_FOUND
    assert result.details == "user alice@example.com not found"
    assert result.reason == "USER_NOT_FOUND"
    assert not [r for r in caplog.records if r.name == "userservice.recovery"]


@pytest.mark.asyncio
async def test_code_set_before_raising_is_kept_without_the_exception_text(
    harness: Harness,
) -> None:
    result = await harness.call("GetUser", b"set-code-raise", token=token())
    assert result.code is grpc.StatusCode.FAILED_PRECONDITION
    assert result.details == "precondition failed"


@pytest.mark.asyncio
async def test_cancellation_passes_through(
    harness: Harness, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    caplog.set_level(logging.ERROR, logger="userservice.recovery")
    untyped: Any = harness.channel
    call = untyped.unary_unary("/user.v1.UserService/GetUser")(
        b"slow", metadata=[("authorization", f"Bearer {token()}")]
    )
    # Not call.initial_metadata(): once awaited, grpc.aio's unary call ignores cancel().
    await asyncio.sleep(0.3)
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    line = await log.one("GetUser")
    assert line["code"] == "CANCELLED"
    assert not [r for r in caplog.records if r.name == "userservice.recovery"]


@pytest.mark.asyncio
async def test_deadline_is_logged_as_deadline_exceeded(
    harness: Harness, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    result = await harness.call("GetUser", b"slow", token=token(), timeout=0.2)
    assert result.code is grpc.StatusCode.DEADLINE_EXCEEDED
    line = await log.one("GetUser")
    assert line["code"] == "DEADLINE_EXCEEDED"


@pytest.mark.asyncio
async def test_a_batch_error_on_a_live_call_is_an_error_not_a_cancel(
    harness: Harness, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AccessLog(capsys, caplog)
    caplog.set_level(logging.ERROR, logger="userservice.recovery")
    result = await harness.call("GetUser", b"batch-error", token=token())
    assert result.code is grpc.StatusCode.INTERNAL
    assert result.details.startswith("internal error (request id ")
    line = await log.one("GetUser")
    assert line["code"] == "INTERNAL"
    errors = [r for r in caplog.records if r.name == "userservice.recovery"]
    assert len(errors) == 1
    assert "ExecuteBatchError" in errors[0].getMessage()
