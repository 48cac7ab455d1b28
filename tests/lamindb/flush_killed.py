"""``lamin-lightning flush``, in-process, with outbox_train's kill hook installed.

    python flush_killed.py --kill-at STEP --kill-after N -- flush --no-progress DIR

The process SIGKILLs itself right after the N-th time a job of the flush passes
``STEP`` (``outbox_train.kill_points``); a point it never reaches lets the flush end
as the CLI would (its exit code). crash_sweep.py uses it to crash a recovery.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
from outbox_train import kill_at, kill_points

from lamin_lightning._cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", choices=sorted(kill_points()), required=True)
    parser.add_argument("--kill-after", type=int, default=1)
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    kill_at(pytest.MonkeyPatch(), args.kill_at, args.kill_after)
    sys.exit(main(cli))
