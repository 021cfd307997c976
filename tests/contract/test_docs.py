"""The docs stay true to the code: settings, RPCs, tests and links they name all exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from user.v1 import user_service_pb2

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# A markdown link's target: [text](target), without the optional "title".
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _settings_page() -> ModuleType:
    """Load tools/settings_page.py, the generator `make config-page` runs."""
    spec = importlib.util.spec_from_file_location("settings_page", ROOT / "tools/settings_page.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _anchors(page: Path) -> set[str]:
    """Return the anchors of a page's headings, spelt as mkdocs' toc extension spells them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, re.MULTILINE)
    slugs = (re.sub(r"[^\w\s-]", "", heading.lower()).strip() for heading in headings)
    return {re.sub(r"[-\s]+", "-", slug) for slug in slugs}


def test_the_configuration_page_is_generated_from_the_current_settings() -> None:
    page = DOCS / "configuration.md"
    committed = page.read_text()
    assert _settings_page().render_page(committed) == committed, "run `make config-page`"


def test_the_api_page_documents_every_rpc() -> None:
    page = (DOCS / "api.md").read_text()
    service = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
    missing = [method.name for method in service.methods if f"| `{method.name}` |" not in page]
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


def test_every_readme_link_resolves() -> None:
    targets = _LINK.findall(README.read_text())
    assert len(targets) > 10
    broken = []
    for target in targets:
        if target.startswith(("https://", "http://")):
            continue
        path, _, anchor = target.partition("#")
        page = (README.parent / path) if path else README
        if not page.exists() or (anchor and anchor not in _anchors(page)):
            broken.append(target)
    assert broken == []


def test_the_readme_stays_a_short_front_door_without_history() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    headings = [
        f"{page.name}: {line}"
        for page in [README, *DOCS.rglob("*.md")]
        for line in page.read_text().splitlines()
        if re.match(r"#+ .*\bissue \d", line, re.IGNORECASE)
    ]
    assert headings == []
