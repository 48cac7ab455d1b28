"""Replaying the outbox: finish, after a crash, the jobs a training process had admitted.

Two entry points, one mechanism:

- :func:`recover_at_setup`: the next ``setup`` with the same checkpoint directory
  replays the unfinished jobs through the callback's own pipeline, before the first
  training step, in their original order and under their original keys.
- :func:`flush_directory`: ``lamin-lightning flush DIR``, outside training.

Each entry names the callback class that wrote it (``publisher``); that class's
:meth:`~lamin_lightning.ArtifactPublishingModelCheckpoint.recovery_job` rebuilds the
job from the entry alone. Replays are idempotent (the crash may have come after
the commit); their events carry ``recovered=True``. A replay that fails stays in
the outbox; an entry whose file is gone for good is dropped with an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._outbox import (
    JOURNAL_PREFIX,
    JOURNAL_SUFFIX,
    Outbox,
    OutboxBusyError,
    journal_paths,
    read_pending,
    settling,
)
from lamin_lightning._pipeline import JobSpec
from lamin_lightning._retry import PermanentError
from lamin_lightning._staging import STAGING_DIRNAME

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lamin_lightning._callback import ArtifactPublishingModelCheckpoint

log = logging.getLogger("lamin_lightning")


class LostFileError(PermanentError):
    """Neither the staged copy nor the local file of a journaled save exists any more."""


class OutboxInUseError(RuntimeError):
    """A running training process holds the outbox of this directory."""


def outbox_root(dirpath: str | os.PathLike[str]) -> Path:
    """The ``.lamin-lightning`` folder of a checkpoint directory (or the folder itself)."""
    path = Path(dirpath)
    return path if path.name == STAGING_DIRNAME else path / STAGING_DIRNAME


def entry_file(entry: dict[str, Any]) -> Path:
    """The file a save entry persists: its staged copy if it exists, else the local file."""
    for candidate in (entry.get("staged"), entry.get("local_path")):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    raise LostFileError(
        f"cannot persist {entry.get('key')!r}: neither its staged copy"
        f" ({entry.get('staged')}) nor its local file ({entry.get('local_path')}) exists"
    )


def entry_size(entry: dict[str, Any]) -> int:
    """Bytes a save entry will upload (0 when unknown)."""
    if entry.get("op") != "save":
        return 0
    try:
        return entry_file(entry).stat().st_size
    except (OSError, LostFileError):
        return 0


def recovered_failure(
    entry: dict[str, Any], trainer: Any, error: BaseException, attempts: int
) -> ArtifactFailedEvent:
    """The failed event of a replayed job."""
    return ArtifactFailedEvent(
        kind=entry.get("kind", "checkpoint"),
        key=str(entry.get("key")),
        local_path=Path(str(entry.get("local_path"))),
        trainer=trainer,
        error=error,
        attempts=attempts,
        operation=entry.get("op", "save"),
        recovered=True,
    )


def _publisher_class(entry: dict[str, Any]) -> type[ArtifactPublishingModelCheckpoint]:
    module_name, _, qualname = str(entry.get("publisher", "")).partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


class _Builders:
    """One callback instance per publisher class, to rebuild jobs (``recovery_job``)."""

    def __init__(self, owner: ArtifactPublishingModelCheckpoint | None) -> None:
        self._owner = owner
        self._made: dict[type, ArtifactPublishingModelCheckpoint] = {}

    def get(self, entry: dict[str, Any]) -> ArtifactPublishingModelCheckpoint:
        cls = _publisher_class(entry)
        if self._owner is not None and isinstance(self._owner, cls):
            return self._owner
        made = self._made.get(cls)
        if made is None:
            made = self._made[cls] = cls.recovery_instance()
        return made

    def finalizers(self) -> list[Callable[[], None]]:
        return [b.thread_finalizer for b in self._made.values()]


def _recovery_spec(
    builders: _Builders, outbox: Outbox, entry: dict[str, Any], trainer: Any
) -> JobSpec | None:
    """The replay job of one entry, which settles the entry in ``outbox`` when it is done."""
    job_id = entry["id"]
    try:
        spec = builders.get(entry).recovery_job(entry, trainer)
    except Exception as error:
        log.error(
            "cannot replay %s %r from %s (%s: %s); it stays in the outbox",
            entry.get("op"),
            entry.get("key"),
            outbox.path,
            type(error).__name__,
            error,
        )
        return None
    fail = spec.fail

    def fail_and_maybe_settle(error: BaseException, attempts: int) -> Any:
        if isinstance(error, LostFileError):
            log.error("lamin-lightning: %s; dropping it from the outbox", error)
            outbox.settle(job_id, "lost")
        else:
            log.warning(
                "lamin-lightning: could not replay %s %r (%s: %s); it stays in the outbox"
                " for a later `lamin-lightning flush`",
                entry.get("op"),
                entry.get("key"),
                type(error).__name__,
                error,
            )
        return fail(error, attempts)

    return dataclasses.replace(
        settling(spec, outbox, job_id),
        fail=fail_and_maybe_settle,
        size_bytes=entry_size(entry),
        payload={**(spec.payload or {}), "recovered": True, "outbox_id": job_id},
    )


def _open_others(
    root: Path, own: Path | None, skip: set[str] | None = None
) -> tuple[list[Outbox], list[Path]]:
    """Open every other journal under ``root`` that nobody holds; also list the busy ones.

    ``skip``: digests of journals to leave alone (other callbacks of the same trainer).
    """
    opened: list[Outbox] = []
    busy: list[Path] = []
    for path in journal_paths(root):
        if (own is not None and path == own) or journal_digest(path) in (skip or ()):
            continue
        outbox = Outbox(path)
        try:
            outbox.open()
        except OutboxBusyError:
            busy.append(path)
            continue
        if outbox.pending():
            opened.append(outbox)
        else:
            outbox.close()
    return opened, busy


def journal_digest(path: Path) -> str:
    """The callback digest in a journal's name (``outbox-<digest>[-n].jsonl``)."""
    return path.name[len(JOURNAL_PREFIX) :].split("-", 1)[0].removesuffix(JOURNAL_SUFFIX)


def recover_at_setup(callback: ArtifactPublishingModelCheckpoint, trainer: pl.Trainer) -> int:
    """Queue what earlier runs left in this directory's outbox into ``callback``'s pipeline.

    The replays are submitted before any job of the new run, so they commit first, in
    their original order (the pipeline commits in submission order); training does
    not wait for them beyond the usual backpressure, and on DDP the other ranks are
    not kept waiting at the post-setup barrier. Journals of other callbacks found in
    the directory are replayed too, except those of this trainer's other checkpoint
    callbacks (each replays its own); they stay locked until ``callback`` shuts
    down, so nobody replays them twice. Returns how many jobs were queued. Replays
    that fail are warned about, not raised: they stay in the outbox.
    """
    own = callback._outbox
    if own is None:
        return 0
    siblings = {
        outbox_digest(other)
        for other in getattr(trainer, "callbacks", [])
        if other is not callback and hasattr(other, "recovery_job")
    }
    others, _ = _open_others(own.path.parent, own.path, skip=siblings)
    work = [(own, entry) for entry in own.pending()]
    for outbox in others:
        work.extend((outbox, entry) for entry in outbox.pending())
    callback._foreign_outboxes.extend(others)
    if not work:
        return 0
    log.warning(
        "lamin-lightning: replaying %d unfinished persistence job(s) from %s before the new ones",
        len(work),
        own.path.parent,
    )
    # Caches the live commits use are rebuilt by the first live commit, which runs on the
    # committer after the replays (submission order).
    callback.before_recovery()
    builders = _Builders(callback)
    pipeline = callback._ensure_pipeline()
    for outbox, entry in work:
        spec = _recovery_spec(builders, outbox, entry, trainer)
        if spec is not None:
            pipeline.submit(spec)
    return len(work)


def outbox_digest(callback: Any) -> str:
    """The digest that names a callback's journal: its ``state_key``, hashed."""
    return hashlib.sha1(str(callback.state_key).encode("utf-8")).hexdigest()[:12]


@dataclass
class FlushReport:
    """What ``lamin-lightning flush`` did.

    Attributes:
        events: The events of the replayed jobs, in order.
        remaining: Entries still pending afterwards (failed, timed out, or not replayable).
        busy: Journals another process holds (a training run still going).
    """

    events: list[AnyArtifactEvent] = field(default_factory=list)
    remaining: list[dict[str, Any]] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)

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


def pending_entries(dirpath: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Unfinished jobs of every journal in a checkpoint directory, without locking."""
    return [
        (path, entry)
        for path in journal_paths(outbox_root(dirpath))
        for entry in read_pending(path)
    ]


def flush_directory(
    dirpath: str | os.PathLike[str],
    *,
    timeout: float | None = None,
    progress: bool = True,
    max_workers: int = 2,
    on_event: Callable[[AnyArtifactEvent], None] | None = None,
) -> FlushReport:
    """Persist what the outbox of ``dirpath`` still holds (``lamin-lightning flush``).

    Raises :class:`OutboxInUseError` if a training process holds one of its journals
    and nothing else could be done.
    """
    from lamin_lightning._bridge import PersistencePipeline
    from lamin_lightning._callback import _progress_bar, drain_with_progress
    from lamin_lightning._retry import RetryPolicy

    root = outbox_root(dirpath)
    report = FlushReport()
    outboxes, report.busy = _open_others(root, None)
    if report.busy and not outboxes:
        raise OutboxInUseError(
            f"a running training process holds the outbox in {root}"
            f" ({', '.join(p.name for p in report.busy)}); it replays its own jobs. Wait for it"
            " to finish, or stop it first."
        )
    work = [(outbox, entry) for outbox in outboxes for entry in outbox.pending()]
    if not work:
        for outbox in outboxes:
            outbox.close()
        return report
    builders = _Builders(None)
    lock = threading.Lock()

    def deliver(event: AnyArtifactEvent) -> None:
        with lock:
            report.events.append(event)
        if on_event is not None:
            on_event(event)

    def finalize() -> None:
        for finalizer in builders.finalizers():
            finalizer()

    pipeline = PersistencePipeline(
        max_workers=max_workers,
        max_pending=max(4, 2 * max_workers),
        retry=RetryPolicy(),
        deliver=deliver,
        thread_finalizer=finalize,
        name="lamin-lightning-flush",
    )
    pipeline.start()
    specs = [
        spec
        for outbox, entry in work
        if (spec := _recovery_spec(builders, outbox, entry, None)) is not None
    ]
    # Bytes by job, keyed the way _job_id names a pending job.
    sizes = {(spec.key, spec.payload["outbox_id"]): spec.size_bytes for spec in specs}
    bar = _progress_bar(sum(sizes.values()), enabled=progress, unit="B", files=len(sizes))
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        for spec in specs:
            pipeline.submit(spec)  # waits for a slot: bounded like training
        drain_with_progress(pipeline, bar, sizes, deadline)
    finally:
        if bar is not None:
            bar.close()
        pipeline.stop(timeout=0)
        for outbox in outboxes:
            report.remaining.extend(outbox.pending())
            outbox.close()
    return report
