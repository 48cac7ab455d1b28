"""async_write benchmark: does taking the local ``torch.save`` off the training thread pay?

Checkpoints of ~268 MB (one ``Linear(8192, 8192)`` trained with SGD without
momentum, so the optimizer adds no state) on CPU. Arms, each in a fresh
subprocess (so each has its own peak RSS), order rotated between repeats:

- ``none``: no checkpointing (``enable_checkpointing=False``): the baseline loop.
- ``plain``: Lightning's ``ModelCheckpoint``: a synchronous ``torch.save`` (into
  memory, then written to the file) on the training thread.
- ``async``: ours (``MemoryCheckpoint``) with ``async_write=True``, persisting into
  a store whose ``put`` does not read the file, so persistence costs ~nothing and
  what is measured is the local write: a host snapshot on the training thread,
  serialisation + write + fsync + rename on the intake thread.
- ``sync`` (only with ``--arms ... sync``): the same with ``async_write=False``
  (Lightning's write, then our staging).
- ``async_before`` (only with ``--arms ... async_before``): ``async`` with the background
  write as it was before issue 14 (zip CRC-32 computed, the written pages left in the
  page cache), for a before/after comparison in one run.
- ``async_cached`` (only with ``--arms ... async_cached``): ``async`` with the background
  write through the page cache (then dropped from it), as it was before it went around
  it with ``O_DIRECT``.

Reported per arm (medians over checkpoints, then over repeats):

- ``stall``: time the training thread spent inside ``_save_checkpoint`` per
  checkpoint (for ``plain`` and ``sync`` that is the synchronous save);
- ``snapshot``: for ``async``, the part of the stall spent copying tensors into the
  host buffers (a device-to-host copy when the model is on a GPU), and ``slot
  wait``: waiting for a free snapshot slot (the previous write still running);
- ``bg write``: for ``async``, time of one background write (intake thread);
- ``loop``: wall time from the end of the warm-up steps to ``on_train_end``,
  and its ratio to ``none`` (paired by repeat, median);
- ``peak RSS``: ``ru_maxrss`` of the arm's process, and its overhead over ``none``.

Targets (checked for ``async``): stall <= 10% of ``plain``'s; loop / none <= 1.10 in
*every* repeat (paired by repeat), not only on the median; peak RSS overhead <= one
snapshot + 32 MiB.

``--cpu-load``: the same with one other CPU-bound process running (a Python busy loop,
started before each arm's process and stopped by PID after it), so that the training
thread, the background write and that process share the cores.

``--interleave BLOCKS``: loop / none measured inside one process per repeat. On this
2-core VM identical ``none`` processes run the same steps 15.7 to 18.7 s apart (the
training thread's CPU time itself varies with the machine's minute), so a ratio of two
processes run one after the other judges that as much as the write's cost. Here one fit
runs ``BLOCKS`` blocks of ``2 x --every`` steps; the ``async`` callback saves (two
checkpoints, each half ``--every`` from the block's edges) in blocks 0, 3, 4, 7, ... and
not in the others (ABBA, so a drift of the machine weighs on both sides alike). A saving
block ends only once its background writes are done (``flush``): their cost is counted in
it, in full, never in the next block. The ratio per repeat is the saving blocks' time over
the others'. Results go to ``..._interleaved.json``.

Usage::

    .venv/bin/python benchmarks/bench_async_write.py               # 8 checkpoints, 1 repeat
    .venv/bin/python benchmarks/bench_async_write.py --quick       # 3 checkpoints, 1 repeat
    .venv/bin/python benchmarks/bench_async_write.py --repeats 5   # the target's 5 repeats
    .venv/bin/python benchmarks/bench_async_write.py --repeats 5 --cpu-load
    .venv/bin/python benchmarks/bench_async_write.py --arms none plain async sync
    .venv/bin/python benchmarks/bench_async_write.py --interleave 8 --repeats 5

Results go to ``benchmarks/results/async_write.json`` (``async_write_cpu_load.json``
with ``--cpu-load``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CpuLoad, no_read_store, thread_cpu_seconds

RESULTS = Path(__file__).parent / "results" / "async_write.json"
RESULTS_CPU_LOAD = RESULTS.with_name("async_write_cpu_load.json")
WIDTH = 8192
ARMS = ("none", "plain", "async", "sync", "async_before", "async_cached", "interleaved")
ASYNC_ARMS = ("async", "async_before", "async_cached", "interleaved")
DEFAULT_ARMS = ("none", "plain", "async")
STALL_TARGET = 0.10
LOOP_TARGET = 1.10
RSS_SLACK_BYTES = 32 << 20
MIB = 1 << 20


# -- child: one fit of one arm ------------------------------------------------------------------


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fit of ``arm`` in this process; returns its measurements."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    import lamin_lightning._local_write as local_write
    from lamin_lightning import RetryPolicy
    from lamin_lightning._local_write import Snapshotter
    from lamin_lightning.testing import MemoryCheckpoint

    torch.set_num_threads(args.torch_threads)
    if args.no_crc:
        torch.serialization.set_crc32_options(False)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    on_gpu = torch.cuda.is_available() and not args.cpu

    class BenchModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(WIDTH, WIDTH)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            # Lightning's default frees the gradients (a fresh 268 MB tensor, page-faulted
            # in, every step); --keep-grads zeroes them in place instead (diagnostics).
            optimizer.zero_grad(set_to_none=not args.keep_grads)

    class Batches(Dataset[tuple[Any]]):
        """``steps`` batches, cycling through 4 random ones (little memory at any length)."""

        def __init__(self, steps: int, batch: int) -> None:
            self.steps = steps
            self.base = torch.randn(4, batch, WIDTH)

        def __len__(self) -> int:
            return self.steps

        def __getitem__(self, index: int) -> tuple[Any]:
            return (self.base[index % len(self.base)],)

    stalls: list[float] = []

    class TimedPlain(ModelCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            start = time.perf_counter()
            super()._save_checkpoint(trainer, filepath)
            stalls.append(time.perf_counter() - start)

    class TimedOurs(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            start = time.perf_counter()
            super()._save_checkpoint(trainer, filepath)
            stalls.append(time.perf_counter() - start)

    class Blocks(pl.Callback):
        """--interleave: after ``every // 2`` warm-up steps, ``count`` blocks of ``2 * every``
        steps; the checkpoint callback saves (every ``every`` steps, so at a block's 4th and
        12th step with ``every`` 8) only in blocks 0, 3, 4, 7, ... (ABBA), none in the others.
        Each block's wall and training-thread CPU time are taken at its first step's start
        (after the previous step's save hooks); a block that saved first waits for its
        background writes (``flush``), so their cost stays in it, never in the next."""

        def __init__(self, count: int) -> None:
            self.warmup, self.length, self.count = args.every // 2, 2 * args.every, count
            self.callback: Any = None
            self.marks: list[tuple[float, float]] = []

        @staticmethod
        def saving(block: int) -> bool:
            return block % 4 in (0, 3)

        def saves_at(self, step: int) -> bool:
            """Whether the block of step ``step`` (1-based, as ``global_step`` after it) saves."""
            block = (step - 1 - self.warmup) // self.length
            return 0 <= block < self.count and self.saving(block)

        def mark(self, done: int) -> None:
            if done < self.warmup or (done - self.warmup) % self.length:
                return
            block = (done - self.warmup) // self.length  # the one starting now
            if block > self.count or len(self.marks) > block:
                return
            if block > 0 and self.saving(block - 1):
                assert self.callback.flush(timeout=600), "the background writes never ended"
            self.marks.append((time.perf_counter(), time.thread_time()))

        def on_train_batch_start(self, trainer: pl.Trainer, *rest: Any) -> None:
            self.mark(trainer.global_step)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.mark(trainer.global_step)

        def result(self) -> dict[str, Any]:
            walls = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]
            cpus = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:], strict=False)]
            if len(walls) != self.count:
                raise RuntimeError(f"interleaved: {len(walls)} blocks timed, not {self.count}")
            on = [i for i in range(self.count) if self.saving(i)]
            off = [i for i in range(self.count) if not self.saving(i)]
            return {
                "block_wall_s": walls,
                "block_thread_cpu_s": cpus,
                "block_saves": [self.saving(i) for i in range(self.count)],
                "saving_over_not": sum(walls[i] for i in on) / sum(walls[i] for i in off),
                "saving_over_not_cpu": sum(cpus[i] for i in on) / sum(cpus[i] for i in off),
            }

    blocks = Blocks(args.interleave) if arm == "interleaved" else None

    class GatedOurs(TimedOurs):
        """Saves only in the blocks that save (see Blocks)."""

        def on_train_batch_end(self, trainer: pl.Trainer, *rest: Any) -> None:
            assert blocks is not None
            if blocks.saves_at(trainer.global_step):
                super().on_train_batch_end(trainer, *rest)

    snapshot_copies: list[float] = []
    slot_waits: list[float] = []
    writes: list[float] = []
    write_cpus: list[float] = []
    snapshot_bytes: list[int] = []
    original_snapshot = Snapshotter.snapshot
    original_acquire = Snapshotter.acquire
    # Instrumentation of the async write's phases (internals on purpose: a benchmark of
    # where the time goes). The background write calls ``write_atomically`` by its module
    # global, and the callback uses the ``Snapshotter`` class, so both are patched there.
    original_write = local_write.write_atomically

    def timed_snapshot(checkpoint: dict[str, Any], slot: Any) -> dict[str, Any]:
        start = time.perf_counter()
        result = original_snapshot(checkpoint, slot)
        snapshot_copies.append(time.perf_counter() - start)
        snapshot_bytes.append(sum(b.numel() * b.element_size() for b in slot.buffers))
        return result

    def timed_acquire(self: Snapshotter) -> Any:
        slot, waited = original_acquire(self)
        slot_waits.append(waited)
        return slot, waited

    def timed_write(*write_args: Any, **write_kwargs: Any) -> int:
        start, cpu_start = time.perf_counter(), time.thread_time()
        size = original_write(*write_args, **write_kwargs)
        writes.append(time.perf_counter() - start)
        write_cpus.append(time.thread_time() - cpu_start)
        return size

    if arm == "async_before":
        # The background write as it was before issue 14: zip CRC-32 computed, the written
        # pages left in the page cache.
        local_write.save_snapshot = torch.save  # type: ignore[assignment]
        local_write._drop_from_page_cache = lambda fd: None  # type: ignore[assignment]
    if arm == "async_cached":
        # The background write through the page cache, as it was before it bypassed it.
        local_write._bypassing_page_cache = contextlib.nullcontext  # type: ignore[assignment]
    Snapshotter.snapshot = staticmethod(timed_snapshot)  # type: ignore[method-assign]
    Snapshotter.acquire = timed_acquire  # type: ignore[method-assign]
    local_write.write_atomically = timed_write  # type: ignore[assignment]

    def process_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    step_times: list[tuple[float, float]] = []

    class Clock(pl.Callback):
        """Wall and CPU time of the timed loop; its hooks run on the training thread."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None
            self.thread_cpu = 0.0
            self.process_cpu = 0.0
            self.thread_user = 0.0
            self.thread_system = 0.0
            self.threads_cpu: dict[str, float] = {}

        def user_system(self) -> tuple[float, float]:
            import psutil

            native = threading.get_native_id()
            for thread in psutil.Process().threads():
                if thread.id == native:
                    return thread.user_time, thread.system_time
            return 0.0, 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, *rest: Any) -> None:
            self.batch_started = (time.perf_counter(), time.thread_time())

        def on_train_batch_end(self, trainer: pl.Trainer, *rest: Any) -> None:
            started, cpu_started = self.batch_started
            # Per step (wall, training-thread CPU), from batch start to the end of the other
            # callbacks' batch-end hooks (checkpoint callbacks run after this one).
            step_times.append((time.perf_counter() - started, time.thread_time() - cpu_started))
            if trainer.global_step == args.warmup:
                self.start = time.perf_counter()
                self.thread_cpu = -time.thread_time()
                self.process_cpu = -process_cpu()
                user, system = self.user_system()
                self.thread_user, self.thread_system = -user, -system

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.end = time.perf_counter()
            self.thread_cpu += time.thread_time()
            self.process_cpu += process_cpu()
            user, system = self.user_system()
            self.thread_user += user
            self.thread_system += system
            self.threads_cpu = thread_cpu_seconds()

    root = Path(tempfile.mkdtemp(prefix=f"bench-async-write-{arm}-", dir=args.workdir))
    dirpath = root / "ckpt"
    common: dict[str, Any] = {
        "dirpath": dirpath,
        "save_top_k": -1,
        "every_n_train_steps": args.every,
    }
    store = no_read_store()
    callbacks: list[pl.Callback] = []
    if arm == "plain":
        callbacks.append(TimedPlain(**common))
    elif arm in ("sync", *ASYNC_ARMS):
        callbacks.append(
            (GatedOurs if arm == "interleaved" else TimedOurs)(
                store,
                async_write=arm in ASYNC_ARMS,
                max_pending=args.checkpoints + 1,
                retry=RetryPolicy.no_delay(),
                **common,
            )
        )
    clock = Clock()
    steps = args.checkpoints * args.every + args.tail
    if blocks is not None:
        blocks.callback = callbacks[0]
        callbacks.append(blocks)
        steps = blocks.warmup + blocks.count * blocks.length
    torch.manual_seed(0)
    model = BenchModel()
    data = DataLoader(Batches(steps, args.batch), batch_size=None)
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=arm != "none",
        callbacks=[*callbacks, clock],
        default_root_dir=str(root),
    )
    rss_samples: list[int] = []
    sampling = threading.Event()

    def sample_rss() -> None:
        import psutil

        process = psutil.Process()
        while not sampling.wait(0.02):
            rss_samples.append(process.memory_info().rss)

    sampler = threading.Thread(target=sample_rss, name="rss-sampler", daemon=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    sampler.start()
    try:
        trainer.fit(model, data)
    finally:
        sampling.set()
        sampler.join()
    fit_wall = time.perf_counter() - started
    assert clock.start is not None and clock.end is not None
    files = sorted(dirpath.glob("*.ckpt")) if dirpath.exists() else []
    result: dict[str, Any] = {
        "arm": arm,
        "device": "cuda" if on_gpu else "cpu",
        "loop_s": clock.end - clock.start,
        # CPU of the training thread in the loop: its own work, whatever else ran on the
        # machine (the spread between identical runs shows how much the machine varied).
        "loop_thread_cpu_s": clock.thread_cpu,
        # The same split into user and kernel time (page faults, memory management, I/O).
        "loop_thread_user_s": clock.thread_user,
        "loop_thread_system_s": clock.thread_system,
        # CPU of every other thread of the process meanwhile (the background write, ...).
        "loop_other_cpu_s": clock.process_cpu - clock.thread_cpu,
        # CPU seconds of each thread since the process started, at the end of training.
        "thread_cpu_s": clock.threads_cpu,
        "fit_wall_s": fit_wall,
        "tail_s": fit_wall - (clock.end - started),
        "stalls_s": stalls,
        "steps_s": step_times,
        "stall_median_s": statistics.median(stalls) if stalls else 0.0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_sampled_bytes": max(rss_samples, default=0),
        "files": len(files),
        "checkpoint_bytes": files[-1].stat().st_size if files else 0,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
    }
    if arm in ASYNC_ARMS:
        stats = callbacks[0].persistence_stats  # type: ignore[attr-defined]
        result.update(
            snapshot_copies_s=snapshot_copies,
            snapshot_copy_median_s=statistics.median(snapshot_copies),
            slot_waits_s=slot_waits,
            writes_s=writes,
            write_cpu_s=write_cpus,
            write_median_s=statistics.median(writes),
            snapshot_bytes=max(snapshot_bytes),
            admission_waits=stats.admission_waits,
            training_stall_seconds=stats.training_stall_seconds,
            saved=stats.saved,
            failed=stats.failed,
            leftovers=sorted(p.name for p in (dirpath / ".lamin-lightning").rglob("*.tmp")),
        )
        if stats.saved != args.checkpoints or stats.failed:
            raise RuntimeError(f"async: saved {stats.saved}, failed {stats.failed}")
    if arm != "none" and len(files) != args.checkpoints:
        raise RuntimeError(f"{arm}: {len(files)} files, expected {args.checkpoints}")
    if blocks is not None:
        result.update(blocks.result())
    if arm in ("sync", *ASYNC_ARMS) and len(store.keys()) != args.checkpoints:
        raise RuntimeError(f"{arm}: persisted {len(store.keys())} of {args.checkpoints}")
    shutil.rmtree(root, ignore_errors=True)
    return result


# -- parent: run the arms in subprocesses, summarise --------------------------------------------


def spawn(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        arm,
        "--checkpoints",
        str(args.checkpoints),
        "--every",
        str(args.every),
        "--tail",
        str(args.tail),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--torch-threads",
        str(args.torch_threads),
    ]
    if args.interleave:
        command += ["--interleave", str(args.interleave)]
    for flag in ("cpu", "keep_grads", "no_crc"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    if args.workdir:
        command += ["--workdir", str(args.workdir)]
    if args.cpu_load:
        with CpuLoad():
            done = subprocess.run(command, capture_output=True, text=True, check=False)
    else:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"arm {arm} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


def median_of(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.median(run[field] for run in runs)


def summarize(runs: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[str, Any]:
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in arms}
    none_by_repeat = {r["repeat"]: r for r in by_arm["none"]}
    none_rss = median_of(by_arm["none"], "peak_rss_bytes")
    summary: dict[str, Any] = {}
    for arm, group in by_arm.items():
        entry: dict[str, Any] = {
            "loop_s": median_of(group, "loop_s"),
            "fit_wall_s": median_of(group, "fit_wall_s"),
            "tail_s": median_of(group, "tail_s"),
            "loop_over_none": statistics.median(
                r["loop_s"] / none_by_repeat[r["repeat"]]["loop_s"] for r in group
            ),
            "loop_over_none_per_repeat": [
                r["loop_s"] / none_by_repeat[r["repeat"]]["loop_s"]
                for r in sorted(group, key=lambda r: r["repeat"])
            ],
            "loop_thread_cpu_s": median_of(group, "loop_thread_cpu_s"),
            "loop_thread_cpu_over_none": statistics.median(
                r["loop_thread_cpu_s"] / none_by_repeat[r["repeat"]]["loop_thread_cpu_s"]
                for r in group
            ),
            "loop_other_cpu_s": median_of(group, "loop_other_cpu_s"),
            "peak_rss_bytes": median_of(group, "peak_rss_bytes"),
            "peak_rss_overhead_bytes": median_of(group, "peak_rss_bytes") - none_rss,
        }
        if arm != "none":
            entry["stall_median_s"] = statistics.median(s for r in group for s in r["stalls_s"])
            entry["stall_median_per_repeat_s"] = [
                r["stall_median_s"] for r in sorted(group, key=lambda r: r["repeat"])
            ]
            entry["stall_first_s"] = statistics.median(r["stalls_s"][0] for r in group)
            entry["stall_max_s"] = statistics.median(max(r["stalls_s"]) for r in group)
        if arm in ASYNC_ARMS:
            entry["snapshot_copy_median_s"] = statistics.median(
                s for r in group for s in r["snapshot_copies_s"]
            )
            entry["snapshot_copy_first_s"] = statistics.median(
                r["snapshot_copies_s"][0] for r in group
            )
            entry["slot_wait_median_s"] = statistics.median(
                s for r in group for s in r["slot_waits_s"]
            )
            entry["slot_wait_max_s"] = max(max(r["slot_waits_s"]) for r in group)
            entry["write_median_s"] = statistics.median(s for r in group for s in r["writes_s"])
            entry["write_cpu_median_s"] = statistics.median(
                s for r in group for s in r["write_cpu_s"]
            )
            entry["snapshot_bytes"] = max(r["snapshot_bytes"] for r in group)
        summary[arm] = entry
    return summary


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    ours = summary["async"]
    rss_limit = ours["snapshot_bytes"] + RSS_SLACK_BYTES
    checks: dict[str, Any] = {}
    if "plain" in summary:
        stall_ratio = ours["stall_median_s"] / summary["plain"]["stall_median_s"]
        checks["stall_over_plain"] = {
            "value": stall_ratio,
            "target": STALL_TARGET,
            "met": stall_ratio <= STALL_TARGET,
        }
    worst = max(ours["loop_over_none_per_repeat"])
    return checks | {
        "loop_over_none_every_repeat": {
            "value": worst,
            "target": LOOP_TARGET,
            "met": worst <= LOOP_TARGET,
            "per_repeat": ours["loop_over_none_per_repeat"],
            "median": ours["loop_over_none"],
        },
        "peak_rss_overhead_bytes": {
            "value": ours["peak_rss_overhead_bytes"],
            "target": rss_limit,
            "met": ours["peak_rss_overhead_bytes"] <= rss_limit,
        },
    }


def rows(checks: dict[str, Any], args: Any) -> list[dict[str, Any]]:
    """The summary rows ``run.py`` prints (scenario, target, measured, passed)."""
    condition = ", one CPU-bound process beside" if args.cpu_load else ""
    quick = " [quick]" if args.quick else ""
    result = []
    if "stall_over_plain" in checks:
        check = checks["stall_over_plain"]
        result.append(
            {
                "scenario": f"async_write stall / sync torch.save{condition}{quick}",
                "target": f"<= {check['target']:.2f}",
                "measured": f"{check['value']:.3f}",
                "passed": check["met"],
            }
        )
    check = checks["loop_over_none_every_repeat"]
    result.append(
        {
            "scenario": f"async_write loop / none, every repeat{condition}{quick}",
            "target": f"<= {check['target']:.2f}",
            "measured": f"worst {check['value']:.3f} (per repeat "
            + ", ".join(f"{v:.3f}" for v in check["per_repeat"])
            + ")",
            "passed": check["met"],
        }
    )
    check = checks["peak_rss_overhead_bytes"]
    result.append(
        {
            "scenario": f"async_write peak RSS over none{condition}{quick}",
            "target": f"<= {check['target'] / MIB:.0f} MiB",
            "measured": f"{check['value'] / MIB:.0f} MiB",
            "passed": check["met"],
        }
    )
    return result


def print_table(
    summary: dict[str, Any], checks: dict[str, Any], runs: list[dict[str, Any]], args: Any
) -> None:
    size = max(r["checkpoint_bytes"] for r in runs)
    device = runs[0]["device"]
    print()
    print(
        f"{args.checkpoints} checkpoints of {size / 1e6:.0f} MB every {args.every} steps"
        f" (batch {args.batch}, {args.torch_threads} torch thread(s), {device}),"
        f" median of {args.repeats} repeat(s)"
        + (", one CPU-bound process beside" if args.cpu_load else "")
    )
    header = (
        f"{'arm':>6} {'stall':>8} {'1st stall':>9} {'snapshot':>9} {'slot wait':>9}"
        f" {'bg write':>9} {'loop':>8} {'loop/none':>9} {'cpu/none':>8} {'bg cpu':>7}"
        f" {'tail':>6} {'peak RSS':>9} {'RSS over none':>13}"
    )
    print(header)
    for arm, entry in summary.items():

        def ms(field: str, e: dict[str, Any] = entry) -> str:
            return f"{e[field] * 1e3:7.0f}ms" if field in e else f"{'-':>9}"

        print(
            f"{arm:>6} {ms('stall_median_s'):>8} {ms('stall_first_s'):>9}"
            f" {ms('snapshot_copy_median_s'):>9} {ms('slot_wait_median_s'):>9}"
            f" {ms('write_median_s'):>9} {entry['loop_s']:7.2f}s {entry['loop_over_none']:9.3f}"
            f" {entry['loop_thread_cpu_over_none']:8.3f} {entry['loop_other_cpu_s']:6.2f}s"
            f" {entry['tail_s']:5.2f}s {entry['peak_rss_bytes'] / MIB:6.0f}MiB"
            f" {entry['peak_rss_overhead_bytes'] / MIB:10.0f}MiB"
        )
    ours = summary["async"]
    copy_kind = "device-to-host copy" if device == "cuda" else "host copy"
    print(
        f"async stall {ours['stall_median_s'] * 1e3:.0f} ms, of which {copy_kind}"
        f" {ours['snapshot_copy_median_s'] * 1e3:.0f} ms (first checkpoint"
        f" {ours['snapshot_copy_first_s'] * 1e3:.0f} ms, into buffers made in the background"
        f" after the first optimizer step); one snapshot ="
        f" {ours['snapshot_bytes'] / MIB:.0f} MiB; one background write"
        f" {ours['write_median_s'] * 1e3:.0f} ms, of which CPU"
        f" {ours['write_cpu_median_s'] * 1e3:.0f} ms"
    )
    print(
        "loop/none: wall time of the timed loop over no checkpointing (the target);"
        " cpu/none: the same for the training thread's CPU time (insensitive to other"
        " processes); bg cpu: CPU of the other threads of the process in the loop"
    )
    for name, check in checks.items():
        value, target = check["value"], check["target"]
        if name == "peak_rss_overhead_bytes":
            text = f"{value / MIB:.0f} MiB <= {target / MIB:.0f} MiB (one snapshot + 32 MiB)"
        elif name == "loop_over_none_every_repeat":
            repeats = ", ".join(f"{v:.3f}" for v in check["per_repeat"])
            text = f"worst {value:.3f} <= {target} (per repeat: {repeats})"
        else:
            text = f"{value:.3f} <= {target}"
        print(f"target {name}: {text}: {'met' if check['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 checkpoints, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="default 1")
    parser.add_argument("--checkpoints", type=int, default=None, help="default 8 (quick: 3)")
    parser.add_argument("--every", type=int, default=8, help="steps between checkpoints")
    parser.add_argument("--tail", type=int, default=None, help="steps after the last checkpoint")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (< --every)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, as in bench_foundation: on a small shared"
        " machine two OpenMP threads make every arm swing with the load of other processes;"
        " with all cores busy training, any background write competes with it for CPU)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[arm for arm in ARMS if arm != "interleaved"],
        default=None,
        help="default: none plain async (add sync for ours without async_write, async_before for"
        " the background write as it was before issue 14, async_cached for it through the page"
        " cache)",
    )
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even if a GPU exists")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"default {RESULTS.relative_to(RESULTS.parents[1])}",
    )
    parser.add_argument(
        "--keep-grads",
        action="store_true",
        help="diagnostics: zero gradients in place instead of freeing them every step",
    )
    parser.add_argument(
        "--no-crc",
        action="store_true",
        help="diagnostics: torch.save without CRC32 (every arm; torch.load still reads it)",
    )
    parser.add_argument(
        "--cpu-load",
        action="store_true",
        help="run every arm beside one other CPU-bound process (started and stopped here)",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="BLOCKS",
        help="loop / none measured inside one process per repeat: BLOCKS blocks of 2 x --every"
        " steps, async_write checkpoints in every other one (ABBA order, a multiple of 4),"
        " so that both sides of the ratio run in the same minute of the machine",
    )
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.interleave:
        if args.interleave < 4 or args.interleave % 4:
            parser.error("--interleave must be a multiple of 4 (saving blocks in ABBA order)")
        if args.every < 2:
            parser.error("--interleave needs --every >= 2")
        args.warmup = args.every // 2  # a block's checkpoints half --every from its edges
        args.checkpoints = args.interleave  # two in each of the saving half of the blocks
    if args.output is None:
        output = RESULTS_CPU_LOAD if args.cpu_load else RESULTS
        args.output = output.with_stem(output.stem + "_interleaved") if args.interleave else output
    if args.checkpoints is None:
        args.checkpoints = 3 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1  # 2+ for steadier numbers; keeps make bench under 15 min
    if args.tail is None:
        args.tail = max(1, args.every // 2)
    if not 0 < args.warmup < args.every:
        parser.error("--warmup must be between 1 and --every - 1")

    if args.child:
        print("RESULT " + json.dumps(run_arm(args.child, args)), flush=True)
        return 0

    if args.interleave:
        return main_interleaved(args)
    arms = tuple(args.arms) if args.arms else DEFAULT_ARMS
    for needed in ("none", "async"):
        if needed not in arms:
            parser.error(f"--arms must include {needed}")
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        shift = repeat % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            run = spawn(arm, args)
            run["repeat"] = repeat
            runs.append(run)
            extra = (
                f" snapshot {statistics.median(run['snapshot_copies_s']) * 1e3:4.0f}ms"
                f" bg write {run['write_median_s'] * 1e3:4.0f}ms"
                f" (cpu {statistics.median(run['write_cpu_s']) * 1e3:4.0f}ms)"
                if arm in ASYNC_ARMS
                else ""
            )
            print(
                f"  repeat {repeat} {arm:>5}: loop {run['loop_s']:6.2f}s"
                f" (training thread cpu {run['loop_thread_cpu_s']:6.2f}s ="
                f" user {run['loop_thread_user_s']:5.2f}s"
                f" + system {run['loop_thread_system_s']:5.2f}s,"
                f" other threads {run['loop_other_cpu_s']:5.2f}s)"
                f"  stall {run['stall_median_s'] * 1e3:5.0f}ms{extra}"
                f"  peak RSS {run['peak_rss_bytes'] / MIB:5.0f}MiB"
                f"  load {run['loadavg_1min_before']:.1f}->{run['loadavg_1min_after']:.1f}",
                flush=True,
            )
    summary = summarize(runs, arms)
    checks = targets(summary)
    print_table(summary, checks, runs, args)
    print(f"total {time.perf_counter() - started:.0f}s")

    import torch

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "async_write",
                "targets": checks,
                "targets_met": all(c["met"] for c in checks.values()),
                "rows": rows(checks, args),
                "config": {
                    "model": f"Linear({WIDTH}, {WIDTH}), SGD without momentum",
                    "checkpoints": args.checkpoints,
                    "every_n_train_steps": args.every,
                    "warmup_steps": args.warmup,
                    "tail_steps": args.tail,
                    "batch_size": args.batch,
                    "torch_threads": args.torch_threads,
                    "repeats": args.repeats,
                    "arms": list(arms),
                    "keep_grads": args.keep_grads,
                    "no_crc": args.no_crc,
                    "cpu_load": "one other process: a Python busy loop" if args.cpu_load else None,
                    "store": "MemoryStore subclass whose put does not read the file",
                    "rss_slack_bytes": RSS_SLACK_BYTES,
                },
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "device": runs[0]["device"],
                },
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 0


def main_interleaved(args: argparse.Namespace) -> int:
    """--interleave: one process per repeat; loop / none is its saving blocks' time over its
    other blocks' time (see ``Blocks`` in :func:`run_arm`)."""
    import torch

    condition = ", one CPU-bound process beside" if args.cpu_load else ""
    quick = " [quick]" if args.quick else ""
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        run = spawn("interleaved", args)
        run["repeat"] = repeat
        runs.append(run)
        walls = ", ".join(
            f"{wall:.2f}{'*' if saves else ''}"
            for wall, saves in zip(run["block_wall_s"], run["block_saves"], strict=True)
        )
        print(
            f"  repeat {repeat}: saving / not saving {run['saving_over_not']:.3f} (training"
            f" thread cpu {run['saving_over_not_cpu']:.3f}); blocks (s, * saving): {walls};"
            f" stall {run['stall_median_s'] * 1e3:.0f}ms,"
            f" bg write {run['write_median_s'] * 1e3:.0f}ms"
            f"  load {run['loadavg_1min_before']:.1f}->{run['loadavg_1min_after']:.1f}",
            flush=True,
        )
    per_repeat = [run["saving_over_not"] for run in runs]
    worst = max(per_repeat)
    check = {
        "value": worst,
        "target": LOOP_TARGET,
        "met": worst <= LOOP_TARGET,
        "per_repeat": per_repeat,
        "median": statistics.median(per_repeat),
    }
    size = max(run["checkpoint_bytes"] for run in runs)
    print()
    print(
        f"{args.interleave} blocks of {2 * args.every} steps per repeat, half of them saving two"
        f" checkpoints of {size / 1e6:.0f} MB with async_write, {args.repeats} repeat(s){condition}"
    )
    repeats = ", ".join(f"{v:.3f}" for v in per_repeat)
    print(
        f"target loop_over_none_every_repeat (interleaved): worst {worst:.3f} <= {LOOP_TARGET}"
        f" (per repeat: {repeats}; median {check['median']:.3f}):"
        f" {'met' if check['met'] else 'MISSED'}"
    )
    print(f"total {time.perf_counter() - started:.0f}s")
    row = {
        "scenario": f"async_write loop / none, every repeat, interleaved{condition}{quick}",
        "target": f"<= {LOOP_TARGET:.2f}",
        "measured": f"worst {worst:.3f} (per repeat {repeats})",
        "passed": check["met"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "async_write_interleaved",
                "targets": {"loop_over_none_every_repeat": check},
                "targets_met": check["met"],
                "rows": [row],
                "config": {
                    "model": f"Linear({WIDTH}, {WIDTH}), SGD without momentum",
                    "blocks": args.interleave,
                    "block_steps": 2 * args.every,
                    "every_n_train_steps": args.every,
                    "warmup_steps": args.warmup,
                    "batch_size": args.batch,
                    "torch_threads": args.torch_threads,
                    "repeats": args.repeats,
                    "cpu_load": "one other process: a Python busy loop" if args.cpu_load else None,
                },
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
