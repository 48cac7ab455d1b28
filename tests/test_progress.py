"""Guarantee 10: a flush that takes longer than a second shows a progress bar (files, bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from helpers import TinyModel, loader, make_trainer
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore


class _FlushAtTrainEnd(pl.Callback):
    """Flushes the checkpoint callback before teardown, with a timeout, and records the result."""

    def __init__(self, callback: MemoryCheckpoint, timeout: float) -> None:
        self.callback, self.timeout = callback, timeout
        self.result: bool | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.result = self.callback.flush(self.timeout)


def _fit(tmp_path: Path, store: MemoryStore, timeout: float) -> tuple[_FlushAtTrainEnd, Any]:
    callback = MemoryCheckpoint(
        store, dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, flush_timeout=0.1
    )
    probe = _FlushAtTrainEnd(callback, timeout)
    return probe, make_trainer(tmp_path, [probe, callback], max_steps=2)


def test_a_slow_flush_shows_files_and_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = MemoryStore()
    store.hang()
    probe, trainer = _fit(tmp_path, store, timeout=1.5)
    try:
        with pytest.warns(UserWarning, match="flush_timeout"):
            trainer.fit(TinyModel(), loader())
    finally:
        store.release()
    assert probe.result is False
    err = capsys.readouterr().err
    assert "lamin-lightning: persisting checkpoints" in err
    assert "0/2 files" in err
    assert "B/s" in err or "kB" in err or "B " in err  # a byte-scaled bar


def test_a_quick_flush_shows_no_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe, trainer = _fit(tmp_path, MemoryStore(), timeout=30)
    trainer.fit(TinyModel(), loader())
    assert probe.result is True
    assert "persisting checkpoints" not in capsys.readouterr().err


def test_files_that_fail_during_the_wait_are_shown_as_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bar counts jobs that left the pipeline; those that failed say so ("2 failed"),
    instead of reading as persisted files."""
    import threading

    from lamin_lightning import _progress

    shown = threading.Event()
    real_bar = _progress.progress_bar

    def bar(*args: Any, **kwargs: Any) -> Any:
        made = real_bar(*args, **kwargs)
        shown.set()
        return made

    monkeypatch.setattr(_progress, "progress_bar", bar)
    store = MemoryStore()
    store.hang()
    store.fail_always()

    def release_once_the_bar_shows() -> None:
        shown.wait(60)
        store.release()  # the failures come while the bar is up (or the test fails)

    threading.Thread(target=release_once_the_bar_shows, daemon=True).start()
    probe, trainer = _fit(tmp_path, store, timeout=60)
    from lamin_lightning import PersistenceError

    with pytest.raises(PersistenceError, match="could not be persisted"):
        trainer.fit(TinyModel(), loader())
    assert shown.is_set() and probe.result is True
    assert "2/2 files, 2 failed" in capsys.readouterr().err
