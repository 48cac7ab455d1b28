"""Persistence stats as logger metrics (``log_stats=True``): one row per checkpoint.

Called on the training thread, right after a checkpoint's job was admitted. It
reads the stats snapshot (a lock held for a copy) and hands numbers to the
trainer's loggers: no database, storage or pool call, so it never waits on
persistence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from lamin_lightning._stats import PersistenceStats

if TYPE_CHECKING:
    import lightning.pytorch as pl

METRIC_PREFIX: Final = "lamin_lightning/"

# The PersistenceStats fields sent to the loggers, in this order.
LOGGED_FIELDS: Final = (
    "pending",
    "training_stall_seconds",
    "persistence_latency_seconds",
    "retried",
    "failed",
)


def stats_metrics(stats: PersistenceStats) -> dict[str, float]:
    """``{"lamin_lightning/<field>": value}`` for each of :data:`LOGGED_FIELDS`."""
    return {f"{METRIC_PREFIX}{name}": float(getattr(stats, name)) for name in LOGGED_FIELDS}


def log_persistence_stats(trainer: pl.Trainer, stats: PersistenceStats) -> dict[str, float]:
    """Send ``stats`` to every logger of ``trainer`` at ``trainer.global_step``.

    Uses ``logger.log_metrics`` directly: ``LightningModule.log`` is not allowed
    from a checkpoint callback's save. Returns the metrics logged (also when the
    trainer has no logger).
    """
    metrics = stats_metrics(stats)
    step = trainer.global_step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return metrics
