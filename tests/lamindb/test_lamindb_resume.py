"""``checkpoint_path``: resume a fit from the best or last checkpoint persisted in LaminDB.

Each resume test trains with ``lamin_lightning.Checkpoint``, deletes the local
checkpoint directory, asks LaminDB for the checkpoint and resumes a new Trainer
from it: the resumed fit must start at the saved global step and epoch, with the
saved weights.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from django.db import transaction
from lamindb_tier import TierData, TierModel, fit

import lamin_lightning as ll
from lamin_lightning import LaminSetupError

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*dirpath has changed.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty.*"),
]

STEPS_PER_EPOCH = 2
EPOCHS = 6
# score logged at step i is SCORES[i]; the checkpoint at the end of epoch e sees the score of
# its last step, 2e + 1: epochs 0..5 see 5, 1, 4, 3, 6, 2. With save_top_k=2 (min) epoch 4 is
# not saved, epoch 5 is the last save and epoch 1 the best: best and last differ.
SCORES = [0.0, 5.0, 0.0, 1.0, 0.0, 4.0, 0.0, 3.0, 0.0, 6.0, 0.0, 2.0]
BEST_EPOCH, LAST_EPOCH = 1, 5


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ResumeProbe(pl.Callback):
    """Records where the resumed fit starts: step, epoch and the weights at the first batch."""

    def __init__(self) -> None:
        self.start: tuple[int, int] | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.start is None:
            self.start = (trainer.global_step, trainer.current_epoch)
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def train(root: Path) -> tuple[ll.Checkpoint, dict[str, str]]:
    """Fit EPOCHS epochs with a top-2 lamin_lightning.Checkpoint; hashes of the local files."""
    callback = ll.Checkpoint(dirpath=root / "ckpts", monitor="score", mode="min", save_top_k=2)
    fit(
        callback,
        root,
        steps=STEPS_PER_EPOCH * EPOCHS,
        model=TierModel(scores=SCORES),
        datamodule=TierData(n=STEPS_PER_EPOCH),
        max_epochs=EPOCHS,
    )
    assert callback.persistence_stats.failed == 0
    local = {p.name: sha256(p) for p in (root / "ckpts").glob("*.ckpt")}
    return callback, local


def resume(root: Path, path: Path, epochs: int) -> tuple[ResumeProbe, TierModel, ll.Checkpoint]:
    """A new Trainer (own dirpath) resumed from ``path`` and trained to ``epochs`` epochs."""
    probe = ResumeProbe()
    model = TierModel(scores=SCORES * 2)
    callback = ll.Checkpoint(dirpath=root / "resumed", monitor="score", save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[callback, probe],
        max_epochs=epochs,
    )
    trainer.fit(model, datamodule=TierData(n=STEPS_PER_EPOCH), ckpt_path=str(path))
    assert callback.persistence_stats.failed == 0
    return probe, model, callback


@pytest.mark.contract
@pytest.mark.parametrize(("which", "epoch"), [("best", BEST_EPOCH), ("last", LAST_EPOCH)])
def test_resume_from_lamindb_after_the_local_checkpoints_are_gone(
    which: str, epoch: int, ln: Any, no_run: None, tmp_path: Path
) -> None:
    """The path LaminDB gives resumes a new fit at the saved step and epoch, with its weights."""
    callback, local = train(tmp_path / "first")
    expected_name = f"epoch={epoch}-step={STEPS_PER_EPOCH * (epoch + 1)}.ckpt"
    assert expected_name in local
    shutil.rmtree(tmp_path / "first" / "ckpts")

    path = ll.checkpoint_path(callback.checkpoint_key_prefix, which=which)  # type: ignore[arg-type]

    assert path.is_file()
    assert not path.is_relative_to(tmp_path / "first")
    assert sha256(path) == local[expected_name]
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (epoch, STEPS_PER_EPOCH * (epoch + 1))

    more = LAST_EPOCH + 3
    probe, model, resumed = resume(tmp_path / "second", path, epochs=more)
    # An end-of-epoch checkpoint resumes at the next epoch, at the saved global step.
    assert probe.start == (saved["global_step"], saved["epoch"] + 1)
    assert probe.weights is not None
    assert probe.weights.keys() == saved["state_dict"].keys()
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(probe.weights[name], tensor), name
    assert model.training_steps_run == STEPS_PER_EPOCH * (more - saved["epoch"] - 1)
    # The resumed fit persists its own checkpoints, numbered after the saved step.
    steps = sorted(
        int(a.key.rsplit("step=", 1)[1].removesuffix(".ckpt"))
        for a in ln.Artifact.filter(key__startswith=resumed.checkpoint_key_prefix + "/")
    )
    assert steps == [
        saved["global_step"] + STEPS_PER_EPOCH * n for n in range(1, more - saved["epoch"])
    ]


def test_best_and_last_are_different_artifacts_found_by_either_prefix_or_run(
    ln: Any, fresh_run: Any, tmp_path: Path
) -> None:
    """Both prefixes (with or without "/") and the run (record or uid) find the same files."""
    callback, local = train(tmp_path)
    prefix, base = callback.checkpoint_key_prefix, callback.base_prefix
    assert base == f"{tmp_path / 'ckpts'}/{fresh_run.uid}"

    best = ll.checkpoint_path(prefix)
    last = ll.checkpoint_path(prefix, which="last")
    assert best != last
    assert sha256(best) == local[Path(callback.best_model_path).name]
    assert sha256(best) != sha256(last)
    assert sha256(last) == local[f"epoch={LAST_EPOCH}-step={STEPS_PER_EPOCH * 6}.ckpt"]
    for which, want in (("best", best), ("last", last)):
        assert ll.checkpoint_path(prefix + "/", which=which) == want  # type: ignore[arg-type]
        assert ll.checkpoint_path(base, which=which) == want  # type: ignore[arg-type]
        assert ll.checkpoint_path(base + "/", which=which) == want  # type: ignore[arg-type]
        assert ll.checkpoint_path(run=fresh_run, which=which) == want  # type: ignore[arg-type]
        assert ll.checkpoint_path(run=fresh_run.uid, which=which) == want  # type: ignore[arg-type]


def test_best_and_last_are_the_same_file_when_the_last_save_is_the_best(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """With a score that only improves, best and last are one artifact."""
    callback = ll.Checkpoint(dirpath=tmp_path / "ckpts", monitor="score", save_top_k=2)
    fit(callback, tmp_path, steps=4, model=TierModel(scores=[4.0, 3.0, 2.0, 1.0]))
    prefix = callback.checkpoint_key_prefix
    assert ll.checkpoint_path(prefix) == ll.checkpoint_path(prefix, which="last")


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "got neither of prefix and run; pass exactly one"),
        ({"prefix": "a/checkpoints", "run": "abc"}, "got both of prefix and run; pass exactly one"),
        ({"prefix": "a", "which": "first"}, "which must be 'best' or 'last', got 'first'"),
        ({"prefix": "/"}, "prefix='/' is empty"),
    ],
)
def test_invalid_arguments_name_the_argument_and_the_fix(
    kwargs: dict[str, Any], match: str, ln: Any
) -> None:
    """Neither or both of prefix and run, a bad which, an empty prefix: ValueError."""
    with pytest.raises(ValueError, match=match):
        ll.checkpoint_path(**kwargs)


def test_wrong_types_raise_type_error(ln: Any) -> None:
    """A non-str prefix or a run that is neither a Run nor a uid: TypeError naming it."""
    with pytest.raises(TypeError, match="prefix must be a str"):
        ll.checkpoint_path(Path("a/checkpoints"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"run must be a lamindb\.Run or its uid"):
        ll.checkpoint_path(run=42)


def test_nothing_under_the_prefix_says_what_was_searched(ln: Any) -> None:
    """An unknown prefix: LookupError naming the prefix searched and that nothing is there."""
    with pytest.raises(LookupError, match=r"keys under 'no/such/prefix/'.*none at all"):
        ll.checkpoint_path("no/such/prefix/")


def test_unflagged_checkpoints_point_to_save_lightning_features(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Checkpoint artifacts without the flag: LookupError saying so, and how to get flags."""
    prefix = f"unflagged/{tmp_path.name}/checkpoints"
    file = tmp_path / "plain.ckpt"
    file.write_bytes(b"not flagged")
    ln.Artifact(str(file), key=f"{prefix}/plain.ckpt", kind="model", run=False).save()
    with pytest.raises(LookupError, match=r"1 exist, none flagged is_last_model=True.*save_light"):
        ll.checkpoint_path(prefix, which="last")


def test_unknown_run_uid_and_run_without_checkpoints(ln: Any, fresh_run: Any) -> None:
    """A uid no run has: LookupError naming run; a run with no checkpoints: nothing found."""
    with pytest.raises(LookupError, match="run='NoSuchRunUid0000': no run with this uid"):
        ll.checkpoint_path(run="NoSuchRunUid0000")
    with pytest.raises(LookupError, match=f"created by run '{fresh_run.uid}'; there are none"):
        ll.checkpoint_path(run=fresh_run)


def test_more_than_one_match_lists_them(ln: Any, no_run: None, tmp_path: Path) -> None:
    """A prefix above two fits' checkpoints: LookupError listing both keys, and what to pass."""
    for name in ("a", "b"):
        callback = ll.Checkpoint(dirpath=tmp_path / "many" / name, monitor="score")
        fit(callback, tmp_path / name, steps=2, model=TierModel(scores=[2.0, 1.0]))
    above = str(tmp_path / "many")
    with pytest.raises(LookupError, match="2 checkpoints flagged is_best_model=True") as error:
        ll.checkpoint_path(above)
    message = str(error.value)
    assert f"{above}/a/checkpoints/" in message and f"{above}/b/checkpoints/" in message
    assert "checkpoint_key_prefix" in message
    # Each fit's own prefix is unambiguous.
    assert ll.checkpoint_path(f"{above}/a").is_file()


def test_missing_features_say_to_run_save_lightning_features(ln: Any) -> None:
    """Without the lamindb.lightning features: LaminSetupError naming save_lightning_features()."""
    # Hide the feature inside a transaction that is rolled back: the session keeps it.
    with transaction.atomic():
        feature = ln.Feature.get(name="is_best_model")
        ln.Feature.filter(id=feature.id).update(name="is_best_model_hidden")
        try:
            with pytest.raises(LaminSetupError, match=r"save_lightning_features\(\)"):
                ll.checkpoint_path("any/checkpoints")
        finally:
            transaction.set_rollback(True)
    assert ln.Feature.get(name="is_best_model").id == feature.id
