"""A training process of its own for ``test_lamindb_regressions.py``.

Uses the tier's instance (LAMIN_SETTINGS_DIR/LAMIN_CACHE_DIR inherited from the test)
with non-loopback network blocked. Two commands:

``crash``: train ``TierModel(scores=--scores)`` with ``ll.Checkpoint(dirpath,
monitor="score", mode="min", save_top_k=--top-k, every_n_train_steps=1)``. Checkpoint
uploads of steps above ``--let-through`` block forever (storage hangs), so their jobs
stay queued; ``max_pending`` is large, so training never waits for them. At the start
of the batch after ``--freeze-at`` steps (every save and removal of those steps is
done and journaled), and once ``--committed`` checkpoints were saved (committed and
delivered), the process writes ``--view`` (atomically) and freezes: the test then
kills it (SIGKILL). The view is Lightning's state at that moment:

- ``prefix``: the callback's ``checkpoint_key_prefix``;
- ``best_model_path``: file name of Lightning's best checkpoint;
- ``best_k_models``: file name -> score of Lightning's top-k checkpoints;
- ``files``: the ``.ckpt`` files in ``--dirpath``;
- ``saved``: keys of the checkpoint artifacts saved before the freeze;
- ``committed_in_time``: whether ``--committed`` saves arrived in time.

``--artifact-feature NAME=VALUE`` annotates every checkpoint with a user feature
(``features={"artifact": {NAME: VALUE}}``).

``systemexit``: train ``--steps`` steps, ``save_top_k=-1``, a checkpoint every step.
The first checkpoint's saved event raises ``SystemExit(--code)``, from an observer
(``--raise-in observer``) or from the callback's own ``on_artifact_saved`` hook
(``--raise-in hook``), once the training thread has submitted the checkpoint of step
``--after-step`` (so later jobs are queued behind it). Right before raising it arms a
watchdog (``faulthandler``): if training has not ended ``--watchdog`` seconds later,
the process dumps every thread's stack and exits with code 1. At the end it writes
``--report``: the key prefix, how ``fit`` ended (``raised``, ``code``), the persistence
stats after ``fit`` and the saved events a second (recording) observer received.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierData, TierModel, block_network, make_trainer

import lamin_lightning as ll

_STEP = re.compile(r"step=(\d+)")


class Gate(ll.LaminArtifactPublisher):
    """Checkpoint uploads of steps above ``let_through`` block forever."""

    def __init__(self, let_through: int) -> None:
        self.let_through = let_through

    def create_artifact(self, local_path: Any, **kwargs: Any) -> Any:
        found = _STEP.search(str(kwargs.get("key", "")))
        if found is not None and int(found.group(1)) > self.let_through:
            threading.Event().wait()  # a transfer in flight, forever
        return super().create_artifact(local_path, **kwargs)


class Saved:
    """Records the keys of saved checkpoint events; lets a thread wait for a count."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.keys: list[str] = []

    def on_artifact_saved(self, event: Any) -> None:
        if event.kind != "checkpoint":
            return
        with self.cond:
            self.keys.append(event.key)
            self.cond.notify_all()

    def on_artifact_removed(self, event: Any) -> None:
        del event

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.keys) >= count, timeout)


class Freeze(pl.Callback):
    """At the start of the batch after ``at_step`` steps: write the view, then hang."""

    def __init__(
        self, callback: ll.Checkpoint, saved: Saved, at_step: int, committed: int, view: Path
    ) -> None:
        self.callback, self.saved, self.at_step = callback, saved, at_step
        self.committed, self.view = committed, view

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step < self.at_step:
            return
        in_time = self.saved.wait(self.committed, timeout=300)
        callback = self.callback
        dirpath = Path(str(callback.dirpath))
        view = {
            "prefix": callback.checkpoint_key_prefix,
            "best_model_path": Path(callback.best_model_path).name,
            "best_k_models": {
                Path(path).name: float(score) for path, score in callback.best_k_models.items()
            },
            "files": sorted(p.name for p in dirpath.glob("*.ckpt")),
            "saved": list(self.saved.keys),
            "committed_in_time": in_time,
        }
        partial = self.view.with_suffix(".partial")
        partial.write_text(json.dumps(view))
        partial.replace(self.view)
        threading.Event().wait()  # frozen until the test kills this process


def crash(args: argparse.Namespace) -> None:
    features = None
    if args.artifact_feature:
        name, _, value = args.artifact_feature.partition("=")
        features = {"artifact": {name: value}}
    saved = Saved()
    callback = ll.Checkpoint(
        dirpath=args.dirpath,
        features=features,  # type: ignore[arg-type]
        monitor="score",
        mode="min",
        save_top_k=args.top_k,
        every_n_train_steps=1,
        max_workers=2,
        max_pending=64,
        artifact_observers=[saved],
    )
    callback._artifact_publisher = Gate(args.let_through)
    steps = args.freeze_at + 2
    freeze = Freeze(callback, saved, args.freeze_at, args.committed, args.view)
    trainer = make_trainer(args.dirpath.parent, [callback, freeze], max_steps=steps)
    scores = [float(s) for s in args.scores.split(",")]
    trainer.fit(TierModel(scores=scores), datamodule=TierData(n=steps))
    raise SystemExit("the training process was not frozen (nor killed)")


class ExitOnce:
    """Raises SystemExit(code) for the first checkpoint's saved event, once ``submitted``
    is set; arms the watchdog first."""

    def __init__(self, submitted: threading.Event, code: int, watchdog: float) -> None:
        self.submitted, self.code, self.watchdog = submitted, code, watchdog
        self.key: str | None = None
        self.gate_timed_out = False

    def __call__(self, event: Any) -> None:
        if event.kind != "checkpoint" or self.key is not None:
            return
        self.key = event.key
        self.gate_timed_out = not self.submitted.wait(timeout=300)
        faulthandler.dump_traceback_later(self.watchdog, exit=True)
        raise SystemExit(self.code)


class ExitingObserver:
    def __init__(self, exit_once: ExitOnce) -> None:
        self.exit_once = exit_once

    def on_artifact_saved(self, event: Any) -> None:
        self.exit_once(event)

    def on_artifact_removed(self, event: Any) -> None:
        del event


class ExitingCheckpoint(ll.Checkpoint):
    """A Checkpoint whose ``on_artifact_saved`` hook raises SystemExit once."""

    exit_once: ExitOnce | None = None

    def on_artifact_saved(self, event: Any) -> None:
        super().on_artifact_saved(event)
        if self.exit_once is not None:
            self.exit_once(event)


class Submitted(pl.Callback):
    """Sets ``event`` at the start of the batch after ``after_step`` steps (by then the
    checkpoint of step ``after_step`` was submitted: checkpoint callbacks run last)."""

    def __init__(self, event: threading.Event, after_step: int) -> None:
        self.event, self.after_step = event, after_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.after_step:
            self.event.set()


def systemexit(args: argparse.Namespace) -> None:
    submitted = threading.Event()
    exit_once = ExitOnce(submitted, args.code, args.watchdog)
    recorder = Saved()
    observers: list[Any] = [recorder]
    if args.raise_in == "observer":
        observers.append(ExitingObserver(exit_once))
    callback = ExitingCheckpoint(
        dirpath=args.dirpath,
        monitor="score",
        save_top_k=-1,
        every_n_train_steps=1,
        max_workers=2,
        max_pending=4,
        flush_timeout=120,
        artifact_observers=observers,
    )
    if args.raise_in == "hook":
        callback.exit_once = exit_once
    trainer = make_trainer(
        args.dirpath.parent,
        [callback, Submitted(submitted, args.after_step)],
        max_steps=args.steps,
    )
    outcome: dict[str, Any] = {"raised": None}
    try:
        trainer.fit(TierModel(scores=[5.0, 3.0, 4.0, 1.0]), datamodule=TierData(n=args.steps))
    except SystemExit as exit_:
        outcome = {"raised": "SystemExit", "code": exit_.code}
    except BaseException as error:  # reported to the test
        outcome = {"raised": type(error).__name__, "message": str(error)}
    finally:
        faulthandler.cancel_dump_traceback_later()
    stats = callback.persistence_stats
    args.report.write_text(
        json.dumps(
            {
                **outcome,
                "prefix": callback.checkpoint_key_prefix,
                "exit_raised_for": exit_once.key,
                "gate_timed_out": exit_once.gate_timed_out,
                "pending": stats.pending,
                "failed": stats.failed,
                "saved_events": recorder.keys,
            }
        )
    )
    # Interpreter exit must not hang either (a thread left behind).
    faulthandler.dump_traceback_later(args.watchdog, exit=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    crash_parser = commands.add_parser("crash")
    crash_parser.add_argument("--dirpath", type=Path, required=True)
    crash_parser.add_argument("--view", type=Path, required=True)
    crash_parser.add_argument("--scores", required=True, help="comma-separated, one per step")
    crash_parser.add_argument("--top-k", type=int, default=3)
    crash_parser.add_argument("--freeze-at", type=int, required=True)
    crash_parser.add_argument("--let-through", type=int, default=0)
    crash_parser.add_argument("--committed", type=int, default=0)
    crash_parser.add_argument("--artifact-feature", default=None)
    exit_parser = commands.add_parser("systemexit")
    exit_parser.add_argument("--dirpath", type=Path, required=True)
    exit_parser.add_argument("--report", type=Path, required=True)
    exit_parser.add_argument("--raise-in", choices=["observer", "hook"], required=True)
    exit_parser.add_argument("--steps", type=int, default=8)
    exit_parser.add_argument("--after-step", type=int, default=3)
    exit_parser.add_argument("--code", type=int, default=3)
    exit_parser.add_argument("--watchdog", type=float, default=120.0)
    args = parser.parse_args()

    guard = pytest.MonkeyPatch()
    block_network(guard)
    if args.command == "crash":
        crash(args)
    else:
        systemexit(args)


if __name__ == "__main__":
    main()
