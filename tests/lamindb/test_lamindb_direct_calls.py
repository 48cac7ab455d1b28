"""Calling the ``save_*`` hooks directly behaves like the synchronous reference.

Code written against ``lamindb.integrations.lightning`` may call
``save_config_artifact`` or ``save_checkpoint_artifact`` itself and expect the
artifact to be saved, annotated and announced to observers before the call returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import artifact_features, fit, single

import lamin_lightning as ll
from lamin_lightning import ArtifactSavedEvent
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def test_direct_save_calls_annotate_and_emit_before_returning(
    ln: Any, tmp_path: Path, no_run: None
) -> None:
    """A direct save_* call returns a saved, annotated artifact and emits its event."""
    observer = RecordingObserver()
    callback = ll.Checkpoint(dirpath=str(tmp_path / "ckpts"), artifact_observers=[observer])
    trainer = fit(callback, tmp_path)
    before = len(observer.events)

    extra = tmp_path / "extra.ckpt"
    extra.write_bytes(b"weights")
    score = ln.Feature.filter(name="score", type__name="lamindb.lightning").one()
    artifact = callback.save_checkpoint_artifact(trainer, extra, feature_values={score: 0.25})
    assert artifact.id is not None
    assert artifact.key == f"{callback.checkpoint_key_prefix}/extra.ckpt"
    assert single(artifact_features(ln, artifact))["score"] == 0.25
    saved = observer.events[before:]
    assert [type(e) for e in saved] == [ArtifactSavedEvent]
    assert saved[0].artifact.id == artifact.id and saved[0].storage_uri == str(artifact.path)

    # Saving the same key again directly replaces the older artifact, as the reference does.
    extra.write_bytes(b"weights v2")
    again = callback.save_checkpoint_artifact(trainer, extra)
    assert [a.id for a in ln.Artifact.filter(key=artifact.key)] == [again.id]

    config = tmp_path / "config.yaml"
    config.write_text("trainer: {}\n")
    config_artifact = callback.save_config_artifact(trainer, config)
    assert config_artifact.key == f"{callback.base_prefix}/config.yaml"
    assert observer.events[-1].kind == "config"
    assert observer.events[-1].artifact.id == config_artifact.id


# -- overrides of the save hook, called by the pipeline during a fit -----------------------


def test_feature_values_an_override_passes_on_are_what_the_checkpoint_is_annotated_with(
    ln: Any, tmp_path: Path, no_run: None
) -> None:
    """An override of ``save_checkpoint_artifact`` that adds a value (and drops one) before
    calling ours: each checkpoint carries what it passed on, as in the reference, where
    ``super()`` annotates its ``feature_values`` argument."""
    tag = ln.Feature(name="ll_override_tag", dtype=str).save()
    score = ln.Feature.filter(name="score", type__name="lamindb.lightning").one()

    class Tagging(ll.Checkpoint):
        def save_checkpoint_artifact(
            self, trainer: Any, filepath: Any, *, feature_values: Any = None
        ) -> Any:
            # As for the reference: an auto feature is keyed by its Feature record.
            values = {
                key: value
                for key, value in (feature_values or {}).items()
                if getattr(key, "name", None) != "score"
            }
            values["ll_override_tag"] = f"extra-{Path(filepath).name}"
            return super().save_checkpoint_artifact(trainer, filepath, feature_values=values)

    callback = Tagging(
        dirpath=str(tmp_path / "ckpts"), monitor="score", save_top_k=-1, every_n_train_steps=1
    )
    fit(callback, tmp_path, steps=3)

    artifacts = list(ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix))
    names = sorted(Path(a.key).name for a in artifacts if a.key.endswith(".ckpt"))
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    for artifact in artifacts:
        if not artifact.key.endswith(".ckpt"):
            continue
        values = single(artifact_features(ln, artifact))
        assert values[tag.name] == f"extra-{Path(artifact.key).name}", values
        assert score.name not in values, values


def test_an_override_that_persists_nothing_skips_that_checkpoint_as_the_reference_does(
    ln: Any, tmp_path: Path, no_run: None
) -> None:
    """``save_checkpoint_artifact`` returning None without calling ours: that checkpoint gets
    no artifact and no saved event, the fit ends normally, the others are stored and
    flagged, and nothing is left in the outbox."""
    observer = RecordingObserver()

    class Skipping(ll.Checkpoint):
        def save_checkpoint_artifact(
            self, trainer: Any, filepath: Any, *, feature_values: Any = None
        ) -> Any:
            if Path(filepath).name == "epoch=0-step=2.ckpt":
                return None
            return super().save_checkpoint_artifact(
                trainer, filepath, feature_values=feature_values
            )

    dirpath = tmp_path / "ckpts"
    callback = Skipping(
        dirpath=str(dirpath), save_top_k=-1, every_n_train_steps=1, artifact_observers=[observer]
    )
    fit(callback, tmp_path, steps=3)

    prefix = callback.checkpoint_key_prefix
    stored = sorted(
        Path(a.key).name
        for a in ln.Artifact.filter(key__startswith=prefix)
        if a.key.endswith(".ckpt")
    )
    assert stored == ["epoch=0-step=1.ckpt", "epoch=0-step=3.ckpt"]
    assert (dirpath / "epoch=0-step=2.ckpt").exists()  # Lightning's file stays
    saved = [e.key for e in observer.events if isinstance(e, ArtifactSavedEvent)]
    assert saved == [f"{prefix}/epoch=0-step=1.ckpt", f"{prefix}/epoch=0-step=3.ckpt"]
    assert callback.persistence_stats.failed == 0
    assert ll.flush_directory(dirpath).events == []  # nothing pending
    last = ln.Artifact.get(key=f"{prefix}/epoch=0-step=3.ckpt")
    assert single(artifact_features(ln, last))["is_last_model"] is True


@pytest.mark.parametrize("method", ["_save_last_checkpoint", "_save_none_monitor_checkpoint"])
def test_lightnings_save_methods_called_before_setup_persist_under_the_dirpath_key(
    ln: Any, tmp_path: Path, no_run: None, method: str
) -> None:
    """Lightning's own tests call its ``_save_*_checkpoint`` methods on a trainer that
    never ran ``fit`` (no ``setup``). The key prefix comes from the trainer given, as the
    key itself does; it was read from ``checkpoint_key_prefix``, which needs ``setup``."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lamin_lightning._lamin_store import lamin_stats

    dirpath = tmp_path / "ckpts"
    callback = ll.Checkpoint(dirpath=str(dirpath), filename="{foo:.2f}", save_last=True)
    trainer = pl.Trainer(
        callbacks=[callback], logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    model = BoringModel()
    trainer.strategy.connect(model)
    getattr(callback, method)(trainer, {"foo": torch.tensor(1)})
    written = Path(
        callback.last_model_path if method == "_save_last_checkpoint" else callback.best_model_path
    )
    assert written.parent == dirpath and written.is_file()
    callback.teardown(trainer, model, "fit")  # flushes, as at the end of a fit
    artifact = ln.Artifact.filter(key=f"{dirpath}/checkpoints/{written.name}").one()
    assert artifact.hash == lamin_stats(written)["hash"]


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
def test_lightnings_save_methods_called_after_fit_are_persisted_before_they_return(
    ln: Any, tmp_path: Path, async_write: bool
) -> None:
    """After ``fit`` returned (teardown ran), Lightning's ``_save_topk_checkpoint`` and
    ``_save_last_checkpoint`` called directly, then the process ends at once.
    ModelCheckpoint has written the files when each call returns, and the reference has
    saved their artifacts; the store then holds exactly the folder's files. Before, the
    jobs ran unjournaled on the pipeline's daemon threads and died with the process: the
    artifact of ``last.ckpt`` kept the fit's bytes, the evicted checkpoint's artifact
    stayed, nothing was left for ``lamin-lightning flush``; with ``async_write`` the
    files were never even written."""
    import json
    import subprocess
    import sys

    from lamin_lightning._lamin_store import lamin_stats

    dirpath, report = tmp_path / "ckpts", tmp_path / "report.json"
    command = [
        sys.executable,
        str(Path(__file__).parent / "direct_after_fit.py"),
        "--dirpath",
        str(dirpath),
        "--report",
        str(report),
        *(["--async-write"] if async_write else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and report.exists(), done.stdout + done.stderr
    seen = json.loads(report.read_text())
    assert seen["pending"] == []

    files = {p.name: p for p in dirpath.glob("*.ckpt")}
    assert set(files) == {seen["best"], seen["last"]}, sorted(files)
    import torch

    for name in files.values():
        assert torch.load(name, weights_only=False)["global_step"] == 2
    artifacts = {
        a.key.rsplit("/", 1)[-1]: a
        for a in ln.Artifact.filter(key__startswith=seen["prefix"] + "/")
    }
    assert set(artifacts) == set(files), sorted(artifacts)
    for name, path in files.items():
        assert artifacts[name].hash == lamin_stats(path)["hash"], name
