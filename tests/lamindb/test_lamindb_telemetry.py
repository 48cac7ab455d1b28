"""``log_stats: true`` in a LightningCLI YAML: Checkpoint stats land in the CSV logger."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.db import connection
from django.test.utils import CaptureQueriesContext
from lamindb_tier import TierData, TierModel
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

import lamin_lightning as ll
from lamin_lightning._telemetry import LOGGED_FIELDS, METRIC_PREFIX

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

STEPS = 3


class QueryCountingCSVLogger(CSVLogger):
    """A CSVLogger that counts the database queries made on the calling thread while it
    logs the callback's stats (the ``lamin_lightning/`` metrics), once per such call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queries_while_logging_stats: list[int] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not any(name.startswith(METRIC_PREFIX) for name in metrics):
            super().log_metrics(metrics, step)
            return
        with CaptureQueriesContext(connection) as captured:
            super().log_metrics(metrics, step)
        self.queries_while_logging_stats.append(len(captured.captured_queries))


def test_cli_yaml_log_stats_sends_checkpoint_stats_to_the_csv_logger(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint adds a metrics.csv row of our metrics, with no database query on the
    training thread while logging them."""
    monkeypatch.setattr(sys, "argv", ["lamin-lightning-tier"])  # not pytest's arguments
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": f"{__name__}.QueryCountingCSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "telemetry"},
            },
            "callbacks": [
                {
                    "class_path": "lamin_lightning.Checkpoint",
                    "init_args": {
                        "dirpath": str(tmp_path / "ckpts"),
                        "monitor": "score",
                        "save_top_k": -1,
                        "every_n_train_steps": 1,
                        "log_stats": True,
                    },
                }
            ],
        },
        "model": {"scores": [3.0, 2.0, 1.0]},
        "data": {"n": STEPS},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(TierModel, TierData, args=["fit", "--config", str(path)])

    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ll.Checkpoint)]
    assert callback.log_stats is True
    stats = callback.persistence_stats
    assert (stats.saved, stats.failed) == (STEPS + 1, 0)  # the checkpoints and hparams.yaml
    logger = cli.trainer.logger
    assert isinstance(logger, QueryCountingCSVLogger)
    # Each checkpoint's row, then the final one at teardown: no query for any of them.
    assert logger.queries_while_logging_stats == [0] * (STEPS + 1)

    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    ours = [r for r in rows if r.get(f"{METRIC_PREFIX}pending")]
    # One row per checkpoint, then the final values at teardown, at the last step.
    assert [int(r["step"]) for r in ours] == [*range(1, STEPS + 1), STEPS]
    final = {name: float(ours[-1][f"{METRIC_PREFIX}{name}"]) for name in LOGGED_FIELDS}
    assert final == pytest.approx({name: float(getattr(stats, name)) for name in LOGGED_FIELDS})
    assert final["pending"] == 0.0
    ours = ours[:-1]
    assert any(r.get("score") for r in rows)  # the model's own metrics are there too
    for name in LOGGED_FIELDS:
        values = [float(r[f"{METRIC_PREFIX}{name}"]) for r in ours]
        if name == "pending":
            # At least the checkpoint just admitted; never more than were submitted.
            assert all(1 <= v <= n + 1 for n, v in enumerate(values, start=1)), values
        elif name in ("last_persistence_latency_seconds", "mean_persistence_latency_seconds"):
            # One job's latency, and the mean: not cumulative, at most the longest one.
            longest = stats.max_persistence_latency_seconds
            assert all(0.0 <= v <= longest for v in values), (name, values)
        else:
            # Cumulative counters: non-decreasing, bounded by the final stats.
            assert values == sorted(values), (name, values)
            assert values[-1] <= getattr(stats, name), name
    assert {float(r[f"{METRIC_PREFIX}failed"]) for r in ours} == {0.0}
