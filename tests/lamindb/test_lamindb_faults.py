"""Faults in the real LaminDB layer: storage that refuses writes or deletions, and the
flush that finishes the jobs afterwards (docs/failures.md)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
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
    run_features,
    single,
)

import lamin_lightning as ll
from helpers import EndTrainingOnceSet, HoldingObserver
from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent, RetryPolicy
from lamin_lightning._cli import main as cli_main
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*could not be persisted.*"),
]

NO_DELAY = RetryPolicy(attempts=2, initial_backoff=0.0, max_backoff=0.0, jitter=0.0)


class FlushEachStep(pl.Callback):
    """Every checkpoint of step n is finished before step n + 1 saves anything."""

    def __init__(self, callback: ll.Checkpoint) -> None:
        self.callback = callback

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        assert self.callback.flush(timeout=120)


def _refuse_deletions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Storage refuses to delete stored files (a read-only mount): EROFS, each time."""
    import lamin_lightning._lamin_store as lamin_store

    refused: list[str] = []

    def remove_stored(stored: Any, artifact: Any, *, partial: bool) -> None:
        refused.append(str(stored))
        raise OSError(errno.EROFS, "Read-only file system", str(stored))

    monkeypatch.setattr(lamin_store, "_remove_stored", remove_stored)
    return refused


def test_a_flush_reports_a_removal_whose_deletion_fails_as_failed_only(
    ln: Any,
    no_run: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Storage refuses deletions (read-only): the eviction of step 1 is told (removed event,
    before the deletion, as by the reference) and then fails, and stays in the outbox. A
    flush while storage still refuses reports that job once, as failed: not also as
    removed (the artifact is still there), in the report's counts and on the command's
    lines. Once storage accepts deletions again, the flush removes it."""
    dirpath = tmp_path / "ckpts"
    refused = _refuse_deletions(monkeypatch)
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        on_error="warn",
        retry=NO_DELAY,
        artifact_observers=[observer],
    )
    fit(
        callback,
        tmp_path,
        steps=2,
        model=TierModel(scores=[2.0, 1.0]),
        extra_callbacks=[FlushEachStep(callback)],
    )
    assert refused, "the injected refusal never ran"
    prefix = callback.checkpoint_key_prefix
    evicted = f"{prefix}/epoch=0-step=1.ckpt"
    # Live: told, then failed, as documented (docs/migrating.md); the artifact stays.
    kinds = [(type(e).__name__, e.key) for e in observer.events if e.key == evicted]
    assert kinds == [
        ("ArtifactSavedEvent", evicted),
        ("ArtifactRemovedEvent", evicted),
        ("ArtifactFailedEvent", evicted),
    ], kinds
    assert evicted in artifacts_under(ln, prefix)

    report = ll.flush_directory(dirpath, progress=False, timeout=120, retry=NO_DELAY)
    assert [r.key for r in report.remaining] == [evicted]
    assert (report.saved, report.removed, report.failed) == (0, 0, 1), report.events
    assert [type(e) for e in report.events] == [ArtifactFailedEvent], report.events
    assert evicted in artifacts_under(ln, prefix)

    capsys.readouterr()
    assert cli_main(["flush", "--no-progress", str(dirpath)]) == 1
    out = capsys.readouterr().out
    assert "saved 0, removed 0, failed 1, dropped 0; 1 still pending" in out, out
    assert not any(line.startswith("removed") for line in out.splitlines()), out

    monkeypatch.undo()
    report = ll.flush_directory(dirpath, progress=False, timeout=120)
    assert (report.removed, report.failed, report.remaining) == (1, 0, []), report
    assert [type(e) for e in report.events] == [ArtifactRemovedEvent]
    assert set(artifacts_under(ln, prefix)) == {f"{prefix}/epoch=0-step=2.ckpt"}


class ReleaseWhenNamed(logging.Handler):
    """Releases ``observer`` once a "training has waited" warning names the observers (or,
    so that a warning that never does fails the test instead of hanging it, at the sixth)."""

    def __init__(self, observer: HoldingObserver) -> None:
        super().__init__(logging.WARNING)
        self.observer = observer
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith("training has waited"):
            return
        self.messages.append(message)
        if "observers" in message or len(self.messages) >= 6:
            self.observer.gate.set()


def test_training_held_by_a_blocking_observer_is_told_it_is_the_observer(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An observer that does not return holds every later job (events are delivered in
    order), so with ``max_pending`` jobs outstanding training waits. The warning that
    tells training why it waits named storage or the database ("may be slow or
    unreachable"), which were fine; it names the event the observers hold, and the fix."""
    import lamin_lightning._bridge as bridge

    monkeypatch.setattr(bridge, "SLOT_WAIT_WARNING_S", 0.25)
    observer = HoldingObserver()
    handler = ReleaseWhenNamed(observer)
    logger = logging.getLogger("lamin_lightning")
    logger.addHandler(handler)
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=1,
        artifact_observers=[observer],
    )
    try:
        fit(callback, tmp_path, steps=2)
    finally:
        logger.removeHandler(handler)
        observer.gate.set()
    first = f"{callback.checkpoint_key_prefix}/epoch=0-step=1.ckpt"
    assert handler.messages, "training never waited for a slot"
    named = [m for m in handler.messages if "observers" in m]
    assert named, handler.messages
    assert repr(first) in named[0] and "must return" in named[0], named[0]
    assert "storage or the database may be slow" not in named[0], named[0]
    # Nothing lost: both checkpoints persisted once, every event delivered.
    assert set(artifacts_under(ln, callback.checkpoint_key_prefix)) == {
        first,
        f"{callback.checkpoint_key_prefix}/epoch=0-step=2.ckpt",
    }
    assert callback.persistence_stats.saved == 2


def test_a_teardown_flush_held_by_a_blocking_observer_names_it(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Teardown's flush gives up after ``flush_timeout`` while an observer holds an event:
    its warning says so (which event, since when, the fix), not only that persistence did
    not finish. Once the observer returns, the checkpoint is there once."""
    observer = HoldingObserver()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        save_top_k=-1,
        every_n_train_steps=1,
        flush_timeout=1.5,
        artifact_observers=[observer],
    )
    try:
        with pytest.warns(UserWarning, match="flush_timeout=1.5s") as caught:
            fit(
                callback,
                tmp_path,
                steps=1,
                extra_callbacks=[
                    EndTrainingOnceSet(observer.entered, "no event reached the observer")
                ],
            )
    finally:
        observer.gate.set()
    key = f"{callback.checkpoint_key_prefix}/epoch=0-step=1.ckpt"
    [message] = [str(w.message) for w in caught if "flush_timeout" in str(w.message)]
    assert f"the event of {key!r} has been with the on_artifact_* hooks" in message, message
    assert "must return" in message, message
    # It is persisted (committed, finished in the outbox): not named as not persisted.
    assert "not persisted" not in message, message
    assert f"persisted, but their events were not delivered yet: {key}." in message, message
    # Nothing is left in the outbox: flush() and pending_artifacts() say so.
    assert callback.pending_artifacts() == [] and callback.flush(timeout=0) is True
    report = ll.flush_directory(tmp_path / "ckpts", progress=False, timeout=120)
    assert report.remaining == [] and report.failed == 0, report
    assert list(artifacts_under(ln, callback.checkpoint_key_prefix)) == [key]


def _storage_files(ln: Any) -> set[str]:
    root = Path(str(ln.settings.storage.root)) / ".lamindb"
    return {p.name for p in root.iterdir()} if root.exists() else set()


class HeldCopy:
    """The first upload of a fit (a worker's ``LaminStore.create``) held mid-copy into
    storage, its source file open, until :attr:`gate` is set: slow storage."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import shutil as real_shutil
        import types

        import lamindb.core.storage.paths as lamindb_paths

        from lamin_lightning._lamin_store import LaminStore

        self.copying, self.gate, self.done = threading.Event(), threading.Event(), threading.Event()
        self.warning = ""
        stale: list[threading.Thread] = []

        def copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() in stale:
                with open(src, "rb") as source:  # the copy has begun: the file is open
                    self.copying.set()
                    assert self.gate.wait(timeout=300), "the test never released the copy"
                    with open(dst, "wb") as target:
                        real_shutil.copyfileobj(source, target)
                return dst
            return real_shutil.copyfile(src, dst, *args, **kwargs)

        proxy = types.SimpleNamespace(
            **{n: getattr(real_shutil, n) for n in dir(real_shutil) if not n.startswith("__")}
        )
        proxy.copyfile = copyfile
        monkeypatch.setattr(lamindb_paths, "shutil", proxy)
        create = LaminStore.create

        def create_first_slowly(store: Any, *args: Any, **kwargs: Any) -> Any:
            if stale or not threading.current_thread().name.startswith("lamin-lightning"):
                return create(store, *args, **kwargs)
            stale.append(threading.current_thread())
            try:
                return create(store, *args, **kwargs)
            finally:
                self.done.set()

        monkeypatch.setattr(LaminStore, "create", create_first_slowly)

    def fit_that_gives_up(self, tmp_path: Path) -> ll.Checkpoint:
        """One checkpoint; teardown gives up on its upload (``flush_timeout=1``) mid-copy."""
        callback = ll.Checkpoint(
            dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_train_steps=1, flush_timeout=1
        )
        with pytest.warns(UserWarning, match="flush_timeout=1") as warned:
            fit(
                callback,
                tmp_path,
                steps=1,
                extra_callbacks=[EndTrainingOnceSet(self.copying, "the upload never started")],
            )
        self.warning = " ".join(str(w.message) for w in warned if "flush_timeout" in str(w.message))
        return callback


def _assert_persisted_once_without_orphans(
    ln: Any, callback: ll.Checkpoint, before: set[str]
) -> None:
    key = f"{callback.checkpoint_key_prefix}/epoch=0-step=1.ckpt"
    [artifact] = artifacts_under(ln, callback.checkpoint_key_prefix).values()
    assert artifact.key == key
    assert artifact_features(ln, artifact), "the checkpoint was not annotated"
    known = {Path(str(a.path)).name for a in ln.Artifact.objects.all()}
    orphans = sorted(_storage_files(ln) - before - known)
    assert orphans == [], f"files in storage that no artifact names: {orphans}"


def test_a_flush_after_a_teardown_that_gave_up_mid_upload_leaves_no_orphan_in_storage(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Teardown gives up (``flush_timeout``) while a worker copies a checkpoint into storage
    (slow storage); its thread goes on, and the job stays in the outbox. The user then runs
    the flush in the same process (a notebook: ``flush_directory``, or the next fit's
    setup). The replay found the upload's record incomplete and dropped it as one a crash
    cut short, while the copy was still going: the copy then finished into a file no record
    names (and lamindb handed the worker the replay's artifact). The replay now waits for
    this process's own upload and reuses it: one artifact, annotated, nothing orphaned."""
    import lamin_lightning._lamin_store as lamin_store
    from lamin_lightning._lamin_store import LaminStore

    held = HeldCopy(monkeypatch)
    armed = threading.Event()  # the fit returned: the flush's look-ups release the copy
    looked = LaminStore._committed_to_reuse

    def look(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return looked(self, *args, **kwargs)
        finally:
            if armed.is_set():
                held.gate.set()  # the replay decided without waiting: let the copy finish

    monkeypatch.setattr(LaminStore, "_committed_to_reuse", look)
    wait_here = getattr(lamin_store, "_wait_for_upload_here", None)
    if wait_here is not None:

        def wait_for_the_copy(*args: Any) -> bool:
            if armed.is_set():
                held.gate.set()  # the replay waits for it: let it finish
            return bool(wait_here(*args))

        monkeypatch.setattr(lamin_store, "_wait_for_upload_here", wait_for_the_copy)

    before = _storage_files(ln)
    try:
        callback = held.fit_that_gives_up(tmp_path)
        armed.set()
        report = ll.flush_directory(tmp_path / "ckpts", progress=False, timeout=120)
    finally:
        held.gate.set()
    assert held.done.wait(timeout=120), "the worker's upload never returned"
    assert report.remaining == [] and report.saved == 1, report
    _assert_persisted_once_without_orphans(ln, callback, before)


def _flush_in_another_process(ln: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    import lamindb_setup
    from lamindb_setup.core._settings_store import write_local_current_instance

    # The subprocess finds this session's instance through the marker in its working
    # folder (see test_lamindb_ddp.py); its settings come from LAMIN_SETTINGS_DIR.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    write_local_current_instance(cwd, lamindb_setup.settings.instance.slug)
    command = ["-m", "lamin_lightning._cli", "flush", "--no-progress", str(tmp_path / "ckpts")]
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def test_a_flush_from_another_process_leaves_an_upload_a_teardown_gave_up_on_to_finish(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but ``lamin-lightning flush`` runs in another terminal while this process
    (a notebook) still copies the checkpoint its teardown gave up on. That flush found the
    journal free, took the upload's record for one a crash cut short, dropped it and
    uploaded afresh: the copy then finished into a file that no record names. The journal
    now stays held by this process until the upload returns: the flush is refused while
    it runs, and afterwards reuses its artifact: one, annotated, nothing orphaned."""
    held = HeldCopy(monkeypatch)
    before = _storage_files(ln)
    try:
        callback = held.fit_that_gives_up(tmp_path)
        refused = _flush_in_another_process(ln, tmp_path)
    finally:
        held.gate.set()
    assert held.done.wait(timeout=120), "the worker's upload never returned"
    assert "holds the outbox until it returns" in held.warning, held.warning
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, f"the flush replayed an upload still running:\n{output}"
    assert "another process holds the outbox" in output, output
    # Released once the upload returned (the keeper closes the journal then).
    for keeper in threading.enumerate():
        if keeper.name == "lamin-lightning-journal-keeper":
            keeper.join(timeout=120)
            assert not keeper.is_alive(), "the journal was never released"
    flushed = _flush_in_another_process(ln, tmp_path)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    _assert_persisted_once_without_orphans(ln, callback, before)


# -- another process holds the instance's write lock (a user's notebook) -----------------------

_HOLDER = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
con.execute("ROLLBACK")
print("released", flush=True)
"""


class WriteLockHolder:
    """A second process holding a write transaction on the instance's SQLite file."""

    def __init__(self) -> None:
        import lamindb_setup

        database = str(lamindb_setup.settings.instance._sqlite_file_local)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, database],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline().strip() == "held"
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"
        self.proc.wait(timeout=60)


class LockedRetries(logging.Handler):
    """Sets ``seen`` once a retry of a "database is locked" error is logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "database is locked" in message and "retrying" in message:
            self.seen.set()


class AtStep(pl.Callback):
    """Runs ``action`` at the start of training step ``step``, and ``at_end`` at its end."""

    def __init__(self, step: int, action: Any = None, at_end: Any = None) -> None:
        self.step, self.action, self.at_end = step, action, at_end

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and self.action is not None:
            self.action()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end is not None:
            self.at_end()


PATIENT = RetryPolicy(attempts=1000, initial_backoff=0.05, max_backoff=0.2, jitter=0.0)


@pytest.fixture
def locked_retries() -> Any:
    handler = LockedRetries()
    logger = logging.getLogger("lamin_lightning")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _assert_once_each(ln: Any, prefix: str, names: list[str]) -> None:
    stored = artifacts_under(ln, prefix)  # asserts one artifact per key
    assert sorted(stored) == sorted(f"{prefix}/{name}" for name in names), sorted(stored)
    for artifact in stored.values():
        assert single(artifact_features(ln, artifact))["is_last_model"] in (True, False)


def test_a_write_lock_held_through_teardown_leaves_the_jobs_to_a_flush_that_lands_them_once(
    ln: Any, no_run: None, tmp_path: Path, locked_retries: LockedRetries
) -> None:
    """A notebook holds the instance's write lock from before the fit to after it: training
    is not held (every save is admitted), the locked writes are retried, teardown gives up
    after ``flush_timeout`` naming each checkpoint, and the jobs stay in the outbox. Once
    the lock is released, a flush persists each checkpoint exactly once, annotated, in
    order (the uploads this process still had under way included)."""
    names = [f"epoch=0-step={n}.ckpt" for n in (1, 2, 3)]
    before = _storage_files(ln)
    holder = WriteLockHolder()
    try:
        callback = ll.Checkpoint(
            dirpath=tmp_path / "ckpts",
            save_top_k=-1,
            every_n_train_steps=1,
            flush_timeout=1,
            retry=PATIENT,
        )
        wait = AtStep(-1, at_end=lambda: locked_retries.seen.wait(timeout=120))
        with pytest.warns(UserWarning, match="flush_timeout=1") as caught:
            fit(callback, tmp_path, steps=3, extra_callbacks=[wait])
        assert locked_retries.seen.is_set(), "no locked write was retried"
        stats = callback.persistence_stats
        assert stats.submitted == 3 and stats.retried >= 1 and stats.saved == 0, stats
        prefix = callback.checkpoint_key_prefix
        [message] = [str(w.message) for w in caught if "flush_timeout" in str(w.message)]
        for name in names:
            assert f"{prefix}/{name}" in message, message
        assert "lamin-lightning flush" in message, message
        assert callback.flush(timeout=0) is False
        assert sorted(j.key for j in callback.pending_artifacts()) == [
            f"{prefix}/{name}" for name in names
        ]
    finally:
        holder.release()
    report = ll.flush_directory(tmp_path / "ckpts", progress=False, timeout=300)
    assert report.remaining == [] and report.failed == 0, report
    assert [e.key for e in report.events] == [f"{prefix}/{name}" for name in names]
    _assert_once_each(ln, prefix, names)
    known = {Path(str(a.path)).name for a in ln.Artifact.objects.all()}
    assert sorted(_storage_files(ln) - before - known) == []


def test_a_write_lock_released_mid_fit_lands_every_checkpoint_once_in_order(
    ln: Any, no_run: None, tmp_path: Path, locked_retries: LockedRetries
) -> None:
    """The lock is released during training, after a locked write was retried: every
    checkpoint lands exactly once, the events come in submission order, nothing fails."""
    names = [f"epoch=0-step={n}.ckpt" for n in (1, 2, 3)]
    observer = RecordingObserver()
    holder = WriteLockHolder()

    def release_once_retried() -> None:
        assert locked_retries.seen.wait(timeout=120), "no locked write was retried"
        holder.release()

    try:
        callback = ll.Checkpoint(
            dirpath=tmp_path / "ckpts",
            save_top_k=-1,
            every_n_train_steps=1,
            retry=PATIENT,
            artifact_observers=[observer],
        )
        fit(callback, tmp_path, steps=3, extra_callbacks=[AtStep(2, release_once_retried)])
    finally:
        holder.release()
    prefix = callback.checkpoint_key_prefix
    stats = callback.persistence_stats
    assert (stats.saved, stats.failed, stats.pending) == (3, 0, 0), stats
    assert stats.retried >= 1, stats
    assert observer.keys() == [f"{prefix}/{name}" for name in names]
    _assert_once_each(ln, prefix, names)
    assert ll.flush_directory(tmp_path / "ckpts", progress=False).events == []


class _InterruptedUploads(ll.Checkpoint):
    """Ctrl+C comes in the upload of every checkpoint (a hook of the user's that raises
    ``KeyboardInterrupt``): no save of the fit is ever committed."""

    def save_checkpoint_artifact(
        self, trainer: pl.Trainer, filepath: Any, *, feature_values: Any = None
    ) -> Any:
        raise KeyboardInterrupt


def test_a_fit_interrupted_before_its_first_commit_gets_its_run_values_from_the_flush(
    ln: Any, fresh_run: Any, tmp_path: Path
) -> None:
    """Ctrl+C before the first checkpoint was committed: the flush that persists the
    journaled saves also records the run-level values (trainer settings, hparams) on the
    run, as the reference's first save records them. They were kept in memory only, for
    the first commit, and lost with the process."""
    dirpath = tmp_path / "ckpts"
    callback = _InterruptedUploads(dirpath=dirpath, every_n_train_steps=1, max_workers=1)
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
        with pytest.raises(SystemExit):
            fit(callback, tmp_path, steps=2)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert run_features(ln, fresh_run) == {}

    report = ll.flush_directory(dirpath, progress=False)

    assert report.saved >= 1 and report.failed == 0, report
    assert set(artifacts_under(ln, callback.checkpoint_key_prefix)) == {
        f"{callback.checkpoint_key_prefix}/{p.name}" for p in dirpath.glob("*.ckpt")
    }
    values = single(run_features(ln, fresh_run))
    names = ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "mode")
    assert {name: values.get(name) for name in names} == {
        "max_epochs": -1,
        "max_steps": 2,
        "precision": "32-true",
        "accumulate_grad_batches": 1,
        "mode": "min",
    }, values
    # A second replay (the next setup in the folder, say) adds nothing twice.
    ll.flush_directory(dirpath, progress=False)
    assert single(run_features(ln, fresh_run)) == values


class _RefusedHparamModel(TierModel):
    """A TierModel with the hparam ``tier_refused_hparam="auto"``, whose feature is a float."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams["tier_refused_hparam"] = "auto"


def test_a_flush_records_the_run_values_lamindb_accepts_and_names_the_one_it_refuses(
    ln: Any, fresh_run: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl+C before the first commit, and a model hparam LaminDB refuses (``"auto"`` for a
    float feature): the flush records every other run-level value on the run and leaves
    that one out with a warning naming it, as the live commit does. Before, the replay left
    every run value out for it."""
    if not ln.Feature.filter(name="tier_refused_hparam").exists():
        ln.Feature(name="tier_refused_hparam", dtype=float).save()
    dirpath = tmp_path / "ckpts"
    callback = _InterruptedUploads(dirpath=dirpath, every_n_train_steps=1, max_workers=1)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit(callback, tmp_path, steps=2, model=_RefusedHparamModel())
    finally:
        signal.signal(signal.SIGINT, handler)
    assert run_features(ln, fresh_run) == {}

    report = ll.flush_directory(dirpath, progress=False)

    assert report.saved >= 1 and report.failed == 0, report
    values = single(run_features(ln, fresh_run))
    assert "tier_refused_hparam" not in values
    assert (values.get("max_steps"), values.get("precision")) == (2, "32-true"), values
    assert (
        f"run {fresh_run.uid}: the value 'auto' of feature 'tier_refused_hparam' (dtype float)"
        " is left out" in caplog.text
    )


def test_callbacks_interrupted_before_their_first_commit_each_get_their_run_values_from_the_flush(
    ln: Any, fresh_run: Any, tmp_path: Path
) -> None:
    """Two callbacks of one fit, one monitoring ``score`` (min), the other ``tier_metric``
    (max): the first save of each records its run-level values, so the run has both
    monitors and both modes (the reference's too). Ctrl+C before either was committed:
    the flush recorded the first journal's values only, as a replay skipped each feature
    name the run already had (and each run once per flush)."""
    dirpath = tmp_path / "ckpts"
    options: dict[str, Any] = {"dirpath": dirpath, "every_n_train_steps": 1, "max_workers": 1}
    first = _InterruptedUploads(monitor="score", filename="a-{step}", **options)
    second = _InterruptedUploads(monitor="tier_metric", mode="max", filename="b-{step}", **options)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            fit(first, tmp_path, steps=2, extra_callbacks=[second])
    finally:
        signal.signal(signal.SIGINT, handler)
    assert run_features(ln, fresh_run) == {}

    report = ll.flush_directory(dirpath, progress=False)

    assert report.saved >= 2 and report.failed == 0, report
    values = run_features(ln, fresh_run)
    assert sorted(values.get("monitor", [])) == ["score", "tier_metric"], values
    assert sorted(values.get("mode", [])) == ["max", "min"], values
    assert values.get("max_steps") == [2], values
    # A second replay (the next setup in the folder, say) adds nothing twice.
    ll.flush_directory(dirpath, progress=False)
    assert run_features(ln, fresh_run) == values


def test_ctrl_c_while_the_first_save_collects_the_run_values_still_records_them(
    ln: Any, fresh_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C lands while the first save reads the run-level values (trainer settings,
    hparams): they counted as collected before they were kept, so neither that save's
    journal line nor a later fit of the run in this process carried them, and the run
    never got them. The read is now held whole: the save is journaled with them and the
    flush records them."""
    import lamin_lightning._lamin as lamin_module

    real = lamin_module.refuse_conflicts
    fired: list[bool] = []

    def refuse_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        named = real(*args, **kwargs)
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return named

    monkeypatch.setattr(lamin_module, "refuse_conflicts", refuse_then_ctrl_c)
    dirpath = tmp_path / "ckpts"
    callback = ll.Checkpoint(dirpath=dirpath, every_n_train_steps=1, max_workers=1)
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Lightning turns a KeyboardInterrupt into SystemExit (and ignores SIGINT after).
        with pytest.raises(SystemExit):
            fit(callback, tmp_path, steps=2)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert fired
    ll.flush_directory(dirpath, progress=False)
    values = run_features(ln, fresh_run)
    assert values.get("max_steps") == [2], values
