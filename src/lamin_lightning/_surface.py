"""The reference's extension surface of the generic callback: hooks, observers, last artifacts.

:class:`ArtifactHooks` is the part of
:class:`~lamin_lightning.ArtifactPublishingModelCheckpoint` that user code overrides
or reads, as in ``lamindb.integrations.lightning``: the ``save_*`` and
``resolve_*`` override points, the ``on_artifact_*`` hooks, the observers, and the
``last_*_artifact`` properties. It also delivers events: on the delivery thread, in
submission order, each hook and observer isolated from the others. An exception
from any of them is logged; a ``BaseException`` that is not an ``Exception``
(``SystemExit``, ``KeyboardInterrupt``) is kept and re-raised on the training thread
at the next save or at teardown, after the pipeline has flushed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning._errors import EventWithheld, UnknownKindError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactObserver,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lamin_lightning._jobs import CheckpointSnapshot, JobRecord

log = logging.getLogger("lamin_lightning")

_pipeline_call = threading.local()


_NOTHING: Any = object()


class _RaisedAfterPersisting(Exception):
    """A ``save_*`` override raised after ``super()`` had persisted ``artifact``."""

    def __init__(self, artifact: Any, error: BaseException) -> None:
        super().__init__(artifact, error)
        self.artifact, self.error = artifact, error


def _job_call(record: JobRecord, path: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run the ``save_*`` hook ``fn`` for the pipeline's job ``record``, whose file it gets
    at ``path`` (the staged copy): marked as called by the pipeline (see
    ``called_by_pipeline`` and :func:`pipeline_job_key`).

    An override that raises after ``super()`` persisted the artifact (see
    :func:`note_persisted`) raises :class:`_RaisedAfterPersisting`, with that artifact:
    the file is stored, and the job must say so."""
    _pipeline_call.job = (os.fspath(path), record.key)
    _pipeline_call.persisted = _NOTHING
    try:
        return fn(*args, **kwargs)
    except BaseException as error:
        persisted = _pipeline_call.persisted
        if persisted is _NOTHING or persisted is None:
            raise
        raise _RaisedAfterPersisting(persisted, error) from error
    finally:
        _pipeline_call.job = None
        _pipeline_call.persisted = _NOTHING


def _the_pipelines_job(key: str, path: Path | str) -> bool:
    """Whether ``key`` (or ``path``) is that of the job whose ``save_*`` hook the pipeline
    runs on this thread: its saved event is the pipeline's to deliver. Another artifact
    such a hook persists (a file beside the checkpoint) is not the pipeline's."""
    job = getattr(_pipeline_call, "job", None)
    return job is not None and (key == job[1] or os.fspath(path) == job[0])


def note_persisted(artifact: Any) -> None:
    """Tell the pipeline's job running on this thread that its file is stored as
    ``artifact`` (called by this package's own ``save_*`` implementations), so that an
    override raising after its ``super()`` call does not fail a job whose file is stored."""
    if getattr(_pipeline_call, "job", None) is not None:
        _pipeline_call.persisted = artifact


def pipeline_job_key(path: str | os.PathLike[str]) -> str | None:
    """The key the pipeline's current job resolved at submission, if ``path`` is the file
    its ``save_*`` hook was handed; else None.

    The hook gets the staged copy (same file name, another folder), but the key was
    resolved on the training thread from Lightning's path: the artifact must get that
    key, the one its events and flags name, whatever ``resolve_artifact_key`` makes of
    the staged copy's folder.
    """
    job = getattr(_pipeline_call, "job", None)
    if job is None or os.fspath(path) != job[0]:
        return None
    return str(job[1])


_OBSERVER_METHODS = ("on_artifact_saved", "on_artifact_removed", "on_artifact_failed")


class ArtifactHooks:
    """Override points, lifecycle hooks and observers of the generic callback."""

    _artifact_observers: list[ArtifactObserver]
    _latest_artifacts: dict[ArtifactKind, Any | None]
    _last_artifact_event: AnyArtifactEvent | None
    _escalated: collections.deque[BaseException]
    _hook_errors: collections.deque[Exception]

    def _init_surface(self, observers: list[ArtifactObserver]) -> None:
        self._artifact_observers = []
        for observer in observers:
            self.add_artifact_observer(observer)
        self._latest_artifacts = {"checkpoint": None, "config": None, "hparams": None}
        self._last_artifact_event = None
        self._escalated = collections.deque()
        self._hook_errors = collections.deque()

    # -- what the reference exposes ----------------------------------------------------------

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
            raise UnknownKindError(
                f"kind must be one of {tuple(self._latest_artifacts)}, got {kind!r}"
            )
        return self._latest_artifacts[kind]

    def add_artifact_observer(self, observer: ArtifactObserver) -> None:
        """Register an observer; each of its ``on_artifact_saved``, ``on_artifact_removed``
        and ``on_artifact_failed`` is called, the ones it lacks skipped (as the reference
        does). An object with none of them is registered too, with a warning: it would
        never hear of anything. It hears every event delivered from now on, which during
        training includes those of earlier saves still on their way."""
        if not any(callable(getattr(observer, name, None)) for name in _OBSERVER_METHODS):
            warnings.warn(
                f"artifact observer {observer!r} has none of on_artifact_saved,"
                " on_artifact_removed, on_artifact_failed: it is registered but will never"
                " be called; define one of them",
                UserWarning,
                stacklevel=2,
            )
        self._artifact_observers.append(observer)

    def remove_artifact_observer(self, observer: ArtifactObserver) -> None:
        """Unregister an observer added before; it hears no event delivered from now on
        (during training: of earlier saves still on their way either)."""
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

    # -- extension points of this package ----------------------------------------------------

    def collect_checkpoint_feature_values(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot
    ) -> dict[Any, Any] | None:
        """Values to annotate the checkpoint with, read from the live trainer. Training thread.

        Keys are feature names, or feature objects (taken by their ``name``); values
        are frozen as JSON data at submission, so a replay annotates the same values.
        """
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

    def abandon_checkpoint_artifact(self, trainer: pl.Trainer, key: str, artifact: Any) -> None:
        """Delete an artifact whose save failed for good after it was transferred.

        Committer thread. Called when the commit exhausted its retries, so that no
        uncommitted artifact lingers under ``key``. Best effort; must be idempotent.
        """
        del trainer, key, artifact

    @staticmethod
    def called_by_pipeline() -> bool:
        """Whether the current ``save_*`` hook call comes from the background pipeline.

        Lets a ``save_*`` override behave like the synchronous reference when user
        code calls it directly: annotate and emit the saved event itself.
        """
        return getattr(_pipeline_call, "job", None) is not None

    def emit_artifact_event(self, event: AnyArtifactEvent) -> None:
        """Deliver an event to the ``on_artifact_*`` hooks and observers now, on this thread.

        For direct (synchronous) calls of the ``save_*`` hooks; the pipeline delivers
        its own events on the delivery thread.
        """
        self._deliver(event)

    def _notify_artifact_saved(
        self,
        trainer: pl.Trainer,
        *,
        kind: ArtifactKind,
        key: str,
        artifact: Any,
        local_path: Path | str,
    ) -> ArtifactSavedEvent:
        """The reference's helper for a subclass that saves in its own ``_save_checkpoint``
        (written for its generic layer, see ``persists_through_pipeline``): build the saved
        event and deliver it now, on this thread, as the reference does (an exception from
        a hook or an observer propagates).

        Called from a ``save_*`` hook the pipeline is running (a hook written as the
        reference documents them, "persist ... and emit the corresponding event") for the
        artifact of that hook's job, the event is built but not delivered: the pipeline
        delivers that save's event itself, after its commit and in submission order, so
        hooks and observers hear of it once. The event of another artifact the hook
        persisted (its key and file not the job's) is delivered now.
        """
        event = ArtifactSavedEvent(
            kind=kind,
            key=key,
            local_path=Path(local_path),
            trainer=trainer,
            artifact=artifact,
            storage_uri=self.resolve_artifact_storage_uri(artifact),
        )
        if not _the_pipelines_job(key, local_path):
            self._notify_now(event)
        return event

    def _notify_artifact_removed(
        self,
        trainer: pl.Trainer,
        *,
        kind: ArtifactKind,
        key: str,
        local_path: Path | str,
        artifact: Any | None,
    ) -> ArtifactRemovedEvent:
        """The reference's helper for the removed event (see :meth:`_notify_artifact_saved`)."""
        event = ArtifactRemovedEvent(
            kind=kind,
            key=key,
            local_path=Path(local_path),
            trainer=trainer,
            artifact=artifact,
            storage_uri=None if artifact is None else self.resolve_artifact_storage_uri(artifact),
        )
        self._notify_now(event)
        return event

    _notified_directly = False  # set by _notify_now (see the generic layer's teardown)

    def _notify_now(self, event: AnyArtifactEvent) -> None:
        self._notified_directly = True
        self._deliver(event, isolated=False)

    def thread_finalizer(self) -> None:
        """Called on each pipeline thread as it exits (close per-thread connections here)."""

    def _removal_store(self) -> Any:
        """A store whose ``find_removal``/``delete_removal`` replace
        :meth:`remove_checkpoint_artifact`, so that an evicted checkpoint's artifact is
        deleted after its removal event was delivered; None: the hook deletes at once."""
        return None

    def _hook_feature_values(self, snapshot: CheckpointSnapshot | None) -> dict[Any, Any]:
        """The ``feature_values`` the pipeline passes to ``save_checkpoint_artifact``:
        the snapshot's, keyed by name."""
        return dict(snapshot.feature_values or {}) if snapshot is not None else {}

    def _replacing_store(self) -> Any:
        """A store whose ``delete_replaced`` deletes the older artifacts of a key that
        :meth:`commit_checkpoint_artifact` replaced, after the earlier saves' events and
        before this save's are delivered; None: the commit deletes them at once."""
        return None

    # -- delivery thread -----------------------------------------------------------------------

    def _deliver(self, event: AnyArtifactEvent, *, isolated: bool = True) -> None:
        """To the hook, then each observer; ``isolated``: an exception of theirs is logged
        (the pipeline's delivery), else it propagates (the reference's direct calls)."""
        if isinstance(event, ArtifactSavedEvent):
            self._latest_artifacts[event.kind] = event.artifact
            method = "on_artifact_saved"
        elif isinstance(event, ArtifactRemovedEvent):
            method = "on_artifact_removed"
        else:
            method = "on_artifact_failed"
        self._last_artifact_event = event
        call = self._isolated if isolated else _directly
        try:
            call(getattr(self, method), event, f"{type(self).__name__}.{method} raised")
            for observer in tuple(self._artifact_observers):
                callback = getattr(observer, method, None)
                if callable(callback):
                    call(callback, event, f"observer {observer!r} raised in {method}")
        finally:
            if isinstance(event, ArtifactFailedEvent):
                self._failure_delivered(event)

    def _failure_delivered(self, event: ArtifactFailedEvent) -> None:
        """Every hook and observer had the failure ``event`` (what they raised is kept)."""
        del event

    def _isolated(self, hook: Any, event: AnyArtifactEvent, what: str) -> None:
        try:
            hook(event)
        except Exception:
            log.exception("%s for %r", what, event.key)
        except BaseException as error:  # SystemExit, KeyboardInterrupt: for the training thread
            log.error("%s %s for %r", what, type(error).__name__, event.key)
            self._escalated.append(error)

    def _take_escalated(self) -> list[BaseException]:
        taken = []
        while self._escalated:  # deque appends and pops are thread-safe
            taken.append(self._escalated.popleft())
        return taken

    def _raised_with_artifact_stored(self, error: BaseException, what: str, key: str) -> None:
        """An override (``what``) raised ``error`` once the artifact of ``key`` was stored:
        the job is not failed (its artifact is committed), and the error goes to the
        training thread, as the reference raises it out of ``fit``: a ``SystemExit`` (or
        similar) at the next save or at teardown, an ``Exception`` there too as ``on_error``
        says (raised as it is, or warned)."""
        log.error(
            "%s raised for %r after its artifact was stored; the artifact stays",
            what,
            key,
            exc_info=error,
        )
        if isinstance(error, Exception):
            self._hook_errors.append(error)
        else:
            self._escalated.append(error)

    def _left_out_of(self, artifact: Any) -> tuple[str, ...]:
        """Names of the features whose values the last commit of ``artifact`` left out
        (LaminDB refused them; see ``Checkpoint``), for its saved event. None here."""
        del artifact
        return ()

    def _take_hook_errors(self) -> list[Exception]:
        taken = []
        while self._hook_errors:
            taken.append(self._hook_errors.popleft())
        return taken


def _directly(hook: Any, event: AnyArtifactEvent, what: str) -> None:
    del what
    hook(event)


def _hparams_or_look_again(callback: Any, trainer: pl.Trainer, path: Path) -> Any:
    """``save_hparams_artifact``; if it persisted nothing (an override returned None), the
    next checkpoint looks for ``hparams.yaml`` again, as the reference does at every save
    until that hook returns an artifact."""
    artifact = callback.save_hparams_artifact(trainer, path)
    if artifact is None and hasattr(callback, "_hparams_submitted"):
        callback._hparams_submitted = False
    return artifact


class HookStore:
    """The store of live jobs: the callback's own override points, called as the reference does."""

    def __init__(self, callback: ArtifactHooks, trainer: pl.Trainer) -> None:
        self._callback = callback
        self._trainer = trainer
        deferred = callback._removal_store()
        if deferred is not None:
            # Observers are told of an eviction before its artifact goes (see _replay).
            self.find_removal = partial(self._find_removal, deferred)
            self.delete_removal = deferred.delete_removal
        replacing = callback._replacing_store()
        if replacing is not None:
            # An earlier save's event names an artifact that still exists (see _replay).
            self.delete_replaced = replacing.delete_replaced

    def _find_removal(self, store: Any, record: JobRecord, known: Any | None) -> Any:
        removal = store.find_removal(record, known)
        if removal is None:
            return None
        artifact = removal.named[0]
        uri = self._callback.resolve_artifact_storage_uri(artifact)
        return dataclasses.replace(removal, named=(artifact, uri))

    def transfer(self, record: JobRecord, path: Path) -> Any:
        cb, trainer = self._callback, self._trainer
        if record.kind == "checkpoint":
            save: Callable[..., Any] = partial(
                cb.save_checkpoint_artifact,
                feature_values=cb._hook_feature_values(record.checkpoint),
            )
        elif record.kind == "config":
            save = cb.save_config_artifact
        else:
            save = partial(_hparams_or_look_again, cb)
        try:
            return _job_call(record, path, save, trainer, path)
        except _RaisedAfterPersisting as raised:
            # Stored is stored: the job commits it (features, flags, its event), and the
            # override's error reaches training, as the reference's save raises it after
            # its super() stored the artifact.
            cb._raised_with_artifact_stored(
                raised.error, f"{type(cb).__name__}.save_{record.kind}_artifact", record.key
            )
            return raised.artifact

    def commit(
        self,
        record: JobRecord,
        artifact: Any,
        *,
        replay: bool,
        set_flags: bool,
        defer_replaced: bool = False,
    ) -> tuple[str, ...]:
        # A live job: every flag moves, every annotation must hold. What it replaced goes
        # when the callback's commit_checkpoint_artifact says (see _replacing_store).
        del replay, set_flags, defer_replaced
        if artifact is None:  # an override of the save hook persisted nothing: as it chose
            return ()
        if record.kind == "checkpoint" and record.checkpoint is not None:
            self._callback.commit_checkpoint_artifact(self._trainer, record.checkpoint, artifact)
            return self._callback._left_out_of(artifact)
        return ()

    def remove(self, record: JobRecord, known: Any | None) -> tuple[Any, str] | None:
        cb = self._callback
        removed = cb.remove_checkpoint_artifact(self._trainer, record.key, known)
        return (removed, cb.resolve_artifact_storage_uri(removed)) if removed is not None else None

    def abandon(self, record: JobRecord, artifact: Any) -> None:
        if record.kind == "checkpoint":
            self._callback.abandon_checkpoint_artifact(self._trainer, record.key, artifact)

    def storage_uri(self, artifact: Any) -> str:
        cb = self._callback
        try:
            return cb.resolve_artifact_storage_uri(artifact)
        except BaseException as error:
            # Asked for the saved event of an artifact committed (features and flags set),
            # as the reference asks once its artifact is stored and annotated: that save
            # stays, with no saved event (the reference builds none either), and the error
            # reaches training.
            key = str(getattr(artifact, "key", "") or "")
            cb._raised_with_artifact_stored(
                error, f"{type(cb).__name__}.resolve_artifact_storage_uri", key
            )
            raise EventWithheld(key) from error

    def finalize_thread(self) -> None:
        self._callback.thread_finalizer()
