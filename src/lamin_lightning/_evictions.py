"""Evictions that wait for their replacement, and Lightning's state put right (``async_write``,
or a CheckpointIO that writes after it returns, such as Lightning's ``AsyncCheckpointIO``).

Lightning evicts the previous best or last checkpoint right after it saved the new one,
and updates its state (``best_k_models``, ``best_model_path``, ``last_model_path``,
``kth_best_model_path``) before it saves. With ``async_write`` the new file exists only
once its background write finished, so:

- an eviction decided while its replacement is being written is deferred to the
  pipeline's intake thread, after that write, and dropped if the write failed (the
  removal's record names the replacement: a replay after a crash drops it the same way);
- once a write is known to have failed, Lightning's state is put back as if that save
  had never happened: the failed path leaves it, the checkpoints it would have evicted
  and that are still on disk come back, with their scores, and the best and k-th best
  are ranked again (checkpoints beyond ``save_top_k`` then are evicted as Lightning would).

:class:`Evictions` keeps what that needs on the training thread (rank zero); the
pipeline's intake thread tells it when a deferred removal ran (under its lock).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch

from lamin_lightning._names import name_taken


class BackgroundWrite(Protocol):
    """A write that finishes after Lightning's save returned: an ``async_write``
    (``HostWrite``) or a CheckpointIO's (``PendingWrites``)."""

    def done(self) -> bool: ...

    def failed(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def then(self, action: Any, otherwise: Any = None) -> None: ...


@dataclass(frozen=True)
class _Before:
    """Lightning's state when a save began, before Lightning changed it for that save."""

    best_k_models: dict[str, Any]
    best_model_path: str
    last_model_path: str
    last_saved: str  # Lightning's ``_last_checkpoint_saved`` (what ``save_last="link"`` links)


class _Eviction(NamedTuple):
    """A file evicted in favour of a background write, and its entry in
    ``Evictions._removing`` (its real path, and this eviction's number)."""

    path: str
    real: str
    number: int


@dataclass
class _Replacement:
    """A checkpoint written in the background and the files evicted in its favour."""

    path: str
    write: BackgroundWrite
    before: _Before
    evicted: list[_Eviction] = field(default_factory=list)
    # Whether a file was at ``path`` when the save began (a rewrite of a name in use): if
    # the write fails, the file there is the previous one. Otherwise one there now is what
    # the failed write left of its own (a writer that writes in place, cut short).
    rewrite: bool = True


def _state_of(callback: Any) -> _Before:
    return _Before(
        dict(callback.best_k_models),
        callback.best_model_path,
        callback.last_model_path,
        getattr(callback, "_last_checkpoint_saved", ""),
    )


class Evictions:
    """Background writes of one callback, and the evictions that wait for them."""

    def __init__(self) -> None:
        self._before: _Before | None = None
        self._current: _Replacement | None = None
        self._writes: list[_Replacement] = []
        # Real paths of evicted files whose removal waits (for the replacement's write,
        # then for the intake thread), each with the evictions that wait: one name can be
        # evicted, saved again and evicted again before the first removal ran (a template
        # whose names repeat), and that removal, when it runs, forgets its own eviction
        # only (see _forget). Forgotten on the intake thread, or when dropped.
        self._removing: dict[str, set[int]] = {}
        self._removing_lock = threading.Lock()
        self._eviction_numbers = itertools.count(1)

    def __reduce__(self) -> tuple[type[Evictions], tuple[()]]:
        # A fit's bookkeeping (and its lock): a pickled or copied callback starts afresh.
        return (Evictions, ())

    def save_started(self, callback: Any) -> None:
        """Lightning is about to choose and save a checkpoint: remember its state now
        (``callback`` None: nothing will be written in the background, nothing to keep)."""
        self._before = _state_of(callback) if callback is not None else None
        self._current = None

    def save_finished(self) -> None:
        """The save (and the evictions Lightning made for it) are done."""
        self._before = None
        self._current = None

    def has_writes(self) -> bool:
        """Whether background writes are remembered (finished ones until taken)."""
        return bool(self._writes)

    def unfinished(self) -> list[BackgroundWrite]:
        """The background writes not finished yet, oldest first."""
        return [w.write for w in self._writes if not w.write.done()]

    def saving(self) -> None:
        """A new file is being saved: evictions from now on are made in its favour."""
        self._current = None

    def wrote(
        self, callback: Any, path: str, write: BackgroundWrite, *, rewrite: bool = True
    ) -> None:
        """``path`` is being written in the background by ``write``; ``rewrite``: a file
        was there when the save began."""
        before = self._before if self._before is not None else _state_of(callback)
        self._current = _Replacement(path, write, before, rewrite=rewrite)
        self._writes = [w for w in self._writes if not w.write.done() or w.write.failed()]
        self._writes.append(self._current)

    def replacement_for(
        self, evicted: str, *, wait: bool = False
    ) -> tuple[str, BackgroundWrite, Callable[[], None]] | None:
        """The file, and its background write, that ``evicted``'s removal must wait for,
        if any, and what the removal calls once it ran (or was dropped): the eviction is
        forgotten then. ``wait``: wait for that write here first (the removal then waits
        only if the write failed)."""
        current = self._current
        if current is None or os.path.abspath(current.path) == os.path.abspath(evicted):
            return None
        if wait:
            current.write.wait()
        if current.write.done() and not current.write.failed():
            return None  # written already: the removal need not wait
        eviction = _Eviction(evicted, os.path.realpath(evicted), next(self._eviction_numbers))
        with self._removing_lock:
            self._removing.setdefault(eviction.real, set()).add(eviction.number)
        current.evicted.append(eviction)
        return current.path, current.write, partial(self._forget, eviction)

    def _forget(self, eviction: _Eviction) -> None:
        """The deferred removal of one eviction ran (pipeline's intake thread), or was
        dropped: its file is gone, or stays. Not another eviction of the same name,
        whose removal still waits (the file there is a later save's)."""
        with self._removing_lock:
            numbers = self._removing.get(eviction.real)
            if numbers is not None:
                numbers.discard(eviction.number)
                if not numbers:
                    del self._removing[eviction.real]

    def evicting(self) -> bool:
        """Whether some eviction's removal still waits (see :meth:`replacement_for`)."""
        return bool(self._removing)

    def removing(self, path: str) -> bool:
        """Whether the file at real path ``path`` was evicted and its removal still waits:
        gone for Lightning, though still on disk."""
        return path in self._removing

    def replacement_write(self, path: str) -> BackgroundWrite | None:
        """The background write the removal of the evicted file at real path ``path``
        waits for, while this callback tracks it (a write done and not failed is
        forgotten at the next save: None then). The latest eviction's: a name evicted,
        saved again and evicted again holds the later save's file, which stays if that
        eviction's replacement fails (and the writes finish in order)."""
        for replacement in reversed(self._writes):
            if any(eviction.real == path for eviction in replacement.evicted):
                return replacement.write
        return None

    def write_of(self, path: str) -> BackgroundWrite | None:
        """The latest background write of ``path`` this callback still tracks, if any."""
        for replacement in reversed(self._writes):
            if os.path.abspath(replacement.path) == os.path.abspath(path):
                return replacement.write
        return None

    def take_failed(self) -> list[_Replacement]:
        """Forget finished writes; return those that failed, oldest first."""
        failed = [w for w in self._writes if w.write.failed()]
        self._writes = [w for w in self._writes if not w.write.done()]
        for replacement in failed:  # their evictions are dropped: the files stay
            for eviction in replacement.evicted:
                self._forget(eviction)
        return failed


def put_right(callback: Any, failed: list[_Replacement]) -> list[str]:
    """Put ``callback``'s Lightning state back as if the ``failed`` saves never happened.

    Returns the checkpoints to evict now (beyond ``save_top_k`` once the kept ones came
    back), for the caller to remove as Lightning would.
    """
    if not failed:
        return []
    for replacement in failed:
        path = replacement.path
        before = replacement.before
        for evicted, _, _ in replacement.evicted:
            if os.path.exists(evicted) and evicted in before.best_k_models:
                callback.best_k_models.setdefault(evicted, before.best_k_models[evicted])
        # A file there now holds what it held before this save only if one was there then;
        # else it is what the failed write left (part of a file), never a checkpoint.
        kept = replacement.rewrite and os.path.exists(path)
        if getattr(callback, "_last_checkpoint_saved", None) == path and not kept:
            previous = before.last_saved
            callback._last_checkpoint_saved = previous if os.path.exists(previous or "") else ""
        if kept:
            # A rewrite of a name in use (last.ckpt, or top-k reusing the name of the
            # checkpoint it evicted): the file still holds what it held before this save,
            # with the score it had then, or is no top-k checkpoint at all.
            if path in before.best_k_models:
                callback.best_k_models[path] = before.best_k_models[path]
            else:
                callback.best_k_models.pop(path, None)
            continue
        callback.best_k_models.pop(path, None)
        last = callback.last_model_path
        # The file itself (save_last=True), or a link to it never made (save_last="link":
        # made once the file is written) where no earlier link stands.
        never_linked = (
            callback.save_last == "link"
            and bool(last)
            and not os.path.lexists(last)
            and not name_taken(last)
        )
        if last == path or never_linked:
            previous = before.last_model_path
            callback.last_model_path = previous if previous and os.path.exists(previous) else ""
        if callback.best_model_path == path and callback.monitor is None:
            previous = before.best_model_path
            callback.best_model_path = previous if previous and os.path.exists(previous) else ""
    return _rank(callback) if callback.monitor is not None else []


def _rank(callback: Any) -> list[str]:
    """Recompute best and k-th best from ``best_k_models`` as Lightning does; trim to top k."""
    scores = callback.best_k_models
    worse = max if callback.mode == "min" else min
    better = min if callback.mode == "min" else max
    evict: list[str] = []
    while callback.save_top_k > 0 and len(scores) > callback.save_top_k:
        worst = worse(scores, key=scores.get)
        scores.pop(worst)
        evict.append(worst)
    if not scores:
        callback.best_model_path, callback.best_model_score = "", None
        callback.kth_best_model_path = ""
        callback.kth_value = torch.tensor(float("inf") if callback.mode == "min" else float("-inf"))
        return evict
    callback.best_model_path = better(scores, key=scores.get)
    callback.best_model_score = scores[callback.best_model_path]
    k = callback.save_top_k if callback.save_top_k > 0 else len(scores)
    if len(scores) == k:
        callback.kth_best_model_path = worse(scores, key=scores.get)
        callback.kth_value = scores[callback.kth_best_model_path]
    return evict


_SHARED = (
    "best_k_models",
    "best_model_path",
    "best_model_score",
    "kth_best_model_path",
    "kth_value",
    "last_model_path",
)


def lightning_state(callback: Any) -> dict[str, Any]:
    """The part of Lightning's state :func:`put_right` changes (to send to other ranks)."""
    return {name: getattr(callback, name) for name in _SHARED}


def set_lightning_state(callback: Any, state: dict[str, Any]) -> None:
    """Take over rank zero's :func:`lightning_state`."""
    for name in _SHARED:
        setattr(callback, name, state[name])


__all__ = ["Evictions", "lightning_state", "put_right", "set_lightning_state"]
