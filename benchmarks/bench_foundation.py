"""Foundation benchmark: does asynchronous persistence keep training as fast as no persistence?

Three CPU fits of the same model, measured side by side in one process:

- ``plain``: Lightning's ``ModelCheckpoint`` (local files only, no persistence);
- ``ours``: ``lamin_lightning.testing.MemoryCheckpoint``, persisting every checkpoint
  into a ``MemoryStore`` whose every put takes ``latency`` seconds, in the background;
- ``sync``: a ``ModelCheckpoint`` that puts each checkpoint into the same kind of store
  inline, right after Lightning wrote it (what a synchronous integration does).

Each fit writes ``CHECKPOINTS`` checkpoints of a Linear(1024, 1024) model (~4 MB each,
so ``torch.save`` is measurable). The order of the variants rotates between repeats,
and medians are reported. ``fit_wall_s`` runs until ``trainer.fit`` returns, so for
``ours`` it includes the flush at teardown: the upload of the last checkpoint, which
cannot overlap training since training is over when it is written. ``train_s`` stops
at ``on_train_end`` (the training loop itself), ``tail_s`` is the difference.

Usage::

    .venv/bin/python benchmarks/bench_foundation.py           # 3 repeats, latencies 0.1 and 0.5
    .venv/bin/python benchmarks/bench_foundation.py --quick   # 1 repeat

Results go to ``benchmarks/results/foundation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lamin_lightning import RetryPolicy
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

CHECKPOINTS = 20
WIDTH = 1024
BATCH = 32
TARGET = 1.05
RESULTS = Path(__file__).parent / "results" / "foundation.json"


class BenchModel(pl.LightningModule):
    """One Linear(WIDTH, WIDTH) layer trained with SGD: ~4 MB checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(WIDTH, WIDTH)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class TimedSaves:
    """Mixin: records how long each ``_save_checkpoint`` call kept the training thread."""

    save_seconds: list[float]

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)  # type: ignore[misc]
        self.save_seconds.append(time.perf_counter() - start)


class PlainCheckpoint(TimedSaves, ModelCheckpoint):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_seconds = []


class OursCheckpoint(TimedSaves, MemoryCheckpoint):
    def __init__(self, store: MemoryStore, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.save_seconds = []


class SyncCheckpoint(TimedSaves, ModelCheckpoint):
    """Persists inline: ``store.put`` on the training thread after Lightning's write."""

    def __init__(self, store: MemoryStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.save_seconds = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        ModelCheckpoint._save_checkpoint(self, trainer, filepath)
        self.store.put(f"checkpoints/{Path(filepath).name}", filepath)
        self.save_seconds.append(time.perf_counter() - start)


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock(pl.Callback):
    """Notes when the training loop ended (before teardown flushes anything), and the CPU
    time used by then: by the training thread, and by the whole process."""

    def __init__(self) -> None:
        self.train_end: float | None = None
        self.thread_cpu_end = 0.0
        self.process_cpu_end = 0.0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()
        self.thread_cpu_end = time.thread_time()
        self.process_cpu_end = process_cpu()


def fit_once(variant: str, latency: float, steps: int, every: int, root: Path) -> dict[str, Any]:
    """One fit; returns its timings and what was persisted."""
    dirpath = root / f"{variant}-{latency}-{time.monotonic_ns()}"
    common: dict[str, Any] = {
        "dirpath": dirpath,
        "save_top_k": -1,
        "every_n_train_steps": every,
    }
    store = MemoryStore(latency=latency)
    callback: TimedSaves
    if variant == "plain":
        callback = PlainCheckpoint(**common)
    elif variant == "ours":
        callback = OursCheckpoint(
            store,
            max_workers=4,
            max_pending=CHECKPOINTS,
            retry=RetryPolicy.no_delay(),
            **common,
        )
    else:
        callback = SyncCheckpoint(store, **common)
    clock = Clock()
    torch.manual_seed(0)
    model = BenchModel()
    data = DataLoader(TensorDataset(torch.randn(steps * BATCH, WIDTH)), batch_size=BATCH)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, clock],  # type: ignore[list-item]
        default_root_dir=str(root),
    )
    load_before = os.getloadavg()[0]
    thread_cpu, proc_cpu = time.thread_time(), process_cpu()
    start = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    assert clock.train_end is not None
    train = clock.train_end - start
    files = sorted(p.name for p in dirpath.glob("*.ckpt"))
    result: dict[str, Any] = {
        "variant": variant,
        "latency_s": latency,
        "fit_wall_s": wall,
        "train_s": train,
        "tail_s": wall - train,
        # CPU the training thread used until on_train_end: the training itself. Its spread
        # between identical runs shows how much the machine's speed varied.
        "train_thread_cpu_s": clock.thread_cpu_end - thread_cpu,
        # CPU other threads of the process used meanwhile (the pipeline's, for "ours").
        "other_threads_cpu_s": (clock.process_cpu_end - proc_cpu)
        - (clock.thread_cpu_end - thread_cpu),
        # Wall time the training thread spent not computing (waiting on storage, on the
        # GIL or a core, or on the final flush): less sensitive to the machine's speed.
        "off_cpu_s": wall - (clock.thread_cpu_end - thread_cpu),
        "saves": len(callback.save_seconds),
        "save_total_s": sum(callback.save_seconds),
        "save_max_s": max(callback.save_seconds, default=0.0),
        "files": len(files),
        "persisted": len(store.keys()),
        "checkpoint_bytes": (dirpath / files[-1]).stat().st_size if files else 0,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
    }
    if variant == "ours":
        assert isinstance(callback, OursCheckpoint)
        stats = callback.persistence_stats
        result["stall_total_s"] = stats.training_stall_seconds
        result["stall_max_s"] = stats.max_training_stall_seconds
        result["admission_waits"] = stats.admission_waits
        result["persistence_latency_max_s"] = stats.max_persistence_latency_seconds
    if variant != "plain" and result["persisted"] != CHECKPOINTS:
        raise RuntimeError(f"{variant}: persisted {result['persisted']} of {CHECKPOINTS}")
    shutil.rmtree(dirpath, ignore_errors=True)
    return result


def median(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.median(run[field] for run in runs)


def summarize(runs: list[dict[str, Any]], latencies: list[float]) -> tuple[dict[str, Any], bool]:
    """Medians per variant and latency, ratios to plain (of medians, and paired per repeat)."""
    plain = [r for r in runs if r["variant"] == "plain"]
    plain_fit, plain_train = median(plain, "fit_wall_s"), median(plain, "train_s")
    plain_by_repeat = {r["repeat"]: r for r in plain}
    summary: dict[str, Any] = {
        "plain": {
            "fit_wall_s": plain_fit,
            "train_s": plain_train,
            "save_total_s": median(plain, "save_total_s"),
            "save_max_s": median(plain, "save_max_s"),
            "train_thread_cpu_s": median(plain, "train_thread_cpu_s"),
            "off_cpu_s": median(plain, "off_cpu_s"),
            "train_thread_cpu_spread_s": [
                min(r["train_thread_cpu_s"] for r in plain),
                max(r["train_thread_cpu_s"] for r in plain),
            ],
        },
        "by_latency": {},
    }
    passed = True
    for latency in latencies:
        ours = [r for r in runs if r["variant"] == "ours" and r["latency_s"] == latency]
        sync = [r for r in runs if r["variant"] == "sync" and r["latency_s"] == latency]

        def paired(group: list[dict[str, Any]]) -> float:
            return statistics.median(
                r["fit_wall_s"] / plain_by_repeat[r["repeat"]]["fit_wall_s"] for r in group
            )

        entry: dict[str, Any] = {
            "ours_fit_wall_s": median(ours, "fit_wall_s"),
            "sync_fit_wall_s": median(sync, "fit_wall_s"),
            "ours_train_s": median(ours, "train_s"),
            "ours_tail_s": median(ours, "tail_s"),
            "ours_save_total_s": median(ours, "save_total_s"),
            "ours_save_max_s": median(ours, "save_max_s"),
            "ours_stall_max_s": median(ours, "stall_max_s"),
            "ours_admission_waits": median(ours, "admission_waits"),
            "ours_train_thread_cpu_s": median(ours, "train_thread_cpu_s"),
            "ours_other_threads_cpu_s": median(ours, "other_threads_cpu_s"),
            "ours_off_cpu_s": median(ours, "off_cpu_s"),
            "sync_off_cpu_s": median(sync, "off_cpu_s"),
            "sync_save_total_s": median(sync, "save_total_s"),
            "sync_save_max_s": median(sync, "save_max_s"),
            "ours_over_plain_paired": paired(ours),
            "sync_over_plain_paired": paired(sync),
        }
        entry["ours_over_plain"] = entry["ours_fit_wall_s"] / plain_fit
        entry["sync_over_plain"] = entry["sync_fit_wall_s"] / plain_fit
        entry["ours_train_over_plain_train"] = entry["ours_train_s"] / plain_train
        entry["meets_target"] = entry["ours_over_plain"] <= TARGET
        passed = passed and entry["meets_target"]
        summary["by_latency"][str(latency)] = entry
    return summary, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument(
        "--every", type=int, default=50, help="training steps between checkpoints (default 50)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared machine two OpenMP threads"
        " make every variant's timing swing with the load of other processes)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = CHECKPOINTS * args.every
    torch.set_num_threads(args.torch_threads)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    root = Path(tempfile.mkdtemp(prefix="bench-foundation-"))
    runs: list[dict[str, Any]] = []
    try:
        fit_once("plain", 0.0, 2 * args.every, args.every, root)  # warm-up, not measured
        variants = [("plain", 0.0)] + [(v, lat) for lat in args.latencies for v in ("ours", "sync")]
        for repeat in range(repeats):
            shift = repeat % len(variants)
            for variant, latency in variants[shift:] + variants[:shift]:
                run = fit_once(variant, latency, steps, args.every, root)
                run["repeat"] = repeat
                runs.append(run)
                print(
                    f"  repeat {repeat} {variant:5s} latency {latency:.1f}s:"
                    f" fit {run['fit_wall_s']:6.2f}s  train {run['train_s']:6.2f}s"
                    f"  tail {run['tail_s']:5.2f}s  save calls {run['save_total_s']:5.2f}s"
                    f" (max {run['save_max_s'] * 1e3:5.1f} ms)"
                    f"  cpu: training thread {run['train_thread_cpu_s']:5.2f}s,"
                    f" other threads {run['other_threads_cpu_s']:4.2f}s",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary, passed = summarize(runs, args.latencies)
    plain = summary["plain"]
    low, high = plain["train_thread_cpu_spread_s"]
    print()
    print(
        f"{CHECKPOINTS} checkpoints of {runs[0]['checkpoint_bytes'] / 1e6:.1f} MB every"
        f" {args.every} steps ({steps} steps), median of {repeats};"
        f" plain: fit {plain['fit_wall_s']:.2f}s, save calls {plain['save_total_s']:.2f}s"
    )
    print(
        f"{'latency':>7} {'ours fit':>9} {'sync fit':>9} {'ours/plain':>11} {'sync/plain':>11}"
        f" {'paired o/p':>11} {'paired s/p':>11} {'ours train/plain':>17} {'ours tail':>10}"
        f" {'save calls o|s':>15} {'pipeline cpu':>13}"
    )
    for latency in args.latencies:
        entry = summary["by_latency"][str(latency)]
        print(
            f"{latency:6.1f}s {entry['ours_fit_wall_s']:8.2f}s {entry['sync_fit_wall_s']:8.2f}s"
            f" {entry['ours_over_plain']:11.3f} {entry['sync_over_plain']:11.3f}"
            f" {entry['ours_over_plain_paired']:11.3f} {entry['sync_over_plain_paired']:11.3f}"
            f" {entry['ours_train_over_plain_train']:17.3f} {entry['ours_tail_s']:9.2f}s"
            f" {entry['ours_save_total_s']:6.2f}|{entry['sync_save_total_s']:5.2f}s"
            f" {entry['ours_other_threads_cpu_s']:12.2f}s"
        )
    for latency in args.latencies:
        entry = summary["by_latency"][str(latency)]
        print(
            f"latency {latency:.1f}s: training thread off CPU (fit wall - its CPU time):"
            f" plain {plain['off_cpu_s']:.2f}s, ours {entry['ours_off_cpu_s']:.2f}s"
            f" (tail {entry['ours_tail_s']:.2f}s), sync {entry['sync_off_cpu_s']:.2f}s"
        )
    print(
        f"machine speed: the same plain training took {low:.2f}-{high:.2f}s of training-thread"
        f" CPU ({(high / low - 1) * 100:.0f}% spread) across repeats"
    )
    print(f"target ours/plain <= {TARGET}: {'met' if passed else 'MISSED'}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "foundation",
                "target_ours_over_plain": TARGET,
                "target_met": passed,
                "config": {
                    "checkpoints": CHECKPOINTS,
                    "steps": steps,
                    "every_n_train_steps": args.every,
                    "model": f"Linear({WIDTH}, {WIDTH})",
                    "batch_size": BATCH,
                    "torch_threads": args.torch_threads,
                    "repeats": repeats,
                    "latencies_s": args.latencies,
                    "ours": {"max_workers": 4, "max_pending": CHECKPOINTS},
                },
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "lightning": pl.__version__,
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
