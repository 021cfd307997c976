"""A first client: create a user, read it back, and decode rich error details.

Usage: .venv/bin/python examples/client.py --token "$(make -s token)" [--target localhost:50051]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from user.v1 import user_pb2
from userservice.client import InvalidArgumentError, UserServiceClient, UserServiceError


async def main(target: str, token: str) -> None:
    """Run the example calls against target."""
    async with UserServiceClient(target, token=token) as client:
        email = f"example-{uuid.uuid4().hex[:8]}@example.com"
        created = await client.create_user(email, "Example User")  # sends a request_id
        print(f"created {created.id} etag={created.etag}")
        fetched = await client.get_user(created.id)
        print(f"fetched {fetched.email} role={user_pb2.UserRole.Name(fetched.role)}")
        try:
            await client.create_user("not-an-email", "")
        except InvalidArgumentError as error:
            print(f"{error.code.name}: {error.message}")
            print(f"  reason {error.reason} ({error.domain})")
            for violation in error.violations:
                print(f"  field {violation.field}: {violation.description}")
        except UserServiceError as error:  # e.g. RESOURCE_EXHAUSTED, after its RetryInfo wait
            print(f"{error.code.name}: {error.message} retry_delay={error.retry_delay}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--token", required=True)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.target, arguments.token))
