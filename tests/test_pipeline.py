"""The pipeline on its own: PersistencePipeline + JobSpec, no Lightning.

Blocking is made deterministic with threading.Event gates inside the transfer
callables; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ctrl_c_right_after_entering, returns_on_another_thread, wait_until
from lamin_lightning import PermanentError, RetryPolicy, TransientError
from lamin_lightning._bridge import PersistencePipeline
from lamin_lightning._pipeline import JobSpec

TIMEOUT = 10.0


@dataclass
class Recorder:
    """Collects what the pipeline's callbacks saw, thread-safely."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    delivered: list[tuple[Any, ...]] = field(default_factory=list)
    deliver_threads: set[str] = field(default_factory=set)
    commit_threads: set[str] = field(default_factory=set)
    transfer_threads: set[str] = field(default_factory=set)
    transfers: dict[str, int] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)

    def deliver(self, event: tuple[Any, ...]) -> None:
        with self.lock:
            self.delivered.append(event)
            self.deliver_threads.add(threading.current_thread().name)

    def count(self) -> int:
        with self.lock:
            return len(self.delivered)

    def job(
        self,
        key: str,
        *,
        operation: str = "save",
        transfer: Callable[[], Any] | None = None,
        with_transfer: bool = True,
        commit: Callable[[Any], Any] | None = None,
        tag: str | None = None,
    ) -> JobSpec:
        """A job whose commit returns ("saved"|"removed", key) and whose fail returns
        ("failed", key, error type name, attempts)."""

        def do_transfer() -> Any:
            with self.lock:
                self.transfers[key] = self.transfers.get(key, 0) + 1
                self.transfer_threads.add(threading.current_thread().name)
            return transfer() if transfer is not None else key

        def do_commit(result: Any) -> Any:
            with self.lock:
                self.commits.append(key)
                self.commit_threads.add(threading.current_thread().name)
            if commit is not None:
                return commit(result)
            return ("saved" if operation == "save" else "removed", key)

        def do_fail(error: BaseException, attempts: int) -> Any:
            with self.lock:
                self.commit_threads.add(threading.current_thread().name)
            return ("failed", key, type(error).__name__, attempts)

        def do_discard() -> None:
            with self.lock:
                self.discarded.append(key)

        return JobSpec(
            operation=operation,  # type: ignore[arg-type]
            key=key,
            commit=do_commit,
            fail=do_fail,
            transfer=do_transfer if with_transfer else None,
            discard=do_discard,
            payload={"key": key, "tag": tag},
        )


@contextmanager
def running(
    *,
    max_workers: int = 2,
    max_pending: int = 16,
    attempts: int = 3,
    recorder: Recorder | None = None,
    deliver: Callable[[Any], None] | None = None,
    finalizer: Callable[[], None] | None = None,
    name: str = "test-pipe",
) -> Iterator[tuple[PersistencePipeline, Recorder]]:
    """A started pipeline with a no-delay retry policy; stopped on exit."""
    rec = recorder if recorder is not None else Recorder()
    pipe = PersistencePipeline(
        max_workers=max_workers,
        max_pending=max_pending,
        retry=RetryPolicy.no_delay(attempts),
        deliver=deliver if deliver is not None else rec.deliver,
        thread_finalizer=finalizer,
        name=name,
    )
    pipe.start()
    try:
        yield pipe, rec
    except BaseException:
        pipe.stop(timeout=0.1)  # a failing test must not wait for gates it never opened
        raise
    pipe.stop(timeout=TIMEOUT)


def admitted(pipe: PersistencePipeline, key: str, tag: str | None = None) -> bool:
    """Wait until the job ``key`` (with ``tag``) is admitted: submission hands jobs to an
    intake thread, so ``submit`` may return before the pipeline has seen the job. A job
    still being staged is listed by ``pending()`` too, but not admitted yet."""
    return wait_until(
        lambda: any(
            job.key == key and job.state != "staging" and (tag is None or job.payload["tag"] == tag)
            for job in pipe.pending()
        )
    )


def gate() -> tuple[threading.Event, threading.Event, Callable[[], str]]:
    """(started, release, transfer): the transfer sets ``started`` then waits for ``release``."""
    started, release = threading.Event(), threading.Event()

    def transfer() -> str:
        started.set()
        assert release.wait(TIMEOUT), "test gate never released"
        return "ok"

    return started, release, transfer


# -- ordering -----------------------------------------------------------------------------

OUTCOMES = ("ok", "flaky", "permanent", "exhausted", "no_transfer")


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    data=st.data(),
    outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=7),
)
def test_events_are_delivered_in_submission_order_whatever_the_completion_order(
    data: st.DataObject, outcomes: list[str]
) -> None:
    """Events arrive in submission order, once each, whatever order transfers finish in."""
    n = len(outcomes)
    with_transfer = [i for i, outcome in enumerate(outcomes) if outcome != "no_transfer"]
    order = data.draw(st.permutations(with_transfer), label="completion order")
    started = {i: threading.Event() for i in with_transfer}
    release = {i: threading.Event() for i in with_transfer}
    finished = {i: threading.Event() for i in with_transfer}
    completed: list[int] = []
    attempts_made = dict.fromkeys(with_transfer, 0)
    lock = threading.Lock()
    planned = {"ok": 1, "flaky": 2, "permanent": 1, "exhausted": 3}

    def transfer(i: int) -> Callable[[], Any]:
        def run() -> str:
            started[i].set()
            assert release[i].wait(TIMEOUT)
            with lock:
                attempts_made[i] += 1
                attempt = attempts_made[i]
                if attempt == planned[outcomes[i]]:
                    completed.append(i)
                    finished[i].set()
            if outcomes[i] == "permanent":
                raise PermanentError(f"job {i}")
            if outcomes[i] == "exhausted" or (outcomes[i] == "flaky" and attempt == 1):
                raise ConnectionError(f"job {i} attempt {attempt}")
            return f"result {i}"

        return run

    # One worker per job: every transfer starts at once and finishes exactly in `order`.
    with running(max_workers=n, max_pending=n, attempts=3) as (pipe, rec):
        for i, outcome in enumerate(outcomes):
            spec = rec.job(
                f"k{i}",
                operation="remove" if outcome == "no_transfer" else "save",
                transfer=transfer(i) if outcome != "no_transfer" else None,
                with_transfer=outcome != "no_transfer",
            )
            pipe.submit(spec)
        for i in with_transfer:
            assert started[i].wait(TIMEOUT)
        for i in order:
            release[i].set()
            assert finished[i].wait(TIMEOUT)
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert completed == list(order)
    expected: list[tuple[Any, ...]] = []
    for i, outcome in enumerate(outcomes):
        if outcome in ("ok", "flaky"):
            expected.append(("saved", f"k{i}"))
        elif outcome == "no_transfer":
            expected.append(("removed", f"k{i}"))
        elif outcome == "permanent":
            expected.append(("failed", f"k{i}", "PermanentError", 1))
        else:
            expected.append(("failed", f"k{i}", "ConnectionError", 3))
    assert rec.delivered == expected
    assert rec.deliver_threads == {"test-pipe-delivery"}
    assert stats.submitted == n
    assert stats.finished == n
    assert stats.failed == sum(o in ("permanent", "exhausted") for o in outcomes)
    assert stats.retried == sum({"flaky": 1, "exhausted": 2}.get(o, 0) for o in outcomes)


# -- bounds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["training", "teardown"])
def test_admission_blocks_beyond_max_pending_and_the_wait_is_counted_as_stall(
    training: bool,
) -> None:
    """A submission beyond max_pending blocks until a job finishes, and the wait is counted
    as training stall; not once training has ended (teardown admitting what an interrupt
    kept out), where it counted too."""
    gates = [gate() for _ in range(3)]
    with running(max_workers=2, max_pending=2) as (pipe, rec):
        pipe.submit(rec.job("a", transfer=gates[0][2]), training=training)
        pipe.submit(rec.job("b", transfer=gates[1][2]), training=training)
        assert gates[0][0].wait(TIMEOUT) and gates[1][0].wait(TIMEOUT)
        assert pipe.stats.admission_waits == 0

        returned = threading.Event()

        def submit_third() -> None:
            pipe.submit(rec.job("c", transfer=gates[2][2]), training=training)
            returned.set()

        submitter = threading.Thread(target=submit_third)
        submitter.start()
        assert wait_until(lambda: pipe.stats.admission_waits == 1)
        # Blocked: not admitted, its transfer not started, nothing else moved.
        assert not returned.is_set()
        assert not gates[2][0].is_set()
        assert pipe.stats.submitted == 2
        assert pipe.stats.pending == 2
        assert [job.key for job in pipe.pending()] == ["a", "b"]

        gates[0][1].set()  # "a" finishes, freeing one slot
        assert returned.wait(TIMEOUT)
        submitter.join(TIMEOUT)
        assert gates[2][0].wait(TIMEOUT)
        gates[1][1].set()
        gates[2][1].set()
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert rec.delivered == [("saved", "a"), ("saved", "b"), ("saved", "c")]
    assert stats.admission_waits == 1
    if not training:
        assert stats.training_stall_seconds == stats.max_training_stall_seconds == 0
        return
    assert stats.training_stall_seconds > 0
    assert stats.max_training_stall_seconds > 0
    assert stats.max_training_stall_seconds <= stats.training_stall_seconds


def test_never_more_than_max_pending_jobs_outstanding() -> None:
    """Over a long run, admitted-and-unfinished jobs never exceed max_pending and reach it."""
    n, max_pending = 12, 3
    releases = [threading.Event() for _ in range(n)]
    lock = threading.Lock()
    returned = 0
    gaps: list[int] = []
    pending_seen: list[int] = []

    with running(max_workers=2, max_pending=max_pending) as (pipe, rec):

        def transfer(i: int) -> Callable[[], str]:
            def run() -> str:
                pending_seen.append(pipe.stats.pending)
                assert releases[i].wait(TIMEOUT)
                return "ok"

            return run

        def submitter() -> None:
            nonlocal returned
            for i in range(n):
                pipe.submit(rec.job(f"k{i}", transfer=transfer(i)))
                with lock:
                    returned = i + 1
                    # (admitted so far) - (delivered so far) bounds the outstanding jobs below.
                    gaps.append(returned - rec.count())

        thread = threading.Thread(target=submitter)
        thread.start()
        assert wait_until(lambda: returned == max_pending and pipe.stats.admission_waits == 1)
        for i in range(n):
            releases[i].set()
            assert wait_until(lambda i=i: rec.count() == i + 1)
            assert wait_until(lambda i=i: returned == min(n, max_pending + i + 1))
        thread.join(TIMEOUT)
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert max(gaps) == max_pending
    assert max(pending_seen) <= max_pending
    assert stats.admission_waits == n - max_pending
    assert rec.delivered == [("saved", f"k{i}") for i in range(n)]


def test_never_more_than_max_workers_transfers_at_once() -> None:
    """At most max_workers transfers run at the same time, and that many do."""
    n, max_workers = 9, 3
    releases = [threading.Event() for _ in range(n)]
    lock = threading.Lock()
    running_now = 0
    max_running = 0
    started = 0
    in_flight_seen: list[int] = []

    with running(max_workers=max_workers, max_pending=n) as (pipe, rec):

        def transfer(i: int) -> Callable[[], str]:
            def run() -> str:
                nonlocal running_now, max_running, started
                with lock:
                    running_now += 1
                    started += 1
                    max_running = max(max_running, running_now)
                in_flight_seen.append(pipe.stats.in_flight)
                try:
                    assert releases[i].wait(TIMEOUT)
                finally:
                    with lock:
                        running_now -= 1
                return "ok"

            return run

        for i in range(n):
            pipe.submit(rec.job(f"k{i}", transfer=transfer(i)))
        assert wait_until(lambda: started == max_workers)
        for i in range(n):
            releases[i].set()
            # Each release lets exactly one more transfer start (until none are left).
            assert wait_until(lambda i=i: started == min(n, max_workers + i + 1))
            assert running_now <= max_workers
        assert pipe.flush(TIMEOUT)

    assert max_running == max_workers
    assert max(in_flight_seen) <= max_workers
    assert rec.transfer_threads <= {f"test-pipe-worker-{i}" for i in range(max_workers)}


# -- retries and failures --------------------------------------------------------------------


def test_transient_failures_are_retried_then_succeed() -> None:
    """A transfer failing twice with a transient error is retried and saved once."""
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError(f"attempt {calls}")
        return "ok"

    with running(attempts=3) as (pipe, rec):
        pipe.submit(rec.job("k", transfer=flaky))
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert calls == 3
    assert rec.delivered == [("saved", "k")]
    assert stats.retried == 2
    assert (stats.saved, stats.failed) == (1, 0)


def test_transient_commit_failures_are_retried() -> None:
    """A commit failing transiently is retried on the committer and its event delivered once."""
    calls = 0

    def commit(result: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientError("database is locked")
        return ("saved", "k")

    with running() as (pipe, rec):
        pipe.submit(rec.job("k", commit=commit))
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert calls == 2
    assert rec.delivered == [("saved", "k")]
    assert rec.transfers == {"k": 1}
    assert stats.retried == 1


def test_after_delivery_runs_on_the_committer_once_the_event_was_delivered() -> None:
    """A removal's deletion (``after_delivery``) runs after its event was delivered, on
    the committer thread, retried like a commit, before a flush returns; failing for good
    it delivers the job's failed event after the first, and the job counts as failed."""
    rec = Recorder()
    seen: list[tuple[int, str]] = []  # (events delivered by then, thread)
    calls = {"ok": 0, "bad": 0}

    def after(name: str, fails: int) -> Callable[[], None]:
        def run() -> None:
            calls[name] += 1
            seen.append((rec.count(), threading.current_thread().name))
            if calls[name] <= fails:
                raise TransientError("database is locked")

        return run

    with running(recorder=rec, attempts=2) as (pipe, _):
        ok = dataclasses.replace(
            rec.job("ok", operation="remove", with_transfer=False), after_delivery=after("ok", 1)
        )
        bad = dataclasses.replace(
            rec.job("bad", operation="remove", with_transfer=False), after_delivery=after("bad", 9)
        )
        pipe.submit(ok)
        pipe.submit(bad)
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert calls == {"ok": 2, "bad": 2}
    assert [count for count, _ in seen] == [1, 1, 2, 2]  # each after its own event
    assert {thread for _, thread in seen} == rec.commit_threads
    assert rec.delivered == [
        ("removed", "ok"),
        ("removed", "bad"),
        ("failed", "bad", "TransientError", 2),
    ]
    assert (stats.removed, stats.failed, stats.retried) == (1, 1, 2)


def test_exhausted_retries_emit_a_failed_event_in_its_slot_and_later_jobs_continue() -> None:
    """A job that exhausts its retries yields its failed event in order; later jobs still run."""

    def broken() -> str:
        raise ConnectionError("storage down")

    with running(attempts=3) as (pipe, rec):
        pipe.submit(rec.job("a"))
        pipe.submit(rec.job("b", transfer=broken))
        pipe.submit(rec.job("c"))
        pipe.submit(rec.job("d", operation="remove", with_transfer=False))
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert rec.delivered == [
        ("saved", "a"),
        ("failed", "b", "ConnectionError", 3),
        ("saved", "c"),
        ("removed", "d"),
    ]
    assert rec.transfers["b"] == 3
    assert "b" not in rec.commits
    assert (stats.saved, stats.removed, stats.failed, stats.retried) == (2, 1, 1, 2)


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("rejected"),
        ValueError("bad value"),
        TypeError("bad type"),
        FileNotFoundError("gone"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_are_not_retried(error: BaseException) -> None:
    """Permanent errors fail at once: one attempt, no retry, a failed event."""

    def fails() -> str:
        raise error

    with running(attempts=5) as (pipe, rec):
        pipe.submit(rec.job("k", transfer=fails))
        pipe.submit(rec.job("after"))
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert rec.transfers["k"] == 1
    assert rec.delivered == [("failed", "k", type(error).__name__, 1), ("saved", "after")]
    assert stats.retried == 0
    assert stats.failed == 1


# -- cancellation and supersession ----------------------------------------------------------


def test_removal_cancels_an_unstarted_save_of_the_same_key() -> None:
    """A removal arriving before its save started cancels it: no transfer, staged file discarded."""
    started, release, blocker = gate()
    with running(max_workers=1) as (pipe, rec):
        pipe.submit(rec.job("busy", transfer=blocker))
        assert started.wait(TIMEOUT)  # the only worker is taken: the next save stays queued
        pipe.submit(rec.job("k"))
        pipe.submit(rec.job("k", operation="remove", with_transfer=False, tag="remove"))
        assert admitted(pipe, "k", "remove")
        release.set()
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert "k" not in rec.transfers
    assert rec.discarded == ["k"]
    assert rec.delivered == [("saved", "busy"), ("removed", "k")]
    assert stats.cancelled == 1
    assert stats.superseded == 0
    assert stats.finished == stats.submitted == 3


def test_removal_of_a_save_in_flight_waits_for_it() -> None:
    """A removal arriving while its save transfers is not a cancellation: save, then removal."""
    started, release, transfer = gate()
    with running(max_workers=1) as (pipe, rec):
        pipe.submit(rec.job("k", transfer=transfer))
        assert started.wait(TIMEOUT)
        pipe.submit(rec.job("k", operation="remove", with_transfer=False))
        release.set()
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert rec.delivered == [("saved", "k"), ("removed", "k")]
    assert rec.discarded == []
    assert stats.cancelled == 0


def test_newer_save_supersedes_an_unstarted_older_save() -> None:
    """A newer save of a key replaces an older one that has not started; only the newer runs."""
    started, release, blocker = gate()
    versions: list[str] = []
    with running(max_workers=1) as (pipe, rec):
        pipe.submit(rec.job("busy", transfer=blocker))
        assert started.wait(TIMEOUT)
        pipe.submit(rec.job("last", transfer=lambda: versions.append("v1") or "v1", tag="v1"))
        pipe.submit(rec.job("last", transfer=lambda: versions.append("v2") or "v2", tag="v2"))
        assert admitted(pipe, "last", "v2")
        release.set()
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert versions == ["v2"]
    assert rec.discarded == ["last"]
    assert rec.delivered == [("saved", "busy"), ("saved", "last")]
    assert stats.superseded == 1
    assert stats.cancelled == 0
    assert stats.saved == 2


def test_transfers_of_one_key_never_overtake_each_other() -> None:
    """A newer save of a key whose older save is uploading waits for it, even with idle workers."""
    started, release, first = gate()
    other_done = threading.Event()
    order: list[str] = []
    with running(max_workers=3) as (pipe, rec):
        pipe.submit(rec.job("last", transfer=lambda: (first() and order.append("v1")) or "v1"))
        assert started.wait(TIMEOUT)
        pipe.submit(rec.job("last", transfer=lambda: order.append("v2") or "v2", tag="v2"))
        pipe.submit(rec.job("other", transfer=lambda: other_done.set() or "other"))
        # "other" was admitted after v2 and has already been uploaded by a free worker;
        # v2 still waits for v1 instead of racing it.
        assert other_done.wait(TIMEOUT)
        assert ("last", "queued") in {(job.key, job.state) for job in pipe.pending()}
        assert order == []
        release.set()
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert order == ["v1", "v2"]
    assert rec.delivered == [("saved", "last"), ("saved", "last"), ("saved", "other")]
    assert stats.superseded == 0


def test_a_save_superseded_while_waiting_for_its_key_keeps_the_order() -> None:
    """v1 uploading, v2 waiting behind it, v3 supersedes v2: v3 still waits for v1."""
    started, release, first = gate()
    order: list[str] = []
    with running(max_workers=3) as (pipe, rec):
        pipe.submit(rec.job("last", transfer=lambda: (first() and order.append("v1")) or "v1"))
        assert started.wait(TIMEOUT)
        pipe.submit(rec.job("last", transfer=lambda: order.append("v2") or "v2", tag="v2"))
        pipe.submit(rec.job("last", transfer=lambda: order.append("v3") or "v3", tag="v3"))
        assert admitted(pipe, "last", "v3")
        assert wait_until(lambda: pipe.stats.superseded == 1)
        assert order == []
        release.set()
        assert pipe.flush(TIMEOUT)

    assert order == ["v1", "v3"]
    assert rec.discarded == ["last"]


# -- flush, stop and reporting ----------------------------------------------------------------


def test_flush_that_times_out_returns_false_and_pending_names_the_keys() -> None:
    """flush(timeout) returns False while a job hangs, and pending() names it and its state."""
    started, release, transfer = gate()
    with running(max_workers=1) as (pipe, rec):
        pipe.submit(rec.job("stuck.ckpt", transfer=transfer))
        pipe.submit(rec.job("queued.ckpt"))
        assert started.wait(TIMEOUT)
        assert admitted(pipe, "queued.ckpt")
        assert pipe.flush(timeout=0.05) is False
        pending = pipe.pending()
        assert [(p.key, p.state) for p in pending] == [
            ("stuck.ckpt", "transferring"),
            ("queued.ckpt", "queued"),
        ]
        assert pending[0].payload == {"key": "stuck.ckpt", "tag": None}
        release.set()
        assert pipe.flush(TIMEOUT) is True
        assert pipe.pending() == []


def test_jobs_still_being_staged_are_named_by_pending_flush_and_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job whose preparation (staging) has not finished is pending and named on timeout."""
    entered, release = threading.Event(), threading.Event()

    def slow_prepare() -> int:
        entered.set()
        assert release.wait(TIMEOUT)
        return 42

    rec = Recorder()
    pipe = PersistencePipeline(
        max_workers=1, max_pending=4, retry=RetryPolicy.no_delay(), deliver=rec.deliver
    )
    pipe.start()
    try:
        spec = rec.job("staging.ckpt")
        pipe.submit(
            JobSpec(
                operation="save",
                key=spec.key,
                commit=spec.commit,
                fail=spec.fail,
                transfer=spec.transfer,
                prepare=slow_prepare,
                payload=spec.payload,
            )
        )
        assert entered.wait(TIMEOUT)
        assert [(job.key, job.state) for job in pipe.pending()] == [("staging.ckpt", "staging")]
        assert pipe.flush(timeout=0.05) is False
        release.set()
        assert pipe.flush(TIMEOUT) is True
        assert pipe.pending() == []
        assert pipe.stats.bytes_saved == 42

        release.clear()
        entered.clear()
        pipe.submit(
            JobSpec(
                operation="save",
                key="stuck-in-staging.ckpt",
                commit=spec.commit,
                fail=spec.fail,
                transfer=spec.transfer,
                prepare=slow_prepare,
            )
        )
        assert entered.wait(TIMEOUT)
        intake = pipe._intake_thread
        assert intake is not None
        with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
            assert pipe.stop(timeout=0.05) is False
    finally:
        release.set()
    assert "stuck-in-staging.ckpt" in caplog.text
    assert rec.delivered == [("saved", "staging.ckpt")]
    # Its staging ends after the stop: no traceback ("This portal is not running") for it.
    with caplog.at_level(logging.INFO, logger="lamin_lightning"):
        intake.join(TIMEOUT)
    assert not intake.is_alive()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "'stuck-in-staging.ckpt' was not admitted: persistence stopped" in caplog.text


def test_stop_that_times_out_logs_the_unpersisted_keys(caplog: pytest.LogCaptureFixture) -> None:
    """stop(timeout) on a hanging job returns False and its warning names the key."""
    started, release, transfer = gate()
    rec = Recorder()
    pipe = PersistencePipeline(
        max_workers=1,
        max_pending=4,
        retry=RetryPolicy.no_delay(),
        deliver=rec.deliver,
        name="stop-pipe",
    )
    pipe.start()
    try:
        pipe.submit(rec.job("hanging.ckpt", transfer=transfer))
        assert started.wait(TIMEOUT)
        with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
            assert pipe.stop(timeout=0.05) is False
    finally:
        release.set()
    assert not pipe.running
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("hanging.ckpt" in r.getMessage() for r in warnings), caplog.text
    assert rec.delivered == []  # abandoned, not delivered


@pytest.mark.parametrize("training", [True, False], ids=["training", "teardown"])
def test_a_long_wait_for_a_slot_is_told_naming_the_jobs_ahead(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, training: bool
) -> None:
    """Storage that hangs raises nothing and retries nothing: training, waiting for a
    free slot, is told after SLOT_WAIT_WARNING_S why it waits, with the job ahead. At
    teardown (admitting the saves an interrupt kept out), the message says that it is the
    flush that waits: it told a stopped training that it "goes on once one finishes"."""
    said = "training has waited" if training else "the flush at the end of the fit has waited"
    import lamin_lightning._bridge as bridge

    monkeypatch.setattr(bridge, "SLOT_WAIT_WARNING_S", 0.2)
    started, release, transfer = gate()
    with (
        caplog.at_level(logging.WARNING, logger="lamin_lightning"),
        running(max_workers=1, max_pending=1) as (pipe, rec),
    ):
        pipe.submit(rec.job("hanging.ckpt", transfer=transfer))
        assert started.wait(TIMEOUT)
        waiter = threading.Thread(
            target=pipe.submit, args=(rec.job("next.ckpt"),), kwargs={"training": training}
        )
        waiter.start()

        def told() -> bool:
            return any(r.getMessage().startswith(said) for r in caplog.records)

        assert wait_until(told), caplog.text
        release.set()
        waiter.join(TIMEOUT)
        assert not waiter.is_alive()
        assert pipe.flush(TIMEOUT)
    told_ = [r.getMessage() for r in caplog.records if r.getMessage().startswith(said)]
    message = told_[0]  # the first (a slow machine may add one more before the release)
    assert "save 'hanging.ckpt' (transferring)" in message and "max_pending=1" in message
    assert ("Training goes on" in message) is training
    assert rec.delivered == [("saved", "hanging.ckpt"), ("saved", "next.ckpt")]


def test_a_raising_deliver_callback_is_isolated_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in the deliver callback is logged; later events are still delivered."""
    rec = Recorder()

    def deliver(event: tuple[Any, ...]) -> None:
        if event[1] == "b":
            raise RuntimeError("observer exploded")
        rec.deliver(event)

    with (
        caplog.at_level(logging.ERROR, logger="lamin_lightning"),
        running(recorder=rec, deliver=deliver) as (pipe, _),
    ):
        for key in ("a", "b", "c"):
            pipe.submit(rec.job(key))
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert rec.delivered == [("saved", "a"), ("saved", "c")]
    assert stats.saved == 3
    assert "observer exploded" in caplog.text
    assert "deliver hook failed" in caplog.text


def test_raising_fail_and_discard_hooks_are_isolated_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exceptions in a job's fail or discard hook are logged and do not stop the pipeline."""
    started, release, blocker = gate()

    def broken_fail(error: BaseException, attempts: int) -> Any:
        raise RuntimeError("fail hook exploded")

    def broken_discard() -> None:
        raise RuntimeError("discard hook exploded")

    def permanent() -> str:
        raise PermanentError("nope")

    with (
        caplog.at_level(logging.ERROR, logger="lamin_lightning"),
        running(max_workers=1) as (
            pipe,
            rec,
        ),
    ):
        pipe.submit(rec.job("busy", transfer=blocker))
        assert started.wait(TIMEOUT)
        pipe.submit(
            JobSpec(
                operation="save",
                key="f",
                commit=lambda r: None,
                fail=broken_fail,
                transfer=permanent,
            )
        )
        pipe.submit(
            JobSpec(
                operation="save",
                key="x",
                commit=lambda r: ("saved", "x"),
                fail=lambda e, a: None,
                transfer=lambda: "x",
                discard=broken_discard,
            )
        )
        pipe.submit(rec.job("x", operation="remove", with_transfer=False))
        pipe.submit(rec.job("after"))
        assert admitted(pipe, "after")
        release.set()
        assert pipe.flush(TIMEOUT)
        stats = pipe.stats

    assert rec.delivered == [("saved", "busy"), ("removed", "x"), ("saved", "after")]
    assert stats.failed == 1
    assert stats.cancelled == 1
    assert "fail hook exploded" in caplog.text
    assert "discard hook exploded" in caplog.text


# -- threads --------------------------------------------------------------------------------


def test_commit_and_delivery_each_run_on_one_dedicated_thread_and_finalizers_run() -> None:
    """Commits run on the committer, deliveries on the delivery thread; finalizers on every lane."""
    finalized: list[str] = []
    lock = threading.Lock()

    def finalizer() -> None:
        with lock:
            finalized.append(threading.current_thread().name)

    with running(max_workers=3, finalizer=finalizer, name="thr") as (pipe, rec):
        for i in range(12):
            pipe.submit(rec.job(f"k{i}"))
        pipe.submit(rec.job("k0", operation="remove", with_transfer=False))
        assert pipe.flush(TIMEOUT)
        threads = pipe.threads
        names = {t.name for t in threads}

    assert names == {
        "thr-worker-0",
        "thr-worker-1",
        "thr-worker-2",
        "thr-committer",
        "thr-delivery",
    }
    assert rec.commit_threads == {"thr-committer"}
    assert rec.deliver_threads == {"thr-delivery"}
    assert rec.transfer_threads <= {"thr-worker-0", "thr-worker-1", "thr-worker-2"}
    assert sorted(finalized) == sorted(names)
    assert not any(t.is_alive() for t in threads)


def test_pipeline_restarts_after_stop_and_rejects_bad_bounds() -> None:
    """A stopped pipeline can start again; submit before start and bad bounds raise clearly."""
    rec = Recorder()
    pipe = PersistencePipeline(
        max_workers=1, max_pending=1, retry=RetryPolicy.no_delay(), deliver=rec.deliver
    )
    with pytest.raises(RuntimeError, match="not running"):
        pipe.submit(rec.job("early"))
    assert pipe.flush(0) is True  # nothing to wait for
    for round_ in range(2):
        pipe.start()
        pipe.start()  # idempotent
        pipe.submit(rec.job(f"r{round_}"))
        assert pipe.stop(timeout=TIMEOUT) is True
    assert rec.delivered == [("saved", "r0"), ("saved", "r1")]
    with pytest.raises(ValueError, match="max_workers"):
        PersistencePipeline(max_workers=0, max_pending=1, retry=RetryPolicy(), deliver=print)
    with pytest.raises(ValueError, match="max_pending"):
        PersistencePipeline(max_workers=1, max_pending=0, retry=RetryPolicy(), deliver=print)


def test_held_jobs_reach_the_intake_on_release_in_submission_order() -> None:
    """hold(): submitted jobs are admitted and counted but not handed to the intake thread
    (which stages them) until release(); then they run in submission order."""
    prepared: list[str] = []

    def preparing(spec: JobSpec) -> JobSpec:
        def prepare() -> int:
            prepared.append(spec.key)
            return 0

        return dataclasses.replace(spec, prepare=prepare)

    with running() as (pipe, rec):
        pipe.hold()
        for key in ("a", "b", "c"):
            assert pipe.submit(preparing(rec.job(key)))
        assert pipe._intake.empty() and prepared == []
        assert pipe.stats.submitted == 3 and [j.key for j in pipe.pending()] == ["a", "b", "c"]
        pipe.release()
        assert pipe.flush(TIMEOUT)
    assert prepared == ["a", "b", "c"]
    assert rec.delivered == [("saved", "a"), ("saved", "b"), ("saved", "c")]


def test_a_wait_for_a_slot_hands_the_held_jobs_over_first() -> None:
    """max_pending=1: the first job is held and holds the only slot; the second submission
    waits for a slot, so it releases the first (else it would wait forever)."""
    with running(max_pending=1) as (pipe, rec):
        pipe.hold()
        assert pipe.submit(rec.job("first"))
        assert pipe.submit(rec.job("second"), timeout=TIMEOUT)
        pipe.release()
        assert pipe.flush(TIMEOUT)
    assert rec.delivered == [("saved", "first"), ("saved", "second")]


def test_a_stopped_pipeline_leaves_no_stream_open_to_warn_when_collected() -> None:
    """Every stream of the event loop is closed at stop: an open one warns when collected
    (``ResourceWarning: Unclosed <MemoryObjectSendStream>``), which fails a user's tests
    run with warnings as errors. ``ModelCheckpoint`` leaves nothing to warn about."""
    rec = Recorder()
    pipe = PersistencePipeline(
        max_workers=2, max_pending=4, retry=RetryPolicy.no_delay(), deliver=rec.deliver
    )
    pipe.start()
    pipe.submit(rec.job("k"))
    assert pipe.stop(timeout=TIMEOUT) is True
    assert rec.delivered == [("saved", "k")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pipe
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []


def test_ctrl_c_during_the_flush_of_stop_ends_it_while_storage_hangs() -> None:
    """A ``KeyboardInterrupt`` that cuts ``stop``'s flush short (Ctrl+C at a teardown)
    stops the loop and its threads at once and goes on: the loop used to be joined with
    its jobs still running, and the process hung for as long as storage did."""
    entered, hung = threading.Event(), threading.Event()

    def hang() -> str:
        entered.set()
        hung.wait(TIMEOUT)
        return "late"

    rec = Recorder()
    pipe = PersistencePipeline(
        max_workers=1, max_pending=4, retry=RetryPolicy.no_delay(), deliver=rec.deliver
    )
    pipe.start()
    raised: list[BaseException] = []
    try:
        pipe.submit(rec.job("hung.ckpt", transfer=hang))
        assert entered.wait(TIMEOUT)

        def interrupted(timeout: float | None = None) -> bool:
            raise KeyboardInterrupt

        pipe.flush = interrupted  # type: ignore[method-assign]

        def stop() -> None:
            try:
                pipe.stop(timeout=None)
            except BaseException as error:
                raised.append(error)

        stopping = threading.Thread(target=stop)
        stopping.start()
        stopping.join(TIMEOUT / 2)
        assert not stopping.is_alive(), "stop hung on storage after Ctrl+C"
    finally:
        hung.set()
    assert [type(error) for error in raised] == [KeyboardInterrupt]
    assert pipe.pending() == []


def test_finished_is_called_once_per_job_in_every_final_state() -> None:
    """``JobSpec.finished`` (what another callback's job of the key waits for) is called
    once a job is delivered, failed, superseded or cancelled, and only then."""
    started, release, blocker = gate()
    finished: list[str] = []

    def tracked(spec: JobSpec, name: str) -> JobSpec:
        return dataclasses.replace(spec, finished=lambda: finished.append(name))

    def refused() -> Any:
        raise PermanentError("nope")

    with running(max_workers=1) as (pipe, rec):
        pipe.submit(tracked(rec.job("busy", transfer=blocker), "busy"))
        assert started.wait(TIMEOUT)
        pipe.submit(tracked(rec.job("last", tag="v1"), "superseded"))
        pipe.submit(tracked(rec.job("last", tag="v2"), "saved"))
        pipe.submit(tracked(rec.job("gone"), "cancelled"))
        pipe.submit(tracked(rec.job("gone", operation="remove", with_transfer=False), "removal"))
        pipe.submit(tracked(rec.job("bad", transfer=refused), "failed"))
        assert admitted(pipe, "bad", None)
        assert "busy" not in finished and "saved" not in finished
        release.set()
        assert pipe.flush(TIMEOUT)

    assert sorted(finished) == sorted(
        ["busy", "superseded", "saved", "cancelled", "removal", "failed"]
    )
    assert finished.index("busy") < finished.index("saved") < finished.index("failed")


@pytest.mark.parametrize("operation", ["save", "remove"])
def test_a_job_not_ready_waits_without_a_worker_or_the_committer(operation: str) -> None:
    """``JobSpec.ready`` (another callback's earlier job of the key not finished): the
    job's transfer, or a removal's commit, waits for it without holding the only worker
    or the committer, so the jobs behind it go on (a job holding the worker while it
    waited could close a cycle between two callbacks' pipelines)."""
    may_start = threading.Event()
    with running(max_workers=1) as (pipe, rec):
        waiting = rec.job("waiting", operation=operation, with_transfer=operation == "save")
        pipe.submit(dataclasses.replace(waiting, ready=may_start.is_set))
        pipe.submit(rec.job("behind"))
        assert wait_until(lambda: rec.transfers.get("behind") == 1)
        assert "waiting" not in rec.transfers and rec.commits == []
        may_start.set()
        assert pipe.flush(TIMEOUT)

    done = "saved" if operation == "save" else "removed"
    assert rec.delivered == [(done, "waiting"), ("saved", "behind")]


def test_ctrl_c_right_as_the_training_thread_takes_the_intake_lock_leaves_it_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl+C lands right after ``threading.Condition.__enter__`` (Python code) took the
    intake's lock on the training thread (a submission, a flush's wait, a look for
    escalated errors), before the ``with`` block: the block never ran, so its exit never
    released the lock, and the intake thread and every later flush hung for good (a
    Ctrl+C sweep over save hooks and teardown). The lock is now taken as a plain lock."""
    with running() as (pipe, _):
        ctrl_c_right_after_entering(monkeypatch, pipe._intake_cond, pipe.take_escalated)
        assert returns_on_another_thread(pipe.take_escalated), "the intake's lock stayed taken"
