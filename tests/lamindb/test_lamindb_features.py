"""Features on a real instance: the lightning feature set, auto, user and hparam features.

The feature values are compared with what the reference callback writes for the same
training, in the same instance, each in a run of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import (
    TierData,
    TierModel,
    artifact_features,
    ensure_features,
    fit,
    run_features,
    single,
)
from lightning.pytorch.loggers import CSVLogger

import lamin_lightning as ll

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

LIGHTNING_DTYPES = {
    "is_best_model": "bool",
    "is_last_model": "bool",
    "score": "float",
    "model_rank": "int",
    "save_weights_only": "bool",
    "monitor": "str",
    "mode": "str",
    "logger_name": "str",
    "logger_version": "str",
    "max_epochs": "int",
    "max_steps": "int",
    "precision": "str",
    "accumulate_grad_batches": "int",
    "gradient_clip_val": "float",
}
ARTIFACT_AUTO = {
    "is_best_model",
    "is_last_model",
    "score",
    "model_rank",
    "save_weights_only",
    "monitor",
    "mode",
}

# User features of this module: name -> dtype.
USER_FEATURES = {
    "tier_project": str,  # run, static
    "tier_tag": str,  # artifact, static
    "tier_metric": float,  # artifact, None: from the logged metric of that name
    "current_epoch": int,  # artifact, None: from the trainer attribute of that name
    "lr": float,  # model hparam
    "batch_size": int,  # datamodule hparam
}


def lightning_features(ln: Any) -> list[tuple[str, str]]:
    feature_type = ln.Feature.filter(name="lamindb.lightning", is_type=True).one()
    return sorted(ln.Feature.filter(type=feature_type).values_list("name", "_dtype_str"))


def test_save_lightning_features_is_idempotent_and_compatible_after_reference(ln: Any) -> None:
    """Ours made the 14 typed features; repeating it, or the reference's after, adds none."""
    from lamindb.integrations.lightning import save_lightning_features as reference_save

    expected = sorted(LIGHTNING_DTYPES.items())
    assert lightning_features(ln) == expected
    ll.save_lightning_features()
    ll.save_lightning_features()
    reference_save()
    ll.save_lightning_features()
    assert ln.Feature.filter(name="lamindb.lightning", is_type=True).count() == 1
    assert lightning_features(ln) == expected
    for name in LIGHTNING_DTYPES:
        assert ln.Feature.filter(name=name).count() == 1, name


def test_save_lightning_features_is_compatible_after_reference_first(
    fresh_process_report: dict[str, Any],
) -> None:
    """After the reference's save_lightning_features, ours adds nothing and uses its features."""
    assert fresh_process_report["type_records"] == 1
    assert [tuple(f) for f in fresh_process_report["features"]] == sorted(LIGHTNING_DTYPES.items())
    assert set(fresh_process_report["checkpoint_features"]) == ARTIFACT_AUTO


@pytest.fixture(scope="module")
def user_features(ln: Any) -> None:
    ensure_features(ln, USER_FEATURES)


def _train(callback: Any, tmp_path: Path, logger_name: str) -> Any:
    # Scores seen by the checkpoints after steps 1, 2, 3: 3, 1, 2 (min, top 1):
    # step 1 saved, step 2 saved (evicts step 1), step 3 not saved.
    return fit(
        callback,
        tmp_path,
        steps=3,
        model=TierModel(lr=0.05, scores=[3, 1, 2]),
        datamodule=TierData(n=3, batch_size=1),
        logger=CSVLogger(save_dir=str(tmp_path), name=logger_name),
    )


def _checkpoint_arguments() -> dict[str, Any]:
    return {
        "monitor": "score",
        "save_top_k": 1,
        "every_n_train_steps": 1,
        "features": {
            "run": {"tier_project": "lamin-lightning"},
            "artifact": {"tier_tag": "static", "tier_metric": None, "current_epoch": None},
        },
    }


@pytest.mark.contract
def test_auto_user_and_hparam_features_match_reference(
    ln: Any,
    user_features: None,
    fresh_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Auto, user and hparam features on checkpoints and on the run equal the reference's."""
    callback = ll.Checkpoint(**_checkpoint_arguments())
    _train(callback, tmp_path, "ours")

    stored = list(ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix + "/"))
    checkpoints = [a for a in stored if a.key.endswith(".ckpt")]
    assert [a.key.rsplit("/", 1)[1] for a in checkpoints] == ["epoch=0-step=2.ckpt"]
    ours_artifact = single(artifact_features(ln, checkpoints[0]))
    assert ours_artifact == {
        "is_best_model": True,
        "is_last_model": True,
        "score": 1.0,
        "model_rank": 0,
        "save_weights_only": False,
        "monitor": "score",
        "mode": "min",
        "tier_tag": "static",
        "tier_metric": 10.0,
        "current_epoch": 0,
    }
    ours_run = single(run_features(ln, fresh_run))
    assert ours_run == {
        "logger_name": "ours",
        "logger_version": "version_0",
        "max_epochs": -1,
        "max_steps": 3,
        "precision": "32-true",
        "accumulate_grad_batches": 1,
        "monitor": "score",
        "mode": "min",
        "tier_project": "lamin-lightning",
        "lr": 0.05,  # model hparam with a feature
        "batch_size": 1,  # datamodule hparam with a feature
        # width, hidden_tag, n: hparams without a feature of that name, not recorded
    }
    # The hparams.yaml artifact carries no checkpoint features.
    hparams = [a for a in stored if a.key.endswith("hparams.yaml")]
    assert len(hparams) == 1 and artifact_features(ln, hparams[0]) == {}

    # The reference, same training and features, in a run of its own.
    from lamindb.integrations import lightning as reference

    reference_run = ln.Run(transform=ln.context.transform).save()
    monkeypatch.setattr(ln.context, "_run", reference_run)
    ref = reference.Checkpoint(**_checkpoint_arguments())
    _train(ref, tmp_path, "ref")
    ref_checkpoints = list(
        ln.Artifact.filter(key__startswith=ref.checkpoint_key_prefix + "/", suffix=".ckpt")
    )
    assert len(ref_checkpoints) == 1
    assert single(artifact_features(ln, ref_checkpoints[0])) == ours_artifact
    assert single(run_features(ln, reference_run)) == {**ours_run, "logger_name": "ref"}


def test_a_nan_or_infinite_score_persists_the_checkpoint_without_its_score(
    ln: Any, no_run: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON has no NaN or infinity and lamindb refuses them (on SQLite a CHECK constraint):
    the save failed, and with on_error="raise" training stopped. The checkpoint persists,
    without a score, and its other features are there."""
    import math

    from lamindb_tier import artifacts_under

    from helpers import lightning_kept_paths

    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode="max",
        save_top_k=-1,
        every_n_train_steps=1,
    )
    scores = [0.5, math.nan, math.inf, -math.inf, 0.3]
    fit(callback, tmp_path, steps=len(scores), model=TierModel(scores=scores))
    stats = callback.persistence_stats
    assert (stats.saved, stats.failed) == (len(scores), 0)
    artifacts = artifacts_under(ln, callback.checkpoint_key_prefix)
    assert sorted(artifacts) == sorted(
        f"{callback.checkpoint_key_prefix}/{p.name}" for p in lightning_kept_paths(callback)
    )
    for step, score in enumerate(scores, start=1):
        (artifact,) = [a for k, a in artifacts.items() if k.endswith(f"-step={step}.ckpt")]
        values = artifact_features(ln, artifact)
        if math.isfinite(score):
            assert values["score"] == [pytest.approx(score)]  # logged as float32
        else:
            assert "score" not in values, step
        assert values["is_last_model"] == [step == len(scores)]
    assert "which lamindb cannot store; left out" in caplog.text


class _CommitEachSave(pl.Callback):
    """Flushes ``callback`` before its hooks of each step (Lightning runs checkpoint
    callbacks last): every save is committed, none superseded by the next one."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        assert self.callback.flush()


def test_a_non_finite_score_is_warned_of_once_per_fit_not_at_every_save(
    ln: Any, no_run: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A training whose monitored value went NaN: Lightning ranks the first as the worst
    (inf) and keeps it as current_score, so last.ckpt carries that score at every save.
    The warning that the score is left out came once per save, the same line again and
    again for last.ckpt (as many as were not superseded: their number varied with
    timing); Lightning says nothing, the reference fails at the first. Now once per fit
    and feature; every checkpoint still persists without the score."""
    import math

    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", monitor="score", save_last=True, every_n_train_steps=1
    )
    steps = 5
    fit(
        callback,
        tmp_path,
        steps=steps,
        model=TierModel(scores=[math.nan]),
        extra_callbacks=[_CommitEachSave(callback)],
    )
    stats = callback.persistence_stats
    assert (stats.saved, stats.failed, stats.superseded) == (1 + steps, 0, 0)
    told = [r for r in caplog.records if "which lamindb cannot store" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in told]
    assert told[0].levelname == "WARNING"
    stored = {
        a.key.rsplit("/", 1)[1]: artifact_features(ln, a)
        for a in ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix + "/")
    }
    assert set(stored) == {"epoch=0-step=1.ckpt", "last.ckpt"}
    assert all("score" not in values for values in stored.values())


def test_a_record_datetime_and_date_feature_value_is_annotated_as_the_reference_does(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Static artifact feature values that JSON cannot hold as they are: a ULabel (a
    categorical feature), a datetime and a date. They were journaled as their ``str`` and
    LaminDB rejected every checkpoint ("term not validated", "expected datetime64"). Live,
    LaminDB gets the values themselves, as from the reference; a replay gets them back from
    the journal's tagged form, the record looked up by uid."""
    import datetime
    import json

    from lamindb.integrations import lightning as reference

    from lamin_lightning._jobs import JobRecord, RecordRef, decode, encode
    from lamin_lightning._lamin_store import LaminStore
    from lamin_lightning._submission import _with_features

    label = ln.ULabel.filter(name="tier-mnist").first() or ln.ULabel(name="tier-mnist").save()
    other = ln.ULabel.filter(name="tier-cifar").first() or ln.ULabel(name="tier-cifar").save()
    dtypes = {
        "tier_dataset": ln.ULabel,
        "tier_datasets": ln.ULabel,
        "tier_when": "datetime",
        "tier_day": "date",
    }
    for name, dtype in dtypes.items():
        if not ln.Feature.filter(name=name).exists():
            ln.Feature(name=name, dtype=dtype).save()
    values = {
        "tier_dataset": label,
        "tier_datasets": [label, other],  # several labels of one categorical feature
        "tier_when": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "tier_day": datetime.date(2024, 1, 2),
    }
    expected = {
        "tier_dataset": "tier-mnist",
        "tier_datasets": {"tier-mnist", "tier-cifar"},
        "tier_when": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "tier_day": datetime.date(2024, 1, 2),
    }

    def annotated(artifact: Any) -> dict[str, Any]:
        return {k: v for k, v in artifact.features.get_values().items() if k in values}

    for side, module in (("ours", ll), ("reference", reference)):
        callback = module.Checkpoint(dirpath=tmp_path / side, features={"artifact": values})
        fit(callback, tmp_path, steps=1)
        [artifact] = ln.Artifact.filter(
            key__startswith=callback.checkpoint_key_prefix + "/", suffix=".ckpt"
        )
        assert annotated(artifact) == expected, side

    # A replay: the journal's JSON, decoded, annotates a checkpoint the same way.
    snapshot = _with_features(callback_snapshot(tmp_path), values)
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key=snapshot.key,
        local_path=str(snapshot.local_path),
        staged_path=None,
        store="lamindb",
        context={},
        checkpoint=snapshot,
        submitted_at=0.0,
    )
    replayed = decode(json.loads(json.dumps(encode(record))))
    assert replayed.checkpoint is not None
    ref = f"{type(label).__module__}.ULabel"
    assert replayed.checkpoint.feature_values == {
        **values,
        "tier_dataset": RecordRef(ref, label.uid),
        "tier_datasets": [RecordRef(ref, label.uid), RecordRef(ref, other.uid)],
    }
    artifact = ln.Artifact(str(snapshot.local_path), key=snapshot.key).save()
    LaminStore()._annotate(ln, replayed.checkpoint, artifact, replay=True)
    assert annotated(artifact) == expected


def callback_snapshot(root: Path) -> Any:
    """A checkpoint snapshot of a small file under ``root``."""
    from lamin_lightning._jobs import CheckpointSnapshot

    path = root / "replayed.ckpt"
    path.write_bytes(b"replayed checkpoint")
    return CheckpointSnapshot(
        key="tier-replay/checkpoints/replayed.ckpt",
        local_path=path,
        staged_path=path,
        global_step=1,
        epoch=0,
        monitor=None,
        mode="min",
        save_weights_only=False,
        score=None,
        is_best=True,
        best_key=None,
        last_key=None,
        ranking=(),
    )


def test_a_callback_fit_again_under_another_run_records_that_runs_run_level_values(
    ln: Any, user_features: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One callback, two fits, another run active for the second (``ln.track()`` in
    between): each run gets the run-level values of its own fit (trainer settings,
    hparams, the user's). The reference writes its auto and hparam values once per
    callback, so its second run gets the user's ``features["run"]`` only (migrating.md)."""
    runs = [ln.Run(transform=ln.context.transform).save() for _ in range(2)]
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        features={"run": {"tier_project": "lamin-lightning"}},
    )
    for run, steps in zip(runs, (2, 3), strict=True):
        monkeypatch.setattr(ln.context, "_run", run)
        fit(callback, tmp_path, steps=steps, model=TierModel(lr=0.05))
    for run, steps in zip(runs, (2, 3), strict=True):
        values = single(run_features(ln, run))
        assert {n: values.get(n) for n in ("max_steps", "lr", "tier_project")} == {
            "max_steps": steps,
            "lr": 0.05,
            "tier_project": "lamin-lightning",
        }, values
