"""Checkpoint forms other than one ``torch.save`` file, for the tests of every tier.

- :class:`FolderCheckpointIO`: each checkpoint is a folder of three files (the shape of
  sharded checkpoints, on one process).
- :class:`GatedCheckpointIO` and :class:`OpenGate`: a CheckpointIO whose first write
  waits until training has moved on (under Lightning's ``AsyncCheckpointIO`` it ends
  after ``save_checkpoint`` returned), synchronised on events.
- :class:`DistributedCheckpointStrategy`: DDP that saves through
  ``torch.distributed.checkpoint`` (every rank writes its shard into one folder, as
  FSDP's ``state_dict_type="sharded"`` does) and removes the folder on rank zero.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

FOLDER_FILES = ("meta.json", "state.pt", "weights.pt")


class FolderCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint as a folder: ``weights.pt``, ``state.pt`` and ``meta.json``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        rest = dict(checkpoint)
        torch.save(rest.pop("state_dict", {}), folder / "weights.pt")
        torch.save(rest, folder / "state.pt")
        meta = {"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
        (folder / "meta.json").write_text(json.dumps(meta))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        folder = Path(path)
        checkpoint = torch.load(folder / "state.pt", weights_only=False)
        checkpoint["state_dict"] = torch.load(folder / "weights.pt", weights_only=False)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


class GatedCheckpointIO(TorchCheckpointIO):
    """``torch.save`` whose first write waits for :attr:`gate` (at most 60 s).

    ``first_write_waited`` is True once that write saw the gate opened (not timed out):
    whoever opened it ran while the write was still pending.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.first_write_waited: bool | None = None
        self.writes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        self.writes += 1
        if self.writes == 1:
            self.first_write_waited = self.gate.wait(60)
        super().save_checkpoint(checkpoint, path, storage_options)


class OpenGate(pl.Callback):
    """Opens ``io.gate`` at the end of training batch ``at_batch`` (0-based).

    Checkpoint callbacks run after this one in each hook, so at batch ``n`` the saves
    of batches before ``n`` have returned and training went on.
    """

    def __init__(self, io: GatedCheckpointIO, at_batch: int = 1) -> None:
        self.io = io
        self.at_batch = at_batch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.at_batch + 1:
            self.io.gate.set()


class DistributedCheckpointStrategy(DDPStrategy):
    """DDP saving through ``torch.distributed.checkpoint``: a folder of shards.

    Every rank writes ``__{rank}_0.distcp`` (its own tensors and its share of the
    replicated ones) and rank zero ``.metadata`` and ``meta.pt``: the layout of FSDP's
    sharded checkpoints. Removal deletes the folder on rank zero.
    """

    strategy_name = "ddp_dcp"

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(str(filepath)))
        rest = dict(checkpoint)
        state = {
            "model": rest.pop("state_dict"),
            # One tensor per rank, so that each rank's shard file holds data of its own.
            "shard": {f"rank_{self.global_rank}": torch.full((64,), float(self.global_rank))},
        }
        rest.pop("optimizer_states", None)
        dcp.save(state, checkpoint_id=path)
        if self.global_rank == 0:
            torch.save(rest, path / "meta.pt")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)


def tree(path: str | Path) -> dict[str, bytes]:
    """Every file under a folder: relative POSIX path -> bytes."""
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
