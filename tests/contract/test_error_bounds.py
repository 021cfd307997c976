"""Every error is bounded: at most 20 field violations with the total stated, a clipped message.

Through a real channel whose client keeps grpc's defaults: an answer over its metadata limit
would reach the caller as its own RESOURCE_EXHAUSTED instead of the error the server sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.field_mask_pb2 import FieldMask
from helpers.servers import Client, connect, make_settings, rich_details, running_app
from helpers.users import new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.domain.errors import (
    MAX_MESSAGE_BYTES,
    MAX_REPORTED_VIOLATIONS,
    FieldViolation,
    InvalidArgumentError,
    clip,
)
from userservice.domain.ids import is_valid_id, new_user_id

# grpc's default soft limit on received metadata (grpc.max_metadata_size): above it a client
# starts refusing answers at random, from twice it always does.
SOFT_LIMIT = 8 * 1024


@pytest_asyncio.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    """A client of the real server over a fresh SQLite file."""
    async with (
        running_app(make_settings(f"sqlite:///{tmp_path / 'u.db'}")) as app,
        connect(app.port) as connected,
    ):
        yield connected


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """Return the size of the error's trailers as sent: grpc-message percent-encoded, the rest."""
    message = (error.details() or "").encode()
    encoded = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in message)
    size = len("grpc-status") + 2 + len("grpc-message") + encoded
    for key, value in error.trailing_metadata() or ():
        raw = value if isinstance(value, bytes) else value.encode()
        # -bin values travel base64-encoded.
        size += len(key) + (len(raw) * 4 + 2) // 3 if key.endswith("-bin") else len(key) + len(raw)
    return size


async def update_with_paths(client: Client, paths: list[str]) -> grpc.aio.AioRpcError:
    """Send UpdateUser with update_mask paths; return the error it must fail with."""
    request = pb.UpdateUserRequest(
        user=user_pb2.User(id=new_user_id(), display_name="Ada"),
        update_mask=FieldMask(paths=paths),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.UpdateUser(request, metadata=client.metadata)
    return raised.value


@pytest.mark.asyncio
async def test_fifty_thousand_bad_mask_paths_give_a_small_complete_error(client: Client) -> None:
    error = await update_with_paths(client, [f"no_such_field_{index}" for index in range(50_000)])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert trailer_bytes(error) < SOFT_LIMIT
    details = rich_details(error)
    assert details["ErrorInfo"].reason == "INVALID_FIELD"
    assert details["ErrorInfo"].metadata["field_violations"] == "50000"
    violations = details["BadRequest"].field_violations
    assert len(violations) == MAX_REPORTED_VIOLATIONS
    assert violations[0].description == "unknown field path 'no_such_field_0'"
    assert (error.details() or "").startswith("invalid request: 50000 violations, the first 20:")


@pytest.mark.asyncio
async def test_huge_non_ascii_paths_are_clipped_by_bytes(client: Client) -> None:
    error = await update_with_paths(client, ["語" * 20_000 + str(index) for index in range(40)])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert trailer_bytes(error) < SOFT_LIMIT
    assert len((error.details() or "").encode()) <= MAX_MESSAGE_BYTES


@pytest.mark.asyncio
async def test_a_hundred_bad_ids_stay_under_the_soft_limit(client: Client) -> None:
    ids = [f"not-an-id-{index}" for index in range(100)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=ids), metadata=client.metadata)
    error = raised.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert trailer_bytes(error) < SOFT_LIMIT
    details = rich_details(error)
    assert details["ErrorInfo"].metadata["field_violations"] == "100"
    fields = [violation.field for violation in details["BadRequest"].field_violations]
    assert fields == [f"ids[{index}]" for index in range(MAX_REPORTED_VIOLATIONS)]


@pytest.mark.asyncio
async def test_few_violations_are_all_reported_without_a_total(client: Client) -> None:
    error = await update_with_paths(client, ["id", "nope"])
    details = rich_details(error)
    assert len(details["BadRequest"].field_violations) == 2
    assert "field_violations" not in details["ErrorInfo"].metadata


@pytest.mark.asyncio
@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\x00"])
async def test_an_id_with_trailing_bytes_is_not_an_id(client: Client, suffix: str) -> None:
    created = await client.stub.CreateUser(
        pb.CreateUserRequest(user=new_user("nl@example.com")), metadata=client.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.GetUser(
            pb.GetUserRequest(id=created.user.id + suffix), metadata=client.metadata
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.BatchGetUsers(
            pb.BatchGetUsersRequest(ids=[created.user.id + suffix]), metadata=client.metadata
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert not is_valid_id(created.user.id + suffix)


def test_clip_cuts_on_a_character_boundary_and_marks_the_cut() -> None:
    assert clip("short", 10) == "short"
    clipped = clip("ü" * 100, 11)
    assert clipped == "üüüü…"
    assert len(clipped.encode()) <= 11


def test_the_message_states_the_total_and_stays_bounded() -> None:
    error = InvalidArgumentError([FieldViolation("f" * 1000, "d" * 1000) for _ in range(500)])
    assert len(error.violations) == 500
    assert len(error.reported) == MAX_REPORTED_VIOLATIONS
    assert error.message.startswith("invalid request: 500 violations, the first 20:")
    assert len(error.message.encode()) <= MAX_MESSAGE_BYTES
