"""Folder checkpoints, Lightning's AsyncCheckpointIO and a sharded strategy on 2 ranks, on a
real instance: artifacts equal the kept checkpoints by content, flags Lightning's view.

A folder checkpoint becomes a folder artifact (``n_files`` files, hashed by lamindb's
``hash_dir``) under the key the reference gives it. The 2-rank fit runs ``dcp_fit.py``
in a subprocess (as ``test_lamindb_ddp.py`` runs ``ddp_fit.py``).
"""

from __future__ import annotations

import json
import os
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
