"""async_write on a CUDA device: the training-thread stall of 1 GiB and 8 GiB checkpoints.

Complements ``bench_async_write.py`` (268 MB checkpoints on CPU). Per checkpoint size
(``--sizes``, in GiB), each part in a fresh subprocess (so pinned host memory cached by
one part never serves another, and each has its own peak RSS), medians over
``--repeats`` after one warm-up:

- ``raw D2H``: what the machine achieves: one ``pinned.copy_(device, non_blocking=True)``
  of the whole size into a pre-allocated pinned host buffer, then
  ``torch.cuda.synchronize()``, in GB/s (1e9 bytes/s). Printed beside the device's name
  and the *nominal* unidirectional host link bandwidth where it can be known (from the
  name, e.g. H100/H200: PCIe Gen5 x16 ~63 GB/s, A100: Gen4 x16 ~31.5 GB/s; else from
  ``nvidia-smi``'s maximum link generation and width; else "unknown").
- ``snapshot``: ``Snapshotter.snapshot`` (the copy ``async_write=True`` makes on the
  training thread) of a realistic checkpoint dict (``state_dict`` of bf16 weights,
  ``optimizer_states`` with fp32 ``exp_avg``/``exp_avg_sq``, ``global_step``; tensors
  of up to 256 MiB on the device, totalling the size): the first call (host buffers
  allocated and pinned) and reuse calls separately, in ms and GB/s, and reuse GB/s over
  raw D2H GB/s. Also the device memory it allocates (none expected).
- ``fit stall``: a short ``Trainer(accelerator="cuda", devices=1)`` fit of a stack of
  bias-free ``nn.Linear`` layers whose weights total the size (SGD without momentum: no
  optimizer state), checkpointed every ``--every`` steps by ``MemoryCheckpoint`` with
  ``async_write=True`` (``max_snapshots=1``, ``save_top_k=-1``) and, as the reference,
  ``async_write=False`` (Lightning's synchronous ``torch.save``). The stall is the time
  the training thread spends inside ``_save_checkpoint`` (first checkpoint reported
  apart), with the part of it in ``Snapshotter.snapshot`` and any wait for a free
  snapshot slot. Recorded per save: growth of ``torch.cuda.max_memory_allocated()``
  (the snapshot must not need a second device buffer) and of the host's peak RSS.

  Before each checkpoint, outside the timed region, the fit waits until the previous
  one is written and persisted, then deletes the earlier checkpoint files (so the disk
  needs room for about one checkpoint, and what is timed is the save itself, never a
  wait behind the previous background write). The store is a ``MemoryStore`` whose
  ``put`` does not read the file (``MemoryStore.put`` reads and hashes all of it on the
  pipeline's thread: 8 GiB of reading that would only slow the run down).

Targets: snapshot reuse >= 0.80 x raw D2H; fit stall async / sync <= 0.10 (as in
``bench_async_write.py``); device memory growth during an async save <= 64 MiB.

A size is skipped, with the reason printed, when the device lacks ~2.25x its size free
(weights, gradients), the host ~2x (pinned buffers; the synchronous save's in-memory
copy) or the disk ~1.5x.

Without CUDA it prints "no CUDA device: nothing measured" and exits 0. ``--cpu-smoke``
runs the same code paths on CPU (tiny sizes: a test of the script, numbers meaningless,
no targets judged; both fit arms in one process, to save an import of Lightning),
writing ``async_write_cuda_cpu_smoke.json`` instead.

Usage::

    .venv/bin/python benchmarks/bench_async_write_cuda.py                  # 1 and 8 GiB
    .venv/bin/python benchmarks/bench_async_write_cuda.py --sizes 1 8 --repeats 5
    .venv/bin/python benchmarks/bench_async_write_cuda.py --quick          # 1 GiB, 2 repeats
    .venv/bin/python benchmarks/bench_async_write_cuda.py --cpu-smoke --sizes 0.01 --repeats 2

Results go to ``benchmarks/results/async_write_cuda.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Row,
    emit_result,
    no_read_store,
    peak_rss_bytes,
    print_rows,
    quiet,
    reset_peak_rss,
    rss_bytes,
    run_child,
    write_result,
)

NAME = "async_write_cuda"
GIB = 1 << 30
MIB = 1 << 20
GB = 1e9
UNIT_ELEMENTS = 64 * MIB  # per weight: 128 MiB of bf16, 256 MiB per fp32 optimizer state
LAYER_BYTES = 256 * MIB  # per nn.Linear of the fit's model (fp32)
SNAPSHOT_TARGET = 0.80
STALL_TARGET = 0.10
DEVICE_GROWTH_TARGET = 64 * MIB
DEVICE_FACTOR = 2.25
HOST_FACTOR = 2.0
DISK_FACTOR = 1.5
MARGIN = 1 * GIB
SETTLE_TIMEOUT_S = 900.0
ARMS = ("async", "sync")

PCIE_LANE_GBPS = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
"""Nominal GB/s per lane and direction of each PCIe generation (after line coding)."""

NOMINAL_LINKS: dict[str, tuple[str, float]] = {
    "GH200": ("NVLink-C2C", 450.0),
    "GB200": ("NVLink-C2C", 450.0),
    "B200": ("PCIe Gen5 x16", 63.0),
    "B100": ("PCIe Gen5 x16", 63.0),
    "H200": ("PCIe Gen5 x16", 63.0),
    "H100": ("PCIe Gen5 x16", 63.0),
    "H800": ("PCIe Gen5 x16", 63.0),
    "H20": ("PCIe Gen5 x16", 63.0),
    "L40S": ("PCIe Gen4 x16", 31.5),
    "L40": ("PCIe Gen4 x16", 31.5),
    "L4": ("PCIe Gen4 x16", 31.5),
    "A100": ("PCIe Gen4 x16", 31.5),
    "A800": ("PCIe Gen4 x16", 31.5),
    "A40": ("PCIe Gen4 x16", 31.5),
    "A30": ("PCIe Gen4 x16", 31.5),
    "A10": ("PCIe Gen4 x16", 31.5),
    "A10G": ("PCIe Gen4 x16", 31.5),
    "V100": ("PCIe Gen3 x16", 15.75),
    "T4": ("PCIe Gen3 x16", 15.75),
}
"""Nominal unidirectional host link of known devices, by a word of their name (SXM and
PCIe boards alike: both reach the host over PCIe, except the Grace superchips)."""


# -- what the machine has ---------------------------------------------------------------------


def host_available_bytes() -> int:
    """Memory the host can still give (MemAvailable; free pages where it is not known)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def no_room(size: int, on_cuda: bool, workdir: Path | None = None) -> str | None:
    """Why a checkpoint of ``size`` bytes does not fit here, or None if it does."""
    import torch

    host = host_available_bytes()
    if host < HOST_FACTOR * size + MARGIN:
        return (
            f"host has {host / GIB:.1f} GiB available, needs"
            f" {(HOST_FACTOR * size + MARGIN) / GIB:.1f} GiB"
        )
    if on_cuda:
        free, _total = torch.cuda.mem_get_info()
        if free < DEVICE_FACTOR * size + MARGIN:
            return (
                f"device has {free / GIB:.1f} GiB free, needs"
                f" {(DEVICE_FACTOR * size + MARGIN) / GIB:.1f} GiB"
            )
    if workdir is not None:
        disk = shutil.disk_usage(workdir).free
        if disk < DISK_FACTOR * size + MARGIN:
            return (
                f"{workdir} has {disk / GIB:.1f} GiB free on disk, needs"
                f" {(DISK_FACTOR * size + MARGIN) / GIB:.1f} GiB"
            )
    return None


def nvidia_smi_link(uuid: str | None) -> tuple[int, int] | None:
    """The device's maximum PCIe generation and width, as ``nvidia-smi`` reports them."""
    command = [
        "nvidia-smi",
        "--query-gpu=pcie.link.gen.max,pcie.link.width.max",
        "--format=csv,noheader,nounits",
    ]
    if uuid:
        command += ["-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
        generation, width = (int(v) for v in out.stdout.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return generation, width


def device_info(on_cuda: bool) -> dict[str, Any]:
    """The device's name and its nominal host link bandwidth (None where unknown)."""
    import torch

    if not on_cuda:
        return {"name": "cpu (smoke)", "nominal_link": None, "nominal_gbps": None}
    properties = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    info: dict[str, Any] = {
        "name": name,
        "memory_gib": round(properties.total_memory / GIB, 1),
        "torch_cuda": torch.version.cuda,
        "nominal_link": None,
        "nominal_gbps": None,
        "nominal_source": None,
    }
    uuid = getattr(properties, "uuid", None)
    smi = nvidia_smi_link(str(uuid) if uuid is not None else None)
    if smi is not None and smi[0] in PCIE_LANE_GBPS:
        info["nvidia_smi_link"] = f"PCIe Gen{smi[0]} x{smi[1]}"
        info["nvidia_smi_gbps"] = round(PCIE_LANE_GBPS[smi[0]] * smi[1], 1)
    words = set(re.split(r"[\s_\-]+", name.upper()))
    known = next((link for word, link in NOMINAL_LINKS.items() if word in words), None)
    if known is not None:
        info.update(nominal_link=known[0], nominal_gbps=known[1], nominal_source="device name")
    elif "nvidia_smi_link" in info:
        info.update(
            nominal_link=info["nvidia_smi_link"],
            nominal_gbps=info["nvidia_smi_gbps"],
            nominal_source="nvidia-smi (max generation and width)",
        )
    return info


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_memory(on_cuda: bool) -> None:
    """Give cached device and pinned host memory back (where this torch can)."""
    import gc

    import torch

    gc.collect()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for empty_host in (
            getattr(torch.cuda, "empty_host_cache", None),
            getattr(torch._C, "_host_emptyCache", None),
        ):
            if empty_host is not None:
                empty_host()
                break


# -- child: raw D2H and Snapshotter.snapshot -------------------------------------------------


def checkpoint_dict(size: int, device: str) -> dict[str, Any]:
    """A checkpoint of ~``size`` bytes of tensors on ``device``: bf16 weights (2 bytes per
    element) and two fp32 Adam states each (8 bytes), chunked to at most 256 MiB a tensor."""
    import torch

    elements = size // 10
    unit = min(UNIT_ELEMENTS, max(1, math.ceil(elements / 4)))  # a few tensors even if tiny
    state_dict: dict[str, Any] = {}
    state: dict[int, Any] = {}
    index = 0
    while elements > 0:
        n = min(unit, elements)
        state_dict[f"blocks.{index}.weight"] = torch.full(
            (n,), 0.5 + index, dtype=torch.bfloat16, device=device
        )
        state[index] = {
            "step": torch.tensor(10.0),  # on CPU, as Adam keeps it
            "exp_avg": torch.full((n,), 1.0 + index, dtype=torch.float32, device=device),
            "exp_avg_sq": torch.full((n,), 2.0 + index, dtype=torch.float32, device=device),
        }
        elements -= n
        index += 1
    return {
        "epoch": 0,
        "global_step": 1000,
        "state_dict": state_dict,
        "optimizer_states": [
            {
                "state": state,
                "param_groups": [
                    {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "params": list(state)}
                ],
            }
        ],
        "lr_schedulers": [],
    }


def tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def measure_copies(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Child: ``Snapshotter.snapshot`` (first call, reuse) and the raw D2H copy."""
    import torch

    from lamin_lightning._local_write import Snapshotter

    on_cuda = not args.cpu_smoke
    device = "cuda" if on_cuda else "cpu"
    result: dict[str, Any] = {"device": device_info(on_cuda)}
    reason = no_room(size, on_cuda)
    if reason is not None:
        return {**result, "skipped": reason}

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    checkpoint = checkpoint_dict(size, device)
    total = tensor_bytes(checkpoint)
    tensors = len(checkpoint["state_dict"]) * 3
    sync()
    base = torch.cuda.memory_allocated() if on_cuda else 0
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    snapshotter = Snapshotter(1)
    slot, _waited = snapshotter.acquire()
    started = time.perf_counter()
    host = Snapshotter.snapshot(checkpoint, slot)
    first = time.perf_counter() - started
    reuses: list[float] = []
    for i in range(1 + args.repeats):  # one warm-up reuse, then the timed ones
        sync()
        started = time.perf_counter()
        host = Snapshotter.snapshot(checkpoint, slot)
        if i:
            reuses.append(time.perf_counter() - started)
    device_growth = torch.cuda.max_memory_allocated() - base if on_cuda else 0
    first_weight = next(iter(checkpoint["state_dict"]))
    if not torch.equal(
        host["state_dict"][first_weight], checkpoint["state_dict"][first_weight].cpu()
    ):
        raise AssertionError("the snapshot differs from the checkpoint")
    pinned = all(b.is_pinned() for b in slot.buffers if b.numel()) if on_cuda else False
    snapshotter.release(slot)
    del host, slot, snapshotter, checkpoint
    free_memory(on_cuda)

    source = torch.ones(total, dtype=torch.uint8, device=device)
    target = torch.empty(total, dtype=torch.uint8, device="cpu", pin_memory=on_cuda)
    raw: list[float] = []
    for i in range(1 + args.repeats):
        sync()
        started = time.perf_counter()
        target.copy_(source, non_blocking=on_cuda)
        sync()
        if i:
            raw.append(time.perf_counter() - started)
    reuse = statistics.median(reuses)
    raw_median = statistics.median(raw)
    result.update(
        bytes=total,
        tensors=tensors,
        snapshot_first_s=first,
        snapshot_reuse_s=reuses,
        snapshot_reuse_median_s=reuse,
        snapshot_first_gbps=total / first / GB,
        snapshot_reuse_gbps=total / reuse / GB,
        snapshot_buffers_pinned=pinned,
        snapshot_device_growth_bytes=device_growth,
        raw_d2h_s=raw,
        raw_d2h_median_s=raw_median,
        raw_d2h_gbps=total / raw_median / GB,
        snapshot_over_raw=(total / reuse) / (total / raw_median),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    return result


# -- child: one fit, async or sync -----------------------------------------------------------


def fit_stall(arm: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Child: a short fit checkpointed with ``async_write`` on (``async``) or off (``sync``);
    the training thread's time in ``_save_checkpoint`` per checkpoint."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from lamin_lightning import RetryPolicy
    from lamin_lightning._local_write import Snapshotter
    from lamin_lightning.testing import MemoryCheckpoint

    quiet()
    on_cuda = not args.cpu_smoke
    device = "cuda" if on_cuda else "cpu"
    root = Path(tempfile.mkdtemp(prefix=f"bench-async-write-cuda-{arm}-", dir=args.workdir))
    # Instrumentation of the snapshot (internals on purpose), put back when the fit ends.
    patched = {name: Snapshotter.__dict__[name] for name in ("snapshot", "acquire")}
    try:
        reason = no_room(size, on_cuda, root)
        if reason is not None:
            return {"arm": arm, "skipped": reason}
        layers = max(2, round(size / LAYER_BYTES))
        width = int(math.sqrt(size / layers / 4))
        checkpoints = args.repeats + 1
        steps = checkpoints * args.every
        file_sizes: list[int] = []

        class Stack(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.ModuleList(
                    nn.Linear(width, width, bias=False, device=device) for _ in range(layers)
                )

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                x = batch
                for layer in self.layers:
                    x = layer(x)
                return x.pow(2).mean()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=1e-4)

        class Batches(Dataset[Any]):
            def __init__(self) -> None:
                self.batch = torch.randn(args.batch, width)

            def __len__(self) -> int:
                return steps

            def __getitem__(self, index: int) -> Any:
                return self.batch

        stalls: list[float] = []
        settles: list[float] = []
        device_growth: list[int] = []
        rss_growth: list[int] = []
        snapshots: list[float] = []
        slot_waits: list[float] = []

        class Timed(MemoryCheckpoint):
            def settle(self) -> None:
                """Wait for the previous checkpoint's write and persistence; delete its file."""
                deadline = time.monotonic() + SETTLE_TIMEOUT_S
                while self.persistence_stats.pending:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the previous checkpoint was not persisted in time")
                    time.sleep(0.005)
                for old in Path(str(self.dirpath)).glob("*.ckpt"):
                    old.unlink()

            def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
                started = time.perf_counter()
                self.settle()
                if on_cuda:
                    torch.cuda.synchronize()  # the training step's kernels: not the save's
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                rss_before = rss_bytes()
                reset_peak_rss()
                settles.append(time.perf_counter() - started)
                started = time.perf_counter()
                super()._save_checkpoint(trainer, filepath)
                stalls.append(time.perf_counter() - started)
                if on_cuda:
                    device_growth.append(torch.cuda.max_memory_allocated() - base)
                rss_growth.append(peak_rss_bytes() - rss_before)

        original_snapshot = Snapshotter.snapshot

        def timed_snapshot(checkpoint: dict[str, Any], slot: Any) -> dict[str, Any]:
            started = time.perf_counter()
            result = original_snapshot(checkpoint, slot)
            snapshots.append(time.perf_counter() - started)
            return result

        def timed_acquire(self: Snapshotter) -> Any:
            slot, waited = patched["acquire"](self)
            slot_waits.append(waited)
            return slot, waited

        Snapshotter.snapshot = staticmethod(timed_snapshot)  # type: ignore[method-assign]
        Snapshotter.acquire = timed_acquire  # type: ignore[method-assign]

        callback = Timed(
            no_read_store(file_sizes),
            dirpath=root / "ckpt",
            async_write=arm == "async",
            max_snapshots=1,
            every_n_train_steps=args.every,
            save_top_k=-1,
            max_pending=checkpoints + 1,
            retry=RetryPolicy.no_delay(),
        )
        torch.manual_seed(0)
        model = Stack()
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        trainer = pl.Trainer(
            accelerator="cuda" if on_cuda else "cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[callback],
            default_root_dir=str(root),
        )
        started = time.perf_counter()
        trainer.fit(model, DataLoader(Batches(), batch_size=None))
        fit_wall = time.perf_counter() - started
        if len(stalls) != checkpoints:
            raise AssertionError(f"{len(stalls)} checkpoints saved, {checkpoints} expected")
        measured = stalls[1:]
        return {
            "arm": arm,
            "layers": layers,
            "width": width,
            "parameter_bytes": parameter_bytes,
            "checkpoint_bytes": max(file_sizes, default=0),
            "checkpoints": checkpoints,
            "stalls_s": stalls,
            "stall_first_s": stalls[0],
            "stall_median_s": statistics.median(measured),
            "snapshot_s": snapshots,
            "snapshot_median_s": statistics.median(snapshots[1:]) if snapshots else None,
            "slot_waits_s": slot_waits,
            "settle_s": settles,
            "device_growth_bytes": device_growth,
            "device_growth_max_bytes": max(device_growth, default=0),
            "rss_growth_bytes": rss_growth,
            "rss_growth_first_bytes": rss_growth[0],
            "rss_growth_max_later_bytes": max(rss_growth[1:], default=0),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "fit_wall_s": fit_wall,
            "persisted": callback.persistence_stats.saved,
        }
    finally:
        for name, original in patched.items():
            setattr(Snapshotter, name, original)
        shutil.rmtree(root, ignore_errors=True)


# -- parent ------------------------------------------------------------------------------------


def child(kind: str, gib: float, args: argparse.Namespace, arms: tuple[str, ...] = ()) -> Any:
    """One part of one size in a fresh process; ``{"error": ...}`` if it failed."""
    command = [
        str(Path(__file__).resolve()),
        "--child",
        kind,
        *(["--arms", *arms] if arms else []),
        "--sizes",
        str(gib),
        "--repeats",
        str(args.repeats),
        "--every",
        str(args.every),
        "--batch",
        str(args.batch),
    ]
    if args.workdir is not None:
        command += ["--workdir", str(args.workdir)]
    if args.cpu_smoke:
        command.append("--cpu-smoke")
    try:
        return run_child(command, timeout=1800)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def size_rows(label: str, copies: dict[str, Any], fits: dict[str, Any]) -> list[Row]:
    """The summary rows of one size."""
    rows: list[Row] = []
    if "raw_d2h_gbps" in copies:
        device = copies["device"]
        nominal = (
            f"nominal {device['nominal_gbps']} GB/s ({device['nominal_link']})"
            if device.get("nominal_gbps")
            else "nominal unknown"
        )
        rows.append(
            Row(
                f"raw D2H {label}",
                nominal,
                f"{copies['raw_d2h_gbps']:.1f} GB/s ({ms(copies['raw_d2h_median_s'])})",
                None,
            )
        )
        rows.append(
            Row(
                f"snapshot first call {label} (buffers pinned)",
                "-",
                f"{ms(copies['snapshot_first_s'])}, {copies['snapshot_first_gbps']:.1f} GB/s",
                None,
            )
        )
        ratio = copies["snapshot_over_raw"]
        rows.append(
            Row(
                f"snapshot reuse {label} / raw D2H",
                f">= {SNAPSHOT_TARGET:.2f}",
                f"{ratio:.2f} ({ms(copies['snapshot_reuse_median_s'])},"
                f" {copies['snapshot_reuse_gbps']:.1f} GB/s)",
                ratio >= SNAPSHOT_TARGET,
            )
        )
    ours, sync = fits.get("async", {}), fits.get("sync", {})
    if "stall_median_s" in ours and "stall_median_s" in sync:
        ratio = ours["stall_median_s"] / sync["stall_median_s"]
        rows.append(
            Row(
                f"fit stall async / sync torch.save {label}",
                f"<= {STALL_TARGET:.2f}",
                f"{ratio:.3f} ({ms(ours['stall_median_s'])} vs {ms(sync['stall_median_s'])};"
                f" first {ms(ours['stall_first_s'])} vs {ms(sync['stall_first_s'])})",
                ratio <= STALL_TARGET,
            )
        )
    if ours.get("device_growth_bytes"):
        growth = ours["device_growth_max_bytes"]
        rows.append(
            Row(
                f"fit device memory growth in async save {label}",
                f"<= {DEVICE_GROWTH_TARGET / MIB:.0f} MiB",
                f"{growth / MIB:.1f} MiB",
                growth <= DEVICE_GROWTH_TARGET,
            )
        )
    if "rss_growth_first_bytes" in ours:
        rows.append(
            Row(
                f"fit host peak RSS growth in save {label}",
                "-",
                f"async first {ours['rss_growth_first_bytes'] / MIB:.0f} MiB, later"
                f" {ours['rss_growth_max_later_bytes'] / MIB:.0f} MiB;"
                f" sync {sync.get('rss_growth_max_later_bytes', 0) / MIB:.0f} MiB",
                None,
            )
        )
    return rows


def print_size(label: str, copies: dict[str, Any], fits: dict[str, Any]) -> None:
    if "raw_d2h_gbps" in copies:
        print(
            f"  {label}: {copies['tensors']} tensors, {copies['bytes'] / GB:.2f} GB;"
            f" raw D2H {copies['raw_d2h_gbps']:.1f} GB/s; snapshot first"
            f" {ms(copies['snapshot_first_s'])} ({copies['snapshot_first_gbps']:.1f} GB/s),"
            f" reuse {ms(copies['snapshot_reuse_median_s'])}"
            f" ({copies['snapshot_reuse_gbps']:.1f} GB/s, {copies['snapshot_over_raw']:.2f}x raw);"
            f" buffers pinned: {copies['snapshot_buffers_pinned']};"
            f" device memory allocated by the snapshot:"
            f" {copies['snapshot_device_growth_bytes'] / MIB:.1f} MiB",
            flush=True,
        )
    for arm, fit in fits.items():
        if "stall_median_s" not in fit:
            continue
        snapshot = (
            f", of which snapshot {ms(fit['snapshot_median_s'])}, slot wait"
            f" {ms(max(fit['slot_waits_s'], default=0.0))} max"
            if fit.get("snapshot_median_s") is not None
            else ""
        )
        print(
            f"  {label} fit {arm:>5}: {fit['layers']} x Linear({fit['width']}),"
            f" checkpoint {fit['checkpoint_bytes'] / GB:.2f} GB; stall"
            f" {ms(fit['stall_median_s'])} (first {ms(fit['stall_first_s'])}){snapshot};"
            f" device growth {fit['device_growth_max_bytes'] / MIB:.1f} MiB max;"
            f" peak RSS growth first {fit['rss_growth_first_bytes'] / MIB:.0f} MiB, later"
            f" {fit['rss_growth_max_later_bytes'] / MIB:.0f} MiB; process peak RSS"
            f" {fit['peak_rss_bytes'] / MIB:.0f} MiB; fit {fit['fit_wall_s']:.1f}s",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=None, help="checkpoint sizes in GiB (1 8)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 GiB, 2 repeats")
    parser.add_argument("--every", type=int, default=2, help="steps between checkpoints")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the same code paths on CPU (use tiny --sizes, e.g. 0.01): a test of the script",
    )
    parser.add_argument("--child", choices=("copy", "fit"), help=argparse.SUPPRESS)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1.0] if args.quick else [1.0, 8.0]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1 or args.every < 1 or min(args.sizes) <= 0:
        parser.error("--repeats, --every and --sizes must be positive")

    if args.child:
        size = int(args.sizes[0] * GIB)
        if args.child == "copy":
            emit_result(measure_copies(size, args))
        else:
            emit_result({arm: fit_stall(arm, size, args) for arm in args.arms})
        return 0

    if not args.cpu_smoke and not cuda_available():
        print("no CUDA device: nothing measured (--cpu-smoke runs the code paths on CPU)")
        return 0

    started = time.perf_counter()
    mode = "cpu smoke: the CUDA code paths on CPU, numbers meaningless" if args.cpu_smoke else ""
    if mode:
        print(mode)
    results: dict[str, Any] = {}
    rows: list[Row] = []
    device: dict[str, Any] | None = None
    failed = False
    for gib in args.sizes:
        label = f"{gib:g} GiB"
        copies = child("copy", gib, args)
        if device is None and "device" in copies:
            device = copies["device"]
            nominal = (
                f"{device['nominal_gbps']} GB/s ({device['nominal_link']},"
                f" from the {device['nominal_source']})"
                if device.get("nominal_gbps")
                else "unknown"
            )
            print(f"device: {device['name']}; nominal host link (unidirectional): {nominal}")
            if device.get("nvidia_smi_link"):
                print(
                    f"nvidia-smi max link: {device['nvidia_smi_link']}"
                    f" ~{device['nvidia_smi_gbps']} GB/s nominal"
                )
        fits: dict[str, Any] = {}
        if "skipped" in copies or "error" in copies:
            what = "skipped" if "skipped" in copies else "failed"
            print(f"  {label}: {what}: {copies.get('skipped') or copies.get('error')}")
            failed = failed or "error" in copies
        else:
            # On CUDA each arm in a process of its own (its own pinned memory, peak RSS); the
            # CPU smoke runs both in one (each process spends ~10 s importing Lightning).
            for arms in [ARMS] if args.cpu_smoke else [(arm,) for arm in ARMS]:
                answer = child("fit", gib, args, arms)
                for arm in arms:
                    fits[arm] = answer.get(arm, answer)  # the whole answer: an error
            for arm in ARMS:
                if "skipped" in fits[arm]:
                    print(f"  {label} fit {arm}: skipped: {fits[arm]['skipped']}")
                if "error" in fits[arm]:
                    print(f"  {label} fit {arm}: failed: {fits[arm]['error']}")
                    failed = True
        print_size(label, copies, fits)
        results[label] = {"copies": copies, "fit": fits}
        rows.extend(size_rows(label, copies, fits))
    if args.cpu_smoke:
        rows = [Row(f"{r.scenario} [cpu smoke]", r.target, r.measured, None) for r in rows]
    print()
    if rows:
        print_rows(rows)
    payload = {
        "config": {
            "sizes_gib": args.sizes,
            "repeats": args.repeats,
            "every_n_train_steps": args.every,
            "batch": args.batch,
            "cpu_smoke": args.cpu_smoke,
            "fit_model": "bias-free nn.Linear stack, fp32, SGD without momentum",
            "store": "MemoryStore subclass whose put does not read the file",
            "snapshot_checkpoint": "bf16 weights + fp32 exp_avg/exp_avg_sq, <= 256 MiB each",
        },
        "device": device,
        "targets": {
            "snapshot_over_raw_min": SNAPSHOT_TARGET,
            "stall_async_over_sync_max": STALL_TARGET,
            "device_growth_max_bytes": DEVICE_GROWTH_TARGET,
        },
        "sizes": results,
    }
    path = write_result(f"{NAME}_cpu_smoke" if args.cpu_smoke else NAME, payload, rows)
    print(f"wrote {path} ({time.perf_counter() - started:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
