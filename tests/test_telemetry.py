"""``log_stats=True``: persistence stats reach the trainer's loggers at each checkpoint.

Store-backed (``MemoryCheckpoint``), real ``Trainer.fit`` runs. The store hangs
while each checkpoint is logged, so the logged values are exact (nothing can
finish meanwhile) and a logging call that waited on storage would deadlock; a
watchdog releases the store after a timeout and fails the test instead.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger

from helpers import TinyModel, loader, make_trainer, wait_until
from lamin_lightning import PersistenceStats, RetryPolicy
from lamin_lightning._telemetry import LOGGED_FIELDS, METRIC_PREFIX, stats_metrics
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
]

TIMEOUT = 30.0
HOLD = 0.5
OURS = [f"{METRIC_PREFIX}{name}" for name in LOGGED_FIELDS]


class MemoryLogger(Logger):
    """Records every ``log_metrics`` call with its step, thread and what ``on_call`` returns."""

    def __init__(self, on_call: Any = None) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.on_call = on_call

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        del params, args, kwargs

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.calls.append(
            {
                "metrics": dict(metrics),
                "step": step,
                "thread": threading.current_thread(),
                "seen": self.on_call() if self.on_call is not None else None,
            }
        )

    def ours(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if any(k.startswith(METRIC_PREFIX) for k in c["metrics"])]


class AtBatchStart(pl.Callback):
    """Runs ``fn(batch_idx)`` before each training batch, and ``at_end()`` at train end."""

    def __init__(self, fn: Any = None, at_end: Any = None) -> None:
        self.fn = fn
        self.at_end = at_end

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.fn is not None:
            self.fn(args[-1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end is not None:
            self.at_end()


@contextmanager
def watchdog(store: MemoryStore) -> Iterator[threading.Event]:
    """Release ``store`` after TIMEOUT seconds and set the event: a deadlock fails, not hangs."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        store.release()

    timer = threading.Timer(TIMEOUT, fire)
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_stats_reach_a_csv_logger_at_each_checkpoint_while_storage_hangs(tmp_path: Path) -> None:
    """metrics.csv gets one row of our 5 metrics per checkpoint, at its global step, exact."""
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
        tmp_path,
        [callback, AtBatchStart(at_end=store.release)],
        logger=logger,
        max_steps=4,
    )
    with watchdog(store) as fired:
        trainer.fit(TinyModel(), loader(4))
    assert not fired.is_set(), "training waited on the hanging store"
    assert callback.persistence_stats.saved >= 4

    # The checkpoints' rows; one more follows at teardown (tests/test_telemetry_teardown.py).
    rows = [r for r in read_csv_metrics(logger) if r.get(OURS[0])][:4]
    assert set(OURS) <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # Jobs admitted before the first checkpoint: the hparams.yaml save, if the logger wrote one.
    before = len(store.keys(kind="hparams"))
    assert [float(r[f"{METRIC_PREFIX}pending"]) for r in rows] == [before + n for n in (1, 2, 3, 4)]
    for name in ("persistence_latency_seconds", "retried", "failed"):
        assert [float(r[f"{METRIC_PREFIX}{name}"]) for r in rows] == [0.0] * 4, name
    # No admission waited (max_pending=8): the stall is only the admission's own cost.
    assert callback.persistence_stats.admission_waits == 0
    stall = [float(r[f"{METRIC_PREFIX}training_stall_seconds"]) for r in rows]
    assert stall == sorted(stall) and stall[-1] < HOLD


def test_logged_values_follow_retries_failures_and_latency_on_the_training_thread(
    tmp_path: Path,
) -> None:
    """Each logged row equals the stats at that checkpoint: retries, a failure, latency grow."""
    store = MemoryStore()
    store.fail_next(1)  # the first checkpoint's upload is retried once
    holder: dict[str, MemoryCheckpoint] = {}
    logger = MemoryLogger(on_call=lambda: holder["cb"].persistence_stats)
    callback = holder["cb"] = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=8,
        retry=RetryPolicy.no_delay(attempts=3),
        on_error="warn",
        log_stats=True,
    )

    def before_batch(batch_idx: int) -> None:
        # Let the previous checkpoint finish, then hang the store: at the next log, that
        # checkpoint's job is the only one pending and nothing can change the counters.
        store.release()
        assert callback.flush(TIMEOUT)
        if batch_idx == 2:
            store.fail_always()  # the third checkpoint fails for good
        elif batch_idx == 3:
            store.heal()
        store.hang()

    trainer = make_trainer(
        tmp_path,
        [callback, AtBatchStart(before_batch, at_end=store.release)],
        logger=logger,
        max_steps=4,
    )
    with (
        watchdog(store) as fired,
        pytest.warns(UserWarning, match="could not be persisted"),
    ):
        trainer.fit(TinyModel(), loader(4))
    assert not fired.is_set(), "training waited on the hanging store"

    calls = logger.ours()[:4]  # the checkpoints' rows, not the one at teardown
    assert [c["step"] for c in calls] == [1, 2, 3, 4]
    assert all(c["thread"] is threading.main_thread() for c in calls)
    for call in calls:
        assert set(call["metrics"]) == set(OURS)
        assert call["metrics"] == stats_metrics(call["seen"])
    values = [{k.removeprefix(METRIC_PREFIX): v for k, v in c["metrics"].items()} for c in calls]
    assert [v["pending"] for v in values] == [1.0, 1.0, 1.0, 1.0]
    assert [v["retried"] for v in values] == [0.0, 1.0, 1.0, 1.0]
    assert [v["failed"] for v in values] == [0.0, 0.0, 0.0, 1.0]
    stall = [v["training_stall_seconds"] for v in values]
    assert stall == sorted(stall) and stall[-1] < HOLD  # no admission waited
    latency = [v["persistence_latency_seconds"] for v in values]
    assert latency[0] == 0.0
    assert latency[1] > 0.0
    assert latency == sorted(latency)


def test_a_full_queue_shows_as_training_stall_at_the_next_checkpoint(tmp_path: Path) -> None:
    """max_pending=1 and a hanging store: the second checkpoint logs its wait for admission."""
    store = MemoryStore()
    store.hang()
    holder: dict[str, MemoryCheckpoint] = {}
    logger = MemoryLogger(on_call=lambda: holder["cb"].persistence_stats)
    callback = holder["cb"] = MemoryCheckpoint(
        store,
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=1,
        max_pending=1,
        log_stats=True,
    )
    hold = threading.Event()

    def release_after_a_blocked_admission() -> None:
        # admission_waits is counted before the submitter blocks: the training thread is
        # now stalled. Keep it stalled for HOLD seconds (the quantity measured), then go.
        if wait_until(lambda: callback.persistence_stats.admission_waits >= 1, TIMEOUT):
            hold.wait(HOLD)
        store.release()

    releaser = threading.Thread(target=release_after_a_blocked_admission)
    releaser.start()
    try:
        with watchdog(store) as fired:
            make_trainer(tmp_path, [callback], logger=logger, max_steps=2).fit(
                TinyModel(), loader(2)
            )
    finally:
        store.release()
        releaser.join(TIMEOUT)
    assert not fired.is_set()

    calls = logger.ours()[:2]  # the checkpoints' rows, not the one at teardown
    assert [c["step"] for c in calls] == [1, 2]
    stall = [c["metrics"][f"{METRIC_PREFIX}training_stall_seconds"] for c in calls]
    assert stall[0] < HOLD <= stall[1]
    assert stall[1] == pytest.approx(callback.persistence_stats.training_stall_seconds)
    assert calls[1]["seen"].admission_waits == 1


def test_log_stats_false_logs_nothing_of_ours(tmp_path: Path) -> None:
    """With the default log_stats=False no lamin_lightning/ metric reaches any logger."""
    memory = MemoryLogger()
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    callback = MemoryCheckpoint(
        MemoryStore(), dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1
    )
    assert callback.log_stats is False
    trainer = make_trainer(
        tmp_path, [callback], logger=[csv_logger, memory], max_steps=3, log_every_n_steps=1
    )
    trainer.fit(TinyModel(scores=[1.0, 2.0, 3.0]), loader(3))

    assert callback.persistence_stats.saved == 3
    assert memory.calls, "the logger got nothing at all: the check below would prove nothing"
    assert memory.ours() == []
    rows = read_csv_metrics(csv_logger)
    assert rows and "score" in rows[0]
    assert not [k for k in rows[0] if k.startswith(METRIC_PREFIX)]


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_log_stats_must_be_a_bool(value: Any) -> None:
    """A non-bool log_stats raises ValueError naming the parameter."""
    with pytest.raises(ValueError, match="log_stats must be True or False"):
        MemoryCheckpoint(MemoryStore(), log_stats=value)


def test_stats_metrics_names_are_the_stats_fields() -> None:
    """Every logged name is lamin_lightning/<a PersistenceStats field>, value as float."""
    stats = PersistenceStats(
        pending=3,
        retried=2,
        failed=1,
        saved=3,
        training_stall_seconds=0.25,
        persistence_latency_seconds=2.0,
        last_persistence_latency_seconds=0.25,
    )
    metrics = stats_metrics(stats)
    assert metrics == {
        "lamin_lightning/pending": 3.0,
        "lamin_lightning/training_stall_seconds": 0.25,
        "lamin_lightning/persistence_latency_seconds": 2.0,
        "lamin_lightning/last_persistence_latency_seconds": 0.25,
        "lamin_lightning/mean_persistence_latency_seconds": 0.5,  # 2.0 s over 4 delivered
        "lamin_lightning/retried": 2.0,
        "lamin_lightning/failed": 1.0,
    }
    assert set(LOGGED_FIELDS) <= set(stats.as_dict())
