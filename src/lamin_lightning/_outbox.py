"""The durable outbox: a journal of admitted jobs that survives a crash.

Knows nothing of Lightning or LaminDB. Each callback journals every job it
admits into a JSON-lines file next to its checkpoints
(``{dirpath}/.lamin-lightning/outbox-<id>.jsonl``) *before* the job is admitted,
and fsyncs it, so a job that ``_save_checkpoint`` accepted is on disk even if the
process is killed the next instant. When a job is finished for good (committed,
cancelled, superseded, or made obsolete by a later job of the same key) a
``done`` line follows; a job that failed stays pending, for a later replay.

Lines::

    {"t": "job", "id": "<hex>", "entry": {...}}      # admitted (fsynced)
    {"t": "done", "id": "<hex>", "status": "saved"}  # finished (flushed)

A torn last line (a crash mid-write) is ignored. The file is compacted (rewritten
with only the pending jobs, then renamed over) once finished lines dominate, so
it does not grow with the length of training.

One process at a time may hold a journal: :meth:`Outbox.open` takes an exclusive,
non-blocking ``flock``, so a ``lamin-lightning flush`` never replays the jobs of a
training process that is still running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lamin_lightning._pipeline import JobSpec

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process exclusion
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lamin_lightning")

JOURNAL_PREFIX = "outbox-"
JOURNAL_SUFFIX = ".jsonl"
COMPACT_AFTER_LINES = 64


class OutboxBusyError(RuntimeError):
    """Another process (or callback) holds this journal."""


def journal_paths(root: str | os.PathLike[str]) -> list[Path]:
    """The journals under a staging root (``{dirpath}/.lamin-lightning``), oldest first."""
    folder = Path(root)
    try:
        found = [
            p
            for p in folder.iterdir()
            if p.name.startswith(JOURNAL_PREFIX) and p.name.endswith(JOURNAL_SUFFIX)
        ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def _parse(lines: Iterator[str], path: Path) -> dict[str, dict[str, Any]]:
    pending: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: ignoring a torn or corrupt journal line", path, number)
            continue
        kind = record.get("t")
        if kind == "job" and isinstance(record.get("entry"), dict):
            pending[str(record["id"])] = record["entry"]
        elif kind == "done":
            pending.pop(str(record.get("id")), None)
    return pending


def read_pending(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The unfinished jobs of a journal, in admission order, without locking it.

    Each entry carries its journal id under ``"id"``.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            pending = _parse(iter(handle), path)
    except FileNotFoundError:
        return []
    return [{**entry, "id": job_id} for job_id, entry in pending.items()]


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether some process holds the journal at ``path`` (never modifies it)."""
    if fcntl is None:  # pragma: no cover - Windows
        return False  # type: ignore[unreachable]
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        handle.close()
    return False


class Outbox:
    """One journal file, held open (and locked) by one owner.

    Thread-safe: the training thread appends, the committer thread settles.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._handle: IO[str] | None = None
        self._pending: dict[str, dict[str, Any]] = {}
        self._lines = 0

    # -- lifecycle -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether this outbox holds its journal."""
        return self._handle is not None

    def open(self) -> list[dict[str, Any]]:
        """Create or open the journal, lock it, and return its pending entries.

        Raises :class:`OutboxBusyError` if another holder has it, and ``OSError`` if
        the folder is not writable or the disk is full (a line is written and fsynced
        right away, so the problem shows now rather than at the first checkpoint).
        """
        with self._lock:
            if self._handle is not None:
                return self._entries()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8", opener=_open_synced)  # noqa: SIM115
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError as busy:
                        raise OutboxBusyError(
                            f"{self.path} is in use by another process or callback"
                        ) from busy
                    if not _same_file(handle, self.path):
                        # We locked a journal its holder just replaced (compaction):
                        # the live one is held by someone else.
                        raise OutboxBusyError(f"{self.path} is in use by another process")
                handle.seek(0)
                lines = handle.read().splitlines()
                self._pending = _parse(iter(lines), self.path)
                self._lines = len(lines)
                self._handle = handle
                self._write({"t": "open", "pid": os.getpid()}, sync=True)
            except BaseException:
                self._handle = None
                handle.close()
                raise
            return self._entries()

    def close(self) -> None:
        """Compact, release the lock and close. Deletes the journal if nothing is pending."""
        with self._lock:
            handle = self._handle
            if handle is None:
                return
            try:
                if not self._pending:
                    if _same_file(handle, self.path):
                        with contextlib.suppress(OSError):
                            self.path.unlink()
                elif fcntl is not None:
                    self._compact()
            finally:
                handle = self._handle or handle
                self._handle = None
                with contextlib.suppress(OSError):
                    handle.close()

    # -- records ---------------------------------------------------------------------

    def _entries(self) -> list[dict[str, Any]]:
        return [{**entry, "id": job_id} for job_id, entry in self._pending.items()]

    def pending(self) -> list[dict[str, Any]]:
        """Unfinished entries, in admission order, each with its ``"id"``."""
        with self._lock:
            return self._entries()

    def append(self, entry: dict[str, Any]) -> str:
        """Journal a job durably (write + fsync); return its id."""
        job_id = uuid.uuid4().hex
        with self._lock:
            self._require()
            self._write({"t": "job", "id": job_id, "entry": entry}, sync=True)
            self._pending[job_id] = entry
        return job_id

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
            if self._handle is None or job_id not in self._pending:
                return
            key = self._pending[job_id].get("key")
            moot = []
            for other_id, entry in self._pending.items():
                if other_id == job_id:
                    break
                if entry.get("key") == key:
                    moot.append(other_id)
            for other_id in moot:
                self._write({"t": "done", "id": other_id, "status": "obsolete"}, sync=False)
                del self._pending[other_id]
            self._write({"t": "done", "id": job_id, "status": status}, sync=False)
            del self._pending[job_id]
            if (
                fcntl is not None  # Windows cannot replace an open file
                and self._lines > COMPACT_AFTER_LINES
                and self._lines > 2 * len(self._pending) + 8
            ):
                self._compact()

    # -- internals (hold self._lock) -------------------------------------------------------

    def _require(self) -> IO[str]:
        if self._handle is None:
            raise RuntimeError(f"the outbox {self.path} is not open")
        return self._handle

    def _write(self, record: dict[str, Any], *, sync: bool) -> None:
        handle = self._require()
        data = memoryview(
            (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        )
        # One write(2) on an O_APPEND|O_DSYNC descriptor: appended atomically and durable
        # when it returns. One syscall, not write + fsync: on the training thread each
        # syscall gives up the GIL, and getting it back from busy background threads can
        # take a switch interval (5 ms).
        fd = handle.fileno()
        while data:
            data = data[os.write(fd, data) :]
        if sync and not _O_DSYNC:  # pragma: no cover - platforms without O_DSYNC
            os.fsync(fd)
        self._lines += 1

    def _compact(self) -> None:
        """Rewrite the journal with only the pending jobs, atomically."""
        handle = self._require()
        temp = self.path.with_name(self.path.name + ".tmp")
        with temp.open("w", encoding="utf-8") as out:
            for job_id, entry in self._pending.items():
                out.write(
                    json.dumps(
                        {"t": "job", "id": job_id, "entry": entry},
                        separators=(",", ":"),
                        default=str,
                    )
                    + "\n"
                )
            out.flush()
            os.fsync(out.fileno())
        # Keep holding the lock across the swap: lock the new file before the rename
        # makes it visible, then release the old one.
        new_handle = open(temp, "a+", encoding="utf-8", opener=_open_synced)  # noqa: SIM115
        if fcntl is not None:
            fcntl.flock(new_handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(temp, self.path)
        _fsync_dir(self.path.parent)
        self._handle = new_handle
        self._lines = len(self._pending)
        with contextlib.suppress(OSError):
            handle.close()


_O_DSYNC = getattr(os, "O_DSYNC", 0)


def _open_synced(path: str, flags: int) -> int:
    """``open()``'s opener for journals: every write is durable when it returns."""
    return os.open(path, flags | _O_DSYNC, 0o644)


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


def settling(spec: JobSpec, outbox: Outbox, job_id: str) -> JobSpec:
    """``spec``, with its outbox entry marked finished once it committed or was dropped.

    Marked after the commit (a crash in between replays it, idempotently) and never on
    failure: a failed job stays in the outbox for a later flush.
    """
    commit, discard = spec.commit, spec.discard
    status = "saved" if spec.operation == "save" else "removed"

    def commit_and_settle(result: Any) -> Any:
        event = commit(result)
        outbox.settle(job_id, status)
        return event

    def discard_and_settle() -> None:
        try:
            if discard is not None:
                discard()
        finally:
            outbox.settle(job_id, "dropped")

    return dataclasses.replace(spec, commit=commit_and_settle, discard=discard_and_settle)
