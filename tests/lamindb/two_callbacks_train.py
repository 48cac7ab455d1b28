"""A training process with two ``Checkpoint`` callbacks, for the crash tests of
``test_lamindb_outbox.py``: killed, then flushed or rerun.

Uses the tier's instance (LAMIN_SETTINGS_DIR/LAMIN_CACHE_DIR inherited from the test)
with non-loopback network blocked. Callback ``a`` monitors ``score`` (min) and names its
files ``a-{step}``; callback ``b`` monitors ``tier_metric`` (max) and names its files
``b-{step}``; both keep their top 2 and save last (``b``'s is ``last-v1.ckpt`` when they
share a folder, as with ``ModelCheckpoint``).

- ``--which a,b``: the callbacks in this run (a rerun may drop one).
- ``--block``: each callback's checkpoint uploads pass until its second one, which writes
  ``{marker}.{name}`` and blocks forever; the training thread, at the start of step
  ``--park-step``, waits for both markers, writes ``{marker}.parked`` and waits there
  (for the test's SIGKILL: no save is then cut between its write and its journal line).
- ``--resume``: ``fit(ckpt_path="last")``.

At the end (if it gets there) it writes ``--report``: per callback its key prefix and the
events it saw.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierData, TierModel, block_network, make_trainer
from outbox_train import SCORES, Events, Gate, Prefix

import lamin_lightning as ll


class Park(pl.Callback):
    """At the start of step ``step``: once every marker exists, write ``parked`` and wait
    (for the parent's SIGKILL)."""

    def __init__(self, step: int, markers: list[Path], parked: Path) -> None:
        self.step, self.markers, self.parked = step, markers, parked

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        while not all(m.exists() for m in self.markers):
            threading.Event().wait(0.05)
        self.parked.write_text("parked")
        threading.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath-a", type=Path, required=True)
    parser.add_argument("--dirpath-b", type=Path, required=True)
    parser.add_argument("--which", default="a,b")
    parser.add_argument("--block", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--park-step", type=int, default=5)
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--filename", default=None, help="both callbacks' template")
    parser.add_argument("--no-counter", action="store_true", help="enable_version_counter=False")
    args = parser.parse_args()

    guard = pytest.MonkeyPatch()
    block_network(guard)
    settings = {
        "a": {"dirpath": args.dirpath_a, "monitor": "score", "mode": "min"},
        "b": {"dirpath": args.dirpath_b, "monitor": "tier_metric", "mode": "max"},
    }
    callbacks: dict[str, ll.Checkpoint] = {}
    observers: dict[str, Events] = {}
    prefixes: list[Prefix] = []
    for name in args.which.split(","):
        observers[name] = Events()
        callback = ll.Checkpoint(
            **settings[name],
            filename=args.filename or f"{name}-{{step}}",
            enable_version_counter=not args.no_counter,
            save_top_k=2,
            save_last=True,
            every_n_train_steps=1,
            max_pending=16,
            max_workers=2,
            flush_timeout=120,
            artifact_observers=[observers[name]],
        )
        marker = args.marker.with_name(f"{args.marker.name}.{name}")
        callback._artifact_publisher = Gate("block" if args.block else "plain", marker, 1)
        callbacks[name] = callback
        prefixes.append(Prefix(callback, args.report.with_name(f"{args.report.stem}.{name}")))
    markers = [args.marker.with_name(f"{args.marker.name}.{name}") for name in callbacks]
    parked = args.marker.with_name(f"{args.marker.name}.parked")
    extra = [Park(args.park_step, markers, parked)] if args.block else []
    trainer = make_trainer(
        args.dirpath_a.parent, [*callbacks.values(), *prefixes, *extra], max_steps=args.steps
    )
    trainer.fit(
        TierModel(scores=SCORES),
        datamodule=TierData(n=args.steps),
        ckpt_path="last" if args.resume else None,
    )
    args.report.write_text(
        json.dumps(
            {
                name: {"prefix": cb.checkpoint_key_prefix, "events": observers[name].seen}
                for name, cb in callbacks.items()
            }
        )
    )


if __name__ == "__main__":
    main()
