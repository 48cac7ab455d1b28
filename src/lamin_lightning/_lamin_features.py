"""LaminDB features: the ``lamindb.lightning`` feature set, user features, and their values.

Everything here that touches the database runs on the training thread at ``setup``
(serially, before any worker: two threads creating one feature would make two), or
at submission without a database call (reading the live trainer into JSON values).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lamin_lightning._errors import ArgumentTypeError, LaminSetupError

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lamin_lightning._jobs import CheckpointSnapshot

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
FLAG_FEATURES: Final = ("is_best_model", "is_last_model", "model_rank")
# kind of file -> (artifact description, artifact kind), as the reference writes them.
DESCRIPTIONS: Final[dict[str, tuple[str, str]]] = {
    "checkpoint": ("model checkpoint", "model"),
    "config": ("Lightning CLI config", "config"),
    "hparams": ("Lightning run hyperparameters", "config"),
}


def _ln() -> Any:
    import lamindb

    return lamindb


def _may_be_on_hub(instance: Any) -> bool:
    """Whether LaminHub may know ``instance``: anything but a local instance without an account.

    Only an account can register an instance on the hub, so an instance owned by
    ``anonymous`` whose storage and database are local, and that carries nothing the
    hub hands out (an API URL, a storage registered on the hub, hub-managed access),
    is not on it. Everything else may be, and only the hub can tell.
    """
    storage = getattr(instance, "storage", None)
    return bool(
        getattr(instance, "_is_on_hub", None) is not None  # already known: leave it
        or getattr(instance, "owner", None) != "anonymous"  # a hub account's instance
        or instance.is_remote  # cloud storage or a remote database
        or getattr(instance, "is_managed_by_hub", True)  # has an API URL
        or getattr(instance, "_fine_grained_access", False)
        or getattr(storage, "_uuid", None) is not None  # its storage is registered
    )


_told_not_on_hub = False


def ensure_offline_safe() -> None:
    """Keep a local instance without a hub account from asking LaminDB's hub about itself.

    lamindb asks the hub whether the instance is registered (``is_on_hub``) when it
    tracks a run or registers a file; offline that call crashes. Where the answer is
    known without asking (see ``_may_be_on_hub``), record it in lamindb's private
    ``InstanceSettings._is_on_hub``, and log so once per process. An instance that is,
    or may be, on the hub is left alone: lamindb asks the hub, as it always does.

    The log line is INFO, not a warning: "not on the hub" is the true answer, nothing
    the user should act on, and a warning in every local run (an error under
    ``-W error``) would only teach users to ignore warnings.
    """
    global _told_not_on_hub
    import lamindb_setup

    if not lamindb_setup.settings.is_configured:
        return
    instance = lamindb_setup.settings.instance
    if _may_be_on_hub(instance):
        return
    instance._is_on_hub = False
    if not _told_not_on_hub:
        _told_not_on_hub = True
        log.info(
            "LaminDB instance %s is local and has no hub account (owner 'anonymous'), so it"
            " is not on LaminHub; lamin_lightning recorded that (InstanceSettings._is_on_hub"
            " = False) so that lamindb does not ask the hub, which fails offline",
            instance.slug,
        )


def require_instance() -> Any:
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
    ln = require_instance()
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


def logger_layout(trainer: pl.Trainer) -> tuple[Path, str, str] | None:
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


def discover_auto(ln: Any) -> dict[str, Any]:
    """The features ``save_lightning_features()`` created, by name (two queries)."""
    feature_type = ln.Feature.filter(name=FEATURE_TYPE_NAME, is_type=True).one_or_none()
    if feature_type is None:
        return {}
    return {
        f.name: f for f in ln.Feature.filter(name__in=sorted(LIGHTNING_FEATURES), type=feature_type)
    }


class FeatureValues:
    """The features of one Checkpoint: validated at setup, their values read at submission."""

    def __init__(self, features: Mapping[Any, Mapping[str, Any]] | None) -> None:
        if features is not None and not isinstance(features, Mapping):
            raise ArgumentTypeError(
                f"features must be a mapping such as {{'run': {{'project': 'x'}}, 'artifact':"
                f" {{'val_loss': None}}}}, got {type(features).__name__}: {features!r}"
            )
        features = dict(features or {})
        invalid = set(features) - {"run", "artifact"}
        if invalid:
            raise ValueError(
                f"Invalid feature keys: {invalid}. Use 'run' and/or 'artifact', e.g."
                " features={'run': {'project': 'x'}, 'artifact': {'val_loss': None}}."
            )
        for scope, values in features.items():
            if not isinstance(values, Mapping):
                raise ArgumentTypeError(
                    f"features[{scope!r}] must be a mapping of feature name to value,"
                    f" got {type(values).__name__}"
                )
        self.run_values: dict[str, Any] = dict(features.get("run") or {})
        self.artifact_values: dict[str, Any] = dict(features.get("artifact") or {})
        self.auto: dict[str, Any] = {}
        self.hparam_names: set[str] = set()
        # Features whose dtype is float (every feature of the name): an int for one is
        # recorded as a float (LaminDB refuses an int for a float feature).
        self.float_names: frozenset[str] = frozenset()

    # -- setup (training thread, serial, before any worker runs) ---------------------------

    def setup(self, ln: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, run: Any) -> None:
        names = set(self.run_values) | set(self.artifact_values)
        hparams = self._hparam_sources(pl_module, getattr(trainer, "datamodule", None))
        dtypes: dict[str, set[str | None]] = {}
        if names or hparams:
            rows = ln.Feature.filter(name__in=sorted(names | hparams)).values_list(
                "name", "_dtype_str"
            )
            for name, dtype in rows:
                dtypes.setdefault(name, set()).add(dtype)
        self.float_names = frozenset(n for n, d in dtypes.items() if d == {"float"})
        if names:
            missing = sorted(names - set(dtypes))
            if missing:
                raise LaminSetupError(
                    f"Feature{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing."
                    f" Create {'them' if len(missing) > 1 else 'it'} first, in the LaminDB"
                    f" instance, before training, e.g."
                    f" `ln.Feature(name={missing[0]!r}, dtype=float).save()`."
                )
        if run is not None and self.run_values:
            # A value LaminDB refuses raises here, before training, as the reference's setup.
            run.features.add_values(
                {name: self.as_dtype(name, value) for name, value in self.run_values.items()}
            )
        self.auto = discover_auto(ln)
        self.hparam_names = hparams & set(dtypes)

    def as_dtype(self, name: str, value: Any) -> Any:
        """``value``, as a float if it is an int and the feature ``name`` a float (a model's
        ``lr=1``, the user's ``{"lr": 1}``): LaminDB accepts the float and refuses the
        int, which the reference hands on (LaminDB's ValidationError out of ``fit``)."""
        if (
            name in self.float_names
            and not isinstance(value, bool)
            and isinstance(value, numbers.Integral)
        ):
            return float(value)
        return value

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
        # Lightning takes an int (gradient_clip_val=1); the feature is a float, and LaminDB
        # refuses an int for it, with every other run value of the same call.
        clip = trainer.gradient_clip_val
        self._put(
            values,
            "gradient_clip_val",
            float(clip) if isinstance(clip, int) and not isinstance(clip, bool) else clip,
        )
        self._put(values, "monitor", monitor)
        self._put(values, "mode", mode)
        for source in (trainer.lightning_module, getattr(trainer, "datamodule", None)):
            hparams = getattr(source, "hparams", None) if source is not None else None
            for name, value in (hparams or {}).items():
                if name in self.hparam_names:
                    values[name] = self.as_dtype(name, value)
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
        metrics = None  # Lightning recomputes callback_metrics at each read: only if needed
        for name, value in self.artifact_values.items():
            if value is not None:
                values[name] = self.as_dtype(name, value)
            elif hasattr(trainer, name):
                values[name] = self.as_dtype(name, _metric_value(getattr(trainer, name)))
            else:
                if metrics is None:
                    metrics = trainer.callback_metrics
                if name in metrics:
                    values[name] = float(_metric_value(metrics[name]))
        return values
