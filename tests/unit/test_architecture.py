"""Layering rules the template promises: the domain knows nothing of gRPC or storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src" / "userservice"
# What the domain must not import: gRPC, protobuf, the generated code (package `user.v1`),
# and every layer above or beside it.
FORBIDDEN_IN_DOMAIN = (
    "grpc",
    "grpc_status",
    "grpc_health",
    "google.protobuf",
    "google.rpc",
    "user.v1",
    "userservice.transport",
    "userservice.storage",
    "userservice.interceptors",
    "userservice.server",
    "userservice.health",
)
FORBIDDEN_IN_STORAGE = ("grpc", "user.v1", "userservice.transport", "userservice.interceptors")


def imported_modules(path: Path) -> set[str]:
    """Return every module a file imports, absolute names only."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    """Return the imports of path that fall under one of the forbidden packages."""
    return sorted(
        module
        for module in imported_modules(path)
        if any(module == prefix or module.startswith(prefix + ".") for prefix in forbidden)
    )


@pytest.mark.parametrize("path", sorted((SOURCE / "domain").glob("*.py")), ids=lambda p: p.name)
def test_domain_imports_no_grpc_generated_code_or_other_layer(path: Path) -> None:
    assert offending(path, FORBIDDEN_IN_DOMAIN) == []


@pytest.mark.parametrize("path", sorted((SOURCE / "storage").glob("*.py")), ids=lambda p: p.name)
def test_storage_does_not_depend_on_transport(path: Path) -> None:
    assert offending(path, FORBIDDEN_IN_STORAGE) == []
