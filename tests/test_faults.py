"""Faults 1 and 2 of the reliability issue, against the in-memory test store.

1. 30 % of storage calls fail transiently over 50 checkpoints: everything Lightning
   kept is persisted, events arrive in submission order exactly once, and every
   injected failure shows up as a retry in ``persistence_stats``.
2. A permanent failure (or retries exhausted): the failed event in its slot, later
   jobs continue, the local file is kept, and the error is raised at teardown with
   ``on_error="raise"`` or warned with ``"warn"``.

After each fit, ``assert_store_kept_set_persisted`` checks that the store holds
exactly Lightning's kept set. The LaminDB twin of this module is
``tests/lamindb/test_lamindb_faults.py``.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from helpers import (
    TinyModel,
    assert_events_follow_submissions,
    assert_store_kept_set_persisted,
    loader,
    make_trainer,
    recording_submissions,
    sha256_file,
    staged_files,
)
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactSavedEvent,
    PermanentError,
    PersistenceError,
    RetryPolicy,
)
from lamin_lightning.testing import (
    MemoryCheckpoint,
    MemoryStore,
    RecordingObserver,
    StoredArtifact,
    no_retry_delays,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
]

RecordingMemoryCheckpoint = recording_submissions(MemoryCheckpoint)

STEPS = 50


def scores(seed: int, n: int = STEPS) -> list[float]:
    """Seeded scores: top-k keeps, evicts and skips in an irregular pattern."""
    rng = random.Random(seed)
    return [round(rng.uniform(0, 10), 3) for _ in range(n)]


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lamin-lightning-")]


def test_transient_failures_on_30_percent_of_calls_over_50_checkpoints(tmp_path: Path) -> None:
    """Fault 1: all of Lightning's kept set persisted, events in order once, retries counted."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore(latency=0.002)
    store.fail_randomly(0.3, seed=11)
    observer = RecordingObserver()
    callback = RecordingMemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=3,
        save_last=True,
        every_n_train_steps=1,
        artifact_observers=[observer],
        # At 30 %, 20 attempts fail for good with probability 0.3**20 (3.5e-11) per call.
        retry=RetryPolicy(attempts=20),
        max_workers=2,
        max_pending=4,
    )
    with no_retry_delays():
        make_trainer(tmp_path, [callback], max_steps=STEPS).fit(
            TinyModel(scores=scores(5)), loader(STEPS)
        )

    stats = callback.persistence_stats
    submissions = callback.submissions
    saves = Counter(key for op, key in submissions if op == "save")
    assert saves["checkpoints/last.ckpt"] == STEPS
    assert sum(saves.values()) - STEPS > 3  # top-k files: kept, evicted, replaced
    assert store.failures_injected > 0
    assert 0.2 <= store.failures_injected / store.calls <= 0.4, (
        store.failures_injected,
        store.calls,
    )
    # Each injected failure was retried once (none exhausted its attempts), and counted.
    assert stats.retried == store.failures_injected
    assert (stats.failed, stats.pending, stats.in_flight) == (0, 0, 0)
    assert stats.finished == stats.submitted
    assert not observer.of_type(ArtifactFailedEvent)
    assert len(observer.events) == stats.saved + stats.removed
    assert_events_follow_submissions(observer.events, submissions, stats)
    # Exactly once: no stored version is reported twice.
    saved = [(e.key, e.storage_uri) for e in observer.of_type(ArtifactSavedEvent)]
    assert len(set(saved)) == len(saved)
    assert_store_kept_set_persisted(store, callback)
    # Retried puts did not create extra versions of top-k checkpoints.
    for path in callback.best_k_models:
        record = store.get(callback.resolve_artifact_key(None, path, "checkpoint"))  # type: ignore[arg-type]
        assert record is not None and record.version == 1
    assert staged_files(dirpath) == []
    assert pool_threads() == []


class PoisonedStore(MemoryStore):
    """Puts of the poisoned keys fail with ``error()``; counts their attempts."""

    def __init__(self, poisoned: set[str], error: type[BaseException]) -> None:
        super().__init__()
        self.poisoned = poisoned
        self.error = error
        self.poisoned_attempts: Counter[str] = Counter()

    def put(self, key: str, path: str | Path, **kwargs: Any) -> StoredArtifact:
        if key in self.poisoned:
            with self._lock:
                self.poisoned_attempts[key] += 1
            raise self.error(f"injected failure for {key}")
        return super().put(key, path, **kwargs)


def ckpt_key(step: int) -> str:
    return f"checkpoints/epoch=0-step={step}.ckpt"


@pytest.mark.parametrize(
    ("error", "attempts"),
    [(PermanentError, 1), (ConnectionError, 3)],
    ids=["permanent", "transient-exhausted"],
)
def test_failed_save_warns_keeps_the_file_and_later_jobs_continue(
    tmp_path: Path, error: type[BaseException], attempts: int
) -> None:
    """Fault 2, on_error="warn": the failed event in its slot, later saves persisted, file kept."""
    dirpath = tmp_path / "ckpt"
    failed_key = ckpt_key(3)
    store = PoisonedStore({failed_key}, error)
    observer = RecordingObserver()
    callback = RecordingMemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="warn",
    )
    with pytest.warns(UserWarning, match=rf"{failed_key}.*{attempts} attempt"):
        make_trainer(tmp_path, [callback], max_steps=6).fit(TinyModel(), loader(6))

    assert observer.keys() == [ckpt_key(s) for s in range(1, 7)]
    failures = observer.of_type(ArtifactFailedEvent)
    assert [(f.key, f.attempts, f.operation) for f in failures] == [(failed_key, attempts, "save")]
    assert isinstance(failures[0].error, error)
    assert failures[0].local_path == dirpath / "epoch=0-step=3.ckpt"
    assert store.poisoned_attempts[failed_key] == attempts
    stats = callback.persistence_stats
    assert (stats.failed, stats.saved, stats.retried) == (1, 5, attempts - 1)
    assert_events_follow_submissions(observer.events, callback.submissions, stats)
    # The local file and its staged copy are kept, byte for byte.
    kept = staged_files(dirpath)
    assert [p.name for p in kept] == ["epoch=0-step=3.ckpt"]
    assert sha256_file(kept[0]) == sha256_file(dirpath / "epoch=0-step=3.ckpt")
    assert_store_kept_set_persisted(store, callback, missing={failed_key})
    assert pool_threads() == []


def test_failed_last_save_raises_at_teardown_naming_the_key(tmp_path: Path) -> None:
    """Fault 2, on_error="raise": fit raises PersistenceError at teardown; the rest persisted."""
    dirpath = tmp_path / "ckpt"
    failed_key = ckpt_key(4)
    store = PoisonedStore({failed_key}, PermanentError)
    observer = RecordingObserver()
    callback = RecordingMemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="raise",
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    with pytest.raises(PersistenceError) as raised:
        trainer.fit(TinyModel(), loader(4))

    assert trainer.global_step == 4  # training finished; the error came at teardown
    assert [(f.key, f.attempts) for f in raised.value.failures] == [(failed_key, 1)]
    assert failed_key in str(raised.value)
    assert "on_error='warn'" in str(raised.value)
    assert observer.keys() == [ckpt_key(s) for s in range(1, 5)]
    assert isinstance(observer.events[-1], ArtifactFailedEvent)
    assert_events_follow_submissions(
        observer.events, callback.submissions, callback.persistence_stats
    )
    assert (dirpath / "epoch=0-step=4.ckpt").exists()
    assert [p.name for p in staged_files(dirpath)] == ["epoch=0-step=4.ckpt"]
    assert_store_kept_set_persisted(store, callback, missing={failed_key})
    assert pool_threads() == []


def test_failed_save_of_a_checkpoint_evicted_later_leaves_a_complete_kept_set(
    tmp_path: Path,
) -> None:
    """A failed save whose file Lightning evicts later: the removal is still delivered, in
    order, and the kept set ends complete (nothing is missing, nothing extra)."""
    dirpath = tmp_path / "ckpt"
    failed_key = ckpt_key(2)
    store = PoisonedStore({failed_key}, PermanentError)
    observer = RecordingObserver()
    callback = RecordingMemoryCheckpoint(
        store,
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=2),
        on_error="warn",
        max_workers=1,
    )
    seen: dict[str, bool] = {}

    class WaitForTheFailure(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            # Before step 3's checkpoint evicts step 2's file, its save has failed (events:
            # step 1 saved, step 2 failed), so the removal cannot cancel it instead.
            if trainer.global_step == 3:
                seen["failed"] = observer.wait_for(2, timeout=30)

    # Files see scores 2, 1, 3, 4, 0: step 2's (score 1) is evicted by step 3's.
    with pytest.warns(UserWarning, match=failed_key):
        make_trainer(tmp_path, [callback, WaitForTheFailure()], max_steps=5).fit(
            TinyModel(scores=[2, 1, 3, 4, 0]), loader(5)
        )
    assert seen["failed"]
    assert observer.keys(ArtifactFailedEvent) == [failed_key]
    stats = callback.persistence_stats
    assert ("remove", failed_key) in callback.submissions
    assert stats.failed == 1
    assert_events_follow_submissions(observer.events, callback.submissions, stats)
    assert_store_kept_set_persisted(store, callback)
    assert store.keys(kind="checkpoint") == {ckpt_key(3), ckpt_key(4)}
