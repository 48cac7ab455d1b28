"""The LaminDB layer's callbacks: ``Checkpoint`` (the reference's keys and surface) and
``SaveConfigCallback``. lamindb is imported lazily, at first use.

``Checkpoint`` keeps the key layout, descriptions, kinds, features and events of
``lamindb.integrations.lightning.Checkpoint`` and moves every LaminDB call off the
training thread: its ``save_*``, commit and removal hooks delegate to a
:class:`~lamin_lightning._lamin_store.LaminStore`, the same store that replays its
journaled jobs after a crash.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

# At run time, not only for type checkers: LightningCLI (jsonargparse) and
# ``typing.get_type_hints`` resolve the constructor's annotations.
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.cli import SaveConfigCallback as _LightningSaveConfigCallback
from typing_extensions import override

from lamin_lightning._callback import ArtifactPublishingModelCheckpoint, persists_through_pipeline
from lamin_lightning._errors import LaminSetupError, NotSetUpError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactKind,
    ArtifactObserver,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import CheckpointSnapshot
from lamin_lightning._lamin_features import (
    FeatureValues,
    _ln,
    ensure_offline_safe,
    logger_layout,
    require_instance,
    save_lightning_features,
)
from lamin_lightning._lamin_store import (
    ArtifactPublisher,
    LaminArtifactPublisher,
    LaminStore,
    close_connections,
    delete_artifact,
    immediate_transactions,
    refresh_found_again,
    replace_broken_connection,
)
from lamin_lightning._legacy import Callback
from lamin_lightning._options import (
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_WORKERS,
    OnError,
)
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._sigterm import ctrl_c_after
from lamin_lightning._submission import refuse_conflicts
from lamin_lightning._surface import note_persisted, pipeline_job_key

__all__ = [
    "ArtifactPublisher",
    "Callback",
    "Checkpoint",
    "LaminArtifactPublisher",
    "LaminSetupError",
    "SaveConfigCallback",
    "ensure_offline_safe",
    "save_lightning_features",
]


class Checkpoint(ArtifactPublishingModelCheckpoint):
    """A ``ModelCheckpoint`` that saves every checkpoint as a LaminDB artifact, in the background.

    Drop-in for ``lamindb.integrations.lightning.Checkpoint``: same arguments,
    artifact keys, descriptions, kinds, features and events. Training waits only
    for Lightning's local ``torch.save``; hashing, copying into storage and every
    database write happen on the callback's own threads.

    Keys: all artifacts live under a base prefix:

    1. ``dirpath`` given: ``{dirpath}`` (``{dirpath}/{run_uid}`` with an active run);
    2. no ``dirpath``, a logger: ``{save_dir basename}/{name}/{version}``, the
       version replaced by the run uid when a run is active;
    3. neither: empty (``{run_uid}`` with an active run).

    Checkpoints and ``hparams.yaml`` are stored at ``{base}/checkpoints/{file name}``,
    the LightningCLI config at ``{base}/config.yaml``.

    Features: if :func:`save_lightning_features` created them, checkpoints get
    ``is_best_model``, ``is_last_model``, ``score``, ``model_rank`` (0 = best, over
    Lightning's ``best_k_models``), ``save_weights_only``, ``monitor``, ``mode``,
    and the run active at ``setup`` gets ``logger_name``, ``logger_version``,
    ``max_epochs``, ``max_steps``, ``precision``, ``accumulate_grad_batches``,
    ``gradient_clip_val``, ``monitor``, ``mode``, plus model and datamodule
    hyperparameters that have a feature of the same name.

    Args:
        dirpath: Local checkpoint directory; also the key prefix when given.
        features: ``{"run": {...}, "artifact": {...}}``: values to annotate the run
            and every checkpoint with. An artifact value of None is read, at each
            save, from the trainer attribute or logged metric of that name. Every
            name must exist as a feature: unknown names fail at ``setup``.
        monitor: Metric to rank checkpoints by.
        verbose: Verbosity of ``ModelCheckpoint``.
        save_last: Also save ``last.ckpt`` (``"link"``: as a link to the latest checkpoint).
        save_top_k: How many best checkpoints to keep (-1: all).
        save_weights_only: Save weights only.
        mode: ``"min"`` or ``"max"``.
        auto_insert_metric_name: Put metric names in file names.
        every_n_train_steps: Save every N training steps.
        train_time_interval: Save at this time interval.
        every_n_epochs: Save every N epochs.
        save_on_train_epoch_end: Save at the end of the training epoch.
        enable_version_counter: Append ``-vN`` to colliding file names.
        run_uid_is_version: Put the uid of the run active at ``setup`` into the
            base prefix (see above), so runs never overwrite each other's keys.
        key_is_virtual: Let LaminDB store files under their uid (True) or under the
            key itself (False).
        artifact_observers: Observers of saved, removed and failed artifacts.
        filename: ``ModelCheckpoint``'s file name template (an addition).
        save_on_exception: ``ModelCheckpoint``'s emergency checkpoint when training
            raises (an addition); written and persisted despite earlier failures.
        max_workers: Uploads that may run at once.
        max_pending: Checkpoints that may be queued or in flight; beyond, training waits.
        retry: Retry policy (:class:`RetryPolicy`, a mapping of its fields, or attempts).
        flush_timeout: Seconds ``teardown`` waits for persistence (None: no limit).
        on_error: ``"raise"`` or ``"warn"`` when persisting fails.
        async_write: Also write the local file in the background, from a host snapshot.
        max_snapshots: Host snapshots that may exist at once with ``async_write``.
        log_stats: At each checkpoint, send the persistence stats to the trainer's loggers
            (``lamin_lightning/pending``, ``.../training_stall_seconds``,
            ``.../persistence_latency_seconds``, ``.../retried``, ``.../failed``).
        outbox: Journal every job durably next to the checkpoints, for crash recovery
            (the next ``setup`` in this dirpath, or ``lamin-lightning flush``). Default True.

    Example::

        import lamin_lightning as ll

        ll.save_lightning_features()
        callback = ll.Checkpoint(monitor="val_loss", save_top_k=3)
        trainer = lightning.Trainer(callbacks=[callback])
        trainer.fit(model, datamodule)
        ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix)
    """

    def __init__(
        self,
        dirpath: _PATH | None = None,
        *,
        features: dict[Literal["run", "artifact"], dict[str, Any]] | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: Literal["min", "max"] = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        run_uid_is_version: bool = True,
        key_is_virtual: bool = True,
        artifact_observers: Iterable[ArtifactObserver] | None = None,
        filename: str | None = None,
        save_on_exception: bool = False,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_pending: int = DEFAULT_MAX_PENDING,
        retry: RetryPolicy | Mapping[str, Any] | int | None = None,
        flush_timeout: float | None = DEFAULT_FLUSH_TIMEOUT,
        on_error: OnError = "raise",
        async_write: bool = False,
        max_snapshots: int = 1,
        log_stats: bool = False,
        outbox: bool = True,
    ) -> None:
        self._features = FeatureValues(features)
        self._original_dirpath = dirpath
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            save_weights_only=save_weights_only,
            mode=mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
            save_on_exception=save_on_exception,
            artifact_observers=artifact_observers,
            max_workers=max_workers,
            max_pending=max_pending,
            retry=retry,
            flush_timeout=flush_timeout,
            on_error=on_error,
            async_write=async_write,
            max_snapshots=max_snapshots,
            log_stats=log_stats,
            outbox=outbox,
        )
        self._run_uid_is_version = run_uid_is_version
        self._key_is_virtual = key_is_virtual
        self._run: Any = None
        self._run_values_pending: dict[Any, Any] | None = None
        self._artifact_publisher: ArtifactPublisher = LaminArtifactPublisher()
        self._run_values_collected = False
        # The run-level values of this fit, journaled with its checkpoints (set at the
        # first save; see CheckpointSnapshot.run_features).
        self._run_features: tuple[tuple[str, Any, bool], ...] = ()

    @override
    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._store_context: dict[str, Any] | None = None
        # The feature values the pipeline's save_checkpoint_artifact call received, by
        # id() of the artifact it made (held, so no other object takes that id meanwhile):
        # an override may have changed them on the way.
        self._given_values: dict[int, tuple[Any, dict[Any, Any]]] = {}
        # Names of the features a commit left out (LaminDB refused their values), by id()
        # of the artifact, until the pipeline takes them for its saved event (committer
        # thread only).
        self._left_out: dict[int, tuple[str, ...]] = {}
        self._lamin: LaminStore | None = None
        self._prefix_cache: tuple[pl.Trainer, str] | None = None
        # resolve_artifact_key's answers (about ten per checkpoint, on the training thread)
        self._key_cache: dict[tuple[str, str, str], str] = {}
        self._hparams_probe: str | None = None  # where hparams.yaml is looked for

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_trainer"] = None
        state["_run"] = None
        state["_store_context"] = None
        state["_lamin"] = None
        state["_prefix_cache"] = None
        state["_key_cache"] = {}
        state["_hparams_probe"] = None
        state["_left_out"] = {}
        return state

    @property
    def _store(self) -> LaminStore:
        if self._lamin is None:
            self._lamin = LaminStore(publisher=lambda: self._artifact_publisher, retry=self.retry)
        return self._lamin

    # -- setup ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the instance, validate user features and find the auto-features (rank zero)."""
        self._trainer = trainer
        self._prefix_cache = None
        self._key_cache = {}
        self._hparams_probe = None
        self._refuse_keys_lamindb_refuses(trainer)  # every rank: none may wait for another
        if trainer.is_global_zero:
            ln = require_instance()
            run = ln.context.run
            if run is not self._run:
                # Run-level features are written once per run.
                self._run_values_collected = False
            self._run_features = ()
            self._run = run
            self._store_context = None
            self._store.reset()
            self._features.setup(ln, trainer, pl_module, self._run)
        super().setup(trainer, pl_module, stage)
        if self.save_last:
            # The reference's words, after Lightning's own setup warnings, as it warns.
            warnings.warn(
                "save_last is not necessary with Lamin. Checkpoint metadata"
                " (is_best_model, is_last_model, model_rank, score) makes the latest checkpoint"
                " queryable without encoding this in the filename. Consider"
                " disabling save_last to avoid redundant checkpoint copies.",
                UserWarning,
                stacklevel=2,
            )

    # -- keys -------------------------------------------------------------------------------

    def _refuse_keys_lamindb_refuses(self, trainer: pl.Trainer) -> None:
        """Raise ValueError at setup if the keys derived from ``dirpath`` (or the logger)
        are keys LaminDB refuses, rather than at every save of a whole fit.

        The reference raises LaminDB's ValueError at its first save. An override of
        ``resolve_artifact_key`` makes its own keys: not checked here.
        """
        if type(self).resolve_artifact_key is not Checkpoint.resolve_artifact_key:
            return
        # Without the run's uid (letters and digits; reading it would import lamindb on
        # every rank): the part that comes from dirpath or the logger.
        if self._original_dirpath is not None:
            prefix = str(self._original_dirpath).rstrip("/")
        else:
            layout = logger_layout(trainer)
            if layout is None:
                return
            save_dir, name, version_str = layout
            prefix = f"{save_dir.name}/{name}"
            if not self._run_uid_is_version:
                prefix = f"{prefix}/{version_str}"
        problem = _key_problem(prefix)
        if problem is None:
            return
        if self._original_dirpath is not None:
            given = str(self._original_dirpath)
            normal = os.path.normpath(given.replace("\\", "/"))
            fix = f"{normal!r}" if _key_problem(normal) is None else f"{os.path.abspath(given)!r}"
            raise ValueError(
                f"dirpath={given!r} makes artifact keys ({prefix}/...) that LaminDB"
                f" refuses: {problem}. Pass dirpath={fix} (the key prefix is the dirpath as"
                " given), or override resolve_artifact_key"
            )
        raise ValueError(
            f"the logger's save_dir, name and version make artifact keys"
            f" ({prefix}/...) that LaminDB refuses: {problem}. Give the logger a"
            " name and version without them, pass a dirpath, or override resolve_artifact_key"
        )

    def _active_run_uid(self) -> str | None:
        if not self._run_uid_is_version:
            return None
        run = self._run
        if run is None:
            try:
                run = _ln().context.run
            except Exception:
                return None
        return str(run.uid) if run is not None else None

    def _base_prefix(self, trainer: pl.Trainer) -> str:
        # Fixed from setup on (the run is read then, the logger's version is chosen by
        # then): computed once per setup, not for each of the keys of every checkpoint.
        cached = self._prefix_cache
        if cached is not None and cached[0] is trainer:
            return cached[1]
        prefix = self._compute_base_prefix(trainer)
        if self._set_up:
            self._prefix_cache = (trainer, prefix)
        return prefix

    def _compute_base_prefix(self, trainer: pl.Trainer) -> str:
        run_uid = self._active_run_uid()
        if self._original_dirpath is not None:
            prefix = str(self._original_dirpath).rstrip("/")
            return f"{prefix}/{run_uid}" if run_uid else prefix
        layout = logger_layout(trainer)
        if layout is not None:
            save_dir, name, version_str = layout
            return f"{save_dir.name}/{name}/{run_uid or version_str}"
        return run_uid or ""

    @property
    def base_prefix(self) -> str:
        """Prefix of every key this callback writes; available after ``setup``."""
        if self._trainer is None:
            raise NotSetUpError("base_prefix is only available after setup() (once fit() started)")
        return self._base_prefix(self._trainer)

    @property
    def checkpoint_key_prefix(self) -> str:
        """Prefix of checkpoint keys: ``{base_prefix}/checkpoints``; available after ``setup``."""
        base = self.base_prefix  # raises as the reference's does before setup
        return f"{base}/checkpoints" if base else "checkpoints"

    def _checkpoint_prefix(self, trainer: pl.Trainer) -> str:
        base = self._base_prefix(trainer)
        return f"{base}/checkpoints" if base else "checkpoints"

    @override
    def resolve_artifact_key(
        self, trainer: pl.Trainer, filepath: Path | str, kind: ArtifactKind
    ) -> str:
        """The key of a file: checkpoints and hparams under ``checkpoints/``. Training thread."""
        base = self._base_prefix(trainer)
        cache = self._key_cache
        known = cache.get((base, kind, str(filepath)))
        if known is not None:
            return known
        prefix = self._checkpoint_prefix(trainer) if kind in ("checkpoint", "hparams") else base
        name = (kind == "checkpoint" and _below(self.dirpath, filepath)) or Path(filepath).name
        key = f"{prefix}/{name}" if prefix else name
        if len(cache) > 4096:
            cache.clear()
        cache[(base, kind, str(filepath))] = key
        return key

    @override
    def resolve_artifact_storage_uri(self, artifact: Any) -> str:
        """Where the bytes live (``str(artifact.path)`` by default). Committer thread."""
        return self._artifact_publisher.storage_uri(artifact)

    @override
    def hparams_path(self, trainer: pl.Trainer) -> Path | None:
        """``hparams.yaml`` in the first logger's log dir (no broadcast: rank zero only)."""
        path = self._hparams_probe if self._trainer is trainer else None
        if path is None:
            if not trainer.loggers:
                log_dir: Any = trainer.default_root_dir
            else:
                logger = trainer.loggers[0]
                log_dir = getattr(logger, "log_dir", None)
                if log_dir is None:
                    save_dir, name, version_str = logger_layout(trainer)  # type: ignore[misc]
                    log_dir = save_dir / name / version_str
            path = os.path.join(log_dir, "hparams.yaml")
            if self._trainer is trainer:  # fixed from setup on, as the key prefix
                self._hparams_probe = path
        return Path(path) if os.path.exists(path) else None  # at every save until found

    # -- the store: what a replay needs, and which store replays -----------------------------

    store_name = "lamindb"

    @override
    def store_context(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The instance, run and key prefix of this callback's jobs (cached per setup)."""
        context = self._store_context
        if context is None:
            import lamindb_setup

            context = self._store_context = {
                "instance": lamindb_setup.settings.instance.slug,
                # The default storage at setup: a replay in another process (whose
                # default may be another) stores the checkpoint where this run would.
                "storage": lamindb_setup.settings.storage.root_as_str,
                "run_uid": self._run.uid if self._run is not None else None,
                # From the trainer given, as resolve_artifact_key: a save without setup
                # (Lightning's _save_*_checkpoint called directly) has no self._trainer.
                "prefix": self._checkpoint_prefix(trainer),
                "key_is_virtual": self._key_is_virtual,
            }
        return context

    @override
    def replay_store(self) -> LaminStore:
        """This callback's own store (its publisher, its caches)."""
        return self._store

    @override
    def sibling_replay_store(self) -> LaminStore:
        """A store of its own (this callback's publisher) for another callback's journal."""
        return LaminStore(publisher=lambda: self._artifact_publisher, retry=self.retry)

    # -- training thread ----------------------------------------------------------------------

    @override
    def _feature_conflict(self, message: str) -> Exception:
        # LaminDB's error, as the reference's save raises it (add_values, given an auto
        # feature and the user's value of the same name that differ: features=
        # {"artifact": {"score": 1.0}} with monitor="score").
        from lamindb.errors import ValidationError

        return ValidationError(message)

    @override
    def collect_checkpoint_feature_values(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot
    ) -> dict[Any, Any] | None:
        """Feature values of this checkpoint, read from the trainer at save time."""
        if not self._run_values_collected:
            # A Ctrl+C meanwhile is raised once they are kept (see ctrl_c_after): raised
            # between, they counted as collected and were never recorded on the run.
            with ctrl_c_after():
                self._collect_run_values(trainer)
        return self._features.checkpoint_feature_values(trainer, snapshot)

    def _collect_run_values(self, trainer: pl.Trainer) -> None:
        self._run_values_collected = True
        values = self._features.run_feature_values(trainer, self.monitor, self.mode)
        # An hparam of the model named as an auto feature, with another value
        # (max_epochs=7 against the trainer's -1): LaminDB's error at this save, as
        # the reference raises it from add_values, not a failed job at teardown.
        named = refuse_conflicts(values, self._feature_conflict)
        self._run_values_pending = values
        # Journaled with every checkpoint of this fit from now on: a replay records
        # on the run those it does not have, should no commit of the fit have run
        # (Ctrl+C or a kill before the first).
        if self._run is not None:
            auto = {str(k.name) for k in values if not isinstance(k, str)}
            self._run_features = tuple((name, value, name in auto) for name, value in named.items())

    @override
    def _run_features_to_journal(self) -> tuple[tuple[str, Any, bool], ...]:
        # Only until a commit recorded them on the run (the committer clears the pending
        # values): a replay of a later checkpoint finds them there, and the training
        # thread no longer encodes them into every journal line.
        return self._run_features if self._run_values_pending is not None else ()

    # -- worker threads -------------------------------------------------------------------------

    def _save_file(
        self, trainer: pl.Trainer, path: Path | str, kind: ArtifactKind, run: Any
    ) -> Any:
        key = pipeline_job_key(path) or self.resolve_artifact_key(
            trainer=trainer, filepath=path, kind=kind
        )
        artifact = self._store.create_or_reuse(
            path, key=key, kind=kind, run=run, key_is_virtual=self._key_is_virtual
        )
        return key, artifact

    @override
    def save_checkpoint_artifact(
        self,
        trainer: pl.Trainer,
        filepath: Path | str,
        *,
        feature_values: dict[Any, Any] | None = None,
    ) -> Any:
        """Hash and copy the checkpoint into storage and create its artifact. Worker thread.

        Called by the pipeline, features are annotated afterwards, on the committer
        thread (serially: LaminDB creates shared value records that concurrent writers
        would race on). Called directly, it annotates ``feature_values``, replaces an
        older artifact of the key and emits the saved event, like the reference.
        """
        key, artifact = self._save_file(trainer, filepath, "checkpoint", self._run)
        note_persisted(artifact)  # an override raising after this: its file is stored
        if not self.called_by_pipeline():
            self._finish_direct_call(trainer, "checkpoint", key, filepath, artifact, feature_values)
        else:  # annotated at the commit with these: what an override passed on to us
            self._given_values[id(artifact)] = (artifact, dict(feature_values or {}))
        return artifact

    @override
    def save_config_artifact(self, trainer: pl.Trainer, config_path: Path | str) -> Any:
        """Save a LightningCLI config and record it as an input of the run. Worker thread."""
        key, artifact = self._save_file(trainer, config_path, "config", False)
        run = self._run if self._run is not None else _ln().context.run
        if run is not None:
            from lamindb.models._lineage import track_run_inputs

            track_run_inputs(artifact, is_run_input=run)
        note_persisted(artifact)
        if not self.called_by_pipeline():
            self._finish_direct_call(trainer, "config", key, config_path, artifact)
        return artifact

    @override
    def save_hparams_artifact(self, trainer: pl.Trainer, hparams_path: Path | str) -> Any | None:
        """Save Lightning's ``hparams.yaml``; None if the file is missing. Worker thread."""
        if not Path(hparams_path).exists():
            return None
        key, artifact = self._save_file(trainer, hparams_path, "hparams", self._run)
        note_persisted(artifact)
        if not self.called_by_pipeline():
            self._finish_direct_call(trainer, "hparams", key, hparams_path, artifact)
        return artifact

    def _finish_direct_call(
        self,
        trainer: pl.Trainer,
        kind: ArtifactKind,
        key: str,
        filepath: Path | str,
        artifact: Any,
        feature_values: dict[Any, Any] | None = None,
    ) -> None:
        """A ``save_*`` hook called directly by user code: finish like the reference does.

        Annotate, remove older artifacts of the key, and emit the saved event now.
        """
        store = self._store
        found_again = store.found_again(artifact)
        store.settle(artifact)
        if kind == "checkpoint" and found_again:
            # The reference's save makes a new artifact: this save's run and values only.
            refresh_found_again(_ln(), artifact, feature_values or {}, self._run)
            store.reread_flags()  # its flags went with its other annotations
        elif feature_values:
            artifact.features.add_values(feature_values)
        if kind == "checkpoint":
            for old in store.others_under_key(key, exclude_id=artifact.id):
                delete_artifact(old, keep_path=str(artifact.path))
        self.emit_artifact_event(
            ArtifactSavedEvent(
                kind=kind,
                key=key,
                local_path=Path(filepath),
                trainer=trainer,
                artifact=artifact,
                storage_uri=self.resolve_artifact_storage_uri(artifact),
            )
        )

    # -- committer thread --------------------------------------------------------------------------

    @override
    def commit_checkpoint_artifact(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot, artifact: Any
    ) -> None:
        """Annotate features, replace older artifacts of the key, set flags and ranks."""
        immediate_transactions()  # before the run's values: a broken connection replaced
        if self._run_values_pending and self._run is not None:
            # A value LaminDB refuses (a model hparam of another dtype than its feature's)
            # is left out with a warning, the run's other values recorded, and this
            # checkpoint persists: the reference raises out of fit at its first save, with
            # no run value and no artifact for that checkpoint. Raises a transient error
            # only, retried with the values still pending.
            self._store.add_values_keeping_valid(
                self._run, self._run_values_pending, where=f"run {self._run.uid}"
            )
        self._run_values_pending = None
        _, given = self._given_values.pop(id(artifact), (None, None))
        if given is not None and _by_name(given) != dict(snapshot.feature_values or {}):
            # An override of save_checkpoint_artifact added, changed or dropped values
            # before calling ours: the reference annotates what it passed on.
            snapshot = dataclasses.replace(snapshot, feature_values=given)
        left_out = self._store.commit_checkpoint(
            snapshot, artifact, replay=False, set_flags=True, run=self._run, defer_replaced=True
        )
        if left_out:  # named by its saved event (ArtifactSavedEvent.unannotated_features)
            self._left_out[id(artifact)] = left_out

    def _left_out_of(self, artifact: Any) -> tuple[str, ...]:
        return self._left_out.pop(id(artifact), ())

    def _hook_feature_values(self, snapshot: CheckpointSnapshot | None) -> dict[Any, Any]:
        # As the reference passes them: an auto feature keyed by its Feature record, a
        # user's feature by its name (the snapshot keys both by name, for the journal).
        values = super()._hook_feature_values(snapshot)
        auto = snapshot.auto_features if snapshot is not None else frozenset()
        if not auto:
            return values
        features = self._features.auto
        return {
            (features.get(name, name) if name in auto else name): value
            for name, value in values.items()
        }

    def _replacing_store(self) -> Any:
        # The older artifacts of a key go after the earlier saves' events were delivered,
        # before this save's: their observers find their artifacts, as the reference's do.
        return self._store

    @override
    def remove_checkpoint_artifact(
        self, trainer: pl.Trainer, key: str, artifact: Any | None
    ) -> Any | None:
        """Delete the evicted checkpoint's artifact (record and stored file).

        The pipeline calls it only where a subclass overrides it (then at the commit,
        before observers are told). Otherwise it finds what to delete at the commit,
        tells observers, and deletes it after, as the reference orders it.
        """
        removed = self._store.remove_key(key, artifact)
        return removed[0] if removed is not None else None

    def _removal_store(self) -> Any:
        overridden = (
            type(self).remove_checkpoint_artifact is not Checkpoint.remove_checkpoint_artifact
        )
        return None if overridden else self._store

    def _deliver(self, event: AnyArtifactEvent, *, isolated: bool = True) -> None:
        replace_broken_connection()  # observers query the database on this thread too
        super()._deliver(event, isolated=isolated)

    @override
    def abandon_checkpoint_artifact(self, trainer: pl.Trainer, key: str, artifact: Any) -> None:
        """Delete the artifact of a save whose commit failed for good."""
        self._given_values.pop(id(artifact), None)
        self._store.abandon_artifact(artifact)

    @override
    @staticmethod
    def thread_finalizer() -> None:
        """Close this thread's Django connection (also once the callback is collected)."""
        close_connections()


# Lightning's annotations are objects, ours strings (``from __future__ import annotations``):
# resolve them, so that ``inspect.signature(Checkpoint)`` gives what Lightning's does (a plain
# ``parser.add_argument(type=...annotation)`` or other introspection without get_type_hints).
Checkpoint.__init__.__annotations__ = typing.get_type_hints(Checkpoint.__init__)


def _by_name(values: Mapping[Any, Any]) -> dict[Any, Any]:
    """``values`` keyed by feature name (a Feature record by its ``name``)."""
    return {
        (key if isinstance(key, str) else getattr(key, "name", key)): value
        for key, value in values.items()
    }


def _key_problem(prefix: str) -> str | None:
    """Why LaminDB would refuse keys under ``prefix`` (a backslash, a ``.`` or ``..``
    segment), or None."""
    if "\\" in prefix:
        return "it holds a backslash"
    for segment in prefix.split("/"):
        if segment in (".", ".."):
            return f"it holds the relative segment {segment!r}"
    return None


def _below(dirpath: Any, filepath: Path | str) -> str | None:
    """The "/"-separated path of a checkpoint in a subfolder of ``dirpath``, else None.

    A "/" in a filename template makes one: a metric named ``val/loss`` with Lightning's
    ``auto_insert_metric_name`` writes ``epoch=1-val/loss=0.43.ckpt``. Keyed by its base
    name alone (``loss=0.43.ckpt``), as the reference does, checkpoints of different
    epochs would share a key, each a new version of the last, and the eviction of one
    would delete the artifact of another that Lightning keeps.
    """
    if not dirpath:
        return None
    # Lightning joins its file names to its dirpath: a prefix test (training thread).
    head = os.fspath(dirpath).rstrip(os.sep) + os.sep
    text = os.fspath(filepath)
    if not text.startswith(head) or os.sep not in text[len(head) :]:
        return None
    # The template as written ("./{step}", "sub//{step}"): where the file is. LaminDB
    # refuses a key with a "." or ".." segment; one directly in dirpath, or outside it,
    # gets the reference's key (its base name).
    below = os.path.normpath(text[len(head) :])
    if os.sep not in below or below.split(os.sep, 1)[0] == os.pardir:
        return None
    return below.replace(os.sep, "/")


class SaveConfigCallback(_LightningSaveConfigCallback):
    """LightningCLI ``SaveConfigCallback`` that also saves the config as an artifact.

    Writes ``config.yaml`` to ``{save_dir}/{name}/{version}/`` of the first logger
    (or ``default_root_dir``), then hands it to the trainer's
    :class:`ArtifactPublishingModelCheckpoint`, which saves it in the background
    under ``{base_prefix}/config.yaml`` and records it as an input of the run.

    Example::

        cli = LightningCLI(MyModel, MyData, save_config_callback=ll.SaveConfigCallback)
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write the resolved config locally and submit it for persistence."""
        if self.already_saved or not self.save_to_log_dir:
            return
        config_path = self._config_path(trainer)
        if not self.overwrite:
            exists = config_path.exists() if trainer.is_global_zero else False
            if trainer.strategy.broadcast(exists):
                # The reference's words first (code matching them keeps working), then how.
                raise RuntimeError(
                    f"Config file already exists: {config_path}; pass overwrite=True to the"
                    " SaveConfigCallback (LightningCLI(save_config_kwargs={'overwrite': True}))"
                    " or use another log directory"
                )
        if trainer.is_global_zero:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config,
                config_path,
                skip_none=False,
                overwrite=self.overwrite,
                multifile=self.multifile,
            )
            callback = next(
                (
                    cb
                    for cb in trainer.callbacks  # type: ignore[attr-defined]
                    if isinstance(cb, ArtifactPublishingModelCheckpoint)
                ),
                None,
            )
            if callback is not None and not persists_through_pipeline(type(callback)):
                # A class written for the reference's generic layer: called as it calls it.
                callback.save_config_artifact(trainer, config_path)
            elif callback is not None:
                callback.submit_file(trainer, config_path, "config")
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    @staticmethod
    def _config_path_for(trainer: pl.Trainer, filename: str) -> Path:
        layout = logger_layout(trainer)
        if layout is not None:
            save_dir, name, version_str = layout
            return save_dir / name / version_str / filename
        return Path(trainer.default_root_dir) / filename

    def _config_path(self, trainer: pl.Trainer) -> Path:
        return self._config_path_for(trainer, self.config_filename)
