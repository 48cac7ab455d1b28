"""The durable outbox's cost on the training thread: journaling one job (write + fsync).

Every admitted job is appended to ``{dirpath}/.lamin-lightning/outbox-*.jsonl`` and
fsynced before ``_save_checkpoint`` returns (guarantee 8). This measures that append,
with a record the size of a real checkpoint job (snapshot, features, ranking), in the
same folder as a local ``torch.save`` of a small checkpoint, and prints both side by
side: the journal must be a small fraction of the local write it accompanies.

Usage::

    .venv/bin/python benchmarks/bench_outbox.py            # 300 appends
    .venv/bin/python benchmarks/bench_outbox.py --quick    # 50 appends
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 appends")
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    count = 50 if args.quick else args.appends
    root = Path(tempfile.mkdtemp(prefix="bench-outbox-", dir=args.workdir))
    try:
        outbox = Outbox(root / ".lamin-lightning" / "outbox-bench.jsonl")
        outbox.open()
        appends, saves = [], []
        model = torch.nn.Linear(256, 256)  # ~0.26 MB, like bench_backpressure's checkpoints
        for i in range(count):
            started = time.perf_counter()
            torch.save(model.state_dict(), root / f"step={i}.ckpt")
            saved = time.perf_counter()
            job_id = outbox.append(RECORD)
            appended = time.perf_counter()
            saves.append(saved - started)
            appends.append(appended - saved)
            outbox.settle(job_id, "saved")
            (root / f"step={i}.ckpt").unlink()
        outbox.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    append_ms = statistics.median(appends) * 1e3
    save_ms = statistics.median(saves) * 1e3
    print(f"{count} jobs, entry of {len(json.dumps(encode(RECORD)))} bytes, medians:")
    print(f"  journal append (O_DSYNC write) {append_ms:8.3f} ms")
    print(f"  local torch.save of 0.26 MB      {save_ms:8.3f} ms")
    print(f"  append / small local save        {append_ms / save_ms:8.3f}")
    print("  (a 268 MB checkpoint's local save takes ~900 ms here: see bench_async_write.py)")


if __name__ == "__main__":
    main()
