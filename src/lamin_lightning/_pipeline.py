"""The asynchronous core of the persistence pipeline.

Knows nothing of Lightning or LaminDB: it runs jobs made of plain callables.
Every method here runs on the pipeline's event-loop thread, so the job
bookkeeping needs no locks; blocking work is handed to executors (dedicated
threads, see ``_bridge``).

A job goes through three stages:

1. *transfer* (``JobSpec.transfer``), on one of ``max_workers`` worker threads,
   concurrently and in any order, retried;
2. *commit* (``JobSpec.commit``), on the single committer thread, strictly in
   submission order, retried;
3. *delivery* of the event the commit returned, on the single delivery thread,
   in submission order.

A job whose transfer or commit fails for good gets ``JobSpec.fail`` called in
its commit slot instead, so its failed event keeps its place in the stream.

No exception from a job or a hook stops the pipeline, ``BaseException`` included
(a ``SystemExit`` raised by user code in a hook, a test framework's failure): the job
fails in its slot, the hook's error is logged, and a non-``Exception`` error is kept
for the owner to re-raise on its own thread (the ``escalate`` callback).
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from lamin_lightning._errors import AttemptsExhausted, error_text
from lamin_lightning._retry import RetryPolicy, call_with_retries
from lamin_lightning._stats import StatsRecorder

log = logging.getLogger("lamin_lightning")

T = TypeVar("T")

Operation = Literal["save", "remove"]


class Executor(Protocol):
    """Runs a blocking callable on a thread of its own and awaits the result."""

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the executor's thread; raise what it raised."""
        ...


@dataclass(frozen=True)
class JobSpec:
    """What to do for one file. Immutable: it crosses threads.

    Attributes:
        operation: ``"save"`` uploads a file, ``"remove"`` deletes what a save stored.
        key: The logical key; used for cancellation, supersession and reporting.
        commit: Called on the committer thread in submission order with the
            transfer's result (None for a job without transfer). Returns the
            event to deliver, or None for no event.
        fail: Called on the committer thread, in the job's slot, with the last
            error and the number of attempts, when the job failed for good.
            Returns the event to deliver.
        transfer: Called on a worker thread; its result is passed to ``commit``.
        discard: Called on the committer thread when the job was cancelled or
            superseded before its transfer started (to clean up staged files).
        abandon: Called on the committer thread with the transfer's result when the
            transfer worked but the job then failed for good (to delete what the
            transfer created, so no uncommitted artifact is left behind).
        size_bytes: Size of the file, for the byte counters.
        prepare: Called on the pipeline's intake thread before the job is admitted
            (staging the file); returns the file's size in bytes, which then replaces
            ``size_bytes``. If it raises, the job fails at once, in its slot.
        payload: Anything the submitter wants to find again (for example in
            :meth:`AsyncPipeline.pending`); the pipeline does not look at it.
        after_delivery: Called on the committer thread once the commit's event was
            delivered (retried like a commit): a removal deletes here what its event
            names, so that observers are told while the artifact still exists, as the
            reference tells them before it deletes. If it fails for good, ``fail`` is
            called and its event delivered too.
        before_delivery: Called on the committer thread once every earlier job's event
            was delivered, before this job's (retried like a commit): a save deletes
            here the older artifacts of its key, so that the earlier saves' observers
            find theirs, and this one's find only its own, as the reference orders it.
            If it fails for good it is logged, and the event delivered all the same.
        beyond_limit: Admitted beyond ``max_pending``, without waiting for a slot or
            taking one: a replay, whose file has been on disk since the run that
            journaled it (the limit bounds what training adds), so that ``setup``
            queues a long outbox at once and training starts.
        ready: Asked (on the event-loop thread, a few times a second) until it returns
            True before the job's transfer takes a worker, or, for a job without a
            transfer, before its commit: the job waits for something outside this
            pipeline (another callback's job of its key) without holding a worker or the
            committer's thread. Must not block.
        finished: Called on the event-loop thread once the job reached its final state
            (delivered, failed, cancelled or superseded); not for a job a stop abandons.
            Must not block.
        supersedable: A save that a newer save (or a removal) of its key drops while it
            has not started (``last.ckpt``: only the newest file counts). False for a
            key whose every save is a version of its own (the deprecated ``Callback``
            saves one version per epoch under one key): each is transferred, in order.
    """

    operation: Operation
    key: str
    commit: Callable[[Any], Any]
    fail: Callable[[BaseException, int], Any]
    transfer: Callable[[], Any] | None = None
    discard: Callable[[], None] | None = None
    abandon: Callable[[Any], None] | None = None
    size_bytes: int = 0
    prepare: Callable[[], int] | None = None
    payload: Any = None
    after_delivery: Callable[[], None] | None = None
    before_delivery: Callable[[], None] | None = None
    beyond_limit: bool = False
    supersedable: bool = True
    ready: Callable[[], bool] | None = None
    finished: Callable[[], None] | None = None


# How often a job waiting for something outside its pipeline asks again (JobSpec.ready).
READY_POLL_S = 0.05


class JobState(enum.Enum):
    """Where a job is in its life; changed only on the event-loop thread."""

    QUEUED = "queued"
    TRANSFERRING = "transferring"
    TRANSFERRED = "transferred"
    # A job committed (persisted, finished in the outbox) whose event is not delivered yet:
    # a save, or a removal done at its commit (none deletes after its event's delivery).
    COMMITTED = "committed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


class _Job:
    __slots__ = (
        "admitted_at",
        "after",
        "attempts",
        "error",
        "result",
        "seq",
        "size",
        "spec",
        "state",
        "transferred",
    )

    def __init__(self, seq: int, spec: JobSpec, admitted_at: float) -> None:
        self.seq = seq
        self.spec = spec
        self.admitted_at = admitted_at
        self.size = spec.size_bytes
        self.state = JobState.QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.attempts = 0
        self.transferred = anyio.Event()
        # The previous job with a transfer for the same key: ours starts after it ended.
        self.after: _Job | None = None


@dataclass(frozen=True)
class PendingJob:
    """A job submitted and not yet finished, as reported by a flush that timed out."""

    seq: int
    operation: Operation
    key: str
    state: str
    payload: Any


class AsyncPipeline:
    """Bounded, ordered, retrying job runner. Use it through ``_bridge.PersistencePipeline``."""

    def __init__(
        self,
        *,
        release_slot: Callable[[], None],
        retry: RetryPolicy,
        deliver: Callable[[Any], None],
        workers: Sequence[Executor],
        committer: Executor,
        deliverer: Executor,
        stats: StatsRecorder,
        escalate: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._escalate_fn = escalate
        self._retry = retry
        self._deliver_fn = deliver
        self._workers = list(workers)
        self._committer = committer
        self._deliverer = deliverer
        self._stats = stats
        self._release_slot = release_slot
        self._next_seq = 0
        self._outstanding: dict[int, _Job] = {}
        self._queued_saves: dict[str, _Job] = {}
        # Per key, the last admitted job with a transfer: transfers of one key run one at
        # a time, in submission order, so the last submitted bytes are the last written.
        self._last_transfer: dict[str, _Job] = {}
        self._idle = anyio.Event()
        self._idle.set()
        self._closed = False
        self._cancel_scope: anyio.CancelScope | None = None
        self._worker_send: MemoryObjectSendStream[Executor]
        self._worker_recv: MemoryObjectReceiveStream[Executor]
        self._commit_send: MemoryObjectSendStream[_Job]
        self._commit_recv: MemoryObjectReceiveStream[_Job]
        self._deliver_send: MemoryObjectSendStream[tuple[_Job, Any]]
        self._deliver_recv: MemoryObjectReceiveStream[tuple[_Job, Any]]
        self._task_group: anyio.abc.TaskGroup | None = None
        # The key whose event the hooks and observers have now, and since when (monotonic).
        self.delivering: tuple[str, float] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the committer and delivery loops until :meth:`close`."""
        self._worker_send, self._worker_recv = anyio.create_memory_object_stream[Executor](
            len(self._workers)
        )
        for worker in self._workers:
            self._worker_send.send_nowait(worker)
        self._commit_send, self._commit_recv = anyio.create_memory_object_stream[_Job](math.inf)
        self._deliver_send, self._deliver_recv = anyio.create_memory_object_stream[
            tuple[_Job, Any]
        ](math.inf)
        try:
            with anyio.CancelScope() as scope:
                self._cancel_scope = scope
                async with anyio.create_task_group() as tg:
                    self._task_group = tg
                    tg.start_soon(self._commit_loop)
                    tg.start_soon(self._deliver_loop)
                    task_status.started()
                    await anyio.sleep_forever()
        finally:
            # Every task has ended: close the streams, or each one left open warns when
            # collected (a ResourceWarning that fails a user's warnings-as-errors tests).
            self._closed = True
            for stream in (
                self._worker_send,
                self._worker_recv,
                self._commit_send,
                self._commit_recv,
                self._deliver_send,
                self._deliver_recv,
            ):
                stream.close()

    async def close(self) -> None:
        """Stop everything now; jobs still outstanding are abandoned (not delivered)."""
        self._closed = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    # -- admission ---------------------------------------------------------------

    async def admit(
        self,
        spec: JobSpec,
        submitted_at: float,
        size: int | None = None,
        error: BaseException | None = None,
    ) -> int:
        """Admit a job whose slot the submitter already holds; return its sequence number.

        ``submitted_at`` is the ``time.monotonic()`` of the submission; latencies count
        from it. ``size`` and ``error`` are the outcome of ``spec.prepare``: a job whose
        preparation failed goes straight to its failed event.
        """
        if self._closed:
            if not spec.beyond_limit:
                self._release_slot()
            self._stats.add(pending=-1)
            raise RuntimeError("the persistence pipeline is stopped; no new jobs are accepted")
        previous = None
        if spec.operation == "remove" or spec.supersedable:
            previous = self._queued_saves.pop(spec.key, None)
        if previous is not None:
            state = JobState.CANCELLED if spec.operation == "remove" else JobState.SUPERSEDED
            self._drop(previous, state)

        seq = self._next_seq
        self._next_seq += 1
        job = _Job(seq, spec, submitted_at)
        if size is not None:
            job.size = size
        self._outstanding[seq] = job
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._commit_send.send_nowait(job)
        assert self._task_group is not None
        if error is not None:
            job.error, job.attempts = error, 1
            job.state = JobState.TRANSFERRED
            job.transferred.set()
        elif spec.transfer is None:
            job.state = JobState.TRANSFERRED
            job.transferred.set()
        else:
            if spec.operation == "save" and spec.supersedable:
                self._queued_saves[spec.key] = job
            job.after = self._last_transfer.get(spec.key)
            self._last_transfer[spec.key] = job
            self._task_group.start_soon(self._transfer, job)
        return seq

    def _drop(self, job: _Job, state: JobState) -> None:
        """Cancel or supersede a job whose transfer has not started."""
        job.state = state
        job.transferred.set()
        if self._last_transfer.get(job.spec.key) is job:
            # Whoever comes next for this key waits for what this job waited for.
            if job.after is None:
                del self._last_transfer[job.spec.key]
            else:
                self._last_transfer[job.spec.key] = job.after
        counter = "cancelled" if state is JobState.CANCELLED else "superseded"
        self._stats.add(**{counter: 1})
        log.debug("%s save of %r (job %d)", counter, job.spec.key, job.seq)
        self._finish(job)

    def _finish(self, job: _Job) -> None:
        if self._outstanding.pop(job.seq, None) is None:
            return
        if self._last_transfer.get(job.spec.key) is job:
            del self._last_transfer[job.spec.key]
        if not job.spec.beyond_limit:
            self._release_slot()
        self._stats.add(pending=-1)
        if job.spec.finished is not None:
            try:
                job.spec.finished()
            except Exception:
                log.exception("telling that the job of %r finished", job.spec.key)
        if not self._outstanding:
            self._idle.set()

    # -- the three stages ----------------------------------------------------------

    def _on_retry(self, job: _Job, error: BaseException, attempt: int) -> None:
        self._stats.add(retried=1)
        log.warning(
            "persisting %r failed on attempt %d (%s: %s); retrying",
            job.spec.key,
            attempt,
            type(error).__name__,
            error,
        )

    async def _until_ready(self, job: _Job) -> None:
        """Wait for ``JobSpec.ready``, polling, without a worker (see there); a job
        cancelled or superseded meanwhile stops waiting."""
        ready = job.spec.ready
        if ready is None:
            return
        while job.state is JobState.QUEUED or job.spec.transfer is None:
            try:
                if ready():
                    return
            except Exception:
                log.exception("asking whether the job of %r may start", job.spec.key)
                return
            await anyio.sleep(READY_POLL_S)

    async def _transfer(self, job: _Job) -> None:
        transfer = job.spec.transfer
        assert transfer is not None
        if job.after is not None:
            # An earlier transfer of the same key is queued or running: never overtake it
            # (a store would keep whichever write finished last). Wait without a worker;
            # meanwhile this job can still be cancelled or superseded.
            await job.after.transferred.wait()
            job.after = None
        await self._until_ready(job)
        worker = await self._worker_recv.receive()
        try:
            if job.state is not JobState.QUEUED:
                return  # cancelled or superseded while waiting for a worker
            if self._queued_saves.get(job.spec.key) is job:
                del self._queued_saves[job.spec.key]
            job.state = JobState.TRANSFERRING
            self._stats.add(in_flight=1)
            try:
                job.result = await call_with_retries(
                    self._retry, partial(worker.run, transfer), partial(self._on_retry, job)
                )
            except AttemptsExhausted as exhausted:
                job.error, job.attempts = exhausted.error, exhausted.attempts
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as unexpected:
                # Anything else fails this job, never the pipeline (a job left with neither
                # a result nor an error would pass for one whose hook persisted nothing).
                job.error, job.attempts = unexpected, max(job.attempts, 1)
            finally:
                self._stats.add(in_flight=-1)
            if job.error is not None:
                self._escalate(job.error)
            job.state = JobState.TRANSFERRED
        finally:
            self._worker_send.send_nowait(worker)
            job.transferred.set()

    async def _commit_loop(self) -> None:
        async for job in self._commit_recv:
            await self._commit(job)
            # Hold nothing while waiting for the next job: a job's event names its trainer,
            # and a callback dropped without teardown must be collectable (and its
            # threads stopped then).
            del job

    async def _commit(self, job: _Job) -> None:
        await job.transferred.wait()
        spec = job.spec
        if job.state in (JobState.CANCELLED, JobState.SUPERSEDED):
            if spec.discard is not None:
                await self._guarded(self._committer, spec.discard, "discard", spec.key)
            return
        event: Any = None
        if spec.transfer is None:
            await self._until_ready(job)
        if job.error is None:
            try:
                event = await self._committed(job, partial(spec.commit, job.result))
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException:
                if spec.abandon is not None and job.result is not None:
                    # The transfer created something the commit never finished:
                    # delete it, or it would linger beside the key's real artifact.
                    await self._guarded(
                        self._committer, partial(spec.abandon, job.result), "abandon", spec.key
                    )
        if job.error is not None:
            event = await self._failed(job)
        elif spec.after_delivery is None and spec.before_delivery is None:
            # A LaminDB removal deletes after delivery, a save what it replaced before
            # its delivery: done only then.
            job.state = JobState.COMMITTED
        self._deliver_send.send_nowait((job, event))

    async def _committed(self, job: _Job, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the committer thread with retries; a failure for good is kept in
        ``job.error`` (and escalated) before it is raised."""
        try:
            return await call_with_retries(
                self._retry, partial(self._committer.run, fn), partial(self._on_retry, job)
            )
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as failed:
            exhausted = (
                failed
                if isinstance(failed, AttemptsExhausted)
                else AttemptsExhausted(failed, max(job.attempts, 1))
            )
            job.error, job.attempts = exhausted.error, exhausted.attempts
            self._escalate(exhausted.error)
            raise

    async def _failed(self, job: _Job) -> Any:
        """Report ``job.error``; the failure event to deliver (or None)."""
        assert job.error is not None
        log.error(
            "persisting %r failed after %d attempt(s): %s: %s",
            job.spec.key,
            job.attempts,
            type(job.error).__name__,
            error_text(job.error),
        )
        return await self._guarded(
            self._committer,
            partial(job.spec.fail, job.error, job.attempts),
            "fail",
            job.spec.key,
        )

    async def _deliver_loop(self) -> None:
        async for job, event in self._deliver_recv:
            await self._deliver_one(job, event)
            del job, event  # hold nothing while waiting (see _commit_loop)

    async def _deliver_one(self, job: _Job, event: Any) -> None:
        if job.error is None and job.spec.before_delivery is not None:
            try:
                await call_with_retries(
                    self._retry,
                    partial(self._committer.run, job.spec.before_delivery),
                    partial(self._on_retry, job),
                )
                job.state = JobState.COMMITTED
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as failed:
                error = failed.error if isinstance(failed, AttemptsExhausted) else failed
                log.warning(
                    "lamin-lightning: %r is persisted, but what it replaced could not be"
                    " cleaned up (%s: %s); it stays in the outbox, for the next setup or"
                    " `lamin-lightning flush`",
                    job.spec.key,
                    type(error).__name__,
                    error_text(error),
                )
                self._escalate(error)
        if event is not None:
            self.delivering = (job.spec.key, time.monotonic())
            try:
                await self._guarded(
                    self._deliverer, partial(self._deliver_fn, event), "deliver", ""
                )
            finally:
                self.delivering = None
        if job.error is None and job.spec.after_delivery is not None:
            try:
                await self._committed(job, job.spec.after_delivery)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException:
                failure = await self._failed(job)
                if failure is not None:
                    await self._guarded(
                        self._deliverer, partial(self._deliver_fn, failure), "deliver", ""
                    )
        latency = time.monotonic() - job.admitted_at
        if job.error is not None:
            self._stats.add(failed=1, persistence_latency_seconds=latency)
        elif job.spec.operation == "save":
            self._stats.add(saved=1, bytes_saved=job.size, persistence_latency_seconds=latency)
        else:
            self._stats.add(removed=1, persistence_latency_seconds=latency)
        self._stats.record_max("max_persistence_latency_seconds", latency)
        self._finish(job)

    async def _guarded(
        self, executor: Executor, fn: Callable[[], T], what: str, key: str
    ) -> T | None:
        """Run a hook that must not stop the pipeline; log what it raises (BaseException too)."""
        try:
            return await executor.run(fn)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:
            log.error(
                "lamin-lightning %s hook failed%s",
                what,
                f" for {key!r}" if key else "",
                exc_info=error,
            )
            self._escalate(error)
            return None

    def _escalate(self, error: BaseException) -> None:
        """Hand a non-``Exception`` error (SystemExit, KeyboardInterrupt) to the owner."""
        if not isinstance(error, Exception) and self._escalate_fn is not None:
            self._escalate_fn(error)

    # -- waiting and reporting -------------------------------------------------------

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every admitted job finished; False if ``timeout`` passed first."""
        with anyio.move_on_after(timeout):
            while self._outstanding:
                await self._idle.wait()
            return True
        return False

    def pending(self) -> list[PendingJob]:
        """Jobs admitted and not finished, in submission order."""
        return [
            PendingJob(j.seq, j.spec.operation, j.spec.key, j.state.value, j.spec.payload)
            for j in sorted(self._outstanding.values(), key=lambda j: j.seq)
        ]
