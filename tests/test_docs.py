"""The documentation stays true to the code: every public name documented, every cited test real.

``make docs`` builds the site strictly (broken links, anchors and docstrings fail it);
these tests catch what the build cannot see: a public name missing from the API
reference, or a page citing a test that was renamed or never written.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lamin_lightning
import lamin_lightning.testing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITATION = re.compile(r"\btests/[\w/]+\.py(?:::\w+)?")


def _documented(page: Path) -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE))


def test_every_public_name_is_in_the_api_reference() -> None:
    """Each name of lamin_lightning.__all__ has a ::: entry; the testing module is documented."""
    documented = _documented(DOCS / "api" / "lamin_lightning.md")
    public = {f"lamin_lightning.{name}" for name in lamin_lightning.__all__}
    assert public - documented == set(), "add these to docs/api/lamin_lightning.md"
    assert documented - public == set(), "documented but not in lamin_lightning.__all__"
    assert "lamin_lightning.testing" in _documented(DOCS / "api" / "testing.md")
    assert lamin_lightning.testing.__all__


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_docs_cite_exists() -> None:
    """Each tests/...py (and ::test_name) cited in docs/ names an existing file and test."""
    citations = {
        (page.relative_to(ROOT), citation)
        for page in DOCS.rglob("*.md")
        for citation in CITATION.findall(page.read_text())
    }
    assert len(citations) > 20, "the guarantees page should cite the tests that prove them"
    missing = []
    for page, citation in sorted(citations):
        file, _, name = citation.partition("::")
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{page}: {citation} (no such file)")
        elif name and name not in _test_names(path):
            missing.append(f"{page}: {citation} (no such test in {file})")
    assert not missing, "\n".join(missing)
