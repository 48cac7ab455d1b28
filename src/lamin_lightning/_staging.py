"""Staging: keep the bytes Lightning wrote alive until their upload is done.

Lightning removes evicted checkpoints and rewrites ``last.ckpt`` while their
uploads may still be queued. A staged file is a second name for the same bytes,
in the working folder beside ``dirpath`` (``{parent}/.{name}.lamin-lightning/staged/``,
see :func:`staging_root`), removed once the job finished.

- Same filesystem as the system temp dir: Lightning rewrites a path by renaming
  a temp file onto it (a new inode), so a hard link keeps the old bytes. Link.
- Different filesystems: ``shutil.move`` copies *into* the existing path,
  rewriting the linked inode in place. Copy.
- Small files (configs, ``hparams.yaml``) are copied: loggers rewrite them in place.
- Where linking fails (a filesystem without hard links): copy.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from lamin_lightning import _flocks, _owners

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

STAGING_DIRNAME = ".lamin-lightning"
"""The working folder's name inside a checkpoint folder, where versions before 0.3 kept it."""
WORKING_SUFFIX = ".lamin-lightning"
SMALL_FILE_BYTES = 1 << 20

_counter = itertools.count()
_counter_lock = threading.Lock()
# Drawn once per process: random bytes per name (uuid4) would be a syscall on the
# training thread, which lets go of the GIL; getting it back can take a switch interval.
_TOKEN = uuid.uuid4().hex[:12]


_pid = os.getpid()


def _forked() -> None:
    global _pid, _TOKEN
    _pid = os.getpid()
    _TOKEN = uuid.uuid4().hex[:12]


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """``os.getpid()`` without its system call (kept up to date in a forked child): the
    training thread asks at every save whether it runs in a forked copy."""
    return _pid


def unique_name() -> str:
    """A name part unique across processes and restarts (a container's trainer is often
    PID 1 every time, so the pid alone is not): pid, counter, per-process random token.

    The pid is read once per process (and again in a forked child), not per name.
    """
    with _counter_lock:
        number = next(_counter)
    return f"{_pid}-{number:06d}-{_TOKEN}"


def absolute(path: str | os.PathLike[str]) -> str:
    """``os.path.abspath(path)``, without its Python-level ``normpath`` for a path that
    is already absolute and normal (Lightning's checkpoint paths: training thread)."""
    text = os.fspath(path)
    if (
        os.sep == "/"
        and text[:1] == "/"
        and "//" not in text
        and "/./" not in text
        and "/../" not in text
        and not text.endswith(("/", "/.", "/.."))
    ):
        return text
    return os.path.abspath(text)


def staging_root(dirpath: str | os.PathLike[str]) -> Path:
    """The working folder (staging, outbox) of the checkpoints in ``dirpath``.

    It sits beside ``dirpath``, named from it (``ckpts`` -> ``.ckpts.lamin-lightning``),
    never inside it: the checkpoint folder stays exactly as Lightning leaves it (code
    that lists it or loads every file in it finds only checkpoints). Beside, not
    elsewhere, so that it is on the same filesystem (a staged hard link needs that) and
    recovery finds it from ``dirpath`` alone.
    """
    folder = Path(os.path.abspath(dirpath))
    if not folder.name:  # the filesystem's root has no parent to sit in
        return folder / STAGING_DIRNAME
    return folder.parent / f".{folder.name}{WORKING_SUFFIX}"


def is_working_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a working folder itself (rather than a checkpoint folder)."""
    name = Path(path).name
    return name == STAGING_DIRNAME or (
        name.startswith(".")
        and name.endswith(WORKING_SUFFIX)
        and len(name) > len(WORKING_SUFFIX) + 1
    )


def working_folders(path: str | os.PathLike[str]) -> list[Path]:
    """Where recovery looks for the journals of a checkpoint folder, current layout first.

    ``path`` is a checkpoint folder (its working folder beside it, and the one inside
    it that earlier versions wrote), or a working folder itself.
    """
    if is_working_folder(path):
        return [Path(path)]
    folders = [staging_root(path), Path(path) / STAGING_DIRNAME]
    # Lightning resolves a symlinked dirpath: the callback's working folder sits beside
    # the real folder, and the link is what the user passes to `status` or `flush`.
    real = Path(os.path.realpath(path))
    if real != Path(os.path.abspath(path)):
        folders.insert(1, staging_root(real))
    return folders


def checkpoint_folder_of(root: Path) -> Path:
    """The checkpoint folder a working folder belongs to (the inverse of :func:`staging_root`)."""
    if root.name == STAGING_DIRNAME:
        return root.parent
    return root.parent / root.name[1 : -len(WORKING_SUFFIX)]


STAGED_DIRNAME = "staged"
"""The working folder's subfolder of staged copies: ``staged/{unique_name()}/{name}``."""


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def link_is_safe(dirpath: Path) -> bool:
    """Whether Lightning rewrites files in ``dirpath`` by rename (a hard link survives that).

    fsspec writes the new file in the temporary folder and moves it over the old one: a
    rename where that works, else a copy into the old file, in place. One filesystem is
    not enough: across two mounts of it (a bind mount, systemd's ``PrivateTmp``) the
    rename fails with EXDEV as well, so a rename is tried, with a file of our own.
    """
    temp = Path(tempfile.gettempdir())
    return _same_device(temp, dirpath) and _rename_works(temp, dirpath)


def _rename_works(source: Path, target: Path) -> bool:
    """Whether a file renames from folder ``source`` into folder ``target``."""
    try:
        fd, name = tempfile.mkstemp(dir=source, prefix=".lamin-lightning-probe-")
    except OSError:
        return False
    os.close(fd)
    moved = os.path.join(target, os.path.basename(name))
    try:
        os.rename(name, moved)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(name)
        return False
    with contextlib.suppress(OSError):
        os.unlink(moved)
    return True


class Stager:
    """Stages files under one root; remembers per directory whether linking is safe.

    The callback plans a staged name on the training thread (no syscall) and stages
    on the pipeline's intake thread: every syscall releases the GIL, and getting it
    back can take a switch interval (5 ms) while background threads run Python code.
    The training thread waits for a file's staging only before it removes or
    rewrites that file (normally long done).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staged_prefix = f"{root / STAGED_DIRNAME}{os.sep}"
        self._trash_dir: Path | None = None
        self._link_safe: dict[Path, bool] = {}

    def link_safe(self, folder: Path) -> bool:
        """:func:`link_is_safe` for ``folder``, remembered (False once a link failed)."""
        safe = self._link_safe.get(folder)
        if safe is None:
            safe = self._link_safe[folder] = link_is_safe(folder)
        return safe

    def forget_link_safety(self, folder: Path) -> None:
        """A link in ``folder`` failed (a filesystem without hard links): copy from now on."""
        self._link_safe[folder] = False

    def plan(self, path: str | os.PathLike[str]) -> Path:
        """Choose the staged name of ``path`` without touching the filesystem."""
        # The outbox keeps these names across a crash (see unique_name). One Path, built
        # from a string (this runs on the training thread at every save).
        text = os.fspath(path)
        name = text.rpartition(os.sep)[2]
        if not name or name in (".", ".."):  # "dir/", "a/..": rare, the general way
            name = os.path.basename(os.path.normpath(text))
        return Path(f"{self._staged_prefix}{unique_name()}{os.sep}{name}")

    def stage(
        self, path: str | os.PathLike[str], staged: Path | None = None
    ) -> tuple[Path, int, str]:
        """Give ``path`` a second name under the root; return (staged path, size, method).

        The staged file keeps the original base name inside a unique folder, so a
        key derived from the name is the same for the staged file. A folder is staged
        as a folder of the same tree, a link (or copy) per file; its size is the total
        of its files, and its method ``"link"`` only if every file was linked.
        """
        source = Path(path)
        staged = staged if staged is not None else self.plan(source)
        # Under this process's lock file there, taken before its first staged folder: a
        # staged folder whose owner has ended, and that no journal names, is a leftover
        # (see clear_dead_staging).
        folder = self.root / STAGED_DIRNAME
        with _owners.folder_lock(folder):
            _owners.hold(folder, verify=True)
            staged.parent.mkdir(parents=True)  # (staged/ too, if someone deleted it)
        # Built under a temporary name and renamed once complete: a staged copy that
        # exists is whole (a replay after a crash mid-copy uses the local file instead).
        partial = _partial_of(staged)
        try:
            if source.is_dir():
                # A folder checkpoint (sharded strategies): the same tree, file by file. Its
                # folder stays put (the parent's device decides whether links are safe).
                _, size, method = self._stage_tree(source, partial)
            else:
                size = source.stat().st_size
                method = self._stage_one(source, partial, size, source.parent)
            os.replace(partial, staged)
        except BaseException:
            # A copy cut short (a full disk, say) is of no use to anyone: a replay reads
            # the local file. Left behind, it held the space the disk was short of.
            remove_path(partial)
            with contextlib.suppress(OSError):
                staged.parent.rmdir()
            raise
        return staged, size, method

    def _stage_one(self, source: Path, staged: Path, size: int, folder: Path) -> str:
        """Link (large files, where safe) or copy ``source`` to ``staged``; return how."""
        if size >= SMALL_FILE_BYTES and self.link_safe(folder):
            try:
                os.link(source, staged)
                return "link"
            except OSError as error:
                if error.errno in NO_LINKS:
                    self.forget_link_safety(folder)
        shutil.copyfile(source, staged)
        return "copy"

    def _stage_tree(self, source: Path, staged: Path) -> tuple[Path, int, str]:
        """Stage every file under the folder ``source`` into ``staged``; total bytes."""
        total = 0
        methods: set[str] = set()
        staged.mkdir()
        ids: dict[Path, tuple[int, int]] = {}
        # A subfolder that is a link is staged with its files (os.walk listed it and went
        # no further: an empty folder was staged, and persisted); one that cannot be
        # listed raises (it was skipped, and the checkpoint persisted without it). A link
        # to a folder above it is a loop; two links to one folder are not.
        for folder, subdirs, files in os.walk(source, onerror=_raise, followlinks=True):
            here = os.stat(folder)
            relative = Path(folder).relative_to(source)
            ids[relative] = (here.st_dev, here.st_ino)
            if any(ids.get(above) == ids[relative] for above in relative.parents):
                raise OSError(errno.ELOOP, f"a link loop in the folder checkpoint {source}", folder)
            subdirs.sort()
            target = staged / relative
            for name in subdirs:
                (target / name).mkdir()
            for name in sorted(files):
                file = Path(folder) / name
                size = file.stat().st_size
                methods.add(self._stage_one(file, target / name, size, source.parent))
                total += size
        return staged, total, "link" if methods == {"link"} else "copy"

    def trash(self, path: str | os.PathLike[str]) -> bool:
        """Move ``path`` out of the checkpoint directory by renaming it; delete it later.

        Freeing the blocks of a large file takes ~100 ms; a rename takes microseconds.
        Used for files (and folders) Lightning is about to remove or overwrite. Returns False (and
        leaves the file where it is) if ``path`` does not exist or cannot be renamed.
        """
        if self._trash_dir is None:
            self._trash_dir = self.root / "trash"
            try:
                self._trash_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                return False
        try:
            name = f"{unique_name()}-{scratch_name(os.path.basename(os.fspath(path)))}"
            os.replace(path, os.path.join(self._trash_dir, name))
        except OSError:
            return False
        return True

    def empty_trash(self) -> None:
        """Delete what :meth:`trash` moved aside. Runs off the training thread."""
        folder = self.root / "trash"
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        for entry in entries:
            remove_path(entry.path)


SCRATCH_NAME_BYTES = 100
"""Longest file name a temporary name is built from: a checkpoint's own name may take up
to the filesystem's 255 bytes, and a prefix or suffix on it must still fit."""


NO_LINKS = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
"""Errors of a hard link that say the folder takes none (not a full disk, not a file with
too many links): staging copies there from then on."""


def _raise(error: OSError) -> None:
    raise error


def scratch_name(name: str) -> str:
    """``name``, or for a long one its start and a digest of the whole (unique, and short
    enough to take a prefix and a suffix within 255 bytes)."""
    data = name.encode("utf-8", "surrogateescape")
    if len(data) <= SCRATCH_NAME_BYTES:
        return name
    head = data[: SCRATCH_NAME_BYTES - 17].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha256(data).hexdigest()[:16]}"


def _partial_of(staged: Path) -> Path:
    """Where the staged copy ``staged`` is built before it is renamed into place."""
    return staged.parent / f".partial-{scratch_name(staged.name)}"


def remove_path(path: str | os.PathLike[str]) -> None:
    """Delete a file, a link or a folder (a folder checkpoint) at ``path``; best effort."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


UNIQUE_NAME = r"(\d+)-\d+-([0-9a-f]{12})"
"""The form of :func:`unique_name`'s names (pid, counter, token), for those who read them."""
_UNIQUE_NAME = re.compile(UNIQUE_NAME)


def staged_owner(name: str) -> str | None:
    """The owner (``{pid}-{token}``, see ``_owners``) of the staged folder ``name``
    (``{pid}-{counter}-{token}``); None for a name of another form."""
    found = _UNIQUE_NAME.fullmatch(name)
    return f"{found[1]}-{found[2]}" if found else None


def release_staging(root: Path) -> None:
    """Give up this process's lock file in ``root``'s staged folder (a callback stops),
    unless a staged copy of ours is still there (a job a teardown gave up on)."""
    folder = root / STAGED_DIRNAME

    def ours_there(owner: str) -> bool:
        try:
            return any(staged_owner(name) == owner for name in os.listdir(folder))
        except FileNotFoundError:  # the working folder was deleted: nothing to keep
            return False

    _owners.let_go(folder, ours_there)


def stage_file(path: str | os.PathLike[str], root: Path) -> tuple[Path, int, str]:
    """Stage one file under ``root`` (see :class:`Stager`)."""
    return Stager(root).stage(path)


def release_staged(staged: Path) -> None:
    """Remove a staged file (or folder) and its unique folder."""
    remove_path(staged)
    remove_path(_partial_of(staged))  # a staging cut short by a crash
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def detach_before_rewrite(path: str | os.PathLike[str]) -> None:
    """Unlink ``path`` if another name (a staged link) shares its inode.

    Lightning then writes a fresh inode instead of possibly rewriting the one a
    queued upload still reads, whatever filesystem the temp dir is on. For a folder
    checkpoint, every file under it (shard writers truncate files in place).
    """
    if os.path.isdir(path) and not os.path.islink(path):
        for folder, _, files in os.walk(path):
            for name in files:
                detach_before_rewrite(os.path.join(folder, name))
        return
    try:
        if os.stat(path).st_nlink > 1:
            os.unlink(path)
    except FileNotFoundError:
        pass


def tree_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file under a folder."""
    if not os.path.isdir(path):
        return os.stat(path).st_size
    return sum(
        os.stat(os.path.join(folder, name)).st_size
        for folder, _, files in os.walk(path)
        for name in files
    )


# -- background writes' temporary files (async_write) ------------------------------------

CLAIMED_SUFFIX, WRITING_SUFFIX = ".new", ".tmp"
"""Suffixes of a background write's temporary file: created as ``.new``, then, once its
writer holds its lock, renamed to ``.tmp``, the name it is written under."""

WRITING_DIRNAME = "writing"
"""The working folder's subfolder for the temporary files of background writes."""

DEAD_WRITE_GRACE_SECONDS = 10.0
"""How long a ``.new`` file (created, not yet locked: a writer renames it to ``.tmp``
right after it takes its lock) must be unmodified before it counts as a dead write's."""


_OWN_TEMPORARY = re.compile(r"\..+\.[0-9]+\.[0-9]+\.(?:new|tmp)\Z", re.DOTALL)
"""A background write's temporary file (``.{name}.{pid}.{thread}.new|.tmp``): what is
looked for beside checkpoints, in a folder of the user's (see :func:`dead_write_folders`)."""


def dead_write_folders(checkpoint_folder: Path, scratch: Path) -> list[Path]:
    """The folders of ``checkpoint_folder``'s tree (itself included) on another filesystem
    than ``scratch``'s: where a background write puts its temporary file beside the
    checkpoint (see ``write_atomically``), and a crash mid-write leaves it."""
    try:
        device = os.stat(scratch if scratch.exists() else scratch.parent).st_dev
    except OSError:
        return []
    folders: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [checkpoint_folder]
    while stack:
        folder = stack.pop()
        try:
            stat = os.stat(folder)
            entries = list(os.scandir(folder))
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            continue  # a link back up the tree
        seen.add((stat.st_dev, stat.st_ino))
        if stat.st_dev != device:
            folders.append(folder)
        for entry in entries:
            # Not into a folder checkpoint (sharded: many files; never written this way).
            if entry.name.endswith(".ckpt") or is_working_folder(entry.path):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    stack.append(Path(entry.path))
    return folders


_LINK_TEMPORARY = re.compile(r"\..+\.[0-9]+\.[0-9]+\.link\Z", re.DOTALL)


def link_temporary(link: str) -> str:
    """Where a link to be renamed over ``link`` is made first (beside it: see
    ``_lightning_view._link_or_copy``): ``.{name}.{pid}.{thread}.link``."""
    folder, name = os.path.split(link)
    return os.path.join(folder, f".{scratch_name(name)}.{os.getpid()}.{threading.get_ident()}.link")


def clear_dead_links(folder: Path) -> list[Path]:
    """Delete the temporary links (:func:`link_temporary`) that processes which ended
    left in ``folder`` (killed between making one and renaming it over its name); return
    them. A live one is renamed within microseconds of being made (a copy, where links
    are refused, is modified as it is written): one unmodified for
    :data:`DEAD_WRITE_GRACE_SECONDS` is dead, whatever its pid says (a pid means nothing
    in another container or on another host sharing the folder; in a container the
    trainer is PID 1 every time). Only links and files of that name's form."""
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return []
    removed: list[Path] = []
    now = time.time()
    for entry in entries:
        if _LINK_TEMPORARY.match(entry.name) is None:
            continue
        with contextlib.suppress(OSError):
            stat = entry.stat(follow_symlinks=False)
            if not (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                continue
            if now - stat.st_mtime < DEAD_WRITE_GRACE_SECONDS:
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def clear_dead_writes(scratch: Path, *, own_names_only: bool = False) -> list[Path]:
    """Delete the temporary files of background writes whose process ended (a crash
    mid-write) from ``scratch``; return them.

    A SIGKILL mid-write leaves a partial checkpoint there, as large as the write got,
    that nothing else would ever delete. A ``.tmp`` file is locked by its writer from
    its first moment until it is renamed into place: one nobody holds is deleted at
    once. A ``.new`` file (killed between creating and locking it) only once unmodified
    for :data:`DEAD_WRITE_GRACE_SECONDS`. The checkpoint itself was never written: its
    journaled job is dropped at replay. Without ``fcntl`` (Windows) nothing can tell,
    and nothing is deleted.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return []  # type: ignore[unreachable]
    try:
        entries = [
            e
            for e in os.scandir(scratch)
            if e.name.startswith(".")
            and e.name.endswith((CLAIMED_SUFFIX, WRITING_SUFFIX))
            # Beside checkpoints: only a write's own names, and files (no user's FIFO).
            and (
                not own_names_only
                or (_OWN_TEMPORARY.match(e.name) and e.is_file(follow_symlinks=False))
            )
        ]
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        try:
            # Registered: a child forked while this lock is held (a young file's,
            # skipped) would otherwise keep its writer from locking it (see _flocks).
            fd = _flocks.open_fd(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            stat = os.fstat(fd)
            if (
                entry.name.endswith(CLAIMED_SUFFIX)
                and time.time() - stat.st_mtime < DEAD_WRITE_GRACE_SECONDS
            ):
                continue  # just created: its writer may be about to lock it
            if not os.path.samestat(stat, os.stat(entry.path)):
                continue  # replaced meanwhile
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
        finally:
            _flocks.close(fd)
    return removed
