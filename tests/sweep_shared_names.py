"""A randomized sweep against Lightning's ``ModelCheckpoint``: each seed's ``random_case``
(see ``test_modelcheckpoint_differential``) plus one or two extra callbacks sharing file
names with it (no version counter, shared filenames and last names), with random
``async_write``, ``max_workers``, ``max_pending``. Not collected by pytest: run it by hand.
``--version-counter`` turns the extra callbacks' version counter on at random, and gives
some of them names that come back as the loss moves.

    .venv/bin/python tests/sweep_shared_names.py 10000 10300
    .venv/bin/python tests/sweep_shared_names.py 20000 20400 --async-checkpoint-io
    .venv/bin/python tests/sweep_shared_names.py 30000 30300 --version-counter

``--async-checkpoint-io`` gives our arm Lightning's ``AsyncCheckpointIO`` on most seeds
(Lightning's arm writes synchronously: what it should come to). Prints each mismatch and
a last line ``done LO-HI: N/M matched``; exits 1 if any seed differs.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import test_modelcheckpoint_differential as differential
from lamin_lightning.testing import MemoryCheckpoint

_async_io = {"on": False}
_Trainer = pl.Trainer


class _TrainerWithAsyncIO(_Trainer):  # stands in for pl.Trainer in the harness
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks") or []
        if _async_io["on"] and any(isinstance(c, MemoryCheckpoint) for c in callbacks):
            kwargs.setdefault("plugins", [AsyncCheckpointIO()])
        super().__init__(*args, **kwargs)


def extra_callbacks(rng: random.Random, *, versions: bool = False) -> list[dict[str, Any]]:
    extra = []
    for _ in range(rng.choice([1, 2])):
        monitor = rng.choice(["train_loss", None])
        options: dict[str, Any] = {
            "save_last": rng.choice([True, "link", None]),
            "save_top_k": rng.choice([0, 1, -1] if monitor is None else [0, 1, 2, -1]),
            "monitor": monitor,
            "mode": rng.choice(["min", "max"]),
            "enable_version_counter": False,
        }
        if rng.random() < 0.5:
            options["every_n_train_steps"] = rng.choice([1, 2])
        if rng.random() < 0.3:
            options["filename"] = rng.choice(["shared", "{epoch}", "x-{step}"])
        if versions:  # drawn last: the seeds without the flag stay as they were
            options["enable_version_counter"] = rng.random() < 0.6
            if rng.random() < 0.4:  # names that come back as the loss moves
                options["filename"] = rng.choice(["l-{train_loss:.1f}", "l-{train_loss:.0f}"])
        extra.append(options)
    return extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("low", type=int)
    parser.add_argument("high", type=int)
    parser.add_argument("--async-checkpoint-io", action="store_true")
    parser.add_argument(
        "--version-counter",
        action="store_true",
        help="extra callbacks with the version counter on, some with names that repeat",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    pl.Trainer = _TrainerWithAsyncIO  # type: ignore[misc]
    work = Path(tempfile.mkdtemp(prefix="sweep-"))
    differing = 0
    for seed in range(args.low, args.high):
        rng = random.Random(seed * 7919)
        case = differential.random_case(seed)
        train = {
            **case["train"],
            "extra_callbacks": extra_callbacks(rng, versions=args.version_counter),
        }
        knobs = {
            **case["knobs"],
            "async_write": rng.random() < 0.5,
            "max_workers": rng.choice([1, 4]),
            "max_pending": rng.choice([2, 8]),
        }
        last = rng.choice([None, "last-{step}", "mylast", case.get("last_name")])
        _async_io["on"] = args.async_checkpoint_io and rng.random() < 0.6
        try:
            problems = differential.compare(
                work / "case", case["opts"], train, knobs=knobs, last_name=last
            )
        except Exception as error:
            problems = [f"harness error {type(error).__name__}: {error}"]
        if problems:
            differing += 1
            print(
                f"seed {seed} async_checkpoint_io={_async_io['on']}: MISMATCH last={last}"
                f" knobs={knobs} extra={train['extra_callbacks']}\n   "
                + "\n   ".join(p[:300] for p in problems[:4]),
                flush=True,
            )
    shutil.rmtree(work, ignore_errors=True)
    total = args.high - args.low
    print(f"done {args.low}-{args.high}: {total - differing}/{total} matched", flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
