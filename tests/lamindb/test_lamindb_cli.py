"""LightningCLI: every async knob settable from YAML, and the config saved as a run input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lamindb_tier import TierData, TierModel
from lightning.pytorch.cli import LightningCLI

import lamin_lightning as ll
from lamin_lightning import RetryPolicy

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def _config(tmp_path: Path, name: str, callback: dict[str, Any]) -> Path:
    root = tmp_path / name
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [callback],
        },
        "model": {"lr": 0.02},
        "data": {"n": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_cli(config: Path, save_config_callback: type) -> LightningCLI:
    return LightningCLI(
        TierModel,
        TierData,
        args=["fit", "--config", str(config)],
        save_config_callback=save_config_callback,
        save_config_kwargs={"overwrite": True},
    )


def test_cli_yaml_sets_knobs_and_config_is_saved_as_run_input(
    ln: Any, fresh_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YAML sets every async knob; config saved at {base_prefix}/config.yaml as run input."""
    monkeypatch.setattr(sys, "argv", ["lamin-lightning-tier"])  # not pytest's arguments
    config = _config(
        tmp_path,
        "ours",
        {
            "class_path": "lamin_lightning.Checkpoint",
            "init_args": {
                "dirpath": str(tmp_path / "ours-ckpts"),
                "monitor": "score",
                "every_n_train_steps": 1,
                "max_workers": 2,
                "max_pending": 3,
                "retry": {
                    "attempts": 2,
                    "initial_backoff": 0.0,
                    "max_backoff": 0.0,
                    "jitter": 0.0,
                },
                "flush_timeout": 60,
                "on_error": "warn",
            },
        },
    )
    cli = _run_cli(config, ll.SaveConfigCallback)

    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, ll.Checkpoint)]
    assert len(callbacks) == 1
    callback = callbacks[0]
    assert (callback.max_workers, callback.max_pending) == (2, 3)
    assert type(callback.retry) is RetryPolicy
    assert callback.retry == RetryPolicy(
        attempts=2, initial_backoff=0.0, max_backoff=0.0, jitter=0.0
    )
    assert callback.flush_timeout == 60.0
    assert callback.on_error == "warn"
    assert callback.monitor == "score"

    assert callback.base_prefix == f"{tmp_path}/ours-ckpts/{fresh_run.uid}"
    key = f"{callback.base_prefix}/config.yaml"
    artifacts = list(ln.Artifact.filter(key=key))
    assert len(artifacts) == 1
    artifact = artifacts[0]
    assert (artifact.description, artifact.kind) == ("Lightning CLI config", "config")
    assert artifact in list(fresh_run.input_artifacts.all())
    local = tmp_path / "ours" / "config.yaml"
    assert Path(str(artifact.path)).read_text() == local.read_text()
    assert callback.last_config_artifact is not None
    assert callback.last_config_artifact.id == artifact.id
    # The checkpoint of the same CLI run is there too (save_top_k=1).
    checkpoints = ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix + "/")
    assert checkpoints.count() == 1

    # The reference's CLI integration, same run, its own dirpath: same layout and metadata.
    from lamindb.integrations import lightning as reference

    ref_config = _config(
        tmp_path,
        "ref",
        {
            "class_path": "lamindb.integrations.lightning.Checkpoint",
            "init_args": {"dirpath": str(tmp_path / "ref-ckpts"), "monitor": "score"},
        },
    )
    ref_cli = _run_cli(ref_config, reference.SaveConfigCallback)
    ref_callback = next(
        cb for cb in ref_cli.trainer.callbacks if isinstance(cb, reference.Checkpoint)
    )
    ref_artifact = ln.Artifact.filter(key=f"{ref_callback.base_prefix}/config.yaml").one()
    assert ref_callback.base_prefix == f"{tmp_path}/ref-ckpts/{fresh_run.uid}"
    assert (ref_artifact.description, ref_artifact.kind) == (artifact.description, artifact.kind)
    assert ref_artifact.run_id == artifact.run_id
    assert ref_artifact in list(fresh_run.input_artifacts.all())


def test_cli_yaml_takes_every_model_checkpoint_value_lightning_takes(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save_last: link`` (Lightning's ``bool | Literal["link"]``) passes the CLI's type
    check and links ``last.ckpt``; ``dirpath`` as Lightning's ``_PATH`` resolves (the
    annotation resolved only for type checkers, so ``get_type_hints`` raised); and the
    signature holds the annotations themselves, as Lightning's does, not their text."""
    import inspect
    import typing

    from lightning.pytorch.callbacks import ModelCheckpoint

    hints = typing.get_type_hints(ll.Checkpoint.__init__)
    lightning_hints = typing.get_type_hints(ModelCheckpoint.__init__)
    ours = inspect.signature(ll.Checkpoint).parameters
    lightnings = inspect.signature(ModelCheckpoint).parameters
    for name in ("dirpath", "save_last", "train_time_interval", "every_n_epochs"):
        assert hints[name] == lightning_hints[name], name
        # unresolved too, as code that reads a signature without get_type_hints sees it
        assert ours[name].annotation == lightnings[name].annotation, name

    monkeypatch.setattr(sys, "argv", ["lamin-lightning-tier"])
    dirpath = tmp_path / "link-ckpts"
    config = _config(
        tmp_path,
        "link",
        {
            "class_path": "lamin_lightning.Checkpoint",
            "init_args": {
                "dirpath": str(dirpath),
                "monitor": "score",
                "every_n_train_steps": 1,
                "save_last": "link",
            },
        },
    )
    cli = _run_cli(config, ll.SaveConfigCallback)
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ll.Checkpoint))
    assert callback.save_last == "link"
    last = dirpath / "last.ckpt"
    assert last.is_symlink()
    assert Path(callback.best_model_path).name == last.resolve().name
    keys = {
        a.key.rsplit("/", 1)[-1]
        for a in ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix + "/")
    }
    assert Path(callback.best_model_path).name in keys


def test_an_existing_config_file_is_refused_with_the_references_words(
    ln: Any, fresh_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``overwrite=False`` and a ``config.yaml`` already there, both raise
    ``RuntimeError`` whose message starts as the reference's ("Config file already exists:
    PATH"), so code matching it works after the swap."""
    from lamindb.integrations import lightning as reference

    monkeypatch.setattr(sys, "argv", ["lamin-lightning-tier"])
    messages = {}
    for name, module, save_config in (
        ("ref", "lamindb.integrations.lightning", reference.SaveConfigCallback),
        ("ours", "lamin_lightning", ll.SaveConfigCallback),
    ):
        config = _config(tmp_path, name, {"class_path": f"{module}.Checkpoint"})
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("earlier: 1\n")
        with pytest.raises(RuntimeError) as raised:
            LightningCLI(
                TierModel,
                TierData,
                args=["fit", "--config", str(config)],
                save_config_callback=save_config,
                save_config_kwargs={"overwrite": False},
            )
        messages[name] = str(raised.value).replace(f"/{name}/", "/NAME/")
    assert messages["ref"].startswith("Config file already exists: ")
    assert messages["ours"].startswith(messages["ref"]), messages
