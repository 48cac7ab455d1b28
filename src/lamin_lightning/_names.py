"""Names this process's background writes are creating (``async_write``, a CheckpointIO
that writes late, links asked for): light, so that recovery and the CLI need no torch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

_names_lock = threading.Lock()
_names_released = threading.Condition(_names_lock)
_names_taken: dict[str, int] = {}
_names_staging: dict[str, int] = {}  # of those, the takes of stagings (see being_written)


def take_name(filepath: str | os.PathLike[str], *, staging: bool = False) -> None:
    """Count ``filepath`` as taken until :func:`release_name` (see :func:`name_taken`).

    ``staging``: taken by the staging of a file (which may exist already), not by a
    write creating it.
    """
    name = os.path.abspath(filepath)
    with _names_lock:
        _names_taken[name] = _names_taken.get(name, 0) + 1
        if staging:
            _names_staging[name] = _names_staging.get(name, 0) + 1


def release_name(filepath: str | os.PathLike[str], *, staging: bool = False) -> None:
    """Give back one :func:`take_name` of ``filepath`` (``staging`` as it was taken)."""
    name = os.path.abspath(filepath)
    with _names_lock:
        if staging:
            _count_down(_names_staging, name)
        if not _count_down(_names_taken, name):
            _names_released.notify_all()


def _count_down(counts: dict[str, int], name: str) -> int:
    left = counts.get(name, 0) - 1
    if left > 0:
        counts[name] = left
        return left
    counts.pop(name, None)
    return 0


def wait_until_written(paths: Iterable[str | os.PathLike[str]], timeout: float) -> set[str]:
    """Wait up to ``timeout`` seconds until no background write of this process is creating
    any of ``paths``; return the absolute paths still being written then.

    A replay in this process must not judge a save's file missing (or a removal's
    replacement) while a write an interrupted fit left running is still creating it.
    """
    names = {os.path.abspath(path) for path in paths}
    deadline = time.monotonic() + timeout
    # The lock itself, not the Condition: its __enter__ is Python code, and a Ctrl+C
    # right after it took the lock, before the block, left the lock taken for good.
    with _names_lock:
        while True:
            busy = {name for name in names if name in _names_taken}
            left = deadline - time.monotonic()
            if not busy or left <= 0:
                return busy
            _names_released.wait(left)


def taken_in(folder: str | os.PathLike[str]) -> set[str]:
    """The absolute paths directly in ``folder`` that a background write of this process is
    creating right now."""
    base = os.path.abspath(folder)
    with _names_lock:
        return {name for name in _names_taken if os.path.dirname(name) == base}


def name_taken(filepath: str | os.PathLike[str]) -> bool:
    """Whether a background write of this process is creating ``filepath`` right now, or
    a staging of it is pending.

    Lightning picks a checkpoint's name (``-v1``, ``last-v1``) by what exists on disk;
    a file still being written counts as existing, for every callback of this process.
    """
    name = os.path.abspath(filepath)
    with _names_lock:
        return name in _names_taken


def being_written(filepath: str | os.PathLike[str]) -> bool:
    """Whether a background write of this process is creating ``filepath`` right now (a
    pending staging of a file does not count: the file is on disk already, or its write
    takes the name too)."""
    name = os.path.abspath(filepath)
    with _names_lock:
        return _names_taken.get(name, 0) > _names_staging.get(name, 0)
