"""The Lightning layer end to end on CPU, persisting into a MemoryStore.

Every fit is a real ``Trainer.fit`` of a tiny model. Concurrency is controlled
with the store's hang()/wait_until_hanging()/release() and callbacks that run at
known points of the training loop; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from helpers import (
    EndTrainingOnceSet,
    HoldingObserver,
    TinyModel,
    checkpoint_files,
    lightning_kept_paths,
    loader,
    make_trainer,
    sha256_file,
    staged_files,
)
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    PermanentError,
    PersistenceError,
    RetryPolicy,
)
from lamin_lightning._flush import flush_directory
from lamin_lightning._journal import journal_paths, read_pending
from lamin_lightning._staging import Stager, staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

TIMEOUT = 10.0
HOLD = 0.5

# ``score`` logged at training step i (the checkpoint after step i+1 sees it).
# Checkpoints every 2 steps see 1, 3, 2, 5, 1, 4, 6, 0.5: with top-2 (max) that
# saves, evicts, skips and evicts again.
UP_AND_DOWN = [0, 1, 0, 3, 0, 2, 0, 5, 0, 1, 0, 4, 0, 6, 0, 0.5]


def key(name: str) -> str:
    return f"checkpoints/{name}"


def keys_of(paths: Any) -> set[str]:
    return {key(Path(p).name) for p in paths}


class HashingCheckpoint(MemoryCheckpoint):
    """Records (key, sha256 of the bytes Lightning just wrote) after every local save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[tuple[str, str]] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.written.append((key(Path(filepath).name), sha256_file(filepath)))

    def hashes(self, k: str) -> list[str]:
        return [digest for written_key, digest in self.written if written_key == k]


class StagingCheckpoint(HashingCheckpoint):
    """Also records the inode of every file Lightning wrote and of every file an upload read.

    An upload reads the staged copy of a file: the same inode as the file Lightning
    wrote if it was staged by hard link, another one if it was copied (the copy is made
    while the written file still exists, so it cannot reuse its inode).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written_inodes: dict[tuple[str, str], tuple[int, int]] = {}
        self.uploaded_inodes: list[tuple[tuple[str, str], tuple[int, int]]] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        info = os.stat(filepath)
        self.written_inodes[self.written[-1]] = (info.st_dev, info.st_ino)

    def save_checkpoint_artifact(
        self, trainer: pl.Trainer, filepath: Path | str, **kwargs: Any
    ) -> Any:
        artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
        info = os.stat(filepath)
        written = (artifact.key, artifact.sha256)  # the key and bytes identify the write
        self.uploaded_inodes.append((written, (info.st_dev, info.st_ino)))
        return artifact

    def staging_methods(self) -> set[str]:
        """How the file of every upload was staged: ``"link"`` or ``"copy"``."""
        return {
            "link" if self.written_inodes[written] == inode else "copy"
            for written, inode in self.uploaded_inodes
        }


class Probe(pl.Callback):
    """Runs a function at a named hook (other callbacks' hooks run before the checkpoint's)."""

    def __init__(self, **hooks: Any) -> None:
        self.hooks = hooks
        self.seen: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if "on_train_batch_end" in self.hooks:
            self.hooks["on_train_batch_end"](trainer, self.seen)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "on_train_end" in self.hooks:
            self.hooks["on_train_end"](trainer, self.seen)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if "on_exception" in self.hooks:
            self.hooks["on_exception"](trainer, self.seen)


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lamin-lightning-")]


# -- the main guarantee ----------------------------------------------------------------------


def test_fit_persists_exactly_what_lightning_kept_in_order_with_matching_flags(
    tmp_path: Path,
) -> None:
    """After fit the store holds exactly Lightning's top-k + last; events ordered; flags match."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore(latency=0.01)
    store.fail_randomly(0.25, seed=3)
    observer = RecordingObserver()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=2,
        save_last=True,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=30),
        max_workers=2,
        max_pending=4,
    )
    make_trainer(tmp_path, [callback], max_epochs=1).fit(TinyModel(scores=UP_AND_DOWN), loader(16))

    kept = checkpoint_files(dirpath)
    assert kept == {"epoch=0-step=8.ckpt", "epoch=0-step=14.ckpt", "last.ckpt"}
    assert store.keys(kind="checkpoint") == {key(name) for name in kept}
    for name in kept:
        assert store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]

    events = observer.events
    stats = callback.persistence_stats
    saved = [e for e in events if isinstance(e, ArtifactSavedEvent)]
    removed = [e for e in events if isinstance(e, ArtifactRemovedEvent)]
    assert not [e for e in events if isinstance(e, ArtifactFailedEvent)]
    assert stats.retried > 0, "the store's random failures did not trigger"
    # Exactly once: every finished job delivered once, no saved version delivered twice.
    assert (stats.saved, stats.removed) == (len(saved), len(removed))
    assert stats.finished == stats.submitted
    assert stats.pending == 0
    assert len({e.storage_uri for e in saved}) == len(saved)
    assert len({e.key for e in removed}) == len(removed)
    # A key's removal comes after each of its saves, and nothing follows it.
    for removal in removed:
        position = events.index(removal)
        assert any(e.key == removal.key for e in saved[:position])
        assert all(e.key != removal.key for e in events[position + 1 :])
    assert {e.key for e in removed} == {key(f"epoch=0-step={s}.ckpt") for s in (2, 4, 6, 12)}
    # Retries were idempotent: one version per top-k key.
    for name in kept - {"last.ckpt"}:
        assert store.get(key(name)).version == 1  # type: ignore[union-attr]

    # Order-dependent metadata ends as Lightning's final state.
    flags = store.flags
    assert set(flags) == store.keys(kind="checkpoint")
    assert {k for k, f in flags.items() if f["is_best_model"]} == keys_of(
        [callback.best_model_path]
    )
    assert {k for k, f in flags.items() if f["is_last_model"]} == keys_of(
        [callback.last_model_path]
    )
    ranking = sorted(callback.best_k_models, key=lambda p: -float(callback.best_k_models[p]))
    assert [key(Path(p).name) for p in ranking] == sorted(
        (k for k, f in flags.items() if f["model_rank"] is not None),
        key=lambda k: flags[k]["model_rank"],
    )
    assert flags[key("last.ckpt")]["model_rank"] is None

    assert observer.threads == {"lamin-lightning-delivery"}
    assert staged_files(dirpath) == []
    assert callback.last_checkpoint_artifact == store.get(key("last.ckpt"))


def test_a_slow_store_does_not_stall_training(tmp_path: Path) -> None:
    """With 0.5 s per upload and room in the queue, a save costs training far less than 0.5 s."""

    class TimedCheckpoint(MemoryCheckpoint):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.overheads: list[float] = []

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            local: list[float] = []
            save_locally = trainer.save_checkpoint

            def timed_local_write(*args: Any, **kwargs: Any) -> None:
                start = time.perf_counter()
                save_locally(*args, **kwargs)
                local.append(time.perf_counter() - start)

            trainer.save_checkpoint = timed_local_write  # type: ignore[method-assign]
            start = time.perf_counter()
            try:
                super()._save_checkpoint(trainer, filepath)
            finally:
                del trainer.save_checkpoint
            self.overheads.append(time.perf_counter() - start - sum(local))

    store = MemoryStore(latency=0.5)
    callback = TimedCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=1,
        max_workers=4,
        max_pending=8,
        retry=RetryPolicy.no_delay(),
    )
    make_trainer(tmp_path, [callback], max_steps=6).fit(TinyModel(), loader(6))

    stats = callback.persistence_stats
    assert len(callback.overheads) == 6
    assert max(callback.overheads) < 0.1, callback.overheads
    assert stats.max_training_stall_seconds < 0.1
    assert stats.admission_waits == 0
    assert stats.saved == 6
    assert stats.max_persistence_latency_seconds >= 0.5  # the latency was real
    assert store.keys(kind="checkpoint") == keys_of(checkpoint_files(tmp_path / "ckpt"))


def test_an_exception_mid_fit_flushes_and_reaches_the_caller(tmp_path: Path) -> None:
    """An error in training_step still persists everything submitted and is raised unchanged."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()

    def at_exception(trainer: pl.Trainer, seen: dict[str, Any]) -> None:
        # Runs before the checkpoint callback's on_exception: nothing is persisted yet.
        seen["hanging"] = store.wait_until_hanging(2)
        seen["pending"] = [job.key for job in callback.pending_artifacts()]
        seen["stored"] = store.keys()
        store.release()

    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=2,
        max_pending=8,
        retry=RetryPolicy.no_delay(),
    )
    probe = Probe(on_exception=at_exception)
    trainer = make_trainer(tmp_path, [callback, probe], max_steps=20)
    with pytest.raises(RuntimeError, match=r"^boom at step 7$"):
        trainer.fit(TinyModel(fail_at_step=7), loader(20))

    expected = {key(f"epoch=0-step={s}.ckpt") for s in (2, 4, 6)}
    assert probe.seen["hanging"]
    assert set(probe.seen["pending"]) == expected, (probe.seen, callback.persistence_stats)
    assert probe.seen["stored"] == set()
    assert store.keys(kind="checkpoint") == expected == keys_of(checkpoint_files(dirpath))
    assert callback.persistence_stats.pending == 0
    assert pool_threads() == []
    assert staged_files(dirpath) == []


def test_validate_fit_test_in_one_process_restart_the_pool_lazily(tmp_path: Path) -> None:
    """validate, fit and test with one trainer and callback each run (and stop) their own pool."""
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=2,
        retry=RetryPolicy.no_delay(),
    )
    alive: dict[str, int] = {}

    class ThreadProbe(pl.Callback):
        def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            alive.setdefault("validate", len(pool_threads()))

        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            alive["fit start"] = len(pool_threads())

        def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            alive["fit"] = len(pool_threads())

        def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            alive["test"] = len(pool_threads())

    model = TinyModel()
    trainer = make_trainer(tmp_path, [callback, ThreadProbe()], max_steps=4)
    trainer.validate(model, loader(2))
    assert pool_threads() == []
    trainer.fit(model, loader(4))
    assert pool_threads() == []
    trainer.test(model, loader(2))
    assert pool_threads() == []

    # None for validate and test (nothing to persist); for fit, started at its setup (the
    # first checkpoint does not wait for them) and running before the first step: a
    # full pool (workers, committer, delivery, ...), stopped at teardown.
    assert set(alive) == {"validate", "fit start", "fit", "test"}
    assert alive["validate"] == alive["test"] == 0
    assert alive["fit start"] >= callback.max_workers + 2
    assert alive["fit"] >= callback.max_workers + 2
    assert store.keys(kind="checkpoint") == {key("epoch=0-step=2.ckpt"), key("epoch=0-step=4.ckpt")}
    assert callback.persistence_stats.saved == 2


# -- nothing lost ------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [4, 512], ids=["small-file-copied", "large-file-linked"])
def test_eviction_and_overwrite_while_uploads_hang_lose_nothing(tmp_path: Path, width: int) -> None:
    """Evicting and rewriting files whose uploads are in flight or queued stores the right bytes."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    first = key("epoch=0-step=2.ckpt")

    def at_train_end(trainer: pl.Trainer, seen: dict[str, Any]) -> None:
        # Every save and eviction has happened; the first uploads are still stuck.
        seen["hanging"] = store.wait_until_hanging(2)
        seen["states"] = {(job.key, job.state) for job in callback.pending_artifacts()}
        seen["first_on_disk"] = (dirpath / "epoch=0-step=2.ckpt").exists()
        seen["last_now"] = sha256_file(dirpath / "last.ckpt")
        store.release()

    callback = StagingCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=2,
        save_last=True,
        max_workers=2,
        max_pending=64,
        retry=RetryPolicy.no_delay(),
    )
    observer = RecordingObserver()
    callback.add_artifact_observer(observer)
    probe = Probe(on_train_end=at_train_end)
    model = TinyModel(width=width, scores=UP_AND_DOWN)
    make_trainer(tmp_path, [callback, probe], max_epochs=1).fit(model, loader(16, width))

    # The race really happened: both first uploads were in flight when their files changed.
    assert probe.seen["hanging"]
    assert (first, "transferring") in probe.seen["states"]
    assert (key("last.ckpt"), "transferring") in probe.seen["states"]
    assert not probe.seen["first_on_disk"]
    assert probe.seen["last_now"] != callback.hashes(key("last.ckpt"))[0]
    assert callback.staging_methods() == ({"link"} if width == 512 else {"copy"})

    stats = callback.persistence_stats
    assert stats.cancelled >= 1  # evicted before its upload started
    assert stats.superseded >= 1  # last.ckpt rewritten before its upload started

    # Every upload read the bytes Lightning wrote at that step, in order.
    saved = observer.of_type(ArtifactSavedEvent)
    for k in {e.key for e in saved}:
        uploaded = [e.artifact.sha256 for e in saved if e.key == k]
        written = callback.hashes(k)
        if k in (first, key("last.ckpt")):  # in flight while Lightning evicted/rewrote it
            assert uploaded[0] == written[0]
        remaining = iter(written)
        assert all(digest in remaining for digest in uploaded), (k, uploaded, written)
    # The final state is the final bytes.
    kept = checkpoint_files(dirpath)
    assert store.keys(kind="checkpoint") == {key(name) for name in kept}
    for name in kept:
        stored = store.get(key(name))
        assert stored is not None
        assert stored.sha256 == callback.hashes(key(name))[-1] == sha256_file(dirpath / name)
    assert store.get(first) is None
    assert staged_files(dirpath) == []


def test_a_file_evicted_before_it_was_staged_is_still_persisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning deleting a file whose staging is still pending waits for it: nothing fails.

    Patches ``Stager.stage`` (private): staging runs on the pipeline's intake thread, and
    with Lightning's own (synchronous) write nothing a user controls runs there before it,
    so there is no public point at which to hold it back. (With ``async_write`` the same
    race is driven from outside, in ``test_async_write.py``.)
    """
    dirpath = tmp_path / "ckpt"
    first = dirpath / "epoch=0-step=1.ckpt"
    deleted = threading.Event()
    real_stage = Stager.stage
    held: list[bool] = []

    def held_back_stage(self: Stager, path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == first:
            # Hold the first file's staging until Lightning deleted the file, for at most
            # HOLD seconds. A callback that waits for staging before deleting never lets
            # the deletion happen first, so the hold runs out and staging finds the file.
            held.append(deleted.wait(HOLD))
        return real_stage(self, path, *args, **kwargs)

    class SignallingCheckpoint(HashingCheckpoint):
        def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._remove_checkpoint(trainer, filepath)
            if Path(filepath) == first:
                deleted.set()

    monkeypatch.setattr(Stager, "stage", held_back_stage)
    observer = RecordingObserver()
    callback = SignallingCheckpoint(
        MemoryStore(),
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(),
    )
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(scores=[1.0, 2.0]), loader(2))

    assert held == [False]  # staging ran before the deletion
    assert not first.exists()
    assert observer.of_type(ArtifactFailedEvent) == []
    assert callback.persistence_stats.failed == 0
    saved_first = [e for e in observer.of_type(ArtifactSavedEvent) if e.key == key(first.name)]
    if saved_first:  # uploaded before its removal (else cancelled by it): the right bytes
        assert saved_first[0].artifact.sha256 == callback.hashes(key(first.name))[0]
    assert observer.keys(ArtifactRemovedEvent) == [key(first.name)]
    assert store_keys(callback) == {key("epoch=0-step=2.ckpt")}
    assert staged_files(dirpath) == []


def store_keys(callback: MemoryCheckpoint) -> set[str]:
    return callback.store.keys(kind="checkpoint")


# -- errors reach the user ---------------------------------------------------------------------


def failing_callback(store: MemoryStore, dirpath: Path, **kwargs: Any) -> MemoryCheckpoint:
    store.fail_always()
    return MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        retry=RetryPolicy.no_delay(),
        **kwargs,
    )


def test_on_error_raise_raises_persistence_error_at_teardown(tmp_path: Path) -> None:
    """A permanently failing store makes fit raise PersistenceError naming the key; file kept."""
    dirpath = tmp_path / "ckpt"
    observer = RecordingObserver()
    callback = failing_callback(
        MemoryStore(),
        dirpath,
        every_n_train_steps=4,
        on_error="raise",
        artifact_observers=[observer],
    )
    with pytest.raises(PersistenceError) as info:
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))

    failed_key = key("epoch=0-step=4.ckpt")
    assert [f.key for f in info.value.failures] == [failed_key]
    assert info.value.failures[0].attempts == 1
    assert isinstance(info.value.failures[0].error, PermanentError)
    assert failed_key in str(info.value)
    assert observer.keys(ArtifactFailedEvent) == [failed_key]
    kept = staged_files(dirpath)
    assert [p.name for p in kept] == ["epoch=0-step=4.ckpt"]
    assert sha256_file(kept[0]) == sha256_file(dirpath / "epoch=0-step=4.ckpt")
    assert pool_threads() == []


def test_the_persistence_error_gives_the_flush_command_for_this_dirpath(tmp_path: Path) -> None:
    """The fix in the message is a command to paste: this run's dirpath, quoted for the
    shell (a space in it), not a placeholder; the files it says are kept exist."""
    dirpath = tmp_path / "my checkpoints"
    callback = failing_callback(MemoryStore(), dirpath, every_n_train_steps=4, on_error="raise")
    with pytest.raises(PersistenceError) as info:
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))

    said = str(info.value)
    assert f"run `lamin-lightning flush '{dirpath}'`" in said
    assert "could not be persisted; the local files are kept:" in said
    assert (dirpath / "epoch=0-step=4.ckpt").is_file()


@pytest.mark.parametrize("later", ["save", "remove"])
def test_a_failure_a_later_job_of_its_key_made_moot_is_reported_as_such(
    tmp_path: Path, later: str
) -> None:
    """A failed save whose key a later job then settled (the next ``last.ckpt`` persisted,
    or Lightning evicted the file) is reported with nothing left to persist: the outbox
    settled it as obsolete, so "they stay in the outbox" would send the user to a flush
    that finds nothing."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()  # nothing is persisted before training ends: the report comes at teardown
    store.fail_next(1, error=lambda: PermanentError("quota exceeded"))
    if later == "save":  # last.ckpt twice: the second save of the key persists
        options: dict[str, Any] = {"save_top_k": 0, "save_last": True}
        failed = key("last.ckpt")
    else:  # top-1: step 2's save evicts step 1's file, whose save fails
        options = {"save_top_k": 1}
        failed = key("epoch=0-step=1.ckpt")
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        every_n_train_steps=1,
        retry=RetryPolicy.no_delay(),
        max_workers=1,  # the failure goes to the first upload, not to whichever runs first
        **options,
    )
    probe = Probe(on_train_end=lambda trainer, seen: store.release())
    with pytest.raises(PersistenceError) as info:
        make_trainer(tmp_path, [probe, callback], max_steps=2).fit(TinyModel(), loader(2))

    said = str(info.value)
    assert [f.key for f in info.value.failures] == [failed]
    note = "replaced since by a later save" if later == "save" else "its key was removed since"
    assert f"{failed!r} after 1 attempt(s): PermanentError: quota exceeded ({note}" in said
    assert "Nothing of them is left to persist" in said
    assert "stay in the outbox" not in said and "flush" not in said
    # What the message says: a flush finds nothing of it (the failed job was settled).
    report = flush_directory(dirpath, progress=False, stores={"memory": store})
    assert (report.events, report.remaining, report.dropped) == ([], [], [])
    assert staged_files(dirpath) == []


def test_after_a_crash_a_failure_a_later_save_made_moot_is_logged_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Training raises: the failures are logged (the crash goes on), and one that a later
    save of its key made moot says so, at warning level, instead of "not persisted" as
    an error alone."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()  # nothing persists before the crash: the failures come in its flush
    store.fail_next(1, error=lambda: PermanentError("quota exceeded"))
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        every_n_train_steps=1,
        save_top_k=0,
        save_last=True,
        retry=RetryPolicy.no_delay(),
        max_workers=1,
    )
    probe = Probe(on_exception=lambda trainer, seen: store.release())
    with (
        caplog.at_level(logging.WARNING, logger="lamin_lightning"),
        pytest.raises(RuntimeError, match="boom"),
    ):
        make_trainer(tmp_path, [probe, callback], max_steps=4).fit(
            TinyModel(fail_at_step=2), loader(4)
        )

    said = [r for r in caplog.records if r.getMessage().startswith("not persisted:")]
    assert [r.levelno for r in said] == [logging.WARNING], [r.getMessage() for r in said]
    assert "'checkpoints/last.ckpt'" in said[0].getMessage()
    assert "replaced since by a later save of its key" in said[0].getMessage()
    assert store.keys() == {key("last.ckpt")}


def test_without_an_outbox_the_persistence_error_names_no_flush(tmp_path: Path) -> None:
    """With ``outbox=False`` nothing retries a failed save: the message says so, instead
    of a flush command that would find nothing."""
    dirpath = tmp_path / "ckpt"
    callback = failing_callback(
        MemoryStore(), dirpath, every_n_train_steps=4, on_error="raise", outbox=False
    )
    with pytest.raises(PersistenceError) as info:
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))

    said = str(info.value)
    assert [f.key for f in info.value.failures] == [key("epoch=0-step=4.ckpt")]
    assert "no outbox (outbox=False)" in said and "Pass outbox=True" in said
    assert "run `lamin-lightning flush" not in said and "stay in the outbox" not in said
    assert (dirpath / "epoch=0-step=4.ckpt").is_file()


def test_on_error_raise_raises_at_the_next_save(tmp_path: Path) -> None:
    """A failure delivered before the next save is raised by that save, on the training thread."""
    dirpath = tmp_path / "ckpt"
    observer = RecordingObserver()

    def after_batch(trainer: pl.Trainer, seen: dict[str, Any]) -> None:
        if trainer.global_step == 3:
            seen["failed"] = observer.wait_for(1)

    callback = failing_callback(
        MemoryStore(), dirpath, every_n_train_steps=2, artifact_observers=[observer]
    )
    probe = Probe(on_train_batch_end=after_batch)
    trainer = make_trainer(tmp_path, [callback, probe], max_steps=8)
    with pytest.raises(PersistenceError, match=r"epoch=0-step=2\.ckpt") as info:
        trainer.fit(TinyModel(), loader(8))

    assert probe.seen["failed"]
    assert [f.key for f in info.value.failures] == [key("epoch=0-step=2.ckpt")]
    assert trainer.global_step == 4
    assert checkpoint_files(dirpath) == {"epoch=0-step=2.ckpt"}  # step 4 never written


def test_on_error_warn_warns_and_fit_returns(tmp_path: Path) -> None:
    """on_error='warn' turns the failure into a UserWarning naming the key; the file is kept."""
    dirpath = tmp_path / "ckpt"
    callback = failing_callback(MemoryStore(), dirpath, every_n_train_steps=4, on_error="warn")
    with pytest.warns(UserWarning, match=r"checkpoints/epoch=0-step=4\.ckpt"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))
    assert callback.persistence_stats.failed == 1
    assert [p.name for p in staged_files(dirpath)] == ["epoch=0-step=4.ckpt"]


def test_teardown_flush_timeout_warns_with_the_unpersisted_keys(tmp_path: Path) -> None:
    """A teardown flush that times out warns with the keys not persisted and does not hang fit."""
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=2,
        flush_timeout=0.2,
        retry=RetryPolicy.no_delay(),
    )
    try:
        with pytest.warns(UserWarning, match=r"flush_timeout.*epoch=0-step=2\.ckpt"):
            make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
        assert store.keys() == set()
        assert [p.name for p in staged_files(tmp_path / "ckpt")] == ["epoch=0-step=2.ckpt"]
        # What it left in the outbox is what the callback still answers with afterwards
        # (flush() said True and pending_artifacts() [] once the pipeline was gone).
        assert [j.key for j in callback.pending_artifacts()] == ["checkpoints/epoch=0-step=2.ckpt"]
        assert callback.flush(0) is False
        assert callback.persistence_stats.pending == 1
    finally:
        store.release()
        for thread in pool_threads():  # the abandoned upload's worker ends once released
            thread.join(TIMEOUT)


# -- configuration ------------------------------------------------------------------------------


class _FullCheckpointsSlow(MemoryStore):
    """A store whose upload of a full checkpoint (not weights only) is slow: latency,
    not a fault."""

    def __init__(self) -> None:
        super().__init__()
        self.slowed = threading.Event()

    def put(self, key: str, path: str | Path, **kwargs: Any) -> Any:
        if "optimizer_states" in torch.load(path, weights_only=False):
            self.slowed.set()
            time.sleep(0.5)
        return super().put(key, path, **kwargs)


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
def test_two_callbacks_saving_one_name_leave_the_later_save_in_the_store(
    tmp_path: Path, async_write: bool
) -> None:
    """Two of our callbacks in one folder, without Lightning's version counter, both save
    ``last.ckpt`` at one step: the later save (the second callback's) is what the folder
    holds, as with ModelCheckpoint, and what the key's artifact holds. Its upload waits
    for the earlier save's job, whose upload is slow here: before, each pipeline went on
    alone, the earlier job finished last, and the artifact held the earlier bytes."""
    store = _FullCheckpointsSlow()
    options: dict[str, Any] = {
        "dirpath": tmp_path / "ckpt",
        "save_top_k": 0,
        "save_last": True,
        "every_n_train_steps": 1,
        "enable_version_counter": False,
        "async_write": async_write,
    }
    first = MemoryCheckpoint(store, **options)
    # Other bytes; another state_key (mode plays no part without a monitor).
    second = MemoryCheckpoint(store, save_weights_only=True, mode="max", **options)
    trainer = make_trainer(tmp_path, [first, second], max_steps=1)
    trainer.fit(TinyModel(), loader(1))

    assert store.slowed.is_set()
    assert checkpoint_files(tmp_path / "ckpt") == {"last.ckpt"}
    assert "optimizer_states" not in torch.load(tmp_path / "ckpt" / "last.ckpt")  # second's
    assert store.keys() == {"checkpoints/last.ckpt"}, store.keys()
    stored = store.get("checkpoints/last.ckpt")
    assert stored is not None and stored.version == 2
    assert stored.sha256 == sha256_file(tmp_path / "ckpt" / "last.ckpt")
    assert first.persistence_stats.failed == second.persistence_stats.failed == 0


def test_a_job_another_callback_abandoned_does_not_hold_up_the_next_fit(tmp_path: Path) -> None:
    """Two callbacks sharing names (B without the version counter); B's storage hangs in
    the first fit and its teardown gives up (``flush_timeout``), abandoning jobs of the
    shared keys. In a second fit with the same callbacks (a notebook's next cell), A's
    jobs of those keys waited for B's abandoned ones for ever (B's pipeline runs again),
    and A's teardown gave up in turn, leaving A's store behind Lightning. Now a job
    stops waiting for one whose pipeline is gone. Found by an adversarial run."""
    dirpath = tmp_path / "ckpts"
    store_a, store_b = MemoryStore(), MemoryStore()
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "save_last": True,
        "save_top_k": 1,
        "flush_timeout": 2,
        "on_error": "warn",
    }
    first = MemoryCheckpoint(store_a, **options)
    second = MemoryCheckpoint(store_b, enable_version_counter=False, mode="max", **options)
    store_b.hang()
    with pytest.warns(UserWarning, match="did not finish within flush_timeout"):
        make_trainer(tmp_path, [first, second], max_epochs=1).fit(TinyModel(), loader(4))
    store_b.release()

    first.flush_timeout = 60.0  # a wait for B's abandoned jobs would outlast it
    make_trainer(tmp_path, [first, second], max_epochs=2).fit(TinyModel(), loader(4))

    assert first.persistence_stats.pending == 0
    assert store_a.keys() == {"checkpoints/epoch=1-step=8.ckpt", "checkpoints/last.ckpt"}
    assert store_a.get("checkpoints/last.ckpt").version == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_workers": 0}, "max_workers"),
        ({"max_pending": -1}, "max_pending"),
        ({"on_error": "boom"}, "on_error"),
        ({"flush_timeout": -1}, "flush_timeout"),
        ({"retry": "x"}, "retry"),
        ({"dirpath": "s3://bucket/x"}, "dirpath"),
    ],
)
def test_invalid_knobs_raise_value_error_naming_the_parameter(
    kwargs: dict[str, Any], name: str
) -> None:
    """Each invalid async knob raises ValueError whose message names it."""
    with pytest.raises(ValueError, match=name):
        MemoryCheckpoint(MemoryStore(), **kwargs)


def test_callback_pickles_and_copies_without_its_trainer_after_fit(tmp_path: Path) -> None:
    """After fit, ModelCheckpoint pickles on its own; ours held the trainer it was set up
    with, so pickling failed on anything of the trainer's that does not pickle (a lambda
    ``collate_fn``), and a deep copy copied the model and optimizer (found by an
    adversarial helper). The state Lightning saves is the same as ModelCheckpoint's."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    def fitted(callback: ModelCheckpoint) -> ModelCheckpoint:
        batches = DataLoader(list(loader(4).dataset), batch_size=1, collate_fn=lambda b: b[0])
        make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), batches)
        return callback

    ours = fitted(MemoryCheckpoint(MemoryStore(), dirpath=tmp_path / "ours"))
    plain = fitted(ModelCheckpoint(dirpath=tmp_path / "plain"))
    assert len(pickle.dumps(plain)) < 10_000
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert getattr(clone, "_trainer", None) is None
        assert clone.best_model_path == ours.best_model_path
        event = clone.last_artifact_event  # kept, without the fit's trainer
        assert event is not None and event.key == ours.last_artifact_event.key
        assert event.trainer is None and ours.last_artifact_event.trainer is not None
    assert len(pickle.dumps(ours)) < 20_000 + len(pickle.dumps(ours.store))


def test_callback_is_picklable_and_deep_copyable_before_setup(tmp_path: Path) -> None:
    """pickle and deepcopy round trips keep the knobs, and the copy still persists."""
    original = MemoryCheckpoint(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=2,
        max_workers=3,
        max_pending=7,
        retry={"attempts": 2, "initial_backoff": 0.0, "max_backoff": 0.0, "jitter": 0.0},
        flush_timeout=12.5,
        on_error="warn",
        artifact_observers=[RecordingObserver()],
    )
    knobs = ("max_workers", "max_pending", "retry", "flush_timeout", "on_error", "save_top_k")
    for clone in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
        assert isinstance(clone, MemoryCheckpoint)
        assert clone is not original
        for name in knobs:
            assert getattr(clone, name) == getattr(original, name), name
        assert clone.dirpath == original.dirpath
        assert clone.retry == RetryPolicy(attempts=2, initial_backoff=0, max_backoff=0, jitter=0)

    clone = copy.deepcopy(original)
    clone.dirpath = str(tmp_path / "clone")
    make_trainer(tmp_path, [clone], max_steps=2).fit(TinyModel(), loader(2))
    assert clone.store.keys() == {key("epoch=0-step=2.ckpt")}
    assert original.store.keys() == set()
    assert original.persistence_stats.submitted == 0


# -- observers ------------------------------------------------------------------------------------


class SavedAndRemovedOnly:
    """An observer from the reference API: no on_artifact_failed."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        self.events.append(event)

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        self.events.append(event)


class Exploding:
    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        raise RuntimeError("observer exploded")


def test_observers_without_on_artifact_failed_and_raising_observers_are_tolerated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Observers lacking on_artifact_failed work; a raising observer is logged and isolated."""
    store = MemoryStore()
    store.fail_next(1)  # the first upload fails for good (one attempt only)
    minimal, recording, exploding, removed_later = (
        SavedAndRemovedOnly(),
        RecordingObserver(),
        Exploding(),
        RecordingObserver(),
    )
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=2,
        max_workers=1,  # the first storage call is then the step-2 upload
        retry=RetryPolicy.no_delay(attempts=1),
        on_error="warn",
        artifact_observers=[exploding, minimal],
    )
    callback.add_artifact_observer(recording)
    callback.add_artifact_observer(removed_later)
    callback.remove_artifact_observer(removed_later)
    hookless = object()
    with pytest.warns(UserWarning, match="none of on_artifact_saved"):  # as the reference:
        callback.add_artifact_observer(hookless)  # type: ignore[arg-type]  # registered
    callback.remove_artifact_observer(hookless)  # type: ignore[arg-type]

    with (
        caplog.at_level(logging.ERROR, logger="lamin_lightning"),
        pytest.warns(UserWarning, match=r"epoch=0-step=2\.ckpt"),
    ):
        make_trainer(tmp_path, [callback], max_steps=6).fit(TinyModel(), loader(6))

    step = [key(f"epoch=0-step={s}.ckpt") for s in (2, 4, 6)]
    assert recording.keys() == step
    assert isinstance(recording.events[0], ArtifactFailedEvent)
    assert [e.key for e in minimal.events] == step[1:]
    assert removed_later.events == []
    raised = [r for r in caplog.records if "raised in on_artifact_saved" in r.getMessage()]
    assert len(raised) == 2
    assert all("observer exploded" in str(r.exc_info[1]) for r in raised if r.exc_info)
    assert "on_artifact_failed" not in caplog.text


class RaisingOnceOnLast(MemoryCheckpoint):
    """Its feature hook raises once, for ``last.ckpt`` at step 2: after the staging of
    that save was planned, before its job was submitted."""

    raised = False

    def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
        if snapshot.key.endswith("last.ckpt") and trainer.global_step == 2 and not self.raised:
            self.raised = True
            raise ValueError("feature lookup failed (once)")
        return super().collect_checkpoint_feature_values(trainer, snapshot)


def test_a_hook_raising_before_its_job_is_submitted_leaves_nothing_to_wait_for(
    tmp_path: Path,
) -> None:
    """The failed save's planned staging was never undone: the next fit with the same
    callback, rewriting ``last.ckpt``, waited for that staging forever."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    callback = RaisingOnceOnLast(
        store, dirpath=dirpath, save_top_k=1, every_n_train_steps=1, save_last=True
    )
    with pytest.raises(ValueError, match="once"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(8))

    outcome: list[BaseException | None] = []

    def second_fit() -> None:
        try:
            make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(8))
            outcome.append(None)
        except BaseException as error:  # reported below, on the test's thread
            outcome.append(error)

    fit_thread = threading.Thread(target=second_fit, daemon=True)
    fit_thread.start()
    fit_thread.join(timeout=120)  # a guard against the hang, not a synchronisation
    assert not fit_thread.is_alive(), "the second fit hangs"
    assert outcome == [None]
    assert store.keys(kind="checkpoint") == keys_of(lightning_kept_paths(callback))


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
@pytest.mark.parametrize("error", [ValueError, SystemExit])
def test_a_checkpoint_whose_feature_hook_raised_is_persisted_all_the_same(
    error: type[BaseException], async_write: bool, tmp_path: Path
) -> None:
    """The feature hook raises at step 2's save: the fit raises it, as before. The file
    Lightning wrote (and names in ``best_k_models``) had no job and no journal line, so
    no flush ever persisted it. It is journaled without feature values, kept from
    admission, and persisted by the flush at exit; nothing is left pending."""

    class Raising(MemoryCheckpoint):
        def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
            if trainer.global_step == 2:
                raise error("feature lookup failed")
            return super().collect_checkpoint_feature_values(trainer, snapshot)

    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = Raising(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        async_write=async_write,
    )
    with pytest.raises(error, match="feature lookup failed"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(
            TinyModel(scores=[3.0, 2.0, 1.0, 0.5]), loader(4)
        )

    kept = lightning_kept_paths(callback)
    assert {p.name for p in kept} == {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"}
    assert store.keys(kind="checkpoint") == keys_of(kept)
    for path in kept:
        stored = store.get(f"checkpoints/{path.name}")
        assert stored is not None and stored.sha256 == sha256_file(path), path.name
    assert callback.persistence_stats.failed == 0
    pending = [r for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]
    assert pending == []


def test_flush_from_an_observer_raises_instead_of_waiting_for_itself(tmp_path: Path) -> None:
    """An observer runs on the pipeline's delivery thread: its ``flush()`` waited for the
    events that thread had yet to deliver, and training, once ``max_pending`` jobs were
    outstanding, waited for it, forever. It raises now, naming the fix; training goes on."""
    errors: list[BaseException] = []

    class Flushing:
        def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
            if errors:
                return
            try:
                callback.flush()
            except RuntimeError as error:
                errors.append(error)

    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=1,
        artifact_observers=[Flushing()],
    )
    fit_thread = threading.Thread(
        target=make_trainer(tmp_path, [callback], max_steps=4).fit,
        args=(TinyModel(), loader(4)),
        daemon=True,
    )
    fit_thread.start()
    fit_thread.join(timeout=120)  # a guard against the deadlock, not a synchronisation
    assert not fit_thread.is_alive(), "training deadlocked"
    [error] = errors
    assert "flush() was called on the persistence pipeline's thread" in str(error)
    assert "from the training thread" in str(error)
    assert store.keys(kind="checkpoint") == keys_of(lightning_kept_paths(callback))


_FORK_IN_A_HOOK = """
import os, sys
import lightning.pytorch as pl
sys.path.insert(0, sys.argv[2])
from helpers import TinyModel, loader, make_trainer
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

parent = os.getpid()
report_r, report_w = os.pipe()
store = MemoryStore()
store.hang()  # the parent's saves are in flight at the fork

class ForkAndExit(pl.Callback):
    # A hook forks (an evaluation of its own, say); the child ends with sys.exit(0),
    # which unwinds through Lightning's fit in the child, as any exception there would.
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step != 3:
            return
        calls = store.calls
        child = os.fork()
        if child == 0:
            self.calls_at_fork = calls
            sys.exit(0)
        _, status = os.waitpid(child, 0)  # the parent waits for its child
        print(f"child {status}", os.read(report_r, 64).decode().strip(), flush=True)
        store.release()

callback = MemoryCheckpoint(store, dirpath=sys.argv[1], every_n_train_steps=1, save_top_k=-1,
                            save_on_exception=True, max_pending=16)
hook = ForkAndExit()
try:
    make_trainer(sys.argv[1], [callback, hook], max_steps=6).fit(TinyModel(), loader(n=6))
except SystemExit:
    if os.getpid() != parent:  # the child, back from Lightning: its own store calls
        os.write(report_w, f"{store.calls - hook.calls_at_fork}".encode())
        os._exit(0)
    raise
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_in_a_hook_that_unwinds_through_fit_neither_hangs_nor_persists(
    tmp_path: Path,
) -> None:
    """A child forked in a hook that ends with sys.exit (or an exception) unwinds through
    Lightning's fit and runs the callback's on_exception there. It flushed the pipeline,
    whose threads did not come with the fork, and so waited forever (the parent, waiting
    for its child, with it); and a close would have compacted the parent's live journal.
    Now the child behaves as ModelCheckpoint (its exception checkpoint written, nothing
    persisted from it)."""
    dirpath = tmp_path / "ckpt"
    # A session of its own: a hung child is killed with its parent (the process group).
    process = subprocess.Popen(
        [sys.executable, "-c", _FORK_IN_A_HOOK, str(dirpath), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=120)  # seconds; a hung child: forever
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # The child exited (the parent waited for it) without a store call of its own.
    assert done.stdout.splitlines() == ["child 0 0"], done.stdout + done.stderr[-3000:]
    names = {f"epoch=0-step={step}.ckpt" for step in range(1, 7)}
    assert names <= checkpoint_files(dirpath)
    assert not journal_paths(staging_root(dirpath)), "the parent's outbox was left unfinished"


def test_a_removal_committed_whose_event_an_observer_holds_is_not_left_in_the_outbox(
    tmp_path: Path,
) -> None:
    """A store that removes at the commit (the ArtifactStore protocol's remove: every
    store but LaminDB's) settles the removal in the outbox then. Teardown gave up while an
    observer held its event: it was named as not persisted, and flush() kept returning
    False and pending_artifacts() kept listing it, as a committed save's did (4704907)."""
    store = MemoryStore()
    observer = HoldingObserver("removed")
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        flush_timeout=0.5,
        artifact_observers=[observer],
    )
    try:
        with pytest.warns(UserWarning, match="flush_timeout") as caught:
            make_trainer(
                tmp_path,
                [
                    callback,
                    EndTrainingOnceSet(observer.entered, "no removed event reached the observer"),
                ],
                max_steps=2,
            ).fit(TinyModel(scores=[1.0, 2.0]), loader(2))
        [message] = [str(w.message) for w in caught if "flush_timeout" in str(w.message)]
        assert "not persisted" not in message, message
        assert callback.pending_artifacts() == [] and callback.flush(timeout=0) is True
    finally:
        observer.gate.set()
        for thread in pool_threads():
            thread.join(TIMEOUT)
    assert store.keys() == {"checkpoints/epoch=0-step=2.ckpt"}


def test_a_direct_call_after_fit_whose_save_failed_is_left_in_the_outbox_for_a_flush(
    tmp_path: Path,
) -> None:
    """Lightning's ``_save_last_checkpoint`` called directly after ``fit`` returned, the
    store failing: the call warns (``on_error="warn"``) that it was not persisted, and the
    job stays journaled, so that ``lamin-lightning flush`` persists it once the store is
    back (the warning sends the user there). Before, the outbox was closed by teardown and
    such a call's jobs were never journaled: the flush found nothing."""
    dirpath, store = tmp_path / "ckpt", MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_last=True,
        on_error="warn",
        retry={"attempts": 1, "initial_backoff": 0.0, "max_backoff": 0.0, "jitter": 0.0},
    )
    model = TinyModel()
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(model, loader(2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    store.fail_always()

    with pytest.warns(UserWarning, match="could not be persisted"):
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))

    assert [r.key for _, r in _pending_records(dirpath)] == [key("last.ckpt")]
    store.heal()
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.remaining == [] and report.saved == 1
    assert store.get(key("last.ckpt")).sha256 == sha256_file(dirpath / "last.ckpt")  # type: ignore[union-attr]


def _pending_records(dirpath: Path) -> list[tuple[str, Any]]:
    return [entry for path in journal_paths(staging_root(dirpath)) for entry in read_pending(path)]


def test_a_removal_teardown_makes_is_persisted_by_that_teardown_not_a_nested_one(
    tmp_path: Path,
) -> None:
    """Teardown puts Lightning's state right (a background write that failed) and evicts
    what that leaves beyond ``save_top_k``: that removal is persisted by the teardown
    itself. Before, the removal, made outside the stage, started a second shutdown inside
    the first (on the ``on_exception`` path it raised, and later evictions ran unjournaled
    on a pipeline of their own; found by a review)."""

    class Evicting(MemoryCheckpoint):
        shutdowns = 0
        evict: str | None = None

        def _shutdown(self, **kwargs: Any) -> None:
            type(self).shutdowns += 1
            super()._shutdown(**kwargs)

        def _put_state_right(self, trainer: pl.Trainer, *, other_ranks: bool = True) -> int:
            path, self.evict = self.evict, None
            if path is None:
                return 0
            self._remove_checkpoint(trainer, path)
            return 1

    dirpath, store = tmp_path / "ckpt", MemoryStore()
    callback = Evicting(store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1)

    def evict_the_first() -> None:
        callback.evict = str(dirpath / "epoch=0-step=1.ckpt")

    make_trainer(tmp_path, [OnTrainEndCallback(evict_the_first), callback], max_steps=2).fit(
        TinyModel(), loader(2)
    )

    assert Evicting.shutdowns == 1
    assert store.keys(kind="checkpoint") == {key("epoch=0-step=2.ckpt")}
    assert sorted(p.name for p in dirpath.glob("*.ckpt")) == ["epoch=0-step=2.ckpt"]
    assert _pending_records(dirpath) == []


class OnTrainEndCallback(pl.Callback):
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fn()


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
@pytest.mark.parametrize("error", [ValueError, SystemExit, KeyboardInterrupt])
def test_a_checkpoint_whose_key_resolver_raised_is_written_as_lightning_names_it(
    error: type[BaseException], async_write: bool, tmp_path: Path
) -> None:
    """``resolve_artifact_key`` raises at step 2's save: the fit stops with it, and that
    checkpoint has no key to be persisted under, but its file is in the folder, as
    ``ModelCheckpoint`` (and the reference, which resolves the key after Lightning's
    write) leaves it: ``best_model_path`` names it. With ``async_write`` its background
    write was abandoned, so ``best_model_path`` named a file that was never written (found
    by an adversarial run of hooks raising)."""

    class Raising(MemoryCheckpoint):
        def resolve_artifact_key(self, trainer: Any, filepath: Any, kind: Any) -> str:
            if Path(filepath).name == "epoch=0-step=2.ckpt":
                raise error("no key for this one")
            return super().resolve_artifact_key(trainer, filepath, kind)

    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = Raising(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        async_write=async_write,
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
        with pytest.raises(SystemExit if error is KeyboardInterrupt else error):
            make_trainer(tmp_path, [callback], max_steps=4).fit(
                TinyModel(scores=[3.0, 2.0, 1.0, 0.5]), loader(4)
            )
    finally:
        signal.signal(signal.SIGINT, handler)

    best = Path(callback.best_model_path)
    assert best.name == "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in dirpath.glob("*.ckpt")) == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
    ]
    loaded = torch.load(best, map_location="cpu", weights_only=False)
    assert loaded["global_step"] == 2
    # The save before it is persisted (or, after Ctrl+C, which does not wait, pending);
    # this one has no key, so nothing is stored or pending for it.
    pending = {record.key for _, record in _pending_records(dirpath)}
    assert store.keys(kind="checkpoint") | pending == {key("epoch=0-step=1.ckpt")}


class _HookStop(BaseException):
    """A BaseException of the user's (a test framework's failure, say)."""


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
@pytest.mark.parametrize("error", [SystemExit, _HookStop])
def test_a_hook_raising_a_base_exception_at_the_emergency_save_leaves_the_crash_to_lightning(
    error: type[BaseException], async_write: bool, tmp_path: Path
) -> None:
    """Training crashes and ``save_on_exception`` saves; the feature hook raises
    ``SystemExit`` (or another ``BaseException``) at that save. It went out of our
    ``on_exception``, through Lightning's handling of the crash: loggers not finalized,
    the strategy not torn down, the fit's SIGTERM handler left installed (a later SIGTERM
    swallowed), and ``fit`` raised the hook's error instead of the crash, which an
    ``Exception`` of the same hook never masks (found by an adversarial run of hooks
    raising). Now it is logged like one: Lightning's handling runs to its end, ``fit``
    raises the crash, and the emergency checkpoint is persisted (without features)."""

    class Raising(MemoryCheckpoint):
        def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
            if trainer.global_step == 3:  # the emergency save (saves every 2 steps)
                raise error("hook asked to stop")
            return super().collect_checkpoint_feature_values(trainer, snapshot)

    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = Raising(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=2,
        save_on_exception=True,
        async_write=async_write,
    )
    sigterm = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tmp_path, [callback], max_steps=6)
    try:
        with pytest.raises(RuntimeError, match="boom at step 3"):
            trainer.fit(TinyModel(fail_at_step=3), loader(6))
        assert signal.getsignal(signal.SIGTERM) == sigterm, "Lightning's teardown did not run"
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert trainer.state.status == "interrupted"
    emergency = [p for p in dirpath.glob("*.ckpt") if "step=3" in p.name]
    assert len(emergency) == 1, sorted(p.name for p in dirpath.glob("*.ckpt"))
    assert key(emergency[0].name) in store.keys(kind="checkpoint")
    assert _pending_records(dirpath) == []


@pytest.mark.parametrize("reference", [False, True], ids=["ours", "ModelCheckpoint"])
def test_a_system_exit_while_the_emergency_checkpoint_is_written_ends_the_fit_as_asked(
    reference: bool, tmp_path: Path
) -> None:
    """Training crashes and ``save_on_exception`` saves; while its file is written (a slow
    disk) the user's SIGTERM handler calls ``sys.exit(3)``. It goes out of
    ModelCheckpoint's ``on_exception``, and ``fit`` raises it: the process ends as asked.
    Ours logged it as a failure of the save since 0b014f3 (meant for our hooks), waited
    for the uploads and raised the crash: exit status 1, and a script that catches the
    crash (a sweep going on to its next run) went on. It goes on now, as with
    ModelCheckpoint (and as it did with ``async_write``, whose write runs later)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ExitMidWrite(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            if checkpoint["global_step"] == 3:  # the emergency save: a signal handler exits
                raise SystemExit(3)
            super().save_checkpoint(checkpoint, path, storage_options)

    options: dict[str, Any] = {
        "dirpath": tmp_path / "ckpt",
        "save_top_k": -1,
        "every_n_train_steps": 2,
        "save_on_exception": True,
    }
    callback = (
        ModelCheckpoint(**options) if reference else MemoryCheckpoint(MemoryStore(), **options)
    )
    sigterm = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tmp_path, [callback], max_steps=6, plugins=[ExitMidWrite()])
    try:
        with pytest.raises(SystemExit) as exited:
            trainer.fit(TinyModel(fail_at_step=3), loader(6))
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert exited.value.code == 3


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_a_file_an_override_of_remove_checkpoint_takes_away_before_it_was_staged_is_persisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, async_write: bool
) -> None:
    """A subclass whose ``_remove_checkpoint`` does not call ours (it moves the evicted
    file to an archive, or deletes it itself) keeps that checkpoint's artifact, as the
    reference does (its save was synchronous; no removal was asked for): the file is
    staged before the override runs.

    Ours waited for the staging only inside our ``_remove_checkpoint``: a file taken away
    before its staging failed its save (``FileNotFoundError``, ``PersistenceError`` out
    of ``fit``) and its artifact was never stored, though the override kept the file.
    Patches ``Stager.stage`` as the test above does (same hold, same reason)."""
    dirpath = tmp_path / "ckpt"
    archive = tmp_path / "archive"
    archive.mkdir()
    first = dirpath / "epoch=0-step=1.ckpt"
    taken = threading.Event()
    real_stage = Stager.stage
    held: list[bool] = []

    def held_back_stage(self: Stager, path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == first:
            held.append(taken.wait(HOLD))
        return real_stage(self, path, *args, **kwargs)

    class ArchivingCheckpoint(MemoryCheckpoint):
        def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            if how == "moved":
                os.replace(filepath, archive / Path(filepath).name)
            else:
                trainer.strategy.remove_checkpoint(filepath)
            if Path(filepath) == first:
                taken.set()

    monkeypatch.setattr(Stager, "stage", held_back_stage)
    observer = RecordingObserver()
    callback = ArchivingCheckpoint(
        MemoryStore(),
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(),
        async_write=async_write,
    )
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(scores=[1.0, 2.0]), loader(2))

    assert held == [False]  # staged before the override took the file
    assert checkpoint_files(dirpath) == {"epoch=0-step=2.ckpt"}
    assert observer.of_type(ArtifactFailedEvent) == []
    assert observer.of_type(ArtifactRemovedEvent) == []
    assert callback.persistence_stats.failed == 0
    assert store_keys(callback) == {key("epoch=0-step=1.ckpt"), key("epoch=0-step=2.ckpt")}
    stored = callback.store.get(key(first.name))
    assert stored is not None
    if how == "moved":  # the bytes stored are those the override archived
        assert stored.sha256 == sha256_file(archive / first.name)
    assert staged_files(dirpath) == []
