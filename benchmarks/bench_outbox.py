"""The outbox journal's cost on the training thread: the append, before and now, side by side.

Every admitted job is appended to ``{dirpath}/.lamin-lightning/outbox-*.jsonl`` before
``_save_checkpoint`` returns (guarantee 8). The append is one ``write(2)`` into the page
cache (durable against a process crash, like Lightning's own unsynced ``torch.save``);
the fsync runs later on a worker (``Outbox.sync``: one ``fdatasync`` for every line
before it), before the job's upload. Until issue 14 the append was one ``write(2)`` on
an ``O_APPEND|O_DSYNC`` descriptor instead: durable when it returned, so the training
thread waited for the disk.

Per job, in this order, in the same folder, with a record the size of a real
checkpoint job (snapshot, features, ranking):

- ``torch.save`` of a 0.26 MB checkpoint (a yardstick: a local write the training
  thread does anyway);
- ``O_DSYNC append (before)``: the same line (encoded the same way) written with one
  ``write(2)`` on an ``O_APPEND|O_DSYNC`` descriptor of a second journal;
- ``page-cache append (now)``: ``Outbox.append``;
- ``background fsync (now)``: ``Outbox.sync`` right after, the time a worker spends
  on it (not the training thread).

Conditions: ``quiet``, then ``disk load``: the same beside another process that writes
64 MiB files and fsyncs each, in a loop, in the same filesystem (``_disk_writer.py``,
started and stopped by PID). Prints medians and p95 of each; writes
``results/outbox.json``.

Usage::

    .venv/bin/python benchmarks/bench_outbox.py                    # 300 jobs per condition
    .venv/bin/python benchmarks/bench_outbox.py --quick            # 50 jobs per condition
    .venv/bin/python benchmarks/bench_outbox.py --condition quiet  # one condition only
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
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DiskLoad, Row, print_rows, smoke, write_result
from lamin_lightning import CheckpointSnapshot, JobRecord
from lamin_lightning._jobs import encode
from lamin_lightning._journal import Outbox

PREFIX = "lightning_logs/7KqTb2Zt/checkpoints"
KEY = f"{PREFIX}/epoch=3-step=400.ckpt"
LOCAL = "/data/run/checkpoints/epoch=3-step=400.ckpt"
STAGED = "/data/run/checkpoints/.lamin-lightning/staged/1-000004-0123456789ab/x.ckpt"
RANKING = tuple(f"{PREFIX}/epoch={i}.ckpt" for i in range(5))

RECORD = JobRecord(
    op="save",
    kind="checkpoint",
    key=KEY,
    local_path=LOCAL,
    staged_path=STAGED,
    store="lamindb",
    context={
        "instance": "anonymous/storage",
        "run_uid": "7KqTb2ZtWm1aQx9P",
        "prefix": PREFIX,
        "key_is_virtual": True,
    },
    checkpoint=CheckpointSnapshot(
        key=KEY,
        local_path=Path(LOCAL),
        staged_path=Path(STAGED),
        global_step=400,
        epoch=3,
        monitor="val_loss",
        mode="min",
        save_weights_only=False,
        score=0.123,
        is_best=True,
        best_key=KEY,
        last_key=KEY,
        ranking=RANKING,
        scores={key: 0.1 * i for i, key in enumerate(RANKING)},
        feature_values={f"feature_{i}": float(i) for i in range(12)},
        auto_features=frozenset(f"feature_{i}" for i in range(12)),
    ),
    submitted_at=0.0,
)


CONDITIONS = ("quiet", "disk load")
ARMS = {
    "save": "torch.save of 0.26 MB (yardstick)",
    "dsync": "O_DSYNC append (before)",
    "append": "page-cache append (now)",
    "sync": "background fsync (now, a worker)",
}


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _dsync_line(record: JobRecord) -> bytes:
    """The line the journal writes for a job, as the O_DSYNC version encoded it."""
    item = {"t": "job", "id": uuid.uuid4().hex, "entry": encode(record)}
    return (json.dumps(item, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def measure(root: Path, count: int) -> dict[str, list[float]]:
    """``count`` jobs; each arm's seconds per job, interleaved so they share the load."""
    outbox = Outbox(root / ".lamin-lightning" / "outbox-bench.jsonl")
    outbox.open()
    dsync_fd = os.open(
        root / ".lamin-lightning" / "outbox-dsync.jsonl",
        os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DSYNC,
        0o644,
    )
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    model = torch.nn.Linear(256, 256)  # ~0.26 MB, like bench_backpressure's checkpoints
    try:
        for i in range(count):
            path = root / f"step={i}.ckpt"
            started = time.perf_counter()
            torch.save(model.state_dict(), path)
            saved = time.perf_counter()
            line = _dsync_line(RECORD)
            view = memoryview(line)
            while view:
                view = view[os.write(dsync_fd, view) :]
            dsynced = time.perf_counter()
            job_id = outbox.append(RECORD)
            appended = time.perf_counter()
            outbox.sync()
            synced = time.perf_counter()
            times["save"].append(saved - started)
            times["dsync"].append(dsynced - saved)
            times["append"].append(appended - dsynced)
            times["sync"].append(synced - appended)
            outbox.settle(job_id, "saved")
            path.unlink()
    finally:
        os.close(dsync_fd)
        outbox.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 jobs per condition")
    parser.add_argument("--appends", type=int, default=300, help="jobs per condition")
    parser.add_argument("--condition", choices=CONDITIONS, default=None, help="default: both")
    parser.add_argument("--workdir", type=Path, default=None, help="default: the temp folder")
    args = parser.parse_args()
    count = 50 if args.quick else args.appends
    conditions = (args.condition,) if args.condition else CONDITIONS
    results: dict[str, Any] = {}
    for condition in conditions:
        root = Path(tempfile.mkdtemp(prefix="bench-outbox-", dir=args.workdir))
        try:
            load_summary = None
            if condition == "disk load":
                with DiskLoad(root / "disk-load") as load:
                    time.sleep(1.0)  # let the writer fill the disk's queue before measuring
                    times = measure(root, count)
                load_summary = load.summary()
            else:
                times = measure(root, count)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        results[condition] = {
            "seconds": times,
            "median_s": {arm: statistics.median(v) for arm, v in times.items()},
            "p95_s": {arm: _p95(v) for arm, v in times.items()},
            "max_s": {arm: max(v) for arm, v in times.items()},
            "disk_load": load_summary,
        }

    entry_bytes = len(json.dumps(encode(RECORD)))
    print(f"{count} jobs per condition, journal entry of {entry_bytes} bytes")
    for condition, result in results.items():
        disk = result["disk_load"]
        extra = (
            f": a writer at {disk['mib_per_s']:.0f} MiB/s, fsync of 64 MiB median"
            f" {(disk['fsync_median_s'] or 0) * 1e3:.0f} ms"
            if disk
            else ""
        )
        print(f"\n{condition}{extra}")
        print(f"  {'':36}{'median':>10}{'p95':>10}{'max':>10}")
        for arm, label in ARMS.items():
            print(
                f"  {label:36}{result['median_s'][arm] * 1e3:7.3f} ms"
                f"{result['p95_s'][arm] * 1e3:7.3f} ms{result['max_s'][arm] * 1e3:7.1f} ms"
            )
        ratio = result["median_s"]["append"] / result["median_s"]["dsync"]
        print(f"  page-cache append / O_DSYNC append (medians) {ratio:.3f}")
    print("(a 268 MB checkpoint's local save takes ~900 ms here: see bench_async_write.py)")

    rows = []
    for condition, result in results.items():
        median, p95 = result["median_s"], result["p95_s"]
        rows.append(
            Row(
                f"7 journal append on the training thread ({condition})",
                "(info)",
                f"{median['append'] * 1e3:.3f} ms, p95 {p95['append'] * 1e3:.3f} ms (O_DSYNC"
                f" before: {median['dsync'] * 1e3:.3f} ms, p95 {p95['dsync'] * 1e3:.3f} ms;"
                f" background fsync {median['sync'] * 1e3:.2f} ms)",
                None,
            )
        )
    print()
    rows = smoke(rows, args.quick)
    print_rows(rows)
    path = write_result(
        "outbox",
        {
            "config": {
                "jobs_per_condition": count,
                "entry_bytes": entry_bytes,
                "arms": ARMS,
                "disk_load": "another process writes 64 MiB files (4 MiB writes) and fsyncs"
                " each, in a loop, in the same filesystem",
            },
            "results": results,
        },
        rows,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
