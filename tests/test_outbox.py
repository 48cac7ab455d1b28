"""The durable outbox (guarantee 8): the journal itself, and replay at the next setup.

Store-backed (``MemoryCheckpoint``): the replay mechanism is the same for every
publisher; the LaminDB tier (``tests/lamindb/test_lamindb_outbox.py``) covers
crashes of real processes, ``lamin-lightning flush`` and idempotency by hash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from helpers import TinyModel, checkpoint_files, loader, make_trainer, sha256_file, staged_files
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    CheckpointDirectoryError,
    JobRecord,
    OutboxInUseError,
    PermanentError,
    flush_directory,
)
from lamin_lightning._journal import (
    COMPACT_AFTER_LINES,
    Outbox,
    is_locked,
    journal_paths,
    read_pending,
)
from lamin_lightning._owners import dead_owner
from lamin_lightning._staging import staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver


def _job(op: str, key: str) -> JobRecord:
    """A minimal job record (the journal only needs what it settles by: op, kind, key)."""
    return JobRecord(op=op, kind="checkpoint", key=key, local_path=f"/ckpt/{key}")  # type: ignore[arg-type]


def _open_with_a_marked_save(tmp_path: Path) -> tuple[Outbox, str]:
    """An open outbox holding one save whose background write marks its file written."""
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key="k/a.ckpt",
        local_path=str(tmp_path / "a.ckpt"),
        marks_written=True,
    )
    return outbox, outbox.append(record)


def _pending_keys(path: Path) -> list[str]:
    return [record.key for _, record in read_pending(path)]


def _pending_ids(path: Path) -> list[str]:
    return [job_id for job_id, _ in read_pending(path)]


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes that would grow any file of this process past ``limit`` bytes fail (EFBIG).

    A real condition, like a full disk: the kernel refuses the write. SIGXFSZ (which
    would kill the process) is ignored meanwhile; both are restored on exit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# -- the journal ----------------------------------------------------------------------------


def test_an_appended_job_is_on_disk_before_append_returns(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    assert outbox.open() == []
    job_id = outbox.append(_job("save", "k1"))
    # A separate reader (another process would see the same) finds it, pending.
    assert [(i, r.key) for i, r in read_pending(outbox.path)] == [(job_id, "k1")]
    outbox.settle(job_id, "saved")
    assert read_pending(outbox.path) == []
    outbox.close()
    assert not outbox.path.exists(), "an empty journal is deleted on close"


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "outbox-a.jsonl"
    outbox = Outbox(path)
    outbox.open()
    first = outbox.append(_job("save", "k1"))
    outbox.close()
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"t":"job","id":"x","entry":{"op":"sa')  # killed mid-write
    assert _pending_ids(path) == [first]
    reopened = Outbox(path)
    assert [r.key for _, r in reopened.open()] == ["k1"]
    reopened.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw.replace(b'"k2"', b'"\xff2"'), id="a-byte-not-utf8"),
        pytest.param(lambda raw: raw + b"\x00" * 300, id="a-tail-of-zeros"),
    ],
)
def test_a_damaged_journal_line_spoils_only_itself(
    tmp_path: Path, damage: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    # A bad sector or a power loss (ext4 can leave an appended tail of zeros): the lines
    # around the damage still count, and the journal stays usable. A byte that is not
    # UTF-8 once made the whole outbox unreadable (UnicodeDecodeError at setup and flush).
    path = tmp_path / "outbox-a.jsonl"
    outbox = Outbox(path)
    outbox.open()
    for key in ("k1", "k2", "k3"):
        outbox.append(_job("save", key))
    outbox.close()
    path.write_bytes(damage(path.read_bytes()))
    intact = ["k1", "k3"] if b"\xff" in path.read_bytes() else ["k1", "k2", "k3"]
    assert [r.key for _, r in read_pending(path)] == intact
    assert "ignoring a torn or corrupt journal line" in caplog.text
    reopened = Outbox(path)
    assert [r.key for _, r in reopened.open()] == intact
    reopened.append(_job("save", "k4"))
    reopened.close()
    assert [r.key for _, r in read_pending(path)] == [*intact, "k4"]


def test_settling_a_job_makes_earlier_failed_jobs_of_its_key_moot(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    failed_save = outbox.append(_job("save", "k1"))
    other = outbox.append(_job("save", "k2"))
    removal = outbox.append(_job("remove", "k1"))
    outbox.settle(removal, "removed")
    assert [i for i, _ in outbox.pending()] == [other]
    assert failed_save not in set(_pending_ids(outbox.path))
    outbox.close()


def test_the_journal_is_compacted_and_keeps_what_is_pending(tmp_path: Path) -> None:
    path, outbox, kept = _open_with_a_pending_job(tmp_path)
    for i in range(5 * COMPACT_AFTER_LINES):
        outbox.settle(outbox.append(_job("save", f"k{i}")), "saved")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= COMPACT_AFTER_LINES + 3, f"journal not compacted: {len(lines)} lines"
    assert _pending_ids(path) == [kept]
    # Still locked after the swap: nobody else can take it.
    assert is_locked(path)
    outbox.close()
    assert _pending_ids(path) == [kept]


def _open_with_a_pending_job(tmp_path: Path) -> tuple[Path, Outbox, str]:
    path = tmp_path / "outbox-a.jsonl"
    outbox = Outbox(path)
    outbox.open()
    return path, outbox, outbox.append(_job("save", "kept"))


@contextmanager
def _compaction_held_in_its_fsync(
    monkeypatch: pytest.MonkeyPatch, outbox: Outbox
) -> Iterator[threading.Event]:
    """Start a compaction on another thread (a settle, as the committer makes it) and
    hold it inside its first fsync, as a disk a competing writer keeps busy would.
    Yields once it is held; lets it go on leaving."""
    while outbox._lines <= COMPACT_AFTER_LINES - 2:  # just short of compacting
        outbox.settle(outbox.append(_job("save", "filler")), "saved")
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if threading.current_thread() is committer and not entered.is_set():
            entered.set()
            release.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    committer = threading.Thread(
        target=lambda: outbox.settle(outbox.append(_job("save", "filler")), "saved")
    )
    committer.start()
    try:
        assert entered.wait(60), "the settle did not compact the journal"
        yield release
    finally:
        release.set()
        committer.join(60)
    assert not committer.is_alive()


def test_an_append_during_a_compactions_fsync_does_not_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The training thread appends under the journal's lock; a compaction (the committer
    # thread) fsyncs, which under disk load takes tens of ms: never under that lock.
    path, outbox, kept = _open_with_a_pending_job(tmp_path)
    appended: list[str] = []
    with _compaction_held_in_its_fsync(monkeypatch, outbox):
        training = threading.Thread(
            target=lambda: appended.append(outbox.append(_job("save", "late")))
        )
        training.start()
        training.join(30)
        assert appended, "an append waited for the compaction's fsync"
    # The line appended mid-compaction was carried over into the compacted journal.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) < COMPACT_AFTER_LINES // 2, f"journal not compacted: {len(lines)} lines"
    assert _pending_ids(path) == [kept, appended[0]]
    assert is_locked(path)
    outbox.sync()
    outbox.close()
    assert _pending_keys(path) == ["kept", "late"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_close_during_a_compaction_wins_and_the_compaction_stops_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, outbox, kept = _open_with_a_pending_job(tmp_path)
    with _compaction_held_in_its_fsync(monkeypatch, outbox):
        late = outbox.append(_job("save", "late"))
        outbox.close()  # compacts under the lock itself, with its own temporary file
    assert _pending_ids(path) == [kept, late]
    assert not is_locked(path)
    # The stale compaction left nothing behind, and did not replace the closed journal.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_one_holder_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "outbox-a.jsonl"
    first = Outbox(path)
    first.open()
    first.append(_job("save", "k"))
    assert is_locked(path)
    with pytest.raises(OutboxInUseError):
        Outbox(path).open()
    first.close()
    assert not is_locked(path)
    second = Outbox(path)
    assert [r.key for _, r in second.open()] == ["k"]
    second.close()


# -- through Lightning ----------------------------------------------------------------------


class _JournalProbe(MemoryCheckpoint):
    """Reads the journal from disk the moment ``_save_checkpoint`` returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, list[str]]] = []

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and self._outbox is not None:
            keys = _pending_keys(self._outbox.path)
            self.seen.append((self.resolve_artifact_key(trainer, filepath, "checkpoint"), keys))


def test_every_save_is_journaled_before_save_checkpoint_returns(tmp_path: Path) -> None:
    store = MemoryStore()
    store.hang()  # nothing can finish: only the journal knows about the jobs
    callback = _JournalProbe(
        store, dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, flush_timeout=0.2
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    try:
        with pytest.warns(UserWarning, match="flush_timeout"):
            trainer.fit(TinyModel(), loader())
    finally:
        store.release()
    assert len(callback.seen) == 3
    for key, journaled in callback.seen:
        assert key in journaled
    # Teardown timed out: the journal still holds every job for a later replay.
    pending = [
        key
        for path in journal_paths(staging_root(tmp_path / "ckpt"))
        for key in _pending_keys(path)
    ]
    assert pending == [key for key, _ in callback.seen]


def _kept_set_matches_store(dirpath: Path, store: MemoryStore, prefix: str = "checkpoints") -> None:
    files = checkpoint_files(dirpath)
    assert store.keys(kind="checkpoint") == {f"{prefix}/{name}" for name in files}
    for name in files:
        stored = store.get(f"{prefix}/{name}")
        assert stored is not None and stored.sha256 == sha256_file(dirpath / name)


def test_the_next_setup_replays_unfinished_jobs_in_order(tmp_path: Path) -> None:
    """Storage hangs past flush_timeout; the next run in the same dirpath finishes the jobs."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    first = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        flush_timeout=0.2,
        max_pending=32,
    )
    model = TinyModel(scores=[5, 3, 4, 1, 2, 6])
    try:
        with pytest.warns(UserWarning, match="not persisted"):
            make_trainer(tmp_path, [first], max_steps=6).fit(model, loader())
    finally:
        # The hung transfers now finish on their (abandoned) threads: they store bytes
        # whose commit never ran, exactly like a crash after the upload.
        store.release()
    journal = journal_paths(staging_root(dirpath))
    assert len(journal) == 1
    pending = [record for _, record in read_pending(journal[0])]
    ops = [r.op for r in pending]
    assert ops.count("save") >= 4 and ops.count("remove") == ops.count("save") - 2  # two kept

    observer = RecordingObserver()
    second = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
    )
    make_trainer(tmp_path, [second]).validate(TinyModel(), loader())

    _kept_set_matches_store(dirpath, store)
    events = observer.events
    assert events and all(e.recovered for e in events)
    # In the original order, the last job of each key: a save evicted before the crash is
    # moot (its removal alone replays, as a live removal cancels its unstarted save).
    last = {r.key: i for i, r in enumerate(pending)}
    assert [e.key for e in events if isinstance(e, ArtifactSavedEvent | ArtifactRemovedEvent)] == [
        r.key for i, r in enumerate(pending) if last[r.key] == i
    ]
    assert not journal_paths(staging_root(dirpath)), "the journal is gone once empty"
    # The flags end as the last submitted state.
    last_save = [r for r in pending if r.op == "save"][-1].checkpoint
    assert last_save is not None
    best = [k for k, f in store.flags.items() if f.get("is_best_model")]
    assert best == [last_save.best_key]
    ranked = sorted(
        (f["model_rank"], k) for k, f in store.flags.items() if f.get("model_rank") is not None
    )
    assert [k for _, k in ranked] == list(last_save.ranking)


def _leave_failed_jobs(
    tmp_path: Path, dirpath: Path, store: MemoryStore, steps: int, **kwargs: Any
) -> MemoryCheckpoint:
    """Fit ``steps`` steps against ``store`` failing for good: every checkpoint's job
    stays in the outbox. Returns the callback; the store is healed."""
    store.fail_always()
    callback = MemoryCheckpoint(store, dirpath=dirpath, on_error="warn", **kwargs)
    with pytest.warns(UserWarning, match="could not be persisted"):
        make_trainer(tmp_path, [callback], max_steps=steps).fit(TinyModel(), loader())
    store.heal()
    return callback


def test_a_failed_job_stays_in_the_outbox_until_a_later_setup_persists_it(
    tmp_path: Path,
) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    first = _leave_failed_jobs(
        tmp_path, dirpath, store, steps=4, save_top_k=-1, every_n_train_steps=2
    )
    assert first.persistence_stats.failed == 2
    pending = [key for p in journal_paths(staging_root(dirpath)) for key in _pending_keys(p)]
    assert sorted(pending) == sorted(f"checkpoints/{n}" for n in checkpoint_files(dirpath))
    assert store.keys(kind="checkpoint") == set()

    observer = RecordingObserver()
    second = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=2,
        artifact_observers=[observer],
    )
    make_trainer(tmp_path, [second]).validate(TinyModel(), loader())
    _kept_set_matches_store(dirpath, store)
    assert [type(e) for e in observer.events] == [ArtifactSavedEvent, ArtifactSavedEvent]
    assert not journal_paths(staging_root(dirpath))


def test_a_replay_that_fails_again_warns_and_does_not_block_training(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_always()
    first = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=2, on_error="warn")
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [first], max_steps=2).fit(TinyModel(), loader())
    observer = RecordingObserver()
    second = MemoryCheckpoint(
        store, dirpath=dirpath, every_n_train_steps=2, artifact_observers=[observer]
    )
    make_trainer(tmp_path, [second]).validate(TinyModel(), loader())  # does not raise
    failed = observer.of_type(ArtifactFailedEvent)
    assert len(failed) == 1 and failed[0].recovered
    assert len([e for p in journal_paths(staging_root(dirpath)) for e in read_pending(p)]) == 1


def test_a_journaled_file_that_is_gone_is_dropped_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_always()
    first = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=2, on_error="warn")
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [first], max_steps=2).fit(TinyModel(), loader())
    store.heal()
    shutil.rmtree(staging_root(dirpath) / "staged")
    for name in checkpoint_files(dirpath):
        (dirpath / name).unlink()
    second = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=2)
    make_trainer(tmp_path, [second]).validate(TinyModel(), loader())
    assert "neither its staged copy" in caplog.text
    assert not journal_paths(staging_root(dirpath))


def _failed_run(tmp_path: Path, store: MemoryStore, steps: int = 4) -> Path:
    """A run whose every save failed: its jobs stay in the outbox, as after a crash."""
    dirpath = tmp_path / "ckpt"
    store.fail_always()
    first = MemoryCheckpoint(
        store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=2, on_error="warn"
    )
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [first], max_steps=steps).fit(TinyModel(), loader())
    store.heal()
    assert _pending_keys(journal_paths(staging_root(dirpath))[0])
    return dirpath


def test_a_checkpoint_folder_moved_with_its_working_folder_is_flushed_where_it_is_now(
    tmp_path: Path,
) -> None:
    """The journal names the paths the files had; moved together (another mount after a
    preemption), the staged copies and files are found where they are now, and persisted
    under the keys they were journaled with. The journaled paths stay a fallback."""
    store = MemoryStore()
    old = _failed_run(tmp_path, store)
    (journal,) = journal_paths(staging_root(old))
    journaled = {record.key: record for _, record in read_pending(journal)}
    new = tmp_path / "scratch2" / "ckpt"
    new.parent.mkdir()
    os.rename(old, new)
    os.rename(staging_root(old), staging_root(new))

    (moved_journal,) = journal_paths(staging_root(new))
    moved = {record.key: record for _, record in read_pending(moved_journal)}
    assert moved.keys() == journaled.keys()
    for key, record in moved.items():
        assert record.local_path == str(new / Path(journaled[key].local_path).name)
        assert record.staged_path is not None
        assert Path(record.staged_path).is_relative_to(staging_root(new))
        assert record.recorded == (journaled[key].local_path, journaled[key].staged_path)
        assert record.file() == Path(record.staged_path)

    report = flush_directory(new, progress=False, stores={"memory": store})
    assert report.remaining == [] and report.saved == len(checkpoint_files(new))
    _kept_set_matches_store(new, store)
    assert not old.exists() and not staging_root(old).exists()
    assert not journal_paths(staging_root(new))


def test_a_journaled_file_that_cannot_be_looked_at_stays_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a file that is not there (ENOENT) is lost: one that cannot be looked at
    (EACCES, EIO, a stale NFS handle) keeps its job pending, with a message saying
    why, for a flush once it can be read again; ``os.path.isfile`` would call it lost."""
    store = MemoryStore()
    dirpath = _failed_run(tmp_path, store, steps=2)
    (journal,) = journal_paths(staging_root(dirpath))
    ((_, record),) = read_pending(journal)
    hidden = {record.local_path, record.staged_path}
    real_stat, real_lstat = os.stat, os.lstat

    def denied(real: Callable[..., Any]) -> Callable[..., Any]:
        def look(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, str | os.PathLike) and os.fspath(path) in hidden:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return look

    with monkeypatch.context() as patched:  # root is never refused: refused by hand
        patched.setattr(os, "stat", denied(real_stat))
        patched.setattr(os, "lstat", denied(real_lstat))
        with pytest.raises(PermissionError, match=r"cannot tell whether .* exists"):
            record.file()
        report = flush_directory(dirpath, progress=False, stores={"memory": store})
    assert [r.key for r in report.remaining] == [record.key]
    (failed,) = [e for e in report.events if isinstance(e, ArtifactFailedEvent)]
    assert isinstance(failed.error, PermissionError) and "stays pending" in str(failed.error)
    assert "dropping it from the outbox" not in caplog.text
    assert _pending_keys(journal) == [record.key]
    assert store.keys(kind="checkpoint") == set()

    report = flush_directory(dirpath, progress=False, stores={"memory": store})
    assert report.saved == 1 and report.remaining == []
    _kept_set_matches_store(dirpath, store)


# -- the checkpoint directory is checked at setup (fault 6) ------------------------------------


class _CountingModel(TinyModel):
    steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def test_an_unwritable_checkpoint_directory_fails_at_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory should be")
    callback = MemoryCheckpoint(dirpath=blocker / "ckpt", every_n_train_steps=1)
    model = _CountingModel()
    _CountingModel.steps = 0
    with pytest.raises(CheckpointDirectoryError, match=r"cannot write to the checkpoint directory"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(model, loader())
    assert _CountingModel.steps == 0, "the error must come before the first training step"


@contextmanager
def _immutable(folder: Path) -> Iterator[None]:
    """``folder`` cannot gain entries, for root too (``chattr +i``); skip where unsupported."""
    chattr = shutil.which("chattr")
    if (
        chattr is None
        or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode
    ):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with it)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_a_writable_checkpoint_directory_in_a_folder_that_is_not_fails_at_setup_naming_both(
    tmp_path: Path,
) -> None:
    """The working folder sits beside the checkpoint directory: a folder one may write into
    inside a parent one may not (a shared mount) is refused before training, with both
    folders and the fix named, nothing left running, nothing written."""
    parent = tmp_path / "shared"
    dirpath = parent / "ckpts"
    dirpath.mkdir(parents=True)
    callback = MemoryCheckpoint(dirpath=dirpath, every_n_train_steps=1)
    _CountingModel.steps = 0
    with _immutable(parent):
        (dirpath / "probe").write_text("the checkpoint directory itself is writable")
        (dirpath / "probe").unlink()
        with pytest.raises(CheckpointDirectoryError) as raised:
            make_trainer(tmp_path, [callback], max_steps=2).fit(_CountingModel(), loader())
    message = str(raised.value)
    assert str(dirpath) in message and str(staging_root(dirpath)) in message
    assert "Pass a dirpath" in message
    assert _CountingModel.steps == 0, "the error must come before the first training step"
    assert list(dirpath.iterdir()) == [] and not staging_root(dirpath).exists()
    assert [t.name for t in threading.enumerate() if t.name.startswith("lamin-lightning")] == []


class _LargerThanTheDiskModel(_CountingModel):
    """A model whose state is larger than the whole disk of the checkpoint directory.

    Its buffer is an expanded view of one element: it has ``size`` bytes of elements
    (what a checkpoint of it needs) without allocating them.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("huge", torch.zeros((), dtype=torch.uint8).expand(size))


def test_a_full_checkpoint_directory_fails_at_setup(tmp_path: Path) -> None:
    # The real free space of the real disk is too small for one checkpoint of the model.
    size = 2 * shutil.disk_usage(tmp_path).total
    callback = MemoryCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    _CountingModel.steps = 0
    with pytest.raises(CheckpointDirectoryError, match="MiB free") as raised:
        make_trainer(tmp_path, [callback], max_steps=2).fit(_LargerThanTheDiskModel(size), loader())
    assert raised.value.errno == errno.ENOSPC
    assert _CountingModel.steps == 0


@pytest.mark.parametrize("full", ["parent", "dirpath"])
def test_the_free_space_checked_at_setup_is_the_checkpoint_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full: str
) -> None:
    """``dirpath`` is a mount point: another filesystem than the folder above it, where
    the working folder is. Setup measures the free space where Lightning writes: a full
    parent (whose full disk only leaves jobs unjournaled) does not stop a fit that
    ModelCheckpoint would run (it did, naming dirpath as the full one), and a full
    ``dirpath`` in a roomy parent fails at setup, as documented (it failed at the first
    save). The two filesystems are simulated by ``disk_usage``."""
    from lamin_lightning import _submit

    dirpath = tmp_path / "parent" / "ckpt"
    dirpath.mkdir(parents=True)
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        usage = real(path)
        on_dirpath = Path(path) == dirpath or dirpath in Path(path).parents
        if on_dirpath == (full == "dirpath"):
            return usage._replace(free=0)
        return usage

    monkeypatch.setattr(_submit.shutil, "disk_usage", disk_usage)
    callback = MemoryCheckpoint(dirpath=dirpath, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=1)
    if full == "dirpath":
        with pytest.raises(CheckpointDirectoryError, match=f"{dirpath}.* 0.0 MiB free"):
            trainer.fit(TinyModel(), loader())
    else:
        trainer.fit(TinyModel(), loader())
        assert callback.persistence_stats.saved == 1


def test_status_lists_pending_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lamin_lightning._cli import main

    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_always()
    callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=2, on_error="warn")
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader())
    pending = 1  # the documented exit status of `status` while jobs are pending
    assert main(["status", str(dirpath)]) == pending
    out = capsys.readouterr().out
    assert "1 job(s) pending" in out and "checkpoints/epoch=0-step=2.ckpt" in out
    assert main(["status", "--json", str(dirpath)]) == pending
    listed = json.loads(capsys.readouterr().out)
    assert [e["key"] for e in listed] == ["checkpoints/epoch=0-step=2.ckpt"]
    assert listed[0]["in_use"] is False


def test_status_json_of_a_save_whose_score_went_nan_is_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A training whose monitored value went NaN (Lightning keeps it as an infinite
    current_score) left its saves pending: `status --json` printed the records with
    Python's ``Infinity`` for the score and the ranking's scores, which is not JSON (jq,
    JavaScript and other strict parsers refuse the whole listing). Non-finite numbers
    are printed as null, as LaminDB gets no value for them either."""
    import math

    from lamin_lightning._cli import main

    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_always()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
    )
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [callback], max_steps=2).fit(
            TinyModel(scores=[math.nan, 0.5]), loader()
        )
    assert math.isinf(callback.best_k_models[str(dirpath / "epoch=0-step=1.ckpt")])
    capsys.readouterr()
    assert main(["status", "--json", str(dirpath)]) == 1  # pending

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    listed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    saves = [(e["key"].rsplit("/", 1)[1], e["snapshot"]["score"]) for e in listed]
    # Each save of step 1 and 2 (last.ckpt twice: the second does not supersede a
    # failed one), with the score Lightning kept: infinite for the NaN of step 1.
    assert sorted(saves, key=str) == sorted(
        [
            ("epoch=0-step=1.ckpt", None),
            ("last.ckpt", None),
            ("epoch=0-step=2.ckpt", 0.5),
            ("last.ckpt", 0.5),
        ],
        key=str,
    )
    ranked = listed[-1]["snapshot"]["scores"]
    assert sorted(ranked.values(), key=str) == [0.5, None]


def test_status_json_of_pending_saves_as_python_m_lamin_lightning_cli(tmp_path: Path) -> None:
    """`python -m lamin_lightning._cli status --json` (how the tests and a checkout run the
    command) with a pending save: the module's own ``__main__`` block ran main() before
    the rest of the module was defined, so the JSON listing failed with a NameError."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_always()
    callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1, on_error="warn")
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader())
    done = subprocess.run(
        [sys.executable, "-m", "lamin_lightning._cli", "status", "--json", str(dirpath)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert [e["key"].rsplit("/", 1)[1] for e in json.loads(done.stdout)] == ["epoch=0-step=1.ckpt"]


def test_a_journal_write_error_when_settling_never_fails_the_committed_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    job_id = outbox.append(_job("save", "k1"))

    # The journal cannot grow any more (like a full disk): the "done" line fails to write.
    with _file_size_limit(outbox.path.stat().st_size):
        outbox.settle(job_id, "saved")  # must not raise
    assert "will be replayed" in caplog.text
    outbox.close()
    assert _pending_ids(outbox.path) == [job_id]


def test_staged_names_never_repeat_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itertools
    import uuid

    import lamin_lightning._staging as staging
    from lamin_lightning._staging import Stager

    monkeypatch.setattr(staging, "_counter", itertools.count())
    first = {Stager(tmp_path).plan("a.ckpt") for _ in range(3)}
    # A restarted process (same PID, counter from zero, its token drawn again at import)
    # must not reuse a kept folder.
    monkeypatch.setattr(staging, "_counter", itertools.count())
    monkeypatch.setattr(staging, "_TOKEN", uuid.uuid4().hex[:12])
    second = {Stager(tmp_path).plan("a.ckpt") for _ in range(3)}
    assert not first & second


def test_outbox_false_skips_the_journal_but_still_checks_the_directory(tmp_path: Path) -> None:
    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1, outbox=False)
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader())
    _kept_set_matches_store(dirpath, store)
    assert not journal_paths(staging_root(dirpath))

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    unwritable = MemoryCheckpoint(dirpath=blocker / "ckpt", outbox=False)
    with pytest.raises(CheckpointDirectoryError):
        make_trainer(tmp_path, [unwritable], max_steps=1).fit(TinyModel(), loader())
    with pytest.raises(ValueError, match="outbox must be True or False"):
        MemoryCheckpoint(outbox="yes")  # type: ignore[arg-type]


def test_appends_racing_compactions_lose_no_line(tmp_path: Path) -> None:
    # The training thread appends while the committer settles (and so compacts): whatever
    # the interleaving, the journal on disk says exactly what is pending, in order.
    path, outbox, kept = _open_with_a_pending_job(tmp_path)
    appended: list[str] = []
    ready: queue.Queue[str | None] = queue.Queue()

    def training() -> None:
        for i in range(40 * COMPACT_AFTER_LINES):
            job = outbox.append(_job("save", f"k{i}"))
            appended.append(job)
            if i % 7:  # every seventh stays pending
                ready.put(job)
        ready.put(None)

    def committer() -> None:
        while (job := ready.get()) is not None:
            outbox.settle(job, "saved")

    threads = [threading.Thread(target=training), threading.Thread(target=committer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    expected = [kept] + [job for i, job in enumerate(appended) if not i % 7]
    assert [i for i, _ in outbox.pending()] == expected
    assert _pending_ids(path) == expected  # what a crash now would replay
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) < len(appended), "the journal was never compacted"
    outbox.close()
    assert _pending_ids(path) == expected


_KILLED_MID_COMPACTION = """
import os, sys, threading
from lamin_lightning._journal import COMPACT_AFTER_LINES, Outbox
from lamin_lightning import JobRecord

def job(key):
    return JobRecord(op="save", kind="checkpoint", key=key, local_path="/ckpt/" + key)

outbox = Outbox(sys.argv[1])
outbox.open()
outbox.append(job("kept"))
while outbox._lines <= COMPACT_AFTER_LINES - 2:  # just short of compacting
    outbox.settle(outbox.append(job("filler")), "saved")
real_fsync = os.fsync

def held_fsync(fd):
    real_fsync(fd)
    sys.stdout.write("in compaction\\n")
    sys.stdout.flush()
    threading.Event().wait()  # until SIGKILL

os.fsync = held_fsync
outbox.settle(outbox.append(job("last")), "saved")
"""


def test_sigkill_mid_compaction_keeps_the_journal_and_the_next_holder_clears_the_rest(
    tmp_path: Path,
) -> None:
    # Killed after the compaction's new file was written and fsynced, before its rename:
    # the journal is the old one, whole; the next holder removes the unfinished new file.
    path = tmp_path / "outbox-a.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_MID_COMPACTION, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "in compaction\n"
        assert (tmp_path / "outbox-a.jsonl.compacting").exists()
    finally:
        child.kill()
        child.wait(60)
    assert _pending_keys(path) == ["kept"]
    outbox = Outbox(path)
    assert [record.key for _, record in outbox.open()] == ["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    outbox.close()


@pytest.mark.parametrize(
    ("full_at", "what"),
    [
        (0, "save of .*step=1.ckpt"),  # the journal's file cannot be opened
        (1, "save of .*step=1.ckpt"),  # the first line
        (2, "save of .*step=2.ckpt"),
        (3, "removal of .*step=1.ckpt"),  # the eviction of step 1 in favour of step 2
    ],
)
def test_a_journal_line_a_full_disk_refuses_leaves_training_and_persistence_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_at: int, what: str
) -> None:
    """Lightning wrote the checkpoint; only its journal line finds the disk full. As with
    ModelCheckpoint, training goes on; the job is persisted unjournaled, with a warning
    naming the file (before, the save hook raised, and the checkpoint in the folder
    was never persisted: no line, so nothing to replay)."""
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    lines, opens = [0], [0]
    real_write, real_open = Outbox._write, Outbox.open

    def write(self: Outbox, item: dict[str, Any]) -> None:
        if item.get("t") == "job":
            lines[0] += 1
            if lines[0] == full_at:
                raise no_space
        real_write(self, item)

    def open_once(self: Outbox, *args: Any, **kwargs: Any) -> Any:
        opens[0] += 1
        if full_at == 0 and opens[0] == 1:
            raise no_space
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, "_write", write)
    monkeypatch.setattr(Outbox, "open", open_once)
    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, monitor="score", mode="min", save_top_k=1, every_n_train_steps=1
    )
    model = TinyModel(scores=[5.0, 4.0, 3.0, 2.0])
    with pytest.warns(UserWarning) as caught:
        make_trainer(tmp_path, [callback], max_steps=4).fit(model, loader())
    refused = [str(w.message) for w in caught if "could not journal" in str(w.message)]
    assert len(refused) == 1
    assert re.search(f"could not journal the {what} in its outbox", refused[0])

    assert checkpoint_files(dirpath) == {"epoch=0-step=4.ckpt"}
    stats = callback.persistence_stats
    assert (stats.saved, stats.removed, stats.failed) == (4, 3, 0)
    _kept_set_matches_store(dirpath, store)
    assert [
        key for path in journal_paths(staging_root(dirpath)) for key in _pending_keys(path)
    ] == []


def test_a_compaction_at_close_that_finds_the_disk_full_keeps_the_journal_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing compacts a journal with pending jobs; on a full disk the compacted copy
    cannot be written: close() must not raise (it runs at teardown, after an error
    already), must leave no temporary file, and the journal keeps every pending job."""
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    pending = outbox.append(_job("save", "k1"))
    outbox.settle(outbox.append(_job("save", "k2")), "saved")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    outbox.close()  # must not raise
    monkeypatch.undo()

    assert "could not compact the outbox" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outbox-a.jsonl"]
    assert _pending_ids(outbox.path) == [pending]


def _refuse_the_journal_line_of(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real_write = Outbox._write

    def write(self: Outbox, item: dict[str, Any]) -> None:
        if item.get("t") == "job" and item["entry"]["local_path"].endswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, item)

    monkeypatch.setattr(Outbox, "_write", write)


def test_a_save_kept_out_of_the_outbox_whose_staged_copy_finds_the_disk_full_too_persists_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No journal line would let a flush retry it, so the job persists the file from the
    checkpoint directory, and leaves no partial staged copy behind."""
    from lamin_lightning._staging import Stager

    _refuse_the_journal_line_of(monkeypatch, "step=2.ckpt")
    real_stage = Stager.stage

    def stage(self: Stager, path: Any, staged: Path, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("step=2.ckpt"):
            staged.parent.mkdir(parents=True)
            (staged.parent / f".partial-{staged.name}").write_bytes(b"half")  # as a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_stage(self, path, staged, *args, **kwargs)

    monkeypatch.setattr(Stager, "stage", stage)
    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1)
    with pytest.warns(UserWarning, match=r"could not journal the save of .*step=2\.ckpt"):
        make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader())

    stats = callback.persistence_stats
    assert (stats.saved, stats.failed) == (3, 0)
    _kept_set_matches_store(dirpath, store)
    assert "it is persisted from the checkpoint directory" in caplog.text
    assert staged_files(dirpath) == []


def test_a_save_the_full_disk_kept_out_of_the_outbox_and_then_failed_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its line refused, then its upload failed for good: since no journal holds it, the
    report must not send the user to `lamin-lightning flush` for it."""
    _refuse_the_journal_line_of(monkeypatch, "step=2.ckpt")

    class FailsStep2(MemoryCheckpoint):
        def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **kwargs: Any) -> Any:
            if str(filepath).endswith("step=2.ckpt"):
                raise PermanentError("storage refused it")
            return super().save_checkpoint_artifact(trainer, filepath, **kwargs)

    store = MemoryStore()
    callback = FailsStep2(
        store, dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1, on_error="warn"
    )
    with pytest.warns(UserWarning) as caught:
        make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader())
    (report,) = [str(w.message) for w in caught if "could not be persisted" in str(w.message)]
    failed, *_ = [line for line in report.splitlines() if "step=" in line]
    assert "step=2.ckpt" in failed and "not in the outbox" in failed
    assert store.keys(kind="checkpoint") == {
        "checkpoints/epoch=0-step=1.ckpt",
        "checkpoints/epoch=0-step=3.ckpt",
    }


@pytest.mark.parametrize(("steps", "outside"), [(1, True), (2, False)])
def test_a_path_journaled_again_after_its_line_was_refused_is_reported_as_in_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int, outside: bool
) -> None:
    """last.ckpt's first line is refused; at step 2 it is saved again and journaled, so a
    failure of it is one `lamin-lightning flush` can retry: no "not in the outbox" note.
    """
    real_write = Outbox._write
    refused = [0]

    def write(self: Outbox, item: dict[str, Any]) -> None:
        if item.get("t") == "job" and not refused[0]:
            refused[0] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, item)

    class FailsEverything(MemoryCheckpoint):
        def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **kwargs: Any) -> Any:
            raise PermanentError("storage refused it")

    monkeypatch.setattr(Outbox, "_write", write)
    callback = FailsEverything(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
    )
    with pytest.warns(UserWarning) as caught:
        make_trainer(tmp_path, [callback], max_steps=steps).fit(TinyModel(), loader())
    reports = [str(w.message) for w in caught if "could not be persisted" in str(w.message)]
    assert reports and all("last.ckpt" in report for report in reports)
    # The last report is teardown's, of the last save of last.ckpt (an earlier one, at
    # step 2's save, reported step 1's before step 2 was journaled: rightly noted).
    assert ("not in the outbox" in reports[-1]) is outside


def _failed_fit(tmp_path: Path, steps: int = 2) -> tuple[Path, Path, MemoryStore]:
    """A fit whose every save failed: its jobs stay in its one journal (returned)."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.fail_always()
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1, on_error="warn"
    )
    with pytest.warns(UserWarning):
        make_trainer(tmp_path, [callback], max_steps=steps).fit(TinyModel(), loader(steps))
    store.heal()
    (journal,) = journal_paths(staging_root(dirpath))
    return dirpath, journal, store


def test_a_flush_that_times_out_names_every_job_still_pending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flush --timeout` against a store that hangs: the CLI printed only "N still
    pending"; the jobs never submitted (FlushReport.remaining) were named nowhere, only
    the few in the pipeline, in a log line. Each is now named (the first 20, then a
    count and where to see them all); a later flush persists every one exactly once."""
    from lamin_lightning import store as registry
    from lamin_lightning._cli import main

    shown = 20  # named one per line; the rest counted
    steps = shown + 5
    dirpath, _, store = _failed_fit(tmp_path, steps=steps)
    keys = {f"checkpoints/epoch=0-step={i}.ckpt" for i in range(1, steps + 1)}
    monkeypatch.setitem(registry._registered, "memory", lambda record: store)
    store.hang()
    try:
        code = main(["flush", "--no-progress", "--timeout", "0.5", str(dirpath)])
    finally:
        store.release()
    out = capsys.readouterr().out
    assert code == 1
    assert f"{steps} still pending" in out
    named = [line.split()[1] for line in out.splitlines() if line.startswith("pending ")]
    assert len(named) == shown and set(named) <= keys
    assert all(
        "(not persisted before --timeout)" in line
        for line in out.splitlines()
        if line.startswith("pending ")
    )
    assert f"... and {steps - shown} more pending" in out
    assert f"lamin-lightning status {dirpath}" in out

    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.remaining == [] and store.keys() == keys


def test_a_job_this_version_cannot_read_keeps_the_folder_pending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job line a newer version wrote (record version 3): it stays in the journal, as
    before, but `status` said "nothing pending" and `flush` exited 0, while the docs say
    the working folder may be deleted once nothing is pending. Both now count it."""
    from lamin_lightning._cli import main

    dirpath, journal, store = _failed_fit(tmp_path, steps=1)
    item = json.loads(journal.read_bytes().splitlines()[0])
    item["entry"]["v"] = 3
    journal.write_text(json.dumps(item) + "\n")
    pending = 1

    assert main(["status", str(dirpath)]) == pending
    assert "cannot be read by this version" in capsys.readouterr().out
    assert main(["status", "--json", str(dirpath)]) == pending
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["id"] == item["id"] and "version 3" in listed["unreadable"]
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert [(p, i) for p, i, _ in report.unreadable] == [(journal, item["id"])]
    assert main(["flush", "--no-progress", str(dirpath)]) == pending
    assert json.loads(journal.read_bytes().splitlines()[0])["id"] == item["id"]  # kept


def test_job_lines_damaged_into_other_valid_json_are_counted_or_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """One-bit damage that leaves valid JSON: a job line whose "id" key is damaged made
    `status`, `flush` and every setup fail with a raw KeyError; one whose kind is damaged
    was dropped without a word; a deeply nested line raised RecursionError; a damaged
    submission time crashed `status`. The job without its id still counts and persists;
    the others are named in a warning, and the lines around them still count."""
    from lamin_lightning._cli import main

    dirpath, journal, store = _failed_fit(tmp_path, steps=3)
    first, second, third = journal.read_bytes().splitlines()[:3]
    damaged_time = json.loads(third)
    damaged_time["entry"]["submitted_at"] = float("nan")
    journal.write_bytes(
        b"\n".join(
            [
                first.replace(b'"id"', b'"hd"', 1),
                second.replace(b'"t":"job"', b'"t":"jnb"', 1),
                b"[" * 100_000 + b"]" * 100_000,
                json.dumps(damaged_time).encode(),
            ]
        )
        + b"\n"
    )

    assert main(["status", str(dirpath)]) == 1
    out = capsys.readouterr().out
    assert "2 job(s) pending" in out and "epoch=0-step=1.ckpt" in out
    assert "unknown form (kind 'jnb')" in caplog.text
    assert "torn or corrupt" in caplog.text  # the nested line
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.saved == 2 and not report.remaining and not report.unreadable
    assert store.keys() == {"checkpoints/epoch=0-step=1.ckpt", "checkpoints/epoch=0-step=3.ckpt"}


def test_a_journal_that_cannot_be_opened_is_reported_and_the_others_are_flushed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder in a journal's place (or a journal nobody may open) stopped `flush` with a
    raw traceback, for every other journal too, and `status` with it."""
    from lamin_lightning._cli import main

    dirpath, journal, store = _failed_fit(tmp_path, steps=1)
    blocked = journal.with_name("outbox-000000000000.jsonl")
    blocked.mkdir()

    assert main(["status", str(dirpath)]) == 1
    assert "the journal cannot be read" in capsys.readouterr().out
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.saved == 1 and [p for p, _, _ in report.unreadable] == [blocked]
    assert store.keys() == {"checkpoints/epoch=0-step=1.ckpt"}
    assert main(["flush", "--no-progress", str(dirpath)]) == 1
    assert "cannot be opened" in capsys.readouterr().err


def test_an_unreadable_job_a_later_job_of_its_key_settles_is_not_reported(tmp_path: Path) -> None:
    """The report listed the unreadable jobs it found before the replay; the replay of a
    later save of the same key settles them (obsolete) and the emptied journal goes, but
    `flush` still said they were kept and exited 1."""
    from lamin_lightning._jobs import encode

    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    path = dirpath / "a.ckpt"
    path.write_bytes(b"x" * 100)
    record = JobRecord(
        op="save", kind="checkpoint", key="checkpoints/a.ckpt", local_path=str(path), store="memory"
    )
    journal = staging_root(dirpath) / "outbox-test.jsonl"
    journal.parent.mkdir(parents=True)
    newer = {"t": "job", "id": "newer", "entry": {**encode(record), "v": 99}}
    journal.write_text(json.dumps(newer) + "\n")
    outbox = Outbox(journal)
    outbox.open()
    outbox.append(record)
    outbox.close()

    report = flush_directory(dirpath, progress=False, stores={"memory": MemoryStore()})

    assert report.saved == 1 and report.unreadable == []
    assert journal_paths(staging_root(dirpath)) == []


def test_a_replay_longer_than_max_pending_does_not_hold_setup_while_storage_is_slow(
    tmp_path: Path,
) -> None:
    """An outbox of more jobs than ``max_pending`` (a long crash, a long outage): the next
    fit's ``setup`` queues their replays at once and training starts while storage is
    still stuck on them. It waited in ``setup`` for the replays beyond the limit, where
    nothing (not Lightning's SIGTERM handler, installed after setup) could stop it."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    _leave_failed_jobs(tmp_path, dirpath, store, steps=6, save_top_k=-1, every_n_train_steps=1)
    left = [key for p in journal_paths(staging_root(dirpath)) for key in _pending_keys(p)]
    assert len(left) == 6

    store.hang()
    trained = threading.Event()
    rescued: list[bool] = []

    def watchdog() -> None:  # ends the test (failing it) should setup never return
        if not trained.wait(30):
            rescued.append(True)
            store.release()

    class Released(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            trained.set()
            store.release()

    threading.Thread(target=watchdog, daemon=True).start()
    observer = RecordingObserver()
    second = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=2,
        artifact_observers=[observer],
    )
    make_trainer(tmp_path, [Released(), second], max_steps=2).fit(TinyModel(), loader())
    assert rescued == [], "setup waited for the replays"
    assert trained.is_set()
    assert [e.key for e in observer.events if e.recovered] == left
    assert second.persistence_stats.training_stall_seconds < 30
    _kept_set_matches_store(dirpath, store)
    assert not journal_paths(staging_root(dirpath))


_HOLD = """
import sys
from lamin_lightning._journal import Outbox

outbox = Outbox(sys.argv[1])
outbox.open()
sys.stdout.write("held\\n")
sys.stdout.flush()
sys.stdin.read()  # until the test closes stdin
outbox.close()
"""


def test_a_journal_another_process_holds_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `lamin-lightning flush` (or another run) holding the folder's journal: the fit
    journals into one of its own, and says so, with what that means for a flush's
    replays (before, silently: the flush's older saves then replaced its newer ones)."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    _leave_failed_jobs(tmp_path, dirpath, store, steps=1, every_n_train_steps=1)
    (journal,) = journal_paths(staging_root(dirpath))
    assert "held by another process" not in caplog.text
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(journal)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        caplog.clear()
        later = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1)
        make_trainer(tmp_path, [later], max_steps=1).fit(TinyModel(), loader())
        assert caplog.text.count("held by another process") == 1
        assert str(journal) in caplog.text
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(60)
    assert _pending_keys(journal), "the held journal's jobs were left to its holder"


_KILLED_WITH_A_FORKED_WORKER_ALIVE = """
import os, signal, sys
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
sys.path.insert(0, sys.argv[2])
from helpers import TinyModel, make_trainer
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

class Held(Dataset):
    # From the second epoch on, item 2 and later wait in the DataLoader worker until the
    # test closes stdin: the worker (a forked child, as with num_workers > 0 on Linux,
    # forked anew each epoch after the journal was opened) outlives the trainer.
    def __len__(self):
        return 4
    def __getitem__(self, index):
        if index >= 2 and os.path.exists(sys.argv[1] + ".second-epoch"):
            sys.stdin.read()
        return (torch.ones(4),)

class KillInTheSecondEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, *args):
        open(sys.argv[1] + ".second-epoch", "w").close()
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 6:  # before this step's save (checkpoint callbacks run last)
            print("journaled", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would

store = MemoryStore()
store.hang()  # the saves stay pending in the outbox
callback = MemoryCheckpoint(store, dirpath=sys.argv[1], every_n_train_steps=1, save_top_k=-1,
                            max_pending=16)
data = DataLoader(Held(), batch_size=1, num_workers=1, multiprocessing_context="fork",
                  persistent_workers=False)
make_trainer(sys.argv[1], [callback, KillInTheSecondEpoch()], max_steps=20).fit(
    TinyModel(), data)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_dataloader_worker_that_outlives_a_killed_trainer_does_not_hold_its_outbox(
    tmp_path: Path,
) -> None:
    """A DataLoader worker is forked from the training process while it holds the outbox
    journal's flock: the child shares that lock. Killed, the trainer leaves the worker
    alive a while (it notices its parent's death only between items), and a user's fork
    pool can stay for good: `lamin-lightning flush` then refused the folder as held by a
    training run, and the next run left its jobs alone."""
    dirpath = tmp_path / "ckpt"
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_WITH_A_FORKED_WORKER_ALIVE,
            str(dirpath),
            str(Path(__file__).parent),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert trainer.stdout is not None
        assert trainer.stdout.readline() == "journaled\n", "the trainer ended early"
        assert trainer.wait(60) == -signal.SIGKILL
        (journal,) = journal_paths(staging_root(dirpath))
        assert _pending_keys(journal), "the killed run left jobs in its outbox"
        assert not is_locked(journal), "the dead trainer's forked worker holds its outbox"
        store = MemoryStore()
        report = flush_directory(dirpath, progress=False, stores={"memory": store})
        assert not report.busy and not report.remaining
        assert store.keys(kind="checkpoint") == {
            *(f"checkpoints/epoch=0-step={step}.ckpt" for step in (1, 2, 3, 4)),
            "checkpoints/epoch=1-step=5.ckpt",
        }
    finally:
        assert trainer.stdin is not None
        trainer.stdin.close()  # the worker returns its item and exits
        trainer.kill()
        trainer.wait(60)


# A thread of the training process is between opening a descriptor that carries (or is
# about to carry) a lock and being done with it, held there, when the main thread forks
# (a DataLoader worker); the thread then finishes, and the process is killed. argv: the
# window, the folder. Prints the file whose lock must not outlive the process.
_FORKED_WHILE_A_THREAD_HOLDS_A_DESCRIPTOR = """
import fcntl, os, signal, sys, threading, time, types
from pathlib import Path
from lamin_lightning import JobRecord, _journal, _owners

window, folder = sys.argv[1], Path(sys.argv[2])
journal = folder / "outbox-test.jsonl"
at_fork, forked = threading.Event(), threading.Event()

def held(*args):
    at_fork.set()
    forked.wait()

looker = None
if window == "fsync":  # Outbox.sync's fdatasync, on its own copy of the descriptor
    outbox = _journal.Outbox(journal)
    outbox.open()
    outbox.append(JobRecord(op="save", kind="checkpoint", key="k", local_path="/k"))
    fdatasync = os.fdatasync
    os.fdatasync = lambda fd: (held(), fdatasync(fd))
    work = outbox.sync
elif window == "open":  # Outbox.open waiting out a looker (lamin-lightning status)
    journal.touch()
    looker = os.open(journal, os.O_RDONLY)
    fcntl.flock(looker, fcntl.LOCK_SH)
    _journal.time = types.SimpleNamespace(sleep=held)
    work = _journal.Outbox(journal).open
else:  # an owner's lock file, waiting out a process that looks at it (dead_owner)
    name = _owners.owner()
    journal = folder / f"{name}.lock"
    looker = os.open(journal, os.O_RDWR | os.O_CREAT)
    fcntl.flock(looker, fcntl.LOCK_EX)
    real_flock = fcntl.flock
    def flock(fd, operation):
        if fd != looker:
            held()
        return real_flock(fd, operation)
    fcntl.flock = flock
    def work():
        with _owners.folder_lock(folder):
            _owners.hold(folder)
done = []
thread = threading.Thread(target=lambda: done.append(work()))
thread.start()
at_fork.wait()
ready, child_ready = os.pipe()
child = os.fork()
if child == 0:
    if looker is not None:
        os.close(looker)  # the looker is the parent's
    os.write(child_ready, b"x")
    sys.stdin.read()  # a DataLoader worker busy with an item
    os._exit(0)
os.read(ready, 1)
if looker is not None:
    os.close(looker)
forked.set()
thread.join()
print(journal if done else "", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("window", ["fsync", "open", "owner"])
def test_a_child_forked_while_another_thread_takes_a_lock_does_not_keep_it(
    tmp_path: Path, window: str
) -> None:
    """A child forked while a thread held a copy of the journal's descriptor for its
    fsync, or had opened the journal but not yet locked it (a looker held it), shared the
    lock taken on it: the dead trainer's outbox stayed held while the child lived (the
    flaky case of the test above, under a loaded disk), and so did its owner's lock file
    (its leftovers looked alive)."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", _FORKED_WHILE_A_THREAD_HOLDS_A_DESCRIPTOR, window, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert trainer.stdout is not None
        locked = trainer.stdout.readline().strip()
        assert locked, "the thread failed, or the trainer ended early"
        assert trainer.wait(60) == -signal.SIGKILL
        locked = Path(locked)
        if window == "owner":
            name = locked.name.removesuffix(".lock")
            with dead_owner(tmp_path, name) as dead:
                assert dead, "the dead trainer's forked child holds its owner lock"
        else:
            assert not is_locked(locked), "the dead trainer's forked child holds its outbox"
            Outbox(locked).open()  # taken over by the next run, or a flush
    finally:
        assert trainer.stdin is not None
        trainer.stdin.close()  # the child exits
        trainer.kill()
        trainer.wait(60)


@contextmanager
def _read_only_mount(folder: Path) -> Iterator[None]:
    """``folder`` bind-mounted read-only onto itself; skip where mounting is not permitted."""
    mount = shutil.which("mount")
    if (
        mount is None
        or subprocess.run(
            [mount, "--bind", str(folder), str(folder)], capture_output=True
        ).returncode
    ):
        pytest.skip("bind mounts are not permitted here (needs root)")
    try:
        subprocess.run([mount, "-o", "remount,ro,bind", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("read_only", ["dirpath", "parent"])
def test_a_checkpoint_directory_on_a_read_only_filesystem_is_named_as_such(
    tmp_path: Path, read_only: str
) -> None:
    """ModelCheckpoint fails at its first save with OSError EROFS (Read-only file system).
    We fail at setup, and said "Permission denied" and "fix its permissions", which on a
    read-only mount (as root, too) points the wrong way."""
    parent = tmp_path / "shared"
    dirpath = parent / "ckpts"
    dirpath.mkdir(parents=True)
    callback = MemoryCheckpoint(dirpath=dirpath, every_n_train_steps=1)
    _CountingModel.steps = 0
    with (
        _read_only_mount(dirpath if read_only == "dirpath" else parent),
        pytest.raises(CheckpointDirectoryError) as raised,
    ):
        make_trainer(tmp_path, [callback], max_steps=2).fit(_CountingModel(), loader())
    assert raised.value.errno == errno.EROFS
    message = str(raised.value)
    assert "Read-only file system" in message and "Permission denied" not in message
    assert "read-write" in message.split("Read-only file system", 1)[1], "the fix is named"
    assert "dirpath" in message
    assert _CountingModel.steps == 0


def test_a_status_looking_at_a_journal_does_not_keep_its_owner_from_opening_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lamin-lightning status` tells a held journal by taking a shared lock for an instant
    (is_locked). A training run's setup (or a flush) opening the journal in that instant
    took it for one another process holds: the run left its own unfinished jobs to
    nobody and journaled into a new file, the flush exited with 3. A holder that lets go
    at once is not one: the open tries again."""
    import fcntl

    path = tmp_path / "outbox-a.jsonl"
    first = Outbox(path)
    first.open()
    first.append(_job("save", "k"))
    first.close()
    looking = open(path, encoding="utf-8")  # noqa: SIM115 - as is_locked looks
    real_flock = fcntl.flock
    real_flock(looking.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    refused = threading.Event()

    def flock(fd: Any, operation: int) -> None:
        try:
            real_flock(fd, operation)
        except BlockingIOError:
            if operation & fcntl.LOCK_EX and not refused.is_set():
                refused.set()
                looking.close()  # the status is done looking
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    outbox = Outbox(path)
    try:
        assert [record.key for _, record in outbox.open()] == ["k"]
    finally:
        outbox.close()
        looking.close()
    assert refused.is_set(), "the open never met the status's lock"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_keeps_a_file_that_took_the_number_of_a_journal_closed_unawares(
    tmp_path: Path,
) -> None:
    """A forked child points its copies of the journals' locked descriptors at /dev/null.
    A journal whose handle was closed without the outbox's close (its Outbox dropped
    unclosed, collected) left its number behind: the next file opened got that number,
    and every forked child (a DataLoader worker) found that file, not its data, there."""
    import gc

    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    number = outbox._handle.fileno()  # type: ignore[union-attr]
    del outbox
    gc.collect()  # the handle is closed by its finalizer, not by Outbox.close
    data = tmp_path / "data.bin"
    data.write_bytes(b"the worker's data")
    fd = os.open(data, os.O_RDONLY)
    try:
        if fd != number:
            pytest.skip("the number was not reused")
        read_r, read_w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                os.write(read_w, os.pread(fd, 64, 0) or b"<nothing>")
            finally:
                os._exit(0)
        os.close(read_w)
        os.waitpid(child, 0)
        assert os.read(read_r, 64) == b"the worker's data"
        os.close(read_r)
    finally:
        os.close(fd)


def _keepers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lamin-lightning-journal-keeper"]


def test_a_journal_kept_for_a_running_upload_stays_held_through_a_takeover_until_it_returns(
    tmp_path: Path,
) -> None:
    """A stopped owner whose upload still runs keeps its journal (keep_until_done); the next
    opener in this process takes it over with its pending jobs. That opener closing it
    before the upload returns (a fit that fails at setup, a flush cut short) released it:
    another process could then replay the upload's job under it. It now stays held until
    the upload's thread returns, through any number of takeovers."""
    from lamin_lightning._journal import keep_until_done

    path = tmp_path / "outbox-x.jsonl"
    first = Outbox(path)
    first.open()
    job = first.append(_job("save", "a.ckpt"))
    returned = threading.Event()
    upload = threading.Thread(target=returned.wait, args=(60,), name="an upload", daemon=True)
    upload.start()
    keep_until_done(first, [upload])
    assert is_locked(path)

    second = Outbox(path)
    assert [job_id for job_id, _ in second.open()] == [job]  # taken over, job and all
    second.close()
    assert is_locked(path), "released while the upload still runs"
    third = Outbox(tmp_path / "." / "outbox-x.jsonl")  # another spelling of the same path
    assert [job_id for job_id, _ in third.open()] == [job]
    third.close()
    assert is_locked(path), "released while the upload still runs"

    assert [job_id for job_id, _ in third.open()] == [job]  # the kept one itself, again
    third.close()
    assert is_locked(path), "released while the upload still runs"

    returned.set()
    for keeper in _keepers():
        keeper.join(timeout=60)
    assert not is_locked(path)
    assert [job_id for job_id, _ in read_pending(path)] == [job]


def test_a_checkpoint_folder_name_too_long_for_the_working_folder_fails_at_setup_saying_so(
    tmp_path: Path,
) -> None:
    """The working folder beside dirpath is named from it (``.{name}.lamin-lightning``, 17
    bytes more): a dirpath whose last folder is named 239 to 255 bytes long leaves no room
    for it. Refused before the first step, saying which name and how long it may be;
    before, the error blamed permissions or free space (found by an adversarial helper)."""
    dirpath = tmp_path / ("c" * 239)
    callback = MemoryCheckpoint(dirpath=dirpath, every_n_train_steps=1)
    _CountingModel.steps = 0
    with pytest.raises(CheckpointDirectoryError, match=r"at most 238 bytes long") as raised:
        make_trainer(tmp_path, [callback], max_steps=2).fit(_CountingModel(), loader())
    assert "permissions" not in str(raised.value)
    assert _CountingModel.steps == 0, "the error must come before the first training step"

    fits = tmp_path / ("c" * 238)
    callback = MemoryCheckpoint(dirpath=fits, every_n_train_steps=1)
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    files = {path.name for path in fits.glob("*.ckpt")}
    assert files and {k.rsplit("/", 1)[-1] for k in callback.store.keys(kind="checkpoint")} == files


def test_a_journal_that_cannot_be_read_is_told_as_such_and_commands_are_quoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` and `flush` on a journal that cannot be read at all (EACCES; here a folder
    in its place, which root cannot read either) said a newer version would read it;
    the fix is the file. And the command `status` prints to copy was not quoted for a
    shell: a dirpath with a space broke it (found by an adversarial helper)."""
    import shlex

    from lamin_lightning._cli import main

    base = tmp_path / "sp ace"
    base.mkdir()
    dirpath, journal, _ = _failed_fit(base, steps=1)
    assert main(["status", str(dirpath)]) == 1
    assert f"lamin-lightning flush {shlex.quote(str(dirpath))}`" in capsys.readouterr().out

    journal.rename(journal.with_name("aside.jsonl.bak"))
    journal.mkdir()  # where the journal was: reading it fails (IsADirectoryError)
    assert main(["status", str(dirpath)]) == 1
    out = capsys.readouterr().out
    assert "by this version" not in out and "make it readable" in out, out
    assert main(["flush", str(dirpath)]) != 0
    err = capsys.readouterr().err
    assert "by this version" not in err and "make it readable" in err, err


def test_a_written_mark_a_full_disk_refused_is_noted_later_and_the_failed_save_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With async_write, the disk is full for an instant at step 2: the journal refuses the
    line noting that its background write completed the file, and the staged copy of that
    small file is refused too; the save fails (storage fails for good anyway). The file is
    whole, in the folder. Its replay dropped it as never written ("an earlier checkpoint's
    file"): no artifact, and no failure either. The mark is now noted at the journal's next
    line, and the replay persists the checkpoint (found by a helper's fault injection)."""
    from lamin_lightning._staging import Stager

    refused: list[str] = []
    real_write, real_stage = Outbox._write, Stager.stage

    def write(self: Outbox, item: dict[str, Any]) -> None:
        if item.get("t") == "written" and not refused:
            refused.append(str(item["id"]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, item)

    def stage(self: Stager, path: Any, staged: Any = None, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("step=2.ckpt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_stage(self, path, staged, *args, **kwargs)

    monkeypatch.setattr(Outbox, "_write", write)
    monkeypatch.setattr(Stager, "stage", stage)
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    _leave_failed_jobs(
        tmp_path, dirpath, store, steps=4, save_top_k=-1, every_n_train_steps=2, async_write=True
    )
    monkeypatch.undo()
    assert refused and "could not note in" in caplog.text
    assert checkpoint_files(dirpath) == {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}
    assert store.keys(kind="checkpoint") == set()

    observer = RecordingObserver()
    second = MemoryCheckpoint(
        store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=2, artifact_observers=[observer]
    )
    make_trainer(tmp_path, [second]).validate(TinyModel(), loader())
    assert "dropping the save" not in caplog.text
    _kept_set_matches_store(dirpath, store)
    assert [(type(e), e.recovered) for e in observer.events] == [(ArtifactSavedEvent, True)] * 2
    assert not journal_paths(staging_root(dirpath))


@pytest.mark.parametrize("room", ["at_the_next_line", "only_at_close"])
def test_marks_a_full_disk_refused_reach_the_journal_with_its_next_line_or_its_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: str
) -> None:
    """A 'written' mark (a background write completed its file) and a 'handed' mark (a
    user's removal returned) whose lines the disk refuses: they were lost, and a replay
    dropped the save as never written, or kept the removal's artifact. Now they are written
    before the journal's next line, or, if the disk refuses every line until then, by the
    compaction at close."""
    outbox, save = _open_with_a_marked_save(tmp_path)
    removal = outbox.append(_job("remove", "k/b.ckpt"))
    real_write = Outbox._write

    def write(self: Outbox, item: dict[str, Any]) -> None:
        if room == "only_at_close" or item.get("t") in ("written", "handed"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, item)

    monkeypatch.setattr(Outbox, "_write", write)
    outbox.mark_written(save, (1, 2, 3))
    outbox.mark_handed_over(removal)
    with pytest.raises(OSError) if room == "only_at_close" else contextlib.nullcontext():
        outbox.append(_job("save", "k/c.ckpt"))
    if room == "at_the_next_line":
        records = dict(read_pending(outbox.path))
        assert records[save].written_file == (1, 2, 3) and records[removal].handed_over
    outbox.close()
    records = dict(read_pending(outbox.path))
    assert records[save].written_file == (1, 2, 3) and records[removal].handed_over


@pytest.mark.parametrize("moved", [True, False], ids=["moved_elsewhere", "outbox_off"])
def test_a_crashed_callbacks_journal_is_replayed_by_another_callback_of_its_folder(
    tmp_path: Path, moved: bool
) -> None:
    """A callback leaves jobs in the outbox (its storage hung past flush_timeout). The next
    run in the folder has it still in the trainer, but writing to a folder of its own now,
    or with ``outbox=False``: either way it replays nothing in this folder. Another
    callback there replays its journal (as it does one whose callback the user dropped);
    it skipped it as the first one's, and its jobs stayed pending, their files without
    artifacts."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    settings = {"monitor": "score", "save_top_k": 2, "every_n_train_steps": 1}
    first = MemoryCheckpoint(store, dirpath=dirpath, flush_timeout=0.2, max_pending=32, **settings)
    try:
        with pytest.warns(UserWarning, match="not persisted"):
            make_trainer(tmp_path, [first], max_steps=4).fit(
                TinyModel(scores=[5, 3, 4, 1]), loader()
            )
    finally:
        store.release()
    assert [r for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]

    again = (
        MemoryCheckpoint(store, dirpath=tmp_path / "elsewhere", **settings)
        if moved
        else MemoryCheckpoint(store, dirpath=dirpath, outbox=False, **settings)
    )
    assert again.state_key == first.state_key
    observer = RecordingObserver()
    other = MemoryCheckpoint(
        store, dirpath=dirpath, every_n_train_steps=5, artifact_observers=[observer]
    )
    make_trainer(tmp_path, [again, other]).validate(TinyModel(), loader())

    assert [r for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)] == []
    _kept_set_matches_store(dirpath, store)
    assert observer.events and all(e.recovered for e in observer.events)


@pytest.mark.parametrize("holder", ["no_one", "another_process", "gone"])
def test_a_mark_after_its_journal_was_closed_reaches_the_journal_file(
    tmp_path: Path, holder: str
) -> None:
    """A background write (Lightning's AsyncCheckpointIO after a Ctrl+C'd fit) completes
    its file after the journal's holder closed it: the 'written' mark was kept in this
    process only, for a later open here, and lost when the process ended; a flush then
    dropped the folder the write completed (crash sweep seed 1365, ``--folder --signal
    INT``). Now, with no one holding the journal, the mark is appended to the file itself,
    where a flush in another process reads it. Held by another process, it is kept for the
    next open here, as before; a journal deleted (nothing pending) is not made again."""
    import fcntl

    outbox, save = _open_with_a_marked_save(tmp_path)
    removal = outbox.append(_job("remove", "k/b.ckpt"))
    outbox.close()
    if holder == "gone":
        outbox.path.unlink()
    with contextlib.ExitStack() as stack:
        if holder == "another_process":  # another open file description: a lock of its own
            other = stack.enter_context(open(outbox.path, "a+", encoding="utf-8"))
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        outbox.mark_written(save, (1, 2, 3))
        outbox.mark_handed_over(removal)
        if holder == "gone":
            assert not outbox.path.exists()
            return
        records = dict(read_pending(outbox.path))  # as a flush in another process reads it
        noted = records[save].written_file == (1, 2, 3) and records[removal].handed_over
        assert noted == (holder == "no_one")
    later = Outbox(outbox.path)  # the next open in this process gets the marks either way
    records = dict(later.open())
    assert records[save].written_file == (1, 2, 3) and records[removal].handed_over
    later.close()
    records = dict(read_pending(later.path))
    assert records[save].written_file == (1, 2, 3) and records[removal].handed_over


@pytest.mark.parametrize("tail", ["torn", "whole_but_its_newline"])
def test_a_mark_appended_after_close_deals_with_a_torn_last_line_as_open_does(
    tmp_path: Path, tail: str
) -> None:
    """A mark appended to a journal no one holds (see
    test_a_mark_after_its_journal_was_closed_reaches_the_journal_file), whose last line a
    holder killed mid-write left torn: a part of a line is cut off, not ended with a
    newline and left as a damaged line that every read warns about; a line whole but for
    its newline is ended, and kept."""
    outbox, save = _open_with_a_marked_save(tmp_path)
    outbox.close()
    from lamin_lightning._jobs import encode

    extra = _job("save", "k/b.ckpt")
    line = json.dumps({"t": "job", "id": "b-1", "entry": encode(extra)}).encode()
    with open(outbox.path, "ab") as handle:
        handle.write(line[: len(line) // 2] if tail == "torn" else line)
    outbox.mark_written(save, (1, 2, 3))
    raw = outbox.path.read_bytes()
    assert raw.endswith(b"\n") and (line in raw) == (tail == "whole_but_its_newline")
    assert all(json.loads(piece) for piece in raw.splitlines() if piece.strip())
    records = dict(read_pending(outbox.path))
    assert records[save].written_file == (1, 2, 3)
    assert ("b-1" in records) == (tail == "whole_but_its_newline")
