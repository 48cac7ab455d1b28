"""A training process for ``test_lamindb_lightning_view.py``, killed mid background write.

Uses the tier's instance (LAMIN_SETTINGS_DIR/LAMIN_CACHE_DIR inherited from the test)
with non-loopback network blocked. Trains ``ll.Checkpoint(async_write=True,
monitor="score", mode="max", save_top_k=1)`` on rising scores: step 2 evicts step 1.
The background write of step 2's checkpoint hangs forever (a full disk that never
answers). Once step 1's checkpoint is committed and Lightning has evicted it (at the
start of the third batch), the process writes ``--ready`` (the key prefix, atomically)
and freezes; the test then kills it (SIGKILL).

With ``--save-last`` it also saves ``last.ckpt``: the process freezes once step 1's
checkpoint and ``last.ckpt`` are both committed, while the rewrite of ``last.ckpt`` at
step 2 hangs (the file at its name is step 1's).

With ``--in-place-io`` the callback writes synchronously and the trainer through
Lightning's ``AsyncCheckpointIO`` around a ``TorchCheckpointIO`` that writes in place,
as Lightning's does: step 2's write stops half-way through its file, and stays there.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import lightning.pytorch as pl
import pytest
import torch
from lamindb_tier import TierData, TierModel, block_network, make_trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import lamin_lightning as ll
from test_async_write import OnSerialise


class Saved:
    """``event`` is set once ``expected`` checkpoints are committed."""

    def __init__(self, expected: int) -> None:
        self.event = threading.Event()
        self.left = expected

    def on_artifact_saved(self, event: Any) -> None:
        if event.kind == "checkpoint":
            self.left -= 1
            if self.left <= 0:
                self.event.set()

    def on_artifact_removed(self, event: Any) -> None:
        del event

    def on_artifact_failed(self, event: Any) -> None:
        del event


class HalfWrittenIO(TorchCheckpointIO):
    """Lightning's in-place write, for step 2 cut off half-way (and hung there)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if checkpoint.get("global_step") != 2:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        threading.Event().wait()  # the rest never comes: the process is killed meanwhile


class Freeze(pl.Callback):
    def __init__(self, callback: ll.Checkpoint, saved: Saved, ready: Path) -> None:
        self.callback, self.saved, self.ready = callback, saved, ready

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.global_step == 2 and self.callback.async_write:
            # Its background write hangs forever (a full disk that never answers).
            checkpoint["hang_when_written"] = OnSerialise(threading.Event().wait, "hang")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step < 2:
            return
        committed = self.saved.event.wait(timeout=300)
        view = {
            "prefix": self.callback.checkpoint_key_prefix,
            "committed": committed,
            "best_model_path": self.callback.best_model_path,
        }
        partial = self.ready.with_suffix(".partial")
        partial.write_text(json.dumps(view))
        partial.replace(self.ready)
        threading.Event().wait()  # frozen until the test kills this process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--in-place-io", action="store_true")
    parser.add_argument("--save-last", action="store_true")
    args = parser.parse_args()
    guard = pytest.MonkeyPatch()
    block_network(guard)
    saved = Saved(expected=2 if args.save_last else 1)
    callback = ll.Checkpoint(
        dirpath=args.dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        async_write=not args.in_place_io,
        save_last=args.save_last,
        max_snapshots=2,
        artifact_observers=[saved],
    )
    plugins = [AsyncCheckpointIO(HalfWrittenIO())] if args.in_place_io else None
    trainer = make_trainer(
        args.dirpath.parent,
        [callback, Freeze(callback, saved, args.ready)],
        max_steps=4,
        plugins=plugins,
    )
    trainer.fit(TierModel(scores=[1.0, 2.0, 3.0, 4.0]), datamodule=TierData(n=4))
    raise SystemExit("the training process was not frozen (nor killed)")


if __name__ == "__main__":
    main()
