"""A training process of its own for the outbox tests: killed, terminated or rerun.

Uses the tier's instance (LAMIN_SETTINGS_DIR/LAMIN_CACHE_DIR inherited from the test)
with non-loopback network blocked. Checkpoint uploads go through a gate:

- ``--mode block``: the first ``--let-through`` checkpoint uploads pass; the next one
  writes ``--marker`` and blocks forever (the test then kills the process).
- ``--mode gate``: as ``block``, until the file ``--marker`` with suffix ``.release`` exists.
- ``--mode slow``: every checkpoint upload writes ``--marker`` and takes 0.3 s longer.
- ``--mode plain``: no gate.
- ``--teardown-marker PATH``: written when teardown's flush starts.
- ``--keep-files``: a CheckpointIO of the user's whose ``remove_checkpoint`` keeps the file.
- ``--folder``: a CheckpointIO of the user's that writes each checkpoint as a folder
  (``checkpoint_forms.FolderCheckpointIO``: three files, ``meta.json`` last, written in
  place as ``torch.distributed.checkpoint`` writes its shards); with ``--keep-files``,
  one that also keeps the folders Lightning evicts. ``--late`` wraps the CheckpointIO in
  Lightning's ``AsyncCheckpointIO``: each checkpoint is written after its save returned.
- ``--kill-at STEP --kill-after N``: the process SIGKILLs itself right after the N-th
  time a job reaches ``STEP`` (see ``KILL_POINTS``), on whichever thread that is.
  ``--kill-signal TERM`` sends itself SIGTERM there instead (Lightning's handling, then
  teardown's, run; the job goes on); ``--kill-signal INT`` SIGINT, as Ctrl+C does
  (KeyboardInterrupt on the main thread, wherever it is: Lightning's interrupted path,
  ``on_exception``, runs our flush, which does not wait). ``--again next`` sends the
  signal once more the next time a job reaches ``STEP``, ``--again shutdown`` when the
  callback's flush (``_shutdown``) starts after it: Ctrl+C pressed twice.
- ``--park-at STEP --park-after N``: as ``--kill-at``, but that thread writes ``--marker``
  and waits there, for the test to SIGKILL the process.
- ``--flush``: no training: replay the outbox of ``--dirpath`` (``flush_directory``, the
  kill and park points apply) and write ``--report`` with the events and what remains.
- ``--keep-files`` also appends each path the user's CheckpointIO kept to
  ``--report`` with suffix ``.removed`` (one a line, flushed and synced before it returns).

At the end (if it gets there) it writes ``--report``: the key prefix, Lightning's kept
set (file names) and the events it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # checkpoint_forms

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierData, TierModel, block_network, make_trainer
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import lamin_lightning as ll
from checkpoint_forms import FolderCheckpointIO
from lamin_lightning._lamin import LaminArtifactPublisher

SCORES = [5.0, 4.0, 6.0, 3.0, 7.0, 2.0, 8.0, 1.0, 9.0, 0.5]


class Gate(LaminArtifactPublisher):
    def __init__(self, mode: str, marker: Path, let_through: int) -> None:
        self.mode, self.marker, self.let_through = mode, marker, let_through
        self.count = 0
        self.lock = threading.Lock()

    def create_artifact(self, local_path: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("key", "")).endswith(".ckpt"):
            with self.lock:
                n, self.count = self.count, self.count + 1
            if self.mode == "block" and n >= self.let_through:
                self.marker.write_text(str(n))
                threading.Event().wait()  # a transfer in flight, forever
            if self.mode == "gate" and n >= self.let_through:
                self.marker.write_text(str(n))
                release = self.marker.with_suffix(".release")
                while not release.exists():  # the test creates it
                    threading.Event().wait(0.05)
            if self.mode == "slow":
                self.marker.write_text(str(n))
                time.sleep(0.3)  # latency injection: storage is slow, not broken
        return super().create_artifact(local_path, **kwargs)


def kill_points() -> dict[str, tuple[type, str]]:
    """Each step of a job, as the method that ends it (the process dies right after)."""
    from lamin_lightning._journal import Outbox
    from lamin_lightning._lamin_store import LaminStore
    from lamin_lightning._staging import Stager
    from lamin_lightning._submit import Submitter

    return {
        "journaled": (Outbox, "append"),  # training thread: the job's line, not admitted yet
        # an eviction's line, before the file is moved aside (Lightning's removal)
        "journaled_removal": (Outbox, "append"),
        "staged": (Stager, "stage"),  # intake: the staged link, no transfer yet
        "transferred": (LaminStore, "create"),  # worker: uploaded and recorded, not committed
        "committed": (LaminStore, "commit_checkpoint"),  # committed, the journal not marked
        "settled": (Outbox, "settle"),  # the journal marks the job finished
        # training thread: the evicted file moved aside, its removal not yet admitted
        "trashed": (Submitter, "trash_for_removal"),
        # training thread: last.ckpt moved aside for its rewrite, the new one not written
        "moved_aside": (Submitter, "move_aside"),
        # committer: a save's event delivered, the key's older artifact not deleted yet
        # (killed before the call, see BEFORE)
        "replacing": (LaminStore, "delete_replaced"),
        # training thread: an eviction journaled and its file handed to the user's
        # CheckpointIO (--keep-files), its removal not admitted yet (killed before)
        "removal_handed": (ll.Checkpoint, "_submit_record"),
        # committer: a save's artifact recorded and its features annotated, its flags not
        # written yet
        "annotated": (LaminStore, "_annotate"),
        # committer: a save's flags and ranks written, the commit not finished
        "flagged": (LaminStore, "_apply_flags"),
        # committer: an evicted checkpoint's artifact deleted (after its removed event),
        # the journal not marked yet
        "removal_deleted": (LaminStore, "delete_removal"),
    }


# Steps whose kill lands before the method runs, not after it.
BEFORE = {"replacing", "removal_handed"}


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _signal_self(sig: int) -> Any:
    """An action for :func:`kill_at`: send this process ``sig``."""
    return _sigkill_self if sig == signal.SIGKILL else lambda: os.kill(os.getpid(), sig)


def park(marker: Path) -> Any:
    """What ``--park-at`` does at its step: tell the parent (``marker``), and hold this
    thread there until the parent SIGKILLs the process."""

    def parked() -> None:
        marker.write_text("parked")
        threading.Event().wait()

    return parked


# Set once a kill_at action ran (the signal was sent).
FIRED = threading.Event()


def kill_at(
    guard: pytest.MonkeyPatch,
    step: str,
    after: int,
    action: Any = _sigkill_self,
    again: bool = False,
) -> None:
    """At the ``after``-th time a job reaches ``step``: ``action`` (SIGKILL this process);
    with ``again``, at the next time too."""
    from lamin_lightning._submit import _nothing_aside

    owner, name = kill_points()[step]
    real = getattr(owner, name)
    count = [0]
    lock = threading.Lock()
    when = {after, after + 1} if again else {after}

    def fire() -> None:
        FIRED.set()
        action()

    def ended(*args: Any, **kwargs: Any) -> Any:
        if step in BEFORE:
            with lock:
                if step == "replacing":
                    replacing = args[1].pk in args[0]._replaced
                else:  # removal_handed: Checkpoint._submit_record(self, trainer, record)
                    replacing = args[2].op == "remove"
                count[0] += replacing
                if replacing and count[0] in when:
                    fire()
            return real(*args, **kwargs)
        result = real(*args, **kwargs)
        if step == "journaled_removal" and args[1].op != "remove":
            return result
        if step == "moved_aside" and result is _nothing_aside:  # nothing there to move
            return result
        with lock:
            count[0] += 1
            if count[0] in when:
                fire()
        return result

    guard.setattr(owner, name, ended)


class KeepFiles(TorchCheckpointIO):
    """A user's CheckpointIO that keeps every checkpoint file Lightning evicts."""

    log: Path | None = None  # where each kept path is appended (--keep-files)

    def remove_checkpoint(self, path: Any) -> None:
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"{Path(path).name}\n")
                f.flush()
                os.fsync(f.fileno())


class KeepFolders(KeepFiles, FolderCheckpointIO):
    """A user's CheckpointIO writing folders that keeps every folder Lightning evicts."""


class Events:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def _record(self, event: Any) -> None:
        self.seen.append(
            {"type": type(event).__name__, "key": event.key, "recovered": event.recovered}
        )

    on_artifact_saved = on_artifact_removed = on_artifact_failed = _record


class Prefix(pl.Callback):
    def __init__(self, callback: ll.Checkpoint, path: Path) -> None:
        self.callback, self.path = callback, path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path.write_text(self.callback.checkpoint_key_prefix)
        self.start_step = trainer.global_step  # > 0: resumed from a checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath", type=Path, required=True)
    parser.add_argument("--mode", choices=["block", "gate", "slow", "plain"], default="plain")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--let-through", type=int, default=2)
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", choices=sorted(kill_points()), default=None)
    parser.add_argument("--kill-after", type=int, default=1)
    parser.add_argument(
        "--park-at",
        choices=sorted(kill_points()),
        default=None,
        help="as --kill-at, but write --marker and wait there for the parent's SIGKILL",
    )
    parser.add_argument("--park-after", type=int, default=1)
    parser.add_argument(
        "--flush", action="store_true", help="replay the outbox (flush_directory), no training"
    )
    parser.add_argument("--kill-signal", choices=["KILL", "TERM", "INT"], default="KILL")
    parser.add_argument(
        "--again",
        choices=["next", "shutdown"],
        default=None,
        help="signal again: at the step's next pass, or when the callback's flush starts",
    )
    parser.add_argument("--folder", action="store_true", help="checkpoints written as folders")
    parser.add_argument("--late", action="store_true", help="in AsyncCheckpointIO")
    parser.add_argument("--storage", default=None, help="a storage location to store into")
    parser.add_argument("--keep-files", action="store_true", help="a CheckpointIO keeping them")
    parser.add_argument("--max-pending", type=int, default=4)
    parser.add_argument("--teardown-marker", type=Path, default=None)
    # The configuration (crash_sweep.py draws these at random; the defaults are the tests').
    parser.add_argument("--save-top-k", type=int, default=2)
    parser.add_argument("--save-last", choices=["true", "link", "false"], default="true")
    parser.add_argument("--every", type=int, default=1, help="every_n_train_steps")
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--async-write", action="store_true")
    parser.add_argument("--scores", default=None, help="comma-separated scores, one per step")
    args = parser.parse_args()
    if args.storage:  # this run's default storage, for this process only (as users do)
        import lamindb
        from lamin_lightning._lamin import ensure_offline_safe

        ensure_offline_safe()  # as the callback's setup does, before any hub call
        if lamindb.Storage.filter(root=args.storage).one_or_none() is None:
            lamindb.Storage(root=args.storage).save()
        lamindb.settings.storage = args.storage

    guard = pytest.MonkeyPatch()
    block_network(guard)
    if args.kill_signal == "INT":
        # Ctrl+C raises KeyboardInterrupt, as in a Python started from a terminal: one started
        # by a background job of a shell without job control (a sweep run with `&`) inherits
        # SIGINT ignored, and would never see it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.kill_at:
        kill_at(
            guard,
            args.kill_at,
            args.kill_after,
            _signal_self(getattr(signal, f"SIG{args.kill_signal}")),
            again=args.again == "next",
        )
    if args.again == "shutdown":
        again_sig = getattr(signal, f"SIG{args.kill_signal}")
        shutdown_once = ll.Checkpoint._shutdown

        def signalled(self: ll.Checkpoint, **kwargs: Any) -> None:
            if FIRED.is_set():  # the first signal was sent: its flush (or teardown's)
                os.kill(os.getpid(), again_sig)
            shutdown_once(self, **kwargs)

        guard.setattr(ll.Checkpoint, "_shutdown", signalled)
    if args.keep_files:
        KeepFiles.log = args.report.with_suffix(".removed")
    if args.park_at:
        kill_at(guard, args.park_at, args.park_after, park(args.marker))
    if args.flush:
        observer = Events()
        report = ll.flush_directory(args.dirpath, progress=False, on_event=observer._record)
        remaining = [r.key for r in report.remaining]
        args.report.write_text(json.dumps({"events": observer.seen, "remaining": remaining}))
        return
    if args.teardown_marker is not None:
        marker = args.teardown_marker
        shutdown = ll.Checkpoint._shutdown

        def marked(self: ll.Checkpoint, **kwargs: Any) -> None:
            marker.write_text("teardown")
            shutdown(self, **kwargs)

        guard.setattr(ll.Checkpoint, "_shutdown", marked)
    observer = Events()
    callback = ll.Checkpoint(
        dirpath=args.dirpath,
        monitor="score",
        save_top_k=args.save_top_k,
        save_last={"true": True, "link": "link", "false": False}[args.save_last],
        every_n_train_steps=args.every,
        max_pending=args.max_pending,
        max_workers=args.max_workers,
        async_write=args.async_write,
        flush_timeout=120,
        artifact_observers=[observer],
    )
    callback._artifact_publisher = Gate(args.mode, args.marker, args.let_through)
    prefix = Prefix(callback, args.report.with_suffix(".prefix"))
    checkpoint_io: Any = None
    if args.folder:
        checkpoint_io = KeepFolders() if args.keep_files else FolderCheckpointIO()
    elif args.keep_files:
        checkpoint_io = KeepFiles()
    if args.late:
        checkpoint_io = AsyncCheckpointIO(checkpoint_io)
    trainer = make_trainer(
        args.dirpath.parent,
        [callback, prefix],
        max_steps=args.steps,
        plugins=[checkpoint_io] if checkpoint_io is not None else None,
    )
    scores = [float(v) for v in args.scores.split(",")] if args.scores else SCORES
    model = TierModel(scores=scores)
    trainer.fit(
        model,
        datamodule=TierData(n=args.steps),
        ckpt_path="last" if args.resume else None,
    )
    kept = sorted(
        {Path(p).name for p in callback.best_k_models}
        | ({Path(callback.last_model_path).name} if callback.last_model_path else set())
    )
    args.report.write_text(
        json.dumps(
            {
                "prefix": callback.checkpoint_key_prefix,
                "kept": kept,
                "events": observer.seen,
                "start_step": prefix.start_step,
            }
        )
    )


if __name__ == "__main__":
    main()
