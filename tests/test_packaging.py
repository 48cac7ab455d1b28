"""The package declares what it imports: a clean ``pip install lamin-lightning`` can run it.

Every third-party module that ``src/lamin_lightning`` imports (at run time, lazily or for
type checking) comes from a distribution listed in ``[project].dependencies``, and every
listed distribution is imported somewhere (no dependency that nothing uses).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lamin_lightning"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """The distributions of ``[project].dependencies``, normalized (PEP 503)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert found, f"cannot read the requirement {requirement!r}"
        names.add(_normalized(found.group()))
    return names


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module imported -> the files of src/lamin_lightning that import it."""
    modules: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                modules.setdefault(name.split(".")[0], set()).add(path.name)
    return modules


def _third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    ignored = set(sys.stdlib_module_names) | {"lamin_lightning", "__future__"}
    return {name: files for name, files in modules.items() if name not in ignored}


def _provided_by(distribution: str) -> set[str]:
    """``distribution`` and what it pins exactly (a metapackage: ``lamindb`` is
    ``lamindb-core==<its version>``, which holds the ``lamindb`` module)."""
    provided = {_normalized(distribution)}
    for requirement in importlib.metadata.requires(distribution) or []:
        if ";" in requirement:  # an extra's or a platform's requirement
            continue
        found = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*\(?\s*==", requirement)
        if found:
            provided.add(_normalized(found.group(1)))
    return provided


def test_the_scan_finds_the_imports_it_must() -> None:
    """The ast scan sees top-level, lazy and TYPE_CHECKING imports, and drops the stdlib."""
    found = _third_party(_imported_modules())
    # _local_write imports torch at the top, _lamin_features lamindb inside a function,
    # _callback typing_extensions at the top and _progress tqdm inside a function.
    assert {"torch", "lamindb", "typing_extensions", "tqdm", "lightning"} <= set(found)
    assert not {"os", "json", "fcntl", "importlib", "lamin_lightning"} & set(found)


def test_every_imported_module_is_a_declared_dependency() -> None:
    """Each third-party module src/ imports comes from a distribution pyproject declares."""
    distributions = importlib.metadata.packages_distributions()
    declared = set().union(*(_provided_by(name) for name in _declared()))
    undeclared = []
    for module, files in sorted(_third_party(_imported_modules()).items()):
        candidates = {_normalized(d) for d in distributions.get(module, [])}
        assert candidates, f"{module} (imported by {sorted(files)}) is not installed"
        if not candidates & declared:
            undeclared.append(f"{module}: from {sorted(candidates)}, imported by {sorted(files)}")
    assert not undeclared, "declare in [project].dependencies:\n" + "\n".join(undeclared)


def test_every_declared_dependency_is_imported() -> None:
    """Each distribution of [project].dependencies provides a module src/ imports."""
    distributions = importlib.metadata.packages_distributions()
    used = {
        _normalized(distribution)
        for module in _third_party(_imported_modules())
        for distribution in distributions.get(module, [])
    }
    unused = sorted(name for name in _declared() if not _provided_by(name) & used)
    assert not unused, f"declared in pyproject.toml but never imported by src/: {unused}"


def test_the_installed_metadata_matches_pyproject() -> None:
    """The installed lamin-lightning declares what pyproject.toml does (reinstall if not)."""
    installed = {
        _normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group())  # type: ignore[union-attr]
        for requirement in importlib.metadata.requires("lamin-lightning") or []
        if "extra ==" not in requirement
    }
    assert installed == _declared(), (
        "the installed metadata is stale: run"
        " `.venv/bin/python -m pip install -c constraints.txt -e '.[test,lint,types,bench,docs]'`"
    )


def test_the_version_is_one_number() -> None:
    """``lamin_lightning.__version__`` (what ``--version`` prints) is pyproject's version."""
    import lamin_lightning

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert lamin_lightning.__version__ == project["version"]
    assert importlib.metadata.version("lamin-lightning") == project["version"]
