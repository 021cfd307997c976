"""ListUsers pagination, filters and page-token integrity through the real server."""

from __future__ import annotations

import asyncio
import base64

import grpc
import pytest
from helpers.servers import Client, rich_details, violated_fields
from helpers.users import new_user

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb


async def seed(
    client: Client, count: int, prefix: str = "user", role: int = 0
) -> list[user_pb2.User]:
    users = []
    for index in range(count):
        response = await client.stub.CreateUser(
            pb.CreateUserRequest(user=new_user(f"{prefix}{index:03d}@example.com", role=role)),
            metadata=client.metadata,
        )
        users.append(response.user)
    return users


async def list_all(client: Client, page_size: int, filter_text: str = "") -> list[str]:
    seen: list[str] = []
    token = ""
    while True:
        page = await client.stub.ListUsers(
            pb.ListUsersRequest(page_size=page_size, page_token=token, filter=filter_text),
            metadata=client.metadata,
        )
        seen.extend(user.id for user in page.users)
        token = page.next_page_token
        if not token:
            return seen


@pytest.mark.asyncio
async def test_pages_cover_every_user_once_in_id_order(client: Client) -> None:
    users = await seed(client, 7)
    first = await client.stub.ListUsers(pb.ListUsersRequest(page_size=3), metadata=client.metadata)
    assert len(first.users) == 3
    assert first.total_size == 7
    assert first.next_page_token
    assert await list_all(client, 3) == sorted(user.id for user in users)


@pytest.mark.asyncio
async def test_last_page_has_empty_token_and_default_size_applies(client: Client) -> None:
    await seed(client, 3)
    page = await client.stub.ListUsers(pb.ListUsersRequest(), metadata=client.metadata)
    assert len(page.users) == 3
    assert page.next_page_token == ""
    assert page.total_size == 3


@pytest.mark.asyncio
async def test_negative_page_size_is_invalid(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ListUsers(pb.ListUsersRequest(page_size=-1), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["page_size"]


@pytest.mark.asyncio
async def test_filters_by_role_and_email(client: Client) -> None:
    admins = await seed(client, 2, prefix="admin", role=user_pb2.USER_ROLE_ADMIN)
    await seed(client, 3, prefix="viewer")
    page = await client.stub.ListUsers(
        pb.ListUsersRequest(filter="role = USER_ROLE_ADMIN"), metadata=client.metadata
    )
    assert {u.id for u in page.users} == {u.id for u in admins}
    assert page.total_size == 2
    page = await client.stub.ListUsers(
        pb.ListUsersRequest(filter='email = "ADMIN001@example.com"'), metadata=client.metadata
    )
    assert [u.id for u in page.users] == [admins[1].id]
    assert page.total_size == 1
    page = await client.stub.ListUsers(
        pb.ListUsersRequest(filter='email : "viewer" AND role != ADMIN'), metadata=client.metadata
    )
    assert page.total_size == 3


@pytest.mark.asyncio
async def test_substring_filter_treats_wildcards_literally(client: Client) -> None:
    await seed(client, 2)
    page = await client.stub.ListUsers(
        pb.ListUsersRequest(filter='email : "%"'), metadata=client.metadata
    )
    assert page.total_size == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "text", ["role = WIZARD", "role >= ADMIN", "email", "email = a OR role = ADMIN", '"x"']
)
async def test_malformed_filter_is_invalid(client: Client, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.ListUsers(pb.ListUsersRequest(filter=text), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["filter"]


def _tamper(token: str) -> str:
    body, _, mac = token.partition(".")
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-3] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode() + "." + mac


@pytest.mark.asyncio
async def test_forged_and_foreign_page_tokens_are_invalid(client: Client) -> None:
    await seed(client, 4)
    page = await client.stub.ListUsers(pb.ListUsersRequest(page_size=2), metadata=client.metadata)
    token = page.next_page_token
    for bad_token, bad_filter in (
        (_tamper(token), ""),
        ("made-up-token", ""),
        ("eyJ2IjoxLCJhIjoiIiwiZiI6IiJ9.AAAAAAAAAAAAAAAAAAAAAA", ""),
        (token, "role = ADMIN"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.ListUsers(
                pb.ListUsersRequest(page_size=2, page_token=bad_token, filter=bad_filter),
                metadata=client.metadata,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(caught.value) == ["page_token"]
        assert rich_details(caught.value)["ErrorInfo"].reason == "INVALID_PAGE_TOKEN"


@pytest.mark.asyncio
async def test_pagination_is_stable_under_concurrent_inserts(client: Client) -> None:
    existing = {user.id for user in await seed(client, 30)}
    stop = asyncio.Event()

    async def insert_while_paging() -> None:
        index = 0
        while not stop.is_set():
            await client.stub.CreateUser(
                pb.CreateUserRequest(user=new_user(f"late{index}@example.com")),
                metadata=client.metadata,
            )
            index += 1

    inserter = asyncio.create_task(insert_while_paging())
    try:
        seen = await list_all(client, 4)
    finally:
        stop.set()
        await inserter
    assert len(seen) == len(set(seen)), "a user appeared on two pages"
    assert existing <= set(seen), "a user that existed before paging was skipped"
    assert seen == sorted(seen)


@pytest.mark.asyncio
async def test_the_total_is_counted_with_the_first_page_and_carried_by_the_token(
    client: Client,
) -> None:
    await seed(client, 5)
    first = await client.stub.ListUsers(pb.ListUsersRequest(page_size=2), metadata=client.metadata)
    assert first.total_size == 5
    # A later page repeats the first page's count instead of counting again (AIP-132):
    # a user created meanwhile shows up in the rows, not in the carried total.
    await seed(client, 1, prefix="late")
    second = await client.stub.ListUsers(
        pb.ListUsersRequest(page_size=2, page_token=first.next_page_token),
        metadata=client.metadata,
    )
    assert second.total_size == 5
    fresh = await client.stub.ListUsers(pb.ListUsersRequest(page_size=2), metadata=client.metadata)
    assert fresh.total_size == 6
