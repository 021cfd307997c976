"""A first client: create a user, read it back, and decode rich error details.

Usage: .venv/bin/python examples/client.py --token "$(make -s token)" [--target localhost:50051]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc


def describe(error: grpc.aio.AioRpcError) -> list[str]:
    """Return one line per google.rpc detail of a failed call."""
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines += [f"  field {v.field}: {v.description}" for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            lines.append(f"  retry after {retry.retry_delay.ToTimedelta()}")
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            lines.append(f"  reason {info.reason} ({info.domain})")
    return lines


async def main(target: str, token: str) -> None:
    """Run the example calls against target."""
    auth = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        email = f"example-{uuid.uuid4().hex[:8]}@example.com"
        created = await stub.CreateUser(
            user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email=email, display_name="Example User"),
                request_id=str(uuid.uuid4()),
            ),
            metadata=auth,
            timeout=5,
        )
        print(f"created {created.user.id} etag={created.user.etag}")
        fetched = await stub.GetUser(
            user_service_pb2.GetUserRequest(id=created.user.id), metadata=auth, timeout=5
        )
        print(f"fetched {fetched.user.email} role={user_pb2.UserRole.Name(fetched.user.role)}")
        try:
            await stub.CreateUser(
                user_service_pb2.CreateUserRequest(user=user_pb2.User(email="not-an-email")),
                metadata=auth,
                timeout=5,
            )
        except grpc.aio.AioRpcError as error:
            print("\n".join(describe(error)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--token", required=True)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.target, arguments.token))
