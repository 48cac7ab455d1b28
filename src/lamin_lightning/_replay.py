"""Records to pipeline jobs: one builder for live saves and replays; the outboxes of a folder.

:func:`build_job` turns a :class:`~lamin_lightning._jobs.JobRecord` and a store into
the pipeline's job the same way whether the record was just submitted or read back
from an outbox after a crash: transfer, commit, removal, failure, abandon and discard
all come from the record; only ``recovered`` (on the events) and whether flags may
still move (``set_flags``) differ. Imports no callback.

:func:`unfinished` finds, at ``setup``, the journals a callback finishes first (its
own folder's, in both layouts, and those of sibling logger versions);
:func:`replay_jobs` turns their pending records into jobs, each into the store its
record names (chosen from the registry). ``lamin-lightning flush DIR`` is
:mod:`lamin_lightning._flush`.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamin_lightning._aside import put_back_in
from lamin_lightning._errors import EventWithheld, LostFileError, OutboxInUseError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import CommittedFlags, JobRecord
from lamin_lightning._journal import (
    Outbox,
    folder_flags,
    held_in_this_process,
    journal_paths,
    read_pending,
    record_destination,
)
from lamin_lightning._names import wait_until_written
from lamin_lightning._pipeline import JobSpec
from lamin_lightning._staging import (
    Stager,
    checkpoint_folder_of,
    release_staged,
    release_staging,
    working_folders,
)
from lamin_lightning.store import ArtifactStore, StoreLookup

log = logging.getLogger("lamin_lightning")

Outcome = Callable[[JobRecord, AnyArtifactEvent], None]
"""Told of each job's event on the committer thread, before it is delivered."""


@dataclass(frozen=True)
class Settle:
    """Where a job's record is journaled, to mark it finished there."""

    outbox: Outbox
    job_id: str

    def __call__(self, status: str) -> None:
        self.outbox.settle(self.job_id, status)

    def sync(self) -> None:
        """Make the journaled record durable (grouped fsync), before its job touches storage."""
        self.outbox.sync()

    def written(self, identity: tuple[int, int, int]) -> None:
        """Note that the save's background write completed its file (``identity``)."""
        self.outbox.mark_written(self.job_id, identity)

    def handed_over(self) -> None:
        """Note that a user's strategy or CheckpointIO returned from the removal's file."""
        self.outbox.mark_handed_over(self.job_id)


def build_job(
    record: JobRecord,
    store: ArtifactStore,
    *,
    trainer: Any = None,
    recovered: bool = False,
    set_flags: bool = True,
    settle: Callable[[str], None] | None = None,
    known: Callable[[str], Any] | None = None,
    outcome: Outcome | None = None,
    prepare: Callable[[], int] | None = None,
) -> JobSpec:
    """The pipeline job of ``record``, persisted into ``store``.

    Args:
        record: The job.
        store: Where it goes.
        trainer: Put on the events (None outside training).
        recovered: Whether this is a replay (marks the events; a replay keeps an
            artifact whose annotation fails, a live commit raises).
        set_flags: Whether the commit may move best/last/rank flags.
        settle: Marks the journaled record finished (with a status).
        known: What this process saved under a key (for removals).
        outcome: Told of every event on the committer thread.
        prepare: Stages the file on the intake thread (live saves); returns its size.
    """

    def settled(status: str) -> None:
        if settle is not None:
            settle(status)

    def durable() -> None:
        # The journal line reached the page cache on the training thread; fsync it here,
        # off that thread, before storage changes (a removal's commit, a save's upload).
        sync = getattr(settle, "sync", None)
        if sync is not None:
            sync()

    def told(event: AnyArtifactEvent) -> AnyArtifactEvent:
        if outcome is not None:
            outcome(record, event)
        return event

    def fail(error: BaseException, attempts: int) -> ArtifactFailedEvent:
        if isinstance(error, LostFileError):
            log.error("lamin-lightning: %s; dropping it from the outbox", error)
            settled("lost")
        elif (
            not isinstance(settle, Settle)
            and record.op == "save"
            and record.staged_path
            and record.staged_path != record.local_path
        ):
            # No journal line (outbox=False, a disk too full for it): no replay will ever
            # read the staged copy, a hard link that holds the checkpoint's blocks. The
            # file Lightning wrote is kept.
            release_staged(Path(record.staged_path))
        elif recovered:
            log.warning(
                "lamin-lightning: could not replay %s %r (%s: %s); it stays in the outbox",
                record.op,
                record.key,
                type(error).__name__,
                error,
            )
        event = ArtifactFailedEvent(
            kind=record.kind,
            key=record.key,
            local_path=record.event_path,
            trainer=trainer,
            error=error,
            attempts=attempts,
            operation=record.op,
            recovered=recovered,
        )
        told(event)
        return event

    if record.op == "remove":
        # A store that can find what it will delete before deleting it (LaminDB's) deletes
        # once the event is delivered: observers are told while the artifact and its bytes
        # still exist, as by the reference. The job settles only then.
        find = getattr(store, "find_removal", None)
        if not callable(getattr(store, "delete_removal", None)):
            find = None  # both or neither
        found: list[Any] = []  # what the commit found, for the deletion after delivery

        def remove(_: Any) -> ArtifactRemovedEvent | None:
            found.clear()
            if _kept_by_its_preparation(record, recovered, prepare):
                # Its replacement was never written (async_write): the evicted checkpoint
                # stays, locally and in the store, as after a failed synchronous save.
                _warn_replacement_lost(record)
                settled("kept")
                return None
            durable()
            given = known(record.key) if known is not None else None
            if find is not None:
                removal = find(record, given)
                found.append(removal)
                removed = removal.named if removal is not None else None
            else:
                removed = store.remove(record, given)
            event = ArtifactRemovedEvent(
                kind=record.kind,
                key=record.key,
                local_path=record.event_path,
                trainer=trainer,
                artifact=removed[0] if removed else None,
                storage_uri=removed[1] if removed else None,
                recovered=recovered,
            )
            told(event)
            if find is None:
                settled("removed")
            return event

        def delete_found() -> None:
            if not found:
                return  # nothing was to be removed by this job (see remove)
            if found[0] is not None:
                store.delete_removal(found[0])  # type: ignore[attr-defined]
            found.clear()
            settled("removed")

        return JobSpec(
            operation="remove",
            key=record.key,
            commit=remove,
            fail=fail,
            prepare=prepare,
            payload=record,
            after_delivery=delete_found if find is not None else None,
        )

    # A store that deletes the key's older artifacts once the earlier jobs' events were
    # delivered, before this save's (LaminDB's): an earlier save's event names an
    # artifact that still exists, this one's the key's only one, as by the reference.
    replaced = getattr(store, "delete_replaced", None)
    replaced = replaced if callable(replaced) else None
    committed: list[Any] = []

    def delete_replaced() -> None:
        if replaced is not None and committed:  # none: an override persisted nothing
            replaced(committed[0])  # raises to be retried: the artifact stays named
            committed.clear()
        # Settled only now: a crash before leaves the job to replay, whose commit finds
        # its artifact again and replaces the key's older ones (never two left).
        settled("saved")

    def transfer() -> Any:
        durable()
        path = record.file()
        newer = getattr(store, "holds_newer_save", None) if recovered else None
        if newer is not None and newer(record, path):
            return _NEWER_COMMITTED
        return store.transfer(record, path)

    def commit(artifact: Any) -> ArtifactSavedEvent | None:
        if artifact is _NEWER_COMMITTED:
            if record.staged_path:
                release_staged(Path(record.staged_path))
            log.warning(
                "lamin-lightning: not replaying the save of %r from %s: the file was"
                " rewritten since and its artifact holds the newer file already (a later"
                " save of the key was committed); the older checkpoint is dropped",
                record.key,
                record.local_path,
            )
            settled("dropped")
            return None
        if replaced is not None:  # the older artifacts of the key go before its delivery
            unannotated = store.commit(  # type: ignore[call-arg]
                record, artifact, replay=recovered, set_flags=set_flags, defer_replaced=True
            )
        else:
            unannotated = store.commit(record, artifact, replay=recovered, set_flags=set_flags)
        if record.staged_path:
            release_staged(Path(record.staged_path))
        if artifact is None:  # a hook that persisted nothing (hparams file gone)
            settled("saved")
            return None
        try:
            uri = store.storage_uri(artifact)
        except EventWithheld:
            # A user's resolve_artifact_storage_uri raised (the callback has the error):
            # the artifact is committed, so the save is done, without a saved event.
            if replaced is not None:
                committed[:] = [artifact]
            else:
                settled("saved")
            return None
        event = ArtifactSavedEvent(
            kind=record.kind,
            key=record.key,
            local_path=record.event_path,
            trainer=trainer,
            artifact=artifact,
            storage_uri=uri,
            recovered=recovered,
            unannotated_features=tuple(unannotated),
        )
        told(event)
        if replaced is not None:
            committed[:] = [artifact]  # settled once what it replaced is gone
        else:
            settled("saved")
        return event

    def discard() -> None:
        if record.staged_path:
            release_staged(Path(record.staged_path))
        settled("dropped")

    def abandon(artifact: Any) -> None:
        store.abandon(record, artifact)

    return JobSpec(
        operation="save",
        key=record.key,
        transfer=transfer,
        commit=commit,
        fail=fail,
        discard=discard,
        abandon=abandon,
        size_bytes=0 if prepare is not None else record.size(),
        prepare=prepare,
        payload=record,
        before_delivery=delete_replaced if replaced is not None else None,
    )


# -- outboxes of a directory ------------------------------------------------------------------


def outbox_roots(dirpath: str | os.PathLike[str]) -> list[Path]:
    """The working folders whose journals belong to checkpoint folder ``dirpath``.

    Beside it (``.{name}.lamin-lightning``), and inside it (``.lamin-lightning``, where
    earlier versions kept it: their journals still replay); or ``dirpath`` itself if it
    names a working folder.
    """
    return working_folders(dirpath)


def open_unheld(
    root: Path,
    skip: Callable[[Path], bool] = lambda _: False,
    broken: list[tuple[Path, OSError]] | None = None,
    committed: FolderFlags | None = None,
) -> tuple[list[Outbox], list[Path]]:
    """Open every journal under ``root`` that nobody holds and that has pending jobs;
    also list those another holder has. ``skip`` leaves journals alone. A journal that
    cannot be opened raises, or, given ``broken``, is listed there and left alone.

    ``committed``: where to note what the journals of ``root`` say its committed saves
    flagged (:func:`read_folder_flags`), read before a journal with nothing pending is
    closed, which deletes it: for :func:`replay_jobs`."""
    if committed is not None:
        read_folder_flags(root, committed)
    opened: list[Outbox] = []
    busy: list[Path] = []
    for path in journal_paths(root):
        if skip(path):
            continue
        outbox = Outbox(path)
        try:
            outbox.open()
        except OutboxInUseError:
            busy.append(path)
            continue
        except OSError as error:
            if broken is None:
                raise
            broken.append((path, error))
            continue
        if outbox.pending():
            opened.append(outbox)
        else:
            outbox.close()
    return opened, busy


FolderFlags = dict[str, dict[str, tuple[frozenset[str], CommittedFlags]]]
"""Per working folder (absolute), :func:`_journal.folder_flags`."""


def read_folder_flags(root: Path, committed: FolderFlags) -> None:
    """Note in ``committed`` what the journals of ``root`` say (once per folder)."""
    where = os.path.abspath(root)
    if where not in committed:
        committed[where] = folder_flags(root)


Pending = tuple[Outbox, str, JobRecord]
"""A journaled job not finished yet: its outbox, its id there, and its record."""


def pending_in(outboxes: list[Outbox], *, by_submission: bool = False) -> list[Pending]:
    """Every pending job of ``outboxes``, each journal's in its order: journal after
    journal, or (``by_submission``) the journals merged by submission time, so that
    several callbacks of one folder (one journal each) commit their saves in the order
    the crashed process made them. A flush needs that: its one store sets the flags of
    the save it commits last, which must be the save made last, not the last one of the
    journal written last. (A ``setup`` replays its own journal first, and the flags
    follow the saves' sequences: see :func:`_jobs.replayed_sequence`.)"""
    journals = [
        [(outbox, job_id, record) for job_id, record in outbox.pending()] for outbox in outboxes
    ]
    if not by_submission:
        return [entry for journal in journals for entry in journal]
    # merge takes the heads only: a journal's own order holds even where its times do not
    # rise (a clock set back).
    return list(heapq.merge(*journals, key=lambda entry: entry[2].submitted_at))


def unfinished(
    own: Outbox | None,
    *,
    root: Path,
    skip_digests: set[str],
    dirpath: Path,
    logger_layout: tuple[Path, str] | None,
    sibling_skip_digests: set[str] | None = None,
    committed: FolderFlags | None = None,
) -> list[Outbox]:
    """Open the journals whose jobs a callback holding ``own`` finishes at ``setup``.

    Those of its own checkpoint folder, except journals of the trainer's other
    checkpoint callbacks that replay this folder (``skip_digests``: each finishes its
    own). And where Lightning chose the dirpath (``logger_layout``: the logger's root
    ``{save_dir}/{name}`` and this run's version), each run checkpoints into a new
    version, so the journals of the sibling versions (``{root}/*/checkpoints``) too,
    except those of the callbacks that replay them as well (``sibling_skip_digests``,
    by default ``skip_digests``); one another live process holds is left to it, with a
    warning naming ``lamin-lightning flush`` (one another callback of this process holds
    is its to replay). The journals opened stay locked until the caller closes them, so
    nobody replays them twice. What a crash left aside in a
    sibling version is put back first (:func:`_aside.put_back_in`). ``committed``: see
    :func:`open_unheld`.
    """
    in_siblings = skip_digests if sibling_skip_digests is None else sibling_skip_digests

    def skip(path: Path) -> bool:
        return (own is not None and path == own.path) or _digest_of(path) in skip_digests

    def skip_sibling(path: Path) -> bool:
        return (own is not None and path == own.path) or _digest_of(path) in in_siblings

    opened: list[Outbox] = []
    for folder in dict.fromkeys([root, *outbox_roots(dirpath)]):
        found, _ = open_unheld(folder, skip=skip, committed=committed)
        opened.extend(found)
    for folder in _sibling_version_roots(dirpath, logger_layout):
        # A last.ckpt whose rewrite a crash cut short there: the previous one comes back
        # first, and the interrupted save is dropped (as the setup of that version does),
        # before its journal is opened, and locked, here.
        put_back_in(folder)
        found, busy = open_unheld(folder, skip=skip_sibling, committed=committed)
        opened.extend(found)
        for path in busy:
            if held_in_this_process(path):
                continue  # another callback of this trainer replays it (or has it open)
            log.warning(
                "lamin-lightning: %s holds unfinished persistence jobs of an earlier run that"
                " another process still holds; once it ends, run `lamin-lightning flush %s`",
                path,
                checkpoint_folder_of(folder),
            )
    pending = [o for o in (own, *opened) if o is not None and o.pending()]
    if pending:
        log.warning(
            "lamin-lightning: replaying the unfinished persistence jobs of %s first",
            ", ".join(sorted({str(o.path.parent) for o in pending})),
        )
    return opened


def _sibling_version_roots(dirpath: Path, logger_layout: tuple[Path, str] | None) -> list[Path]:
    """Working folders of the logger's other versions, if ``dirpath`` is Lightning's choice
    for this version (``{root}/{version}/checkpoints``); else none. Both layouts: beside
    ``checkpoints`` and (earlier versions) inside it."""
    if logger_layout is None:
        return []
    logger_root, version = logger_layout
    if dirpath.resolve() != (logger_root / version / "checkpoints").resolve():
        return []
    root_resolved = logger_root.resolve()
    own = (logger_root / version).resolve()
    found: list[Path] = []
    for folder in sorted(logger_root.glob("*/checkpoints")):
        # a symlinked version folder is not a sibling
        if folder.resolve().parent == own or folder.resolve().parent.parent != root_resolved:
            continue
        found.extend(root for root in outbox_roots(folder) if root.is_dir())
    return found


def _digest_of(path: Path) -> str:
    """The callback digest in a journal's name (``outbox-<digest>[-n].jsonl``)."""
    return path.name.removeprefix("outbox-").removesuffix(".jsonl").split("-", 1)[0]


WAIT_FOR_WRITES_IN_FLIGHT_S = 60.0
"""How long a replay waits for a background write that this process still runs for a
journaled job (a fit interrupted by Ctrl+C leaves its write to finish)."""


def _without_writes_in_flight(pending: list[Pending]) -> list[Pending]:
    """``pending`` once no write of this process creates a file it is about (waiting up to
    :data:`WAIT_FOR_WRITES_IN_FLIGHT_S`), less the jobs whose file is still being written
    then: they stay in the outbox, for a later flush, rather than be judged now."""

    def files_of(record: JobRecord) -> list[str]:
        if record.op == "save":  # its write, or its staging (see Submitter.plan_staging)
            return [record.local_path]
        if record.op == "remove" and record.after is not None:
            return [record.after]
        return []

    wanted = {path for _, _, record in pending for path in files_of(record)}
    if not wanted:
        return pending
    busy = wait_until_written(wanted, 0.0)
    if busy:
        log.info(
            "lamin-lightning: waiting for %d background write(s) an earlier fit in this"
            " process left running before replaying its outbox",
            len(busy),
        )
        # Every wanted name, not only those busy at first: an old intake thread goes on to
        # stagings it had queued, and takes their names as it starts each.
        busy = wait_until_written(wanted, WAIT_FOR_WRITES_IN_FLIGHT_S)
        # Read again what the writes that ended noted meanwhile (the folder a
        # CheckpointIO's write completed: JobRecord.marks_folder), not judged without it.
        pending = _read_again(pending)
    if not busy:
        return pending
    log.warning(
        "lamin-lightning: %s still being written by this process after %.0f s; their jobs"
        " stay in the outbox (run `lamin-lightning flush DIR` once the writes are done)",
        ", ".join(sorted(busy)),
        WAIT_FOR_WRITES_IN_FLIGHT_S,
    )
    return [
        entry
        for entry in pending
        if not any(os.path.abspath(path) in busy for path in files_of(entry[2]))
    ]


def _read_again(pending: list[Pending]) -> list[Pending]:
    """``pending`` with each record as its journal has it now (one settled meanwhile, as
    it was)."""
    now: dict[int, dict[str, JobRecord]] = {}
    for outbox, _, _ in pending:
        if id(outbox) not in now:
            now[id(outbox)] = dict(outbox.pending())
    return [
        (outbox, job_id, now[id(outbox)].get(job_id, record)) for outbox, job_id, record in pending
    ]


def replay_jobs(
    pending: list[Pending],
    store_for: StoreLookup,
    *,
    trainer: Any = None,
    outcome: Outcome | None = None,
    committed: FolderFlags | None = None,
) -> tuple[list[JobSpec], list[tuple[JobRecord, BaseException]]]:
    """The replay job of every pending record, in journal order, and the records that
    cannot be replayed here (with why: an unknown store, another instance).

    ``committed``: what the journals of each folder said before those with nothing
    pending were deleted (see :func:`open_unheld`); a folder not in it is read now."""
    specs: list[JobSpec] = []
    refused: list[tuple[JobRecord, BaseException]] = []
    folders: FolderFlags = dict(committed or {})
    # Per journal, only the last job of a key matters: a later save replaces an earlier
    # one, a later removal deletes it. Settle the moot ones without replaying them (a
    # save evicted before the crash may have no file left to upload).
    # A removal whose replacement was never written (async_write, killed mid-write) is
    # not replayed, and does not make the evicted checkpoint's own save moot.
    # A removal journaled last, whose file is still in the folder: the process died between
    # the two (see _never_moved_aside). Any later job line means it went on past the move.
    # A save whose write was to finish after the hook returned and never did (killed
    # mid-write): the checkpoint never existed; dropped, not failed.
    pending = _without_writes_in_flight(pending)
    newest = {o.path: job_id for o, job_id, _ in pending}
    unwritten = {(o.path, job_id) for o, job_id, record in pending if record.never_written()}
    kept = {
        (o.path, job_id)
        for o, job_id, record in pending
        if _never_moved_after_its_replacement(record)
        or (newest[o.path] == job_id and _never_moved_aside(record))
    }
    last = {
        (outbox.path, record.key, record_destination(record)): job_id
        for outbox, job_id, record in pending
        if (outbox.path, job_id) not in kept and (outbox.path, job_id) not in unwritten
    }
    for outbox, job_id, record in pending:
        if (outbox.path, job_id) in unwritten:
            if record.cut_short():
                log.warning(
                    "lamin-lightning: dropping the save of %r: its background write was cut"
                    " short (the process ended mid-write), so %s is no whole checkpoint; it"
                    " is not persisted, and is left where it is for you to delete",
                    record.key,
                    record.local_path,
                )
            else:
                log.warning(
                    "lamin-lightning: dropping the save of %r: its background write never"
                    " finished (it failed, or the process ended first), so %s %s",
                    record.key,
                    record.local_path,
                    "is an earlier checkpoint's file (left as it is)"
                    if os.path.lexists(record.local_path)
                    else "was never written",
                )
            if record.staged_path:
                release_staged(Path(record.staged_path))
            outbox.settle(job_id, "lost")
            continue
        if (outbox.path, job_id) in kept:
            if record.replacement_lost():
                _warn_replacement_lost(record)
            elif record.after is not None:
                log.warning(
                    "lamin-lightning: keeping %r: its removal waited for %s to be written,"
                    " and the process ended before the file left the folder (%s); the"
                    " file and its artifact both stay",
                    record.key,
                    record.after,
                    record.local_path,
                )
            else:
                log.warning(
                    "lamin-lightning: keeping %r: its removal was journaled but the process"
                    " ended before the file left the folder (%s); the file and its artifact"
                    " both stay",
                    record.key,
                    record.local_path,
                )
            outbox.settle(job_id, "kept")
            continue
        if last[(outbox.path, record.key, record_destination(record))] != job_id:
            if record.staged_path:
                release_staged(Path(record.staged_path))
            outbox.settle(job_id, "obsolete")
            continue
        # Also for a save refused here (another instance): it stays pending, and this run
        # may rewrite its file (last.ckpt) before a flush for its store replays it.
        _pin_local_file(record)
        try:
            store = store_for(record, outbox.path)
        except Exception as error:
            log.error(
                "cannot replay %s %r from %s (%s: %s); it stays in the outbox",
                record.op,
                record.key,
                outbox.path,
                type(error).__name__,
                error,
            )
            refused.append((record, error))
            continue
        # A replayed save moves flags only if no newer checkpoint of its prefix
        # committed meanwhile: it must not turn the flags back in time.
        fresh = record.submitted_at >= outbox.flags_at(record.prefix)
        specs.append(
            build_job(
                _with_committed_flags(record, outbox.path, folders) if fresh else record,
                store,
                trainer=trainer,
                recovered=True,
                set_flags=fresh,
                settle=Settle(outbox, job_id),
                outcome=outcome,
            )
        )
    return specs, refused


def _with_committed_flags(record: JobRecord, journal: Path, folders: FolderFlags) -> JobRecord:
    """``record``, a replayed checkpoint save, carrying what the committed saves of its
    folder left flagged (:attr:`CheckpointSnapshot.committed`) where the folder's other
    journals committed saves under its prefix too (several callbacks): its commit then
    takes turns with them at the flags, as it did live, although those saves committed
    in the crashed process. (Read once per folder and replay, before any of its jobs
    commits.) A journal alone under its prefix replays as before.
    """
    snapshot = record.checkpoint
    if record.op != "save" or snapshot is None:
        return record
    read_folder_flags(journal.parent, folders)
    found = folders[os.path.abspath(journal.parent)].get(record.prefix)
    if found is None or not found[0] - {journal.name}:
        return record
    return dataclasses.replace(record, checkpoint=dataclasses.replace(snapshot, committed=found[1]))


# What a replayed save's transfer returns instead of an artifact when the store holds a
# newer save of its key (see ``holds_newer_save``): its commit drops it.
_NEWER_COMMITTED = object()


def _kept_by_its_preparation(
    record: JobRecord, recovered: bool, prepare: Callable[[], int] | None
) -> bool:
    """Whether a removal that waited for its replacement's write keeps its file and
    artifact (:meth:`JobRecord.replacement_lost`). A live one is decided once, by its
    preparation on the intake thread (the file stays if the replacement did not exist
    then), and that decision holds at the commit. Asked again here, the folder can say
    otherwise: the replacement written since (a loaded machine, ``AsyncCheckpointIO``
    finishing a write as the fit ended on an exception), or a new checkpoint written
    under the evicted name (top-k names without a version counter), whose removal
    event would be lost."""
    decided = getattr(prepare, "kept", None)
    if not recovered and record.after is not None and not record.linked and decided is not None:
        return bool(decided)
    if record.replacement_lost():
        return True
    return (
        not recovered
        and record.after is not None
        and not record.linked
        and os.path.lexists(record.local_path)
    )


def _warn_replacement_lost(record: JobRecord) -> None:
    if record.link_superseded():
        log.debug("%r stays for the later job of its name: its link was never made", record.key)
        return
    log.warning(
        "lamin-lightning: keeping %r: the checkpoint saved in its place (%s) was never written",
        record.key,
        record.after,
    )


def _never_moved_aside(record: JobRecord) -> bool:
    """A removal (the last job line of its journal) whose file is still in the folder: it
    was journaled right before the file was to leave, and the process died in between.
    Replayed, it would delete an artifact whose checkpoint is in the folder, which
    Lightning, resumed from the last ``last.ckpt`` (saved before that eviction), still
    counts as kept. Not a removal handed to the user's strategy or CheckpointIO that
    returned (:attr:`JobRecord.handed_over`): the file stays because the user kept it.
    """
    return (
        record.op == "remove"
        and record.after is None
        and not record.handed_over
        and os.path.lexists(record.local_path)
    )


def _never_moved_after_its_replacement(record: JobRecord) -> bool:
    """A removal that waited for its replacement's background write (``async_write``),
    whose file is still in the folder. Either the replacement was never written
    (:meth:`JobRecord.replacement_lost`), or it was and the process died before the
    intake thread moved the evicted file out (training went on meanwhile, so later job
    lines say nothing). As for :func:`_never_moved_aside`, the ``last.ckpt`` on disk may
    be older than the eviction (its own write was queued behind the replacement's) and
    still count the file as kept: the file and its artifact stay."""
    if record.linked:  # the file left when the link was made (see JobRecord.linked)
        return record.replacement_lost()
    return record.op == "remove" and record.after is not None and os.path.lexists(record.local_path)


def _pin_local_file(record: JobRecord) -> None:
    """Stage now the local file of a replayed save that was never staged (the process died
    first), under the record's staged name: a link, on the caller's thread.

    Training resumes while replays are queued, and Lightning may rewrite the file
    (``last.ckpt``) before the replay reads it: the replay must persist the bytes the
    job was submitted with, never the newer ones (which a later job persists).
    """
    if record.op != "save" or not record.staged_path or not os.path.lexists(record.local_path):
        return
    staged = Path(record.staged_path)
    try:
        if staged.exists():
            return
    except OSError as error:  # EACCES, EIO: nothing to stage now (see JobRecord.file)
        log.warning("could not look at %s for its replay (%s)", staged, error)
        return
    release_staged(staged)  # what a staging cut short left
    root = staged.parent.parent.parent
    try:
        Stager(root).stage(record.local_path, staged)
    except OSError as error:
        log.warning("could not stage %s for its replay (%s); it is read in place", staged, error)
    finally:
        # The copy bears the dead owner's name, and the pending job keeps it: this
        # process's lock file there is not needed for it (see clear_dead_staging).
        release_staging(root)


def pending_records(dirpath: str | os.PathLike[str]) -> list[tuple[Path, JobRecord]]:
    """Unfinished jobs of every journal in a checkpoint directory, without locking."""
    return [
        (path, record)
        for root in outbox_roots(dirpath)
        for path in journal_paths(root)
        for _, record in read_pending(path)
    ]


__all__ = [
    "Settle",
    "build_job",
    "open_unheld",
    "outbox_roots",
    "pending_records",
    "replay_jobs",
    "unfinished",
]
