"""The README stays true to the code: every setting and every RPC is documented."""

from __future__ import annotations

import re
from pathlib import Path

from user.v1 import user_service_pb2
from userservice.config import setting_names

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_documents_every_setting() -> None:
    missing = [name for name in setting_names() if f"`{name}`" not in README]
    assert missing == []


def test_readme_documents_every_rpc() -> None:
    service = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
    missing = [method.name for method in service.methods if f"`{method.name}`" not in README]
    assert missing == []


def test_every_test_the_reliability_page_names_exists() -> None:
    tests = Path(__file__).resolve().parents[1]
    page = (tests.parent / "docs" / "reliability.md").read_text()
    # Named by path below tests/ (`integration/test_x.py::name`); a bare file name is missing.
    named = re.findall(r"`((?:\w+/)*test_\w+\.py)::(\w+)`", page)
    assert len(named) > 50
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not (tests / file).is_file()
        or not re.search(rf"^(async )?def {name}\(", (tests / file).read_text(), re.MULTILINE)
    ]
    assert missing == []
