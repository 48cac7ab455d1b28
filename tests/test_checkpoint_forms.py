"""Folder checkpoints and a CheckpointIO that writes after it returns, on the in-memory store.

Each fit ends with the store holding exactly Lightning's kept set, by content (a folder
hashed over its tree), with best/last/rank flags equal to Lightning's view.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from checkpoint_forms import (
    FOLDER_FILES,
    FolderCheckpointIO,
    GatedCheckpointIO,
    OpenGate,
)
from helpers import TinyModel, checkpoint_files, lightning_kept_paths, loader, make_trainer
from lamin_lightning import ArtifactFailedEvent, CheckpointIOError, PersistenceError
from lamin_lightning._flush import flush_directory
from lamin_lightning._sigterm import ctrl_c_after
from lamin_lightning._staging import (
    SMALL_FILE_BYTES,
    Stager,
    detach_before_rewrite,
    release_staged,
    staging_root,
    tree_size,
)
from lamin_lightning.testing import (
    MemoryCheckpoint,
    MemoryStore,
    RecordingObserver,
    content_sha256,
)
from test_async_write import OnTrainEnd, keys_of

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
    pytest.mark.filterwarnings("ignore:.*AsyncCheckpointIO.*experimental.*"),
]

SCORES = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]


def _tree(root: Path) -> Path:
    """A folder with a large file, a small one and a nested one."""
    root.mkdir()
    (root / "big.bin").write_bytes(b"b" * (SMALL_FILE_BYTES + 10))
    (root / "small.json").write_text("{}")
    (root / "sub").mkdir()
    (root / "sub" / "shard.bin").write_bytes(b"s" * 100)
    return root


def test_a_folder_is_staged_file_by_file_and_survives_its_removal(tmp_path: Path) -> None:
    """Staging a folder gives every file a second name (large: link, small: copy), reports
    the tree's bytes, survives Lightning's rmtree, and is released as a whole."""
    source = _tree(tmp_path / "epoch=0.ckpt")
    want = content_sha256(source)
    stager = Stager(staging_root(tmp_path / "ckpts"))
    staged, size, _ = stager.stage(source)
    assert staged.name == "epoch=0.ckpt" and staged.is_dir()
    assert size == tree_size(source) == SMALL_FILE_BYTES + 10 + 2 + 100
    big, small = staged / "big.bin", staged / "small.json"
    assert os.stat(small).st_ino != os.stat(source / "small.json").st_ino
    if os.stat(big).st_ino == os.stat(source / "big.bin").st_ino:
        # A link: a shard writer truncating in place must not reach it.
        detach_before_rewrite(source)
        assert os.stat(big).st_nlink == 1 and not (source / "big.bin").exists()
    shutil.rmtree(source)
    assert content_sha256(staged) == want
    release_staged(staged)
    assert not staged.exists() and not staged.parent.exists()


def test_a_folder_moved_to_the_trash_is_deleted_with_it(tmp_path: Path) -> None:
    """Eviction renames a folder checkpoint aside; emptying the trash deletes the tree."""
    source = _tree(tmp_path / "step=1.ckpt")
    stager = Stager(staging_root(tmp_path / "ckpts"))
    assert stager.trash(source)
    assert not source.exists()
    stager.empty_trash()
    assert list((stager.root / "trash").iterdir()) == []


def _folder_callback(store: MemoryStore, dirpath: Path, **kwargs: Any) -> MemoryCheckpoint:
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "monitor": "score",
        "mode": "min",
        "save_top_k": 2,
        "save_last": True,
        "every_n_train_steps": 1,
    }
    options.update(kwargs)
    return MemoryCheckpoint(store, **options)


def assert_store_equals_lightning(store: MemoryStore, callback: MemoryCheckpoint) -> None:
    """Store keys are the kept set, each with the local file's (or folder's) content, and
    best/last/rank flags equal Lightning's ``best_model_path``, newest save and ranking."""
    trainer = callback._trainer

    def key(path: Any) -> str:
        return callback.resolve_artifact_key(trainer, path, "checkpoint")

    kept = {key(p): p for p in lightning_kept_paths(callback)}
    assert store.keys(kind="checkpoint") == set(kept)
    for k, path in kept.items():
        stored = store.get(k)
        assert stored is not None and path.exists()
        assert stored.sha256 == content_sha256(path), f"{k}: stored content differs"
    flags = {k: store.flags[k] for k in kept}
    assert [k for k, f in flags.items() if f["is_best_model"]] == [key(callback.best_model_path)]
    newest = callback._last_checkpoint_saved  # last.ckpt with save_last
    assert [k for k, f in flags.items() if f["is_last_model"]] == [key(newest)]
    ranked = sorted(callback.best_k_models.items(), key=lambda item: float(item[1]))
    assert {k: f["model_rank"] for k, f in flags.items() if f["model_rank"] is not None} == {
        key(path): rank for rank, (path, _) in enumerate(ranked)
    }


def test_folder_checkpoints_persist_as_folders_with_lightnings_flags(tmp_path: Path) -> None:
    """A CheckpointIO writing folders: top-k eviction, last.ckpt rewrites, every byte counted;
    the store holds the kept folders, whole, with Lightning's flags."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = _folder_callback(store, dirpath)
    trainer = make_trainer(tmp_path, [callback], max_steps=6, plugins=[FolderCheckpointIO()])
    trainer.fit(TinyModel(scores=SCORES), loader(6))

    stats = callback.persistence_stats
    assert stats.failed == 0 and stats.removed > 0
    assert_store_equals_lightning(store, callback)
    for key in store.keys(kind="checkpoint"):
        assert store.get(key).files == FOLDER_FILES  # type: ignore[union-attr]
    assert sorted(p.name for p in dirpath.iterdir()) == sorted(
        Path(p).name for p in lightning_kept_paths(callback)
    )
    # Progress and counters cover every file of a folder.
    assert stats.bytes_saved >= sum(tree_size(p) for p in lightning_kept_paths(callback))
    assert not any((staging_root(dirpath) / "staged").rglob("*.pt")), "staged trees left"


def test_folder_jobs_replay_from_the_outbox(tmp_path: Path) -> None:
    """Storage hangs past flush_timeout; `flush` later persists the journaled folders."""
    store = MemoryStore()
    store.hang()
    dirpath = tmp_path / "ckpts"
    callback = _folder_callback(store, dirpath, flush_timeout=0.2, max_pending=32)
    try:
        with pytest.warns(UserWarning, match="not persisted"):
            make_trainer(tmp_path, [callback], max_steps=6, plugins=[FolderCheckpointIO()]).fit(
                TinyModel(scores=SCORES), loader(6)
            )
    finally:
        store.release()
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining
    assert_store_equals_lightning(store, callback)


def test_async_checkpoint_io_is_staged_only_once_written(tmp_path: Path) -> None:
    """Lightning's AsyncCheckpointIO: the first write is held until training went on (so
    the training thread never waited for it); every checkpoint persists, nothing fails."""
    store = MemoryStore()
    gated = GatedCheckpointIO()
    callback = _folder_callback(store, tmp_path / "ckpts")
    trainer = make_trainer(
        tmp_path,
        [OpenGate(gated), callback],
        max_steps=6,
        plugins=[AsyncCheckpointIO(gated)],
    )
    trainer.fit(TinyModel(scores=SCORES), loader(6))

    assert gated.first_write_waited is True, "training waited for the background write"
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)
    # The trainer's CheckpointIO is given back as it was.
    assert type(trainer.strategy.checkpoint_io) is AsyncCheckpointIO
    assert trainer.strategy.checkpoint_io.checkpoint_io is gated


def test_a_crash_gives_the_trainer_its_checkpoint_io_back(tmp_path: Path) -> None:
    """Lightning calls no ``teardown`` after an exception: the CheckpointIO the callback
    wrapped (to learn when a write is done) is given back all the same, as it was."""
    inner = TorchCheckpointIO()
    plugin = AsyncCheckpointIO(inner)
    store = MemoryStore()
    callback = MemoryCheckpoint(store, dirpath=tmp_path / "ckpts", every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=6, plugins=[plugin])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyModel(scores=SCORES, fail_at_step=3), loader(6))

    assert type(trainer.strategy.checkpoint_io) is AsyncCheckpointIO
    assert plugin.checkpoint_io is inner
    assert_store_equals_lightning(store, callback)


def _fit_holding_the_first_write(
    tmp_path: Path, plugin: Callable[[Any], Any]
) -> tuple[MemoryStore, Any, GatedCheckpointIO, list[tuple[str, bool]]]:
    """Three steps under ``plugin(GatedCheckpointIO())``, whose first write is held until
    step 2 ended; ``seen``: whether the first checkpoint's name was taken then."""
    from lamin_lightning import _names

    store = MemoryStore()
    gated = GatedCheckpointIO()
    seen: list[tuple[str, bool]] = []

    class WhileHeld(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 2 and not gated.gate.is_set():
                first = tmp_path / "ckpts" / "epoch=0-step=1.ckpt"
                seen.append((first.name, _names.name_taken(first)))
                gated.gate.set()

    callback = _folder_callback(store, tmp_path / "ckpts")
    trainer = make_trainer(tmp_path, [WhileHeld(), callback], max_steps=3, plugins=[plugin(gated)])
    trainer.fit(TinyModel(scores=SCORES), loader(3))
    return store, callback, gated, seen


def test_an_async_checkpoint_io_write_holds_its_name_until_it_is_written(tmp_path: Path) -> None:
    """A write AsyncCheckpointIO still holds takes its name, as a background write of ours
    does: a replay in this process (a later fit after a Ctrl+C) waits for it instead of
    judging a file still being written, and the name is given back once written."""
    from lamin_lightning import _names

    store, callback, gated, seen = _fit_holding_the_first_write(tmp_path, AsyncCheckpointIO)

    assert gated.first_write_waited is True
    assert seen == [("epoch=0-step=1.ckpt", True)]
    assert not any(_names.name_taken(p) for p in (tmp_path / "ckpts").iterdir())
    assert_store_equals_lightning(store, callback)


def test_a_tracked_write_holds_its_name_from_the_hook_until_it_finishes_or_is_dropped(
    tmp_path: Path,
) -> None:
    """From the training thread's ``save_checkpoint`` on, not only once the job's staging
    waits for it: a save kept from admission (Ctrl+C, a raising hook) is never staged in
    this fit, and its write may still be queued when the next fit's replay runs."""
    from lamin_lightning import _names
    from lamin_lightning._checkpoint_io import WriteTracker

    tracker = WriteTracker()
    written, dropped = tmp_path / "written.ckpt", tmp_path / "dropped.ckpt"
    first, second = tracker.begin(written), tracker.begin(dropped)
    assert _names.name_taken(written) and _names.name_taken(dropped)
    tracker.finish(tracker.claim(written), None)
    tracker.drop(second)
    assert first.done.is_set() and second.done.is_set()
    assert not _names.name_taken(written) and not _names.name_taken(dropped)


def test_a_failed_background_write_fails_its_job_with_the_writes_error(tmp_path: Path) -> None:
    """A write that fails under AsyncCheckpointIO after the save returned fails its job
    with that error (ENOSPC), not with a staging error about a missing file."""

    class FailingFirstWrite(GatedCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            first = self.writes == 0
            super().save_checkpoint(checkpoint, path, storage_options)
            if first:
                Path(path).unlink()
                raise OSError(errno.ENOSPC, "No space left on device")

    store = MemoryStore()
    observer = RecordingObserver()
    gated = FailingFirstWrite()
    callback = _folder_callback(
        store, tmp_path / "ckpts", save_last=False, artifact_observers=[observer]
    )
    trainer = make_trainer(
        tmp_path, [OpenGate(gated), callback], max_steps=2, plugins=[AsyncCheckpointIO(gated)]
    )
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(TinyModel(scores=SCORES), loader(2))
    assert gated.first_write_waited is True
    assert observer.wait_for(1)
    failed = observer.of_type(ArtifactFailedEvent)
    assert failed and failed[0].key == "checkpoints/epoch=0-step=1.ckpt"
    assert isinstance(failed[0].error, OSError) and failed[0].error.errno == errno.ENOSPC
    assert store.get("checkpoints/epoch=0-step=1.ckpt") is None


class HomeGrownAsyncIO(TorchCheckpointIO):
    """A CheckpointIO of its own making that writes in a thread pool."""

    def __init__(self) -> None:
        super().__init__()
        self._executor = None


def test_a_checkpoint_io_we_cannot_follow_is_refused_at_setup(tmp_path: Path) -> None:
    """An unknown asynchronous CheckpointIO fails setup, naming it and the fix; one that
    declares itself synchronous is accepted."""
    callback = _folder_callback(MemoryStore(), tmp_path / "ckpts")
    trainer = make_trainer(tmp_path, [callback], max_steps=1, plugins=[HomeGrownAsyncIO()])
    with pytest.raises(CheckpointIOError, match="HomeGrownAsyncIO") as raised:
        trainer.fit(TinyModel(scores=SCORES), loader(1))
    assert isinstance(raised.value, ValueError)
    assert "AsyncCheckpointIO" in str(raised.value) and "async_write" in str(raised.value)
    assert trainer.global_step == 0

    declared = HomeGrownAsyncIO()
    declared.lamin_lightning_synchronous = True  # type: ignore[attr-defined]
    store = MemoryStore()
    callback = _folder_callback(store, tmp_path / "again", save_last=False)
    make_trainer(tmp_path, [callback], max_steps=2, plugins=[declared]).fit(
        TinyModel(scores=SCORES), loader(2)
    )
    assert_store_equals_lightning(store, callback)


class WritesAtTeardownIO(TorchCheckpointIO):
    """Writes each checkpoint on a thread of its own that runs only when ``teardown`` lets
    it (then joins it): nothing in it looks asynchronous to the callback, and no file
    exists before teardown. ``ModelCheckpoint`` ends a fit with it with every file."""

    def __init__(self) -> None:
        super().__init__()
        self._threads: list[threading.Thread] = []
        self._go = threading.Semaphore(0)
        self.before_writing: Callable[[], object] = lambda: None

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        def write() -> None:
            self._go.acquire()
            TorchCheckpointIO.save_checkpoint(self, checkpoint, path, storage_options)

        thread = threading.Thread(target=write)
        thread.start()
        self._threads.append(thread)

    def teardown(self) -> None:
        try:
            self.before_writing()
        finally:
            for _ in self._threads:
                self._go.release()
            for thread in self._threads:
                thread.join()


def test_a_checkpoint_io_writing_in_the_background_unrecognised_fails_naming_the_fix(
    tmp_path: Path,
) -> None:
    """A CheckpointIO that returns before writing, which the callback does not recognise
    as asynchronous: its checkpoints fail with an error that says so and names the fix,
    not a bare "No such file or directory"."""
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store, dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_train_steps=1
    )
    io = WritesAtTeardownIO()
    # The CheckpointIO's teardown runs before ours flushes, and writes its file then: it
    # waits until the callback has tried to stage the checkpoint, so that the staging
    # cannot find a file written late.
    failed = threading.Event()

    class Failures:
        def on_artifact_saved(self, event: Any) -> None:
            raise AssertionError(f"{event.key} was persisted")

        def on_artifact_failed(self, event: Any) -> None:
            failed.set()

    callback.add_artifact_observer(Failures())  # type: ignore[arg-type]

    def after_the_failure() -> None:
        assert failed.wait(timeout=120), "staging the checkpoint never failed"

    io.before_writing = after_the_failure
    trainer = make_trainer(tmp_path, [callback], max_steps=1, plugins=[io])
    with pytest.raises(PersistenceError) as raised:
        trainer.fit(TinyModel(scores=SCORES), loader(1))
    message = str(raised.value)
    assert "epoch=0-step=1.ckpt did not exist when it was to be persisted" in message
    assert "AsyncCheckpointIO(YourIO())" in message and "write before it returns" in message
    assert store.keys() == set()
    # The CheckpointIO wrote it at its teardown; the file is kept.
    assert checkpoint_files(tmp_path / "ckpts") == {"epoch=0-step=1.ckpt"}


class ArchivingCheckpointIO(TorchCheckpointIO):
    """A user's CheckpointIO that moves evicted checkpoints into an archive folder."""

    def __init__(self, archive: Path) -> None:
        super().__init__()
        self.archive = archive
        self.removals: list[tuple[str, bool]] = []  # (name, whether the file was there)

    def remove_checkpoint(self, path: Any) -> None:
        _archive(self.archive, self.removals, path)


def _archive(archive: Path, removals: list[tuple[str, bool]], path: Any) -> None:
    """Move the evicted file ``path`` into ``archive``; note whether it was there."""
    found = os.path.exists(path)
    removals.append((os.path.basename(path), found))
    if found:
        archive.mkdir(exist_ok=True)
        shutil.move(path, archive / os.path.basename(path))


def _fit_plain_and_ours(
    tmp_path: Path, width: int, make: Callable[[str], dict[str, Any]], **knobs: Any
) -> dict[str, tuple[Any, MemoryStore, Path]]:
    """The same 6-step top-2 fit of SCORES with ModelCheckpoint (``plain``) and ours, each
    with the trainer options ``make(name)`` gives (a plugin, a strategy); per name, the
    callback, our store (empty for ``plain``) and the checkpoint folder."""
    out = {}
    for name in ("plain", "ours"):
        dirpath = tmp_path / name / "ckpts"
        options: dict[str, Any] = {
            "dirpath": dirpath,
            "monitor": "score",
            "save_top_k": 2,
            "every_n_train_steps": 1,
        }
        store = MemoryStore()
        callback = (
            ModelCheckpoint(**options)
            if name == "plain"
            else MemoryCheckpoint(store, **options, **knobs)
        )
        trainer = make_trainer(tmp_path / name, [callback], max_steps=6, **make(name))
        trainer.fit(TinyModel(width=width, scores=SCORES), loader(6, width=width))
        out[name] = (callback, store, dirpath)
    return out


def test_a_checkpoint_io_that_archives_evicted_files_finds_them_as_with_model_checkpoint(
    tmp_path: Path,
) -> None:
    """A user's ``remove_checkpoint`` is handed the evicted file, as ModelCheckpoint hands
    it (only Lightning's own removal lets the callback move it aside first), and every
    kept checkpoint still persists. Large files: their staged copies are hard links."""
    ios = {name: ArchivingCheckpointIO(tmp_path / name / "archive") for name in ("plain", "ours")}
    fits = _fit_plain_and_ours(tmp_path, 512, lambda name: {"plugins": [ios[name]]})
    seen = {
        name: (io.removals, sorted(p.name for p in io.archive.iterdir()), checkpoint_files(d))
        for (name, io), (_, _, d) in zip(ios.items(), fits.values(), strict=True)
    }
    callback, store, _ = fits["ours"]
    assert seen["ours"] == seen["plain"]
    removals = seen["ours"][0]
    assert len(removals) == 3 and all(found for _, found in removals)
    assert isinstance(callback, MemoryCheckpoint) and callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class HeldArchivingCheckpointIO(ArchivingCheckpointIO):
    """Archives evicted checkpoints; from its ``held_from``-th write on, each write waits
    for a permit (at most 20 s), which the callback's wait for it hands out (see
    :func:`_hand_out_permits`): every eviction is decided while its replacement is still
    being written in the background, and the callback must wait for it to go on."""

    def __init__(self, archive: Path, held_from: int) -> None:
        super().__init__(archive)
        self.held_from, self.writes = held_from, 0
        self.permits = threading.Semaphore(0)
        self.unheld: list[int] = []  # writes whose permit never came
        self.removed_on: set[str] = set()

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self.writes += 1
        if self.writes >= self.held_from and not self.permits.acquire(timeout=20):
            self.unheld.append(self.writes)
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.removed_on.add(threading.current_thread().name)
        super().remove_checkpoint(path)


def _hand_out_permits(callback: MemoryCheckpoint, io: HeldArchivingCheckpointIO) -> list[str]:
    """Make the callback's wait for a replacement's write (at an eviction) hand ``io`` the
    permit that write waits for; returns the names of the files evicted meanwhile."""
    evictions = callback._evictions
    replacement_for = evictions.replacement_for
    waited: list[str] = []

    def handing_out(evicted: str, *, wait: bool = False) -> Any:
        current = evictions._current
        if wait and current is not None and not current.write.done():
            waited.append(os.path.basename(evicted))
            io.permits.release()
        return replacement_for(evicted, wait=wait)

    evictions.replacement_for = handing_out  # type: ignore[method-assign]
    return waited


def test_a_checkpoint_io_that_archives_evicted_files_written_in_the_background_gets_them(
    tmp_path: Path,
) -> None:
    """A user's ``remove_checkpoint`` is handed every evicted checkpoint, on the training
    thread, as ModelCheckpoint hands it, also when the checkpoint it was evicted for is
    still being written by Lightning's ``AsyncCheckpointIO`` around the user's CheckpointIO:
    the callback waits for that write, then hands the file over. Before, the pipeline
    deleted such a file itself (the archive lacked it), and then, for a while, called the
    user's code later on its own thread (under DDP a strategy's collective there hung).
    Top 2 of SCORES: saves 3, 4 and 5 each evict one, while their own writes are held."""
    io_plain = ArchivingCheckpointIO(tmp_path / "plain" / "archive")
    options: dict[str, Any] = {"monitor": "score", "save_top_k": 2, "every_n_train_steps": 1}
    plain = ModelCheckpoint(dirpath=tmp_path / "plain" / "ckpts", **options)
    trainer = make_trainer(tmp_path / "plain", [plain], max_steps=6, plugins=[io_plain])
    trainer.fit(TinyModel(width=512, scores=SCORES), loader(6, width=512))

    store = MemoryStore()
    io = HeldArchivingCheckpointIO(tmp_path / "ours" / "archive", held_from=3)
    callback = MemoryCheckpoint(store, dirpath=tmp_path / "ours" / "ckpts", **options)
    waited = _hand_out_permits(callback, io)
    trainer = make_trainer(
        tmp_path / "ours", [callback], max_steps=6, plugins=[AsyncCheckpointIO(io)]
    )
    trainer.fit(TinyModel(width=512, scores=SCORES), loader(6, width=512))

    assert io.unheld == [] and len(waited) == 3  # each eviction waited for its replacement
    assert io.removals == io_plain.removals and len(io.removals) == 3
    assert all(found for _, found in io.removals)
    assert sorted(p.name for p in io.archive.iterdir()) == sorted(n for n, _ in io.removals)
    assert io.removed_on == {threading.main_thread().name}
    assert checkpoint_files(tmp_path / "ours" / "ckpts") == checkpoint_files(
        tmp_path / "plain" / "ckpts"
    )
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class ArchivingStrategy(SingleDeviceStrategy):
    """A user's strategy that moves evicted checkpoints into an archive folder."""

    def __init__(self, archive: Path) -> None:
        super().__init__(device=torch.device("cpu"))
        self.archive = archive
        self.removals: list[tuple[str, bool]] = []
        self.removed_on: set[str] = set()

    def remove_checkpoint(self, filepath: Any) -> None:
        self.removed_on.add(threading.current_thread().name)
        _archive(self.archive, self.removals, filepath)


def test_a_strategy_that_archives_evicted_files_gets_them_with_async_write(
    tmp_path: Path,
) -> None:
    """``async_write=True`` with a strategy of the user's overriding ``remove_checkpoint``:
    it is handed every evicted checkpoint, as with ModelCheckpoint, whether or not the
    replacement's background write was finished at the eviction."""
    strategies = {
        name: ArchivingStrategy(tmp_path / name / "archive") for name in ("plain", "ours")
    }
    fits = _fit_plain_and_ours(
        tmp_path, 512, lambda name: {"strategy": strategies[name]}, async_write=True
    )
    seen = {
        name: (s.removals, sorted(p.name for p in s.archive.iterdir()), checkpoint_files(d))
        for (name, s), (_, _, d) in zip(strategies.items(), fits.values(), strict=True)
    }
    callback, store, _ = fits["ours"]
    strategy = strategies["ours"]
    assert seen["ours"] == seen["plain"]
    assert len(seen["ours"][0]) == 3 and all(found for _, found in seen["ours"][0])
    assert strategy.removed_on == {threading.main_thread().name}  # as ModelCheckpoint's
    assert isinstance(callback, MemoryCheckpoint) and callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


def test_a_checkpoint_io_whose_class_lacks_its_methods_is_used_as_with_model_checkpoint(
    tmp_path: Path,
) -> None:
    """A CheckpointIO whose methods live on the instance, not on its class (Lightning's
    own tests pass ``MagicMock(wraps=io, spec=...)``), is called as ModelCheckpoint calls
    it: every save and every removal goes through it, and nothing raises. The callback
    looks up its methods on the object, as Lightning calls them."""
    ios = {
        name: MagicMock(wraps=TorchCheckpointIO(), spec=TorchCheckpointIO)
        for name in ("plain", "ours")
    }
    fits = _fit_plain_and_ours(tmp_path, 4, lambda name: {"plugins": [ios[name]]})
    seen = {}
    for name, io in ios.items():
        removed = sorted(os.path.basename(c.args[0]) for c in io.remove_checkpoint.call_args_list)
        seen[name] = (io.save_checkpoint.call_count, removed, checkpoint_files(fits[name][2]))
    callback, store, _ = fits["ours"]
    assert seen["ours"] == seen["plain"]
    assert seen["ours"][0] > 0 and seen["ours"][1]
    assert isinstance(callback, MemoryCheckpoint) and callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class FailingHeldWrite(TorchCheckpointIO):
    """``torch.save``, but the ``nth`` write of a file named ``name`` (``*``: any) fails
    as on a full disk, writing nothing: ``held``, once :attr:`gate` opens; else at once."""

    def __init__(self, name: str, nth: int, *, held: bool = True, partial: bool = False) -> None:
        super().__init__()
        self.name, self.nth, self.seen, self.held = name, nth, 0, held
        self.partial = partial  # the failing write leaves part of a file, as in place
        self.gate = threading.Event()
        self.failed = threading.Event()
        # Set by the training thread once Lightning's save_checkpoint returned (see
        # _failing_io_trainer): a quick failure waits for it, or AsyncCheckpointIO finds
        # the failure right after queuing the write and raises it out of that very save.
        self.save_returned: threading.Event | None = None

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        if Path(path).name == self.name or (self.name == "*" and Path(path).suffix == ".ckpt"):
            self.seen += 1
            if self.seen == self.nth:
                if self.held:
                    assert self.gate.wait(60), "the gate never opened"
                if self.save_returned is not None:
                    assert self.save_returned.wait(60), "the save never returned"
                if self.partial:
                    Path(path).write_bytes(b"PK\x03\x04 cut short")
                self.failed.set()
                raise OSError(errno.ENOSPC, "No space left on device")
        super().save_checkpoint(checkpoint, path, storage_options)


class OpenAtTrainEnd(pl.Callback):
    """Opens the held write once training ended: Lightning's saves (and evictions) in
    its favour all returned while it was pending."""

    def __init__(self, io: FailingHeldWrite) -> None:
        self.io = io

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.io.gate.set()


class WaitsForTheFailure(Logger):
    """A logger whose ``after_save_checkpoint`` (Lightning calls it inside the save, on the
    training thread) waits, at its ``at_call``-th call, until the write has failed: the
    failure is over before the callback looks at the write."""

    def __init__(self, io: FailingHeldWrite, at_call: int) -> None:
        super().__init__()
        self.io, self.at_call, self.calls = io, at_call, 0

    @property
    def name(self) -> str:
        return "waits"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            if self.io.save_returned is not None:
                self.io.save_returned.set()
            assert self.io.failed.wait(60), "the write never failed"


def _failing_io_trainer(
    tmp_path: Path, callback: Any, io: FailingHeldWrite, failing_call: int
) -> pl.Trainer:
    """A trainer writing through ``AsyncCheckpointIO(io)``: a held failure ends after the
    saves in its favour returned; a quick one before its save returned."""
    extra: dict[str, Any] = {}
    if not io.held:
        io.save_returned = threading.Event()
        extra["logger"] = WaitsForTheFailure(io, failing_call)
    return make_trainer(
        tmp_path,
        [OpenAtTrainEnd(io), callback],
        max_steps=3,
        plugins=[AsyncCheckpointIO(io)],
        **extra,
    )


def _fit_top_1_whose_third_write_fails(
    tmp_path: Path, io: FailingHeldWrite
) -> tuple[MemoryStore, Path, MemoryCheckpoint]:
    """Top 1 of three ever better saves through ``AsyncCheckpointIO(io)``; ``io`` fails
    the third write, which ``fit`` raises."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = _folder_callback(store, dirpath, save_top_k=1, save_last=False)
    trainer = _failing_io_trainer(tmp_path, callback, io, failing_call=3)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(TinyModel(scores=[5.0, 4.0, 3.0]), loader(3))
    return store, dirpath, callback


@pytest.mark.parametrize("form", ["fails-later", "fails-at-once", "cut-short"])
def test_an_async_checkpoint_io_write_that_fails_never_costs_the_checkpoint_it_replaced(
    form: str, tmp_path: Path
) -> None:
    """Top 1, each save better than the last: step 3's write (queued by AsyncCheckpointIO)
    fails, after Lightning evicted step 2 in its favour or before its save returned.
    Step 2 was removed at once, from the folder and the store, leaving nothing; the
    eviction waits for its replacement now, and is dropped, and Lightning's state names
    step 2 again. ``cut-short``: the failing write (a user's CheckpointIO that writes in
    place, on a full disk) left part of its file; the eviction looked only for the file,
    found it, and deleted step 2. It asks the write now."""
    io = FailingHeldWrite("*", nth=3, held=form != "fails-at-once", partial=form == "cut-short")
    store, dirpath, callback = _fit_top_1_whose_third_write_fails(tmp_path, io)

    assert io.seen == 3
    left = {"epoch=0-step=2.ckpt"} | ({"epoch=0-step=3.ckpt"} if form == "cut-short" else set())
    assert checkpoint_files(dirpath) == left  # the cut-short file is the writer's to delete
    assert store.keys(kind="checkpoint") == {"checkpoints/epoch=0-step=2.ckpt"}
    assert set(callback.best_k_models) == {str(dirpath / "epoch=0-step=2.ckpt")}
    assert callback.best_model_path == str(dirpath / "epoch=0-step=2.ckpt")


class ArchivingFailingWrite(FailingHeldWrite):
    """:class:`FailingHeldWrite` whose ``remove_checkpoint`` archives evicted files."""

    def __init__(self, archive: Path, **kwargs: Any) -> None:
        super().__init__("*", nth=3, **kwargs)
        self.archive = archive
        self.removals: list[str] = []

    def remove_checkpoint(self, path: Any) -> None:
        self.removals.append(os.path.basename(path))
        self.archive.mkdir(exist_ok=True)
        shutil.move(path, self.archive / os.path.basename(path))


@pytest.mark.parametrize("partial", [False, True], ids=["writes-nothing", "writes-part"])
def test_a_user_removal_is_not_handed_the_checkpoint_whose_replacement_failed(
    tmp_path: Path, partial: bool
) -> None:
    """As above, with a CheckpointIO of the user's that archives evicted files: step 3's
    write fails (leaving nothing, or part of its file), so step 2, evicted in its favour,
    stays in the folder, in the store and in Lightning's state; the user's removal is
    handed only what was evicted for checkpoints that exist."""
    io = ArchivingFailingWrite(tmp_path / "archive", held=False, partial=partial)
    store, dirpath, callback = _fit_top_1_whose_third_write_fails(tmp_path, io)

    assert io.seen == 3
    assert io.removals == ["epoch=0-step=1.ckpt"]
    assert (dirpath / "epoch=0-step=2.ckpt").is_file()
    assert store.keys(kind="checkpoint") == {"checkpoints/epoch=0-step=2.ckpt"}
    assert callback.best_model_path == str(dirpath / "epoch=0-step=2.ckpt")


@pytest.mark.parametrize("held", [True, False], ids=["fails-later", "fails-at-once"])
def test_an_async_checkpoint_io_rewrite_of_last_that_fails_keeps_the_previous_last(
    held: bool, tmp_path: Path
) -> None:
    """``save_last=True``: the third rewrite of ``last.ckpt`` fails after the save returned.
    The previous ``last.ckpt`` went to the trash as soon as Lightning's call returned, so
    ``ckpt_path="last"`` found nothing; it waits aside now and comes back, as it does
    when a rewrite fails on the training thread, and as ``ModelCheckpoint`` keeps it."""
    import torch

    store = MemoryStore()
    io = FailingHeldWrite("last.ckpt", nth=3, held=held)
    dirpath = tmp_path / "ckpts"
    callback = _folder_callback(store, dirpath, save_top_k=-1)
    # Saves per step: the top-k file, then last.ckpt; the third last.ckpt is the 6th.
    trainer = _failing_io_trainer(tmp_path, callback, io, failing_call=6)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(TinyModel(scores=[5.0, 4.0, 3.0]), loader(3))

    assert io.seen == 3
    last = dirpath / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=False)["global_step"] == 2


def test_a_hook_raising_during_an_async_checkpoint_io_rewrite_of_last_leaves_nothing_aside(
    tmp_path: Path,
) -> None:
    """The previous ``last.ckpt`` waits aside for the rewrite's write; a feature hook raised
    before that save's job was submitted, and the put-back went with the job: the file
    stayed aside for the rest of the process. It is put back (or trashed) on its own now,
    and the next fit with the same callback finds the folder in order."""

    class RaisingOnceOnLast(MemoryCheckpoint):
        raised = False

        def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
            last = snapshot.key.endswith("last.ckpt")
            if last and trainer.global_step == 2 and not self.raised:
                self.raised = True
                raise ValueError("feature lookup failed (once)")
            return super().collect_checkpoint_feature_values(trainer, snapshot)

    import torch

    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = RaisingOnceOnLast(
        store, dirpath=dirpath, save_top_k=1, every_n_train_steps=1, save_last=True
    )

    def fit() -> None:
        trainer = make_trainer(
            tmp_path, [callback], max_steps=4, plugins=[AsyncCheckpointIO(TorchCheckpointIO())]
        )
        trainer.fit(TinyModel(scores=SCORES), loader(4))

    with pytest.raises(ValueError, match="once"):
        fit()
    fit()

    aside = staging_root(dirpath) / "aside"
    left = (
        [p.name for p in aside.iterdir() if not p.name.endswith(".lock")] if aside.exists() else []
    )
    assert left == []
    assert torch.load(dirpath / "last.ckpt", weights_only=False)["global_step"] == 4
    # Every file in the folder has its artifact and no artifact outlives its file. Where
    # the first fit's exception came before the write of a checkpoint whose save evicted
    # an older one (an order a loaded machine produces), the older one is kept, file and
    # artifact (a removal never runs before its replacement exists), though Lightning's
    # state no longer names it: so Lightning's kept set is contained, not equal.
    stored = store.keys(kind="checkpoint")
    assert stored == {
        callback.resolve_artifact_key(callback._trainer, dirpath / name, "checkpoint")
        for name in checkpoint_files(dirpath)
    }
    assert stored >= {
        callback.resolve_artifact_key(callback._trainer, p, "checkpoint")
        for p in lightning_kept_paths(callback)
    }


# -- save_last="link" with a CheckpointIO that writes after it returns ------------------------


class HoldingIO(TorchCheckpointIO):
    """Lightning's write, where the write of the file named ``hold`` (if any) waits for
    ``gate`` (at most 60 s; ``timed_out`` then says so). ``written`` gets each file's name
    once it is written, on the writer's thread."""

    def __init__(self, hold: str | None = None) -> None:
        super().__init__()
        self.hold = hold
        self.gate = threading.Event()
        self.timed_out = False
        self.written: list[str] = []

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        if Path(path).name == self.hold:
            self.timed_out = not self.gate.wait(60)
        super().save_checkpoint(checkpoint, path, storage_options)
        self.written.append(Path(path).name)


def test_an_async_checkpoint_io_link_names_the_previous_checkpoint_until_the_new_one_is_written(
    tmp_path: Path,
) -> None:
    """AsyncCheckpointIO, save_last="link", top 1: step 2's write is held. The link was made
    at once, to a file that did not exist yet: a process killed meanwhile left last.ckpt
    dangling (its step 1 target evicted in the new file's favour), and ckpt_path="last"
    started training afresh. It names step 1 until step 2 is written, then step 2."""
    io = HoldingIO(hold="epoch=0-step=2.ckpt")
    dirpath = tmp_path / "ckpts"
    store = MemoryStore()
    callback = _folder_callback(store, dirpath, save_top_k=1, save_last="link")
    last = dirpath / "last.ckpt"
    seen: dict[str, Any] = {}

    def look() -> None:  # step 2 saved, its write held
        seen["target"] = os.readlink(last) if last.is_symlink() else None
        seen["exists"] = last.exists()
        io.gate.set()

    class StepOneDone(pl.Callback):  # step 1 written (its link made) before step 2
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 1:
                assert callback.flush(timeout=60)

    trainer = make_trainer(
        tmp_path,
        [StepOneDone(), OnTrainEnd(look), callback],
        max_steps=2,
        plugins=[AsyncCheckpointIO(io)],
    )
    trainer.fit(TinyModel(scores=[5.0, 4.0]), loader(2))

    assert not io.timed_out
    assert seen == {"target": "epoch=0-step=1.ckpt", "exists": True}
    assert os.readlink(last) == "epoch=0-step=2.ckpt"
    assert checkpoint_files(dirpath) == {"epoch=0-step=2.ckpt", "last.ckpt"}
    assert callback.persistence_stats.failed == 0
    assert store.keys(kind="checkpoint") == {"checkpoints/epoch=0-step=2.ckpt"}


def test_a_last_ckpt_written_by_lightning_is_staged_before_a_link_replaces_it_and_its_artifact_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncCheckpointIO, save_last="link", top 1, resumed from last.ckpt: the resumed fit's
    first save is no top-k one, so Lightning writes a real last.ckpt; at the next save it
    links last.ckpt to the new best. The link replaced the file before its job staged
    it: the job failed (FileNotFoundError) and training stopped with PersistenceError,
    or the job read the link's target instead. It is staged first; and as the file is
    gone once the link stands (a link gets no artifact), its artifact goes too (it
    stayed, holding step 3, under the key of a link to step 4)."""
    dirpath = tmp_path / "ckpts"
    linked = threading.Event()  # the resumed fit asked for the link (step 4)

    io = HoldingIO(hold="epoch=0-step=4.ckpt")  # the link's target: written once asked for

    class Linking(MemoryCheckpoint):  # one class: the resumed fit restores its state
        def _link_checkpoint(self, trainer: Any, filepath: str, linkpath: str) -> None:
            super()._link_checkpoint(trainer, filepath, linkpath)
            linked.set()
            io.gate.set()

    options: dict[str, Any] = {
        "dirpath": dirpath,
        "monitor": "score",
        "every_n_train_steps": 1,
        "save_top_k": 1,
        "save_last": "link",
        "max_pending": 16,  # the held staging must not hold the training thread back
    }
    make_trainer(
        tmp_path,
        [Linking(MemoryStore(), **options)],
        max_steps=2,
        plugins=[AsyncCheckpointIO(TorchCheckpointIO())],
    ).fit(TinyModel(scores=[5.0, 4.0]), loader(4))
    linked.clear()
    io.gate.clear()  # opened by the first fit's links

    real_stage = Stager.stage
    waited: list[bool] = []

    def stage(self: Stager, path: Any, staged: Any = None) -> Any:
        if Path(path).name == "last.ckpt":  # staged once the link was asked for
            waited.append(linked.wait(60))
        return real_stage(self, path, staged)

    monkeypatch.setattr(Stager, "stage", stage)
    store = MemoryStore(keep_bytes=True)
    callback = Linking(store, **options)
    make_trainer(tmp_path, [callback], max_steps=4, plugins=[AsyncCheckpointIO(io)]).fit(
        TinyModel(scores=[5.0, 4.0, 6.0, 3.0]), loader(4), ckpt_path=str(dirpath / "last.ckpt")
    )

    assert io.written == ["last.ckpt", "epoch=0-step=4.ckpt"] and not io.timed_out
    assert waited == [True]
    assert callback.persistence_stats.failed == 0
    assert store.get("checkpoints/last.ckpt") is None
    assert store.keys(kind="checkpoint") == {"checkpoints/epoch=0-step=4.ckpt"}
    assert checkpoint_files(dirpath) == {"epoch=0-step=4.ckpt", "last.ckpt"}
    assert os.readlink(dirpath / "last.ckpt") == "epoch=0-step=4.ckpt"


def test_a_last_ckpt_file_a_link_replaced_loses_its_artifact_while_lightning_relinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed with save_last="link" from a fit that wrote last.ckpt as a file: the first
    link replaces the file, whose artifact goes once the link stands. Lightning makes the
    link again at every later save, removing it first: a removal committed in that
    instant found no link, took it for one never made, and kept the old artifact
    ("keeping 'checkpoints/last.ckpt': the checkpoint saved in its place was never
    written"), so the store's last.ckpt held the first fit's checkpoint for good. Seen on
    a loaded machine (the committer a step behind); here the uploads are held until that
    instant."""
    from lamin_lightning import _lightning_view
    from lamin_lightning._staging import remove_path

    dirpath = tmp_path / "ckpts"
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "monitor": "score",
        "every_n_train_steps": 1,
        "save_top_k": 1,
    }
    scores = [5.0, 4.0, 3.0, 2.0]  # every save is the best: a link at each save
    store = MemoryStore()
    make_trainer(tmp_path, [MemoryCheckpoint(store, save_last=True, **options)], max_steps=2).fit(
        TinyModel(scores=scores), loader(4)
    )
    assert not os.path.islink(dirpath / "last.ckpt") and store.get("checkpoints/last.ckpt")

    # Uploads held until Lightning makes the link again (step 4): the removal that the
    # first link (step 3) asked for commits after step 3's upload, in submission order.
    callback = MemoryCheckpoint(store, save_last="link", max_pending=16, **options)
    store.hang()
    real = _lightning_view._link_or_copy
    links: list[str] = []
    flushed: list[bool] = []

    def link_or_copy(target: str, link: str) -> None:
        links.append(os.path.basename(target))
        if len(links) == 2:  # the link made again, as Lightning makes it: removed first
            remove_path(link)
            store.release()
            flushed.append(callback.flush(timeout=60))
        real(target, link)

    monkeypatch.setattr(_lightning_view, "_link_or_copy", link_or_copy)
    make_trainer(tmp_path, [callback], max_steps=4).fit(
        TinyModel(scores=scores), loader(4), ckpt_path=str(dirpath / "last.ckpt")
    )

    assert links == ["epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt"] and flushed == [True]
    assert os.readlink(dirpath / "last.ckpt") == "epoch=0-step=4.ckpt"
    assert store.get("checkpoints/last.ckpt") is None, "the first fit's last.ckpt stayed"
    assert store.keys(kind="checkpoint") == {"checkpoints/epoch=0-step=4.ckpt"}


@pytest.mark.parametrize("async_io", [False, True], ids=["sync-io", "async-checkpoint-io"])
def test_a_rewrite_of_last_whose_feature_hook_raised_is_persisted_as_lightning_wrote_it(
    async_io: bool, tmp_path: Path
) -> None:
    """``save_last=True``, the feature hook raising for ``last.ckpt`` at step 2: the fit
    raises it, and the artifact of ``last.ckpt`` holds what the file holds (step 2).
    Under AsyncCheckpointIO the rewrite (whose previous file waits aside) was abandoned:
    the artifact kept step 1 while the file held step 2."""
    import io as bytes_io

    import torch

    class RaisingOnLast(MemoryCheckpoint):
        def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
            if snapshot.key.endswith("last.ckpt") and trainer.global_step == 2:
                raise ValueError("feature lookup failed")
            return super().collect_checkpoint_feature_values(trainer, snapshot)

    store = MemoryStore(keep_bytes=True)
    dirpath = tmp_path / "ckpts"
    callback = RaisingOnLast(
        store, dirpath=dirpath, save_top_k=1, every_n_train_steps=1, save_last=True
    )
    plugins = [AsyncCheckpointIO(TorchCheckpointIO())] if async_io else None
    with pytest.raises(ValueError, match="feature lookup failed"):
        make_trainer(tmp_path, [callback], max_steps=4, plugins=plugins).fit(
            TinyModel(scores=[3.0, 2.0, 1.0, 0.5]), loader(4)
        )

    last = dirpath / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    stored = store.get("checkpoints/last.ckpt")
    assert stored is not None and stored.data is not None
    assert torch.load(bytes_io.BytesIO(stored.data), weights_only=False)["global_step"] == 2
    assert stored.sha256 == content_sha256(last)
    aside = staging_root(dirpath) / "aside"
    assert not aside.exists() or [p for p in aside.iterdir() if p.suffix != ".lock"] == []


@pytest.mark.parametrize("through_a_link", [False, True], ids=["plain", "dirpath-via-symlink"])
def test_a_last_link_whose_target_async_checkpoint_io_rewrites_keeps_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through_a_link: bool
) -> None:
    """Three callbacks in one folder: the first saves shared.ckpt and links last.ckpt to it
    (save_last="link"), the second rewrites shared.ckpt, the third saves last with the
    version counter. ModelCheckpoint's link resolves throughout, so the third takes
    last-v1.ckpt. Under AsyncCheckpointIO the rewrite renames shared.ckpt aside until its
    write, late: the link dangled meanwhile, and the third wrote its file over the link as
    last.ckpt (randomized sweep, seed 21224 with AsyncCheckpointIO, 5 runs in 17: those
    where the rewrite was not written yet when the third looked). Here the second waits
    until the link is made, and the rewrite is held until the third saved. Also with a
    dirpath reached through a symlinked folder (macOS's /tmp, a cluster's scratch): the
    link's target is then known to the background write by that path, not the real one."""
    from lamin_lightning import _lightning_view

    linked, saved_last = threading.Event(), threading.Event()
    real_link = _lightning_view._link_or_copy

    def link_or_copy(target: str, link: str) -> None:
        real_link(target, link)
        linked.set()

    monkeypatch.setattr(_lightning_view, "_link_or_copy", link_or_copy)

    class HeldRewrite(TorchCheckpointIO):  # the second write of shared.ckpt waits
        def __init__(self) -> None:
            super().__init__()
            self.writes = 0
            self.timed_out = False

        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            if Path(path).name == "shared.ckpt":
                self.writes += 1
                if self.writes == 2:
                    self.timed_out = not saved_last.wait(60)
            super().save_checkpoint(checkpoint, path, storage_options)

    shared: dict[str, Any] = {
        "filename": "shared",
        "monitor": None,
        "enable_version_counter": False,
        "every_n_train_steps": 1,
    }
    options: list[dict[str, Any]] = [
        {"save_top_k": 1, "save_last": "link", **shared},
        {"save_top_k": -1, "mode": "max", **shared},  # a state key of its own
        {"save_top_k": 0, "save_last": True, "monitor": "score", "every_n_train_steps": 1},
    ]

    def listing(dirpath: Path) -> dict[str, str]:
        return {p.name: os.readlink(p) if p.is_symlink() else "" for p in dirpath.glob("*.ckpt")}

    plain_dir = tmp_path / "plain"
    plain = [ModelCheckpoint(dirpath=plain_dir, **o) for o in options]
    make_trainer(tmp_path, plain, max_steps=1).fit(TinyModel(scores=[1.0]), loader(2))

    root, dirpath = tmp_path, tmp_path / "ours"
    if through_a_link:  # no dirpath: Lightning's is default_root_dir's, not resolved
        (tmp_path / "real").mkdir()
        (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
        root = tmp_path / "via"
        dirpath = root / "checkpoints"
    where = {} if through_a_link else {"dirpath": dirpath}
    store = MemoryStore()

    class Rewriter(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            assert linked.wait(60), "last.ckpt was never linked to shared.ckpt"
            super()._save_checkpoint(trainer, filepath)

    class SavesLast(MemoryCheckpoint):
        def _save_last_checkpoint(self, trainer: pl.Trainer, candidates: Any) -> None:
            try:
                super()._save_last_checkpoint(trainer, candidates)
            finally:
                saved_last.set()

    ours = [
        MemoryCheckpoint(store, **where, **options[0]),
        Rewriter(store, **where, **options[1]),
        SavesLast(store, **where, **options[2]),
    ]
    io = HeldRewrite()
    make_trainer(root, ours, max_steps=1, plugins=[AsyncCheckpointIO(io)]).fit(
        TinyModel(scores=[1.0]), loader(2)
    )

    assert not io.timed_out and io.writes == 2
    assert listing(plain_dir) == {
        "shared.ckpt": "",
        "last.ckpt": "shared.ckpt",
        "last-v1.ckpt": "",
    }
    assert listing(dirpath) == listing(plain_dir)
    assert [Path(c.last_model_path).name for c in ours] == ["last.ckpt", "", "last-v1.ckpt"]
    assert [Path(c.last_model_path).name for c in plain] == ["last.ckpt", "", "last-v1.ckpt"]


def test_a_link_to_a_checkpoint_evicted_meanwhile_frees_its_name_as_in_lightning(
    tmp_path: Path,
) -> None:
    """save_last="link", top 1, resumed from step 1 (whose state names no last path yet).
    Step 2 evicts step 1, and ModelCheckpoint's last.ckpt, linking to step 1, dangles: its
    name is free and the new link takes it. Under AsyncCheckpointIO the eviction waits for
    step 2's write, so last.ckpt still resolved and Lightning named the link last-v1.ckpt,
    leaving last.ckpt dangling for good (a later resume from it started over)."""

    def fits(dirpath: Path, make: Any, plugins: Any) -> list[tuple[str, str]]:
        make_trainer(tmp_path, [make(dirpath)], max_steps=1, plugins=plugins()).fit(
            TinyModel(scores=[5.0, 4.0, 3.0]), loader(8)
        )
        make_trainer(tmp_path, [make(dirpath)], max_steps=3, plugins=plugins()).fit(
            TinyModel(scores=[5.0, 4.0, 3.0]), loader(8), ckpt_path=str(dirpath / "last.ckpt")
        )
        return sorted(
            (p.name, os.readlink(p) if p.is_symlink() else "") for p in dirpath.glob("*.ckpt")
        )

    options: dict[str, Any] = {
        "monitor": "score",
        "save_top_k": 1,
        "save_last": "link",
        "every_n_train_steps": 1,
    }
    plain = fits(tmp_path / "plain", lambda d: ModelCheckpoint(dirpath=d, **options), lambda: None)
    io = HoldingIO(hold="epoch=0-step=2.ckpt")
    store = MemoryStore()
    held = {"done": False}

    def held_io() -> Any:  # the resumed fit's first write is held until training ends
        if held["done"]:
            io.gate.clear()  # opened at the end of the first fit
            return [AsyncCheckpointIO(io)]
        held["done"] = True
        return [AsyncCheckpointIO(TorchCheckpointIO())]

    class Releasing(MemoryCheckpoint):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            io.gate.set()
            super().on_train_end(trainer, pl_module)

    ours = fits(tmp_path / "ours", lambda d: Releasing(store, dirpath=d, **options), held_io)

    assert not io.timed_out
    assert plain == [("epoch=0-step=3.ckpt", ""), ("last.ckpt", "epoch=0-step=3.ckpt")]
    assert ours == plain


def test_a_write_queued_by_async_checkpoint_io_as_it_raised_an_earlier_error_is_persisted(
    tmp_path: Path,
) -> None:
    """save_last=True, top 1: step 2's top-k write fails at once; Lightning's next call,
    the rewrite of last.ckpt, queues its write and then raises that stored error. The
    rewrite counted as failed: the previous last.ckpt was put back, and the queued write
    replaced it on disk with step 2, which no job followed (its artifact stayed at step 1,
    or the put-back won and the file on disk went back). The queued write is followed:
    the file it writes is persisted by the flush at exit."""
    import io as bytes_io

    import torch

    io = FailingHeldWrite("*", nth=3, held=False)  # writes: step-1, last, step-2, last

    class WaitsBeforeLast(MemoryCheckpoint):
        def _save_last_checkpoint(self, trainer: Any, candidates: Any) -> None:
            if trainer.global_step == 2:  # the failure is stored before the rewrite
                assert io.failed.wait(60)
            super()._save_last_checkpoint(trainer, candidates)

    store = MemoryStore(keep_bytes=True)
    dirpath = tmp_path / "ckpts"
    callback = WaitsBeforeLast(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=1,
        save_last=True,
        every_n_train_steps=1,
    )
    with pytest.raises(OSError, match="No space left"):
        make_trainer(tmp_path, [callback], max_steps=3, plugins=[AsyncCheckpointIO(io)]).fit(
            TinyModel(scores=[5.0, 4.0, 3.0]), loader(3)
        )

    # Which save the failure stops depends on when the pipeline reports it (it may stop
    # step 2's rewrite before it starts): either way the artifact holds what the file does.
    last = dirpath / "last.ckpt"
    stored = store.get("checkpoints/last.ckpt")
    assert stored is not None and stored.data is not None
    assert stored.sha256 == content_sha256(last)
    on_disk = torch.load(last, weights_only=False)["global_step"]
    assert torch.load(bytes_io.BytesIO(stored.data), weights_only=False)["global_step"] == on_disk
    aside = staging_root(dirpath) / "aside"
    assert not aside.exists() or [p for p in aside.iterdir() if p.suffix != ".lock"] == []


def test_a_link_to_an_evicted_checkpoint_whose_removal_is_still_pending_frees_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with the replacement's write done and the evicted file's removal (on the
    pipeline's intake thread) not yet: last.ckpt still resolved, and the link was named
    last-v1.ckpt."""
    dirpath = tmp_path / "ckpt"
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "monitor": "score",
        "save_top_k": 1,
        "save_last": "link",
        "every_n_train_steps": 1,
    }
    named = threading.Event()  # step 2's link was named
    io = HoldingIO(hold="epoch=0-step=2.ckpt")  # held until step 1's eviction was deferred

    class WrittenFirst(MemoryCheckpoint):
        def _save_last_checkpoint(self, trainer: Any, candidates: Any) -> None:
            if trainer.global_step == 2:  # step 2 written; step 1's removal still pending
                io.gate.set()
                write = self._evictions.write_of(str(dirpath / "epoch=0-step=2.ckpt"))
                assert write is not None and write.wait(60)
            super()._save_last_checkpoint(trainer, candidates)
            named.set()

    make_trainer(  # the same class: the resumed fit restores its state
        tmp_path,
        [WrittenFirst(MemoryStore(), **options)],
        max_steps=1,
        plugins=[AsyncCheckpointIO(TorchCheckpointIO())],
    ).fit(TinyModel(scores=[5.0, 4.0, 3.0]), loader(8))
    named.clear()

    real_trash = Stager.trash

    def trash(self: Stager, path: Any) -> Any:
        if Path(path).name == "epoch=0-step=1.ckpt":
            assert named.wait(60), "the link was never named"
        return real_trash(self, path)

    monkeypatch.setattr(Stager, "trash", trash)

    callback = WrittenFirst(MemoryStore(), **options)
    make_trainer(tmp_path, [callback], max_steps=2, plugins=[AsyncCheckpointIO(io)]).fit(
        TinyModel(scores=[5.0, 4.0, 3.0]), loader(8), ckpt_path=str(dirpath / "last.ckpt")
    )

    assert not io.timed_out
    assert Path(callback.last_model_path).name == "last.ckpt"
    assert os.readlink(dirpath / "last.ckpt") == "epoch=0-step=2.ckpt"
    assert checkpoint_files(dirpath) == {"epoch=0-step=2.ckpt", "last.ckpt"}


def test_writes_queued_after_lightnings_teardown_give_their_names_back(tmp_path: Path) -> None:
    """Saves in ``on_fit_end`` run after Lightning's strategy teardown, on a new executor
    of AsyncCheckpointIO. Our teardown then gave the CheckpointIO back unwrapped while the
    writes were queued: no writer claimed them, and their names stayed taken for the rest
    of the process (Lightning's version counter, a replay's wait)."""
    from lamin_lightning import _names

    finals = [tmp_path / "final-1.ckpt", tmp_path / "final-2.ckpt"]
    release = threading.Event()

    class HeldAtTheEnd(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            if Path(path).name.startswith("final-"):
                assert release.wait(60)
            super().save_checkpoint(checkpoint, path, storage_options)

    class SaveAtEnd(pl.Callback):
        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            for path in finals:
                trainer.save_checkpoint(path)

    callback = _folder_callback(MemoryStore(), tmp_path / "ckpts")
    io = AsyncCheckpointIO(HeldAtTheEnd())
    trainer = make_trainer(tmp_path, [SaveAtEnd(), callback], max_steps=2, plugins=[io])
    trainer.fit(TinyModel(scores=SCORES), loader(2))
    release.set()
    io.teardown()  # waits for the queued writes

    assert all(path.exists() for path in finals)
    assert [_names.name_taken(path) for path in finals] == [False, False]


_SYNCED_REMOVAL_FIT = """
import os, sys, threading
sys.path.insert(0, {tests!r})
from lightning.pytorch.strategies import DDPStrategy
from helpers import TinyModel, loader, make_trainer
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore


class SyncedRemoval(DDPStrategy):
    def remove_checkpoint(self, filepath):
        print("removes", self.global_rank, os.path.basename(filepath),
              threading.current_thread() is threading.main_thread(), flush=True)
        self.barrier("remove")
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)


if __name__ == "__main__":
    root = sys.argv[1]
    callback = MemoryCheckpoint(MemoryStore(), dirpath=root + "/ckpts", monitor="score",
                                save_top_k=2, every_n_train_steps=1, async_write=True)
    strategy = SyncedRemoval(start_method="fork", process_group_backend="gloo")
    trainer = make_trainer(root, [callback], max_steps=6, devices=2, strategy=strategy)
    trainer.fit(TinyModel(width=512, scores={scores!r}), loader(12, width=512))
    if trainer.is_global_zero:
        print("kept", sorted(os.listdir(root + "/ckpts")), flush=True)
"""


def test_a_ddp_strategy_whose_removal_meets_the_other_ranks_is_called_on_every_training_thread(
    tmp_path: Path,
) -> None:
    """Under DDP with ``async_write``, a strategy of the user's whose ``remove_checkpoint``
    takes part in a collective (a barrier): every rank calls it on its training thread, as
    with ModelCheckpoint, also while rank zero's replacement is still being written. Rank
    zero called it later on the pipeline's intake thread for a while (the other ranks at
    once): the barrier never met, and the fit hung."""
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    tests = str(Path(__file__).parent)
    script.write_text(_SYNCED_REMOVAL_FIT.format(tests=tests, scores=SCORES))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    removes = [line.split() for line in done.stdout.splitlines() if line.startswith("removes")]
    evicted = ["epoch=0-step=1.ckpt", "epoch=0-step=3.ckpt", "epoch=0-step=2.ckpt"]
    for rank in ("0", "1"):
        assert [name for _, r, name, _ in removes if r == rank] == evicted
    assert all(on_main == "True" for *_, on_main in removes)
    assert "kept ['epoch=0-step=4.ckpt', 'epoch=0-step=5.ckpt']" in done.stdout


def test_an_eviction_waiting_for_a_file_renamed_aside_for_its_rewrite_still_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncCheckpointIO, top 1 without a monitor, every step, ``filename="{epoch}"`` and
    no version counter: the first save of an epoch evicts the previous epoch's file once
    the new one is written, and the next step rewrites the new one, renamed aside until
    that rewrite is written. The eviction ran on the intake thread meanwhile, found no
    file under the new name, and kept the evicted checkpoint (found by a randomized
    sweep, seed 20360 every run, and 20103 about 1 run in 20, where the eviction looked
    right after the rename, before the file was counted as away). Here the first write of
    the new file waits until the eviction is deferred, and the eviction runs right after
    the rename aside, before it returns."""
    from lamin_lightning import _submit

    deferred, moved, removed = threading.Event(), threading.Event(), threading.Event()
    real_move, real_call = _submit._aside.move_aside, _submit.RemovalOnceWritten.__call__
    real_init = _submit.RemovalOnceWritten.__init__

    class HeldFirstWrite(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            if os.path.basename(path) == "epoch=1.ckpt" and not moved.is_set():
                assert deferred.wait(20), "the eviction of epoch=0.ckpt was never deferred"
            super().save_checkpoint(checkpoint, path, storage_options)

    def init(self: Any, stager: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, stager, filepath, *args, **kwargs)
        if os.path.basename(filepath) == "epoch=0.ckpt":
            deferred.set()

    def move_aside(root: Path, filepath: Any) -> Path:
        aside = real_move(root, filepath)
        if os.path.basename(filepath) == "epoch=1.ckpt" and not moved.is_set():
            moved.set()
            assert removed.wait(20), "the eviction of epoch=0.ckpt never ran"
        return aside

    def call(self: Any) -> int:
        evicts_epoch_0 = os.path.basename(self._filepath) == "epoch=0.ckpt"
        try:
            if evicts_epoch_0:
                assert moved.wait(20), "epoch=1.ckpt was never renamed aside for its rewrite"
            return real_call(self)
        finally:
            if evicts_epoch_0:
                removed.set()

    monkeypatch.setattr(_submit._aside, "move_aside", move_aside)
    monkeypatch.setattr(_submit.RemovalOnceWritten, "__init__", init)
    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)
    options: dict[str, Any] = {
        "save_top_k": 1,
        "every_n_train_steps": 1,
        "filename": "{epoch}",
        "enable_version_counter": False,
    }
    store = MemoryStore()
    ours = MemoryCheckpoint(store, dirpath=tmp_path / "ours", **options)
    make_trainer(tmp_path, [ours], max_epochs=2, plugins=[AsyncCheckpointIO(HeldFirstWrite())]).fit(
        TinyModel(), loader(3)
    )
    assert deferred.is_set() and moved.is_set() and removed.is_set()
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **options)
    make_trainer(tmp_path, [plain], max_epochs=2).fit(TinyModel(), loader(3))

    assert (
        checkpoint_files(tmp_path / "ours")
        == checkpoint_files(tmp_path / "plain")
        == {"epoch=1.ckpt"}
    )
    assert store.keys(kind="checkpoint") == {"checkpoints/epoch=1.ckpt"}


def test_an_eviction_whose_replacement_a_later_eviction_removed_first_still_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncCheckpointIO, ``save_last=True`` with a last name that changes every step
    (``"last-{step}"``): step 2 evicts last-step=1.ckpt in favour of last-step=2.ckpt,
    not written yet, so its removal waits on the intake thread; step 3 evicts
    last-step=2.ckpt, its replacement written already, at once on the training thread.
    The waiting removal ran after that, found no last-step=2.ckpt, took it for a
    replacement never written and kept last-step=1.ckpt, which ModelCheckpoint removes
    (randomized sweep, seed 22145 with AsyncCheckpointIO, about 1 run in 40). A write
    that finished without failing wrote its file, whatever removed it since. Here the
    write of last-step=2.ckpt waits until the first eviction is deferred, step 3's
    eviction until last-step=3.ckpt is written, and the deferred removal until step 3's
    eviction is done."""
    from lamin_lightning import _submit

    deferred, evicted_2 = threading.Event(), threading.Event()
    real_init, real_call = _submit.RemovalOnceWritten.__init__, _submit.RemovalOnceWritten.__call__

    class HeldSecondWrite(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            if os.path.basename(path) == "last-step=2.ckpt":
                assert deferred.wait(20), "the eviction of last-step=1.ckpt was never deferred"
            super().save_checkpoint(checkpoint, path, storage_options)

    def init(self: Any, stager: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, stager, filepath, *args, **kwargs)
        if os.path.basename(filepath) == "last-step=1.ckpt":
            deferred.set()

    def call(self: Any) -> int:
        if os.path.basename(self._filepath) == "last-step=1.ckpt":
            assert evicted_2.wait(20), "last-step=2.ckpt was never evicted"
        return real_call(self)

    monkeypatch.setattr(_submit.RemovalOnceWritten, "__init__", init)
    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)

    class EvictsOnceWritten(MemoryCheckpoint):
        def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            if os.path.basename(filepath) != "last-step=2.ckpt":
                super()._remove_checkpoint(trainer, filepath)
                return
            current = self._evictions._current
            assert current is not None and current.write.wait(20), "last-step=3 never written"
            super()._remove_checkpoint(trainer, filepath)
            evicted_2.set()

    options: dict[str, Any] = {
        "save_top_k": 0,
        "save_last": True,
        "monitor": None,
        "every_n_train_steps": 1,
    }
    store = MemoryStore()
    ours = EvictsOnceWritten(store, dirpath=tmp_path / "ours", **options)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **options)
    for callback in (ours, plain):
        callback.CHECKPOINT_NAME_LAST = "last-{step}"
    make_trainer(tmp_path, [ours], max_steps=3, plugins=[AsyncCheckpointIO(HeldSecondWrite())]).fit(
        TinyModel(), loader(3)
    )
    assert deferred.is_set() and evicted_2.is_set()
    make_trainer(tmp_path, [plain], max_steps=3).fit(TinyModel(), loader(3))

    assert (
        checkpoint_files(tmp_path / "ours")
        == checkpoint_files(tmp_path / "plain")
        == {"last-step=3.ckpt"}
    )
    assert store.keys(kind="checkpoint") == {"checkpoints/last-step=3.ckpt"}


def test_an_eviction_waiting_for_its_replacement_waits_for_another_callbacks_save_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callbacks with ``async_write`` save one last name that changes every step
    (``"last-{step}"``, no version counter). Step 2's first callback evicts
    last-step=1.ckpt in favour of last-step=2.ckpt, not written yet, so the removal waits
    on its intake thread; the second callback's save of last-step=1.ckpt, which came
    first, is staged on its own intake thread. The removal went ahead of that staging,
    which found no file: "PersistenceError ... FileNotFoundError" out of fit, where
    ModelCheckpoint saves both and removes the file (randomized sweep, seed 13189: 24 of
    50 runs). The removal now waits for other callbacks' stagings of the file it removes,
    as one on the training thread does. Here the write of last-step=2.ckpt waits until
    the eviction is deferred, the removal until the second callback wrote
    last-step=1.ckpt, and that callback's staging of it until the removal ran, or
    waits."""
    from lamin_lightning import _local_write, _staging, _submit

    deferred, removal_ran_or_waits = threading.Event(), threading.Event()
    written_twice = threading.Event()  # last-step=1.ckpt, by the second callback too
    in_removal = threading.local()
    real_init, real_call = _submit.RemovalOnceWritten.__init__, _submit.RemovalOnceWritten.__call__
    real_wait, real_stage = _submit._Done.wait, _staging.Stager.stage
    real_write = _local_write.HostWrite._write
    removals: list[str] = []
    stagings: list[str] = []
    writes: list[str] = []

    def init(self: Any, stager: Any, filepath: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, stager, filepath, *args, **kwargs)
        if os.path.basename(filepath) == "last-step=1.ckpt":
            deferred.set()

    def call(self: Any) -> int:
        removals.append(os.path.basename(self._filepath))
        first = removals == ["last-step=1.ckpt"]
        if first:
            assert written_twice.wait(20), "the second write of last-step=1.ckpt never ran"
        in_removal.on = first
        try:
            return real_call(self)
        finally:
            in_removal.on = False
            if first:
                removal_ran_or_waits.set()

    def wait(self: Any, timeout: float | None = None) -> bool:
        if getattr(in_removal, "on", False):
            removal_ran_or_waits.set()  # waits for a staging: this callback's or another's
        return real_wait(self, timeout)

    def stage(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        stagings.append(os.path.basename(path))
        if stagings.count("last-step=1.ckpt") == 2 and stagings[-1] == "last-step=1.ckpt":
            assert removal_ran_or_waits.wait(20), "the deferred removal never ran"
        return real_stage(self, path, *args, **kwargs)

    def write(self: Any) -> None:
        if os.path.basename(self.filepath) == "last-step=2.ckpt" and not deferred.is_set():
            assert deferred.wait(20), "the eviction of last-step=1.ckpt was never deferred"
        real_write(self)
        writes.append(os.path.basename(self.filepath))
        if writes.count("last-step=1.ckpt") == 2:
            written_twice.set()

    monkeypatch.setattr(_submit.RemovalOnceWritten, "__init__", init)
    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)
    monkeypatch.setattr(_submit._Done, "wait", wait)
    monkeypatch.setattr(_staging.Stager, "stage", stage)
    monkeypatch.setattr(_local_write.HostWrite, "_write", write)

    options: dict[str, Any] = {
        "save_top_k": 0,
        "save_last": True,
        "monitor": None,
        "every_n_train_steps": 1,
        "enable_version_counter": False,
    }
    store = MemoryStore()
    modes = ("min", "max")  # two state keys, one file name
    ours = [
        MemoryCheckpoint(store, dirpath=tmp_path / "ours", async_write=True, mode=m, **options)
        for m in modes
    ]
    plain = [ModelCheckpoint(dirpath=tmp_path / "plain", mode=m, **options) for m in modes]
    for callback in (*ours, *plain):
        callback.CHECKPOINT_NAME_LAST = "last-{step}"
    make_trainer(tmp_path, list(ours), max_steps=2).fit(TinyModel(), loader(2))
    assert deferred.is_set() and removal_ran_or_waits.is_set()
    assert stagings.count("last-step=1.ckpt") == 2
    make_trainer(tmp_path, list(plain), max_steps=2).fit(TinyModel(), loader(2))

    assert (
        checkpoint_files(tmp_path / "ours")
        == checkpoint_files(tmp_path / "plain")
        == {"last-step=2.ckpt"}
    )
    assert store.keys(kind="checkpoint") == {"checkpoints/last-step=2.ckpt"}


@pytest.mark.parametrize("version_counter", [False, True], ids=["no-version-counter", "versions"])
@pytest.mark.parametrize("other_writes", ["in-the-background", "on-the-training-thread"])
def test_an_eviction_waiting_for_its_replacement_leaves_another_callbacks_later_save_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_writes: str, version_counter: bool
) -> None:
    """Two callbacks share a template whose names repeat (``"l-{score:.0f}"``). Step 2's
    save makes the first callback (``async_write``) evict l-score=1.ckpt in favour of
    l-score=0.ckpt, whose write is slow: the removal waits for it. Step 3's save makes
    the second callback save l-score=1.ckpt again. Without a version counter, the
    removal then deleted that newer file, where ModelCheckpoint removed the file before
    the second callback saved it: a save of the name now tells the waiting removal that
    the file it would delete is replaced. Here the write of l-score=0.ckpt waits until
    the second callback's file of step 3 is written. With it, the second callback found
    the name taken and saved l-score=1-v1.ckpt (its own earlier file's name, kept): a
    file another callback evicted now counts as gone, as one this callback evicted does
    (once the write it waits for is done: if that fails, the file stays). Here the write
    of l-score=0.ckpt waits until the second callback looks for l-score=1.ckpt."""
    from lamin_lightning import _local_write

    evicted, release = "l-score=1.ckpt", threading.Event()
    real_write = _local_write.HostWrite._write

    def write(self: Any) -> None:
        if os.path.basename(self.filepath) == "l-score=0.ckpt":
            assert release.wait(20), "the second callback never saved l-score=1.ckpt again"
        real_write(self)

    class SavesAgain(MemoryCheckpoint):
        def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
            if version_counter and trainer.global_step == 3 and filepath.endswith(evicted):
                release.set()
            return super().file_exists(filepath, trainer)

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            if trainer.global_step == 3 and not version_counter:
                write = self._evictions.write_of(filepath)
                assert write is None or write.wait(20), "the newer file was never written"
                release.set()

    monkeypatch.setattr(_local_write.HostWrite, "_write", write)
    options: dict[str, Any] = {
        "filename": "l-{score:.0f}",
        "monitor": "score",
        "save_top_k": 1,
        "every_n_train_steps": 1,
        "enable_version_counter": version_counter,
    }
    store = MemoryStore()
    ours = [
        MemoryCheckpoint(store, dirpath=tmp_path / "ours", async_write=True, mode="min", **options),
        SavesAgain(
            store,
            dirpath=tmp_path / "ours",
            async_write=other_writes == "in-the-background",
            mode="max",
            **options,
        ),
    ]
    plain = [ModelCheckpoint(dirpath=tmp_path / "plain", mode=m, **options) for m in ("min", "max")]
    scores = [1.0, 0.0, 1.2]
    make_trainer(tmp_path, list(ours), max_steps=3).fit(TinyModel(scores=scores), loader(3))
    assert release.is_set()
    make_trainer(tmp_path, list(plain), max_steps=3).fit(TinyModel(scores=scores), loader(3))

    assert (
        checkpoint_files(tmp_path / "ours")
        == checkpoint_files(tmp_path / "plain")
        == {"l-score=0.ckpt", evicted}
    )
    newer = torch.load(tmp_path / "ours" / evicted, weights_only=False)
    assert newer["global_step"] == 3, "the file is the second callback's save of step 3"
    assert store.keys(kind="checkpoint") == {"checkpoints/l-score=0.ckpt", f"checkpoints/{evicted}"}
    assert [ours[1].best_model_path, ours[0].best_model_path] == [
        str(tmp_path / "ours" / evicted),
        str(tmp_path / "ours" / "l-score=0.ckpt"),
    ]


def test_a_name_taken_again_after_another_callbacks_eviction_is_not_handed_out_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three callbacks share a template whose names repeat, with the version counter.
    Step 2's save makes the first (``async_write``) evict l-score=1.ckpt in favour of
    l-score=0.ckpt; its removal waits (here held until the end of step 3). At step 3 the
    second callback finds l-score=1.ckpt gone (the first evicted it) and saves it again,
    which tells the removal to leave the folder alone. The third then looked up the
    same name: the removal, still waiting, made it count as gone again, and the third
    callback wrote over the second's file, where ModelCheckpoint's third callback finds
    the second's file there and saves l-score=1-v1.ckpt. A removal told of a later save
    removes nothing: the name it holds is taken."""
    from lamin_lightning import _submit

    evicted, ended = "l-score=1.ckpt", threading.Event()
    real_call = _submit.RemovalOnceWritten.__call__

    def call(self: Any) -> int:
        if os.path.basename(self._filepath) == evicted:
            assert ended.wait(20), "step 3 never ended"
        return int(real_call(self))

    class Third(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            if trainer.global_step == 3:
                ended.set()

    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)
    options: dict[str, Any] = {
        "filename": "l-{score:.0f}",
        "monitor": "score",
        "save_top_k": 1,
        "every_n_train_steps": 1,
    }
    store = MemoryStore()
    folder = tmp_path / "ours"
    ours = [
        MemoryCheckpoint(store, dirpath=folder, async_write=True, mode="min", **options),
        MemoryCheckpoint(store, dirpath=folder, async_write=False, mode="max", **options),
        Third(store, dirpath=folder, async_write=False, mode="max", **options),
    ]

    class PlainThird(ModelCheckpoint):  # a state key of its own, as Third has
        pass

    plain = [
        ModelCheckpoint(dirpath=tmp_path / "plain", mode="min", **options),
        ModelCheckpoint(dirpath=tmp_path / "plain", mode="max", **options),
        PlainThird(dirpath=tmp_path / "plain", mode="max", **options),
    ]
    scores = [1.0, 0.0, 1.2]
    make_trainer(tmp_path, list(ours), max_steps=3).fit(TinyModel(scores=scores), loader(3))
    assert ended.is_set()
    make_trainer(tmp_path, list(plain), max_steps=3).fit(TinyModel(scores=scores), loader(3))

    assert [c.best_model_path for c in plain] == [
        str(tmp_path / "plain" / name) for name in ("l-score=0.ckpt", evicted, "l-score=1-v1.ckpt")
    ]
    assert [c.best_model_path for c in ours] == [
        str(tmp_path / "ours" / name) for name in ("l-score=0.ckpt", evicted, "l-score=1-v1.ckpt")
    ]
    assert checkpoint_files(tmp_path / "ours") == checkpoint_files(tmp_path / "plain")


def test_a_write_finished_on_the_training_thread_after_a_crash_is_not_deleted_by_a_waiting_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template whose names repeat (``"l-{tag:.0f}"``, ``async_write``). Step 2's save
    evicts l-tag=1.ckpt in favour of l-tag=0.ckpt; the removal waits on the intake
    thread (here held until the crash is handled). Step 3's save names l-tag=1.ckpt
    again; step 4 crashes. ``on_exception`` writes the unfinished background writes on
    the training thread (as ModelCheckpoint's files are there when fit returns), step
    3's file among them: the waiting removal, which ModelCheckpoint ran before that
    save, then deleted it. A write finished there tells such a removal, as a save does."""
    from lamin_lightning import _callback, _submit

    evicted, handled = "l-tag=1.ckpt", threading.Event()
    real_call, real_write_now = _submit.RemovalOnceWritten.__call__, _callback._write_now

    def call(self: Any) -> int:
        if os.path.basename(self._filepath) == evicted:
            assert handled.wait(20), "the crash was never handled"
        return int(real_call(self))

    def write_now(write: Any) -> None:
        real_write_now(write)
        if os.path.basename(write.filepath) == evicted:
            handled.set()

    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)
    monkeypatch.setattr(_callback, "_write_now", write_now)

    class Tagged(TinyModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.log("tag", [1.0, 0.0, 1.0, 0.0][self.global_step], on_step=True, on_epoch=False)
            return super().training_step(batch, batch_idx)

    options: dict[str, Any] = {
        "filename": "l-{tag:.0f}",
        "monitor": "score",
        "mode": "max",
        "save_top_k": 1,
        "every_n_train_steps": 1,
        "enable_version_counter": False,
    }
    scores = [1.0, 2.0, 3.0, 4.0]
    ours = MemoryCheckpoint(MemoryStore(), dirpath=tmp_path / "ours", async_write=True, **options)
    with pytest.raises(RuntimeError, match="boom at step 3"):
        make_trainer(tmp_path, [ours], max_steps=4).fit(
            Tagged(scores=scores, fail_at_step=3), loader(4)
        )
    assert handled.is_set()
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **options)
    with pytest.raises(RuntimeError, match="boom at step 3"):
        make_trainer(tmp_path, [plain], max_steps=4).fit(
            Tagged(scores=scores, fail_at_step=3), loader(4)
        )

    assert checkpoint_files(tmp_path / "plain") == {evicted}
    assert ours.best_model_path == str(tmp_path / "ours" / evicted)
    assert checkpoint_files(tmp_path / "ours") == {evicted}, "step 3's checkpoint was deleted"
    assert torch.load(tmp_path / "ours" / evicted, weights_only=False)["global_step"] == 3


def test_a_save_on_exception_written_at_once_comes_after_another_callbacks_save_of_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callbacks with ``async_write`` save one file name (no version counter): the
    second at step 1 (``every_n_train_steps=1``), the first on the exception of the next
    step (``save_on_exception``). ModelCheckpoint ends with the exception's checkpoint
    there. Ours wrote the first callback's save at once in ``on_exception`` (on the
    training thread, so that it is on disk when fit returns) without waiting for the
    second callback's earlier write of the name, still running: about 1 run in 2 the
    earlier save's file ended there (randomized sweep, seed 31243). The write now waits
    for other callbacks' earlier stagings of its file, whoever runs it. Here the second
    callback's write waits until the training thread waits for a staging after the
    exception, or writes the exception's checkpoint."""
    from lamin_lightning import _local_write, _submit

    armed, go, earlier_written = threading.Event(), threading.Event(), threading.Event()
    real_write, real_wait = _local_write.HostWrite._write, _submit._Done.wait
    lock, writes = threading.Lock(), []
    earlier_done_when_later_began: list[bool] = []

    def write(self: Any) -> None:
        with lock:
            writes.append(self)
            first = len(writes) == 1
        if first:
            assert go.wait(20), "the exception's save never came"
            real_write(self)
            earlier_written.set()
            return
        earlier_done_when_later_began.append(earlier_written.is_set())
        go.set()  # (the write did not wait: the earlier one may finish now, after it)
        real_write(self)

    def wait(self: Any, timeout: float | None = None) -> bool:
        if armed.is_set() and threading.current_thread() is threading.main_thread():
            go.set()  # the training thread waits for a staging after the exception
        return real_wait(self, timeout)

    class Arm(pl.Callback):  # runs before the checkpoint callbacks (Lightning orders them)
        def on_exception(self, *args: Any) -> None:
            armed.set()

    monkeypatch.setattr(_local_write.HostWrite, "_write", write)
    monkeypatch.setattr(_submit._Done, "wait", wait)
    first: dict[str, Any] = {"monitor": None, "save_top_k": 0, "save_on_exception": True}
    second: dict[str, Any] = {"monitor": None, "save_top_k": -1, "every_n_train_steps": 1}
    common: dict[str, Any] = {"filename": "shared", "enable_version_counter": False}
    store = MemoryStore()
    ours = [
        MemoryCheckpoint(store, dirpath=tmp_path / "ours", async_write=True, **first, **common),
        MemoryCheckpoint(store, dirpath=tmp_path / "ours", async_write=True, **second, **common),
    ]
    plain = [
        ModelCheckpoint(dirpath=tmp_path / "plain", **first, **common),
        ModelCheckpoint(dirpath=tmp_path / "plain", **second, **common),
    ]
    for callbacks in (ours, plain):
        trainer = make_trainer(tmp_path, [Arm(), *callbacks], max_steps=4)
        with pytest.raises(RuntimeError, match="boom at step 1"):
            trainer.fit(TinyModel(fail_at_step=1), loader(4))
        armed.clear()

    assert earlier_done_when_later_began == [True], "written before the earlier save's file"
    assert checkpoint_files(tmp_path / "ours") == checkpoint_files(tmp_path / "plain")
    assert checkpoint_files(tmp_path / "ours") == {"shared.ckpt"}
    loaded = [
        torch.load(tmp_path / where / "shared.ckpt", weights_only=False)
        for where in ("ours", "plain")
    ]
    assert loaded[0]["loops"] == loaded[1]["loops"], "the exception's checkpoint is there"
    assert store.keys(kind="checkpoint") == {"checkpoints/shared.ckpt"}


@pytest.mark.parametrize("held", ["l-score=0.ckpt", "l-score=1.ckpt"], ids=["new", "both"])
@pytest.mark.parametrize("evicted_by", ["another-callback", "the-same-callback"])
def test_an_evicted_name_is_free_once_its_async_checkpoint_io_replacement_is_written(
    tmp_path: Path, evicted_by: str, held: str
) -> None:
    """A template whose names repeat (``"l-{score:.0f}"``, version counter on) under
    Lightning's ``AsyncCheckpointIO``. Step 2's save evicts l-score=1.ckpt in favour of
    l-score=0.ckpt, whose write is held: the removal waits for it. Step 3's save names
    l-score=1.ckpt again, and ModelCheckpoint saves it there (it removed the file). Ours
    found the name taken (a removal waiting for a CheckpointIO's write counted as a file
    still there, "the name stays taken until the file is removed") and saved
    l-score=1-v1.ckpt. Two callbacks: the first (top 1, min) evicts, the second (top 1,
    max) saves the name again (randomized sweep, seed 31010, 1 run in 3 under load). One
    callback (``monitor=None``, top 1, which evicts its previous file at every save): it
    saves the name again itself. Such a name is now free once the write the removal
    waits for is done, as for ``async_write``: the removal is told of the newer save
    (``supersede_removals``) and leaves its file alone. Here the write of l-score=0.ckpt
    waits until the step 3 save looks for l-score=1.ckpt ("new"); or (under load: the
    sweep's runs that differed with the fix above) already the first write of
    l-score=1.ckpt does, and the writes queued after it ("both"): the evicted file was
    still being written, and a name in flight counted as taken before anything else. A
    name evicted is free then too: the write its removal waits for comes after."""
    evicted = "l-score=1.ckpt"
    io = HoldingIO(hold=held)

    class SavesAgain(MemoryCheckpoint):
        def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
            if trainer.global_step == 3 and filepath.endswith(evicted):
                io.gate.set()
            return super().file_exists(filepath, trainer)

    options: dict[str, Any] = {
        "filename": "l-{score:.0f}",
        "monitor": "score",
        "save_top_k": 1,
        "every_n_train_steps": 1,
    }
    if evicted_by == "the-same-callback":
        options["monitor"] = None
    modes = ("min", "max") if evicted_by == "another-callback" else ("min",)
    store = MemoryStore()
    ours = [
        (SavesAgain if mode == modes[-1] else MemoryCheckpoint)(
            store, dirpath=tmp_path / "ours", mode=mode, **options
        )
        for mode in modes
    ]
    plain = [ModelCheckpoint(dirpath=tmp_path / "plain", mode=m, **options) for m in modes]
    scores = [1.0, 0.0, 1.2]
    trainer = make_trainer(tmp_path, list(ours), max_steps=3, plugins=[AsyncCheckpointIO(io)])
    trainer.fit(TinyModel(scores=scores), loader(3))
    assert io.gate.is_set() and not io.timed_out
    make_trainer(tmp_path, list(plain), max_steps=3).fit(TinyModel(scores=scores), loader(3))

    kept = {"l-score=0.ckpt", evicted} if evicted_by == "another-callback" else {evicted}
    assert checkpoint_files(tmp_path / "ours") == checkpoint_files(tmp_path / "plain") == kept
    newer = torch.load(tmp_path / "ours" / evicted, weights_only=False)
    assert newer["global_step"] == 3, "the file is the save of step 3"
    assert store.keys(kind="checkpoint") == {f"checkpoints/{name}" for name in kept}
    best = [[os.path.basename(c.best_model_path) for c in cbs] for cbs in (ours, plain)]
    assert best[0] == best[1]
    for callback in ours:
        assert callback.persistence_stats.failed == 0


def test_an_eviction_whose_removal_runs_while_the_name_is_looked_up_frees_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One callback, ``"l-{score:.0f}"``, top 1, ``AsyncCheckpointIO``: step 2 evicts
    l-score=1.ckpt in favour of l-score=0.ckpt, whose write is held; step 3 names
    l-score=1.ckpt again. The lookup looked at the disk first (the file still there),
    then at the eviction: the removal, run on the intake thread in between (under load),
    had forgotten it, and the name counted as taken: l-score=1-v1.ckpt, where
    ModelCheckpoint reuses the name (the suite, beside another). Here the removal runs
    right after the disk is looked at, if it is looked at."""
    from lamin_lightning import _submit

    evicted = "l-score=1.ckpt"
    io = HoldingIO(hold="l-score=0.ckpt")
    looked, removed = threading.Event(), threading.Event()
    real_call = _submit.RemovalOnceWritten.__call__

    def call(self: Any) -> int:
        if os.path.basename(self._filepath) == evicted:
            assert looked.wait(20), "the name was never looked up"
            try:
                return int(real_call(self))
            finally:
                removed.set()
        return int(real_call(self))

    class LooksUp(MemoryCheckpoint):
        def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
            if trainer.global_step != 3 or not filepath.endswith(evicted):
                return super().file_exists(filepath, trainer)
            io.gate.set()
            real_exists = self._fs.exists

            def exists(path: Any) -> bool:
                there = bool(real_exists(path))
                if str(path).endswith(evicted):
                    looked.set()  # the removal runs now
                    assert removed.wait(20), "the removal never ran"
                return there

            self._fs.exists = exists  # type: ignore[method-assign]
            try:
                return super().file_exists(filepath, trainer)
            finally:
                del self._fs.exists
                looked.set()  # not looked at the disk: the removal runs after all

    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)
    options: dict[str, Any] = {
        "filename": "l-{score:.0f}",
        "monitor": None,
        "save_top_k": 1,
        "every_n_train_steps": 1,
    }
    store = MemoryStore()
    ours = LooksUp(store, dirpath=tmp_path / "ours", **options)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **options)
    scores = [1.0, 0.0, 1.2]
    make_trainer(tmp_path, [ours], max_steps=3, plugins=[AsyncCheckpointIO(io)]).fit(
        TinyModel(scores=scores), loader(3)
    )
    assert not io.timed_out and removed.is_set()
    make_trainer(tmp_path, [plain], max_steps=3).fit(TinyModel(scores=scores), loader(3))

    assert checkpoint_files(tmp_path / "ours") == checkpoint_files(tmp_path / "plain") == {evicted}
    assert os.path.basename(ours.best_model_path) == os.path.basename(plain.best_model_path)
    assert store.keys(kind="checkpoint") == {f"checkpoints/{evicted}"}


def test_a_stale_removal_of_a_name_evicted_again_does_not_free_the_later_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One callback, ``"l-{score:.0f}"``, ``monitor=None``, top 1, ``AsyncCheckpointIO``:
    its names go l-score=1, 0, 1, 2, 1, and each save evicts the previous one. Step 2
    evicts the first l-score=1.ckpt (removal R1, waiting for l-score=0.ckpt's write);
    step 3 saves the name again (R1 is told to leave the file alone); step 4 evicts it
    again, in favour of l-score=2.ckpt, still being written (removal R3). R1 ran only
    then (under load: the sweep's seed 33257, 1 run in 12) and, when it ran, forgot
    every eviction of the name, R3's too: step 5's lookup found the file still there
    (R3 waits for its write) and no eviction of it, and took l-score=1-v1.ckpt, where
    ModelCheckpoint (which removed the file at step 4) reuses l-score=1.ckpt. A removal
    now forgets its own eviction only. Here the writes of steps 2 and 4 are held until
    the name is looked up at steps 3 and 5; R1 runs as step 5 looks it up, R3 after."""
    from lamin_lightning import _submit

    name = "l-score=1.ckpt"
    gates = {"l-score=0.ckpt": threading.Event(), "l-score=2.ckpt": threading.Event()}
    unheld: list[str] = []

    class HoldsTwo(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            gate = gates.get(Path(path).name)
            if gate is not None and not gate.wait(60):
                unheld.append(Path(path).name)
            super().save_checkpoint(checkpoint, path, storage_options)

    looking, stale_ran, looked = threading.Event(), threading.Event(), threading.Event()
    removals: list[Any] = []
    real_call = _submit.RemovalOnceWritten.__call__

    def call(self: Any) -> int:
        if os.path.basename(self._filepath) != name:
            return int(real_call(self))
        removals.append(self)
        if len(removals) == 1:  # R1: once the name is evicted again, as step 5 looks it up
            assert looking.wait(20), "step 5 never looked the name up"
            try:
                return int(real_call(self))
            finally:
                stale_ran.set()
        assert looked.wait(20), "step 5's lookup never ended"  # R3: after the lookup
        return int(real_call(self))

    class LooksUp(MemoryCheckpoint):
        def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
            if not filepath.endswith(name) or looked.is_set():
                return super().file_exists(filepath, trainer)
            if trainer.global_step == 3:
                gates["l-score=0.ckpt"].set()  # step 2's: R1 waits for it
            elif trainer.global_step == 5:
                gates["l-score=2.ckpt"].set()  # step 4's: R3 waits for it
                looking.set()
                assert stale_ran.wait(20), "the first removal never ran"
                try:
                    return super().file_exists(filepath, trainer)
                finally:
                    looked.set()
            return super().file_exists(filepath, trainer)

    monkeypatch.setattr(_submit.RemovalOnceWritten, "__call__", call)
    options: dict[str, Any] = {
        "filename": "l-{score:.0f}",
        "monitor": None,
        "save_top_k": 1,
        "every_n_train_steps": 1,
    }
    store = MemoryStore()
    ours = LooksUp(store, dirpath=tmp_path / "ours", max_pending=16, **options)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **options)
    scores = [1.0, 0.0, 1.2, 2.0, 0.9]
    make_trainer(tmp_path, [ours], max_steps=5, plugins=[AsyncCheckpointIO(HoldsTwo())]).fit(
        TinyModel(scores=scores), loader(5)
    )
    assert unheld == [] and looked.is_set() and len(removals) == 2
    make_trainer(tmp_path, [plain], max_steps=5).fit(TinyModel(scores=scores), loader(5))

    assert checkpoint_files(tmp_path / "ours") == checkpoint_files(tmp_path / "plain") == {name}
    assert os.path.basename(ours.best_model_path) == os.path.basename(plain.best_model_path)
    assert store.keys(kind="checkpoint") == {f"checkpoints/{name}"}


class RenamingAsyncCheckpointIO(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` whose queued task writes each checkpoint through its
    ``checkpoint_io`` under a temporary name, then renames it into place (an atomic writer
    of its own making). ``fail_at``: that write (1-based) finds the disk full instead, and
    its error is kept in ``_error``, as Lightning's task keeps one."""

    def __init__(self, checkpoint_io: Any, fail_at: int | None = None) -> None:
        super().__init__(checkpoint_io)
        self.fail_at, self.calls = fail_at, 0

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self._ensure_setup()
        self.calls += 1
        failing = self.calls == self.fail_at
        checkpoint = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}

        def write() -> None:
            try:
                if failing:
                    raise OSError(errno.ENOSPC, "No space left on device")
                temporary = f"{path}.tmp"
                assert self.checkpoint_io is not None
                self.checkpoint_io.save_checkpoint(checkpoint, temporary, storage_options)
                os.replace(temporary, path)
            except BaseException as error:
                self._error = error

        assert self._executor is not None
        self._executor.submit(write)
        if self._error:
            raise self._error


@pytest.mark.parametrize("fails", [False, True], ids=["writes", "write-fails"])
def test_an_async_checkpoint_io_subclass_writing_under_another_name_is_followed(
    tmp_path: Path, fails: bool
) -> None:
    """A subclass of AsyncCheckpointIO whose task writes the file under a temporary name and
    renames it: the write of the save's path never reached the callback's notifier, so its
    staging waited for good, and training with it (the next rewrite of last.ckpt waited
    for that staging) hung without a word where ModelCheckpoint ends at once. The task
    queued for the save is followed now: once it ended, the file is there (persisted) or
    its error fails the job, and the checkpoint evicted in its favour is kept."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = _folder_callback(store, dirpath, save_top_k=1)
    # Saves per step: the top-1 file, then last.ckpt; the 5th is step 3's top-1 file.
    io = RenamingAsyncCheckpointIO(TorchCheckpointIO(), fail_at=5 if fails else None)
    trainer = make_trainer(tmp_path, [callback], max_steps=4, plugins=[io])
    outcome: list[BaseException | None] = []

    def fit() -> None:
        try:
            trainer.fit(TinyModel(scores=[5.0, 4.0, 3.0, 6.0]), loader(4))
        except BaseException as error:
            outcome.append(error)
        else:
            outcome.append(None)

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    fitting.join(120)  # a bound on a hang only: the fit ends in about a second
    assert not fitting.is_alive(), "training hung waiting for the subclass's write"
    assert not list(dirpath.glob("*.tmp"))
    if not fails:
        assert outcome == [None]
        assert callback.persistence_stats.failed == 0
        assert_store_equals_lightning(store, callback)
        return
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.ENOSPC
    # Step 3's write failed: step 2, evicted in its favour, stays, file and artifact.
    assert (dirpath / "epoch=0-step=2.ckpt").is_file()
    assert not (dirpath / "epoch=0-step=3.ckpt").exists()
    assert "checkpoints/epoch=0-step=2.ckpt" in store.keys(kind="checkpoint")
    assert "checkpoints/epoch=0-step=3.ckpt" not in store.keys(kind="checkpoint")
    assert callback.best_model_path == str(dirpath / "epoch=0-step=2.ckpt")


def test_async_write_beside_an_async_checkpoint_io_names_the_users_plugin_when_it_declines(
    tmp_path: Path,
) -> None:
    """``async_write=True`` with ``AsyncCheckpointIO(FolderCheckpointIO())`` writes
    synchronously (through the plugin) and warns: the warning named the callback's own
    wrapper (``_TrackingCheckpointIO``), a class the user never saw; it names the chain the
    user gave now. The folders persist as with the plugin alone."""
    store = MemoryStore()
    callback = _folder_callback(store, tmp_path / "ckpts", async_write=True)
    trainer = make_trainer(
        tmp_path, [callback], max_steps=3, plugins=[AsyncCheckpointIO(FolderCheckpointIO())]
    )
    with pytest.warns(UserWarning, match="needs the default TorchCheckpointIO") as warned:
        trainer.fit(TinyModel(scores=SCORES), loader(3))
    message = next(str(w.message) for w in warned if "async_write" in str(w.message))
    assert "with AsyncCheckpointIO(FolderCheckpointIO)." in message, message
    assert "_Tracking" not in message and "_WriteNotifier" not in message
    assert_store_equals_lightning(store, callback)


class FailsBeforeTheSaveReturns(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO around a :class:`FailingHeldWrite`, whose failing write
    it lets go once queued, and waits until its task ended: the failure is over after the
    write was queued and before the save returns (before Lightning links last.ckpt)."""

    def __init__(self, io: FailingHeldWrite, name: str) -> None:
        super().__init__(io)
        self.io, self.name = io, name

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if Path(path).name == self.name:
            self.io.gate.set()
            # One writer thread, in order: once this is done, the failed write is over.
            assert self._executor is not None
            self._executor.submit(lambda: None).result(60)
            assert self._error is not None


def test_a_last_link_never_names_a_checkpoint_whose_late_write_failed_and_left_part_of_it(
    tmp_path: Path,
) -> None:
    """save_last="link", top 1, through AsyncCheckpointIO: step 3's write fails on a full
    disk after it was queued and before Lightning links last.ckpt to it, leaving part of
    its file (a user's CheckpointIO that writes in place). Lightning's state was put back
    as for a write that left nothing only when the file was missing: a file there counted
    as the rewrite of a name in use, so ``_last_checkpoint_saved`` kept naming it and
    last.ckpt was linked to the cut-short file (``ckpt_path="last"`` could not load it).
    Only a name in use before the save counts as a rewrite now: last.ckpt links to step 2."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    io = FailingHeldWrite("*", nth=3, partial=True)
    callback = _folder_callback(store, dirpath, save_top_k=1, save_last="link")
    trainer = make_trainer(
        tmp_path,
        [callback],
        max_steps=3,
        plugins=[FailsBeforeTheSaveReturns(io, "epoch=0-step=3.ckpt")],
    )
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(TinyModel(scores=[5.0, 4.0, 3.0]), loader(3))

    last = dirpath / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=2.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert callback.best_model_path == str(dirpath / "epoch=0-step=2.ckpt")
    assert "checkpoints/epoch=0-step=2.ckpt" in store.keys(kind="checkpoint")


class OwnPoolAsyncCheckpointIO(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` that queues each write on a thread pool of its own
    (``_pool``, not Lightning's ``_executor``), through its ``checkpoint_io``."""

    def __init__(self, checkpoint_io: Any) -> None:
        super().__init__(checkpoint_io)
        self._pool = ThreadPoolExecutor(max_workers=1)

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        assert self.checkpoint_io is not None
        self._pool.submit(self.checkpoint_io.save_checkpoint, checkpoint, path, storage_options)

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)
        super().teardown()


class TwoTaskAsyncCheckpointIO(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` that queues two tasks per save on its executor: one
    that prepares the checkpoint (a copy of its tensors), then one that writes it through
    its ``checkpoint_io``."""

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self._ensure_setup()
        assert self._executor is not None and self.checkpoint_io is not None
        prepared: dict[str, Any] = {}
        self._executor.submit(prepared.update, checkpoint=dict(checkpoint))
        self._executor.submit(
            lambda: self.checkpoint_io.save_checkpoint(  # type: ignore[union-attr]
                prepared["checkpoint"], path, storage_options
            )
        )


@pytest.mark.parametrize("plugin", [OwnPoolAsyncCheckpointIO, TwoTaskAsyncCheckpointIO])
def test_an_async_checkpoint_io_subclass_write_counts_once_its_file_is_written(
    tmp_path: Path, plugin: type[AsyncCheckpointIO]
) -> None:
    """A subclass of AsyncCheckpointIO that queues its write on a pool of its own, or that
    queues a task before the one that writes: its write counted as done when it returned
    (nothing queued on ``_executor``) or once the first task ended, with the file not yet
    written (the name given back, its staging free to read a file not there). It counts
    once the file is written, as for Lightning's own."""
    store, callback, gated, seen = _fit_holding_the_first_write(tmp_path, plugin)

    assert gated.first_write_waited is True
    assert seen == [("epoch=0-step=1.ckpt", True)]
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class GatedRenamingAsyncCheckpointIO(RenamingAsyncCheckpointIO):
    """:class:`RenamingAsyncCheckpointIO` whose first task waits for ``gate`` (at most
    60 s) before it fails (``fail_at=1``)."""

    def __init__(self, checkpoint_io: Any) -> None:
        super().__init__(checkpoint_io, fail_at=1)
        self.gate = threading.Event()
        self.first_write_waited: bool | None = None

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        if self.calls == 0:
            self._ensure_setup()
            assert self._executor is not None
            self._executor.submit(self._wait)
        super().save_checkpoint(checkpoint, path, storage_options)

    def _wait(self) -> None:
        self.first_write_waited = self.gate.wait(60)


def test_an_earlier_failure_of_an_async_checkpoint_io_subclass_does_not_fail_a_later_write(
    tmp_path: Path,
) -> None:
    """A subclass of AsyncCheckpointIO whose task writes under another name: its first
    write fails (kept in ``_error``) after the second was queued. The second was counted
    failed with the first's error (``_error`` had changed since it was queued), and its
    file, written, was never persisted. Each task's own outcome counts now."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = _folder_callback(store, dirpath, save_top_k=1)
    io = GatedRenamingAsyncCheckpointIO(TorchCheckpointIO())

    class Open(pl.Callback):  # after step 1's saves (the top-1 file, then last.ckpt)
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 1:
                io.gate.set()

    trainer = make_trainer(tmp_path, [Open(), callback], max_steps=3, plugins=[io])
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(TinyModel(scores=[5.0, 4.0, 3.0]), loader(3))
    assert io.first_write_waited is True
    assert not (dirpath / "epoch=0-step=1.ckpt").exists()
    assert "checkpoints/epoch=0-step=1.ckpt" not in store.keys(kind="checkpoint")
    # Step 1's last.ckpt was written: persisted (a later save may have rewritten it).
    assert (dirpath / "last.ckpt").is_file()
    assert "checkpoints/last.ckpt" in store.keys(kind="checkpoint")


def _save_in_a_process(checkpoint: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


class ProcessPoolAsyncCheckpointIO(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` whose executor is a process pool: the task it queues
    (pickled to the worker process) writes the file there."""

    def _ensure_setup(self) -> None:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=1)  # type: ignore[assignment]

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self._ensure_setup()
        assert self._executor is not None
        self._executor.submit(_save_in_a_process, checkpoint, str(path))


def test_an_async_checkpoint_io_subclass_with_a_process_pool_is_followed(tmp_path: Path) -> None:
    """The task a subclass queues is queued as it is on a process pool (which pickles it):
    wrapped to read ``_error`` around it, it could not be pickled, and every write failed."""
    store = MemoryStore()
    callback = _folder_callback(store, tmp_path / "ckpts", save_top_k=1)
    trainer = make_trainer(
        tmp_path,
        [callback],
        max_steps=3,
        plugins=[ProcessPoolAsyncCheckpointIO(TorchCheckpointIO())],
    )
    trainer.fit(TinyModel(scores=SCORES), loader(3))
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class OverQuota(RuntimeError):
    """A user's AsyncCheckpointIO's own error."""


class QueuesThenRaises(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` whose ``at``-th save queues its write (Lightning's
    ``save_checkpoint``) and then raises an error of its own (a quota check, say). That
    write is held behind ``gate`` meanwhile: the file is written after the save raised.

    ``settled``: every other save returns once its write ended. For plain ModelCheckpoint,
    whose removal of a file does not wait for that file's write still queued (on a loaded
    machine the write of step 1 landed after Lightning removed it, and the file came back):
    its folder is then the one it comes to when writes keep pace."""

    def __init__(self, at: int, settled: bool = False) -> None:
        super().__init__(TorchCheckpointIO())
        self.at, self.calls, self.settled = at, 0, settled
        self.gate = threading.Event()
        self.held: bool | None = None

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self.calls += 1
        if self.calls == self.at:
            self._ensure_setup()
            assert self._executor is not None
            self._executor.submit(self._hold)
        super().save_checkpoint(checkpoint, path, storage_options)
        if self.calls == self.at:
            raise OverQuota(f"over quota after queuing {Path(path).name}")
        if self.settled:
            assert self._executor is not None
            self._executor.submit(lambda: None).result()  # one worker: after the write

    def _hold(self) -> None:
        self.held = self.gate.wait(60)


class OpenOnException(pl.Callback):
    """Opens ``io.gate`` in ``on_exception`` (before the checkpoint callbacks' own)."""

    def __init__(self, io: QueuesThenRaises) -> None:
        self.io = io

    def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
        self.io.gate.set()


def _folder_view(dirpath: Path) -> dict[str, str]:
    """Each checkpoint in ``dirpath``: the step it holds, or the target of a link."""
    view = {}
    for path in sorted(dirpath.glob("*.ckpt")):
        if path.is_symlink():
            view[path.name] = f"-> {os.readlink(path)}"
        else:
            view[path.name] = str(torch.load(path, weights_only=False)["global_step"])
    return view


@pytest.mark.parametrize("at", [3, 4], ids=["top-k", "rewrite-of-last"])
def test_a_write_an_async_checkpoint_io_subclass_queued_before_raising_its_own_error_persists(
    tmp_path: Path, at: int
) -> None:
    """save_last=True, top 1: a subclass of AsyncCheckpointIO queues step 2's write (the
    top-k file, or the rewrite of last.ckpt) and then raises an error of its own. The write
    counted as never started: the top-k file, written all the same and named by Lightning's
    ``best_model_path``, was never persisted, and the previous last.ckpt was put back (the
    artifact, or the file, held step 1 where ModelCheckpoint leaves step 2). A save that
    queued a task is followed whatever it raised: the folder is ModelCheckpoint's, and the
    store holds each file in it as it is."""
    options: dict[str, Any] = {
        "monitor": "score",
        "mode": "min",
        "save_top_k": 1,
        "save_last": True,
        "every_n_train_steps": 1,
    }
    views = {}
    for kind in ("plain", "ours"):
        store = MemoryStore()
        dirpath = tmp_path / kind
        callback: ModelCheckpoint = (
            ModelCheckpoint(dirpath=dirpath, **options)
            if kind == "plain"
            else MemoryCheckpoint(store, dirpath=dirpath, **options)
        )
        io = QueuesThenRaises(at, settled=kind == "plain")
        trainer = make_trainer(
            tmp_path / f"root-{kind}", [OpenOnException(io), callback], max_steps=3, plugins=[io]
        )
        with pytest.raises(OverQuota):
            trainer.fit(TinyModel(scores=[5.0, 4.0, 3.0]), loader(3))
        assert io.held is True
        views[kind] = (
            _folder_view(dirpath),
            {Path(p).name for p in callback.best_k_models},
            Path(callback.best_model_path).name,
        )
    assert views["ours"] == views["plain"]
    assert views["ours"][0]["last.ckpt"] == ("2" if at == 4 else "1")
    on_disk = {p.name: content_sha256(p) for p in (tmp_path / "ours").glob("*.ckpt")}
    stored = {k.removeprefix("checkpoints/"): store.get(k) for k in store.keys(kind="checkpoint")}
    assert {name: a.sha256 for name, a in stored.items() if a is not None} == on_disk


class RenamesInAFollowUp(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` whose task writes each checkpoint under a temporary
    name and then queues its rename as a task of its own, on ``self._executor`` as it finds
    it then; the first task waits for ``go`` before it writes, the first rename for
    ``gate``. ``during_next_save``: the second save opens ``go`` and waits until the first
    task queued its rename (which it does while that save runs). Its ``teardown`` waits
    for every task, renames included, before Lightning's shuts the executor down."""

    def __init__(self, during_next_save: bool = False) -> None:
        super().__init__(TorchCheckpointIO())
        self.during_next_save = during_next_save
        self.gate = threading.Event()
        self.held: bool | None = None
        self.tasks: list[Any] = []
        self.go = threading.Event()
        self.renaming = threading.Event()

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self._ensure_setup()
        checkpoint = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
        first = not self.tasks
        if self.during_next_save and len(self.tasks) == 1:
            self.go.set()
            assert self.renaming.wait(60), "the first task never queued its rename"

        def rename() -> None:
            if first:
                self.held = self.gate.wait(60)
            os.replace(f"{path}.tmp", path)

        def write() -> None:
            assert self.checkpoint_io is not None and self._executor is not None
            if first:
                assert self.go.wait(60), "the first write was never let go"
            self.checkpoint_io.save_checkpoint(checkpoint, f"{path}.tmp", storage_options)
            self.tasks.append(self._executor.submit(rename))
            if first:
                self.renaming.set()

        assert self._executor is not None
        self.tasks.append(self._executor.submit(write))

    def teardown(self) -> None:
        while not all(task.done() for task in list(self.tasks)):
            for task in list(self.tasks):
                task.result()
        super().teardown()


@pytest.mark.parametrize("during_next_save", [False, True], ids=["after", "during-next-save"])
def test_a_follow_up_task_an_async_checkpoint_io_subclass_queues_from_its_task_is_followed(
    tmp_path: Path, during_next_save: bool
) -> None:
    """A subclass of AsyncCheckpointIO whose task writes under a temporary name, then queues
    the rename as a separate task on its executor (found on ``self`` when the task runs,
    after the save returned): the rename was not followed (or was counted as the next
    save's, queued while that save ran), so the write counted as done once the first task
    ended, its name was given back and its staging found no file (the fit failed with
    FileNotFoundError where ModelCheckpoint ends well). A task queued by a followed task
    belongs to the same save now: the file counts once it is renamed."""
    from lamin_lightning import _names

    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    taken: list[bool] = []

    class Opens(pl.Callback):
        def __init__(self, io: RenamesInAFollowUp, dirpath: Path) -> None:
            self.io, self.dirpath = io, dirpath

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 1 and not during_next_save:
                self.io.go.set()  # the first save returned: its task writes now

        def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
            taken.append(_names.name_taken(self.dirpath / "epoch=0-step=1.ckpt"))
            self.io.gate.set()

        def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
            self.io.gate.set()

    options: dict[str, Any] = {"monitor": None, "save_top_k": -1, "every_n_train_steps": 1}
    plain_io = RenamesInAFollowUp(during_next_save)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **options)
    make_trainer(
        tmp_path / "plain-root",
        [Opens(plain_io, tmp_path / "plain"), plain],
        max_steps=3,
        plugins=[plain_io],
    ).fit(TinyModel(scores=SCORES), loader(3))
    io = RenamesInAFollowUp(during_next_save)
    callback = MemoryCheckpoint(store, dirpath=dirpath, **options)
    trainer = make_trainer(tmp_path, [Opens(io, dirpath), callback], max_steps=3, plugins=[io])
    trainer.fit(TinyModel(scores=SCORES), loader(3))

    assert io.held is True and plain_io.held is True
    assert taken == [False, True]  # ours: still being written, the rename pending
    assert checkpoint_files(dirpath) == checkpoint_files(tmp_path / "plain")
    assert not list(dirpath.glob("*.tmp"))
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class QueuesOnAUsersExecutor(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` that queues each write, through its ``checkpoint_io``,
    on ``pool``: an executor of the user's own that it holds (shut down at teardown)."""

    def __init__(self, checkpoint_io: Any, pool: Executor) -> None:
        super().__init__(checkpoint_io)
        self.pool = pool

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        assert self.checkpoint_io is not None
        self.pool.submit(self.checkpoint_io.save_checkpoint, checkpoint, path, storage_options)

    def teardown(self) -> None:
        self.pool.shutdown(wait=True)
        super().teardown()


class RestartingExecutor(Executor):
    """A user's executor that pickles as its settings: its thread pool is made when first
    used, again after ``shutdown`` (the next fit). ``own_submit``: the instance has a
    ``submit`` of its own too (one that counts the tasks, then queues them)."""

    def __init__(self, own_submit: bool = False) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.counted = 0
        if own_submit:
            self.submit = self.counting_submit  # type: ignore[method-assign]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1)
        return self.pool.submit(fn, *args, **kwargs)

    def counting_submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.counted += 1
        return RestartingExecutor.submit(self, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait, cancel_futures=cancel_futures)

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "pool": None}


@dataclass(frozen=True)
class FrozenPool(Executor):
    """A user's executor that takes no attribute of its own (a frozen dataclass around a
    thread pool): its ``submit`` cannot be followed in place."""

    pool: ThreadPoolExecutor

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait, cancel_futures=cancel_futures)


class HoldsEachFitsFirstWrite(pl.Callback):
    """``gated``'s first write (reset before each fit) waits for its gate: at the start of
    each fit's second step, ``seen`` gets whether the checkpoint the first step saved
    still holds its name (its write followed until it ends), and the gate opens."""

    def __init__(self, gated: GatedCheckpointIO, callback: ModelCheckpoint) -> None:
        self.gated, self.callback = gated, callback
        self.start = 0
        self.seen: list[bool] = []

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.start = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.start + 1 and not self.gated.gate.is_set():
            from lamin_lightning import _names

            self.seen.append(_names.name_taken(self.callback._last_checkpoint_saved))
            self.gated.gate.set()


@pytest.mark.parametrize("first_fit", ["ends", "raises"])
@pytest.mark.parametrize("own_submit", [False, True], ids=["class-submit", "own-submit"])
def test_an_executor_an_async_checkpoint_io_subclass_holds_is_the_users_as_it_was_after_fit(
    tmp_path: Path, first_fit: str, own_submit: bool
) -> None:
    """A subclass of AsyncCheckpointIO that queues its writes on an executor of the user's
    own, which pickles: the callback followed that executor's ``submit`` by setting one of
    its own on the instance, for good, so after the fit the executor no longer pickled
    (our closure in its ``__dict__``) and our code ran in the user's object (a ``submit``
    of the user's own stayed wrapped). Each executor is as it was once its saves' tasks
    ended, whether the fit ended or raised; the same trainer's next fit follows it again
    (its first write holds its name until written), and every checkpoint persists."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    executor = RestartingExecutor(own_submit)
    own = vars(executor).get("submit")
    pickle.dumps(executor)
    gated = GatedCheckpointIO()
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, monitor=None, save_top_k=-1, every_n_train_steps=1
    )
    holds = HoldsEachFitsFirstWrite(gated, callback)
    io = QueuesOnAUsersExecutor(gated, executor)
    raises = first_fit == "raises"
    model = TinyModel(fail_at_step=3 if raises else None)
    trainer = make_trainer(tmp_path, [holds, callback], max_steps=4 if raises else 3, plugins=[io])
    for fit in range(2):
        gated.writes = 0
        gated.gate.clear()
        if fit == 0 and raises:
            with pytest.raises(RuntimeError, match="boom at step 3"):  # after step 3's save
                trainer.fit(model, loader(3))
        else:
            trainer.fit(model, loader(3))
        assert gated.first_write_waited is True
        assert holds.seen == [True] * (fit + 1)  # followed: its name held until written
        pickle.dumps(executor)  # as before the fit
        if own is None:
            assert "submit" not in vars(executor)
        else:
            assert vars(executor)["submit"] is own
        assert callback.persistence_stats.failed == 0
        assert_store_equals_lightning(store, callback)
        model.fail_at_step = None
        trainer.fit_loop.epoch_loop.max_steps = 6  # the same trainer's next fit: to step 6
    assert executor.counted == (6 if own_submit else 0)  # the user's own submit queued each


def test_an_executor_that_takes_no_attribute_is_followed_and_given_back_after_each_save(
    tmp_path: Path,
) -> None:
    """A subclass of AsyncCheckpointIO that queues its writes on a frozen executor of the
    user's own, whose ``submit`` cannot be followed in place: a stand-in takes its place
    on the subclass while each save runs. Its write is followed all the same (its name
    held until written, every checkpoint persisted), and the attribute is the user's
    executor again once each save returned, and after the fit."""
    store = MemoryStore()
    pool = FrozenPool(ThreadPoolExecutor(max_workers=1))
    gated = GatedCheckpointIO()
    io = QueuesOnAUsersExecutor(gated, pool)
    callback = _folder_callback(store, tmp_path / "ckpts")
    holds = HoldsEachFitsFirstWrite(gated, callback)
    found: list[Any] = []

    class BetweenSaves(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            found.append(io.pool)

    trainer = make_trainer(tmp_path, [BetweenSaves(), holds, callback], max_steps=4, plugins=[io])
    trainer.fit(TinyModel(scores=SCORES), loader(4))

    assert gated.first_write_waited is True and holds.seen == [True]
    assert len(found) == 4 and all(attribute is pool for attribute in found)
    assert io.pool is pool
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


class RecordsItsExecutors(RenamesInAFollowUp):
    """:class:`RenamesInAFollowUp` (``during_next_save``) that keeps each executor it sets
    up, and opens ``gate`` at ``on_train_end`` (:meth:`opener`): the first save's rename
    is still queued while every later save runs."""

    def __init__(self) -> None:
        super().__init__(during_next_save=True)
        self.executors: list[Any] = []

    def _ensure_setup(self) -> None:
        super()._ensure_setup()
        if not any(executor is self._executor for executor in self.executors):
            self.executors.append(self._executor)

    def opener(self) -> pl.Callback:
        gate = self.gate

        class Opens(pl.Callback):
            def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
                gate.set()

            def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
                gate.set()

        return Opens()


def test_an_executor_saves_follow_at_once_is_the_users_again_once_the_last_one_ended(
    tmp_path: Path,
) -> None:
    """A subclass of AsyncCheckpointIO whose first save's follow-up task (its rename) waits
    until training ended: every later save is followed on the same executor meanwhile.
    Once the last task ended the executor holds no ``submit`` of the callback's (it kept
    one for good), and every checkpoint persists."""
    store = MemoryStore()
    io = RecordsItsExecutors()
    options: dict[str, Any] = {"monitor": None, "save_top_k": -1, "every_n_train_steps": 1}
    callback = MemoryCheckpoint(store, dirpath=tmp_path / "ckpts", **options)
    trainer = make_trainer(tmp_path, [io.opener(), callback], max_steps=3, plugins=[io])
    trainer.fit(TinyModel(scores=SCORES), loader(3))

    assert io.held is True and len(io.executors) == 1
    assert "submit" not in vars(io.executors[0])
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


def test_a_child_forked_while_an_executor_is_followed_gets_it_back_and_can_follow_it() -> None:
    """A process forked while an executor of an AsyncCheckpointIO subclass was followed in
    place (a save's task still ran on the parent's thread) and while another thread held
    the lock around those executors (a task ending): the child kept the callback's
    ``submit`` on its copy of the executor for good (the parent's save never ends there)
    and hung at its first save that followed it (a fit in a process forked from one
    whose earlier fit's write still ran, ``ddp_fork`` or a sweep's worker)."""
    import signal

    from lamin_lightning import _checkpoint_io

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        parents = _checkpoint_io._follow_submissions(pool)  # a save of the parent, running
        assert parents is not None and "submit" in vars(pool)
        with _checkpoint_io._in_place_lock:
            pid = os.fork()
            if pid == 0:  # the child: follow it as a save does, then end without cleanup
                signal.alarm(60)
                try:
                    if "submit" in vars(pool):
                        os._exit(4)
                    followed = _checkpoint_io._follow_submissions(pool)
                    assert followed is not None
                    _checkpoint_io._unfollow_submissions(followed)
                    os._exit(0 if "submit" not in vars(pool) else 5)
                except BaseException:
                    os._exit(3)
        _, status = os.waitpid(pid, 0)
        _checkpoint_io._unfollow_submissions(parents)
        assert "submit" not in vars(pool)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        pool.shutdown(wait=True)


class KeepsItsSubmit(RestartingExecutor):
    """A user's executor that refuses to lose an attribute (its ``__delattr__`` raises)."""

    def __delattr__(self, name: str) -> None:
        raise RuntimeError(f"{name} cannot be deleted")


class WritesItselfOnAUsersExecutor(QueuesOnAUsersExecutor):
    """Queues ``torch.save`` itself on ``pool`` (not through its ``checkpoint_io``, which
    would tell the callback the write ended): only the followed task says so."""

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        def write() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(checkpoint, path)

        self.pool.submit(write)


def test_an_executor_that_refuses_to_give_submit_back_still_lets_each_write_end(
    tmp_path: Path,
) -> None:
    """Handing a followed executor back deletes the ``submit`` the callback set on it;
    an executor whose ``__delattr__`` raises (not AttributeError) made that raise where
    the save's write was to be finished, so the write never counted as done and the
    flush at teardown waited its whole ``flush_timeout`` for it. The executor keeps the
    callback's ``submit`` (which passes every call through) and each write ends."""
    store = MemoryStore()
    executor = KeepsItsSubmit()
    io = WritesItselfOnAUsersExecutor(TorchCheckpointIO(), executor)
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpts",
        monitor=None,
        save_top_k=-1,
        every_n_train_steps=1,
        flush_timeout=10,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_steps=3, plugins=[io]).fit(TinyModel(), loader(3))
    assert not [w for w in caught if "flush_timeout" in str(w.message)]
    assert callback.persistence_stats.saved == 3
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt")) == [
        f"epoch=0-step={n}.ckpt" for n in (1, 2, 3)
    ]


@pytest.mark.parametrize("folders", [True, False], ids=["folders", "files"])
def test_each_late_folder_write_journals_the_folder_it_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folders: bool
) -> None:
    """Under AsyncCheckpointIO a CheckpointIO writing folders in place, killed mid-write,
    left a partial folder that the replay persisted (crash sweep seed 1029 --folder): a
    folder cannot be judged. Each such save now journals the identity of the folder its
    write completed: with the job's line if the write had ended by then (a kill right after
    that line must not leave a whole folder unmarked), else as a mark once it ends. A file
    gets no mark: the replay judges its bytes, as before."""
    from lamin_lightning._journal import Outbox

    saves: dict[str, Any] = {}
    marks: dict[str, tuple[int, int, int]] = {}
    append, mark_written = Outbox.append, Outbox.mark_written

    def appended(self: Outbox, record: Any) -> str:
        job_id = append(self, record)
        if record.op == "save" and record.kind == "checkpoint":
            saves[job_id] = record
        return job_id

    def marked(self: Outbox, job_id: str, identity: tuple[int, int, int]) -> None:
        marks[job_id] = identity
        mark_written(self, job_id, identity)

    monkeypatch.setattr(Outbox, "append", appended)
    monkeypatch.setattr(Outbox, "mark_written", marked)
    store = MemoryStore()
    callback = _folder_callback(store, tmp_path / "ckpts")
    io = FolderCheckpointIO() if folders else TorchCheckpointIO()
    trainer = make_trainer(tmp_path, [callback], max_steps=6, plugins=[AsyncCheckpointIO(io)])
    trainer.fit(TinyModel(scores=SCORES), loader(6))

    assert saves and all(record.marks_folder for record in saves.values())
    identities = {
        job_id: record.written_file or marks.get(job_id) for job_id, record in saves.items()
    }
    if folders:
        assert all(identity is not None for identity in identities.values()), identities
    else:
        assert not any(identities.values()) and not marks
    assert callback.persistence_stats.failed == 0
    assert_store_equals_lightning(store, callback)


def test_a_folders_mark_is_journaled_before_its_write_gives_its_name_back(
    tmp_path: Path,
) -> None:
    """A replay in the same process (a second fit in a notebook) waits for the name a
    write holds, then judges the folder by its mark: the mark must come before the name
    goes, or a whole folder would be dropped as cut short. A failed write marks nothing,
    and a write that ended already marks at once."""
    from lamin_lightning._checkpoint_io import PendingWrites, WriteTracker
    from lamin_lightning._jobs import file_identity
    from lamin_lightning._names import being_written

    tracker = WriteTracker()
    folder, failed, early = (tmp_path / n for n in ("a.ckpt", "b.ckpt", "c.ckpt"))
    seen: list[tuple[str, tuple[int, int, int], bool]] = []
    for path in (folder, failed, early):
        path.mkdir()
        write = tracker.begin(path)
        assert tracker.claim(path) is write
        pending = PendingWrites([write])
        if path == early:
            tracker.finish(write, None)

        def mark(identity: tuple[int, int, int], path: Path = path) -> None:
            seen.append((path.name, identity, being_written(path)))

        pending.mark_folder_with(mark)
        if path != early:
            tracker.finish(write, OSError("disk full") if path == failed else None)
        assert not being_written(path)

    assert seen == [
        ("a.ckpt", file_identity(folder), True),
        ("c.ckpt", file_identity(early), False),
    ]


class LazyPoolAsyncCheckpointIO(AsyncCheckpointIO):
    """A user's ``AsyncCheckpointIO`` whose ``save_checkpoint`` makes its thread pool
    (``_pool``, ``workers`` threads) at its first call, then queues on it a task that writes
    the checkpoint through its ``checkpoint_io`` under a temporary name and renames it into
    place (the save's path never reaches the callback's notifier). ``failing``: the first
    task, once ``checkpoint_io``'s gate (if any) opened, raises (``"raises"``) or keeps its
    error in ``_error`` (``"keeps"``: the next save raises it, as Lightning's does) instead
    of writing. ``pools``: each pool it made; ``teardown`` shuts it down and lets it go."""

    def __init__(self, checkpoint_io: Any, workers: int = 1, failing: str | None = None) -> None:
        super().__init__(checkpoint_io)
        self.workers, self.failing, self.calls = workers, failing, 0
        self._pool: ThreadPoolExecutor | None = None
        self.pools: list[ThreadPoolExecutor] = []

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self.calls += 1
        self._pool = self._pool or ThreadPoolExecutor(max_workers=self.workers)
        if not any(pool is self._pool for pool in self.pools):
            self.pools.append(self._pool)
        fails = self.failing if self.calls == 1 else None
        checkpoint = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
        gate = getattr(self.checkpoint_io, "gate", None)

        def write() -> None:
            if fails is not None:
                if gate is not None:
                    gate.wait(60)
                error = OSError(errno.ENOSPC, "No space left on device")
                if fails == "raises":
                    raise error
                self._error = error
                return
            assert self.checkpoint_io is not None
            self.checkpoint_io.save_checkpoint(checkpoint, f"{path}.tmp", storage_options)
            os.replace(f"{path}.tmp", path)

        self._pool.submit(write)
        if self._error:
            raise self._error

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        super().teardown()


@pytest.mark.parametrize("workers", [1, 3])
def test_a_pool_an_async_checkpoint_io_subclass_makes_at_its_first_save_is_followed(
    tmp_path: Path, workers: int
) -> None:
    """A subclass of AsyncCheckpointIO that makes its thread pool at its first save: the
    callback finds the executors to follow when a save begins, so that first save counted
    as queuing nothing, its write as done at once (its name given back while its task
    still waited to write), and its staging found no file: the first checkpoint was lost.
    Every task queued on a pool made during the save is waited for now (off the training
    thread, which never waited for the write), with one worker thread or several, in each
    fit of the same trainer; the pool holds no ``submit`` of the callback's afterwards."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    gated = GatedCheckpointIO()
    io = LazyPoolAsyncCheckpointIO(gated, workers)
    options: dict[str, Any] = {"monitor": None, "save_top_k": -1, "every_n_train_steps": 1}
    callback = MemoryCheckpoint(store, dirpath=dirpath, **options)
    holds = HoldsEachFitsFirstWrite(gated, callback)
    trainer = make_trainer(tmp_path, [holds, callback], max_steps=3, plugins=[io])
    model = TinyModel(scores=SCORES)
    for fit in range(2):
        gated.writes = 0
        gated.gate.clear()
        trainer.fit(model, loader(3))
        assert gated.first_write_waited is True, "training waited for the first write"
        assert holds.seen == [True] * (fit + 1)  # its name held until it was written
        assert len(io.pools) == fit + 1 and "submit" not in vars(io.pools[-1])
        assert not list(dirpath.glob("*.tmp"))
        assert callback.persistence_stats.failed == 0
        assert_store_equals_lightning(store, callback)
        trainer.fit_loop.epoch_loop.max_steps = 6  # the same trainer's next fit: to step 6
    assert len(checkpoint_files(dirpath)) == 6


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("failing", ["raises", "keeps"])
def test_a_failing_task_on_a_pool_made_at_the_first_save_fails_only_that_save(
    tmp_path: Path, workers: int, failing: str
) -> None:
    """The first task queued on a pool an AsyncCheckpointIO subclass makes at its first
    save fails, once training went on, without writing: it raises (its error stays in its
    future, which the callback never sees), or keeps its error in ``_error`` (the next save
    raises it, as Lightning's does). Only that save fails (with the kept error, which
    ``_error`` names), nothing waits for good, and every other checkpoint persists."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    observer = RecordingObserver()
    gated = GatedCheckpointIO()
    io = LazyPoolAsyncCheckpointIO(gated, workers, failing)
    options: dict[str, Any] = {"monitor": None, "save_top_k": -1, "every_n_train_steps": 1}
    # on_error="warn": the fit is not stopped at the hook after the failure is known, which
    # (with several worker threads, soon) would leave no later checkpoint to look at.
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, artifact_observers=[observer], on_error="warn", **options
    )
    holds = HoldsEachFitsFirstWrite(gated, callback)
    trainer = make_trainer(tmp_path, [holds, callback], max_steps=3, plugins=[io])
    if failing == "keeps":  # a later save (or the teardown) raises it
        with pytest.raises(OSError, match="No space left"):
            trainer.fit(TinyModel(scores=SCORES), loader(3))
    else:  # the fit ends, warning that the file was never written
        with pytest.warns(UserWarning, match="step=1"):
            trainer.fit(TinyModel(scores=SCORES), loader(3))

    assert holds.seen == [True]
    first = "checkpoints/epoch=0-step=1.ckpt"
    assert observer.wait_for(1)
    failed = observer.of_type(ArtifactFailedEvent)
    assert [event.key for event in failed] == [first]
    if failing == "keeps":
        assert isinstance(failed[0].error, OSError) and failed[0].error.errno == errno.ENOSPC
    assert store.get(first) is None and not (dirpath / "epoch=0-step=1.ckpt").exists()
    written = {p.name for p in dirpath.glob("*.ckpt")}
    assert written and store.keys(kind="checkpoint") == {f"checkpoints/{n}" for n in written}
    assert "submit" not in vars(io.pools[0])


def _sweep_in_a_thread(
    pool: ThreadPoolExecutor, seen: list[bool], earlier: Future[Any]
) -> tuple[threading.Thread, threading.Event]:
    """``_await_queued(pool)`` on a thread of its own, recording in ``seen`` whether
    ``earlier`` was done when its ``then`` ran; the event is set once it queued a task."""
    from lamin_lightning._checkpoint_io import _await_queued

    queued = threading.Event()
    sweeping = threading.Thread(
        target=_await_queued, args=(pool, lambda: seen.append(earlier.done())), daemon=True
    )

    def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = ThreadPoolExecutor.submit(pool, fn, *args, **kwargs)
        if threading.current_thread() is sweeping:
            queued.set()
        return future

    pool.submit = submit  # type: ignore[method-assign]
    sweeping.start()
    return sweeping, queued


def test_waiting_for_earlier_tasks_never_deadlocks_one_waiting_for_a_later_task() -> None:
    """Two worker threads: an earlier task queues a task behind the ones that wait for the
    pool's earlier tasks, then waits for it. Tasks that held every thread until all of them
    started would never let it run: they hold them a while only, and the wait ends once
    the earlier task ended."""
    pool = ThreadPoolExecutor(max_workers=2)
    go = threading.Event()

    def earlier() -> None:
        assert go.wait(60)
        pool.submit(lambda: None).result(60)

    try:
        task = pool.submit(earlier)
        seen: list[bool] = []
        sweeping, queued = _sweep_in_a_thread(pool, seen, task)
        assert queued.wait(60)
        go.set()
        sweeping.join(60)
        assert not sweeping.is_alive(), "the wait deadlocked the pool"
        assert seen == [True] and task.exception() is None
    finally:
        go.set()
        pool.shutdown(wait=True)


@pytest.mark.parametrize("cancel_futures", [False, True])
@pytest.mark.parametrize("when", ["before", "meanwhile"])
def test_waiting_for_earlier_tasks_ends_once_they_ended_when_the_pool_is_shut_down(
    when: str, cancel_futures: bool
) -> None:
    """A pool shut down before the wait began (which it refuses to run a task of) or while
    its task was queued (cancelled, or run after the earlier ones): the wait ends once the
    earlier task ended, not before, and never waits for good."""
    pool = ThreadPoolExecutor(max_workers=1)
    go, started = threading.Event(), threading.Event()

    def earlier() -> bool:
        started.set()
        return go.wait(60)

    try:
        task = pool.submit(earlier)
        assert started.wait(60)  # running: a shutdown that cancels leaves it be
        if when == "before":
            pool.shutdown(wait=False, cancel_futures=cancel_futures)
        seen: list[bool] = []
        sweeping, queued = _sweep_in_a_thread(pool, seen, task)
        if when == "meanwhile":
            assert queued.wait(60)
            pool.shutdown(wait=False, cancel_futures=cancel_futures)
        go.set()
        sweeping.join(60)
        assert not sweeping.is_alive(), "the wait never ended"
        assert seen == [True] and task.result() is True
    finally:
        go.set()
        pool.shutdown(wait=True)


class MakesItsPoolThenRaises(LazyPoolAsyncCheckpointIO):
    """Makes its pool at its first save, then raises an error of its own before it queues
    anything on it (a quota check, say)."""

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self._pool = self._pool or ThreadPoolExecutor(max_workers=self.workers)
        self.pools.append(self._pool)
        raise OverQuota(f"over quota before queuing {Path(path).name}")


def test_a_save_that_made_a_pool_and_raised_before_queuing_on_it_is_dropped(
    tmp_path: Path,
) -> None:
    """A save that made its pool and raised before it queued anything there queued nothing:
    dropped as such a save was before pools made during a save were waited for (no job,
    no failure reported for a file never meant to be written), not judged by its file."""
    store = MemoryStore()
    observer = RecordingObserver()
    io = MakesItsPoolThenRaises(TorchCheckpointIO())
    callback = _folder_callback(store, tmp_path / "ckpts", artifact_observers=[observer])
    trainer = make_trainer(tmp_path, [callback], max_steps=2, plugins=[io])
    with pytest.raises(OverQuota):
        trainer.fit(TinyModel(scores=SCORES), loader(2))
    assert len(io.pools) == 1 and not io.pools[0]._threads
    assert not observer.of_type(ArtifactFailedEvent)
    assert callback.persistence_stats.submitted == 0
    assert store.keys(kind="checkpoint") == set()


class InterruptedOnHandBack(RestartingExecutor):
    """A user's executor; Ctrl+C lands while the callback hands it back after a save
    (``KeyboardInterrupt`` from the deletion of the callback's ``submit``, once)."""

    interrupted = False

    def __delattr__(self, name: str) -> None:
        if not InterruptedOnHandBack.interrupted:
            InterruptedOnHandBack.interrupted = True
            raise KeyboardInterrupt
        super().__delattr__(name)


class WritesNowBesideAUsersExecutor(QueuesOnAUsersExecutor):
    """Writes with ``torch.save`` itself, before returning (not through its
    ``checkpoint_io``, which would tell the callback the write ended), and queues nothing
    on the executor it holds: only the end of the followed save says the write ended."""

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)


def test_ctrl_c_while_a_followed_executor_is_handed_back_still_ends_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C landing while a save of an AsyncCheckpointIO subclass handed its executor
    back (a step that runs user code, the executor's ``__delattr__``) left that save's
    write never finished: its name stayed taken for good in the process, and a flush in
    this process (the next fit's setup too) waited a minute for that write, then left the
    checkpoint pending. The write ends whatever the hand-back raised, and the interrupt
    goes on (Lightning's graceful shutdown)."""
    import signal

    from lamin_lightning import _replay
    from lamin_lightning._names import name_taken

    store = MemoryStore()
    io = WritesNowBesideAUsersExecutor(TorchCheckpointIO(), InterruptedOnHandBack())
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpts",
        monitor=None,
        save_top_k=-1,
        every_n_train_steps=1,
        flush_timeout=10,
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
            with pytest.raises(SystemExit):
                make_trainer(tmp_path, [callback], max_steps=3, plugins=[io]).fit(
                    TinyModel(), loader(3)
                )
    finally:
        signal.signal(signal.SIGINT, handler)
    assert InterruptedOnHandBack.interrupted
    assert not [w for w in caught if "flush_timeout" in str(w.message)]
    assert not name_taken(tmp_path / "ckpts" / "epoch=0-step=1.ckpt")
    # A flush in this process (or the next fit's setup) waits for no write, and persists it.
    monkeypatch.setattr(_replay, "WAIT_FOR_WRITES_IN_FLIGHT_S", 5.0)
    report = flush_directory(tmp_path / "ckpts", progress=False, stores={"memory": store})
    assert report.remaining == [] and report.failed == 0, report
    written = {f"checkpoints/{p.name}" for p in (tmp_path / "ckpts").glob("*.ckpt")}
    assert written and store.keys(kind="checkpoint") == written


class _KeepsAndIsInterrupted:
    """A user's CheckpointIO that keeps every evicted file (or folder); Ctrl+C is pressed
    while its ``remove_checkpoint`` runs, once it has kept the file (os.kill to itself:
    Python raises KeyboardInterrupt right as os.kill returns, inside the removal)."""

    kept: list[str]

    def remove_checkpoint(self, path: Any) -> None:
        self.kept.append(os.path.basename(path))
        os.kill(os.getpid(), signal.SIGINT)


class _KeepsFilesInterrupted(_KeepsAndIsInterrupted, TorchCheckpointIO):
    pass


class _KeepsFoldersInterrupted(_KeepsAndIsInterrupted, FolderCheckpointIO):
    pass


@pytest.mark.parametrize(
    "io_type", [_KeepsFilesInterrupted, _KeepsFoldersInterrupted], ids=["file", "folder"]
)
def test_ctrl_c_inside_a_users_removal_that_kept_the_file_still_deletes_its_artifact(
    io_type: type[_KeepsAndIsInterrupted], tmp_path: Path
) -> None:
    """Ctrl+C lands inside a user's ``remove_checkpoint`` once it kept the evicted file:
    the removal was made for the user, so ``lamin-lightning flush`` deletes the evicted
    checkpoint's artifact, as a run never interrupted does. Before, the KeyboardInterrupt
    was raised out of the user's removal ahead of the journal's mark that it was handed
    the file, and the replay, finding the file, kept its artifact as for a removal never
    made (found by the crash sweep, seed 1271 with --folder --signal INT)."""
    io = io_type()
    io.kept = []
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, monitor="score", save_top_k=1, every_n_train_steps=1
    )
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, [callback], max_steps=4, plugins=[io]).fit(
                TinyModel(scores=[3.0, 2.0, 1.0, 0.5]), loader(4)
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    assert io.kept == ["epoch=0-step=1.ckpt"]
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining
    # The user's to keep, as ModelCheckpoint leaves it; the store holds what Lightning kept.
    assert (dirpath / "epoch=0-step=1.ckpt").exists()
    assert store.keys(kind="checkpoint") == keys_of(["epoch=0-step=2.ckpt"])
    assert_store_equals_lightning(store, callback)


def test_a_second_ctrl_c_inside_a_users_removal_is_raised_at_once() -> None:
    """Inside ``ctrl_c_after`` (a user's removal and its journal mark) a first Ctrl+C is
    raised once the block ends; a second one at once, so that a removal that hangs can
    still be interrupted. Python's own handler is back either way."""
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reached: list[str] = []
    try:
        with pytest.raises(KeyboardInterrupt), ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the first")
        assert reached == ["after the first"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt), ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the second")
        assert reached == ["after the first"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)


def test_a_pool_made_at_the_first_save_whose_wait_cannot_start_fails_that_save_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread that waits for the tasks queued on a pool an AsyncCheckpointIO subclass
    made at its first save cannot start (a limit on threads: "can't start new thread").
    The save had already been counted as waiting for it: its write never ended, the error
    escaped the save, and the flush at teardown waited its whole ``flush_timeout``, the
    checkpoint's name taken for good. That save now fails at once with the error (as
    before such pools were waited for), and the fit and its other checkpoints go on."""
    from lamin_lightning._names import name_taken

    start = threading.Thread.start

    def no_sweeper(thread: threading.Thread) -> None:
        if thread.name == "lamin-lightning-pool-sweep":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_sweeper)
    store = MemoryStore()
    observer = RecordingObserver()
    dirpath = tmp_path / "ckpts"
    io = LazyPoolAsyncCheckpointIO(TorchCheckpointIO())
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor=None,
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        on_error="warn",
        flush_timeout=5,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_steps=3, plugins=[io]).fit(
            TinyModel(scores=SCORES), loader(3)
        )
    assert not [w for w in caught if "flush_timeout" in str(w.message)]
    failed = observer.of_type(ArtifactFailedEvent)
    assert [Path(event.key).name for event in failed] == ["epoch=0-step=1.ckpt"]
    assert "can't start new thread" in str(failed[0].error)
    assert not name_taken(dirpath / "epoch=0-step=1.ckpt")
    assert store.keys(kind="checkpoint") == {
        "checkpoints/epoch=0-step=2.ckpt",
        "checkpoints/epoch=0-step=3.ckpt",
    }


class _FolderAfterTheLine(FolderCheckpointIO):
    """Writes its folder only once the first job's journal line is in (:attr:`line_in`)."""

    def __init__(self) -> None:
        super().__init__()
        self.line_in = threading.Event()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        assert self.line_in.wait(60), "the job's line never came"
        super().save_checkpoint(checkpoint, path, storage_options)


def test_ctrl_c_right_after_a_late_folders_journal_line_still_marks_the_folder_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C lands right after the journal line of a save whose folder Lightning's
    AsyncCheckpointIO writes later: the KeyboardInterrupt was raised before the write was
    told the job to mark, the write then completed the folder unmarked (Lightning's
    teardown, or Python at exit, waits for it), and ``lamin-lightning flush`` dropped that
    whole checkpoint as one cut short: no artifact (crash sweep seed 1365 with --folder
    --signal INT). The Ctrl+C is now held until the mark is set up, then raised."""
    from lamin_lightning._journal import Outbox

    io = _FolderAfterTheLine()
    real_append = Outbox.append

    def append(self: Outbox, record: Any) -> str:
        job_id = real_append(self, record)
        if not io.line_in.is_set():
            io.line_in.set()
            os.kill(os.getpid(), signal.SIGINT)
        return job_id

    monkeypatch.setattr(Outbox, "append", append)
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1)
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, [callback], max_steps=3, plugins=[AsyncCheckpointIO(io)]).fit(
                TinyModel(), loader(3)
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()
    folder = dirpath / "epoch=0-step=1.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining
    assert store.keys(kind="checkpoint") == keys_of(["epoch=0-step=1.ckpt"])


def _sigint_once_after(target: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """``target.name`` sends this process a SIGINT (Ctrl+C) right after its first call
    returns; the list it returns holds True once that happened."""
    real = getattr(target, name)
    sent: list[bool] = []

    def after(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(target, name, after)
    return sent


def _fit_interrupted(tmp_path: Path, callback: Any, max_steps: int = 3, **kwargs: Any) -> None:
    """``fit`` with Python's own SIGINT handler, which the Ctrl+C sent inside ends."""
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, [callback], max_steps=max_steps, **kwargs).fit(
                TinyModel(), loader(max_steps)
            )
    finally:
        signal.signal(signal.SIGINT, handler)


def test_ctrl_c_while_a_followed_async_checkpoint_io_save_closes_still_persists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subclass of AsyncCheckpointIO that writes each folder under a temporary name (its
    task is followed, see _FollowedSave): a Ctrl+C in the follow's close, before it counted
    the save as returned, left the write never finished, though its task wrote the
    folder; its journal line never got the folder's mark, and a flush then dropped the
    checkpoint as cut short (or, in this process, waited for the write for good). The
    Ctrl+C is now held until the follow is closed."""
    from lamin_lightning import _checkpoint_io, _replay

    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1)
    sent = _sigint_once_after(_checkpoint_io._FollowedSave, "_made_during_the_call", monkeypatch)
    io = RenamingAsyncCheckpointIO(FolderCheckpointIO())
    _fit_interrupted(tmp_path, callback, plugins=[io])
    assert sent
    monkeypatch.undo()
    # A write never finished holds its name: the flush leaves its job after this wait.
    monkeypatch.setattr(_replay, "WAIT_FOR_WRITES_IN_FLIGHT_S", 5.0)
    # Lightning's teardown of the strategy waited for the folder's task (it wrote it).
    assert io._executor is None
    folder = dirpath / "epoch=0-step=1.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining and not report.dropped
    assert store.keys(kind="checkpoint") == keys_of(["epoch=0-step=1.ckpt"])


class _ArmAt(pl.Callback):
    """Sets :attr:`armed` at the save hooks of training step ``step`` (before the
    checkpoint callback's, which Lightning runs last)."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.armed = trainer.global_step == self.step


def _assert_store_equals_folder(store: MemoryStore, dirpath: Path) -> None:
    """One artifact per checkpoint file (or folder) in ``dirpath``, with its content, and
    none for one that is gone (a ``last.ckpt`` link has none)."""
    on_disk = {
        f"checkpoints/{p.name}": p
        for p in dirpath.iterdir()
        if p.name.endswith(".ckpt") and not p.is_symlink()
    }
    assert store.keys(kind="checkpoint") == set(on_disk)
    for key, path in on_disk.items():
        assert store.get(key).sha256 == content_sha256(path), key  # type: ignore[union-attr]


def _ctrl_c_points() -> list[tuple[Any, str]]:
    from lamin_lightning import _checkpoint_io
    from lamin_lightning._journal import Outbox
    from lamin_lightning._submission import SubmittingCheckpoint
    from lamin_lightning._submit import Submitter
    from lamin_lightning._surface import HookStore

    return [
        (ModelCheckpoint, "_save_checkpoint"),  # Lightning's write is done
        (SubmittingCheckpoint, "_submit_hparams_once"),
        (Submitter, "plan_staging"),
        (SubmittingCheckpoint, "_snapshot"),
        (SubmittingCheckpoint, "_checkpoint_record"),
        (HookStore, "__init__"),
        (Submitter, "ensure_pipeline"),
        (Outbox, "append"),
        (Submitter, "journal"),
        (Submitter, "_journaled_job"),
        (Submitter, "move_aside"),
        (Submitter, "await_staging"),
        (_checkpoint_io.WriteTracker, "begin"),
        (_checkpoint_io.WriteTracker, "waiter"),
    ]


@pytest.mark.parametrize("form", ["file", "late-file", "late-folder", "async-write"])
@pytest.mark.parametrize(
    "point", _ctrl_c_points(), ids=lambda point: f"{point[0].__name__}.{point[1]}"
)
def test_ctrl_c_right_after_each_step_of_a_save_hook_loses_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str, point: tuple[Any, str]
) -> None:
    """A sweep: Ctrl+C (SIGINT, Python's own handler) lands right after one step of the
    training thread's part of a save hook returns (the save of a top-1 checkpoint, the
    eviction of the previous one, the rewrite of last.ckpt), then ``lamin-lightning
    flush``: the store equals the folder. A Ctrl+C after Lightning's write and before the
    save's journal line (its snapshot, its staging planned, its submission begun, the
    hparams file looked for) left the checkpoint Lightning wrote, and names in its state,
    out of the journal: no flush persisted it. It is held until the snapshot is taken, or
    the save is journaled and kept out. One right after a CheckpointIO's write began and
    before Lightning's save was handed it left that write, never queued, waited for (the
    save kept out, the flush left it); it is dropped now. One once Lightning's own write
    was done, before its save returned, left the file Lightning names unjournaled: it is
    judged (a whole archive at the path, the previous file renamed away) and kept out."""
    from lamin_lightning import _replay

    target, name = point
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    # Step 4: a new best (step=4.ckpt), step=2.ckpt evicted, last.ckpt rewritten; step 3:
    # only last.ckpt rewritten (the first file set aside is the previous last.ckpt).
    arm = _ArmAt(3 if name == "move_aside" else 4)
    real = getattr(target, name)
    sent: list[str] = []

    def after(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if arm.armed and not sent and threading.current_thread() is threading.main_thread():
            sent.append(name)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(target, name, after)
    plugins: list[Any] = []
    if form == "late-file":
        plugins = [AsyncCheckpointIO(TorchCheckpointIO())]
    elif form == "late-folder":
        plugins = [AsyncCheckpointIO(FolderCheckpointIO())]
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        mode="min",
        save_top_k=1,
        save_last=True,
        every_n_train_steps=1,
        async_write=form == "async-write",
    )
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        make_trainer(tmp_path, [arm, callback], max_steps=5, plugins=plugins).fit(
            TinyModel(scores=[5.0, 3.0, 4.0, 1.0, 2.0]), loader(5)
        )
    except SystemExit:  # Lightning's, for a KeyboardInterrupt
        pass
    finally:
        signal.signal(signal.SIGINT, handler)
    monkeypatch.undo()
    if not sent:
        pytest.skip(f"{name} is not on this form's path")
    # A write never finished holds its name: the flush leaves its job after this wait.
    monkeypatch.setattr(_replay, "WAIT_FOR_WRITES_IN_FLIGHT_S", 5.0)
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining
    _assert_store_equals_folder(store, dirpath)


def test_ctrl_c_while_a_save_follows_an_executor_hands_the_executor_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl+C right after a save of an AsyncCheckpointIO subclass began to follow its
    executor (its ``submit`` wrapped in place, counted) and before the save noted it: the
    close handed back only the executors noted, and this one stayed wrapped, counted as
    followed, for good. The Ctrl+C is now held until the follow is noted."""
    from lamin_lightning import _checkpoint_io

    followed: list[Any] = []
    real = _checkpoint_io._follow_submissions

    def follow(executor: Any) -> Any:
        in_place = real(executor)
        if not followed:
            followed.append(executor)
            os.kill(os.getpid(), signal.SIGINT)
        return in_place

    monkeypatch.setattr(_checkpoint_io, "_follow_submissions", follow)
    callback = MemoryCheckpoint(
        MemoryStore(), dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_train_steps=1
    )
    _fit_interrupted(tmp_path, callback, plugins=[RenamingAsyncCheckpointIO(TorchCheckpointIO())])
    monkeypatch.undo()
    (executor,) = followed
    assert "submit" not in vars(executor)
    assert id(executor) not in _checkpoint_io._in_place


def test_ctrl_c_while_teardown_lets_the_journal_go_leaves_it_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C lands in teardown as the callback lets its journal go (taken from the
    submitter, not yet closed): the journal stayed locked by an object nothing held, and
    ``lamin-lightning flush`` (or the next fit) in this process found it held by "another
    process". The Ctrl+C is now raised once the journal is released."""
    from lamin_lightning import _submit

    real = _submit.keep_until_done
    sent: list[bool] = []

    def keep(outbox: Any, working: Any = ()) -> None:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        real(outbox, working)

    monkeypatch.setattr(_submit, "keep_until_done", keep)
    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1)
    _fit_interrupted(tmp_path, callback)
    assert sent
    monkeypatch.undo()
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining
    _assert_store_equals_folder(store, dirpath)


def test_a_ctrl_c_held_inside_a_block_that_then_raises_is_not_lost() -> None:
    """A Ctrl+C held by ``ctrl_c_after`` (a save's step on the training thread) is raised
    even when the block then raises an error (a user's key resolver, a feature conflict,
    a full disk): unheld, it had been raised where it landed, before that error; held and
    dropped, the user's Ctrl+C never stopped anything, and a caller that handles the
    error went on training."""
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as raised, ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            raise ValueError("the resolver raised")
        assert isinstance(raised.value.__context__, ValueError)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # No Ctrl+C: the error goes on as it is.
        with pytest.raises(ValueError), ctrl_c_after():
            raise ValueError("the resolver raised")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)
