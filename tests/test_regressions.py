"""Defects of the one-job-record redesign issue, each reproduced against the in-memory store.

Each test failed on 12ec151 and names what it proves. The LaminDB twins (a real
instance, a real SIGKILL) are in ``tests/lamindb/test_lamindb_regressions.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from helpers import (
    TinyModel,
    ctrl_c_right_after_entering,
    loader,
    make_trainer,
    returns_on_another_thread,
    sha256_file,
)
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactSavedEvent,
    JobRecord,
    PersistenceError,
    RetryPolicy,
    flush_directory,
)
from lamin_lightning._errors import PermanentError
from lamin_lightning._jobs import CheckpointSnapshot
from lamin_lightning._journal import Outbox
from lamin_lightning._staging import staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver

# -- journals written by hand: what a crashed process leaves ---------------------------------


def _journal(dirpath: Path) -> Outbox:
    outbox = Outbox(dirpath / ".lamin-lightning" / "outbox-test.jsonl")
    outbox.open()
    return outbox


def _save(
    dirpath: Path,
    name: str,
    *,
    at: float,
    ranking: tuple[str, ...] = (),
    best: str | None = None,
    features: dict[str, Any] | None = None,
    staged: bool = True,
) -> JobRecord:
    """A journaled checkpoint save whose staged file exists, as Lightning saw it at ``at``."""
    local = dirpath / name
    local.write_bytes(name.encode() * 100)
    staged_path = dirpath / ".lamin-lightning" / "staged" / f"{at}" / name
    if staged:
        staged_path.parent.mkdir(parents=True)
        staged_path.write_bytes(local.read_bytes())
    key = f"ckpts/{name}"
    keys = tuple(f"ckpts/{n}" for n in ranking)
    snapshot = CheckpointSnapshot(
        key=key,
        local_path=local,
        staged_path=staged_path,
        global_step=int(at),
        epoch=0,
        monitor="score",
        mode="min",
        save_weights_only=False,
        score=at,
        is_best=best == name,
        best_key=f"ckpts/{best}" if best else None,
        last_key=key,
        ranking=keys,
        scores={k: float(i) for i, k in enumerate(keys)},
        feature_values=features,
    )
    return JobRecord(
        op="save",
        kind="checkpoint",
        key=key,
        local_path=str(local),
        staged_path=str(staged_path),
        store="memory",
        checkpoint=snapshot,
        submitted_at=at,
    )


def _remove(dirpath: Path, name: str, at: float) -> JobRecord:
    return JobRecord(
        op="remove",
        kind="checkpoint",
        key=f"ckpts/{name}",
        local_path=str(dirpath / name),
        store="memory",
        submitted_at=at,
    )


def _flags(store: MemoryStore) -> dict[str, tuple[bool, bool, int | None]]:
    return {
        k: (f["is_best_model"], f["is_last_model"], f["model_rank"]) for k, f in store.flags.items()
    }


def test_a_replay_leaves_the_flags_of_the_last_submitted_state(tmp_path: Path) -> None:
    """Saves a, b, c (top-2 by score) and the eviction of a, replayed after a crash: the
    flags are exactly Lightning's view at the last save, every kept file ranked."""
    outbox = _journal(tmp_path)
    outbox.append(_save(tmp_path, "a.ckpt", at=1, ranking=("a.ckpt",), best="a.ckpt"))
    outbox.append(_save(tmp_path, "b.ckpt", at=2, ranking=("b.ckpt", "a.ckpt"), best="b.ckpt"))
    outbox.append(_remove(tmp_path, "a.ckpt", at=3))
    outbox.append(_save(tmp_path, "c.ckpt", at=3, ranking=("b.ckpt", "c.ckpt"), best="b.ckpt"))
    outbox.close()
    store = MemoryStore()
    report = flush_directory(tmp_path, progress=False, stores={"memory": store})
    assert report.remaining == [] and report.failed == 0
    assert store.keys() == {"ckpts/b.ckpt", "ckpts/c.ckpt"}
    assert _flags(store) == {"ckpts/b.ckpt": (True, False, 0), "ckpts/c.ckpt": (False, True, 1)}


def test_an_eviction_journaled_last_whose_file_never_left_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed between journaling the eviction of a and moving a.ckpt out of the folder: the
    replay keeps a's artifact (its file is there, and the last.ckpt saved before counts it
    as kept), warning why. Evicted earlier, with a later job journaled, it goes."""
    outbox = _journal(tmp_path)
    outbox.append(_save(tmp_path, "a.ckpt", at=1, ranking=("a.ckpt",), best="a.ckpt"))
    outbox.append(_save(tmp_path, "b.ckpt", at=2, ranking=("b.ckpt", "a.ckpt"), best="b.ckpt"))
    outbox.append(_remove(tmp_path, "a.ckpt", at=3))
    outbox.close()
    store = MemoryStore()
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        report = flush_directory(tmp_path, progress=False, stores={"memory": store})
    assert report.remaining == [] and report.failed == 0
    assert store.keys() == {"ckpts/a.ckpt", "ckpts/b.ckpt"}
    assert "before the file left the folder" in caplog.text

    (tmp_path / "a.ckpt").unlink()  # moved aside before the crash: the removal replays
    outbox = _journal(tmp_path)
    outbox.append(_remove(tmp_path, "a.ckpt", at=4))
    outbox.close()
    flush_directory(tmp_path, progress=False, stores={"memory": store})
    assert store.keys() == {"ckpts/b.ckpt"}


@pytest.mark.parametrize("compacted", [False, True], ids=["as-written", "compacted"])
def test_an_eviction_handed_to_the_users_removal_that_kept_the_file_replays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, compacted: bool
) -> None:
    """Killed right after a strategy or CheckpointIO of the user's was handed the evicted
    a.ckpt and returned, leaving the file (it keeps every file, or archives in place): the
    replay deletes a's artifact, as the run would have, though the file is in the folder
    (before, it was kept, as for a kill before the call). Also after a compaction."""
    outbox = _journal(tmp_path)
    outbox.append(_save(tmp_path, "a.ckpt", at=1, ranking=("a.ckpt",), best="a.ckpt"))
    outbox.append(_save(tmp_path, "b.ckpt", at=2, ranking=("b.ckpt", "a.ckpt"), best="b.ckpt"))
    outbox.mark_handed_over(outbox.append(_remove(tmp_path, "a.ckpt", at=3)))
    if compacted:
        outbox._compact()
    outbox.close()
    store = MemoryStore()
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        report = flush_directory(tmp_path, progress=False, stores={"memory": store})
    assert report.remaining == [] and report.failed == 0
    assert store.keys() == {"ckpts/b.ckpt"}
    assert (tmp_path / "a.ckpt").exists()  # the user's to keep
    assert "before the file left the folder" not in caplog.text


def test_an_old_failed_save_replayed_after_newer_commits_leaves_the_flags_alone(
    tmp_path: Path,
) -> None:
    """A save that failed while a newer one committed is replayed later without moving the
    flags back in time: they stay those of the newer, committed save."""
    store = MemoryStore()
    outbox = _journal(tmp_path)
    old = outbox.append(_save(tmp_path, "a.ckpt", at=1, ranking=("a.ckpt",), best="a.ckpt"))
    newer = _save(tmp_path, "b.ckpt", at=2, ranking=("b.ckpt", "a.ckpt"), best="b.ckpt")
    newer_id = outbox.append(newer)
    # The newer save committed (in the crashed process); its line is settled.
    artifact = store.transfer(newer, Path(str(newer.staged_path)))
    store.commit(newer, artifact, replay=False, set_flags=True)
    outbox.settle(newer_id, "saved")
    assert old in {i for i, _ in outbox.pending()}
    outbox.close()
    flush_directory(tmp_path, progress=False, stores={"memory": store})
    assert store.keys() == {"ckpts/a.ckpt", "ckpts/b.ckpt"}
    assert _flags(store)["ckpts/b.ckpt"] == (True, True, 0)
    assert store.flags.get("ckpts/a.ckpt", {}).get("is_last_model") in (None, False)


def test_a_replay_whose_annotation_fails_keeps_the_other_annotations(tmp_path: Path) -> None:
    """A feature rejected since the crash: the checkpoint and its other features persist, the
    event names the feature, and the report lists the save as unannotated."""
    outbox = _journal(tmp_path)
    outbox.append(
        _save(tmp_path, "a.ckpt", at=1, ranking=("a.ckpt",), features={"good": 1, "gone": 2})
    )
    outbox.close()
    store = MemoryStore()
    store.reject_feature("gone")
    report = flush_directory(tmp_path, progress=False, stores={"memory": store})
    assert report.remaining == []
    [event] = report.unannotated
    assert event.unannotated_features == ("gone",)
    stored = store.get("ckpts/a.ckpt")
    assert stored is not None and stored.feature_values == {"good": 1}


def test_a_superseded_replay_releases_its_staged_file(tmp_path: Path) -> None:
    """Two replayed saves of one key: the older, superseded before it started, releases its
    staged file; nothing is left under staged/ and the report names it dropped."""
    outbox = _journal(tmp_path)
    outbox.append(_save(tmp_path, "blocker.ckpt", at=1))
    first = _save(tmp_path, "last.ckpt", at=2)
    outbox.append(first)
    (tmp_path / "second").mkdir()
    second = _save(tmp_path / "second", "last.ckpt", at=3)
    outbox.append(second)
    outbox.close()
    store = MemoryStore()
    store.hang()  # the blocker's upload holds the only worker: last.ckpt's first save waits
    done: dict[str, Any] = {}
    flusher = threading.Thread(
        target=lambda: done.update(
            report=flush_directory(
                tmp_path, progress=False, max_workers=1, stores={"memory": store}
            )
        )
    )
    flusher.start()
    assert store.wait_until_hanging(1, timeout=30)
    store.release()
    flusher.join(timeout=60)
    report = done["report"]
    assert [r.key for r in report.dropped] == ["ckpts/last.ckpt"]
    assert report.dropped[0].staged_path == first.staged_path
    assert not Path(str(first.staged_path)).exists()
    assert not any((tmp_path / ".lamin-lightning" / "staged").rglob("*.ckpt"))
    assert store.get("ckpts/last.ckpt").sha256 is not None  # type: ignore[union-attr]


def test_flush_honours_its_timeout_while_submitting_and_reports_every_job(tmp_path: Path) -> None:
    """Storage hangs, more jobs than slots: flush returns near its timeout (submission
    included) and each job is either in the events, dropped, or still pending."""
    outbox = _journal(tmp_path)
    records = [_save(tmp_path, f"s{i}.ckpt", at=i) for i in range(8)]
    for record in records:
        outbox.append(record)
    outbox.close()
    store = MemoryStore()
    store.hang()
    started = time.monotonic()
    try:
        report = flush_directory(
            tmp_path, progress=False, timeout=1.0, max_workers=1, stores={"memory": store}
        )
    finally:
        store.release()
    assert time.monotonic() - started < 15  # not blocked behind the hanging uploads
    accounted = [e.key for e in report.events] + [r.key for r in report.dropped]
    accounted += [r.key for r in report.remaining]
    assert sorted(accounted) == sorted(r.key for r in records)
    assert len(report.remaining) == len(records)


# -- live training ------------------------------------------------------------------------------


def test_a_commit_that_exhausts_its_retries_leaves_no_orphan(tmp_path: Path) -> None:
    """The commit of last.ckpt's second save fails for good: the store is back to the first
    save (no second, uncommitted version lingers), and the failure is reported."""
    store = MemoryStore()
    observer = RecordingObserver()
    saved: list[int] = []

    class FailSecondCommit(MemoryCheckpoint):
        def commit_checkpoint_artifact(self, trainer: Any, snapshot: Any, artifact: Any) -> None:
            saved.append(artifact.version)
            if len(saved) == 2:
                raise ConnectionError("database went away")
            super().commit_checkpoint_artifact(trainer, snapshot, artifact)

    callback = FailSecondCommit(
        store,
        dirpath=tmp_path / "ckpt",
        filename="last",
        every_n_train_steps=1,
        save_top_k=-1,
        enable_version_counter=False,
        retry=RetryPolicy.no_delay(attempts=1),
        on_error="warn",
        max_workers=1,
        artifact_observers=[observer],
    )
    with pytest.warns(UserWarning, match="could not be persisted"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    kinds = [type(e) for e in observer.events if e.kind == "checkpoint"]
    assert kinds == [ArtifactSavedEvent, ArtifactFailedEvent]
    stored = store.get("ckpts/last.ckpt") or store.get("checkpoints/last.ckpt")
    assert stored is not None and stored.version == 1


def test_a_second_fit_under_a_new_prefix_leaves_the_first_prefixs_flags(tmp_path: Path) -> None:
    """One callback, two fits, two key prefixes: the first prefix's best/last/rank survive."""
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        key_prefix="run1",
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
    )
    make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(scores=[3, 1, 2]), loader(3))
    first = {k: v for k, v in _flags(store).items() if k.startswith("run1/")}
    assert any(best for best, _, _ in first.values())
    callback.key_prefix = "run2"
    make_trainer(tmp_path / "2", [callback], max_steps=3).fit(
        TinyModel(scores=[0.5, 0.3, 0.4]), loader(3)
    )
    assert {k: v for k, v in _flags(store).items() if k.startswith("run1/")} == first
    assert [k for k, (_, last, _) in _flags(store).items() if last and k.startswith("run2/")]


class _ExitingObserver(RecordingObserver):
    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        super().on_artifact_saved(event)
        if len(self.events) == 1:
            raise SystemExit("observer asked to exit")


def test_system_exit_in_an_observer_never_stops_the_pipeline(tmp_path: Path) -> None:
    """An observer raising SystemExit: every checkpoint still persists and is delivered, and
    the SystemExit reaches the training thread (fit raises it), nothing hangs."""
    store = MemoryStore()
    observer = _ExitingObserver()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        max_pending=1,
        flush_timeout=60,
        artifact_observers=[observer],
    )
    gate = threading.Event()

    class Gate(RecordingObserver):
        def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
            gate.set()

    callback.add_artifact_observer(Gate())
    with pytest.raises(SystemExit, match="observer asked to exit"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))
    assert gate.is_set()
    assert observer.events  # delivered before and after the SystemExit
    assert len(store.keys(kind="checkpoint")) == len(observer.events)
    assert callback._pipeline is None  # stopped cleanly: no thread left behind


def test_system_exit_in_a_save_hook_fails_the_job_not_the_pipeline(tmp_path: Path) -> None:
    """A save hook raising SystemExit: that job fails in its slot, the others persist, and
    the SystemExit is re-raised on the training thread after the pipeline flushed."""
    store = MemoryStore()
    observer = RecordingObserver()

    class ExitOnce(MemoryCheckpoint):
        calls = 0

        def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **kwargs: Any) -> Any:
            ExitOnce.calls += 1
            if ExitOnce.calls == 1:
                raise SystemExit("hook asked to exit")
            return super().save_checkpoint_artifact(trainer, filepath, **kwargs)

    callback = ExitOnce(
        store,
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        max_workers=1,
        on_error="warn",
        flush_timeout=60,
        artifact_observers=[observer],
    )
    with pytest.raises(SystemExit, match="hook asked to exit"):
        make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader(3))
    assert isinstance(observer.events[0], ArtifactFailedEvent)
    assert all(isinstance(e, ArtifactSavedEvent) for e in observer.events[1:])


def test_a_rerun_without_dirpath_finishes_the_previous_logger_versions_outbox(
    tmp_path: Path,
) -> None:
    """Without a dirpath each run checkpoints into a new logger version: the rerun replays
    what the previous version's outbox still holds, and that outbox ends empty."""
    from lightning.pytorch.loggers import CSVLogger

    store = MemoryStore()
    store.hang()
    first = MemoryCheckpoint(store, every_n_train_steps=1, save_top_k=-1, max_workers=1)

    stuck = threading.Event()

    def give_up(*_: Any) -> None:
        assert store.wait_until_hanging(1, timeout=30)
        first.flush_timeout = 0  # teardown gives up: the jobs stay journaled, as in a crash
        stuck.set()

    first.on_train_end = give_up  # type: ignore[method-assign]
    logger = CSVLogger(tmp_path, name="lg")
    with pytest.warns(UserWarning, match="did not finish"):
        make_trainer(tmp_path, [first], logger=logger, max_steps=3).fit(TinyModel(), loader(3))
    assert stuck.is_set()
    version_0 = tmp_path / "lg" / "version_0" / "checkpoints"
    kept = sorted(p.name for p in version_0.glob("*.ckpt"))
    assert len(kept) == 3
    assert list(staging_root(version_0).glob("outbox-*.jsonl"))
    store.release()

    second = MemoryCheckpoint(store, every_n_train_steps=1, save_top_k=-1)
    logger = CSVLogger(tmp_path, name="lg")
    make_trainer(tmp_path, [second], logger=logger, max_steps=1).fit(TinyModel(), loader(1))
    assert logger.version == 1
    stored = store.keys(kind="checkpoint")
    assert {f"checkpoints/{name}" for name in kept} <= stored
    assert not list(staging_root(version_0).glob("outbox-*.jsonl"))


def test_a_replayed_save_never_staged_persists_the_bytes_it_was_submitted_with(
    tmp_path: Path,
) -> None:
    """Killed before last.ckpt was staged: at the next setup the replay stages the local file
    at once, so the new run's rewrite of last.ckpt (before the replay's upload reads it)
    changes neither what the replay persists nor whether it persists."""
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    outbox = Outbox(staging_root(dirpath) / "outbox-earlier.jsonl")
    outbox.open()
    record = _save(dirpath, "last.ckpt", at=1, staged=False)
    old = sha256_file(dirpath / "last.ckpt")
    outbox.append(record)
    outbox.close()

    store = MemoryStore()
    store.hang()  # the replay's upload waits until training has rewritten last.ckpt
    observer = RecordingObserver()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=1,
        enable_version_counter=False,  # rewrite last.ckpt, as a resumed run does
        artifact_observers=[observer],
    )
    rewritten: list[bool] = []

    class ReleaseAfterRewrite(pl.Callback):
        def on_train_end(self, *args: Any) -> None:
            rewritten.append(sha256_file(dirpath / "last.ckpt") != old)
            store.release()

    make_trainer(tmp_path, [callback, ReleaseAfterRewrite()], max_steps=1).fit(
        TinyModel(), loader(1)
    )
    assert rewritten == [True]  # before the replay's upload could read it
    replayed = [e for e in observer.events if e.recovered]
    assert [type(e).__name__ for e in replayed] == ["ArtifactSavedEvent"]
    assert replayed[0].artifact.sha256 == old


def test_a_scores_float_is_read_once_per_score_object_not_at_every_save() -> None:
    """Lightning keeps the same score tensors in ``best_k_models`` from save to save; each
    ``item()`` of a CUDA tensor waits for the device. The snapshot reads each score once."""

    class Score:
        def __init__(self, value: float) -> None:
            self.value, self.reads = value, 0

        def item(self) -> float:
            self.reads += 1
            return self.value

    callback = MemoryCheckpoint(MemoryStore(), monitor="score", save_top_k=3)
    scores = [Score(float(n)) for n in range(3)]
    callback.best_k_models = {f"/c/{n}.ckpt": s for n, s in enumerate(scores)}
    for _ in range(5):
        assert [callback._score(s) for s in scores] == [0.0, 1.0, 2.0]
    assert [s.reads for s in scores] == [1, 1, 1]
    # A new object under a known value is read (an id can be reused once one is freed).
    fresh = Score(7.0)
    assert callback._score(fresh) == 7.0 and fresh.reads == 1
    # What Lightning no longer holds is forgotten: the memo stays small.
    for n in range(200):
        callback._score(Score(float(n)))
    assert len(callback._score_floats) <= 66


class _UnreadableError(Exception):
    """An exception whose message cannot be read (its ``__str__`` raises)."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ raised")


def test_a_save_hook_raising_an_error_whose_message_raises_fails_that_save_only(
    tmp_path: Path,
) -> None:
    """A user's save hook raised an exception whose ``__str__`` raises: building our report
    of it raised in turn, out of the worker's task, which stopped the pipeline; the job,
    left with neither artifact nor error, was marked saved in the outbox, and its file was
    never persisted (and teardown waited for its whole flush_timeout). Now that save fails,
    as any failing hook's does, the others persist, and a later flush persists it too."""
    raised: list[str] = []

    class Raising(MemoryCheckpoint):
        def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **kwargs: Any) -> Any:
            # By name (the staged copy keeps it), not by call order: two workers may
            # start the second and third saves in either order.
            if Path(filepath).name == "epoch=0-step=2.ckpt" and not raised:
                raised.append(str(filepath))
                raise _UnreadableError()
            return super().save_checkpoint_artifact(trainer, filepath, **kwargs)

    store = MemoryStore()
    dirpath = tmp_path / "ckpts"
    callback = Raising(
        store,
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        retry=RetryPolicy.no_delay(),
        flush_timeout=60,
        on_error="warn",  # every save happens (raised, it would stop the fit at any save)
        artifact_observers=[observer := RecordingObserver()],
    )
    with pytest.warns(UserWarning, match="_UnreadableError whose message raised RuntimeError"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))

    failed = [e.key for e in observer.events if isinstance(e, ArtifactFailedEvent)]
    assert failed == ["checkpoints/epoch=0-step=2.ckpt"]
    stats = callback.persistence_stats
    assert (stats.submitted, stats.saved, stats.failed, stats.pending) == (4, 3, 1, 0)
    report = flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert report.failed == 0 and not report.remaining
    names = sorted(p.name for p in dirpath.glob("*.ckpt"))
    assert store.keys() == {f"checkpoints/{n}" for n in names} and len(names) == 4


def test_an_eviction_whose_file_its_preparation_kept_keeps_its_artifact(tmp_path: Path) -> None:
    """A live removal that waits for its replacement's background write: its preparation
    (on the intake thread) found the replacement not written and kept the evicted file;
    the replacement was written before the commit. The commit asked again and removed the
    artifact, leaving a file with none (seen once under load: AsyncCheckpointIO finishing
    a write as a fit ended on an exception). The decision is the preparation's."""
    from lamin_lightning._jobs import JobRecord
    from lamin_lightning._replay import build_job

    evicted = tmp_path / "epoch=0-step=1.ckpt"
    evicted.write_bytes(b"kept")
    replacement = tmp_path / "epoch=0-step=2.ckpt"
    removed: list[str] = []

    class Store:  # only what a removal's commit asks of a store
        def remove(self, record: Any, known: Any) -> None:
            removed.append(record.key)

    record = JobRecord(
        op="remove",
        kind="checkpoint",
        key="checkpoints/epoch=0-step=1.ckpt",
        local_path=str(evicted),
        after=str(replacement),
    )
    settled: list[str] = []
    spec = build_job(record, Store(), settle=settled.append)  # type: ignore[arg-type]
    # The preparation ran while the replacement was not written: the file stays.
    replacement.write_bytes(b"written since")
    assert spec.commit(None) is None
    assert removed == [] and settled == ["kept"]
    assert evicted.exists()

    # Moved out by its preparation (the replacement was there): the removal goes on.
    evicted.unlink()
    spec = build_job(record, Store(), settle=settled.append)  # type: ignore[arg-type]
    event = spec.commit(None)
    assert removed == [record.key] and settled == ["kept", "removed"]
    assert event is not None and event.key == record.key


def test_an_hparams_hook_that_persisted_nothing_is_called_again_at_the_next_save(
    tmp_path: Path,
) -> None:
    """As the reference does: an override of ``save_hparams_artifact`` that returns None
    is called again at the next checkpoint, until it returns an artifact; then never."""
    from lightning.pytorch.loggers import CSVLogger

    calls: list[str] = []

    class Picky(MemoryCheckpoint):
        def save_hparams_artifact(self, trainer: pl.Trainer, hparams_path: Any) -> Any:
            calls.append(Path(hparams_path).name)
            if len(calls) < 3:
                return None
            return super().save_hparams_artifact(trainer, hparams_path)

    store = MemoryStore()
    callback = Picky(store, every_n_train_steps=1, save_top_k=-1)

    class Flushing(TinyModel):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.1})  # the logger writes hparams.yaml

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            callback.flush()  # each save sees what the hook did at the one before

    logger = CSVLogger(tmp_path, name="lg")
    make_trainer(tmp_path, [callback], logger=logger, max_steps=5).fit(Flushing(), loader(5))
    assert calls == ["hparams.yaml"] * 3
    assert len(store.keys(kind="hparams")) == 1
    assert len(store.keys(kind="checkpoint")) == 5


def test_a_save_that_replaces_older_artifacts_is_settled_only_once_they_are_deleted(
    tmp_path: Path,
) -> None:
    """A store that deletes a key's older artifacts once the earlier events were delivered,
    before the save's own (LaminDB's ``delete_replaced``): the save's job is settled only
    after that, so a crash in between leaves it to replay (whose commit replaces the older
    ones again), never two artifacts of one key with nothing left to fix them."""
    from lamin_lightning._jobs import JobRecord
    from lamin_lightning._replay import build_job

    local = tmp_path / "last.ckpt"
    local.write_bytes(b"the newer last.ckpt")
    calls: list[str] = []

    class Store:  # what a save's job asks of a store that deletes after delivery
        def transfer(self, record: Any, path: Path) -> str:
            return "artifact"

        def commit(self, record: Any, artifact: Any, **kwargs: Any) -> tuple[str, ...]:
            calls.append(f"commit defer={kwargs.get('defer_replaced')}")
            return ()

        def storage_uri(self, artifact: Any) -> str:
            return "memory://artifact"

        def delete_replaced(self, artifact: Any) -> None:
            calls.append(f"delete_replaced {artifact}")

    record = JobRecord(op="save", kind="config", key="checkpoints/last.ckpt", local_path=str(local))
    settled: list[str] = []
    spec = build_job(record, Store(), settle=settled.append)  # type: ignore[arg-type]
    assert spec.transfer is not None and spec.before_delivery is not None
    event = spec.commit(spec.transfer())
    assert event is not None and event.artifact == "artifact"
    assert calls == ["commit defer=True"]
    assert settled == []  # a crash now replays the save
    spec.before_delivery()
    assert calls == ["commit defer=True", "delete_replaced artifact"]
    assert settled == ["saved"]


def test_a_removal_whose_deletion_fails_after_its_event_leaves_earlier_failures_standing(
    tmp_path: Path,
) -> None:
    """LaminDB's removal tells its removed event, then deletes. If that deletion then
    fails for good (a failed event for the removal follows), the removal settled nothing:
    an earlier failed save of the key still stays in the outbox, and its report must not
    call it moot ("its key was removed since")."""
    from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent
    from lamin_lightning._jobs import JobRecord

    callback = MemoryCheckpoint(MemoryStore(), dirpath=tmp_path / "ckpt")
    key = "checkpoints/epoch=0-step=1.ckpt"
    local = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    save = JobRecord(op="save", kind="checkpoint", key=key, local_path=str(local))
    removal = JobRecord(op="remove", kind="checkpoint", key=key, local_path=str(local))
    common = {"kind": "checkpoint", "key": key, "local_path": local, "trainer": None}

    callback._on_outcome(save, ArtifactFailedEvent(**common, error=OSError("x"), attempts=1))
    callback._on_outcome(removal, ArtifactRemovedEvent(**common))
    failures, replaced = callback._take_failures_and_replaced()
    assert len(failures) == 1 and replaced == {0: "remove"}  # the removal settled it

    callback._on_outcome(save, ArtifactFailedEvent(**common, error=OSError("x"), attempts=1))
    callback._on_outcome(removal, ArtifactRemovedEvent(**common))
    callback._on_outcome(
        removal,
        ArtifactFailedEvent(**common, error=OSError("y"), attempts=3, operation="remove"),
    )
    failures, replaced = callback._take_failures_and_replaced()
    assert [f.operation for f in failures] == ["save", "remove"]
    assert replaced == {}  # the deletion failed: the failed save still counts


def test_an_override_raising_after_super_stored_its_file_is_warned_with_on_error_warn(
    tmp_path: Path,
) -> None:
    """A MemoryCheckpoint subclass whose ``save_checkpoint_artifact`` raises after its
    ``super()`` call stored the file: the job is committed (saved event, nothing failed,
    nothing left in the outbox), and with ``on_error="warn"`` the override's own error is
    warned, not raised. Before, the job failed: a failed event and a PersistenceError
    warning "could not be persisted" for a file the store held."""
    store = MemoryStore()
    observer = RecordingObserver()

    class RaisesAfterSuper(MemoryCheckpoint):
        def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **kwargs: Any) -> Any:
            artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
            if str(filepath).endswith("step=1.ckpt"):
                raise RuntimeError("registry refused it")
            return artifact

    callback = RaisesAfterSuper(
        store,
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        on_error="warn",
        artifact_observers=[observer],
    )
    with pytest.warns(UserWarning, match="RuntimeError: registry refused it") as caught:
        make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    assert not [w for w in caught if "could not be persisted" in str(w.message)]
    assert store.keys("checkpoint") == {
        "checkpoints/epoch=0-step=1.ckpt",
        "checkpoints/epoch=0-step=2.ckpt",
    }
    assert [type(e).__name__ for e in observer.events] == ["ArtifactSavedEvent"] * 2
    assert callback.persistence_stats.failed == 0
    assert callback.pending_artifacts() == []


class _FailsStep1(MemoryCheckpoint):
    """Storage refuses the checkpoint of step 1 for good (the others persist)."""

    def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **kwargs: Any) -> Any:
        if str(filepath).endswith("step=1.ckpt"):
            raise PermanentError("storage refused it")
        return super().save_checkpoint_artifact(trainer, filepath, **kwargs)


class _WaitsAtStep1(TinyModel):
    """Training step 1 (after the save of step 1) waits for ``event``."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 1:
            assert self.event.wait(60)
        return super().training_step(batch, batch_idx)


def test_a_stop_an_observer_asks_for_when_told_of_a_failure_ends_the_fit_as_asked(
    tmp_path: Path,
) -> None:
    """An observer whose ``on_artifact_failed`` raises ``SystemExit(3)`` (abort the job when
    a checkpoint cannot be persisted): the fit ends with that SystemExit, not with the
    PersistenceError of the same failure. The failure is recorded for the training thread
    before its event reaches the observers, so the next save raised PersistenceError
    while the observer's stop was still on its way, and the stop was dropped."""
    failure_told = threading.Event()  # the observer has the failure event
    next_save = threading.Event()  # training is at the next save

    class Aborts:
        def on_artifact_failed(self, event: ArtifactFailedEvent) -> None:
            failure_told.set()
            next_save.wait(60)
            raise SystemExit(3)

    class AtTheNextSave(logging.Handler):
        # The save about to report the failure says it waits for the failure's event
        # (before, it raised PersistenceError at once: the observer went on only when
        # Lightning handled that error).
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for the failure event" in record.getMessage():
                next_save.set()

    class OnException(pl.Callback):
        def on_exception(self, *args: Any) -> None:
            next_save.set()

    callback = _FailsStep1(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        artifact_observers=[Aborts()],
    )
    trainer = make_trainer(tmp_path, [callback, OnException()], max_steps=3)
    logger = logging.getLogger("lamin_lightning")
    handler, level = AtTheNextSave(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(SystemExit) as raised:
            trainer.fit(_WaitsAtStep1(failure_told), loader(3))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert raised.value.code == 3


def test_a_failure_a_save_sees_before_its_delivery_is_awaited_is_still_awaited(
    tmp_path: Path,
) -> None:
    """The committer recorded a failure for the training thread, then the event that says
    when its delivery is done: a save that looked in between (the committer thread
    preempted there) found no delivery to wait for and raised the failure's
    PersistenceError at once; the stop its observer asked for (``SystemExit(3)`` in
    ``on_artifact_failed``) was then dropped. The wait is there before the failure is."""
    appended = threading.Event()  # the failure is recorded, its wait not yet (before)
    looked = threading.Event()  # the save looked for the failure's delivery

    class Racing(list):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            super().append(item)
            if not appended.is_set():
                appended.set()
                assert looked.wait(60)

    class Looked(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            found = super().get(key, default)
            looked.set()
            return found

    class Aborts:
        def on_artifact_failed(self, event: ArtifactFailedEvent) -> None:
            raise SystemExit(3)

    callback = _FailsStep1(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        artifact_observers=[Aborts()],
    )
    callback._unreported_failures = Racing()
    callback._failures_delivered = Looked()
    with pytest.raises(SystemExit) as raised:
        make_trainer(tmp_path, [callback], max_steps=3).fit(_WaitsAtStep1(appended), loader(3))
    assert raised.value.code == 3


def test_with_on_error_warn_a_save_does_not_wait_for_a_failure_to_be_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_error="warn"``: a save that warns of a failure waited (up to 5 s) for the
    failure's event to reach the observers, so that a stop one asks for comes ahead of a
    PersistenceError that warn mode never raises; with storage down and an observer that
    takes its time (a message sent per failure), every save of a run told to go on was
    held for it. The stop an observer asks for (``SystemExit(3)``) is raised at a later
    save or at teardown all the same."""
    told = threading.Event()  # the observer has the failure of step 1
    passed = threading.Event()  # the save of step 2 returned

    class SlowThenAborts:
        def on_artifact_failed(self, event: ArtifactFailedEvent) -> None:
            told.set()
            passed.wait(60)
            raise SystemExit(3)

    class AfterTheSave(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 2:  # the save of step 2 returned
                passed.set()

        def on_exception(self, *args: Any) -> None:
            passed.set()

    callback = _FailsStep1(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        on_error="warn",
        artifact_observers=[SlowThenAborts()],
    )
    caplog.set_level(logging.DEBUG, logger="lamin_lightning")
    with pytest.warns(UserWarning, match="storage refused it"), pytest.raises(SystemExit) as raised:
        make_trainer(tmp_path, [callback, AfterTheSave()], max_steps=4).fit(
            _WaitsAtStep1(told), loader(4)
        )
    assert raised.value.code == 3
    assert "waiting for the failure event" not in caplog.text


def test_a_failed_removal_is_reported_as_an_artifact_left_in_the_store_not_as_a_file_kept(
    tmp_path: Path,
) -> None:
    """A top-k eviction whose artifact the store refused to delete was reported as
    "1 checkpoint artifact(s) could not be persisted; the local files are kept": neither
    holds for a removal (its file is gone, Lightning deleted it; what failed is the
    artifact's deletion, and the artifact is still stored). A save failing beside it is
    still reported as one."""

    class RefusesDeletes(MemoryStore):
        def delete(self, key: str) -> Any:
            raise PermanentError("the store refused the deletion")

    store = RefusesDeletes()
    callback = MemoryCheckpoint(
        store, dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1
    )
    model = TinyModel()
    with pytest.raises(PersistenceError) as raised:
        make_trainer(tmp_path, [callback], max_steps=3).fit(model, loader(3))
    message = str(raised.value)
    assert {f.operation for f in raised.value.failures} == {"remove"}
    assert "artifact(s) could not be deleted from the store" in message
    assert "could not be persisted" not in message
    assert "kept" not in message.split(":\n")[0]
    # The evicted checkpoints' artifacts are still stored; the files are gone.
    evicted = [f.key for f in raised.value.failures]
    assert evicted and all(store.get(key) is not None for key in evicted)
    assert not any((tmp_path / "ckpt" / key.rsplit("/", 1)[-1]).exists() for key in evicted)

    mixed = PersistenceError([*raised.value.failures[:1], _failed_save(tmp_path)])
    head = str(mixed).split(":\n")[0]
    assert "1 checkpoint artifact(s) could not be persisted" in head
    assert "1 evicted checkpoint artifact(s) could not be deleted" in head
    assert "local files are kept" in head


def _failed_save(tmp_path: Path) -> ArtifactFailedEvent:
    written = tmp_path / "written.ckpt"
    written.write_bytes(b"x")
    return ArtifactFailedEvent(
        "checkpoint",
        "checkpoints/written.ckpt",
        written,
        None,
        error=OSError("no route"),
        attempts=3,
    )


def test_several_failed_removals_are_counted_in_a_first_line_that_reads_right(
    tmp_path: Path,
) -> None:
    """Two failed removals read "2 evicted checkpoint's artifact(s) could not be deleted
    from the store" (one checkpoint's, two artifacts): the count is of artifacts of
    evicted checkpoints, as the saves' part counts checkpoint artifacts."""
    removals = [
        ArtifactFailedEvent(
            "checkpoint",
            f"checkpoints/step={step}.ckpt",
            str(tmp_path / f"step={step}.ckpt"),
            None,
            error=PermanentError("the store refused the deletion"),
            attempts=1,
            operation="remove",
        )
        for step in (1, 2)
    ]
    head = str(PersistenceError(removals)).split(":\n")[0]
    assert head == "2 evicted checkpoint artifact(s) could not be deleted from the store"
    mixed = str(PersistenceError([removals[0], _failed_save(tmp_path)])).split(":\n")[0]
    assert mixed == (
        "1 checkpoint artifact(s) could not be persisted; 1 evicted checkpoint artifact(s)"
        " could not be deleted from the store; the local files are kept"
    )


def test_a_journal_both_callbacks_of_the_next_logger_version_may_replay_is_replayed_once_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The logger's ``version_0`` holds a journal of no callback of the rerun (one the user
    dropped, or whose monitor changed). Two callbacks with ``dirpath=None`` checkpoint into
    ``version_1`` and both look at ``version_0``: the first set up replays the journal, once;
    the second finds it held by this very process and says nothing (before, it warned that
    another process held it and told the user to run ``lamin-lightning flush`` later)."""
    from lightning.pytorch.loggers import CSVLogger

    from helpers import journal_a_save
    from lamin_lightning._journal import read_pending

    version_0 = tmp_path / "lg" / "version_0" / "checkpoints"
    version_0.mkdir(parents=True)
    local = version_0 / "dropped.ckpt"
    local.write_bytes(b"an earlier run's checkpoint")
    journal = staging_root(version_0) / "outbox-dropped.jsonl"
    journal.parent.mkdir()
    journal_a_save(journal, local, store="memory", key="lg/version_0/dropped.ckpt")

    store = MemoryStore()
    callbacks = [
        MemoryCheckpoint(store, monitor="score", every_n_train_steps=1),
        MemoryCheckpoint(store, every_n_epochs=1),
    ]
    logger = CSVLogger(tmp_path, name="lg")
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        make_trainer(tmp_path, callbacks, logger=logger, max_steps=1).fit(TinyModel(), loader(1))
    assert logger.version == 1
    stored = store.get("lg/version_0/dropped.ckpt")
    assert stored is not None and stored.version == 1  # replayed once
    assert stored.sha256 == sha256_file(local)
    assert not journal.exists() or read_pending(journal) == []
    assert not [r for r in caplog.records if "another process still holds" in r.getMessage()]


def test_ctrl_c_right_as_a_replay_waits_for_a_name_leaves_the_names_lock_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl+C lands right after ``threading.Condition.__enter__`` (Python code) took the
    lock of the names being written, on the training thread waiting for a background
    write before a replay (setup, a flush in the process): the ``with`` block never ran,
    so its exit never released the lock, and every later save, write and flush of the
    process hung on it. The lock is now taken as a plain lock."""
    from lamin_lightning import _names

    ctrl_c_right_after_entering(
        monkeypatch, _names._names_released, lambda: _names.wait_until_written(["some.ckpt"], 0)
    )
    assert returns_on_another_thread(lambda: _names.take_name("other.ckpt")), (
        "the names' lock stayed taken"
    )
    _names.release_name("other.ckpt")
