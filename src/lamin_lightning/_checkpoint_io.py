"""Composition with a CheckpointIO that writes after ``save_checkpoint`` returns.

Lightning's ``AsyncCheckpointIO`` hands each write to a thread pool and returns at
once: when ``ModelCheckpoint._save_checkpoint`` returns, the file may not exist yet.
Staging it then would persist a partial file or none. At ``setup`` the callback
wraps the trainer's CheckpointIO twice (:func:`compose`):

- outside, so that each ``save_checkpoint`` call begins a :class:`_Write` for its
  path, on the training thread, before the write is handed to the pool;
- inside ``AsyncCheckpointIO`` (around the CheckpointIO that really writes), so that
  the pool's thread finishes that write, with its error if it failed.

The callback then gives the staging step, which runs on the pipeline's intake
thread, a wait for the writes its save began (:meth:`WriteTracker.waiter`): nothing
is staged or hashed before its writer finished, and the training thread never
waits for a write. A strategy that does not save through its CheckpointIO (FSDP's
sharded checkpoints) begins no write: its files exist when the save returns. A
subclass of ``AsyncCheckpointIO`` with a ``save_checkpoint`` of its own is followed by
the tasks it queues on its executors too (:class:`_FollowedSave`): its task may write
otherwise than through its ``checkpoint_io`` with the save's path.

A CheckpointIO that looks asynchronous but is not Lightning's (its class name says
``Async``, or it holds an executor) is refused at ``setup`` with
:class:`~lamin_lightning.CheckpointIOError`: we cannot tell when its writes finish.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from lamin_lightning._errors import CheckpointIOError
from lamin_lightning._jobs import folder_identity
from lamin_lightning._local_write import run_after_write
from lamin_lightning._names import release_name, take_name
from lamin_lightning._sigterm import ctrl_c_after

SYNCHRONOUS_ATTRIBUTE = "lamin_lightning_synchronous"
"""Set this attribute to True on a CheckpointIO to declare that it writes before returning."""

_ASYNC_HINTS = ("_executor", "executor", "_futures", "futures", "_pending_writes")


class _Write:
    """One ``save_checkpoint`` call: finished once the file is written (or failed)."""

    __slots__ = (
        "_finished",
        "_first",
        "_lock",
        "_then",
        "claimed",
        "done",
        "error",
        "path",
        "seq",
    )

    def __init__(self, path: str, seq: int) -> None:
        self.path = path
        self.seq = seq
        self.claimed = False
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._then: list[tuple[Callable[[], None], Callable[[], None] | None]] = []
        self._first: list[tuple[Callable[[], None], Callable[[], None] | None]] = []

    def then(
        self,
        action: Callable[[], None],
        otherwise: Callable[[], None] | None = None,
        *,
        first: bool = False,
    ) -> None:
        """``action`` once the file is written, ``otherwise`` if the write failed: on the
        thread that finishes the write, before it counts as done; here and now if it
        finished already. ``first``: before the write gives its name back, too (a replay
        in this process waits for the name, then judges what the action journaled)."""
        with self._lock:
            if not self._finished:
                (self._first if first else self._then).append((action, otherwise))
                return
            written = self.error is None
        run_after_write(self.path, [(action, otherwise)], written)

    def finish(self, error: BaseException | None) -> None:
        """Record the outcome, run what waits for it, then count the write as done."""
        with self._lock:
            if self._finished:
                return
            self.error = error
            self._finished = True
            waiting, self._then = self._then, []
            first, self._first = self._first, []
        run_after_write(self.path, first, error is None)
        if self.path:
            release_name(self.path)  # taken by WriteTracker.begin
        run_after_write(self.path, waiting, error is None)
        self.done.set()


class _NeverStarted(RuntimeError):
    """The error of a write dropped before any writer took it."""


class WriteTracker:
    """The writes begun through the wrapped CheckpointIO and not finished, per path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._pending: dict[str, list[_Write]] = {}
        # Every write begun since the last waiter() that is not known finished: a write
        # that failed (or succeeded) before its save asked for it is still found.
        self._begun: list[_Write] = []
        self._last_seq = 0

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a pickled trainer (ddp_spawn) starts with no writes in flight

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def mark(self) -> int:
        """A position: :meth:`waiter` considers only writes begun after it."""
        with self._lock:
            return self._last_seq

    def begin(self, path: Any) -> _Write:
        """A write of ``path`` is handed to the CheckpointIO (training thread)."""
        with self._lock:
            seq = self._last_seq = next(self._seq)
            write = _Write(_normal(path), seq)
            self._pending.setdefault(write.path, []).append(write)
            self._begun.append(write)
        # Taken until the write finishes, as a background write of ours takes it: a replay
        # in this process waits for it rather than judge a file still being written, and
        # Lightning's version counter sees the name as taken meanwhile.
        if write.path:
            take_name(write.path)
        return write

    def drop(self, write: _Write) -> None:
        """Forget ``write`` if no writer took it (its ``save_checkpoint`` raised first)."""
        with self._lock:
            if write.claimed:
                return
            self._remove(write)
        write.finish(_NeverStarted(f"the write of {write.path} never started"))

    def claim(self, path: Any) -> _Write | None:
        """The writer thread starts writing ``path``: the oldest write not yet taken."""
        with self._lock:
            for write in self._pending.get(_normal(path), ()):
                if not write.claimed:
                    write.claimed = True
                    return write
        return None

    def unclaimed(self) -> bool:
        """Whether a write was begun that no writer has taken yet (still queued)."""
        with self._lock:
            return any(not w.claimed for writes in self._pending.values() for w in writes)

    def finish(self, write: _Write | None, error: BaseException | None) -> None:
        """The writer thread finished ``write`` (``error``: it failed)."""
        if write is None:
            return
        with self._lock:
            self._remove(write)
        write.finish(error)

    def _remove(self, write: _Write) -> None:
        writes = self._pending.get(write.path, [])
        if write in writes:
            writes.remove(write)
        if not writes:
            self._pending.pop(write.path, None)

    def waiter(self, path: Any, since: int = 0) -> PendingWrites | None:
        """The writes of ``path`` begun after ``since``, finished or not; None if none.

        Their wait raises the error of a write that failed. It runs on the pipeline's
        intake thread, before the file is staged. A write that finished (or failed)
        before this call is included: a quick failure must not pass for a save that
        wrote its file. Writes begun up to now and finished are forgotten here.
        """
        name = _normal(path)
        with self._lock:
            writes = [w for w in self._begun if w.seq > since and w.path == name]
            self._begun = [w for w in self._begun if not w.done.is_set()]
        return PendingWrites(writes) if writes else None


class PendingWrites:
    """The writes of one file still in a CheckpointIO's hands: called, waits for them
    (raising the error of one that failed); ``done()`` and ``failed()`` look without
    waiting, as for an ``async_write`` (what evictions in their favour wait on)."""

    def __init__(self, writes: list[_Write]) -> None:
        self._writes = writes

    def __call__(self) -> None:
        for write in self._writes:
            write.done.wait()
            if write.error is not None:
                raise write.error

    def done(self) -> bool:
        """Whether every write finished (written or failed)."""
        return all(write.done.is_set() for write in self._writes)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every write finished; whether they did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for write in self._writes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not write.done.wait(left):
                return False
        return True

    def failed(self) -> bool:
        """Whether they finished and one failed."""
        return self.done() and any(write.error is not None for write in self._writes)

    def handed_over(self) -> bool:
        """Whether every write reached the writer: none was dropped because its
        ``save_checkpoint`` raised first (one that raised an earlier write's error after
        queuing it was not)."""
        return not any(isinstance(write.error, _NeverStarted) for write in self._writes)

    def mark_folder_with(self, mark: Callable[[tuple[int, int, int]], None]) -> None:
        """Have ``mark`` told the identity of the folder at the path (see
        ``_jobs.file_identity``) once every write ended without error, if a folder is
        there (a CheckpointIO that writes one in place: a sharded checkpoint): its job's
        journal notes it (``Outbox.mark_written``, ``JobRecord.marks_folder``). On the
        writer's thread, before the write counts as done (nothing stages it, and no later
        save sets it aside, before) or gives its name back (a replay in this process waits
        for the name); here and now if they ended already. A process killed
        mid-write leaves a partial folder with no mark, which a replay drops. A file is
        not marked: the replay judges a file by its bytes."""
        writes = self._writes

        def marked() -> None:
            # The last write wrote (an action, not ``otherwise``); the earlier ones ended
            # before it (one writer thread).
            if any(write.error is not None for write in writes):
                return
            identity = folder_identity(writes[-1].path)
            if identity is not None:
                mark(identity)

        writes[-1].then(marked, first=True)

    def folder_written(self) -> tuple[int, int, int] | None:
        """The identity of the folder at the path if every write already ended without
        error and left one there, else None: journaled with the job's own line (see
        ``Submitter._journaled_job``), so that a process killed right after that line,
        before :meth:`mark_folder_with` could mark it, does not leave a whole folder
        unmarked."""
        if not self.done() or self.failed():
            return None
        return folder_identity(self._writes[-1].path)

    def then(self, action: Callable[[], None], otherwise: Callable[[], None] | None = None) -> None:
        """``action`` once every write finished and wrote its file, else ``otherwise``: on
        the thread that finishes the last one (they finish in order: one writer thread)."""
        writes = self._writes

        def last_finished() -> None:
            failed = any(write.error is not None for write in writes)
            run_after_write(writes[-1].path, [(action, otherwise)], not failed)

        writes[-1].then(last_finished, last_finished)


class _TrackingCheckpointIO(_WrappingCheckpointIO):
    """Outside the trainer's CheckpointIO: begins a write at each ``save_checkpoint``.

    ``queue``: the one ``AsyncCheckpointIO`` of the chain, whose executor's task of each
    write is followed too (:class:`_FollowedSave`): a subclass of it that writes
    otherwise than through its ``checkpoint_io`` with the save's path (to a temporary
    name it renames, say) never reaches the notifier, and its write would be waited for
    for good.
    """

    def __init__(
        self, checkpoint_io: CheckpointIO, tracker: WriteTracker, queue: Any = None
    ) -> None:
        super().__init__(checkpoint_io)
        self.tracker = tracker
        self.queue = queue

    @override
    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        write = None
        followed = None
        raised = True
        try:
            # A Ctrl+C meanwhile is raised once the write is known (see ctrl_c_after), and
            # then dropped below: raised before, a write begun and never queued was waited
            # for, for good, as the save's (kept out: the flush at exit never ended).
            with ctrl_c_after():
                write = self.tracker.begin(_path_argument(args, kwargs))
            queue = self.queue
            if (
                queue is not None
                and _function(queue, "save_checkpoint") is not _LIGHTNINGS_QUEUE_SAVE
            ):
                with contextlib.suppress(Exception):
                    queue._ensure_setup()
                followed = _FollowedSave(self.tracker, write, queue)
            if followed is not None:
                # Held too (see ctrl_c_after): raised between an executor followed and its
                # follow noted, it stayed followed for good (close hands back those noted).
                with ctrl_c_after():
                    followed.follow()
            super().save_checkpoint(*args, **kwargs)
            raised = False
        except BaseException as error:
            # AsyncCheckpointIO queues the write, then raises an earlier write's error (kept
            # in ``_error``): this write still happens, and is followed (handed_over). A
            # subclass's save is followed by its tasks instead, whatever it raised: one that
            # queued a task and then raised (its own error, an earlier task's) still writes
            # the file, and one that queued nothing is dropped (``_FollowedSave.close``).
            if (
                write is not None
                and followed is None
                and error is not getattr(self.checkpoint_io, "_error", None)
            ):
                self.tracker.drop(write)
            raise
        finally:
            if followed is not None:
                # A Ctrl+C meanwhile is raised once the save counts as returned (see
                # ctrl_c_after): raised before, its write never finished, though the tasks
                # it queued wrote the file, and a flush dropped a folder never marked.
                with ctrl_c_after():
                    followed.close(raised)

    @override
    def teardown(self) -> None:
        assert self.checkpoint_io is not None
        self.checkpoint_io.teardown()

    def __getattr__(self, name: str) -> Any:
        # Attributes of the wrapped CheckpointIO (``_error``, ...) stay reachable.
        if name.startswith("__") or name in ("_checkpoint_io", "tracker", "queue"):
            raise AttributeError(name)
        return getattr(self._checkpoint_io, name)


_LIGHTNINGS_QUEUE_SAVE = AsyncCheckpointIO.save_checkpoint


class _FollowedSave:
    """One ``save_checkpoint`` of a subclass of ``AsyncCheckpointIO``: what is queued on
    each executor it holds (Lightning's ``_executor``, or a pool of its own) by the save
    (on the training thread, until it returns) or by a task of the save (on the thread
    that runs it: a write that queues its rename, or a manifest, as a task of its own,
    whenever it runs) is followed (see :func:`_follow_submissions`), and ``write``
    finishes once every such task ended (with the first error one raised, or left in
    ``_error``), if the notifier did not finish it first. A thread pool the save made
    (an attribute it set during the call: one made lazily, at the first save) was not
    followed while it queued: ``write`` finishes once every task queued on it before the
    save returned ended too (:func:`_await_queued`, on a thread of its own). Nothing
    queued: the subclass wrote (or not) on its own, as a synchronous CheckpointIO does,
    and the file is looked at at once."""

    def __init__(self, tracker: WriteTracker, write: _Write, queue: Any) -> None:
        self._tracker, self._write, self._queue = tracker, write, queue
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self._error: BaseException | None = None
        self._swapped: dict[str, Any] = {}
        self._in_place: list[_InPlace] = []
        self._submitted = False
        self._outer: _FollowedSave | None = None
        self._known: list[Executor] = []
        self._error_before: BaseException | None = None

    def follow(self) -> None:
        """Follow what is queued on each executor the queue holds, from now on, by this
        thread (until :meth:`close`) and by the tasks queued (until every one ended)."""
        self._error_before = getattr(self._queue, "_error", None)
        for name, value in list(vars(self._queue).items()):
            if not isinstance(value, Executor):
                continue
            self._known.append(value)
            in_place = _follow_submissions(value)
            if in_place is not None:
                self._in_place.append(in_place)
                continue
            # Its ``submit`` cannot be followed in place (an executor that takes no
            # attribute of its own: frozen): a stand-in meanwhile, which tasks that read
            # the attribute when they run no longer find.
            followed = _FollowedExecutor(value)
            setattr(self._queue, name, followed)
            self._swapped[name] = followed
        self._outer = getattr(_following, "save", None)
        _following.save = self

    def close(self, raised: bool) -> None:
        """``save_checkpoint`` returned (or raised): no more tasks are queued for it but by
        the tasks it queued."""
        _following.save = self._outer
        for name, followed in self._swapped.items():
            if vars(self._queue).get(name) is followed:
                setattr(self._queue, name, followed._executor)
        made = self._made_during_the_call()
        with self._lock:
            self._closed = True
            self._pending += len(made)
            self._submitted = self._submitted or bool(made)
            last = self._pending == 0
        # Each pool's sweep, once its thread took it: "taken"; one whose thread never
        # started is "given up" (not counted any more), under ``self._lock``.
        sweeps = [{"state": ""} for _ in made]
        for pool, sweep in zip(made, sweeps, strict=True):
            try:
                threading.Thread(
                    target=self._swept,
                    args=(pool, sweep),
                    name="lamin-lightning-pool-sweep",
                    daemon=True,
                ).start()
            except BaseException as error:  # no thread to wait (a limit on threads, Ctrl+C)
                # Counted above, these pools would hold the write open for good (the flush
                # waiting its whole timeout): it fails with the error instead, whatever
                # their tasks write later (as before pools made in the save were waited for).
                self._give_up(sweeps, error)
                if not isinstance(error, Exception):
                    raise
                return
        if last:
            self._done(raised)

    def _give_up(self, sweeps: list[dict[str, str]], error: BaseException) -> None:
        """The sweeps of :meth:`close` that no thread took yet are not waited for: the
        write fails with ``error`` (a thread not started)."""
        self._failed(error)
        with self._lock:
            for sweep in sweeps:
                if not sweep["state"]:
                    sweep["state"] = "given up"
                    self._pending -= 1
            last = self._closed and self._pending == 0
        if last:
            self._done(raised=False)

    def _made_during_the_call(self) -> list[ThreadPoolExecutor]:
        """The thread pools the queue holds now and held at none of its attributes when
        the save began, and that started a thread (which their first task does): made
        during the call, so that what it queued on them then went unfollowed. The next
        save follows them as any other. A pool made with nothing queued on it leaves the
        save queuing nothing (one that raised is dropped, as before); another kind of
        executor made during the call is not waited for (see docs/tuning.md)."""
        made: list[ThreadPoolExecutor] = []
        for value in list(vars(self._queue).values()):
            if (
                isinstance(value, ThreadPoolExecutor)
                and _sweepable(value)
                and not any(value is known for known in self._known + made)
                and _threads_of(value)
            ):
                made.append(value)
        return made

    def _swept(self, pool: ThreadPoolExecutor, sweep: dict[str, str]) -> None:
        """On a thread of its own: every task queued on ``pool`` before the save returned
        ended (an error one kept in ``_error`` fails the write), then it counts as a task
        of the save that ended (unless :meth:`_give_up` gave it up before it began)."""
        with self._lock:
            if sweep["state"]:
                return
            sweep["state"] = "taken"

        def read_error() -> None:
            # At the moment no task queued later has run since the earlier ones ended
            # (with one worker thread): the error is theirs.
            error = getattr(self._queue, "_error", None)
            if error is not None and error is not self._error_before:
                self._failed(error)

        try:
            _await_queued(pool, read_error)
        except BaseException as error:  # pragma: no cover - a pool that breaks our proof
            self._failed(error)
        with self._lock:
            self._pending -= 1
            last = self._closed and self._pending == 0
        if last:
            self._done(raised=False)

    def task(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as queued: what it queues is this save's too, and an error it leaves in
        ``_error`` (on the writer's thread, when it ran) fails the write."""
        queue = self._queue

        def run(*args: Any, **kwargs: Any) -> Any:
            before = getattr(queue, "_error", None)
            outer = getattr(_following, "save", None)
            _following.save = self
            try:
                return fn(*args, **kwargs)
            finally:
                _following.save = outer
                after = getattr(queue, "_error", None)
                if after is not None and after is not before:
                    self._failed(after)

        return run

    def queued(self, future: Any) -> None:
        with self._lock:
            self._pending += 1
            self._submitted = True
        future.add_done_callback(self._ended)

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = error

    def _ended(self, future: Any) -> None:
        if future.cancelled():
            self._failed(_NeverStarted(f"the write of {self._write.path} never started"))
        elif future.exception() is not None:
            self._failed(future.exception())
        with self._lock:
            self._pending -= 1
            last = self._closed and self._pending == 0
        if last:
            self._done(raised=False)

    def _done(self, raised: bool) -> None:
        """The save returned and every task it queued ended (once): the executors it
        followed in place are the user's as they were unless another save still follows
        them, then the write counts as done (unless the notifier finished it already)."""
        in_place, self._in_place = self._in_place, []
        interrupted: BaseException | None = None
        for each in in_place:
            try:
                _unfollow_submissions(each)
            except BaseException as error:  # Ctrl+C landing in it (the training thread)
                interrupted = interrupted or error
        # Whatever the hand-back raised, the write ends: one never finished holds its name
        # for good, and the flush at teardown waits for it.
        self._finish(raised)
        if interrupted is not None:
            raise interrupted

    def _finish(self, raised: bool) -> None:
        if self._submitted:
            if not self._write.done.is_set():  # else the notifier finished it (checkpoint_io)
                self._tracker.finish(self._write, self._error)
        elif raised:
            self._tracker.drop(self._write)  # nothing queued: nothing writes it later
        else:
            self._tracker.finish(self._write, None)


_FIRST_HOLD = 0.05
_LONGEST_HOLD = 1.0
_POLL = 0.05


class _Round:
    """One try at holding every worker thread of a thread pool at once with tasks of ours
    (:meth:`hold`, queued after the tasks waited for): until :meth:`end`, each one that
    started keeps its thread."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.arrived: set[threading.Thread] = set()
        self.over = False

    def hold(self) -> None:
        with self.changed:
            if self.over:
                return  # a task of a round given up, started late
            self.arrived.add(threading.current_thread())
            self.changed.notify_all()
            while not self.over:
                self.changed.wait()

    def end(self) -> None:
        with self.changed:
            self.over = True
            self.changed.notify_all()


class _Refused(Exception):
    """The pool no longer runs new tasks (shut down, broken): it runs no later one."""


def _sweepable(pool: ThreadPoolExecutor) -> bool:
    """Whether ``pool`` has the insides :func:`_await_queued` reads (CPython's)."""
    return isinstance(getattr(pool, "_threads", None), set) and hasattr(pool, "_shutdown_lock")


def _await_queued(pool: ThreadPoolExecutor, then: Callable[[], None]) -> None:
    """Return once every task queued on ``pool`` before this call ended, having run
    ``then`` at a moment when no task queued since had run but on another worker thread.

    A ThreadPoolExecutor's workers take its tasks in the order they were queued, each one
    to its end before the next. Once each of its live threads runs a task queued by this
    call, every task queued before was taken, so each ended (its thread took ours after
    it, or ended itself). Tasks of ours hold their thread only ``hold`` seconds after the
    first one started, then the try is given up and queued again with a longer hold: an
    earlier task that waits for a task queued behind ours (on another worker) ends
    meanwhile, and the pool is never held for good. A pool shut down (or broken) runs its
    queued tasks (or cancels them) and its threads end: their end is waited for (a pool
    broken by a thread's initializer failed the tasks still queued; one running then is
    not waited for)."""
    hold = _FIRST_HOLD
    while True:
        try:
            if _try_round(pool, hold, then):
                return
        except _Refused:
            break
        hold = min(2 * hold, _LONGEST_HOLD)
    if not getattr(pool, "_broken", False):  # a broken pool failed the tasks it still held
        for thread in _threads_of(pool):
            thread.join()
    then()


def _threads_of(pool: ThreadPoolExecutor) -> set[threading.Thread]:
    # Under the lock ``submit`` holds while it starts a thread and adds it to the set: a
    # thread started is in it (else it could run an earlier task unseen).
    with pool._shutdown_lock:
        return set(pool._threads)


def _try_round(pool: ThreadPoolExecutor, hold: float, then: Callable[[], None]) -> bool:
    """One :class:`_Round`: whether it held every live thread of ``pool`` at once (then
    ``then`` ran, before they were let go). Raises _Refused if the pool runs no new task."""
    attempt = _Round()
    queued: list[Any] = []
    first_arrival: float | None = None
    try:
        while True:
            with attempt.changed:
                arrived = set(attempt.arrived)
            # Read after ``arrived``, which only grows until ``end``: at the moment this
            # is read, each thread in ``arrived`` runs a task of ours.
            live = {thread for thread in _threads_of(pool) if thread.is_alive()}
            if live <= arrived:
                then()
                return True
            now = time.monotonic()
            if arrived and first_arrival is None:
                first_arrival = now
            if first_arrival is not None and now - first_arrival >= hold:
                return False
            if any(future.done() for future in queued):
                # Ended before ``end``: cancelled (``shutdown(cancel_futures=True)``) or
                # failed unrun (a pool broken by a thread's initializer).
                raise _Refused
            while len(queued) < len(live):
                try:
                    queued.append(pool.submit(attempt.hold))
                except RuntimeError as refused:  # shut down, broken, interpreter exit
                    raise _Refused from refused
            with attempt.changed:
                if len(attempt.arrived) == len(arrived):
                    attempt.changed.wait(_POLL)
    finally:
        attempt.end()


_following = threading.local()
"""``save``: the :class:`_FollowedSave` whose ``save_checkpoint`` (training thread) or task
(the executor's thread) runs on this thread, if any."""


def _submit_followed(submit: Callable[..., Any], process_pool: bool) -> Callable[..., Any]:
    """``submit`` (an executor's), which hands what it queues to the :class:`_FollowedSave`
    that runs on the calling thread, if any."""

    def followed_submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        save: _FollowedSave | None = getattr(_following, "save", None)
        if save is None:
            return submit(fn, *args, **kwargs)
        if not process_pool:  # (a task it pickles)
            fn = save.task(fn)
        future = submit(fn, *args, **kwargs)
        save.queued(future)
        return future

    followed_submit.lamin_lightning_follows = True  # type: ignore[attr-defined]
    return followed_submit


class _InPlace:
    """An executor whose ``submit`` is followed in place: by how many saves not yet done,
    and what its ``__dict__`` held under ``submit`` before (the user's own, or nothing)."""

    __slots__ = ("key", "previous", "reference", "saves", "submit")

    def __init__(
        self, reference: weakref.ref[Any], previous: Any, submit: Callable[..., Any]
    ) -> None:
        self.key = id(reference())
        self.reference = reference
        self.previous = previous
        self.submit = submit
        self.saves = 1


_NOTHING = object()
_in_place_lock = threading.Lock()
_in_place: dict[int, _InPlace] = {}
"""The executors followed in place now, by ``id``: one that two saves follow at once (a
task of the first still runs during the second) has one ``submit`` of ours, which goes
once both are done."""


def _follow_submissions(executor: Executor) -> _InPlace | None:
    """Follow what ``executor`` queues until :func:`_unfollow_submissions` (once per call):
    its ``submit`` becomes one that hands each task queued by a followed save or its tasks
    to that save (any other goes as before; the executor stays the user's object, of the
    user's class). None if it cannot be set (an executor that takes no attribute)."""
    with _in_place_lock:
        in_place = _in_place.get(id(executor))
        if in_place is not None and in_place.reference() is executor:
            in_place.saves += 1
            own = vars(executor).get("submit", _NOTHING)
            if own is not in_place.submit:
                # The user's own ``submit``, set since: it is wrapped, and it comes back.
                in_place.previous = own
                in_place.submit = executor.submit = _wrapped_submit(executor, own)
            return in_place
        try:
            reference = weakref.ref(executor)
            own = vars(executor).get("submit", _NOTHING)
            submit = _wrapped_submit(executor, own)
            executor.submit = submit  # type: ignore[method-assign]
        except (AttributeError, TypeError):  # frozen, or no ``__dict__`` or weak reference
            return None
        in_place = _in_place[id(executor)] = _InPlace(reference, own, submit)
        return in_place


def _wrapped_submit(executor: Executor, own: Any) -> Callable[..., Any]:
    """The ``submit`` that follows ``executor``'s, ``own`` (an instance's) or its class's."""
    if getattr(own, "lamin_lightning_follows", False):
        return own  # type: ignore[no-any-return]  # a copy's: already follows
    if own is _NOTHING:
        # The class's method, called on a weak reference: the executor holds no cycle
        # through itself, and goes (its threads with it) as soon as its owner lets it go.
        reference = weakref.ref(executor)
        method = type(executor).submit

        def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            target = reference()
            if target is None:  # pragma: no cover - called through the executor itself
                raise RuntimeError("cannot schedule new futures after the executor was collected")
            return method(target, fn, *args, **kwargs)

        own = submit
    return _submit_followed(own, isinstance(executor, ProcessPoolExecutor))


def _unfollow_submissions(in_place: _InPlace) -> None:
    """One save that followed the executor in place is done: once none is, its ``submit``
    is what it was (none of its own, or the user's), unless the user set another since."""
    with _in_place_lock:
        in_place.saves -= 1
        if in_place.saves:
            return
        if _in_place.get(in_place.key) is in_place:
            del _in_place[in_place.key]
        executor = in_place.reference()
        if executor is None or vars(executor).get("submit") is not in_place.submit:
            return
        # An executor whose __setattr__ or __delattr__ raises keeps ours (it passes every
        # call through): the save's write must end all the same.
        with contextlib.suppress(Exception):
            if in_place.previous is _NOTHING:
                del executor.submit
            else:
                executor.submit = in_place.previous


def _forked() -> None:
    # In the child only. Another thread of the parent may have held the lock, and the
    # saves counted are the parent's: their tasks run on the parent's threads and never
    # end here, so the executors they follow are the user's as they were, at once.
    global _in_place_lock
    _in_place_lock = threading.Lock()
    for in_place in list(_in_place.values()):
        in_place.saves = 1
        _unfollow_submissions(in_place)
    _in_place.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)


class _FollowedExecutor:
    """Stands in for an executor of a subclass of ``AsyncCheckpointIO`` whose ``submit``
    cannot be followed in place, during one ``save_checkpoint``: what is queued through
    it is followed as through :func:`_follow_submissions`."""

    def __init__(self, executor: Any) -> None:
        self._executor = executor
        self.submit = _submit_followed(executor.submit, isinstance(executor, ProcessPoolExecutor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._executor, name)


class _WriteNotifier(CheckpointIO):
    """Inside ``AsyncCheckpointIO``: finishes each write on the thread that wrote it."""

    def __init__(self, checkpoint_io: CheckpointIO, tracker: WriteTracker) -> None:
        self.checkpoint_io = checkpoint_io
        self.tracker = tracker

    @override
    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        write = self.tracker.claim(_path_argument(args, kwargs))
        try:
            self.checkpoint_io.save_checkpoint(*args, **kwargs)
        except BaseException as error:
            self.tracker.finish(write, error)
            raise
        self.tracker.finish(write, None)

    @override
    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(*args, **kwargs)

    @override
    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.checkpoint_io.remove_checkpoint(*args, **kwargs)

    @override
    def teardown(self) -> None:
        self.checkpoint_io.teardown()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("checkpoint_io", "tracker"):
            raise AttributeError(name)
        return getattr(self.checkpoint_io, name)


def compose(strategy: Any) -> WriteTracker | None:
    """Follow the writes of ``strategy``'s CheckpointIO if it writes after returning.

    Returns the tracker (None for a CheckpointIO that writes before returning).
    Raises CheckpointIOError for one that writes later in a way we cannot follow.
    """
    io = strategy.checkpoint_io  # Lightning's property completes a wrapper's chain
    if isinstance(io, _TrackingCheckpointIO):
        return io.tracker  # validate -> fit, or a second callback of ours
    layers = list(_chain(io))
    for layer in layers:
        if not isinstance(layer, AsyncCheckpointIO) and _looks_asynchronous(layer):
            raise CheckpointIOError(_refusal(layer))
    asynchronous = [layer for layer in layers if isinstance(layer, AsyncCheckpointIO)]
    if not asynchronous:
        return None
    innermost = asynchronous[-1]
    writer = innermost.checkpoint_io
    if writer is None:  # pragma: no cover - the strategy's property always sets one
        return None
    tracker = WriteTracker()
    innermost._checkpoint_io = _WriteNotifier(writer, tracker)
    # Only the queue of a single AsyncCheckpointIO is followed: an outer one's task of a
    # chain of them ends before the inner one wrote.
    queue = asynchronous[0] if len(asynchronous) == 1 else None
    strategy.checkpoint_io = _TrackingCheckpointIO(io, tracker, queue)
    return tracker


def release(strategy: Any, tracker: WriteTracker | None) -> None:
    """Give ``strategy`` back the CheckpointIO :func:`compose` wrapped (if still wrapped)."""
    outer = getattr(strategy, "_checkpoint_io", None)
    if tracker is None or not isinstance(outer, _TrackingCheckpointIO):
        return
    if outer.tracker is not tracker:
        return
    original = outer.checkpoint_io
    if not tracker.unclaimed():
        # A write still queued (a save after Lightning's strategy teardown, in on_fit_end)
        # keeps the notifier that finishes it, or its name would stay taken for good.
        for layer in _chain(original):
            if isinstance(layer, AsyncCheckpointIO) and isinstance(
                layer.checkpoint_io, _WriteNotifier
            ):
                layer._checkpoint_io = layer.checkpoint_io.checkpoint_io
    strategy.checkpoint_io = original


def describe(io: Any) -> str:
    """The user's CheckpointIO chain as it was given (``AsyncCheckpointIO(YourIO)``), without
    the wrappers :func:`compose` puts around and inside an ``AsyncCheckpointIO``."""
    names = [
        type(layer).__name__
        for layer in _chain(io)
        if not isinstance(layer, _TrackingCheckpointIO | _WriteNotifier)
    ]
    return "(".join(names) + ")" * (len(names) - 1)


def _chain(io: Any) -> Iterator[Any]:
    """``io`` and every CheckpointIO it wraps, outermost first."""
    seen: set[int] = set()
    while io is not None and id(io) not in seen:
        seen.add(id(io))
        yield io
        inner = getattr(io, "checkpoint_io", None)
        io = inner if isinstance(inner, CheckpointIO) else None


def _looks_asynchronous(io: Any) -> bool:
    if getattr(io, SYNCHRONOUS_ATTRIBUTE, False):
        return False
    if "async" in type(io).__name__.lower():
        return True
    return any(hasattr(io, name) for name in _ASYNC_HINTS)


def _refusal(io: Any) -> str:
    name = f"{type(io).__module__}.{type(io).__qualname__}"
    return (
        f"the trainer's CheckpointIO {name} looks like it writes checkpoints in the"
        " background, and lamin-lightning cannot tell when such a write has finished:"
        " persisting a checkpoint before its writer finished would store a partial file."
        " lamin-lightning composes with Lightning's AsyncCheckpointIO: wrap a synchronous"
        " CheckpointIO in it instead (Trainer(plugins=[AsyncCheckpointIO(YourIO())])), or"
        " pass async_write=True to the callback. If"
        f" {type(io).__qualname__} writes before save_checkpoint returns, set"
        f" `{SYNCHRONOUS_ATTRIBUTE} = True` on it."
    )


def _path_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``path`` argument of ``save_checkpoint(checkpoint, path, storage_options=None)``."""
    if "path" in kwargs:
        return kwargs["path"]
    return args[1] if len(args) > 1 else None


def _normal(path: Any) -> str:
    return os.path.abspath(os.fspath(path)) if path is not None else ""


__all__ = ["SYNCHRONOUS_ATTRIBUTE", "WriteTracker", "compose", "describe", "release"]


_OWN_CODE = ("lightning.", "lightning_fabric.", "pytorch_lightning.", "lamin_lightning.")


def removes_as_lightning(strategy: Any) -> bool:
    """Whether removing a checkpoint runs only Lightning's own code (and our wrappers):
    the strategy's ``remove_checkpoint`` and that of every CheckpointIO in its chain.

    Only then may the callback move an evicted file aside before Lightning's removal
    (which finds nothing left to do). A user's strategy or CheckpointIO that overrides
    ``remove_checkpoint`` (to archive evicted checkpoints, say) must find the file, as it
    would with ``ModelCheckpoint``.
    """
    return all(
        _runs_own_code(owner, "remove_checkpoint")
        for owner in (strategy, *_chain(strategy.checkpoint_io))
    )


def rewrites_by_rename(strategy: Any) -> bool:
    """Whether saving a checkpoint file over an existing one replaces it by a rename,
    never writing into it: the strategy saves through its CheckpointIO (Lightning's
    ``Strategy.save_checkpoint``: single-device, DDP), every CheckpointIO in the chain is
    Lightning's own (or our wrapper), and the one that writes is
    ``TorchCheckpointIO``, whose ``_atomic_save`` writes a temporary file and renames it
    over the path (fsspec's transaction; a copy instead when the temporary folder is on
    another filesystem, see ``_staging.link_is_safe``).

    Only then may the file being rewritten keep its name meanwhile (a hard link aside):
    a writer that truncates the file in place would destroy the previous checkpoint
    under both names. Not under ``AsyncCheckpointIO`` either: a process killed before
    its late write leaves the previous checkpoint at the name of a save journaled as
    written later, which a replay would persist as that save; moved aside instead, the
    name is empty, and the put-back drops that save.
    """
    layers = list(_chain(strategy.checkpoint_io))
    if (
        not layers
        or _function(layers[-1], "save_checkpoint") is not TorchCheckpointIO.save_checkpoint
    ):
        return False
    if any(isinstance(layer, AsyncCheckpointIO) for layer in layers):
        return False
    if _function(strategy, "save_checkpoint") is not Strategy.save_checkpoint:
        return False  # FSDP, DeepSpeed, XLA: folders of shards, or a writer of their own
    return all(_runs_own_code(owner, "save_checkpoint") for owner in (strategy, *layers))


def _function(obj: Any, name: str) -> Any:
    """The function that ``obj.name`` runs: looked up on the object, as Lightning calls
    it, so that a method set on the instance (a mock that wraps it, say) counts, and an
    object whose class lacks it (a ``MagicMock(spec=...)``) raises nothing. A wrapper
    that says what it wraps (``functools.wraps``: a timer, a logger) is that function."""
    method = getattr(obj, name, None)
    if callable(method):
        with contextlib.suppress(ValueError):  # wrappers that wrap each other: the outermost
            method = inspect.unwrap(method)
    return getattr(method, "__func__", method)


def _runs_own_code(obj: Any, name: str) -> bool:
    """Whether ``obj.name`` is Lightning's (or our wrappers') code."""
    module = getattr(_function(obj, name), "__module__", None)
    return isinstance(module, str) and module.startswith(_OWN_CODE)
