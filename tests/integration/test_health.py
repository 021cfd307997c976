"""Health through the real server: readiness follows the database after N failed pings, liveness
does not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.servers import make_settings, running_app
from helpers.tcp_proxy import TcpProxy

from userservice.health import LIVENESS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test PostgreSQL server."""
    async with TcpProxy("127.0.0.1", 5432) as running:
        yield running


def _failed_pings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "userservice.health" and "ping failed" in record.getMessage()
    ]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_not_serving_only_after_the_configured_failed_pings_then_back(
    postgres_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice.health")
    settings = make_settings(
        proxy.url(postgres_url), health_failures=3, health_check_interval_seconds=0.1
    )
    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
        await proxy.stop()
        changed = await asyncio.wait_for(watch.read(), 15)
        assert changed.status == NOT_SERVING
        failed = _failed_pings(caplog)
        # Exactly the configured number of failures came first, while it stayed SERVING.
        assert len(failed) >= 3
        assert [message.split(" (")[1][:6] for message in failed[:3]] == [
            "1 of 3",
            "2 of 3",
            "3 of 3",
        ]
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == NOT_SERVING  # health itself still answers
        await proxy.start()
        assert (await asyncio.wait_for(watch.read(), 15)).status == SERVING
        watch.cancel()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_liveness_stays_serving_while_the_database_is_down(
    postgres_url: str, proxy: TcpProxy
) -> None:
    settings = make_settings(
        proxy.url(postgres_url),
        health_failures=2,
        health_check_interval_seconds=0.1,
        probe_address="127.0.0.1:0",
    )
    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.probe_port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        readiness = health.Watch(health_pb2.HealthCheckRequest(service="user.v1.UserService"))
        assert (await asyncio.wait_for(readiness.read(), 5)).status == SERVING
        await proxy.stop()
        assert (await asyncio.wait_for(readiness.read(), 15)).status == NOT_SERVING
        # A database outage takes the pod out of rotation but must not restart it.
        reply = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5)
        assert reply.status == SERVING
        await proxy.start()
        assert (await asyncio.wait_for(readiness.read(), 15)).status == SERVING
        readiness.cancel()
