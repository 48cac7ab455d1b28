"""The training-thread side of a callback: stage, journal and submit job records.

:class:`Submitter` owns what one callback needs at run time and nothing Lightning
knows: the pipeline (created lazily: the callback must stay picklable until
``setup``), the outbox journal, the stagers and the staging handshake with
Lightning's removals. Everything it does on the training thread is bounded: a
rename, a journal append, a queue put; staging, uploads and commits run on the
pipeline's threads.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import shutil
import stat
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamin_lightning import _aside, _sigterm
from lamin_lightning._bridge import PersistencePipeline
from lamin_lightning._errors import (
    CheckpointDirectoryError,
    OutboxInUseError,
    note_never_written,
)
from lamin_lightning._jobs import JobRecord
from lamin_lightning._journal import Outbox, held_in_this_process, keep_until_done
from lamin_lightning._names import release_name, take_name
from lamin_lightning._pipeline import JobSpec
from lamin_lightning._replay import (
    FolderFlags,
    Outcome,
    Pending,
    Settle,
    build_job,
    replay_jobs,
)
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._staging import (
    NO_LINKS,
    WORKING_SUFFIX,
    Stager,
    absolute,
    checkpoint_folder_of,
    current_pid,
    detach_before_rewrite,
    release_staging,
    remove_path,
    staging_root,
)
from lamin_lightning._stats import StatsRecorder
from lamin_lightning.store import ArtifactStore, StoreLookup

if TYPE_CHECKING:
    from lamin_lightning._evictions import BackgroundWrite

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
        self._pid = current_pid()  # the process whose threads and outbox these are
        self._outbox_plan: tuple[Path, str, Any] | None = None  # where to create it
        self._no_outbox = False  # open_outbox ran with journaling off (outbox=False)
        self.foreign: list[Outbox] = []
        self._stagers: dict[Path, Stager] = {}
        self._staging_done: dict[str, _Done] = {}
        # Per artifact key, this callback's latest live job, until it finished: another
        # callback's later job of that key transfers (or, without a transfer, commits)
        # only after it, as this pipeline orders its own (see _after_other_callbacks).
        self._jobs_of_key: dict[str, _Done] = {}
        _SUBMITTERS.add(self)
        self._unadmitted: list[JobSpec] = []  # journaled, kept from admission by an interrupt
        # Absolute paths of saves whose journal line a full disk refused (see journal).
        self.unjournaled: set[str] = set()
        self._holding = False  # see holding()

    # -- pipeline ---------------------------------------------------------------------------

    def ensure_pipeline(self) -> PersistencePipeline:
        """The running pipeline, started on first use (validate -> fit -> test restarts it)."""
        if self.pipeline is None:
            pipeline = self._make_pipeline()
            pipeline.start()
            self.pipeline = pipeline
            self._pid = current_pid()
        return self.pipeline

    @property
    def forked_copy(self) -> bool:
        """Whether this is a forked child's copy of a submitter live in its parent.

        Its pipeline's threads did not come with the fork, and its journals are the
        parent's: any wait on them would never end (a child that unwinds through
        Lightning's ``fit`` runs ``on_exception``), and a close would compact the parent's
        live journal from the child's stale view of it.
        """
        return self._pid != current_pid() and (
            self.pipeline is not None or self.outbox is not None or bool(self.foreign)
        )

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hand the jobs submitted inside to the pipeline's threads together, at the end.

        Around one Lightning save hook (a save, the removal it causes, ``last.ckpt``):
        the pipeline's threads wake once, after the hook, instead of competing with it
        for the GIL (see :meth:`PersistencePipeline.hold`). A wait inside for one of
        those jobs (its staging, a free slot) hands them over first.
        """
        if self._holding:  # nested: the outer one hands them over
            yield
            return
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self.pipeline is not None:
                self.pipeline.release()

    def submit(
        self,
        record: JobRecord,
        store: ArtifactStore,
        *,
        trainer: Any,
        prepare: Callable[[], int] | None = None,
        known: Callable[[str], Any] | None = None,
        outcome: Outcome | None = None,
        journaled: Callable[[str], None] | None = None,
        write: Callable[[], None] | None = None,
        beyond_limit: bool = False,
    ) -> None:
        """Journal ``record`` (unless ``journaled`` says where it already is) and submit its
        job. ``write`` writes the file later (``async_write``): see :meth:`_journaled_job`.
        ``beyond_limit``: admitted without waiting for a slot (``JobSpec.beyond_limit``)."""
        spec: JobSpec | None = None
        try:
            pipeline = self.ensure_pipeline()
            if self._holding:
                pipeline.hold()
            spec = self._journaled_job(
                record, store, trainer, prepare, known, outcome, journaled=journaled, write=write
            )
            if beyond_limit:
                spec = dataclasses.replace(spec, beyond_limit=True)
            spec = self._after_other_callbacks(spec)
            pipeline.submit(spec, stop_waiting=partial(_sigterm_received, trainer))
        except BaseException:
            # Not admitted (Ctrl+C, SIGTERM, a full disk): its staging will never run, so
            # Lightning must not wait for it. A journaled job stays in the outbox, with its
            # local file: the next setup or `lamin-lightning flush` persists it, or the
            # flush at exit (see submit_interrupted).
            self.drop_staging(record.local_path)
            if spec is not None:
                self._unadmitted.append(spec)
                # Admitted later (at teardown), if ever: another callback's job of its
                # key does not wait for it (the interrupt ended that order).
                if spec.finished is not None:
                    spec.finished()
            raise

    def _after_other_callbacks(self, spec: JobSpec) -> JobSpec:
        """``spec``, made to wait for the jobs of its key that other callbacks of this
        process submitted before it, and noting when it finished.

        Two callbacks may save one file name (``enable_version_counter=False``), and so one
        key, each through its own pipeline. As a pipeline orders the jobs of a key, the
        later one is transferred only once the earlier one finished (committed, what it
        replaced deleted, its event delivered), or, without a transfer (a removal),
        committed only then: the key ends with the later save, as with the reference's
        synchronous saves. The wait holds no worker (``JobSpec.ready``), and ends when
        the other callback's pipeline stopped, or was replaced by a later fit's: what it
        left is journaled, and nothing orders it with this job any more.

        Alone in the process (one callback: the usual case), nothing to note, at every
        save hook's job: every callback of a trainer has its submitter from ``setup`` on.
        """
        if len(_SUBMITTERS) < 2:
            return spec
        key = spec.key
        earlier = []
        for other in list(_SUBMITTERS):
            done = other._jobs_of_key.get(key) if other is not self else None
            if done is not None and not done.is_set() and other.pipeline is not None:
                earlier.append((other, other.pipeline, done))
        if len(self._jobs_of_key) > 256:
            self._jobs_of_key = {k: d for k, d in self._jobs_of_key.items() if not d.is_set()}
        done = self._jobs_of_key[key] = _Done()
        changes: dict[str, Any] = {"finished": done.set}
        if earlier:
            changes["ready"] = partial(_others_finished, earlier)
        return dataclasses.replace(spec, **changes)

    def keep_out(
        self,
        record: JobRecord,
        store: ArtifactStore,
        *,
        trainer: Any,
        prepare: Callable[[], int] | None,
        known: Callable[[str], Any] | None = None,
        outcome: Outcome | None = None,
        write: Callable[[], None] | None = None,
    ) -> None:
        """Journal ``record`` and keep its job from admission, as an interrupt would (see
        :meth:`submit`): for a save whose hook raised before it was submitted. The flush
        at exit admits it (:meth:`submit_interrupted`); until then nothing waits for its
        staging. A ``write`` that must finish whether or not the job is ever admitted (it
        puts the previous file back once a CheckpointIO's rewrite is done) starts now, on
        a thread of its own; the job's preparation, if admitted, waits for that run."""
        if write is not None and getattr(write, "finishes_alone", False):
            _finish_alone(write)
        spec = self._journaled_job(record, store, trainer, prepare, known, outcome, write=write)
        self.drop_staging(record.local_path)
        self._unadmitted.append(spec)

    def _journaled_job(
        self,
        record: JobRecord,
        store: ArtifactStore,
        trainer: Any,
        prepare: Callable[[], int] | None,
        known: Callable[[str], Any] | None,
        outcome: Outcome | None,
        *,
        journaled: Callable[[str], None] | None = None,
        write: Callable[[], None] | None = None,
    ) -> JobSpec:
        """Journal ``record`` (unless ``journaled`` says where it already is); its job.

        A save whose ``write`` notes in the journal the file it completed
        (``JobRecord.marks_written``), or the folder a CheckpointIO completed
        (``JobRecord.marks_folder``), is told where, before that write can run (or, for
        a CheckpointIO's write that already ended, with the job's own line).

        A Ctrl+C meanwhile is raised once the job is known (see ctrl_c_after): raised after
        its line and before, it passed for a save never journaled, and a late write told
        no job to mark completed its folder unmarked (Lightning's AsyncCheckpointIO's
        thread, which Python waits for at exit), which a flush dropped as cut short (crash
        sweep seed 1365, ``--folder --signal INT``)."""
        with _sigterm.ctrl_c_after():
            mark_folder = getattr(write, "mark_folder_with", None)
            if record.marks_folder and journaled is None and mark_folder is not None:
                identity = write.folder_written()  # type: ignore[union-attr]
                if identity is not None:
                    record = dataclasses.replace(record, written_file=identity)
                    mark_folder = None
            settle = journaled if journaled is not None else self.journal(record)
            written = getattr(settle, "written", None)
            mark_with = getattr(write, "mark_written_with", None)
            if record.marks_written and written is not None and mark_with is not None:
                mark_with(written)
            if record.marks_folder and written is not None and mark_folder is not None:
                mark_folder(written)
        if settle is _unjournaled and prepare is not None and record.op == "save":
            prepare = _staged_or_in_place(prepare, record)
        return build_job(
            record,
            store,
            trainer=trainer,
            settle=settle,
            known=known,
            outcome=outcome,
            prepare=prepare,
        )

    @property
    def kept_out(self) -> int:
        """How many journaled jobs an interrupt kept from admission (see :meth:`submit`)."""
        return len(self._unadmitted)

    def kept_out_jobs(self) -> list[JobSpec]:
        """The journaled jobs an interrupt kept from admission, in submission order."""
        return list(self._unadmitted)

    def submit_interrupted(self, timeout: float | None) -> None:
        """Admit the jobs an interrupt kept out (SIGTERM ended their wait for a slot), so
        the flush at exit persists them too; within ``timeout`` seconds (None: no limit).

        Lightning has stopped: nothing rewrites or removes their files any more.
        """
        pipeline = self.pipeline
        if pipeline is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._unadmitted:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Training has ended: the wait is teardown's, not a training stall.
            if not pipeline.submit(self._unadmitted[0], timeout=left, training=False):
                return  # still journaled, and named: the next setup or a flush persists them
            self._unadmitted.pop(0)

    def replay(
        self,
        pending: list[Pending],
        store_for: StoreLookup,
        *,
        trainer: Any,
        outcome: Outcome | None,
        committed: FolderFlags | None = None,
    ) -> int:
        """Queue the replay of ``pending`` ahead of any new job; return how many were queued.

        All at once, beyond ``max_pending`` (their files are on disk already): ``setup``
        does not wait for storage, however long the outbox, and training starts while
        they run; new jobs then queue behind them as usual.
        """
        specs, _ = replay_jobs(
            pending, store_for, trainer=trainer, outcome=outcome, committed=committed
        )
        pipeline = self.ensure_pipeline()
        for spec in specs:
            pipeline.submit(dataclasses.replace(spec, beyond_limit=True), training=False)
        return len(specs)

    # -- the outbox -------------------------------------------------------------------------

    def open_outbox(self, root: Path, digest: str, *, enabled: bool, dirpath: Any) -> None:
        """Check the working folder is usable; open this callback's journal if one exists.

        Creates nothing: a journal is created at the first job (:meth:`journal`). An
        existing one (an earlier run's, same callback) is opened and locked now, so its
        jobs replay first. Raises CheckpointDirectoryError if the folder is unusable.
        """
        self._outbox_plan = (root, digest, dirpath) if enabled else None
        self._no_outbox = not enabled
        if self.outbox is not None:
            return
        try:
            _check_writable(root)
            if dirpath is not None:
                _check_writable(Path(dirpath))
            if enabled:
                self.outbox = _open_journal(root, digest, create=False)
                self._pid = current_pid()
        except OSError as error:
            raise _directory_error(error, root, dirpath) from error

    def outbox_planned(self) -> bool:
        """Whether :meth:`open_outbox` ran since the last stop (journaling on or off)."""
        return self.outbox is not None or self._outbox_plan is not None or self._no_outbox

    def check_free_space(self, root: Path, needed: int, dirpath: Any) -> None:
        """Raise CheckpointDirectoryError if the checkpoint directory (``dirpath``, where
        Lightning writes; else the working folder ``root``) has less than ``needed`` bytes
        free. Measured there: it may be another filesystem than the folder above it (a
        mount point), where the working folder is, whose own full disk only leaves jobs
        unjournaled (see :meth:`journal`)."""
        try:
            where = Path(os.path.abspath(dirpath)) if dirpath else root
            free = shutil.disk_usage(_existing_ancestor(where)).free
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

    def journal(self, record: JobRecord) -> Callable[[str], None] | None:
        """Write ``record`` durably into the outbox before its job is admitted.

        Returns what marks the record finished, None without an outbox. On a full disk
        (the checkpoint itself was written: Lightning keeps training, as it would) the
        job goes on unjournaled, with a warning: it is persisted as usual, only a crash
        before that would leave it out of a replay.
        """
        try:
            outbox = self.outbox
            if outbox is None:
                if self._outbox_plan is None:
                    return None
                root, digest, dirpath = self._outbox_plan
                try:
                    # Its first line is fsynced with the first job's, off the training thread.
                    outbox = _open_journal(root, digest, create=True, sync=False)
                except OSError as error:
                    raise _directory_error(error, root, dirpath) from error
                assert outbox is not None  # create=True opens one or raises
                self.outbox = outbox
                self._pid = current_pid()
            settle = Settle(outbox, outbox.append(record))
            if self.unjournaled:  # saved again, journaled this time (a later fit, room again)
                self.unjournaled.discard(absolute(record.local_path))
            return settle
        except OSError as error:
            if error.errno not in _NO_SPACE:
                raise
            _warn_unjournaled(record, error)
            if record.op == "save":
                self.unjournaled.add(absolute(record.local_path))
            return _unjournaled

    def close_outbox(self, working: Sequence[threading.Thread] = ()) -> None:
        """Release this callback's journal and the foreign ones it replayed; with
        ``working`` (threads of a stopped pipeline still running a job), once they return.

        A Ctrl+C meanwhile is raised once every one is released or handed to its keeper
        (see ctrl_c_after): raised between, a journal let go here and never closed stayed
        locked, and a flush or the next fit in this process found it held."""
        with _sigterm.ctrl_c_after():
            outbox, self.outbox = self.outbox, None
            self._outbox_plan, self._no_outbox = None, False
            foreign, self.foreign = self.foreign, []
            for journal in (outbox, *foreign):
                if journal is not None:
                    keep_until_done(journal, working)

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
        # The name is taken from now until the file is staged (or the staging dropped): a
        # replay in this process (a later fit's setup, after a Ctrl+C left the intake
        # thread running) waits for it, and finds the staged copy it then releases, not
        # one the intake thread makes after it.
        done = _Done(filepath)
        if len(self._staging_done) > 256:
            self._staging_done = {p: e for p, e in self._staging_done.items() if not e.is_set()}
        # Another callback's save of this path, still to be staged (two callbacks sharing a
        # name): a background write replaces the file only once that has its bytes. (A
        # file Lightning writes here waited for it on the training thread: move_aside.)
        earlier = self._others_stagings(filepath) if write is not None else []
        self._staging_done[absolute(filepath)] = done
        before_start = getattr(write, "before_start", None)
        if earlier and before_start is not None:
            # Also where the training thread runs the write itself (on_exception).
            before_start(partial(self._wait_for_stagings, earlier, filepath))

        def prepare() -> int:
            try:
                if write is not None:
                    self._wait_for_stagings(earlier, filepath)
                    try:
                        write()
                    except Exception as error:
                        note_never_written(error)
                        raise
                return stager.stage(filepath, staged)[1]
            except FileNotFoundError as error:
                if write is None and not os.path.lexists(filepath):
                    raise FileNotFoundError(error.errno, _never_there(filepath)) from error
                raise
            finally:
                done.set()  # and the name goes back
                stager.empty_trash()

        return staged, prepare

    def drop_staging(self, filepath: str | Path) -> None:
        """Forget a planned staging that will never run (its job was never submitted), so
        that nothing waits for it."""
        done = self._staging_done.pop(absolute(filepath), None)
        if done is not None:
            done.set()

    def abandon_staging(self, filepath: str | Path, write: Callable[[], None] | None) -> None:
        """A planned staging whose job will never be submitted (a hook raised first).

        Nothing waits for it, unless ``write`` must still finish on its own (it puts the
        previous file back once a CheckpointIO's rewrite is done): then it runs on a
        thread of its own, and a later rewrite or removal of the file waits for that.
        """
        if write is None or not getattr(write, "finishes_alone", False):
            self.drop_staging(filepath)
            return
        _finish_alone(write, self._staging_done.get(absolute(filepath)))

    def staging_of(self, filepath: str | Path) -> _Done | None:
        """The staging of ``filepath`` not finished yet, for a wait elsewhere (it is no
        longer waited for here: see :meth:`await_staging`); None if there is none."""
        done = self._staging_done.pop(absolute(filepath), None)
        return None if done is None or done.is_set() else done

    def await_staging(self, filepath: str | Path) -> None:
        """Before Lightning removes or rewrites a file, make sure it has been staged: by
        this callback, and by any other of this process that saved it too (two callbacks
        sharing a file name: ``enable_version_counter=False``)."""
        done = self.staging_of(filepath)
        waits = [(self, done)] if done is not None else []
        waits += self._others_stagings(filepath)
        if not waits:
            return
        started = time.monotonic()
        self._wait_for_stagings(waits, filepath)
        self._stats.add(training_stall_seconds=time.monotonic() - started)

    def others_stagings(self, filepath: str | Path) -> list[_Done]:
        """The unfinished stagings of ``filepath`` by other callbacks of this process."""
        return [done for _, done in self._others_stagings(filepath)]

    def _others_stagings(self, filepath: str | Path) -> list[tuple[Submitter, _Done]]:
        """The unfinished stagings of ``filepath`` by the other submitters of this process."""
        if len(_SUBMITTERS) < 2:
            return []
        key = absolute(filepath)
        found = []
        for other in list(_SUBMITTERS):
            done = other._staging_done.get(key) if other is not self else None
            if done is not None and not done.is_set():
                found.append((other, done))
        return found

    def _wait_for_stagings(
        self, waits: list[tuple[Submitter, _Done]], filepath: str | Path
    ) -> None:
        for submitter, done in waits:
            pipeline = submitter.pipeline
            if pipeline is not None:
                pipeline.release()  # its job may be held (see holding)
            if not done.wait(timeout=self._staging_timeout):
                log.warning("staging %s did not finish; removing or rewriting it anyway", filepath)

    def move_aside(
        self, root: Path, filepath: str | Path, *, by_rename: bool = False
    ) -> Callable[[bool], None]:
        """Set an existing file aside before Lightning rewrites it.

        The rewrite would free its blocks on the training thread, or rewrite in place
        the inode a queued upload still reads. ``by_rename``: the rewrite replaces the
        file by a rename (:func:`~lamin_lightning._checkpoint_io.rewrites_by_rename`);
        a regular file then gets a second name aside (a hard link) and keeps its own
        until the new file takes it, as with ``ModelCheckpoint`` (another callback's
        hook, or another process, reading it meanwhile finds it). Otherwise, or where
        that cannot be linked, it is renamed aside, out of the writer's way.

        Returns ``done(rewritten)``, to call once Lightning's write returned or raised:
        a failed rewrite (a full disk) puts the previous file back, so the checkpoint
        to resume from is never lost; a rewrite that worked sends it to the trash
        (deleted off the training thread). A crash in between leaves it aside, under
        this process's lock: the next ``setup``, a ``ckpt_path="last"`` lookup or
        ``lamin-lightning flush`` puts it back, or deletes it where the file is whole
        (:mod:`lamin_lightning._aside`).
        """
        self.await_staging(filepath)
        try:
            mode = os.lstat(filepath).st_mode
        except OSError:
            return _nothing_aside
        stager = self.stager(root)
        try:
            aside = None
            if by_rename and stat.S_ISREG(mode):
                folder = Path(os.path.dirname(os.path.abspath(filepath)))
                if stager.link_safe(folder):
                    try:
                        aside = _aside.link_aside(root, filepath)
                    except OSError as error:  # a filesystem without hard links, say
                        if error.errno in NO_LINKS:
                            stager.forget_link_safety(folder)
            linked = aside is not None
            if aside is None:
                # Counted as away before it goes: an eviction waiting for this name on the
                # intake thread must never find it neither there nor away.
                _AWAY.add(filepath)
                try:
                    aside = _aside.move_aside(root, filepath)
                except BaseException:
                    _AWAY.discard(filepath)
                    raise
        except OSError:
            detach_before_rewrite(filepath)
            return _nothing_aside

        def done(rewritten: bool) -> None:
            try:
                put_back_or_trash(rewritten)
            finally:
                if not linked:
                    _AWAY.discard(filepath)

        def put_back_or_trash(rewritten: bool) -> None:
            if linked and not rewritten and _same_file(filepath, aside):
                remove_path(aside)  # the rewrite failed before its rename: nothing changed
                return
            if not rewritten:
                # What the failed rewrite left (a file or folder written partway, as a full
                # disk leaves it) goes; the previous checkpoint comes back.
                if os.path.lexists(filepath) and not stager.trash(filepath):
                    remove_path(filepath)
                try:
                    os.replace(aside, filepath)
                    return
                except OSError as error:
                    log.error("could not put %s back after its rewrite failed: %s", filepath, error)
            if not stager.trash(aside):
                remove_path(aside)

        return done

    def remove_once_written(
        self,
        root: Path,
        filepath: str | Path,
        replacement: str | Path,
        then: Callable[[], None] | None = None,
        write: BackgroundWrite | None = None,
    ) -> Callable[[], int]:
        """Lightning's removal of ``filepath``, for the intake thread, once ``replacement``
        (written in the background, by an earlier job: ``write``) exists; none if it was
        never written, or its write failed (a writer that writes in place may leave part
        of a file).

        The jobs' preparations run one at a time in submission order, so the
        replacement's write, and this callback's staging of ``filepath``, are finished
        by then. Another callback's save of ``filepath`` still to be staged (two
        callbacks sharing a name, ``enable_version_counter=False``) runs on its own
        intake thread, in no order with this one: the removal waits for it, as a
        removal on the training thread waits (:meth:`await_staging`).
        """
        earlier = self._others_stagings(filepath)
        others = partial(self._wait_for_stagings, earlier, filepath) if earlier else None
        return RemovalOnceWritten(
            self.stager(root), filepath, replacement, then, write, others, owner=self
        )

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
        self._unadmitted = []  # journaled: the next setup or a flush persists them
        # What the jobs abandoned here held up in other callbacks (see
        # _after_other_callbacks) goes on: nothing orders it with them any more.
        jobs_of_key, self._jobs_of_key = self._jobs_of_key, {}
        for done in jobs_of_key.values():
            done.set()
        try:
            if pipeline is not None:
                pipeline.stop(timeout=0)
        finally:
            # An upload a teardown gave up on goes on: its journal stays held meanwhile
            # (also when a second Ctrl+C cut the stop short).
            working = pipeline.still_working() if pipeline is not None else []
            try:
                for root, stager in self._stagers.items():
                    stager.empty_trash()
                    _aside.release(root)
                    release_staging(root)
            finally:
                self.close_outbox(working)


def stop_collected(submitter: Submitter, timeout: float | None) -> None:
    """Stop the pipeline of a callback collected without ``teardown``, off the collecting
    thread (which may be one of the pipeline's own): admitted jobs finish within
    ``timeout`` (what is left stays journaled), then its threads end and its outbox is
    released."""

    if submitter.pipeline is None and submitter.outbox is None:
        return  # torn down already: nothing runs, nothing is held
    if submitter.forked_copy:
        return  # collected in a forked child: the parent's, not to touch

    def stop() -> None:
        pipeline = submitter.pipeline
        if pipeline is not None and not pipeline.flush(timeout):
            log.warning("a collected callback left jobs unpersisted; they stay journaled")
        submitter.stop()

    threading.Thread(target=stop, name="lamin-lightning-collected", daemon=True).start()


class RemovalOnceWritten:
    """Lightning's removal of a file evicted in favour of a checkpoint still being written
    (``async_write``), run on the intake thread once that write is done: the file goes if
    the replacement was written (its write finished without failing, or the replacement
    exists), else it stays. :attr:`kept` remembers which, for the commit:
    by then Lightning may have written a new checkpoint under the same name (top-k names
    without a version counter), so the folder no longer tells.

    Another save of the name meanwhile (see :func:`supersede_removals`) replaces the file:
    the removal then leaves the folder alone, as ModelCheckpoint's removal came before
    that save. This callback's own background writes need not tell it: they run on the
    same intake thread, after it."""

    __slots__ = (
        "__weakref__",
        "_filepath",
        "_key",
        "_lock",
        "_others",
        "_replacement",
        "_stager",
        "_superseded",
        "_then",
        "_write",
        "kept",
        "owner",
    )

    def __init__(
        self,
        stager: Stager,
        filepath: str | Path,
        replacement: str | Path,
        then: Callable[[], None] | None,
        write: BackgroundWrite | None = None,
        others: Callable[[], None] | None = None,
        *,
        owner: Submitter | None = None,
    ) -> None:
        self._stager = stager
        self._filepath = filepath
        self._replacement = replacement
        self._then = then
        self._write = write
        # Waits for the stagings of ``filepath`` by other callbacks that were pending when
        # Lightning evicted it: their saves came first, and persist the file they wrote.
        self._others = others
        self.owner = owner
        self.kept: bool | None = None  # None until it ran
        self._lock = threading.Lock()  # held while deciding and moving the file
        self._superseded: bool | None = False  # None once it ran
        self._key = _name_key(filepath)
        _PENDING_REMOVALS.add(self._key, self)

    @property
    def replacement_write(self) -> BackgroundWrite | None:
        """The write of the replacement this removal waits for."""
        return self._write

    def superseded(self) -> bool:
        """Whether a later save of the name told this removal to leave the file alone."""
        return self._superseded is True

    def supersede(self) -> None:
        """A save of the file's name has started (see :func:`supersede_removals`): the file
        there will be the new one, not to be removed. If the removal is moving the file
        right now, waits until it is moved (the new file comes after it)."""
        with self._lock:
            if self._superseded is not None:
                self._superseded = True

    def __call__(self) -> int:
        try:
            if self._others is not None:
                self._others()
            write = self._write
            failed = write is not None and write.failed()
            # A write that finished without failing wrote the replacement, whatever became
            # of it since: a later eviction of it, its own replacement written already,
            # removed it on the training thread before this ran (a last name that changes
            # every step), as ModelCheckpoint removes both.
            written = write is not None and write.done() and not failed
            # Written, then renamed aside for its own rewrite (a CheckpointIO that writes
            # later, AsyncCheckpointIO: a name rewritten within an epoch): a file is there
            # again once that is written, its rewrite's or, if it fails, this one.
            there = os.path.lexists(self._replacement) or _AWAY.holds(self._replacement)
            self.kept = not (written or (not failed and there))
            with self._lock:
                superseded, self._superseded = self._superseded, None
                # Not renamed into the trash (another filesystem: dirpath is a mount point,
                # or the file is in a linked subfolder): deleted here, as Lightning would.
                if not self.kept and not superseded and not self._stager.trash(self._filepath):
                    remove_path(self._filepath)
        finally:
            with self._lock:
                self._superseded = None  # (dropped: nothing left to tell)
            _PENDING_REMOVALS.discard(self._key, self)
            if self._then is not None:
                self._then()  # told that the removal ran (or was dropped)
        self._stager.empty_trash()
        return 0


class _PendingRemovals:
    """The :class:`RemovalOnceWritten` of this process not run yet, by the file's real path
    (weakly: one a stopped pipeline dropped is forgotten with it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[str, weakref.WeakSet[RemovalOnceWritten]] = {}

    def add(self, key: str, removal: RemovalOnceWritten) -> None:
        with self._lock:
            self._by_path.setdefault(key, weakref.WeakSet()).add(removal)

    def discard(self, key: str, removal: RemovalOnceWritten) -> None:
        with self._lock:
            removals = self._by_path.get(key)
            if removals is not None:
                removals.discard(removal)
                if not removals:
                    del self._by_path[key]

    def of(self, filepath: str | Path) -> list[RemovalOnceWritten]:
        if not self._by_path:
            return []  # the common case, at every save: no realpath
        key = _name_key(filepath)
        with self._lock:
            for path in [path for path, removals in self._by_path.items() if not removals]:
                del self._by_path[path]  # every one dropped unrun, and collected
            return list(self._by_path.get(key, ()))


_PENDING_REMOVALS = _PendingRemovals()


def _name_key(filepath: str | Path) -> str:
    """The name ``filepath`` makes in its real folder (a link there is not followed: a
    link is removed or replaced by name)."""
    folder, name = os.path.split(os.path.abspath(filepath))
    return os.path.join(os.path.realpath(folder), name)


def removals_waiting(filepath: str | Path, *, but_of: Submitter | None) -> list[BackgroundWrite]:
    """The replacements' writes that removals of the file at ``filepath`` wait for, those
    of submitters other than ``but_of`` (none if there are none: the common case). Not
    those a later save superseded: they remove nothing, the file there is that save's."""
    return [
        removal.replacement_write
        for removal in _PENDING_REMOVALS.of(filepath)
        if removal.owner is not but_of
        and removal.replacement_write is not None
        and not removal.superseded()
    ]


def supersede_removals(
    filepath: str | Path, *, but_of: Submitter | None = None
) -> list[RemovalOnceWritten]:
    """A checkpoint is about to be written at ``filepath``, or a link made there (on the
    training thread, before the file or link can be there): a removal of the file there
    still waiting for its replacement's write (:class:`RemovalOnceWritten`) would delete
    the new one. ModelCheckpoint removed the old file before this save; the new file
    replaces it all the same, so such a removal leaves the folder alone now (its
    artifact still goes). ``but_of``: a submitter whose removals this save comes after
    anyway (its own background write, on the same intake thread); returned, left alone
    (none, commonly): should the write run elsewhere after all (on the training thread,
    after a crash), it supersedes them then (see ``HostWrite.before_start``)."""
    left = []
    for removal in _PENDING_REMOVALS.of(filepath):
        if but_of is not None and removal.owner is but_of:
            left.append(removal)
        else:
            removal.supersede()
    return left


class _Away:
    """The files of this process renamed aside for a rewrite still being written (see
    ``Submitter.move_aside``), by absolute path: not at their path meanwhile, but there
    for Lightning."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: collections.Counter[str] = collections.Counter()

    def add(self, path: str | Path) -> None:
        with self._lock:
            self._paths[os.path.abspath(path)] += 1

    def discard(self, path: str | Path) -> None:
        name = os.path.abspath(path)
        with self._lock:
            self._paths[name] -= 1
            if self._paths[name] <= 0:
                del self._paths[name]

    def holds(self, path: str | Path) -> bool:
        with self._lock:
            return os.path.abspath(path) in self._paths


_AWAY = _Away()


# Every submitter of this process: two callbacks may save one path, and each finds the
# other's save of it staged before replacing it, as it finds its own (see await_staging).
_SUBMITTERS: weakref.WeakSet[Submitter] = weakref.WeakSet()


def _others_finished(earlier: list[tuple[Submitter, Any, _Done]]) -> bool:
    """Whether each of the other callbacks' jobs finished, or the pipeline that held it is
    gone (stopped, or replaced by a later fit's): see ``_after_other_callbacks``."""
    return all(
        done.is_set() or submitter.pipeline is not pipeline for submitter, pipeline, done in earlier
    )


class _Done:
    """A one-shot signal, as ``threading.Event`` but one lock (no ``Condition``): one is
    made per save on the training thread. Set once; waited on by the training thread.

    Given a ``name`` (a staging's file), it takes that name (:func:`take_name`) until set.
    """

    __slots__ = ("_lock", "_name")

    def __init__(self, name: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._name = name
        if name is not None:
            take_name(name, staging=True)

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # set already
            return
        if self._name is not None:
            release_name(self._name, staging=True)

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return False
        self.set()  # set again, for any other waiter
        return True


def _finish_alone(write: Callable[[], None], done: _Done | None = None) -> None:
    """Run a rewrite's wait and put-back (``finishes_alone``) on a thread of its own, then
    set ``done``; its failure is logged (the file was not rewritten: the previous one is
    back)."""

    def finish() -> None:
        try:
            write()
        except BaseException as error:
            log.warning("a rewrite did not finish: %s", error)
        finally:
            if done is not None:
                done.set()

    threading.Thread(target=finish, name="lamin-lightning-put-back", daemon=True).start()


def _never_there(filepath: str | Path) -> str:
    """Why a file saved synchronously is missing when it is to be staged, and the fix."""
    return (
        f"{filepath} did not exist when it was to be persisted. If its folder cannot be"
        " written to (permissions, a read-only mount), Lightning's own CheckpointIO skips"
        " the file without an error: make the folder writable. If it is a checkpoint"
        " written by a CheckpointIO of yours, that one returned from save_checkpoint"
        " before writing it, so it"
        " writes in the background in a way lamin-lightning cannot follow: make its"
        " save_checkpoint write before it returns, and for writes off the training thread"
        " wrap it in Lightning's AsyncCheckpointIO"
        " (Trainer(plugins=[AsyncCheckpointIO(YourIO())])), whose writes lamin-lightning"
        " follows; or, for plain torch.save files, drop it and pass async_write=True."
        " Otherwise something removed the file before it was staged."
    )


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file (False if either is missing)."""
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def _nothing_aside(rewritten: bool) -> None:
    """``move_aside``'s answer when nothing was moved."""


def _open_journal(root: Path, digest: str, *, create: bool, sync: bool = True) -> Outbox | None:
    """Open and lock the journal named ``digest`` (the first free one of that name).

    ``create=False``: only an existing one (None if there is none free).
    """
    for attempt in range(16):
        suffix = f"-{attempt}" if attempt else ""
        outbox = Outbox(root / f"outbox-{digest}{suffix}.jsonl")
        if not create and not outbox.path.exists():
            continue
        try:
            outbox.open(sync=sync)
        except OutboxInUseError:
            # An identical callback in this trainer holds it, or another process: a
            # training run writing to the same dirpath, or a `lamin-lightning flush`.
            if not held_in_this_process(outbox.path):
                _warn_held_elsewhere(outbox.path)
            continue
        return outbox
    if not create:
        return None
    raise CheckpointDirectoryError(
        f"every outbox journal for this callback under {root} is in use; is another"
        " training process writing checkpoints to the same dirpath?"
    )


_warned_held: set[Path] = set()


def _warn_held_elsewhere(path: Path) -> None:
    if path in _warned_held:
        return
    _warned_held.add(path)
    log.warning(
        "lamin-lightning: the outbox journal %s is held by another process (a"
        " `lamin-lightning flush` of this folder, or another training run writing to it);"
        " its jobs are left to that process and this run journals into a journal of its"
        " own. If it is a flush, let it finish before training in this folder: saves it"
        " replays after this run's saves of the same keys (last.ckpt) would replace them.",
        path,
    )


def _check_writable(root: Path) -> None:
    """Raise OSError unless ``root`` is, or can be created as, a writable folder.

    Creates nothing (``setup`` alone leaves no file behind).
    """
    folder = _existing_ancestor(root)
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        if _on_read_only_filesystem(folder):  # what a write would meet (as root, too)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def _on_read_only_filesystem(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
        return False


def _sigterm_received(trainer: Any) -> BaseException | None:
    """Lightning's SIGTERMException once the trainer received SIGTERM (ends a wait)."""
    if not getattr(trainer, "received_sigterm", False):
        return None
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return SIGTERMException()


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    folder = Path(os.path.abspath(path))
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


# A journal line that cannot be written for want of space: the job goes on unjournaled.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _unjournaled(status: str) -> None:
    """Marks finished a job whose record could not be journaled: nothing to mark."""


def _staged_or_in_place(prepare: Callable[[], int], record: JobRecord) -> Callable[[], int]:
    """``prepare``; if the staged copy finds the disk full as well, the job persists the
    file from where Lightning wrote it (no journal line would let a flush retry it).

    Lightning may evict or rewrite the file before its upload: the upload then fails, or
    reads the newer file, which the newer job of the key replaces anyway.
    """

    def staged_or_in_place() -> int:
        try:
            return prepare()
        except OSError as error:
            if (
                error.errno not in _NO_SPACE
                or not record.staged_path
                or not os.path.lexists(record.local_path)  # its own write failed
            ):
                raise
            shutil.rmtree(Path(record.staged_path).parent, ignore_errors=True)
            log.warning(
                "could not stage %s either (%s): it is persisted from the checkpoint directory",
                record.local_path,
                error.strerror or error,
            )
            return record.size()

    return staged_or_in_place


def _warn_unjournaled(record: JobRecord, error: OSError) -> None:
    what = "removal of" if record.op == "remove" else "save of"
    warnings.warn(
        f"lamin-lightning could not journal the {what} {record.local_path} in its outbox"
        f" ({error.strerror or error}). It is persisted in the background as usual, but"
        " not crash-safe: if this process dies before it is persisted, neither the next"
        " setup nor `lamin-lightning flush` knows of it. Free space in the checkpoint"
        " directory.",
        UserWarning,
        stacklevel=2,
    )


def _directory_error(error: OSError, root: Path, dirpath: Any) -> CheckpointDirectoryError:
    if isinstance(error, CheckpointDirectoryError):
        return error
    if error.errno == errno.ENAMETOOLONG and root.name.endswith(WORKING_SUFFIX):
        try:
            most = os.pathconf(_existing_ancestor(root.parent), "PC_NAME_MAX")
        except (OSError, ValueError):
            most = 255
        added = len(root.name.encode()) - len(checkpoint_folder_of(root).name.encode())
        return CheckpointDirectoryError(
            error.errno,
            f"lamin-lightning's working folder beside the checkpoint directory {dirpath!s} is"
            f" named from it ({root.name!r}), {added} bytes longer, and that is longer than"
            f" this filesystem allows ({most} bytes). Pass a dirpath whose last folder's name"
            f" is at most {most - added} bytes long.",
        )
    fix = (
        "mount it read-write" if error.errno == errno.EROFS else "fix its permissions or free space"
    )
    return CheckpointDirectoryError(
        error.errno,
        f"lamin-lightning cannot write to the checkpoint directory {dirpath!s} or to its"
        f" working folder {root} beside it ({type(error).__name__}: {error.strerror or error})."
        f" Pass a dirpath that you (and the folder that holds it) can write to, or {fix}.",
    )


__all__ = ["Submitter", "staging_root", "stop_collected"]
