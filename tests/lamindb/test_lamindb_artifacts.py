"""Artifacts on a real instance: descriptions, kinds, runs, overwrites and observer events.

Where a test needs a deterministic sequence of commits it flushes the pipeline at
the start of every training batch (``FlushEachStep``): every checkpoint submitted
in step n is persisted before step n+1 saves anything, without sleeping.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import (
    TierModel,
    artifact_features,
    artifacts_under,
    fit,
    storage_file,
    stored_sha256,
)
from lightning.pytorch.loggers import CSVLogger

import lamin_lightning as ll
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    PermanentError,
)
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FlushEachStep(pl.Callback):
    """Flushes ``callback`` at every batch start: step n's saves commit before step n+1's."""

    def __init__(self, callback: ll.Checkpoint) -> None:
        self.callback = callback

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        assert self.callback.flush(timeout=60)


class SwitchRunOnTrainStart(pl.Callback):
    """Makes another run the context run once training starts (after every setup)."""

    def __init__(self, ln: Any, run: Any) -> None:
        self.ln, self.run = ln, run

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ln.context._run = self.run


def test_descriptions_kinds_and_run_links_match_reference(
    ln: Any, fresh_run: Any, tmp_path: Path
) -> None:
    """Descriptions, kinds, run links (run at setup) and hparams-once match the reference."""
    later_run = ln.Run(transform=ln.context.transform).save()
    observer = RecordingObserver()
    callback = ll.Checkpoint(every_n_train_steps=1, save_top_k=-1, artifact_observers=[observer])
    logger = CSVLogger(save_dir=str(tmp_path), name="ours")
    fit(
        callback,
        tmp_path,
        steps=3,
        logger=logger,
        extra_callbacks=[SwitchRunOnTrainStart(ln, later_run)],
    )
    ln.context._run = fresh_run  # undo the switch (monkeypatch restores the original)

    prefix = callback.checkpoint_key_prefix
    assert prefix == f"{tmp_path.name}/ours/{fresh_run.uid}/checkpoints"
    stored = artifacts_under(ln, prefix)
    checkpoints = {k: a for k, a in stored.items() if k.endswith(".ckpt")}
    assert set(checkpoints) == {f"{prefix}/epoch=0-step={n}.ckpt" for n in (1, 2, 3)}
    for artifact in checkpoints.values():
        assert (artifact.description, artifact.kind) == ("model checkpoint", "model")
        assert artifact.run_id == fresh_run.id  # the run at setup, not the later one
    hparams = stored[f"{prefix}/hparams.yaml"]
    assert (hparams.description, hparams.kind) == ("Lightning run hyperparameters", "config")
    assert hparams.run_id == fresh_run.id
    assert storage_file(hparams).read_text() == (Path(logger.log_dir) / "hparams.yaml").read_text()
    # hparams.yaml once per run, although three checkpoints were saved.
    assert [e.kind for e in observer.of_type(ArtifactSavedEvent)].count("hparams") == 1
    assert ln.Artifact.filter(key=f"{prefix}/hparams.yaml").count() == 1

    # The reference, same settings, in the same run: same descriptions and kinds.
    from lamindb.integrations import lightning as reference

    ref = reference.Checkpoint(every_n_train_steps=1, save_top_k=-1)
    fit(ref, tmp_path, steps=3, logger=CSVLogger(save_dir=str(tmp_path), name="ref"))
    ref_stored = artifacts_under(ln, ref.checkpoint_key_prefix)
    assert {k.rsplit("/", 1)[1] for k in ref_stored} == {k.rsplit("/", 1)[1] for k in stored}
    for key, artifact in ref_stored.items():
        ours = stored[f"{prefix}/{key.rsplit('/', 1)[1]}"]
        assert (artifact.description, artifact.kind) == (ours.description, ours.kind)
        assert artifact.run_id == ours.run_id == fresh_run.id


class WatchingCheckpoint(ll.Checkpoint):
    """Records, on the worker thread, how many other artifacts hold a key once its new save is
    stored (uploaded and registered) and before the committer has run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.existing_before_commit: list[tuple[str, int]] = []

    def save_checkpoint_artifact(self, trainer: pl.Trainer, filepath: Any, **kwargs: Any) -> Any:
        import lamindb as ln

        key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
        artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
        others = ln.Artifact.filter(key=key).exclude(id=artifact.id).count()
        self.existing_before_commit.append((Path(filepath).name, others))
        return artifact


def test_overwritten_key_keeps_old_artifact_until_new_one_commits(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A re-saved key keeps its committed artifact until the new one commits; one remains."""
    callback = WatchingCheckpoint(
        dirpath=tmp_path / "ckpts", save_last=True, every_n_train_steps=1, save_top_k=1
    )
    fit(callback, tmp_path, steps=3, extra_callbacks=[FlushEachStep(callback)])

    last_saves = [n for name, n in callback.existing_before_commit if name == "last.ckpt"]
    # First save: nothing under the key yet; later ones: the previous artifact still exists.
    assert last_saves == [0, 1, 1]
    key = f"{callback.checkpoint_key_prefix}/last.ckpt"
    remaining = list(ln.Artifact.filter(key=key))
    assert len(remaining) == 1
    assert stored_sha256(remaining[0]) == sha256(Path(callback.dirpath) / "last.ckpt")


class FailSecondLastSave(ll.Checkpoint):
    """The second (and any later) save of last.ckpt fails permanently; records the first's bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_calls = 0
        self.first_last_sha: str | None = None

    def save_checkpoint_artifact(self, trainer: pl.Trainer, filepath: Any, **kwargs: Any) -> Any:
        if Path(filepath).name == "last.ckpt":
            self.last_calls += 1
            if self.last_calls >= 2:
                raise PermanentError("injected: storage rejected the new last.ckpt")
            self.first_last_sha = sha256(filepath)
        return super().save_checkpoint_artifact(trainer, filepath, **kwargs)


def test_failed_overwrite_keeps_previous_artifact_and_reports_failure(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A failed re-save keeps the committed artifact and its file; one failed event, 1 try."""
    observer = RecordingObserver()
    callback = FailSecondLastSave(
        dirpath=tmp_path / "ckpts",
        save_last=True,
        every_n_train_steps=1,
        artifact_observers=[observer],
        on_error="warn",
    )
    with pytest.warns(UserWarning, match="could not be persisted"):
        fit(callback, tmp_path, steps=2, extra_callbacks=[FlushEachStep(callback)])

    assert callback.last_calls == 2
    key = f"{callback.checkpoint_key_prefix}/last.ckpt"
    remaining = list(ln.Artifact.filter(key=key))
    assert len(remaining) == 1
    assert storage_file(remaining[0]).exists()
    assert stored_sha256(remaining[0]) == callback.first_last_sha
    failures = observer.of_type(ArtifactFailedEvent)
    assert [(f.key, f.operation, f.attempts) for f in failures] == [(key, "save", 1)]
    assert isinstance(failures[0].error, PermanentError)
    # The failed save did not disturb the rest: the step-2 checkpoint is stored.
    assert f"{callback.checkpoint_key_prefix}/epoch=0-step=2.ckpt" in artifacts_under(
        ln, callback.checkpoint_key_prefix
    )


class RecordingSubmissions(ll.Checkpoint):
    """Records, on the training thread, the order in which Lightning saves and removes files."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: list[tuple[str, str]] = []
        self.training_thread: str | None = None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.training_thread = threading.current_thread().name
        self.submitted.append(("saved", self.resolve_artifact_key(trainer, filepath, "checkpoint")))

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
        super()._remove_checkpoint(trainer, filepath)
        self.submitted.append(("removed", key))


def test_observers_get_real_artifacts_in_submission_order(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Observers get real artifacts, storage_uri == str(path), removals, in submission order."""
    observer = RecordingObserver()
    callback = RecordingSubmissions(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
    )
    # score seen by the checkpoint after step n: 4, 2, 3, 1, 5, 0 (min): evicts 3 times.
    model = TierModel(scores=[4, 2, 3, 1, 5, 0])
    trainer = fit(
        callback, tmp_path, steps=6, model=model, extra_callbacks=[FlushEachStep(callback)]
    )

    events = observer.events
    kinds = {ArtifactSavedEvent: "saved", ArtifactRemovedEvent: "removed"}
    assert [(kinds[type(e)], e.key) for e in events] == callback.submitted
    assert sum(1 for kind, _ in callback.submitted if kind == "removed") == 3
    assert observer.threads.isdisjoint({callback.training_thread})

    saved_uri: dict[str, str] = {}
    for event in events:
        assert event.local_path == Path(callback.dirpath) / event.key.rsplit("/", 1)[1]
        assert event.trainer is not None
        if isinstance(event, ArtifactSavedEvent):
            assert isinstance(event.artifact, ln.Artifact)
            assert event.artifact.key == event.key
            assert event.storage_uri == str(event.artifact.path)
            saved_uri[event.key] = event.storage_uri
        else:
            # The artifact saved under that key, now deleted: record and stored file.
            assert isinstance(event.artifact, ln.Artifact)
            assert event.artifact.key == event.key
            assert event.storage_uri == saved_uri[event.key]
            assert not ln.Artifact.filter(id=event.artifact.id).exists()
            assert not storage_file(event.storage_uri).exists()
    kept = {callback.resolve_artifact_key(trainer, p, "checkpoint") for p in callback.best_k_models}
    assert set(artifacts_under(ln, callback.checkpoint_key_prefix)) == kept
    for key in kept:
        assert storage_file(saved_uri[key]).exists()


class OverlappingLastSaves:
    """Wraps ``ln.Artifact.save``: records how many inserts of last.ckpt run at once, and
    makes the second one fail once with a transient "database is locked" error."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.lock = threading.Lock()
        self.calls = 0
        self.running = 0
        self.max_running = 0

    def __call__(self, artifact: Any, *args: Any, **kwargs: Any) -> Any:
        from django.db.utils import OperationalError

        # Only inserts: a versioned save also re-saves the previous head (is_latest=False).
        if not (artifact._state.adding and (artifact.key or "").endswith("/last.ckpt")):
            return self.original(artifact, *args, **kwargs)
        with self.lock:
            self.calls += 1
            number = self.calls
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if number == 2:
                raise OperationalError("database is locked (injected)")
            return self.original(artifact, *args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def test_concurrent_resaves_of_a_key_never_delete_the_newer_upload(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-saves of one key never upload at once, so a retried older save can never
    replace (or delete) a newer one: one artifact with the final bytes remains."""
    racing = OverlappingLastSaves(ln.Artifact.save)
    monkeypatch.setattr(ln.Artifact, "save", lambda self, *a, **k: racing(self, *a, **k))
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=1,
        max_workers=2,
        retry=ll.RetryPolicy.no_delay(),
    )
    fit(callback, tmp_path, steps=4)

    assert racing.max_running == 1  # two workers, yet one key's uploads never overlap
    stats = callback.persistence_stats
    assert stats.failed == 0 and stats.retried >= 1
    key = f"{callback.checkpoint_key_prefix}/last.ckpt"
    remaining = list(ln.Artifact.filter(key=key))
    assert len(remaining) == 1
    assert stored_sha256(remaining[0]) == sha256(Path(callback.dirpath) / "last.ckpt")


def test_a_seeded_rerun_after_its_artifacts_went_to_the_trash_is_visible_again(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """The user moves a run's checkpoint artifacts to the trash (``artifact.delete()``),
    empties the folder and runs the seeded script again: the same bytes under the same
    keys. LaminDB keeps the trashed rows, and its save of the same key and content
    returns them from the trash (the reference's checkpoints are visible again). Ours
    found the trashed row by its hash and committed it where it was: every checkpoint of
    the rerun stayed in the trash, invisible to ``Artifact.filter``."""
    import shutil

    dirpath = tmp_path / "ckpts"
    for attempt in range(2):
        shutil.rmtree(dirpath, ignore_errors=True)
        pl.seed_everything(0, verbose=False)
        callback = ll.Checkpoint(
            dirpath=dirpath, monitor="score", save_top_k=-1, every_n_train_steps=1
        )
        fit(callback, tmp_path, steps=2, model=TierModel(scores=[3, 1]))
        assert callback.persistence_stats.failed == 0
        if attempt == 0:
            for artifact in ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix):
                artifact.delete()  # to the trash
    prefix = callback.checkpoint_key_prefix
    stored = artifacts_under(ln, prefix)
    assert set(stored) == {f"{prefix}/epoch=0-step=1.ckpt", f"{prefix}/epoch=0-step=2.ckpt"}
    for key, artifact in stored.items():
        assert storage_file(artifact).read_bytes() == (dirpath / key.rsplit("/", 1)[1]).read_bytes()
    last = {
        key.rsplit("/", 1)[1]: [
            value
            for name, value in ln.models.ArtifactJsonValue.filter(artifact_id=a.id).values_list(
                "jsonvalue__feature__name", "jsonvalue__value"
            )
            if name == "is_last_model"
        ]
        for key, a in stored.items()
    }
    assert last == {"epoch=0-step=1.ckpt": [False], "epoch=0-step=2.ckpt": [True]}


def _seeded_runs(
    ln: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    between: Any = None,
    second: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[list[Any], ll.Checkpoint]:
    """The same seeded fit twice in an emptied folder, each in a new run (``between``
    called with the first callback; ``second``: options of the second callback instead);
    return the runs and the second callback."""
    import shutil

    dirpath = tmp_path / "ckpts"
    runs: list[Any] = []
    callback: ll.Checkpoint | None = None
    for attempt in range(2):
        if attempt == 1 and between is not None:
            between(callback)
        run = ln.Run(transform=ln.context.transform).save()
        monkeypatch.setattr(ln.context, "_run", run)
        runs.append(run)
        shutil.rmtree(dirpath, ignore_errors=True)
        pl.seed_everything(0, verbose=False)
        callback = ll.Checkpoint(
            dirpath=dirpath,
            run_uid_is_version=False,
            monitor="score",
            save_top_k=-1,
            every_n_train_steps=1,
            **(second if attempt == 1 and second is not None else options),
        )
        fit(callback, tmp_path, steps=2, model=TierModel(scores=[3, 1]))
        if attempt == 0 or second is None:
            assert callback.persistence_stats.failed == 0
    assert callback is not None
    return runs, callback


def test_a_seeded_rerun_after_its_artifacts_went_to_the_trash_links_its_own_run(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trashed artifacts of a seeded run, found again by the rerun's same bytes, come
    back from the trash linked to the rerun's run, as every other artifact found again.
    The look-up by content also filtered by storage location, which brought LaminDB's
    default branch filter back: a trashed row was never found, LaminDB's own insert then
    returned it from the trash, and it stayed linked to the first run."""

    def trash(callback: ll.Checkpoint) -> None:
        for artifact in ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix):
            artifact.delete()  # to the trash

    runs, callback = _seeded_runs(ln, tmp_path, monkeypatch, between=trash)
    prefix = callback.checkpoint_key_prefix
    stored = artifacts_under(ln, prefix)
    assert set(stored) == {f"{prefix}/epoch=0-step=1.ckpt", f"{prefix}/epoch=0-step=2.ckpt"}
    assert {a.run_id for a in stored.values()} == {runs[1].id}
    everywhere = ln.Artifact.objects.filter(key__startswith=prefix + "/")
    assert sorted(everywhere.values_list("branch_id", flat=True)) == [1, 1]


def test_a_found_again_artifact_whose_refresh_failed_once_links_the_rerun(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient failure (a locked database) in the transaction that moves a found-again
    artifact to the rerun's run rolls the move back; the retried commit moves it again.
    It used to see the run already set on its copy of the artifact and skip the move: the
    checkpoint stayed linked to the first run."""
    from django.db.utils import OperationalError

    from lamin_lightning import _lamin_store

    relink = _lamin_store._relink_run
    failed: list[int] = []

    def relink_then_fail(ln_: Any, artifact: Any, run: Any) -> None:
        relink(ln_, artifact, run)
        if not failed:
            failed.append(artifact.id)
            raise OperationalError("database is locked (injected)")

    def arm(callback: ll.Checkpoint) -> None:
        monkeypatch.setattr(_lamin_store, "_relink_run", relink_then_fail)

    runs, callback = _seeded_runs(
        ln, tmp_path, monkeypatch, between=arm, retry=ll.RetryPolicy.no_delay()
    )
    assert failed and callback.persistence_stats.retried >= 1
    stored = artifacts_under(ln, callback.checkpoint_key_prefix)
    assert {a.run_id for a in stored.values()} == {runs[1].id}


def test_a_found_again_artifact_whose_new_values_are_refused_is_kept(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded rerun whose feature value LaminDB refuses (an int for a str feature): the
    value is left out with a warning and the checkpoints persist, as a fresh save would;
    the artifacts they found again by their bytes, the first run's, are kept (with their
    files) and now belong to the rerun. Once, the refused commit forgot that its artifact
    was found again, so the clean-up of a failed commit deleted the first run's
    checkpoints; since a refused value no longer fails a commit, nothing is cleaned up."""
    if not ln.Feature.filter(name="tier_tag").exists():
        ln.Feature(name="tier_tag", dtype=str).save()
    runs, callback = _seeded_runs(
        ln,
        tmp_path,
        monkeypatch,
        features={"artifact": {"tier_tag": "first"}},
        second={"features": {"artifact": {"tier_tag": 5}}, "on_error": "warn"},
    )
    assert callback.persistence_stats.failed == 0
    stored = artifacts_under(ln, callback.checkpoint_key_prefix)
    assert len(stored) == 2
    assert {a.run_id for a in stored.values()} == {runs[1].id}
    for artifact in stored.values():
        assert storage_file(artifact).exists()
        assert "tier_tag" not in artifact_features(ln, artifact)


def test_an_older_save_of_a_key_is_delivered_while_its_artifact_and_bytes_still_exist(
    ln: Any, tmp_path: Path
) -> None:
    """``last.ckpt`` saved at each step: the observer of the first save is held until the
    second save of the key has been committed. The reference deletes a key's artifact
    when a later save replaces it, after that older save's observers were told; here the
    older artifact goes once the later save's event was delivered, so the held observer
    still finds its artifact and its bytes, and afterwards only the latest one is left."""
    second_committed = threading.Event()
    commits: list[str] = []

    class Counting(ll.Checkpoint):
        def commit_checkpoint_artifact(self, trainer: Any, snapshot: Any, artifact: Any) -> None:
            super().commit_checkpoint_artifact(trainer, snapshot, artifact)
            if snapshot.key.endswith("/last.ckpt"):
                commits.append(artifact.uid)
                if len(commits) == 2:
                    second_committed.set()

    seen: list[tuple[bool, bool]] = []

    class Holding:
        def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
            if not event.key.endswith("/last.ckpt") or seen:
                return
            # Held until the next last.ckpt is committed (the committer goes on meanwhile).
            assert second_committed.wait(timeout=60)
            exists = ln.Artifact.filter(uid=event.artifact.uid).exists()
            seen.append((exists, storage_file(event.storage_uri).exists()))

        def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
            pass

    callback = Counting(
        dirpath=tmp_path / "ckpts",
        save_last=True,
        save_top_k=1,
        every_n_train_steps=1,
        artifact_observers=[Holding()],
    )
    fit(callback, tmp_path, steps=3)

    assert seen == [(True, True)]
    left = artifacts_under(ln, callback.checkpoint_key_prefix)
    last = left[f"{callback.checkpoint_key_prefix}/last.ckpt"]
    assert last.uid == commits[-1]
    assert ln.Artifact.filter(key=last.key).count() == 1  # the older ones went after all
