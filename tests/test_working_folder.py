"""Where our working files live, and what ``setup`` alone does (issue 12, items 8 and 9).

- The checkpoint folder holds exactly what plain Lightning leaves there: staging and
  outbox live beside it, and recovery still finds journals where earlier versions
  wrote them (inside it).
- An fsspec ``dirpath`` Lightning derives at ``setup`` is refused before any step.
- ``setup`` alone creates no file and starts no thread.
- Ctrl+C or SIGTERM while training waits for a free slot: the job stays journaled with
  its local file, Lightning stops, and the next fit (or ``flush``) persists it.
"""

from __future__ import annotations

import _thread
import gc
import logging
import os
import re
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from helpers import TinyModel, loader, make_trainer, sha256_file, wait_until
from lamin_lightning._jobs import JobRecord
from lamin_lightning._journal import Outbox, journal_paths, read_pending
from lamin_lightning._staging import STAGING_DIRNAME, staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

TIMEOUT = 60.0


def _tree(root: Path) -> set[str]:
    """Every path under ``root``, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lamin-lightning")]


def _pending_keys(dirpath: Path) -> list[str]:
    return [r.key for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]


# -- the checkpoint folder is Lightning's ------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"save_top_k": 2, "monitor": "score", "save_last": True},
        {"save_top_k": -1, "save_last": "link"},
        {"filename": "model", "save_top_k": 3, "monitor": "score"},
    ],
    ids=["top2-last", "all-last-link", "fixed-name-versions"],
)
def test_the_checkpoint_folder_holds_exactly_what_plain_lightning_leaves(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """Same run, plain ModelCheckpoint and ours: the same names in dirpath, nothing else;
    our staging and outbox sit beside it."""
    plain_dir, ours_dir = tmp_path / "plain" / "ckpt", tmp_path / "ours" / "ckpt"
    plain = ModelCheckpoint(dirpath=plain_dir, every_n_train_steps=1, **options)
    scores = [0.5, 0.4, 0.6, 0.3, 0.7]
    make_trainer(tmp_path / "plain", [plain], max_steps=5).fit(TinyModel(scores=scores), loader(5))
    store = MemoryStore()
    ours = MemoryCheckpoint(store, dirpath=ours_dir, every_n_train_steps=1, **options)
    make_trainer(tmp_path / "ours", [ours], max_steps=5).fit(TinyModel(scores=scores), loader(5))

    assert _tree(plain_dir)  # Lightning kept something
    assert _tree(ours_dir) == _tree(plain_dir)
    assert STAGING_DIRNAME not in os.listdir(ours_dir)
    assert staging_root(ours_dir) == tmp_path / "ours" / ".ckpt.lamin-lightning"
    files = {p.name for p in ours_dir.glob("*.ckpt") if not p.is_symlink()}  # as the reference
    assert {Path(k).name for k in store.keys(kind="checkpoint")} == files


def test_a_journal_where_earlier_versions_kept_it_still_replays(tmp_path: Path) -> None:
    """An outbox inside dirpath (``.lamin-lightning``, the old layout) is replayed by the
    next setup, and its journal ends empty."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    old_file = dirpath / "old.ckpt"
    old_file.write_bytes(b"a checkpoint an earlier version left unpersisted")
    outbox = Outbox(dirpath / STAGING_DIRNAME / "outbox-earlier.jsonl")
    outbox.open()
    outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key="ckpt/old.ckpt",
            local_path=str(old_file),
            store="memory",
            submitted_at=time.time(),
        )
    )
    outbox.close()

    store = MemoryStore()
    callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1)
    make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader(1))

    stored = store.get("ckpt/old.ckpt")
    assert stored is not None and stored.sha256 == sha256_file(old_file)
    assert journal_paths(dirpath / STAGING_DIRNAME) == []


# -- remote dirpath, setup -----------------------------------------------------------------------


class _CountingModel(TinyModel):
    steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("root", ["memory://bucket/run", "s3://bucket/run"])
def test_a_remote_dirpath_derived_at_setup_is_refused_before_any_step(
    tmp_path: Path, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``default_root_dir`` remote, no dirpath: the same refusal as in the constructor, at
    setup; no local folder named after the URL appears."""
    monkeypatch.chdir(tmp_path)
    _CountingModel.steps = 0
    callback = MemoryCheckpoint(MemoryStore(), every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=2, default_root_dir=root)
    with pytest.raises(ValueError, match=r"is remote; lamin-lightning stages local files"):
        trainer.fit(_CountingModel(), loader(2))
    assert _CountingModel.steps == 0
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_setup_alone_creates_no_file_and_teardown_stops_what_it_started(
    tmp_path: Path, stage: str
) -> None:
    """``setup`` then nothing (as direct callers do): no file anywhere under the root.
    For a fit the pipeline's threads start at setup (the first checkpoint must not wait
    for them), for other stages with a first job; ``teardown`` stops them."""
    before = set(_pool_threads())
    callback = MemoryCheckpoint(MemoryStore(), dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    trainer = make_trainer(tmp_path / "root", [callback], max_steps=1)
    model = TinyModel()
    trainer.strategy.connect(model)
    callback.setup(trainer, model, stage)
    assert not (tmp_path / "ckpt").exists()
    assert not staging_root(tmp_path / "ckpt").exists()
    assert bool(set(_pool_threads()) - before) == (stage == "fit")
    callback.teardown(trainer, model, stage)
    assert set(_pool_threads()) == before
    assert not staging_root(tmp_path / "ckpt").exists()


def test_a_callback_collected_without_teardown_stops_its_threads(tmp_path: Path) -> None:
    """``setup``, a save (threads start), then the callback and its trainer dropped
    without ``teardown``: once collected, its pipeline threads end and its outbox journal
    is released (another callback can open it), with the checkpoint persisted."""
    before = set(_pool_threads())
    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1)
    trainer = make_trainer(tmp_path / "root", [callback], max_steps=1)
    model = TinyModel()
    trainer.strategy.connect(model)
    callback.setup(trainer, model, "fit")
    callback._save_checkpoint(trainer, str(dirpath / "direct.ckpt"))  # a direct call
    assert callback.flush(TIMEOUT)
    started = set(_pool_threads()) - before
    assert started, "the first job starts the pipeline's threads"
    collected = threading.Event()
    weakref.finalize(callback, collected.set)

    del callback, trainer, model
    # A pipeline thread may hold the last job a moment after flush returned (until its
    # loop drops it): collect until the callback goes, within TIMEOUT.
    deadline = time.monotonic() + TIMEOUT
    while not collected.is_set() and time.monotonic() < deadline:
        gc.collect()
        collected.wait(0.05)

    assert collected.is_set(), "nothing but the caller may keep a callback alive"
    stopping = set(_pool_threads()) - before  # the pipeline's, and the one stopping them
    for thread in stopping:
        thread.join(TIMEOUT)
    assert [t.name for t in started | stopping if t.is_alive()] == []
    assert store.keys(kind="checkpoint") == {"checkpoints/direct.ckpt"}
    # The outbox was closed: its journal, all done, is gone, and no lock is held.
    assert journal_paths(staging_root(dirpath)) == []


# -- interrupts while training waits for a slot -------------------------------------------------


@contextmanager
def _sigint_restored() -> Iterator[None]:
    """Lightning ignores SIGINT after a KeyboardInterrupt; give pytest its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


class _WhenWaiting(pl.Callback):
    """Once the training thread waits for a free slot, run ``act`` (from another thread);
    if training has not stopped ``TIMEOUT`` seconds later, say so and unblock storage."""

    def __init__(self, callback: MemoryCheckpoint, store: MemoryStore, act: Callable[[], None]):
        self.callback, self.store, self.act = callback, store, act
        self.acted = threading.Event()
        self.stopped = threading.Event()
        self.problems: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        if not self.store.wait_until_hanging(1, timeout=TIMEOUT):
            self.problems.append("the first upload never started")
            self.store.release()
            return
        deadline = time.monotonic() + TIMEOUT
        while self.callback.persistence_stats.admission_waits < 1:
            if time.monotonic() > deadline:
                self.problems.append("training never waited for a slot")
                self.store.release()
                return
            time.sleep(0.01)  # polls a condition; nothing is timed by it
        try:
            self.act()
        except Exception as error:
            self.problems.append(repr(error))
            self.store.release()  # or training would wait forever
            return
        self.acted.set()
        if not self.stopped.wait(TIMEOUT):
            # Storage still hangs: training must stop anyway, not wait for flush_timeout.
            self.problems.append(f"training did not stop within {TIMEOUT}s of the interrupt")
            self.store.release()


def _interrupted_then_resumed(
    tmp_path: Path,
    act: Callable[[], None],
    expected: type[BaseException],
    flush_timeout: float,
    *,
    warns: bool = False,
) -> None:
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
        flush_timeout=flush_timeout,
    )
    probe = _WhenWaiting(callback, store, act)
    trainer = make_trainer(tmp_path, [callback, probe], max_steps=4)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(expected):
        warnings.simplefilter("always")
        trainer.fit(TinyModel(), loader(4))
    probe.stopped.set()
    assert probe.problems == [] and probe.acted.is_set()
    # The save that waited (last.ckpt of step 1) is journaled, its local file kept.
    pending = sorted(Path(key).name for key in _pending_keys(dirpath))
    assert pending == ["epoch=0-step=1.ckpt", "last.ckpt"]
    said = [str(w.message) for w in caught if "did not finish" in str(w.message)]
    if warns:
        # Every journaled job is named, the one whose wait the interrupt ended too.
        (message,) = said
        named = message.split("not persisted: ", 1)[1].split(". Their local", 1)[0]
        assert sorted(Path(key).name for key in named.split(", ")) == pending, message
    assert (dirpath / "last.ckpt").is_file()
    store.release()

    # The same callback fits again, rewriting last.ckpt: nothing waits for the staging of
    # the interrupted save (it never ran); the earlier jobs are persisted first.
    finished = threading.Event()
    again = make_trainer(tmp_path, [callback], max_steps=2)

    def fit_again() -> None:
        again.fit(TinyModel(), loader(2))
        finished.set()

    runner = threading.Thread(target=fit_again, daemon=True)
    runner.start()
    runner.join(TIMEOUT)
    assert finished.is_set(), "the next fit hung"
    stored = {Path(key).name for key in store.keys(kind="checkpoint")}
    assert {"epoch=0-step=1.ckpt", "last.ckpt"} <= stored
    assert _pending_keys(dirpath) == []


def test_ctrl_c_during_a_backpressure_wait_journals_the_job_and_lets_lightning_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lamin_lightning")
    with _sigint_restored():
        # No flush wait at all (Lightning ignores further Ctrl+C meanwhile).
        _interrupted_then_resumed(tmp_path, _thread.interrupt_main, SystemExit, 3600, warns=True)
    # Nor a flush of 0 s that "timed out" (the warning says what is left, and why).
    assert not [r for r in caplog.records if "timed out" in r.getMessage()], caplog.text


def test_ctrl_c_while_a_crash_waits_for_storage_ends_the_wait_and_lightning_handles_the_crash(
    tmp_path: Path,
) -> None:
    """Training crashes; our ``on_exception`` waits for hung storage (no flush_timeout),
    and the user presses Ctrl+C (after a crash Lightning does not ignore it). The
    KeyboardInterrupt went out of our hook, through Lightning's handling of the crash:
    loggers not finalized, the strategy not torn down, the fit's SIGTERM handler left
    installed (a later SIGTERM was swallowed), ``fit`` raising KeyboardInterrupt (found by
    an adversarial review). Now the wait ends, Lightning's handling runs on and ``fit``
    raises the crash; the pending jobs stay journaled, and the next fit persists each
    checkpoint once."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, every_n_train_steps=1, save_top_k=-1, flush_timeout=None
    )
    waiting = threading.Event()
    real_flush = callback.flush

    def flush(timeout: float | None = None, **kwargs: Any) -> bool:
        waiting.set()
        return real_flush(timeout, **kwargs)

    callback.flush = flush  # type: ignore[method-assign]

    class PressCtrlC(pl.Callback):  # its on_exception runs before the checkpoint's
        def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: Any) -> None:
            def press() -> None:
                if waiting.wait(TIMEOUT) and store.wait_until_hanging(1, timeout=TIMEOUT):
                    _thread.interrupt_main()

            threading.Thread(target=press, daemon=True).start()

    sigterm = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tmp_path, [PressCtrlC(), callback], max_steps=6)
    with _sigint_restored(), pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.fit(TinyModel(fail_at_step=3), loader(6))

    assert waiting.is_set()
    assert signal.getsignal(signal.SIGTERM) == sigterm, "Lightning's teardown did not run"
    assert trainer.state.stage is None and trainer.state.status == "interrupted"
    pending = sorted(Path(key).name for key in _pending_keys(dirpath))
    assert pending == [f"epoch=0-step={n}.ckpt" for n in (1, 2, 3)], pending

    store.release()
    # The uploads the wait gave up on go on, on the stopped pipeline's threads: they finish
    # first (a loaded machine may run them late). LaminDB's store waits for them itself
    # (its replay reuses what they upload); this in-memory one would upload them twice.
    assert wait_until(lambda: store.concurrent == 0)
    again = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1, save_top_k=-1)
    make_trainer(tmp_path, [again], max_steps=1).fit(TinyModel(), loader(1))
    assert _pending_keys(dirpath) == []
    puts = [key for op, key in store.history if op == "put"]
    assert len(puts) == len(set(puts)), puts
    stored = store.keys()
    assert {Path(key).name for key in stored} == {p.name for p in dirpath.glob("*.ckpt")}


def test_the_emergency_save_of_a_crash_does_not_wait_for_a_slot_hung_storage_holds(
    tmp_path: Path,
) -> None:
    """``save_on_exception=True``, the queue full (``max_pending=1``) and storage hung when
    training raises: the emergency checkpoint's admission waited for a slot for ever, on
    the training thread, so ``flush_timeout`` never applied and ``fit`` never returned
    (found by an adversarial run). It is admitted beyond the limit now: written,
    journaled, the flush gives up after ``flush_timeout``, and ``fit`` raises the crash."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=3,
        max_pending=1,
        save_on_exception=True,
        flush_timeout=1,
    )
    outcome: list[BaseException] = []

    def fit() -> None:
        model = TinyModel(scores=[3, 2, 1, 4, 5, 6], fail_at_step=4)
        try:
            make_trainer(tmp_path, [callback], max_steps=6).fit(model, loader(6))
        except BaseException as error:
            outcome.append(error)

    training = threading.Thread(target=fit, daemon=True)
    training.start()
    training.join(TIMEOUT)
    stuck = training.is_alive()
    # Read while storage still hangs: nothing of the fit can finish meanwhile.
    pending = sorted(Path(key).name for key in _pending_keys(dirpath))
    store.release()  # let a stuck fit go, so the test ends either way
    training.join(TIMEOUT)
    assert not stuck, "fit waited for a slot after the crash"
    assert [repr(e) for e in outcome] == ["RuntimeError('boom at step 4')"]
    assert any("step=4" in name for name in pending), pending


def test_ctrl_c_names_a_save_kept_from_admission_when_the_rest_finished(
    tmp_path: Path,
) -> None:
    """Ctrl+C ends a save's wait for a slot (journaled, kept from admission); the upload it
    waited for finishes before our ``on_exception`` looks. Nothing was named then, although
    the kept-out save is not persisted: it is named now."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, every_n_train_steps=1, save_top_k=-1, max_pending=1
    )

    class FinishFirst(pl.Callback):  # its on_exception runs before the checkpoint's
        def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: Any) -> None:
            store.release()
            assert callback.flush(timeout=TIMEOUT)  # the admitted upload is done

    probe = _WhenWaiting(callback, store, _thread.interrupt_main)
    with (
        _sigint_restored(),
        warnings.catch_warnings(record=True) as caught,
        pytest.raises((SystemExit, KeyboardInterrupt)),
    ):
        warnings.simplefilter("always")
        make_trainer(tmp_path, [FinishFirst(), callback, probe], max_steps=4).fit(
            TinyModel(), loader(4)
        )
    probe.stopped.set()
    assert probe.problems == [] and probe.acted.is_set()
    assert sorted(Path(key).name for key in _pending_keys(dirpath)) == ["epoch=0-step=2.ckpt"]
    said = [str(w.message) for w in caught if "did not finish" in str(w.message)]
    assert len(said) == 1 and "not persisted: checkpoints/epoch=0-step=2.ckpt." in said[0], said


def test_ctrl_c_while_teardown_waits_for_storage_names_what_is_left_and_the_fix(
    tmp_path: Path,
) -> None:
    """Storage hangs and teardown waits for it (no flush_timeout); Ctrl+C ends the wait.
    The warning names the unpersisted checkpoint and `lamin-lightning flush`, as when the
    wait times out; a later flush persists it. Once, the interrupt left only a log line
    saying the flush had not finished "within 0s"."""
    from lamin_lightning._flush import flush_directory

    store = MemoryStore()
    store.hang()
    dirpath = tmp_path / "ckpt"
    callback = MemoryCheckpoint(store, dirpath=dirpath, every_n_train_steps=1, flush_timeout=None)
    waiting = threading.Event()
    real_flush = callback.flush

    def flush(timeout: float | None = None, **kwargs: Any) -> bool:
        waiting.set()  # teardown's wait for storage begins
        return real_flush(timeout, **kwargs)

    callback.flush = flush  # type: ignore[method-assign]

    def interrupt_once_teardown_waits() -> None:
        if waiting.wait(TIMEOUT) and store.wait_until_hanging(1, timeout=TIMEOUT):
            _thread.interrupt_main()
        else:
            store.release()  # the test fails below instead of hanging

    threading.Thread(target=interrupt_once_teardown_waits, daemon=True).start()
    with (
        _sigint_restored(),
        pytest.warns(UserWarning, match="interrupted") as caught,
        pytest.raises((SystemExit, KeyboardInterrupt)),
    ):
        make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader(1))
    (message,) = [str(w.message) for w in caught if "did not finish" in str(w.message)]
    assert "not persisted: checkpoints/epoch=0-step=1.ckpt" in message, message
    assert f"lamin-lightning flush {dirpath}" in message, message
    store.release()
    report = flush_directory(dirpath, progress=False, stores={"memory": store})
    assert report.saved == 1 and report.remaining == [], report


def test_sigterm_during_a_backpressure_wait_on_hung_storage_ends_the_wait(
    tmp_path: Path,
) -> None:
    """Storage hangs; SIGTERM (a preemption) ends the wait for a slot; Lightning raises its
    SIGTERMException after a flush bounded by flush_timeout; the job stays journaled."""
    handler = signal.getsignal(signal.SIGTERM)

    def sigterm() -> None:
        # Lightning's handler replaced the default one for the fit (else this kills pytest).
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        # The flush at exit waits up to flush_timeout (set below the grace period).
        _interrupted_then_resumed(tmp_path, sigterm, SIGTERMException, 1.0)
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_status_and_flush_find_the_outbox_through_a_symlinked_dirpath(tmp_path: Path) -> None:
    """Lightning resolves a symlinked dirpath, so the working folder sits beside the real
    folder; the link the user passed still finds it."""
    from lamin_lightning._flush import flush_directory
    from lamin_lightning._staging import working_folders

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert staging_root(real) in working_folders(link)
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(store, dirpath=link, every_n_train_steps=1, flush_timeout=0)
    with pytest.warns(UserWarning, match="did not finish"):
        make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader(1))
    store.release()
    report = flush_directory(link, progress=False, stores={"memory": store})
    assert report.saved == 1 and report.remaining == []


def test_the_jobs_of_one_save_hook_reach_the_pipeline_threads_when_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save and the eviction it causes are submitted one after the other in Lightning's
    hook; the pipeline's threads start on them once the hook hands them over (they would
    compete with the rest of the hook for the GIL), and a max_pending of 1 still works."""
    from lamin_lightning._bridge import PersistencePipeline
    from lamin_lightning._staging import Stager
    from lamin_lightning._submit import Submitter

    order: list[tuple[str, ...]] = []
    lock = threading.Lock()
    real_submit, real_release = Submitter.submit, PersistencePipeline.release
    real_stage = Stager.stage

    def submit(self: Any, record: Any, *args: Any, **kwargs: Any) -> None:
        with lock:
            order.append(("submit", record.op, Path(record.local_path).name))
        real_submit(self, record, *args, **kwargs)

    def release(self: Any) -> None:
        with lock:
            order.append(("release",))
        real_release(self)

    def stage(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            order.append(("stage", Path(path).name))
        return real_stage(self, path, *args, **kwargs)

    monkeypatch.setattr(Submitter, "submit", submit)
    monkeypatch.setattr(PersistencePipeline, "release", release)
    monkeypatch.setattr(Stager, "stage", stage)
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        max_pending=1,
    )
    make_trainer(tmp_path, [callback], max_steps=3).fit(
        TinyModel(scores=[1.0, 2.0, 3.0]), loader(3)
    )

    with lock:
        seen = list(order)
    saves = [i for i, item in enumerate(seen) if item[:2] == ("submit", "save")]
    kept = store.keys(kind="checkpoint")
    assert len(saves) == 3 and [Path(k).name for k in kept] == ["epoch=0-step=3.ckpt"]
    for index in saves:
        name = seen[index][2]
        staged_at = seen.index(("stage", name), index)
        assert ("release",) in seen[index:staged_at], seen


def test_a_file_saved_again_while_its_saves_are_pending_is_named_once_with_their_count(
    tmp_path: Path,
) -> None:
    """The teardown that gives up names what it leaves in the outbox: ``last.ckpt``,
    rewritten at every step while the store hangs, once, with how many jobs it has (it
    was named once per job)."""
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=0,
        save_last=True,
        flush_timeout=0,
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    try:
        with pytest.warns(UserWarning, match="did not finish") as caught:
            trainer.fit(TinyModel(), loader(3))
    finally:
        store.release()
    (message,) = [str(w.message) for w in caught if "did not finish" in str(w.message)]
    named = message.split("not persisted: ", 1)[1].split(". Their local", 1)[0]
    # One a step; the first may be out of the pending count by then (in the hung store).
    assert re.fullmatch(r"checkpoints/last\.ckpt \([23] jobs\)", named), message
