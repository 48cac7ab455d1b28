"""is_best_model / is_last_model / model_rank / score and top-k eviction on a real instance.

The fits here do not flush between steps: saves, evictions and the ``last.ckpt``
rewrites overlap in the background (``max_workers=2``), and the flags must still
end as Lightning's final state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from lamindb_tier import TierModel, artifact_features, artifacts_under, fit, single, storage_file

import lamin_lightning as ll
from lamin_lightning import ArtifactSavedEvent, CheckpointSnapshot
from lamin_lightning._lamin_features import discover_auto
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

# Score seen by the checkpoint after step n (n = 1..10): up and down, all distinct.
UP_AND_DOWN = [5.0, 3.0, 4.0, 1.0, 6.0, 2.0, 7.0, 0.5, 8.0, 2.5]


@pytest.mark.parametrize("filename", ["sub/{step}", "{step}-{val/score:.1f}"])
def test_save_last_beside_top_k_checkpoints_in_a_subfolder(
    ln: Any, no_run: None, tmp_path: Path, filename: str
) -> None:
    """A "/" in the file name (a subfolder, or a metric's name) puts the top-k checkpoints
    in a folder below last.ckpt's. Every save persists, evictions included, and the
    flags stay right: is_last_model on last.ckpt only, is_best_model on the best one.
    Ours failed the save of last.ckpt (FOREIGN KEY) once an eviction in the subfolder
    left its artifact known to the folder above."""

    class Logged(TierModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("val/score", float(self.scores[self.global_step % len(self.scores)]))
            return loss

    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        filename=filename,
        monitor="score",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=1,
    )
    fit(callback, tmp_path, steps=4, model=Logged(scores=[3, 1, 4, 2]))
    assert callback.persistence_stats.failed == 0
    dirpath = Path(callback.dirpath)
    files = {p.relative_to(dirpath).as_posix() for p in dirpath.rglob("*.ckpt")}
    prefix = callback.checkpoint_key_prefix
    stored = {
        key.removeprefix(prefix + "/"): artifact
        for key, artifact in artifacts_under(ln, prefix).items()
        if key.endswith(".ckpt")
    }
    assert set(stored) == files and len(files) == 3
    flags = {name: single(artifact_features(ln, a)) for name, a in stored.items()}
    assert [n for n, f in flags.items() if f.get("is_last_model")] == ["last.ckpt"]
    best = Path(callback.best_model_path).relative_to(dirpath).as_posix()
    assert [n for n, f in flags.items() if f.get("is_best_model")] == [best]


def test_flags_read_before_another_writer_deleted_an_artifact_are_read_again(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """The store reads the flags under a prefix once, then keeps them up to date itself.
    Another callback in the folder (or another process) that replaces or deletes one of
    those artifacts makes that stale: the next commit wrote a flag for a deleted artifact
    and failed (FOREIGN KEY), intermittently, with two callbacks in one folder. The
    flags are now read again and written once more."""
    import uuid

    from lamin_lightning._jobs import JobRecord
    from lamin_lightning._lamin_store import LaminStore

    ll.save_lightning_features()
    prefix = f"stale-{uuid.uuid4().hex[:8]}/checkpoints"
    store = LaminStore()

    def commit(name: str, ranking: tuple[str, ...]) -> Any:
        path = tmp_path / name
        path.write_bytes(name.encode() * 64)
        key = f"{prefix}/{name}"
        snapshot = CheckpointSnapshot(
            key=key,
            local_path=path,
            staged_path=path,
            global_step=1,
            epoch=0,
            monitor="score",
            mode="min",
            save_weights_only=False,
            score=1.0,
            is_best=ranking[0] == key,
            best_key=ranking[0],
            last_key=key,
            ranking=ranking,
            scores=dict.fromkeys(ranking, 1.0),
        )
        record = JobRecord(
            op="save", kind="checkpoint", key=key, local_path=str(path), checkpoint=snapshot
        )
        artifact = store.transfer(record, path)
        store.commit(record, artifact, replay=False, set_flags=True)
        return artifact

    first = commit("a.ckpt", (f"{prefix}/a.ckpt",))
    other = commit("b.ckpt", (f"{prefix}/a.ckpt", f"{prefix}/b.ckpt"))
    # Another writer replaces b.ckpt (a new version, the old one deleted).
    ln.Artifact.objects.filter(id=other.id).first().delete(permanent=True)
    replaced = ln.Artifact(
        tmp_path / "b.ckpt", key=f"{prefix}/b.ckpt", kind="model", skip_hash_lookup=True
    ).save()

    last = commit("c.ckpt", (f"{prefix}/c.ckpt", f"{prefix}/a.ckpt"))

    flags = {
        a.key.rsplit("/", 1)[1]: single(artifact_features(ln, a)) for a in (first, replaced, last)
    }
    assert flags["c.ckpt"]["is_last_model"] is True and flags["c.ckpt"]["is_best_model"] is True
    assert flags["a.ckpt"]["is_last_model"] is False and flags["a.ckpt"]["model_rank"] == 1
    assert flags["b.ckpt"].get("is_last_model") is not True


def _job(key: str, path: Path, op: str = "save") -> Any:
    """A live job record of ``key`` for ``path`` (a save: the newest, flagged last)."""
    from lamin_lightning._jobs import JobRecord

    snapshot = CheckpointSnapshot(
        key=key,
        local_path=path,
        staged_path=path,
        global_step=1,
        epoch=0,
        monitor=None,
        mode="min",
        save_weights_only=False,
        score=None,
        is_best=False,
        best_key=None,
        last_key=key,
        ranking=(),
        scores={},
    )
    return JobRecord(
        op=op,  # type: ignore[arg-type]
        kind="checkpoint",
        key=key,
        local_path=str(path),
        checkpoint=snapshot if op == "save" else None,
    )


def test_a_failed_commit_of_a_reused_artifact_leaves_the_committed_one(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A save of the same key and bytes as the committed artifact reuses it (a seeded
    rerun). Its commit cleared the mark "committed before" on its first attempt: a
    commit that then failed for good had the artifact abandoned, that is deleted, and
    the key was left with none."""
    import uuid

    from lamin_lightning._lamin_store import LaminStore

    ll.save_lightning_features()
    key = f"reused-{uuid.uuid4().hex[:8]}/checkpoints/last.ckpt"
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"the same seeded bytes" * 64)
    store = LaminStore()

    first = _job(key, path)
    committed = store.transfer(first, path)
    store.commit(first, committed, replay=False, set_flags=True)
    again = _job(key, path)
    reused = store.transfer(again, path)
    assert reused.id == committed.id

    def refuse(*args: Any) -> None:
        raise RuntimeError("the flags could not be written")

    store._write_flags = refuse  # type: ignore[method-assign]
    for _ in range(2):  # tried, then tried again
        with pytest.raises(RuntimeError):
            store.commit(again, reused, replay=False, set_flags=True)
    store.abandon(again, reused)  # what the pipeline does once the commit failed for good

    assert list(ln.Artifact.filter(key=key).values_list("id", flat=True)) == [committed.id]


@pytest.mark.parametrize("publisher", ["ours", "users"])
def test_a_replay_reusing_the_committed_artifact_spares_a_later_save_of_its_key_in_flight(
    ln: Any, no_run: None, tmp_path: Path, publisher: str
) -> None:
    """A replay of a save committed before a crash (not marked finished) reuses the
    committed artifact, and its commit replaces every other committed artifact of the key,
    newer rows included. A live save of the same key (the resumed fit's ``last.ckpt``)
    uploaded meanwhile is not committed yet and must survive it: with a publisher of the
    user's (its saves were not tracked as in flight) it was deleted, and its own commit
    then failed (FOREIGN KEY constraint failed)."""
    import uuid

    from lamin_lightning._lamin import LaminArtifactPublisher
    from lamin_lightning._lamin_store import LaminStore

    class UsersPublisher(LaminArtifactPublisher):
        pass

    ll.save_lightning_features()
    mine = UsersPublisher()
    store = LaminStore(publisher=(lambda: mine) if publisher == "users" else None)
    key = f"replayed-{uuid.uuid4().hex[:8]}/checkpoints/last.ckpt"
    before, after = tmp_path / "before.ckpt", tmp_path / "after.ckpt"
    before.write_bytes(b"committed before the crash" * 64)
    after.write_bytes(b"saved by the resumed fit" * 64)

    crashed = _job(key, before)
    committed = store.transfer(crashed, before)
    store.commit(crashed, committed, replay=False, set_flags=True)

    live = _job(key, after)
    uploaded = store.transfer(live, after)  # a worker of the resumed fit, ahead of the replay
    replayed = store.transfer(crashed, before)
    assert replayed.id == committed.id
    store.commit(crashed, replayed, replay=True, set_flags=True)
    assert ln.Artifact.filter(id=uploaded.id).exists(), "the save in flight was deleted"

    store.commit(live, uploaded, replay=False, set_flags=True)
    assert list(ln.Artifact.filter(key=key).values_list("id", flat=True)) == [uploaded.id]


def test_a_removal_told_before_it_deletes_spares_what_a_later_save_of_its_key_committed(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A removal finds its artifact, its event is delivered, and only then does it
    delete (observers are told while the artifact exists). A save of the same key and
    bytes committed in between reuses that very artifact: the removal must not delete
    what is now the later save's; one with other bytes leaves its own artifact alone."""
    import uuid

    from lamin_lightning._lamin_store import LaminStore

    ll.save_lightning_features()
    store = LaminStore()

    for same_bytes in (True, False):
        key = f"removal-{uuid.uuid4().hex[:8]}/checkpoints/epoch=0-step=1.ckpt"
        path = tmp_path / f"{same_bytes}.ckpt"
        path.write_bytes(b"seeded" * 64)
        saved = _job(key, path)
        first = store.transfer(saved, path)
        store.commit(saved, first, replay=False, set_flags=True)

        removal = store.find_removal(_job(key, path, "remove"), first)
        assert removal is not None and removal.named[0].id == first.id
        assert ln.Artifact.filter(id=first.id).exists()  # not deleted before delivery

        if not same_bytes:
            path.write_bytes(b"other" * 64)
        again = _job(key, path)
        later = store.transfer(again, path)
        assert (later.id == first.id) is same_bytes
        store.commit(again, later, replay=False, set_flags=True)
        store.delete_removal(removal)
        assert list(ln.Artifact.filter(key=key).values_list("id", flat=True)) == [later.id]

        # The later save's flags stay known: the next save in the folder clears its
        # is_last_model (forgotten, it kept it, and the folder had two last models).
        key2 = key.replace("step=1", "step=2")
        path2 = tmp_path / f"{same_bytes}-2.ckpt"
        path2.write_bytes(b"next" * 64)
        following = _job(key2, path2)
        store.commit(following, store.transfer(following, path2), replay=False, set_flags=True)
        last = {
            a.key: single(artifact_features(ln, a)).get("is_last_model")
            for a in ln.Artifact.filter(key__in=[key, key2])
        }
        assert last == {key: False, key2: True}


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
def test_the_same_training_run_again_in_its_folder_persists_every_save(
    ln: Any, no_run: None, tmp_path: Path, async_write: bool
) -> None:
    """A seeded run, repeated in its folder with a new callback, saves the same bytes under
    the same key again (``filename="model"``, no version counter): a worker finds the
    committed artifact of that content to reuse while the committer deletes it as an
    older version. Fits failed intermittently (4 of 15: DoesNotExist, FOREIGN KEY) where
    ModelCheckpoint never fails. Three runs of three fits, each must persist every save."""
    import lightning.pytorch as pl

    dirpath = tmp_path / "ckpts"
    for run in range(3):
        folder = dirpath / str(run)
        for _ in range(3):
            pl.seed_everything(0, verbose=False)
            callback = ll.Checkpoint(
                dirpath=folder,
                filename="model",
                save_top_k=-1,
                enable_version_counter=False,
                every_n_train_steps=1,
                async_write=async_write,
            )
            fit(callback, tmp_path, steps=3, model=TierModel(scores=[3.0, 2.0, 1.0]))
            assert callback.persistence_stats.failed == 0
        stored = artifacts_under(ln, callback.checkpoint_key_prefix)
        assert list(stored) == [f"{callback.checkpoint_key_prefix}/model.ckpt"]
        assert (
            storage_file(stored[f"{callback.checkpoint_key_prefix}/model.ckpt"]).read_bytes()
            == (folder / "model.ckpt").read_bytes()
        )


@pytest.mark.parametrize("mode", ["min", "max"])
def test_flags_ranks_and_kept_set_equal_lightning_state(
    mode: str, ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Flags, ranks, scores and kept set equal Lightning's final state; evicted are deleted."""
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode=mode,  # type: ignore[arg-type]
        save_top_k=3,
        every_n_train_steps=1,
        save_last=True,
        max_workers=2,
        artifact_observers=[observer],
    )
    trainer = fit(callback, tmp_path, steps=len(UP_AND_DOWN), model=TierModel(scores=UP_AND_DOWN))
    assert callback.persistence_stats.failed == 0

    def key(path: str) -> str:
        return callback.resolve_artifact_key(trainer, path, "checkpoint")

    prefix = callback.checkpoint_key_prefix
    stored = artifacts_under(ln, prefix)
    kept = {key(p) for p in callback.best_k_models} | {key(callback.last_model_path)}
    assert set(stored) == kept
    assert len(callback.best_k_models) == 3

    values = {k: single(artifact_features(ln, a)) for k, a in stored.items()}
    best = [k for k, v in values.items() if v["is_best_model"] is True]
    assert best == [key(callback.best_model_path)]
    last = [k for k, v in values.items() if v["is_last_model"] is True]
    assert last == [key(callback.last_model_path)] == [f"{prefix}/last.ckpt"]

    ranked = sorted(
        callback.best_k_models.items(), key=lambda item: float(item[1]), reverse=mode == "max"
    )
    for rank, (path, score) in enumerate(ranked):
        assert values[key(path)]["model_rank"] == rank
        assert values[key(path)]["score"] == pytest.approx(float(score))
    # last.ckpt: Lightning's current_score at its save, which (as in the reference) is the
    # score of the latest top-k save, not the last step's; no rank (it is not in top-k).
    assert values[f"{prefix}/last.ckpt"]["score"] == pytest.approx(float(callback.current_score))
    assert float(callback.current_score) != UP_AND_DOWN[-1]
    assert "model_rank" not in values[f"{prefix}/last.ckpt"]

    # Every file persisted and later evicted is gone: record and stored bytes.
    evicted = {e.key: e.storage_uri for e in observer.of_type(ArtifactSavedEvent)}
    evicted = {k: uri for k, uri in evicted.items() if k not in kept}
    assert evicted, "the sequence should have persisted checkpoints that were later evicted"
    for evicted_key, uri in evicted.items():
        assert not ln.Artifact.filter(key=evicted_key).exists()
        assert not storage_file(uri).exists()


def _commit_queries(
    callback: ll.Checkpoint, trainer: Any, ln: Any, tmp_path: Path, name: str, score: float
) -> int:
    """Save one checkpoint via the callback's hooks on this thread; count commit's queries."""
    path = tmp_path / "extra" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(name.encode() * 64)
    key = callback.resolve_artifact_key(trainer, path, "checkpoint")
    prefix = callback.checkpoint_key_prefix
    scores = dict(
        ln.models.ArtifactJsonValue.filter(
            artifact__key__startswith=prefix + "/", jsonvalue__feature__name="score"
        ).values_list("artifact__key", "jsonvalue__value")
    )
    scores[key] = score
    ranking = tuple(sorted(scores, key=lambda k: scores[k]))  # mode min, save_top_k=-1
    snapshot = CheckpointSnapshot(
        key=key,
        local_path=path,
        staged_path=path,
        global_step=trainer.global_step,
        epoch=trainer.current_epoch,
        monitor="score",
        mode="min",
        save_weights_only=False,
        score=score,
        is_best=ranking[0] == key,
        best_key=ranking[0],
        last_key=None,
        ranking=ranking,
        scores=scores,
    )
    values = callback.collect_checkpoint_feature_values(trainer, snapshot)
    snapshot = CheckpointSnapshot(**{**snapshot.__dict__, "feature_values": values})
    artifact = callback.save_checkpoint_artifact(trainer, path)
    with CaptureQueriesContext(connection) as queries:
        callback.commit_checkpoint_artifact(trainer, snapshot, artifact)
    return len(queries.captured_queries)


def test_commit_query_count_does_not_grow_with_stored_checkpoints(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A commit costs as many queries with 50 checkpoints under the prefix as with 5."""
    # Set up realistically: a real fit stores 5 checkpoints (save_top_k=-1, mode min) and
    # leaves the callback with its trainer and its committer-side state. Afterwards the
    # test thread plays worker and committer, calling the same hooks the pipeline calls
    # (save_checkpoint_artifact, then commit_checkpoint_artifact), so the queries of one
    # commit are captured on this thread's connection.
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", monitor="score", save_top_k=-1, every_n_train_steps=1
    )
    trainer = fit(callback, tmp_path, steps=5, model=TierModel(scores=[10, 11, 12, 13, 14]))
    prefix = callback.checkpoint_key_prefix
    assert len(artifacts_under(ln, prefix)) == 5

    # Every value the two measured commits write exists beforehand, whatever earlier
    # tests left in the session's instance: a value that one commit creates (a savepoint,
    # an insert) and the other finds made by another test would count as growth.
    auto = discover_auto(ln)
    for rank in range(52):
        ln.models.JsonValue.get_or_create(auto["model_rank"], rank)
    for score in (4.0, 5.0):
        ln.models.JsonValue.get_or_create(auto["score"], score)

    # Each measured checkpoint is the new best: every stored rank shifts (worst case).
    with_5 = _commit_queries(callback, trainer, ln, tmp_path, "best-at-5.ckpt", 5.0)
    for n in range(44):
        _commit_queries(callback, trainer, ln, tmp_path, f"filler-{n:02d}.ckpt", 20.0 + n)
    assert len(artifacts_under(ln, prefix)) == 50
    with_50 = _commit_queries(callback, trainer, ln, tmp_path, "best-at-50.ckpt", 4.0)

    assert with_5 > 0
    assert with_50 <= with_5 + 2, (with_5, with_50)
    # The commits did what they claim: the last one is best and ranks follow the scores.
    values = {k: single(artifact_features(ln, a)) for k, a in artifacts_under(ln, prefix).items()}
    assert len(values) == 51
    ordered = sorted(values, key=lambda k: values[k]["score"])
    assert [values[k]["model_rank"] for k in ordered] == list(range(51))
    assert [k for k in values if values[k]["is_best_model"]] == [f"{prefix}/best-at-50.ckpt"]


class _RaisesAtStep(TierModel):
    """A TierModel whose training step ``fail_at`` (0-based) raises."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        return super().training_step(batch, batch_idx)


def test_save_on_exception_writes_and_persists_the_emergency_checkpoint(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """``save_on_exception`` is Lightning's (a ModelCheckpoint argument the reference's
    signature lacks): accepted, the same files as ModelCheckpoint's, and the emergency
    checkpoint (which rewrites the step's file) is persisted with its final bytes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    settings = {"every_n_train_steps": 1, "save_top_k": -1, "save_on_exception": True}
    listings = []
    for name, cls in (("plain", ModelCheckpoint), ("ours", ll.Checkpoint)):
        callback = cls(dirpath=tmp_path / name, **settings)
        with pytest.raises(RuntimeError, match="boom in training_step"):
            fit(callback, tmp_path / f"{name}-root", steps=4, model=_RaisesAtStep(fail_at=2))
        listings.append(sorted(p.name for p in (tmp_path / name).iterdir()))
    assert listings[0] == listings[1] and len(listings[1]) == 2
    assert isinstance(callback, ll.Checkpoint) and callback.save_on_exception is True
    assert callback.persistence_stats.failed == 0
    stored = artifacts_under(ln, callback.checkpoint_key_prefix)
    assert {key.rsplit("/", 1)[1] for key in stored} == set(listings[1])
    for key, artifact in stored.items():
        local = tmp_path / "ours" / key.rsplit("/", 1)[1]
        assert storage_file(artifact).read_bytes() == local.read_bytes(), key


def test_two_stores_in_one_folder_end_with_the_flags_of_the_last_saves_whatever_the_commit_order(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Two callbacks in one folder commit on their own threads, so one's commit can come
    after the other's later save. Saved a1, b1, a2, b2 (a2 A's best, b2 not B's best) and
    committed a1, b1, b2, a2, the folder ends as the reference's, which saves in order:
    ``is_last_model`` on b2, ``is_best_model`` on a2 (the last save that was a best),
    ranks of b2's callback. Each store kept what it read of the folder's flags for
    itself: A's commit of a2 left B's b2 flagged last too."""
    import uuid

    from lamin_lightning._jobs import JobRecord
    from lamin_lightning._lamin_store import LaminStore

    ll.save_lightning_features()
    prefix = f"two-stores-{uuid.uuid4().hex[:8]}/checkpoints"
    store_a, store_b = LaminStore(), LaminStore()

    def commit(store: LaminStore, name: str, sequence: int, best: str, *ranking: str) -> None:
        path = tmp_path / name
        path.write_bytes(name.encode() * 64)
        key = f"{prefix}/{name}"
        snapshot = CheckpointSnapshot(
            key=key,
            local_path=path,
            staged_path=path,
            global_step=sequence,
            epoch=0,
            monitor="score",
            mode="min",
            save_weights_only=False,
            score=1.0,
            is_best=best == name,
            best_key=f"{prefix}/{best}",
            last_key=key,
            ranking=tuple(f"{prefix}/{n}" for n in ranking),
            scores={f"{prefix}/{n}": 1.0 for n in ranking},
            sequence=sequence,
        )
        record = JobRecord(
            op="save", kind="checkpoint", key=key, local_path=str(path), checkpoint=snapshot
        )
        store.commit(record, store.transfer(record, path), replay=False, set_flags=True)

    commit(store_a, "a1.ckpt", 1, "a1.ckpt", "a1.ckpt")
    commit(store_b, "b1.ckpt", 2, "b1.ckpt", "b1.ckpt")
    commit(store_b, "b2.ckpt", 4, "b1.ckpt", "b1.ckpt", "b2.ckpt")  # before a2's commit
    commit(store_a, "a2.ckpt", 3, "a2.ckpt", "a2.ckpt", "a1.ckpt")

    values = {
        key.rsplit("/", 1)[1]: artifact_features(ln, a)
        for key, a in artifacts_under(ln, prefix).items()
    }
    assert all(len(v) == 1 for vs in values.values() for v in vs.values()), values
    flags = {n: single(vs) for n, vs in values.items()}
    assert [n for n, f in sorted(flags.items()) if f.get("is_last_model")] == ["b2.ckpt"]
    assert [n for n, f in sorted(flags.items()) if f.get("is_best_model")] == ["a2.ckpt"]
    ranks = {n: f.get("model_rank") for n, f in sorted(flags.items())}
    assert ranks == {"a1.ckpt": None, "a2.ckpt": None, "b1.ckpt": 0, "b2.ckpt": 1}
