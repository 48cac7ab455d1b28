"""Progress of a long wait for persistence: a tqdm bar over bytes and files, and the drain.

Used by ``flush``/``teardown`` of the callback and by ``lamin-lightning flush``. A job is
identified by its payload (the job record) object, so the bar counts each job once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamin_lightning._bridge import PersistencePipeline
    from lamin_lightning._pipeline import PendingJob

log = logging.getLogger("lamin_lightning")


def progress_bar(total: int, *, enabled: bool, unit: str = "file", files: int = 0) -> Any:
    """A tqdm bar (as Lightning uses) over files, or over bytes with ``unit="B"``."""
    if not enabled or total <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return None
    bar = tqdm(
        total=total,
        desc="lamin-lightning: persisting checkpoints",
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        leave=False,
    )
    if files:
        bar.set_postfix_str(f"0/{files} files")
    return bar


def job_bytes(job: PendingJob) -> int:
    """Bytes a pending job still has to upload (its staged file), 0 when unknown."""
    size = getattr(job.payload, "size", None)
    return int(size()) if callable(size) else 0


def drain_with_progress(
    pipeline: PersistencePipeline,
    bar: Any,
    sizes: Mapping[int, int],
    deadline: float | None,
) -> bool:
    """Wait for ``pipeline`` to finish (False at ``deadline``), advancing ``bar`` over
    ``sizes`` (bytes by ``id()`` of each job's payload) as jobs leave it. Jobs that left
    failed are counted apart: a finished file is not a persisted one."""
    failed_before = pipeline.stats.failed
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        done = pipeline.flush(0.25 if remaining is None else min(0.25, remaining))
        if bar is not None:
            left = {id(job.payload) for job in pipeline.pending()}
            finished = [job_id for job_id in sizes if job_id not in left]
            bar.n = sum(sizes[job_id] for job_id in finished)
            failed = pipeline.stats.failed - failed_before
            shown = f"{len(finished)}/{len(sizes)} files" + (f", {failed} failed" if failed else "")
            bar.set_postfix_str(shown, refresh=False)
            bar.refresh()
        if done:
            return True


def flush_with_progress(
    pipeline: PersistencePipeline, timeout: float | None, *, progress: bool
) -> bool:
    """Wait for ``pipeline`` to finish; show a bar over bytes and files after a second.

    Returns False if ``timeout`` passed first, after logging the keys still pending.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if pipeline.flush(1.0 if timeout is None else min(1.0, timeout)):
        return True
    pending = pipeline.pending()
    sizes = {id(job.payload): job_bytes(job) for job in pending}
    bar = progress_bar(sum(sizes.values()), enabled=progress, unit="B", files=len(pending))
    try:
        if drain_with_progress(pipeline, bar, sizes, deadline):
            return True
    finally:
        if bar is not None:
            bar.close()
    keys = [job.key for job in pipeline.pending()]
    if not keys:
        return True  # finished right after the deadline: nothing to name ("-")
    log.warning(
        "flush stopped waiting (its time, %ss, is spent); not yet persisted: %s",
        f"{timeout:.1f}" if timeout is not None else timeout,
        ", ".join(keys),
    )
    return False
