"""Run every benchmark in this folder (``bench_*.py``), in one process each.

Usage: ``python benchmarks/run.py [--quick]``. Each script prints its own table
of ratios measured side by side and writes JSON into ``benchmarks/results/``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run the benchmark scripts; return non-zero if any failed."""
    here = Path(__file__).resolve().parent
    scripts = sorted(here.glob("bench_*.py"))
    if not scripts:
        print("no benchmarks found", file=sys.stderr)
        return 1
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} {' '.join(argv)}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *argv])
        print(f"=== {script.name}: exit {code} after {time.perf_counter() - started:.0f}s")
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
