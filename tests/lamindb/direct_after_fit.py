"""A process of its own for the direct-call tests: fit, then Lightning's save methods
called directly after ``fit`` returned, then the process ends at once (``os._exit``),
as a script that ends next would take the pipeline's threads with it.

Uses the tier's instance (LAMIN_SETTINGS_DIR/LAMIN_CACHE_DIR and LAMIN_CURRENT_INSTANCE
inherited from the test) with non-loopback network blocked. Writes ``--report`` (the
key prefix and the files Lightning's state names) right before it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch
from lamindb_tier import TierData, TierModel, block_network, make_trainer

import lamin_lightning as ll


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--async-write", action="store_true")
    args = parser.parse_args()
    block_network(pytest.MonkeyPatch())

    callback = ll.Checkpoint(
        dirpath=args.dirpath,
        monitor="score",
        mode="min",
        save_top_k=1,
        save_last=True,
        every_n_train_steps=1,
        async_write=args.async_write,
    )
    trainer = make_trainer(Path(args.dirpath).parent, [callback], max_steps=2)
    model = TierModel()
    trainer.fit(model, datamodule=TierData(n=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    # A better score than any of the fit's: the top-1 file is replaced (an eviction).
    candidates = {**callback._monitor_candidates(trainer), "score": torch.tensor(-1.0)}
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)
    report = {
        "prefix": callback.checkpoint_key_prefix,
        "best": os.path.basename(callback.best_model_path),
        "last": os.path.basename(callback.last_model_path),
        "pending": [job.key for job in callback.pending_artifacts()],
    }
    Path(args.report).write_text(json.dumps(report))
    os._exit(0)  # nothing after the calls: no teardown, no atexit, no thread joined


if __name__ == "__main__":
    main()
