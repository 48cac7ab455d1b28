"""Persistence statistics: a frozen snapshot and the counters behind it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class PersistenceStats:
    """A consistent snapshot of the persistence pipeline's counters.

    Attributes:
        submitted: Jobs admitted so far.
        pending: Jobs admitted and not yet finished (queued, in flight or committing).
        in_flight: Transfers running right now (at most ``max_workers``).
        saved: Saves committed and delivered.
        removed: Removals committed and delivered.
        failed: Jobs that failed for good (each produced an ``ArtifactFailedEvent``).
        retried: Retries made, over all jobs.
        cancelled: Unstarted saves cancelled by the removal of their file.
        superseded: Unstarted saves replaced by a newer save of the same key.
        bytes_saved: Bytes of files whose save was committed.
        admission_waits: Submissions that had to wait for a free slot.
        training_stall_seconds: Total time training waited for admission (not the
            teardown's waits, once training has ended; ``admission_waits`` counts those).
        max_training_stall_seconds: Longest single admission wait of training.
        persistence_latency_seconds: Total time from admission to delivered event, over
            all delivered jobs (cumulative; see ``mean_persistence_latency_seconds``).
        max_persistence_latency_seconds: Longest admission-to-event time of one job.
        last_persistence_latency_seconds: Admission-to-event time of the job delivered
            last (0.0 before the first). At a checkpoint this is usually an earlier
            checkpoint's: the one just admitted is still pending.
    """

    submitted: int = 0
    pending: int = 0
    in_flight: int = 0
    saved: int = 0
    removed: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    superseded: int = 0
    bytes_saved: int = 0
    admission_waits: int = 0
    training_stall_seconds: float = 0.0
    max_training_stall_seconds: float = 0.0
    persistence_latency_seconds: float = 0.0
    max_persistence_latency_seconds: float = 0.0
    last_persistence_latency_seconds: float = 0.0

    @property
    def finished(self) -> int:
        """Jobs that reached a final state (saved, removed, failed, cancelled, superseded)."""
        return self.saved + self.removed + self.failed + self.cancelled + self.superseded

    @property
    def mean_persistence_latency_seconds(self) -> float:
        """Mean admission-to-event time over delivered jobs."""
        delivered = self.saved + self.removed + self.failed
        return self.persistence_latency_seconds / delivered if delivered else 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters, then ``finished`` and ``mean_persistence_latency_seconds``, as a
        flat dict of floats, for loggers."""
        counters = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        return {
            **counters,
            "finished": float(self.finished),
            "mean_persistence_latency_seconds": self.mean_persistence_latency_seconds,
        }


class StatsRecorder:
    """Thread-safe mutable counters; :meth:`snapshot` returns a frozen copy.

    Counted in a plain dict (``add`` runs on the training thread at every submission,
    and a frozen dataclass copied per change cost tens of microseconds there); the
    frozen snapshot is built when asked for, once per change.
    """

    def __init__(self, stats: PersistenceStats | None = None) -> None:
        self._lock = threading.Lock()
        start = stats if stats is not None else PersistenceStats()
        self._counts: dict[str, Any] = {f.name: getattr(start, f.name) for f in fields(start)}
        self._frozen: PersistenceStats | None = start

    def __getstate__(self) -> dict[str, Any]:
        # A lock cannot be pickled or deep-copied; the callback owning this recorder must be
        # (ddp_spawn, LightningCLI). Keep the counters, make a fresh lock.
        return {"stats": self.snapshot()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["stats"])  # type: ignore[misc]

    def add(self, **deltas: float) -> None:
        """Add each delta to the counter of that name.

        A ``persistence_latency_seconds`` delta is one delivered job's latency (the
        pipeline adds it once per job, as it delivers the job's event): it also becomes
        ``last_persistence_latency_seconds``, in the same snapshot.
        """
        with self._lock:
            counts = self._counts
            for name, delta in deltas.items():
                if name not in counts:
                    raise TypeError(f"PersistenceStats has no counter {name!r}")
                counts[name] += delta
            if "persistence_latency_seconds" in deltas:
                counts["last_persistence_latency_seconds"] = deltas["persistence_latency_seconds"]
            self._frozen = None

    def record_max(self, name: str, value: float) -> None:
        """Raise counter ``name`` to ``value`` if it is larger."""
        with self._lock:
            if value > self._counts[name]:
                self._counts[name] = value
                self._frozen = None

    def snapshot(self) -> PersistenceStats:
        """The current counters, frozen."""
        with self._lock:
            if self._frozen is None:
                self._frozen = PersistenceStats(**self._counts)
            return self._frozen
