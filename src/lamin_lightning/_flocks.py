"""Descriptors that carry an ``flock``, opened so that a forked child never keeps the lock.

An ``flock`` belongs to the open file description, which a forked child (a DataLoader
worker, a user's fork pool) shares with every descriptor copied into it. Killed, the
training process then leaves the lock held by a child that may live on for good:
``lamin-lightning flush`` takes the outbox for a live run's, a dead owner's leftovers
look alive, a partial checkpoint is never deleted.

Every descriptor that will carry a lock is opened here, and registered in the same
step, under a lock that ``fork`` also takes: a child is forked either before the open
or after the registration, never between. The child points its copies of the
registered descriptors at ``/dev/null``, so locks taken before or after the fork stay
the parent's alone. Registered before it is locked, a descriptor may wait for its lock
(``flock`` without ``LOCK_NB``) outside that lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import IO, Any

# Descriptor -> the file it was opened on: a handle closed without close() (an object
# collected unclosed) leaves its number behind, which another file may take meanwhile.
_registered: dict[int, tuple[int, int]] = {}
_guard = threading.Lock()


def _register(fd: int) -> None:
    stat = os.fstat(fd)
    _registered[fd] = (stat.st_dev, stat.st_ino)


def open_file(path: str | os.PathLike[str], mode: str, **kwargs: Any) -> IO[Any]:
    """``open(path, mode, **kwargs)``, registered (see the module's docstring)."""
    with _guard:
        handle = open(path, mode, **kwargs)  # noqa: SIM115 - the caller closes it with close()
        try:
            _register(handle.fileno())
        except BaseException:
            handle.close()
            raise
        return handle


def open_fd(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags, mode)``, registered."""
    with _guard:
        fd = os.open(path, flags, mode)
        try:
            _register(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd


def dup(fd: int) -> int:
    """``os.dup(fd)``, registered (a copy of a locked descriptor carries its lock)."""
    with _guard:
        copy = os.dup(fd)
        try:
            _register(copy)
        except BaseException:
            os.close(copy)
            raise
        return copy


def close(handle: IO[Any] | int) -> None:
    """Close a descriptor or handle opened here (dropping its lock, if it held one)."""
    with _guard:
        if isinstance(handle, int):
            _registered.pop(handle, None)
            os.close(handle)
            return
        with contextlib.suppress(ValueError):  # closed already
            _registered.pop(handle.fileno(), None)
        handle.close()


def _forked() -> None:
    # In the child only. The descriptors stay valid (as do the parent's handles copied
    # with them, never used here): they no longer refer to the parent's files.
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:  # pragma: no cover - no /dev/null: close them instead
        devnull = -1
    for fd, opened in _registered.items():
        with contextlib.suppress(OSError):
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != opened:
                continue  # closed unawares, the number since taken by another file
            if devnull >= 0:
                os.dup2(devnull, fd)
            else:  # pragma: no cover
                os.close(fd)
    if devnull >= 0:
        os.close(devnull)
    _registered.clear()
    _guard.release()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(
        before=_guard.acquire, after_in_parent=_guard.release, after_in_child=_forked
    )
