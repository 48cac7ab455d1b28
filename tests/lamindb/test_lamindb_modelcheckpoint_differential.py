"""The differential harness of ``tests/test_modelcheckpoint_differential.py`` with the real
``lamin_lightning.Checkpoint``, on this tier's offline local instance: the same fit with
Lightning's ``ModelCheckpoint`` and with ours, compared file for file, state for state,
and ours' artifacts against the files Lightning kept.

Each case's dirpath holds a fresh random folder (``compare`` adds it), so artifacts of
other tests in the session's instance are never taken for this case's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from test_modelcheckpoint_differential import (
    CORNER_CASES,
    KNOB_SETS,
    T,
    assert_same,
    compare,
    random_case,
)


@pytest.mark.parametrize("knobs", KNOB_SETS)
@pytest.mark.parametrize(
    ("opts", "train", "extra"),
    [
        pytest.param(*c[1:], id=c[0])
        for c in CORNER_CASES
        if c[0]
        in {
            "fixed-name-all-versions",
            "nan-val-max-top2",
            "preexisting-last-link",
            "resume-last-link",
            "resume-best-early-v1",
            "migrate-from-modelcheckpoint",
            "slash-metric-subfolder",
        }
    ],
)
def test_lamindb_corner_case_matches_model_checkpoint(
    ln: Any,
    tmp_path: Path,
    opts: dict[str, Any],
    train: dict[str, Any],
    extra: dict[str, Any],
    knobs: dict[str, Any],
) -> None:
    assert_same(compare(tmp_path / "case", opts, train, knobs=knobs, kind="lamin", **extra))


@pytest.mark.parametrize("seed", range(7000, 7010))
def test_lamindb_random_case_matches_model_checkpoint(ln: Any, tmp_path: Path, seed: int) -> None:
    assert_same(compare(tmp_path / "case", kind="lamin", **random_case(seed)))


def test_lamindb_async_write_reuses_the_name_of_a_just_evicted_checkpoint(
    ln: Any, tmp_path: Path
) -> None:
    """A template whose metric comes back to an earlier value names the checkpoint just
    evicted, whose removal waits for its replacement's background write: Lightning
    reuses the name (no ``-v1``), as with ``ModelCheckpoint``."""
    opts = {
        "monitor": None,
        "save_top_k": 1,
        "every_n_train_steps": 1,
        "filename": "m-{train_loss:.0f}",
        "auto_insert_metric_name": False,
    }
    train = T(train="rep", n_batches=4, max_epochs=2)
    assert_same(compare(tmp_path / "case", opts, train, knobs={"async_write": True}, kind="lamin"))
