"""Differential DDP fit: ModelCheckpoint ("mc") vs MemoryCheckpoint ("mem") or
lamin_lightning.Checkpoint ("ll"), on 2 CPU processes (gloo).

Usage: python ddp_diff.py KIND STRATEGY ROOT [--async-write] [--link] [--steps=N]
       [--fault=raise|sigint|sigterm|raise0|raise1:STEP] [--resume] [--save-on-exception]
       [--hold-uploads] (ll: every upload blocks until the process ends)

Each rank writes ROOT/reports/{phase}-rank{R}.json at the end of fit (or after the
exception): the folder listing (links with their targets), Lightning's state, the
step the fit started at, and (rank zero, mem) the store's keys.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SCORES = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 0.5, 7.0, 2.5, 0.1]


class Model(pl.LightningModule):
    def __init__(self, fault: str | None = None, fault_step: int = -1) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        big = int(os.environ.get("DDP_DIFF_BIG", "0"))
        if big:
            self.ballast = nn.Parameter(torch.zeros(big, 1024), requires_grad=False)
        self.fault, self.fault_step = fault, fault_step
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.global_step
        self._dumps = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # killwrite0:STEP[:N]: rank zero is SIGKILLed while it writes the N-th checkpoint
        # (1: the top-k file, 2: last.ckpt) of the save after STEP: in the background
        # write's zip writer (async_write), or right here (a synchronous write).
        if not (self.fault or "").startswith("killwrite0") or self.trainer.global_rank != 0:
            return
        if self.global_step != self.fault_step:
            return
        self._dumps += 1
        if self._dumps != int(os.environ.get("DDP_DIFF_NTH", "1")):
            return

        def kill() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        if os.environ.get("DDP_DIFF_ASYNC"):
            from test_async_write import OnSerialise

            checkpoint["kill"] = OnSerialise(kill, "kill")
        else:
            kill()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        if step == self.fault_step and self.fault:
            rank = self.trainer.global_rank
            if os.environ.get("DDP_DIFF_TRACE"):
                import faulthandler

                self._tb = open(os.path.join(os.environ["DDP_DIFF_TRACE"], f"tb{rank}.txt"), "w")  # noqa: SIM115  # open while faulthandler writes
                faulthandler.dump_traceback_later(3, repeat=True, file=self._tb)
            if self.fault == "raise" or self.fault == f"raise{rank}":
                raise RuntimeError(f"boom on rank {rank} at step {step}")
            if self.fault == "sigkill" and rank == 0:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            if self.fault == "sigterm0" and rank == 0:  # the launcher only, as a scheduler
                os.kill(os.getpid(), signal.SIGTERM)
            if self.fault in ("sigint", "sigterm"):  # every rank, as a terminal or a scheduler
                os.kill(os.getpid(), signal.SIGINT if self.fault == "sigint" else signal.SIGTERM)
                time.sleep(0.5)
        score = SCORES[step % len(SCORES)] + 0.01 * self.trainer.global_rank
        self.log("score", score, on_step=True, on_epoch=False, sync_dist=True)
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(200, 4)), batch_size=1)


def listing(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out[p.name] = "->" + os.path.basename(os.readlink(p))
        elif p.is_file():
            out[p.name] = "file"
        else:
            out[p.name] = "dir"
    return out


def rel(path: Any, root: Path) -> Any:
    if not path:
        return path
    return os.path.relpath(str(path), str(root))


def _callback(kind: str, flags: dict[str, Any], knobs: dict[str, Any]) -> Any:
    if kind == "mc":
        cb = ModelCheckpoint(**knobs)
    elif kind == "mem":
        from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

        cb = MemoryCheckpoint(
            MemoryStore(latency=float(flags.get("--latency", 0))),
            async_write="--async-write" in flags,
            flush_timeout=60,
            **knobs,
        )
    else:
        import pytest
        from lamindb_tier import block_network

        block_network(pytest.MonkeyPatch())
        import lamin_lightning as ll

        if "--hold-uploads" in flags:  # every upload blocks: the jobs stay in the outbox
            from lamindb_tier import held_uploads

            knobs = {**knobs, "max_pending": 64}  # no backpressure on the held uploads
        cb = ll.Checkpoint(async_write="--async-write" in flags, flush_timeout=60, **knobs)
        if "--hold-uploads" in flags:
            cb._artifact_publisher = held_uploads()
    return cb


def main(argv: list[str]) -> None:
    kind, strategy, root_arg = argv[:3]
    root = Path(root_arg)
    flags = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else True) for a in argv[3:]}
    steps = int(flags.get("--steps", 8))
    fault, fault_step = None, -1
    if "--fault" in flags:
        fault, s = str(flags["--fault"]).split(":")
        fault_step = int(s)
    if "--async-write" in flags:
        os.environ["DDP_DIFF_ASYNC"] = "1"
    resume = "--resume" in flags
    phase = "resume" if resume else "first"
    dirpath = root / "ckpts"
    knobs: dict[str, Any] = {
        "dirpath": dirpath,
        "monitor": "score",
        "mode": "min",
        "save_top_k": 2,
        "save_last": "link" if "--link" in flags else True,
        "every_n_train_steps": 1,
        "save_on_exception": "--save-on-exception" in flags,
    }
    if "--filename" in flags:
        knobs["filename"] = str(flags["--filename"])
    cb = _callback(kind, flags, knobs)
    model = Model(None if resume else fault, fault_step)
    trainer_kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    trainer = pl.Trainer(**trainer_kwargs, callbacks=[cb])
    error = None
    t0 = time.monotonic()
    try:
        trainer.fit(model, ckpt_path="last" if resume else None)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    report(root, phase, trainer, cb, model, error, time.monotonic() - t0)
    if error and "--retry" in flags:  # the same script fits again at once, from "last"
        cb2 = _callback(kind, flags, knobs)
        model2 = Model()
        trainer2 = pl.Trainer(**{**trainer_kwargs, "max_steps": steps + 2, "callbacks": [cb2]})
        error = None
        t0 = time.monotonic()
        try:
            trainer2.fit(model2, ckpt_path="last")
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
        report(root, "retry", trainer2, cb2, model2, error, time.monotonic() - t0)
    if error and "SystemExit" in error:
        sys.exit(1)


def report(
    root: Path, phase: str, trainer: Any, cb: Any, model: Any, error: Any, took: float
) -> None:
    dirpath = root / "ckpts"
    state = {
        "rank": trainer.global_rank,
        "error": error,
        "took": took,
        "started_at": model.started_at,
        "global_step": trainer.global_step,
        "listing": listing(dirpath),
        "best_model_path": rel(cb.best_model_path, root),
        "last_model_path": rel(cb.last_model_path, root),
        "best_k_models": {rel(k, root): float(v) for k, v in cb.best_k_models.items()},
        "kth_best_model_path": rel(cb.kth_best_model_path, root),
        "best_model_score": None if cb.best_model_score is None else float(cb.best_model_score),
    }
    if trainer.is_global_zero and hasattr(cb, "checkpoint_key_prefix"):
        state["prefix"] = cb.checkpoint_key_prefix
        state["stats"] = cb.persistence_stats.as_dict()
    if trainer.is_global_zero and hasattr(cb, "store"):
        state["store"] = sorted(cb.store.keys(kind="checkpoint"))
        state["store_sha"] = {k: cb.store.get(k).sha256 for k in state["store"]}
        import hashlib

        state["local_sha"] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(dirpath.glob("*.ckpt"))
            if p.is_file() and not p.is_symlink()
        }
        state["stats"] = cb.persistence_stats.as_dict()
    out = root / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{phase}-rank{trainer.global_rank}.json").write_text(json.dumps(state, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
