"""Shared fixtures: a fresh database per test (SQLite file or PostgreSQL database)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from userservice.storage.migrations import backend_migrations

POSTGRES_ADMIN_URL = os.environ.get(
    "USERSERVICE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("USERSERVICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("USERSERVICE_REQUIRE_SERVICES", "").lower() in {"1", "true"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip upgrade tests across a migration this tree lacks: a generated service has none."""
    present = {migration.name for migration in backend_migrations("sqlite")}
    for item in items:
        for marker in item.iter_markers("upgrades_across"):
            if marker.args[0] not in present:
                reason = f"no migration {marker.args[0]}: the schema history starts squashed"
                item.add_marker(pytest.mark.skip(reason=reason))


def _unavailable(what: str, error: BaseException) -> None:
    message = f"{what} is not reachable ({error.__class__.__name__}: {error})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; USERSERVICE_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)


def _with_database(url: str, database: str) -> str:
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
        _unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL}", error)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    try:
        yield _with_database(POSTGRES_ADMIN_URL, database)
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture
async def postgres_url() -> AsyncIterator[str]:
    """Return the URL of a PostgreSQL database that exists only for this test."""
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """Return the URL of a SQLite file that exists only for this test."""
    return f"sqlite:///{tmp_path / 'userservice.db'}"


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Return a fresh database URL, once per storage backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'userservice.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


@pytest_asyncio.fixture
async def app(database_url: str) -> AsyncIterator[Any]:
    """Run the real server on an ephemeral loopback port over a fresh database."""
    from support import make_settings, running_app

    async with running_app(make_settings(database_url)) as application:
        yield application


@pytest_asyncio.fixture
async def client(app: Any) -> AsyncIterator[Any]:
    """Return a client with every scope, connected to the app fixture's server."""
    from support import connect

    async with connect(app.port) as connected:
        yield connected
