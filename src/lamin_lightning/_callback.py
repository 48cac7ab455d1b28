"""ArtifactPublishingModelCheckpoint: the generic Lightning layer.

Owns everything Lightning-specific: which hook stages a file, when jobs are
submitted, the metadata snapshot (the job record) taken on the training thread,
flushing at teardown, and rank zero only. How a file is persisted is left to
subclasses: they override the ``save_*`` hooks (worker threads) and
``commit_checkpoint_artifact`` / ``remove_checkpoint_artifact`` (the committer
thread, in submission order), and name the store that replays their records after
a crash (:attr:`store_name`, :meth:`replay_store`).

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
import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lamin_lightning._errors import PersistenceError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactObserver,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import CheckpointSnapshot, JobRecord, json_value
from lamin_lightning._local_write import (
    HostWrite,
    Snapshotter,
    async_write_supported,
    snapshot_checkpoint,
)
from lamin_lightning._options import (
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_WORKERS,
    OnError,
    as_float,
    validate_bool,
    validate_flush_timeout,
    validate_int,
    validate_on_error,
    validate_retry,
)
from lamin_lightning._pipeline import PendingJob
from lamin_lightning._progress import flush_with_progress
from lamin_lightning._replay import pending_in, unfinished
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._staging import staging_root
from lamin_lightning._stats import PersistenceStats, StatsRecorder
from lamin_lightning._submit import Submitter
from lamin_lightning._surface import ArtifactHooks, HookStore
from lamin_lightning._telemetry import log_final_persistence_stats, log_persistence_stats
from lamin_lightning.store import ArtifactStore, StoreResolver

log = logging.getLogger("lamin_lightning")


class ArtifactPublishingModelCheckpoint(ArtifactHooks, ModelCheckpoint):
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
        outbox: Journal every job next to the checkpoints before ``_save_checkpoint``
            returns, so that the next ``setup`` in this dirpath, or ``lamin-lightning
            flush``, finishes what a process crash interrupted. One write of about
            1.7 kB per job into the page cache (about 0.05 ms, whatever the disk is
            doing); the fsync runs in the background, grouped, before the job's upload.
            ``False`` skips the journal (no crash recovery); the directory is still
            checked at ``setup``. Default True.
        **kwargs: Passed to ``ModelCheckpoint``.
    """

    store_name: ClassVar[str] = ""
    """Name of the store that replays this callback's records (see :mod:`lamin_lightning.store`).

    Empty: the records are journaled but only a store registered under the class's
    name can replay them; subclasses that persist set it and :meth:`replay_store`.
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
        self.max_workers = validate_int("max_workers", max_workers, 1)
        self.max_pending = validate_int("max_pending", max_pending, 1)
        self.retry = validate_retry(retry)
        self.flush_timeout = validate_flush_timeout(flush_timeout)
        self.on_error: OnError = validate_on_error(on_error)
        self.async_write = validate_bool("async_write", async_write)
        self.max_snapshots = validate_int("max_snapshots", max_snapshots, 1)
        self.log_stats = validate_bool("log_stats", log_stats)
        self.outbox = validate_bool("outbox", outbox)
        if artifact_observers is not None and not isinstance(artifact_observers, list | tuple):
            raise ValueError(
                "artifact_observers must be a list of observers, got"
                f" {type(artifact_observers).__name__}"
            )
        super().__init__(*args, **kwargs)
        # Lightning picks the dirpath at setup when the user gives none (a new logger
        # version each run): then earlier versions' outboxes are ours to finish too.
        self._user_dirpath = dirpath is not None
        self._init_surface(artifact_observers or [])
        self._stats_recorder = StatsRecorder()
        self._hparams_submitted = False
        self._trainer: pl.Trainer | None = None
        self._init_runtime()

    # -- runtime state: created lazily, dropped when pickled ------------------------------

    def _init_runtime(self) -> None:
        self._submitter: Submitter | None = None
        self._state_lock: threading.Lock | None = None
        self._unreported_failures: list[ArtifactFailedEvent] = []
        self._persisted: dict[str, Any] = {}
        self._snapshotter: Snapshotter | None = None
        self._async_write_refused = False
        self._set_up = False
        self._deferred_files: list[tuple[Path, ArtifactKind]] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        fresh = self.__class__.__new__(self.__class__)
        ArtifactPublishingModelCheckpoint._init_runtime(fresh)
        state.update(fresh.__dict__)
        state["_escalated"] = type(self._escalated)()
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

    @property
    def _pipeline(self) -> Any:
        return self._submitter.pipeline if self._submitter is not None else None

    @property
    def _outbox(self) -> Any:
        return self._submitter.outbox if self._submitter is not None else None

    def _ensure_submitter(self) -> Submitter:
        if self._submitter is None:
            self._submitter = Submitter(
                max_workers=self.max_workers,
                max_pending=self.max_pending,
                retry=self.retry,
                deliver=self._deliver,
                thread_finalizer=self.thread_finalizer,
                stats=self._stats_recorder,
                # Lightning must not delete or rewrite a file before it is staged, or its
                # upload is lost: wait for the staging, whatever flush_timeout says (only a
                # hung disk can make this wait long, and then Lightning's write hangs too).
                staging_timeout=None,
            )
        return self._submitter

    # -- replay after a crash ----------------------------------------------------------------

    def store_context(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What the store needs to replay this callback's jobs beyond the record. Training thread.

        Must be JSON-serialisable (the instance, the run, the key prefix, ...).
        """
        del trainer
        return {}

    def replay_store(self) -> ArtifactStore | None:
        """The store that replays records named :attr:`store_name` at this callback's ``setup``.

        None: use the registry's store of that name.
        """
        return None

    # -- public async controls ------------------------------------------------------------

    @property
    def persistence_stats(self) -> PersistenceStats:
        """Counters of the persistence pipeline (cumulative over stages)."""
        return self._stats_recorder.snapshot()

    def pending_artifacts(self) -> list[PendingJob]:
        """Jobs admitted and not finished yet, in submission order."""
        pipeline = self._pipeline
        return pipeline.pending() if pipeline is not None else []

    def flush(self, timeout: float | None = None, *, progress: bool = True) -> bool:
        """Wait until every submitted file is persisted (or failed).

        Shows a progress bar when the wait takes longer than a second. Returns False
        if ``timeout`` seconds passed first; the keys still pending are then logged
        and available from :meth:`pending_artifacts`.
        """
        pipeline = self._pipeline
        return pipeline is None or flush_with_progress(pipeline, timeout, progress=progress)

    # -- Lightning hooks ------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if trainer.is_global_zero:
            submitter = self._ensure_submitter()
            root = self._staging_root(self.dirpath or ".")
            submitter.open_outbox(
                root, _journal_digest(self), enabled=self.outbox, dirpath=self.dirpath
            )
            submitter.check_free_space(root, _state_bytes(pl_module), self.dirpath)
            submitter.ensure_pipeline()
            self._replay_unfinished(trainer)
            self._set_up = True
            deferred, self._deferred_files = self._deferred_files, []
            for path, kind in deferred:
                self.submit_file(trainer, path, kind)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        try:
            self._shutdown(raise_errors=True)
        finally:
            if self.log_stats:  # the final values, after the flush (loggers finalize next)
                log_final_persistence_stats(trainer, self.persistence_stats, stage)

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
            self._ensure_submitter().move_aside(self._staging_root(filepath), filepath)
        write: HostWrite | None = None
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
            if write is not None:
                write.abandon()  # or its snapshot slot would stay taken: the next save hangs
            raise
        if self.log_stats:
            log_persistence_stats(trainer, self.persistence_stats)

    def _async_write_supported(self, trainer: pl.Trainer) -> bool:
        supported, why = async_write_supported(trainer)
        if not supported and not self._async_write_refused:
            self._async_write_refused = True
            rank_zero_warn(why)
        return supported

    def _snapshot_for_async_write(self, trainer: pl.Trainer, filepath: str) -> HostWrite | None:
        """Do what ``ModelCheckpoint._save_checkpoint`` does, but write later.

        Returns the write to run in the background (rank zero), or None.
        """
        if self._snapshotter is None:
            self._snapshotter = Snapshotter(self.max_snapshots)
        write = snapshot_checkpoint(
            trainer,
            self._snapshotter,
            filepath,
            weights_only=self.save_weights_only,
            scratch=self._staging_root(filepath) / "writing",
            stats=self._stats_recorder,
        )
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
        if not trainer.is_global_zero:
            super()._remove_checkpoint(trainer, filepath)
            return
        submitter = self._ensure_submitter()
        record = self._record(trainer, "remove", "checkpoint", filepath)
        # Journaled before the file goes: a crash in between leaves a removal to replay,
        # never an artifact whose checkpoint Lightning already dropped.
        settle = submitter.journal(record)
        # A rename now, the deletion on the intake thread (Lightning's own removal
        # below then finds nothing to do).
        empty_trash = submitter.trash_for_removal(self._staging_root(filepath), filepath)
        super()._remove_checkpoint(trainer, filepath)
        self._submit_record(trainer, record, prepare=empty_trash, journaled=settle)

    # -- submission (training thread) -----------------------------------------------------

    def _staging_root(self, filepath: str | Path) -> Path:
        return staging_root(self.dirpath if self.dirpath else Path(filepath).parent)

    def _key(self, trainer: pl.Trainer, path: str | Path, kind: ArtifactKind) -> str:
        return self.resolve_artifact_key(trainer=trainer, filepath=path, kind=kind)

    def _record(
        self,
        trainer: pl.Trainer,
        op: Literal["save", "remove"],
        kind: ArtifactKind,
        path: str | Path,
        *,
        staged: Path | None = None,
        snapshot: CheckpointSnapshot | None = None,
    ) -> JobRecord:
        return JobRecord(
            op=op,
            kind=kind,
            key=snapshot.key if snapshot is not None else self._key(trainer, path, kind),
            local_path=os.path.abspath(path),
            staged_path=str(staged) if staged is not None else None,
            store=self.store_name or _class_path(type(self)),
            context=self.store_context(trainer),
            checkpoint=snapshot,
            submitted_at=time.time(),
        )

    def _submit_record(
        self,
        trainer: pl.Trainer,
        record: JobRecord,
        *,
        prepare: Callable[[], int] | None,
        journaled: Any = None,
    ) -> None:
        self._ensure_submitter().submit(
            record,
            HookStore(self, trainer),
            trainer=trainer,
            prepare=prepare,
            known=self._persisted.get,
            outcome=self._on_outcome,
            journaled=journaled,
        )

    def _snapshot(self, trainer: pl.Trainer, filepath: str, staged: Path) -> CheckpointSnapshot:
        scored = [(path, as_float(score)) for path, score in self.best_k_models.items()]
        ordered = sorted(
            (item for item in scored if item[1] is not None),
            key=lambda item: item[1],  # type: ignore[arg-type, return-value]
            reverse=self.mode == "max",
        )
        keys = {path: self._key(trainer, path, "checkpoint") for path, _ in ordered}
        best, last = self.best_model_path, self.last_model_path
        return CheckpointSnapshot(
            key=self._key(trainer, filepath, "checkpoint"),
            local_path=Path(filepath),
            staged_path=staged,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            monitor=self.monitor,
            mode=self.mode,
            save_weights_only=self.save_weights_only,
            score=as_float(self.current_score),
            is_best=best == str(filepath),
            best_key=self._key(trainer, best, "checkpoint") if best else None,
            last_key=self._key(trainer, last, "checkpoint") if last else None,
            ranking=tuple(keys[path] for path, _ in ordered),
            scores={keys[path]: score for path, score in ordered if score is not None},
        )

    def _submit_checkpoint(
        self, trainer: pl.Trainer, filepath: str, write: Callable[[], None] | None = None
    ) -> None:
        staged, prepare = self._ensure_submitter().plan_staging(
            self._staging_root(filepath), filepath, write
        )
        snapshot = self._snapshot(trainer, filepath, staged)
        values = self.collect_checkpoint_feature_values(trainer, snapshot)
        if values:
            snapshot = _with_features(snapshot, values)
        record = self._record(
            trainer, "save", "checkpoint", filepath, staged=staged, snapshot=snapshot
        )
        self._submit_record(trainer, record, prepare=prepare)

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
        staged, prepare = self._ensure_submitter().plan_staging(self._staging_root(path), path)
        record = self._record(trainer, "save", kind, path, staged=staged)
        self._submit_record(trainer, record, prepare=prepare)

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

    def _replay_unfinished(self, trainer: pl.Trainer) -> int:
        """Queue what earlier runs left behind (see :func:`_replay.unfinished`), first.

        The replays commit before any new job, in their original order (the pipeline
        commits in submission order); training does not wait for them beyond the usual
        backpressure. Replays that fail stay in the outbox, warned about.
        """
        submitter = self._ensure_submitter()
        own = submitter.outbox
        if own is None:
            return 0
        layout = None
        if not self._user_dirpath and trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version
            layout = (
                Path(getattr(logger, "save_dir", None) or trainer.default_root_dir)
                / str(logger.name),
                version if isinstance(version, str) else f"version_{version}",
            )
        others = unfinished(
            own,
            skip_digests={
                _journal_digest(other)
                for other in getattr(trainer, "callbacks", [])
                if other is not self and isinstance(other, ArtifactPublishingModelCheckpoint)
            },
            dirpath=Path(self.dirpath or "."),
            logger_layout=layout,
        )
        submitter.foreign.extend(others)
        work = pending_in([own, *others])
        if not work:
            return 0
        mine = self.replay_store()
        resolver = StoreResolver({self.store_name: mine} if mine is not None else None)
        return submitter.replay(work, resolver, trainer=trainer, outcome=self._on_outcome)

    # -- committer thread -----------------------------------------------------------------

    def _on_outcome(self, record: JobRecord, event: AnyArtifactEvent) -> None:
        if isinstance(event, ArtifactSavedEvent):
            if record.kind == "checkpoint":
                self._persisted[record.key] = event.artifact
        elif isinstance(event, ArtifactRemovedEvent):
            self._persisted.pop(record.key, None)
        elif not event.recovered:
            # A replay that fails again is warned about and stays in the outbox: it is an
            # earlier run's job, and must not fail this one.
            with self._lock:
                self._unreported_failures.append(event)

    # -- shutdown and errors (training thread) --------------------------------------------

    def _take_failures(self) -> list[ArtifactFailedEvent]:
        with self._lock:
            failures, self._unreported_failures = self._unreported_failures, []
        return failures

    def _take_all_escalated(self) -> list[BaseException]:
        pipeline = self._pipeline
        from_pipeline = pipeline.take_escalated() if pipeline is not None else []
        return [*from_pipeline, *self._take_escalated()]

    def _surface_failures(self) -> None:
        escalated = self._take_all_escalated()
        if escalated:
            # A hook or observer raised SystemExit (or similar): it asked to stop. The
            # pipeline survived it; the training thread is where it belongs.
            raise escalated[0]
        failures = self._take_failures()
        if not failures:
            return
        error = PersistenceError(failures)
        if self.on_error == "raise":
            raise error
        rank_zero_warn(str(error), category=UserWarning)

    def _shutdown(self, *, raise_errors: bool) -> None:
        self._set_up = False
        submitter = self._submitter
        if submitter is None:
            return
        pipeline = submitter.pipeline
        try:
            if pipeline is not None and not self.flush(self.flush_timeout):
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
            escalated = self._take_all_escalated()
            submitter.stop()
        if raise_errors:
            if escalated:
                raise escalated[0]
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


def _with_features(snapshot: CheckpointSnapshot, values: Mapping[Any, Any]) -> CheckpointSnapshot:
    """``snapshot`` with feature values frozen as JSON, by name (feature objects by ``name``)."""
    named = {str(getattr(k, "name", k)): json_value(v) for k, v in values.items()}
    auto = frozenset(str(getattr(k, "name", k)) for k in values if not isinstance(k, str))
    return CheckpointSnapshot(
        **{**snapshot.__dict__, "feature_values": named, "auto_features": auto}
    )


def _class_path(cls: type) -> str:
    """``module:qualname`` of a class, for records of a callback that names no store."""
    return f"unregistered:{cls.__module__}:{cls.__qualname__}"


def _journal_digest(callback: Any) -> str:
    """The digest that names a callback's journal: its ``state_key``, hashed."""
    return hashlib.sha1(str(callback.state_key).encode("utf-8")).hexdigest()[:12]


def _state_bytes(pl_module: pl.LightningModule) -> int:
    """Bytes of a module's parameters and buffers: a lower bound of its checkpoint size."""
    total = 0
    try:
        for tensor in (*pl_module.parameters(), *pl_module.buffers()):
            total += tensor.numel() * tensor.element_size()
    except Exception:  # pragma: no cover - an exotic module: skip the check
        return 0
    return total
