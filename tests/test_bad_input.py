"""Bad input: every knob is validated at construction, with an error that names the
parameter and says what to pass instead; observers that lack methods or raise are
isolated; two callbacks in one trainer share nothing.

Runs without a LaminDB instance: ``lamin_lightning.Checkpoint`` validates its knobs
before it ever imports lamindb. The LaminDB parts (odd dirpaths, wrongly typed feature
values, two callbacks with resume) are in ``tests/lamindb/test_lamindb_bad_input.py``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

import lamin_lightning as ll
from helpers import (
    TinyModel,
    assert_events_follow_submissions,
    assert_store_kept_set_persisted,
    loader,
    make_trainer,
    recording_submissions,
)
from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent, RetryPolicy
from lamin_lightning._errors import ArgumentTypeError
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
]

# A word in the message that tells the user what to do instead.
FIX_WORDS = re.compile(r"\b(must|pass|use|define|one of|let the callback)\b", re.IGNORECASE)


class OnlySaved:
    def on_artifact_saved(self, event: Any) -> None:
        pass


# (parameter, bad value, exception type)
BAD_KNOBS: list[tuple[str, Any, type[Exception]]] = [
    ("max_workers", 0, ValueError),
    ("max_workers", -1, ValueError),
    ("max_workers", 1.5, ValueError),
    ("max_workers", "2", ValueError),
    ("max_workers", True, ValueError),
    ("max_workers", None, ValueError),
    ("max_workers", 10**9, ValueError),  # a YAML typo: a thread each, until none is left
    ("max_workers", 257, ValueError),
    ("max_pending", 0, ValueError),
    ("max_pending", "4", ValueError),
    ("max_pending", False, ValueError),
    ("retry", "x", ValueError),
    ("retry", 1.5, ValueError),
    ("retry", True, ValueError),
    ("retry", 0, ValueError),
    ("retry", -3, ValueError),
    ("retry", {"attempt": 3}, ValueError),  # misspelt field
    ("retry", {"attempts": 0}, ValueError),
    ("retry", {"attempts": "3"}, ArgumentTypeError),
    ("retry", {"initial_backoff": -1}, ValueError),
    ("retry", {"initial_backoff": 2, "max_backoff": 1}, ValueError),
    ("retry", {"jitter": "a lot"}, ArgumentTypeError),
    # NaN failed the first retry for good; infinity slept for ever.
    ("retry", {"jitter": float("nan")}, ValueError),
    ("retry", {"max_backoff": float("nan")}, ValueError),
    ("retry", {"initial_backoff": float("inf"), "max_backoff": float("inf")}, ValueError),
    ("retry", {"jitter": float("inf")}, ValueError),
    ("retry", {"transient_errors": ["OSError"]}, ValueError),  # not a dotted name
    ("retry", [3], ValueError),
    ("flush_timeout", -1, ValueError),
    ("flush_timeout", "10", ValueError),
    ("flush_timeout", True, ValueError),
    ("flush_timeout", float("nan"), ValueError),
    ("on_error", "boom", ValueError),
    ("on_error", "RAISE", ValueError),
    ("on_error", None, ArgumentTypeError),
    ("on_error", 1, ArgumentTypeError),
    ("on_error", ["raise"], ArgumentTypeError),
    ("async_write", "yes", ValueError),
    ("async_write", 1, ValueError),
    ("async_write", None, ValueError),
    ("max_snapshots", 0, ValueError),
    ("max_snapshots", 2.0, ValueError),
    ("artifact_observers", OnlySaved(), ValueError),  # one observer, not a list
    ("artifact_observers", "observer", ValueError),
    ("dirpath", "s3://bucket/checkpoints", ValueError),
    ("dirpath", "gs://bucket/checkpoints", ValueError),
    ("dirpath", "S3://bucket/checkpoints", ValueError),
]


def _id(case: tuple[str, Any, type[Exception]]) -> str:
    return f"{case[0]}={case[1]!r}"[:40]


def _construct(cls: str, **kwargs: Any) -> Any:
    if cls == "MemoryCheckpoint":
        return MemoryCheckpoint(MemoryStore(), **kwargs)
    return ll.Checkpoint(**kwargs)


@pytest.mark.parametrize("cls", ["MemoryCheckpoint", "Checkpoint"])
@pytest.mark.parametrize("case", BAD_KNOBS, ids=[_id(c) for c in BAD_KNOBS])
def test_every_bad_knob_fails_at_construction_naming_the_parameter_and_the_fix(
    cls: str, case: tuple[str, Any, type[Exception]]
) -> None:
    """Constructing with a bad knob raises at once; the message names the knob and a fix."""
    name, value, error = case
    with pytest.raises(error) as raised:
        _construct(cls, **{name: value})
    message = str(raised.value)
    assert name in message, message
    assert FIX_WORDS.search(message), f"no hint what to pass instead: {message}"


@pytest.mark.parametrize(
    "features",
    [
        {"runs": {"project": "x"}},  # misspelt scope
        {"artifact": ["val_loss"]},  # not a mapping of name to value
        {"run": "x"},
        ["run"],
        "run",
    ],
    ids=repr,
)
def test_bad_features_fail_at_construction_naming_the_parameter(features: Any) -> None:
    """Checkpoint(features=...) of the wrong shape fails at once, naming it and the shape."""
    with pytest.raises(ValueError, match="features") as raised:
        ll.Checkpoint(features=features)
    message = str(raised.value)
    assert FIX_WORDS.search(message) or "e.g." in message, message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"features": {"run": None}},
        {"features": [("run", {})]},
        {"features": "run"},
        {"artifact_observers": object()},
        {"artifact_observers": "observer"},
        {"max_pending": "4"},
        {"async_write": "yes"},
        {"flush_timeout": "60"},
        {"retry": "3"},
    ],
    ids=repr,
)
def test_an_argument_of_the_wrong_type_is_both_a_type_error_and_a_value_error(
    kwargs: dict[str, Any],
) -> None:
    """Where the reference fails with a TypeError for the same input (features that are not
    mappings, observers that are not iterable), code catching TypeError still catches ours;
    code catching ValueError (every bad argument of ours) too."""
    with pytest.raises(TypeError) as raised:
        ll.Checkpoint(**kwargs)
    assert isinstance(raised.value, ValueError)
    (name,) = kwargs
    assert name in str(raised.value)


@pytest.mark.parametrize("kwargs", [{"max_pending": 0}, {"flush_timeout": -1.0}], ids=repr)
def test_a_value_out_of_range_is_a_value_error_only(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as raised:
        ll.Checkpoint(**kwargs)
    assert not isinstance(raised.value, TypeError)


def test_constructing_checkpoint_does_not_import_lamindb() -> None:
    """Validation needs no LaminDB instance: a bad knob fails before lamindb is imported."""
    import subprocess

    code = (
        "import sys, lamin_lightning as ll\n"
        "try:\n    ll.Checkpoint(max_workers=0)\nexcept ValueError as e:\n    print('raised', e)\n"
        "ll.Checkpoint(max_workers=2, retry={'attempts': 3}, features={'run': {'a': 1}})\n"
        "print('lamindb imported:', 'lamindb' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raised max_workers" in done.stdout
    assert "lamindb imported: False" in done.stdout


def test_good_knob_values_are_accepted_and_normalised() -> None:
    """The documented forms are accepted: an int or mapping retry, inf flush_timeout, tuples."""
    observer = RecordingObserver()
    callback = MemoryCheckpoint(
        MemoryStore(),
        max_workers=1,
        max_pending=1,
        retry={"attempts": 2, "transient_errors": ["builtins.OSError"]},
        flush_timeout=float("inf"),
        on_error="warn",
        async_write=True,
        max_snapshots=2,
        artifact_observers=(observer,),
    )
    assert callback.retry == RetryPolicy(attempts=2, transient_errors=("builtins.OSError",))
    assert callback.flush_timeout is None
    assert MemoryCheckpoint(MemoryStore(), retry=3).retry.attempts == 3
    assert MemoryCheckpoint(MemoryStore(), flush_timeout=0).flush_timeout == 0.0


# -- observers ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["MemoryCheckpoint", "Checkpoint"])
def test_an_observer_without_hooks_is_registered_with_a_warning_naming_the_fix(cls: str) -> None:
    """As the reference: any object is registered (its missing methods are skipped); ours
    also warns that it will never be called, naming the methods to define."""
    with pytest.warns(UserWarning, match="none of on_artifact_saved") as record:
        callback = _construct(cls, artifact_observers=[OnlySaved(), None])
    assert len(record) == 1
    assert FIX_WORDS.search(str(record[0].message))
    callback.remove_artifact_observer(None)  # registered


@pytest.mark.parametrize("cls", ["MemoryCheckpoint", "Checkpoint"])
def test_artifact_observers_may_be_any_iterable_read_once(cls: str) -> None:
    """A generator of observers, as the reference takes: read once, at construction."""
    observer = OnlySaved()
    callback = _construct(cls, artifact_observers=(o for o in [observer]))
    callback.remove_artifact_observer(observer)  # registered


class OnlySavedRecorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_artifact_saved(self, event: Any) -> None:
        self.events.append(event)


class OnlyRemoved:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_artifact_removed(self, event: Any) -> None:
        self.events.append(event)


class RaisesEverywhere:
    def __init__(self) -> None:
        self.calls = 0

    def _raise(self, event: Any) -> None:
        self.calls += 1
        raise RuntimeError(f"observer exploded on {event.key}")

    on_artifact_saved = on_artifact_removed = on_artifact_failed = _raise


class AwaitEarlierEvents(pl.Callback):
    """Before the checkpoint of step n (n >= 2) is saved, waits for the 2n - 3 events of the
    earlier steps, so that no eviction cancels a queued save: the event stream is fixed."""

    def __init__(self, observer: RecordingObserver) -> None:
        self.observer = observer
        self.ok = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= 2:
            self.ok &= self.observer.wait_for(2 * trainer.global_step - 3, timeout=30)


RecordingMemoryCheckpoint = recording_submissions(MemoryCheckpoint)


def test_partial_and_raising_observers_are_isolated_and_later_events_still_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An observer with only on_artifact_saved (or only on_artifact_removed) gets just those;
    an observer that raises in every method is logged each time; the observers after it
    still get every saved, removed and failed event, in order."""
    store = MemoryStore()
    store.fail_next(1)  # with one worker and one attempt: step 1's upload fails for good
    only_saved, only_removed, raising, recording = (
        OnlySavedRecorder(),
        OnlyRemoved(),
        RaisesEverywhere(),
        RecordingObserver(),
    )
    callback = RecordingMemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        max_workers=1,
        retry=RetryPolicy.no_delay(attempts=1),
        on_error="warn",
        artifact_observers=[raising, only_saved, only_removed, recording],
    )
    waiter = AwaitEarlierEvents(recording)
    with (
        caplog.at_level(logging.ERROR, logger="lamin_lightning"),
        pytest.warns(UserWarning, match=r"epoch=0-step=1\.ckpt"),
    ):
        make_trainer(tmp_path, [callback, waiter], max_steps=4).fit(
            TinyModel(scores=[1, 2, 3, 4]), loader(4)
        )
    assert waiter.ok

    events = recording.events
    assert isinstance(events[0], ArtifactFailedEvent)
    assert len(events) == 7  # 4 saves (first failed) and 3 removals
    assert_events_follow_submissions(events, callback.submissions, callback.persistence_stats)
    assert only_saved.events == [e for e in events[1:] if type(e).__name__ == "ArtifactSavedEvent"]
    assert only_removed.events == [e for e in events if isinstance(e, ArtifactRemovedEvent)]
    assert raising.calls == len(events)
    logged = [
        r for r in caplog.records if "observer" in r.getMessage() and "raised" in r.getMessage()
    ]
    assert len(logged) == len(events)
    assert_store_kept_set_persisted(store, callback)


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5", True], ids=repr)
def test_a_bad_flush_timeout_is_refused_naming_it_whatever_is_pending(
    tmp_path: Path, timeout: Any
) -> None:
    """``flush(timeout=nan)`` waited for ever with a job pending, ``"5"`` failed in float
    arithmetic, and with nothing pending every bad value returned True (found by an
    adversarial review)."""
    callback = MemoryCheckpoint(MemoryStore(), dirpath=tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"flush\(timeout=\.\.\.\) must be a number of seconds"):
        callback.flush(timeout=timeout)
    with pytest.raises(ValueError, match=r"timeout=\.\.\.\) must be a number of seconds"):
        ll.flush_directory(tmp_path, timeout=timeout, progress=False)


def test_a_pipeline_that_cannot_start_all_its_threads_stops_those_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of threads part-way through the start (a process limit, a large max_workers):
    the threads and the event loop already started were left running after the failed
    fit. Now they stop, and the error names max_workers."""
    from lamin_lightning import _bridge

    real = _bridge.ThreadLane.__init__
    made: list[Any] = []

    def third_fails(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(made) == 2:
            raise RuntimeError("can't start new thread")
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(_bridge.ThreadLane, "__init__", third_fails)
    before = set(threading.enumerate())
    callback = MemoryCheckpoint(
        MemoryStore(), dirpath=tmp_path / "ckpt", every_n_train_steps=1, max_workers=4
    )
    with pytest.raises(RuntimeError, match="lower max_workers"):
        make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader(1))
    for lane in made:
        lane.thread.join(timeout=30)
    assert [lane.thread.name for lane in made if lane.thread.is_alive()] == []
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not any("lamin-lightning" in name for name in left), left


def test_an_infinite_max_backoff_is_no_cap_and_a_numpy_timeout_is_a_number(
    tmp_path: Path,
) -> None:
    """What the refusals above must not refuse (found by a review of them)."""
    policy = RetryPolicy(max_backoff=float("inf"), jitter=0.0)
    assert [policy.backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    numpy = pytest.importorskip("numpy")
    callback = MemoryCheckpoint(MemoryStore(), dirpath=tmp_path / "ckpt")
    assert callback.flush(timeout=numpy.int64(5)) is True
