"""Scenario 5: backpressure. Storage slower than checkpoint production, few slots.

``lamin_lightning.testing.MemoryCheckpoint`` persists into a ``MemoryStore`` whose every
put takes ``--latency`` seconds (0.2), with ``max_workers=1`` and ``max_pending=2``,
while training writes a small checkpoint (Linear(256, 256), ~0.26 MB) at every step,
far faster than storage drains them. From the third checkpoint on, each must wait for a
free slot: that wait is the only thing training should wait for.

Measured per checkpoint, side by side:

- the stall seen from outside: time inside ``_save_checkpoint`` minus Lightning's own
  local save (the same definition as scenario 1);
- the slot wait the pipeline reports: the growth of
  ``persistence_stats.training_stall_seconds`` across that call.

Target: the two totals agree within 5% (the reported figure is the stall training
sees); the difference per checkpoint is the callback's own overhead.

Usage::

    .venv/bin/python benchmarks/bench_backpressure.py           # 20 checkpoints
    .venv/bin/python benchmarks/bench_backpressure.py --quick   # 10 checkpoints
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Recorder, Row, instrument, print_rows, quiet, smoke, spans_as_json, write_result

TOLERANCE = 0.05
WIDTH = 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 checkpoints")
    parser.add_argument("--checkpoints", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per storage put")
    parser.add_argument("--max-pending", type=int, default=2)
    args = parser.parse_args(argv)
    count = args.checkpoints or (10 if args.quick else 20)

    os.environ["TQDM_DISABLE"] = "1"
    quiet()
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lamin_lightning import RetryPolicy
    from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

    quiet()
    torch.set_num_threads(1)

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(WIDTH, WIDTH)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    recorder = Recorder()

    class Measured(instrument(MemoryCheckpoint, recorder)):  # type: ignore[misc]
        slot_waits: list[float]

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            if not hasattr(self, "slot_waits"):
                self.slot_waits = []
            before = self.persistence_stats.training_stall_seconds
            super()._save_checkpoint(trainer, filepath)
            self.slot_waits.append(self.persistence_stats.training_stall_seconds - before)

    root = Path(tempfile.mkdtemp(prefix="lamin-bench-backpressure-"))
    try:
        store = MemoryStore(latency=args.latency)
        callback = Measured(
            store,
            dirpath=str(root / "ckpt"),
            save_top_k=-1,
            every_n_train_steps=1,
            max_workers=1,
            max_pending=args.max_pending,
            retry=RetryPolicy.no_delay(),
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=count,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
            default_root_dir=str(root),
        )
        data = DataLoader(TensorDataset(torch.randn(count, WIDTH)), batch_size=1)
        started = time.perf_counter()
        trainer.fit(Model(), data)
        fit = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)

    stats = callback.persistence_stats
    if stats.saved != count:
        raise RuntimeError(f"saved {stats.saved} of {count}")
    measured = sum(callback.stalls)
    reported = stats.training_stall_seconds
    ratio = reported / measured if measured else float("nan")
    overheads = [s - w for s, w in zip(callback.stalls, callback.slot_waits, strict=True)]
    waited = sum(1 for w in callback.slot_waits if w > 0.001)
    print(
        f"{count} checkpoints of {WIDTH * (WIDTH + 1) * 4 / 1e6:.2f} MB, storage {args.latency}s"
        f" per put, max_workers=1, max_pending={args.max_pending}; fit {fit:.2f}s"
    )
    print(f"{'ckpt':>4} {'stall (outside)':>16} {'slot wait (stats)':>18} {'difference':>11}")
    for i, (stall, wait) in enumerate(zip(callback.stalls, callback.slot_waits, strict=True)):
        difference = (stall - wait) * 1e3
        print(f"{i + 1:>4} {stall * 1e3:>14.1f}ms {wait * 1e3:>16.1f}ms {difference:>9.2f}ms")
    print(
        f"total: measured stall {measured:.3f}s, persistence_stats.training_stall_seconds"
        f" {reported:.3f}s, ratio {ratio:.3f}; {stats.admission_waits} admission waits"
        f" ({waited} checkpoints waited > 1 ms); max {max(callback.stalls) * 1e3:.1f} ms"
        f" measured vs {stats.max_training_stall_seconds * 1e3:.1f} ms reported;"
        f" callback overhead per checkpoint median {statistics.median(overheads) * 1e3:.2f} ms,"
        f" max {max(overheads) * 1e3:.2f} ms"
    )
    rows = [
        Row(
            "5 backpressure: reported / measured stall",
            f"1 +/- {TOLERANCE:.2f}",
            f"{ratio:.3f} ({reported:.2f}s / {measured:.2f}s, {stats.admission_waits} waits)",
            abs(ratio - 1) <= TOLERANCE,
        )
    ]
    rows = smoke(rows, args.quick)
    print()
    print_rows(rows)
    path = write_result(
        "backpressure",
        {
            "config": {
                "checkpoints": count,
                "latency_s": args.latency,
                "max_workers": 1,
                "max_pending": args.max_pending,
                "model": f"Linear({WIDTH}, {WIDTH})",
            },
            "fit_s": fit,
            "measured_stall_s": measured,
            "reported_stall_s": reported,
            "ratio": ratio,
            "admission_waits": stats.admission_waits,
            "max_measured_stall_s": max(callback.stalls),
            "max_reported_stall_s": stats.max_training_stall_seconds,
            "per_checkpoint": [
                {"stall_s": s, "slot_wait_s": w}
                for s, w in zip(callback.stalls, callback.slot_waits, strict=True)
            ],
            "spans": spans_as_json(recorder.spans, started),
        },
        rows,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
