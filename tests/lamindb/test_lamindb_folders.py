"""Folder checkpoints, Lightning's AsyncCheckpointIO and a sharded strategy on 2 ranks, on a
real instance: artifacts equal the kept checkpoints by content, flags Lightning's view.

A folder checkpoint becomes a folder artifact (``n_files`` files, hashed by lamindb's
``hash_dir``) under the key the reference gives it. The 2-rank fit runs ``dcp_fit.py``
in a subprocess (as ``test_lamindb_ddp.py`` runs ``ddp_fit.py``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import TierModel, artifact_features, fit, held_uploads, single
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import lamin_lightning as ll
from checkpoint_forms import FolderCheckpointIO, GatedCheckpointIO, OpenGate, tree
from helpers import lightning_kept_paths
from lamin_lightning import flush_directory

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

SCORES = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]
DCP_SCRIPT = Path(__file__).parent / "dcp_fit.py"
DCP_TIMEOUT = 240


def assert_artifacts_equal_view(
    ln: Any,
    prefix: str,
    kept: dict[str, Path],
    *,
    best: str,
    newest: str,
    ranking: list[str],
) -> dict[str, Any]:
    """Checkpoint artifacts under ``prefix`` are exactly ``kept``, one per key, each with
    the content of its local file or folder; best/last/rank flags equal Lightning's view."""
    from lamindb_setup.core.hashing import hash_dir, hash_file

    rows = list(ln.Artifact.objects.filter(key__startswith=prefix + "/", kind="model"))
    keys = [a.key for a in rows]
    assert sorted(keys) == sorted(kept), f"artifacts {sorted(keys)}, kept {sorted(kept)}"
    by_key = {a.key: a for a in rows}
    for key, local in kept.items():
        artifact = by_key[key]
        if local.is_dir():
            assert artifact.n_files == len(tree(local)), key
            assert artifact.hash == hash_dir(local)[1], f"{key}: stored folder differs"
            stored = Path(str(artifact.path))
            if stored.exists():  # local storage: the stored tree itself
                assert tree(stored) == tree(local), key
        else:
            assert artifact.hash == hash_file(local)[1], f"{key}: stored file differs"
    values = {k: single(artifact_features(ln, a)) for k, a in by_key.items()}
    assert [k for k, v in values.items() if v.get("is_best_model") is True] == [best]
    assert [k for k, v in values.items() if v.get("is_last_model") is True] == [newest]
    assert {k: v["model_rank"] for k, v in values.items() if "model_rank" in v} == {
        k: rank for rank, k in enumerate(ranking)
    }
    return by_key


def lightning_view(callback: Any) -> dict[str, Any]:
    trainer = callback._trainer

    def key(path: Any) -> str:
        return callback.resolve_artifact_key(trainer, path, "checkpoint")

    ranked = sorted(callback.best_k_models.items(), key=lambda item: float(item[1]))
    return {
        "kept": {key(p): Path(p) for p in lightning_kept_paths(callback)},
        "best": key(callback.best_model_path),
        "newest": key(callback._last_checkpoint_saved),
        "ranking": [key(p) for p, _ in ranked],
    }


def _callback(tmp_path: Path) -> ll.Checkpoint:
    return ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode="min",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=1,
    )


@pytest.mark.contract
def test_folder_checkpoints_become_folder_artifacts(ln: Any, no_run: None, tmp_path: Path) -> None:
    """One process, a CheckpointIO writing folders: the kept folders are folder artifacts
    with every file, evicted ones are deleted, flags are Lightning's."""
    callback = _callback(tmp_path)
    fit(
        callback,
        tmp_path,
        steps=len(SCORES),
        model=TierModel(scores=SCORES),
        plugins=[FolderCheckpointIO()],
    )
    assert callback.persistence_stats.failed == 0 and callback.persistence_stats.removed > 0
    view = lightning_view(callback)
    by_key = assert_artifacts_equal_view(ln, callback.checkpoint_key_prefix, **view)
    assert all(a.n_files == 3 for a in by_key.values())


def test_folder_jobs_left_in_the_outbox_are_flushed_without_duplicates(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Uploads hang past flush_timeout, then finish uncommitted (as after a crash); a later
    flush finds them by their folder hash, commits once, and ends at Lightning's view."""
    callback = _callback(tmp_path)
    callback.flush_timeout = 1.0
    callback.max_pending = 32  # every job of the fit admitted while uploads are held
    held = held_uploads()
    callback._artifact_publisher = held
    with pytest.warns(UserWarning, match="not persisted"):
        fit(
            callback,
            tmp_path,
            steps=4,
            model=TierModel(scores=SCORES),
            plugins=[FolderCheckpointIO()],
        )
    with held.cond:
        blocked = held.blocked
    held.released.set()
    with held.cond:
        assert held.cond.wait_for(lambda: held.finished >= blocked, timeout=120)
    report = flush_directory(tmp_path / "ckpts", progress=False)
    assert report.failed == 0 and not report.remaining, report
    assert_artifacts_equal_view(ln, callback.checkpoint_key_prefix, **lightning_view(callback))


@pytest.mark.contract
def test_async_checkpoint_io_persists_every_kept_checkpoint(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Lightning's AsyncCheckpointIO, its first write held until training went on: every
    kept checkpoint persists with its final bytes and Lightning's flags."""
    gated = GatedCheckpointIO()
    callback = _callback(tmp_path)
    fit(
        callback,
        tmp_path,
        steps=len(SCORES),
        model=TierModel(scores=SCORES),
        extra_callbacks=[OpenGate(gated)],
        plugins=[AsyncCheckpointIO(gated)],
    )
    assert gated.first_write_waited is True, "training waited for the background write"
    assert callback.persistence_stats.failed == 0
    assert_artifacts_equal_view(ln, callback.checkpoint_key_prefix, **lightning_view(callback))


@pytest.mark.slow
def test_sharded_checkpoints_on_two_ranks(ln: Any, tmp_path: Path) -> None:
    """Two ranks write their shards of each checkpoint folder (torch.distributed.checkpoint);
    rank zero persists each folder once all are written; rank one never waits on storage."""
    import lamindb_setup
    from lamindb_setup.core._settings_store import write_local_current_instance

    write_local_current_instance(tmp_path, lamindb_setup.settings.instance.slug)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK"))}
    env["PYTHONWARNINGS"] = "ignore"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(DCP_SCRIPT), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=DCP_TIMEOUT,
            env=env,
            cwd=tmp_path,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the 2-rank fit did not finish within {DCP_TIMEOUT}s (deadlock?): {expired}")
    output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    print(f"2-rank DCP fit: {time.monotonic() - started:.1f}s")
    reports = {
        r["rank"]: r
        for r in (json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json"))
    }
    assert sorted(reports) == [0, 1], output
    zero, one = reports[0], reports[1]

    kept = {key: Path(path) for key, path in zero["kept"].items()}
    assert len(kept) == 3  # top-2 and last.ckpt
    for folder in kept.values():
        files = set(tree(folder))
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= files, files
    stats = zero["stats"]
    assert stats["failed"] == 0 and stats["pending"] == 0 and stats["removed"] > 0
    assert_artifacts_equal_view(
        ln,
        zero["prefix"],
        kept,
        best=zero["best"],
        newest=zero["newest"],
        ranking=zero["ranking"],
    )
    # Rank one wrote its shards and never touched the pool or lamindb.
    assert one["stats"]["submitted"] == 0 and one["stats"]["training_stall_seconds"] == 0
    assert one["pipeline_threads"] == [] and not one["lamindb_imported"]
    assert one["teardown_seconds"] < 5


# -- a folder rewritten under one key (last.ckpt) ----------------------------------------------
# lamindb keeps every version of a folder key in one store by default, and a new version's
# upload empties it first: these run on local storage, where the copy into storage is
# lamindb's own (shutil in lamindb.core.storage.paths), which the first test fails once.


class _CopyFailingOnce:
    """lamindb's ``shutil``, whose copy of a folder named ``name`` into storage raises EIO
    at the ``nth`` such copy (once); everything else is the real module."""

    def __init__(self, name: str, nth: int) -> None:
        self.name, self.nth, self.seen, self.raised = name, nth, 0, False

    def __getattr__(self, attribute: str) -> Any:
        return getattr(shutil, attribute)

    def copytree(self, source: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(source).name == self.name:
            self.seen += 1
            if self.seen == self.nth:
                self.raised = True
                raise OSError(errno.EIO, "injected I/O error", str(target))
        return shutil.copytree(source, target, *args, **kwargs)


def _versions_of(ln: Any, key: str) -> list[Any]:
    return list(ln.Artifact.objects.filter(key=key).order_by("id"))


def _assert_stored_whole(artifact: Any) -> None:
    from lamindb_setup.core.hashing import hash_dir

    stored = Path(str(artifact.path))
    assert stored.is_dir(), f"{artifact.key}: its stored folder {stored} is gone"
    assert hash_dir(stored)[1] == artifact.hash, f"{artifact.key}: stored folder differs"


def _stored(ln: Any) -> set[str]:
    """The entries of the default storage's ``.lamindb`` folder (local or S3)."""
    root = ln.settings.storage.root / ".lamindb"
    root.fs.invalidate_cache()
    return {p.name for p in root.iterdir()} if root.exists() else set()


def _orphans(ln: Any, before: set[str]) -> list[str]:
    """Entries added to the default storage since ``before`` that no artifact points to."""
    known = {a.path.name for a in ln.Artifact.objects.all()}
    return sorted(_stored(ln) - before - known)


def test_a_rewritten_folder_whose_upload_fails_once_is_retried_and_keeps_one_version(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second ``last.ckpt`` folder's copy into storage fails once: the committed first
    version is untouched meanwhile (its store is not the new one's), the retry succeeds,
    and the key ends with one version holding the final folder."""
    import lamindb.core.storage.paths as lamindb_paths
    from lamindb_setup.core.hashing import hash_dir

    before = _stored(ln)
    failing = _CopyFailingOnce("last.ckpt", nth=2)
    monkeypatch.setattr(lamindb_paths, "shutil", failing)
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
        retry=ll.RetryPolicy(attempts=3, initial_backoff=0.01, jitter=0.0),
    )
    fit(callback, tmp_path, steps=2, plugins=[FolderCheckpointIO()])
    assert failing.raised, "the injected failure never ran"
    stats = callback.persistence_stats
    assert stats.failed == 0 and stats.retried >= 1, stats
    key = callback.resolve_artifact_key(
        callback._trainer, tmp_path / "ckpts" / "last.ckpt", "checkpoint"
    )
    [artifact] = _versions_of(ln, key)
    assert artifact.is_latest
    _assert_stored_whole(artifact)
    assert artifact.hash == hash_dir(tmp_path / "ckpts" / "last.ckpt")[1]
    assert _orphans(ln, before) == []


class _RejectedAtStep(ll.Checkpoint):
    """Commits that fail for good (a PermanentError, as from a store refusing them) from
    ``step`` on; the saves before carry ``folder_probe=1.0``, the refused ones 2.0. (A
    feature value LaminDB refuses no longer fails a commit: it is left out.)"""

    def __init__(self, *args: Any, step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step = step

    def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
        values = dict(super().collect_checkpoint_feature_values(trainer, snapshot) or {})
        values["folder_probe"] = 1.0 if trainer.global_step < self.step else 2.0
        return values

    def commit_checkpoint_artifact(self, trainer: Any, snapshot: Any, artifact: Any) -> None:
        if dict(snapshot.feature_values or {}).get("folder_probe") == 2.0:
            raise ll.PermanentError("the commit is refused")
        super().commit_checkpoint_artifact(trainer, snapshot, artifact)


def _probe_feature(ln: Any) -> None:
    if ln.Feature.filter(name="folder_probe").one_or_none() is None:
        ln.Feature(name="folder_probe", dtype=float).save()


def test_a_rewritten_folder_whose_commit_fails_leaves_the_committed_version(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """The second ``last.ckpt`` folder uploads, then its commit is refused for good:
    the uploaded version goes, and the first version (its record and its files) stays
    the key's latest, as for a file (docs/failures.md)."""
    _probe_feature(ln)
    before = _stored(ln)
    callback = _RejectedAtStep(
        dirpath=tmp_path / "ckpts",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
        step=2,
    )
    fit(callback, tmp_path, steps=2, plugins=[FolderCheckpointIO()])
    assert callback.persistence_stats.failed == 1, callback.persistence_stats
    key = callback.resolve_artifact_key(
        callback._trainer, tmp_path / "ckpts" / "last.ckpt", "checkpoint"
    )
    [artifact] = _versions_of(ln, key)
    assert artifact.is_latest
    _assert_stored_whole(artifact)
    values = single(artifact_features(ln, artifact))
    assert values.get("folder_probe") == 1.0 and values.get("is_last_model") is True
    assert _orphans(ln, before) == []


def test_a_folder_key_the_reference_stored_keeps_its_version_until_ours_commits(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """``last.ckpt`` stored by the reference (lamindb's default for a folder: one store for
    every version), then rewritten by ours: a rewrite whose commit fails leaves the
    reference's version and its files; the next one replaces it, leaving nothing behind."""
    from lamindb.integrations.lightning import Checkpoint as Reference

    _probe_feature(ln)
    before = _stored(ln)
    dirpath = tmp_path / "ckpts"
    reference = Reference(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=1)
    fit(reference, tmp_path / "ref", steps=1, plugins=[FolderCheckpointIO()])
    key = reference.resolve_artifact_key(
        trainer=reference._trainer, filepath=dirpath / "last.ckpt", kind="checkpoint"
    )
    [first] = _versions_of(ln, key)
    assert first.overwrite_versions, "the reference's folder version no longer shares its store"

    ours = _RejectedAtStep(
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
        enable_version_counter=False,  # last.ckpt itself rewritten
        step=1,  # every save of this fit is refused at its commit
    )
    fit(ours, tmp_path / "ours", steps=1, plugins=[FolderCheckpointIO()])
    assert ours.persistence_stats.failed == 1, ours.persistence_stats
    [kept] = _versions_of(ln, key)
    assert kept.id == first.id and kept.is_latest
    _assert_stored_whole(kept)

    # Its setup replays the refused job too (it stayed journaled).
    ours_again = ll.Checkpoint(
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        enable_version_counter=False,
    )
    fit(ours_again, tmp_path / "again", steps=1, plugins=[FolderCheckpointIO()])
    assert ours_again.persistence_stats.failed == 0
    [latest] = _versions_of(ln, key)
    assert latest.id != first.id and latest.is_latest
    _assert_stored_whole(latest)
    assert _orphans(ln, before) == []


def _folder(root: Path, content: str) -> Path:
    root.mkdir(parents=True)
    (root / "weights.pt").write_text(content)
    (root / "meta.json").write_text("{}")
    return root


@pytest.mark.contract
def test_an_interrupted_folder_upload_goes_with_its_record_and_leaves_shared_stores(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """What a replay drops for an upload a crash cut short (``_drop_interrupted``): a
    folder version's own store goes with its record; a version sharing its key's store
    (lamindb's default for folders) goes without touching that store or the other
    versions, and the one before it is the key's latest again."""
    from lamin_lightning._lamin_store import _drop_interrupted

    before = _stored(ln)
    own = ln.Artifact(
        _folder(tmp_path / "own.ckpt", "a"), key="interrupted/own.ckpt", overwrite_versions=False
    ).save()
    stored = own.path  # a local path or an S3 one
    assert stored.is_dir()
    _drop_interrupted(own)
    assert not ln.Artifact.objects.filter(key="interrupted/own.ckpt").exists()
    stored.fs.invalidate_cache()
    assert not stored.exists(), "the partial upload's folder was left in storage"

    first = ln.Artifact(_folder(tmp_path / "v1" / "shared.ckpt", "1"), key="interrupted/s.ckpt")
    first.save()
    second = ln.Artifact(_folder(tmp_path / "v2" / "shared.ckpt", "22"), key="interrupted/s.ckpt")
    second.save()
    assert first.overwrite_versions and second.overwrite_versions
    assert str(first.path) == str(second.path)  # one store for both versions
    _drop_interrupted(second)
    [kept] = _versions_of(ln, "interrupted/s.ckpt")
    assert kept.id == first.id and kept.is_latest
    kept.path.fs.invalidate_cache()
    assert kept.path.is_dir(), "the store the other version shares was removed"
    assert _orphans(ln, before) == []
