"""``lamin-lightning flush DIR``: persist what a directory's outboxes still hold.

Outside training: opens every journal of the checkpoint directory that no running
process holds, replays its pending jobs through a pipeline of its own (in journal
order, under their original keys, into the store each record names), bounded by one
end-to-end timeout, and reports every job exactly once (:class:`FlushReport`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamin_lightning._aside import put_back_in
from lamin_lightning._errors import OutboxInUseError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import JobRecord
from lamin_lightning._journal import Outbox, journal_paths, keep_until_done, read_unreadable
from lamin_lightning._progress import drain_with_progress, progress_bar
from lamin_lightning._replay import (
    FolderFlags,
    open_unheld,
    outbox_roots,
    pending_in,
    replay_jobs,
)
from lamin_lightning._retry import RetryPolicy
from lamin_lightning.store import ArtifactStore, StoreResolver

log = logging.getLogger("lamin_lightning")


@dataclass
class FlushReport:
    """What ``lamin-lightning flush`` did. Every replayed job is in exactly one of
    ``events`` and ``dropped``; ``remaining`` lists those still pending afterwards (a
    failed one is in ``events`` too, with its failed event).

    Attributes:
        events: The events of the replayed jobs, in order (saved, removed, failed); one
            per job: a removal whose deletion failed after its removed event (which
            ``on_event`` got) is here as failed only.
        dropped: Jobs that did nothing: a later job of the same key made them moot, a
            removal kept its file (the checkpoint that replaced it was never written),
            or a save's file was never written (its background write was cut short).
        remaining: Jobs still pending afterwards (failed, refused, or not reached
            before the timeout).
        refused: Of ``remaining``, those that cannot be replayed here, with why.
        busy: Journals another process holds (a training run still going).
        unreadable: Pending jobs this version cannot read (written by a newer version,
            or damaged): ``(journal, job id, why)``. They stay in their journal, unless
            a later job of their key (same journal, same store) made them moot: its
            replay settles them, as any earlier job of its key, and they are not listed.
    """

    events: list[AnyArtifactEvent] = field(default_factory=list)
    dropped: list[JobRecord] = field(default_factory=list)
    remaining: list[JobRecord] = field(default_factory=list)
    refused: list[tuple[JobRecord, BaseException]] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str, str]] = field(default_factory=list)

    @property
    def saved(self) -> int:
        """Saves committed."""
        return sum(isinstance(e, ArtifactSavedEvent) for e in self.events)

    @property
    def removed(self) -> int:
        """Removals committed."""
        return sum(isinstance(e, ArtifactRemovedEvent) for e in self.events)

    @property
    def failed(self) -> int:
        """Jobs that failed again."""
        return sum(isinstance(e, ArtifactFailedEvent) for e in self.events)

    @property
    def unannotated(self) -> list[ArtifactSavedEvent]:
        """Saves committed without some of their feature annotations."""
        return [
            e for e in self.events if isinstance(e, ArtifactSavedEvent) and e.unannotated_features
        ]


def flush_directory(
    dirpath: str | os.PathLike[str],
    *,
    timeout: float | None = None,
    progress: bool = True,
    max_workers: int = 2,
    on_event: Callable[[AnyArtifactEvent], None] | None = None,
    stores: Mapping[str, ArtifactStore] | None = None,
    retry: RetryPolicy | None = None,
) -> FlushReport:
    """Persist what the outboxes of ``dirpath`` still hold (``lamin-lightning flush``).

    ``timeout`` bounds the whole call, submission included. ``stores`` replaces the
    registry's store for the names it holds (a test's :class:`MemoryStore`, say).
    Raises :class:`OutboxInUseError` if a training process holds every journal.
    """
    from lamin_lightning._bridge import PersistencePipeline
    from lamin_lightning._options import validate_flush_timeout

    timeout = validate_flush_timeout(timeout, "flush_directory(timeout=...)")
    deadline = None if timeout is None else time.monotonic() + timeout
    roots = outbox_roots(dirpath)
    report = FlushReport()
    outboxes: list[Outbox] = []
    put_back_in(dirpath)  # a crash mid-rewrite left the previous checkpoint aside
    broken: list[tuple[Path, OSError]] = []
    committed: FolderFlags = {}  # read before a journal with nothing pending is deleted
    for root in roots:
        found, busy = open_unheld(root, broken=broken, committed=committed)
        outboxes.extend(found)
        report.busy.extend(busy)
    for path, error in broken:  # made unwritable, a folder in its place: the others go on
        log.error(
            "lamin-lightning: cannot open the outbox %s (%s); it is left as it is", path, error
        )
        report.unreadable.append((path, "*", f"the journal cannot be opened: {error}"))
    if report.busy and not outboxes:
        raise OutboxInUseError(
            f"another process holds the outbox in {report.busy[0].parent}"
            f" ({', '.join(p.name for p in report.busy)}): a training run, which replays its"
            " own jobs, or another `lamin-lightning flush`. Wait for it to finish, or stop it"
            " first."
        )
    held = set(report.busy) | {path for path, _ in broken}
    work = pending_in(outboxes, by_submission=True)
    if not work:
        for outbox in outboxes:
            outbox.close()
        _unreadable_left(report, roots, held)
        return report
    resolver = StoreResolver(stores, per_journal=True)  # a store per callback, as in training
    lock = threading.Lock()
    # How many jobs of each content had an event: two jobs of one journal may be alike (a
    # key saved twice in one clock tick, a journal of an earlier version without times).
    with_event: Counter[tuple[Any, ...]] = Counter()
    counting = threading.Lock()

    def record_outcome(record: JobRecord, _: AnyArtifactEvent) -> None:
        with counting:
            with_event[_job_of(record)] += 1

    def deliver(event: AnyArtifactEvent) -> None:
        with lock:
            last = report.events[-1] if report.events else None
            if (
                isinstance(event, ArtifactFailedEvent)
                and event.operation == "remove"
                and isinstance(last, ArtifactRemovedEvent)
                and last.key == event.key
            ):
                # A removal is told before its deletion (as by the reference); a deletion
                # that then fails for good follows at once with its failed event. The job
                # was not removed: in the report it is failed only, as in the stats.
                report.events.pop()
            report.events.append(event)
        if on_event is not None:
            on_event(event)

    pipeline = PersistencePipeline(
        max_workers=max_workers,
        max_pending=max(4, 2 * max_workers),
        retry=retry if retry is not None else RetryPolicy(),
        deliver=deliver,
        thread_finalizer=resolver.finalize_thread,
        name="lamin-lightning-flush",
    )
    pipeline.start()
    bar = None
    try:
        specs, report.refused = replay_jobs(
            work, resolver, outcome=record_outcome, committed=committed
        )
        sizes = {id(spec.payload): spec.size_bytes for spec in specs}
        bar = progress_bar(sum(sizes.values()), enabled=progress, unit="B", files=len(specs))
        for spec in specs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not pipeline.submit(spec, timeout=left):  # bounded like training
                break
        drain_with_progress(pipeline, bar, sizes, deadline)
    finally:
        if bar is not None:
            bar.close()
        pipeline.stop(timeout=0)
        after = {(o.path, job_id) for o in outboxes for job_id, _ in o.pending()}
        working = pipeline.still_working()  # a transfer the timeout gave up on goes on
        for outbox in outboxes:
            keep_until_done(outbox, working)
    for outbox, job_id, record in work:
        job = _job_of(record)
        had_event = with_event[job] > 0
        if had_event:
            with_event[job] -= 1  # one alike job's event each
        if (outbox.path, job_id) in after:
            report.remaining.append(record)
        elif not had_event:
            report.dropped.append(record)
    _unreadable_left(report, roots, held)
    return report


def _job_of(record: JobRecord) -> tuple[Any, ...]:
    """Which journaled job ``record`` is: the replay may read a job's record again (a
    write of this process that ended while it waited marked it), another object."""
    return (record.root, record.op, record.key, record.local_path, record.submitted_at)


def _unreadable_left(report: FlushReport, roots: list[Path], held: set[Path]) -> None:
    """The jobs this version cannot read still pending once the replay is done (a later
    job of their key may have settled them meanwhile), in the journals not held elsewhere."""
    for root in roots:
        for path in journal_paths(root):
            if path in held:
                continue
            try:
                report.unreadable.extend((path, i, why) for i, why in read_unreadable(path))
            except OSError as error:
                report.unreadable.append((path, "*", f"the journal cannot be read: {error}"))


__all__ = ["FlushReport", "flush_directory"]
