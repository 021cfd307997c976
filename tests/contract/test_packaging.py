"""The wheel the Dockerfile installs carries everything the service needs at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_migrations_stubs_and_the_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("userservice-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "userservice/storage/sqlite/sql/0001_init.sql",
        "userservice/storage/postgres/sql/0001_init.sql",
        "userservice/py.typed",
        "user/v1/user_service_pb2.py",
        "user/v1/user_service_pb2_grpc.py",
        "user/v1/user_service_pb2.pyi",
    ):
        assert required in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "userservice = userservice.cli:main" in text
    # The license the repository states (LICENSE, pyproject's license) travels with the wheel.
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    licensed = next(name for name in names if name.endswith(".dist-info/licenses/LICENSE"))
    assert zipfile.ZipFile(wheel).read(licensed) == (ROOT / "LICENSE").read_bytes()
