"""One knob table, true to the constructor: README, docs/tuning.md and the CLI example.

The async knobs are the parameters of ``lamin_lightning.Checkpoint`` that the
reference's ``lamindb.integrations.lightning.Checkpoint`` does not have (``filename``
and ``save_on_exception``, Lightning's own arguments, aside). The reference's
signature is read from its source with ``ast``, so this module imports no lamindb
(and needs no instance).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import lamin_lightning

ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| argument | default | what it does |"
CONFIG = ROOT / "examples" / "lightning_cli" / "config.yaml"


def _reference_parameters() -> set[str]:
    spec = importlib.util.find_spec("lamindb")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0]) / "integrations" / "lightning.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "Checkpoint":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    arguments = item.args
                    return {
                        a.arg for a in [*arguments.args, *arguments.kwonlyargs] if a.arg != "self"
                    }
    raise AssertionError(f"no Checkpoint.__init__ in {source}")


def _async_knobs() -> dict[str, Any]:
    """Each async knob of lamin_lightning.Checkpoint and its default, in signature order."""
    parameters = inspect.signature(lamin_lightning.Checkpoint.__init__).parameters
    reference = _reference_parameters()
    lightnings = set(inspect.signature(ModelCheckpoint.__init__).parameters)
    return {
        name: p.default
        for name, p in parameters.items()
        if name not in reference and name not in lightnings
    }


def _knob_table(page: Path) -> tuple[str, dict[str, str]]:
    """The page's knob table: its text, and each row's default cell by argument."""
    text = page.read_text()
    assert text.count(TABLE_HEADER) == 1, f"{page.name}: one knob table ({TABLE_HEADER!r})"
    start = text.index(TABLE_HEADER)
    end = text.find("\n\n", start)
    table = text[start : end if end != -1 else len(text)].strip()
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        argument = re.fullmatch(r"`(\w+)`", cells[0])
        assert argument, f"{page.name}: the first cell names an argument in backticks: {line}"
        rows[argument[1]] = cells[1]
    return table, rows


def test_the_async_knobs_are_the_ones_this_test_expects() -> None:
    """The comparison with the reference finds the knobs (a sanity check of the method)."""
    knobs = _async_knobs()
    assert {"max_workers", "max_pending", "retry", "flush_timeout", "on_error"} <= set(knobs)
    assert {"async_write", "max_snapshots", "log_stats", "outbox"} <= set(knobs)
    assert "monitor" not in knobs and "key_is_virtual" not in knobs


@pytest.mark.parametrize("page", ["README.md", "docs/tuning.md"])
def test_the_knob_table_lists_every_async_knob_with_its_real_default(page: str) -> None:
    """Each knob, and nothing else, has a row whose default cell starts with its default."""
    knobs = _async_knobs()
    _, rows = _knob_table(ROOT / page)
    assert list(rows) == list(knobs), f"{page}: rows in the constructor's order, every knob"
    for name, default in knobs.items():
        shown = re.match(r"`([^`]+)`", rows[name])
        assert shown, f"{page}: the default of {name} in backticks first: {rows[name]!r}"
        assert ast.literal_eval(shown[1]) == default, (
            f"{page}: {name} defaults to {default!r}, the table says {shown[1]}"
        )
        assert type(ast.literal_eval(shown[1])) is type(default)


def test_the_readme_and_tuning_hold_the_same_table() -> None:
    """One table: the README's is the tuning page's, word for word."""
    assert _knob_table(ROOT / "README.md")[0] == _knob_table(ROOT / "docs" / "tuning.md")[0]


def test_the_cli_example_sets_every_knob_and_states_its_default() -> None:
    """config.yaml sets each knob under init_args; its comment gives the real default."""
    config = yaml.safe_load(CONFIG.read_text())
    (callback,) = [
        c for c in config["trainer"]["callbacks"] if c["class_path"] == "lamin_lightning.Checkpoint"
    ]
    knobs = _async_knobs()
    assert set(knobs) <= set(callback["init_args"]), "config.yaml lacks a knob"
    text = CONFIG.read_text()
    for name, default in knobs.items():
        line = re.search(rf"^\s+{name}:.*#.*\(default ([^):]+)", text, flags=re.MULTILINE)
        assert line, f"config.yaml: the line of {name} ends its comment with (default ...)"
        assert yaml.safe_load(line[1]) == default, (
            f"config.yaml: {name} defaults to {default!r}, the comment says {line[1]}"
        )
