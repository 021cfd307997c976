"""Rotating the page-token secret across a rolling deploy: replicas keep each other's tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import grpc
import pytest
from helpers.servers import Client, connect, make_settings, running_app
from helpers.users import new_user

from user.v1 import user_service_pb2 as pb
from userservice.domain.errors import InvalidArgumentError
from userservice.domain.pagination import PagePosition, PageTokenCodec, key_id

OLD, NEW = "page-token-secret-before-the-rotation", "page-token-secret-after-the-rotation"


async def first_page(client: Client) -> pb.ListUsersResponse:
    return await client.stub.ListUsers(pb.ListUsersRequest(page_size=2), metadata=client.metadata)


async def next_page(client: Client, token: str) -> pb.ListUsersResponse:
    request = pb.ListUsersRequest(page_size=2, page_token=token)
    return await client.stub.ListUsers(request, metadata=client.metadata)


@pytest.mark.asyncio
async def test_replicas_on_both_sides_of_a_rotation_accept_each_others_tokens(
    postgres_url: str,
) -> None:
    # Step 2 of the documented rotation: some replicas still sign with the old secret (and
    # already accept the new one), others sign with the new one and accept the old one.
    before = make_settings(postgres_url, page_token_secret=OLD, page_token_previous_secrets=NEW)
    after = make_settings(postgres_url, page_token_secret=NEW, page_token_previous_secrets=OLD)
    async with (
        running_app(before) as old_app,
        running_app(after) as new_app,
        connect(old_app.port) as old_client,
        connect(new_app.port) as new_client,
    ):
        for index in range(5):
            user = new_user(f"page{index}@example.com")
            await old_client.stub.CreateUser(
                pb.CreateUserRequest(user=user), metadata=old_client.metadata
            )
        expected = [user.id for user in (await first_page(old_client)).users]
        for issuer, resumer in ((old_client, new_client), (new_client, old_client)):
            page = await first_page(issuer)
            resumed = await next_page(resumer, page.next_page_token)
            assert [user.id for user in page.users] == expected
            assert len(resumed.users) == 2
            assert resumed.users[0].id > expected[-1]


@pytest.mark.asyncio
async def test_a_token_of_a_retired_secret_is_rejected(sqlite_url: str) -> None:
    original = make_settings(sqlite_url, page_token_secret=OLD)
    async with running_app(original) as app, connect(app.port) as client:
        for index in range(3):
            await client.stub.CreateUser(
                pb.CreateUserRequest(user=new_user(f"r{index}@example.com")),
                metadata=client.metadata,
            )
        token = (await first_page(client)).next_page_token
    rotated = make_settings(sqlite_url, page_token_secret=NEW, page_token_previous_secrets=OLD)
    async with running_app(rotated) as app, connect(app.port) as client:
        assert len((await next_page(client, token)).users) == 1
    retired = make_settings(sqlite_url, page_token_secret=NEW)
    async with running_app(retired) as app, connect(app.port) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await next_page(client, token)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")


def _legacy_token(key: bytes, after_id: str, filter_text: str) -> str:
    """A token as issued before key ids: <body>.<mac>, the MAC over the raw body."""
    digest = hashlib.sha256(filter_text.encode()).hexdigest()[:16]
    body = json.dumps({"v": 1, "a": after_id, "f": digest}, separators=(",", ":")).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()[:16]

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64(body)}.{b64(mac)}"


def test_tokens_from_before_key_ids_are_checked_against_the_whole_ring() -> None:
    codec = PageTokenCodec(NEW.encode(), [OLD.encode()])
    assert codec.decode(_legacy_token(OLD.encode(), "u-1", ""), "") == PagePosition("u-1", None)
    with pytest.raises(InvalidArgumentError):
        codec.decode(_legacy_token(b"someone else's key", "u-1", ""), "")


def test_the_key_id_is_part_of_what_is_signed() -> None:
    old, new = PageTokenCodec(OLD.encode()), PageTokenCodec(NEW.encode(), [OLD.encode()])
    kid, body, mac = old.encode("u-1", "", 7).split(".")
    assert kid == key_id(OLD.encode()) != key_id(NEW.encode())
    assert new.decode(f"{kid}.{body}.{mac}", "") == PagePosition("u-1", 7)
    # The same body and MAC under the other key's id: rejected, not re-verified.
    with pytest.raises(InvalidArgumentError, match="not a token this service issued"):
        new.decode(f"{key_id(NEW.encode())}.{body}.{mac}", "")
