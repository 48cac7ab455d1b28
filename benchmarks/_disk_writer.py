"""A competing disk writer: 64 MiB files written and fsynced in a loop, until stopped.

``python _disk_writer.py --dir DIR [--size-mib 64] [--stats FILE]``

Stands in for what keeps a training machine's disk busy besides the checkpoint callback:
uploads reading and copying checkpoints, other jobs, data loading caches. Each round
writes one file of ``--size-mib`` MiB in 4 MiB ``write(2)`` calls, fsyncs it and closes
it, alternating between two names in ``DIR`` (so the disk keeps receiving new
data, but the folder never holds more than two files). On SIGTERM it finishes the
current ``write`` (not the file), removes its files, and writes JSON to ``--stats``:
rounds completed, bytes written and the fsync durations (so a run can show that the
disk really was busy). Started and stopped (by PID) by ``_common.DiskLoad``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

CHUNK = 4 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--stats", type=Path, default=None)
    args = parser.parse_args()
    stopping = threading.Event()

    def stop(*_: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    args.dir.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(CHUNK)  # incompressible, in case the filesystem compresses
    chunks = max(1, (args.size_mib << 20) // CHUNK)
    names = [args.dir / f"disk-load-{os.getpid()}-{i}.bin" for i in range(2)]
    fsyncs: list[float] = []
    rounds = 0
    written = 0
    started = time.perf_counter()
    try:
        while not stopping.is_set():
            fd = os.open(names[rounds % 2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for _ in range(chunks):
                    if stopping.is_set():
                        break
                    written += os.write(fd, chunk)
                else:
                    synced = time.perf_counter()
                    os.fsync(fd)
                    fsyncs.append(time.perf_counter() - synced)
                    rounds += 1
            finally:
                os.close(fd)
    finally:
        for name in names:
            with contextlib.suppress(OSError):
                name.unlink()
        if args.stats is not None:
            elapsed = time.perf_counter() - started
            args.stats.write_text(
                json.dumps(
                    {
                        "rounds": rounds,
                        "bytes": written,
                        "seconds": elapsed,
                        "mib_per_s": written / 2**20 / elapsed if elapsed else 0.0,
                        "fsync_s": fsyncs,
                    }
                )
            )


if __name__ == "__main__":
    main()
