"""The API reference shows each default as its value (``max_workers: int = 2``).

The signatures name constants (``max_workers: int = DEFAULT_MAX_WORKERS``), which
mkdocstrings would render as written. ``docs/hooks.py``'s griffe extension, named in
``mkdocs.yml``, replaces them with their values; this test loads the package the way
mkdocstrings does, with that extension, and compares with the signatures at run time.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import pytest

import lamin_lightning

griffe = pytest.importorskip("griffe")  # the docs extra

ROOT = Path(__file__).resolve().parents[1]
CONSTRUCTORS = {
    "_lamin.Checkpoint.__init__": lamin_lightning.Checkpoint,
    "_callback.ArtifactPublishingModelCheckpoint.__init__": (
        lamin_lightning.ArtifactPublishingModelCheckpoint
    ),
}


def _load_with_extension() -> Any:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert "docs/hooks.py:ShowDefaultValues" in (ROOT / "mkdocs.yml").read_text()
    loader = griffe.GriffeLoader(
        search_paths=[str(ROOT / "src")],
        extensions=griffe.load_extensions(hooks.ShowDefaultValues),
    )
    return loader.load("lamin_lightning")


@pytest.mark.parametrize("path", sorted(CONSTRUCTORS))
def test_rendered_defaults_are_the_values_of_the_signature(path: str) -> None:
    """Each plain default (number, string, bool, None) renders as a literal equal to it."""
    package = _load_with_extension()
    rendered = {p.name: p.default for p in package[path].parameters}
    compared = 0
    for name, parameter in inspect.signature(CONSTRUCTORS[path].__init__).parameters.items():
        default = parameter.default
        if default is inspect.Parameter.empty or not (
            default is None or isinstance(default, bool | int | float | str)
        ):
            continue
        shown = str(rendered[name])
        assert "DEFAULT_" not in shown, f"{path}: {name} renders as {shown}"
        assert ast.literal_eval(shown) == default, f"{path}: {name} renders as {shown}"
        compared += 1
    assert {"max_workers", "max_pending", "flush_timeout"} <= set(rendered)
    assert compared >= 9
