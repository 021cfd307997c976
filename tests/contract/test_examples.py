"""The README's client example runs against a real server and prints what it promises."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from helpers.tokens import bearer

from userservice.server import Application

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "client.py"


@pytest.mark.asyncio
async def test_readme_client_example(app: Application) -> None:
    token = bearer().removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--target",
        f"127.0.0.1:{app.port}",
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
    assert process.returncode == 0, output
    assert "created " in output
    assert "fetched example-" in output
    assert "INVALID_ARGUMENT" in output
    assert "field user.email" in output
    assert "field user.display_name" in output
    assert "reason INVALID_FIELD (userservice)" in output
