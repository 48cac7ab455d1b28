"""Scenario 3: database queries per commit with 10, 100 and 300 checkpoints stored.

A real local LaminDB instance (SQLite). A tiny model logs a monitored metric (``score``,
seeded random values, so a new checkpoint lands anywhere in the ranking and every
commit re-ranks a share of the stored ones) and keeps every checkpoint
(``save_top_k=-1``, one checkpoint per step).

Commits run on the pipeline's committer thread, so the count is taken there: a subclass
wraps ``commit_checkpoint_artifact`` in ``CaptureQueriesContext(connection)`` (in that
thread, ``django.db.connection`` is the committer's own connection). The transfers'
queries (``save_checkpoint_artifact``, worker threads) are counted the same way. The
number at "n stored" is the median over the commits that left n-4 .. n checkpoints
stored.

For comparison, the same count for the reference's synchronous ``Checkpoint``: every
query it makes inside ``_save_checkpoint`` (all on the training thread), up to 30
checkpoints: its re-ranking touches every stored checkpoint (about 10 queries each), so
its total grows with the square of their number; 100 would take minutes here.

Target: ours flat, within +2 queries from 10 to 300 stored.

Usage::

    .venv/bin/python benchmarks/bench_queries.py           # 10, 100, 300 (reference to 30)
    .venv/bin/python benchmarks/bench_queries.py --quick   # 10, 30 (reference to 20)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS,
    Row,
    block_network,
    isolate_lamin,
    print_rows,
    quiet,
    smoke,
    write_result,
)

TARGET_GROWTH = 2
WINDOW = 5


def _count_queries(fn: Any, sink: list[int], last: list[str] | None = None) -> Any:
    """Run ``fn`` and append the number of queries this thread's connection made; keep the
    SQL of the latest call in ``last``."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    context = CaptureQueriesContext(connection)
    context.__enter__()
    try:
        return fn()
    finally:
        context.__exit__(None, None, None)
        sink.append(len(context.captured_queries))
        if last is not None:
            last[:] = [q["sql"] for q in context.captured_queries]


def _shape(sql: str) -> str:
    """A query's statement and table, for grouping (``SELECT "lamindb_artifact"``...)."""
    words = sql.split()
    verb = words[0].upper() if words else "?"
    table = next((w.strip('"') for w in words if w.startswith('"') and "." not in w), "")
    for marker in (" FROM ", " INTO ", "UPDATE "):
        if marker in sql:
            rest = sql.split(marker, 1)[1].split()
            if rest:
                table = rest[0].strip('"')
            break
    return f"{verb} {table}"


def _model(pl: Any, torch: Any, scores: list[float]) -> Any:
    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            (x,) = batch
            self.log("score", scores[self.global_step % len(scores)], on_step=True)
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Model()


def _fit(pl: Any, torch: Any, callback: Any, steps: int, scores: list[float], root: Path) -> float:
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=str(root),
        log_every_n_steps=1,
    )
    data = DataLoader(TensorDataset(torch.randn(steps, 4)), batch_size=1)
    started = time.perf_counter()
    trainer.fit(_model(pl, torch, scores), data)
    return time.perf_counter() - started


def _at(series: list[int], stored: int) -> float:
    """Median of the counts of the commits that left ``stored - WINDOW + 1 .. stored`` stored."""
    window = series[max(0, stored - WINDOW) : stored]
    return float(statistics.median(window))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 and 30 stored")
    parser.add_argument("--stored", type=int, nargs="+", default=None)
    parser.add_argument(
        "--reference-up-to",
        type=int,
        default=None,
        help="checkpoints for the reference run (default 30; 20 with --quick; 0 skips it)",
    )
    args = parser.parse_args(argv)
    points = sorted(args.stored or ([10, 30] if args.quick else [10, 100, 300]))
    reference_steps = (
        args.reference_up_to if args.reference_up_to is not None else (20 if args.quick else 30)
    )
    steps = points[-1]
    rng = random.Random(0)
    scores = [round(rng.uniform(0.1, 1.0), 6) for _ in range(steps)]

    os.environ["TQDM_DISABLE"] = "1"
    root = Path(tempfile.mkdtemp(prefix="lamin-bench-queries-"))
    isolate_lamin(root / "lamin")
    block_network()
    quiet()
    ours_commit: list[int] = []
    last_commit_sql: list[str] = []
    ours_transfer: list[int] = []
    reference: list[int] = []
    try:
        import lightning.pytorch as pl
        import torch

        import lamin_lightning as ll
        from lamin_lightning.testing import local_instance

        quiet()
        torch.set_num_threads(1)
        with local_instance(root / "instance"):
            from lamindb.integrations import lightning as reference_ll

            import lamindb as ln

            ln.settings.verbosity = "error"
            ll.save_lightning_features()

            class CountingOurs(ll.Checkpoint):  # type: ignore[misc]
                def save_checkpoint_artifact(self, *a: Any, **k: Any) -> Any:
                    parent = super().save_checkpoint_artifact
                    return _count_queries(lambda: parent(*a, **k), ours_transfer)

                def commit_checkpoint_artifact(self, *a: Any, **k: Any) -> None:
                    parent = super().commit_checkpoint_artifact
                    _count_queries(lambda: parent(*a, **k), ours_commit, last_commit_sql)

            class CountingReference(reference_ll.Checkpoint):  # type: ignore[misc]
                def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
                    parent = super()._save_checkpoint
                    _count_queries(lambda: parent(trainer, filepath), reference)

            common = {"monitor": "score", "mode": "min", "save_top_k": -1, "every_n_train_steps": 1}
            ours_fit = _fit(
                pl, torch, CountingOurs(dirpath=str(root / "ours"), **common), steps, scores, root
            )
            print(f"  ours: {steps} checkpoints in {ours_fit:.1f}s", flush=True)
            reference_fit = 0.0
            if reference_steps:
                reference_fit = _fit(
                    pl,
                    torch,
                    CountingReference(dirpath=str(root / "reference"), **common),
                    reference_steps,
                    scores,
                    root,
                )
                print(
                    f"  reference: {reference_steps} checkpoints in {reference_fit:.1f}s",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if len(ours_commit) != steps:
        # A retried commit is counted once per attempt: say so rather than misalign.
        print(f"note: {len(ours_commit)} commit attempts for {steps} checkpoints (retries)")
    at = {n: _at(ours_commit, n) for n in points}
    transfer_at = {n: _at(ours_transfer, n) for n in points}
    reference_points = sorted({n for n in points if n <= len(reference)} | {len(reference)} - {0})
    reference_at = {n: _at(reference, n) for n in reference_points}
    growth = max(at.values()) - at[points[0]]
    print()
    print("database queries per checkpoint (median of the 5 commits up to n stored)")
    header = f"{'stored':>7} {'ours commit':>12} {'ours transfer':>14} {'reference (sync)':>17}"
    print(header)
    for n in sorted(set(points) | set(reference_at)):
        ref = f"{reference_at[n]:.0f}" if n in reference_at else "-"
        mine = f"{at[n]:.0f}" if n in at else "-"
        moved = f"{transfer_at[n]:.0f}" if n in transfer_at else "-"
        print(f"{n:>7} {mine:>12} {moved:>14} {ref:>17}")
    shapes: dict[str, int] = {}
    for sql in last_commit_sql:
        shapes[_shape(sql)] = shapes.get(_shape(sql), 0) + 1
    print(
        f"the last commit ({steps} stored), {len(last_commit_sql)} queries: "
        + ", ".join(f"{n} x {shape}" for shape, n in sorted(shapes.items(), key=lambda i: -i[1]))
    )
    rows = [
        Row(
            f"3 queries per commit, {points[0]} -> {points[-1]} stored",
            f"flat, <= +{TARGET_GROWTH}",
            f"+{growth:.0f} ("
            + " / ".join(f"{at[n]:.0f}" for n in points)
            + f" at {'/'.join(str(n) for n in points)})",
            growth <= TARGET_GROWTH,
        )
    ]
    if len(reference_at) >= 2:
        first, last = min(reference_at), max(reference_at)
        rows.append(
            Row(
                "3 reference queries per checkpoint",
                "(info)",
                f"{reference_at[first]:.0f} at {first} -> {reference_at[last]:.0f} at {last}",
                None,
            )
        )
    rows = smoke(rows, args.quick)
    print()
    print_rows(rows)
    png = _plot(ours_commit, ours_transfer, reference)
    path = write_result(
        "queries",
        {
            "config": {
                "stored": points,
                "reference_checkpoints": reference_steps,
                "save_top_k": -1,
                "monitor": "score (seeded uniform random)",
                "window": WINDOW,
            },
            "ours_commit_at": at,
            "last_commit_queries": last_commit_sql,
            "ours_transfer_at": transfer_at,
            "reference_at": reference_at,
            "ours_fit_s": ours_fit,
            "reference_fit_s": reference_fit,
            "series": {
                "ours_commit": ours_commit,
                "ours_transfer": ours_transfer,
                "reference": reference,
            },
            "plot": str(png.relative_to(RESULTS.parent)) if png else None,
        },
        rows,
    )
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


def _plot(commit: list[int], transfer: list[int], reference: list[int]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=120)
    ax.plot(range(1, len(reference) + 1), reference, label="lamindb (sync): whole save", lw=1.2)
    ax.plot(range(1, len(commit) + 1), commit, label="lamin-lightning: commit", lw=1.2)
    ax.plot(range(1, len(transfer) + 1), transfer, label="lamin-lightning: transfer", lw=1.0)
    ax.set_xlabel("checkpoints stored")
    ax.set_ylabel("database queries")
    ax.set_title("Database queries per checkpoint (save_top_k=-1, monitored metric)")
    ax.legend(loc="upper left", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "queries.png"
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
