"""The training-thread side of a callback: stage, journal and submit job records.

:class:`Submitter` owns what one callback needs at run time and nothing Lightning
knows: the pipeline (created lazily: the callback must stay picklable until
``setup``), the outbox journal, the stagers and the staging handshake with
Lightning's removals. Everything it does on the training thread is bounded: a
rename, a journal append, a queue put; staging, uploads and commits run on the
pipeline's threads.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lamin_lightning._bridge import PersistencePipeline
from lamin_lightning._errors import CheckpointDirectoryError, OutboxInUseError
from lamin_lightning._jobs import JobRecord
from lamin_lightning._journal import Outbox
from lamin_lightning._replay import Outcome, Pending, Settle, build_job, replay_jobs
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._staging import Stager, detach_before_rewrite, staging_root
from lamin_lightning._stats import StatsRecorder
from lamin_lightning.store import ArtifactStore

log = logging.getLogger("lamin_lightning")


class Submitter:
    """Stages, journals and submits one callback's jobs; owns its pipeline and outbox.

    Args:
        max_workers: Transfers at once.
        max_pending: Jobs admitted and unfinished at once (backpressure beyond).
        retry: Retry policy of transfers and commits.
        deliver: Called with each event on the delivery thread.
        thread_finalizer: Called on each pipeline thread as it exits.
        stats: The callback's counters.
        staging_timeout: Longest wait for a file's staging before Lightning may
            remove or rewrite it (None: no limit).
    """

    def __init__(
        self,
        *,
        max_workers: int,
        max_pending: int,
        retry: RetryPolicy,
        deliver: Callable[[Any], None],
        thread_finalizer: Callable[[], None],
        stats: StatsRecorder,
        staging_timeout: float | None,
    ) -> None:
        self._make_pipeline = partial(
            PersistencePipeline,
            max_workers=max_workers,
            max_pending=max_pending,
            retry=retry,
            deliver=deliver,
            thread_finalizer=thread_finalizer,
            stats=stats,
        )
        self._staging_timeout = staging_timeout
        self._stats = stats
        self.pipeline: PersistencePipeline | None = None
        self.outbox: Outbox | None = None
        self.foreign: list[Outbox] = []
        self._stagers: dict[Path, Stager] = {}
        self._staging_done: dict[str, threading.Event] = {}

    # -- pipeline ---------------------------------------------------------------------------

    def ensure_pipeline(self) -> PersistencePipeline:
        """The running pipeline, started on first use (validate -> fit -> test restarts it)."""
        if self.pipeline is None:
            pipeline = self._make_pipeline()
            pipeline.start()
            self.pipeline = pipeline
        return self.pipeline

    def submit(
        self,
        record: JobRecord,
        store: ArtifactStore,
        *,
        trainer: Any,
        prepare: Callable[[], int] | None = None,
        known: Callable[[str], Any] | None = None,
        outcome: Outcome | None = None,
        journaled: Settle | None = None,
    ) -> None:
        """Journal ``record`` (unless ``journaled`` says where it already is) and submit its job."""
        pipeline = self.ensure_pipeline()
        settle = journaled if journaled is not None else self.journal(record)
        spec = build_job(
            record,
            store,
            trainer=trainer,
            settle=settle,
            known=known,
            outcome=outcome,
            prepare=prepare,
        )
        pipeline.submit(spec)

    def replay(
        self,
        pending: list[Pending],
        store_for: Callable[[JobRecord], ArtifactStore],
        *,
        trainer: Any,
        outcome: Outcome | None,
    ) -> int:
        """Queue the replay of ``pending`` ahead of any new job; return how many were queued."""
        specs, _ = replay_jobs(pending, store_for, trainer=trainer, outcome=outcome)
        pipeline = self.ensure_pipeline()
        for spec in specs:
            pipeline.submit(spec)
        return len(specs)

    # -- the outbox -------------------------------------------------------------------------

    def open_outbox(self, root: Path, digest: str, *, enabled: bool, dirpath: Any) -> None:
        """Open (and lock) this callback's journal; fail now if the directory is unusable."""
        if self.outbox is not None:
            return
        try:
            if enabled:
                self.outbox = _open_journal(root, digest)
            else:
                _probe_writable(root)
        except OSError as error:
            if isinstance(error, CheckpointDirectoryError):
                raise
            raise CheckpointDirectoryError(
                error.errno,
                f"lamin-lightning cannot write to the checkpoint directory {dirpath!s}"
                f" ({type(error).__name__}: {error.strerror or error}). Pass a writable"
                " dirpath, or fix its permissions or free space.",
            ) from error

    def check_free_space(self, root: Path, needed: int, dirpath: Any) -> None:
        """Raise CheckpointDirectoryError if ``root`` has less than ``needed`` bytes free."""
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            return
        if free < needed:
            self.close_outbox()
            raise CheckpointDirectoryError(
                errno.ENOSPC,
                f"the checkpoint directory {dirpath!s} has {free / 2**20:.1f} MiB free, but"
                f" one checkpoint of this model needs at least {needed / 2**20:.1f} MiB (its"
                " parameters and buffers). Free space or pass another dirpath.",
            )

    def journal(self, record: JobRecord) -> Settle | None:
        """Write ``record`` durably into the outbox before its job is admitted."""
        outbox = self.outbox
        if outbox is None:
            return None
        return Settle(outbox, outbox.append(record))

    def close_outbox(self) -> None:
        """Release this callback's journal and the foreign ones it replayed."""
        outbox, self.outbox = self.outbox, None
        foreign, self.foreign = self.foreign, []
        for journal in (outbox, *foreign):
            if journal is not None:
                journal.close()

    # -- staging ----------------------------------------------------------------------------

    def stager(self, root: Path) -> Stager:
        """The stager of a staging root (one per root)."""
        stager = self._stagers.get(root)
        if stager is None:
            stager = self._stagers[root] = Stager(root)
        return stager

    def plan_staging(
        self, root: Path, filepath: str | Path, write: Callable[[], None] | None = None
    ) -> tuple[Path, Callable[[], int]]:
        """Name the staged copy now; stage it later, on the pipeline's intake thread.

        ``write``, if given, writes the file first (``async_write``).
        """
        stager = self.stager(root)
        staged = stager.plan(filepath)
        done = threading.Event()
        if len(self._staging_done) > 256:
            self._staging_done = {p: e for p, e in self._staging_done.items() if not e.is_set()}
        self._staging_done[str(filepath)] = done

        def prepare() -> int:
            try:
                if write is not None:
                    write()
                return stager.stage(filepath, staged)[1]
            finally:
                done.set()
                stager.empty_trash()

        return staged, prepare

    def await_staging(self, filepath: str | Path) -> None:
        """Before Lightning removes or rewrites a file, make sure it has been staged."""
        done = self._staging_done.pop(str(filepath), None)
        if done is None:
            return
        started = time.monotonic()
        finished = done.wait(timeout=self._staging_timeout)
        self._stats.add(training_stall_seconds=time.monotonic() - started)
        if not finished:
            log.warning("staging %s did not finish; removing or rewriting it anyway", filepath)

    def move_aside(self, root: Path, filepath: str | Path) -> None:
        """Move an existing file out of Lightning's way before it is rewritten (a rename).

        The rewrite would free its blocks on the training thread, or rewrite in place
        the inode a queued upload still reads.
        """
        self.await_staging(filepath)
        if os.path.exists(filepath) and not self.stager(root).trash(filepath):
            detach_before_rewrite(filepath)

    def trash_for_removal(self, root: Path, filepath: str | Path) -> Callable[[], int]:
        """Move a file Lightning removes aside now; return the deletion, for the intake."""
        self.await_staging(filepath)
        stager = self.stager(root)
        stager.trash(filepath)

        def empty() -> int:
            stager.empty_trash()
            return 0

        return empty

    # -- shutdown ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the pipeline (abandoning what is left), empty the trash, release the outbox."""
        pipeline, self.pipeline = self.pipeline, None
        try:
            if pipeline is not None:
                pipeline.stop(timeout=0)
        finally:
            for stager in self._stagers.values():
                stager.empty_trash()
            self.close_outbox()


def _open_journal(root: Path, digest: str) -> Outbox:
    """Open and lock the journal named ``digest`` (the first free one of that name)."""
    for attempt in range(16):
        suffix = f"-{attempt}" if attempt else ""
        outbox = Outbox(root / f"outbox-{digest}{suffix}.jsonl")
        try:
            outbox.open()
        except OutboxInUseError:
            continue  # an identical callback in this trainer holds it
        return outbox
    raise CheckpointDirectoryError(
        f"every outbox journal for this callback under {root} is in use; is another"
        " training process writing checkpoints to the same dirpath?"
    )


def _probe_writable(root: Path) -> None:
    """Create ``root`` and write (and remove) a file in it; raise OSError if that fails."""
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".probe-{os.getpid()}-{threading.get_ident()}"
    with open(probe, "wb") as handle:
        handle.write(b"lamin-lightning")
        handle.flush()
        os.fsync(handle.fileno())
    probe.unlink()


__all__ = ["Submitter", "staging_root"]
