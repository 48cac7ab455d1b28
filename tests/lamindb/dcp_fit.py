"""Run by ``test_lamindb_folders.py``: a 2-process CPU fit (gloo) whose strategy saves through
``torch.distributed.checkpoint``, then a report per rank.

Usage: ``python dcp_fit.py ROOT``

Checkpoints are folders of shards (``__0_0.distcp``, ``__1_0.distcp``, ``.metadata``,
``meta.pt``), written by both ranks into ``ROOT/ckpts``; ``lamin_lightning.Checkpoint``
persists them on the instance named by ``LAMIN_SETTINGS_DIR`` (the test's). Each rank
writes ``ROOT/reports/rank{R}.json`` at the end of its callback's ``teardown``: its
persistence stats, its pipeline threads, whether it imported lamindb, how long the
teardown took, and (rank zero) Lightning's view: kept folders by key, best, newest, ranking.
"""

from __future__ import annotations

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

import lamin_lightning as ll
from checkpoint_forms import DistributedCheckpointStrategy
from helpers import lightning_kept_paths

_GUARD = pytest.MonkeyPatch()
block_network(_GUARD)

STEPS = 5
SCORES = [5.0, 3.0, 4.0, 1.0, 2.0]


class ReportingCheckpoint(ll.Checkpoint):
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        lamindb_before = "lamindb" in sys.modules
        started = time.monotonic()
        try:
            super().teardown(trainer, pl_module, stage)
        finally:
            self._report(trainer, time.monotonic() - started, lamindb_before)

    def _report(self, trainer: pl.Trainer, seconds: float, lamindb_imported: bool) -> None:
        def key(path: Any) -> str:
            return self.resolve_artifact_key(trainer, path, "checkpoint")

        report: dict[str, Any] = {
            "rank": trainer.global_rank,
            "lamindb_imported": lamindb_imported,
            "teardown_seconds": seconds,
            "stats": self.persistence_stats.as_dict(),
            "pipeline_threads": [
                t.name for t in threading.enumerate() if t.name.startswith("lamin-lightning-")
            ],
        }
        if trainer.is_global_zero:
            ranked = sorted(self.best_k_models.items(), key=lambda item: float(item[1]))
            report.update(
                prefix=self.checkpoint_key_prefix,
                kept={key(p): str(p) for p in lightning_kept_paths(self)},
                best=key(self.best_model_path),
                newest=key(self._last_checkpoint_saved),
                ranking=[key(p) for p, _ in ranked],
            )
        out = Path(os.environ["DCP_FIT_REPORTS"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1))


def main(root: Path) -> None:
    os.environ["DCP_FIT_REPORTS"] = str(root / "reports")
    callback = ReportingCheckpoint(
        dirpath=root / "ckpts",
        monitor="score",
        mode="min",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=1,
        flush_timeout=120,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DistributedCheckpointStrategy(process_group_backend="gloo"),
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[callback],
    )
    trainer.fit(TierModel(scores=SCORES), datamodule=TierData(n=2 * STEPS))
    print(f"DCP_FIT_DONE rank={trainer.global_rank}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
