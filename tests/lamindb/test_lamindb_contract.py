"""The contract suite: every scenario written once, run against both stores.

Each test takes the ``contract`` fixture, parametrized over the two stores that implement
the store protocol (:mod:`lamin_lightning.store`):

- ``memory``: :class:`~lamin_lightning.testing.MemoryCheckpoint` over a
  :class:`~lamin_lightning.testing.MemoryStore`;
- ``lamindb``: :class:`lamin_lightning.Checkpoint` on the tier's instance, so through
  ``LAMIN_LIGHTNING_TIER_BACKEND`` on SQLite, PostgreSQL and S3 (``make test`` runs the
  ``contract`` tests on each).

The fixture yields an adapter (:class:`Contract`) with what a scenario needs from a
store: a factory of the callback, fault injection (transient failures on a seeded share
of calls, poisoned keys, storage that hangs until released), a view of what is stored
(key -> content hash, flags, score) and ``replay(dirpath)`` (``lamin-lightning flush``).
Faults reach LaminDB through ``checkpoint._artifact_publisher`` (a documented override
point): :class:`FaultyPublisher` subclasses ``LaminArtifactPublisher``.

Scenarios:

1. Fault 1 of the reliability issue: 30 % of storage calls fail transiently over 50
   checkpoints. Lightning's kept set is persisted, events arrive in submission order
   exactly once, every injected failure shows up as a retry.
2. Fault 2: a permanent failure (or retries exhausted): the failed event in its slot,
   later jobs continue, the local file is kept, the error raised at teardown with
   ``on_error="raise"`` or warned with ``"warn"``; a failed save evicted later leaves a
   complete kept set.
3. Crash and replay: storage hangs mid-training while top-k evictions go on; teardown
   gives up (``flush_timeout=0``) and the jobs stay journaled exactly as after a crash;
   the hung uploads then land (a crash after the upload, before the commit) or never do
   (a crash mid-upload). A replay, by ``lamin-lightning flush`` or at the next ``setup``
   in the same dirpath, leaves what an uninterrupted run leaves: the stored checkpoints
   are exactly the files Lightning kept, with their bytes, one ``is_best_model``
   (Lightning's best), one ``is_last_model`` (the last saved), ``model_rank`` 0..k-1 by
   score, and the scores.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
from lamindb_tier import artifact_features, single, storage_file

import lamin_lightning as ll
from helpers import (
    TinyModel,
    assert_events_follow_submissions,
    checkpoint_files,
    lightning_kept_paths,
    loader,
    make_trainer,
    recording_submissions,
    sha256_file,
    staged_files,
    wait_until,
)
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactSavedEvent,
    CheckpointSnapshot,
    FlushReport,
    OutboxInUseError,
    PermanentError,
    PersistenceError,
    RetryPolicy,
    flush_directory,
)
from lamin_lightning._lamin_store import LaminArtifactPublisher
from lamin_lightning._replay import pending_records
from lamin_lightning.testing import (
    MemoryCheckpoint,
    MemoryStore,
    RecordingObserver,
    StoredArtifact,
    no_retry_delays,
)

pytestmark = [
    pytest.mark.contract,
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

TIMEOUT = 60.0
"""Longest wait for anything a test waits on (generous: a loaded 2-core machine)."""


# -- the two stores behind one adapter ------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """What a store holds for one checkpoint key."""

    sha256: str
    is_best_model: bool | None
    is_last_model: bool | None
    model_rank: int | None
    score: float | None


class _ScoredMemoryCheckpoint(MemoryCheckpoint):
    """Annotates each checkpoint with its ``score``, as ``ll.Checkpoint`` does."""

    def collect_checkpoint_feature_values(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot
    ) -> dict[Any, Any] | None:
        return {"score": float(snapshot.score)} if snapshot.score is not None else None


RecordingMemoryCheckpoint = recording_submissions(_ScoredMemoryCheckpoint)
RecordingCheckpoint = recording_submissions(ll.Checkpoint)


class FaultyMemoryStore(MemoryStore):
    """A MemoryStore whose puts of poisoned file names fail (attempts counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.poisoned: set[str] = set()
        self.poison_error: type[BaseException] = PermanentError
        self.poisoned_attempts: Counter[str] = Counter()

    def put(self, key: str, path: str | Path, **kwargs: Any) -> StoredArtifact:
        if key.rsplit("/", 1)[-1] in self.poisoned:
            with self._lock:
                self.poisoned_attempts[key] += 1
            raise self.poison_error(f"injected failure for {key}")
        return super().put(key, path, **kwargs)


class FaultyPublisher(LaminArtifactPublisher):
    """The default LaminDB publisher with faults: flaky, poisoned, or hanging calls.

    - ``flaky(rate, seed)``: a seeded share of calls fails transiently, half before the
      artifact is created (nothing written), half after it was saved (the caller never
      hears of it: a retry must not leave a duplicate).
    - ``poison(names, error)``: every call for these file names raises ``error``.
    - ``hang()``: calls block until ``release(land=...)``; then they go on (``land``) or
      fail without writing anything (as if the process had died mid-upload).
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rate = 0.0
        self.rng = random.Random(0)
        self.poisoned: set[str] = set()
        self.poison_error: type[BaseException] = PermanentError
        self.poisoned_attempts: Counter[str] = Counter()
        self.calls = 0
        self.failed_before = 0
        self.failed_after = 0
        self.open = threading.Event()
        self.open.set()
        self.land = True
        self.hung = 0

    def hang(self) -> None:
        with self.cond:
            self.land = True
            self.open.clear()

    def release(self, *, land: bool) -> None:
        with self.cond:
            self.land = land
            self.open.set()

    def wait_until_hanging(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.hung >= count, timeout)

    def create_artifact(self, local_path: Path | str, *, key: str, **kwargs: Any) -> Any:
        if not self.open.is_set():
            with self.cond:
                self.hung += 1
                self.cond.notify_all()
            released = self.open.wait(TIMEOUT * 5)
            with self.cond:
                self.hung -= 1
                land = self.land
            if not released:
                raise PermanentError(f"the test never released the hung upload of {key}")
            if not land:
                raise ConnectionError(f"injected: the process died while uploading {key}")
        with self.cond:
            self.calls += 1
            draw = self.rng.random()
            if key.rsplit("/", 1)[-1] in self.poisoned:
                self.poisoned_attempts[key] += 1
                raise self.poison_error(f"injected failure for {key}")
            if draw < self.rate / 2:
                self.failed_before += 1
                raise ConnectionError("injected: connection reset before the upload")
        artifact = super().create_artifact(local_path, key=key, **kwargs)
        if draw < self.rate:
            with self.cond:
                self.failed_after += 1
            raise ConnectionError("injected: connection lost after the artifact was saved")
        return artifact


class Contract:
    """What a scenario needs from a store; one subclass per store."""

    name: ClassVar[str]

    def checkpoint(self, **kwargs: Any) -> Any:
        """A new checkpoint callback persisting into this store (records its submissions)."""
        raise NotImplementedError

    def prefix(self, callback: Any) -> str:
        """The prefix of ``callback``'s checkpoint keys (after ``setup``)."""
        raise NotImplementedError

    # faults
    def flaky(self, rate: float, seed: int) -> None:
        """Make a seeded share ``rate`` of storage calls fail transiently."""
        raise NotImplementedError

    def poison(self, names: set[str], error: type[BaseException]) -> None:
        """Make every save of these file names raise ``error``."""
        raise NotImplementedError

    def hang(self) -> None:
        """Make storage calls block until :meth:`release`."""
        raise NotImplementedError

    def wait_until_hanging(self, count: int) -> bool:
        """Whether ``count`` storage calls got blocked (within the timeout)."""
        raise NotImplementedError

    def release(self, *, land: bool) -> None:
        """Unblock hung calls: they complete (``land``) or fail, writing nothing."""
        raise NotImplementedError

    def heal(self) -> None:
        """No more faults."""
        raise NotImplementedError

    # what was injected
    @property
    def calls(self) -> int:
        raise NotImplementedError

    @property
    def failures(self) -> int:
        """Transient failures injected by :meth:`flaky`."""
        raise NotImplementedError

    def poisoned_attempts(self, key: str) -> int:
        raise NotImplementedError

    # what is stored
    def stored(self, prefix: str) -> dict[str, Stored]:
        """The checkpoints under ``prefix + "/"``, by key (asserts one artifact per key)."""
        raise NotImplementedError

    def all_keys(self, prefix: str) -> set[str]:
        """Every key under ``prefix + "/"``, of any kind."""
        raise NotImplementedError

    def replay(self, dirpath: Path) -> FlushReport:
        """``lamin-lightning flush dirpath`` into this store."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """After the test: nothing stays blocked."""
        self.release(land=False)
        self.heal()


class MemoryContract(Contract):
    name = "memory"

    def __init__(self) -> None:
        self.store = FaultyMemoryStore()

    def checkpoint(self, **kwargs: Any) -> Any:
        return RecordingMemoryCheckpoint(self.store, **kwargs)

    def prefix(self, callback: Any) -> str:
        return str(callback.key_prefix)

    def flaky(self, rate: float, seed: int) -> None:
        self.store.latency = 0.002
        self.store.fail_randomly(rate, seed=seed)

    def poison(self, names: set[str], error: type[BaseException]) -> None:
        self.store.poisoned, self.store.poison_error = set(names), error

    def hang(self) -> None:
        self.store.hang()

    def wait_until_hanging(self, count: int) -> bool:
        return self.store.wait_until_hanging(count, timeout=TIMEOUT)

    def release(self, *, land: bool) -> None:
        if not land:  # checked by every blocked call once released
            self.store.fail_always(lambda: ConnectionError("injected: the process died"))
        self.store.release()

    def heal(self) -> None:
        self.store.heal()
        self.store.latency = 0.0
        self.store.poisoned = set()

    @property
    def calls(self) -> int:
        return self.store.calls

    @property
    def failures(self) -> int:
        return self.store.failures_injected

    def poisoned_attempts(self, key: str) -> int:
        return self.store.poisoned_attempts[key]

    def stored(self, prefix: str) -> dict[str, Stored]:
        found: dict[str, Stored] = {}
        for key in self.store.keys(kind="checkpoint"):
            if not key.startswith(prefix + "/"):
                continue
            record = self.store.get(key)
            assert record is not None
            flags = self.store.flags.get(key, {})
            found[key] = Stored(
                sha256=record.sha256,
                is_best_model=flags.get("is_best_model"),
                is_last_model=flags.get("is_last_model"),
                model_rank=flags.get("model_rank"),
                score=record.feature_values.get("score"),
            )
        return found

    def all_keys(self, prefix: str) -> set[str]:
        return {k for k in self.store.keys(kind=None) if k.startswith(prefix + "/")}

    def replay(self, dirpath: Path) -> FlushReport:
        return flush_directory(
            dirpath, stores={"memory": self.store}, progress=False, timeout=TIMEOUT
        )


class LaminContract(Contract):
    name = "lamindb"

    def __init__(self, ln: Any) -> None:
        self.ln = ln
        self.publisher = FaultyPublisher()

    def checkpoint(self, **kwargs: Any) -> Any:
        callback = RecordingCheckpoint(**kwargs)
        callback._artifact_publisher = self.publisher
        return callback

    def prefix(self, callback: Any) -> str:
        return str(callback.checkpoint_key_prefix)

    def flaky(self, rate: float, seed: int) -> None:
        with self.publisher.cond:
            self.publisher.rate, self.publisher.rng = rate, random.Random(seed)

    def poison(self, names: set[str], error: type[BaseException]) -> None:
        with self.publisher.cond:
            self.publisher.poisoned, self.publisher.poison_error = set(names), error

    def hang(self) -> None:
        self.publisher.hang()

    def wait_until_hanging(self, count: int) -> bool:
        return self.publisher.wait_until_hanging(count, TIMEOUT)

    def release(self, *, land: bool) -> None:
        self.publisher.release(land=land)

    def heal(self) -> None:
        with self.publisher.cond:
            self.publisher.rate = 0.0
            self.publisher.poisoned = set()

    @property
    def calls(self) -> int:
        return self.publisher.calls

    @property
    def failures(self) -> int:
        return self.publisher.failed_before + self.publisher.failed_after

    def poisoned_attempts(self, key: str) -> int:
        return self.publisher.poisoned_attempts[key]

    def stored(self, prefix: str) -> dict[str, Stored]:
        from lamindb_setup.core.hashing import hash_file

        # .objects: no default filter, so trashed (not permanently deleted) rows count too.
        rows = list(self.ln.Artifact.objects.filter(key__startswith=prefix + "/", kind="model"))
        keys = [a.key for a in rows]
        assert len(set(keys)) == len(keys), f"duplicate artifacts: {sorted(keys)}"
        found: dict[str, Stored] = {}
        for artifact in rows:
            data = storage_file(artifact).read_bytes()
            assert len(data) == artifact.size, f"{artifact.key}: stored size differs from record"
            if isinstance(artifact.path, Path):  # local storage: the record's hash holds
                assert hash_file(artifact.path)[1] == artifact.hash, f"{artifact.key}: corrupt"
            features = single(artifact_features(self.ln, artifact))
            found[artifact.key] = Stored(
                sha256=hashlib.sha256(data).hexdigest(),
                is_best_model=features.get("is_best_model"),
                is_last_model=features.get("is_last_model"),
                model_rank=features.get("model_rank"),
                score=features.get("score"),
            )
        return found

    def all_keys(self, prefix: str) -> set[str]:
        rows = self.ln.Artifact.objects.filter(key__startswith=prefix + "/")
        return set(rows.values_list("key", flat=True))

    def replay(self, dirpath: Path) -> FlushReport:
        return flush_directory(dirpath, progress=False, timeout=TIMEOUT)


@pytest.fixture(params=["memory", "lamindb"])
def contract(request: pytest.FixtureRequest) -> Iterator[Contract]:
    """The adapter of one store (the LaminDB one on this run's backend, with no run active)."""
    adapter: Contract
    if request.param == "memory":
        adapter = MemoryContract()
    else:
        ln = request.getfixturevalue("ln")
        request.getfixturevalue("no_run")
        adapter = LaminContract(ln)
    try:
        yield adapter
    finally:
        adapter.shutdown()


# -- shared checks -------------------------------------------------------------------------


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lamin-lightning-")]


def ckpt_name(step: int) -> str:
    return f"epoch=0-step={step}.ckpt"


def key_of(callback: Any, path: str | Path) -> str:
    return str(callback.resolve_artifact_key(callback._trainer, path, "checkpoint"))


def assert_kept_set_persisted(
    contract: Contract, callback: Any, *, missing: Collection[str] = ()
) -> dict[str, Stored]:
    """The store's checkpoints under the callback's prefix are exactly Lightning's kept set
    (``best_k_models`` plus ``last_model_path``), one artifact per key, each with the bytes
    of its local file. ``missing``: keys known to have failed (absent, local file kept)."""
    expected = {key_of(callback, p): p for p in lightning_kept_paths(callback)}
    unknown = set(missing) - set(expected)
    assert not unknown, f"missing keys {sorted(unknown)} are not in Lightning's kept set"
    stored = contract.stored(contract.prefix(callback))
    want = set(expected) - set(missing)
    assert set(stored) == want, (
        f"{len(stored)} checkpoint(s) stored, Lightning kept {len(want)};"
        f" extra: {sorted(set(stored) - want)}, absent: {sorted(want - set(stored))}"
    )
    for key in missing:
        assert expected[key].exists(), f"{expected[key]} failed to persist and must be kept"
    for key in want:
        if expected[key].exists():
            assert stored[key].sha256 == sha256_file(expected[key]), f"{key}: bytes differ"
    return stored


# -- fault 1: transient failures -------------------------------------------------------------

STEPS = 50


def test_transient_failures_on_30_percent_of_calls_over_50_checkpoints(
    contract: Contract, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault 1: Lightning's kept set persisted (no duplicates), events in order exactly once,
    every injected failure counted as a retry."""
    rng = random.Random(5)
    scores = [round(rng.uniform(0, 10), 3) for _ in range(STEPS)]
    observer = RecordingObserver()
    callback = contract.checkpoint(
        dirpath=tmp_path / "ckpt",
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
    contract.flaky(0.3, seed=11)
    with no_retry_delays(), caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        make_trainer(tmp_path, [callback], max_steps=STEPS).fit(
            TinyModel(scores=scores), loader(STEPS)
        )

    prefix = contract.prefix(callback)
    saves = Counter(key for op, key in callback.submissions if op == "save")
    assert saves[f"{prefix}/last.ckpt"] == STEPS
    assert sum(saves.values()) - STEPS > 3  # top-k files: kept, evicted, replaced
    assert 0.2 <= contract.failures / contract.calls <= 0.4, (contract.failures, contract.calls)
    if isinstance(contract, LaminContract):  # failures after the save: an orphan to clean up
        assert contract.publisher.failed_before > 0 and contract.publisher.failed_after > 0
    # Every retry is counted and logged; each injected failure caused one. SQLite may add
    # a few of its own ("database is locked"), also retried.
    stats = callback.persistence_stats
    retries = [r.getMessage() for r in caplog.records if r.getMessage().endswith("; retrying")]
    assert stats.retried == len(retries)
    assert len([m for m in retries if "injected" in m]) == contract.failures
    assert all("injected" in m or "database is locked" in m for m in retries), retries
    assert (stats.failed, stats.pending, stats.in_flight) == (0, 0, 0)
    assert stats.finished == stats.submitted
    assert not observer.of_type(ArtifactFailedEvent)
    assert len(observer.events) == stats.saved + stats.removed
    assert_events_follow_submissions(observer.events, callback.submissions, stats)
    saved = [(e.key, e.storage_uri) for e in observer.of_type(ArtifactSavedEvent)]
    assert len(set(saved)) == len(saved), "an artifact was reported saved twice"
    kept = assert_kept_set_persisted(contract, callback)
    assert len(kept) == 4  # top-3 + last.ckpt
    # What failures after the save left behind was cleaned up: nothing but the kept set
    # remains under the prefix.
    assert contract.all_keys(prefix) == set(kept)
    assert staged_files(Path(callback.dirpath)) == []
    assert pool_threads() == []


# -- fault 2: a save that fails for good ----------------------------------------------------


class WaitForEvents(pl.Callback):
    """At the end of training step ``step``, waits until ``count`` events were delivered."""

    def __init__(self, observer: RecordingObserver, step: int, count: int) -> None:
        self.observer, self.step, self.count = observer, step, count
        self.arrived: bool | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.arrived = self.observer.wait_for(self.count, timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("error", "attempts"),
    [(PermanentError, 1), (ConnectionError, 3)],
    ids=["permanent", "transient-exhausted"],
)
def test_failed_save_warns_keeps_the_file_and_later_jobs_continue(
    contract: Contract, tmp_path: Path, error: type[BaseException], attempts: int
) -> None:
    """Fault 2, on_error="warn": the failed event in its slot, training completes, later
    checkpoints persisted, the failed file kept locally (and staged) and absent from the store."""
    dirpath = tmp_path / "ckpt"
    observer = RecordingObserver()
    callback = contract.checkpoint(
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="warn",
    )
    failed_name = ckpt_name(3)
    contract.poison({failed_name}, error)
    trainer = make_trainer(tmp_path, [callback], max_steps=5)
    with pytest.warns(UserWarning, match=rf"{failed_name}.*{attempts} attempt"):
        trainer.fit(TinyModel(), loader(5))

    prefix = contract.prefix(callback)
    failed_key = f"{prefix}/{failed_name}"
    assert trainer.global_step == 5
    assert observer.keys() == [f"{prefix}/{ckpt_name(s)}" for s in range(1, 6)]
    failures = observer.of_type(ArtifactFailedEvent)
    assert [(f.key, f.attempts, f.operation) for f in failures] == [(failed_key, attempts, "save")]
    assert isinstance(failures[0].error, error)
    assert failures[0].local_path == dirpath / failed_name
    assert contract.poisoned_attempts(failed_key) == attempts
    stats = callback.persistence_stats
    assert (stats.failed, stats.saved, stats.retried) == (1, 4, attempts - 1)
    assert_events_follow_submissions(observer.events, callback.submissions, stats)
    # The local file and its staged copy are kept, byte for byte.
    kept = staged_files(dirpath)
    assert [p.name for p in kept] == [failed_name]
    assert sha256_file(kept[0]) == sha256_file(dirpath / failed_name)
    assert_kept_set_persisted(contract, callback, missing={failed_key})
    assert pool_threads() == []


def test_failed_last_save_raises_at_teardown_naming_the_key(
    contract: Contract, tmp_path: Path
) -> None:
    """Fault 2, on_error="raise": fit raises PersistenceError naming the key at teardown;
    everything else is persisted and the failed file is kept."""
    dirpath = tmp_path / "ckpt"
    observer = RecordingObserver()
    callback = contract.checkpoint(
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="raise",
    )
    failed_name = ckpt_name(4)
    contract.poison({failed_name}, PermanentError)
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    with pytest.raises(PersistenceError) as raised:
        trainer.fit(TinyModel(), loader(4))

    prefix = contract.prefix(callback)
    failed_key = f"{prefix}/{failed_name}"
    assert trainer.global_step == 4  # training finished; the error came at teardown
    assert [(f.key, f.attempts) for f in raised.value.failures] == [(failed_key, 1)]
    assert failed_key in str(raised.value)
    assert "on_error='warn'" in str(raised.value)
    assert observer.keys() == [f"{prefix}/{ckpt_name(s)}" for s in range(1, 5)]
    assert isinstance(observer.events[-1], ArtifactFailedEvent)
    assert_events_follow_submissions(
        observer.events, callback.submissions, callback.persistence_stats
    )
    assert (dirpath / failed_name).exists()
    assert [p.name for p in staged_files(dirpath)] == [failed_name]
    assert_kept_set_persisted(contract, callback, missing={failed_key})
    assert pool_threads() == []


def test_failed_save_of_a_checkpoint_evicted_later_leaves_a_complete_kept_set(
    contract: Contract, tmp_path: Path
) -> None:
    """A failed save whose file Lightning evicts later: its removal is delivered in order,
    nothing is left under its key, and the kept set ends complete."""
    observer = RecordingObserver()
    callback = contract.checkpoint(
        dirpath=tmp_path / "ckpt",
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(attempts=2),
        on_error="warn",
        max_workers=1,
    )
    failed_name = ckpt_name(2)
    contract.poison({failed_name}, PermanentError)
    # Files see scores 2, 1, 3, 4, 0: step 2's (score 1) is evicted by step 3's. Before
    # that, step 2's save has failed (2 events), so the removal cannot cancel it instead.
    waiter = WaitForEvents(observer, step=3, count=2)
    with pytest.warns(UserWarning, match=failed_name):
        make_trainer(tmp_path, [callback, waiter], max_steps=5).fit(
            TinyModel(scores=[2, 1, 3, 4, 0]), loader(5)
        )
    prefix = contract.prefix(callback)
    failed_key = f"{prefix}/{failed_name}"
    assert waiter.arrived
    assert observer.keys(ArtifactFailedEvent) == [failed_key]
    assert ("remove", failed_key) in callback.submissions
    assert callback.persistence_stats.failed == 1
    assert_events_follow_submissions(
        observer.events, callback.submissions, callback.persistence_stats
    )
    kept = assert_kept_set_persisted(contract, callback)
    assert set(kept) == {f"{prefix}/{ckpt_name(3)}", f"{prefix}/{ckpt_name(4)}"}


# -- crash and replay -----------------------------------------------------------------------

# ``score`` seen by the checkpoint of step i is CRASH_SCORES[i - 1] (mode "max", top 3):
# steps 1, 2, 3 saved; 4 not; 5 saved, evicts 1; 6 saved, evicts 2; 7 not; 8 saved,
# evicts 3. Kept: 5 (4.0), 6 (6.0), 8 (4.5); best 6; last saved 8.
CRASH_SCORES = [1.0, 2.0, 3.0, 0.5, 4.0, 6.0, 0.2, 4.5]
CRASH_STEPS = len(CRASH_SCORES)
HANG_AT_STEP = 3
WORKERS = 2


def crash_options(dirpath: Path, **extra: Any) -> dict[str, Any]:
    return {
        "dirpath": dirpath,
        "monitor": "score",
        "mode": "max",
        "save_top_k": 3,
        "every_n_train_steps": 1,
        "max_workers": WORKERS,
        "max_pending": 32,  # every job of the run fits: training never waits on the hang
        "retry": RetryPolicy.no_delay(attempts=3),
        **extra,
    }


class HangMidTraining(pl.Callback):
    """Storage hangs from step ``HANG_AT_STEP`` on; at the end, teardown is made to give up.

    Before the checkpoint of step ``HANG_AT_STEP``: waits until the first two saves were
    delivered (committed, flags set), then hangs storage. At the end of training: waits
    until ``WORKERS`` uploads hang and every job is admitted (staged and journaled), checks
    that nobody else can replay the journal of a running callback, and sets the callback's
    ``flush_timeout`` to 0 so that its teardown gives up at once and leaves the jobs in the
    outbox, as a crash would. (Not at construction: the staging handshake before Lightning
    removes a file also waits up to ``flush_timeout``.)
    """

    def __init__(self, contract: Contract, callback: Any, observer: RecordingObserver) -> None:
        self.contract, self.callback, self.observer = contract, callback, observer
        self.seen: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == HANG_AT_STEP:
            self.seen["persisted"] = self.observer.wait_for(2, timeout=TIMEOUT)
            self.contract.hang()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen["hanging"] = self.contract.wait_until_hanging(WORKERS)
        self.seen["admitted"] = wait_until(
            lambda: all(j.state != "staging" for j in self.callback.pending_artifacts()),
            TIMEOUT,
        )
        try:
            self.contract.replay(Path(self.callback.dirpath))
        except OutboxInUseError:
            self.seen["busy"] = True
        self.callback.flush_timeout = 0


def crash_mid_training(contract: Contract, tmp_path: Path, *, land: bool) -> Any:
    """Train with storage hanging from step 3 on; teardown gives up; the hung uploads then
    land or die. Returns the callback; its jobs since the hang are left in the outbox."""
    dirpath = tmp_path / "ckpt"
    observer = RecordingObserver()
    callback = contract.checkpoint(**crash_options(dirpath, artifact_observers=[observer]))
    script = HangMidTraining(contract, callback, observer)
    trainer = make_trainer(tmp_path, [callback, script], max_steps=CRASH_STEPS)
    with pytest.warns(UserWarning, match=r"flush_timeout=0(\.0)?s; not persisted: .*step="):
        trainer.fit(TinyModel(scores=CRASH_SCORES), loader(CRASH_STEPS))
    assert script.seen == {"persisted": True, "hanging": True, "admitted": True, "busy": True}
    # The uploads stuck in storage outlive teardown on their threads, like the process they
    # would have died with. Now they finish (or fail); wait for their threads to end.
    stuck = pool_threads()
    contract.release(land=land)
    for thread in stuck:
        thread.join(TIMEOUT)
    assert [t.name for t in stuck if t.is_alive()] == []
    contract.heal()

    # Exactly as after a crash: every job since the hang is journaled, in order; nothing
    # after the first two saves was committed.
    prefix = contract.prefix(callback)
    submissions = callback.submissions
    assert submissions[:2] == [("save", f"{prefix}/{ckpt_name(s)}") for s in (1, 2)]
    journaled = [(r.op, r.key) for _, r in pending_records(dirpath)]
    assert journaled == submissions[2:]
    stored = contract.stored(prefix)
    committed = {k for k, s in stored.items() if s.is_last_model is not None}
    assert committed == {f"{prefix}/{ckpt_name(s)}" for s in (1, 2)}
    landed = set(stored) - committed
    assert landed == ({f"{prefix}/{ckpt_name(s)}" for s in (3, 5)} if land else set())
    return callback


def assert_like_an_uninterrupted_run(contract: Contract, callback: Any) -> None:
    """What a replay must leave: the stored checkpoints are the files Lightning kept, with
    their bytes; flags, ranks and scores are Lightning's final view; nothing is pending."""
    dirpath = Path(callback.dirpath)
    prefix = contract.prefix(callback)
    files = checkpoint_files(dirpath)  # the .lamin-lightning folder excluded
    assert files == {ckpt_name(s) for s in (5, 6, 8)}
    assert files == {Path(p).name for p in callback.best_k_models}
    expected = {key_of(callback, dirpath / name): dirpath / name for name in files}
    stored = contract.stored(prefix)
    assert set(stored) == set(expected)
    assert contract.all_keys(prefix) == set(expected)
    for key, path in expected.items():
        assert stored[key].sha256 == sha256_file(path), f"{key}: stored bytes differ from {path}"
    best = [k for k, s in stored.items() if s.is_best_model]
    assert best == [key_of(callback, callback.best_model_path)] == [f"{prefix}/{ckpt_name(6)}"]
    last_saved = [key for op, key in callback.submissions if op == "save"][-1]
    assert [k for k, s in stored.items() if s.is_last_model] == [last_saved]
    assert last_saved == f"{prefix}/{ckpt_name(8)}"
    scores = {key_of(callback, p): float(v) for p, v in callback.best_k_models.items()}
    ranked = sorted(scores, key=scores.__getitem__, reverse=callback.mode == "max")
    assert {k: s.model_rank for k, s in stored.items()} == {k: i for i, k in enumerate(ranked)}
    assert {k: s.score for k, s in stored.items()} == pytest.approx(scores)
    assert pending_records(dirpath) == []
    assert staged_files(dirpath) == []


LANDINGS = pytest.mark.parametrize(
    "land", [True, False], ids=["hung-uploads-land", "hung-uploads-die"]
)


@LANDINGS
def test_storage_hangs_mid_training_then_flush_replays_like_an_uninterrupted_run(
    contract: Contract, tmp_path: Path, land: bool
) -> None:
    """Storage hangs while top-k evictions go on; teardown gives up; ``lamin-lightning
    flush`` (``flush_directory``) completes the journal into the healed store."""
    callback = crash_mid_training(contract, tmp_path, land=land)
    report = contract.replay(Path(callback.dirpath))

    assert (report.remaining, report.refused, report.busy) == ([], [], [])
    assert report.failed == 0
    assert report.events and all(e.recovered for e in report.events)
    assert report.removed == 3  # steps 1, 2, 3
    assert report.saved + len(report.dropped) == 4  # steps 3, 5, 6, 8 (3's may be cancelled)
    assert_like_an_uninterrupted_run(contract, callback)


@LANDINGS
def test_storage_hangs_mid_training_then_the_next_setup_replays_like_an_uninterrupted_run(
    contract: Contract, tmp_path: Path, land: bool
) -> None:
    """As above, but the journal is replayed by the next ``setup`` of a new callback with
    the same dirpath (here ``trainer.validate``, which saves no checkpoint of its own)."""
    callback = crash_mid_training(contract, tmp_path, land=land)
    observer = RecordingObserver()
    second = contract.checkpoint(
        **crash_options(
            Path(callback.dirpath), artifact_observers=[observer], flush_timeout=TIMEOUT
        )
    )
    make_trainer(tmp_path, [second]).validate(TinyModel(), loader(2))

    assert observer.events and all(e.recovered for e in observer.events)
    assert not observer.of_type(ArtifactFailedEvent)
    assert second.persistence_stats.failed == 0
    assert pool_threads() == []
    assert_like_an_uninterrupted_run(contract, callback)
