"""The LaminDB layer: the only module that imports lamindb (lazily, at first use).

``Checkpoint`` keeps the key layout, descriptions, kinds, features and events of
``lamindb.integrations.lightning.Checkpoint`` and moves every LaminDB call off
the training thread:

- worker threads (up to ``max_workers``): hash and copy the file into storage,
  create the artifact record;
- the committer thread (submission order): annotate features, set
  ``is_best_model`` / ``is_last_model`` / ``model_rank`` from the snapshot taken
  at submission, delete an older artifact under the same key only now that the
  new one is committed, delete evicted checkpoints.

Flags and ranks are applied as a diff against what this callback already wrote,
with bulk queries, so a commit costs the same number of queries whether 5 or
500 checkpoints are stored under the prefix.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback as _LightningSaveConfigCallback
from typing_extensions import override

from lamin_lightning._callback import (
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_WORKERS,
    ArtifactPublishingModelCheckpoint,
    CheckpointSnapshot,
    OnError,
    snapshot_from_record,
)
from lamin_lightning._events import (
    ArtifactKind,
    ArtifactObserver,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._pipeline import JobSpec
from lamin_lightning._recovery import entry_file, recovered_failure
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._staging import release_staged

if TYPE_CHECKING:
    from lightning.fabric.utilities.types import _PATH

log = logging.getLogger("lamin_lightning")

FEATURE_TYPE_NAME: Final = "lamindb.lightning"
_FEATURE_TYPE_DTYPE: Final = "__lamindb_lightning__"

# name -> dtype of every feature save_lightning_features() creates, in the reference's order.
LIGHTNING_FEATURES: Final[dict[str, type]] = {
    "is_best_model": bool,
    "is_last_model": bool,
    "score": float,
    "model_rank": int,
    "logger_name": str,
    "logger_version": str,
    "max_epochs": int,
    "max_steps": int,
    "precision": str,
    "accumulate_grad_batches": int,
    "gradient_clip_val": float,
    "monitor": str,
    "save_weights_only": bool,
    "mode": str,
}
_RUN_FEATURES: Final = frozenset(
    {
        "logger_name",
        "logger_version",
        "max_epochs",
        "max_steps",
        "precision",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "monitor",
        "mode",
    }
)
_ARTIFACT_FEATURES: Final = frozenset(
    {
        "is_best_model",
        "is_last_model",
        "score",
        "model_rank",
        "save_weights_only",
        "monitor",
        "mode",
    }
)
_FLAG_FEATURES: Final = ("is_best_model", "is_last_model", "model_rank")
# kind of file -> (artifact description, artifact kind), as the reference writes them.
_DESCRIPTIONS: Final[dict[str, tuple[str, str]]] = {
    "checkpoint": ("model checkpoint", "model"),
    "config": ("Lightning CLI config", "config"),
    "hparams": ("Lightning run hyperparameters", "config"),
}


def _ln() -> Any:
    import lamindb

    return lamindb


class LaminSetupError(RuntimeError):
    """LaminDB is not ready for checkpointing (no instance, missing features, ...)."""


def ensure_offline_safe() -> None:
    """Keep a local instance from asking LaminDB's hub about itself.

    lamindb asks the hub whether the instance is registered when it tracks a run
    or registers a file; offline that call crashes. For an instance whose storage
    is local, the answer cannot matter, so record it as "not on the hub".
    """
    import lamindb_setup

    if not lamindb_setup.settings.is_configured:
        return
    instance = lamindb_setup.settings.instance
    if getattr(instance, "_is_on_hub", None) is None and not instance.storage.type_is_cloud:
        instance._is_on_hub = False


def _require_instance() -> Any:
    import lamindb_setup

    if not lamindb_setup.settings.is_configured:
        raise LaminSetupError(
            "lamin_lightning.Checkpoint needs a LaminDB instance, and none is connected."
            " Create one with `lamin init --storage ./lamin-data` (or"
            " `lamindb.setup.init(storage=...)`), connect an existing one with"
            " `lamin connect <instance>`, or, in tests, use"
            " `lamin_lightning.testing.local_instance()`."
        )
    ensure_offline_safe()
    return _ln()


def save_lightning_features() -> None:
    """Create the ``lamindb.lightning`` feature type and its 14 features, if absent.

    Artifact-level: ``is_best_model`` (bool), ``is_last_model`` (bool), ``score``
    (float), ``model_rank`` (int, 0 = best), ``save_weights_only`` (bool),
    ``monitor`` (str), ``mode`` (str). Run-level: ``logger_name``,
    ``logger_version``, ``max_epochs``, ``max_steps``, ``precision``,
    ``accumulate_grad_batches``, ``gradient_clip_val``, ``monitor``, ``mode``.

    Compatible with ``lamindb.integrations.lightning.save_lightning_features``:
    either may run first. Call it once, before training, from one process.
    """
    ln = _require_instance()
    feature_type = ln.Feature.filter(name=FEATURE_TYPE_NAME, is_type=True).one_or_none()
    if feature_type is None:
        feature_type = ln.Feature(
            name=FEATURE_TYPE_NAME,
            description="Auto-generated features tracking lightning parameters & metrics",
            is_type=True,
        )
        feature_type._dtype_str = _FEATURE_TYPE_DTYPE
        feature_type.save()
    existing = set(
        ln.Feature.filter(name__in=list(LIGHTNING_FEATURES), type=feature_type).values_list(
            "name", flat=True
        )
    )
    for name, dtype in LIGHTNING_FEATURES.items():
        if name not in existing:
            ln.Feature(name=name, dtype=dtype, type=feature_type).save()


class ArtifactPublisher(Protocol):
    """How a :class:`Checkpoint` creates artifacts and names their storage location.

    The same protocol as the reference's; assign an implementation to
    ``checkpoint._artifact_publisher`` to persist elsewhere. ``create_artifact`` is
    called on worker threads and must be thread-safe.
    """

    def create_artifact(
        self,
        local_path: Path | str,
        *,
        key: str,
        description: str,
        kind: str | None = None,
        key_is_virtual: bool = True,
        add_as_input_to_run: bool = False,
        skip_hash_lookup: bool = False,
    ) -> Any:
        """Persist ``local_path`` under ``key``; return the artifact."""
        ...

    def storage_uri(self, artifact: Any) -> str:
        """Where ``artifact``'s bytes live."""
        ...


class LaminArtifactPublisher:
    """The default publisher: a ``lamindb.Artifact`` per file."""

    def create_artifact(
        self,
        local_path: Path | str,
        *,
        key: str,
        description: str,
        kind: str | None = None,
        key_is_virtual: bool = True,
        add_as_input_to_run: bool = False,
        skip_hash_lookup: bool = False,
        run: Any = None,
    ) -> Any:
        """Create and save the artifact; record it as a run input if asked."""
        ln = _ln()
        kwargs: dict[str, Any] = {
            "key": key,
            "description": description,
            "key_is_virtual": key_is_virtual,
        }
        if kind is not None:
            kwargs["kind"] = kind
        if add_as_input_to_run:
            kwargs["run"] = False
        elif run is not None:
            kwargs["run"] = run
        if skip_hash_lookup:
            kwargs["skip_hash_lookup"] = True
        artifact = ln.Artifact(local_path, **kwargs).save()
        if add_as_input_to_run:
            from lamindb.models._lineage import track_run_inputs

            track_run_inputs(artifact, is_run_input=run if run is not None else True)
        return artifact

    def storage_uri(self, artifact: Any) -> str:
        """``str(artifact.path)``."""
        return str(artifact.path)


def _logger_layout(trainer: pl.Trainer) -> tuple[Path, str, str] | None:
    """(save_dir, name, version) of the first logger, as the reference derives them.

    Avoids ``trainer.log_dir``, which broadcasts and special-cases two logger types.
    """
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    save_dir = Path(getattr(logger, "save_dir", None) or trainer.default_root_dir)
    version = logger.version
    version_str = version if isinstance(version, str) else f"version_{version}"
    return save_dir, str(logger.name).rstrip("/"), version_str.rstrip("/")


def _metric_value(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class _Annotator:
    """Feature bookkeeping for one Checkpoint: discovery at setup, values at submission,
    and flag/rank diffs at commit."""

    def __init__(self, features: Mapping[Any, Mapping[str, Any]] | None) -> None:
        if features is not None and not isinstance(features, Mapping):
            raise ValueError(
                f"features must be a mapping such as {{'run': {{'project': 'x'}}, 'artifact':"
                f" {{'val_loss': None}}}}, got {type(features).__name__}: {features!r}"
            )
        features = dict(features or {})
        invalid = set(features) - {"run", "artifact"}
        if invalid:
            raise ValueError(
                f"features has invalid keys {sorted(invalid)}; use 'run' and/or 'artifact',"
                " e.g. features={'run': {'project': 'x'}, 'artifact': {'val_loss': None}}"
            )
        for scope, values in features.items():
            if not isinstance(values, Mapping):
                raise ValueError(
                    f"features[{scope!r}] must be a mapping of feature name to value,"
                    f" got {type(values).__name__}"
                )
        self.run_values: dict[str, Any] = dict(features.get("run") or {})
        self.artifact_values: dict[str, Any] = dict(features.get("artifact") or {})
        self.auto: dict[str, Any] = {}
        self.hparam_names: set[str] = set()
        # Committer-thread state.
        self.flag_state: dict[int, dict[str, Any]] = {}
        self.key_to_id: dict[str, int] = {}
        self.loaded_prefix: str | None = None
        self.value_ids: dict[tuple[int, Any], int] = {}

    def reset_runtime(self) -> None:
        self.flag_state = {}
        self.key_to_id = {}
        self.loaded_prefix = None
        self.value_ids = {}

    # -- setup (training thread, serial, before any worker runs) ---------------------------

    def setup(self, ln: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, run: Any) -> None:
        names = set(self.run_values) | set(self.artifact_values)
        if names:
            found = set(ln.Feature.filter(name__in=sorted(names)).values_list("name", flat=True))
            missing = sorted(names - found)
            if missing:
                raise LaminSetupError(
                    f"Feature{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing"
                    " from the LaminDB instance. Create "
                    f"{'them' if len(missing) > 1 else 'it'} before training, e.g."
                    f" `ln.Feature(name={missing[0]!r}, dtype=float).save()`."
                )
        if run is not None and self.run_values:
            run.features.add_values(self.run_values)
        self.discover_auto(ln)
        hparams = self._hparam_sources(pl_module, getattr(trainer, "datamodule", None))
        self.hparam_names = (
            set(ln.Feature.filter(name__in=sorted(hparams)).values_list("name", flat=True))
            if hparams
            else set()
        )

    def discover_auto(self, ln: Any) -> None:
        """Find the features ``save_lightning_features()`` created (one query each)."""
        self.auto = {}
        feature_type = ln.Feature.filter(name=FEATURE_TYPE_NAME, is_type=True).one_or_none()
        if feature_type is not None:
            self.auto = {
                f.name: f
                for f in ln.Feature.filter(name__in=sorted(LIGHTNING_FEATURES), type=feature_type)
            }

    @staticmethod
    def _hparam_sources(*sources: Any) -> set[str]:
        names: set[str] = set()
        for source in sources:
            hparams = getattr(source, "hparams", None) if source is not None else None
            if hparams:
                names.update(str(name) for name in hparams)
        return names

    def _put(self, target: dict[Any, Any], name: str, value: Any) -> None:
        feature = self.auto.get(name)
        if feature is not None and value is not None:
            target[feature] = value

    # -- submission (training thread: reads the live trainer, no database) ------------------

    def run_feature_values(
        self, trainer: pl.Trainer, monitor: str | None, mode: str
    ) -> dict[Any, Any]:
        values: dict[Any, Any] = {}
        if trainer.loggers:
            logger = trainer.loggers[0]
            self._put(values, "logger_name", logger.name)
            version = logger.version
            self._put(
                values,
                "logger_version",
                version if isinstance(version, str) else f"version_{version}",
            )
        self._put(values, "max_epochs", trainer.max_epochs)
        self._put(values, "max_steps", trainer.max_steps)
        self._put(values, "precision", str(trainer.precision))
        self._put(values, "accumulate_grad_batches", trainer.accumulate_grad_batches)
        self._put(values, "gradient_clip_val", trainer.gradient_clip_val)
        self._put(values, "monitor", monitor)
        self._put(values, "mode", mode)
        for source in (trainer.lightning_module, getattr(trainer, "datamodule", None)):
            hparams = getattr(source, "hparams", None) if source is not None else None
            for name, value in (hparams or {}).items():
                if name in self.hparam_names:
                    values[name] = value
        return values

    def checkpoint_feature_values(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot
    ) -> dict[Any, Any]:
        values: dict[Any, Any] = {}
        self._put(values, "is_best_model", snapshot.is_best)
        self._put(values, "is_last_model", True)
        if snapshot.score is not None:
            self._put(values, "score", float(snapshot.score))
        self._put(values, "save_weights_only", snapshot.save_weights_only)
        self._put(values, "monitor", snapshot.monitor)
        self._put(values, "mode", snapshot.mode)
        metrics = trainer.callback_metrics
        for name, value in self.artifact_values.items():
            if value is not None:
                values[name] = value
            elif hasattr(trainer, name):
                values[name] = _metric_value(getattr(trainer, name))
            elif name in metrics:
                values[name] = float(_metric_value(metrics[name]))
        return values

    # -- commit (committer thread) --------------------------------------------------------------

    def _load_existing(self, ln: Any, prefix: str) -> None:
        """Read the flags already stored under the prefix, once per prefix (one query)."""
        if self.loaded_prefix == prefix:
            return
        self.loaded_prefix = prefix
        feature_ids = {self.auto[n].id: n for n in _FLAG_FEATURES if n in self.auto}
        if not feature_ids:
            return
        rows = ln.models.ArtifactJsonValue.filter(
            artifact__key__startswith=prefix + "/",
            jsonvalue__feature_id__in=list(feature_ids),
        ).values_list("artifact_id", "artifact__key", "jsonvalue__feature_id", "jsonvalue__value")
        for artifact_id, key, feature_id, value in rows:
            self.key_to_id.setdefault(key, artifact_id)
            self.flag_state.setdefault(artifact_id, {})[feature_ids[feature_id]] = value

    def _value_id(self, ln: Any, feature: Any, value: Any) -> int:
        cache_key = (feature.id, value if not isinstance(value, bool) else ("bool", value))
        found = self.value_ids.get(cache_key)
        if found is None:
            record, _ = ln.models.JsonValue.get_or_create(feature, value)
            found = self.value_ids[cache_key] = record.id
        return found

    def apply_flags(
        self, ln: Any, prefix: str, snapshot: CheckpointSnapshot, artifact: Any
    ) -> None:
        """Make is_best_model / is_last_model / model_rank under ``prefix`` equal the snapshot."""
        flags = [n for n in _FLAG_FEATURES if n in self.auto]
        if not flags:
            return
        self._load_existing(ln, prefix)
        self.key_to_id[snapshot.key] = artifact.id
        ranks = {key: rank for rank, key in enumerate(snapshot.ranking)}
        desired: dict[int, dict[str, Any]] = {}
        for key, artifact_id in self.key_to_id.items():
            desired[artifact_id] = {
                "is_best_model": key == snapshot.best_key,
                "is_last_model": key == snapshot.key,
                "model_rank": ranks.get(key),
            }
        changed = {
            artifact_id: {n: want[n] for n in flags}
            for artifact_id, want in desired.items()
            if {n: want[n] for n in flags}
            != {n: self.flag_state.get(artifact_id, {}).get(n) for n in flags}
        }
        if not changed:
            return
        link_model = ln.models.ArtifactJsonValue
        feature_ids = [self.auto[n].id for n in flags]
        link_model.objects.filter(
            artifact_id__in=list(changed), jsonvalue__feature_id__in=feature_ids
        ).delete()
        links = []
        for artifact_id, values in changed.items():
            for name, value in values.items():
                if value is None:
                    continue
                value_id = self._value_id(ln, self.auto[name], value)
                links.append(link_model(artifact_id=artifact_id, jsonvalue_id=value_id))
        link_model.objects.bulk_create(links, ignore_conflicts=True)
        for artifact_id, values in changed.items():
            self.flag_state[artifact_id] = {n: v for n, v in values.items() if v is not None}

    def forget(self, key: str) -> None:
        artifact_id = self.key_to_id.pop(key, None)
        if artifact_id is not None:
            self.flag_state.pop(artifact_id, None)


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
        save_last: Also save ``last.ckpt``.
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
        save_last: bool | None = None,
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
        artifact_observers: list[ArtifactObserver] | None = None,
        filename: str | None = None,
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
        self._annotator = _Annotator(features)
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

    @override
    def _init_runtime(self) -> None:
        super()._init_runtime()
        # Artifacts our workers are saving and the committer has not committed, by id().
        self._uncommitted: dict[int, Any] = {}
        self._outbox_context: dict[str, Any] | None = None
        self._replay_state: dict[str, Any] = {}
        annotator = getattr(self, "_annotator", None)
        if annotator is not None:
            annotator.reset_runtime()

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_trainer"] = None
        state["_run"] = None
        state["_uncommitted"] = {}
        state["_outbox_context"] = None
        state["_replay_state"] = {}
        return state

    # -- setup ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the instance, validate user features and find the auto-features (rank zero)."""
        self._trainer = trainer
        if trainer.is_global_zero:
            ln = _require_instance()
            run = ln.context.run
            if run is not self._run:
                # Run-level features are written once per run.
                self._run_values_collected = False
            self._run = run
            self._outbox_context = None
            self._annotator.setup(ln, trainer, pl_module, self._run)
        if self.save_last:
            warnings.warn(
                "save_last is not necessary with LaminDB: the is_last_model feature makes the"
                " latest checkpoint queryable. Consider save_last=None to avoid a redundant copy.",
                UserWarning,
                stacklevel=2,
            )
        super().setup(trainer, pl_module, stage)

    # -- keys -------------------------------------------------------------------------------

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
        run_uid = self._active_run_uid()
        if self._original_dirpath is not None:
            prefix = str(self._original_dirpath).rstrip("/")
            return f"{prefix}/{run_uid}" if run_uid else prefix
        layout = _logger_layout(trainer)
        if layout is not None:
            save_dir, name, version_str = layout
            return f"{save_dir.name}/{name}/{run_uid or version_str}"
        return run_uid or ""

    @property
    def base_prefix(self) -> str:
        """Prefix of every key this callback writes; available after ``setup``."""
        if self._trainer is None:
            raise RuntimeError("base_prefix is only available after setup() (once fit() started)")
        return self._base_prefix(self._trainer)

    @property
    def checkpoint_key_prefix(self) -> str:
        """Prefix of checkpoint keys: ``{base_prefix}/checkpoints``; available after ``setup``."""
        base = self.base_prefix
        return f"{base}/checkpoints" if base else "checkpoints"

    @override
    def resolve_artifact_key(
        self, trainer: pl.Trainer, filepath: Path | str, kind: ArtifactKind
    ) -> str:
        """The key of a file: checkpoints and hparams under ``checkpoints/``. Training thread."""
        base = self._base_prefix(trainer)
        if kind in ("checkpoint", "hparams"):
            prefix = f"{base}/checkpoints" if base else "checkpoints"
        else:
            prefix = base
        name = Path(filepath).name
        return f"{prefix}/{name}" if prefix else name

    @override
    def resolve_artifact_storage_uri(self, artifact: Any) -> str:
        """Where the bytes live (``str(artifact.path)`` by default). Committer thread."""
        return self._artifact_publisher.storage_uri(artifact)

    @override
    def hparams_path(self, trainer: pl.Trainer) -> Path | None:
        """``hparams.yaml`` in the first logger's log dir (no broadcast: rank zero only)."""
        if not trainer.loggers:
            path = Path(trainer.default_root_dir) / "hparams.yaml"
        else:
            logger = trainer.loggers[0]
            log_dir = getattr(logger, "log_dir", None)
            if log_dir is None:
                save_dir, name, version_str = _logger_layout(trainer)  # type: ignore[misc]
                log_dir = save_dir / name / version_str
            path = Path(log_dir) / "hparams.yaml"
        return path if path.exists() else None

    # -- training thread ----------------------------------------------------------------------

    @override
    def collect_checkpoint_feature_values(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot
    ) -> dict[Any, Any] | None:
        """Feature values of this checkpoint, read from the trainer at save time."""
        if not self._run_values_collected:
            self._run_values_collected = True
            self._run_values_pending = self._annotator.run_feature_values(
                trainer, self.monitor, self.mode
            )
        return self._annotator.checkpoint_feature_values(trainer, snapshot)

    # -- worker threads -------------------------------------------------------------------------

    def _create_artifact(
        self, path: Path | str, *, key: str, description: str, kind: str, run: Any
    ) -> Any:
        publisher = self._artifact_publisher
        if type(publisher) is not LaminArtifactPublisher:
            return publisher.create_artifact(
                path,
                key=key,
                description=description,
                kind=kind,
                key_is_virtual=self._key_is_virtual,
                add_as_input_to_run=run is False,
                skip_hash_lookup=True,
            )
        ln = _ln()
        artifact = ln.Artifact(
            path,
            key=key,
            description=description,
            kind=kind,
            run=run,
            key_is_virtual=self._key_is_virtual,
            skip_hash_lookup=True,
        )
        # Registered before the record exists, so that a commit replacing an older
        # artifact of this key never mistakes this newer, uncommitted one for it. By
        # object, not uid: concurrent new versions of one key get the same provisional
        # uid, and lamindb may change the uid during save().
        with self._lock:
            self._uncommitted[id(artifact)] = artifact
        try:
            artifact.save()
        except BaseException:
            self._settle(artifact)
            raise
        return artifact

    def _settle(self, artifact: Any) -> None:
        with self._lock:
            self._uncommitted.pop(id(artifact), None)

    def _others_under_key(self, key: str, exclude_id: int | None = None) -> list[Any]:
        """Committed artifacts stored under ``key`` (not those our workers are still saving)."""
        # A versioned save sets the id inside its transaction, so a visible row has it;
        # a first version's autocommit INSERT is visible a moment before its id is set,
        # and its uid does not change: exclude by id, else by uid.
        with self._lock:
            in_flight = list(self._uncommitted.values())
        query = _ln().Artifact.filter(key=key)
        if exclude_id is not None:
            # Only older rows: a newer one is a later save of the key still in flight (its
            # own commit replaces this one), even from a publisher whose saves we do not track.
            query = query.filter(id__lt=exclude_id)
        ids = [a.id for a in in_flight if a.id is not None]
        uids = [a.uid for a in in_flight if a.id is None]
        if ids:
            query = query.exclude(id__in=ids)
        if uids:
            query = query.exclude(uid__in=uids)
        return list(query)

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
        self._settle(artifact)
        if feature_values:
            artifact.features.add_values(feature_values)
        if kind == "checkpoint":
            for old in self._others_under_key(key, exclude_id=artifact.id):
                self._delete_artifact(old, keep_path=str(artifact.path))
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
        key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
        artifact = self._create_artifact(
            filepath, key=key, description="model checkpoint", kind="model", run=self._run
        )
        if not self.called_by_pipeline():
            self._finish_direct_call(trainer, "checkpoint", key, filepath, artifact, feature_values)
        return artifact

    @override
    def save_config_artifact(self, trainer: pl.Trainer, config_path: Path | str) -> Any:
        """Save a LightningCLI config and record it as an input of the run. Worker thread."""
        key = self.resolve_artifact_key(trainer, config_path, "config")
        artifact = self._create_artifact(
            config_path, key=key, description="Lightning CLI config", kind="config", run=False
        )
        run = self._run if self._run is not None else _ln().context.run
        if run is not None:
            from lamindb.models._lineage import track_run_inputs

            track_run_inputs(artifact, is_run_input=run)
        if not self.called_by_pipeline():
            self._finish_direct_call(trainer, "config", key, config_path, artifact)
        return artifact

    @override
    def save_hparams_artifact(self, trainer: pl.Trainer, hparams_path: Path | str) -> Any | None:
        """Save Lightning's ``hparams.yaml``; None if the file is missing. Worker thread."""
        if not Path(hparams_path).exists():
            return None
        key = self.resolve_artifact_key(trainer, hparams_path, "hparams")
        artifact = self._create_artifact(
            hparams_path,
            key=key,
            description="Lightning run hyperparameters",
            kind="config",
            run=self._run,
        )
        if not self.called_by_pipeline():
            self._finish_direct_call(trainer, "hparams", key, hparams_path, artifact)
        return artifact

    # -- committer thread --------------------------------------------------------------------------

    def _delete_artifact(self, artifact: Any, *, keep_path: str | None = None) -> None:
        same_place = keep_path is not None and str(artifact.path) == keep_path
        artifact.delete(permanent=True, storage=not same_place)

    @override
    def commit_checkpoint_artifact(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot, artifact: Any
    ) -> None:
        """Annotate features, replace older artifacts of the key, set flags and ranks."""
        ln = _ln()
        if self._run_values_pending and self._run is not None:
            self._run.features.add_values(self._run_values_pending)
        self._run_values_pending = None
        values = snapshot.feature_values
        # The flags are written by apply_flags from the snapshot; everything else here.
        plain = {
            k: v for k, v in (values or {}).items() if getattr(k, "name", k) not in _FLAG_FEATURES
        }
        if plain:
            try:
                artifact.features.add_values(plain)  # idempotent: safe to retry
            except Exception as error:
                if not self.retry.is_transient(error):
                    # A value LaminDB rejects: do not leave an unannotated artifact behind.
                    self._settle(artifact)
                    self._delete_artifact(artifact)
                raise
        # Only now that the new artifact is committed, remove what it replaces.
        new_path = str(artifact.path)
        for old in self._others_under_key(snapshot.key, exclude_id=artifact.id):
            self._annotator.forget(snapshot.key)
            self._delete_artifact(old, keep_path=new_path)
        self._annotator.apply_flags(ln, self.checkpoint_key_prefix, snapshot, artifact)
        self._settle(artifact)

    @override
    def remove_checkpoint_artifact(
        self, trainer: pl.Trainer, key: str, artifact: Any | None
    ) -> Any | None:
        """Delete the evicted checkpoint's artifact (record and stored file)."""
        self._annotator.forget(key)
        candidates: Iterable[Any] = (
            [artifact] if artifact is not None else self._others_under_key(key)
        )
        removed = None
        for candidate in candidates:
            self._delete_artifact(candidate)
            removed = candidate
        return removed

    # -- the outbox: what a replay needs, and the replay itself ------------------------------

    @override
    def outbox_context(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The instance, run and key prefix of this callback's jobs (cached per setup)."""
        context = self._outbox_context
        if context is None:
            import lamindb_setup

            run_uid = self._run.uid if self._run is not None else None
            context = self._outbox_context = {
                "instance": lamindb_setup.settings.instance.slug,
                "run_uid": run_uid,
                "checkpoint_key_prefix": self.checkpoint_key_prefix,
                "key_is_virtual": self._key_is_virtual,
            }
        return context

    @classmethod
    @override
    def recovery_instance(cls) -> Checkpoint:
        """A Checkpoint connected to the current instance, to replay jobs outside training."""
        _require_instance()
        return cls()

    @override
    def before_recovery(self) -> None:
        self._annotator.reset_runtime()
        self._replay_state = {}

    @override
    def recovery_job(self, entry: dict[str, Any], trainer: pl.Trainer | None) -> JobSpec:
        """Rebuild a journaled save or removal; idempotent by key and content hash."""
        context = entry.get("context") or {}
        wanted = context.get("instance")
        ln = _require_instance()
        current = ln.setup.settings.instance.slug
        if wanted and wanted != current:
            raise LaminSetupError(
                f"the outbox entry for {entry.get('key')!r} belongs to LaminDB instance"
                f" {wanted!r}, but {current!r} is connected; connect {wanted!r}"
                f" (`lamin connect {wanted}`) and flush again"
            )
        key = str(entry["key"])
        fail = partial(recovered_failure, entry, trainer)
        if entry.get("op") == "remove":
            return JobSpec(
                operation="remove",
                key=key,
                commit=partial(self._replay_removal, entry, trainer),
                fail=fail,
                payload={"kind": entry.get("kind"), "local_path": entry.get("local_path")},
            )
        return JobSpec(
            operation="save",
            key=key,
            transfer=partial(self._replay_transfer, entry),
            commit=partial(self._replay_commit, entry, trainer),
            fail=fail,
            payload={
                "kind": entry.get("kind"),
                "local_path": entry.get("local_path"),
                "staged": entry.get("staged"),
            },
        )

    def _replay_run(self, context: Mapping[str, Any]) -> Any:
        uid = context.get("run_uid")
        if not uid:
            return None
        runs = self._replay_state.setdefault("runs", {})
        if uid not in runs:
            runs[uid] = _ln().Run.filter(uid=uid).one_or_none()
        return runs[uid]

    def _replay_annotator(self, prefix: str) -> _Annotator:
        annotators = self._replay_state.setdefault("annotators", {})
        annotator = annotators.get(prefix)
        if annotator is None:
            annotator = annotators[prefix] = _Annotator(None)
            annotator.discover_auto(_ln())
        return annotator  # type: ignore[no-any-return]

    def _replay_transfer(self, entry: dict[str, Any]) -> Any:
        """Worker thread: the committed artifact of this key and content if there is one,
        else a new artifact."""
        from lamindb_setup.core.hashing import hash_file

        ln = _ln()
        key, kind = str(entry["key"]), entry.get("kind", "checkpoint")
        path = entry_file(entry)
        _, digest, _ = hash_file(path)
        existing = ln.Artifact.filter(key=key, hash=digest).order_by("-id").first()
        if existing is not None:
            return existing
        run = self._replay_run(entry.get("context") or {})
        description, lamin_kind = _DESCRIPTIONS[kind]
        artifact = self._create_artifact(
            path,
            key=key,
            description=description,
            kind=lamin_kind,
            run=False if kind == "config" else run,
        )
        if kind == "config" and run is not None:
            from lamindb.models._lineage import track_run_inputs

            track_run_inputs(artifact, is_run_input=run)
        return artifact

    def _replay_commit(
        self, entry: dict[str, Any], trainer: pl.Trainer | None, artifact: Any
    ) -> ArtifactSavedEvent:
        """Committer thread: annotate, replace older artifacts of the key, set flags."""
        ln = _ln()
        key, kind = str(entry["key"]), entry.get("kind", "checkpoint")
        record = entry.get("snapshot")
        context = entry.get("context") or {}
        if kind == "checkpoint":
            prefix = str(context.get("checkpoint_key_prefix") or key.rsplit("/", 1)[0])
            annotator = self._replay_annotator(prefix)
            plain: dict[Any, Any] = {}
            for name, value, is_auto in (record or {}).get("features", []):
                if name in _FLAG_FEATURES:
                    continue
                target = annotator.auto.get(name) if is_auto else name
                if target is not None:
                    plain[target] = value
            if plain:
                try:
                    artifact.features.add_values(plain)
                except Exception as error:
                    if self.retry.is_transient(error):
                        raise
                    # A value that no longer validates (a record gone, say): keep the
                    # checkpoint, without that annotation, rather than never finishing.
                    log.warning(
                        "replaying %r: could not annotate %s (%s: %s)",
                        key,
                        sorted(str(getattr(k, "name", k)) for k in plain),
                        type(error).__name__,
                        error,
                    )
            for old in self._others_under_key(key, exclude_id=artifact.id):
                annotator.forget(key)
                self._delete_artifact(old, keep_path=str(artifact.path))
            if record is not None and not self._newer_under(prefix, artifact, entry):
                snapshot = snapshot_from_record(
                    record,
                    key=key,
                    local_path=Path(str(entry.get("local_path"))),
                    staged_path=Path(str(entry.get("staged"))),
                )
                annotator.apply_flags(ln, prefix, snapshot, artifact)
        self._settle(artifact)
        if entry.get("staged"):
            release_staged(Path(entry["staged"]))
        return ArtifactSavedEvent(
            kind=kind,
            key=key,
            local_path=Path(str(entry.get("local_path"))),
            trainer=trainer,
            artifact=artifact,
            storage_uri=self.resolve_artifact_storage_uri(artifact),
            recovered=True,
        )

    def _newer_under(self, prefix: str, artifact: Any, entry: dict[str, Any]) -> bool:
        """Whether a checkpoint submitted after this entry is already stored under ``prefix``.

        Then its snapshot, not this older one, holds the best/last/rank flags: replaying
        an old failed save must not move them back in time.
        """
        when = entry.get("time")
        if not isinstance(when, int | float):
            return False
        submitted = datetime.fromtimestamp(float(when), tz=timezone.utc)
        return bool(
            _ln()
            .Artifact.filter(
                key__startswith=prefix.rstrip("/") + "/", kind="model", created_at__gt=submitted
            )
            .exclude(id=artifact.id)
            .exists()
        )

    def _replay_removal(
        self, entry: dict[str, Any], trainer: pl.Trainer | None, _: Any
    ) -> ArtifactRemovedEvent:
        """Committer thread: delete whatever is stored under the evicted key."""
        key = str(entry["key"])
        context = entry.get("context") or {}
        prefix = str(context.get("checkpoint_key_prefix") or key.rsplit("/", 1)[0])
        self._replay_annotator(prefix).forget(key)
        removed = None
        for candidate in self._others_under_key(key):
            uri = self.resolve_artifact_storage_uri(candidate)
            self._delete_artifact(candidate)
            removed = (candidate, uri)
        return ArtifactRemovedEvent(
            kind="checkpoint",
            key=key,
            local_path=Path(str(entry.get("local_path"))),
            trainer=trainer,
            artifact=removed[0] if removed else None,
            storage_uri=removed[1] if removed else None,
            recovered=True,
        )

    @override
    def thread_finalizer(self) -> None:
        """Close this thread's Django connection."""
        try:
            from django.db import connections
        except ImportError:  # pragma: no cover
            return
        connections.close_all()


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
                raise RuntimeError(
                    f"{config_path} already exists; pass overwrite=True to the"
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
            if callback is not None:
                callback.submit_file(trainer, config_path, "config")
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    @staticmethod
    def _config_path_for(trainer: pl.Trainer, filename: str) -> Path:
        layout = _logger_layout(trainer)
        if layout is not None:
            save_dir, name, version_str = layout
            return save_dir / name / version_str / filename
        return Path(trainer.default_root_dir) / filename

    def _config_path(self, trainer: pl.Trainer) -> Path:
        return self._config_path_for(trainer, self.config_filename)
