"""Issue 12 items 4 and 5 on a real instance: the artifacts are what Lightning keeps.

- ``async_write`` with ``filename="model"``: names versioned as Lightning does while the
  writes are pending; artifacts equal the kept files, by content.
- A background write that finds the disk full keeps the checkpoint it would have
  evicted, locally and as an artifact.
- SIGKILL while a replacement is written in the background: ``lamin-lightning flush``
  keeps the evicted checkpoint's artifact (its replacement was never written).
- A rewrite of ``last.ckpt`` that finds the disk full keeps the previous one, locally
  and as an artifact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import TierModel, artifacts_under, fit, stored_sha256

import lamin_lightning as ll
from helpers import sha256_file
from test_async_write import OnTrainEnd, WriteGate
from test_lightning_view import FullDiskIO, background_disk_full_at

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*could not be persisted.*"),
]

SCRIPT = Path(__file__).parent / "async_write_crash.py"


def _assert_artifacts_are_the_files(ln: Any, callback: Any, dirpath: Path) -> None:
    prefix = callback.checkpoint_key_prefix
    stored = artifacts_under(ln, prefix)
    files = {p.name: p for p in dirpath.glob("*.ckpt")}
    assert set(stored) == {f"{prefix}/{name}" for name in files}
    for name, path in files.items():
        assert stored_sha256(stored[f"{prefix}/{name}"]) == sha256_file(path)


def test_async_write_names_and_artifacts_match_lightning_while_writes_are_pending(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """filename="model", top-3, writes held: model, model-v1, model-v2, each an artifact."""
    dirpath = tmp_path / "ckpts"
    gate = WriteGate()
    callback = ll.Checkpoint(
        dirpath=dirpath,
        filename="model",
        monitor="score",
        mode="max",
        save_top_k=3,
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=8,
        max_pending=16,
    )
    fit(
        callback,
        tmp_path,
        steps=3,
        model=TierModel(scores=[1.0, 2.0, 3.0]),
        extra_callbacks=[gate, OnTrainEnd(gate.open)],
    )
    assert gate.timed_out == []
    assert {p.name for p in dirpath.glob("*.ckpt")} == {
        "model.ckpt",
        "model-v1.ckpt",
        "model-v2.ckpt",
    }
    _assert_artifacts_are_the_files(ln, callback, dirpath)


def test_a_full_disk_in_a_background_write_keeps_the_previous_artifact(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-1: step 2's background write fails (ENOSPC); step 1 stays, file and artifact."""
    dirpath = tmp_path / "ckpts"
    background_disk_full_at(monkeypatch, step=2)
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        async_write=True,
        on_error="warn",
    )
    with pytest.warns(UserWarning, match="No space left"):
        fit(callback, tmp_path, steps=2, model=TierModel(scores=[1.0, 2.0]))
    assert {p.name for p in dirpath.glob("*.ckpt")} == {"epoch=0-step=1.ckpt"}
    assert callback.best_model_path == str(dirpath / "epoch=0-step=1.ckpt")
    _assert_artifacts_are_the_files(ln, callback, dirpath)


def test_a_failed_rewrite_of_last_ckpt_keeps_the_previous_artifact(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """ENOSPC while last.ckpt is rewritten (synchronously): the previous one stays."""
    dirpath = tmp_path / "ckpts"
    callback = ll.Checkpoint(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=1)
    with pytest.raises(OSError, match="No space left"):
        fit(callback, tmp_path, steps=3, plugins=[FullDiskIO(step=2)])
    assert {p.name for p in dirpath.glob("*.ckpt")} == {"last.ckpt"}
    _assert_artifacts_are_the_files(ln, callback, dirpath)


@pytest.mark.parametrize("in_place_io", [False, True], ids=["async_write", "async_checkpoint_io"])
def test_a_replay_after_sigkill_mid_write_keeps_the_checkpoint_whose_replacement_was_lost(
    ln: Any, no_run: None, tmp_path: Path, in_place_io: bool
) -> None:
    """Killed while step 2 (which evicted step 1) was being written: the flush keeps step 1.

    Under AsyncCheckpointIO, whose CheckpointIO writes in place as Lightning's does, the
    kill leaves half of step 2's file at its name: the flush does not persist it (it used
    to, and removed step 1 for it), and leaves it for the user to delete."""
    dirpath = tmp_path / "ckpts"
    view = _train_until_frozen(dirpath, tmp_path, *(["--in-place-io"] if in_place_io else []))
    assert view["committed"], view
    assert Path(view["best_model_path"]).name == "epoch=0-step=2.ckpt"  # Lightning evicted 1

    flushed = _flush(dirpath)
    prefix = view["prefix"]
    stored = artifacts_under(ln, prefix)
    kept = dirpath / "epoch=0-step=1.ckpt"
    assert kept.exists()
    # async_write: a partial file never takes the name; in place: it is there, not stored.
    assert (dirpath / "epoch=0-step=2.ckpt").exists() is in_place_io
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert set(stored) == {f"{prefix}/epoch=0-step=1.ckpt"}
    assert stored_sha256(stored[f"{prefix}/epoch=0-step=1.ckpt"]) == sha256_file(kept)


@pytest.mark.parametrize("finish", ["flush", "resume"])
def test_a_rewrite_of_last_ckpt_killed_before_it_was_written_is_dropped_not_persisted(
    ln: Any, no_run: None, tmp_path: Path, finish: str
) -> None:
    """Killed while step 2's ``last.ckpt`` was written in the background (step 1's is
    committed, and still the file at that name). Its journaled save was replayed as if
    written: step 1's bytes under step 2's record, the committed artifact reused and
    annotated again. Resumed with a publisher of the user's, the resumed fit's own saves
    of ``last.ckpt`` then failed (FOREIGN KEY constraint failed). The save is dropped:
    its write never finished; ``last.ckpt`` stays step 1's, file and artifact."""
    from lamindb_tier import TierData, artifact_features, make_trainer, single

    from lamin_lightning._lamin import LaminArtifactPublisher
    from lamin_lightning.testing import RecordingObserver

    class UsersPublisher(LaminArtifactPublisher):
        pass

    dirpath = tmp_path / "ckpts"
    view = _train_until_frozen(dirpath, tmp_path, "--save-last")
    assert view["committed"], view
    prefix = view["prefix"]
    last = dirpath / "last.ckpt"
    step_1_last = sha256_file(last)
    assert stored_sha256(artifacts_under(ln, prefix)[f"{prefix}/last.ckpt"]) == step_1_last

    if finish == "flush":
        flushed = _flush(dirpath)
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
        told = flushed.stdout + flushed.stderr
        assert "dropping the save of" in told and "last.ckpt" in told, told
        stored = artifacts_under(ln, prefix)
        assert set(stored) == {f"{prefix}/epoch=0-step=1.ckpt", f"{prefix}/last.ckpt"}
        assert stored_sha256(stored[f"{prefix}/last.ckpt"]) == sha256_file(last) == step_1_last
        # Its features are step 1's: the dropped save (score 2.0) annotated nothing.
        assert single(artifact_features(ln, stored[f"{prefix}/last.ckpt"]))["score"] == 1.0
        return

    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        save_last=True,
        async_write=True,
        artifact_observers=[observer],
    )
    callback._artifact_publisher = UsersPublisher()
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(
        TierModel(scores=[1.0, 2.0, 3.0, 4.0]), datamodule=TierData(n=4), ckpt_path=str(last)
    )
    assert callback.persistence_stats.failed == 0, observer.of_type(ll.ArtifactFailedEvent)
    replayed = [e.key for e in observer.of_type(ll.ArtifactSavedEvent) if e.recovered]
    assert f"{prefix}/last.ckpt" not in replayed
    assert callback.checkpoint_key_prefix == prefix
    _assert_artifacts_are_the_files(ln, callback, dirpath)


def _flush(dirpath: Path) -> subprocess.CompletedProcess[str]:
    """``lamin-lightning flush dirpath`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "lamin_lightning._cli", "flush", str(dirpath)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _train_until_frozen(dirpath: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run :data:`SCRIPT` until it froze with a background write hanging, then SIGKILL it;
    return what it reported (see the script)."""
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--dirpath", str(dirpath), "--ready", str(ready), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            tick = threading.Event()
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"training did not freeze:\n{log_path.read_text()[-6000:]}")
                tick.wait(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    view: dict[str, Any] = json.loads(ready.read_text())
    return view
