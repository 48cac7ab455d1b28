"""The submitting layer of the generic callback: job records, built and submitted.

:class:`SubmittingCheckpoint` holds what a callback needs at run time (its
:class:`~lamin_lightning._submit.Submitter`: pipeline, outbox, staging) and turns
Lightning's files into job records on the training thread: keys, the checkpoint's
metadata and feature values frozen at submission, config and hparams files, and, at
``setup``, the replay of what earlier runs left unfinished. The public controls
(``flush``, ``persistence_stats``, ``pending_artifacts``) live here too.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint

from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import CheckpointSnapshot, JobRecord, feature_value, next_sequence
from lamin_lightning._options import OnError, as_float, validate_flush_timeout
from lamin_lightning._pipeline import PendingJob
from lamin_lightning._progress import flush_with_progress
from lamin_lightning._replay import FolderFlags, pending_in, unfinished
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._sigterm import ctrl_c_after
from lamin_lightning._staging import absolute, staging_root
from lamin_lightning._stats import PersistenceStats, StatsRecorder
from lamin_lightning._submit import Submitter, stop_collected
from lamin_lightning._surface import ArtifactHooks, HookStore
from lamin_lightning.store import ArtifactStore, StoreResolver

log = logging.getLogger("lamin_lightning")


class SubmittingCheckpoint(ArtifactHooks, ModelCheckpoint):
    """Builds and submits the job records of one callback (see the module docstring)."""

    store_name: ClassVar[str] = ""
    """Name of the store that replays this callback's records (see :mod:`lamin_lightning.store`).

    Empty: the records are journaled but only a store registered under the class's
    name can replay them; subclasses that persist set it and :meth:`replay_store`.
    """

    # Knobs (set by the constructor of ArtifactPublishingModelCheckpoint).
    max_workers: int
    max_pending: int
    retry: RetryPolicy
    flush_timeout: float | None
    on_error: OnError
    async_write: bool
    max_snapshots: int
    log_stats: bool
    outbox: bool
    # Run-time state (see ArtifactPublishingModelCheckpoint._init_runtime).
    _user_dirpath: bool
    _stats_recorder: StatsRecorder
    _hparams_submitted: bool
    _score_floats: dict[int, tuple[Any, float | None]]
    _trainer: pl.Trainer | None
    _submitter: Submitter | None
    _staging_roots: dict[str, Path]
    _state_lock: threading.Lock | None
    _unreported_failures: list[ArtifactFailedEvent]
    _replaced_failures: dict[int, str]  # id(failure) -> the later job's operation
    _failures_delivered: dict[int, threading.Event]  # id(failure) -> its event delivered
    _left_in_outbox: list[PendingJob]
    _persisted: dict[str, Any]
    _set_up: bool
    _in_stage: bool
    _hparams_looked: Any
    _deferred_files: list[tuple[Path, ArtifactKind]]

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
            # The pipeline's threads hold the callback weakly: a callback dropped without
            # teardown (a direct setup() caller) is collected, and its threads stop then.
            self._submitter = Submitter(
                max_workers=self.max_workers,
                max_pending=self.max_pending,
                retry=self.retry,
                deliver=_weakly(self._deliver),
                thread_finalizer=_weakly(self.thread_finalizer),
                stats=self._stats_recorder,
                # Lightning must not delete or rewrite a file before it is staged, or its
                # upload is lost: wait for the staging, whatever flush_timeout says (only a
                # hung disk can make this wait long, and then Lightning's write hangs too).
                staging_timeout=None,
            )
            stop = weakref.finalize(self, stop_collected, self._submitter, self.flush_timeout)
            stop.atexit = False  # at exit, Python stops the (daemon) threads itself
        return self._submitter

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

    def sibling_replay_store(self) -> ArtifactStore:
        """A new store like :meth:`replay_store`, for the records named :attr:`store_name`
        of another callback's journal that this callback replays at ``setup``: one per
        journal. Only called where :meth:`replay_store` is not None."""
        store = self.replay_store()
        assert store is not None
        return store

    @property
    def persistence_stats(self) -> PersistenceStats:
        """Counters of the persistence pipeline (cumulative over stages)."""
        return self._stats_recorder.snapshot()

    def pending_artifacts(self) -> list[PendingJob]:
        """Jobs admitted and not finished yet, in submission order. After a teardown
        that gave up (``flush_timeout``), those it left in the outbox."""
        pipeline = self._pipeline
        if pipeline is None:
            return list(self._left_in_outbox)
        pending: list[PendingJob] = pipeline.pending()
        return pending

    def flush(self, timeout: float | None = None, *, progress: bool = True) -> bool:
        """Wait until every submitted file is persisted (or failed).

        Shows a progress bar when the wait takes longer than a second. Returns False
        if ``timeout`` seconds passed first; the keys still pending are then logged
        and available from :meth:`pending_artifacts`. After a teardown that gave up,
        False while it left jobs in the outbox (the next ``setup`` or
        ``lamin-lightning flush`` persists them).
        """
        timeout = validate_flush_timeout(timeout, "flush(timeout=...)")
        pipeline = self._pipeline
        if pipeline is None:
            return not self._left_in_outbox
        return flush_with_progress(pipeline, timeout, progress=progress)

    def _staging_root(self, filepath: str | Path) -> Path:
        folder = str(self.dirpath) if self.dirpath else os.path.dirname(os.path.abspath(filepath))
        root = self._staging_roots.get(folder)
        if root is None:
            root = self._staging_roots[folder] = staging_root(folder)
        return root

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
        written_later: bool = False,
        linked: bool = False,
        marks_written: bool = False,
        marks_folder: bool = False,
    ) -> JobRecord:
        local, given = absolute(path), os.fspath(path)
        return JobRecord(
            op=op,
            kind=kind,
            key=snapshot.key if snapshot is not None else self._key(trainer, path, kind),
            local_path=local,
            staged_path=str(staged) if staged is not None else None,
            store=self.store_name or _class_path(type(self)),
            context=self.store_context(trainer),
            checkpoint=snapshot,
            submitted_at=time.time(),
            after=absolute(after) if after is not None else None,
            given_path=given if given != local else None,
            written_later=written_later,
            linked=linked,
            marks_written=marks_written,
            marks_folder=marks_folder,
        )

    def _submit_record(
        self,
        trainer: pl.Trainer,
        record: JobRecord,
        *,
        prepare: Callable[[], int] | None,
        journaled: Any = None,
        write: Callable[[], None] | None = None,
    ) -> None:
        self._ensure_submitter().submit(
            record,
            HookStore(self, trainer),
            trainer=trainer,
            prepare=prepare,
            known=self._persisted.get,
            outcome=self._on_outcome,
            journaled=journaled,
            write=write,
            # The emergency save of a crash (save_on_exception): the crash's handling must
            # not wait for a slot that hung storage never frees (its flush is bounded by
            # flush_timeout; a slot wait is not).
            beyond_limit=getattr(self, "_saving_on_exception", False),
        )

    def _score(self, score: Any) -> float | None:
        """``as_float(score)``, remembered per score object: Lightning keeps the same
        tensors in ``best_k_models`` from save to save, and a tensor's ``item()`` is slow
        on the training thread (the dispatcher's code is out of the cache by then)."""
        floats = self._score_floats
        known = floats.get(id(score))
        if known is not None and known[0] is score:
            return known[1]
        value = as_float(score)
        if len(floats) > 64:  # top-k scores and the current one; the rest is stale
            live = {id(v) for v in self.best_k_models.values()}
            for key in [k for k in floats if k not in live]:
                del floats[key]
        floats[id(score)] = (score, value)
        return value

    def _snapshot(self, trainer: pl.Trainer, filepath: str, staged: Path) -> CheckpointSnapshot:
        scored = [(path, self._score(score)) for path, score in self.best_k_models.items()]
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
            score=self._score(self.current_score),
            is_best=best == str(filepath),
            best_key=self._key(trainer, best, "checkpoint") if best else None,
            last_key=self._key(trainer, last, "checkpoint") if last else None,
            ranking=tuple(keys[path] for path, _ in ordered),
            scores={keys[path]: score for path, score in ordered if score is not None},
            sequence=next_sequence(),
        )

    def _submit_checkpoint(
        self, trainer: pl.Trainer, filepath: str, write: Callable[[], None] | None = None
    ) -> None:
        submitter = self._ensure_submitter()
        kept_out = submitter.kept_out
        snapshot: CheckpointSnapshot | None = None
        try:
            # A Ctrl+C meanwhile is raised once the snapshot is taken (see ctrl_c_after), so
            # that the save is journaled and kept out (below): raised before, the
            # checkpoint Lightning wrote, and names in its state, was never journaled, and
            # no flush persisted it.
            with ctrl_c_after():
                staged, prepare = submitter.plan_staging(
                    self._staging_root(filepath), filepath, write
                )
                snapshot = self._snapshot(trainer, filepath, staged)
            values = self.collect_checkpoint_feature_values(trainer, snapshot)
            if values:
                snapshot = _with_features(snapshot, values, self._feature_conflict)
            run_features = self._run_features_to_journal()
            if run_features:
                snapshot = _with_run_features(snapshot, run_features)
            record = self._checkpoint_record(trainer, filepath, staged, snapshot, write)
        except BaseException:
            if snapshot is not None:
                # The feature hook raised (or Ctrl+C came): the checkpoint Lightning wrote,
                # and names in its state, is journaled without feature values and kept
                # from admission, for the flush at exit (or the next setup, or
                # `lamin-lightning flush`) to persist; then the error goes on. With the
                # fit's run-level values, if they were collected: no commit of this save
                # records them otherwise.
                run_features = self._run_features_to_journal()
                if run_features:
                    snapshot = _with_run_features(snapshot, run_features)
                self._keep_out(trainer, snapshot, filepath, staged, prepare, write)
            else:
                # No key for it (a resolver of the user's raised): this staging will never
                # run. A later rewrite or removal of the file must not wait for it (but for
                # a put-back of the previous file, which still has to happen).
                submitter.abandon_staging(filepath, write)
            raise
        try:
            self._submit_record(trainer, record, prepare=prepare, write=write)
        except BaseException as error:
            if submitter.kept_out == kept_out and isinstance(error, KeyboardInterrupt):
                # Ctrl+C before its journal line (see Submitter.submit): kept out as above.
                self._keep_out(trainer, snapshot, filepath, staged, prepare, write)
            raise

    def _checkpoint_record(
        self,
        trainer: pl.Trainer,
        filepath: str,
        staged: Path,
        snapshot: CheckpointSnapshot,
        write: Callable[[], None] | None,
    ) -> JobRecord:
        """The record of a checkpoint's save (``write``: its file is written later)."""
        return self._record(
            trainer,
            "save",
            "checkpoint",
            filepath,
            staged=staged,
            snapshot=snapshot,
            written_later=write is not None,
            # Our own background write notes the file it completed in the journal.
            marks_written=callable(getattr(write, "mark_written_with", None)),
            # A CheckpointIO's late write notes a folder it completed (it cannot be judged).
            marks_folder=callable(getattr(write, "mark_folder_with", None)),
        )

    def _run_features_to_journal(self) -> tuple[tuple[str, Any, bool], ...]:
        """The run-level values of this fit (``(name, value, auto feature)``), journaled
        with each checkpoint so that a replay can still record them on the run (see
        :attr:`CheckpointSnapshot.run_features`). Empty in the generic layer, which has no run."""
        return ()

    def _feature_conflict(self, message: str) -> Exception:
        """The error for two different values of one feature for one checkpoint (see
        :func:`_with_features`), raised on the training thread, at the save."""
        return ValueError(message)

    def _keep_out_written_later(
        self, trainer: pl.Trainer, filepath: str, write: Callable[[], None] | None
    ) -> None:
        """A save whose file a CheckpointIO writes after Lightning's call raised, or that
        Lightning wrote and an interrupt kept from its submission: journaled (no feature
        values) and kept out (see _keep_out)."""
        if not trainer.is_global_zero:
            return
        submitter = self._ensure_submitter()
        staged, prepare = submitter.plan_staging(self._staging_root(filepath), filepath, write)
        try:
            snapshot = self._snapshot(trainer, filepath, staged)
        except BaseException:
            submitter.abandon_staging(filepath, write)
            raise
        self._keep_out(trainer, snapshot, filepath, staged, prepare, write)

    def _keep_out(
        self,
        trainer: pl.Trainer,
        snapshot: CheckpointSnapshot,
        filepath: str,
        staged: Path,
        prepare: Callable[[], int],
        write: Callable[[], None] | None,
    ) -> None:
        """Journal the save of ``filepath`` as it stands (no feature values) and keep it
        out of the pipeline until the flush at exit (see ``Submitter.keep_out``)."""
        submitter = self._ensure_submitter()
        try:
            record = self._checkpoint_record(trainer, filepath, staged, snapshot, write)
            submitter.keep_out(
                record,
                HookStore(self, trainer),
                trainer=trainer,
                prepare=prepare,
                known=self._persisted.get,
                outcome=self._on_outcome,
                write=write,
            )
        except BaseException as error:
            log.exception("could not journal the save of %s", filepath)
            submitter.abandon_staging(filepath, write)
            if not isinstance(error, Exception):
                raise  # Ctrl+C meanwhile: it goes on; otherwise the hook's error does

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
        submitter = self._ensure_submitter()
        staged, prepare = submitter.plan_staging(self._staging_root(path), path)
        try:
            record = self._record(trainer, "save", kind, path, staged=staged)
        except BaseException:
            submitter.drop_staging(path)
            raise
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
        # Looked for at every save until found, as the reference does. Without a logger
        # (the LaminDB callback then looks in ``default_root_dir``, as the reference), only
        # at the first save of a fit: no logger writes it later, and a look that finds
        # nothing costs the training thread ~0.1 ms (a failed stat, cold) at every save.
        if self._hparams_submitted or self._hparams_looked is trainer:
            return
        path = self.hparams_path(trainer)
        if path is not None:
            self.submit_file(trainer, path, "hparams")
            self._hparams_submitted = True
        elif not trainer.loggers:
            self._hparams_looked = trainer

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
        root = self._staging_root(self.dirpath or ".")
        # Only the callbacks that replay this folder finish their own journals here. One
        # of the trainer that now writes elsewhere (moved to a folder of its own since
        # the crash, or to the folder Lightning derives), or journals nothing, leaves its
        # journal here to this callback, as one the user dropped from the trainer does.
        # Those of the earlier logger versions are finished by the callbacks whose folder
        # Lightning derives, as this one's (a dirpath given is not a version of its own).
        peers = [
            other
            for other in getattr(trainer, "callbacks", [])
            if other is not self
            and isinstance(other, SubmittingCheckpoint)
            and _replays(other, root, trainer)
        ]
        committed: FolderFlags = {}  # read before a journal with nothing pending is deleted
        others = unfinished(
            own,
            root=root,
            skip_digests={_journal_digest(other) for other in peers},
            sibling_skip_digests={
                _journal_digest(other) for other in peers if not other._user_dirpath
            },
            dirpath=Path(self.dirpath or "."),
            logger_layout=layout,
            committed=committed,
        )
        submitter.foreign.extend(others)
        work = pending_in([*([own] if own is not None else []), *others])
        if not work:
            return 0
        mine = self.replay_store()
        # Another callback's journal (one the user dropped, or moved elsewhere) is replayed
        # through a store of its own, as that callback had: see StoreResolver.
        resolver = StoreResolver(
            {self.store_name: mine} if mine is not None else None,
            per_journal=True,
            own=own.path if own is not None else None,
            make={self.store_name: self.sibling_replay_store} if mine is not None else None,
        )
        return submitter.replay(
            work, resolver, trainer=trainer, outcome=self._on_outcome, committed=committed
        )

    # -- committer thread ---------------------------------------------------------------

    def _on_outcome(self, record: JobRecord, event: AnyArtifactEvent) -> None:
        if isinstance(event, ArtifactSavedEvent):
            if record.kind == "checkpoint":
                self._persisted[record.key] = event.artifact
            if self._unreported_failures and not event.recovered:
                self._replace_failures(record)
        elif isinstance(event, ArtifactRemovedEvent):
            self._persisted.pop(record.key, None)
            if self._unreported_failures and not event.recovered:
                self._replace_failures(record)
        elif not event.recovered:
            # A replay that fails again is warned about and stays in the outbox: it is an
            # earlier run's job, and must not fail this one.
            with self._lock:
                if event.operation == "remove":
                    # A removal whose deletion failed after its removed event (LaminDB's
                    # order): it settled nothing, so the key's earlier failures still count.
                    for failure in self._unreported_failures:
                        if failure.key == record.key:
                            self._replaced_failures.pop(id(failure), None)
                # Its delivery's wait first: the training thread reads the failures
                # without the lock, and one it finds must have a wait (see
                # _await_failure_delivery), or its PersistenceError beats the stop an
                # observer asks for when told of it.
                self._failures_delivered[id(event)] = threading.Event()
                self._unreported_failures.append(event)

    def _replace_failures(self, record: JobRecord) -> None:
        """A later job of a failed job's key committed: the failed one is moot (the outbox
        settles it as obsolete), and its report says so."""
        with self._lock:
            for failure in self._unreported_failures:
                if failure.key == record.key and failure.kind == record.kind:
                    self._replaced_failures[id(failure)] = record.op


def _with_features(
    snapshot: CheckpointSnapshot,
    values: Mapping[Any, Any],
    conflict: Callable[[str], Exception] = ValueError,
) -> CheckpointSnapshot:
    """``snapshot`` with feature values frozen (:func:`feature_value`), by name (feature
    objects by ``name``).

    Two entries of one name (a feature object of an auto feature and the user's value of
    the same name, ``score`` say) with different values raise ``conflict(message)``, as
    LaminDB's ``add_values`` refuses them for the reference.
    """
    named = refuse_conflicts(values, conflict)
    auto = frozenset(str(getattr(k, "name", k)) for k in values if not isinstance(k, str))
    # A copy with two fields changed, without the frozen dataclass's __init__ (one
    # object.__setattr__ per field, at every save on the training thread).
    copy = object.__new__(CheckpointSnapshot)
    copy.__dict__.update(snapshot.__dict__, feature_values=named, auto_features=auto)
    return copy


def _with_run_features(
    snapshot: CheckpointSnapshot, run_features: tuple[tuple[str, Any, bool], ...]
) -> CheckpointSnapshot:
    """``snapshot`` with its fit's run-level values (as :func:`_with_features` copies it)."""
    copy = object.__new__(CheckpointSnapshot)
    copy.__dict__.update(snapshot.__dict__, run_features=run_features)
    return copy


def refuse_conflicts(
    values: Mapping[Any, Any], conflict: Callable[[str], Exception] = ValueError
) -> dict[str, Any]:
    """``values`` frozen (:func:`feature_value`) by name (feature objects by ``name``);
    two entries of one name with different values raise ``conflict(message)``, LaminDB's
    message for the same values given to ``add_values``."""
    named = {str(getattr(k, "name", k)): feature_value(v) for k, v in values.items()}
    if len(named) < len(values):
        for key, value in values.items():
            name = str(getattr(key, "name", key))
            if not _same_value(named[name], feature_value(value)):
                raise conflict(f"Conflicting values for feature name '{name}'.")
    return named


def _same_value(a: Any, b: Any) -> bool:
    """Equal, as LaminDB compares values of one feature (NaN equal to NaN: it stores
    neither)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _class_path(cls: type) -> str:
    """``module:qualname`` of a class, for records of a callback that names no store."""
    return f"unregistered:{cls.__module__}:{cls.__qualname__}"


def _replays(callback: SubmittingCheckpoint, root: Path, trainer: pl.Trainer) -> bool:
    """Whether ``callback``'s ``setup`` replays its own journals in the working folder
    ``root``: it journals, and writes there. Where its ``setup`` has not run yet and its
    dirpath is None, the folder is the one Lightning will derive for it (the logger's
    version, or ``default_root_dir``): not necessarily this one."""
    if not callback.outbox:
        return False
    folder = callback.dirpath
    if not folder:
        try:
            folder = callback._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        except Exception:  # a logger that cannot say: assume it is this folder, as before
            return True
        if not folder or "://" in str(folder):
            return False  # its setup refuses a remote one
    return staging_root(folder).resolve() == root.resolve()


def _journal_digest(callback: Any) -> str:
    """The digest that names a callback's journal: its ``state_key``, hashed."""
    return hashlib.sha1(str(callback.state_key).encode("utf-8")).hexdigest()[:12]


def _weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, holding its object weakly (a no-op once that is collected); a plain
    function (a ``staticmethod`` hook) as it is."""
    if not inspect.ismethod(method):
        return method
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args)

    return call
