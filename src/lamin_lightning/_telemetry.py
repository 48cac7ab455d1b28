"""Persistence stats as logger metrics (``log_stats=True``): a row per checkpoint, one at the end.

:func:`log_persistence_stats` is called on the training thread, right after a
checkpoint's job was admitted; :func:`log_final_persistence_stats` at the end of
``fit``, once everything is flushed, so the last row shows what the run ended with
(pending 0, every latency counted) rather than the state at the last checkpoint. Both
read the stats snapshot (a lock held for a copy) and hand numbers to the trainer's
loggers: no database, storage or pool call, so they never wait on persistence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from lamin_lightning._stats import PersistenceStats

if TYPE_CHECKING:
    import lightning.pytorch as pl

METRIC_PREFIX: Final = "lamin_lightning/"

# The PersistenceStats values sent to the loggers, in this order: cumulative counters,
# then the per-job latencies (the last delivered job's, and the mean over all delivered).
LOGGED_FIELDS: Final = (
    "pending",
    "training_stall_seconds",
    "persistence_latency_seconds",
    "last_persistence_latency_seconds",
    "mean_persistence_latency_seconds",
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


def log_final_persistence_stats(
    trainer: pl.Trainer, stats: PersistenceStats, stage: str
) -> dict[str, float] | None:
    """At teardown, after the flush: the final stats, once more, at ``trainer.global_step``.

    Logged only for ``fit`` (the stage that saves checkpoints), on global rank zero, and
    only when this callback submitted anything; otherwise nothing is logged and None is
    returned. Lightning finalizes the loggers after the callbacks' ``teardown``, so the
    row is written (a CSV logger's ``metrics.csv`` included).
    """
    if stage != "fit" or not trainer.is_global_zero or stats.submitted == 0:
        return None
    return log_persistence_stats(trainer, stats)
