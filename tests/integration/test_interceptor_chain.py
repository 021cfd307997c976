"""The whole chain: order, health under the chain, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.interceptor_harness import AccessLog, Harness, serve, settings
from helpers.tokens import token
from prometheus_client import REGISTRY

from userservice.interceptors.admission import AdmissionInterceptor, PublicStreamAdmission
from userservice.interceptors.auth import AuthInterceptor
from userservice.interceptors.auth.verifier import TokenVerifier
from userservice.interceptors.decoding import DecodingInterceptor
from userservice.interceptors.logging import AccessLogInterceptor
from userservice.interceptors.ratelimit import RateLimitInterceptor
from userservice.interceptors.recovery import RecoveryInterceptor
from userservice.metrics import start_metrics_server
from userservice.server.wiring import build_chain

HEALTH = health_pb2.HealthCheckResponse


@pytest_asyncio.fixture
async def limited() -> AsyncIterator[Harness]:
    """A server under the full chain with a small rate limit."""
    async with serve(settings(rate_limit_rps=0.01, rate_limit_burst=2)) as running:
        yield running


@pytest.mark.asyncio
async def test_order_is_recovery_log_auth_admission_ratelimit_decoding() -> None:
    chain = await build_chain(settings(rate_limit_rps=10, rate_limit_burst=10))
    kinds = [type(layer) for layer in chain.layers]
    assert kinds == [
        RecoveryInterceptor,
        AccessLogInterceptor,
        AuthInterceptor,
        AdmissionInterceptor,
        PublicStreamAdmission,
        RateLimitInterceptor,
        DecodingInterceptor,
    ]
    await chain.aclose()


@pytest.mark.asyncio
async def test_zero_rps_leaves_the_limiter_out() -> None:
    chain = await build_chain(settings(rate_limit_rps=0))
    assert not any(isinstance(layer, RateLimitInterceptor) for layer in chain.layers)
    await chain.aclose()


@pytest.mark.asyncio
async def test_a_bug_inside_auth_is_recovered_and_logged(
    monkeypatch: pytest.MonkeyPatch, log: AccessLog, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: TokenVerifier, raw: str) -> Any:
        raise KeyError("verifier bug")

    monkeypatch.setattr(TokenVerifier, "verify", broken)
    caplog.set_level(logging.ERROR, logger="userservice.recovery")
    async with serve(settings()) as harness:
        result = await harness.call(
            "GetUser", b"x", token=token(), metadata=[("x-request-id", "auth-bug")]
        )
    assert result.code is grpc.StatusCode.INTERNAL
    assert result.details == "internal error (request id auth-bug)"
    line = await log.one("GetUser")
    assert (line["code"], line["request_id"], line["principal"]) == ("INTERNAL", "auth-bug", None)
    errors = [r for r in caplog.records if r.name == "userservice.recovery"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], KeyError)


@pytest.mark.asyncio
async def test_a_rate_limited_call_is_logged(limited: Harness, log: AccessLog) -> None:
    caller = token("limited-user")
    for _ in range(3):
        last = await limited.call("GetUser", b"x", token=caller)
    assert last.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    lines = await log.wait(count=3)
    assert [line["code"] for line in lines] == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    assert lines[2]["reason"] == "RATE_LIMITED"
    assert lines[2]["principal"] == "limited-user"


@pytest.mark.asyncio
async def test_rejected_calls_are_logged_with_their_reason(
    limited: Harness, log: AccessLog
) -> None:
    for _ in range(5):
        result = await limited.call("GetUser", b"x")
        assert result.code is grpc.StatusCode.UNAUTHENTICATED
    lines = await log.wait(count=5)
    assert {(line["code"], line["reason"], line["principal"]) for line in lines} == {
        ("UNAUTHENTICATED", "TOKEN_MISSING", None)
    }
    denied = await limited.call("ImportUsers", b"x", token=token("reader", ["users.read"]))
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED
    assert (await log.one("ImportUsers"))["principal"] == "reader"


@pytest.mark.asyncio
@pytest.mark.parametrize("rate_limited", [False, True])
async def test_health_watch_streams_updates_under_the_full_chain(
    rate_limited: bool, log: AccessLog
) -> None:
    config = settings(rate_limit_rps=0.01, rate_limit_burst=1) if rate_limited else settings()
    async with serve(config) as harness:
        stub = health_pb2_grpc.HealthStub(harness.channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        seen = [(await call.read()).status]
        await harness.health.set("", HEALTH.NOT_SERVING)
        seen.append((await call.read()).status)
        await harness.health.set("", HEALTH.SERVING)
        seen.append((await call.read()).status)
        assert "x-request-id" in dict(await call.initial_metadata())
        call.cancel()
        assert seen == [HEALTH.SERVING, HEALTH.NOT_SERVING, HEALTH.SERVING]
        line = await log.one("Watch")
    assert line["kind"] == "server_stream"
    assert line["code"] == "CANCELLED"
    assert (line["messages_received"], line["messages_sent"]) == (1, 3)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "style", "expected"),
    [
        ("GetUser", "plain", [b"x"]),
        ("StreamUsers", "plain", [b"x"] * 3),
        ("StreamUsers", "sync", [b"x"] * 3),
    ],
)
async def test_plain_function_behaviours_are_served(
    method: str, style: str, expected: list[bytes]
) -> None:
    async with serve(settings()) as harness:
        result = await harness.call(method, b"x", token=token(), style=style)
    assert result.code is grpc.StatusCode.OK
    assert result.responses == expected


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.asyncio
async def test_metrics_endpoint_counts_rpcs() -> None:
    labels = {
        "grpc_type": "client_stream",
        "grpc_service": "user.v1.UserService",
        "grpc_method": "ImportUsers",
    }
    handled = {**labels, "grpc_code": "OK"}
    before = REGISTRY.get_sample_value("grpc_server_handled_total", handled) or 0.0
    received = REGISTRY.get_sample_value("grpc_server_msg_received_total", labels) or 0.0
    metrics = start_metrics_server("127.0.0.1:0")
    try:
        assert metrics.port > 0
        async with serve(settings()) as harness:
            await harness.call("ImportUsers", b"a", b"b", b"c", token=token())
        assert REGISTRY.get_sample_value("grpc_server_handled_total", handled) == before + 1
        assert REGISTRY.get_sample_value("grpc_server_msg_received_total", labels) == received + 3
        latency = REGISTRY.get_sample_value("grpc_server_handling_seconds_count", labels)
        assert latency is not None
        assert latency >= 1
        text = await asyncio.to_thread(_scrape, metrics.port)
    finally:
        metrics.close()
    assert "grpc_server_handled_total{" in text
    assert 'grpc_method="ImportUsers"' in text
    assert "grpc_server_handling_seconds_bucket{" in text
