"""Nothing secret or personal reaches the logs, even at DEBUG, whatever the traffic does.

A real `userservice serve` process logs at DEBUG to a file while the test drives every RPC
kind through it, failures included (bad and expired tokens, missing scopes, validation
errors, conflicts, not-found, bad page tokens, malformed request bytes, a stream cut
short); then everything the process wrote is searched for the e-mail addresses, tokens and
secrets the test used.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.ports import free_port
from helpers.servers import suite_env
from helpers.tokens import (
    TEST_AUDIENCE,
    TEST_ISSUER,
    TEST_JWT_SECRET,
    TEST_PAGE_TOKEN_SECRET,
    bearer,
)
from helpers.users import new_user

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc

PREVIOUS_PAGE_TOKEN_SECRET = "previous-page-token-secret-never-logged-0123"
EMAILS = [f"hygiene.{index}@private.example.org" for index in range(6)]
RENAMED = "renamed.hygiene@private.example.org"
DUPLICATE = EMAILS[0].upper()
FILTER_EMAIL = "only-in-a-filter@private.example.org"
INVALID_EMAIL = "not-an-address-but-personal@@private.example.org"


@pytest_asyncio.fixture
async def debug_server(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """Run `userservice serve` at DEBUG, its stdout and stderr going to a file."""
    port = free_port()
    log_path = tmp_path / "server.log"
    env = suite_env(
        USERSERVICE_LISTEN_ADDRESS=f"127.0.0.1:{port}",
        USERSERVICE_DATABASE_URL=database_url,
        USERSERVICE_LOG_LEVEL="DEBUG",
        USERSERVICE_PAGE_TOKEN_PREVIOUS_SECRETS=PREVIOUS_PAGE_TOKEN_SECRET,
        USERSERVICE_RATE_LIMIT_RPS="0",
        USERSERVICE_SHUTDOWN_GRACE_SECONDS="2",
    )
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "userservice", "serve", env=env,
            stdout=log_file, stderr=log_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.returncode is None, log_path.read_text()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.1)
        yield port, log_path
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


def _forged_tokens() -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "hygiene", "iss": TEST_ISSUER, "aud": TEST_AUDIENCE, "iat": now}
    return {
        "expired": jwt.encode({**claims, "exp": now - 600}, TEST_JWT_SECRET, "HS256"),
        "wrong-key": jwt.encode(
            {**claims, "exp": now + 60}, "another-secret-entirely-0123456789abc", "HS256"
        ),
        "too-long": jwt.encode({**claims, "exp": now + 10 * 86_400}, TEST_JWT_SECRET, "HS256"),
        "garbage": "hygiene-garbage-token-value-" + "x" * 40,
    }


async def _expect_error(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    raise AssertionError("the call was expected to fail")


async def _drive_traffic(port: int) -> tuple[list[str], list[str]]:
    """Call every method, successes and failures; return the bearer tokens and e-mails used."""
    good = bearer()
    read_only = bearer(scopes=["users.read"])
    forged = _forged_tokens()
    tokens = [good, read_only, *forged.values()]
    auth = (("authorization", good),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        users = []
        for email in EMAILS:
            created = await stub.CreateUser(
                pb.CreateUserRequest(user=new_user(email), request_id=str(uuid.uuid4())),
                metadata=auth,
            )
            users.append(created.user)
        codes = [
            await _expect_error(
                stub.CreateUser(pb.CreateUserRequest(user=new_user(DUPLICATE)), metadata=auth)
            ),
            await _expect_error(
                stub.CreateUser(pb.CreateUserRequest(user=new_user(INVALID_EMAIL)), metadata=auth)
            ),
        ]
        await stub.GetUser(pb.GetUserRequest(id=users[0].id), metadata=auth)
        codes.append(
            await _expect_error(
                stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), metadata=auth)
            )
        )
        await stub.BatchGetUsers(
            pb.BatchGetUsersRequest(ids=[users[1].id, str(uuid.uuid4())]), metadata=auth
        )
        codes.append(
            await _expect_error(
                stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[EMAILS[1]]), metadata=auth)
            )
        )
        page = await stub.ListUsers(pb.ListUsersRequest(page_size=2), metadata=auth)
        await stub.ListUsers(
            pb.ListUsersRequest(page_size=2, page_token=page.next_page_token), metadata=auth
        )
        await stub.ListUsers(pb.ListUsersRequest(filter=f'email = "{FILTER_EMAIL}"'), metadata=auth)
        codes.append(
            await _expect_error(
                stub.ListUsers(pb.ListUsersRequest(page_token=page.next_page_token + "x"),
                               metadata=auth)
            )
        )  # fmt: skip
        codes.append(
            await _expect_error(
                stub.ListUsers(
                    pb.ListUsersRequest(filter=f'email = "{FILTER_EMAIL}" AND ('), metadata=auth
                )
            )
        )
        renamed = users[2]
        renamed.email = RENAMED
        await stub.UpdateUser(
            pb.UpdateUserRequest(
                user=renamed, update_mask=field_mask_pb2.FieldMask(paths=["email"])
            ),
            metadata=auth,
        )
        stale = users[3]
        stale.etag = "stale-etag"
        stale.email = EMAILS[4]
        codes.append(
            await _expect_error(
                stub.UpdateUser(
                    pb.UpdateUserRequest(
                        user=stale, update_mask=field_mask_pb2.FieldMask(paths=["email"])
                    ),
                    metadata=auth,
                )
            )
        )
        await stub.DeleteUser(pb.DeleteUserRequest(id=users[5].id), metadata=auth)
        async for _ in stub.StreamUsers(
            pb.StreamUsersRequest(filter=f'email : "{EMAILS[1]}"'), metadata=auth
        ):
            pass
        imports = [new_user(f"import.{i}@private.example.org") for i in range(3)]
        imports.append(new_user(EMAILS[0]))
        await stub.ImportUsers(
            iter(pb.ImportUsersRequest(user=user) for user in imports), metadata=auth
        )
        synced = [new_user("sync.new@private.example.org"), new_user(EMAILS[1], "Renamed Ada")]
        async for _ in stub.SyncUsers(
            iter(pb.SyncUsersRequest(user=user) for user in synced), metadata=auth
        ):
            pass
        watch = stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=auth)
        for _ in range(3):
            await watch.read()
        watch.cancel()
        # Authentication and authorization failures, and request bytes that do not parse.
        for raw in forged.values():
            codes.append(
                await _expect_error(
                    stub.GetUser(
                        pb.GetUserRequest(id=users[0].id),
                        metadata=(("authorization", f"Bearer {raw}"),),
                    )
                )
            )
        codes.append(
            await _expect_error(
                stub.DeleteUser(
                    pb.DeleteUserRequest(id=users[0].id),
                    metadata=(("authorization", read_only),),
                )
            )
        )
        codes.append(await _expect_error(stub.GetUser(pb.GetUserRequest(id=users[0].id))))
        untyped: Any = channel
        codes.append(
            await _expect_error(
                untyped.unary_unary("/user.v1.UserService/CreateUser")(
                    b"\x0a\xff\xff\xff\xff\x0f" + EMAILS[0].encode(), metadata=auth
                )
            )
        )
    assert grpc.StatusCode.OK not in codes
    emails = [*EMAILS, RENAMED, DUPLICATE, FILTER_EMAIL, INVALID_EMAIL]
    return tokens, [*emails, *(user.email for user in [*imports, *synced])]


@pytest.mark.asyncio
async def test_debug_logs_hold_no_emails_tokens_or_secrets(
    debug_server: tuple[int, Path],
) -> None:
    port, log_path = debug_server
    tokens, emails = await _drive_traffic(port)
    # Access lines are written in batches (at most 50 ms late): wait for them.
    async with asyncio.timeout(10):
        while '"logger":"userservice.access"' not in (
            logged := log_path.read_text(errors="replace")
        ):
            await asyncio.sleep(0.05)
    assert '"logger":"userservice.access"' in logged  # the capture works
    assert "bearer token rejected" in logged  # DEBUG lines were written
    secrets = [TEST_JWT_SECRET, TEST_PAGE_TOKEN_SECRET, PREVIOUS_PAGE_TOKEN_SECRET]
    bearer_tokens = [token.removeprefix("Bearer ") for token in tokens]
    # A token's signature alone would be as bad as the whole token.
    signatures = [token.rsplit(".", 1)[-1] for token in bearer_tokens if token.count(".") == 2]
    for needle in [*secrets, *bearer_tokens, *signatures]:
        assert needle not in logged, f"{needle[:12]}... appears in the server's log"
    for email in emails:
        assert email.lower() not in logged.lower(), f"{email} appears in the server's log"
    # Any address of the test's domain, however a log line might have mangled it.
    assert "private.example.org" not in logged.lower()
