"""Faults in the real LaminDB layer: storage that refuses writes or deletions, and the
flush that finishes the jobs afterwards (docs/failures.md)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lamindb_tier import TierModel, artifacts_under, fit

import lamin_lightning as ll
from lamin_lightning import ArtifactFailedEvent, ArtifactRemovedEvent, RetryPolicy
from lamin_lightning._cli import main as cli_main
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*could not be persisted.*"),
]

NO_DELAY = RetryPolicy(attempts=2, initial_backoff=0.0, max_backoff=0.0, jitter=0.0)


class FlushEachStep(pl.Callback):
    """Every checkpoint of step n is finished before step n + 1 saves anything."""

    def __init__(self, callback: ll.Checkpoint) -> None:
        self.callback = callback

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        assert self.callback.flush(timeout=120)


def _refuse_deletions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Storage refuses to delete stored files (a read-only mount): EROFS, each time."""
    import lamin_lightning._lamin_store as lamin_store

    refused: list[str] = []

    def remove_stored(stored: Any, artifact: Any, *, partial: bool) -> None:
        refused.append(str(stored))
        raise OSError(errno.EROFS, "Read-only file system", str(stored))

    monkeypatch.setattr(lamin_store, "_remove_stored", remove_stored)
    return refused


def test_a_flush_reports_a_removal_whose_deletion_fails_as_failed_only(
    ln: Any,
    no_run: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Storage refuses deletions (read-only): the eviction of step 1 is told (removed event,
    before the deletion, as by the reference) and then fails, and stays in the outbox. A
    flush while storage still refuses reports that job once, as failed: not also as
    removed (the artifact is still there), in the report's counts and on the command's
    lines. Once storage accepts deletions again, the flush removes it."""
    dirpath = tmp_path / "ckpts"
    refused = _refuse_deletions(monkeypatch)
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        save_top_k=1,
        every_n_train_steps=1,
        on_error="warn",
        retry=NO_DELAY,
        artifact_observers=[observer],
    )
    fit(callback, tmp_path, steps=2, model=TierModel(scores=[2.0, 1.0]),
        extra_callbacks=[FlushEachStep(callback)])
    assert refused, "the injected refusal never ran"
    prefix = callback.checkpoint_key_prefix
    evicted = f"{prefix}/epoch=0-step=1.ckpt"
    # Live: told, then failed, as documented (docs/migrating.md); the artifact stays.
    kinds = [(type(e).__name__, e.key) for e in observer.events if e.key == evicted]
    assert kinds == [("ArtifactSavedEvent", evicted), ("ArtifactRemovedEvent", evicted),
                     ("ArtifactFailedEvent", evicted)], kinds
    assert evicted in artifacts_under(ln, prefix)

    report = ll.flush_directory(dirpath, progress=False, timeout=120, retry=NO_DELAY)
    assert [r.key for r in report.remaining] == [evicted]
    assert (report.saved, report.removed, report.failed) == (0, 0, 1), report.events
    assert [type(e) for e in report.events] == [ArtifactFailedEvent], report.events
    assert evicted in artifacts_under(ln, prefix)

    capsys.readouterr()
    assert cli_main(["flush", "--no-progress", str(dirpath)]) == 1
    out = capsys.readouterr().out
    assert "saved 0, removed 0, failed 1, dropped 0; 1 still pending" in out, out
    assert not any(line.startswith("removed") for line in out.splitlines()), out

    monkeypatch.undo()
    report = ll.flush_directory(dirpath, progress=False, timeout=120)
    assert (report.removed, report.failed, report.remaining) == (1, 0, []), report
    assert [type(e) for e in report.events] == [ArtifactRemovedEvent]
    assert set(artifacts_under(ln, prefix)) == {f"{prefix}/epoch=0-step=2.ckpt"}
