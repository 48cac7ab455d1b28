"""lamin_lightning.testing: the fault-injecting MemoryStore and the RecordingObserver."""

from __future__ import annotations

import hashlib
import pickle
import threading
from pathlib import Path

import pytest

from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
    JobRecord,
    PermanentError,
)
from lamin_lightning.testing import MemoryStore, RecordingObserver


@pytest.fixture
def file(tmp_path: Path) -> Path:
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"checkpoint bytes")
    return path


def test_put_get_keys_delete_and_versions(file: Path) -> None:
    """put stores hash, size and a version per key; keys filter by kind; delete returns it."""
    store = MemoryStore()
    first = store.put("ckpt/a", file, feature_values={"step": 1})
    second = store.put("ckpt/a", file)
    config = store.put("config.yaml", file, kind="config")
    assert (first.version, second.version) == (1, 2)
    assert first.sha256 == hashlib.sha256(b"checkpoint bytes").hexdigest()
    assert first.size == len(b"checkpoint bytes")
    assert first.feature_values == {"step": 1}
    assert first.data is None
    assert store.get("ckpt/a") == second
    assert store.keys() == {"ckpt/a", "config.yaml"}
    assert store.keys(kind="checkpoint") == {"ckpt/a"}
    store.set_flags("ckpt/a", is_best_model=True)
    assert store.delete("ckpt/a") == second
    assert "ckpt/a" not in store.flags
    assert store.delete("ckpt/a") is None
    assert store.keys() == {"config.yaml"}
    assert config.kind == "config"
    assert store.history == [
        ("put", "ckpt/a"),
        ("put", "ckpt/a"),
        ("put", "config.yaml"),
        ("delete", "ckpt/a"),
        ("delete", "ckpt/a"),
    ]


def test_keep_bytes_keeps_the_file_content(file: Path) -> None:
    """MemoryStore(keep_bytes=True) keeps the bytes that were read at put time."""
    store = MemoryStore(keep_bytes=True)
    record = store.put("k", file)
    file.write_bytes(b"changed later")
    assert record.data == b"checkpoint bytes"


def test_fail_next_injects_transient_errors_then_succeeds(file: Path) -> None:
    """fail_next(n) makes exactly the next n calls raise ConnectionError (or a given error)."""
    store = MemoryStore()
    store.fail_next(2)
    for _ in range(2):
        with pytest.raises(ConnectionError, match="injected"):
            store.put("k", file)
    assert store.put("k", file).version == 1
    store.fail_next(1, error=lambda: TimeoutError("custom"))
    with pytest.raises(TimeoutError, match="custom"):
        store.delete("k")
    assert store.failures_injected == 3
    assert store.calls == 4
    assert store.history == [("put", "k")]


def test_fail_always_is_permanent_until_heal(file: Path) -> None:
    """fail_always raises PermanentError on every call until heal()."""
    store = MemoryStore()
    store.fail_always()
    for _ in range(3):
        with pytest.raises(PermanentError):
            store.put("k", file)
    store.heal()
    assert store.put("k", file).version == 1


def test_fail_randomly_is_reproducible_with_a_seed(file: Path) -> None:
    """fail_randomly(rate, seed) gives the same failure pattern for the same seed."""

    def pattern(seed: int) -> list[bool]:
        store = MemoryStore()
        store.fail_randomly(0.5, seed=seed)
        outcome = []
        for _ in range(40):
            try:
                store.put("k", file)
                outcome.append(True)
            except ConnectionError:
                outcome.append(False)
        return outcome

    first = pattern(7)
    assert first == pattern(7)
    assert 5 < first.count(False) < 35


def test_hang_blocks_calls_until_release(file: Path) -> None:
    """hang() blocks storage calls, wait_until_hanging sees them, release() lets them finish."""
    store = MemoryStore()
    store.hang()
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(store.put(f"k{i}", file).version))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    assert store.wait_until_hanging(3)
    assert store.concurrent == 3
    assert store.keys() == set()
    assert not store.wait_until_hanging(4, timeout=0.01)
    store.release()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [1, 1, 1]
    assert store.max_concurrent == 3
    assert store.concurrent == 0
    assert store.keys() == {"k0", "k1", "k2"}


def test_store_pickles_without_its_locks(file: Path) -> None:
    """A pickled store keeps its objects and gets fresh synchronisation primitives."""
    store = MemoryStore()
    store.put("k", file)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.keys() == {"k"}
    assert clone.put("k", file).version == 2


def test_recording_observer_records_in_order_and_waits(tmp_path: Path) -> None:
    """RecordingObserver keeps events in arrival order, filters by type and wakes waiters."""
    observer = RecordingObserver()
    saved = ArtifactSavedEvent("checkpoint", "a", tmp_path, None, artifact=1, storage_uri="m://a")
    removed = ArtifactRemovedEvent("checkpoint", "a", tmp_path, None)
    failed = ArtifactFailedEvent("checkpoint", "b", tmp_path, None, error=OSError(), attempts=2)
    assert not observer.wait_for(1, timeout=0.01)
    waiter_result: list[bool] = []
    waiter = threading.Thread(target=lambda: waiter_result.append(observer.wait_for(3)))
    waiter.start()
    observer.on_artifact_saved(saved)
    observer.on_artifact_removed(removed)
    observer.on_artifact_failed(failed)
    waiter.join(10)
    assert waiter_result == [True]
    assert observer.events == [saved, removed, failed]
    assert observer.of_type(ArtifactFailedEvent) == [failed]
    assert observer.keys() == ["a", "a", "b"]
    assert observer.keys(ArtifactSavedEvent) == ["a"]
    assert observer.threads == {threading.current_thread().name}


def test_a_failed_commit_of_an_upload_that_ran_ahead_brings_the_committed_version_back(
    tmp_path: Path,
) -> None:
    """Transfers run ahead of commits: v2 of a key is uploaded before v1 is committed. v1's
    commit still makes it the committed version, so abandoning v2 (its commit failed) leaves
    v1 under the key, as a real store keeps it."""
    store = MemoryStore()
    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    record = JobRecord(op="save", kind="config", key="k/last.ckpt", local_path="", store="memory")
    v1 = store.transfer(record, first)
    v2 = store.transfer(record, second)
    store.commit(record, v1, replay=False, set_flags=False)
    store.abandon(record, v2)
    kept = store.get("k/last.ckpt")
    assert kept is not None and kept.version == 1 and kept.sha256 == v1.sha256


def test_a_removal_takes_the_committed_version_and_spares_a_newer_upload_in_flight(
    tmp_path: Path,
) -> None:
    """A key evicted and then saved again (top-k names without a version counter): the new
    upload can land before the removal commits. The removal deletes the committed version
    only, as LaminDB's store does, and the new upload's commit makes it the key's."""
    store = MemoryStore()
    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    save = JobRecord(op="save", kind="config", key="k/a.ckpt", local_path="", store="memory")
    removal = JobRecord(op="remove", kind="checkpoint", key="k/a.ckpt", local_path="")
    v1 = store.transfer(save, first)
    store.commit(save, v1, replay=False, set_flags=False)
    v2 = store.transfer(save, second)
    removed = store.remove(removal, None)
    assert removed is not None and removed[0].version == v1.version
    store.commit(save, v2, replay=False, set_flags=False)
    kept = store.get("k/a.ckpt")
    assert kept is not None and kept.sha256 == v2.sha256
    # With nothing newer in flight, a removal deletes the key.
    assert store.remove(removal, None) is not None
    assert store.get("k/a.ckpt") is None


def test_a_rejected_feature_is_left_out_of_a_live_commit_and_named_by_its_event(
    tmp_path: Path,
) -> None:
    """``reject_feature`` mirrors a value LaminDB refuses: each live checkpoint persists
    without that feature, with its other values, no save fails, and each saved event names
    it. Before, the fake store failed the live commit (PermanentError), as LaminDB's store
    no longer does."""
    from typing import Any

    from helpers import TinyModel, loader, make_trainer
    from lamin_lightning.testing import MemoryCheckpoint

    class Annotating(MemoryCheckpoint):
        def collect_checkpoint_feature_values(self, trainer: Any, snapshot: Any) -> Any:
            return {"good": 1, "gone": 2}

    store = MemoryStore()
    store.reject_feature("gone")
    observer = RecordingObserver()
    callback = Annotating(
        store,
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        artifact_observers=[observer],
    )
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    saved = observer.of_type(ArtifactSavedEvent)
    assert [(e.key, e.unannotated_features) for e in saved] == [
        ("checkpoints/epoch=0-step=1.ckpt", ("gone",)),
        ("checkpoints/epoch=0-step=2.ckpt", ("gone",)),
    ]
    assert observer.of_type(ArtifactFailedEvent) == []
    for event in saved:
        stored = store.get(event.key)
        assert stored is not None and stored.feature_values == {"good": 1}
