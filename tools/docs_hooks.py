"""mkdocs hooks (mkdocs.yml `hooks:`): pages quote a module's docstring instead of copying it.

A line `<!-- docstring: src/pkg/module.py -->` in a page is replaced by that module's docstring,
so prose that explains code is written once, in the code, and shown on the site. A missing file
or docstring fails the build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_MARKER = re.compile(r"^<!-- docstring: (?P<path>\S+) -->$", re.MULTILINE)


def _docstring(match: re.Match[str]) -> str:
    path = ROOT / match.group("path")
    docstring = ast.get_docstring(ast.parse(path.read_text()), clean=True)
    if not docstring:
        raise ValueError(f"{match.group('path')} has no module docstring to quote")
    return docstring


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace every docstring marker in a page with the module docstring it names."""
    return _MARKER.sub(_docstring, markdown)
