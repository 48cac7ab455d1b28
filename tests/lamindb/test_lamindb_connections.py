"""The database and the storage going away for a moment, on the real servers of a backend.

- PostgreSQL: every connection of ours terminated by the server mid-fit (as a restart,
  a failover or an idle-connection reaper does). Each pipeline thread's next operation
  must connect afresh; Django, left alone, keeps the dead connection, and every retry
  failed with "connection already closed" until the fit ended.
- S3: the deletion of an evicted checkpoint's object fails once. lamindb deletes the
  record first and the object after, so a retry found no record and left the object in
  the bucket for good.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import TierModel, artifact_features, assert_kept_set_persisted, fit, single

import lamin_lightning as ll
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

SCORES = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]


class _TerminateOnFirstSave:
    """An observer that, told of the first saved checkpoint, has PostgreSQL terminate
    every other backend of this database's role: all of the pipeline's connections."""

    def __init__(self, ln: Any) -> None:
        self.ln = ln
        self.terminated: int | None = None
        self.done = threading.Event()

    def on_artifact_saved(self, event: Any) -> None:
        if self.done.is_set():
            return
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE usename = current_user AND datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
            self.terminated = cursor.fetchone()[0]
        connection.close()  # the delivery thread's own: it was the one left alive
        self.done.set()


@pytest.mark.backend("postgres")
def test_connections_the_server_terminated_mid_fit_are_replaced_and_nothing_fails(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    observer = _TerminateOnFirstSave(ln)
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=1,
        max_workers=2,
        retry=ll.RetryPolicy(attempts=5, initial_backoff=0.05, jitter=0.0),
        artifact_observers=[observer],
    )
    fit(callback, tmp_path, steps=len(SCORES), model=TierModel(scores=SCORES))
    from django.db import connection

    connection.close()  # this thread's was terminated too: the user's, not ours to replace
    assert observer.done.is_set() and observer.terminated, "no connection was terminated"
    stats = callback.persistence_stats
    assert stats.failed == 0, stats
    by_key = assert_kept_set_persisted(ln, callback)
    last = [k for k, a in by_key.items() if single(artifact_features(ln, a)).get("is_last_model")]
    assert last == [
        callback.resolve_artifact_key(callback._trainer, callback.last_model_path, "checkpoint")
    ]


class _FailingOnce:
    """Wraps the storage filesystem's ``rm``: the first removal of an object under
    ``.lamindb/`` raises a connection error (S3 unreachable), later ones run."""

    def __init__(self, rm: Any) -> None:
        self.rm = rm
        self.failed: list[str] = []

    def __call__(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.failed and "/.lamindb/" in str(path):
            self.failed.append(str(path))
            raise ConnectionError(f"injected: S3 unreachable while deleting {path}")
        return self.rm(path, *args, **kwargs)


@pytest.mark.backend("s3")
def test_an_evicted_checkpoints_object_whose_deletion_failed_once_is_deleted_on_retry(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = ln.settings.storage.root.fs
    failing = _FailingOnce(fs.rm)
    monkeypatch.setattr(fs, "rm", failing)
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        retry=ll.RetryPolicy(attempts=3, initial_backoff=0.01, jitter=0.0),
        artifact_observers=[observer],
    )
    fit(callback, tmp_path, steps=3, model=TierModel(scores=[3.0, 2.0, 1.0]))
    assert failing.failed, "no deletion was made to fail"
    stats = callback.persistence_stats
    assert stats.failed == 0 and stats.removed == 2, stats
    assert_kept_set_persisted(ln, callback)
    removed = [e for e in observer.events if isinstance(e, ll.ArtifactRemovedEvent)]
    assert len(removed) == 2
    fs.invalidate_cache()
    for event in removed:
        assert not fs.exists(event.storage_uri), f"{event.storage_uri} left in the bucket"


def test_an_artifact_lamindb_refuses_to_delete_keeps_its_stored_file(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A checkpoint's artifact in a Collection is protected: its record cannot be deleted,
    so its bytes must stay too (the store goes only after the record, in one
    transaction; deleting the store first left a record whose file was gone)."""
    import uuid

    from django.db.models import ProtectedError

    from lamin_lightning._lamin_store import delete_artifact

    path = tmp_path / "protected.ckpt"
    path.write_bytes(b"kept" * 64)
    key = f"protected-{uuid.uuid4().hex[:8]}/checkpoints/protected.ckpt"
    artifact = ln.Artifact(path, key=key, kind="model").save()
    ln.Collection([artifact], key=f"{key}-collection").save()
    stored = artifact.path
    with pytest.raises(ProtectedError):
        delete_artifact(ln.Artifact.get(id=artifact.id))
    assert ln.Artifact.filter(id=artifact.id).exists()
    stored.fs.invalidate_cache()
    assert stored.exists(), "the protected artifact's file was deleted"
