"""The suite's PostgreSQL and Redis: where they are, and a fresh database per test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "USERSERVICE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("USERSERVICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("USERSERVICE_REQUIRE_SERVICES", "").lower() in {"1", "true"}


def unavailable(what: str, error: BaseException) -> None:
    """Skip the test, a service being unreachable (fail it if USERSERVICE_REQUIRE_SERVICES=1)."""
    message = f"{what} is not reachable ({error.__class__.__name__}: {error})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; USERSERVICE_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)


def with_database(url: str, database: str) -> str:
    """Return url with its database name replaced."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """Create a PostgreSQL database for one test and drop it afterwards."""
    import asyncpg

    database = f"userservice_test_{uuid.uuid4().hex[:16]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL}", error)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    try:
        yield with_database(POSTGRES_ADMIN_URL, database)
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
