"""CreateUser, GetUser, BatchGetUsers, UpdateUser and DeleteUser through the real server."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from helpers.servers import Client, rich_details, violated_fields
from helpers.users import create, new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb


@pytest.mark.asyncio
async def test_create_returns_exactly_what_get_returns(client: Client) -> None:
    created = await create(
        client, "ada@example.com", display_name="  Ada  ", role=user_pb2.USER_ROLE_ADMIN
    )
    assert created.id
    assert created.etag
    assert created.display_name == "Ada"
    assert created.role == user_pb2.USER_ROLE_ADMIN
    assert created.create_time == created.update_time
    assert created.create_time.nanos % 1000 == 0
    assert created.create_time.seconds > 0
    fetched = await client.stub.GetUser(pb.GetUserRequest(id=created.id), metadata=client.metadata)
    assert fetched.user == created


@pytest.mark.asyncio
async def test_unspecified_role_defaults_to_viewer(client: Client) -> None:
    created = await create(client, "viewer@example.com")
    assert created.role == user_pb2.USER_ROLE_VIEWER


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("user", "fields"),
    [
        (user_pb2.User(display_name="No Email"), ["user.email"]),
        (user_pb2.User(email="not-an-email", display_name="X"), ["user.email"]),
        (user_pb2.User(email="a@example.com"), ["user.display_name"]),
        (user_pb2.User(email="a@example.com", display_name="x" * 101), ["user.display_name"]),
        (user_pb2.User(email="a@example.com", display_name="bad\x07name"), ["user.display_name"]),
        (user_pb2.User(email="a@example.com", display_name="X", role=42), ["user.role"]),  # type: ignore[arg-type]
        (user_pb2.User(), ["user.email", "user.display_name"]),
    ],
)
async def test_create_rejects_bad_input_with_field_violations(
    client: Client, user: user_pb2.User, fields: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CreateUser(pb.CreateUserRequest(user=user), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == fields
    assert rich_details(caught.value)["ErrorInfo"].reason == "INVALID_FIELD"


@pytest.mark.asyncio
async def test_duplicate_email_is_already_exists_without_regard_to_case(client: Client) -> None:
    await create(client, "grace@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(client, "GRACE@Example.COM")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rich_details(caught.value)["ErrorInfo"].reason == "EMAIL_ALREADY_EXISTS"
    listed = await client.stub.ListUsers(pb.ListUsersRequest(), metadata=client.metadata)
    assert listed.total_size == 1


@pytest.mark.asyncio
async def test_concurrent_creates_of_one_email_create_one_user(client: Client) -> None:
    results = await asyncio.gather(
        *(
            create(
                client, "race@example.com" if i % 2 else "RACE@example.com", display_name=f"R{i}"
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )
    successes = [r for r in results if isinstance(r, user_pb2.User)]
    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(successes) == 1
    assert {f.code() for f in failures} == {grpc.StatusCode.ALREADY_EXISTS}


@pytest.mark.asyncio
async def test_request_id_makes_create_idempotent(client: Client) -> None:
    request = pb.CreateUserRequest(user=new_user("idem@example.com"), request_id=str(uuid.uuid4()))
    first = await client.stub.CreateUser(request, metadata=client.metadata)
    second = await client.stub.CreateUser(request, metadata=client.metadata)
    assert second.user == first.user
    listed = await client.stub.ListUsers(pb.ListUsersRequest(), metadata=client.metadata)
    assert listed.total_size == 1
    reused = pb.CreateUserRequest(user=new_user("other@example.com"), request_id=request.request_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CreateUser(reused, metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["request_id"]


@pytest.mark.asyncio
async def test_request_id_must_be_a_uuid(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user("u@example.com"), request_id="retry-1"),
            metadata=client.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["request_id"]


@pytest.mark.asyncio
async def test_get_unknown_and_malformed_ids(client: Client) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetUser(pb.GetUserRequest(id=missing), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = rich_details(caught.value)
    assert details["ErrorInfo"].reason == "USER_NOT_FOUND"
    assert details["ResourceInfo"].resource_name == missing
    for bad in ("", "not-a-uuid", "../etc/passwd"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.GetUser(pb.GetUserRequest(id=bad), metadata=client.metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(caught.value) == ["id"]


@pytest.mark.asyncio
async def test_batch_get_returns_found_and_not_found(client: Client) -> None:
    first = await create(client, "b1@example.com")
    second = await create(client, "b2@example.com")
    missing = str(uuid.uuid4())
    response = await client.stub.BatchGetUsers(
        pb.BatchGetUsersRequest(ids=[second.id, missing, first.id, second.id]),
        metadata=client.metadata,
    )
    assert [user.id for user in response.users] == [second.id, first.id]
    assert list(response.not_found_ids) == [missing]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ids", "field"),
    [([], "ids"), ([str(uuid.uuid4()) for _ in range(101)], "ids"), (["ok", "bad"], "ids[0]")],
)
async def test_batch_get_rejects_bad_requests(client: Client, ids: list[str], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=ids), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value)[0] == field


@pytest.mark.asyncio
async def test_update_applies_mask_and_advances_update_time(client: Client) -> None:
    created = await create(client, "upd@example.com", display_name="Before")
    change = user_pb2.User(id=created.id, display_name="After", email="ignored@example.com")
    response = await client.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=change, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
        ),
        metadata=client.metadata,
    )
    updated = response.user
    assert updated.display_name == "After"
    assert updated.email == "upd@example.com"
    assert updated.create_time == created.create_time
    assert updated.update_time.ToMicroseconds() > created.update_time.ToMicroseconds()
    assert updated.etag != created.etag
    fetched = await client.stub.GetUser(pb.GetUserRequest(id=created.id), metadata=client.metadata)
    assert fetched.user == updated


@pytest.mark.asyncio
async def test_update_with_empty_mask_changes_the_set_fields(client: Client) -> None:
    created = await create(client, "empty-mask@example.com")
    response = await client.stub.UpdateUser(
        pb.UpdateUserRequest(user=user_pb2.User(id=created.id, role=user_pb2.USER_ROLE_EDITOR)),
        metadata=client.metadata,
    )
    assert response.user.role == user_pb2.USER_ROLE_EDITOR
    assert response.user.display_name == created.display_name


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["id", "create_time", "update_time", "etag", "nickname"])
async def test_update_rejects_immutable_and_unknown_paths(client: Client, path: str) -> None:
    created = await create(client, f"mask-{path}@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=created.id, display_name="X"),
                update_mask=field_mask_pb2.FieldMask(paths=[path]),
            ),
            metadata=client.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["update_mask"]
    assert path in caught.value.details()


@pytest.mark.asyncio
async def test_update_with_stale_etag_is_aborted_and_changes_nothing(client: Client) -> None:
    created = await create(client, "etag@example.com", display_name="One")
    mask = field_mask_pb2.FieldMask(paths=["display_name"])
    first = await client.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=created.id, display_name="Two", etag=created.etag),
            update_mask=mask,
        ),
        metadata=client.metadata,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=created.id, display_name="Three", etag=created.etag),
                update_mask=mask,
            ),
            metadata=client.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert rich_details(caught.value)["ErrorInfo"].reason == "ETAG_MISMATCH"
    fetched = await client.stub.GetUser(pb.GetUserRequest(id=created.id), metadata=client.metadata)
    assert fetched.user == first.user


@pytest.mark.asyncio
async def test_update_to_a_taken_email_is_already_exists(client: Client) -> None:
    await create(client, "taken@example.com")
    mine = await create(client, "mine@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=mine.id, email="TAKEN@example.com"),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            ),
            metadata=client.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.asyncio
async def test_update_unknown_user_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.UpdateUser(
            pb.UpdateUserRequest(user=user_pb2.User(id=str(uuid.uuid4()), display_name="X")),
            metadata=client.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
async def test_delete_checks_etag_then_removes(client: Client) -> None:
    created = await create(client, "del@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.DeleteUser(
            pb.DeleteUserRequest(id=created.id, etag="stale"), metadata=client.metadata
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    await client.stub.DeleteUser(
        pb.DeleteUserRequest(id=created.id, etag=created.etag), metadata=client.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetUser(pb.GetUserRequest(id=created.id), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.DeleteUser(pb.DeleteUserRequest(id=created.id), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
async def test_ids_sort_in_creation_order(client: Client) -> None:
    ids = []
    for index in range(60):
        response = await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user(f"order{index}@example.com")),
            metadata=client.metadata,
        )
        ids.append(response.user.id)
    assert ids == sorted(ids)
    listed = await client.stub.ListUsers(
        pb.ListUsersRequest(page_size=100), metadata=client.metadata
    )
    assert [user.id for user in listed.users] == ids


@pytest.mark.asyncio
async def test_every_answer_carries_the_request_id_in_its_trailers(client: Client) -> None:
    user = await create(client, "trailers@example.com")
    given = (*client.metadata, ("x-request-id", "trail-1"))
    ok = client.stub.GetUser(pb.GetUserRequest(id=user.id), metadata=given)
    await ok
    assert dict(await ok.trailing_metadata())["x-request-id"] == "trail-1"
    assert "x-request-id" not in dict(await ok.initial_metadata())
    missing = client.stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), metadata=given)
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await missing
    trailers = dict(not_found.value.trailing_metadata() or ())
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    # Beside the rich details the domain error carries.
    assert trailers["x-request-id"] == "trail-1"
    assert "grpc-status-details-bin" in trailers
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.stub.GetUser(
            pb.GetUserRequest(id=user.id), metadata=(("x-request-id", "trail-2"),)
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(refused.value.trailing_metadata() or ())["x-request-id"] == "trail-2"
