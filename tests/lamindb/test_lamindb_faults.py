"""Faults 1 and 2 of the reliability issue on a real local LaminDB instance.

Faults are injected by wrapping the artifact publisher (``Checkpoint._artifact_publisher``):
:class:`FlakyPublisher` raises a transient ``ConnectionError`` on a seeded 30 % of its
calls, half of them before delegating to ``LaminArtifactPublisher`` (nothing was
written) and half after (the artifact was committed but the caller never heard: a
retry must not leave a duplicate). Poisoned keys fail permanently (or on every attempt).

After each fit, ``assert_kept_set_persisted`` checks the artifacts under the prefix are
exactly Lightning's kept set, one per key, with the local files' bytes.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierData, TierModel, assert_kept_set_persisted, make_trainer

import lamin_lightning as ll
from helpers import assert_events_follow_submissions, recording_submissions, staged_files
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactSavedEvent,
    PermanentError,
    PersistenceError,
    RetryPolicy,
)
from lamin_lightning._lamin import LaminArtifactPublisher
from lamin_lightning.testing import RecordingObserver, no_retry_delays

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

RecordingCheckpoint = recording_submissions(ll.Checkpoint)


class FlakyPublisher:
    """Delegates to ``LaminArtifactPublisher``; fails a seeded share of calls transiently.

    Args:
        rate: Probability that a call fails transiently. Half of those fail before the
            artifact is created, half after it was saved (the commit reached the database
            but the caller sees a ConnectionError).
        seed: Seed of the random choices.
        poisoned: File names (last part of the key) whose every call raises ``poison()``.
        poison: Exception class raised for poisoned keys.
    """

    def __init__(
        self,
        rate: float = 0.0,
        seed: int = 0,
        poisoned: set[str] | None = None,
        poison: type[BaseException] = PermanentError,
    ) -> None:
        self.inner = LaminArtifactPublisher()
        self.rate = rate
        self.rng = random.Random(seed)
        self.poisoned = poisoned or set()
        self.poison = poison
        self.lock = threading.Lock()
        self.calls = 0
        self.failed_before = 0
        self.failed_after = 0
        self.poisoned_attempts: Counter[str] = Counter()

    def create_artifact(self, local_path: Path | str, *, key: str, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
            draw = self.rng.random()
            if key.rsplit("/", 1)[-1] in self.poisoned:
                self.poisoned_attempts[key] += 1
                raise self.poison(f"injected failure for {key}")
            if draw < self.rate / 2:
                self.failed_before += 1
                raise ConnectionError("injected: connection reset before the upload")
        artifact = self.inner.create_artifact(local_path, key=key, **kwargs)
        if draw < self.rate:
            with self.lock:
                self.failed_after += 1
            raise ConnectionError("injected: connection lost after the artifact was saved")
        return artifact

    def storage_uri(self, artifact: Any) -> str:
        return self.inner.storage_uri(artifact)

    @property
    def failures(self) -> int:
        return self.failed_before + self.failed_after


STEPS = 50


def test_transient_failures_on_30_percent_of_calls_over_50_checkpoints(
    ln: Any, no_run: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault 1: Lightning's kept set ends in LaminDB (no duplicates), events in order exactly
    once, every injected failure counted as a retry."""
    rng = random.Random(5)
    scores = [round(rng.uniform(0, 10), 3) for _ in range(STEPS)]
    observer = RecordingObserver()
    callback = RecordingCheckpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode="max",
        save_top_k=3,
        save_last=True,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy(attempts=20),
        max_workers=2,
        max_pending=4,
    )
    publisher = FlakyPublisher(rate=0.3, seed=11)
    callback._artifact_publisher = publisher
    with no_retry_delays(), caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        make_trainer(tmp_path, [callback], max_steps=STEPS).fit(
            TierModel(scores=scores), datamodule=TierData(n=STEPS)
        )

    stats = callback.persistence_stats
    assert publisher.failed_before > 0 and publisher.failed_after > 0
    assert 0.2 <= publisher.failures / publisher.calls <= 0.4, (publisher.failures, publisher.calls)
    # Every retry is counted and logged; each injected failure caused one. SQLite may add
    # a few of its own ("database is locked"), also retried.
    retries = [r.getMessage() for r in caplog.records if r.getMessage().endswith("; retrying")]
    assert stats.retried == len(retries)
    assert len([m for m in retries if "injected" in m]) == publisher.failures
    assert all("injected" in m or "database is locked" in m for m in retries), retries
    assert (stats.failed, stats.pending) == (0, 0)
    assert stats.finished == stats.submitted
    assert not observer.of_type(ArtifactFailedEvent)
    assert_events_follow_submissions(observer.events, callback.submissions, stats)
    saved = [e.artifact.uid for e in observer.of_type(ArtifactSavedEvent)]
    assert len(set(saved)) == len(saved), "an artifact was reported saved twice"
    kept = assert_kept_set_persisted(ln, callback)
    assert len(kept) == 4  # top-3 + last.ckpt
    # The artifacts left behind by failures after the save were cleaned up: nothing but
    # the kept set remains under the prefix, of any kind but hparams.
    every = ln.Artifact.objects.filter(key__startswith=callback.checkpoint_key_prefix + "/")
    assert set(every.values_list("key", flat=True)) == set(kept)
    assert staged_files(Path(callback.dirpath)) == []


class WaitForEvents(pl.Callback):
    """At the end of training step ``step``, waits until ``count`` events were delivered."""

    def __init__(self, observer: RecordingObserver, step: int, count: int) -> None:
        self.observer, self.step, self.count = observer, step, count
        self.arrived: bool | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.arrived = self.observer.wait_for(self.count, timeout=60)


@pytest.mark.parametrize(
    ("poison", "attempts"),
    [(PermanentError, 1), (ConnectionError, 3)],
    ids=["permanent", "transient-exhausted"],
)
def test_failed_save_warns_keeps_the_file_and_later_jobs_continue(
    ln: Any, no_run: None, tmp_path: Path, poison: type[BaseException], attempts: int
) -> None:
    """Fault 2, on_error="warn": failed event in its slot, training completes, later
    checkpoints persisted, the failed file kept locally and absent from LaminDB."""
    observer = RecordingObserver()
    callback = RecordingCheckpoint(
        dirpath=tmp_path / "ckpts",
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="warn",
    )
    failed_name = "epoch=0-step=3.ckpt"
    publisher = FlakyPublisher(poisoned={failed_name}, poison=poison)
    callback._artifact_publisher = publisher
    trainer = make_trainer(tmp_path, [callback], max_steps=5)

    with pytest.warns(UserWarning, match=rf"{failed_name}.*{attempts} attempt"):
        trainer.fit(TierModel(), datamodule=TierData(n=5))

    prefix = callback.checkpoint_key_prefix
    failed_key = f"{prefix}/{failed_name}"
    assert trainer.global_step == 5
    assert observer.keys() == [f"{prefix}/epoch=0-step={s}.ckpt" for s in range(1, 6)]
    failures = observer.of_type(ArtifactFailedEvent)
    assert [(f.key, f.attempts, f.operation) for f in failures] == [(failed_key, attempts, "save")]
    assert isinstance(failures[0].error, poison)
    assert publisher.poisoned_attempts[failed_key] == attempts
    stats = callback.persistence_stats
    assert (stats.failed, stats.saved, stats.retried) == (1, 4, attempts - 1)
    assert_events_follow_submissions(observer.events, callback.submissions, stats)
    assert [p.name for p in staged_files(Path(callback.dirpath))] == [failed_name]
    assert_kept_set_persisted(ln, callback, missing={failed_key})


def test_failed_last_save_raises_at_teardown_naming_the_key(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Fault 2, on_error="raise": fit raises PersistenceError naming the key at teardown;
    everything else is persisted and the failed file is kept."""
    observer = RecordingObserver()
    callback = RecordingCheckpoint(
        dirpath=tmp_path / "ckpts",
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="raise",
    )
    failed_name = "epoch=0-step=3.ckpt"
    publisher = FlakyPublisher(poisoned={failed_name})
    callback._artifact_publisher = publisher

    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    with pytest.raises(PersistenceError) as raised:
        trainer.fit(TierModel(), datamodule=TierData(n=3))

    failed_key = f"{callback.checkpoint_key_prefix}/{failed_name}"
    assert trainer.global_step == 3
    assert [(f.key, f.attempts) for f in raised.value.failures] == [(failed_key, 1)]
    assert failed_key in str(raised.value)
    assert isinstance(observer.events[-1], ArtifactFailedEvent)
    assert_events_follow_submissions(
        observer.events, callback.submissions, callback.persistence_stats
    )
    assert [p.name for p in staged_files(Path(callback.dirpath))] == [failed_name]
    assert_kept_set_persisted(ln, callback, missing={failed_key})


def test_failed_save_of_a_checkpoint_evicted_later_leaves_a_complete_kept_set(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A failed save whose file Lightning evicts later: its removal is delivered in order,
    nothing is left under its key, and the kept set ends complete."""
    observer = RecordingObserver()
    callback = RecordingCheckpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=2),
        on_error="warn",
    )
    failed_name = "epoch=0-step=2.ckpt"
    publisher = FlakyPublisher(poisoned={failed_name})
    callback._artifact_publisher = publisher

    # Files see scores 2, 1, 3, 4, 0: step 2's (score 1) is evicted by step 3's. Before
    # that, step 2's save has failed (2 events), so the removal cannot cancel it instead.
    waiter = WaitForEvents(observer, step=3, count=2)
    with pytest.warns(UserWarning, match=failed_name):
        make_trainer(tmp_path, [callback, waiter], max_steps=5).fit(
            TierModel(scores=[2, 1, 3, 4, 0]), datamodule=TierData(n=5)
        )
    prefix = callback.checkpoint_key_prefix
    assert waiter.arrived
    assert observer.keys(ArtifactFailedEvent) == [f"{prefix}/{failed_name}"]
    assert ("remove", f"{prefix}/{failed_name}") in callback.submissions
    assert_events_follow_submissions(
        observer.events, callback.submissions, callback.persistence_stats
    )
    kept = assert_kept_set_persisted(ln, callback)
    assert set(kept) == {f"{prefix}/epoch=0-step=3.ckpt", f"{prefix}/epoch=0-step=4.ckpt"}
