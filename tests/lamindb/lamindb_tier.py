"""Helpers of the LaminDB tier: network guard, a tiny model with hparams, queries."""

from __future__ import annotations

import socket
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class NetworkBlockedError(OSError):
    """Raised by the tier's socket guard for any non-loopback address."""


def _check_address(address: Any) -> None:
    if isinstance(address, str | bytes):  # AF_UNIX
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode()
    if host in LOOPBACK_HOSTS:
        return
    raise NetworkBlockedError(
        f"the LaminDB tier is offline: connection to {address!r} blocked"
        " (something tried to reach the network, e.g. LaminDB's hub)"
    )


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every non-loopback, non-unix connection raise NetworkBlockedError (all threads)."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_create_connection = socket.create_connection

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(address)
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(address)
        return original_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        _check_address(address)
        return original_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)


# -- a tiny model and datamodule ------------------------------------------------------------


class TierModel(pl.LightningModule):
    """One linear layer; logs ``score`` at training step i as ``scores[i % len(scores)]``.

    Also logs ``tier_metric`` = 10 * ``score``. The checkpoint saved after step i
    (``every_n_train_steps=1``, file ``step={i + 1}``) sees the values of step i.

    Saves its constructor arguments as hparams (``lr``, ``width``, ``hidden_tag``).
    """

    def __init__(
        self,
        lr: float = 0.01,
        width: int = 4,
        hidden_tag: str = "tiny",
        scores: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["scores"])
        self.layer = nn.Linear(width, width)
        self.scores = list(scores) if scores is not None else [1.0]
        self.training_steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps_run += 1
        (x,) = batch
        score = self.scores[self.global_step % len(self.scores)]
        self.log("score", float(score), on_step=True, on_epoch=False)
        self.log("tier_metric", 10.0 * float(score), on_step=True, on_epoch=False)
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TierData(pl.LightningDataModule):
    """``n`` deterministic single-sample batches; saves ``batch_size`` and ``n`` as hparams."""

    def __init__(self, n: int = 4, width: int = 4, batch_size: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(0)
        data = torch.randn(self.hparams.n, self.hparams.width, generator=generator)
        return DataLoader(TensorDataset(data), batch_size=self.hparams.batch_size)


def make_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer rooted at ``root`` (no logger unless given)."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
        "callbacks": callbacks,
        "max_steps": 2,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def fit(
    callback: pl.Callback,
    root: Path,
    *,
    steps: int = 2,
    model: pl.LightningModule | None = None,
    datamodule: pl.LightningDataModule | None = None,
    extra_callbacks: Sequence[pl.Callback] = (),
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit (default: a TierModel) for ``steps`` steps with ``callback``; return the trainer."""
    model = model if model is not None else TierModel()
    datamodule = datamodule if datamodule is not None else TierData(n=steps)
    trainer = make_trainer(root, [callback, *extra_callbacks], max_steps=steps, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    return trainer


# -- queries ---------------------------------------------------------------------------------


def ensure_features(ln: Any, features: dict[str, type]) -> None:
    """Save each feature (name: dtype) the instance lacks: a test's own user features."""
    for name, dtype in features.items():
        if not ln.Feature.filter(name=name).exists():
            ln.Feature(name=name, dtype=dtype).save()


def artifacts_under(ln: Any, prefix: str) -> dict[str, Any]:
    """Artifacts whose key starts with ``prefix + "/"``, by key (asserts keys are unique)."""
    found = list(ln.Artifact.filter(key__startswith=prefix.rstrip("/") + "/"))
    by_key: dict[str, Any] = {}
    for artifact in found:
        assert artifact.key not in by_key, f"two artifacts under key {artifact.key!r}"
        by_key[artifact.key] = artifact
    return by_key


def artifact_features(ln: Any, artifact: Any) -> dict[str, list[Any]]:
    """Every feature value linked to ``artifact``: name -> list of values (duplicates visible)."""
    rows = ln.models.ArtifactJsonValue.filter(artifact_id=artifact.id).values_list(
        "jsonvalue__feature__name", "jsonvalue__value"
    )
    values: dict[str, list[Any]] = {}
    for name, value in rows:
        values.setdefault(name, []).append(value)
    return values


def run_features(ln: Any, run: Any) -> dict[str, list[Any]]:
    """Every feature value linked to ``run``: name -> list of values."""
    rows = ln.models.RunJsonValue.filter(run_id=run.id).values_list(
        "jsonvalue__feature__name", "jsonvalue__value"
    )
    values: dict[str, list[Any]] = {}
    for name, value in rows:
        values.setdefault(name, []).append(value)
    return values


def single(values: dict[str, list[Any]]) -> dict[str, Any]:
    """``{name: value}`` from :func:`artifact_features`, asserting one value per feature."""
    for name, found in values.items():
        assert len(found) == 1, f"feature {name!r} has {len(found)} values: {found}"
    return {name: found[0] for name, found in values.items()}


def stored_path(artifact: Any) -> Path:
    """The local file where ``artifact``'s bytes live in the instance's storage."""
    return Path(str(artifact.path))


def storage_file(location: Any) -> Any:
    """Where bytes live in storage, on every backend of the tier: an artifact's stored file,
    or a storage URI (``ArtifactSavedEvent.storage_uri``: a local path or ``s3://...``), as a
    path object with ``exists()``, ``read_bytes()`` and ``read_text()``. S3 URIs resolve
    against ``AWS_ENDPOINT_URL_S3`` (the session's moto server)."""
    from upath import UPath

    if isinstance(location, str | Path):
        return UPath(str(location))
    return location.path


def stored_sha256(location: Any) -> str:
    """SHA-256 of the stored bytes of an artifact or at a storage URI (see :func:`storage_file`)."""
    import hashlib

    return hashlib.sha256(storage_file(location).read_bytes()).hexdigest()


# -- consistency after faults ------------------------------------------------------------------


def assert_checkpoint_keys_persisted(
    ln: Any,
    prefix: str,
    expected: dict[str, Path],
    *,
    missing: Collection[str] = (),
) -> dict[str, Any]:
    """The checkpoint artifacts (kind "model") under ``prefix + "/"`` are exactly the keys of
    ``expected`` (less ``missing``), one artifact per key (trashed ones counted too), each
    stored file present (and, on local storage, hashing to its record's hash), the record's
    hash equal to the local file's if that still exists. A folder checkpoint (a folder
    artifact) is compared by lamindb's folder hash (``hash_dir``: every file's hash) and
    its number of files. ``missing`` keys must keep their local file. Returns the
    artifacts by key.
    """
    from lamindb_setup.core.hashing import hash_dir, hash_file

    unknown = set(missing) - set(expected)
    assert not unknown, f"missing keys {sorted(unknown)} are not among the expected keys"
    # .objects: no default filter, so trashed (not permanently deleted) duplicates count too.
    rows = list(ln.Artifact.objects.filter(key__startswith=prefix.rstrip("/") + "/", kind="model"))
    keys = [a.key for a in rows]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"more than one artifact under {duplicates}"
    want = set(expected) - set(missing)
    assert set(keys) == want, (
        f"{len(keys)} checkpoint artifact(s) under {prefix!r}, expected {len(want)};"
        f" extra: {sorted(set(keys) - want)}, absent: {sorted(want - set(keys))}"
    )
    for key in missing:
        assert expected[key].exists(), f"{expected[key]} failed to persist and must be kept"
    by_key = {a.key: a for a in rows}
    for key, artifact in by_key.items():
        stored = artifact.path  # a Path, or a UPath on cloud storage
        assert stored.exists(), f"{key}: stored file {stored} is gone"
        if isinstance(stored, Path) and stored.is_dir():
            size, digest, _, n_files = hash_dir(stored)
            assert (artifact.size, artifact.hash, artifact.n_files) == (size, digest, n_files), (
                f"{key}: stored folder corrupt"
            )
        elif isinstance(stored, Path):
            size, digest, _ = hash_file(stored)
            assert (artifact.size, artifact.hash) == (size, digest), f"{key}: stored bytes corrupt"
        local = expected[key]
        if local.is_dir():
            size, digest, _, n_files = hash_dir(local)
            assert (artifact.hash, artifact.n_files) == (digest, n_files), (
                f"{key}: stored folder differs from {local}"
            )
        elif local.exists():
            assert hash_file(local)[1] == artifact.hash, f"{key}: stored bytes differ from {local}"
    return by_key


def kept_set_keys(callback: Any, trainer: Any = None) -> dict[str, Path]:
    """Lightning's kept set of ``callback`` (``best_k_models`` plus ``last_model_path``, see
    ``helpers.lightning_kept_paths``), by the key ``callback.resolve_artifact_key`` gives."""
    # tests/helpers.py, on the path through tests/conftest.py
    from helpers import lightning_kept_paths

    trainer = trainer if trainer is not None else callback._trainer
    paths = lightning_kept_paths(callback)
    return {callback.resolve_artifact_key(trainer, p, "checkpoint"): p for p in paths}


def assert_kept_set_persisted(
    ln: Any, callback: Any, *, missing: Collection[str] = ()
) -> dict[str, Any]:
    """The checkpoint artifacts under ``callback.checkpoint_key_prefix + "/"`` are exactly
    Lightning's kept set, without duplicates, with the bytes of the local files.

    ``missing``: keys of the kept set known to have failed (absent, local file kept).
    Call it after the fit (the teardown flush) returned. Returns the artifacts by key.
    """
    return assert_checkpoint_keys_persisted(
        ln, callback.checkpoint_key_prefix, kept_set_keys(callback), missing=missing
    )


def held_uploads() -> Any:
    """A LaminArtifactPublisher whose checkpoint uploads block until ``released`` is set;
    ``blocked`` and ``finished`` count them (``cond`` is notified on each change)."""
    import threading

    from lamin_lightning._lamin import LaminArtifactPublisher

    class HeldUploads(LaminArtifactPublisher):
        def __init__(self) -> None:
            self.released = threading.Event()
            self.cond = threading.Condition()
            self.blocked = 0
            self.finished = 0

        def create_artifact(self, local_path: Any, **kwargs: Any) -> Any:
            with self.cond:
                self.blocked += 1
                self.cond.notify_all()
            self.released.wait()
            try:
                return super().create_artifact(local_path, **kwargs)
            finally:
                with self.cond:
                    self.finished += 1
                    self.cond.notify_all()

    return HeldUploads()
