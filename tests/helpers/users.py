"""Users to create: a domain User for the stores, a User message for the API, a created one."""

from __future__ import annotations

from collections.abc import AsyncIterator

from helpers.servers import Client
from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import Role, User


def make_user(
    email: str = "ann@example.com",
    display_name: str = "Ann",
    role: Role = Role.VIEWER,
    at: int | None = None,
) -> User:
    """Build a user the way the domain does before a create."""
    timestamp = now_us() if at is None else at
    return User(new_user_id(), email, display_name, role, timestamp, timestamp, 1)


def new_user(email: str, display_name: str = "Ada Lovelace", role: int = 0) -> user_pb2.User:
    """Return a User message to create."""
    return user_pb2.User(email=email, display_name=display_name, role=role)  # type: ignore[arg-type]


async def create(
    client: Client, email: str, display_name: str = "Ada Lovelace", role: int = 0
) -> user_pb2.User:
    """Create a user through the API and return it as stored."""
    response = await client.stub.CreateUser(
        pb.CreateUserRequest(user=new_user(email, display_name, role)),
        metadata=client.metadata,
        timeout=10,
    )
    return response.user


async def import_users(client: Client, count: int, prefix: str) -> None:
    """Create count users through one ImportUsers stream: one burst of count events."""

    async def requests() -> AsyncIterator[pb.ImportUsersRequest]:
        for index in range(count):
            yield pb.ImportUsersRequest(user=new_user(f"{prefix}{index:05d}@example.com"))

    response = await client.stub.ImportUsers(requests(), metadata=client.metadata, timeout=120)
    assert response.created_count == count
