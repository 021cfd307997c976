"""Every typed domain error maps to the status that tells the truth, with or without RetryInfo.

Storage raises these (see the errors table in docs/api.md); the mapping is checked here, and the
PostgreSQL failures behind the statement timeout and the busy pool through the real server.
"""

from __future__ import annotations

import asyncio

import asyncpg
import google.rpc.error_details_pb2 as error_details_pb2
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.servers import connect, make_settings, rich_details, running_app
from helpers.users import new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.domain.errors import (
    CommitOutcomeUnknownError,
    ConcurrentConflictError,
    DomainError,
    ShuttingDownError,
    StorageBusyError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from userservice.transport.errors import status_code, status_proto


def _retry_info(error: DomainError) -> error_details_pb2.RetryInfo | None:
    for detail in status_proto(error).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def _reason(error: DomainError) -> str:
    info = error_details_pb2.ErrorInfo()
    assert status_proto(error).details[0].Unpack(info)
    return str(info.reason)


@pytest.mark.parametrize(
    ("error", "code", "reason", "retry"),
    [
        (StorageUnavailableError(), grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", True),
        (StorageBusyError(), grpc.StatusCode.UNAVAILABLE, "STORAGE_BUSY", True),
        (ShuttingDownError(), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", True),
        (StorageTimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "STORAGE_TIMEOUT", False),
        (ConcurrentConflictError(), grpc.StatusCode.ABORTED, "CONCURRENT_CONFLICT", False),
        (
            CommitOutcomeUnknownError(),
            grpc.StatusCode.UNAVAILABLE,
            "COMMIT_OUTCOME_UNKNOWN",
            False,
        ),
    ],
)
def test_storage_failures_map_to_truthful_statuses(
    error: DomainError, code: grpc.StatusCode, reason: str, retry: bool
) -> None:
    assert status_code(error) is code
    assert _reason(error) == reason
    assert (_retry_info(error) is not None) is retry


def test_commit_outcome_unknown_tells_the_client_what_is_safe() -> None:
    assert "request_id" in status_proto(CommitOutcomeUnknownError()).message


# -- through the real server on the real PostgreSQL ---------------------------------------


async def _sql(url: str, script: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_real_statement_timeout_is_deadline_exceeded_without_retry_info(
    postgres_url: str,
) -> None:
    settings = make_settings(postgres_url, db_statement_timeout_seconds=0.3)
    async with running_app(settings) as app, connect(app.port) as client:
        # Every insert into users now takes longer than the statement timeout allows.
        await _sql(
            postgres_url,
            """
            CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
            CREATE TRIGGER users_slow BEFORE INSERT ON users
                FOR EACH ROW EXECUTE FUNCTION slow_insert();
            """,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.CreateUser(
                pb.CreateUserRequest(user=new_user("slow@example.com")),
                metadata=client.metadata,
                timeout=10,
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    details = rich_details(caught.value)
    assert details["ErrorInfo"].reason == "STORAGE_TIMEOUT"
    assert "RetryInfo" not in details
    assert "pg_sleep" not in (caught.value.details() or "")


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_saturated_pool_sheds_calls_as_busy_while_health_stays_serving(
    postgres_url: str,
) -> None:
    settings = make_settings(
        postgres_url,
        db_pool_min_size=1,
        db_pool_max_size=1,
        health_check_interval_seconds=0.05,
        health_failures=1,
    )
    async with (
        running_app(settings) as app,
        connect(app.port) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        created = await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user("pool@example.com")), metadata=client.metadata
        )
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        blocker = await asyncpg.connect(postgres_url, timeout=5)
        try:
            async with blocker.transaction():
                await blocker.execute(
                    "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", created.user.id
                )
                # The pool's one connection now waits on the row lock inside this update.
                stuck = client.stub.UpdateUser(
                    pb.UpdateUserRequest(
                        user=user_pb2.User(id=created.user.id, display_name="Held"),
                        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                    ),
                    metadata=client.metadata,
                    timeout=20,
                )
                await _until_waiting_on_a_lock(blocker)
                # The pool wait ends before the caller's deadline, whatever the connect
                # timeout (5 s here), so the status says why the call failed.
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.stub.GetUser(
                        pb.GetUserRequest(id=created.user.id),
                        metadata=client.metadata,
                        timeout=0.5,
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert rich_details(caught.value)["ErrorInfo"].reason == "STORAGE_BUSY"
                # With one failed ping enough for NOT_SERVING, 20 pings of an exhausted pool
                # still leave health SERVING: pings have a connection of their own.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(watch.read(), 1.0)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await blocker.close()
        assert (await stuck).user.display_name == "Held"
        watch.cancel()


async def _until_waiting_on_a_lock(conn: asyncpg.Connection) -> None:
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(5):
        while not await conn.fetchval(query):
            await asyncio.sleep(0.01)
