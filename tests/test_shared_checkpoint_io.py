"""Two of our callbacks sharing the trainer's (wrapped) CheckpointIO after a crash: the
wrapping goes back only once the last of them has handled the exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from helpers import TinyModel, loader, make_trainer
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*AsyncCheckpointIO.*"),
    pytest.mark.filterwarnings("ignore:.*experimental.*"),
]


def test_two_callbacks_crash_with_async_checkpoint_io_the_second_emergency_save_is_persisted(
    tmp_path: Path,
) -> None:
    """Two callbacks (their own folders) share the strategy's CheckpointIO wrapper
    (compose: "a second callback of ours"). Training raises; each saves its emergency
    checkpoint in on_exception. 61037ed releases the wrapper in the first callback's
    _stop_after_exception: the second one's emergency save then goes through the
    unwrapped AsyncCheckpointIO, its write untracked."""
    stores = [MemoryStore(), MemoryStore()]
    observers = [RecordingObserver(), RecordingObserver()]
    callbacks = [
        MemoryCheckpoint(
            stores[i],
            dirpath=tmp_path / f"ckpt{i}",
            every_n_train_steps=100 + i,
            save_on_exception=True,
            artifact_observers=[observers[i]],
            on_error="warn",
        )
        for i in range(2)
    ]
    # The second callback's emergency write (on AsyncCheckpointIO's thread) ends only once
    # that callback's shutdown began: as a large checkpoint's write would still run then.
    import threading

    release = threading.Event()

    class HeldIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            if "ckpt1" in str(path):
                assert release.wait(30)
            super().save_checkpoint(checkpoint, path, storage_options)

    shutdown = callbacks[1]._shutdown

    def releasing(*args: Any, **kwargs: Any) -> Any:
        release.set()
        return shutdown(*args, **kwargs)

    callbacks[1]._shutdown = releasing  # type: ignore[method-assign]
    trainer = make_trainer(tmp_path, callbacks, max_steps=4, plugins=[AsyncCheckpointIO(HeldIO())])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyModel(fail_at_step=2), loader(4))
    for i, callback in enumerate(callbacks):
        files = sorted(p.name for p in (tmp_path / f"ckpt{i}").glob("*.ckpt"))
        assert files, f"callback {i}: no emergency checkpoint on disk"
        keys = {k.rsplit("/", 1)[-1] for k in stores[i].keys("checkpoint")}
        assert set(files) <= keys, (i, files, keys, callback.persistence_stats)
        assert callback.persistence_stats.failed == 0, (i, callback.persistence_stats)
