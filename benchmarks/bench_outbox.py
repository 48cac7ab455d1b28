"""The durable outbox's cost on the training thread: journaling one job (write + fsync).

Every admitted job is appended to ``{dirpath}/.lamin-lightning/outbox-*.jsonl`` and
fsynced before ``_save_checkpoint`` returns (guarantee 8). This measures that append,
with an entry the size of a real checkpoint job (snapshot, features, ranking), in the
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

from lamin_lightning._outbox import Outbox

ENTRY = {
    "v": 1,
    "op": "save",
    "kind": "checkpoint",
    "key": "lightning_logs/7KqTb2Zt/checkpoints/epoch=3-step=400.ckpt",
    "local_path": "/data/run/checkpoints/epoch=3-step=400.ckpt",
    "staged": "/data/run/checkpoints/.lamin-lightning/staged/1-000004-0123456789ab/x.ckpt",
    "publisher": "lamin_lightning._lamin:Checkpoint",
    "context": {
        "instance": "anonymous/storage",
        "run_uid": "7KqTb2ZtWm1aQx9P",
        "checkpoint_key_prefix": "lightning_logs/7KqTb2Zt/checkpoints",
        "key_is_virtual": True,
    },
    "snapshot": {
        "global_step": 400,
        "epoch": 3,
        "monitor": "val_loss",
        "mode": "min",
        "save_weights_only": False,
        "score": 0.123,
        "is_best": True,
        "best_key": "lightning_logs/7KqTb2Zt/checkpoints/epoch=3-step=400.ckpt",
        "last_key": "lightning_logs/7KqTb2Zt/checkpoints/epoch=3-step=400.ckpt",
        "ranking": [f"lightning_logs/7KqTb2Zt/checkpoints/epoch={i}.ckpt" for i in range(5)],
        "scores": {f"k{i}": 0.1 * i for i in range(5)},
        "features": [[f"feature_{i}", float(i), True] for i in range(12)],
    },
    "time": 0.0,
}


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
            job_id = outbox.append(ENTRY)
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
    print(f"{count} jobs, entry of {len(json.dumps(ENTRY))} bytes, medians:")
    print(f"  journal append (O_DSYNC write) {append_ms:8.3f} ms")
    print(f"  local torch.save of 0.26 MB      {save_ms:8.3f} ms")
    print(f"  append / small local save        {append_ms / save_ms:8.3f}")
    print("  (a 268 MB checkpoint's local save takes ~900 ms here: see bench_async_write.py)")


if __name__ == "__main__":
    main()
