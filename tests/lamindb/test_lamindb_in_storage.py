"""Checkpoints written inside one of the instance's storage locations.

lamindb registers a file that lies in a storage location where it is, without copying
it. The reference hands it Lightning's file, so its artifact is that file. We hand
lamindb the staged copy, which is deleted once its job is done: registered in place,
every artifact named a file that no longer existed (``artifact.path`` missing, the
checkpoint's bytes gone from the instance). Ours must give artifacts whose bytes exist
and equal what Lightning wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import TierData, TierModel, make_trainer
from lightning.pytorch.loggers import CSVLogger

import lamin_lightning as ll

pytestmark = [pytest.mark.lamindb, pytest.mark.filterwarnings("ignore::UserWarning")]


def _storage_root() -> Path:
    import lamindb_setup

    return Path(lamindb_setup.settings.storage.root_as_str)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("module", ["lamindb.integrations.lightning", "lamin_lightning"])
def test_a_log_dir_inside_the_storage_location_leaves_artifacts_whose_bytes_exist(
    module: str, ln: Any, fresh_run: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A logger ``save_dir`` inside the instance's storage: each checkpoint Lightning
    keeps, and ``hparams.yaml``, has an artifact whose bytes exist and equal the file
    (the reference's too: its artifact is Lightning's file, registered in place)."""
    import importlib

    api = importlib.import_module(module)
    save_dir = _storage_root() / f"in-storage-{request.node.callspec.id}-{tmp_path.name}"
    callback = api.Checkpoint(monitor="score", save_top_k=2, every_n_train_steps=1)
    trainer = make_trainer(
        tmp_path, [callback], max_steps=4, logger=CSVLogger(save_dir=str(save_dir), name="n")
    )
    trainer.fit(TierModel(scores=[3, 1, 2, 0]), datamodule=TierData(n=10))

    found = {
        a.key: a for a in ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix + "/")
    }
    kept = {Path(p).name: Path(p) for p in callback.best_k_models}
    assert {Path(k).name for k in found} == {*kept, "hparams.yaml"}
    for key, artifact in found.items():
        stored = Path(str(artifact.path))
        assert stored.exists(), f"{key}: its artifact's bytes are gone ({stored})"
        if Path(key).name in kept:
            assert _sha(stored) == _sha(kept[Path(key).name]), key


def test_the_deprecated_callback_writing_inside_the_storage_location_keeps_its_bytes(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """``Callback(path, key)`` with ``path`` inside the storage: each epoch's version
    has its bytes (the staged copy it was made from is deleted)."""
    folder = _storage_root() / f"legacy-in-storage-{tmp_path.name}"
    folder.mkdir()
    key = f"tier-legacy-in-storage/{tmp_path.name}/model.ckpt"
    with pytest.warns(DeprecationWarning):
        callback = ll.Callback(folder / "model.ckpt", key)
    trainer = make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=2)
    trainer.fit(TierModel(scores=[1.0, 2.0]), TierData(n=1))
    versions = list(ln.Artifact.filter(key=key).order_by("created_at"))
    assert len(versions) == 2
    for version in versions:
        assert Path(str(version.path)).exists(), version.path
    assert _sha(Path(str(versions[-1].path))) == _sha(folder / "model.ckpt")


def test_a_staged_file_in_storage_is_handed_over_from_a_hard_link_beside_the_storage(
    ln: Any, tmp_path: Path
) -> None:
    """The temporary folder is on the storage's side (a hard link: a checkpoint of tens
    of GB is never copied to the system's temporary folder), outside every storage
    location, and gone afterwards; a killed process's leftover there is deleted by the
    next use, a live one's is left alone."""
    import fcntl
    import os

    from lamin_lightning._lamin_store import SCRATCH_FOLDER, outside_storage

    root = _storage_root()
    staged = root / f"staged-{tmp_path.name}" / "model.ckpt"
    staged.parent.mkdir()
    staged.write_bytes(b"weights")
    scratch = root.parent / SCRATCH_FOLDER
    scratch.mkdir(exist_ok=True)
    dead = scratch / "4242-deadbeef0000-leftover"  # its owner's lock file is gone
    dead.mkdir()
    (dead / "model.ckpt").write_bytes(b"old")
    alive = scratch / "4343-a11ve0000000-inuse"
    alive.mkdir()
    lock = os.open(scratch / "4343-a11ve0000000.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: a lock of "another process"
    try:
        with outside_storage(staged) as source:
            source = Path(source)
            assert source.parent.parent == scratch
            assert os.path.samefile(source, staged)
            from lamindb.models.artifact import check_path_in_existing_storage

            assert check_path_in_existing_storage(source) is None
        assert not source.parent.exists()
        assert not dead.exists()
        assert alive.exists()
    finally:
        os.close(lock)
        import shutil

        shutil.rmtree(alive)


def test_a_scratch_folder_that_cannot_be_made_for_a_passing_reason_is_retried(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or too many open files) where the temporary folder is made is an
    ``OSError`` the save retries, as the upload's own would be; it was a ``LaminSetupError``
    (permanent: the job failed for good) telling the user to move their checkpoints. Only
    where no folder may be made at all (permissions) is it a setup error."""
    import errno

    from lamin_lightning import _lamin_store
    from lamin_lightning._errors import LaminSetupError
    from lamin_lightning._retry import RetryPolicy

    staged = _storage_root() / f"full-{tmp_path.name}" / "model.ckpt"
    staged.parent.mkdir()
    staged.write_bytes(b"weights")

    def full(folder: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(_lamin_store, "_scratch", full)
    with pytest.raises(OSError) as raised, _lamin_store.outside_storage(staged):
        pass
    assert not isinstance(raised.value, LaminSetupError)
    assert RetryPolicy().is_transient(raised.value)

    def refused(folder: Path) -> Path:
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    monkeypatch.setattr(_lamin_store, "_scratch", refused)
    with (
        pytest.raises(LaminSetupError, match="Permission denied"),
        _lamin_store.outside_storage(staged),
    ):
        pass


def test_a_failed_upload_leaves_nothing_in_the_scratch_folder(ln: Any, tmp_path: Path) -> None:
    """An exception raised while lamindb reads the link (a failed upload, Ctrl+C) deletes
    the temporary folder, and this process lets its lock file go."""
    import os

    from lamin_lightning._lamin_store import SCRATCH_FOLDER, outside_storage
    from lamin_lightning._owners import owner

    staged = _storage_root() / f"failing-{tmp_path.name}" / "model.ckpt"
    staged.parent.mkdir()
    staged.write_bytes(b"weights")
    scratch = _storage_root().parent / SCRATCH_FOLDER
    for error in (RuntimeError("upload failed"), KeyboardInterrupt()):
        with pytest.raises(type(error)), outside_storage(staged) as source:
            assert Path(source).exists()
            raise error
        assert not Path(source).parent.exists()
        assert not [n for n in os.listdir(scratch) if n.startswith(owner())]
    assert staged.read_bytes() == b"weights"
