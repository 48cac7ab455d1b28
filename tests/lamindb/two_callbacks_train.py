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
- ``--free NAME``: with ``--block``, that callback's uploads all pass; the training
  thread, before it parks, waits until every job of that callback was persisted.
- ``--resume``: ``fit(ckpt_path="last")``.
- ``--hold``: every checkpoint upload (replays and this run's saves) waits until
  training ended (``on_train_end``), so that every commit comes after the last save.
- ``--dirpath-a none`` (or ``b``): that callback gets ``dirpath=None``, and Lightning
  derives its folder at setup: ``{--root}/checkpoints``, or with ``--logger`` the
  CSV logger's ``{--root}/lightning_logs/version_N/checkpoints`` (a new version each run;
  ``--logger NAME``: the version ``NAME`` in every run).

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


class Where(Prefix):
    """Writes, beside the key prefix, the callback's folder (``{path}.dir``) at train start."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.path.with_name(f"{self.path.name}.dir").write_text(str(self.callback.dirpath))


class Release(pl.Callback):
    """At the end of training, writes the file that lets the held uploads (``--hold``) go."""

    def __init__(self, release: Path) -> None:
        self.release = release

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.release.write_text("trained")


class Park(pl.Callback):
    """At the start of step ``step``: once every marker exists, write ``parked`` and wait
    (for the parent's SIGKILL)."""

    def __init__(
        self, step: int, markers: list[Path], parked: Path, free: list[ll.Checkpoint] = ()
    ) -> None:
        self.step, self.markers, self.parked, self.free = step, markers, parked, free

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        while not all(m.exists() for m in self.markers):
            threading.Event().wait(0.05)
        for callback in self.free:
            pipeline = callback._submitter.pipeline if callback._submitter else None
            assert pipeline is None or pipeline.flush(timeout=120)
        self.parked.write_text("parked")
        threading.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath-a", required=True, help="a folder, or none")
    parser.add_argument("--dirpath-b", required=True, help="a folder, or none")
    parser.add_argument("--root", type=Path, default=None, help="default: dirpath-a's parent")
    parser.add_argument(
        "--logger", nargs="?", const="", default=None, help="a CSVLogger under --root [version]"
    )
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--which", default="a,b")
    parser.add_argument("--block", action="store_true")
    parser.add_argument("--free", default="", help="with --block: this callback's pass")
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
    dirpaths = {
        name: None if given == "none" else Path(given)
        for name, given in (("a", args.dirpath_a), ("b", args.dirpath_b))
    }
    settings = {
        "a": {"dirpath": dirpaths["a"], "monitor": "score", "mode": "min"},
        "b": {"dirpath": dirpaths["b"], "monitor": "tier_metric", "mode": "max"},
    }
    callbacks: dict[str, ll.Checkpoint] = {}
    observers: dict[str, Events] = {}
    prefixes: list[Where] = []
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
        free = name in args.free.split(",")
        mode = "block" if args.block and not free else "gate" if args.hold else "plain"
        callback._artifact_publisher = Gate(mode, marker, 0 if args.hold else 1)
        callbacks[name] = callback
        prefixes.append(Where(callback, args.report.with_name(f"{args.report.stem}.{name}")))
    free = [callbacks[name] for name in args.free.split(",") if name]
    markers = [
        args.marker.with_name(f"{args.marker.name}.{name}")
        for name in callbacks
        if callbacks[name] not in free
    ]
    parked = args.marker.with_name(f"{args.marker.name}.parked")
    extra: list[pl.Callback] = [Park(args.park_step, markers, parked, free)] if args.block else []
    if args.hold:  # Gate waits for {marker}.release
        extra.append(Release(args.marker.with_name(f"{args.marker.name}.release")))
    root = args.root or Path(args.dirpath_a).parent
    trainer = make_trainer(
        root,
        [*callbacks.values(), *prefixes, *extra],
        max_steps=args.steps,
        logger=False
        if args.logger is None
        else pl.loggers.CSVLogger(str(root), version=args.logger or None),
    )
    trainer.fit(
        TierModel(scores=SCORES),
        datamodule=TierData(n=args.steps),
        ckpt_path="last" if args.resume else None,
    )
    args.report.write_text(
        json.dumps(
            {
                name: {
                    "prefix": cb.checkpoint_key_prefix,
                    "dirpath": str(cb.dirpath),
                    "events": observers[name].seen,
                }
                for name, cb in callbacks.items()
            }
        )
    )


if __name__ == "__main__":
    main()
