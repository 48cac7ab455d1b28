"""The durable outbox: a journal of admitted jobs that survives a crash.

Knows nothing of Lightning or LaminDB. Each callback journals every job it
admits (a :class:`~lamin_lightning._jobs.JobRecord`) into a JSON-lines file
(``outbox-<id>.jsonl`` in the working folder beside ``dirpath``) *before* the job is admitted.

Durability, precisely: the training thread's append is one ``write(2)`` into the page
cache, which survives the death of the process (SIGKILL, OOM, preemption), exactly
like the checkpoint Lightning just wrote (``torch.save`` does not fsync either). The
fsync runs off the training thread (:meth:`Outbox.sync`, grouped: one ``fdatasync``
covers every line written before it), before the job's upload or removal starts. A
kernel crash or power loss can lose the newest lines, with the newest checkpoints;
a line whose file did not survive is dropped at replay with an error naming it.

When a job is finished for good (committed, cancelled, superseded, or made obsolete
by a later job of the same key) a ``done`` line follows; a job that failed stays
pending, for a later replay.

Lines::

    {"t": "job", "id": "<hex>", "entry": {...}}      # admitted (durable)
    {"t": "done", "id": "<hex>", "status": "saved"}  # finished
    {"t": "flags", "prefix": "...", "at": 1.7e9, ...}  # newest committed checkpoint save

The ``flags`` line (also carried by the ``done`` line of a checkpoint save) records
when the newest *committed* checkpoint of a prefix was submitted: a replayed older
save then leaves the flags and ranks of that prefix alone. Written by a compaction, it
also says what that save flagged (``key``, ``ranking``, ``best_key``) and the newest
committed save that was its callback's best (``best``: ``[at, key]``), which a ``done``
line's job line tells until then: the replays of several callbacks' journals of one
folder start from what all of them committed (:func:`folder_flags`). Readers of an
earlier version read ``at`` only.

A torn last line (a crash or a full disk mid-write) is ignored when read, and cut
off before the next append, so it never swallows the next job. The file is
compacted (rewritten with only the pending jobs, then renamed over) once finished
lines dominate, so it does not grow with the length of training.

One process at a time may hold a journal: :meth:`Outbox.open` takes an exclusive,
non-blocking ``flock``, so a ``lamin-lightning flush`` never replays the jobs of a
training process that is still running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from lamin_lightning import _flocks
from lamin_lightning._errors import OutboxInUseError
from lamin_lightning._jobs import (
    CommittedFlags,
    JobRecord,
    decode,
    encode,
    relocate,
    replayed_sequence,
)
from lamin_lightning._staging import (
    STAGED_DIRNAME,
    UNIQUE_NAME,
    release_staged,
    staged_owner,
    unique_name,
)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process exclusion
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lamin_lightning")


JOURNAL_PREFIX = "outbox-"
JOURNAL_SUFFIX = ".jsonl"
COMPACT_AFTER_LINES = 64
# The new files of a compaction: at close (under the lock), and off the lock (settles).
_COMPACTION_SUFFIXES = (".tmp", ".compacting")


def journal_paths(root: str | os.PathLike[str]) -> list[Path]:
    """The journals in a working folder (see ``_staging.staging_root``), oldest first."""
    folder = Path(root)
    try:
        found = [
            p
            for p in folder.iterdir()
            if p.name.startswith(JOURNAL_PREFIX) and p.name.endswith(JOURNAL_SUFFIX)
        ]
    except (FileNotFoundError, NotADirectoryError):
        return []

    def age(path: Path) -> tuple[float, str]:
        try:
            return path.stat().st_mtime, path.name
        except FileNotFoundError:  # emptied and deleted meanwhile (a teardown, a flush)
            return float("inf"), path.name

    return [p for p in sorted(found, key=age) if p.exists()]


_reported: set[tuple[str, str]] = set()  # (journal, job id) already logged as unreadable
# Journals this process holds (their absolute paths), to tell a journal another callback
# of this process holds from one another process holds (a flush, another training run).
_held_here: set[str] = set()
_held_lock = threading.Lock()
# Under _held_lock, by absolute path: the Outbox that holds each of those journals, and
# the marks of jobs of a journal whose holder in this process stopped before they came (a
# CheckpointIO's write still running after a Ctrl+C'd fit gave up), for the next one here
# to open it (see Outbox._mark_elsewhere).
_holders: weakref.WeakValueDictionary[str, Outbox] = weakref.WeakValueDictionary()
_stray_marks: dict[str, dict[tuple[str, str], tuple[str, Any, dict[str, Any]]]] = {}


def flock_here(handle: IO[Any], operation: int) -> None:
    """``flock`` ``handle`` (non-blocking), a handle opened with ``_flocks.open_file``: a
    child forked later never shares the lock (see :mod:`lamin_lightning._flocks`)."""
    fcntl.flock(handle.fileno(), operation | fcntl.LOCK_NB)


# `lamin-lightning status` (is_locked) holds a shared lock for an instant to look at a
# journal: a holder that lets go that soon is not one. The waits before each new try.
_LOOKER_WAITS_S = (0.001, 0.004, 0.016)


def _flock_exclusive(handle: IO[str]) -> None:
    """:func:`flock_here` ``LOCK_EX``, tried again briefly while a looker holds the journal;
    ``BlockingIOError`` if it is still held then."""
    for wait in _LOOKER_WAITS_S:
        try:
            flock_here(handle, fcntl.LOCK_EX)
            return
        except BlockingIOError:
            time.sleep(wait)
    flock_here(handle, fcntl.LOCK_EX)


def _forked() -> None:
    # In the child only (its copies of the journals' descriptors: see _flocks).
    global _held_lock, _lingering_lock  # held by another thread of the parent, maybe
    _held_lock = threading.Lock()
    _held_here.clear()
    _holders.clear()
    _stray_marks.clear()  # of the parent's writes
    _lingering_lock = threading.Lock()
    _lingering.clear()  # their keepers are the parent's threads


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)


# Journals whose owner stopped while a thread of its pipeline still ran a job (a teardown
# gave up at flush_timeout, Ctrl+C): an upload still copying into storage, say. Each stays
# held until those threads return, or a `lamin-lightning flush` in another process would
# take the upload's record for one a crash cut short and drop it under the copy, which then
# finishes into a file no record names. In this process, the next opener of the journal
# (the next fit's setup, flush_directory) takes it over: a replay here waits for this
# process's own upload instead (see _lamin_store._wait_for_upload_here).
# Each with the threads it waits for; by real path (a dirpath reached through a link).
_lingering: dict[str, tuple[Outbox, list[threading.Thread]]] = {}
_lingering_lock = threading.Lock()  # held while one is closed (before _held_lock)


def _lingering_key(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(path)


def keep_until_done(outbox: Outbox, threads: Iterable[threading.Thread] = ()) -> None:
    """Close ``outbox`` once every one of ``threads`` has returned, and those it took over
    with its journal (see :meth:`Outbox.open`); at once if none runs. Until then another
    process finds the journal held, and the next opener in this process takes it over."""
    current = threading.current_thread()
    waits = [t for t in (*threads, *outbox._waits_for) if t.is_alive() and t is not current]
    if not waits or not outbox.is_open:
        outbox._close_now()
        return
    key = _lingering_key(outbox.path)
    with _lingering_lock:
        _lingering[key] = (outbox, waits)
    keeper = threading.Thread(
        target=_close_when_done,
        args=(key, outbox, waits),
        name="lamin-lightning-journal-keeper",
        daemon=True,
    )
    started = False
    try:
        keeper.start()
        started = True
    finally:
        if not started:  # interrupted, or no thread to be had: released now, as before
            _close_lingering(key, outbox)


def _close_when_done(key: str, outbox: Outbox, threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()
    _close_lingering(key, outbox)


def _close_lingering(key: str, outbox: Outbox) -> None:
    """Close ``outbox``, kept by :func:`keep_until_done`, unless the next opener in this
    process took it over meanwhile."""
    with _lingering_lock:
        entry = _lingering.get(key)
        if entry is None or entry[0] is not outbox:
            return
        del _lingering[key]
        outbox._close_now()


def _take_lingering(path: Path) -> tuple[Outbox, list[threading.Thread]] | None:
    with _lingering_lock:
        return _lingering.pop(_lingering_key(path), None)


def held_in_this_process(path: Path) -> bool:
    """Whether an :class:`Outbox` of this process holds the journal at ``path``."""
    with _held_lock:
        return os.path.abspath(path) in _held_here


def _report_once(path: Path, job_id: str, message: str, *args: Any) -> None:
    if (str(path), job_id) not in _reported:
        _reported.add((str(path), job_id))
        log.error(message, *args)


def _whole_line(data: bytes) -> bool:
    """Whether ``data`` (a journal's last line, without its newline) is a whole line: a
    JSON object. No part of a line cut short is one (its outer brace is never closed)."""
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False


class _State:
    """What a journal's lines say: pending entries (raw, by id) and the flags marks.

    Per prefix, beside the time of the newest committed checkpoint save
    (:attr:`flags_at`): that save's key, ranking and best key (:attr:`last`), and the
    time and key of the newest committed save that was its callback's best
    (:attr:`best`), from the job line of the save a ``done`` line settles, or from a
    compacted ``flags`` line. A prefix marked by a line that tells its time only (a
    journal of an earlier version) is :attr:`unknown`: what it flagged is not known.
    """

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Any]] = {}
        self.flags_at: dict[str, float] = {}
        self.last: dict[str, tuple[float, str, tuple[str, ...], str | None]] = {}
        self.best: dict[str, tuple[float, str]] = {}
        self.unknown: set[str] = set()

    def mark(self, prefix: Any, at: Any, saved: Any = None) -> None:
        """Mark the commit of a checkpoint save under ``prefix`` submitted at ``at``;
        ``saved``: its journaled entry (None: a line that tells the time only)."""
        if not (isinstance(prefix, str) and isinstance(at, int | float)):
            return
        self.flags_at[prefix] = max(float(at), self.flags_at.get(prefix, 0.0))
        snapshot = saved.get("snapshot") if isinstance(saved, dict) else None
        key = saved.get("key") if isinstance(saved, dict) else None
        if not isinstance(snapshot, dict) or not isinstance(key, str):
            self.unknown.add(prefix)
            return
        best = (float(at), key) if snapshot.get("is_best") is True else None
        self._note(prefix, float(at), key, snapshot.get("ranking"), snapshot.get("best_key"), best)

    def mark_line(self, item: dict[str, Any]) -> None:
        """A ``flags`` line: the time, and (written by this version) what was flagged."""
        prefix, at, key = item.get("prefix"), item.get("at"), item.get("key")
        if not isinstance(key, str):  # an earlier version's line: the time only
            self.mark(prefix, at)
            return
        if not (isinstance(prefix, str) and isinstance(at, int | float)):
            return
        self.flags_at[prefix] = max(float(at), self.flags_at.get(prefix, 0.0))
        best = item.get("best")
        newest_best = None
        if (
            isinstance(best, list)
            and len(best) == 2
            and isinstance(best[0], int | float)
            and isinstance(best[1], str)
        ):
            newest_best = (float(best[0]), best[1])
        self._note(prefix, float(at), key, item.get("ranking"), item.get("best_key"), newest_best)

    def _note(
        self,
        prefix: str,
        at: float,
        key: str,
        ranking: Any,
        best_key: Any,
        best: tuple[float, str] | None,
    ) -> None:
        last = self.last.get(prefix)
        if last is None or at >= last[0]:
            names = tuple(str(k) for k in ranking) if isinstance(ranking, list) else ()
            self.last[prefix] = (at, key, names, best_key if isinstance(best_key, str) else None)
        if best is not None:
            have = self.best.get(prefix)
            if have is None or best[0] >= have[0]:
                self.best[prefix] = best

    def flags_line(self, prefix: str, at: float) -> dict[str, Any]:
        """The ``flags`` line of a compacted journal for ``prefix``: its time, and what
        its newest committed save flagged where that is known (older readers read the
        time only)."""
        line: dict[str, Any] = {"t": "flags", "prefix": prefix, "at": at}
        last = self.last.get(prefix)
        if prefix in self.unknown or last is None:
            return line
        line.update(key=last[1], ranking=list(last[2]), best_key=last[3])
        best = self.best.get(prefix)
        if best is not None:
            line["best"] = [best[0], best[1]]
        return line

    def read(self, lines: Iterator[bytes], path: Path) -> _State:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                # Lines are ASCII (escaped JSON): a byte that is not UTF-8 is damage
                # (a bad sector, a power loss), and spoils only its own line.
                item = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                log.warning("%s:%d: ignoring a torn or corrupt journal line", path, number)
                continue
            kind = item.get("t") if isinstance(item, dict) else None
            if kind == "job" and isinstance(item.get("entry"), dict):
                # A job whose id was damaged still counts: named by its line until a
                # compaction writes it again under that name.
                job_id = item.get("id")
                self.pending[str(job_id) if job_id is not None else f"line-{number}"] = item[
                    "entry"
                ]
            elif kind == "done":
                saved = self.pending.pop(str(item.get("id")), None)
                self.mark(item.get("prefix"), item.get("at"), saved)
            elif kind == "flags":
                self.mark_line(item)
            elif kind == "written":
                # A background write completed the file of a pending save (see
                # Outbox.mark_written): its entry carries the file's identity from now on.
                entry = self.pending.get(str(item.get("id")))
                if entry is not None:
                    entry["written_file"] = item.get("file")
            elif kind == "handed":
                # A user's strategy or CheckpointIO returned from the removal of a pending
                # removal's file (see Outbox.mark_handed_over).
                entry = self.pending.get(str(item.get("id")))
                if entry is not None:
                    entry["handed_over"] = True
            elif kind != "open":
                # Not a line this version writes (damage, or a newer version's kind).
                log.warning(
                    "%s:%d: ignoring a journal line of unknown form (kind %r)", path, number, kind
                )
        return self

    def records(self, path: Path) -> list[tuple[str, JobRecord]]:
        """Pending entries decoded, in admission order; undecodable ones are logged (once)
        and left out (see :meth:`unreadable`). A record journaled in another working
        folder than the one ``path`` is in now (moved with its checkpoint folder) names
        its files where they are now (see ``_jobs.relocate``)."""
        out = []
        here = os.path.abspath(path.parent)
        for job_id, entry in self.pending.items():
            try:
                out.append((job_id, relocate(decode(entry), here)))
            except Exception as error:
                _report_once(
                    path,
                    job_id,
                    "%s: cannot read job %s (%s: %s); it stays in the journal, and the folder"
                    " counts as pending until a version of lamin-lightning that reads it"
                    " flushes it (or a later job of its key here makes it moot)",
                    path,
                    job_id,
                    type(error).__name__,
                    error,
                )
        return out

    def unreadable(self) -> list[tuple[str, str]]:
        """Pending entries this version cannot decode (a newer version's, or damaged),
        with why: they stay pending, and are reported as such."""
        out = []
        for job_id, entry in self.pending.items():
            try:
                decode(entry)
            except Exception as error:
                out.append((job_id, f"{type(error).__name__}: {error}"))
        return out


def read_journal(
    path: str | os.PathLike[str],
) -> tuple[list[tuple[str, JobRecord]], dict[str, float]]:
    """The pending records (with their ids) and flags marks of a journal, without locking it."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            state = _State().read(iter(handle), path)
    except FileNotFoundError:
        return [], {}
    return state.records(path), state.flags_at


def folder_flags(root: str | os.PathLike[str]) -> dict[str, tuple[frozenset[str], CommittedFlags]]:
    """Per prefix, what the committed checkpoint saves that the journals of the working
    folder ``root`` record left flagged (:class:`CommittedFlags`), with the names of the
    journals that record one, without locking them: where a replay starts from.

    A prefix that a journal of an earlier version marked (its time only) is left out,
    and so is every prefix where a journal cannot be read: nothing is known of them.
    """
    states: list[tuple[str, _State]] = []
    for path in journal_paths(root):
        try:
            with path.open("rb") as handle:
                states.append((path.name, _State().read(iter(handle), path)))
        except FileNotFoundError:
            continue  # emptied and deleted meanwhile
        except OSError:
            return {}
    out: dict[str, tuple[frozenset[str], CommittedFlags]] = {}
    prefixes = {prefix for _, state in states for prefix in state.flags_at}
    for prefix in prefixes:
        marked = [(name, state) for name, state in states if prefix in state.flags_at]
        if any(prefix in state.unknown or prefix not in state.last for _, state in marked):
            continue
        last = max((state.last[prefix] for _, state in marked), key=lambda mark: mark[0])
        bests = [state.best[prefix] for _, state in marked if prefix in state.best]
        best = max(bests, key=lambda mark: mark[0]) if bests else None
        out[prefix] = (
            frozenset(name for name, _ in marked),
            CommittedFlags(
                last=(replayed_sequence(last[0]), *last[1:]),
                best=(replayed_sequence(best[0]), best[1]) if best is not None else None,
            ),
        )
    return out


_REPLACES_NOTHING = frozenset({"kept", "lost"})
"""Statuses of a settled job that leave the earlier pending jobs of its key pending."""


def record_destination(record: JobRecord) -> tuple[Any, Any]:
    """Where a job persists: its store and instance (jobs of one key bound for different
    ones do not replace each other)."""
    return record.store, record.context.get("instance")


def destination(entry: dict[str, Any]) -> tuple[Any, Any]:
    """:func:`record_destination` of a raw journal entry, read as its replay reads it (an
    entry of an earlier format names its store another way)."""
    try:
        return record_destination(decode(entry))
    except Exception:  # one this version cannot read: its raw fields
        context = entry.get("context")
        instance = context.get("instance") if isinstance(context, dict) else None
        return entry.get("store", entry.get("publisher")), instance


_STAGED_NAME = re.compile(rf"{STAGED_DIRNAME}[/\\\\]+((?:{UNIQUE_NAME}))\b")


def staged_names(path: str | os.PathLike[str]) -> set[str]:
    """The staged folders (``staged/{name}``) the pending jobs of a journal read, without
    locking it; entries this version cannot decode count too."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            state = _State().read(iter(handle), path)
    except FileNotFoundError:
        return set()
    # Any path in the entry, whatever the version that wrote it: a name is unique.
    return {
        found[1]
        for entry in state.pending.values()
        for found in _STAGED_NAME.finditer(json.dumps(entry))
    }


def read_pending(path: str | os.PathLike[str]) -> list[tuple[str, JobRecord]]:
    """The unfinished jobs of a journal, in admission order, without locking it."""
    return read_journal(path)[0]


def read_unreadable(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The unfinished jobs of a journal that this version cannot decode, with why."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return _State().read(iter(handle), path).unreadable()
    except FileNotFoundError:
        return []


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether some process holds the journal at ``path`` (never modifies it)."""
    if fcntl is None:  # pragma: no cover - Windows
        return False  # type: ignore[unreachable]
    try:
        handle = _flocks.open_file(path, "r", encoding="utf-8")
    except OSError:
        return False
    try:
        flock_here(handle, fcntl.LOCK_SH)
    except BlockingIOError:
        return True
    finally:
        _flocks.close(handle)
    return False


class Outbox:
    """One journal file, held open (and locked) by one owner.

    Thread-safe: the training thread appends, the committer thread settles.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._handle: IO[str] | None = None
        self._state = _State()
        self._lines = 0
        # Bytes of the journal known to end with a complete line; a failed write leaves
        # the file longer than this, and the next write cuts it back first.
        self._good_size = 0
        self._synced_size = 0
        self._sync_lock = threading.Lock()
        # Whether the folder entry of the journal is durable (False from a compaction's
        # rename until its directory fsync): sync() makes it so before it reports.
        self._dir_synced = True
        self._compact_lock = threading.Lock()
        self._torn = False
        # Marks of pending jobs whose lines a full disk refused, by (job id, kind): written
        # before the next line (see _owe).
        self._owed: dict[tuple[str, str], dict[str, Any]] = {}
        # Journaled with every record: where it was journaled (see JobRecord.root).
        self._root = os.path.abspath(self.path.parent)
        # Threads of a stopped owner still running jobs of this journal, taken over with
        # it (see keep_until_done): it stays held until they return.
        self._waits_for: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether this outbox holds its journal."""
        return self._handle is not None

    def open(self, *, sync: bool = True) -> list[tuple[str, JobRecord]]:
        """Create or open the journal, lock it, and return its pending records.

        Raises :class:`OutboxInUseError` if another holder has it, and ``OSError`` if
        the folder is not writable or the disk is full (a line is written right away,
        so the problem shows now rather than at the first checkpoint). ``sync=False``
        leaves that line's fsync to the next :meth:`sync` (off the training thread).
        """
        # Kept by a stopped owner of this process until its stuck threads return: taken
        # over, lock and all (see keep_until_done), so no other process gets it between.
        taken = _take_lingering(self.path)
        with self._lock:
            if taken is not None:
                kept, threads = taken
                if kept is not self:  # (this one holds nothing: the kept one has the lock)
                    self._take_over(kept)
                self._waits_for = threads
                self._adopt_marks()
                return self._state.records(self.path)
            if self._handle is not None:
                return self._state.records(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = _flocks.open_file(self.path, "a+", encoding="utf-8")
            try:
                if fcntl is not None:
                    try:
                        with _held_lock:  # not while a mark is appended (_append_unheld)
                            _flock_exclusive(handle)
                    except BlockingIOError as busy:
                        raise OutboxInUseError(
                            f"{self.path} is in use by another process or callback"
                        ) from busy
                    if not _same_file(handle, self.path):
                        # We locked a journal its holder just replaced (compaction):
                        # the live one is held by someone else.
                        raise OutboxInUseError(f"{self.path} is in use by another process")
                    # A compaction the previous holder was killed in left its new file
                    # unfinished (the journal itself is whole: the rename never happened).
                    for suffix in _COMPACTION_SUFFIXES:
                        with contextlib.suppress(OSError):
                            self.path.with_name(self.path.name + suffix).unlink()
                with open(self.path, "rb") as reader:  # bytes: see _State.read
                    raw = reader.read()
                lines = raw.splitlines()
                self._state = _State().read(iter(lines), self.path)
                self._lines = len(lines)
                self._handle = handle
                self._good_size = len(raw)
                # A torn last line (a crash mid-write): cut it off, or the next line
                # would be glued onto it and lost with it. A whole one whose newline
                # alone is missing (a write cut short right before it) was read above and
                # counts: it stays, ended now, or a holder killed before its compaction
                # would have lost that job.
                self._torn = bool(raw) and not raw.endswith(b"\n")
                if self._torn:
                    cut = raw.rfind(b"\n") + 1
                    if _whole_line(raw[cut:]):
                        os.write(handle.fileno(), b"\n")
                        self._good_size, self._torn = len(raw) + 1, False
                    else:
                        self._good_size = cut
                self._write({"t": "open", "pid": os.getpid()})
                if sync:
                    os.fsync(handle.fileno())  # a full disk shows now, not at a checkpoint
                    self._synced_size = self._good_size
            except BaseException:
                self._handle = None
                _flocks.close(handle)
                raise
            with _held_lock:
                _held_here.add(os.path.abspath(self.path))
            self._adopt_marks()
            return self._state.records(self.path)

    def _adopt_marks(self) -> None:
        """Become this process's holder of the journal, and write the marks that came for
        its jobs while no one here held it (see :meth:`_mark_elsewhere`); under
        ``self._lock``."""
        path = os.path.abspath(self.path)
        with _held_lock:
            _holders[path] = self
            marks = _stray_marks.pop(path, {})
        for (job_id, _), (field, value, line) in marks.items():
            entry = self._state.pending.get(job_id)
            if entry is None:
                continue
            entry[field] = value
            item = {"t": line["t"], "id": job_id, **line}
            try:
                self._write(item)
            except OSError:
                self._owe(job_id, item)

    def _take_over(self, kept: Outbox) -> None:
        """Hold the journal ``kept`` holds (open, locked); under ``self._lock``."""
        with kept._lock:
            self._handle, kept._handle = kept._handle, None
            self._state, self._lines, self._torn = kept._state, kept._lines, kept._torn
            self._owed, kept._owed = kept._owed, {}
            self._good_size, self._synced_size = kept._good_size, kept._synced_size
            self._dir_synced = kept._dir_synced
        with _held_lock:
            _held_here.discard(os.path.abspath(kept.path))
            _held_here.add(os.path.abspath(self.path))

    def close(self) -> None:
        """Compact, release the lock and close. Deletes the journal if nothing is pending.

        A journal taken over from a stopped owner whose threads still run (see
        :func:`keep_until_done`) stays held until they return."""
        keep_until_done(self)

    def _close_now(self) -> None:
        with self._lock:
            handle = self._handle
            if handle is None:
                return
            try:
                if not self._state.pending:
                    if _same_file(handle, self.path):
                        with contextlib.suppress(OSError):
                            self.path.unlink()
                elif fcntl is not None:
                    self._compact()
            finally:
                handle = self._handle or handle
                self._handle = None
                with _held_lock:
                    _held_here.discard(os.path.abspath(self.path))
                    if _holders.get(os.path.abspath(self.path)) is self:
                        del _holders[os.path.abspath(self.path)]
                with contextlib.suppress(OSError):
                    _flocks.close(handle)

    # -- records ---------------------------------------------------------------------

    def pending(self) -> list[tuple[str, JobRecord]]:
        """Unfinished records with their ids, in admission order."""
        with self._lock:
            return self._state.records(self.path)

    def unreadable(self) -> list[tuple[str, str]]:
        """Unfinished entries this version cannot decode, with why (see :meth:`pending`)."""
        with self._lock:
            return self._state.unreadable()

    def flags_at(self, prefix: str) -> float:
        """Submission time of the newest committed checkpoint save under ``prefix`` (0 if none)."""
        with self._lock:
            return self._state.flags_at.get(prefix, 0.0)

    def append(self, record: JobRecord) -> str:
        """Journal a job (one write into the page cache); return its id. See :meth:`sync`."""
        job_id = unique_name()  # no uuid4: see unique_name
        entry = encode(record)
        entry.setdefault("root", self._root)
        with self._lock:
            self._require()
            self._write({"t": "job", "id": job_id, "entry": entry})
            self._state.pending[job_id] = entry
        return job_id

    def sync(self) -> None:
        """Make every line written so far durable (fdatasync). Off the training thread.

        Grouped: a caller whose lines an fsync in progress already covers waits for it
        instead of starting another. Never raises: a failed fsync is logged and the
        job goes on (its line is in the page cache, safe against a process crash).
        """
        with self._lock:
            needed = self._good_size
        with self._sync_lock:
            with self._lock:
                handle = self._handle
                if handle is None or (self._synced_size >= needed and self._dir_synced):
                    return
                target = self._good_size
                dir_synced = self._dir_synced
                # Registered: a child forked during a slow fsync shares no lock.
                fd = _flocks.dup(handle.fileno())
            try:
                os.fdatasync(fd)
            except OSError as error:
                log.warning("could not fsync the outbox %s (%s)", self.path, error)
                return
            finally:
                _flocks.close(fd)
            if not dir_synced:
                _fsync_dir(self.path.parent)  # a compaction's rename (see _compact_unlocked)
            with self._lock:
                if self._handle is handle:
                    self._synced_size = max(self._synced_size, target)
                    self._dir_synced = True

    def mark_written(self, job_id: str, identity: tuple[int, int, int]) -> None:
        """Note that the background write of a pending save completed its file (``identity``,
        see ``_jobs.file_identity``), right before the file is renamed into place. A replay
        takes the file at the save's path as that save's only if it is that file (see
        ``JobRecord.marks_written``). Into the page cache, like the job's own line. Never
        raises: a mark the disk refuses is owed (see :meth:`_owe`); without it, a replay
        drops the save (its file stays)."""
        self._mark(job_id, "written_file", list(identity), {"t": "written", "file": list(identity)})

    def mark_handed_over(self, job_id: str) -> None:
        """Note that a user's strategy or CheckpointIO returned from removing the file of
        the pending removal ``job_id`` (see ``JobRecord.handed_over``): a replay makes the
        removal even if that left the file in the folder. Into the page cache, like the
        job's own line. Never raises: a mark the disk refuses is owed (see :meth:`_owe`);
        without it, a replay that finds the file keeps its artifact (as for a process
        killed before the call)."""
        self._mark(job_id, "handed_over", True, {"t": "handed"})

    def _mark(self, job_id: str, field: str, value: Any, line: dict[str, Any]) -> None:
        item = {"t": line["t"], "id": job_id, **line}
        try:
            with self._lock:
                held = self._handle is not None
                entry = self._state.pending.get(job_id)
                if held and entry is not None:
                    # What the mark says is true whether or not its line is written: a
                    # compaction (at close, say) writes the entry with it.
                    entry[field] = value
                    try:
                        self._write(item)
                    except OSError:
                        self._owe(job_id, item)
                        raise
            if not held:
                self._mark_elsewhere(job_id, field, value, line)
        except OSError as error:
            log.warning(
                "could not note in %s that job %s's file was %s (%s); it is noted at the"
                " journal's next line, and if the process ends before any can be written,"
                " a replay of the job %s",
                self.path,
                job_id,
                "written" if line["t"] == "written" else "handed over",
                error,
                "drops it (its file stays, unpersisted)"
                if line["t"] == "written"
                else "keeps its artifact if the file is still there",
            )

    def _mark_elsewhere(self, job_id: str, field: str, value: Any, line: dict[str, Any]) -> None:
        """A mark for a job of the journal this object no longer holds: its owner stopped
        while the job's write still ran (Ctrl+C, a teardown that gave up), and the next
        fit's setup (or a flush) in this process took the journal over, or it was closed.
        The mark goes to the holder here now; with none, to the journal file itself if no
        one holds it (see :func:`_append_unheld`); else it is kept for the next one here
        to open the journal. Dropped, a replay would take a folder the write completed for
        one cut short. (Kept here, it never reaches another process that holds the
        journal: a flush started before this process ended.)"""
        path = os.path.abspath(self.path)
        with _held_lock:
            holder = _holders.get(path)
            if holder is None or (holder is self and not holder.is_open):
                # Under _held_lock: an opener here flocks under it too, so it either holds
                # the journal already (the append is refused, and it adopts the mark) or
                # opens it after the line is in.
                appended = False
                try:
                    appended = _append_unheld(path, {"t": line["t"], "id": job_id, **line})
                finally:
                    if not appended:  # held elsewhere, or the disk refused it (raised)
                        marks = _stray_marks.setdefault(path, {})
                        marks[(job_id, str(line["t"]))] = (field, value, line)
                return
        holder._mark(job_id, field, value, line)

    def _owe(self, job_id: str, item: dict[str, Any]) -> None:
        """Keep the mark ``item`` of a pending job whose line the disk refused (a full disk),
        to write it before the journal's next line (see :meth:`_write`). Without it, a save
        whose write completed (a job that then fails, its staged copy refused by the same
        full disk) was dropped by its replay as never written: its checkpoint stayed in the
        folder with no artifact, and no failure either."""
        self._owed[(job_id, str(item["t"]))] = item

    def settle(self, job_id: str, status: str) -> None:
        """Mark a job finished, and with it every earlier pending job of the same key.

        Jobs commit in submission order, so an earlier job still pending here has
        failed; the later job of its key (a newer save, or the removal) makes it moot.
        Never raises: a job that cannot be marked stays pending, and its replay is
        idempotent, while an error here would turn a committed job into a failed one.
        """
        try:
            self._settle(job_id, status)
        except OSError as error:
            log.warning(
                "could not mark job %s finished in %s (%s); it will be replayed, idempotently",
                job_id,
                self.path,
                error,
            )

    def _settle(self, job_id: str, status: str) -> None:
        with self._lock:
            pending = self._state.pending
            if self._handle is None or job_id not in pending:
                return
            entry = pending[job_id]
            key = entry.get("key")
            moot = []
            # A removal kept because its replacement was never written did nothing, and a
            # save lost (its write never finished) stored nothing: the key's earlier jobs
            # still count. Nor does a job for another store or instance replace them.
            if status not in _REPLACES_NOTHING:
                same_key = []
                for other_id, other in pending.items():
                    if other_id == job_id:
                        break
                    if other.get("key") == key:
                        same_key.append(other_id)
                if same_key:
                    here = destination(entry)
                    moot = [i for i in same_key if destination(pending[i]) == here]
            unread: list[Path] = []
            for other_id in moot:
                self._write({"t": "done", "id": other_id, "status": "obsolete"})
                # A save that failed kept its staged copy for a replay, which will never
                # come now: nothing reads the copy again (it is not running either: a
                # key's jobs transfer and commit in order).
                staged = self._own_staged_copy(pending[other_id])
                if staged is not None:
                    unread.append(staged)
                del pending[other_id]
            done: dict[str, Any] = {"t": "done", "id": job_id, "status": status}
            if (
                status == "saved"
                and entry.get("kind") == "checkpoint"
                and entry.get("op") == "save"
            ):
                prefix = str(key).rsplit("/", 1)[0] if "/" in str(key) else ""
                done.update(prefix=prefix, at=entry.get("time"))
                self._state.mark(prefix, entry.get("time"), entry)
            self._write(done)
            del pending[job_id]
            compact = (
                fcntl is not None  # Windows cannot replace an open file
                and self._lines > COMPACT_AFTER_LINES
                and self._lines > 2 * len(pending) + 8
            )
        for staged in unread:  # off the lock: the training thread appends under it
            release_staged(staged)
        if compact:
            self._compact_unlocked()

    def _own_staged_copy(self, entry: dict[str, Any]) -> Path | None:
        """Where the staged copy of a journaled save is in this journal's working folder
        (a journal copied or moved with its folder names the original's paths), if it
        has one of the form ``staged/{unique_name()}/{name}``."""
        staged = entry.get("staged")
        if entry.get("op") != "save" or not isinstance(staged, str) or not staged:
            return None
        unique, name = os.path.split(os.path.dirname(staged))[1], os.path.basename(staged)
        if staged_owner(unique) is None or name in ("", ".", ".."):
            return None
        return self.path.parent / STAGED_DIRNAME / unique / name

    # -- internals (hold self._lock) -------------------------------------------------------

    def _require(self) -> IO[str]:
        if self._handle is None:
            raise RuntimeError(f"the outbox {self.path} is not open")
        return self._handle

    def _write(self, item: dict[str, Any]) -> None:
        if self._owed:
            self._write_owed()
        self._put(item)

    def _write_owed(self) -> None:
        """Write the marks owed (see :meth:`_owe`) of jobs still pending, before another
        line; those the disk still refuses stay owed, and that line is tried all the same."""
        for (job_id, kind), item in list(self._owed.items()):
            if job_id in self._state.pending:
                try:
                    self._put(item)
                except OSError:
                    return
            del self._owed[(job_id, kind)]

    def _put(self, item: dict[str, Any]) -> None:
        handle = self._require()
        fd = handle.fileno()
        if self._torn:
            # An earlier write failed part-way (ENOSPC, EFBIG): cut the torn line off.
            os.ftruncate(fd, self._good_size)
            self._torn = False
        line = _line(item)
        data = memoryview(line)
        # One write(2) on an O_APPEND descriptor: appended atomically, into the page cache.
        # No fsync here: on the training thread it would wait for a disk that uploads and
        # other jobs keep busy (tens of ms); sync() does it in the background.
        try:
            while data:
                data = data[os.write(fd, data) :]
        except BaseException:
            self._torn = True
            raise
        self._good_size += len(line)
        self._lines += 1

    def _compact_unlocked(self) -> None:
        """:meth:`_compact`, with its writes and fsyncs outside ``self._lock``.

        The training thread appends under that lock: it must never wait for a disk a
        competing writer keeps busy. The pending jobs are taken under the lock, written
        and fsynced without it; the lines appended meanwhile are copied over (from the
        page cache) and fsynced too, until none came; only then, under the lock, the new
        file replaces the old. The folder's fsync follows without the lock; until it is
        done, :meth:`sync` does it before it reports a line durable.
        """
        if not self._compact_lock.acquire(blocking=False):
            return  # one compaction at a time; the next settle tries again
        # Not _compact's temporary name: close() may compact meanwhile, under the lock.
        temp = self.path.with_name(self.path.name + _COMPACTION_SUFFIXES[1])
        swapped = None
        try:
            with self._lock:
                handle = self._handle
                if handle is None or self._torn:
                    return  # closed, or a torn line the next write cuts off first
                lines = self._compacted_lines()
                copied = self._good_size
            count = len(lines)
            with temp.open("wb") as out:
                size = sum(out.write(line) for line in lines)
                while True:
                    out.flush()
                    os.fsync(out.fileno())
                    with self._lock:
                        if self._handle is not handle:
                            return  # closed (or compacted) meanwhile: this copy is stale
                        end = self._good_size
                        if end == copied:
                            self._swap(temp, size, count)
                            swapped = self._handle
                            break
                    # Lines appended since: whole lines, up to the last complete one.
                    tail = os.pread(handle.fileno(), end - copied, copied)
                    size += out.write(tail)
                    count += tail.count(b"\n")
                    copied = end
            _fsync_dir(self.path.parent)
            with self._lock:
                if self._handle is swapped:
                    self._dir_synced = True
        except OSError as error:
            log.warning("could not compact the outbox %s (%s); it stays as it is", self.path, error)
        finally:
            if swapped is None:
                with contextlib.suppress(OSError):
                    temp.unlink()  # stopped short: the journal stays as it was
            self._compact_lock.release()

    def _swap(self, temp: Path, size: int, count: int) -> None:
        """Make the complete, fsynced ``temp`` the journal (holds ``self._lock``)."""
        old = self._require()
        # Keep holding the lock across the swap: lock the new file before the rename
        # makes it visible, then release the old one.
        new_handle = _flocks.open_file(temp, "a+", encoding="utf-8")
        try:
            if fcntl is not None:
                flock_here(new_handle, fcntl.LOCK_EX)
            os.replace(temp, self.path)
        except BaseException:
            _flocks.close(new_handle)
            raise
        self._handle = new_handle
        self._lines = count
        self._good_size = size
        self._synced_size = size  # fsynced before the swap
        self._dir_synced = False  # until the folder's fsync (see sync)
        self._torn = False
        with contextlib.suppress(OSError):
            _flocks.close(old)

    def _compact(self) -> None:
        """Rewrite the journal with only the pending jobs and the flags marks, atomically,
        under ``self._lock`` throughout (at :meth:`close`; see :meth:`_compact_unlocked`).

        As there, a failure (a full disk) is logged and the journal stays as it is, whole.
        """
        lines = self._compacted_lines()
        temp = self.path.with_name(self.path.name + _COMPACTION_SUFFIXES[0])
        try:
            with temp.open("wb") as out:
                size = sum(out.write(line) for line in lines)
                out.flush()
                os.fsync(out.fileno())
            self._swap(temp, size, len(lines))
            _fsync_dir(self.path.parent)
            self._dir_synced = True
        except OSError as error:
            log.warning("could not compact the outbox %s (%s); it stays as it is", self.path, error)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()  # left only if stopped short: swapped, it has the journal's name

    def _compacted_lines(self) -> list[bytes]:
        """What a compacted journal holds: the flags marks, then the pending jobs."""
        lines = [
            _line(self._state.flags_line(prefix, at)) for prefix, at in self._state.flags_at.items()
        ]
        lines += [
            _line({"t": "job", "id": job_id, "entry": entry})
            for job_id, entry in self._state.pending.items()
        ]
        return lines


# One encoder for every line (json.dumps builds one per call with these options).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str, check_circular=False)


def _line(item: dict[str, Any]) -> bytes:
    return (_ENCODER.encode(item) + "\n").encode("utf-8")


def _append_unheld(path: str, item: dict[str, Any]) -> bool:
    """Append the mark ``item`` to the journal at ``path``, which no outbox of this process
    holds, if no one else does either, and fsync it; False if someone does. A mark that
    came after its journal's holder here closed it (a Ctrl+C'd fit's background write that
    ended while the process exited) was kept in memory only, and lost with the process: a
    flush then dropped the folder that write completed as never written (crash sweep seed
    1365, ``--folder --signal INT``). A journal no longer there had nothing pending: the
    mark is moot (True), and no journal is made for it."""
    if fcntl is None:  # pragma: no cover - Windows
        return False  # type: ignore[unreachable]
    try:
        fd = _flocks.open_fd(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return True
    try:
        for wait in (*_LOOKER_WAITS_S, None):  # a looker lets go at once (_flock_exclusive)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait is None:
                    return False
                time.sleep(wait)
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(path)):
                return False  # replaced by a compaction: its holder has the live one
        except FileNotFoundError:
            return True
        size = os.fstat(fd).st_size
        lead = b""
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A torn last line (a holder killed mid-write), dealt with as open() does: one
            # whole but for its newline is ended; a part of one is cut off.
            raw = os.pread(fd, size, 0)
            cut = raw.rfind(b"\n") + 1
            if _whole_line(raw[cut:]):
                lead = b"\n"
            else:
                os.ftruncate(fd, cut)
        data = memoryview(lead + _line(item))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
        return True
    finally:
        _flocks.close(fd)


def _same_file(handle: IO[str], path: Path) -> bool:
    """Whether ``handle`` is still the file at ``path`` (not one replaced or deleted)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
