"""Every checkpoint exactly as Lightning sees it (issue 12, items 4 to 8), against MemoryStore.

Each test failed before the fix and compares, where it can, with plain Lightning's
``ModelCheckpoint`` in the same scenario: the files it keeps are the files we keep,
locally and in the store.

- ``async_write``: a name being written in the background is taken (``-v1``,
  ``last-v1``); a background write that fails (ENOSPC) never costs the checkpoint it
  would have replaced, and Lightning's state is put right; a replay never removes a
  checkpoint whose replacement was never written; saving goes through
  ``trainer.save_checkpoint`` and the strategy.
- A rewrite of ``last.ckpt`` that fails keeps the previous file.
- ``on_error="raise"`` never leaves ``best_model_path`` naming a file never written.
- The emergency checkpoint (``save_on_exception``) is written despite earlier failures.

A full disk is injected (OSError ENOSPC from the writer); background writes are held
by :class:`WriteGate` (released at ``on_train_end``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import _thread
import dataclasses
import errno
import io
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from helpers import TinyModel, checkpoint_files, loader, make_trainer, sha256_file, staged_copies
from lamin_lightning import (
    ArtifactFailedEvent,
    JobRecord,
    PersistenceError,
    RetryPolicy,
    _lightning_view,
    _local_write,
    _names,
    flush_directory,
)
from lamin_lightning._jobs import file_identity
from lamin_lightning._journal import Outbox, read_pending
from lamin_lightning._replay import pending_records
from lamin_lightning._staging import staging_root
from lamin_lightning._submission import _journal_digest
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, content_sha256
from test_async_write import OnTrainEnd, WriteGate
from test_working_folder import _pending_keys, _WhenWaiting

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*could not be persisted.*"),
]


def key(name: str) -> str:
    return f"checkpoints/{name}"


def steps_of(dirpath: Path) -> dict[str, int]:
    """Each checkpoint file left in ``dirpath`` and the step it holds."""
    return {
        name: torch.load(dirpath / name, map_location="cpu", weights_only=False)["global_step"]
        for name in checkpoint_files(dirpath)
    }


def _save(path: Path, **fields: Any) -> JobRecord:
    """A pending save of ``path`` into the memory store."""
    return JobRecord(
        op="save",
        kind="checkpoint",
        key=key(path.name),
        local_path=str(path),
        store="memory",
        **fields,
    )


def _evicted_for(evicted: Path, replacement: Path) -> tuple[JobRecord, JobRecord]:
    """The save of ``replacement`` (written in the background) and the eviction of
    ``evicted`` waiting for it, as ``async_write`` journals them."""
    removal = JobRecord(
        op="remove",
        kind="checkpoint",
        key=key(evicted.name),
        local_path=str(evicted),
        store="memory",
        after=str(replacement),
    )
    return _save(replacement), removal


def journal(dirpath: Path, *records: JobRecord, name: str = "test") -> None:
    """Leave ``records`` pending in a journal of ``dirpath`` (``outbox-{name}.jsonl``), as a
    killed process would."""
    outbox = Outbox(staging_root(dirpath) / f"outbox-{name}.jsonl")
    outbox.open()
    for record in records:
        outbox.append(record)
    outbox.close()


def assert_store_equals_files(store: MemoryStore, dirpath: Path) -> None:
    names = checkpoint_files(dirpath)
    assert store.keys(kind="checkpoint") == {key(n) for n in names}
    for name in names:
        assert store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDiskIO(TorchCheckpointIO):
    """Lightning's writer on a disk that is full when the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, **kwargs: Any) -> None:
        if checkpoint["global_step"] == self.step:
            raise full_disk()
        super().save_checkpoint(checkpoint, path, **kwargs)


def plain_run_on_a_full_disk(
    tmp_path: Path,
    options: dict[str, Any],
    *,
    steps: int,
    full_at: int,
    scores: list[float] | None = None,
) -> Path:
    """Plain Lightning's ModelCheckpoint on a disk that is full at step ``full_at``: the
    folder it leaves (what ours must leave too)."""
    plain_dir = tmp_path / "plain"
    with pytest.raises(OSError, match="No space left"):
        make_trainer(
            tmp_path,
            [ModelCheckpoint(dirpath=plain_dir, **options)],
            max_steps=steps,
            plugins=[FullDiskIO(step=full_at)],
        ).fit(TinyModel(scores=scores), loader(steps))
    return plain_dir


def background_disk_full_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The background write (async_write) of the checkpoint of ``step`` finds the disk full."""
    real = _local_write.save_snapshot

    def step_of(archive: Any) -> int:
        whole = io.BytesIO()
        real(archive, whole)
        whole.seek(0)
        return int(torch.load(whole, weights_only=False)["global_step"])

    def save(payload: Any, handle: Any) -> None:
        if step_of(payload) == step:
            raise full_disk()
        real(payload, handle)

    monkeypatch.setattr(_local_write, "save_snapshot", save)


def held_async(store: MemoryStore, dirpath: Path, **kwargs: Any) -> MemoryCheckpoint:
    """Ours with async_write, room for every snapshot (a held write never blocks a save)."""
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "every_n_train_steps": 1,
        "async_write": True,
        "max_snapshots": 8,
        "max_pending": 16,
        "retry": RetryPolicy.no_delay(),
    }
    options.update(kwargs)
    return MemoryCheckpoint(store, **options)


# -- item 4: a name being written is taken ---------------------------------------------------


def test_async_write_versions_names_as_lightning_does_while_writes_are_pending(
    tmp_path: Path,
) -> None:
    """filename="model", top-3: model, model-v1, model-v2 (and the evicted one's name
    reused) as plain Lightning, although no file exists yet when the next name is chosen."""
    scores = [1.0, 2.0, 3.0, 0.5, 4.0]
    options: dict[str, Any] = {
        "filename": "model",
        "monitor": "score",
        "mode": "max",
        "save_top_k": 3,
        "every_n_train_steps": 1,
    }
    plain_dir = tmp_path / "plain"
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=plain_dir, **options)], max_steps=5).fit(
        TinyModel(scores=scores), loader(5)
    )
    assert checkpoint_files(plain_dir) == {"model.ckpt", "model-v1.ckpt", "model-v2.ckpt"}

    dirpath = tmp_path / "ours"
    gate = WriteGate()
    store = MemoryStore()
    ours = held_async(store, dirpath, **options)
    make_trainer(tmp_path, [ours, gate, OnTrainEnd(gate.open)], max_steps=5).fit(
        TinyModel(scores=scores), loader(5)
    )

    assert gate.timed_out == []
    assert steps_of(dirpath) == steps_of(plain_dir)
    assert {Path(p).name for p in ours.best_k_models} == checkpoint_files(dirpath)
    assert_store_equals_files(store, dirpath)


def test_a_write_finishing_between_the_two_looks_of_the_name_check_still_takes_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our ``file_exists`` looks at two things: the names of background writes in flight,
    and the disk. Each write that Lightning's name check asks about finishes right after
    the first of those looks (the race a loaded machine makes rare, not impossible).
    Looking at the disk first then missed the file both times (not written yet, then no
    longer in flight): Lightning reused model.ckpt and a checkpoint was lost."""
    scores = [1.0, 2.0, 3.0]
    options: dict[str, Any] = {
        "filename": "model",
        "monitor": "score",
        "mode": "max",
        "save_top_k": 3,
        "every_n_train_steps": 1,
    }
    plain_dir = tmp_path / "plain"
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=plain_dir, **options)], max_steps=3).fit(
        TinyModel(scores=scores), loader(3)
    )
    assert steps_of(plain_dir) == {"model.ckpt": 1, "model-v1.ckpt": 2, "model-v2.ckpt": 3}

    gates: dict[str, threading.Event] = {}  # each write's, by path: it may run once set
    finished: dict[str, threading.Event] = {}
    timed_out: list[str] = []
    real_take, real_call = _local_write.take_name, _local_write.HostWrite.__call__

    def take(filepath: Any) -> None:  # a write is created (on the training thread)
        gates[os.path.abspath(filepath)] = threading.Event()
        finished[os.path.abspath(filepath)] = threading.Event()
        real_take(filepath)

    def call(self: Any) -> None:  # the write runs (intake thread) once its gate opens
        path = os.path.abspath(self.filepath)
        if not gates[path].wait(timeout=60):
            timed_out.append(path)
        try:
            real_call(self)
        finally:
            finished[path].set()

    def finish_now(path: Any) -> None:
        name = os.path.abspath(path)
        if name in gates and not gates[name].is_set():
            gates[name].set()
            if not finished[name].wait(timeout=60):
                timed_out.append(name)

    def after(look: Any) -> Any:
        def looked(*args: Any, **kwargs: Any) -> bool:
            answer = look(*args, **kwargs)
            finish_now(args[-1] if "path" not in kwargs else kwargs["path"])
            return bool(answer)

        return looked

    def open_all() -> None:
        for gate in list(gates.values()):
            gate.set()

    monkeypatch.setattr(_local_write, "take_name", take)
    monkeypatch.setattr(_local_write.HostWrite, "__call__", call)
    monkeypatch.setattr(_lightning_view, "name_taken", after(_lightning_view.name_taken))
    real_exists = LocalFileSystem.exists
    monkeypatch.setattr(
        LocalFileSystem, "exists", lambda fs, path, **kw: after(real_exists)(fs, path, **kw)
    )
    dirpath = tmp_path / "ours"
    store = MemoryStore()
    ours = held_async(store, dirpath, **options)
    make_trainer(tmp_path, [ours, OnTrainEnd(open_all)], max_steps=3).fit(
        TinyModel(scores=scores), loader(3)
    )

    assert timed_out == []
    assert steps_of(dirpath) == steps_of(plain_dir)
    assert_store_equals_files(store, dirpath)


def test_a_second_callback_gets_last_v1_while_the_first_last_ckpt_is_being_written(
    tmp_path: Path,
) -> None:
    """Two callbacks saving last in one folder: last.ckpt and last-v1.ckpt, as Lightning."""
    first: dict[str, Any] = {"save_top_k": 0, "save_last": True, "every_n_train_steps": 1}
    second = {**first, "monitor": "score", "mode": "max"}  # another state key
    plain_dir = tmp_path / "plain"
    make_trainer(
        tmp_path,
        [ModelCheckpoint(dirpath=plain_dir, **first), ModelCheckpoint(dirpath=plain_dir, **second)],
        max_steps=3,
    ).fit(TinyModel(scores=[1.0, 2.0, 3.0]), loader(3))
    assert checkpoint_files(plain_dir) == {"last.ckpt", "last-v1.ckpt"}

    dirpath = tmp_path / "ours"
    gate = WriteGate()
    stores = MemoryStore(), MemoryStore()
    callbacks = [held_async(stores[0], dirpath, **first), held_async(stores[1], dirpath, **second)]
    make_trainer(tmp_path, [*callbacks, gate, OnTrainEnd(gate.open)], max_steps=3).fit(
        TinyModel(scores=[1.0, 2.0, 3.0]), loader(3)
    )

    assert gate.timed_out == []
    assert steps_of(dirpath) == steps_of(plain_dir)
    assert [Path(c.last_model_path).name for c in callbacks] == ["last.ckpt", "last-v1.ckpt"]
    for store, name in zip(stores, ["last.ckpt", "last-v1.ckpt"], strict=True):
        assert store.keys(kind="checkpoint") == {key(name)}
        assert store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]


# -- item 4: a failed background write never costs the previous checkpoint -------------------


def test_a_failed_background_rewrite_of_last_ckpt_is_not_reported_as_kept_for_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``last.ckpt``'s background rewrite at step 2 finds the disk full. The report says
    that this save was never written, and sends no one to ``lamin-lightning flush`` for
    it (which drops it: "its background write never finished"). Before, the previous
    ``last.ckpt`` at its path made it read as kept, to be retried by a flush. Found by an
    adversarial run on a full disk."""
    background_disk_full_at(monkeypatch, step=2)
    store = MemoryStore()
    dirpath = tmp_path / "ours"
    ours = held_async(store, dirpath, save_top_k=0, save_last=True)
    with pytest.raises(PersistenceError) as raised:
        make_trainer(tmp_path, [ours], max_steps=2).fit(TinyModel(), loader(2))

    message = str(raised.value)
    assert "last.ckpt was never written, nothing of it to persist" in message, message
    assert "Nothing of them is left to retry" in message and "flush" not in message, message
    assert checkpoint_files(dirpath) == {"last.ckpt"}  # step 1's, back in its place
    assert_store_equals_files(store, dirpath)


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_background_write_that_finds_the_disk_full_keeps_the_checkpoint_it_replaced(
    on_error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-1: step 2's write fails (ENOSPC). Step 1 stays, locally and in the store, and
    Lightning's state names it again, as after plain Lightning's failed save."""
    options: dict[str, Any] = {
        "monitor": "score",
        "mode": "max",
        "save_top_k": 1,
        "every_n_train_steps": 1,
    }
    plain_dir = plain_run_on_a_full_disk(tmp_path, options, steps=2, full_at=2, scores=[1.0, 2.0])
    assert checkpoint_files(plain_dir) == {"epoch=0-step=1.ckpt"}

    dirpath = tmp_path / "ours"
    background_disk_full_at(monkeypatch, step=2)
    store = MemoryStore()
    ours = held_async(store, dirpath, on_error=on_error, **options)
    trainer = make_trainer(tmp_path, [ours], max_steps=2)
    # The report does not claim the never-written file is kept.
    said = (
        r"the local files that were written are kept:\n.*No space left.*its write failed: .*"
        r"step=2\.ckpt was never written, nothing of it to persist\)\nNothing of them is left"
        r" to retry"
    )
    if on_error == "raise":
        with pytest.raises(PersistenceError, match=said):
            trainer.fit(TinyModel(scores=[1.0, 2.0]), loader(2))
    else:
        with pytest.warns(UserWarning, match=said):
            trainer.fit(TinyModel(scores=[1.0, 2.0]), loader(2))

    assert steps_of(dirpath) == steps_of(plain_dir) == {"epoch=0-step=1.ckpt": 1}
    assert_store_equals_files(store, dirpath)
    kept = str(dirpath / "epoch=0-step=1.ckpt")
    assert ours.best_model_path == kept == ours.kth_best_model_path
    assert {p: float(s) for p, s in ours.best_k_models.items()} == {kept: 1.0}
    assert float(ours.best_model_score) == 1.0  # type: ignore[arg-type]


def test_a_replay_never_removes_a_checkpoint_whose_replacement_was_never_written(
    tmp_path: Path,
) -> None:
    """Killed while b was written in the background: a's journaled eviction is not replayed;
    a stays in the store and on disk, and b's lost save is dropped."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    a, b = dirpath / "a.ckpt", dirpath / "b.ckpt"
    a.write_bytes(b"a" * 100)
    store = MemoryStore()
    saved_a = JobRecord(op="save", kind="checkpoint", key=key("a.ckpt"), local_path=str(a))
    store.commit(saved_a, store.transfer(saved_a, a), replay=False, set_flags=True)
    journal(dirpath, *_evicted_for(a, b))

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert store.keys() == {key("a.ckpt")}
    assert a.exists() and not b.exists()
    assert report.removed == 0 and report.remaining == []
    assert [r.key for r in report.dropped] == [key("a.ckpt")]


# -- item 5: a failed rewrite keeps the previous file -----------------------------------------


def test_a_rewrite_of_last_ckpt_that_finds_the_disk_full_keeps_the_previous_one(
    tmp_path: Path,
) -> None:
    """ENOSPC while Lightning rewrites last.ckpt: the previous last.ckpt stays (to resume
    from), locally and in the store, as with plain Lightning."""
    options: dict[str, Any] = {"save_top_k": 0, "save_last": True, "every_n_train_steps": 1}
    plain_dir = plain_run_on_a_full_disk(tmp_path, options, steps=3, full_at=2, scores=None)
    assert steps_of(plain_dir) == {"last.ckpt": 1}

    dirpath = tmp_path / "ours"
    store = MemoryStore()
    ours = MemoryCheckpoint(store, dirpath=dirpath, retry=RetryPolicy.no_delay(), **options)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(tmp_path, [ours], max_steps=3, plugins=[FullDiskIO(step=2)]).fit(
            TinyModel(), loader(3)
        )

    assert steps_of(dirpath) == steps_of(plain_dir)
    assert_store_equals_files(store, dirpath)
    assert ours.last_model_path == str(dirpath / "last.ckpt")


# -- item 6: Lightning's state never names a file never written -------------------------------


class Flushing(pl.Callback):
    """Before each batch, waits for ``callback``'s persistence: earlier failures are known."""

    def __init__(self, callback: MemoryCheckpoint) -> None:
        self.callback = callback

    def on_train_batch_start(self, *args: Any) -> None:
        assert self.callback.flush(10.0)


def test_on_error_raise_leaves_best_model_path_on_a_file_that_exists(tmp_path: Path) -> None:
    """Step 1's upload failed; step 2 raises it before Lightning moves its state to a file
    it then never writes: best_model_path is step 1, and test(ckpt_path="best") loads it."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_next(1)
    ours = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        retry=1,
    )
    model = TinyModel(scores=[1.0, 2.0, 3.0])
    trainer = make_trainer(tmp_path, [ours, Flushing(ours)], max_steps=3)
    with pytest.raises(PersistenceError, match=r"step=1\.ckpt"):
        trainer.fit(model, loader(3))

    assert checkpoint_files(dirpath) == {"epoch=0-step=1.ckpt"}
    assert ours.best_model_path == str(dirpath / "epoch=0-step=1.ckpt")
    assert all(Path(p).exists() for p in ours.best_k_models)
    assert trainer.global_step == 2  # the failure stopped the run at the next save
    make_trainer(tmp_path, [ours]).test(model, loader(1), ckpt_path=ours.best_model_path)


# -- item 7: the emergency checkpoint is always written ---------------------------------------


def test_the_checkpoint_on_exception_is_written_and_persisted_despite_an_earlier_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """save_on_exception with an unreported failure: the emergency checkpoint is written and
    persisted; the earlier failure is logged after it; the training error propagates."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_next(1)  # the upload of the checkpoint of step 2
    ours = MemoryCheckpoint(
        store, dirpath=dirpath, every_n_train_steps=2, save_on_exception=True, retry=1
    )
    with (
        caplog.at_level(logging.ERROR, logger="lamin_lightning"),
        pytest.raises(RuntimeError, match="boom at step 3"),
    ):
        make_trainer(tmp_path, [ours, Flushing(ours)], max_steps=4).fit(
            TinyModel(fail_at_step=3), loader(4)
        )

    emergency = "epoch=0-step=3.ckpt"
    assert checkpoint_files(dirpath) == {"epoch=0-step=2.ckpt", emergency}
    stored = store.get(key(emergency))
    assert stored is not None and stored.sha256 == sha256_file(dirpath / emergency)
    assert store.keys(kind="checkpoint") == {key(emergency)}
    assert any(
        "not persisted" in r.getMessage() and "step=2" in r.getMessage() for r in caplog.records
    )


# -- item 8: async_write saves through Lightning's save path ----------------------------------


class RecordingStrategy(SingleDeviceStrategy):
    def __init__(self, calls: list[tuple[str, str]]) -> None:
        super().__init__(device=torch.device("cpu"))
        self.calls = calls

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, *args: Any, **kw: Any
    ) -> None:
        self.calls.append(("strategy", Path(filepath).name))
        super().save_checkpoint(checkpoint, filepath, *args, **kw)


class RecordingTrainer(pl.Trainer):
    def __init__(self, calls: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = calls

    def save_checkpoint(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("trainer", Path(filepath).name))
        super().save_checkpoint(filepath, *args, **kwargs)


def test_async_write_saves_through_the_trainer_and_the_strategy(tmp_path: Path) -> None:
    """Overrides of Trainer.save_checkpoint and the strategy's save_checkpoint see every
    save; the file is still written in the background (absent when the save returns)."""
    dirpath = tmp_path / "ckpt"
    calls: list[tuple[str, str]] = []
    at_return: dict[str, bool] = {}

    class Observing(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            at_return[Path(filepath).name] = os.path.exists(filepath)

    gate = WriteGate()
    ours = Observing(
        MemoryStore(),
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=4,
        retry=RetryPolicy.no_delay(),
    )
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "max_steps": 3,
    }
    trainer = RecordingTrainer(
        calls,
        strategy=RecordingStrategy(calls),
        callbacks=[ours, gate, OnTrainEnd(gate.open)],
        **options,
    )
    trainer.fit(TinyModel(), loader(3))

    names = [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    assert calls == [(who, n) for n in names for who in ("trainer", "strategy")]
    assert at_return == dict.fromkeys(names, False)
    assert gate.timed_out == [] and threading.current_thread().name not in gate.threads
    assert checkpoint_files(dirpath) == set(names)
    assert_store_equals_files(ours.store, dirpath)


class PartialWriteIO(TorchCheckpointIO):
    """Writes part of the checkpoint of ``step`` (a torn file, or a folder with only its
    first file, as a full disk leaves them), then raises ENOSPC; others whole."""

    def __init__(self, step: int, *, folder: bool) -> None:
        super().__init__()
        self.step, self.folder = step, folder

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, **kwargs: Any) -> None:
        from checkpoint_forms import FolderCheckpointIO

        if checkpoint["global_step"] == self.step:
            if self.folder:
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "meta.json").write_text("{}")
            else:
                Path(path).write_bytes(b"PK\x03\x04 torn")
            raise full_disk()
        if self.folder:
            FolderCheckpointIO().save_checkpoint(checkpoint, path)
        else:
            super().save_checkpoint(checkpoint, path, **kwargs)


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_a_rewrite_of_last_ckpt_torn_by_a_full_disk_keeps_the_previous_one(
    tmp_path: Path, folder: bool
) -> None:
    """The rewrite of last.ckpt writes partway, then ENOSPC: what it left goes, the previous
    last.ckpt (step 1) comes back whole, and it is what the store holds."""
    dirpath = tmp_path / "ours"
    store = MemoryStore()
    ours = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        retry=RetryPolicy.no_delay(),
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
    )
    with pytest.raises(OSError, match="No space left"):
        make_trainer(
            tmp_path, [ours], max_steps=3, plugins=[PartialWriteIO(step=2, folder=folder)]
        ).fit(TinyModel(), loader(3))

    last = dirpath / "last.ckpt"
    if folder:
        assert sorted(p.name for p in last.iterdir()) == ["meta.json", "state.pt", "weights.pt"]
        assert json.loads((last / "meta.json").read_text())["global_step"] == 1
        assert store.get(key("last.ckpt")).sha256 == content_sha256(last)  # type: ignore[union-attr]
    else:
        assert steps_of(dirpath) == {"last.ckpt": 1}
        assert_store_equals_files(store, dirpath)


# -- async_write and save_last="link"; interrupts (issue 12, items 4 and 9) -------------------


@pytest.mark.parametrize("symlinks", [True, False], ids=["symlink", "copy"])
def test_async_write_links_last_ckpt_into_a_folder_that_does_not_exist_yet(
    symlinks: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_last="link" into a fresh dirpath while the first checkpoint is still being
    written: last.ckpt links to it (or, where links are refused, is a copy made once the
    write finished), as with plain Lightning."""
    gate = WriteGate()
    ours_running = threading.Event()
    symlink = os.symlink

    def refused(*args: Any, **kwargs: Any) -> None:
        if ours_running.is_set():
            gate.allow()  # the write of the file to copy may go on now
        raise OSError(errno.EPERM, "symbolic links are not allowed here")

    if not symlinks:
        monkeypatch.setattr(os, "symlink", refused)
    options: dict[str, Any] = {"every_n_train_steps": 1, "save_last": "link"}
    plain_dir = tmp_path / "plain"
    make_trainer(tmp_path, [ModelCheckpoint(dirpath=plain_dir, **options)], max_steps=2).fit(
        TinyModel(), loader(2)
    )
    assert steps_of(plain_dir) == {"epoch=0-step=2.ckpt": 2, "last.ckpt": 2}

    dirpath = tmp_path / "ours"
    ours = held_async(MemoryStore(), dirpath, **options)
    ours_running.set()
    # Each write waits for a permit: every link is made before its file is written.
    make_trainer(tmp_path, [ours, gate, OnTrainEnd(gate.open)], max_steps=2).fit(
        TinyModel(), loader(2)
    )

    assert gate.timed_out == []
    assert steps_of(dirpath) == steps_of(plain_dir)
    last = dirpath / "last.ckpt"
    assert last.is_symlink() == (plain_dir / "last.ckpt").is_symlink() == symlinks
    assert ours.last_model_path == str(last)
    assert os.symlink is (symlink if symlinks else refused)


def test_last_ckpt_names_the_previous_checkpoint_until_the_new_one_is_written(
    tmp_path: Path,
) -> None:
    """save_last="link", top 1: step 2's write is held. last.ckpt was linked to step 2 at
    once, so a process killed meanwhile left a dangling link, and ``ckpt_path="last"``
    started training afresh although step 1 was on disk. It names step 1 until step 2 is
    written, then step 2, as plain Lightning's link does at every moment."""
    gate = WriteGate()
    dirpath = tmp_path / "ours"
    ours = held_async(MemoryStore(), dirpath, save_last="link")
    last = dirpath / "last.ckpt"
    seen: dict[str, Any] = {}

    class Look(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 1:  # step 1 saved: let its write go, and wait for it
                gate.allow()
                assert ours.flush(timeout=60)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            # Step 2 saved, its write held (the gate opens after this).
            seen["target"] = os.readlink(last) if last.is_symlink() else None
            seen["loads"] = torch.load(last, weights_only=False)["global_step"]

    make_trainer(tmp_path, [ours, gate, Look(), OnTrainEnd(gate.open)], max_steps=2).fit(
        TinyModel(), loader(2)
    )

    assert gate.timed_out == []
    assert seen == {"target": "epoch=0-step=1.ckpt", "loads": 1}
    assert os.readlink(last) == "epoch=0-step=2.ckpt"
    assert steps_of(dirpath) == {"epoch=0-step=2.ckpt": 2, "last.ckpt": 2}


def test_a_failed_background_write_that_reused_an_evicted_name_gives_it_its_score_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """filename="model", top-3, mode max, scores 1 to 4: the score-4 save reuses model.ckpt
    (the score-1 checkpoint it evicts) and its write fails (ENOSPC). model.ckpt still holds
    the score-1 checkpoint: that is its score again, and the best is model-v2 (3.0)."""
    scores = [1.0, 2.0, 3.0, 4.0]
    options: dict[str, Any] = {
        "filename": "model",
        "monitor": "score",
        "mode": "max",
        "save_top_k": 3,
        "every_n_train_steps": 1,
    }
    plain_dir = plain_run_on_a_full_disk(tmp_path, options, steps=4, full_at=4, scores=scores)

    dirpath = tmp_path / "ours"
    background_disk_full_at(monkeypatch, step=4)
    store = MemoryStore()
    ours = held_async(store, dirpath, on_error="warn", **options)
    with pytest.warns(UserWarning, match="No space left"):
        make_trainer(tmp_path, [ours], max_steps=4).fit(TinyModel(scores=scores), loader(4))

    files = {"model.ckpt": 1, "model-v1.ckpt": 2, "model-v2.ckpt": 3}
    assert steps_of(dirpath) == steps_of(plain_dir) == files
    assert {Path(p).name: float(s) for p, s in ours.best_k_models.items()} == {
        "model.ckpt": 1.0,
        "model-v1.ckpt": 2.0,
        "model-v2.ckpt": 3.0,
    }
    assert ours.best_model_path == str(dirpath / "model-v2.ckpt")
    assert float(ours.best_model_score) == 3.0  # type: ignore[arg-type]
    assert ours.kth_best_model_path == str(dirpath / "model.ckpt")
    assert float(ours.kth_value) == 1.0


def test_a_failed_background_write_puts_the_last_ckpt_link_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_last="link", top-2: step 3's write fails (ENOSPC). last.ckpt links to step 2's
    checkpoint again, as after plain Lightning's failed save, never to a missing file."""
    scores = [3.0, 2.0, 1.0]
    options: dict[str, Any] = {
        "monitor": "score",
        "save_top_k": 2,
        "save_last": "link",
        "every_n_train_steps": 1,
    }
    plain_dir = plain_run_on_a_full_disk(tmp_path, options, steps=3, full_at=3, scores=scores)

    dirpath = tmp_path / "ours"
    background_disk_full_at(monkeypatch, step=3)
    ours = held_async(MemoryStore(), dirpath, on_error="warn", **options)
    with pytest.warns(UserWarning, match="No space left"):
        make_trainer(tmp_path, [ours], max_steps=3).fit(TinyModel(scores=scores), loader(3))

    last = dirpath / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=2.ckpt"
    assert steps_of(dirpath) == steps_of(plain_dir)
    assert steps_of(dirpath) == {"epoch=0-step=1.ckpt": 1, "epoch=0-step=2.ckpt": 2, "last.ckpt": 2}
    assert ours.last_model_path == str(last)


@pytest.mark.parametrize("interrupt", ["sigterm", "ctrl_c"])
def test_an_interrupted_backpressure_wait_keeps_the_async_checkpoint_and_its_job(
    interrupt: str, tmp_path: Path
) -> None:
    """async_write, max_pending=1, hung storage: SIGTERM or Ctrl+C while last.ckpt waits
    for a slot. Its snapshot is written (Lightning's state names the file), its job stays
    journaled, and the next fit in this dirpath persists it."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        every_n_train_steps=1,
        save_top_k=-1,
        save_last=True,
        max_pending=1,
        flush_timeout=1.0,
        async_write=True,
        # A snapshot slot each for step 1's two files: with one, last.ckpt could wait for
        # the first file's write to finish (a loaded machine), a wait counted as an
        # admission wait too, and the interrupt then came before last.ckpt had a snapshot.
        max_snapshots=2,
    )

    def sigterm() -> None:
        # Lightning's handler replaced the default one for the fit (else this kills pytest).
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)

    act, expected = (
        (sigterm, SIGTERMException)
        if interrupt == "sigterm"
        else (_thread.interrupt_main, SystemExit)
    )
    probe = _WhenWaiting(callback, store, act)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(expected):
            make_trainer(tmp_path, [callback, probe], max_steps=4).fit(TinyModel(), loader(4))
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    probe.stopped.set()
    assert probe.problems == [] and probe.acted.is_set()
    last = dirpath / "last.ckpt"
    assert callback.last_model_path == str(last)
    assert steps_of(dirpath) == {"epoch=0-step=1.ckpt": 1, "last.ckpt": 1}
    assert sorted(Path(k).name for k in _pending_keys(dirpath)) == [
        "epoch=0-step=1.ckpt",
        "last.ckpt",
    ]
    store.release()

    again = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1, save_top_k=-1)
    make_trainer(tmp_path, [again], max_steps=1).fit(TinyModel(), loader(1))
    assert store.get(key("last.ckpt")).sha256 == sha256_file(last)  # type: ignore[union-attr]
    assert _pending_keys(dirpath) == []


def test_a_fit_resumed_from_a_model_checkpoint_run_keeps_its_state_as_lightning_does(
    tmp_path: Path,
) -> None:
    """Swapping ModelCheckpoint for ours mid-run: the resumed callback takes the state
    ModelCheckpoint wrote (Lightning keys it by class name), so top-k goes on evicting
    exactly the files ModelCheckpoint itself would have; its own key, once written, wins."""
    scores = [5.0, 3.0, 4.0, 1.0, 6.0, 2.0]
    options: dict[str, Any] = {
        "monitor": "score",
        "save_top_k": 2,
        "save_last": True,
        "every_n_train_steps": 1,
    }
    outcome = {}
    for name in ("plain", "ours"):
        dirpath = tmp_path / name / "ckpts"
        first = ModelCheckpoint(dirpath=dirpath, **options)
        make_trainer(tmp_path / name, [first], max_steps=3).fit(TinyModel(scores=scores), loader(3))
        store = MemoryStore()
        second: ModelCheckpoint = (
            ModelCheckpoint(dirpath=dirpath, **options)
            if name == "plain"
            else MemoryCheckpoint(store, dirpath=dirpath, **options)
        )
        trainer = make_trainer(tmp_path / name, [second], max_steps=6)
        trainer.fit(TinyModel(scores=scores), loader(3), ckpt_path=str(dirpath / "last.ckpt"))
        outcome[name] = (
            checkpoint_files(dirpath),
            sorted(Path(p).name for p in second.best_k_models),
            Path(second.best_model_path).name,
        )
    assert outcome["ours"] == outcome["plain"]
    assert len(outcome["ours"][1]) == 2
    assert isinstance(second, MemoryCheckpoint) and second.persistence_stats.failed == 0
    # Ours persisted what it saved; the first run's files it evicted are gone locally.
    assert store.keys(kind="checkpoint") <= {key(n) for n in outcome["ours"][0]}
    assert store.keys(kind="checkpoint") >= {key("last.ckpt")}


class _OtherCheckpoint(ModelCheckpoint):
    """A checkpoint callback of another class: Lightning gives it no state of a
    ``ModelCheckpoint`` (its state key names its class), as with the reference."""


def test_a_model_checkpoint_still_attached_keeps_its_state_to_itself(tmp_path: Path) -> None:
    """Fit 1 with ModelCheckpoint alone, fit 2 resumed with that ModelCheckpoint still
    attached plus ours (same settings, same folder): the state saved under
    ModelCheckpoint's key is the attached ModelCheckpoint's, so ours starts empty, as a
    callback of any other class (and the reference) does; it neither takes the
    ModelCheckpoint's top-k as its own nor evicts files the ModelCheckpoint still lists."""
    scores = [3.0, 1.0, 2.0, 5.0, 0.5, 4.0, 6.0, 0.2, 1.5, 0.4, 7.0, 0.3]
    plain = {"monitor": "score", "save_top_k": -1, "save_last": True, "every_n_train_steps": 1}
    ours = {"monitor": "score", "save_top_k": 2, "every_n_train_steps": 1}
    outcome = {}
    for name in ("other", "ours"):
        dirpath = tmp_path / name / "ckpts"
        first = ModelCheckpoint(dirpath=dirpath, **plain)
        make_trainer(tmp_path / name, [first], max_steps=4).fit(TinyModel(scores=scores), loader(4))
        store = MemoryStore()
        kept = ModelCheckpoint(dirpath=dirpath, **plain)
        second: ModelCheckpoint = (
            _OtherCheckpoint(dirpath=dirpath, **ours)
            if name == "other"
            else MemoryCheckpoint(store, dirpath=dirpath, **ours)
        )
        trainer = make_trainer(tmp_path / name, [kept, second], max_epochs=3)
        trainer.fit(TinyModel(scores=scores), loader(4), ckpt_path=str(dirpath / "last.ckpt"))
        assert all(os.path.exists(p) for p in kept.best_k_models), name
        outcome[name] = (
            checkpoint_files(dirpath),
            sorted(Path(p).name for p in second.best_k_models),
            Path(second.best_model_path).name,
            sorted(Path(p).name for p in kept.best_k_models),
        )
    assert outcome["ours"] == outcome["other"]
    assert len(outcome["ours"][1]) == 2
    assert isinstance(second, MemoryCheckpoint) and second.persistence_stats.failed == 0


def test_a_replay_keeps_a_checkpoint_whose_eviction_waited_for_a_write_that_finished(
    tmp_path: Path,
) -> None:
    """Killed after b's background write finished but before the intake thread moved a
    (evicted in favour of b) out of the folder: a is still there, and the last.ckpt on
    disk may be older than the eviction and still count a as kept. The replay keeps a,
    locally and in the store (as for a synchronous eviction cut short), and persists b:
    the store holds exactly the files in the folder. Found by a randomized SIGKILL run,
    where the replay deleted a's artifact and left its file."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    a, b = dirpath / "a.ckpt", dirpath / "b.ckpt"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    store = MemoryStore()
    saved_a = JobRecord(op="save", kind="checkpoint", key=key("a.ckpt"), local_path=str(a))
    store.commit(saved_a, store.transfer(saved_a, a), replay=False, set_flags=True)
    (dirpath / "c.ckpt").write_bytes(b"c" * 100)
    # Training went on: the removal is not the journal's newest line.
    journal(dirpath, *_evicted_for(a, b), _save(dirpath / "c.ckpt"))

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert report.removed == 0 and report.remaining == []
    assert a.exists() and b.exists()
    assert_store_equals_files(store, dirpath)


def test_a_replay_drops_a_save_whose_background_write_never_finished(tmp_path: Path) -> None:
    """Killed mid-write (async_write, or a CheckpointIO that writes late): the save was
    journaled, its file never appeared. The replay drops it with a warning (the checkpoint
    never existed), where a lost file of a save written before the hook returned is still
    a failure. Found by a randomized SIGKILL run, where `lamin-lightning flush` exited 1."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    store = MemoryStore()
    journal(dirpath, _save(dirpath / "a.ckpt", written_later=True), _save(dirpath / "b.ckpt"))

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert [r.key for r in report.dropped] == [key("a.ckpt")]
    failed = [e for e in report.events if isinstance(e, ArtifactFailedEvent)]
    assert [e.key for e in failed] == [key("b.ckpt")]
    assert report.remaining == [] and store.keys() == set()


@pytest.mark.parametrize("compacted", [False, True], ids=["as_written", "compacted"])
def test_a_replay_persists_a_background_save_only_if_its_path_holds_the_file_it_wrote(
    tmp_path: Path, compacted: bool
) -> None:
    """``async_write`` replaces a file atomically: a process killed before the rename
    leaves the previous file at the name (a rewrite of ``last.ckpt``). Each background
    write notes in the journal which file it completed, before the rename; the replay
    persists a save only where the path holds that file. A rewrite whose mark is missing
    (killed before it), or whose path holds another file (killed between mark and
    rename), is dropped, however whole the file there; one that got there is persisted,
    also after a compaction rewrote the journal."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    unmarked, replaced, written = (dirpath / n for n in ("last.ckpt", "b.ckpt", "c.ckpt"))
    for path in (unmarked, replaced, written):
        path.write_bytes(b"an earlier checkpoint's whole file " + path.name.encode())
    outbox = Outbox(staging_root(dirpath) / "outbox-test.jsonl")
    outbox.open()
    ids = {
        path: outbox.append(_save(path, written_later=True, marks_written=True))
        for path in (unmarked, replaced, written)
    }
    marked = file_identity(written)
    assert marked is not None
    outbox.mark_written(ids[written], marked)
    outbox.mark_written(ids[replaced], marked)  # another file: the rename never came
    if compacted:
        outbox._compact_unlocked()
        assert '"t":"written"' not in outbox.path.read_text()
    outbox.close()
    store = MemoryStore()

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert sorted(r.key for r in report.dropped) == [key("b.ckpt"), key("last.ckpt")]
    assert store.keys() == {key("c.ckpt")} and report.failed == 0
    assert all(path.exists() for path in (unmarked, replaced, written)), "files are left"


def test_a_replay_drops_a_save_whose_file_a_kill_cut_short_and_keeps_what_it_evicted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning's CheckpointIO writes in place: under AsyncCheckpointIO a process killed
    mid-write leaves a partial zip at the checkpoint's name. The replay persisted it as a
    checkpoint, and removed the file it had evicted. Now a written-later save whose file
    is a zip cut short is dropped (the file is left where it is, named in a warning), and
    its eviction does not happen; a whole file, or one in a format that cannot be judged,
    is persisted as before."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, buffer)
    whole = buffer.getvalue()
    old, cut, done, opaque = (dirpath / n for n in ("old.ckpt", "cut.ckpt", "done.ckpt", "x.ckpt"))
    old.write_bytes(whole)
    cut.write_bytes(whole[: len(whole) // 2])
    done.write_bytes(whole)
    opaque.write_bytes(b"a format of its own, which cannot be judged")
    evicted = JobRecord(
        op="remove",
        kind="checkpoint",
        key=key(old.name),
        local_path=str(old),
        store="memory",
        after=str(cut),
    )
    journal(
        dirpath,
        _save(old),
        _save(cut, written_later=True),
        evicted,
        _save(done, written_later=True),
        _save(opaque, written_later=True),
    )
    store = MemoryStore()
    caplog.set_level(logging.WARNING, logger="lamin_lightning")

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    dropped = [(r.op, r.key) for r in report.dropped]  # the save, and the removal kept
    assert sorted(dropped) == [("remove", key("old.ckpt")), ("save", key("cut.ckpt"))]
    assert report.remaining == [] and report.failed == 0
    assert store.keys() == {key(n) for n in ("old.ckpt", "done.ckpt", "x.ckpt")}
    assert old.read_bytes() == whole, "the evicted checkpoint went for a partial file"
    assert cut.exists(), "the partial file is the user's to delete"
    assert any("cut short" in r.getMessage() and str(cut) in r.getMessage() for r in caplog.records)


def test_a_replay_waits_for_a_write_this_process_still_runs_before_judging_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fit interrupted by Ctrl+C leaves its background write running (it finishes what it
    started); a second fit in the same process (a notebook) replays the outbox meanwhile.
    The replay must wait for that write, not drop the save as never written: the file
    then appeared with no artifact, and nothing ever persisted it. Found by an
    adversarial Ctrl+C run (a held write of a checkpoint, SIGINT during a slot wait)."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    store = MemoryStore()
    b = dirpath / "b.ckpt"
    journal(dirpath, _save(b, written_later=True))
    _names.take_name(b)  # the interrupted fit's write of b, still running
    caplog.set_level(logging.INFO, logger="lamin_lightning")
    waiting = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for 1 background write" in record.getMessage():
                waiting.set()

    handler = Waiting()
    logging.getLogger("lamin_lightning").addHandler(handler)
    replayed: list[Any] = []
    replay = threading.Thread(
        target=lambda: replayed.append(
            flush_directory(dirpath, progress=False, stores={"memory": store})
        )
    )
    replay.start()
    try:
        assert waiting.wait(30), "the replay did not wait for the write of b"
        assert replayed == []
        b.write_bytes(b"the checkpoint, written late")
    finally:
        _names.release_name(b)
        replay.join(60)
        logging.getLogger("lamin_lightning").removeHandler(handler)

    (report,) = replayed
    assert report.dropped == [] and report.remaining == []
    assert_store_equals_files(store, dirpath)  # b persisted
    assert store.keys() == {key("b.ckpt")}


def test_a_replay_leaves_a_job_whose_file_this_process_still_writes_in_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write still running when the replay's wait ends: its job is neither dropped nor
    failed; it stays journaled, and a flush once the write is done persists the file."""
    from lamin_lightning import _replay

    monkeypatch.setattr(_replay, "WAIT_FOR_WRITES_IN_FLIGHT_S", 0.05)
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    store = MemoryStore()
    late = dirpath / "late.ckpt"
    journal(dirpath, _save(late, written_later=True))
    _names.take_name(late)
    try:
        report = flush_directory(dirpath, progress=False, stores={"memory": store})
        assert report.dropped == [] and report.events == []
        assert [r.key for _, r in pending_records(dirpath)] == [key("late.ckpt")]
        late.write_bytes(b"written after the wait")
    finally:
        _names.release_name(late)

    again = flush_directory(dirpath, progress=False, stores={"memory": store})
    assert again.remaining == [] and pending_records(dirpath) == []
    assert_store_equals_files(store, dirpath)


@pytest.mark.parametrize("written_later", [True, False], ids=["async_write", "written_in_hook"])
def test_a_replay_waits_for_a_staging_this_process_still_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    written_later: bool,
) -> None:
    """The intake thread an interrupted fit left running stages the file after its write
    (or, without async_write, after the hook wrote it). A replay that ran before the
    staging persisted the local file and released a staged copy that did not exist yet;
    the intake thread then made it, a hard link in ``staged/`` nobody would release. The
    name stays taken until the staging is done, so the replay waits, persists the staged
    copy and releases it."""
    from lamin_lightning._stats import StatsRecorder
    from lamin_lightning._submit import Submitter

    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    root = staging_root(dirpath)
    b = dirpath / "b.ckpt"
    submitter = Submitter(
        max_workers=1,
        max_pending=1,
        retry=RetryPolicy(),
        deliver=lambda event: None,
        thread_finalizer=lambda: None,
        stats=StatsRecorder(),
        staging_timeout=None,
    )

    def write() -> None:  # the interrupted fit's write of b: the file, then the name back
        b.write_bytes(b"the checkpoint, written late")
        _names.release_name(b)

    if written_later:
        _names.take_name(b)  # as a background write does from the hook on
    else:
        b.write_bytes(b"the checkpoint, written in the hook")
    staged, prepare = submitter.plan_staging(root, b, write if written_later else None)
    journal(dirpath, _save(b, written_later=written_later, staged_path=str(staged)))
    stager = submitter.stager(root)
    staging, go = threading.Event(), threading.Event()
    stage = stager.stage

    def slow_stage(path: Any, staged: Any = None) -> Any:
        staging.set()
        assert go.wait(60)
        return stage(path, staged)

    monkeypatch.setattr(stager, "stage", slow_stage)
    caplog.set_level(logging.INFO, logger="lamin_lightning")
    waited_or_done = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for 1 background write" in record.getMessage():
                waited_or_done.set()

    handler = Waiting()
    logging.getLogger("lamin_lightning").addHandler(handler)
    intake = threading.Thread(target=prepare)
    intake.start()
    replayed: list[Any] = []

    def replay() -> None:
        try:
            replayed.append(flush_directory(dirpath, progress=False, stores={"memory": store}))
        finally:
            waited_or_done.set()

    store = MemoryStore()
    replaying = threading.Thread(target=replay)
    try:
        assert staging.wait(30), "the staging did not start"
        replaying.start()
        assert waited_or_done.wait(60)
        assert replayed == [], "the replay did not wait for the staging of b"
    finally:
        go.set()
        intake.join(60)
        if replaying.is_alive() or replaying.ident is not None:
            replaying.join(60)
        logging.getLogger("lamin_lightning").removeHandler(handler)

    (report,) = replayed
    assert report.dropped == [] and report.remaining == []
    assert store.keys() == {key("b.ckpt")}
    assert_store_equals_files(store, dirpath)
    leftovers = staged_copies(root)
    assert leftovers == [], f"staged copies nobody releases: {leftovers}"


def test_a_replay_waits_for_stagings_queued_behind_the_running_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An interrupted fit's intake thread stages its queued files one after another. The
    names were taken only as each staging started, so a replay in this process judged the
    queued ones free, persisted their local files, and their staged copies were made after
    it (left in staged/ for good). The names are now taken when the save is planned, on
    the training thread, and the replay waits for every one of them."""
    from lamin_lightning._stats import StatsRecorder
    from lamin_lightning._submit import Submitter

    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    root = staging_root(dirpath)
    submitter = Submitter(
        max_workers=1,
        max_pending=4,
        retry=RetryPolicy(),
        deliver=lambda event: None,
        thread_finalizer=lambda: None,
        stats=StatsRecorder(),
        staging_timeout=None,
    )
    prepares = []
    records = []
    for name in ("a", "b", "c"):
        path = dirpath / f"{name}.ckpt"
        path.write_bytes(name.encode() * 1000)
        staged, prepare = submitter.plan_staging(root, path)
        prepares.append(prepare)
        records.append(_save(path, staged_path=str(staged)))
    journal(dirpath, *records)  # the interrupted fit's journal, released
    caplog.set_level(logging.INFO, logger="lamin_lightning")
    waited_or_done = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for 3 background write" in record.getMessage():
                waited_or_done.set()

    handler = Waiting()
    logging.getLogger("lamin_lightning").addHandler(handler)
    store = MemoryStore()
    replayed: list[Any] = []

    def replay() -> None:
        try:
            replayed.append(flush_directory(dirpath, progress=False, stores={"memory": store}))
        finally:
            waited_or_done.set()

    replaying = threading.Thread(target=replay)
    replaying.start()
    try:
        assert waited_or_done.wait(60)
        assert replayed == [], "the replay did not wait for the queued stagings"
    finally:
        for prepare in prepares:  # the old intake thread, in queue order
            prepare()
        replaying.join(60)
        logging.getLogger("lamin_lightning").removeHandler(handler)

    (report,) = replayed
    assert report.remaining == [] and report.saved == 3
    leftovers = staged_copies(root)
    assert leftovers == [], f"staged copies nobody releases: {leftovers}"


def test_two_callbacks_linking_last_in_one_folder_name_their_links_as_lightning_does(
    tmp_path: Path,
) -> None:
    """async_write, save_last="link", two callbacks in one folder, every write held until
    training ends: the first callback's link is made once its file is written, and its
    name was free meanwhile, so the second callback took last.ckpt too (one link for
    both). As with ModelCheckpoint, the second takes last-v1.ckpt, each its own file."""
    scores = [3.0, 1.0, 2.0]

    def fit(folder: Path, make: Any, *extra: pl.Callback) -> tuple[Any, Any]:
        low = make(dirpath=folder, monitor="score", mode="min", save_last="link")
        high = make(dirpath=folder, monitor="score", mode="max", save_last="link")
        make_trainer(tmp_path, [*extra, low, high], max_steps=3).fit(
            TinyModel(scores=scores), loader(3)
        )
        return low, high

    plain = fit(tmp_path / "plain", lambda **kw: ModelCheckpoint(every_n_train_steps=1, **kw))
    gate = WriteGate()
    store = MemoryStore()
    ours = fit(
        tmp_path / "ours",
        lambda **kw: held_async(store, kw.pop("dirpath"), **kw),
        gate,
        OnTrainEnd(gate.open),
    )

    assert gate.timed_out == []
    names = [(Path(c.last_model_path).name, Path(c._last_checkpoint_saved).name) for c in plain]
    assert names[0][0] == "last.ckpt" and names[1][0] == "last-v1.ckpt"
    assert [(Path(c.last_model_path).name, Path(c._last_checkpoint_saved).name) for c in ours] == (
        names
    )
    for folder, callbacks in ((tmp_path / "plain", plain), (tmp_path / "ours", ours)):
        for callback in callbacks:  # each link names its own callback's newest file
            link = Path(callback.last_model_path)
            assert os.readlink(link) == Path(callback._last_checkpoint_saved).name, folder


def test_links_asked_for_are_made_newest_last_whichever_finishes_first(tmp_path: Path) -> None:
    """Two requests for one link path, carried out on two threads (the writer's, then the
    training thread's for a file already written): they raced, the second one's symlink
    failing (FileExistsError, then SameFileError from the copy fallback, logged as an
    error). Each is made under one lock, and an older request never replaces a newer
    link; each holds the link's name until it is made."""
    from lamin_lightning._lightning_view import _LINKS
    from lamin_lightning._names import name_taken

    older, newer = tmp_path / "epoch=0-step=1.ckpt", tmp_path / "epoch=0-step=2.ckpt"
    older.write_text("1")
    newer.write_text("2")
    link = str(tmp_path / "last.ckpt")
    first, second = _LINKS.request(link), _LINKS.request(link)
    assert name_taken(link)
    errors: list[BaseException] = []

    def make(request: Any, target: Path) -> None:
        try:
            _LINKS.make(request, str(target))
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [
        threading.Thread(target=make, args=(second, newer)),
        threading.Thread(target=make, args=(first, older)),
    ]
    threads[0].start()
    threads[0].join()
    threads[1].start()
    threads[1].join()
    assert errors == []
    assert os.readlink(link) == newer.name
    assert not name_taken(link)
    again = _LINKS.request(link)  # a later request wins over both
    _LINKS.make(again, str(older))
    assert os.readlink(link) == older.name


@pytest.mark.parametrize("save_last", [True, "link"])
def test_a_failed_write_forgets_last_model_path_only_for_a_link_never_made(
    save_last: Any, tmp_path: Path
) -> None:
    """A top-k write failed while ``last.ckpt`` does not exist yet. With save_last=True
    that is its own write, queued behind (a CheckpointIO's writes take no names): it is
    Lightning's last path all the same. With "link", it is the link that waited for the
    failed file and was never made: Lightning's state no longer names it."""
    from types import SimpleNamespace

    from lamin_lightning._evictions import _Before, _Replacement, put_right

    class FailedWrite:
        def done(self) -> bool:
            return True

        def failed(self) -> bool:
            return True

    last, failed = str(tmp_path / "last.ckpt"), str(tmp_path / "a.ckpt")
    callback = SimpleNamespace(
        best_k_models={},
        best_model_path="",
        last_model_path=last,
        monitor=None,
        _last_checkpoint_saved=failed,
        save_top_k=1,
        save_last=save_last,
        mode="min",
    )
    put_right(callback, [_Replacement(failed, FailedWrite(), _Before({}, "", "", ""))])  # type: ignore[arg-type]
    assert callback.last_model_path == (last if save_last is True else "")


@pytest.mark.parametrize("link_made", [True, False], ids=["link-made", "killed-before-the-link"])
def test_a_replay_removes_a_last_ckpt_file_only_once_its_link_stands(
    link_made: bool, tmp_path: Path
) -> None:
    """A real last.ckpt (with its artifact) that Lightning replaces by a link to a file
    written in the background: the removal of its artifact is journaled with the link's
    target. Killed after the link was made, the replay removes the artifact (a link gets
    none); killed before (the target's write still running), file and artifact stay."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    last, target = dirpath / "last.ckpt", dirpath / "epoch=0-step=4.ckpt"
    last.write_bytes(b"step 3")
    store = MemoryStore()
    saved = JobRecord(op="save", kind="checkpoint", key=key("last.ckpt"), local_path=str(last))
    store.commit(saved, store.transfer(saved, last), replay=False, set_flags=True)
    if link_made:
        target.write_bytes(b"step 4")
        last.unlink()
        last.symlink_to(target.name)
    removal = JobRecord(
        op="remove",
        kind="checkpoint",
        key=key("last.ckpt"),
        local_path=str(last),
        store="memory",
        after=str(target),
        linked=True,
    )
    journal(dirpath, removal)
    assert read_pending(staging_root(dirpath) / "outbox-test.jsonl")[0][1].linked

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert report.remaining == []
    if link_made:
        assert report.removed == 1 and store.keys() == set()
    else:
        assert report.removed == 0 and store.keys() == {key("last.ckpt")}
        assert last.read_bytes() == b"step 3"


@pytest.mark.parametrize("recovered_by", ["flush", "setup", "setup-of-the-next-version"])
def test_a_rewrite_a_crash_cut_short_is_dropped_once_the_previous_file_is_back(
    recovered_by: str, tmp_path: Path
) -> None:
    """A CheckpointIO that writes late rewrites last.ckpt in place; the previous file waits
    aside. Killed mid-write, the next flush (or setup) puts the previous file back first,
    and the replay then persisted the interrupted save (its step, its flags) with the
    previous checkpoint's bytes. That save is now dropped when the previous file is put
    back, and the previous checkpoint keeps what it had.

    ``setup``: the next fit of the same callback, without ``ckpt_path="last"``. It
    reopens (and locks) its own journal before it puts the previous file back, and the
    drop skipped every locked journal, its own included. ``setup-of-the-next-version``:
    the killed run checkpointed into a logger's ``version_0``, the next run into
    ``version_1``; its setup replays the sibling version's journal, and put nothing back
    there first."""
    import subprocess
    import sys
    import textwrap

    dirpath = tmp_path / "ckpt"
    if recovered_by == "setup-of-the-next-version":
        dirpath = tmp_path / "logs" / "n" / "version_0" / "checkpoints"
    dirpath.mkdir(parents=True)
    last = dirpath / "last.ckpt"
    torch.save({"global_step": 1}, last)
    previous = sha256_file(last)
    buffer = io.BytesIO()
    torch.save({"global_step": 2, "w": torch.arange(4096.0)}, buffer)
    partial = tmp_path / "partial"
    partial.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    rewrite = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from lamin_lightning import _aside
        root, target, partial = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
        _aside.move_aside(root, target)  # before the rewrite, as the callback does
        Path(target).write_bytes(Path(partial).read_bytes())  # in place, cut short
        os._exit(0)  # the process ends holding it: a crash
        """
    )
    subprocess.run(
        [sys.executable, "-c", rewrite, str(staging_root(dirpath)), str(last), str(partial)],
        check=True,
        timeout=120,
    )
    store = MemoryStore()
    if recovered_by == "flush":
        journal(dirpath, _save(last, written_later=True))
        report = flush_directory(dirpath, progress=False, stores={"memory": store})
        assert report.remaining == []
    elif recovered_by == "setup":
        # Saves nothing itself (every_n_train_steps beyond the fit): only the replay of
        # its own journal, the killed run's, persists.
        callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=100)
        journal(dirpath, _save(last, written_later=True), name=_journal_digest(callback))
        make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader(1))
    else:
        from lightning.pytorch.loggers import CSVLogger

        callback = MemoryCheckpoint(store, every_n_train_steps=100)
        journal(dirpath, _save(last, written_later=True), name=_journal_digest(callback))
        logger = CSVLogger(tmp_path / "logs", name="n", version=1)
        make_trainer(tmp_path, [callback], max_steps=1, logger=logger).fit(TinyModel(), loader(1))
        assert Path(callback.dirpath) == dirpath.parent.parent / "version_1" / "checkpoints"

    assert sha256_file(last) == previous, "the previous checkpoint is back"
    assert store.keys() == set(), "the interrupted save was persisted with the previous bytes"
    assert pending_records(dirpath) == []


@pytest.mark.parametrize("cls_name", ["MemoryCheckpoint", "Checkpoint"])
def test_link_checkpoint_looked_up_on_the_class_is_lightnings_static_method(
    tmp_path: Path, cls_name: str
) -> None:
    """``ModelCheckpoint._link_checkpoint`` is a ``staticmethod``; code written for it
    (Lightning's own tests, plugins) calls it on the class with the trainer first. On
    our classes that call must work as on Lightning's; on an instance it is ours."""
    import lamin_lightning
    from lamin_lightning import testing

    cls = getattr(testing, cls_name, None) or getattr(lamin_lightning, cls_name)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    target = tmp_path / "epoch=0.ckpt"
    target.write_bytes(b"x")
    link = tmp_path / "last.ckpt"
    cls._link_checkpoint(trainer, filepath=str(target), linkpath=str(link))
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert cls._link_checkpoint is ModelCheckpoint._link_checkpoint
    instance = testing.MemoryCheckpoint(dirpath=tmp_path / "ckpts")
    assert instance._link_checkpoint.__self__ is instance


@pytest.mark.parametrize("links", [True, False], ids=["symlink", "copy"])
def test_a_link_replacing_a_file_never_leaves_its_name_empty(
    links: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's ``_link_checkpoint`` removes the file under the link's name, then links.
    Ours is made on a writer thread while other threads look at that name: another
    callback's eviction waiting for it to be written (``RemovalOnceWritten``: two
    callbacks sharing a templated last name, one linking it, one writing it) found
    nothing there in between and kept the file it evicted, which ModelCheckpoint removes
    (seed 8075 of the shared-name sweep, about 1 run in 2). The link (or, where links
    are refused, the copy) is made beside the name and renamed over it."""
    target, link = tmp_path / "epoch=0-step=2.ckpt", tmp_path / "last-step=4.ckpt"
    target.write_bytes(b"target")
    link.write_bytes(b"the file Lightning replaces")
    present: list[bool] = []
    real_symlink, real_copy = os.symlink, _lightning_view.shutil.copy

    def symlink(source: str, destination: str) -> None:
        present.append(os.path.lexists(link))
        if not links:
            raise PermissionError(errno.EPERM, "links are not allowed here")
        real_symlink(source, destination)

    def copy(source: str, destination: str) -> Any:
        present.append(os.path.lexists(link))
        return real_copy(source, destination)

    monkeypatch.setattr(_lightning_view.os, "symlink", symlink)
    monkeypatch.setattr(_lightning_view.shutil, "copy", copy)

    _lightning_view._link_or_copy(str(target), str(link))

    assert present == ([True] if links else [True, True]), "the name was empty meanwhile"
    if links:
        assert os.readlink(link) == target.name
    else:
        assert not link.is_symlink() and link.read_bytes() == b"target"
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, link.name]), "a temporary stayed"


def test_a_link_replacing_a_folder_checkpoint_replaces_it_as_lightning_does(
    tmp_path: Path,
) -> None:
    """A folder (a sharded checkpoint) under the link's name goes, as Lightning removes it."""
    target, link = tmp_path / "epoch=0-step=2.ckpt", tmp_path / "last.ckpt"
    target.write_bytes(b"target")
    (link / "shard").mkdir(parents=True)
    (link / "shard" / "0.distcp").write_bytes(b"x")

    _lightning_view._link_or_copy(str(target), str(link))

    assert os.readlink(link) == target.name
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, link.name])


def test_a_linked_removal_whose_link_never_came_keeps_the_file_without_a_false_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightning replaces a's file by a link to b (``save_last="link"``), b written in the
    background; the link is never made (Lightning removed or rewrote a's name first: the
    later job settles its artifact; or the process ended first). The file and its
    artifact stay, and nothing says b "was never written": it was (seen in the sweep
    of callbacks sharing a templated last name, and at a replay)."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    a, b = dirpath / "last-step=4.ckpt", dirpath / "epoch=0-step=2.ckpt"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    store = MemoryStore()
    for path in (a, b):
        saved = JobRecord(op="save", kind="checkpoint", key=key(path.name), local_path=str(path))
        store.commit(saved, store.transfer(saved, path), replay=False, set_flags=True)
    removal = dataclasses.replace(_evicted_for(a, b)[1], linked=True)
    journal(dirpath, removal, _save(dirpath / "c.ckpt"))
    (dirpath / "c.ckpt").write_bytes(b"c" * 100)
    caplog.set_level(logging.WARNING, logger="lamin_lightning")

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert report.remaining == [] and report.failed == 0
    assert a.exists() and not a.is_symlink()
    assert_store_equals_files(store, dirpath)
    assert "was never written" not in caplog.text, caplog.text


def test_a_temporary_link_a_killed_process_left_is_deleted_by_the_next_flush(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed between making a link beside its name and renaming it over that
    name leaves ``.{name}.{pid}.{thread}.link`` in the checkpoint folder, which holds only
    what Lightning leaves there: the next holder (here a flush) deletes it, by its age
    (a live one is renamed within microseconds; a pid says nothing in another container,
    and a container's trainer is PID 1 every time, this one's included). A fresh one is
    left alone, as is any other hidden file of the user's."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    (dirpath / "a.ckpt").write_bytes(b"a")
    old = time.time() - 60
    dead = dirpath / f".last.ckpt.{os.getpid()}.140000.link"
    os.symlink("a.ckpt", dead)
    copied = dirpath / ".last-v1.ckpt.1.140001.link"
    copied.write_bytes(b"a")  # the copy made where links are refused
    for path in (dead, copied):
        os.utime(path, (old, old), follow_symlinks=False)
    fresh = dirpath / ".last.ckpt.1.140000.link"
    os.symlink("a.ckpt", fresh)
    users = dirpath / ".notes.1.2.link.txt"
    users.write_text("mine")
    os.utime(users, (old, old))
    journal(dirpath, _save(dirpath / "a.ckpt"))
    caplog.set_level(logging.WARNING, logger="lamin_lightning")

    flush_directory(dirpath, progress=False, stores={"memory": MemoryStore()})

    assert not os.path.lexists(dead) and not copied.exists()
    assert os.path.islink(fresh) and users.exists()
    assert "deleted 2 temporary link(s)" in caplog.text, caplog.text


def test_a_temporary_link_of_an_earlier_process_of_this_pid_is_never_written_through(
    tmp_path: Path,
) -> None:
    """A temporary link left under the name this process and thread would use (a
    container's PID 1, killed mid-link, then restarted): it is replaced, never followed.
    Before, making the link failed (EEXIST), the copy fallback wrote the target's bytes
    into the checkpoint the stale link named, and the stale link was renamed into place."""
    from lamin_lightning._staging import link_temporary

    older, target = tmp_path / "epoch=0-step=1.ckpt", tmp_path / "epoch=0-step=9.ckpt"
    older.write_bytes(b"step 1")
    target.write_bytes(b"step 9")
    link = tmp_path / "last.ckpt"
    os.symlink(older.name, link_temporary(str(link)))

    _lightning_view._link_or_copy(str(target), str(link))

    assert older.read_bytes() == b"step 1"
    assert os.readlink(link) == target.name
    assert sorted(os.listdir(tmp_path)) == sorted([older.name, target.name, link.name])


def test_a_replay_drops_a_late_folder_its_write_never_marked_complete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CheckpointIO of the user's writes each checkpoint as a folder, in place, under
    AsyncCheckpointIO: a process killed mid-write leaves a partial folder at the name. A
    folder cannot be judged as a zip can, and the replay persisted it, an artifact that
    does not load (crash sweep seed 1029 --folder). Now the write notes the folder it
    completed in the journal; a folder with no such mark, or the mark of another folder
    (a later rewrite's, where the one marked was set aside), is dropped as cut short and
    left where it is; a marked one is persisted, also after a compaction; a folder of a
    record journaled before the mark existed, as before."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    names = ("cut.ckpt", "done.ckpt", "other.ckpt", "older.ckpt")
    cut, done, other, older = (dirpath / n for n in names)
    for folder in (cut, done, other, older):
        folder.mkdir()
        (folder / "shard-0").write_bytes(b"a shard of " + folder.name.encode())
    outbox = Outbox(staging_root(dirpath) / "outbox-test.jsonl")
    outbox.open()
    ids = {
        path: outbox.append(_save(path, written_later=True, marks_folder=True))
        for path in (cut, done, other)
    }
    outbox.append(_save(older, written_later=True))
    for path, marked in ((done, done), (other, done)):
        identity = file_identity(marked)
        assert identity is not None
        outbox.mark_written(ids[path], identity)
    outbox._compact_unlocked()
    outbox.close()
    store = MemoryStore()
    caplog.set_level(logging.WARNING, logger="lamin_lightning")

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert sorted(r.key for r in report.dropped) == [key("cut.ckpt"), key("other.ckpt")]
    assert report.remaining == [] and report.failed == 0
    assert store.keys() == {key("done.ckpt"), key("older.ckpt")}
    assert all(path.is_dir() for path in (cut, done, other, older)), "folders are left"
    warned = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert any(str(cut) in m for m in warned) and any(str(other) in m for m in warned)


@pytest.mark.parametrize("ends", ["before the next open", "during the replay's wait"])
@pytest.mark.parametrize("stopped", ["closed", "lingering"])
def test_a_late_folder_write_that_ends_after_its_fit_stopped_is_persisted_by_a_replay_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ends: str, stopped: str
) -> None:
    """A fit in a notebook Ctrl+C'd (twice) while AsyncCheckpointIO still wrote a folder
    checkpoint: its callback let the journal go (closed, or kept for its pipeline's thread
    still waiting for the write, then taken over by the next opener here). The write's
    mark of the folder it completed then went to the journal object that no longer held
    it, and was dropped; and a replay that waited for the write (the next fit's setup, a
    flush) judged the record it had read before the wait. Either way the whole folder was
    dropped as cut short, never persisted, and the warning said to delete it. The mark
    now reaches this process's next holder of the journal, and the replay reads the
    records again after its wait."""
    from lamin_lightning import _replay
    from lamin_lightning._journal import keep_until_done
    from lamin_lightning._names import release_name, take_name
    from lamin_lightning._replay import Settle

    dirpath = tmp_path / "ckpt"
    folder = dirpath / "last.ckpt"
    folder.mkdir(parents=True)
    take_name(folder)  # its write runs
    (folder / "shard-0").write_bytes(b"a shard")
    first = Outbox(staging_root(dirpath) / "outbox-test.jsonl")
    first.open()
    settle = Settle(first, first.append(_save(folder, written_later=True, marks_folder=True)))
    release = threading.Event()
    intake = threading.Thread(target=release.wait)  # the stopped pipeline's, waiting
    intake.start()
    keep_until_done(first, [intake] if stopped == "lingering" else [])

    def write_ends() -> None:
        identity = file_identity(folder)
        assert identity is not None
        settle.written(identity)
        release_name(folder)

    if ends == "before the next open":
        write_ends()
    else:
        waited = _replay.wait_until_written

        def wait(paths: Any, timeout: float) -> set[str]:
            if timeout > 0:  # the replay waits for the write: it ends meanwhile
                write_ends()
            return waited(paths, timeout)

        monkeypatch.setattr(_replay, "wait_until_written", wait)
    store = MemoryStore()
    try:
        report = flush_directory(dirpath, progress=False, stores={"memory": store})
    finally:
        release.set()
        intake.join()

    assert report.dropped == [] and report.failed == 0 and report.remaining == []
    assert store.keys() == {key("last.ckpt")}
    assert store.get(key("last.ckpt")).sha256 == content_sha256(folder)  # type: ignore[union-attr]


@pytest.mark.parametrize("submitted_at", [0.0, 1_700_000_000.0], ids=["no-time", "one-tick"])
def test_a_flush_reports_each_of_two_alike_jobs_of_a_journal(
    tmp_path: Path, submitted_at: float
) -> None:
    """Two saves of ``last.ckpt`` journaled alike: in one tick of the clock, or by an
    earlier version that wrote no time (read back as 0). The flush persists the file once
    and reports the other job dropped. It told jobs apart by their content since a replay
    may read a record again, so both counted as the one that had its event: the report
    (and ``flush``'s output) named neither as dropped, one job unaccounted for."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    last = dirpath / "last.ckpt"
    last.write_bytes(b"a whole checkpoint")
    outbox = Outbox(staging_root(dirpath) / "outbox-test.jsonl")
    outbox.open()
    for _ in range(2):
        outbox.append(_save(last, submitted_at=submitted_at))
    outbox.close()
    store = MemoryStore()

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert store.keys() == {key("last.ckpt")} and report.failed == 0
    assert len(report.events) == 1 and report.remaining == []
    assert [r.key for r in report.dropped] == [key("last.ckpt")]
