"""Background LaminDB writes on SQLite from several threads, and clean thread shutdown."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import artifacts_under, fit

import lamin_lightning as ll

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

WORKERS = 3


class ConcurrentCheckpoint(ll.Checkpoint):
    """The first WORKERS saves meet at a barrier, so that they write to SQLite at the same
    time; records which threads saved and what each pipeline thread's finalizer left."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.barrier = threading.Barrier(WORKERS, timeout=60)
        self.lock = threading.Lock()
        self.saves = 0
        self.save_threads: set[str] = set()
        self.opened: dict[str, bool] = {}
        self.finalized: dict[str, bool] = {}
        self.modes: dict[str, tuple[str, str | None]] = {}

    def save_checkpoint_artifact(self, trainer: pl.Trainer, filepath: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.saves += 1
            first = self.saves <= WORKERS
            self.save_threads.add(threading.current_thread().name)
        if first:
            self.barrier.wait()
        artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
        from django.db import connection

        with self.lock:
            self.opened[threading.current_thread().name] = connection.connection is not None
            self.modes[threading.current_thread().name] = (
                connection.vendor,
                getattr(connection, "transaction_mode", None),
            )
        return artifact

    def thread_finalizer(self) -> None:
        from django.db import connection

        super().thread_finalizer()
        with self.lock:
            # After close(), the thread's connection holds no DB-API connection.
            self.finalized[threading.current_thread().name] = connection.connection is None


def test_concurrent_background_saves_on_sqlite_and_threads_end_with_closed_connections(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """Three workers write SQLite at once and succeed; threads end with connections closed."""
    callback = ConcurrentCheckpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        max_workers=WORKERS,
        max_pending=WORKERS + 1,
    )
    fit(callback, tmp_path, steps=6)

    stats = callback.persistence_stats
    assert (stats.saved, stats.failed) == (6, 0)
    stored = artifacts_under(ln, callback.checkpoint_key_prefix)
    assert set(stored) == {
        f"{callback.checkpoint_key_prefix}/epoch=0-step={n}.ckpt" for n in range(1, 7)
    }
    assert len(callback.save_threads) == WORKERS
    assert all(name.startswith("lamin-lightning-worker-") for name in callback.save_threads)

    assert [t.name for t in threading.enumerate() if t.name.startswith("lamin-lightning-")] == []
    # Every thread that ran database work (its connection was open) closed it on the way out.
    assert set(callback.opened) == callback.save_threads and all(callback.opened.values())
    assert callback.save_threads <= set(callback.finalized)
    assert "lamin-lightning-committer" in callback.finalized
    assert all(callback.finalized.values()), callback.finalized
    # On SQLite our threads' transactions begin IMMEDIATE (they queue for the write lock
    # instead of failing an upgrade with "database is locked"); the training thread's
    # connection, the user's, is left as Django configured it.
    from django.db import connection

    expected = "IMMEDIATE" if connection.vendor == "sqlite" else None
    assert {mode for _, mode in callback.modes.values()} == {expected}, callback.modes
    assert getattr(connection, "transaction_mode", None) is None
