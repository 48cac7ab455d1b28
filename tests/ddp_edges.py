"""Scenarios on 2 CPU processes (gloo) for tests/test_ddp_edges.py.

Usage: python ddp_edges.py KIND SCENARIO ROOT [options]
KIND: mc (ModelCheckpoint) or mem (MemoryCheckpoint, async_write with --async-write).
Each rank writes ROOT/reports/{phase}-rank{R}.json after each phase.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_TRAINING_ENDED = threading.Event()
"""Set at ``on_train_end`` (before the checkpoint callbacks' own hooks): the failing write
of DDP_EDGES_FAIL_WRITE waits for it, so it fails after the fit's last save returned, as a
slow disk makes it, whatever the machine's load."""


class _TrainingEnded(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _TRAINING_ENDED.set()


SCORES = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 0.5, 7.0, 2.5, 0.1, 3.3, 0.2]


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        big = int(os.environ.get("DDP_EDGES_BIG", "0"))
        if big:
            self.ballast = nn.Parameter(torch.zeros(big, 1024), requires_grad=False)
        self.started_at: int | None = None
        self.tested_step: Any = None

    def on_train_start(self) -> None:
        self.started_at = self.global_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        self.log("score", SCORES[step % len(SCORES)], on_step=True, on_epoch=False, sync_dist=True)
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("t", self.layer(x).pow(2).mean(), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # DDP_EDGES_FAIL_WRITE=STEP: rank zero's background write of the first checkpoint
        # saved after STEP finds the disk full.
        fail = os.environ.get("DDP_EDGES_FAIL_WRITE")
        if fail and self.trainer.global_rank == 0 and self.global_step == int(fail):
            os.environ.pop("DDP_EDGES_FAIL_WRITE")
            from test_async_write import OnSerialise

            def full() -> None:
                _TRAINING_ENDED.wait(60)
                raise OSError(errno.ENOSPC, "No space left on device")

            checkpoint["full"] = OnSerialise(full, "full")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tested_step = checkpoint["global_step"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(200, 4)), batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=1)


def listing(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            out[p.name] = (
                "->" + os.readlink(p).rsplit("/", 1)[-1]
                if p.is_symlink()
                else ("file" if p.is_file() else "dir")
            )
    return out


def report(root: Path, phase: str, trainer: Any, cb: Any, model: Any, error: Any) -> None:
    dirpath = root / "ckpts"
    rel = lambda p: os.path.relpath(str(p), str(root)) if p else p  # noqa: E731
    state: dict[str, Any] = {
        "rank": trainer.global_rank,
        "error": error,
        "started_at": model.started_at,
        "tested_step": model.tested_step,
        "global_step": trainer.global_step,
        "listing": listing(dirpath),
        "best_model_path": rel(cb.best_model_path),
        "last_model_path": rel(cb.last_model_path),
        "best_k_models": {rel(k): float(v) for k, v in cb.best_k_models.items()},
    }
    if trainer.is_global_zero and hasattr(cb, "store"):
        cb.flush()
        state["store_sha"] = {
            k.rsplit("/", 1)[-1]: cb.store.get(k).sha256 for k in cb.store.keys(kind="checkpoint")
        }
        state["local_sha"] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dirpath.glob("*.ckpt"))
            if p.is_file() and not p.is_symlink()
        }
        state["stats"] = cb.persistence_stats.as_dict()
    out = root / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{phase}-rank{trainer.global_rank}.json").write_text(json.dumps(state, indent=1))


def main(argv: list[str]) -> None:
    kind, scenario, root_arg = argv[:3]
    flags = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else True) for a in argv[3:]}
    root = Path(root_arg)
    strategy = str(flags.get("--strategy", "ddp"))
    knobs: dict[str, Any] = {
        "dirpath": root / "ckpts",
        "monitor": "score",
        "mode": "min",
        "save_top_k": int(flags.get("--top-k", 2)),
        "save_last": "link" if "--link" in flags else True,
        "every_n_train_steps": int(flags.get("--every", 1)),
    }
    if "--filename" in flags:
        knobs["filename"] = str(flags["--filename"])
    if kind == "mc":
        cb: Any = ModelCheckpoint(**knobs)
    else:
        from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

        cb = MemoryCheckpoint(
            MemoryStore(),
            async_write="--async-write" in flags,
            flush_timeout=60,
            on_error=str(flags.get("--on-error", "raise")),
            **knobs,
        )
    steps = int(flags.get("--steps", 6))
    common: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    model = Model()
    extra = [_TrainingEnded()] if os.environ.get("DDP_EDGES_FAIL_WRITE") else []
    trainer = pl.Trainer(max_steps=steps, callbacks=[*extra, cb], **common)
    error = None
    try:
        trainer.fit(model)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    report(root, "first", trainer, cb, model, error)
    if scenario == "refit_same":  # the same trainer and callback, more steps
        trainer.fit_loop.epoch_loop.max_steps = 2 * steps
        trainer.fit(model)
        report(root, "second", trainer, cb, model, None)
    elif scenario == "refit_last":  # a new trainer, the same callback, from "last"
        model2 = Model()
        trainer2 = pl.Trainer(max_steps=2 * steps, callbacks=[cb], **common)
        trainer2.fit(model2, ckpt_path="last")
        report(root, "second", trainer2, cb, model2, None)
    elif scenario == "test_best":
        trainer.test(model, ckpt_path="best", verbose=False)
        report(root, "second", trainer, cb, model, None)
    elif scenario == "direct_last":  # Lightning's save methods called after fit, every rank
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        candidates = {**cb._monitor_candidates(trainer), "score": torch.tensor(-1.0)}
        cb._save_topk_checkpoint(trainer, candidates)
        cb._save_last_checkpoint(trainer, candidates)
        report(root, "second", trainer, cb, model, None)
    print(f"DONE rank={trainer.global_rank}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
