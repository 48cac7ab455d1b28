"""The one place where synchronous code and the pipeline's event loop meet.

- :class:`PersistencePipeline` is the synchronous facade the callback uses: it
  runs :class:`~lamin_lightning._pipeline.AsyncPipeline` on an anyio event loop
  in a thread of its own (a blocking portal) and forwards calls to it.
  Submission never waits for the event loop: the submitter takes a slot from a
  thread semaphore (waiting only when ``max_pending`` jobs are outstanding) and
  puts the job on an intake queue; an intake thread hands jobs to the loop in
  order. A portal round trip costs tens of milliseconds when background threads
  hold the GIL, and the training thread must not pay it.
- :class:`ThreadLane` is a dedicated thread the event loop hands blocking calls
  to. The pipeline owns its lanes, so it knows every thread that touched the
  storage backend and can run a finalizer on each (closing Django connections,
  say) when it stops.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
import anyio.from_thread
from anyio.from_thread import BlockingPortal

from lamin_lightning._pipeline import AsyncPipeline, JobSpec, PendingJob
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._stats import PersistenceStats, StatsRecorder

log = logging.getLogger("lamin_lightning")

T = TypeVar("T")

SLOT_WAIT_WARNING_S = 30.0
"""After this long waiting for a free slot (``max_pending`` jobs outstanding), training is
told why it waits, then again each time the wait has doubled."""

SLOW_DELIVERY_S = 1.0
"""An event that has been with the hooks and observers this long is named when training
or a flush is told why it waits: a hook or observer that does not return holds up every
later job (their events are delivered one at a time, in order)."""


class _Outcome:
    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


class ThreadLane:
    """A dedicated thread that runs blocking calls one at a time for the event loop."""

    def __init__(
        self, name: str, portal: BlockingPortal, finalizer: Callable[[], None] | None
    ) -> None:
        self._portal = portal
        self._finalizer = finalizer
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], anyio.Event, _Outcome] | None] = (
            queue.SimpleQueue()
        )
        # Daemon: a storage call that hangs forever must not keep the process alive.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The lane's thread."""
        return self._thread

    def _main(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                fn, done, outcome = item
                try:
                    outcome.value = fn()
                except BaseException as error:
                    outcome.error = error
                # Non-blocking hand-back; fails fast once the loop is gone.
                with contextlib.suppress(RuntimeError):
                    self._portal.start_task_soon(_set_event, done)
                # Hold nothing while waiting: a result can name the trainer, and a callback
                # dropped without teardown must be collectable (its threads stop then).
                del item, fn, done, outcome
        finally:
            if self._finalizer is not None:
                try:
                    self._finalizer()
                except Exception:
                    log.exception("thread finalizer failed on %s", self._thread.name)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this lane's thread and return its result (or raise its error)."""
        done = anyio.Event()
        outcome = _Outcome()
        self._queue.put((fn, done, outcome))
        # If this await is cancelled the call still finishes on the lane; its result is dropped.
        await done.wait()
        if outcome.error is not None:
            raise outcome.error
        return outcome.value  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Ask the thread to finish its queue, run the finalizer and exit."""
        self._queue.put(None)


async def _set_event(event: anyio.Event) -> None:
    event.set()


class PersistencePipeline:
    """Synchronous facade of the bounded, ordered persistence pipeline.

    Args:
        max_workers: Transfers that may run at once.
        max_pending: Jobs that may be admitted and unfinished at once; a
            submission beyond blocks until a job finishes.
        retry: Retry policy for transfers and commits.
        deliver: Called with each event, in submission order, on the delivery thread.
        thread_finalizer: Called on every pipeline-owned thread as it exits.
        stats: Where to count; pass one recorder to several pipelines to accumulate.
        name: Prefix of the thread names.
    """

    def __init__(
        self,
        *,
        max_workers: int,
        max_pending: int,
        retry: RetryPolicy,
        deliver: Callable[[Any], None],
        thread_finalizer: Callable[[], None] | None = None,
        stats: StatsRecorder | None = None,
        name: str = "lamin-lightning",
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._max_workers = max_workers
        self._max_pending = max_pending
        self._retry = retry
        self._deliver = deliver
        self._thread_finalizer = thread_finalizer
        self._name = name
        self._stats = stats if stats is not None else StatsRecorder()
        self._portal_cm: contextlib.AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._core: AsyncPipeline | None = None
        self._run_future: Future[None] | None = None
        self._lanes: list[ThreadLane] = []
        self._delivery: ThreadLane | None = None
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_pending)
        self._intake: queue.SimpleQueue[tuple[JobSpec, float] | None] = queue.SimpleQueue()
        self._intake_thread: threading.Thread | None = None
        self._closing = False  # stop() began: the intake may find the event loop gone
        # Taken as ``with self._intake_lock`` (the lock's own __enter__), never through
        # Condition.__enter__ (Python code): a Ctrl+C right after that took the lock, before
        # the block, left it held, and the intake and every flush hung for good.
        self._intake_lock = threading.RLock()
        self._intake_cond = threading.Condition(self._intake_lock)
        self._submitted = 0
        self._admitted = 0
        # Submitted, not yet admitted (being staged), in submission order; read and popped
        # on the event loop so that pending() sees each job exactly once.
        self._waiting: collections.deque[JobSpec] = collections.deque()
        self._escalated: list[BaseException] = []
        # Submitted while held (see hold): not yet handed to the intake thread.
        self._held: list[tuple[JobSpec, float]] | None = None
        self._held_lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether the pipeline is started and not stopped."""
        return self._core is not None

    @property
    def stats(self) -> PersistenceStats:
        """A frozen snapshot of the counters."""
        return self._stats.snapshot()

    @property
    def threads(self) -> list[threading.Thread]:
        """Threads this pipeline owns (workers, committer, delivery)."""
        return [lane.thread for lane in self._lanes]

    def still_working(self) -> list[threading.Thread]:
        """After :meth:`stop`: the threads still running a job (a transfer or a commit stuck
        in storage, a write stuck on disk); they end when it returns. Not the delivery
        thread (a user's observer), which touches neither storage nor the folder."""
        threads = [lane.thread for lane in self._lanes if lane is not self._delivery]
        if self._intake_thread is not None:
            threads.append(self._intake_thread)
        return [thread for thread in threads if thread.is_alive()]

    def start(self) -> None:
        """Start the event loop and the threads. Idempotent."""
        with self._lock:
            if self._core is not None:
                return
            self._closing = False
            with self._intake_lock:
                self._waiting.clear()  # jobs a previous run abandoned before admission
            self._portal_cm = anyio.from_thread.start_blocking_portal(name=f"{self._name}-loop")
            portal = self._portal_cm.__enter__()
            self._portal = portal
            started: list[ThreadLane] = []

            def lane(role: str) -> ThreadLane:
                started.append(ThreadLane(f"{self._name}-{role}", portal, self._thread_finalizer))
                return started[-1]

            try:
                workers = [lane(f"worker-{i}") for i in range(self._max_workers)]
                committer, deliverer = lane("committer"), lane("delivery")
            except BaseException as error:
                # Out of threads (a process limit): what started stops, the loop closes.
                for one in started:
                    one.stop()
                with contextlib.suppress(Exception):
                    self._portal_cm.__exit__(None, None, None)
                self._portal = self._portal_cm = None
                if isinstance(error, RuntimeError):
                    raise RuntimeError(
                        f"could not start the persistence pipeline's {self._max_workers + 2}"
                        f" threads ({error}); lower max_workers"
                    ) from error
                raise
            self._lanes = [*workers, committer, deliverer]
            self._delivery = deliverer
            core = AsyncPipeline(
                release_slot=self._slots.release,
                retry=self._retry,
                deliver=self._deliver,
                workers=workers,
                committer=committer,
                deliverer=deliverer,
                stats=self._stats,
                escalate=self._escalate,
            )
            self._run_future, _ = portal.start_task(core.run, name=f"{self._name}-core")
            self._core = core
            self._intake_thread = threading.Thread(
                target=self._intake_main,
                args=(portal, core),
                name=f"{self._name}-intake",
                daemon=True,
            )
            self._intake_thread.start()

    def _require(self) -> tuple[BlockingPortal, AsyncPipeline]:
        if self._portal is None or self._core is None:
            raise RuntimeError("the persistence pipeline is not running; call start() first")
        return self._portal, self._core

    def _intake_main(self, portal: BlockingPortal, core: AsyncPipeline) -> None:
        while (item := self._intake.get()) is not None:
            spec, submitted_at = item
            size: int | None = None
            error: BaseException | None = None
            if spec.prepare is not None:
                try:
                    size = spec.prepare()
                except BaseException as prepare_error:  # this thread must keep going
                    # The file's background write, its staging, or a removal's deletion.
                    what = "write or stage" if spec.operation == "save" else "remove"
                    log.error("could not %s %r: %s", what, spec.key, prepare_error)
                    error = prepare_error
            try:
                portal.call(self._admit, core, spec, submitted_at, size, error)
            except BaseException:
                if self._closing:  # stopped while it was staged (a Ctrl+C, a timeout)
                    log.info("%r was not admitted: persistence stopped", spec.key)
                else:
                    log.exception("could not admit the job for %r", spec.key)
            with self._intake_lock:
                self._admitted += 1
                self._intake_cond.notify_all()
            del item, spec, error  # hold nothing while waiting (see ThreadLane._main)

    async def _admit(
        self,
        core: AsyncPipeline,
        spec: JobSpec,
        submitted_at: float,
        size: int | None,
        error: BaseException | None,
    ) -> int:
        try:
            return await core.admit(spec, submitted_at, size, error)
        finally:
            with self._intake_lock:
                self._waiting.popleft()

    def _pending_now(self, core: AsyncPipeline) -> list[PendingJob]:
        with self._intake_lock:
            waiting = list(self._waiting)
        staging = [PendingJob(-1, s.operation, s.key, "staging", s.payload) for s in waiting]
        return [*core.pending(), *staging]

    def submit(
        self,
        spec: JobSpec,
        timeout: float | None = None,
        *,
        stop_waiting: Callable[[], BaseException | None] | None = None,
        training: bool = True,
    ) -> bool:
        """Hand a job to the pipeline; block only while ``max_pending`` jobs are outstanding
        (never for a job admitted beyond the limit: ``JobSpec.beyond_limit``).

        The time spent blocked is counted as training stall (unless ``training`` is False:
        a submission once training has ended, at teardown). Returns False, without
        submitting, if no slot freed within ``timeout`` seconds. Raises RuntimeError if
        the pipeline stopped meanwhile (a slot would never free). ``stop_waiting`` is
        asked a few times a second while blocked: an exception it returns is raised
        (a SIGTERM the trainer received ends the wait so the process can exit).
        """
        self._require()
        started = time.monotonic()
        if not spec.beyond_limit and not self._slots.acquire(blocking=False):
            self.release()  # a held job must reach the intake to ever free a slot
            self._stats.add(admission_waits=1)
            try:
                acquired = self._wait_for_slot(started, timeout, stop_waiting, training)
            finally:
                waited = time.monotonic() - started if training else 0.0
                self._stats.add(training_stall_seconds=waited)
                self._stats.record_max("max_training_stall_seconds", waited)
            if not acquired:
                return False
            started = time.monotonic()  # counted above
        submitted_at = time.monotonic()
        waited = submitted_at - started if training else 0.0
        self._stats.add(training_stall_seconds=waited, submitted=1, pending=1)
        self._stats.record_max("max_training_stall_seconds", waited)
        with self._intake_lock:
            self._submitted += 1
            self._waiting.append(spec)
        with self._held_lock:
            if self._held is not None:
                self._held.append((spec, submitted_at))
                return True
        self._intake.put((spec, submitted_at))
        return True

    def hold(self) -> None:
        """Keep jobs submitted from now on from the intake thread until :meth:`release`.

        Lightning's save hook submits a save and the removal it causes, one after the
        other: waking the pipeline's threads at the first would have them compete with
        the rest of the hook for the GIL. Held jobs are admitted, journaled and counted
        as pending as usual; whatever waits for the pipeline (a free slot, a flush)
        releases them first, so a hold never blocks progress.
        """
        with self._held_lock:
            if self._held is None:
                self._held = []

    def release(self) -> None:
        """Hand the held jobs to the intake thread, in submission order; stop holding."""
        with self._held_lock:
            held, self._held = self._held, None
        for item in held or ():
            self._intake.put(item)

    def _wait_for_slot(
        self,
        started: float,
        timeout: float | None,
        stop_waiting: Callable[[], BaseException | None] | None,
        training: bool = True,
    ) -> bool:
        deadline = None if timeout is None else started + timeout
        step = 1.0 if stop_waiting is None else 0.2
        warn_after = SLOT_WAIT_WARNING_S
        while True:
            wait = step if deadline is None else min(step, deadline - time.monotonic())
            if wait > 0 and self._slots.acquire(timeout=wait):
                return True
            waited = time.monotonic() - started
            if waited >= warn_after:
                # Storage that hangs (no error, so no retry to report) would otherwise
                # stop training without a word.
                warn_after = 2 * waited
                self._warn_slow_slots(waited, training)
            reason = stop_waiting() if stop_waiting is not None else None
            if reason is not None:
                raise reason
            run = self._run_future
            if self._core is None or (run is not None and run.done()):
                # The loop is gone: no job will ever finish and free a slot.
                raise RuntimeError("the persistence pipeline stopped; the job was not submitted")
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _warn_slow_slots(self, waited: float, training: bool = True) -> None:
        try:
            ahead = [job for job in self.pending() if job.state != "staging"]
        except Exception:  # the loop stopping: the caller's next check says so
            ahead = []
        named = ", ".join(f"{job.operation} {job.key!r} ({job.state})" for job in ahead[:3])
        more = f" and {len(ahead) - 3} more" if len(ahead) > 3 else ""
        stuck = self.stuck_delivery()
        cause = (
            "storage or the database may be slow or unreachable"
            if stuck is None
            else stuck[0].upper() + stuck[1:]
        )
        if training:
            who = "training has waited"
            then = (
                " Training goes on once one finishes; a larger max_pending lets it run"
                " further ahead."
            )
        else:  # teardown admits the saves an interrupt kept out: training is over
            who = "the flush at the end of the fit has waited"
            then = " The saves still to admit follow once one finishes (up to flush_timeout)."
        log.warning(
            "%s %.0f s for the persistence of earlier checkpoints"
            " (max_pending=%d jobs outstanding: %s%s); %s.%s",
            who,
            waited,
            self._max_pending,
            named or "none admitted yet",
            more,
            cause,
            then,
        )

    def stuck_delivery(self) -> str | None:
        """Says which event the hooks and observers have held for :data:`SLOW_DELIVERY_S`
        or more (a hook or observer that blocks holds up every later job); else None."""
        core = self._core
        delivering = core.delivering if core is not None else None
        if delivering is None:
            return None
        key, since = delivering
        held = time.monotonic() - since
        if held < SLOW_DELIVERY_S:
            return None
        return (
            f"the event of {key!r} has been with the on_artifact_* hooks and artifact"
            f" observers for {held:.0f} s: every later job waits for them (events are"
            " delivered one at a time, in order); a hook or observer must return, and hand"
            " slow work to a thread of its own"
        )

    def _escalate(self, error: BaseException) -> None:
        with self._intake_lock:
            self._escalated.append(error)

    def has_escalated(self) -> bool:
        """Whether errors wait for :meth:`take_escalated` (a read without the lock)."""
        return bool(self._escalated)

    def take_escalated(self) -> list[BaseException]:
        """Errors (SystemExit, ...) raised by hooks on pipeline threads, to re-raise on the
        caller's thread; each is returned once. No event-loop round trip."""
        with self._intake_lock:
            taken, self._escalated = self._escalated, []
        return taken

    def _wait_intake(self, timeout: float | None) -> bool:
        with self._intake_lock:
            target = self._submitted
            return self._intake_cond.wait_for(lambda: self._admitted >= target, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every admitted job finished; False if ``timeout`` seconds passed first.

        Raises ``RuntimeError`` on one of the pipeline's own threads (an artifact hook or
        observer calling ``flush``): it would wait for itself, and training with it.
        """
        if self._core is None or self._portal is None:
            return True
        current = threading.current_thread()
        if current is self._intake_thread or any(lane.thread is current for lane in self._lanes):
            raise RuntimeError(
                f"flush() was called on the persistence pipeline's thread {current.name!r}"
                " (from an artifact hook or observer, which run there): it would wait for"
                " itself. Call flush() from the training thread, for example in a Lightning"
                " callback hook, or from your own thread."
            )
        self.release()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait_intake(timeout):
            return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._portal.call(self._core.wait_idle, remaining)

    def pending(self) -> list[PendingJob]:
        """Jobs submitted and not finished, in submission order.

        Jobs still being staged (not admitted yet) come last, with state ``"staging"``
        and ``seq`` -1.
        """
        if self._core is None or self._portal is None:
            return []
        return self._portal.call(self._pending_now, self._core)

    def stop(self, timeout: float | None = None) -> bool:
        """Flush (up to ``timeout``), then stop the loop and the threads.

        Returns whether everything was flushed. Jobs not finished by then are
        abandoned; a transfer stuck in storage keeps its (daemon) thread until it returns.
        """
        with self._lock:
            if self._core is None or self._portal is None:
                return True
            self._closing = True
            flushed = closed = False
            try:
                flushed = self.flush(timeout)
                if not flushed:
                    jobs = self._portal.call(self._pending_now, self._core)
                    log.warning(
                        "persistence stopped %s; abandoned here (the outbox keeps them): %s",
                        f"after {timeout}s" if timeout else "before it finished",
                        ", ".join(f"{job.operation} {job.key}" for job in jobs),
                    )
                self._portal.call(self._core.close)
                closed = True
                if self._run_future is not None:
                    with contextlib.suppress(Exception):
                        self._run_future.result(timeout=5)
            finally:
                assert self._portal_cm is not None
                if not closed:
                    # Cut short (Ctrl+C during the flush): the core still runs its jobs,
                    # and leaving the portal would wait for them, on storage that may hang.
                    with contextlib.suppress(Exception):
                        self._portal.call(self._core.close)
                with contextlib.suppress(Exception):
                    self._portal_cm.__exit__(None, None, None)
                self._intake.put(None)
                if self._intake_thread is not None:
                    self._intake_thread.join(timeout=2)
                for lane in self._lanes:
                    lane.stop()
                for lane in self._lanes:
                    lane.thread.join(timeout=2 if flushed else 0.2)
                self._core = None
                self._portal = None
                self._portal_cm = None
                self._run_future = None
            return flushed
