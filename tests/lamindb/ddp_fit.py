"""Run by ``test_lamindb_ddp.py``: one fit on 2 CPU processes (gloo), then a report per rank.

Usage: ``python ddp_fit.py STRATEGY BACKEND ROOT [--async-write] [--async-io-fails=N]``

- STRATEGY: ``ddp`` (Lightning relaunches this script for rank 1) or ``ddp_spawn``
  (Lightning spawns both ranks; the callback is pickled to them).
- BACKEND: ``lamindb`` (``lamin_lightning.Checkpoint`` on the instance named by
  ``LAMIN_SETTINGS_DIR``/``LAMIN_CACHE_DIR``, which the test created) or ``memory``
  (``MemoryCheckpoint`` into a ``MemoryStore`` living in rank zero).
- ``--async-io-fails=N``: Lightning's ``AsyncCheckpointIO`` around a ``TorchCheckpointIO``
  whose N-th write fails with ENOSPC (on rank zero, the only rank that writes).
- ROOT: working folder; checkpoints go to ``ROOT/ckpts``, the logger to ``ROOT/logs``,
  reports to ``ROOT/reports/rank{R}-pid{P}.json``.

Each rank's callback writes its report at the end of its own ``teardown`` (after the
teardown flush): its rank and pid, how many transfers and removals this process ran,
whether lamindb was imported in this process, whether it ever had a pipeline or an
outbox journal open, its persistence stats, how long its teardown took, and (rank zero)
Lightning's kept set with the key of each file. Non-loopback network is blocked in every
rank, so a call to LaminDB's hub fails loudly.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierData, TierModel, block_network
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import lamin_lightning as ll
from helpers import lightning_kept_paths, sha256_file
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

# Module level: runs in every rank, the spawned ones (which re-import this module) too.
_GUARD = pytest.MonkeyPatch()
block_network(_GUARD)

STEPS = 6
# ``score`` at step i: the top-2 (min) keeps, evicts and skips.
SCORES = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]


class Reporting:
    """Mixin for a checkpoint callback: counts this process's storage calls, reports."""

    def _counters(self) -> dict[str, Any]:
        counters = self.__dict__.get("_ddp_counters")
        if counters is None:
            counters = self.__dict__["_ddp_counters"] = {
                "transfers": 0,
                "removals": 0,
                "pool_seen": False,
                "outbox_seen": False,
                "lock": threading.Lock(),
            }
        return counters

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_ddp_counters", None)
        return state  # type: ignore[no-any-return]

    def save_checkpoint_artifact(self, trainer: pl.Trainer, filepath: Any, **kwargs: Any) -> Any:
        counters = self._counters()
        with counters["lock"]:
            counters["transfers"] += 1
        return super().save_checkpoint_artifact(trainer, filepath, **kwargs)  # type: ignore[misc]

    def remove_checkpoint_artifact(self, trainer: pl.Trainer, key: str, artifact: Any) -> Any:
        counters = self._counters()
        with counters["lock"]:
            counters["removals"] += 1
        return super().remove_checkpoint_artifact(trainer, key, artifact)  # type: ignore[misc]

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # type: ignore[misc]
        if getattr(self, "_pipeline", None) is not None:
            self._counters()["pool_seen"] = True
        if getattr(self, "_outbox", None) is not None:
            self._counters()["outbox_seen"] = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        started = time.monotonic()
        try:
            super().teardown(trainer, pl_module, stage)  # type: ignore[misc]
        finally:
            self._report(trainer, time.monotonic() - started)

    def _report(self, trainer: pl.Trainer, teardown_seconds: float) -> None:
        counters = self._counters()
        # Before anything below could import it.
        lamindb_imported = "lamindb" in sys.modules
        cb: Any = self
        report: dict[str, Any] = {
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "strategy": type(trainer.strategy).__name__,
            "transfers": counters["transfers"],
            "removals": counters["removals"],
            "pool_seen": counters["pool_seen"],
            "outbox_seen": counters["outbox_seen"],
            "lamindb_imported": lamindb_imported,
            "teardown_seconds": teardown_seconds,
            "stats": cb.persistence_stats.as_dict(),
            "pipeline_threads": [
                t.name for t in threading.enumerate() if t.name.startswith("lamin-lightning-")
            ],
        }
        if trainer.is_global_zero:
            kept = lightning_kept_paths(cb)
            report["kept"] = {
                cb.resolve_artifact_key(trainer, path, "checkpoint"): str(path) for path in kept
            }
            report["local_sha256"] = {str(p): sha256_file(p) for p in kept if p.exists()}
            if isinstance(cb, MemoryCheckpoint):
                report["store"] = {
                    key: cb.store.get(key).sha256  # type: ignore[union-attr]
                    for key in cb.store.keys(kind="checkpoint")
                }
            else:
                report["prefix"] = cb.checkpoint_key_prefix
        out = Path(os.environ["DDP_FIT_REPORTS"])
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{trainer.global_rank}-pid{os.getpid()}.json"
        path.write_text(json.dumps(report, indent=1))


class FailingIO(TorchCheckpointIO):
    """Lightning's own CheckpointIO, but its ``fail_at``-th write finds the disk full."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.writes = fail_at, 0

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        super().save_checkpoint(checkpoint, path, storage_options)


class ReportingCheckpoint(Reporting, ll.Checkpoint):
    pass


class ReportingMemoryCheckpoint(Reporting, MemoryCheckpoint):
    pass


def main(argv: list[str]) -> None:
    strategy, backend, root_arg = argv[:3]
    async_write = "--async-write" in argv
    fails = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--async-io-fails=")]
    root = Path(root_arg)
    os.environ["DDP_FIT_REPORTS"] = str(root / "reports")
    knobs: dict[str, Any] = {
        "dirpath": root / "ckpts",
        "monitor": "score",
        "mode": "min",
        "save_top_k": 2,
        "save_last": True,
        "every_n_train_steps": 1,
        "async_write": async_write,
        "flush_timeout": 120,
    }
    callback: Any = (
        ReportingCheckpoint(**knobs)
        if backend == "lamindb"
        else ReportingMemoryCheckpoint(MemoryStore(), **knobs)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        logger=CSVLogger(save_dir=str(root / "logs"), name="ddp"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[callback],
        plugins=[AsyncCheckpointIO(FailingIO(fails[0]))] if fails else None,
    )
    trainer.fit(TierModel(scores=SCORES), datamodule=TierData(n=2 * STEPS))
    print(f"DDP_FIT_DONE rank={trainer.global_rank} pid={os.getpid()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
