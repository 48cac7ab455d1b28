"""Whose entry is it, and does that process still live? Lock files in shared folders.

Processes share a working folder (ranks, a flush beside a training run, a run after a
crash). What one of them leaves in ``aside/`` or ``staged/`` is named after its owner
(``{pid}-{token}``, the token drawn once per process, since a container's trainer is PID 1
every time). Each process that puts entries in such a folder holds an exclusive ``flock``
on its own ``{owner}.lock`` there while it may still use them. Whoever can take that lock
knows the owner has ended, and its entries are the leftovers of a dead process.
Without ``fcntl`` (Windows) nothing can tell; callers then leave everything alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"

lock = threading.Lock()
"""Held while this process takes its lock file in a folder and adds an entry there, and
while it gives the lock file up: the two never interleave."""

_held: dict[str, int] = {}
"""Folder -> this process's open, locked lock file there."""


def _forked() -> None:
    # The child's copies of the parent's lock descriptors would keep the parent's locks
    # after the parent died: close them (the parent's own descriptors keep its locks).
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)


def owner() -> str:
    """This process's owner name (``{pid}-{token}``; a forked child has its own)."""
    from lamin_lightning import _staging  # (which stages under this module's locks)

    return f"{_staging._pid}-{_staging._TOKEN}"


def hold(folder: Path) -> str:
    """This process's owner name in ``folder``, its lock file created and locked once.
    Call with :data:`lock` held."""
    key = str(folder)
    name = owner()
    if key not in _held:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{name}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                raise
        _held[key] = fd
    return name


def let_go(folder: Path, still_used: Callable[[str], bool]) -> bool:
    """Give up this process's lock file in ``folder``, unless ``still_used(owner)`` says
    an entry of ours there is still in use; whether it was given up now (False also if it
    was not held)."""
    with lock:
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
        with contextlib.suppress(OSError):
            os.unlink(folder / f"{name}{LOCK_SUFFIX}")
        os.close(fd)
    return True


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
        fd = os.open(path, os.O_RDWR)
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
        yield True
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        os.close(fd)
