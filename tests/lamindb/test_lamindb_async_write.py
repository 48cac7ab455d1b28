"""``Checkpoint(async_write=True)`` end to end on a real instance."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lamindb_tier import (
    TierModel,
    artifact_features,
    artifacts_under,
    fit,
    single,
    stored_sha256,
)

import lamin_lightning as ll
from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent, ArtifactSavedEvent
from lamin_lightning.testing import RecordingObserver
from test_async_write import OnSerialise

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

# Score seen by the checkpoint after step n (n = 1..8): up and down, all distinct.
UP_AND_DOWN = [5.0, 3.0, 4.0, 1.0, 6.0, 2.0, 7.0, 0.5]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class WriterThreads(pl.Callback):
    """Records, for every checkpoint file written, the thread that wrote it."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["test_writer_probe"] = OnSerialise(
            lambda: self.threads.append(threading.current_thread().name), "writer probe"
        )


def test_async_write_persists_lightning_kept_set_with_flags_from_background_written_files(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Files written off the training thread: artifacts = Lightning's kept set, bytes and flags."""
    writer_threads = WriterThreads()
    observer = RecordingObserver()
    dirpath = tmp_path / "ckpts"
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=2,
        every_n_train_steps=1,
        save_last=True,
        async_write=True,
        max_workers=2,
        artifact_observers=[observer],
    )
    trainer = fit(
        callback,
        tmp_path,
        steps=len(UP_AND_DOWN),
        model=TierModel(scores=UP_AND_DOWN),
        extra_callbacks=[writer_threads],
    )
    writers = writer_threads.threads

    stats = callback.persistence_stats
    assert stats.failed == 0 and not observer.of_type(ArtifactFailedEvent)
    # Every checkpoint (top-k saves and each last.ckpt) was written in the background.
    assert writers and threading.current_thread().name not in writers
    assert len(writers) == len(observer.of_type(ArtifactSavedEvent)) + stats.cancelled + (
        stats.superseded
    )

    def key(path: str | Path) -> str:
        return callback.resolve_artifact_key(trainer, path, "checkpoint")

    prefix = callback.checkpoint_key_prefix
    stored = artifacts_under(ln, prefix)
    kept_paths = [*callback.best_k_models, callback.last_model_path]
    assert {p.name for p in dirpath.glob("*.ckpt")} == {Path(p).name for p in kept_paths}
    assert set(stored) == {key(p) for p in kept_paths}
    for path in kept_paths:
        assert stored_sha256(stored[key(path)]) == sha256(path)
    last = torch.load(callback.last_model_path, map_location="cpu", weights_only=False)
    assert last["global_step"] == len(UP_AND_DOWN)

    values = {k: single(artifact_features(ln, a)) for k, a in stored.items()}
    assert [k for k, v in values.items() if v["is_best_model"] is True] == [
        key(callback.best_model_path)
    ]
    assert [k for k, v in values.items() if v["is_last_model"] is True] == [f"{prefix}/last.ckpt"]
    ranked = sorted(callback.best_k_models.items(), key=lambda item: float(item[1]), reverse=True)
    for rank, (path, score) in enumerate(ranked):
        assert values[key(path)]["model_rank"] == rank
        assert values[key(path)]["score"] == pytest.approx(float(score))

    # Evicted checkpoints are gone from the instance; their removal followed their save.
    delivered = [
        (type(e).__name__, e.key, getattr(e.artifact, "uid", None)) for e in observer.events
    ]
    assert len(delivered) == len(set(delivered)), delivered  # each event exactly once
    events = [(kind, k) for kind, k, _ in delivered]
    removed = [e.key for e in observer.of_type(ArtifactRemovedEvent)]
    assert removed, "the sequence should evict checkpoints"
    for evicted in removed:
        assert evicted not in stored
        assert not ln.Artifact.filter(key=evicted).exists()
        if ("ArtifactSavedEvent", evicted) in events:
            assert events.index(("ArtifactSavedEvent", evicted)) < events.index(
                ("ArtifactRemovedEvent", evicted)
            )
