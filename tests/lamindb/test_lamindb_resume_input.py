"""Resuming from LaminDB records lineage, and the resumed fit ranks under its own prefix.

``checkpoint_path`` records the checkpoint it returns as an input of the active run,
the one that resumes from it (``ln.track()`` first). The resumed fit's checkpoints go
under that run's prefix, where the ranking (``is_best_model``, ``is_last_model``,
``model_rank``) starts again; the earlier fit's flags stay as they were.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierData, TierModel, artifact_features, artifacts_under, fit, single

import lamin_lightning as ll

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*dirpath has changed.*"),
]

# The score logged at step i is SCORES[i % 4]; a checkpoint after every step, top 2 kept:
# steps 2 (1.0) and 4 (2.0) the first time, steps 6 and 8 when the fit resumes at step 4.
SCORES = [4.0, 1.0, 3.0, 2.0]
STEPS = 4


def _checkpoint(dirpath: Path) -> ll.Checkpoint:
    return ll.Checkpoint(
        dirpath=dirpath, monitor="score", mode="min", save_top_k=2, every_n_train_steps=1
    )


def _flags(ln: Any, prefix: str) -> dict[str, tuple[Any, Any, Any]]:
    """(is_best_model, is_last_model, model_rank) of each checkpoint under ``prefix``, by name."""
    flags = {}
    for key, artifact in artifacts_under(ln, prefix).items():
        if artifact.kind == "model":
            values = single(artifact_features(ln, artifact))
            flags[key.rsplit("/", 1)[1]] = (
                values["is_best_model"],
                values["is_last_model"],
                values["model_rank"],
            )
    return flags


def _train_first(ln: Any, root: Path) -> tuple[ll.Checkpoint, Any]:
    """The earlier fit, under the active run; its checkpoint callback and its last artifact."""
    callback = _checkpoint(root / "first")
    fit(callback, root, steps=STEPS, model=TierModel(scores=SCORES), datamodule=TierData(n=STEPS))
    assert callback.persistence_stats.failed == 0
    last = ln.Artifact.get(key=f"{callback.checkpoint_key_prefix}/epoch=0-step={STEPS}.ckpt")
    return callback, last


def _new_run(ln: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A new run of the session's transform, made active as ``ln.track()`` would."""
    run = ln.Run(transform=ln.context.transform).save()
    monkeypatch.setattr(ln.context, "_run", run)
    return run


def test_the_checkpoint_a_fit_resumes_from_is_an_input_of_the_new_run_whose_ranking_restarts(
    ln: Any, fresh_run: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Run B resumes from run A's last checkpoint: it is B's input (not A's); B's fit is
    ranked under B's own prefix from scratch, and A's flags are unchanged."""
    first, last = _train_first(ln, tmp_path)
    first_flags = _flags(ln, first.checkpoint_key_prefix)
    assert first_flags == {
        "epoch=0-step=2.ckpt": (True, False, 0),
        "epoch=0-step=4.ckpt": (False, True, 1),
    }

    resuming = _new_run(ln, monkeypatch)  # ln.track() first, then checkpoint_path()
    path = ll.checkpoint_path(first.checkpoint_key_prefix, which="last")
    assert list(resuming.input_artifacts.all()) == [last]
    assert last not in list(fresh_run.input_artifacts.all())  # A created it: an output of A

    second = _checkpoint(tmp_path / "second")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[second],
        max_steps=2 * STEPS,
    )
    trainer.fit(TierModel(scores=SCORES), datamodule=TierData(n=STEPS), ckpt_path=str(path))
    assert second.persistence_stats.failed == 0

    # A new prefix (run B's uid), ranked on its own: the resumed steps only, best first.
    assert second.checkpoint_key_prefix != first.checkpoint_key_prefix
    assert second.base_prefix == f"{tmp_path / 'second'}/{resuming.uid}"
    assert _flags(ln, second.checkpoint_key_prefix) == {
        "epoch=1-step=6.ckpt": (True, False, 0),
        "epoch=1-step=8.ckpt": (False, True, 1),
    }
    assert _flags(ln, first.checkpoint_key_prefix) == first_flags
    # Each fit has its own best, found by the run that trained it. Every checkpoint run B
    # fetches becomes its input, except its own (lineage stays acyclic).
    local = {
        name: (tmp_path / name).read_bytes()
        for name in ("second/epoch=1-step=6.ckpt", "first/epoch=0-step=2.ckpt")
    }
    assert ll.checkpoint_path(run=resuming).read_bytes() == local["second/epoch=1-step=6.ckpt"]
    assert ll.checkpoint_path(run=fresh_run).read_bytes() == local["first/epoch=0-step=2.ckpt"]
    best_of_first = ln.Artifact.get(key=f"{first.checkpoint_key_prefix}/epoch=0-step=2.ckpt")
    assert set(resuming.input_artifacts.all()) == {last, best_of_first}


def test_without_an_active_run_nothing_is_recorded_and_a_warning_says_track_first(
    ln: Any,
    fresh_run: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """checkpoint_path() before ln.track(): the path still comes back; no run gets the
    input; the warning names the artifact and says to call ln.track() first."""
    first, last = _train_first(ln, tmp_path)
    monkeypatch.setattr(ln.context, "_run", None)
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        path = ll.checkpoint_path(first.checkpoint_key_prefix, which="last")
    assert path.is_file()
    assert last.input_of_runs.count() == 0
    (warning,) = [r for r in caplog.records if r.name == "lamin_lightning"]
    assert last.key in warning.getMessage()
    assert "Call ln.track() before checkpoint_path()" in warning.getMessage()


def test_track_run_inputs_off_records_nothing_and_says_nothing(
    ln: Any,
    fresh_run: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ln.settings.track_run_inputs = False turns the recording off, as for lamindb's cache()."""
    first, last = _train_first(ln, tmp_path)
    resuming = _new_run(ln, monkeypatch)
    monkeypatch.setattr(ln.settings, "track_run_inputs", False)
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        ll.checkpoint_path(first.checkpoint_key_prefix, which="last")
    assert resuming.input_artifacts.count() == 0
    assert last.input_of_runs.count() == 0
    assert not [r for r in caplog.records if r.name == "lamin_lightning"]
