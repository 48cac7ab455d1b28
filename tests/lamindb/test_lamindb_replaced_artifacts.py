"""A key saved again (``last.ckpt``): its older artifact is deleted once the earlier
saves' events were delivered and before the later save's, as the reference orders it
(deleted before the new one exists, after the older save's observers were told). Crashes,
timeouts, transient errors and a later save that finds an older artifact again by its
content leave one artifact per key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import artifact_features, fit

import lamin_lightning as ll
from lamin_lightning import ArtifactSavedEvent

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]


class _SeesKey:
    """On each saved event of last.ckpt: how many rows hold its key, and how many rows
    under the prefix are flagged is_last_model (the reference: 1 and 1)."""

    def __init__(self, ln: Any, prefix: Any) -> None:
        self.ln, self.prefix, self.seen = ln, prefix, []

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        if event.kind != "checkpoint" or not event.key.endswith("last.ckpt"):
            return
        rows = list(self.ln.Artifact.filter(key=event.key))
        last = [
            a.key
            for a in self.ln.Artifact.filter(key__startswith=self.prefix() + "/")
            if artifact_features(self.ln, a).get("is_last_model") == [True]
        ]
        self.seen.append((len(rows), sorted(last)))

    def on_artifact_removed(self, event: Any) -> None:
        pass


def test_observer_of_a_later_save_finds_only_its_artifact_under_the_key(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """As in the reference, the saved event of a later save of last.ckpt is told after
    the key's older artifact was deleted: ``Artifact.filter(key=...).one()`` works, and
    one artifact has ``is_last_model``."""
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0, every_n_train_steps=1
    )
    seer = _SeesKey(ln, lambda: callback.checkpoint_key_prefix)
    callback.add_artifact_observer(seer)
    fit(callback, tmp_path, steps=3)
    assert callback.persistence_stats.failed == 0
    assert len(seer.seen) >= 2
    # The last save's observers: no save of the key is in flight any more.
    count, last = seer.seen[-1]
    assert count == 1, seer.seen
    assert len(last) == 1, seer.seen


def test_sigkill_while_an_observer_is_told_of_a_replacing_save_then_a_flush_leaves_one_artifact(
    ln: Any, tmp_path: Path
) -> None:
    """The process dies while an observer is told of the 2nd save of last.ckpt. A save
    is settled in the outbox only once the older artifacts of its key are deleted, so
    `lamin-lightning flush` replays whatever a crash cut short there: the key ends with
    one artifact, as with the reference."""
    import subprocess
    import sys

    from test_lamindb_outbox import _cli

    script = Path(__file__).parent / "replaced_artifacts_crash.py"
    dirpath, prefix_file = tmp_path / "ckpt", tmp_path / "prefix"
    proc = subprocess.run(
        [sys.executable, str(script), str(dirpath), str(prefix_file)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr
    prefix = prefix_file.read_text()
    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    rows = list(ln.Artifact.filter(key=f"{prefix}/last.ckpt"))
    assert len(rows) == 1, [(a.uid, a.id) for a in rows]


def test_a_later_save_reusing_an_artifact_whose_deletion_was_deferred_keeps_it(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last.ckpt saved with bytes a, b, a. The 2nd save's commit replaces the 1st artifact
    (A1), deleted once the 1st event was delivered, which an observer holds. Meanwhile the
    3rd save's transfer finds A1 by its content (``_committed_to_reuse``) and reuses it:
    the 2nd save's deletion must spare it, for it is the 3rd save's artifact now (else its
    commit fails, or the key is left with nothing, or its event names a deleted row)."""
    import threading

    from lamindb_tier import TierData, TierModel

    from lamin_lightning._lamin_store import LaminStore

    found = threading.Event()
    real = LaminStore._committed_to_reuse

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        existing = real(self, *args, **kwargs)
        if existing is not None:
            found.set()
        return existing

    monkeypatch.setattr(LaminStore, "_committed_to_reuse", spy)
    commits = [threading.Event() for _ in range(8)]
    count = [0]
    real_commit = LaminStore.commit_checkpoint

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_commit(self, *args, **kwargs)
        count[0] += 1
        commits[count[0]].set()
        return result

    monkeypatch.setattr(LaminStore, "commit_checkpoint", counted)

    class Toggle(TierModel):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            step = self.trainer.global_step
            if step > 1:  # no save superseded by the next: each one is committed
                assert commits[step - 1].wait(30)
            checkpoint.clear()
            checkpoint["content"] = "a" if step % 2 else "b"  # steps 1, 2, 3: a, b, a

    class HoldSecond:
        def __init__(self) -> None:
            self.n = 0
            self.waited: bool | None = None

        def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
            if event.kind == "checkpoint" and event.key.endswith("last.ckpt"):
                self.n += 1
                if self.n == 1:  # the 3rd save's transfer runs meanwhile
                    self.waited = found.wait(30)

        def on_artifact_removed(self, event: Any) -> None:
            pass

    hold = HoldSecond()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=1,
        on_error="warn",
        artifact_observers=[hold],
    )
    fit(callback, tmp_path, steps=3, model=Toggle(), datamodule=TierData(n=3))
    assert hold.waited, "the 3rd save did not find the 1st artifact again"
    rows = list(ln.Artifact.filter(key=f"{callback.checkpoint_key_prefix}/last.ckpt"))
    assert callback.persistence_stats.failed == 0
    assert len(rows) == 1, rows
    last = callback.last_checkpoint_artifact
    assert last is not None and ln.Artifact.filter(id=last.id).exists()


def test_after_fit_each_key_has_one_artifact(ln: Any, no_run: None, tmp_path: Path) -> None:
    """Once fit returned (the teardown flushed), the deferred deletions all ran."""
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0, every_n_train_steps=1
    )
    fit(callback, tmp_path, steps=4)
    rows = list(ln.Artifact.filter(key=f"{callback.checkpoint_key_prefix}/last.ckpt"))
    assert len(rows) == 1, rows


def test_a_teardown_that_gives_up_on_a_slow_observer_leaves_the_cleanup_in_the_outbox(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """An observer still busy with the first save's event of last.ckpt when flush_timeout
    runs out: the second save is committed, but the older artifact it replaces is not
    deleted yet (that waits for the first event's delivery). The save stays pending
    (``pending_artifacts``, the outbox), and `lamin-lightning flush`, the documented
    remedy, leaves the key with one artifact."""
    import threading

    from test_lamindb_outbox import _cli

    release = threading.Event()

    class SlowAtLast:
        n = 0

        def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
            if event.kind == "checkpoint" and event.key.endswith("last.ckpt"):
                self.n += 1
                if self.n == 1:
                    release.wait(120)

        def on_artifact_removed(self, event: Any) -> None:
            pass

    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=1,
        flush_timeout=2,
        on_error="warn",
        artifact_observers=[SlowAtLast()],
    )
    try:
        fit(callback, tmp_path, steps=2)
        key = f"{callback.checkpoint_key_prefix}/last.ckpt"
        flushed = _cli("flush", "--no-progress", str(callback.dirpath))
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
        rows = list(ln.Artifact.filter(key=key))
        assert len(rows) == 1, (rows, callback.pending_artifacts())
    finally:
        release.set()


def test_a_transient_failure_deleting_the_replaced_artifact_is_retried(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion of the older artifact of last.ckpt fails once, transiently (SQLite's
    "database is locked" with another writer): it is retried, as the commit it was part
    of was, and the key's last save leaves one artifact."""
    import lamin_lightning._lamin_store as lamin_store

    real = lamin_store.delete_artifact
    calls = [0]

    def flaky(artifact: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise ll.TransientError("database is locked")
        real(artifact, **kwargs)

    monkeypatch.setattr(lamin_store, "delete_artifact", flaky)
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0, every_n_train_steps=1
    )
    fit(callback, tmp_path, steps=2)
    assert calls[0] >= 1
    rows = list(ln.Artifact.filter(key=f"{callback.checkpoint_key_prefix}/last.ckpt"))
    assert len(rows) == 1, rows
