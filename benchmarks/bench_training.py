"""Scenarios 1, 4 and 6: training stall, fit time, peak memory and the timeline picture.

The same CPU training three times, each arm in a fresh process with its own LaminDB
settings and local SQLite instance (``lamin_lightning.testing.local_instance``), all
else equal: a Linear(8192, 8192) model trained with SGD, so each checkpoint is ~268 MB,
``CHECKPOINTS`` checkpoints (one every ``--every`` steps), ``monitor="train_loss"``,
``save_top_k=3`` (so older checkpoints are evicted), ``ln.track()`` run.

- ``plain``: Lightning's ``ModelCheckpoint`` (local files, no persistence);
- ``reference``: ``lamindb.integrations.lightning.Checkpoint`` (synchronous);
- ``ours``: ``lamin_lightning.Checkpoint`` (defaults: 2 workers, 4 pending).

Measured in each arm:

1. *Stall* per checkpoint: time in ``_save_checkpoint`` (and ``_remove_checkpoint`` for
   the file it evicts) minus Lightning's own local save and local removal (which finds
   nothing to do in ``ours``: see below), plus, for ``ours``, its work around Lightning's
   choice of the checkpoint (``_lightning_save``) (median over checkpoints). And the wall
   time of ``trainer.fit``, which for ``ours`` includes the flush at teardown (the last
   checkpoint is persisted after training ended, so that part cannot overlap training).
   As information, with
   ``plain`` among the arms: all of the training thread's time in the hooks but
   ``torch.save``, the stall plus Lightning's own removal of the evicted file (a plain
   ``ModelCheckpoint`` and the reference delete it on the training thread; ours renames it
   there and deletes it on the pipeline's intake thread).
4. Peak RSS during ``fit`` (VmHWM reset right before it).
6. Spans of training steps and persistence work on every thread: drawn into
   ``results/timeline.png``.

Torch runs one intra-op thread: on this 2-core machine one core trains (standing in for
the accelerator that does the work in real training) and one is left for whatever the
host does besides, which is where background persistence runs. Arms rotate their order
between repeats; ratios are medians of per-repeat (paired) ratios.

Targets: ours' stall <= 2% of the reference's, and at most 1 ms (median); ours' fit /
plain fit <= 1.05; ours' peak RSS - plain's <= 64 MB (no checkpoint bytes held in memory).

``--disk-load``: the same, with a competing writer on the disk. For each arm the script
starts another process (``_disk_writer.py``) that writes 64 MiB files and fsyncs each, in
a loop, in the filesystem of the checkpoints, and stops it (by PID) when the arm ends. A
durable write on the training thread (an fsync, an ``O_DSYNC`` write) would wait behind
it; Lightning's local ``torch.save`` (not fsynced) is not part of the stall. Arms default
to ``reference`` and ``ours``; targets: ours' median stall <= 1% of the reference's (the
median of per-repeat ratios), and ours' p95 (over every checkpoint of every repeat) <= 5%
of the reference's median. Results go to ``results/training_disk_load.json`` (and
``timeline_disk_load.png``), so that a quiet run's ``training.json`` stays.

Usage::

    .venv/bin/python benchmarks/bench_training.py               # 10 checkpoints, 2 repeats
    .venv/bin/python benchmarks/bench_training.py --quick       # 3 checkpoints, 1 repeat
    .venv/bin/python benchmarks/bench_training.py --disk-load   # under a competing fsync'ing writer
    .venv/bin/python benchmarks/bench_training.py --disk-load --arms plain reference ours
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    DiskLoad,
    Recorder,
    Row,
    block_network,
    emit_result,
    instrument,
    isolate_lamin,
    peak_rss_bytes,
    print_rows,
    quiet,
    reset_peak_rss,
    rss_bytes,
    run_child,
    smoke,
    spans_as_json,
    step_clock,
    write_result,
)

WIDTH = 8192
BATCH = 8
ARMS = ("plain", "reference", "ours")
DEFAULT_ARMS = {False: ARMS, True: ("reference", "ours")}  # by --disk-load
LABELS = {
    "plain": "Lightning ModelCheckpoint (no persistence)",
    "reference": "lamindb.integrations.lightning.Checkpoint (synchronous)",
    "ours": "lamin_lightning.Checkpoint (asynchronous)",
}
STALL_TARGET = 0.02
QUIET_STALL_TARGET_S = 0.001
LOADED_STALL_TARGET = 0.01
LOADED_P95_TARGET = 0.05
FIT_TARGET = 1.05
MEMORY_TARGET_MB = 64.0


# -- one arm, in a fresh process ---------------------------------------------------------------


def run_arm(arm: str, root: Path, checkpoints: int, every: int, width: int) -> dict[str, Any]:
    isolate_lamin(root / "lamin")
    block_network()
    os.environ["TQDM_DISABLE"] = "1"
    quiet()
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    import lamin_lightning as ll
    from lamin_lightning.testing import local_instance

    quiet()
    torch.set_num_threads(1)
    steps = checkpoints * every

    class Wide(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(width, width)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            # One batch, seen at every step, and a small step size: the loss falls at every
            # step, so every checkpoint is a new best, is written, and evicts the oldest.
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    with local_instance(root / "instance"):
        from lamindb.integrations import lightning as reference_ll

        import lamindb as ln

        ln.settings.verbosity = "error"
        ll.save_lightning_features()
        ln.track()
        recorder = Recorder()
        base = {"plain": ModelCheckpoint, "reference": reference_ll.Checkpoint}.get(
            arm, ll.Checkpoint
        )
        callback = instrument(base, recorder)(
            dirpath=str(root / "checkpoints"),
            monitor="train_loss",
            save_top_k=3,
            every_n_train_steps=every,
        )
        clock = step_clock(recorder)
        torch.manual_seed(0)
        model = Wide()
        x, y = torch.randn(BATCH, width), torch.randn(BATCH, width)
        data = DataLoader(TensorDataset(x.repeat(steps, 1), y.repeat(steps, 1)), batch_size=BATCH)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback, clock],
            default_root_dir=str(root),
            log_every_n_steps=1,
        )
        rss_before = rss_bytes()
        peak_reset = reset_peak_rss()
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        trainer.fit(model, data)
        fit = time.perf_counter() - started
        peak = peak_rss_bytes()
        assert clock.train_end is not None
        files = sorted((root / "checkpoints").glob("*.ckpt"))
        result: dict[str, Any] = {
            "arm": arm,
            "fit_s": fit,
            "train_s": clock.train_end - started,
            "tail_s": started + fit - clock.train_end,
            "stalls_s": callback.stalls,
            "local_saves_s": callback.local_saves,
            "local_removes_s": callback.local_removes,
            "checkpoints": len(callback.stalls),
            "checkpoint_bytes": files[-1].stat().st_size if files else 0,
            "rss_before_fit_bytes": rss_before,
            "peak_rss_bytes": peak,
            "peak_rss_reset": peak_reset,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()[0],
            "step_median_s": statistics.median(
                s.end - s.start for s in recorder.spans if s.label == "step"
            ),
            "spans": spans_as_json(recorder.spans, started),
        }
        if arm != "plain":
            prefix = callback.checkpoint_key_prefix
            result["artifacts"] = ln.Artifact.filter(key__startswith=prefix + "/").count()
        if arm == "ours":
            result["persistence_stats"] = callback.persistence_stats.as_dict()
    return result


# -- the parent: arms side by side, summary, picture ---------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 checkpoints, once")
    parser.add_argument("--checkpoints", type=int, default=None, help="default 10")
    parser.add_argument(
        "--every", type=int, default=None, help="training steps between checkpoints (default 4)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="default 2")
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help=f"Linear(width, width) (default {WIDTH}: 268 MB checkpoints; 4096 with --quick)",
    )
    parser.add_argument(
        "--disk-load",
        action="store_true",
        help="run every arm beside a process that writes and fsyncs 64 MiB files in a loop,"
        " in the checkpoints' filesystem",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=None,
        help="default: plain reference ours (with --disk-load: reference ours)",
    )
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    checkpoints = args.checkpoints or (3 if args.quick else 10)
    every = args.every or (2 if args.quick else 4)
    width = args.width or (4096 if args.quick else WIDTH)
    if args.arm:
        assert args.root is not None
        emit_result(run_arm(args.arm, args.root, checkpoints, every, width))
        return 0

    arms = tuple(a for a in ARMS if a in (args.arms or DEFAULT_ARMS[args.disk_load]))
    for needed in ("reference", "ours"):
        if needed not in arms:
            parser.error(f"--arms must include {needed}")
    condition = "disk load" if args.disk_load else "quiet"
    repeats = args.repeats or (1 if args.quick else 2)
    tmp = Path(tempfile.mkdtemp(prefix="lamin-bench-training-"))
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(repeats):
            shift = repeat % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                root = tmp / f"{arm}-{repeat}"
                command = [
                    str(Path(__file__).resolve()),
                    "--arm",
                    arm,
                    "--root",
                    str(root),
                    "--checkpoints",
                    str(checkpoints),
                    "--every",
                    str(every),
                    "--width",
                    str(width),
                ]
                if args.disk_load:
                    # Beside the checkpoints (same filesystem), started before the child
                    # imports anything, stopped when it has finished.
                    with DiskLoad(tmp / "disk-load") as load:
                        result = run_child(command, timeout=900)
                    result["disk_load"] = load.summary()
                else:
                    result = run_child(command, timeout=900)
                shutil.rmtree(root, ignore_errors=True)
                result["repeat"] = repeat
                runs.append(result)
                disk = result.get("disk_load")
                print(
                    f"  repeat {repeat} {arm:9s}: fit {result['fit_s']:6.2f}s"
                    f" (tail {result['tail_s']:4.2f}s)"
                    f"  stall median {_median_stall(result) * 1e3:7.1f} ms"
                    f" p95 {_p95(result['stalls_s']) * 1e3:7.1f} ms"
                    f"  torch.save median {statistics.median(result['local_saves_s']):.2f}s"
                    f"  step {result['step_median_s'] * 1e3:4.0f} ms"
                    f"  peak RSS {result['peak_rss_bytes'] / 2**20:6.0f} MiB"
                    f"  load {result['loadavg_before']:.1f}"
                    + (
                        f"  disk writer {disk['mib_per_s']:.0f} MiB/s, fsync of 64 MiB median"
                        f" {(disk['fsync_median_s'] or 0) * 1e3:.0f} ms"
                        if disk
                        else ""
                    ),
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(runs, repeats, arms)
    rows = report(summary, runs, checkpoints, args.quick, arms, condition)
    suffix = "_disk_load" if args.disk_load else ""
    png = draw_timeline(
        [r for r in runs if r["repeat"] == 0], RESULTS / f"timeline{suffix}.png", condition
    )
    path = write_result(
        f"training{suffix}",
        {
            "config": {
                "model": f"Linear({width}, {width}), SGD",
                "batch_size": BATCH,
                "checkpoints": checkpoints,
                "every_n_train_steps": every,
                "save_top_k": 3,
                "monitor": "train_loss",
                "repeats": repeats,
                "arms": list(arms),
                "condition": condition,
                "disk_load": (
                    "another process writes 64 MiB files (4 MiB writes) and fsyncs each, in a"
                    " loop, in the checkpoints' filesystem"
                    if args.disk_load
                    else None
                ),
                "torch_threads": 1,
                "ours": "lamin_lightning.Checkpoint defaults (max_workers=2, max_pending=4,"
                " outbox=True)",
            },
            "summary": summary,
            "timeline": str(png.relative_to(RESULTS.parent)) if png else None,
            "runs": runs,
        },
        rows,
    )
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


def _median_stall(run: dict[str, Any]) -> float:
    return float(statistics.median(run["stalls_s"]))


def _p95(values: list[float]) -> float:
    """95th percentile, nearest rank (of 10 values: the largest; of 20: the second largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(runs: list[dict[str, Any]], repeats: int, arms: tuple[str, ...]) -> dict[str, Any]:
    def arm_runs(arm: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["arm"] == arm]

    def per_repeat(arm: str, other: str, field: Any) -> list[float]:
        ratios = []
        for repeat in range(repeats):
            mine = next(r for r in runs if r["arm"] == arm and r["repeat"] == repeat)
            theirs = next(r for r in runs if r["arm"] == other and r["repeat"] == repeat)
            ratios.append(field(mine, theirs))
        return ratios

    def paired(arm: str, other: str, field: Any) -> float:
        return float(statistics.median(per_repeat(arm, other, field)))

    summary: dict[str, Any] = {}
    for arm in arms:
        mine = arm_runs(arm)
        pooled = [s for r in mine for s in r["stalls_s"]]
        summary[arm] = {
            "fit_s": statistics.median(r["fit_s"] for r in mine),
            "tail_s": statistics.median(r["tail_s"] for r in mine),
            "stall_median_s": statistics.median(_median_stall(r) for r in mine),
            "stall_median_per_repeat_s": [_median_stall(r) for r in mine],
            "stall_p95_s": _p95(pooled),
            "stall_p95_per_repeat_s": [_p95(r["stalls_s"]) for r in mine],
            "stall_max_s": max(pooled),
            # Everything the training thread spends in the hooks but Lightning's torch.save:
            # the stall plus Lightning's own removal of the evicted file (ours renames it
            # and deletes it off the thread, so Lightning's removal finds nothing).
            "hooks_besides_save_median_s": statistics.median(
                statistics.median(map(sum, zip(r["stalls_s"], r["local_removes_s"], strict=True)))
                for r in mine
            ),
            "hooks_besides_save_mean_s": statistics.median(
                statistics.mean(map(sum, zip(r["stalls_s"], r["local_removes_s"], strict=True)))
                for r in mine
            ),
            "local_save_median_s": statistics.median(
                statistics.median(r["local_saves_s"]) for r in mine
            ),
            "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in mine) / 2**20,
            "step_median_s": statistics.median(r["step_median_s"] for r in mine),
        }
    ratios = per_repeat("ours", "reference", lambda a, b: _median_stall(a) / _median_stall(b))
    summary["stall_ours_over_reference"] = float(statistics.median(ratios))
    summary["stall_ours_over_reference_per_repeat"] = ratios
    summary["stall_p95_ours_over_reference_median"] = (
        summary["ours"]["stall_p95_s"] / summary["reference"]["stall_median_s"]
    )
    if "plain" in arms:
        summary["fit_ours_over_plain"] = paired(
            "ours", "plain", lambda a, b: a["fit_s"] / b["fit_s"]
        )
        summary["fit_reference_over_plain"] = paired(
            "reference", "plain", lambda a, b: a["fit_s"] / b["fit_s"]
        )
        summary["train_ours_over_plain"] = paired(
            "ours", "plain", lambda a, b: a["train_s"] / b["train_s"]
        )
        summary["peak_rss_ours_minus_plain_mib"] = paired(
            "ours", "plain", lambda a, b: (a["peak_rss_bytes"] - b["peak_rss_bytes"]) / 2**20
        )
        summary["peak_rss_reference_minus_plain_mib"] = paired(
            "reference", "plain", lambda a, b: (a["peak_rss_bytes"] - b["peak_rss_bytes"]) / 2**20
        )
    loads = [r["disk_load"] for r in runs if r.get("disk_load")]
    if loads:
        summary["disk_load"] = {
            "mib_per_s_median": statistics.median(d["mib_per_s"] for d in loads),
            "fsync_median_s": statistics.median(
                d["fsync_median_s"] for d in loads if d["fsync_median_s"] is not None
            )
            if any(d["fsync_median_s"] is not None for d in loads)
            else None,
        }
    return summary


def report(
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    checkpoints: int,
    quick: bool,
    arms: tuple[str, ...],
    condition: str,
) -> list[Row]:
    size_mb = max(r["checkpoint_bytes"] for r in runs) / 1e6
    print()
    print(
        f"{checkpoints} checkpoints of {size_mb:.0f} MB, save_top_k=3, local SQLite instance,"
        f" CPU (1 torch thread), {condition}; medians over"
        f" {len({r['repeat'] for r in runs})} repeat(s)"
    )
    if "disk_load" in summary:
        disk = summary["disk_load"]
        fsync = disk["fsync_median_s"]
        print(
            f"competing writer: {disk['mib_per_s_median']:.0f} MiB/s, fsync of a 64 MiB file"
            f" {fsync * 1e3 if fsync is not None else float('nan'):.0f} ms (medians over arms)"
        )
    for arm in arms:
        written = {r["checkpoints"] for r in runs if r["arm"] == arm}
        if written != {checkpoints}:
            print(f"warning: {arm} wrote {sorted(written)} checkpoints, not {checkpoints}")
    header = (
        f"{'arm':<10}{'fit':>9}{'tail':>8}{'torch.save':>12}{'stall/ckpt':>13}{'p95 stall':>12}"
        f"{'max stall':>11}{'peak RSS':>11}"
    )
    print(header)
    for arm in arms:
        s = summary[arm]
        print(
            f"{arm:<10}{s['fit_s']:>8.2f}s{s['tail_s']:>7.2f}s{s['local_save_median_s']:>11.2f}s"
            f"{s['stall_median_s'] * 1e3:>10.1f} ms{s['stall_p95_s'] * 1e3:>9.1f} ms"
            f"{s['stall_max_s'] * 1e3:>8.0f} ms{s['peak_rss_mib']:>7.0f} MiB"
        )
    for arm in ("reference", "ours"):
        lists = ", ".join(f"{v * 1e3:.1f}" for v in summary[arm]["stall_median_per_repeat_s"])
        print(f"{arm} stall median per repeat: {lists} ms")
    ours_stats = [r.get("persistence_stats", {}) for r in runs if r["arm"] == "ours"]
    for stats in ours_stats:
        print(
            f"ours persistence_stats: saved {stats.get('saved', 0):.0f}, removed"
            f" {stats.get('removed', 0):.0f}, failed {stats.get('failed', 0):.0f}, retried"
            f" {stats.get('retried', 0):.0f}, admission waits"
            f" {stats.get('admission_waits', 0):.0f}"
            f" ({stats.get('training_stall_seconds', 0):.2f}s)"
        )
    ours, reference = summary["ours"], summary["reference"]
    stall = summary["stall_ours_over_reference"]
    p95 = summary["stall_p95_ours_over_reference_median"]
    versus = (
        f"({ours['stall_median_s'] * 1e3:.2f} ms vs {reference['stall_median_s'] * 1e3:.0f} ms;"
        " per repeat "
        + ", ".join(f"{r:.4f}" for r in summary["stall_ours_over_reference_per_repeat"])
        + ")"
    )
    p95_text = (
        f"{p95:.4f} (p95 {ours['stall_p95_s'] * 1e3:.2f} ms vs median"
        f" {reference['stall_median_s'] * 1e3:.0f} ms)"
    )
    rows: list[Row] = []
    if condition == "quiet":
        rows += [
            Row(
                "1 stall per ckpt: ours / reference",
                f"<= {STALL_TARGET:.2f}",
                f"{stall:.4f} {versus}",
                stall <= STALL_TARGET,
            ),
            Row(
                "1 stall per ckpt, ours (quiet)",
                f"<= {QUIET_STALL_TARGET_S * 1e3:.0f} ms",
                f"{ours['stall_median_s'] * 1e3:.2f} ms (p95 {ours['stall_p95_s'] * 1e3:.2f} ms)",
                ours["stall_median_s"] <= QUIET_STALL_TARGET_S,
            ),
            Row("1 stall p95 ours / reference median", "(info)", p95_text, None),
        ]
    else:
        rows += [
            Row(
                "1 stall under disk load: ours / reference",
                f"<= {LOADED_STALL_TARGET:.2f}",
                f"{stall:.4f} {versus}",
                stall <= LOADED_STALL_TARGET,
            ),
            Row(
                "1 stall p95 under disk load / reference median",
                f"<= {LOADED_P95_TARGET:.2f}",
                p95_text,
                p95 <= LOADED_P95_TARGET,
            ),
        ]
    if "plain" in arms:
        fit = summary["fit_ours_over_plain"]
        memory = summary["peak_rss_ours_minus_plain_mib"]
        loaded = "" if condition == "quiet" else f" ({condition})"
        rows += [
            Row(
                f"1 fit time: ours / plain{loaded}",
                f"<= {FIT_TARGET:.2f}",
                f"{fit:.3f} ({ours['fit_s']:.1f}s vs {summary['plain']['fit_s']:.1f}s;"
                f" reference {summary['fit_reference_over_plain']:.3f})",
                fit <= FIT_TARGET,
            ),
            Row(
                f"1 training loop (no flush): ours / plain{loaded}",
                "(info)",
                f"{summary['train_ours_over_plain']:.3f}; ours' flush after training"
                f" {ours['tail_s']:.2f}s",
                None,
            ),
            Row(
                f"1 all hook time but torch.save, mean/ckpt{loaded}",
                "(info)",
                f"ours {ours['hooks_besides_save_mean_s'] * 1e3:.1f} ms, plain"
                f" {summary['plain']['hooks_besides_save_mean_s'] * 1e3:.1f} ms (its"
                " removals), reference"
                f" {summary['reference']['hooks_besides_save_mean_s'] * 1e3:.0f} ms",
                None,
            ),
            Row(
                f"4 peak RSS: ours - plain{loaded}",
                f"<= {MEMORY_TARGET_MB:.0f} MB",
                f"{memory:+.0f} MiB (reference"
                f" {summary['peak_rss_reference_minus_plain_mib']:+.0f})",
                memory * 2**20 / 1e6 <= MEMORY_TARGET_MB,
            ),
        ]
    rows = smoke(rows, quick)
    print()
    print_rows(rows)
    return rows


# -- the picture ---------------------------------------------------------------------------------

COLORS = {
    "step": "#7fc97f",
    "local save": "#9e9e9e",
    "local remove": "#9e9e9e",
    "in callback": "#d62728",
    "stage": "#fdb462",
    "transfer": "#1f77b4",
    "commit": "#9467bd",
    "remove": "#8c564b",
}
LEGEND = {
    "step": "training step",
    "local save": "Lightning's local save / removal",
    "in callback": "training waits in the callback (beyond the local save)",
    "stage": "staging (hard link)",
    "transfer": "hash + copy into storage + artifact record",
    "commit": "features, flags, ranks (commit)",
    "remove": "delete evicted artifact",
}


def _lane(thread: str) -> str:
    if thread == "MainThread":
        return "training thread"
    if thread.startswith("lamin-lightning-"):
        return thread.removeprefix("lamin-lightning-").replace("-", " ")
    return thread


def draw_timeline(runs: list[dict[str, Any]], path: Path, condition: str = "quiet") -> Path | None:
    """Stacked timelines, one panel per arm, shared time axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("matplotlib missing: no timeline picture")
        return None
    by_arm = {r["arm"]: r for r in runs}
    arms = [a for a in ARMS if a in by_arm]
    lanes: dict[str, list[str]] = {}
    for arm in arms:
        names = {_lane(s["thread"]) for s in by_arm[arm]["spans"]}
        ordered = ["training thread", *sorted(n for n in names if n != "training thread")]
        lanes[arm] = ordered
    fig, axes = plt.subplots(
        len(arms),
        1,
        sharex=True,
        figsize=(12, 1.3 + 0.55 * sum(len(v) for v in lanes.values())),
        dpi=110,
        gridspec_kw={"height_ratios": [len(lanes[a]) + 0.8 for a in arms]},
    )
    if len(arms) == 1:
        axes = [axes]
    x_max = max(r["fit_s"] for r in runs) * 1.02
    for ax, arm in zip(axes, arms, strict=True):
        run = by_arm[arm]
        order = lanes[arm]
        for span in run["spans"]:
            lane = order.index(_lane(span["thread"]))
            y = len(order) - 1 - lane
            width = max(span["end"] - span["start"], x_max / 2000)
            ax.broken_barh(
                [(span["start"], width)],
                (y - 0.38, 0.76),
                facecolors=COLORS.get(span["label"], "#cccccc"),
                edgecolor="none",
            )
        ax.axvline(run["fit_s"], color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels(list(reversed(order)), fontsize=8)
        ax.set_ylim(-0.6, len(order) - 0.4)
        stall = statistics.median(run["stalls_s"]) * 1e3
        ax.set_title(
            f"{LABELS[arm]}: fit {run['fit_s']:.1f} s, training waits {stall:.1f} ms"
            " per checkpoint beyond the local save",
            fontsize=9,
            loc="left",
        )
        ax.text(run["fit_s"], len(order) - 0.5, " fit returns", fontsize=7, va="top", ha="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(0, x_max)
    axes[-1].set_xlabel("seconds since trainer.fit() started")
    size = max(r["checkpoint_bytes"] for r in runs) / 1e6
    fig.suptitle(
        f"{by_arm[arms[0]]['checkpoints']} checkpoints of {size:.0f} MB (save_top_k=3), local"
        " LaminDB instance, CPU"
        + (f", {condition}" if condition != "quiet" else "")
        + ": where the time goes",
        fontsize=11,
    )
    used = {s["label"] for r in runs for s in r["spans"]}
    handles = [
        Patch(color=COLORS[label], label=text)
        for label, text in LEGEND.items()
        if label in used or (label == "local save" and "local remove" in used)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def redraw(json_path: Path = RESULTS / "training.json") -> Path | None:
    """Redraw the timeline from a previous run's JSON (for tweaking the picture)."""
    document = json.loads(json_path.read_text())
    return draw_timeline(
        [r for r in document["runs"] if r["repeat"] == 0], RESULTS / "timeline.png"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--redraw"]:
        print(redraw())
        sys.exit(0)
    sys.exit(main())
