"""The wire fuzzer against the real server: documented codes only, and nothing breaks after it.

USERSERVICE_FUZZ_REQUESTS (default 1,000) and USERSERVICE_FUZZ_SEED (default 9) choose the run;
`make fuzz FUZZ_REQUESTS=20000` runs a longer one. A failure names the seed and request number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.servers import Client, connect, make_settings, running_app
from helpers.users import new_user
from system import fuzz

from user.v1 import user_service_pb2 as pb
from userservice.server import Application

REQUESTS = int(os.environ.get("USERSERVICE_FUZZ_REQUESTS", "1000"))
SEED = int(os.environ.get("USERSERVICE_FUZZ_SEED", "9"))
RAW_REQUESTS = max(40, REQUESTS // 25)


@pytest_asyncio.fixture
async def server(database_url: str) -> AsyncIterator[Application]:
    """The real server with reflection on and quick watch progress (streams answer at once)."""
    settings = make_settings(database_url, reflection=True, watch_progress_seconds=0.2)
    async with running_app(settings) as app:
        yield app


async def assert_serves_well_behaved_clients(client: Client, note: str) -> None:
    """A normal client's write and reads all succeed."""
    health = health_pb2_grpc.HealthStub(client.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING, note
    email = f"ok-{random.getrandbits(48):x}@example.com"
    created = await client.stub.CreateUser(
        pb.CreateUserRequest(user=new_user(email)), metadata=client.metadata, timeout=5
    )
    fetched = await client.stub.GetUser(
        pb.GetUserRequest(id=created.user.id), metadata=client.metadata, timeout=5
    )
    assert fetched.user == created.user, note


async def assert_everything_stored_reads_back(client: Client) -> int:
    """Page through every user, read each one back, stream them all; return how many."""
    listed: list[Any] = []
    token = ""
    while True:
        page = await client.stub.ListUsers(
            pb.ListUsersRequest(page_size=100, page_token=token), metadata=client.metadata
        )
        listed.extend(page.users)
        token = page.next_page_token
        if not token:
            break
    assert len(listed) == page.total_size
    for start in range(0, len(listed), 100):
        ids = [user.id for user in listed[start : start + 100]]
        batch = await client.stub.BatchGetUsers(
            pb.BatchGetUsersRequest(ids=ids), metadata=client.metadata
        )
        assert not batch.not_found_ids
        assert [user.id for user in batch.users] == ids
    streamed = [
        item.user
        async for item in client.stub.StreamUsers(pb.StreamUsersRequest(), metadata=client.metadata)
    ]
    assert streamed == listed
    return len(listed)


@pytest.mark.asyncio
@pytest.mark.timeout(max(300, REQUESTS // 10 + 120))
async def test_fuzzed_requests_get_documented_codes_and_the_server_stays_healthy(
    server: Application, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice")
    fuzzer = fuzz.Fuzzer(SEED)
    async with connect(server.port) as client:
        for index in range(5):
            created = await client.stub.CreateUser(
                pb.CreateUserRequest(user=new_user(f"seed{index}@example.com")),
                metadata=client.metadata,
            )
            fuzzer.known_ids.append(created.user.id)

        async def check(number: int) -> None:
            await assert_serves_well_behaved_clients(client, f"after request {number}")

        target = f"127.0.0.1:{server.port}"
        report = await fuzz.run(target, fuzzer, REQUESTS, between=check)
        assert report.violations == [], f"seed {SEED}: {report.violations[:10]}"
        assert sum(report.by_code.values()) == REQUESTS
        # The mutations reach past the decoder and the validation into the store.
        assert report.by_code.get("INVALID_ARGUMENT", 0) > REQUESTS // 10, report.by_code
        assert report.by_code.get("OK", 0) > REQUESTS // 50, report.by_code
        await assert_serves_well_behaved_clients(client, "after the run")
        stored = await assert_everything_stored_reads_back(client)
        assert stored > 0
    # No request made the server fail: recovery (ERROR) never had to step in.
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == []


def _raw_case(rng: random.Random, methods: list[fuzz.Method], fuzzer: fuzz.Fuzzer) -> Any:
    method = rng.choice(methods)
    # One HTTP/2 DATA frame (16 KiB), within the flow-control window: the raw client is simple.
    return method, fuzzer.request_bytes(method)[:16_000], fuzz.hostile_headers(rng)


@pytest.mark.asyncio
async def test_hostile_raw_http2_metadata_is_refused_cleanly(
    server: Application, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice")
    rng = random.Random(SEED)
    fuzzer = fuzz.Fuzzer(SEED)
    # Streams that would stay open (watches) are not worth a raw connection's deadline here.
    methods = [m for m in fuzz.all_methods() if not m.path.endswith("Watch")]
    methods = [m for m in methods if not m.path.endswith("WatchUsers")]
    seen: dict[str, int] = {}
    for number in range(RAW_REQUESTS):
        method, body, headers = _raw_case(rng, methods, fuzzer)
        answer = await asyncio.to_thread(fuzz.raw_call, server.port, method.path, body, headers)
        if answer.reset:
            seen["reset"] = seen.get("reset", 0) + 1
            continue
        code = _code(answer.grpc_status)
        if code is grpc.StatusCode.INTERNAL and answer.message.startswith(fuzz.CORE_REFUSALS):
            code_name = "refused by grpc's transport"
        else:
            assert code in fuzz.DOCUMENTED, (number, method.path, headers, answer)
            assert not [word for word in fuzz.LEAKS if word in answer.message], answer
            code_name = code.name
        seen[code_name] = seen.get(code_name, 0) + 1
    # Most hostile headers reach the server's code and are answered by it.
    assert seen.get("UNAUTHENTICATED", 0) + seen.get("INVALID_ARGUMENT", 0) > RAW_REQUESTS // 3, (
        seen
    )
    async with connect(server.port) as client:
        await assert_serves_well_behaved_clients(client, "after raw HTTP/2 requests")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def _code(status: int | None) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == status:
            return code
    raise AssertionError(f"no grpc-status in the answer ({status})")


@pytest.mark.asyncio
async def test_a_metadata_value_that_is_not_utf8_logs_no_traceback_and_no_value(
    server: Application, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = b"Bearer s3cr\xe9t-token"
    headers = [(b"authorization", secret)]
    path = "/user.v1.UserService/GetUser"
    answer = await asyncio.to_thread(fuzz.raw_call, server.port, path, b"", headers)
    assert answer.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    grpc_records = [r for r in caplog.records if r.name.startswith("grpc") and "UTF-8" in r.msg]
    assert grpc_records
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in grpc_records)
    server_records = [r for r in caplog.records if r.name.startswith(("grpc", "userservice"))]
    assert not [r for r in server_records if "s3cr" in r.getMessage()]
