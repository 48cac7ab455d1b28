"""MkDocs hook and griffe extension for the API reference.

``on_page_content`` turns Sphinx roles left in docstrings into links (or plain code).

Docstrings in ``src/`` use Google style with the occasional Sphinx role, such as
``:class:`RetryPolicy` `` or ``:func:`save_lightning_features` ``. mkdocstrings renders
those as ``:class:<code>RetryPolicy</code>``. This hook drops the role and, when the
name is public, wraps the code in an optional cross-reference that mkdocs-autorefs
resolves to the name's entry in the API reference. An unresolved name stays plain code.
It also drops the second colon of reStructuredText's ``text::`` before a code block.

``ShowDefaultValues`` (a griffe extension, named in ``mkdocs.yml``) shows a parameter's
default as its value when the source names a module constant: ``max_workers: int = 2``,
not ``= DEFAULT_MAX_WORKERS``, which says nothing to a reader of the reference.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

import griffe

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


# A constant's value replaces its name only when it is this short and a plain literal
# (a number, a string, True/False/None); a long tuple stays named, and its docstring says.
_MAX_SHOWN_VALUE = 40


class ShowDefaultValues(griffe.Extension):
    """Replace a default that names a module constant with the constant's literal value."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Once the package is loaded (every module, so every constant, is known)."""
        self._walk(pkg, loader)

    def _walk(self, obj: griffe.Object, loader: griffe.GriffeLoader) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue  # a re-export: its target is visited in its own module
            if isinstance(member, griffe.Function):
                self._show_values(member, loader)
            elif isinstance(member, griffe.Module | griffe.Class):
                self._walk(member, loader)

    @staticmethod
    def _show_values(function: griffe.Function, loader: griffe.GriffeLoader) -> None:
        for parameter in function.parameters:
            default = parameter.default
            if not isinstance(default, griffe.ExprName):
                continue
            try:
                target = loader.modules_collection[default.canonical_path]
            except KeyError:
                continue
            value = getattr(target, "value", None)
            if isinstance(value, str) and _is_short_literal(value):
                parameter.default = value


def _is_short_literal(source: str) -> bool:
    if len(source) > _MAX_SHOWN_VALUE:
        return False
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return False
    return value is None or isinstance(value, bool | int | float | str)
