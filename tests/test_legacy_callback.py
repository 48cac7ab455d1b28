"""The deprecated ``Callback(path, key)`` on the training edges, without LaminDB: its
upload and annotation are replaced (the LaminDB tier tests them for real)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from helpers import TinyModel, loader, make_trainer
from lamin_lightning import _legacy


class FailsInSecondEpoch(TinyModel):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.current_epoch == 1:
            raise RuntimeError("training failed")
        return super().training_step(batch, batch_idx)


def test_a_training_error_comes_out_while_storage_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash waits for the uploads at most as long as ``Checkpoint``'s default
    ``flush_timeout`` (shortened here), then the training error is raised: it waited
    without bound, and ``fit`` never returned while storage hung."""
    monkeypatch.setattr(_legacy, "DEFAULT_FLUSH_TIMEOUT", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        callback = _legacy.Callback(tmp_path / "model.ckpt", "legacy/model.ckpt")
    released, uploading = threading.Event(), threading.Event()

    def hung_upload(staged: Path) -> Any:
        uploading.set()
        released.wait(60)  # storage that does not answer
        return object()

    monkeypatch.setattr(callback, "on_train_start", lambda trainer, pl_module: None)
    monkeypatch.setattr(callback, "_upload", hung_upload)
    monkeypatch.setattr(callback, "_annotate", lambda staged, values, artifact: None)
    outcome: list[BaseException | None] = []

    def fit() -> None:
        try:
            make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=3).fit(
                FailsInSecondEpoch(), loader(2)
            )
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    try:
        assert uploading.wait(30)
        fitting.join(30)
        assert not fitting.is_alive(), "fit did not raise the training error"
    finally:
        released.set()
        fitting.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError)


def test_every_epoch_is_uploaded_while_an_earlier_upload_is_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One version per epoch, as the reference saves: an epoch that ended while the
    previous epoch's upload ran dropped that queued version as superseded (a newer save
    of one key drops an unstarted one: right for ``last.ckpt``, not for versions)."""
    import torch
    from lightning.pytorch.callbacks import LambdaCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        callback = _legacy.Callback(tmp_path / "model.ckpt", "legacy/model.ckpt")
    released = threading.Event()
    uploaded: list[int] = []
    annotated: list[int] = []

    def upload(staged: Path) -> Any:
        epoch = int(torch.load(staged, weights_only=False)["epoch"])
        if not uploaded:
            assert released.wait(60)  # the first upload runs until training has ended
        uploaded.append(epoch)
        return epoch

    monkeypatch.setattr(callback, "on_train_start", lambda trainer, pl_module: None)
    monkeypatch.setattr(callback, "_upload", upload)
    monkeypatch.setattr(
        callback, "_annotate", lambda staged, values, artifact: annotated.append(artifact)
    )
    training_ended = LambdaCallback(on_train_end=lambda trainer, pl_module: released.set())
    make_trainer(tmp_path, [callback, training_ended], max_steps=-1, max_epochs=4).fit(
        TinyModel(), loader(2)
    )
    assert uploaded == [0, 1, 2, 3]
    assert annotated == [0, 1, 2, 3]
