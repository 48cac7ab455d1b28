"""The job record: what one persistence job is, frozen at submission, and its JSON codec.

A record describes a job completely: what to do (``op``), to which file (``kind``,
``key``, the local and staged paths), where (``store``: a name in the store registry,
and the store's ``context``), and for a checkpoint the metadata Lightning had at
submission (:class:`CheckpointSnapshot`). The outbox journals records; the pipeline
job of a live save and of a replay is built from a record the same way
(``_replay.build_job``).

The codec writes version 2 and reads version 1 (journals written by lamin-lightning
0.1.0, which named a callback class instead of a store).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import importlib
import os
import stat
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lamin_lightning._errors import LostFileError
from lamin_lightning._events import ArtifactKind
from lamin_lightning._staging import checkpoint_folder_of, tree_size

Operation = Literal["save", "remove"]

RECORD_VERSION = 2

# v1 journals named the class that wrote them; these are the classes this package shipped.
_V1_PUBLISHERS = {
    "lamin_lightning._lamin:Checkpoint": "lamindb",
    "lamin_lightning.testing:MemoryCheckpoint": "memory",
}


@dataclass(frozen=True)
class CommittedFlags:
    """What the saves committed under a prefix before a crash left flagged, as the
    journals of its folder record them (``_journal.folder_flags``): where a replayed
    save starts from, as a live commit starts from the saves the callbacks of its
    folder committed before it (see ``LaminStore._apply_flags``). Sequences are on the
    scale of :attr:`CheckpointSnapshot.sequence` (:func:`replayed_sequence`).

    Attributes:
        last: (sequence, key, ranking, best_key) of the newest committed save.
        best: (sequence, key) of the newest committed save that was its callback's
            best, or None.
    """

    last: tuple[int, str, tuple[str, ...], str | None]
    best: tuple[int, str] | None = None


@dataclass(frozen=True)
class CheckpointSnapshot:
    """What a checkpoint job knows about training, frozen at submission.

    Background threads read this, never the live trainer; it is journaled as is.

    Attributes:
        key: The artifact key of this checkpoint.
        local_path: The path Lightning wrote.
        staged_path: The staged name of the same bytes, read by the upload.
        global_step: ``trainer.global_step`` at save time.
        epoch: ``trainer.current_epoch`` at save time.
        monitor: The monitored metric, or None.
        mode: ``"min"`` or ``"max"``.
        save_weights_only: Whether the file holds weights only.
        score: The callback's ``current_score`` at save time, as a float.
        is_best: Whether this file is Lightning's ``best_model_path``.
        best_key: Key of ``best_model_path``, or None.
        last_key: Key of ``last_model_path``, or None.
        ranking: Keys of ``best_k_models``, best first.
        scores: Score of every key in ``ranking``.
        feature_values: Feature values to annotate the checkpoint with, by feature
            name (JSON values), collected on the training thread.
        auto_features: Which names in ``feature_values`` are features that
            ``save_lightning_features()`` created (the ``lamindb.lightning`` type).
        run_features: The run-level values of its fit (``(name, value, auto feature)``),
            on every checkpoint from the fit's first on, until a commit recorded them.
            The live commit records them on the run from memory, at the fit's first
            commit; a replay records those the
            run does not have yet, so that a fit interrupted before its first commit
            (Ctrl+C, SIGKILL) gets them from the flush.
        sequence: When it was submitted, among every checkpoint submitted in this
            process (:func:`next_sequence`), so that several callbacks sharing a folder
            end with the flags of the save made last whatever order their committer
            threads run in. Read back from a journal (a replay), it is
            :func:`replayed_sequence` of its submission time (both are the wall clock
            in microseconds): before the saves made after it (a rerun's), after those
            made before it, by any callback. 0: unknown (a snapshot made by hand, a
            journal without times), ordered by its commit instead. Not journaled, not
            compared.
        committed: For a replayed save of a folder where several callbacks journaled
            committed saves: what those saves left flagged (see
            :class:`CommittedFlags`), to take turns with. Not journaled, not compared.
    """

    key: str
    local_path: Path
    staged_path: Path
    global_step: int
    epoch: int
    monitor: str | None
    mode: str
    save_weights_only: bool
    score: float | None
    is_best: bool
    best_key: str | None
    last_key: str | None
    ranking: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    feature_values: Mapping[str, Any] | None = None
    auto_features: frozenset[str] = frozenset()
    run_features: tuple[tuple[str, Any, bool], ...] = ()
    sequence: int = field(default=0, compare=False)
    committed: CommittedFlags | None = field(default=None, compare=False)


_SEQUENCE_LOCK = threading.Lock()
_last_sequence = 0


def next_sequence() -> int:
    """The next number of a process-wide, increasing sequence (thread-safe): the wall
    clock in microseconds, or one more than the last number where the clock has not
    moved on (or went back). On the scale of :func:`replayed_sequence`, so that a save
    read back from a journal ranks among this process's saves by when it was made."""
    global _last_sequence
    with _SEQUENCE_LOCK:
        _last_sequence = max(_last_sequence + 1, time.time_ns() // 1000)
        return _last_sequence


def _fresh_sequence_lock() -> None:
    global _SEQUENCE_LOCK
    _SEQUENCE_LOCK = threading.Lock()  # a fork while another thread held it


os.register_at_fork(after_in_child=_fresh_sequence_lock)


def replayed_sequence(submitted_at: float) -> int:
    """The sequence of a save read back from a journal, submitted at ``submitted_at``
    (wall clock, seconds; 0 where the journal has no time): the sequence that save got
    when it was made, give or take the microseconds between the two readings of the clock.
    So a replay ranks below this process's saves made after it (a rerun's, which are
    newer, whenever the replay commits) and above those made before it (the saves a hung
    fit of this process committed before the ones replayed now), and replays rank in the
    order the crashed process made them, whichever callback's journal holds them. 0 (a
    journal without times): unknown, ordered by its commit."""
    return max(0, int(submitted_at * 1_000_000))


@dataclass(frozen=True)
class JobRecord:
    """One persistence job, complete: the live job and its replay are built from it.

    Attributes:
        op: ``"save"`` persists a file, ``"remove"`` deletes what saves stored under ``key``.
        kind: Which file: checkpoint, config or hparams.
        key: The artifact key, resolved at submission.
        local_path: The absolute path Lightning wrote.
        staged_path: The staged second name of the bytes (saves), or None.
        store: Name of the store in the registry (:mod:`lamin_lightning.store`).
        context: What the store needs beyond the record (JSON): instance, run, prefix.
        checkpoint: The checkpoint's metadata at submission (checkpoint saves only).
        submitted_at: Wall-clock time of the submission.
        version: The codec version the record was read from.
        after: For a removal: the local path of the checkpoint saved in the evicted
            one's place while that was still being written (``async_write``). The
            removal happens only if that file was written: while the evicted file is
            still on disk and its replacement is not, it is kept, locally and in the store.
        given_path: The path as Lightning passed it, where that differs from
            ``local_path`` (a relative dirpath): events report it, as the reference does.
            Not journaled: a replay, maybe in another working directory, reports
            ``local_path``.
        written_later: For a save: its file was written after Lightning's save hook
            returned (``async_write``, or a CheckpointIO that writes late). A replay
            that finds neither the file nor its staged copy drops the job: the process
            ended before the write finished, and the checkpoint never existed.
        linked: For a removal: Lightning replaces the file by a link to :attr:`after`
            (``save_last="link"``; the first ``last.ckpt`` of a resumed fit is a file).
            The link is made once ``after`` is written: the removal happens unless the
            path is still the file (not a link) by then; while it is, it is kept.
        marks_written: For a save written in the background by lamin-lightning
            (``async_write``): its write journals the identity of the file it wrote
            (:attr:`written_file`) once that is complete, before renaming it into place.
            Until then the file at :attr:`local_path` is another save's (an earlier
            ``last.ckpt``), or none: a replay that finds no such mark, or another file
            at the path, drops the job (see :meth:`never_written`).
        written_file: The identity (inode, size, modification time in ns) of the file
            the write of a :attr:`marks_written` save completed, from the journal's
            mark; None while it has none. Also the identity (inode first) of the folder a
            :attr:`marks_folder` save's write left at its path.
        marks_folder: For a save written after the hook returned by a CheckpointIO that
            may write a folder in place (under Lightning's ``AsyncCheckpointIO``): once
            its write ended without error, if the path is a folder, the journal notes
            that folder's identity (:attr:`written_file`: in the job's own line if the
            write ended first, else by a mark, see ``PendingWrites.mark_folder_with``).
            A folder cannot be judged as a zip can: a replay that finds a folder at the
            path and no such note of it drops the job as cut short (see
            :meth:`cut_short`). Files are judged as before. Records without the flag
            (journals before it) persist a folder as they found it.
        handed_over: For a removal: a strategy or CheckpointIO of the user's was handed
            the file and returned (the journal's mark after the call, see
            ``Outbox.mark_handed_over``). The removal is the user's to make: a file it
            kept (archived in place, or a removal that keeps every file) does not keep
            the artifact, as it does not in a run that is not interrupted.
        root: The working folder the record was journaled in (absolute), or None
            (journals before 0.4 did not say; see :meth:`origin`). A replay from a
            journal that is now elsewhere (the checkpoint folder was moved together with
            its working folder) finds the files relative to where it is now (see
            :func:`relocate`).
        recorded: For a record :func:`relocate` moved: its local and staged paths as
            journaled, tried too where the moved ones do not exist.
    """

    op: Operation
    kind: ArtifactKind
    key: str
    local_path: str
    staged_path: str | None = None
    store: str = "lamindb"
    context: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointSnapshot | None = None
    submitted_at: float = 0.0
    version: int = RECORD_VERSION
    after: str | None = None
    given_path: str | None = None
    written_later: bool = False
    linked: bool = False
    marks_written: bool = False
    written_file: tuple[int, int, int] | None = None
    marks_folder: bool = False
    handed_over: bool = False
    root: str | None = None
    recorded: tuple[str, str | None] | None = None

    def origin(self) -> str | None:
        """The working folder this record was journaled in: :attr:`root`, or for a record
        that does not say (journals before 0.4), the one its staged name lies in
        (``{root}/staged/{unique}/{name}``); None if neither tells."""
        if self.root:
            return self.root
        if self.staged_path:
            staged = Path(self.staged_path)
            if len(staged.parts) > 3 and staged.parent.parent.name == "staged":
                return str(staged.parent.parent.parent)
        return None

    @property
    def event_path(self) -> Path:
        """The local path its events report (see :attr:`given_path`)."""
        return Path(self.given_path or self.local_path)

    def never_written(self) -> bool:
        """Whether this save's file was to be written after the hook returned and never
        was: neither it nor its staged copy exists (see :attr:`written_later`), or
        only a file the process was killed in the middle of writing (:meth:`cut_short`),
        or, for a save whose write marks the journal (:attr:`marks_written`), any file
        but the one its write completed, or a folder its write never marked as complete
        (:attr:`marks_folder`)."""
        if not self.unstaged_late_save():
            return False
        if self.marks_written:
            if self.written_file is None:
                return True
            found = file_identity(self.local_path)
            if found is not None and self.recorded is not None:
                # Moved (see relocate): another filesystem gives the file another inode;
                # its size and modification time (which ``mv`` keeps) still tell.
                return found[1:] != self.written_file[1:]
            return found != self.written_file
        return (
            not _present(self.local_path)
            or archive_cut_short(self.local_path)
            or self._folder_cut_short()
        )

    def cut_short(self) -> bool:
        """Whether this save's file was to be written after the hook returned and is in
        place but cut short: a zip archive (``torch.save``'s format) with no end. A
        CheckpointIO that writes in place (Lightning's own, under ``AsyncCheckpointIO``)
        leaves such a file when the process dies mid-write; it is no checkpoint, and is
        not persisted. A file staged for it was written whole (staging waits for the
        write). Files in other formats cannot be judged, and count as written. Nor can a
        folder: one counts as cut short unless its write marked it complete
        (:attr:`marks_folder`)."""
        return self.unstaged_late_save() and (
            archive_cut_short(self.local_path) or self._folder_cut_short()
        )

    def _folder_cut_short(self) -> bool:
        """Whether the path is a folder that a :attr:`marks_folder` save's write never
        marked as complete: no mark (killed mid-write, or the write failed), or the mark
        of another folder (by inode: a later rewrite's, left where the one marked was set
        aside). Its size and modification time are not compared: a folder's change with
        its entries, and a rename aside and back may touch them. A relocated record
        (another filesystem: another inode) needs only the mark."""
        return self._marked_folder() is False

    def folder_marked(self) -> bool:
        """Whether the path is the folder (not a link to one) that this
        :attr:`marks_folder` save's write marked complete: whole, though nothing staged it
        yet (the previous folder it rewrote may still wait aside: see
        ``_aside.put_back_leftovers``). See :meth:`_folder_cut_short`."""
        return self._marked_folder() is True

    def _marked_folder(self) -> bool | None:
        """For a :attr:`marks_folder` save whose path is a folder (not a link to one):
        whether its write marked that folder complete. None for any other save or path."""
        if not self.marks_folder or self.marks_written:
            return None
        found = folder_identity(self.local_path)
        if found is None:
            return None
        if self.written_file is None:
            return False
        return self.recorded is not None or found[0] == self.written_file[0]

    def unstaged_late_save(self) -> bool:
        """Whether this is a save whose file was to be written after the hook returned
        and that was never staged (the staging waits for the write): its write may not
        have finished."""
        return (
            self.op == "save"
            and self.written_later
            and not (self.staged_path and _present(self.staged_path))
        )

    def replacement_lost(self) -> bool:
        """Whether this removal must not happen: the evicted file is still on disk and the
        checkpoint written in its place (:attr:`after`) never was."""
        if self.op != "remove" or self.after is None:
            return False
        if self.linked:  # the file is gone once the link stands (see linked)
            # Only the file itself still there says so: Lightning makes the link again at
            # each later save (ours renames it over the path; Lightning's own removes
            # first), and a removal committed when nothing was there (neither file nor
            # link) would keep the artifact for good.
            path = self.local_path
            return os.path.lexists(path) and not os.path.islink(path)
        return os.path.lexists(self.local_path) and (
            not os.path.lexists(self.after) or archive_cut_short(self.after)
        )

    def link_superseded(self) -> bool:
        """Whether this removal (:attr:`linked`) found its file because the link was never
        made, its target written all the same: Lightning saved or removed under the
        link's name again first (another callback's file or eviction there), and that
        later job settles the name's artifact. Not a lost replacement to warn about."""
        return (
            self.linked
            and self.after is not None
            and os.path.exists(self.after)
            and not archive_cut_short(self.after)
        )

    @property
    def prefix(self) -> str:
        """The key's folder: checkpoints whose flags and ranks belong together."""
        return self.key.rsplit("/", 1)[0] if "/" in self.key else ""

    def file(self) -> Path:
        """The file (or folder) a save persists: its staged copy if it exists, else the
        local one; for a moved record (see :func:`relocate`), each where it is now, else
        where it was journaled.

        Raises :class:`LostFileError` only if none of them exists (``ENOENT``). If one
        cannot be looked at (``EACCES``, ``EIO``, a stale NFS handle) and none that can
        exists, the ``OSError`` is raised instead, saying so: the job fails and stays
        pending, for a replay once the file can be read again.
        """
        staged, local = self.staged_path, self.local_path
        candidates = [staged, self.recorded[1] if self.recorded else None, local]
        if self.recorded:
            candidates.append(self.recorded[0])
        unreadable: tuple[str, OSError] | None = None
        for candidate in dict.fromkeys(c for c in candidates if c):
            try:
                if _is_file_or_folder(candidate):
                    return Path(candidate)
            except OSError as failure:
                unreadable = unreadable or (candidate, failure)
        if unreadable is not None:
            path, cause = unreadable
            raise OSError(
                cause.errno,
                f"cannot persist {self.key!r}: cannot tell whether {path} exists"
                f" ({cause.strerror or cause}); the job stays pending, for a replay"
                " (`lamin-lightning flush`) once the file can be read",
                path,
            ) from cause
        where = (
            f" (journaled as {self.recorded[1]} and {self.recorded[0]})" if self.recorded else ""
        )
        raise LostFileError(
            f"cannot persist {self.key!r}: neither its staged copy ({staged})"
            f" nor its local file ({local}) exists{where}"
        )

    def size(self) -> int:
        """Bytes a save will upload, all files of a folder (0 for a removal or a lost file)."""
        if self.op != "save":
            return 0
        try:
            return tree_size(self.file())
        except (OSError, LostFileError):
            return 0


_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def _is_file_or_folder(path: str) -> bool:
    """Whether ``path`` is a file or a folder (following links); False if it does not
    exist. Any other failure to look (``EACCES``, ``EIO``, ``ESTALE``) raises: unlike
    ``os.path.isfile``, it never passes for an absent file."""
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno in _ABSENT:
            return False
        raise
    return stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)


def _present(path: str) -> bool:
    """``os.path.lexists``, except that a path that cannot be looked at for another reason
    than its absence (``EACCES``, ``EIO``) counts as present: nothing is judged missing,
    and dropped, that cannot be seen."""
    try:
        os.lstat(path)
    except OSError as error:
        return error.errno not in _ABSENT
    except ValueError:  # an embedded NUL: no such file
        return False
    return True


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def _moved(path: str | None, old: str, new: str) -> str | None:
    """``path`` under the folder ``new`` where it was under ``old``; else as it is."""
    if not path:
        return path
    if path == old:
        return new
    if path.startswith(old.rstrip(os.sep) + os.sep):
        return new.rstrip(os.sep) + os.sep + path[len(old.rstrip(os.sep)) + 1 :]
    return path


def relocate(record: JobRecord, root: str | os.PathLike[str]) -> JobRecord:
    """``record`` as read from a journal now in the working folder ``root``.

    Where that is the folder the record was journaled in (:meth:`JobRecord.origin`; the
    same folder by another name counts), the record as it is. Else the checkpoint folder
    was moved together with its working folder (another scratch mount after a
    preemption, a renamed project folder): its staged copy is looked for relative to
    ``root``, its local file (and a removal's :attr:`~JobRecord.after`) relative to the
    checkpoint folder ``root`` belongs to, with the journaled paths as a fallback (see
    :meth:`JobRecord.file`). The key, the store and its context stay as journaled: the
    artifacts keep their keys.
    """
    here = os.path.abspath(root)
    origin = record.origin()
    if origin is None or origin == here or _same_folder(origin, here):
        return record
    old_folder = str(checkpoint_folder_of(Path(origin)))
    new_folder = str(checkpoint_folder_of(Path(here)))

    def moved(path: str | None) -> str | None:
        staged = _moved(path, origin, here)  # staged copies: under the working folder
        return staged if staged != path else _moved(path, old_folder, new_folder)

    local = moved(record.local_path) or record.local_path
    staged = moved(record.staged_path)
    if local == record.local_path and staged == record.staged_path:
        return record
    checkpoint = record.checkpoint
    if checkpoint is not None:
        checkpoint = dataclasses.replace(
            checkpoint, local_path=Path(local), staged_path=Path(staged or local)
        )
    return dataclasses.replace(
        record,
        local_path=local,
        staged_path=staged,
        after=moved(record.after),
        checkpoint=checkpoint,
        root=here,
        recorded=(record.local_path, record.staged_path),
    )


# -- codec ------------------------------------------------------------------------------------


def json_value(value: Any) -> Any:
    """``value`` as JSON data: numbers and tensors of one element become numbers."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return json_value(item())
        except Exception:
            pass
    return str(value)


def feature_value(value: Any) -> Any:
    """A feature value as a job keeps it in memory: a ``datetime``, a ``date`` or a LaminDB
    record as is, for LaminDB to validate as the reference passes it; anything else as
    :func:`json_value` has it (a tensor or numpy scalar as a number)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value  # the common case (training thread): no attribute lookups that miss
    if isinstance(value, datetime.date) or _is_record(value):
        return value
    if isinstance(value, list | tuple):  # several labels of a categorical feature
        return [feature_value(v) for v in value]
    return json_value(value)


_TAG = "__lamin_lightning__"


@dataclass(frozen=True)
class RecordRef:
    """A LaminDB record a journaled feature value named (its class and ``uid``): the store
    looks it up again when a replay annotates the checkpoint."""

    class_path: str
    uid: str

    def resolve(self) -> Any:
        """The record; ``LookupError`` if its class or the record is gone."""
        module, _, name = self.class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise LookupError(f"record class {self.class_path} not found: {error}") from error
        found = cls.filter(uid=self.uid).first()
        if found is None:
            raise LookupError(f"no {name} with uid {self.uid!r} (deleted since the save?)")
        return found


def _is_record(value: Any) -> bool:
    """A database record (a Django model instance with a ``uid``: LaminDB's)."""
    uid = getattr(value, "uid", None)
    return getattr(value, "_meta", None) is not None and isinstance(uid, str)


def _journal_feature_value(value: Any) -> Any:
    """A feature value as JSON: a datetime, a date or a record tagged, so that a replay
    annotates what the live save would have (not its ``str``)."""
    if isinstance(value, datetime.datetime):
        return {_TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, datetime.date):
        return {_TAG: "date", "value": value.isoformat()}
    if _is_record(value):
        cls = type(value)
        value = RecordRef(f"{cls.__module__}.{cls.__qualname__}", value.uid)
    if isinstance(value, RecordRef):
        return {_TAG: "record", "class": value.class_path, "uid": value.uid}
    if isinstance(value, Mapping) and _TAG in value:  # a user's: wrapped, never mistaken
        return {_TAG: "mapping", "value": json_value(value)}
    if isinstance(value, list | tuple):
        return [_journal_feature_value(v) for v in value]
    return json_value(value)


def _decode_feature_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_feature_value(v) for v in value]
    if not isinstance(value, Mapping) or _TAG not in value:
        return value
    tag, keys = value[_TAG], set(value)
    try:
        if keys == {_TAG, "value"}:
            if tag == "datetime":
                return datetime.datetime.fromisoformat(value["value"])
            if tag == "date":
                return datetime.date.fromisoformat(value["value"])
            if tag == "mapping":
                return value["value"]
        if tag == "record" and keys == {_TAG, "class", "uid"}:
            return RecordRef(str(value["class"]), str(value["uid"]))
    except (TypeError, ValueError):
        pass
    return value


_context_cache: list[Any] = [None, None]  # [context, its JSON]: a callback's is fixed


def _context_json(context: Mapping[str, Any]) -> dict[str, Any]:
    """``json_value(context)``, remembered for the last context (equal, not only the same)."""
    cached, encoded = _context_cache
    if cached is not None and cached == context:  # a copy: a context changed in place misses
        return encoded  # type: ignore[no-any-return]
    encoded = json_value(dict(context))
    _context_cache[:] = [dict(context), encoded]
    return encoded  # type: ignore[no-any-return]


def _encode_snapshot(snapshot: CheckpointSnapshot) -> dict[str, Any]:
    return {
        "global_step": snapshot.global_step,
        "epoch": snapshot.epoch,
        "monitor": snapshot.monitor,
        "mode": snapshot.mode,
        "save_weights_only": snapshot.save_weights_only,
        "score": snapshot.score,
        "is_best": snapshot.is_best,
        "best_key": snapshot.best_key,
        "last_key": snapshot.last_key,
        "ranking": list(snapshot.ranking),
        "scores": dict(snapshot.scores),
        "features": [
            [name, _journal_feature_value(value), name in snapshot.auto_features]
            for name, value in (snapshot.feature_values or {}).items()
        ],
        **(
            {
                "run_features": [
                    [name, _journal_feature_value(value), auto]
                    for name, value, auto in snapshot.run_features
                ]
            }
            if snapshot.run_features
            else {}
        ),
    }


def _decode_snapshot(
    data: Mapping[str, Any],
    *,
    key: str,
    local_path: str,
    staged_path: str | None,
    submitted_at: float,
) -> CheckpointSnapshot:
    features = [(str(n), _decode_feature_value(v), bool(a)) for n, v, a in data.get("features", [])]
    return CheckpointSnapshot(
        key=key,
        local_path=Path(local_path),
        staged_path=Path(staged_path or local_path),
        global_step=int(data.get("global_step", 0)),
        epoch=int(data.get("epoch", 0)),
        monitor=data.get("monitor"),
        mode=str(data.get("mode", "min")),
        save_weights_only=bool(data.get("save_weights_only", False)),
        score=data.get("score"),
        is_best=bool(data.get("is_best", False)),
        best_key=data.get("best_key"),
        last_key=data.get("last_key"),
        ranking=tuple(data.get("ranking", ())),
        scores={str(k): float(v) for k, v in dict(data.get("scores", {})).items()},
        feature_values={name: value for name, value, _ in features} or None,
        auto_features=frozenset(name for name, _, auto in features if auto),
        run_features=tuple(
            (str(n), _decode_feature_value(v), bool(a)) for n, v, a in data.get("run_features", [])
        ),
        sequence=replayed_sequence(submitted_at),
    )


_ZIP_START = b"PK\x03\x04"


def archive_cut_short(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that begins as a zip archive (``torch.save``'s format)
    and does not end as one: a write cut short. False for anything else (a folder, a
    file in another format, one that cannot be read): nothing is judged that cannot be."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as handle:
            if handle.read(len(_ZIP_START)) != _ZIP_START:
                return False
        return not zipfile.is_zipfile(path)
    except OSError:
        return False


def file_identity(path: str | os.PathLike[str] | int) -> tuple[int, int, int] | None:
    """Which file ``path`` (or an open descriptor) is: inode, size and modification time
    (ns); None if there is none. A rename keeps it; a rewrite, even in place, changes it."""
    try:
        info = os.fstat(path) if isinstance(path, int) else os.lstat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def folder_identity(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """:func:`file_identity` of ``path`` if it is a folder (not a link to one), else None."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _identity(value: Any) -> tuple[int, int, int] | None:
    """A journaled :func:`file_identity` (a list of three integers), or None."""
    if isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value):
        return (value[0], value[1], value[2])
    return None


def encode(record: JobRecord) -> dict[str, Any]:
    """The record as JSON data (always the current version)."""
    return {
        "v": RECORD_VERSION,
        "op": record.op,
        "kind": record.kind,
        "key": record.key,
        "local_path": record.local_path,
        "staged": record.staged_path,
        "store": record.store,
        "context": _context_json(record.context),
        "snapshot": _encode_snapshot(record.checkpoint) if record.checkpoint else None,
        "time": record.submitted_at,
        **({"after": record.after} if record.after else {}),
        **({"written_later": True} if record.written_later else {}),
        **({"linked": True} if record.linked else {}),
        **({"marks_written": True} if record.marks_written else {}),
        **({"written_file": list(record.written_file)} if record.written_file else {}),
        **({"marks_folder": True} if record.marks_folder else {}),
        **({"handed_over": True} if record.handed_over else {}),
        **({"root": record.root} if record.root else {}),
    }


def decode(data: Mapping[str, Any]) -> JobRecord:
    """A record from JSON data of version 1 or 2; ``ValueError`` if it is not one."""
    version = data.get("v", 1)
    if version not in (1, RECORD_VERSION):
        raise ValueError(f"unknown journal record version {version!r}")
    op, kind, key = data.get("op"), data.get("kind", "checkpoint"), data.get("key")
    if op not in ("save", "remove") or kind not in ("checkpoint", "config", "hparams"):
        raise ValueError(f"not a job record: op={op!r}, kind={kind!r}")
    if not isinstance(key, str) or not key:
        raise ValueError(f"not a job record: key={key!r}")
    local_path = str(data.get("local_path") or "")
    staged = data.get("staged")
    context = dict(data.get("context") or {})
    if version == 1:
        publisher = str(data.get("publisher", ""))
        store = _V1_PUBLISHERS.get(publisher) or ("lamindb" if "instance" in context else "")
        if not store:
            store = f"unregistered:{publisher}"
        if "checkpoint_key_prefix" in context:
            context.setdefault("prefix", context.pop("checkpoint_key_prefix"))
    else:
        store = str(data.get("store", ""))
    snapshot = data.get("snapshot")
    when = data.get("time")
    submitted_at = float(when) if isinstance(when, int | float) else 0.0
    return JobRecord(
        op=op,
        kind=kind,
        key=key,
        local_path=local_path,
        staged_path=str(staged) if staged else None,
        store=store,
        context=context,
        checkpoint=_decode_snapshot(
            snapshot,
            key=key,
            local_path=local_path,
            staged_path=staged,
            submitted_at=submitted_at,
        )
        if isinstance(snapshot, Mapping) and kind == "checkpoint"
        else None,
        submitted_at=submitted_at,
        version=int(version),
        after=str(data["after"]) if data.get("after") else None,
        written_later=data.get("written_later") is True,
        linked=data.get("linked") is True,
        marks_written=data.get("marks_written") is True,
        written_file=_identity(data.get("written_file")),
        marks_folder=data.get("marks_folder") is True,
        handed_over=data.get("handed_over") is True,
        root=str(data["root"]) if isinstance(data.get("root"), str) and data["root"] else None,
    )
