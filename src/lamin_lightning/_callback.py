"""ArtifactPublishingModelCheckpoint: the generic Lightning layer.

Owns everything Lightning-specific: which hook stages a file, when jobs are
submitted, the metadata snapshot taken on the training thread, flushing at
teardown, and rank zero only. How a file is persisted is left to subclasses,
which override the ``save_*`` hooks (called on worker threads), and
:meth:`commit_checkpoint_artifact` / :meth:`remove_checkpoint_artifact`
(called on the committer thread, in submission order).

Threads:

==================================================  ===============================
hook                                                thread
==================================================  ===============================
``resolve_artifact_key``, ``collect_*`` snapshots   training thread (at submission)
``save_checkpoint_artifact``,                       a worker (up to ``max_workers``
``save_config_artifact``, ``save_hparams_artifact``  at once, any order, retried)
``commit_checkpoint_artifact``,                     the committer (one thread,
``remove_checkpoint_artifact``,                     submission order, retried)
``resolve_artifact_storage_uri``
``on_artifact_saved/removed/failed``, observers     the delivery thread (one thread,
                                                    submission order)
==================================================  ===============================
"""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lamin_lightning._bridge import PersistencePipeline
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactObserver,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._outbox import Outbox, OutboxBusyError, settling
from lamin_lightning._pipeline import JobSpec, PendingJob
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._snapshot import SnapshotSlot, Snapshotter, write_atomically
from lamin_lightning._staging import (
    Stager,
    detach_before_rewrite,
    release_staged,
    staging_root,
)
from lamin_lightning._stats import PersistenceStats, StatsRecorder
from lamin_lightning._telemetry import log_persistence_stats

log = logging.getLogger("lamin_lightning")

OnError = Literal["raise", "warn"]
_ON_ERROR_VALUES = ("raise", "warn")

DEFAULT_MAX_WORKERS = 2
DEFAULT_MAX_PENDING = 4
DEFAULT_FLUSH_TIMEOUT = 900.0


_pipeline_call = threading.local()


def _as_pipeline_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a ``save_*`` hook marked as called by the pipeline (see ``called_by_pipeline``)."""
    _pipeline_call.active = True
    try:
        return fn(*args, **kwargs)
    finally:
        _pipeline_call.active = False


class PersistenceError(RuntimeError):
    """Raised on the training thread when persisting one or more files failed.

    Attributes:
        failures: The failed events, in submission order.
    """

    def __init__(self, failures: list[ArtifactFailedEvent]) -> None:
        self.failures = list(failures)
        lines = [
            f"  {f.operation} {f.key!r} after {f.attempts} attempt(s): "
            f"{type(f.error).__name__}: {f.error}"
            for f in self.failures
        ]
        super().__init__(
            f"{len(self.failures)} checkpoint artifact(s) could not be persisted; the local"
            " files are kept:\n"
            + "\n".join(lines)
            + "\nThey stay in the outbox next to the checkpoints: fix the cause, then run"
            " `lamin-lightning flush DIRPATH` or start training again with the same dirpath."
            " Pass on_error='warn' to only warn."
        )


class CheckpointDirectoryError(OSError):
    """The checkpoint directory cannot hold checkpoints: not writable, or too full.

    Raised at ``setup``, before the first training step, instead of hours later.
    """


@dataclass(frozen=True)
class CheckpointSnapshot:
    """What a checkpoint job knows about training, frozen at submission.

    Background threads read this, never the live trainer.

    Attributes:
        key: The artifact key of this checkpoint.
        local_path: The path Lightning wrote.
        staged_path: The staged name of the same bytes, read by the upload.
        global_step: ``trainer.global_step`` at save time.
        epoch: ``trainer.current_epoch`` at save time.
        monitor: The monitored metric, or None.
        mode: ``"min"`` or ``"max"``.
        save_weights_only: Whether the file holds weights only.
        score: The callback's ``current_score`` at save time, as a float.
        is_best: Whether this file is Lightning's ``best_model_path``.
        best_key: Key of ``best_model_path``, or None.
        last_key: Key of ``last_model_path``, or None.
        ranking: Keys of ``best_k_models``, best first.
        scores: Score of every key in ``ranking``.
        feature_values: Extra values collected on the training thread for the
            concrete layer (see ``collect_checkpoint_feature_values``).
    """

    key: str
    local_path: Path
    staged_path: Path
    global_step: int
    epoch: int
    monitor: str | None
    mode: str
    save_weights_only: bool
    score: float | None
    is_best: bool
    best_key: str | None
    last_key: str | None
    ranking: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    feature_values: Mapping[Any, Any] | None = None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _validate_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _validate_retry(value: Any) -> RetryPolicy:
    if value is None:
        return RetryPolicy()
    if isinstance(value, RetryPolicy):
        return value
    if isinstance(value, Mapping) or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            return RetryPolicy(**value) if isinstance(value, Mapping) else RetryPolicy(value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"retry={value!r} is not a valid retry policy: {error}. Pass a number of"
                " attempts >= 1 or a mapping of RetryPolicy fields (attempts, initial_backoff,"
                " max_backoff, jitter, transient_errors)"
            ) from error
    raise ValueError(
        "retry must be a lamin_lightning.RetryPolicy, a mapping of its fields"
        f" (attempts, initial_backoff, max_backoff, jitter, transient_errors) or an int"
        f" number of attempts, got {value!r}"
    )


def _validate_flush_timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(
            f"flush_timeout must be a number of seconds >= 0, or None to wait"
            f" without limit, got {value!r}"
        )
    if math.isinf(value):
        return None
    return float(value)


class ArtifactPublishingModelCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that persists its files in the background and reports each step.

    Drop-in for ``lamindb.integrations.lightning.ArtifactPublishingModelCheckpoint``
    with the same properties and hooks. The difference: ``_save_checkpoint`` returns
    once Lightning has written the local file and the job is admitted; persisting
    happens on threads the callback owns, bounded, ordered and retried.

    Args:
        *args: Passed to ``ModelCheckpoint``.
        artifact_observers: Observers notified of saved, removed and failed artifacts.
        max_workers: Transfers (uploads) that may run at once. Default 2.
        max_pending: Files that may be queued or in flight at once. A checkpoint
            beyond waits on the training thread (backpressure); that wait is counted as
            ``training_stall_seconds``. Each pending file keeps a hard link (or copy)
            of its checkpoint on local disk. Default 4.
        retry: A :class:`RetryPolicy`, a mapping of its fields, or a number of attempts.
        flush_timeout: Seconds ``teardown`` waits for outstanding persistence before
            it gives up and names what was not persisted; None waits without limit.
            Default 900.
        on_error: ``"raise"`` raises :class:`PersistenceError` on the training thread
            at the next save or at teardown when persisting failed; ``"warn"`` warns.
        async_write: Take Lightning's local ``torch.save`` off the training thread too:
            the training thread copies the checkpoint's tensors into reusable host
            buffers (pinned for accelerator tensors) and the file is written in the
            background, to a temporary name that is renamed once complete. Needs the
            default ``TorchCheckpointIO`` and a single-device or DDP strategy; otherwise
            the callback warns and writes synchronously.
        max_snapshots: With ``async_write``, how many host snapshots may exist at once
            (each holds a full copy of the checkpoint's tensors). A checkpoint that finds
            none free waits, and the wait is counted as training stall. Default 1.
        log_stats: At each checkpoint, right after its job is admitted, send the
            persistence stats to every logger of the trainer (``logger.log_metrics`` at
            ``trainer.global_step``, rank zero): ``lamin_lightning/pending``,
            ``lamin_lightning/training_stall_seconds``,
            ``lamin_lightning/persistence_latency_seconds``, ``lamin_lightning/retried``,
            ``lamin_lightning/failed``. Never waits on persistence. Default False.
        outbox: Journal every job durably next to the checkpoints before
            ``_save_checkpoint`` returns, so that the next ``setup`` in this dirpath, or
            ``lamin-lightning flush``, finishes what a crash interrupted. One synchronous
            write of about 1.5 kB per job: 0.3 ms on an idle disk, tens of ms while
            uploads keep the disk busy. ``False`` skips the journal (no crash recovery);
            the directory is still checked at ``setup``. Default True.
        **kwargs: Passed to ``ModelCheckpoint``.
    """

    def __init__(
        self,
        *args: Any,
        artifact_observers: list[ArtifactObserver] | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_pending: int = DEFAULT_MAX_PENDING,
        retry: RetryPolicy | Mapping[str, Any] | int | None = None,
        flush_timeout: float | None = DEFAULT_FLUSH_TIMEOUT,
        on_error: OnError = "raise",
        async_write: bool = False,
        max_snapshots: int = 1,
        log_stats: bool = False,
        outbox: bool = True,
        **kwargs: Any,
    ) -> None:
        dirpath = kwargs.get("dirpath", args[0] if args else None)
        if dirpath is not None and "://" in str(dirpath) and not str(dirpath).startswith("file://"):
            raise ValueError(
                f"dirpath={str(dirpath)!r} is remote; lamin-lightning stages local files and"
                " persists them itself. Pass a local dirpath (or none) and let the"
                " callback upload."
            )
        self.max_workers = _validate_int("max_workers", max_workers, 1)
        self.max_pending = _validate_int("max_pending", max_pending, 1)
        self.retry = _validate_retry(retry)
        self.flush_timeout = _validate_flush_timeout(flush_timeout)
        if on_error not in _ON_ERROR_VALUES:
            raise ValueError(f"on_error must be one of {_ON_ERROR_VALUES}, got {on_error!r}")
        self.on_error: OnError = on_error
        if not isinstance(async_write, bool):
            raise ValueError(f"async_write must be True or False, got {async_write!r}")
        self.async_write = async_write
        self.max_snapshots = _validate_int("max_snapshots", max_snapshots, 1)
        if not isinstance(log_stats, bool):
            raise ValueError(f"log_stats must be True or False, got {log_stats!r}")
        self.log_stats = log_stats
        if not isinstance(outbox, bool):
            raise ValueError(f"outbox must be True or False, got {outbox!r}")
        self.outbox = outbox
        if artifact_observers is not None and not isinstance(artifact_observers, list | tuple):
            raise ValueError(
                "artifact_observers must be a list of observers, got"
                f" {type(artifact_observers).__name__}"
            )
        super().__init__(*args, **kwargs)
        self._artifact_observers: list[ArtifactObserver] = []
        for observer in artifact_observers or []:
            try:
                self.add_artifact_observer(observer)
            except TypeError as error:
                raise TypeError(f"artifact_observers: {error}") from None
        self._latest_artifacts: dict[ArtifactKind, Any | None] = {
            "checkpoint": None,
            "config": None,
            "hparams": None,
        }
        self._last_artifact_event: AnyArtifactEvent | None = None
        self._stats_recorder = StatsRecorder()
        self._hparams_submitted = False
        self._trainer: pl.Trainer | None = None
        self._init_runtime()

    # -- runtime state: created lazily, dropped when pickled ------------------------------

    def _init_runtime(self) -> None:
        self._pipeline: PersistencePipeline | None = None
        self._state_lock: threading.Lock | None = None
        self._unreported_failures: list[ArtifactFailedEvent] = []
        self._persisted: dict[str, Any] = {}
        self._storage_uris: dict[str, str] = {}
        self._stagers: dict[Path, Stager] = {}
        self._staging_done: dict[str, threading.Event] = {}
        self._snapshotter: Snapshotter | None = None
        self._async_write_refused = False
        self._outbox: Outbox | None = None
        self._foreign_outboxes: list[Outbox] = []
        self._set_up = False
        self._deferred_files: list[tuple[Path, ArtifactKind]] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_pipeline", "_state_lock"):
            state[name] = None
        state["_persisted"] = {}
        state["_storage_uris"] = {}
        state["_stagers"] = {}
        state["_staging_done"] = {}
        state["_snapshotter"] = None
        state["_unreported_failures"] = []
        state["_outbox"] = None
        state["_foreign_outboxes"] = []
        state["_set_up"] = False
        state["_deferred_files"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> ArtifactPublishingModelCheckpoint:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__getstate__().items():
            setattr(clone, name, copy.deepcopy(value, memo))
        return clone

    @property
    def _lock(self) -> threading.Lock:
        if self._state_lock is None:
            self._state_lock = threading.Lock()
        return self._state_lock

    # -- reference surface ----------------------------------------------------------------

    @property
    def last_checkpoint_artifact(self) -> Any | None:
        """The most recently saved checkpoint artifact (updated as events are delivered)."""
        return self._latest_artifacts["checkpoint"]

    @property
    def last_config_artifact(self) -> Any | None:
        """The most recently saved config artifact."""
        return self._latest_artifacts["config"]

    @property
    def last_hparams_artifact(self) -> Any | None:
        """The most recently saved hparams artifact."""
        return self._latest_artifacts["hparams"]

    @property
    def last_artifact_event(self) -> AnyArtifactEvent | None:
        """The last lifecycle event delivered by this callback."""
        return self._last_artifact_event

    def get_last_artifact(self, kind: ArtifactKind) -> Any | None:
        """The most recently saved artifact of ``kind``."""
        if kind not in self._latest_artifacts:
            raise ValueError(f"kind must be one of {tuple(self._latest_artifacts)}, got {kind!r}")
        return self._latest_artifacts[kind]

    def add_artifact_observer(self, observer: ArtifactObserver) -> None:
        """Register an observer; it needs ``on_artifact_saved`` or ``on_artifact_removed``."""
        if not any(
            callable(getattr(observer, name, None))
            for name in ("on_artifact_saved", "on_artifact_removed", "on_artifact_failed")
        ):
            raise TypeError(
                f"{observer!r} is not an artifact observer: define on_artifact_saved,"
                " on_artifact_removed and optionally on_artifact_failed"
            )
        self._artifact_observers.append(observer)

    def remove_artifact_observer(self, observer: ArtifactObserver) -> None:
        """Unregister an observer added before."""
        self._artifact_observers.remove(observer)

    def resolve_artifact_storage_uri(self, artifact: Any) -> str:
        """Where ``artifact``'s bytes live. Called on the committer thread."""
        raise NotImplementedError

    def resolve_artifact_key(
        self, trainer: pl.Trainer, filepath: Path | str, kind: ArtifactKind
    ) -> str:
        """The logical key of a file. Called on the training thread at submission."""
        raise NotImplementedError

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        """Hook after an artifact was saved and committed. Delivery thread."""
        del event

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        """Hook after an evicted checkpoint was removed. Delivery thread."""
        del event

    def on_artifact_failed(self, event: ArtifactFailedEvent) -> None:
        """Hook after persisting a file failed for good. Delivery thread."""
        del event

    def save_checkpoint_artifact(
        self,
        trainer: pl.Trainer,
        filepath: Path | str,
        *,
        feature_values: dict[Any, Any] | None = None,
    ) -> Any:
        """Persist a checkpoint file; return the persisted artifact. Worker thread.

        ``filepath`` is the staged file (same base name as Lightning's). The event
        is emitted by the pipeline after the commit, not by this method.
        """
        del trainer, filepath, feature_values
        raise NotImplementedError

    def save_config_artifact(self, trainer: pl.Trainer, config_path: Path | str) -> Any:
        """Persist a LightningCLI config file; return the artifact. Worker thread."""
        del trainer, config_path
        raise NotImplementedError

    def save_hparams_artifact(self, trainer: pl.Trainer, hparams_path: Path | str) -> Any | None:
        """Persist ``hparams.yaml``; return the artifact or None. Worker thread."""
        del trainer, hparams_path
        raise NotImplementedError

    # -- extension points of this package -------------------------------------------------

    def collect_checkpoint_feature_values(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot
    ) -> dict[Any, Any] | None:
        """Values to annotate the checkpoint with, read from the live trainer. Training thread."""
        del trainer, snapshot
        return None

    def commit_checkpoint_artifact(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot, artifact: Any
    ) -> None:
        """Order-dependent bookkeeping after a checkpoint was saved. Committer thread.

        Runs strictly in submission order, so flags such as "best" or "last" and
        ranks can be set from ``snapshot`` without racing other checkpoints. Must be
        idempotent: it is retried on transient errors.
        """
        del trainer, snapshot, artifact

    def remove_checkpoint_artifact(
        self, trainer: pl.Trainer, key: str, artifact: Any | None
    ) -> Any | None:
        """Delete the persisted artifact of an evicted checkpoint. Committer thread.

        ``artifact`` is what this callback saved under ``key`` in this process, or
        None if it saved nothing (the save was cancelled, failed, or happened in
        another process). Return the deleted artifact, or None. Must be idempotent.
        """
        del trainer, key
        return artifact

    @staticmethod
    def called_by_pipeline() -> bool:
        """Whether the current ``save_*`` hook call comes from the background pipeline.

        Lets a ``save_*`` override behave like the synchronous reference when user
        code calls it directly: annotate and emit the saved event itself.
        """
        return bool(getattr(_pipeline_call, "active", False))

    def emit_artifact_event(self, event: AnyArtifactEvent) -> None:
        """Deliver an event to the ``on_artifact_*`` hooks and observers now, on this thread.

        For direct (synchronous) calls of the ``save_*`` hooks; the pipeline delivers
        its own events on the delivery thread.
        """
        self._deliver(event)

    def thread_finalizer(self) -> None:
        """Called on each pipeline thread as it exits (close per-thread connections here)."""

    # -- public async controls ------------------------------------------------------------

    @property
    def persistence_stats(self) -> PersistenceStats:
        """Counters of the persistence pipeline (cumulative over stages)."""
        return self._stats_recorder.snapshot()

    def pending_artifacts(self) -> list[PendingJob]:
        """Jobs admitted and not finished yet, in submission order."""
        return self._pipeline.pending() if self._pipeline is not None else []

    def flush(self, timeout: float | None = None, *, progress: bool = True) -> bool:
        """Wait until every submitted file is persisted (or failed).

        Shows a progress bar when the wait takes longer than a second. Returns False
        if ``timeout`` seconds passed first; the keys still pending are then logged
        and available from :meth:`pending_artifacts`.
        """
        pipeline = self._pipeline
        if pipeline is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        first = 1.0 if timeout is None else min(1.0, timeout)
        if pipeline.flush(first):
            return True
        pending = pipeline.pending()
        sizes = {_job_id(job): _job_bytes(job) for job in pending}
        bar = _progress_bar(sum(sizes.values()), enabled=progress, unit="B", files=len(pending))
        try:
            if drain_with_progress(pipeline, bar, sizes, deadline):
                return True
        finally:
            if bar is not None:
                bar.close()
        keys = [job.key for job in pipeline.pending()]
        log.warning(
            "flush timed out after %ss; not yet persisted: %s", timeout, ", ".join(keys) or "-"
        )
        return False

    # -- Lightning hooks ------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if trainer.is_global_zero:
            self._open_outbox(pl_module)
            self._ensure_pipeline()
            from lamin_lightning._recovery import recover_at_setup

            recover_at_setup(self, trainer)
            self._set_up = True
            deferred, self._deferred_files = self._deferred_files, []
            for path, kind in deferred:
                self.submit_file(trainer, path, kind)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._shutdown(raise_errors=True)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            super().on_exception(trainer, pl_module, exception)
        except Exception:
            log.exception("saving a checkpoint on exception failed")
        try:
            self._shutdown(raise_errors=False)
        except Exception:
            log.exception("flushing checkpoint persistence after an exception failed")

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._surface_failures()
        if trainer.is_global_zero:
            # Move an older file of this name aside (a rename) instead of letting
            # Lightning rewrite it: the rewrite would free its blocks on this thread,
            # or rewrite in place the inode a queued upload still reads.
            self._await_staging(filepath)
            if os.path.exists(filepath) and not self._stager(filepath).trash(filepath):
                detach_before_rewrite(filepath)
        write: Callable[[], None] | None = None
        if self.async_write and self._async_write_supported(trainer):
            write = self._snapshot_for_async_write(trainer, filepath)
        else:
            super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        try:
            self._submit_hparams_once(trainer)
            self._submit_checkpoint(trainer, filepath, write=write)
        except BaseException:
            if isinstance(write, _HostWrite):
                write.abandon()  # or its snapshot slot would stay taken: the next save hangs
            raise
        if self.log_stats:
            log_persistence_stats(trainer, self.persistence_stats)

    def _async_write_supported(self, trainer: pl.Trainer) -> bool:
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        supported = type(strategy.checkpoint_io) is TorchCheckpointIO and isinstance(
            strategy, SingleDeviceStrategy | DDPStrategy
        )
        if not supported and not self._async_write_refused:
            self._async_write_refused = True
            rank_zero_warn(
                f"async_write=True needs the default TorchCheckpointIO and a single-device or"
                f" DDP strategy; this trainer has {type(strategy).__name__} with"
                f" {type(strategy.checkpoint_io).__name__}. Writing checkpoints synchronously."
            )
        return supported

    def _snapshot_for_async_write(self, trainer: pl.Trainer, filepath: str) -> _HostWrite | None:
        """Do what ``ModelCheckpoint._save_checkpoint`` does, but write later.

        Returns the write to run in the background (rank zero), or None.
        """
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        write: _HostWrite | None = None
        if trainer.is_global_zero:
            if self._snapshotter is None:
                self._snapshotter = Snapshotter(self.max_snapshots)
            snapshotter = self._snapshotter
            slot, waited = snapshotter.acquire()
            if waited:
                self._stats_recorder.add(admission_waits=1, training_stall_seconds=waited)
                self._stats_recorder.record_max("max_training_stall_seconds", waited)
            try:
                host = snapshotter.snapshot(checkpoint, slot)
            except BaseException:
                snapshotter.release(slot)
                raise
            scratch = self._staging_root(filepath) / "writing"
            write = _HostWrite(snapshotter, slot, host, filepath, scratch)
        del checkpoint
        try:
            trainer.strategy.barrier("Trainer.save_checkpoint")
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
        except BaseException:
            if write is not None:
                write.abandon()
            raise
        return write

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        key = (
            self.resolve_artifact_key(trainer, filepath, "checkpoint")
            if trainer.is_global_zero
            else ""
        )
        stager: Stager | None = None
        job_id: str | None = None
        if trainer.is_global_zero:
            # Journaled before the file goes: a crash in between leaves a removal to replay,
            # never an artifact whose checkpoint Lightning already dropped.
            job_id = self._journal(
                trainer, operation="remove", kind="checkpoint", key=key, local_path=filepath
            )
            self._await_staging(filepath)
            stager = self._stager(filepath)
            # A rename now, the deletion on the intake thread (Lightning's own removal
            # below then finds nothing to do).
            stager.trash(filepath)
        super()._remove_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        self._submit(
            JobSpec(
                operation="remove",
                key=key,
                commit=partial(self._commit_removal, trainer, key, Path(filepath)),
                fail=partial(self._fail, trainer, "checkpoint", key, Path(filepath), "remove"),
                prepare=partial(_empty_trash, stager) if stager is not None else None,
                payload={"kind": "checkpoint", "local_path": str(filepath)},
            ),
            job_id,
        )

    # -- submission (training thread) -----------------------------------------------------

    def _ensure_pipeline(self) -> PersistencePipeline:
        if self._pipeline is None:
            pipeline = PersistencePipeline(
                max_workers=self.max_workers,
                max_pending=self.max_pending,
                retry=self.retry,
                deliver=self._deliver,
                thread_finalizer=self.thread_finalizer,
                stats=self._stats_recorder,
            )
            pipeline.start()
            self._pipeline = pipeline
        return self._pipeline

    def _submit(self, spec: JobSpec, job_id: str | None = None) -> None:
        pipeline = self._ensure_pipeline()
        if job_id is not None and self._outbox is not None:
            spec = settling(spec, self._outbox, job_id)
        pipeline.submit(spec)

    # -- the durable outbox (guarantee 8) -------------------------------------------------

    def outbox_context(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What a replay of this callback's jobs needs beyond the job itself. Training thread.

        Must be JSON-serialisable. Subclasses add what their ``recovery_job`` reads
        (the run, the key prefix, the database).
        """
        return {}

    def recovery_job(self, entry: dict[str, Any], trainer: pl.Trainer | None) -> JobSpec:
        """Rebuild the job of an outbox entry (after a crash), without live training state.

        ``trainer`` is the trainer of the run that replays it (at ``setup``), or None
        (``lamin-lightning flush``). The job must be idempotent: the crash may have
        happened after the original job committed. Subclasses that persist implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot replay outbox entries; implement recovery_job()"
        )

    @classmethod
    def recovery_instance(cls) -> ArtifactPublishingModelCheckpoint:
        """An instance that can rebuild jobs outside training (``lamin-lightning flush``)."""
        return cls()

    def before_recovery(self) -> None:
        """Called at ``setup`` before replays are queued: drop caches they will outdate."""

    def _outbox_root(self) -> Path:
        return self._staging_root(self.dirpath or ".")

    def _open_outbox(self, pl_module: pl.LightningModule) -> None:
        """Open (and lock) this callback's journal; fail now if the directory is unusable."""
        if self._outbox is not None:
            return
        root = self._outbox_root()
        try:
            if self.outbox:
                self._outbox = _open_journal(root, self)
            else:
                _probe_writable(root)
        except OSError as error:
            if isinstance(error, CheckpointDirectoryError):
                raise
            raise CheckpointDirectoryError(
                error.errno,
                f"lamin-lightning cannot write to the checkpoint directory {self.dirpath!s}"
                f" ({type(error).__name__}: {error.strerror or error}). Pass a writable"
                " dirpath, or fix its permissions or free space.",
            ) from error
        self._check_free_space(pl_module)

    def _check_free_space(self, pl_module: pl.LightningModule) -> None:
        needed = _state_bytes(pl_module)
        try:
            free = shutil.disk_usage(self._outbox_root()).free
        except OSError:
            return
        if free < needed:
            self._close_outbox()
            raise CheckpointDirectoryError(
                errno.ENOSPC,
                f"the checkpoint directory {self.dirpath!s} has {free / 2**20:.1f} MiB free, but"
                f" one checkpoint of this model needs at least {needed / 2**20:.1f} MiB (its"
                " parameters and buffers). Free space or pass another dirpath.",
            )

    def _close_outbox(self) -> None:
        outbox, self._outbox = self._outbox, None
        foreign, self._foreign_outboxes = self._foreign_outboxes, []
        for journal in (outbox, *foreign):
            if journal is not None:
                journal.close()

    def _journal(
        self,
        trainer: pl.Trainer,
        *,
        operation: Literal["save", "remove"],
        kind: ArtifactKind,
        key: str,
        local_path: str | Path,
        staged: Path | None = None,
        snapshot: CheckpointSnapshot | None = None,
    ) -> str | None:
        """Write the job durably into the outbox (fsync) before it is admitted."""
        outbox = self._outbox
        if outbox is None:
            return None
        entry = {
            "v": 1,
            "op": operation,
            "kind": kind,
            "key": key,
            "local_path": os.path.abspath(local_path),
            "staged": str(staged) if staged is not None else None,
            "publisher": _class_path(type(self)),
            "context": self.outbox_context(trainer),
            "snapshot": _snapshot_record(snapshot) if snapshot is not None else None,
            "time": time.time(),
        }
        return outbox.append(entry)

    def _staging_root(self, filepath: str | Path) -> Path:
        return staging_root(self.dirpath if self.dirpath else Path(filepath).parent)

    def _stager(self, filepath: str | Path) -> Stager:
        root = self._staging_root(filepath)
        stager = self._stagers.get(root)
        if stager is None:
            stager = self._stagers[root] = Stager(root)
        return stager

    def _plan_staging(
        self, filepath: str | Path, write: Callable[[], None] | None = None
    ) -> tuple[Path, Callable[[], int]]:
        """Name the staged copy now; stage it later, on the pipeline's intake thread.

        ``write``, if given, writes the file first (``async_write``).
        """
        stager = self._stager(filepath)
        staged = stager.plan(filepath)
        done = threading.Event()
        if len(self._staging_done) > 256:
            self._staging_done = {p: e for p, e in self._staging_done.items() if not e.is_set()}
        self._staging_done[str(filepath)] = done

        def prepare() -> int:
            try:
                if write is not None:
                    write()
                return stager.stage(filepath, staged)[1]
            finally:
                done.set()
                stager.empty_trash()

        return staged, prepare

    def _await_staging(self, filepath: str | Path) -> None:
        """Before Lightning removes or rewrites a file, make sure it has been staged."""
        done = self._staging_done.pop(str(filepath), None)
        if done is not None and not done.wait(timeout=self.flush_timeout):
            log.warning("staging %s did not finish; removing or rewriting it anyway", filepath)

    def _key_or_none(self, trainer: pl.Trainer, path: str | None) -> str | None:
        return self.resolve_artifact_key(trainer, path, "checkpoint") if path else None

    def _snapshot(self, trainer: pl.Trainer, filepath: str, staged: Path) -> CheckpointSnapshot:
        scored = [(path, _as_float(score)) for path, score in self.best_k_models.items()]
        reverse = self.mode == "max"
        ordered = sorted(
            (item for item in scored if item[1] is not None),
            key=lambda item: item[1],  # type: ignore[arg-type, return-value]
            reverse=reverse,
        )
        keys = {path: self.resolve_artifact_key(trainer, path, "checkpoint") for path, _ in ordered}
        return CheckpointSnapshot(
            key=self.resolve_artifact_key(trainer, filepath, "checkpoint"),
            local_path=Path(filepath),
            staged_path=staged,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            monitor=self.monitor,
            mode=self.mode,
            save_weights_only=self.save_weights_only,
            score=_as_float(self.current_score),
            is_best=self.best_model_path == str(filepath),
            best_key=self._key_or_none(trainer, self.best_model_path),
            last_key=self._key_or_none(trainer, self.last_model_path),
            ranking=tuple(keys[path] for path, _ in ordered),
            scores={keys[path]: score for path, score in ordered if score is not None},
        )

    def _submit_checkpoint(
        self, trainer: pl.Trainer, filepath: str, write: Callable[[], None] | None = None
    ) -> None:
        staged, prepare = self._plan_staging(filepath, write)
        snapshot = self._snapshot(trainer, filepath, staged)
        values = self.collect_checkpoint_feature_values(trainer, snapshot)
        if values is not None:
            snapshot = CheckpointSnapshot(**{**snapshot.__dict__, "feature_values": values})
        job_id = self._journal(
            trainer,
            operation="save",
            kind="checkpoint",
            key=snapshot.key,
            local_path=filepath,
            staged=staged,
            snapshot=snapshot,
        )
        self._submit(
            JobSpec(
                operation="save",
                key=snapshot.key,
                transfer=partial(
                    _as_pipeline_call,
                    self.save_checkpoint_artifact,
                    trainer,
                    staged,
                    feature_values=values,
                ),
                commit=partial(self._commit_checkpoint, trainer, snapshot),
                fail=partial(
                    self._fail, trainer, "checkpoint", snapshot.key, Path(filepath), "save"
                ),
                discard=partial(release_staged, staged),
                prepare=prepare,
                payload={"kind": "checkpoint", "local_path": str(filepath), "staged": str(staged)},
            ),
            job_id,
        )

    def submit_file(self, trainer: pl.Trainer, path: str | Path, kind: ArtifactKind) -> None:
        """Stage a config or hparams file and submit its save. Training thread, rank zero.

        Used by :class:`SaveConfigCallback`; the save runs ``save_config_artifact``
        or ``save_hparams_artifact`` in the background.
        """
        if kind == "checkpoint":
            raise ValueError("checkpoints are submitted by Lightning's own save hooks")
        if not self._set_up:
            # Other callbacks' setup runs before ours (Lightning moves checkpoint callbacks
            # last): submit once our setup opened the outbox, so the job is journaled too.
            self._deferred_files.append((Path(path), kind))
            return
        key = self.resolve_artifact_key(trainer, path, kind)
        staged, prepare = self._plan_staging(path)
        job_id = self._journal(
            trainer, operation="save", kind=kind, key=key, local_path=path, staged=staged
        )
        hook: Callable[[pl.Trainer, Path], Any] = (
            self.save_config_artifact if kind == "config" else self.save_hparams_artifact
        )
        self._submit(
            JobSpec(
                operation="save",
                key=key,
                transfer=partial(_as_pipeline_call, hook, trainer, staged),
                commit=partial(self._commit_file, trainer, kind, key, Path(path), staged),
                fail=partial(self._fail, trainer, kind, key, Path(path), "save"),
                discard=partial(release_staged, staged),
                prepare=prepare,
                payload={"kind": kind, "local_path": str(path), "staged": str(staged)},
            ),
            job_id,
        )

    def hparams_path(self, trainer: pl.Trainer) -> Path | None:
        """Where the first logger wrote ``hparams.yaml``, if anywhere. Training thread."""
        if not trainer.loggers:
            return None
        log_dir = getattr(trainer.loggers[0], "log_dir", None)
        if log_dir is None:
            return None
        path = Path(log_dir) / "hparams.yaml"
        return path if path.exists() else None

    def _submit_hparams_once(self, trainer: pl.Trainer) -> None:
        if self._hparams_submitted:
            return
        path = self.hparams_path(trainer)
        if path is not None:
            self.submit_file(trainer, path, "hparams")
            self._hparams_submitted = True

    # -- committer thread -----------------------------------------------------------------

    def _storage_uri(self, key: str, artifact: Any) -> str:
        uri = self.resolve_artifact_storage_uri(artifact)
        self._storage_uris[key] = uri
        return uri

    def _commit_checkpoint(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot, artifact: Any
    ) -> ArtifactSavedEvent:
        self.commit_checkpoint_artifact(trainer, snapshot, artifact)
        self._persisted[snapshot.key] = artifact
        uri = self._storage_uri(snapshot.key, artifact)
        release_staged(snapshot.staged_path)
        return ArtifactSavedEvent(
            kind="checkpoint",
            key=snapshot.key,
            local_path=snapshot.local_path,
            trainer=trainer,
            artifact=artifact,
            storage_uri=uri,
        )

    def _commit_file(
        self,
        trainer: pl.Trainer,
        kind: ArtifactKind,
        key: str,
        local_path: Path,
        staged: Path,
        artifact: Any,
    ) -> ArtifactSavedEvent | None:
        release_staged(staged)
        if artifact is None:
            return None
        return ArtifactSavedEvent(
            kind=kind,
            key=key,
            local_path=local_path,
            trainer=trainer,
            artifact=artifact,
            storage_uri=self._storage_uri(key, artifact),
        )

    def _commit_removal(
        self, trainer: pl.Trainer, key: str, local_path: Path, _: Any
    ) -> ArtifactRemovedEvent:
        known = self._persisted.get(key)
        uri = self._storage_uris.get(key) if known is not None else None
        removed = self.remove_checkpoint_artifact(trainer, key, known)
        self._persisted.pop(key, None)
        self._storage_uris.pop(key, None)
        if removed is not None and uri is None:
            uri = self.resolve_artifact_storage_uri(removed)
        return ArtifactRemovedEvent(
            kind="checkpoint",
            key=key,
            local_path=local_path,
            trainer=trainer,
            artifact=removed,
            storage_uri=uri if removed is not None else None,
        )

    def _fail(
        self,
        trainer: pl.Trainer,
        kind: ArtifactKind,
        key: str,
        local_path: Path,
        operation: Literal["save", "remove"],
        error: BaseException,
        attempts: int,
    ) -> ArtifactFailedEvent:
        event = ArtifactFailedEvent(
            kind=kind,
            key=key,
            local_path=local_path,
            trainer=trainer,
            error=error,
            attempts=attempts,
            operation=operation,
        )
        with self._lock:
            self._unreported_failures.append(event)
        return event

    # -- delivery thread ------------------------------------------------------------------

    def _deliver(self, event: AnyArtifactEvent) -> None:
        if isinstance(event, ArtifactSavedEvent):
            self._latest_artifacts[event.kind] = event.artifact
            hook, method = self.on_artifact_saved, "on_artifact_saved"
        elif isinstance(event, ArtifactRemovedEvent):
            hook, method = self.on_artifact_removed, "on_artifact_removed"  # type: ignore[assignment]
        else:
            hook, method = self.on_artifact_failed, "on_artifact_failed"  # type: ignore[assignment]
        self._last_artifact_event = event
        try:
            hook(event)  # type: ignore[arg-type]
        except Exception:
            log.exception("%s.%s raised for %r", type(self).__name__, method, event.key)
        for observer in tuple(self._artifact_observers):
            callback = getattr(observer, method, None)
            if not callable(callback):
                continue
            try:
                callback(event)
            except Exception:
                log.exception("observer %r raised in %s for %r", observer, method, event.key)

    # -- shutdown and errors (training thread) --------------------------------------------

    def _take_failures(self) -> list[ArtifactFailedEvent]:
        with self._lock:
            failures, self._unreported_failures = self._unreported_failures, []
        return failures

    def _surface_failures(self) -> None:
        failures = self._take_failures()
        if not failures:
            return
        error = PersistenceError(failures)
        if self.on_error == "raise":
            raise error
        rank_zero_warn(str(error), category=UserWarning)

    def _shutdown(self, *, raise_errors: bool) -> None:
        self._set_up = False
        pipeline = self._pipeline
        if pipeline is None:
            self._close_outbox()
            return
        try:
            flushed = self.flush(self.flush_timeout)
            if not flushed:
                keys = [job.key for job in pipeline.pending()]
                warnings.warn(
                    f"lamin-lightning: persistence did not finish within flush_timeout="
                    f"{self.flush_timeout}s; not persisted: {', '.join(keys)}. Their local"
                    f" files are kept under {self._staging_root(self.dirpath or '.')} and the"
                    " jobs stay in its outbox: run `lamin-lightning flush"
                    f" {self.dirpath or '.'}`, or start training again with this dirpath.",
                    UserWarning,
                    stacklevel=2,
                )
        finally:
            pipeline.stop(timeout=0)
            self._pipeline = None
            for stager in self._stagers.values():
                stager.empty_trash()
            self._close_outbox()
        if raise_errors:
            self._surface_failures()
        else:
            for failure in self._take_failures():
                log.error(
                    "not persisted: %s %r (%s: %s)",
                    failure.operation,
                    failure.key,
                    type(failure.error).__name__,
                    failure.error,
                )


def _progress_bar(total: int, *, enabled: bool, unit: str = "file", files: int = 0) -> Any:
    """A tqdm bar (as Lightning uses) over files, or over bytes with ``unit="B"``."""
    if not enabled or total <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return None
    bar = tqdm(
        total=total,
        desc="lamin-lightning: persisting checkpoints",
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        leave=False,
    )
    if files:
        bar.set_postfix_str(f"0/{files} files")
    return bar


class _HostWrite:
    """The background write of one host snapshot (``async_write``); frees its slot once.

    Called on the intake thread, it writes the file and gives the slot back. If the
    save fails on the training thread before the job is submitted, :meth:`abandon`
    gives the slot back instead (a slot never freed would block every later save);
    a write abandoned that way refuses to run, since its buffers may be reused.
    """

    def __init__(
        self,
        snapshotter: Snapshotter,
        slot: SnapshotSlot,
        host: dict[str, Any],
        filepath: str,
        scratch: Path,
    ) -> None:
        self._snapshotter = snapshotter
        self._slot = slot
        self._host: dict[str, Any] | None = host
        self._filepath = filepath
        self._scratch = scratch
        self._lock = threading.Lock()
        self._state: Literal["pending", "writing", "abandoned"] = "pending"

    def __call__(self) -> None:
        with self._lock:
            if self._state != "pending":
                raise RuntimeError(f"the snapshot of {self._filepath} was abandoned; not written")
            self._state = "writing"
        try:
            write_atomically(self._host, self._filepath, self._scratch, torch.save)
        finally:
            self._host = None
            self._snapshotter.release(self._slot)

    def abandon(self) -> None:
        """Give the slot back if the write has not started (it then never runs)."""
        with self._lock:
            if self._state != "pending":
                return
            self._state = "abandoned"
        self._host = None
        self._snapshotter.release(self._slot)


def drain_with_progress(
    pipeline: PersistencePipeline,
    bar: Any,
    sizes: Mapping[tuple[str, str], int],
    deadline: float | None,
) -> bool:
    """Wait for ``pipeline`` to finish (False at ``deadline``), advancing ``bar`` over
    ``sizes`` (bytes by :func:`_job_id`) as jobs leave it."""
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        done = pipeline.flush(0.25 if remaining is None else min(0.25, remaining))
        if bar is not None:
            left = {_job_id(job) for job in pipeline.pending()}
            finished = [job_id for job_id in sizes if job_id not in left]
            bar.n = sum(sizes[job_id] for job_id in finished)
            bar.set_postfix_str(f"{len(finished)}/{len(sizes)} files", refresh=False)
            bar.refresh()
        if done:
            return True


def _job_id(job: PendingJob) -> tuple[str, str]:
    payload = job.payload if isinstance(job.payload, Mapping) else {}
    return (job.key, str(payload.get("outbox_id") or payload.get("staged") or job.seq))


def _job_bytes(job: PendingJob) -> int:
    """Bytes a pending job still has to upload (its staged file), 0 when unknown."""
    payload = job.payload if isinstance(job.payload, Mapping) else {}
    if job.operation != "save":
        return 0
    for name in ("staged", "local_path"):
        path = payload.get(name)
        if path:
            try:
                return os.stat(path).st_size
            except OSError:
                continue
    return 0


def _class_path(cls: type) -> str:
    """``module:qualname`` of the nearest importable class (``__main__`` is not)."""
    for klass in cls.__mro__:
        if klass.__module__ != "__main__" and "<locals>" not in klass.__qualname__:
            return f"{klass.__module__}:{klass.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"  # pragma: no cover


def _feature_name(key: Any) -> str:
    return str(getattr(key, "name", key))


def _snapshot_record(snapshot: CheckpointSnapshot) -> dict[str, Any]:
    """A checkpoint snapshot as JSON-ready data (feature objects become their names)."""
    values = snapshot.feature_values or {}
    return {
        "global_step": snapshot.global_step,
        "epoch": snapshot.epoch,
        "monitor": snapshot.monitor,
        "mode": snapshot.mode,
        "save_weights_only": snapshot.save_weights_only,
        "score": snapshot.score,
        "is_best": snapshot.is_best,
        "best_key": snapshot.best_key,
        "last_key": snapshot.last_key,
        "ranking": list(snapshot.ranking),
        "scores": dict(snapshot.scores),
        "features": [
            [_feature_name(k), _json_value(v), not isinstance(k, str)] for k, v in values.items()
        ],
    }


def snapshot_from_record(
    record: dict[str, Any], *, key: str, local_path: Path, staged_path: Path
) -> CheckpointSnapshot:
    """The inverse of the outbox's snapshot record (feature values keyed by name)."""
    return CheckpointSnapshot(
        key=key,
        local_path=local_path,
        staged_path=staged_path,
        global_step=int(record.get("global_step", 0)),
        epoch=int(record.get("epoch", 0)),
        monitor=record.get("monitor"),
        mode=record.get("mode", "min"),
        save_weights_only=bool(record.get("save_weights_only", False)),
        score=record.get("score"),
        is_best=bool(record.get("is_best", False)),
        best_key=record.get("best_key"),
        last_key=record.get("last_key"),
        ranking=tuple(record.get("ranking", ())),
        scores=dict(record.get("scores", {})),
        feature_values={name: value for name, value, _ in record.get("features", [])} or None,
    )


def _open_journal(root: Path, callback: ArtifactPublishingModelCheckpoint) -> Outbox:
    """Open and lock the journal named after ``callback`` (the first free one of its name)."""
    from lamin_lightning._recovery import outbox_digest

    digest = outbox_digest(callback)
    for attempt in range(16):
        suffix = f"-{attempt}" if attempt else ""
        outbox = Outbox(root / f"outbox-{digest}{suffix}.jsonl")
        try:
            outbox.open()
        except OutboxBusyError:
            continue  # an identical callback in this trainer holds it
        return outbox
    raise CheckpointDirectoryError(
        f"every outbox journal for this callback under {root} is in use; is another"
        " training process writing checkpoints to the same dirpath?"
    )


def _probe_writable(root: Path) -> None:
    """Create ``root`` and write (and remove) a file in it; raise OSError if that fails."""
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".probe-{os.getpid()}-{threading.get_ident()}"
    with open(probe, "wb") as handle:
        handle.write(b"lamin-lightning")
        handle.flush()
        os.fsync(handle.fileno())
    probe.unlink()


def _json_value(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    return str(value)


def _state_bytes(pl_module: pl.LightningModule) -> int:
    """Bytes of a module's parameters and buffers: a lower bound of its checkpoint size."""
    total = 0
    try:
        for tensor in (*pl_module.parameters(), *pl_module.buffers()):
            total += tensor.numel() * tensor.element_size()
    except Exception:  # pragma: no cover - an exotic module: skip the check
        return 0
    return total


def _empty_trash(stager: Stager) -> int:
    stager.empty_trash()
    return 0
