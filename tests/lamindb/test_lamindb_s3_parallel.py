"""On S3, uploads run in parallel (``max_workers=4``) and the ordering guarantees still hold.

Runs in the S3 run of the tier (``LAMIN_LIGHTNING_TIER_BACKEND=s3``; ``make test`` runs
it). moto on loopback answers in about a millisecond, so transfers would rarely overlap
by themselves: for this test the session's bucket is reached through a latency proxy
(every request/response pays a round trip of ``2 * ONE_WAY_DELAY``), registered as a
storage location of its own and made the default storage for the test only.

Each transfer (the worker hook ``save_checkpoint_artifact``: hash, upload, artifact
record) records its start and end; the test then checks that transfers overlapped, and
that events, flags, ranks and the kept set are still those of submission order.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import (
    TierModel,
    artifact_features,
    artifacts_under,
    fit,
    single,
    storage_file,
    stored_sha256,
)
from tier_servers import LatencyProxy, TierSetup, use_s3_storage

import lamin_lightning as ll
from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent, ArtifactSavedEvent
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.backend("s3"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

ONE_WAY_DELAY = 0.05
WORKERS = 4
# Score seen by the checkpoint after step n (n = 1..10): up and down, all distinct (min).
UP_AND_DOWN = [5.0, 3.0, 4.0, 1.0, 6.0, 2.0, 7.0, 0.5, 8.0, 2.5]


@pytest.fixture
def slow_bucket(ln: Any, tier_setup: TierSetup) -> Iterator[str]:
    """The session's bucket behind a latency proxy, as the default storage for one test."""
    assert tier_setup.moto is not None
    with LatencyProxy(tier_setup.moto.port, ONE_WAY_DELAY) as proxy:
        # A fresh prefix: a prefix registered before (and marked in the bucket) makes
        # lamindb ask on stdin whether to reuse it.
        prefix = f"slow-{uuid.uuid4().hex[:8]}"
        root = use_s3_storage(f"s3://{tier_setup.moto.bucket}/{prefix}", proxy.url)
        try:
            yield root
        finally:
            ln.settings.storage = tier_setup.artifact_storage


class TimedCheckpoint(ll.Checkpoint):
    """Records each transfer's (file, start, end, thread) from the worker hook, and, on the
    training thread, the order in which Lightning submitted saves and removals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.transfers: list[tuple[str, float, float, str]] = []
        self.submitted: list[tuple[str, str]] = []

    def save_checkpoint_artifact(self, trainer: pl.Trainer, filepath: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
        end = time.monotonic()
        with self.lock:
            self.transfers.append(
                (Path(filepath).name, start, end, threading.current_thread().name)
            )
        return artifact

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.submitted.append(("saved", self.resolve_artifact_key(trainer, filepath, "checkpoint")))

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
        super()._remove_checkpoint(trainer, filepath)
        self.submitted.append(("removed", key))


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of the (start, end) intervals open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:  # at equal times, ends (-1) sort before starts: touching != overlap
        running += step
        most = max(most, running)
    return most


def is_subsequence(items: list[Any], of: list[Any]) -> bool:
    remaining = iter(of)
    return all(any(item == candidate for candidate in remaining) for item in items)


def test_s3_uploads_overlap_with_four_workers_and_order_still_holds(
    ln: Any, no_run: None, tmp_path: Path, slow_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With max_workers=4 on S3, transfers run at once; events come in submission order,
    each once; flags, ranks and the kept set end as Lightning's last submitted state."""
    from lamindb.core.storage import paths

    # The upload itself (lamindb's store_file_or_folder, called by Artifact.save): when
    # each one ran, so that overlap is shown for the bytes on the wire, not only the hooks.
    uploads: list[tuple[float, float]] = []
    store = paths.store_file_or_folder

    def timed_store(*args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            return store(*args, **kwargs)
        finally:
            uploads.append((start, time.monotonic()))

    monkeypatch.setattr(paths, "store_file_or_folder", timed_store)
    observer = RecordingObserver()
    callback = TimedCheckpoint(
        dirpath=tmp_path / "ckpts",
        monitor="score",
        mode="min",
        save_top_k=3,
        every_n_train_steps=1,
        save_last=True,
        max_workers=WORKERS,
        max_pending=2 * WORKERS,
        artifact_observers=[observer],
    )
    trainer = fit(callback, tmp_path, steps=len(UP_AND_DOWN), model=TierModel(scores=UP_AND_DOWN))
    stats = callback.persistence_stats
    assert stats.failed == 0 and not observer.of_type(ArtifactFailedEvent)

    # Transfers went through the proxy (each took at least one round trip) and overlapped.
    transfers = callback.transfers
    assert len(transfers) == stats.saved
    assert min(end - start for _, start, end, _ in transfers) >= 2 * ONE_WAY_DELAY
    overlap = most_at_once([(start, end) for _, start, end, _ in transfers])
    assert overlap >= 3, f"at most {overlap} transfers ran at once: {sorted(transfers)}"
    assert overlap <= WORKERS
    assert len(uploads) >= len(transfers)  # a retried attempt may have uploaded too
    assert most_at_once(uploads) >= 3, f"uploads never ran 3 at once: {sorted(uploads)}"
    assert len({thread for *_, thread in transfers}) >= 3

    # Events: each job's event once, in the order Lightning submitted the jobs (saves that
    # were cancelled or superseded before they started have none); a removal follows the
    # save it undoes.
    kinds = {ArtifactSavedEvent: "saved", ArtifactRemovedEvent: "removed"}
    delivered = [(kinds[type(e)], e.key) for e in observer.events]
    assert len(delivered) == stats.saved + stats.removed
    assert is_subsequence(delivered, callback.submitted), (delivered, callback.submitted)
    assert len(callback.submitted) == stats.submitted
    for index, (kind, event_key) in enumerate(delivered):
        if kind == "removed":
            assert ("saved", event_key) in delivered[:index]

    # Final state equals Lightning's: kept set, bytes, flags, ranks, scores.
    def key(path: str | Path) -> str:
        return callback.resolve_artifact_key(trainer, path, "checkpoint")

    prefix = callback.checkpoint_key_prefix
    stored = artifacts_under(ln, prefix)
    kept_paths = [*callback.best_k_models, callback.last_model_path]
    assert set(stored) == {key(p) for p in kept_paths}
    for path in kept_paths:
        artifact = stored[key(path)]
        assert str(artifact.path).startswith(slow_bucket.split("?")[0] + "/")
        assert stored_sha256(artifact) == stored_sha256(Path(path))
    values = {k: single(artifact_features(ln, a)) for k, a in stored.items()}
    assert [k for k, v in values.items() if v["is_best_model"] is True] == [
        key(callback.best_model_path)
    ]
    assert [k for k, v in values.items() if v["is_last_model"] is True] == [f"{prefix}/last.ckpt"]
    ranked = sorted(callback.best_k_models.items(), key=lambda item: float(item[1]))
    for rank, (path, score) in enumerate(ranked):
        assert values[key(path)]["model_rank"] == rank
        assert values[key(path)]["score"] == pytest.approx(float(score))
    # Evicted checkpoints that were persisted are gone: records and bytes in the bucket.
    evicted = {e.key: e.storage_uri for e in observer.of_type(ArtifactSavedEvent)}
    evicted = {k: uri for k, uri in evicted.items() if k not in stored}
    assert evicted, "the sequence should have persisted checkpoints that were later evicted"
    for evicted_key, uri in evicted.items():
        assert not ln.Artifact.filter(key=evicted_key).exists()
        assert not storage_file(uri).exists()


def test_workers_share_one_s3_filesystem_for_the_default_storage(
    ln: Any, no_run: None, tmp_path: Path, slow_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsspec caches a filesystem per thread: each worker used to build its own S3 client
    on its first upload, holding fsspec's IO loop (and every other transfer) while it did.
    The storage root's filesystem is created once and every worker's upload uses it."""
    import s3fs

    created_on: list[str] = []
    real_init = s3fs.S3FileSystem.__init__

    def spied_init(self: Any, *args: Any, **kwargs: Any) -> None:
        created_on.append(threading.current_thread().name)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "__init__", spied_init)
    callback = TimedCheckpoint(
        dirpath=tmp_path / "ckpts",
        save_top_k=-1,
        every_n_train_steps=1,
        max_workers=WORKERS,
        max_pending=2 * WORKERS,
    )
    fit(callback, tmp_path, steps=8)
    threads = {thread for *_, thread in callback.transfers}
    assert callback.persistence_stats.saved == 8 and len(threads) >= 2, callback.transfers
    on_workers = [name for name in created_on if name.startswith("lamin-lightning")]
    assert len(on_workers) <= 1, f"S3 filesystems created on worker threads: {on_workers}"


@pytest.mark.filterwarnings("ignore:.*no run & transform got linked.*")
def test_a_deleted_bucket_fails_once_naming_the_storage_location_and_lamindb_stays_quiet(
    ln: Any,
    tier_setup: TierSetup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default storage's bucket is deleted before training: S3 says only "The specified
    bucket does not exist". The failure names the storage location and is not retried (a
    missing bucket does not come back by waiting); LaminDB's own "could not upload
    artifact: Artifact(...)" line at the failed attempt stays off the console, where our
    line of the failure says it."""
    import boto3
    from lamindb_setup import logger as lamindb_logger

    assert tier_setup.moto is not None
    bucket = f"gone-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=tier_setup.moto.url)
    s3.create_bucket(Bucket=bucket)
    root = use_s3_storage(f"s3://{bucket}/runs", tier_setup.moto.url)
    try:
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)
        lamindb_said = _Collect()
        lamindb_logger.addHandler(lamindb_said)
        callback = ll.Checkpoint(
            dirpath=str(tmp_path / "ckpt"), retry=ll.RetryPolicy.no_delay(3), on_error="raise"
        )
        with pytest.raises(ll.PersistenceError) as info:
            fit(callback, tmp_path, steps=1)
    finally:
        lamindb_logger.removeHandler(lamindb_said)
        ln.settings.storage = tier_setup.artifact_storage

    [failure] = info.value.failures
    assert isinstance(failure.error, FileNotFoundError)
    assert failure.attempts == 1
    assert f"(storage location {root})" in str(info.value)
    assert not [m for m in lamindb_said.messages if "could not upload artifact" in m]
    assert f"storage location {root}" in caplog.text  # our own log line of it
    assert (tmp_path / "ckpt" / "epoch=0-step=1.ckpt").is_file()


class _Collect(logging.Handler):
    """The messages that reach a logger's handlers (past its filters)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
