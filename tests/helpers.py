"""Generic test helpers: a tiny LightningModule, dataloaders, trainers and a condition wait.

Nothing here knows about LaminDB; the LaminDB tests can reuse it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(pl.LightningModule):
    """A one-layer model whose logged ``score`` follows a given sequence.

    Args:
        width: Input and output width of the linear layer; ``width=512`` makes a
            checkpoint just over 1 MiB (staged by hard link instead of copy).
        scores: ``score`` logged at training step ``i`` is ``scores[i % len(scores)]``.
        fail_at_step: Raise ``RuntimeError(f"boom at step {n}")`` in training step ``n``.
    """

    def __init__(
        self,
        width: int = 4,
        scores: Sequence[float] | None = None,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(width, width)
        self.scores = list(scores) if scores is not None else None
        self.fail_at_step = fail_at_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError(f"boom at step {self.fail_at_step}")
        (x,) = batch
        loss = self(x).pow(2).mean()
        if self.scores is not None:
            score = self.scores[self.global_step % len(self.scores)]
            self.log("score", float(score), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("val_loss", self(x).pow(2).mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("test_loss", self(x).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 8, width: int = 4) -> DataLoader[Any]:
    """A deterministic dataloader of ``n`` single-sample batches."""
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, width, generator=generator)), batch_size=1)


def make_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer rooted at ``root``."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_files(dirpath: Path) -> set[str]:
    """Names of the ``.ckpt`` files Lightning left in ``dirpath`` (staging excluded)."""
    return {p.name for p in dirpath.glob("*.ckpt")}


def staged_files(dirpath: Path) -> list[Path]:
    """Files left in the staging area of ``dirpath``."""
    root = dirpath / ".lamin-lightning" / "staged"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds; False after ``timeout`` seconds.

    For conditions that have no notification of their own (such as stats
    counters); it waits for a state, never for a fixed time.
    """
    deadline = time.monotonic() + timeout
    idle = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        idle.wait(0.002)
    return True
