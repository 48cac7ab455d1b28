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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lamin_lightning._checkpoint_io import WriteTracker
from lamin_lightning._checkpoint_io import compose as compose_checkpoint_io
from lamin_lightning._checkpoint_io import release as release_checkpoint_io
from lamin_lightning._errors import PersistenceError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactObserver,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._evictions import (
    Evictions,
    lightning_state,
    put_right,
    set_lightning_state,
)
from lamin_lightning._jobs import CheckpointSnapshot, JobRecord, json_value
from lamin_lightning._local_write import (
    HostWrite,
    Snapshotter,
    async_write_supported,
    name_taken,
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
from lamin_lightning._write_io import saving_to_snapshots
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
        refuse_remote_dirpath(dirpath)
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
        self._io_writes: WriteTracker | None = None
        self._evictions = Evictions()
        self._save_depth = 0  # inside Lightning's save hooks (which surface failures first)
        self._saving_on_exception = False

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
        # Lightning derives a dirpath from a logger or default_root_dir at setup: refused
        # as in the constructor, before Lightning touches it and before any step runs.
        refuse_remote_dirpath(_derived_dirpath_root(self, trainer), "derived at setup")
        super().setup(trainer, pl_module, stage)
        refuse_remote_dirpath(self.dirpath, "derived at setup")
        self._trainer = trainer
        # Every rank: a CheckpointIO we cannot follow is refused everywhere, not on one rank.
        self._io_writes = compose_checkpoint_io(trainer.strategy)
        if trainer.is_global_zero:
            # Nothing is created here: the journal at the first job, the pipeline's
            # threads with the first job (a replay's, or the first save's).
            submitter = self._ensure_submitter()
            root = self._staging_root(self.dirpath or ".")
            submitter.open_outbox(
                root, _journal_digest(self), enabled=self.outbox, dirpath=self.dirpath
            )
            submitter.check_free_space(root, _state_bytes(pl_module), self.dirpath)
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
            release_checkpoint_io(trainer.strategy, self._io_writes)
            if self.log_stats:  # the final values, after the flush (loggers finalize next)
                log_final_persistence_stats(trainer, self.persistence_stats, stage)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # The emergency checkpoint is written whatever failed before; those failures are
        # reported after it (by the shutdown below), never instead of it.
        self._saving_on_exception = True
        try:
            super().on_exception(trainer, pl_module, exception)
        except Exception:
            log.exception("saving a checkpoint on exception failed")
        finally:
            self._saving_on_exception = False
        try:
            # Ctrl+C: stop now (Lightning ignores a second Ctrl+C while this runs, so a
            # wait could not be cut short); what is pending stays journaled, with its
            # local files, for the next setup or `lamin-lightning flush`. SIGTERM (a
            # preemption) waits up to flush_timeout, documented to fit the grace period.
            self._shutdown(raise_errors=False, wait=not isinstance(exception, KeyboardInterrupt))
        except Exception:
            log.exception("flushing checkpoint persistence after an exception failed")

    @override
    def _save_topk_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        with self._lightning_save(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    @override
    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        with self._lightning_save(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    @contextmanager
    def _lightning_save(self, trainer: pl.Trainer) -> Iterator[None]:
        """Around Lightning's choice of a checkpoint, its state update, save and evictions.

        Before Lightning changes its state for this save: its state is put right for
        background writes that failed, then earlier failures are raised (``on_error=
        "raise"``), so ``best_model_path`` and friends never name a file never written.
        """
        if self._save_depth == 0:
            self._put_state_right(trainer)
            if not self._saving_on_exception:
                self._surface_failures()
        self._save_depth += 1
        self._evictions.save_started(self)
        try:
            yield
        finally:
            self._save_depth -= 1
            self._evictions.save_finished()

    @override
    def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
        # A checkpoint still being written in the background (async_write) takes its name.
        taken = trainer.is_global_zero and (self._fs.exists(filepath) or name_taken(filepath))
        return bool(trainer.strategy.reduce_boolean_decision(taken, all=False))

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._save_depth == 0 and not self._saving_on_exception:
            self._surface_failures()  # a direct call; Lightning's save hooks did it already
        self._evictions.saving()
        background = self.async_write and self._async_write_supported(trainer)
        put_back: Callable[[bool], None] | None = None
        if trainer.is_global_zero and not background:
            # A background write replaces the file atomically, after the previous one was
            # staged (its job comes first on the intake thread): nothing to move.
            put_back = self._ensure_submitter().move_aside(self._staging_root(filepath), filepath)
        write: HostWrite | None = None
        written: Callable[[], None] | None = None  # waits for a CheckpointIO still writing
        try:
            if background:
                write = self._save_in_background(trainer, filepath)
            else:
                since = self._io_writes.mark() if self._io_writes is not None else 0
                super()._save_checkpoint(trainer, filepath)
                if self._io_writes is not None:
                    written = self._io_writes.waiter(filepath, since)
        except BaseException:
            if put_back is not None:
                put_back(False)  # the rewrite failed: the previous file stays
            raise
        if put_back is not None:
            put_back(True)
        if not trainer.is_global_zero:
            return
        try:
            self._submit_hparams_once(trainer)
            self._submit_checkpoint(trainer, filepath, write=write or written)
        except BaseException:
            if write is not None:
                write.abandon()  # or its snapshot slot would stay taken: the next save hangs
            raise
        if write is not None:
            self._evictions.wrote(self, filepath, write)
        if self.log_stats:
            log_persistence_stats(trainer, self.persistence_stats)

    def _async_write_supported(self, trainer: pl.Trainer) -> bool:
        supported, why = async_write_supported(trainer)
        if not supported and not self._async_write_refused:
            self._async_write_refused = True
            rank_zero_warn(why)
        return supported

    def _save_in_background(self, trainer: pl.Trainer, filepath: str) -> HostWrite | None:
        """Lightning's own save (``trainer.save_checkpoint``), with a host snapshot taken
        where its CheckpointIO would write; return the write to run in the background
        (rank zero), or None."""
        if self._snapshotter is None:
            self._snapshotter = Snapshotter(self.max_snapshots)
        snapshotter, scratch = self._snapshotter, self._staging_root(filepath) / "writing"

        def take(checkpoint: dict[str, Any], path: str) -> HostWrite:
            return snapshot_checkpoint(
                checkpoint, snapshotter, path, scratch=scratch, stats=self._stats_recorder
            )

        with saving_to_snapshots(trainer.strategy, take) as io:
            try:
                super()._save_checkpoint(trainer, filepath)
            except BaseException:
                if io.write is not None:
                    io.write.abandon()
                raise
        return io.write

    def _put_state_right(self, trainer: pl.Trainer, *, other_ranks: bool = True) -> int:
        """Undo, in Lightning's state, the saves whose background write failed (see
        :mod:`lamin_lightning._evictions`); evict what that leaves beyond ``save_top_k``."""
        evict = put_right(self, self._evictions.take_failed()) if trainer.is_global_zero else []
        if other_ranks and self.async_write and trainer.world_size > 1:
            shared = trainer.strategy.broadcast((lightning_state(self), evict))
            set_lightning_state(self, shared[0])
            evict = shared[1]
        for path in evict:
            self._remove_checkpoint(trainer, path)
        return len(evict)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not trainer.is_global_zero:
            super()._remove_checkpoint(trainer, filepath)
            return
        submitter = self._ensure_submitter()
        root = self._staging_root(filepath)
        # Evicted in favour of a checkpoint still being written (async_write): removed
        # once that exists, kept if it never will (the record says so for a replay).
        after = self._evictions.replacement_for(filepath)
        record = self._record(trainer, "remove", "checkpoint", filepath, after=after)
        # Journaled before the file goes: a crash in between leaves a removal to replay,
        # never an artifact whose checkpoint Lightning already dropped.
        settle = submitter.journal(record)
        if after is not None:
            remove = submitter.remove_once_written(root, filepath, after)
        else:
            # A rename now, the deletion on the intake thread (Lightning's own removal
            # below then finds nothing to do).
            remove = submitter.trash_for_removal(root, filepath)
            super()._remove_checkpoint(trainer, filepath)
        self._submit_record(trainer, record, prepare=remove, journaled=settle)

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
        after: str | None = None,
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
            after=os.path.abspath(after) if after is not None else None,
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
        if not self.outbox:
            return 0
        own = submitter.outbox
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
            root=self._staging_root(self.dirpath or "."),
            skip_digests={
                _journal_digest(other)
                for other in getattr(trainer, "callbacks", [])
                if other is not self and isinstance(other, ArtifactPublishingModelCheckpoint)
            },
            dirpath=Path(self.dirpath or "."),
            logger_layout=layout,
        )
        submitter.foreign.extend(others)
        work = pending_in([*([own] if own is not None else []), *others])
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

    def _shutdown(self, *, raise_errors: bool, wait: bool = True) -> None:
        self._set_up = False
        submitter = self._submitter
        if submitter is None:
            return
        pipeline = submitter.pipeline
        try:
            timeout = self.flush_timeout if wait else 0
            if wait and pipeline is not None:
                started = time.monotonic()
                submitter.submit_interrupted(timeout)
                if timeout is not None:
                    timeout = max(0.0, timeout - (time.monotonic() - started))
            if pipeline is not None and not self.flush(timeout):
                keys = [job.key for job in pipeline.pending()]
                why = f"within flush_timeout={self.flush_timeout}s" if wait else "(interrupted)"
                warnings.warn(
                    f"lamin-lightning: persistence did not finish {why};"
                    f" not persisted: {', '.join(keys)}. Their local"
                    f" files are kept under {self._staging_root(self.dirpath or '.')} and the"
                    " jobs stay in its outbox: run `lamin-lightning flush"
                    f" {self.dirpath or '.'}`, or start training again with this dirpath.",
                    UserWarning,
                    stacklevel=2,
                )
            elif self._trainer is not None and self._put_state_right(
                self._trainer, other_ranks=False
            ):
                self.flush(self.flush_timeout)  # the evictions that put it right
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


def _derived_dirpath_root(callback: ModelCheckpoint, trainer: pl.Trainer) -> Any:
    """Where Lightning's ``setup`` will put the dirpath it derives (None if it has one)."""
    if callback.dirpath is not None:
        return None
    if trainer.loggers:
        return trainer.loggers[0].save_dir or trainer.default_root_dir
    return trainer.default_root_dir


def refuse_remote_dirpath(dirpath: Any, origin: str = "") -> None:
    """Raise ValueError if ``dirpath`` is a remote (fsspec) location: we stage local files."""
    if dirpath is None:
        return
    text = str(dirpath)
    if "://" in text and not text.startswith("file://"):
        how = f" ({origin})" if origin else ""
        raise ValueError(
            f"dirpath={text!r}{how} is remote; lamin-lightning stages local files and"
            " persists them itself. Pass a local dirpath (or a local default_root_dir) and"
            " let the callback upload."
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
