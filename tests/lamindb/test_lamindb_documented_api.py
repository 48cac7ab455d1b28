"""Documented behaviours of the reference not compared elsewhere, run with both modules.

Each case runs the same fit with ``lamindb.integrations.lightning`` and with
``lamin_lightning`` (one import changed), in the same instance and the same folder
(emptied in between), and compares what a user sees once ``fit`` has returned: the
base and checkpoint key prefixes, the artifacts under them (kind, description,
features), the run's features, the events (and the order in which the callback's own
hook and the observers hear them), the ``last_*`` artifacts and the error out of
``fit``. Keys are compared with the run uid replaced by ``<RUN>``.

The behaviours are the ones ``reference/lamindb-lightning-api.txt`` states: the first
logger decides the key prefix ("derived from the logger's save_dir, name and
version") and the run-level ``logger_name`` / ``logger_version`` ("from the first
Lightning logger"); a logger without a ``save_dir``; user run features "to annotate
runs" (attached when training starts, whether or not a checkpoint is saved); artifact
features whose value None is read from a trainer attribute; the trainer settings
recorded as run-level features; a callback fit twice; the callback's own
``on_artifact_saved`` before the observers.
"""

from __future__ import annotations

import importlib
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import (
    TierData,
    TierModel,
    artifact_features,
    ensure_features,
    make_trainer,
    run_features,
)
from lightning.pytorch.loggers import CSVLogger, Logger

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore"),
]

REFERENCE = "lamindb.integrations.lightning"
OURS = "lamin_lightning"

USER_FEATURES: dict[str, type] = {
    "tier_project": str,
    "global_step": int,
    "lr": float,
    "batch_size": int,
    "ckpt_path": str,
}


@pytest.fixture(scope="module")
def user_features(ln: Any) -> None:
    ensure_features(ln, USER_FEATURES)


class NoSaveDirLogger(Logger):
    """A third-party logger: no ``save_dir`` (None), no ``log_dir``, an int version."""

    def __init__(self, name: str, version: int) -> None:
        super().__init__()
        self._name, self._version = name, version

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return self._version

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _loggers(kind: str | None, root: Path) -> Any:
    if kind is None:
        return False
    if kind == "two":
        return [
            CSVLogger(save_dir=str(root / "logs-a"), name="first"),
            CSVLogger(save_dir=str(root / "logs-b"), name="second", version="v2"),
        ]
    if kind == "int-version":
        return CSVLogger(save_dir=str(root / "logs"), name="exp", version=3)
    if kind == "trailing-slash-name":
        return CSVLogger(save_dir=str(root / "logs"), name="exp/", version="v1/")
    if kind == "no-save-dir":
        return NoSaveDirLogger(name="custom", version=7)
    raise AssertionError(kind)


CASES: dict[str, dict[str, Any]] = {
    # The first logger decides the prefix, hparams.yaml and the run's logger_* features.
    "two-loggers-run": {"logger": "two", "run": True},
    "two-loggers-no-run": {"logger": "two", "run": False},
    "int-logger-version": {"logger": "int-version", "run": False},
    "trailing-slash-logger-name": {"logger": "trailing-slash-name", "run": False},
    # save_dir None: "{basename of default_root_dir}/{name}/{version}".
    "logger-without-save-dir": {"logger": "no-save-dir", "run": False},
    "logger-without-save-dir-run": {"logger": "no-save-dir", "run": True},
    # The trainer's settings as run-level features (non-default values).
    "trainer-settings": {
        "logger": "int-version",
        "run": True,
        "trainer": {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5, "max_epochs": 5},
        "steps": 2,
    },
    # User run features annotate the run when training starts, with no checkpoint saved.
    "run-features-without-a-save": {
        "run": True,
        "opts": {"save_top_k": 0, "monitor": None, "features": {"run": {"tier_project": "p"}}},
        "saves": False,
    },
    # An artifact value of None read from a trainer attribute other than current_epoch.
    "artifact-feature-from-trainer-attribute": {
        "run": True,
        "opts": {"features": {"artifact": {"global_step": None}}},
    },
    # Model hparams "captured if corresponding features exist": one of value None.
    "model-hparam-none": {"run": True, "hparams": {"tier_project": None}},
    # An artifact value None read from a trainer attribute that is None.
    "artifact-feature-from-a-none-trainer-attribute": {
        "run": True,
        "opts": {"features": {"artifact": {"ckpt_path": None}}},
    },
    # The same callback fit twice, a new logger version each time, no run.
    "same-callback-fit-twice": {"logger": "int-version", "run": False, "fits": 2},
}


class Ctx:
    def __init__(self, root: Path, run_uid: str | None) -> None:
        self.root, self.run_uid = root, run_uid
        self.calls: list[tuple[str, str, str, str]] = []

    def key(self, key: Any) -> Any:
        if key is None:
            return None
        key = str(key)
        if self.run_uid:
            key = key.replace(self.run_uid, "<RUN>")
        return key.replace(str(self.root), "<ROOT>")


class Observer:
    def __init__(self, ctx: Ctx, name: str) -> None:
        self.ctx, self.name = ctx, name

    def on_artifact_saved(self, event: Any) -> None:
        self.ctx.calls.append((self.name, "saved", event.kind, self.ctx.key(event.key)))

    def on_artifact_removed(self, event: Any) -> None:
        self.ctx.calls.append((self.name, "removed", event.kind, self.ctx.key(event.key)))


def _recording(base: type, ctx: Ctx) -> type:
    class Checkpoint(base):  # type: ignore[misc, valid-type]
        def on_artifact_saved(self, event: Any) -> None:
            ctx.calls.append(("hook", "saved", event.kind, ctx.key(event.key)))

        def on_artifact_removed(self, event: Any) -> None:
            ctx.calls.append(("hook", "removed", event.kind, ctx.key(event.key)))

    return Checkpoint


def _delete_under(ln: Any, prefix: str) -> None:
    query = prefix + "/" if prefix else "checkpoints/"
    for artifact in ln.Artifact.objects.filter(key__startswith=query):
        artifact.delete(permanent=True, storage=True)


def _assert_same(what: str, reference: dict[str, Any], ours: dict[str, Any]) -> None:
    """Each field of ours equals the reference's; the first that differs, shown in full."""
    for field in reference:
        assert ours[field] == reference[field], (
            f"{what}, {field}:\n  reference: {reference[field]!r}\n  ours:      {ours[field]!r}"
        )


def _observe(
    module_name: str, case: dict[str, Any], root: Path, ln: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    module = importlib.import_module(module_name)
    run = ln.Run(transform=ln.context.transform).save() if case["run"] else None
    monkeypatch.setattr(ln.context, "_run", run)
    ctx = Ctx(root, run.uid if run else None)
    opts = {"monitor": "score", "save_top_k": -1, "every_n_train_steps": 1, **case.get("opts", {})}
    if case.get("logger") is None:
        opts["dirpath"] = root / "ckpts"
    callback = _recording(module.Checkpoint, ctx)(
        artifact_observers=[Observer(ctx, "first"), Observer(ctx, "second")], **opts
    )
    seen: dict[str, Any] = {"fits": [], "error": None}
    prefixes = set()
    for _ in range(case.get("fits", 1)):
        trainer = make_trainer(
            root,
            [callback],
            max_steps=case.get("steps", 3),
            logger=_loggers(case.get("logger"), root),
            **case.get("trainer", {}),
        )
        model = TierModel(lr=0.05, scores=[3, 1, 2])
        model.hparams.update(case.get("hparams", {}))
        try:
            trainer.fit(model, datamodule=TierData(n=4))
        except Exception as error:  # compared below
            seen["error"] = (type(error).__name__, ctx.key(str(error))[:200])
            break
        prefixes.add(callback.base_prefix)
        seen["fits"].append(
            {
                "base_prefix": ctx.key(callback.base_prefix),
                "checkpoint_key_prefix": ctx.key(callback.checkpoint_key_prefix),
                "dirpath": ctx.key(callback.dirpath),
                "last_checkpoint": ctx.key(getattr(callback.last_checkpoint_artifact, "key", None)),
                "last_hparams": ctx.key(getattr(callback.last_hparams_artifact, "key", None)),
                "last_event": None
                if callback.last_artifact_event is None
                else (
                    type(callback.last_artifact_event).__name__,
                    ctx.key(callback.last_artifact_event.key),
                ),
            }
        )
    artifacts: dict[str, Any] = {}
    for prefix in prefixes:
        query = prefix + "/" if prefix else "checkpoints/"
        for artifact in ln.Artifact.filter(key__startswith=query):
            artifacts[ctx.key(artifact.key)] = (
                artifact.kind,
                artifact.description,
                {
                    name: sorted(map(repr, values))
                    for name, values in artifact_features(ln, artifact).items()
                },
            )
        _delete_under(ln, prefix)
    seen["artifacts"] = artifacts
    seen["run_features"] = (
        {name: sorted(map(repr, v)) for name, v in run_features(ln, run).items()} if run else None
    )
    seen["calls"] = list(ctx.calls)
    monkeypatch.setattr(ln.context, "_run", None)
    return seen


@pytest.mark.parametrize("name", list(CASES))
def test_documented_behaviour_matches_the_reference(
    name: str, ln: Any, user_features: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    root = tmp_path / "w"
    reference = _observe(REFERENCE, case, root, ln, monkeypatch)
    ours = _observe(OURS, case, root, ln, monkeypatch)
    saved = bool(reference["artifacts"])
    assert saved == case.get("saves", True), f"case {name}: the reference saved {saved}"
    _assert_same(f"case {name}", reference, ours)


# -- LightningCLI and SaveConfigCallback ------------------------------------------------------

# Hook calls of the recording Checkpoint classes below (class_path in the CLI's YAML).
CLI_CALLS: list[tuple[str, str, str]] = []


def _cli_recording(module_name: str) -> type:
    base = importlib.import_module(module_name).Checkpoint

    class Recording(base):  # type: ignore[misc, valid-type]
        def on_artifact_saved(self, event: Any) -> None:
            CLI_CALLS.append(("saved", event.kind, event.key))

        def on_artifact_removed(self, event: Any) -> None:
            CLI_CALLS.append(("removed", event.kind, event.key))

    return Recording


def _generic(module_name: str) -> type:
    """A checkpoint callback of the generic layer, written from the reference's docs (its
    own key, URI and save hooks, a store of its own), with no ``_save_checkpoint``: the
    reference persists only the CLI config through it ("SaveConfigCallback only depends
    on this base class")."""
    base = importlib.import_module(module_name).ArtifactPublishingModelCheckpoint

    class Generic(base):  # type: ignore[misc, valid-type]
        def resolve_artifact_key(self, trainer: Any, filepath: Any, kind: Any) -> str:
            return f"generic/{kind}/{Path(filepath).name}"

        def resolve_artifact_storage_uri(self, artifact: Any) -> str:
            return f"memory://{artifact}"

        def _store(self, trainer: Any, path: Any, kind: Any) -> str:
            key = self.resolve_artifact_key(trainer=trainer, filepath=path, kind=kind)
            self._notify_artifact_saved(
                trainer, kind=kind, key=key, artifact=f"{kind}:{Path(path).name}", local_path=path
            )
            return key

        def save_checkpoint_artifact(self, trainer: Any, filepath: Any, **_: Any) -> Any:
            return self._store(trainer, filepath, "checkpoint")

        def save_config_artifact(self, trainer: Any, config_path: Any) -> Any:
            return self._store(trainer, config_path, "config")

        def save_hparams_artifact(self, trainer: Any, hparams_path: Any) -> Any:
            return self._store(trainer, hparams_path, "hparams")

        def on_artifact_saved(self, event: Any) -> None:
            CLI_CALLS.append(("saved", event.kind, event.key))

    return Generic


_RECORDING = {
    "RecordingReference": (_cli_recording, REFERENCE),
    "RecordingOurs": (_cli_recording, OURS),
    "GenericReference": (_generic, REFERENCE),
    "GenericOurs": (_generic, OURS),
}


def __getattr__(name: str) -> Any:
    """The recording classes, made at first use (the CLI imports them by class_path): not
    at collection, before the session's instance is connected, when lamindb cannot be
    imported yet."""
    if name not in _RECORDING:
        raise AttributeError(name)
    make, module_name = _RECORDING[name]
    cls = make(module_name)
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


CLI_CASES: dict[str, dict[str, Any]] = {
    # "If no artifact-publishing checkpoint callback is registered, only Lightning's
    # local config file is written."
    "no-checkpoint-callback": {"callback": None, "logger": "csv", "saves": False},
    # The local config under {save_dir}/{name}/{version}/ of the first logger, whatever
    # its type; save_dir None falls back to default_root_dir.
    "logger-without-save-dir": {"callback": {}, "logger": "no-save-dir"},
    "logger-without-save-dir-run": {"callback": {}, "logger": "no-save-dir", "run": True},
    # save_to_log_dir=False without a save_config of one's own: Lightning's ValueError.
    "not-saved-to-log-dir": {
        "callback": {},
        "logger": "csv",
        "save_to_log_dir": False,
        "saves": False,
    },
    # Features given in the YAML, a None artifact value read from the trainer.
    "features-in-yaml": {
        "callback": {
            "monitor": "score",
            "features": {"run": {"tier_project": "p"}, "artifact": {"global_step": None}},
        },
        "logger": "csv",
        "run": True,
    },
    # The config event first, then hparams and the checkpoint (the callback's own hook).
    # A checkpoint callback of the generic layer: SaveConfigCallback saves the config
    # through its save_config_artifact (the config event; its checkpoints: see
    # docs/migrating.md, "The generic layer calls the save_* hooks").
    "generic-layer-config": {"callback": {}, "class": "Generic", "logger": "csv", "saves": False},
    "config-event-order": {"callback": {"every_n_train_steps": 1}, "logger": "csv", "run": True},
    "config-event-order-dirpath": {
        "callback": {"every_n_train_steps": 1, "dirpath": "<ROOT>/ckpts"},
        "logger": "csv",
        "run": True,
    },
}


def _cli_observe(
    module_name: str,
    case: dict[str, Any],
    root: Path,
    ln: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    import yaml
    from lightning.pytorch.cli import LightningCLI

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    module = importlib.import_module(module_name)
    run = ln.Run(transform=ln.context.transform).save() if case.get("run") else None
    monkeypatch.setattr(ln.context, "_run", run)
    monkeypatch.setattr("sys.argv", ["documented-api"])
    ctx = Ctx(root, run.uid if run else None)
    logger: dict[str, Any] = {
        "csv": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root / "logs"), "name": "cli"},
        },
        "no-save-dir": {
            "class_path": f"{__name__}.NoSaveDirLogger",
            "init_args": {"name": "custom", "version": 7},
        },
    }[case["logger"]]
    callbacks = []
    if case["callback"] is not None:
        init_args = {
            k: v.replace("<ROOT>", str(root)) if isinstance(v, str) else v
            for k, v in case["callback"].items()
        }
        cls_name = case.get("class", "Recording")
        cls_name += "Reference" if module_name == REFERENCE else "Ours"
        callbacks.append({"class_path": f"{__name__}.{cls_name}", "init_args": init_args})
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": logger,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root / "default"),
            "callbacks": callbacks,
        },
        "model": {"lr": 0.02},
        "data": {"n": 2},
    }
    path = root / "config-in.yaml"
    path.write_text(yaml.safe_dump(config))
    CLI_CALLS.clear()
    before = set(ln.Artifact.filter(key__endswith="config.yaml").values_list("id", flat=True))
    seen: dict[str, Any] = {"error": None, "base_prefix": None}
    cli = None
    try:
        cli = LightningCLI(
            TierModel,
            TierData,
            args=["fit", "--config", str(path)],
            save_config_callback=module.SaveConfigCallback,
            save_config_kwargs={"save_to_log_dir": case.get("save_to_log_dir", True)},
        )
    except Exception as error:  # compared below
        seen["error"] = (type(error).__name__, ctx.key(str(error))[:200])
    seen["local_configs"] = sorted(
        ctx.key(p) for p in root.rglob("config.yaml") if ".lamin-lightning" not in str(p)
    )
    callback = None
    if cli is not None:
        callback = next(
            (cb for cb in cli.trainer.callbacks if isinstance(cb, module.Checkpoint)), None
        )
    new = ln.Artifact.filter(key__endswith="config.yaml").exclude(id__in=before)
    artifacts: dict[str, Any] = {}
    for artifact in new:
        artifacts[ctx.key(artifact.key)] = (
            artifact.kind,
            artifact.description,
            artifact.run_id is None,
            [r.id == getattr(run, "id", None) for r in artifact.input_of_runs.all()],
        )
    if callback is not None:
        seen["base_prefix"] = ctx.key(callback.base_prefix)
        prefix = callback.base_prefix
        query = prefix + "/" if prefix else "checkpoints/"
        for artifact in ln.Artifact.filter(key__startswith=query):
            artifacts.setdefault(
                ctx.key(artifact.key),
                (
                    artifact.kind,
                    artifact.description,
                    {
                        name: sorted(map(repr, values))
                        for name, values in artifact_features(ln, artifact).items()
                    },
                ),
            )
        _delete_under(ln, prefix)
        seen["last_config"] = ctx.key(getattr(callback.last_config_artifact, "key", None))
    for artifact in new:
        artifact.delete(permanent=True, storage=True)
    seen["artifacts"] = artifacts
    seen["run_features"] = (
        {name: sorted(map(repr, v)) for name, v in run_features(ln, run).items()} if run else None
    )
    seen["calls"] = [(s, k, ctx.key(key)) for s, k, key in CLI_CALLS]
    if case.get("class") == "Generic":  # documented: ours persists its checkpoints too
        seen["calls"] = [call for call in seen["calls"] if call[1] == "config"]
    monkeypatch.setattr(ln.context, "_run", None)
    return seen


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_config_behaviour_matches_the_reference(
    name: str, ln: Any, user_features: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CLI_CASES[name]
    root = tmp_path / "w"
    reference = _cli_observe(REFERENCE, case, root, ln, monkeypatch)
    ours = _cli_observe(OURS, case, root, ln, monkeypatch)
    saved = bool(reference["artifacts"])
    assert saved == case.get("saves", True), f"case {name}: the reference saved {saved}"
    _assert_same(f"case {name}", reference, ours)


# -- the save_* hooks called by user code, before any fit ----------------------------------------


def _direct_observe(
    module_name: str, root: Path, ln: Any, monkeypatch: pytest.MonkeyPatch, dirpath: bool
) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    module = importlib.import_module(module_name)
    run = ln.Run(transform=ln.context.transform).save()
    monkeypatch.setattr(ln.context, "_run", run)
    ctx = Ctx(root, run.uid)
    callback = _recording(module.Checkpoint, ctx)(
        dirpath=root / "ckpts" if dirpath else None,
        artifact_observers=[Observer(ctx, "first")],
    )
    trainer = make_trainer(root, [callback])
    seen: dict[str, Any] = {}

    def attempt(what: str, call: Any) -> Any:
        try:
            artifact = call()
        except Exception as error:  # compared below
            seen[what] = ("raised", type(error).__name__)
            return None
        if artifact is None:
            seen[what] = None
            return None
        seen[what] = (
            ctx.key(artifact.key),
            artifact.kind,
            artifact.description,
            artifact.run_id == run.id,
            [r.id == run.id for r in artifact.input_of_runs.all()],
            {n: sorted(map(repr, v)) for n, v in artifact_features(ln, artifact).items()},
        )
        return artifact

    ckpt = root / "mine.ckpt"
    ckpt.write_bytes(b"weights")
    config = root / "config.yaml"
    config.write_text("trainer: {}\n")
    hparams = root / "hparams.yaml"
    made = [
        attempt(
            "checkpoint",
            lambda: callback.save_checkpoint_artifact(
                trainer, ckpt, feature_values={"tier_project": "x"}
            ),
        ),
        attempt("config", lambda: callback.save_config_artifact(trainer, config)),
        attempt("hparams-missing", lambda: callback.save_hparams_artifact(trainer, hparams)),
        attempt(
            "checkpoint-missing",
            lambda: callback.save_checkpoint_artifact(trainer, root / "absent.ckpt"),
        ),
        attempt("config-missing", lambda: callback.save_config_artifact(trainer, root / "no.yaml")),
    ]
    seen["calls"] = list(ctx.calls)
    seen["last"] = [
        ctx.key(getattr(callback.get_last_artifact(kind), "key", None))
        for kind in ("checkpoint", "config", "hparams")
    ]
    for artifact in made:
        if artifact is not None:
            artifact.delete(permanent=True, storage=True)
    monkeypatch.setattr(ln.context, "_run", None)
    return seen


@pytest.mark.parametrize("dirpath", [True, False], ids=["dirpath", "no-dirpath"])
def test_save_hooks_called_before_any_fit_match_the_reference(
    dirpath: bool, ln: Any, user_features: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented ``save_*_artifact`` hooks, called by user code on a trainer that has
    not run: the artifact saved (under the key ``resolve_artifact_key`` gives, linked to
    the active run, the config as its input), annotated, the event emitted; a missing
    ``hparams.yaml`` gives None; a missing file raises."""
    root = tmp_path / "w"
    reference = _direct_observe(REFERENCE, root, ln, monkeypatch, dirpath)
    ours = _direct_observe(OURS, root, ln, monkeypatch, dirpath)
    assert reference["checkpoint"] is not None
    _assert_same("direct calls", reference, ours)


# -- what an observer finds in the instance when it is told ---------------------------------------

# Set by the commits of later saves (ours: committed while earlier events are delivered,
# docs/migrating.md, "Hooks and observers see the instance as it is when they are told").
MOVING = ("is_best_model", "is_last_model", "model_rank")


class Inspector:
    """An observer that, when told of a saved checkpoint, reads the features of its artifact
    (as a registry mirroring them would)."""

    def __init__(self, ctx: Ctx, ln: Any) -> None:
        self.ctx, self.ln = ctx, ln
        self.seen: list[Any] = []

    def on_artifact_saved(self, event: Any) -> None:
        if event.kind != "checkpoint":
            return
        values = artifact_features(self.ln, event.artifact)
        own = {n: sorted(map(repr, v)) for n, v in values.items() if n not in MOVING}
        self.seen.append((self.ctx.key(event.key), own))

    def on_artifact_removed(self, event: Any) -> None:
        pass


def _inspect(
    module_name: str, root: Path, ln: Any, monkeypatch: pytest.MonkeyPatch, opts: dict[str, Any]
) -> list[Any]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    module = importlib.import_module(module_name)
    run = ln.Run(transform=ln.context.transform).save()
    monkeypatch.setattr(ln.context, "_run", run)
    ctx = Ctx(root, run.uid)
    inspector = Inspector(ctx, ln)
    callback = module.Checkpoint(
        dirpath=root / "ckpts", every_n_train_steps=1, artifact_observers=[inspector], **opts
    )
    trainer = make_trainer(root, [callback], max_steps=4)
    trainer.fit(TierModel(lr=0.05, scores=[3, 1, 2, 4]), datamodule=TierData(n=4))
    _delete_under(ln, callback.base_prefix)
    monkeypatch.setattr(ln.context, "_run", None)
    return inspector.seen


@pytest.mark.parametrize(
    "opts",
    [
        {"monitor": "score", "save_top_k": -1},
        {"monitor": "score", "save_top_k": 2, "features": {"artifact": {"global_step": None}}},
        {},
    ],
    ids=["all-kept", "top-2-user-feature", "no-monitor"],
)
def test_an_observer_finds_the_saved_checkpoint_annotated_with_its_values(
    opts: dict[str, Any],
    ln: Any,
    user_features: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When ``on_artifact_saved`` is called for a checkpoint, its artifact carries that
    save's values (the reference annotates before it notifies): score, monitor, mode,
    save_weights_only and the user's. The flags are left out here: ours may have moved
    them on by then (see the next test)."""
    root = tmp_path / "w"
    reference = _inspect(REFERENCE, root, ln, monkeypatch, opts)
    ours = _inspect(OURS, root, ln, monkeypatch, opts)
    assert len(reference) >= 3
    assert ours == reference, "\n".join(
        f"reference: {r!r}\nours:      {o!r}" for r, o in zip(reference, ours, strict=False)
    )


def test_an_observer_told_after_a_later_save_committed_sees_the_flags_moved_on(
    ln: Any, fresh_run: Any, tmp_path: Path
) -> None:
    """Ours (documented, docs/migrating.md): the committer goes on while events are
    delivered, so an observer of the first checkpoint that runs once the second is
    committed finds the first one's ``is_best_model`` / ``is_last_model`` already cleared
    by the second save, and the second artifact in the instance. The reference notifies
    before its next save: it would find ``True`` for both and no second artifact."""
    import threading

    import lamin_lightning as ll

    second_committed = threading.Event()
    commits: list[str] = []

    class Counting(ll.Checkpoint):  # type: ignore[misc]
        def commit_checkpoint_artifact(self, trainer: Any, snapshot: Any, artifact: Any) -> None:
            super().commit_checkpoint_artifact(trainer, snapshot, artifact)
            commits.append(snapshot.key)
            if len(commits) == 2:
                second_committed.set()

    seen: list[Any] = []

    class Holding:
        def on_artifact_saved(self, event: Any) -> None:
            if event.kind != "checkpoint" or seen:
                return
            assert second_committed.wait(timeout=60)
            values = artifact_features(ln, event.artifact)
            later = ln.Artifact.filter(key=commits[1]).exists()
            seen.append((values["is_best_model"], values["is_last_model"], later))

        def on_artifact_removed(self, event: Any) -> None:
            pass

    callback = Counting(
        dirpath=tmp_path / "ckpts", every_n_train_steps=1, artifact_observers=[Holding()]
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(TierModel(), datamodule=TierData(n=3))
    # No monitor: each save is Lightning's best and last when it is made.
    assert seen == [([False], [False], True)]


# -- bad arguments -----------------------------------------------------------------------------

BAD_ARGUMENTS: dict[str, dict[str, Any]] = {
    "mode": {"mode": "median"},
    "save_top_k": {"save_top_k": -2},
    "steps-and-time": {"every_n_train_steps": 1, "train_time_interval": timedelta(seconds=1)},
    "top-k-without-monitor": {"monitor": None, "save_top_k": 2},
    "every_n_epochs": {"every_n_epochs": -1},
    "feature-scope": {"features": {"runs": {"tier_project": "p"}}},
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_the_references_error_at_construction(name: str, ln: Any) -> None:
    """Lightning's ``MisconfigurationException`` (and the reference's ``ValueError`` for a
    features key other than "run"/"artifact"), of the same type, at construction."""
    raised = []
    for module_name in (REFERENCE, OURS):
        module = importlib.import_module(module_name)
        with pytest.raises(Exception) as info:  # its type is compared below
            module.Checkpoint(**BAD_ARGUMENTS[name])
        raised.append(info.value)
    reference, ours = raised
    assert isinstance(ours, type(reference)), (type(reference), type(ours), ours)
    assert str(ours).startswith(str(reference).split(".")[0]), (str(reference), str(ours))
