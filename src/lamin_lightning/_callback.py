"""ArtifactPublishingModelCheckpoint: the generic Lightning layer.

Built in layers, one concern each: :mod:`~lamin_lightning._surface` (the reference's
hooks and observers), :mod:`~lamin_lightning._submission` (job records built and
submitted, replay at ``setup``, the public controls), :mod:`~lamin_lightning._reporting`
(outcomes, failures, shutdown), :mod:`~lamin_lightning._lightning_view` (Lightning's
state stays true; ``async_write`` inside Lightning's save path), and this module: the
constructor and Lightning's hooks (``setup``, ``teardown``, ``on_exception``, save and
removal of a checkpoint).

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
import dataclasses
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lamin_lightning._aside import put_back_in as put_back_leftovers
from lamin_lightning._checkpoint_io import (
    PendingWrites,
    WriteTracker,
    removes_as_lightning,
    rewrites_by_rename,
)
from lamin_lightning._checkpoint_io import compose as compose_checkpoint_io
from lamin_lightning._checkpoint_io import release as release_checkpoint_io
from lamin_lightning._errors import ArgumentTypeError
from lamin_lightning._events import (
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactObserver,
)
from lamin_lightning._evictions import (
    Evictions,
)
from lamin_lightning._jobs import archive_cut_short
from lamin_lightning._lightning_view import LightningViewCheckpoint, cancel_link
from lamin_lightning._local_write import (
    HostWrite,
    Snapshotter,
    async_write_supported,
    storage_keys,
)
from lamin_lightning._names import being_written, taken_in, wait_until_written
from lamin_lightning._options import (
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_WORKERS,
    MAX_WORKERS_LIMIT,
    OnError,
    validate_bool,
    validate_flush_timeout,
    validate_int,
    validate_on_error,
    validate_retry,
)
from lamin_lightning._pipeline import PendingJob
from lamin_lightning._replay import WAIT_FOR_WRITES_IN_FLIGHT_S
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._sigterm import ctrl_c_after, sigterm_after_flush
from lamin_lightning._stats import StatsRecorder
from lamin_lightning._submission import _journal_digest
from lamin_lightning._submit import RemovalOnceWritten, Submitter, supersede_removals
from lamin_lightning._surface import ArtifactHooks
from lamin_lightning._telemetry import log_final_persistence_stats, log_persistence_stats

log = logging.getLogger("lamin_lightning")

_PERSISTING: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def persists_through_pipeline(cls: type) -> bool:
    """Whether a callback of class ``cls`` persists its files through the pipeline.

    The reference's generic layer leaves Lightning's saving alone: it persists nothing,
    and a concrete subclass persists in its own ``_save_checkpoint``. Ours persists
    through the ``save_*`` hooks, called by the pipeline, but not for a class that does
    not implement ``save_checkpoint_artifact`` (the generic layer used as is: a
    ``ModelCheckpoint`` with the reference's hooks and observers), nor for a class
    written for the reference's generic layer, directly under it, with a
    ``_save_checkpoint`` of its own (which calls the ``save_*`` hooks and
    ``_notify_artifact_*`` itself). Those act as ``ModelCheckpoint`` does. A class says
    which it is with ``lamin_lightning_pipeline = True`` (or False), whatever it overrides.
    """
    known = _PERSISTING.get(cls)
    if known is None:
        known = _PERSISTING[cls] = _persists(cls)
    return known


def implements_save_hook(cls: type) -> bool:
    """Whether ``cls`` has a ``save_checkpoint_artifact`` of its own (not the generic one)."""
    hook = getattr(cls, "save_checkpoint_artifact", None)
    return hook is not ArtifactHooks.save_checkpoint_artifact


def _persists(cls: type) -> bool:
    declared = getattr(cls, "lamin_lightning_pipeline", None)
    if declared is not None:
        return bool(declared)
    if not implements_save_hook(cls):
        return False
    ours = next(k for k in cls.__mro__ if k.__module__.startswith("lamin_lightning."))
    if ours is ArtifactPublishingModelCheckpoint:
        saver = next(k for k in cls.__mro__ if "_save_checkpoint" in vars(k))
        return saver.__module__.startswith("lamin_lightning.")
    return True


class ArtifactPublishingModelCheckpoint(LightningViewCheckpoint):
    """A ``ModelCheckpoint`` that persists its files in the background and reports each step.

    Drop-in for ``lamindb.integrations.lightning.ArtifactPublishingModelCheckpoint``
    with the same properties and hooks. The difference: ``_save_checkpoint`` returns
    once Lightning has written the local file and the job is admitted; persisting
    happens on threads the callback owns, bounded, ordered and retried.

    Args:
        *args: Passed to ``ModelCheckpoint``.
        artifact_observers: Observers notified of saved, removed and failed artifacts.
        max_workers: Transfers (uploads) that may run at once, from 1 to 256 (one
            thread each). Default 2.
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

    def __init__(
        self,
        *args: Any,
        artifact_observers: Iterable[ArtifactObserver] | None = None,
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
        self.max_workers = validate_int("max_workers", max_workers, 1, MAX_WORKERS_LIMIT)
        self.max_pending = validate_int("max_pending", max_pending, 1)
        self.retry = validate_retry(retry)
        self.flush_timeout = validate_flush_timeout(flush_timeout)
        self.on_error: OnError = validate_on_error(on_error)
        self.async_write = validate_bool("async_write", async_write)
        self.max_snapshots = validate_int("max_snapshots", max_snapshots, 1)
        self.log_stats = validate_bool("log_stats", log_stats)
        self.outbox = validate_bool("outbox", outbox)
        # Any iterable of observers, as the reference takes (a generator is read once,
        # here); a string or a single observer is a mistake worth naming.
        given: object = artifact_observers
        if given is not None and (
            isinstance(given, str | bytes) or not isinstance(given, Iterable)
        ):
            raise ArgumentTypeError(
                "artifact_observers must be a list (or any iterable) of observers, got"
                f" {type(artifact_observers).__name__}; pass [observer]"
            )
        super().__init__(*args, **kwargs)
        # Lightning picks the dirpath at setup when the user gives none (a new logger
        # version each run): then earlier versions' outboxes are ours to finish too.
        self._user_dirpath = dirpath is not None
        self._init_surface(list(artifact_observers or []))
        self._stats_recorder = StatsRecorder()
        self._hparams_submitted = False
        self._init_runtime()

    # -- runtime state: created lazily, dropped when pickled ------------------------------

    def _init_runtime(self) -> None:
        # The stage's trainer (from setup): not pickled or copied with the callback, which
        # ModelCheckpoint's pickles without (a lambda collate_fn of the trainer's loaders
        # must not make it fail, nor a deep copy copy the model).
        self._trainer: pl.Trainer | None = None
        self._submitter: Submitter | None = None
        self._state_lock: threading.Lock | None = None
        self._unreported_failures: list[ArtifactFailedEvent] = []
        self._replaced_failures: dict[int, str] = {}
        # id(failure) -> set once its event was delivered to the hooks and observers.
        self._failures_delivered: dict[int, threading.Event] = {}
        # Jobs a teardown that gave up left in the outbox (see pending_artifacts).
        self._left_in_outbox: list[PendingJob] = []
        self._loggers_owed: list[tuple[HostWrite, list[Any], str]] = []
        self._link_failures: list[BaseException] = []
        self._persisted: dict[str, Any] = {}
        self._snapshotter: Snapshotter | None = None
        self._async_write_refused = False
        self._snapshots_prepared = False  # see _prepare_snapshots
        self._set_up = False
        # From setup (every rank) to teardown: saves outside are Lightning's methods
        # called directly (see _persist_outside_a_stage).
        self._in_stage = False
        self._shutting_down = False
        self._plain_saves = 0  # saves of a class that persists nothing (see teardown)
        self._deferred_files: list[tuple[Path, ArtifactKind]] = []
        self._io_writes: WriteTracker | None = None
        self._hparams_looked: pl.Trainer | None = None  # a fit without loggers, looked once
        self._staging_roots: dict[str, Path] = {}  # by checkpoint folder
        self._score_floats: dict[int, tuple[Any, float | None]] = {}  # see _score
        self._evictions = Evictions()
        self._save_depth = 0  # inside Lightning's save hooks (which surface failures first)
        self._saving_on_exception = False
        # What stopped the file's write at the emergency save (see on_exception).
        self._write_stopped: BaseException | None = None
        # See _removes_as_lightning and _rewrites_by_rename.
        self._plain_removal: tuple[Any, Any, bool, bool] | None = None

    def _forked_copy(self) -> bool:
        """Whether this process is a forked child of the one persisting for this callback
        (see ``Submitter.forked_copy``): here the callback is a plain ``ModelCheckpoint``,
        and the parent's pipeline and journal are left alone."""
        submitter = self._submitter
        return submitter is not None and submitter.forked_copy

    def _plain(self) -> bool:
        """Whether the callback acts as a plain ``ModelCheckpoint`` here: in a forked copy
        (see :meth:`_forked_copy`), or for a class that persists nothing (see
        :func:`persists_through_pipeline`)."""
        return not persists_through_pipeline(type(self)) or self._forked_copy()

    def _warn_if_nothing_persisted(self, trainer: pl.Trainer) -> None:
        """A class that implements ``save_checkpoint_artifact`` and is taken for one written
        for the reference's generic layer (its own ``_save_checkpoint``), whose fit saved
        checkpoints and delivered no saved event: most likely a wrapper of ours that
        expected the pipeline to persist. Say so, with the fix."""
        saves, self._plain_saves = self._plain_saves, 0
        notified = self._notified_directly
        self._notified_directly = False
        cls = type(self)
        if saves and not notified and implements_save_hook(cls) and trainer.is_global_zero:
            rank_zero_warn(
                f"{cls.__name__} saved {saves} checkpoint(s) and persisted none through"
                " lamin-lightning: it implements save_checkpoint_artifact and has a"
                " _save_checkpoint of its own, so it is taken for a class written for"
                " lamindb's generic layer, which persists in its own _save_checkpoint"
                " (calling save_checkpoint_artifact and _notify_artifact_saved). To have"
                " lamin-lightning's pipeline call save_checkpoint_artifact in the background,"
                f" set `lamin_lightning_pipeline = True` on {cls.__name__}."
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        fresh = self.__class__.__new__(self.__class__)
        ArtifactPublishingModelCheckpoint._init_runtime(fresh)
        state.update(fresh.__dict__)
        state["_escalated"] = type(self._escalated)()
        state["_hook_errors"] = type(self._hook_errors)()
        event = state.get("_last_artifact_event")
        if event is not None:  # its trainer is the fit's: not pickled or copied either
            state["_last_artifact_event"] = dataclasses.replace(event, trainer=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> ArtifactPublishingModelCheckpoint:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__getstate__().items():
            setattr(clone, name, copy.deepcopy(value, memo))
        return clone

    # -- replay after a crash ----------------------------------------------------------------

    # -- public async controls ------------------------------------------------------------

    # -- Lightning hooks ------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not persists_through_pipeline(type(self)):
            if self.async_write and not self._async_write_refused:
                self._async_write_refused = True
                rank_zero_warn(
                    f"async_write=True has no effect: {type(self).__name__} persists nothing"
                    " through lamin-lightning's pipeline (it does not implement"
                    " save_checkpoint_artifact, or saves in a _save_checkpoint of its own),"
                    " so Lightning writes its checkpoints as ModelCheckpoint does"
                )
            ModelCheckpoint.setup(self, trainer, pl_module, stage)
            return
        if self._forked_copy():  # a forked child training on its own: a runtime of its own
            ArtifactPublishingModelCheckpoint._init_runtime(self)
        # Lightning derives a dirpath from a logger or default_root_dir at setup: refused
        # as in the constructor, before Lightning touches it and before any step runs.
        refuse_remote_dirpath(_derived_dirpath_root(self, trainer), "derived at setup")
        super().setup(trainer, pl_module, stage)
        refuse_remote_dirpath(self.dirpath, "derived at setup")
        self._trainer = trainer
        self._snapshots_prepared = not self.async_write
        # Every rank: a CheckpointIO we cannot follow is refused everywhere, not on one rank.
        self._io_writes = compose_checkpoint_io(trainer.strategy)
        if trainer.is_global_zero:
            # No file is created here (the journal comes with the first job). The
            # pipeline's threads start now for a fit, so that the first checkpoint does
            # not wait for them (~30 ms); other stages start them with a first job.
            submitter = self._ensure_submitter()
            root = self._staging_root(self.dirpath or ".")
            submitter.open_outbox(
                root, _journal_digest(self), enabled=self.outbox, dirpath=self.dirpath
            )
            submitter.check_free_space(root, _state_bytes(pl_module), self.dirpath)
            if self.dirpath:  # a crash mid-rewrite: the previous checkpoint comes back
                # (its interrupted save dropped, in the journal just reopened too)
                put_back_leftovers(self.dirpath, submitter.outbox)
                # Lightning loads ckpt_path ("best", a path) after setup: a write this
                # process still runs in dirpath finishes first (the replay below waits
                # only for journaled jobs' files, and with outbox=False for none).
                self._wait_for_writes(self.dirpath, "before this stage loads a checkpoint")
            if stage == "fit":
                submitter.ensure_pipeline()
            self._left_in_outbox = []  # replayed now, with the rest of the outbox
            self._replay_unfinished(trainer)
            self._set_up = True
            deferred, self._deferred_files = self._deferred_files, []
            for path, kind in deferred:
                self.submit_file(trainer, path, kind)
        self._in_stage = True

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Lightning resolves ckpt_path="last" with this, before setup: a last.ckpt whose
        # rewrite a crash cut short is put back first, or the run would start over.
        folder = self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        # Every rank (they may share the folder; restorers take turns, see _aside).
        if folder and "://" not in str(folder):
            self._wait_for_last_writes(folder)
            # A fit again in the same processes (after an exception, say): rank zero may
            # still have been writing a last checkpoint when the other ranks' fit returned
            # (they do not wait). Every rank resolves ckpt_path="last" here, before any
            # barrier of Lightning's: the others look once rank zero's writes are done, or
            # one rank would start over while rank zero resumes (ModelCheckpoint wrote it
            # before its save's barrier). Before the first fit no process group exists yet.
            if trainer.world_size > 1 and _distributed_ready():
                trainer.strategy.barrier("lamin_lightning_find_last")
            put_back_leftovers(folder)
        return super()._find_last_checkpoints(trainer)

    def _wait_for_last_writes(self, folder: Any) -> None:
        """Wait for a ``last`` checkpoint (or its link) that a background write of this
        process is still creating in ``folder`` (see :meth:`_wait_for_writes`).

        After Ctrl+C, ``fit`` returns while such a write finishes (see failures.md): a
        ``fit(ckpt_path="last")`` right away would find no ``last.ckpt`` yet and start
        over, where ``ModelCheckpoint``, which wrote it before the interrupt, resumes.
        """
        pattern = re.compile(rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-(\d+))?")

        def is_last(name: str) -> bool:  # as ModelCheckpoint._find_last_checkpoints tells
            path = Path(name)
            return path.suffix == self.FILE_EXTENSION and bool(pattern.match(path.stem))

        self._wait_for_writes(folder, "before looking for the last checkpoint", is_last)

    @staticmethod
    def _wait_for_writes(
        folder: Any, why: str, wanted: Callable[[str], bool] | None = None
    ) -> None:
        """Wait (up to ``WAIT_FOR_WRITES_IN_FLIGHT_S``) until no background write of this
        process creates a file directly in ``folder`` (one ``wanted`` accepts)."""
        busy = {name for name in taken_in(folder) if wanted is None or wanted(name)}
        if not busy:
            return
        log.info(
            "lamin-lightning: waiting for %s, still being written in the background, %s",
            ", ".join(sorted(busy)),
            why,
        )
        left = wait_until_written(busy, WAIT_FOR_WRITES_IN_FLIGHT_S)
        if left:
            log.warning(
                "lamin-lightning: %s still being written after %.0f s; going on without it",
                ", ".join(sorted(left)),
                WAIT_FOR_WRITES_IN_FLIGHT_S,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self._snapshots_prepared:
            self._prepare_snapshots(trainer, complete=False)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        # One attribute check per step otherwise. The optimizer's state exists once it
        # has stepped (a first save at that step found no buffers made for it).
        if not self._snapshots_prepared and trainer.global_step > 0:
            self._snapshots_prepared = True
            self._prepare_snapshots(trainer, complete=True)

    def _prepare_snapshots(self, trainer: pl.Trainer, *, complete: bool) -> None:
        """With ``async_write``, have the host buffers of the next snapshot made off the
        training thread (see :meth:`Snapshotter.prepare`), sized by the model's
        parameters and persistent buffers and, unless only weights are saved, the
        optimizers' state: at the start of training, and once the optimizer has stepped
        (``complete``: its state exists then). Not where nothing will be saved. Best
        effort: whatever goes wrong, the snapshot allocates what it needs, as without."""
        if (
            not trainer.is_global_zero
            or self._plain()
            or (self.save_top_k == 0 and not self.save_last)
            or bool(getattr(trainer, "fast_dev_run", False))  # Lightning saves nothing then
            or not async_write_supported(trainer)[0]  # warned at the first save
        ):
            return
        try:
            tensors: list[Any] = []
            for module in trainer.lightning_module.modules():
                tensors.extend(module._parameters.values())
                skipped = module._non_persistent_buffers_set
                tensors.extend(b for name, b in module._buffers.items() if name not in skipped)
            if not self.save_weights_only:
                for optimizer in trainer.optimizers:
                    for state in optimizer.state.values():
                        if isinstance(state, dict):
                            tensors.extend(state.values())
            keys = storage_keys(tensors)
            if self._snapshotter is None:
                self._snapshotter = Snapshotter(self.max_snapshots)
            self._snapshotter.prepare(keys, free_others=complete)
        except Exception:
            log.debug("preparing snapshot buffers failed", exc_info=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._plain():
            if not self._forked_copy():
                self._warn_if_nothing_persisted(trainer)
            ModelCheckpoint.teardown(self, trainer, pl_module, stage)
            return
        super().teardown(trainer, pl_module, stage)
        # Lightning restored the default SIGTERM handler already: one now (a preemption)
        # is held until the flush is done (or gave up) and the loggers were told.
        with sigterm_after_flush(self.flush_timeout):
            try:
                self._shutdown(raise_errors=True)
            finally:
                # The background writes are done by now (unless the flush gave up): the
                # loggers are told of the last saves before they finalize.
                self._tell_loggers(trainer)
                self._plain_removal = None  # holds the strategy: not beyond the fit
                release_checkpoint_io(trainer.strategy, self._io_writes)
                self._drop_snapshots()
                if self.log_stats:  # the final values, after the flush (loggers finalize next)
                    log_final_persistence_stats(trainer, self.persistence_stats, stage)
        # A link the last saves asked for that failed once their files were written.
        self._raise_link_failure()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._plain():
            # A forked child unwinding through Lightning's fit (an exception, sys.exit in
            # the child of an os.fork in a hook): ModelCheckpoint's behaviour, no more. The
            # pipeline's threads are the parent's: a flush here would wait forever.
            ModelCheckpoint.on_exception(self, trainer, pl_module, exception)
            return
        interrupted = isinstance(exception, KeyboardInterrupt)
        try:
            # The emergency checkpoint is written whatever failed before; those failures
            # are reported after it (by the shutdown below), never instead of it.
            self._saving_on_exception = True
            try:
                super().on_exception(trainer, pl_module, exception)
            except KeyboardInterrupt:
                raise  # Ctrl+C: see below
            except BaseException as error:
                if error is self._write_stopped:
                    # SystemExit while the file was written (a SIGTERM handler's
                    # sys.exit, a hook of Lightning's): it goes on, as it goes out of
                    # ModelCheckpoint's save (and out of our write below, async_write).
                    raise
                # SystemExit too (a hook of ours, the feature hook say): the crash is
                # what fit raises, after Lightning's handling of it ran to its end.
                log.exception("saving a checkpoint on exception failed")
            finally:
                self._saving_on_exception = False
                self._write_stopped = None
            # The checkpoints Lightning saved are on disk when fit returns, as
            # ModelCheckpoint writes them: a background write not done yet is finished
            # here (after Ctrl+C too, which does not wait for uploads). In a script the
            # process exits next, and its (daemon) write thread would die with it: the
            # file, last.ckpt say, never written.
            for write in self._evictions.unfinished():
                if isinstance(write, HostWrite):
                    _write_now(write)
        except KeyboardInterrupt:
            # After a crash Lightning does not ignore Ctrl+C: one pressed during our part
            # of its handling ends our waits (below: no wait for uploads either), and goes
            # no further, so that Lightning's own handling (loggers finalized, the
            # strategy torn down, its signal handlers restored) still runs and raises the
            # original error.
            interrupted = True
            log.warning(
                "Ctrl+C while the callback handled %s: not waiting", type(exception).__name__
            )
        finally:
            self._stop_after_exception(trainer, interrupted)

    def _stop_after_exception(self, trainer: pl.Trainer, interrupted: bool) -> None:
        try:
            # Ctrl+C: stop now (Lightning ignores a second Ctrl+C while this runs, so a
            # wait could not be cut short); what is pending stays journaled, with its
            # local files, for the next setup or `lamin-lightning flush`. SIGTERM (a
            # preemption) waits up to flush_timeout, documented to fit the grace period.
            self._shutdown(raise_errors=False, wait=not interrupted)
        except Exception:
            log.exception("flushing checkpoint persistence after an exception failed")
        except KeyboardInterrupt:
            # Ctrl+C during that wait (a crash's: Lightning does not ignore it): the
            # pipeline is stopped (the shutdown's own cleanup) and what is pending named;
            # Lightning's handling of the crash goes on (see on_exception).
            pass
        finally:
            # Teardown, which tells the loggers of the saves written in the background,
            # is not called on this path; Lightning finalizes the loggers next ("failed").
            try:
                self._tell_loggers(trainer)
            except Exception:
                log.exception("telling the loggers of the checkpoints saved failed")
            # As teardown does: the strategy gets its CheckpointIO back, unwrapped, once
            # no callback of ours still to handle the exception shares the wrapping (its
            # emergency save must be followed too).
            self._plain_removal = None
            # A link that failed after its background write (logged there): the crash is
            # what fit raises, and the next fit must not raise this one's link error.
            self._link_failures.clear()
            if not self._io_shared_later(trainer):
                release_checkpoint_io(trainer.strategy, self._io_writes)
            self._drop_snapshots()

    def _io_shared_later(self, trainer: pl.Trainer) -> bool:
        """Whether a callback of ours after this one follows the same CheckpointIO writes."""
        tracker = self._io_writes
        if tracker is None:
            return False
        callbacks = list(getattr(trainer, "callbacks", []))
        later = callbacks[callbacks.index(self) + 1 :] if self in callbacks else []
        return any(
            isinstance(other, ArtifactPublishingModelCheckpoint)
            and getattr(other, "_io_writes", None) is tracker
            for other in later
        )

    def _drop_snapshots(self) -> None:
        """At the end of a fit (teardown, or an exception: Lightning calls no teardown
        then), let the snapshots' host buffers go (a preparation under way stops). While
        a write the flush gave up on holds a slot they stay: the next fit's snapshots
        count against the same ``max_snapshots``."""
        snapshotter = self._snapshotter
        if snapshotter is not None and not snapshotter.in_use():
            snapshotter.stop_preparing()
            self._snapshotter = None

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._plain():
            self._plain_saves += 1
            supersede_removals(filepath)  # another callback's, waiting (see below)
            ModelCheckpoint._save_checkpoint(self, trainer, filepath)
            return
        if self._save_depth == 0 and not self._saving_on_exception:
            self._surface_failures()  # a direct call; Lightning's save hooks did it already
        self._open_outbox_outside_a_stage(trainer)
        self._evictions.saving()
        # A link to be made here still (save_last="link", its target written in the
        # background; another callback's, sharing the name): this file replaces it, as
        # it would replace the link made, so it is never made now.
        cancel_link(filepath)
        # Outside a stage (a direct call) the save is persisted before the call returns
        # (see _persist_outside_a_stage): nothing to gain from writing it in the background.
        background = self.async_write and self._in_stage and self._async_write_supported(trainer)
        own_removals: list[RemovalOnceWritten] = []
        if trainer.is_global_zero:
            # A removal of the file there still waiting for its replacement's write (another
            # callback's eviction; ours, if this file is written by a CheckpointIO or here)
            # must not delete this one: ModelCheckpoint's came before this save. Ours run
            # before a background write of ours on the intake thread; one run elsewhere
            # (the training thread, after a crash) tells them first.
            own_removals = supersede_removals(
                filepath, but_of=self._ensure_submitter() if background else None
            )
        if background:
            # This fit's first snapshot makes what the checkpoint needs and keeps it: a
            # preparation afterwards could only free buffers of tensors it does not know
            # (a callback's state, say), which the next snapshot would make again.
            self._snapshots_prepared = True
        # Whether this save rewrites a file in use (there, or still being written there):
        # if its background (or late) write fails, what is at the path then is the
        # previous file, not part of this one.
        rewrite = (
            trainer.is_global_zero
            and (background or self._io_writes is not None)
            and (os.path.lexists(filepath) or being_written(filepath))
        )
        put_back: Callable[[bool], None] | None = None
        by_rename = False
        if trainer.is_global_zero and not background:
            by_rename = self._io_writes is None and self._rewrites_by_rename(trainer)
            # A background write replaces the file atomically, after the previous one was
            # staged (its job comes first on the intake thread): nothing to move.
            try:
                # A Ctrl+C meanwhile is raised once the file is set aside and the way back
                # known (see ctrl_c_after): raised before, the file stayed aside, its name
                # taken, for the rest of the process.
                with ctrl_c_after():
                    put_back = self._ensure_submitter().move_aside(
                        self._staging_root(filepath), filepath, by_rename=by_rename
                    )
            except BaseException:
                if put_back is not None:
                    put_back(False)  # Ctrl+C: no rewrite, the previous file comes back
                raise
        write: HostWrite | None = None
        io_write: PendingWrites | None = None  # a CheckpointIO still writing the file
        since = 0
        try:
            if background:
                write = self._save_in_background(trainer, filepath)
                if own_removals and write is not None:
                    write.before_start(partial(_supersede, own_removals))
            else:
                since = self._io_writes.mark() if self._io_writes is not None else 0
                super()._save_checkpoint(trainer, filepath)
                if self._io_writes is not None:
                    # A Ctrl+C meanwhile is raised once the wait is known (see ctrl_c_after):
                    # raised before, the writes were forgotten, and the save was not kept.
                    with ctrl_c_after():
                        io_write = self._io_writes.waiter(filepath, since)
        except BaseException as error:
            if self._saving_on_exception and not isinstance(error, Exception):
                self._write_stopped = error  # not one of our hooks': see on_exception
            queued = io_write
            if queued is None and self._io_writes is not None:
                queued = self._io_writes.waiter(filepath, since)
            if queued is not None and queued.handed_over():
                # AsyncCheckpointIO raised an earlier write's error after queuing this one:
                # the file is written all the same, so it is persisted all the same (kept
                # out until the flush at exit), and the previous file waits aside for it.
                late = queued if put_back is None else _putting_back(queued, put_back)
                self._keep_out_written_later(trainer, filepath, late)
            elif (
                by_rename
                and isinstance(error, KeyboardInterrupt)
                and os.path.isfile(filepath)
                and not archive_cut_short(filepath)
            ):
                # Ctrl+C once Lightning's own write was done (its loggers told, say): the
                # previous file went aside by rename, so this one is the save's, whole. It
                # is persisted all the same (kept out until the flush at exit), as the
                # file Lightning names: left, it was a checkpoint no flush persisted.
                assert put_back is not None
                put_back(True)
                self._keep_out_written_later(trainer, filepath, None)
            elif put_back is not None:
                put_back(False)  # the rewrite failed: the previous file stays
            raise
        written: Callable[[], None] | None = io_write
        kept_out: int | None = None  # jobs kept out before the checkpoint's submission
        try:
            # A Ctrl+C from here on is raised once the previous file is dealt with (see
            # ctrl_c_after), and then, as one in the hparams file's submission (its wait
            # for a slot), the checkpoint is journaled and kept out (below): raised before
            # its submission, the checkpoint Lightning wrote, and names in its state, was
            # never journaled, and no flush persisted it.
            if put_back is not None:
                with ctrl_c_after():
                    if io_write is None:
                        put_back(True)
                    else:
                        # Written later (AsyncCheckpointIO): the previous file stays aside
                        # until the rewrite is done, and comes back if it fails (or the
                        # process dies first).
                        written = _putting_back(io_write, put_back)
            if not trainer.is_global_zero:
                return
            self._submit_hparams_once(trainer)
            kept_out = self._ensure_submitter().kept_out
            self._submit_checkpoint(trainer, filepath, write=write or written)
        except BaseException as error:
            if (
                trainer.is_global_zero
                and isinstance(error, KeyboardInterrupt)
                and (kept_out is None or self._ensure_submitter().kept_out == kept_out)
            ):
                # Neither submitted nor kept out (Ctrl+C before its submission began).
                try:
                    self._keep_out_written_later(trainer, filepath, write or written)
                except BaseException:  # no key (the resolver raised again): as below
                    log.debug("could not keep out the save of %s", filepath, exc_info=True)
            if write is None:
                raise
            # Lightning's state names the file (best_k_models, best_model_path): it is
            # written here and now, as Lightning would have written it (which also gives
            # its snapshot slot back). Journaled, then kept from admission (SIGTERM or
            # Ctrl+C in a wait for a slot, a feature hook that raised), the flush at exit,
            # the next setup or `lamin-lightning flush` persists it; a save with no key (a
            # resolver of the user's raised) stays a file in the folder, as with
            # ModelCheckpoint, where it was never written before.
            _write_now(write)
            raise
        if write is not None or io_write is not None:
            # Evictions in this file's favour wait for it (and are dropped if it fails).
            self._evictions.wrote(
                self,
                filepath,
                write or io_write,  # type: ignore[arg-type]
                rewrite=rewrite,
            )
        if self.log_stats:
            log_persistence_stats(trainer, self.persistence_stats)
        self._persist_outside_a_stage()

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._plain():
            ModelCheckpoint._remove_checkpoint(self, trainer, filepath)
            return
        if not trainer.is_global_zero:
            super()._remove_checkpoint(trainer, filepath)
            return
        self._open_outbox_outside_a_stage(trainer)
        submitter = self._ensure_submitter()
        root = self._staging_root(filepath)
        # A link still to be made there (this callback's save_last="link", or another's
        # sharing the name): not after its removal.
        cancel_link(filepath)
        # Evicted in favour of a checkpoint still being written (async_write): removed
        # once that exists, kept if it never will (the record says so for a replay). A
        # strategy or CheckpointIO of the user's is handed the file on this thread, as
        # ModelCheckpoint hands it (it archives it, say; under DDP its strategy may meet
        # the other ranks there): the replacement's write is waited for here (rare: an
        # eviction that soon after a save), and the removal waits no more unless it failed.
        by_user = not self._removes_as_lightning(trainer)
        waits = self._evictions.replacement_for(filepath, wait=by_user)
        after, write, removed = waits if waits is not None else (None, None, None)
        record = self._record(trainer, "remove", "checkpoint", filepath, after=after)
        # Journaled before the file goes: a crash in between leaves a removal to replay,
        # never an artifact whose checkpoint Lightning already dropped.
        settle = submitter.journal(record)
        if after is not None:
            remove = submitter.remove_once_written(root, filepath, after, then=removed, write=write)
        elif not by_user:
            # A rename now, the deletion on the intake thread (Lightning's own removal
            # below then finds nothing to do).
            remove = submitter.trash_for_removal(root, filepath)
            super()._remove_checkpoint(trainer, filepath)
        else:
            # A strategy or CheckpointIO of the user's removes it (or archives it): it
            # finds the file, as with ModelCheckpoint. Staged first, so the save persists.
            submitter.await_staging(filepath)
            # A Ctrl+C meanwhile is raised once both are done (see ctrl_c_after): raised
            # inside the user's removal, after it kept the file, it left no mark, and a
            # replay kept the evicted checkpoint's artifact.
            with ctrl_c_after():
                super()._remove_checkpoint(trainer, filepath)
                # Made, for the user: a replay removes the artifact even where the file
                # stays.
                handed_over = getattr(settle, "handed_over", None)
                if handed_over is not None:
                    handed_over()
            remove = None
        self._submit_record(trainer, record, prepare=remove, journaled=settle)
        self._persist_outside_a_stage()

    @override
    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        remove = super()._should_remove_checkpoint(trainer, previous, current)
        users = (
            type(self)._remove_checkpoint
            is not ArtifactPublishingModelCheckpoint._remove_checkpoint
        )
        if remove and users and trainer.is_global_zero and not self._plain():
            # A _remove_checkpoint of the user's, which may not call ours (it moves the
            # evicted file to an archive, or deletes it itself): it finds the file staged,
            # so its save persists, as the reference's synchronous save had persisted it.
            self._ensure_submitter().await_staging(previous)
        return remove

    def _open_outbox_outside_a_stage(self, trainer: pl.Trainer) -> None:
        """Outside a stage (Lightning's methods called directly, after ``fit`` or before
        ``setup``; see ``_persist_outside_a_stage``) the outbox is opened as ``setup`` opens
        it, so that the call's jobs are journaled: one not persisted by the time the call
        returns (a flush that timed out, Ctrl+C) is left for ``lamin-lightning flush``."""
        if self._in_stage or not trainer.is_global_zero or not self.dirpath:
            return
        submitter = self._ensure_submitter()
        if not submitter.outbox_planned():
            submitter.open_outbox(
                self._staging_root(self.dirpath),
                _journal_digest(self),
                enabled=self.outbox,
                dirpath=self.dirpath,
            )

    def _removes_as_lightning(self, trainer: pl.Trainer) -> bool:
        """:func:`removes_as_lightning` for the trainer's strategy, remembered per
        strategy and CheckpointIO (read at every eviction, on the training thread)."""
        return self._plain_io(trainer)[2]

    def _rewrites_by_rename(self, trainer: pl.Trainer) -> bool:
        """:func:`rewrites_by_rename` for the trainer's strategy, remembered the same way
        (read at every synchronous rewrite)."""
        return self._plain_io(trainer)[3]

    def _plain_io(self, trainer: pl.Trainer) -> tuple[Any, Any, bool, bool]:
        strategy = trainer.strategy
        io = strategy.checkpoint_io
        known = self._plain_removal
        if known is None or known[0] is not strategy or known[1] is not io:
            known = self._plain_removal = (
                strategy,
                io,
                removes_as_lightning(strategy),
                rewrites_by_rename(strategy),
            )
        return known

    # -- submission (training thread) -----------------------------------------------------

    # -- committer thread -----------------------------------------------------------------

    # -- shutdown and errors (training thread) --------------------------------------------


class _putting_back:  # used as a function
    """``written`` (a wait for a CheckpointIO's write), then ``put_back`` with its outcome:
    on the pipeline's intake thread, before the file is staged; on a thread of its own if
    the save's job is not submitted (``finishes_alone``: see ``Submitter.abandon_staging``
    and ``Submitter.keep_out``). Runs once: a later call waits for that run's outcome."""

    finishes_alone = True

    def __init__(self, written: Callable[[], None], put_back: Callable[[bool], None]) -> None:
        self._written, self._put_back = written, put_back
        self._once = threading.Lock()
        self._ran = False
        self._error: BaseException | None = None

    def mark_folder_with(self, mark: Callable[[tuple[int, int, int]], None]) -> None:
        """See ``PendingWrites.mark_folder_with`` (the wait this wraps is one)."""
        self._written.mark_folder_with(mark)  # type: ignore[attr-defined]

    def folder_written(self) -> tuple[int, int, int] | None:
        """See ``PendingWrites.folder_written``."""
        return self._written.folder_written()  # type: ignore[attr-defined,no-any-return]

    def __call__(self) -> None:
        with self._once:
            if not self._ran:
                self._ran = True
                try:
                    self._written()
                except BaseException as error:
                    self._error = error
                    self._put_back(False)
                else:
                    self._put_back(True)
        if self._error is not None:
            raise self._error


def _supersede(removals: list[RemovalOnceWritten]) -> None:
    """Tell removals that a write of their file is starting (see ``before_start``): one
    that ran already (on the intake thread, before the write) is not told anything."""
    for removal in removals:
        removal.supersede()


def _write_now(write: HostWrite) -> None:
    """Run a background write on the training thread; log (never raise) its failure."""
    try:
        write()
    except Exception as error:
        log.error("could not write %s: %s: %s", write.filepath, type(error).__name__, error)


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


def _state_bytes(pl_module: pl.LightningModule) -> int:
    """Bytes of a module's parameters and buffers: a lower bound of its checkpoint size."""
    total = 0
    try:
        for tensor in (*pl_module.parameters(), *pl_module.buffers()):
            total += tensor.numel() * tensor.element_size()
    except Exception:  # pragma: no cover - an exotic module: skip the check
        return 0
    return total


def _distributed_ready() -> bool:
    """Whether a default process group is up (a collective can run now)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())
