"""A checkpoint moved out of Lightning's way while Lightning rewrites it, and its return
after a crash.

Before a synchronous rewrite of a file (``last.ckpt``), the previous file is renamed into
``{working folder}/aside/`` (or, where Lightning's rewrite replaces the file by a rename,
given a second name there, the file staying in place); once the rewrite returned it goes
to the trash, and if the rewrite raised it comes back. A process killed between the
rename and the end of the write leaves it there, and the checkpoint folder without it (or
with the new file cut short). :func:`put_back_leftovers` repairs that, at
``_find_last_checkpoints`` (so that ``ckpt_path="last"`` finds it), at ``setup`` and in
``lamin-lightning flush``; a leftover whose checkpoint is there and whole is deleted.

Whose file is it? Each process that moves files aside holds an exclusive ``flock`` on its
own lock file there (``{owner}.lock``, ``owner`` = pid and a per-process random token, as
in every aside name) for as long as it lives. An entry whose owner's lock can be taken
belongs to a process that ended; one whose lock is held is mid-rewrite in a live process
and is left alone. Without ``fcntl`` (Windows) nothing can tell, and nothing is put back.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from lamin_lightning import _flocks, _owners, _staging
from lamin_lightning._errors import OutboxInUseError
from lamin_lightning._journal import (
    Outbox,
    is_locked,
    journal_paths,
    read_pending,
    staged_names,
)
from lamin_lightning._staging import (
    STAGED_DIRNAME,
    WRITING_DIRNAME,
    Stager,
    checkpoint_folder_of,
    clear_dead_writes,
    remove_path,
    staged_owner,
    working_folders,
)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lamin_lightning")

ASIDE_DIRNAME = "aside"
_LOCK_SUFFIX = _owners.LOCK_SUFFIX
_RESTORING = "restoring.lock"

_counter = itertools.count()
_owner = _owners.owner
_dead_owner = _owners.dead_owner


def move_aside(root: Path, filepath: str | os.PathLike[str]) -> Path:
    """Rename ``filepath`` into ``root``'s aside folder, under this process's lock; return
    where it went. Raises OSError if it could not be moved (it is then where it was)."""
    return _set_aside(root, filepath, os.replace)


def link_aside(root: Path, filepath: str | os.PathLike[str]) -> Path:
    """Give the file ``filepath`` a second name (a hard link) in ``root``'s aside folder,
    under this process's lock; return it. The file keeps its own name, for a rewrite that
    replaces it by a rename (the previous checkpoint lives on under the aside name).
    Raises OSError if it could not be linked (nothing changed then)."""
    return _set_aside(root, filepath, os.link)


def _set_aside(
    root: Path, filepath: str | os.PathLike[str], how: Callable[[str, Path], None]
) -> Path:
    folder = root / ASIDE_DIRNAME
    # Under the owners' lock: a callback of this process that stops (release) cannot give
    # up the lock file between our taking it and the rename.
    with _owners.folder_lock(folder):
        owner = _owners.hold(folder)
        aside = folder / f"{owner}-{next(_counter)}-{os.path.basename(os.fspath(filepath))}"
        how(os.fspath(filepath), aside)
    return aside


def release(root: Path) -> None:
    """Give up this process's lock file in ``root``'s aside folder (the callback stops);
    kept if something of ours is still aside (a rewrite that never returned)."""
    folder = root / ASIDE_DIRNAME
    if _owners.let_go(folder, lambda owner: _owners.has_entries(folder, f"{owner}-")):
        with contextlib.suppress(OSError):
            folder.rmdir()


def leftovers_in(dirpath: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints of ``dirpath`` missing or cut short that processes that ended left
    aside (what :func:`put_back_in` would put back); changes nothing."""
    if fcntl is None:  # pragma: no cover - Windows
        return []  # type: ignore[unreachable]
    found: list[Path] = []
    for root in working_folders(dirpath):
        folder = root / ASIDE_DIRNAME
        for owner, mine in _by_owner(folder).items():
            if mine and not is_locked(folder / f"{owner}{_LOCK_SUFFIX}"):
                for name in mine:
                    target = checkpoint_folder_of(root) / _parse(name)[1]
                    if _goes_back(folder / name, target, _staged_whole(root, None)):
                        found.append(target)
    return found


def _by_owner(folder: Path) -> dict[str, list[str]]:
    """The entries of an aside folder by owner, every owner with a lock file included,
    this process's own left out (live by definition)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    entries: dict[str, list[str]] = {}
    for name in names:
        if name == _RESTORING:
            continue
        if name.endswith(_LOCK_SUFFIX):  # an owner, with or without entries left
            entries.setdefault(name[: -len(_LOCK_SUFFIX)], [])
        else:
            entries.setdefault(_parse(name)[0], []).append(name)
    entries.pop(_owner(), None)
    return entries


def put_back_in(dirpath: str | os.PathLike[str], own: Outbox | None = None) -> list[Path]:
    """:func:`put_back_leftovers` for every working folder of checkpoint folder
    ``dirpath`` (or of ``dirpath`` itself, a working folder); and deletes what background
    writes (:func:`clear_dead_writes`) and links (``_staging.clear_dead_links``) of
    processes that ended left there. ``own``: a journal the caller holds open (see
    :func:`put_back_leftovers`)."""
    put_back: list[Path] = []
    roots = working_folders(dirpath)
    for root in roots:
        put_back.extend(put_back_leftovers(root, checkpoint_folder_of(root), own))
        clear_dead_staging(root, roots)
        scratch = root / WRITING_DIRNAME
        # A checkpoint folder (or a subfolder) on another filesystem than the working
        # folder gets the temporary file beside the checkpoint (see write_atomically).
        beside = (
            _staging.dead_write_folders(checkpoint_folder_of(root), scratch)
            if root.is_dir()
            else []
        )
        for folder, own_names_only in ((scratch, False), *((f, True) for f in beside)):
            dead = clear_dead_writes(folder, own_names_only=own_names_only)
            if dead:
                log.warning(
                    "lamin-lightning: deleted %d unfinished background write(s) that a"
                    " process which ended left in %s: %s",
                    len(dead),
                    folder,
                    ", ".join(path.name for path in dead),
                )
        # A link (save_last="link") made beside its name, its process killed before it
        # was renamed over that name (see _lightning_view._link_or_copy).
        links = _staging.clear_dead_links(checkpoint_folder_of(root))
        if links:
            log.warning(
                "lamin-lightning: deleted %d temporary link(s) that a process which ended"
                " left in %s: %s",
                len(links),
                checkpoint_folder_of(root),
                ", ".join(path.name for path in links),
            )
    return put_back


def clear_dead_staging(root: Path, roots: list[Path] | None = None) -> list[Path]:
    """Delete the staged copies in ``root`` that processes which ended left and that no
    pending job of a journal (in ``roots``, default ``root``) reads; return them.

    A process stages a file after its job is journaled, and releases the staged copy
    before the job is settled: one no pending job names is of no use to anyone (a process
    killed in between, a job never journaled: a full disk, ``outbox=False``). Left, a
    staged hard link keeps a whole checkpoint's blocks on the disk.
    """
    folder = root / STAGED_DIRNAME
    if fcntl is None:  # pragma: no cover - Windows: whose copy it is cannot be told
        return []  # type: ignore[unreachable]
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    entries: dict[str, list[str]] = {}
    for name in names:
        if name.endswith(_LOCK_SUFFIX):  # an owner, with or without copies left
            entries.setdefault(name[: -len(_LOCK_SUFFIX)], [])
        elif (owner := staged_owner(name)) is not None:
            entries.setdefault(owner, []).append(name)
    entries.pop(_owner(), None)
    if not entries:
        return []
    # Read after the listing: a copy listed was journaled before it was staged.
    referenced: set[str] = set()
    if any(entries.values()):
        for where in roots or [root]:
            for journal in journal_paths(where):
                try:
                    referenced |= staged_names(journal)
                except OSError as error:  # it may name any copy: none is deleted
                    log.warning(
                        "lamin-lightning: not clearing staged copies in %s: the journal %s"
                        " cannot be read (%s)",
                        folder,
                        journal,
                        error,
                    )
                    return []
    cleared: list[Path] = []
    for owner, mine in entries.items():
        unread = [name for name in mine if name not in referenced]
        unlocked = not (folder / f"{owner}{_LOCK_SUFFIX}").exists()
        if unlocked and (not unread or _pid_alive(owner)):
            continue  # (a version that takes no lock file, maybe still running)
        with _dead_owner(folder, owner) as dead:  # and a dead owner's lock file goes
            if dead:
                for name in unread:
                    remove_path(folder / name)
                    cleared.append(folder / name)
    if cleared:
        log.warning(
            "lamin-lightning: deleted %d staged cop%s that a process which ended left in"
            " %s, which no pending job reads: %s",
            len(cleared),
            "y" if len(cleared) == 1 else "ies",
            folder,
            ", ".join(path.name for path in cleared),
        )
    return cleared


def _pid_alive(owner: str) -> bool:
    """Whether a process of the pid in ``owner`` runs on this machine (any process: in a
    container the trainer is PID 1 every time, so this only ever errs on keeping)."""
    if os.name == "nt":  # pragma: no cover - there, os.kill(pid, 0) ends the process
        return True
    try:
        os.kill(int(owner.split("-")[0]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True
    return True


def put_back_leftovers(
    root: Path, checkpoint_folder: Path, own: Outbox | None = None
) -> list[Path]:
    """Return to ``checkpoint_folder`` what processes that ended left in ``root``'s aside
    folder; return the checkpoints put back. ``own``: a journal the caller holds open (a
    callback reopens its earlier run's journal at ``setup``, before this runs), whose
    interrupted rewrites are dropped as those of journals nobody holds.

    - The checkpoint is missing (killed before the rewrite wrote it): put back.
    - It is there but cut short (not a complete zip, as ``torch.save`` writes, where the
      previous one is): replaced by the previous one.
    - It is there, complete: the rewrite finished; the previous one is deleted.
    - A folder checkpoint (sharded), where the previous one is a folder: whether it is
      whole cannot be read off its files, so it counts as whole only where it is what
      a pending save of it staged once its write was done (the same files), or the
      folder that save's write marked complete in the journal (under AsyncCheckpointIO
      the previous one stays aside until the intake thread reaches the save).
      Otherwise the crash interrupted its rewrite (in the writer, which may leave part of
      the folder; or before its save was journaled), and the previous one replaces it.

    Several leftovers of one name (crashes in a row): the newest (by modification time)
    is considered first. Never overwrites a file that appears meanwhile.
    """
    folder = root / ASIDE_DIRNAME
    if fcntl is None:  # pragma: no cover - Windows: whose file it is cannot be told
        return []  # type: ignore[unreachable]
    entries = _by_owner(folder)
    if not entries:
        return []
    put_back: list[Path] = []
    stager = Stager(root)
    # One restorer at a time (the ranks of one run look at once): a second one waits,
    # then finds nothing left, rather than listing the folder before the first is done.
    with _restoring(folder), contextlib.ExitStack() as held:
        leftovers = [
            name
            for owner, mine in entries.items()
            if held.enter_context(_dead_owner(folder, owner))
            for name in mine
        ]
        for name in sorted(leftovers, key=lambda n: _mtime(folder / n), reverse=True):
            target = checkpoint_folder / _parse(name)[1]
            restored = _settle(folder / name, target, stager, _staged_whole(root, own))
            if restored is not None:
                put_back.append(restored)
    stager.empty_trash()
    if put_back:
        _drop_interrupted_rewrites(root, put_back, own)
    return put_back


def _drop_interrupted_rewrites(root: Path, put_back: list[Path], own: Outbox | None) -> None:
    """The saves whose rewrite a crash interrupted, and whose previous file was put back:
    each journaled save of such a file that was to be written after its hook returned
    (a CheckpointIO that writes late) and was never staged is the interrupted one. The
    file now holds the previous checkpoint, which must not be persisted as that save (its
    step, its flags); the save is dropped as never written, with a warning.

    A journal another holder has is left to it, but not ``own``, the caller's: skipped as
    locked, its interrupted save was replayed with the previous checkpoint's bytes.
    """
    wanted = {os.path.abspath(path) for path in put_back}
    mine = os.path.abspath(own.path) if own is not None and own.is_open else None
    for path in journal_paths(root):
        if own is not None and os.path.abspath(path) == mine:
            _drop_interrupted_in(own, wanted)
            continue
        if is_locked(path):
            continue
        outbox = Outbox(path)
        try:
            outbox.open()
        except (OutboxInUseError, OSError):
            continue
        try:
            _drop_interrupted_in(outbox, wanted)
        finally:
            outbox.close()


def _drop_interrupted_in(outbox: Outbox, wanted: set[str]) -> None:
    """In the open ``outbox``, settle as lost the newest unstaged late save of each file
    of ``wanted`` (see :func:`_drop_interrupted_rewrites`)."""
    newest: dict[str, str] = {}
    for job_id, record in outbox.pending():
        if record.unstaged_late_save() and os.path.abspath(record.local_path) in wanted:
            newest[os.path.abspath(record.local_path)] = job_id
    for local_path, job_id in newest.items():
        log.warning(
            "lamin-lightning: dropping the save that was rewriting %s when a crash"
            " interrupted it: the previous checkpoint is back in its place, and keeps"
            " its own artifact",
            local_path,
        )
        outbox.settle(job_id, "lost")


@contextlib.contextmanager
def _restoring(folder: Path):  # type: ignore[no-untyped-def]
    try:
        # Registered: a child forked meanwhile would hold up every later restore here.
        fd = _flocks.open_fd(folder / _RESTORING, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _flocks.close(fd)


def _parse(name: str) -> tuple[str, str]:
    """An aside entry's owner and the checkpoint's name.

    ``{pid}-{token}-{n}-{name}``; entries of versions before 0.4 (``{pid}-{n}-{name}``)
    get the owner ``{pid}-{n}``, whose lock file never exists: their process ended.
    """
    parts = name.split("-", 3)
    # The token is hex and may be all digits (about 1 process in 300): it is told from an
    # old entry's counter by its length and by the counter that follows it.
    if (
        len(parts) == 4
        and len(parts[1]) == len(_staging._TOKEN)
        and all(c in "0123456789abcdef" for c in parts[1])
        and parts[2].isdigit()
    ):
        return f"{parts[0]}-{parts[1]}", parts[3]
    parts = name.split("-", 2)
    return "-".join(parts[:2]), parts[-1]


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _settle(
    aside: Path, target: Path, stager: Stager, whole: Callable[[Path], bool]
) -> Path | None:
    """Put one leftover back, or delete it (see :func:`put_back_leftovers`)."""
    if not os.path.lexists(aside):
        return None
    if os.path.lexists(target):
        if not _goes_back(aside, target, whole):
            log.info("lamin-lightning: deleting %s: %s is there, whole", aside, target)
            remove_path(aside)
            return None
        if not stager.trash(target):
            log.error("lamin-lightning: %s is cut short and could not be replaced", target)
            return None
        log.warning(
            "lamin-lightning: %s was cut short by a crash while being rewritten; the previous"
            " checkpoint is put back",
            target,
        )
    else:
        log.warning(
            "lamin-lightning: putting %s back: a crash interrupted its rewrite (it was kept in %s)",
            target,
            aside.parent,
        )
    if _place(aside, target):
        return target
    log.error(
        "lamin-lightning: could not put %s back; the previous checkpoint is %s", target, aside
    )
    return None


def _place(aside: Path, target: Path) -> bool:
    """Move ``aside`` to ``target`` without overwriting anything there meanwhile."""
    if os.path.isdir(aside) and not os.path.islink(aside):
        try:
            os.rename(aside, target)  # fails onto a non-empty folder
        except OSError:
            return False
        return True
    try:
        os.link(aside, target, follow_symlinks=False)  # fails if the target exists
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            return False
        if os.path.lexists(target):  # a filesystem without hard links
            return False
        try:
            os.rename(aside, target)
        except OSError:
            return False
        return True
    with contextlib.suppress(OSError):
        os.unlink(aside)
    return True


def _goes_back(aside: Path, target: Path, whole: Callable[[Path], bool]) -> bool:
    """Whether the leftover ``aside`` is to replace ``target``: it is missing, or cut short
    where ``aside`` is whole. (A leftover linked aside, its file never moved, names the
    same file as ``target``, or the previous one of a rewrite that finished.) A folder
    where the leftover is a folder is cut short unless ``whole`` says otherwise."""
    if not os.path.lexists(target):
        return True
    if _is_folder(target) and _is_folder(aside):
        return not whole(target)
    return _cut_short(target) and _complete(aside)


def _is_folder(path: Path) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _staged_whole(root: Path, own: Outbox | None) -> Callable[[Path], bool]:
    """Whether a folder checkpoint is the one the newest pending save of it in ``root``'s
    journals staged (``own``: the caller's, open), which was staged once written whole, or
    the one its write marked complete (``JobRecord.folder_marked``)."""

    def whole(target: Path) -> bool:
        wanted = os.path.abspath(target)
        mine = os.path.abspath(own.path) if own is not None and own.is_open else None
        for path in journal_paths(root):
            try:
                pending = (
                    own.pending()
                    if own is not None and os.path.abspath(path) == mine
                    else read_pending(path)
                )
            except (OSError, ValueError):
                continue
            saves = [
                r for _, r in pending if r.op == "save" and os.path.abspath(r.local_path) == wanted
            ]
            if not saves:
                continue
            if saves[-1].folder_marked():
                # Its write marked it complete (AsyncCheckpointIO): the previous folder
                # waits aside until the intake thread reaches the save, before staging.
                return True
            staged = saves[-1].staged_path
            if staged and _same_tree(Path(staged), target):
                return True
        return False

    return whole


def _same_tree(staged: Path, folder: Path) -> bool:
    """Whether the staged folder ``staged`` holds the files of ``folder``: the same names,
    each the same file (a staged link), or a copy of it: the same bytes (a small file), or
    (a large one) the same size, copied no earlier than the file was last written."""
    files = _files(staged)
    if not files or files.keys() != _files(folder).keys():
        return False
    for relative, copy in files.items():
        try:
            a, b = os.stat(copy), os.stat(folder / relative)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                continue
            if a.st_size != b.st_size:
                return False
            if a.st_size < _staging.SMALL_FILE_BYTES:
                if copy.read_bytes() != (folder / relative).read_bytes():
                    return False
            elif a.st_mtime_ns < b.st_mtime_ns:
                return False
        except OSError:
            return False
    return True


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder``, by its relative path."""
    return {
        os.path.relpath(os.path.join(here, name), folder): Path(here) / name
        for here, _, names in os.walk(folder)
        for name in names
    }


def _cut_short(path: Path) -> bool:
    """A file that is not a complete zip archive (``torch.save``'s format)."""
    return os.path.isfile(path) and not _is_zip(path)


def _complete(path: Path) -> bool:
    return os.path.isfile(path) and _is_zip(path)


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False
