"""Bad input on a real instance: odd dirpaths, wrongly typed feature values, and two
``Checkpoint`` callbacks in one trainer (distinct state, resume restores both).

Construction-time validation of the knobs is in ``tests/test_bad_input.py``; the
``warn`` case of a wrongly typed artifact feature is in ``test_lamindb_errors.py``.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lamindb_tier import (
    TierData,
    TierModel,
    artifact_features,
    artifacts_under,
    assert_kept_set_persisted,
    fit,
    make_trainer,
    run_features,
)

import lamin_lightning as ll
from helpers import assert_events_follow_submissions, recording_submissions
from lamin_lightning import RetryPolicy
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch.*"),
]


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lamin-lightning-")]


# -- odd dirpaths -------------------------------------------------------------------------------

# name: (absolute?, directory as typed, with a trailing slash?)
ODD_DIRPATHS: dict[str, tuple[bool, str, bool]] = {
    "absolute-spaces": (True, "my checkpoints", False),
    "absolute-spaces-trailing-slash": (True, "my checkpoints", True),
    "absolute-non-ascii": (True, "chéckpoints-données-日本", False),
    "relative-spaces-trailing-slash": (False, "run 1/ckpts", True),
    "relative-non-ascii": (False, "modèles/étape", False),
}


@pytest.mark.parametrize(
    ("typed", "fix"),
    [("./ckpts/", "'ckpts'"), ("runs/./ckpts", "'runs/ckpts'"), ("../ckpts", None)],
)
def test_a_dirpath_whose_keys_lamindb_refuses_fails_at_setup_naming_the_fix(
    typed: str,
    fix: str | None,
    ln: Any,
    no_run: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key prefix is the dirpath as given, and LaminDB refuses keys with a "." or ".."
    segment: the reference raises its ValueError at the first save; ours raises a
    ValueError at setup, before the first step, naming the dirpath and one that works."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    steps: list[int] = []

    class Counting(TierModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    callback = ll.Checkpoint(dirpath=typed, every_n_train_steps=1)
    with pytest.raises(ValueError, match="LaminDB refuses") as raised:
        fit(callback, tmp_path, steps=2, model=Counting())
    message = str(raised.value)
    assert f"dirpath={typed!r}" in message
    expected_fix = fix if fix is not None else repr(str(tmp_path / "ckpts"))
    assert f"Pass dirpath={expected_fix}" in message, message
    assert steps == []
    assert _pipeline_threads() == []


@pytest.mark.parametrize("case", list(ODD_DIRPATHS))
def test_odd_dirpaths_give_the_reference_keys_and_persist_the_kept_set(
    case: str, ln: Any, fresh_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spaces, non-ASCII characters, relative paths and trailing slashes: the keys equal
    the reference's for the same dirpath, and every kept checkpoint is stored under them."""
    from lamindb.integrations import lightning as reference

    absolute, sub, trailing = ODD_DIRPATHS[case]
    monkeypatch.chdir(tmp_path)
    typed = str(tmp_path / sub) if absolute else sub
    dirpath = typed + "/" if trailing else typed
    callback = ll.Checkpoint(
        dirpath=dirpath, monitor="score", save_top_k=2, every_n_train_steps=1, save_last=True
    )
    trainer = fit(callback, tmp_path, steps=3, model=TierModel(scores=[3, 1, 2]))

    assert Path(callback.dirpath) == (tmp_path / sub).resolve()
    assert callback.base_prefix == f"{typed}/{fresh_run.uid}"
    ref = reference.Checkpoint(dirpath=dirpath)
    ref._trainer = trainer
    assert ref.base_prefix == callback.base_prefix
    assert ref.checkpoint_key_prefix == callback.checkpoint_key_prefix
    for path in [*callback.best_k_models, callback.last_model_path]:
        ours = callback.resolve_artifact_key(trainer, path, "checkpoint")
        assert ours == ref.resolve_artifact_key(trainer, path, "checkpoint")
        assert ours == f"{typed}/{fresh_run.uid}/checkpoints/{Path(path).name}"
    kept = assert_kept_set_persisted(ln, callback)
    assert len(kept) == 3  # top-2 + last
    for artifact in kept.values():
        assert artifact.run_id == fresh_run.id


# -- wrongly typed feature values -----------------------------------------------------------------


@pytest.fixture(scope="module")
def float_feature(ln: Any) -> str:
    name = "tier_bad_input_float"
    if not ln.Feature.filter(name=name).exists():
        ln.Feature(name=name, dtype=float).save()
    return name


def test_wrongly_typed_run_feature_fails_at_setup_before_training(
    ln: Any, fresh_run: Any, float_feature: str, tmp_path: Path
) -> None:
    """A string for a float run feature fails at setup, naming the feature, before any
    training step; nothing is stored and no pipeline thread is left."""
    model = TierModel()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", features={"run": {float_feature: "not a float"}}
    )
    with pytest.raises(Exception, match=float_feature):
        fit(callback, tmp_path, steps=2, model=model)
    assert model.training_steps_run == 0
    assert not ln.Artifact.filter(key__startswith=str(tmp_path)).exists()
    assert float_feature not in run_features(ln, fresh_run)  # nothing half-annotated
    assert _pipeline_threads() == []


# -- two callbacks in one trainer -------------------------------------------------------------


RecordingCheckpoint = recording_submissions(ll.Checkpoint)


class PoolProbe(pl.Callback):
    """Records, at every training batch end, each callback's pipeline and stats recorder."""

    def __init__(self, *callbacks: ll.Checkpoint) -> None:
        self.callbacks = callbacks
        self.seen: list[tuple[Any, ...]] = []
        self.restored: list[dict[str, Any]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restored = [copy.deepcopy(cb.state_dict()) for cb in self.callbacks]

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append(tuple((cb._pipeline, cb._stats_recorder) for cb in self.callbacks))


def _two_callbacks(tmp_path: Path) -> tuple[Any, Any]:
    best = RecordingCheckpoint(
        dirpath=tmp_path / "best",
        monitor="score",
        mode="min",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[RecordingObserver()],
    )
    periodic = RecordingCheckpoint(
        dirpath=tmp_path / "periodic",
        every_n_train_steps=2,
        save_top_k=-1,
        artifact_observers=[RecordingObserver()],
    )
    return best, periodic


SCORES = [5, 3, 4, 1, 2, 0.5, 6, 0.1]


def test_two_checkpoint_callbacks_share_no_pool_state_and_resume_restores_both(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Two Checkpoints in one trainer: distinct state keys, pipelines and stats; both
    persist their own kept set; resuming from one's file restores both states and both
    kept sets are complete after the resumed fit."""
    best, periodic = _two_callbacks(tmp_path)
    assert best.state_key != periodic.state_key
    probe = PoolProbe(best, periodic)
    trainer = make_trainer(tmp_path, [best, periodic, probe], max_steps=4)
    trainer.fit(TierModel(scores=SCORES), datamodule=TierData(n=8))

    # Pipelines start with a callback's first job (the periodic one saves every 2 steps).
    started = [row for row in probe.seen if all(pool is not None for pool, _ in row)]
    assert started, "both pipelines ran during the fit"
    for (best_pool, best_stats), (periodic_pool, periodic_stats) in started:
        assert best_pool is not periodic_pool
        assert best_stats is not periodic_stats
    assert len({id(row[0][0]) for row in started}) == 1  # one pipeline per callback per fit
    for callback in (best, periodic):
        stats = callback.persistence_stats
        observer = callback._artifact_observers[0]
        assert stats.saved == len([s for s in callback.submissions if s[0] == "save"]) - (
            stats.cancelled + stats.superseded
        )
        assert_events_follow_submissions(observer.events, callback.submissions, stats)
        assert {e.key.rsplit("/", 2)[0] for e in observer.events} == {
            callback.checkpoint_key_prefix.rsplit("/", 1)[0]
        }
        assert_kept_set_persisted(ln, callback)
    assert set(artifacts_under(ln, periodic.checkpoint_key_prefix)) == {
        f"{periodic.checkpoint_key_prefix}/epoch=0-step={s}.ckpt" for s in (2, 4)
    }

    # Checkpoint in: the periodic file holds both callbacks' states.
    resume_from = Path(periodic.dirpath) / "epoch=0-step=4.ckpt"
    stored = torch.load(resume_from, weights_only=False)["callbacks"]
    assert {best.state_key, periodic.state_key} <= set(stored)
    assert stored[best.state_key]["best_k_models"]

    best2, periodic2 = _two_callbacks(tmp_path)
    probe2 = PoolProbe(best2, periodic2)
    trainer2 = make_trainer(tmp_path, [best2, periodic2, probe2], max_steps=8)
    trainer2.fit(TierModel(scores=SCORES), datamodule=TierData(n=8), ckpt_path=resume_from)

    restored_best, restored_periodic = probe2.restored
    for restored, saved in (
        (restored_best, best.state_key),
        (restored_periodic, periodic.state_key),
    ):
        for field in (
            "best_model_path",
            "best_model_score",
            "kth_best_model_path",
            "last_model_path",
        ):
            assert restored[field] == stored[saved][field], field
        assert restored["best_k_models"] == stored[saved]["best_k_models"]
    assert trainer2.global_step == 8
    for callback in (best2, periodic2):
        assert callback.persistence_stats.failed == 0
        assert_kept_set_persisted(ln, callback)
    assert set(artifacts_under(ln, periodic2.checkpoint_key_prefix)) == {
        f"{periodic2.checkpoint_key_prefix}/epoch=0-step={s}.ckpt" for s in (2, 4, 6, 8)
    }


def test_a_wrongly_typed_artifact_feature_is_not_retried_and_fails_no_save(
    ln: Any, no_run: None, float_feature: str, tmp_path: Path
) -> None:
    """A string for a float feature, with retries on: LaminDB's refusal is not retried (no
    backoff to wait out), no save fails, and every checkpoint persists without it."""
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        features={"artifact": {float_feature: "not a float"}},
        retry=RetryPolicy(attempts=5),  # default backoff: a retry would show in the time
    )
    started = time.monotonic()
    fit(callback, tmp_path, steps=4)
    assert time.monotonic() - started < 60
    stats = callback.persistence_stats
    assert (stats.saved, stats.failed, stats.retried) == (4, 0, 0), stats
    stored = artifacts_under(ln, callback.checkpoint_key_prefix)
    assert len(stored) == 4
    assert all(float_feature not in artifact_features(ln, a) for a in stored.values())
    assert _pipeline_threads() == []
