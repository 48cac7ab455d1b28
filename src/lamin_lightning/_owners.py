"""Whose entry is it, and does that process still live? Lock files in shared folders.

Processes share a working folder (ranks, a flush beside a training run, a run after a
crash). What one of them leaves in ``aside/`` or ``staged/`` is named after its owner
(``{pid}-{token}``, the token drawn once per process, since a container's trainer is PID 1
every time). Each process that puts entries in such a folder holds an exclusive ``flock``
on its own ``{owner}.lock`` there while it may still use them. Whoever can take that lock
knows the owner has ended, and its entries are the leftovers of a dead process. This
holds where ``flock`` works across every process that shares the folder (one machine;
a network filesystem only if its locks are cluster-wide).
Without ``fcntl`` (Windows) nothing can tell; callers then leave everything alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from lamin_lightning import _flocks

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"

_registry = threading.Lock()
_locks: dict[str, threading.Lock] = {}
"""Folder -> the lock held while this process takes its lock file there and adds an
entry, and while it gives the lock file up: the two never interleave. One per folder, so
that staging (intake thread) never holds up a move aside (training thread)."""

_held: dict[str, int] = {}
"""Folder -> this process's open, locked lock file there."""


def _forked() -> None:
    # The child's copies of the parent's lock descriptors no longer share its locks
    # (_flocks, whose hook runs first, pointed them at /dev/null): free them. Locks
    # another thread of the parent held at the fork would stay held for ever.
    global _registry, _locks
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
    _registry = threading.Lock()
    _locks = {}


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)


def owner() -> str:
    """This process's owner name (``{pid}-{token}``; a forked child has its own)."""
    from lamin_lightning import _staging  # (which stages under this module's locks)

    return f"{_staging._pid}-{_staging._TOKEN}"


def folder_lock(folder: Path) -> threading.Lock:
    """The lock to hold around :func:`hold` and the entry added under it."""
    key = str(folder)
    with _registry:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = threading.Lock()
        return lock


def hold(folder: Path, *, verify: bool = False) -> str:
    """This process's owner name in ``folder``, its lock file created and locked once.
    Call with :func:`folder_lock` held.

    ``verify``: also make sure the lock file is still there (one ``stat``; not on the
    training thread): a folder deleted and created again gets a new one.
    """
    key = str(folder)
    name = owner()
    kept = _held.get(key)
    if kept is not None and (not verify or _is_at(kept, folder / f"{name}{LOCK_SUFFIX}")):
        return name
    if kept is not None:
        del _held[key]
        _flocks.close(kept)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{LOCK_SUFFIX}"
    for attempt in range(8):
        # Registered as it is opened: a child forked before its lock is taken, too,
        # lets go of its copy (see _flocks), or it would keep this process alive here.
        fd = _flocks.open_fd(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover - Windows
            break  # type: ignore[unreachable]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            _flocks.close(fd)
            raise
        # Between the open and the lock, another process may have taken the new file for
        # a dead owner's and unlinked it: the lock would then guard no name. (The last
        # try's descriptor is kept whatever: never one closed.)
        if _is_at(fd, path) or attempt == 7:
            break
        _flocks.close(fd)
    _held[key] = fd
    return name


def let_go(folder: Path, still_used: Callable[[str], bool]) -> bool:
    """Give up this process's lock file in ``folder``, unless ``still_used(owner)`` says
    an entry of ours there is still in use; whether it was given up now (False also if it
    was not held)."""
    with folder_lock(folder):
        fd = _held.get(str(folder))
        if fd is None:
            return False
        name = owner()
        try:
            if still_used(name):
                return False
        except OSError:
            return False
        del _held[str(folder)]
        if fcntl is None:  # pragma: no cover - Windows: an open file cannot be deleted
            _flocks.close(fd)  # type: ignore[unreachable]
        with contextlib.suppress(OSError):
            os.unlink(folder / f"{name}{LOCK_SUFFIX}")
        if fcntl is not None:
            _flocks.close(fd)
    return True


def can_tell() -> bool:
    """Whether whose entry it is can be told here (False without ``fcntl``: Windows)."""
    return fcntl is not None


def has_entries(folder: Path, prefix: str) -> bool:
    """Whether ``folder`` lists a name starting with ``prefix`` (OSError if unlistable)."""
    return any(name.startswith(prefix) for name in os.listdir(folder))


@contextlib.contextmanager
def dead_owner(folder: Path, name: str) -> Iterator[bool]:
    """Whether owner ``name`` has ended (its lock file can be locked, or is gone); holds
    that lock meanwhile, so that two processes never clear the same entries, and removes
    the lock file afterwards."""
    path = folder / f"{name}{LOCK_SUFFIX}"
    try:
        fd = _flocks.open_fd(path, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # alive: it may be using its entries right now
            return
        if not _is_at(fd, path):
            # The owner gave its file up and took a new one since we opened it: alive.
            yield False
            return
        yield True
        if _is_at(fd, path):  # never another file of that name
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        _flocks.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
