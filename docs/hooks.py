"""MkDocs hook: turn Sphinx roles left in docstrings into links (or plain code).

Docstrings in ``src/`` use Google style with the occasional Sphinx role, such as
``:class:`RetryPolicy` `` or ``:func:`save_lightning_features` ``. mkdocstrings renders
those as ``:class:<code>RetryPolicy</code>``. This hook drops the role and, when the
name is public, wraps the code in an optional cross-reference that mkdocs-autorefs
resolves to the name's entry in the API reference. An unresolved name stays plain code.
It also drops the second colon of reStructuredText's ``text::`` before a code block.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src" / "lamin_lightning"
ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):<code>~?([\w.]+)</code>")
LITERAL_BLOCK_MARKER = re.compile(r"::</p>(\s*<div class=\"(?:language-\w+ )?highlight)")


@cache
def _public(module: Path) -> frozenset[str]:
    """The names in ``__all__`` of a module, read without importing it."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


def _identifier(name: str, testing_page: bool) -> str | None:
    if name.startswith("lamin_lightning."):
        return name
    if testing_page and name in _public(SRC / "testing.py"):
        return f"lamin_lightning.testing.{name}"
    if name in _public(SRC / "__init__.py"):
        return f"lamin_lightning.{name}"
    return None


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Replace every ``:role:<code>name</code>`` in an API page's HTML."""
    if not page.file.src_uri.startswith("api/"):
        return html
    testing_page = page.file.src_uri == "api/testing.md"

    def replace(match: re.Match[str]) -> str:
        name = match[1]
        shown = f"<code>{name.rsplit('.', 1)[-1] if match[0].count('~') else name}</code>"
        identifier = _identifier(name, testing_page)
        if identifier is None:
            return shown
        return f'<autoref optional identifier="{identifier}">{shown}</autoref>'

    return LITERAL_BLOCK_MARKER.sub(r":</p>\1", ROLE.sub(replace, html))
