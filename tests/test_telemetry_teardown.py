"""Telemetry a user reads after a fit: the final row at teardown, and per-job latency.

``log_stats=True`` logs a row at each checkpoint, when the checkpoint just admitted is
still pending; the row logged at teardown, after the flush, shows what the run ended
with. Besides the cumulative latency, each row carries the latency of the job delivered
last and the mean over delivered jobs.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger

from helpers import TinyModel, loader, make_trainer
from lamin_lightning import PersistenceStats
from lamin_lightning._stats import StatsRecorder
from lamin_lightning._telemetry import (
    METRIC_PREFIX,
    log_final_persistence_stats,
    stats_metrics,
)
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
]

TIMEOUT = 30.0
STORE_LATENCY = 0.05
PENDING = f"{METRIC_PREFIX}pending"


class RecordingLogger(Logger):
    """Keeps each ``log_metrics`` call (metrics, step) and the callback's stats at that time."""

    def __init__(self, stats: Any = None) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None, PersistenceStats | None]] = []
        self.stats = stats

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        del params, args, kwargs

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        seen = self.stats() if self.stats is not None else None
        self.calls.append((dict(metrics), step, seen))


class ReleaseAtTrainEnd(pl.Callback):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.store.release()


def _fake_trainer(logger: RecordingLogger, *, rank_zero: bool = True) -> Any:
    return SimpleNamespace(loggers=[logger], global_step=7, is_global_zero=rank_zero)


# -- the stats ------------------------------------------------------------------------------


def test_last_latency_is_the_latest_jobs_and_mean_divides_by_delivered_jobs() -> None:
    """Each delivered job's latency becomes `last`; the sum stays cumulative; mean = sum / n."""
    recorder = StatsRecorder()
    assert recorder.snapshot().last_persistence_latency_seconds == 0.0
    recorder.add(saved=1, persistence_latency_seconds=3.0)
    recorder.add(removed=1, persistence_latency_seconds=1.0)
    recorder.add(in_flight=1)  # no latency in this update: `last` stays
    stats = recorder.snapshot()
    assert stats.last_persistence_latency_seconds == 1.0
    assert stats.persistence_latency_seconds == 4.0
    assert stats.mean_persistence_latency_seconds == 2.0
    values = stats.as_dict()
    assert values["last_persistence_latency_seconds"] == 1.0
    assert values["mean_persistence_latency_seconds"] == 2.0
    assert values["finished"] == 2.0


# -- the final row ----------------------------------------------------------------------------


def test_final_stats_are_logged_for_fit_on_rank_zero_once_something_was_submitted() -> None:
    """log_final_persistence_stats logs the stats at global_step; never for other stages,
    other ranks, or a callback that submitted nothing."""
    stats = PersistenceStats(submitted=3, saved=3, persistence_latency_seconds=1.5)
    logger = RecordingLogger()
    assert log_final_persistence_stats(_fake_trainer(logger), stats, "fit") == stats_metrics(stats)
    assert logger.calls == [(stats_metrics(stats), 7, None)]

    for stage in ("validate", "test", "predict"):
        assert log_final_persistence_stats(_fake_trainer(logger), stats, stage) is None
    assert log_final_persistence_stats(_fake_trainer(logger, rank_zero=False), stats, "fit") is None
    assert log_final_persistence_stats(_fake_trainer(logger), PersistenceStats(), "fit") is None
    assert len(logger.calls) == 1


def test_the_last_csv_row_shows_the_flushed_state_not_the_last_checkpoints(
    tmp_path: Path,
) -> None:
    """Storage hangs during training: checkpoint rows show pending > 0; the teardown row,
    after the flush, shows pending 0 and every job's latency, at the last global step."""
    store = MemoryStore()
    store.hang()
    callback = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=8,
        log_stats=True,
    )
    logger = CSVLogger(tmp_path / "logs", name="csv")
    trainer = make_trainer(
        tmp_path, [callback, ReleaseAtTrainEnd(store)], logger=logger, max_steps=4
    )
    timer = threading.Timer(TIMEOUT, store.release)  # a deadlock fails the test, not hangs it
    timer.start()
    try:
        trainer.fit(TinyModel(), loader(4))
    finally:
        timer.cancel()

    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(PENDING)]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 4], "one row per checkpoint, then one"
    assert all(float(r[PENDING]) > 0 for r in rows[:4])
    final = {k: float(v) for k, v in rows[-1].items() if k.startswith(METRIC_PREFIX)}
    stats = callback.persistence_stats
    assert (stats.pending, stats.saved, stats.failed) == (0, stats.submitted, 0)
    assert final == pytest.approx(stats_metrics(stats))
    assert final[PENDING] == 0.0
    assert final[f"{METRIC_PREFIX}last_persistence_latency_seconds"] > 0.0
    assert final[f"{METRIC_PREFIX}mean_persistence_latency_seconds"] > 0.0


# -- per-job latency at each checkpoint -------------------------------------------------------


def test_each_checkpoint_row_carries_the_previous_jobs_latency_beside_the_cumulative_sum(
    tmp_path: Path,
) -> None:
    """Every put takes STORE_LATENCY; after each flush, `last` is one job's latency (at least
    STORE_LATENCY, below the growing sum) and `mean` is the sum over delivered jobs."""
    store = MemoryStore(latency=STORE_LATENCY)
    holder: dict[str, MemoryCheckpoint] = {}
    logger = RecordingLogger(stats=lambda: holder["cb"].persistence_stats)
    callback = holder["cb"] = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=8,
        log_stats=True,
    )

    class FlushBeforeEachBatch(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            assert callback.flush(TIMEOUT)

    trainer = make_trainer(tmp_path, [callback, FlushBeforeEachBatch()], logger=logger, max_steps=4)
    trainer.fit(TinyModel(), loader(4))

    rows = [(m, step, seen) for m, step, seen in logger.calls if PENDING in m][:4]
    assert [step for _, step, _ in rows] == [1, 2, 3, 4]
    for number, (metrics, _, seen) in enumerate(rows, start=1):
        assert seen is not None and metrics == stats_metrics(seen)
        last = metrics[f"{METRIC_PREFIX}last_persistence_latency_seconds"]
        total = metrics[f"{METRIC_PREFIX}persistence_latency_seconds"]
        delivered = seen.saved + seen.removed + seen.failed
        assert delivered >= number - 1  # at least the earlier checkpoints, flushed
        if delivered == 0:
            assert last == total == 0.0
            continue
        assert last >= STORE_LATENCY
        assert metrics[f"{METRIC_PREFIX}mean_persistence_latency_seconds"] == pytest.approx(
            total / delivered
        )
        if delivered > 1:
            assert last < total  # one job's, not the sum
