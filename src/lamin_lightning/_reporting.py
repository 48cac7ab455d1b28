"""The reporting layer of the generic callback: outcomes, failures, shutdown.

:class:`ReportingCheckpoint` records what each job's outcome means for training
(what this process persisted under a key, failures still to report), raises or warns
them on the training thread according to ``on_error`` (re-raising a ``BaseException``
a hook or observer raised on a pipeline thread), and shuts the pipeline down at
``teardown`` or after an exception: flush within ``flush_timeout``, then stop.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lamin_lightning._errors import PersistenceError, error_text, replaced_note, shell_word
from lamin_lightning._events import (
    ArtifactFailedEvent,
)
from lamin_lightning._pipeline import PendingJob
from lamin_lightning._submission import SubmittingCheckpoint

log = logging.getLogger("lamin_lightning")

# How long a save that is to raise failures (on_error="raise") waits for their events to
# reach the hooks and observers first (one of them may ask to stop, with SystemExit: that
# is raised instead). Delivery follows the failure at once, unless a hook or observer
# holds it.
FAILURE_DELIVERY_WAIT_S = 5.0


class ReportingCheckpoint(SubmittingCheckpoint):
    """Turns job outcomes into what training sees (see the module docstring)."""

    _shutting_down: bool  # inside _shutdown

    def _put_state_right(self, trainer: pl.Trainer, *, other_ranks: bool = True) -> int:
        """Undo, in Lightning's state, saves that were never written; return evictions made.

        Nothing to undo here: only background writes (``async_write``) can fail after
        Lightning chose a file (see :mod:`lamin_lightning._lightning_view`).
        """
        del trainer, other_ranks
        return 0

    def _failure_delivered(self, event: ArtifactFailedEvent) -> None:
        delivered = self._failures_delivered.get(id(event))
        if delivered is not None:
            delivered.set()

    def _await_failure_delivery(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds in all) until the failures to report reached the
        hooks and observers: a stop one of them asks for then wins over the report."""
        deadline = time.monotonic() + timeout
        for failure in list(self._unreported_failures):
            delivered = self._failures_delivered.get(id(failure))
            if delivered is None or delivered.is_set():
                continue
            log.debug(
                "waiting for the failure event of %r to reach the hooks and observers", failure.key
            )
            if not delivered.wait(max(0.0, deadline - time.monotonic())):
                return

    def _take_failures_and_replaced(self) -> tuple[list[ArtifactFailedEvent], dict[int, str]]:
        """The failures not reported yet, and which of them a later job of their key made
        moot (by index: the later job's operation)."""
        with self._lock:
            failures, self._unreported_failures = self._unreported_failures, []
            by_id, self._replaced_failures = self._replaced_failures, {}
            for failure in failures:
                self._failures_delivered.pop(id(failure), None)
        replaced = {i: by_id[id(f)] for i, f in enumerate(failures) if id(f) in by_id}
        return failures, replaced

    def _take_all_escalated(self) -> list[BaseException]:
        pipeline = self._pipeline
        from_pipeline = pipeline.take_escalated() if pipeline is not None else []
        return [*from_pipeline, *self._take_escalated()]

    def _surface_failures(self, *, await_delivery: bool = True) -> None:
        pipeline = self._pipeline
        if not (
            self._unreported_failures
            or self._escalated
            or self._hook_errors
            or (pipeline is not None and pipeline.has_escalated())
        ):
            return  # the common case, at every save: four reads, no lock
        if await_delivery and self._unreported_failures and self.on_error == "raise":
            # An observer told of a failure may ask to stop (SystemExit in its
            # on_artifact_failed): its own request, not PersistenceError, ends the fit.
            # Only where a PersistenceError is raised: a warning does not stop the fit,
            # whose later save (or teardown) raises the stop, and a run told to go on
            # through failures is not held at each save for its observers.
            self._await_failure_delivery(FAILURE_DELIVERY_WAIT_S)
        escalated = self._take_all_escalated()
        if escalated:
            # A hook or observer raised SystemExit (or similar): it asked to stop. The
            # pipeline survived it; the training thread is where it belongs.
            raise escalated[0]
        hook_errors = self._take_hook_errors()
        if hook_errors:
            # An override raised once its artifact was stored (logged then): its own
            # error, as the reference raises it out of fit; failures wait for the next call.
            if self.on_error == "raise":
                raise hook_errors[0]
            for error in hook_errors:
                rank_zero_warn(
                    f"lamin-lightning: an override raised after its artifact was stored"
                    f" (the artifact stays): {type(error).__name__}: {error_text(error)}",
                    category=UserWarning,
                )
        failures, replaced = self._take_failures_and_replaced()
        if not failures:
            return
        submitter = self._submitter
        error = PersistenceError(
            failures,
            submitter.unjournaled if submitter else (),
            dirpath=self.dirpath,
            raised=self.on_error == "raise",
            outbox=self.outbox,
            replaced=replaced,
        )
        if self.on_error == "raise":
            raise error
        rank_zero_warn(str(error), category=UserWarning)

    def _warn_unfinished(self, pipeline: Any, why: str) -> None:
        # Admitted and not finished, then journaled but kept from admission (an interrupt
        # ended their wait for a slot): all of them stay in the outbox.
        submitter = self._submitter
        kept_out = submitter.kept_out_jobs() if submitter is not None else []
        admitted = pipeline.pending()

        def label(job: Any) -> str:
            return job.key if job.operation == "save" else f"{job.key} ({job.operation})"

        # Jobs committed whose events the hooks and observers have not had yet (one of
        # them holds an earlier event): persisted (or removed), and finished in the outbox.
        persisted = _counted([label(job) for job in admitted if job.state == "committed"])
        jobs = _counted(
            [label(job) for job in [*(j for j in admitted if j.state != "committed"), *kept_out]]
        )
        if not jobs and not persisted:
            return  # finished meanwhile: nothing to name
        stuck = pipeline.stuck_delivery()
        text = f"lamin-lightning: persistence did not finish {why}{f' ({stuck})' if stuck else ''};"
        if jobs:
            text += (
                f" not persisted: {', '.join(jobs)}. Their local"
                f" files are kept under {self._staging_root(self.dirpath or '.')} and the"
                " jobs stay in its outbox: run `lamin-lightning flush"
                f" {shell_word(os.fspath(self.dirpath or '.'))}`, or start training again"
                " with this dirpath."
            )
            if any(job.state == "transferring" for job in admitted):
                # Its thread goes on (see Submitter.stop): a flush elsewhere is refused
                # until then, rather than replay an upload still running.
                text += (
                    " An upload under way goes on in this process, which holds the outbox"
                    " until it returns."
                )
        if persisted:
            text += (
                f" {'Persisted' if jobs else 'persisted'}, but their events were not delivered"
                f" yet: {', '.join(persisted)}."
            )
        warnings.warn(text, UserWarning, stacklevel=3)

    def _shutdown(self, *, raise_errors: bool, wait: bool = True) -> None:
        """Flush (bounded by ``flush_timeout``), stop the pipeline, report what failed.
        Not again from within: a removal it makes (putting Lightning's state right) is
        persisted by this one (see ``_persist_outside_a_stage``)."""
        shutting, self._shutting_down = self._shutting_down, True
        try:
            self._shutdown_once(raise_errors=raise_errors, wait=wait)
        finally:
            self._shutting_down = shutting

    def _shutdown_once(self, *, raise_errors: bool, wait: bool) -> None:
        self._set_up = self._in_stage = False
        submitter = self._submitter
        if submitter is None:
            return
        pipeline = submitter.pipeline
        try:
            timeout = self.flush_timeout if wait else 0
            if wait and pipeline is not None:
                started = time.monotonic()
                submitter.submit_interrupted(timeout)
                if timeout is not None:
                    timeout = max(0.0, timeout - (time.monotonic() - started))
            try:
                if wait:
                    finished = pipeline is None or self.flush(timeout)
                else:  # Ctrl+C: no wait (nor a progress bar); what is left is named below
                    finished = pipeline is None or pipeline.flush(0)
            except KeyboardInterrupt:
                # Ctrl+C while teardown waits: the user still learns what is left and how
                # to finish it, before the interrupt goes on.
                if pipeline is not None:
                    self._warn_unfinished(pipeline, "(interrupted)")
                raise
            if pipeline is not None and (not finished or submitter.kept_out):
                # Kept out: journaled saves an interrupt kept from admission (or a flush
                # at exit could not admit in time); they are not persisted either.
                why = f"within flush_timeout={self.flush_timeout}s" if wait else "(interrupted)"
                self._warn_unfinished(pipeline, why)
            elif self._trainer is not None and self._put_state_right(
                self._trainer, other_ranks=False
            ):
                self.flush(self.flush_timeout)  # the evictions that put it right
        finally:
            escalated = self._take_all_escalated()
            if pipeline is not None:
                # What this stage leaves in the outbox, for flush() and pending_artifacts()
                # to answer after it (the next setup or `lamin-lightning flush` persists it).
                self._left_in_outbox = [
                    # Not the jobs committed whose events were not delivered: finished.
                    *(job for job in pipeline.pending() if job.state != "committed"),
                    *(
                        PendingJob(-1, spec.operation, spec.key, "kept out", spec.payload)
                        for spec in submitter.kept_out_jobs()
                    ),
                ]
            submitter.stop()
        if raise_errors:
            if escalated:
                raise escalated[0]
            # Flushed: the failures' events were delivered, or never will be.
            self._surface_failures(await_delivery=False)
        else:
            for error in escalated:
                log.warning(
                    "lamin-lightning: %s that a hook or an observer raised was not raised"
                    " again: training had stopped with another error already",
                    type(error).__name__,
                )
            self._take_hook_errors()  # logged when raised; training ended with another error
            failures, replaced = self._take_failures_and_replaced()
            for i, failure in enumerate(failures):
                log.log(
                    logging.WARNING if i in replaced else logging.ERROR,
                    "not persisted: %s %r (%s: %s)%s",
                    failure.operation,
                    failure.key,
                    type(failure.error).__name__,
                    failure.error,
                    replaced_note(replaced[i]) if i in replaced else "",
                )


def _counted(keys: list[str]) -> list[str]:
    """``keys`` once each; a file saved again while its earlier save was pending
    (``last.ckpt``) with its count of jobs."""
    counts = collections.Counter(keys)
    return [key if counts[key] == 1 else f"{key} ({counts[key]} jobs)" for key in counts]
