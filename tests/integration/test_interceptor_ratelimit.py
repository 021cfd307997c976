"""Rate limit: token buckets per principal, in process or shared through Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.databases import REDIS_URL
from helpers.databases import unavailable as _unavailable
from helpers.interceptor_harness import Result, serve, settings
from helpers.ports import free_port
from helpers.servers import connect, eventually, make_settings, rich_details, running_app
from helpers.tcp_proxy import TcpProxy
from helpers.tokens import bearer, token
from helpers.users import new_user
from redis.asyncio import Redis

from user.v1 import user_service_pb2 as pb
from userservice.interceptors.ratelimit import (
    ALLOWED,
    Decision,
    LocalLimiter,
)
from userservice.interceptors.ratelimit.redis import RedisLimiter
from userservice.policy import METHODS, SERVICE_NAME
from userservice.rpc_context import peer_host

LIST_USERS = METHODS[f"/{SERVICE_NAME}/ListUsers"]


def _retry_delay(result: Result) -> float:
    info = result.detail(error_details_pb2.RetryInfo)
    assert info is not None
    return float(info.retry_delay.ToNanoseconds()) / 1e9


def _assert_limited(result: Result, rps: float) -> float:
    assert result.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert result.reason == "RATE_LIMITED"
    assert result.details.startswith("rate limit exceeded; retry in ")
    delay = _retry_delay(result)
    assert 0 < delay <= 1 / rps + 0.01
    return delay


@pytest.mark.asyncio
async def test_burst_then_resource_exhausted_with_retry_info() -> None:
    async with serve(settings(rate_limit_rps=0.5, rate_limit_burst=3)) as harness:
        alice, bob = token("alice"), token("bob")
        for _ in range(3):
            assert (await harness.call("GetUser", b"x", token=alice)).code is grpc.StatusCode.OK
        delay = _assert_limited(await harness.call("GetUser", b"x", token=alice), rps=0.5)
        assert delay > 1.5  # one token at 0.5/s is about 2 s away
        # Buckets are per principal: bob still has his burst.
        assert (await harness.call("GetUser", b"x", token=bob)).code is grpc.StatusCode.OK


@pytest.mark.asyncio
async def test_tokens_come_back_at_the_configured_rate() -> None:
    async with serve(settings(rate_limit_rps=20, rate_limit_burst=1)) as harness:
        alice = token("alice")
        assert (await harness.call("GetUser", b"x", token=alice)).code is grpc.StatusCode.OK
        delay = _assert_limited(await harness.call("GetUser", b"x", token=alice), rps=20)
        await asyncio.sleep(delay + 0.01)
        assert (await harness.call("GetUser", b"x", token=alice)).code is grpc.StatusCode.OK


@pytest.mark.asyncio
@pytest.mark.parametrize("style", ["generator", "writer"])
async def test_a_bulk_stream_pays_per_message_and_is_paced_not_cut(style: str) -> None:
    cost = METHODS[f"/{SERVICE_NAME}/SyncUsers"].cost
    burst = int(cost) + 2
    rps = 20
    async with serve(settings(rate_limit_rps=rps, rate_limit_burst=burst)) as harness:
        alice = token("alice")
        # The open costs 20, messages 2 and 3 take the 2 left, the next 10 wait for refills.
        messages = [b"m%d" % index for index in range(13)]
        started = time.monotonic()
        stream = await harness.call("SyncUsers", *messages, token=alice, style=style)
        assert stream.code is grpc.StatusCode.OK
        assert stream.responses == messages
        assert time.monotonic() - started >= 10 / rps * 0.9  # could not outrun the refill
        # The stream spent the bucket: of three calls right after, at most the refill since
        # its last message (one token per 50 ms; a loaded machine may take that long) passes.
        after = await asyncio.gather(*(harness.call("GetUser", b"x", token=alice) for _ in "abc"))
        limited = [each for each in after if each.code is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert limited
        _assert_limited(limited[0], rps=rps)


@pytest.mark.asyncio
async def test_a_paced_stream_still_ends_at_its_deadline() -> None:
    async with serve(settings(rate_limit_rps=1, rate_limit_burst=20)) as harness:
        messages = [b"m%d" % index for index in range(10)]
        started = time.monotonic()
        stream = await harness.call("ImportUsers", *messages, token=token("bob"), timeout=1.0)
        assert stream.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3


@pytest.mark.asyncio
async def test_cost_above_the_burst_is_capped_so_the_call_can_pass() -> None:
    async with serve(settings(rate_limit_rps=0.01, rate_limit_burst=2)) as harness:
        result = await harness.call("ImportUsers", b"a", token=token())
        assert result.code is grpc.StatusCode.OK


@pytest.mark.asyncio
async def test_a_scan_filter_pays_more_than_a_plain_read(sqlite_url: str) -> None:
    scan_cost = LIST_USERS.cost + LIST_USERS.scan_cost
    config = make_settings(sqlite_url, rate_limit_rps=0.01, rate_limit_burst=int(scan_cost) + 2)
    async with running_app(config) as app, connect(app.port) as client:
        scan = pb.ListUsersRequest(filter='display_name : "ada"')
        await client.stub.ListUsers(scan, metadata=client.metadata)  # two tokens left
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.ListUsers(scan, metadata=client.metadata)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_details(caught.value)["ErrorInfo"].reason == "RATE_LIMITED"
        # Reads served by an index pay one token each, and filters that do not parse
        # are refused by the handler, not charged as scans.
        plain = pb.ListUsersRequest(filter='role = USER_ROLE_ADMIN AND email = "a@b.io"')
        await client.stub.ListUsers(plain, metadata=client.metadata)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.ListUsers(
                pb.ListUsersRequest(filter='display_name : "x" OR'), metadata=client.metadata
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_health_is_not_rate_limited() -> None:
    burst, rounds = 2, 6
    async with serve(settings(rate_limit_rps=0.01, rate_limit_burst=burst)) as harness:
        stub = health_pb2_grpc.HealthStub(harness.channel)
        alice = token("alice")
        checks, reads = [], []
        # Interleaved, as one principal at one rate: a health call that spent a token would
        # cut the reads short of the burst; one that was refused would raise here.
        for _ in range(rounds):
            for metadata in ((), (("authorization", f"Bearer {alice}"),)):
                answer = await stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
                checks.append(answer.status)
            reads.append(await harness.call("GetUser", b"x", token=alice))
        assert checks == [health_pb2.HealthCheckResponse.SERVING] * (2 * rounds)
        assert [read.code for read in reads] == [grpc.StatusCode.OK] * burst + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ] * (rounds - burst)
        _assert_limited(reads[-1], rps=0.01)


@pytest.mark.asyncio
async def test_local_limiter_refills_and_computes_retry_after() -> None:
    now = [100.0]
    limiter = LocalLimiter(rate=2.0, burst=4.0, clock=lambda: now[0])
    assert await limiter.limit("k", 3) == ALLOWED
    assert await limiter.limit("k", 3) == Decision(False, 1.0)  # 1 token left, 2 missing
    now[0] += 1.0
    assert await limiter.limit("k", 3) == ALLOWED
    now[0] += 100.0
    assert await limiter.limit("k", 4) == ALLOWED  # refilled to the burst, not beyond


@pytest.mark.asyncio
async def test_local_limiter_memory_is_bounded_and_evicts_idle_buckets_first() -> None:
    now = [0.0]
    limiter = LocalLimiter(rate=1.0, burst=10.0, max_keys=100, clock=lambda: now[0])
    await limiter.limit("busy", 10)  # empty, so it carries state worth keeping
    for index in range(99):
        await limiter.limit(f"idle-{index}", 1)
    now[0] += 5.0  # the idle buckets are full again; "busy" is back to 5 of 10
    for index in range(50):
        await limiter.limit(f"new-{index}", 1)
    assert len(limiter) == 51  # the 99 idle buckets went, "busy" stayed
    assert await limiter.limit("busy", 6) == Decision(False, 1.0)
    for index in range(1000):  # all busy: the oldest go, the bound holds
        await limiter.limit(f"more-{index}", 1)
        assert len(limiter) <= 100


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.1.2.3:5000", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# Shared limits through Redis (db 15, one key prefix or principal per test).


@pytest_asyncio.fixture
async def redis() -> AsyncIterator[Redis]:
    """A client for the test Redis; skips (or fails under USERSERVICE_REQUIRE_SERVICES)."""
    client = Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        await client.ping()
    except OSError as error:
        await client.aclose()
        _unavailable(f"Redis at {REDIS_URL}", error)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A key prefix used by this test only; its keys are deleted afterwards."""
    unique = f"userservice-test:{uuid.uuid4().hex}:"
    yield unique
    keys = [key async for key in redis.scan_iter(match=unique + "*")]
    if keys:
        await redis.delete(*keys)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_two_servers_share_one_bucket(redis: Redis) -> None:
    subject = f"shared-{uuid.uuid4().hex}"
    config = settings(rate_limit_rps=0.5, rate_limit_burst=3, rate_limit_redis_url=REDIS_URL)
    try:
        async with serve(config) as first, serve(config) as second:
            caller = token(subject)
            for harness in (first, second, first):
                assert (
                    await harness.call("GetUser", b"x", token=caller)
                ).code is grpc.StatusCode.OK
            _assert_limited(await second.call("GetUser", b"x", token=caller), rps=0.5)
            _assert_limited(await first.call("GetUser", b"x", token=caller), rps=0.5)
        key = f"userservice:ratelimit:p:{subject}"
        assert 0 < await redis.pttl(key) <= 3 / 0.5 * 1000 + 1000
    finally:
        await redis.delete(f"userservice:ratelimit:p:{subject}")


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_limiter_matches_the_local_one(redis: Redis, prefix: str) -> None:
    limiter = RedisLimiter(redis, rate=1.0, burst=5, fail_open=False, prefix=prefix)
    assert await limiter.limit("k", 3) == ALLOWED
    denied = await limiter.limit("k", 3)
    assert not denied.allowed
    assert 0.9 < denied.retry_after <= 1.0  # two tokens left, one missing
    assert await limiter.limit("k", 2) == ALLOWED
    assert await limiter.limit("other", 5) == ALLOWED


@pytest.mark.redis
@pytest.mark.asyncio
@pytest.mark.parametrize("fail_open", [True, False])
async def test_unreachable_redis_fails_open_or_closed(
    fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="userservice.ratelimit")
    url = f"redis://127.0.0.1:{free_port()}/15"
    config = settings(
        rate_limit_rps=0.01, rate_limit_burst=1, rate_limit_redis_url=url,
        rate_limit_fail_open=fail_open,
    )  # fmt: skip
    async with serve(config) as harness:
        results = [await harness.call("GetUser", b"x", token=token()) for _ in range(5)]
    if fail_open:
        assert all(result.code is grpc.StatusCode.OK for result in results)
    else:
        for result in results:
            assert result.code is grpc.StatusCode.UNAVAILABLE
            assert result.reason == "RATE_LIMITER_UNAVAILABLE"
            assert _retry_delay(result) == 1.0
    warnings = [r for r in caplog.records if r.name == "userservice.ratelimit"]
    assert len(warnings) == 1  # at startup; the outage is not logged once per call
    assert warnings[0].levelno == logging.WARNING
    assert "127.0.0.1" not in warnings[0].getMessage()  # the URL may hold a password


@pytest_asyncio.fixture
async def proxy(redis: Redis) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test Redis."""
    kwargs = redis.connection_pool.connection_kwargs
    async with TcpProxy(kwargs.get("host", "127.0.0.1"), int(kwargs.get("port", 6379))) as running:
        yield running


@pytest.mark.redis
@pytest.mark.asyncio
@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_stopped_mid_test_then_back(
    proxy: TcpProxy, prefix: str, fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="userservice.ratelimit")
    limiter = RedisLimiter.from_url(
        proxy.url(REDIS_URL), 0.01, 2, fail_open=fail_open, prefix=prefix, recheck_seconds=0.05
    )
    try:
        assert await limiter.limit("k", 1) == ALLOWED
        await proxy.stop()
        fallback = ALLOWED if fail_open else Decision(False, 0.05, undecided=True)
        for _ in range(20):
            assert await limiter.limit("k", 1) == fallback
        assert not limiter.available
        await proxy.start()

        async def back() -> bool:
            # Another key, so "k"'s bucket is untouched until it is asked again.
            return await limiter.limit("probe", 1) == ALLOWED and limiter.available

        # Polled rather than slept: the first call after recheck_seconds finds it back.
        await eventually(back, "Redis used again after the restart")
        # Redis is back with the bucket as it was: one token left, then empty.
        assert await limiter.limit("k", 1) == ALLOWED
        assert limiter.available
        assert not (await limiter.limit("k", 1)).allowed
    finally:
        await limiter.aclose()
    levels = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "userservice.ratelimit"
    ]
    assert [level for level, _ in levels] == [logging.WARNING, logging.INFO]
    assert "reachable again" in levels[1][1]


@pytest.mark.redis
@pytest.mark.asyncio
async def test_connections_idle_through_an_outage_do_not_refuse_calls_once_redis_is_back(
    proxy: TcpProxy, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="userservice.ratelimit")
    limiter = RedisLimiter.from_url(proxy.url(REDIS_URL), 100, 100, fail_open=False, prefix=prefix)
    try:
        # Four pooled connections, then Redis restarts under them (every socket reset).
        assert await asyncio.gather(*(limiter.limit("k", 1) for _ in range(4))) == [ALLOWED] * 4
        await proxy.kill_connections()
        # A stale pooled connection is replaced at once: no call refused, no outage reported.
        for _ in range(8):
            assert await limiter.limit("k", 1) == ALLOWED
        assert limiter.available
    finally:
        await limiter.aclose()
    assert [r.getMessage() for r in caplog.records if r.name == "userservice.ratelimit"] == []


@pytest.mark.redis
@pytest.mark.asyncio
async def test_hung_redis_costs_at_most_the_timeout(proxy: TcpProxy, prefix: str) -> None:
    limiter = RedisLimiter.from_url(
        proxy.url(REDIS_URL), 0.01, 2, fail_open=True, prefix=prefix, timeout=0.05
    )
    proxy.pause()  # connections are accepted, commands never answered
    try:
        started = time.monotonic()
        assert await limiter.limit("k", 1) == ALLOWED
        assert time.monotonic() - started < 0.5
        # Within the recheck interval Redis is not even tried.
        started = time.monotonic()
        assert await limiter.limit("k", 1) == ALLOWED
        assert time.monotonic() - started < 0.01
    finally:
        await limiter.aclose()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_the_redis_timeout_setting_bounds_a_call_when_redis_hangs(proxy: TcpProxy) -> None:
    config = settings(
        rate_limit_rps=100, rate_limit_burst=100, rate_limit_redis_url=proxy.url(REDIS_URL),
        rate_limit_fail_open=False, rate_limit_redis_timeout_seconds=0.4,
    )  # fmt: skip
    async with serve(config) as harness:
        proxy.pause()  # connections are accepted, commands never answered
        started = time.monotonic()
        refused = await harness.call("GetUser", b"x", token=token(f"hung-{uuid.uuid4().hex}"))
        took = time.monotonic() - started
        proxy.resume()
    assert refused.reason == "RATE_LIMITER_UNAVAILABLE"
    assert 0.4 <= took < 1.5


@pytest.mark.redis
@pytest.mark.asyncio
async def test_fail_closed_through_the_chain_recovers_when_redis_is_back(
    proxy: TcpProxy,
) -> None:
    subject = f"proxied-{uuid.uuid4().hex}"
    config = settings(
        rate_limit_rps=100, rate_limit_burst=100, rate_limit_redis_url=proxy.url(REDIS_URL),
        rate_limit_fail_open=False,
    )  # fmt: skip
    async with serve(config) as harness:
        caller = token(subject)
        assert (await harness.call("GetUser", b"x", token=caller)).code is grpc.StatusCode.OK
        await proxy.stop()
        refused = await harness.call("GetUser", b"x", token=caller)
        assert refused.code is grpc.StatusCode.UNAVAILABLE
        assert refused.reason == "RATE_LIMITER_UNAVAILABLE"
        assert refused.details == "rate limiter unavailable; retry later"
        await proxy.start()
        for _ in range(40):  # the limiter re-probes Redis once a second
            await asyncio.sleep(0.05)
            result = await harness.call("GetUser", b"x", token=caller)
            if result.code is grpc.StatusCode.OK:
                break
        assert result.code is grpc.StatusCode.OK
    redis = Redis.from_url(REDIS_URL)
    await redis.delete(f"userservice:ratelimit:p:{subject}")
    await redis.aclose()


# Through the real server: the real servicers, SQLite and the chain built by the Application.


@pytest.mark.asyncio
async def test_real_sync_users_is_paced_and_completes(sqlite_url: str) -> None:
    settings_ = make_settings(sqlite_url, rate_limit_rps=40, rate_limit_burst=22)
    async with running_app(settings_) as app, connect(app.port) as client:
        requests = [
            pb.SyncUsersRequest(user=new_user(f"paced{index}@example.com")) for index in range(12)
        ]
        started = time.monotonic()
        call = client.stub.SyncUsers(iter(requests), metadata=client.metadata, timeout=10)
        responses = [response async for response in call]
        # Open 20, messages 2-3 take the 2 tokens left, 9 more at 40/s.
        assert time.monotonic() - started >= 9 / 40 * 0.9
        assert [response.index for response in responses] == list(range(12))
        assert {response.outcome for response in responses} == {pb.SYNC_OUTCOME_CREATED}
        assert await call.code() is grpc.StatusCode.OK


@pytest.mark.redis
@pytest.mark.asyncio
async def test_real_server_fails_closed_unavailable_when_redis_is_cut(
    proxy: TcpProxy, sqlite_url: str
) -> None:
    settings_ = make_settings(
        sqlite_url, rate_limit_rps=100, rate_limit_burst=100,
        rate_limit_redis_url=proxy.url(REDIS_URL), rate_limit_fail_open=False,
    )  # fmt: skip
    subject = f"cut-{uuid.uuid4().hex}"
    async with running_app(settings_) as app, connect(app.port) as client:
        metadata = (("authorization", bearer(subject=subject)),)
        request = pb.GetUserRequest(id="00000000-0000-7000-8000-000000000000")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.stub.GetUser(request, metadata=metadata)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND  # Redis answered
        await proxy.kill_connections()
        await proxy.stop()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.stub.GetUser(request, metadata=metadata)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        details = rich_details(refused.value)
        assert details["ErrorInfo"].reason == "RATE_LIMITER_UNAVAILABLE"
        assert details["RetryInfo"].retry_delay.seconds == 1
    redis = Redis.from_url(REDIS_URL)
    await redis.delete(f"userservice:ratelimit:p:{subject}")
    await redis.aclose()
