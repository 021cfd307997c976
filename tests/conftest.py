"""Shared fixtures: a fresh database per test, the app and a client, TLS files, the access log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers.databases import fresh_postgres_database
from helpers.interceptor_harness import AccessLog
from helpers.pki import write_pki

from userservice.storage.migrations import backend_migrations


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip upgrade tests across a migration this tree lacks: a generated service has none."""
    present = {migration.name for migration in backend_migrations("sqlite")}
    for item in items:
        for marker in item.iter_markers("upgrades_across"):
            if marker.args[0] not in present:
                reason = f"no migration {marker.args[0]}: the schema history starts squashed"
                item.add_marker(pytest.mark.skip(reason=reason))


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
    from helpers.servers import make_settings, running_app

    async with running_app(make_settings(database_url)) as application:
        yield application


@pytest_asyncio.fixture
async def client(app: Any) -> AsyncIterator[Any]:
    """Return a client with every scope, connected to the app fixture's server."""
    from helpers.servers import connect

    async with connect(app.port) as connected:
        yield connected


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path | bytes]:
    """Write a CA, a server certificate for localhost and a client certificate."""
    return write_pki(tmp_path)


@pytest.fixture
def log(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> AccessLog:
    """The access lines written to stderr during the test."""
    return AccessLog(capsys, caplog)
