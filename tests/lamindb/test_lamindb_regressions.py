"""Regressions on a real instance: one test per defect found in review.

1. After a crash, ``lamin-lightning flush`` leaves the flags (``is_best_model``,
   ``is_last_model``, ``model_rank``) and scores of Lightning's last journaled view.
2. The same when the replay happens at the next ``setup`` (a ``validate`` run).
3. A replay whose user annotation fails permanently keeps every other annotation and
   makes ``flush`` exit with code 4, naming the feature.
4. A checkpoint commit that exhausts its retries leaves no orphan artifact.
5. A ``Checkpoint`` reused for a second fit under a new key prefix leaves the first
   prefix's flags alone.
6. ``SystemExit`` from an observer or the ``on_artifact_saved`` hook does not stop the
   pipeline; ``fit`` raises it on the training thread, after persistence finished.

Crash scenarios train in a process of their own (``regression_train.py``), frozen at
a known point (all saves and removals of the first N steps done and journaled, some
uploads blocked in storage) and then killed with SIGKILL, so what is journaled, what
is committed and what Lightning left on disk is the same on every run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from lamindb_tier import (
    TierModel,
    artifact_features,
    assert_checkpoint_keys_persisted,
    fit,
    make_trainer,
    single,
)
from torch.utils.data import DataLoader, TensorDataset

import lamin_lightning as ll
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
    pytest.mark.filterwarnings("ignore:.*exists and is not empty.*"),
]

SCRIPT = Path(__file__).parent / "regression_train.py"
_STEP = re.compile(r"step=(\d+)")
_FLAGS = ("is_best_model", "is_last_model", "model_rank")

# Score of the checkpoint after step n (n = 1..8), mode "min", save_top_k=3:
#   s1 5, s2 3, s3 4 saved; s4 1 saved, s1 evicted; s5 6 not saved; s6 0.5 saved, s3
#   evicted; s7 7 not saved; s8 2 saved, s2 evicted.
# Lightning's view after step 8: kept s4 (1), s6 (0.5), s8 (2); best s6; the most recent
# save s8 (not the best); ranks s6 0, s4 1, s8 2. Uploads of s1 and s2 commit before
# the kill; everything after is journaled and replayed.
CRASH_SCORES = [5.0, 3.0, 4.0, 1.0, 6.0, 0.5, 7.0, 2.0]
CRASH_FREEZE_AT = 8
CRASH_LET_THROUGH = 2
# Seconds training may take, after the SystemExit, to finish 5 tiny steps and flush ~8
# checkpoints before the watchdog calls it a hang (normally a few seconds).
WATCHDOG_S = 90.0


# -- helpers ---------------------------------------------------------------------------------


def _step(name: str) -> int:
    found = _STEP.search(name)
    assert found is not None, f"no step in checkpoint name {name!r}"
    return int(found.group(1))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamin_lightning._cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def _crash(
    tmp_path: Path,
    *,
    scores: list[float],
    freeze_at: int,
    let_through: int,
    committed: int,
    artifact_feature: str | None = None,
    timeout: float = 300,
) -> tuple[Path, dict[str, Any]]:
    """Run ``regression_train.py crash`` until it froze, SIGKILL it; return (dirpath, view)."""
    dirpath = tmp_path / "ckpt"
    view_path = tmp_path / "view.json"
    log_path = tmp_path / "train.log"
    command = [
        sys.executable,
        str(SCRIPT),
        "crash",
        "--dirpath",
        str(dirpath),
        "--view",
        str(view_path),
        "--scores",
        ",".join(str(s) for s in scores),
        "--freeze-at",
        str(freeze_at),
        "--let-through",
        str(let_through),
        "--committed",
        str(committed),
    ]
    if artifact_feature is not None:
        command += ["--artifact-feature", artifact_feature]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            tick = threading.Event()
            while not view_path.exists():
                if proc.poll() is not None:
                    pytest.fail(
                        f"training exited ({proc.returncode}) before it froze:\n{_tail(log_path)}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"training did not freeze within {timeout}s:\n{_tail(log_path)}")
                tick.wait(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    view = json.loads(view_path.read_text())
    # The kill happened where the test means it to: every save it waited for committed,
    # and the files on disk are exactly Lightning's top-k (no save half-way through).
    assert view["committed_in_time"], f"the first saves did not commit in time: {view}"
    assert view["files"] == sorted(view["best_k_models"]), view
    return dirpath, view


def _expected_view(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per key, the flags and score Lightning's view at the last save implies (mode min)."""
    prefix = view["prefix"]
    scores: dict[str, float] = view["best_k_models"]
    ranked = sorted(scores, key=lambda name: scores[name])
    last = max(scores, key=_step)  # the most recent save is still kept: nothing evicted it
    assert view["best_model_path"] == ranked[0], view
    return {
        f"{prefix}/{name}": {
            "is_best_model": name == ranked[0],
            "is_last_model": name == last,
            "model_rank": rank,
            "score": scores[name],
        }
        for rank, name in enumerate(ranked)
    }


def _assert_flags_equal_view(ln: Any, dirpath: Path, view: dict[str, Any]) -> None:
    """Artifacts equal the files left in ``dirpath``; flags, ranks, scores equal the view;
    ``ll.checkpoint_path`` finds the best and the last checkpoint."""
    from lamindb_setup.core.hashing import hash_file

    prefix = view["prefix"]
    expected = _expected_view(view)
    on_disk = {f"{prefix}/{p.name}": p for p in dirpath.glob("*.ckpt")}
    assert set(on_disk) == set(expected)
    stored = assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    found = {key: single(artifact_features(ln, a)) for key, a in stored.items()}
    short = {key.rsplit("/", 1)[1]: key for key in expected}
    best = sorted(k.rsplit("/", 1)[1] for k, v in found.items() if v.get("is_best_model") is True)
    last = sorted(k.rsplit("/", 1)[1] for k, v in found.items() if v.get("is_last_model") is True)
    want_best = [n for n, k in short.items() if expected[k]["is_best_model"]]
    want_last = [n for n, k in short.items() if expected[k]["is_last_model"]]
    assert best == want_best, (
        f"is_best_model=True on {best}, expected exactly {want_best}; stored features: {found}"
    )
    assert last == want_last, (
        f"is_last_model=True on {last}, expected exactly {want_last}; stored features: {found}"
    )
    for key, want in expected.items():
        got = {name: found[key].get(name) for name in (*_FLAGS, "score")}
        assert got == pytest.approx(want), f"{key}: stored {got}, Lightning's view {want}"
    best_key = short[want_best[0]]
    last_key = short[want_last[0]]
    assert hash_file(ll.checkpoint_path(prefix))[1] == stored[best_key].hash
    assert hash_file(ll.checkpoint_path(prefix, which="last"))[1] == stored[last_key].hash


def _pending_in_outbox(dirpath: Path) -> str | None:
    """``lamin-lightning status DIR``'s listing of pending jobs, or None if nothing is
    pending (an empty outbox, or none at all). Its exit code is not checked here."""
    status = _cli("status", str(dirpath))
    output = status.stdout + status.stderr
    if "nothing pending" in output or "no outbox" in output:
        return None
    assert "pending" in output, f"`lamin-lightning status` ({status.returncode}):\n{output}"
    return output


# -- 1 and 2: flags after a crash ---------------------------------------------------------------


def _crash_with_queued_uploads(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    dirpath, view = _crash(
        tmp_path,
        scores=CRASH_SCORES,
        freeze_at=CRASH_FREEZE_AT,
        let_through=CRASH_LET_THROUGH,
        committed=CRASH_LET_THROUGH,
    )
    # Preconditions of the scenario (see CRASH_SCORES).
    assert view["best_k_models"] == {
        "epoch=0-step=4.ckpt": 1.0,
        "epoch=0-step=6.ckpt": 0.5,
        "epoch=0-step=8.ckpt": 2.0,
    }
    assert [key.rsplit("/", 1)[1] for key in view["saved"]] == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
    ]
    assert _pending_in_outbox(dirpath) is not None, "the killed run left nothing to replay"
    return dirpath, view


@pytest.mark.slow
def test_flush_after_sigkill_leaves_flags_of_the_last_journaled_save(
    ln: Any, tmp_path: Path
) -> None:
    dirpath, view = _crash_with_queued_uploads(tmp_path)

    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    left = _pending_in_outbox(dirpath)
    assert left is None, f"jobs left in the outbox:\n{left}"

    _assert_flags_equal_view(ln, dirpath, view)


class _ValidatedModel(TierModel):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("val_loss", self.layer(x).pow(2).mean())


@pytest.mark.slow
def test_replay_at_next_setup_after_sigkill_leaves_flags_of_the_last_journaled_save(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    dirpath, view = _crash_with_queued_uploads(tmp_path)

    # The same dirpath and settings; no run active, so the same key prefix as the
    # killed process (which had none). validate sets the callback up (the replay) and
    # tears it down (the flush) without writing a checkpoint.
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        mode="min",
        save_top_k=3,
        every_n_train_steps=1,
        artifact_observers=[observer],
    )
    trainer = make_trainer(tmp_path, [callback])
    data = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    trainer.validate(_ValidatedModel(), dataloaders=DataLoader(TensorDataset(data)))
    assert callback.checkpoint_key_prefix == view["prefix"]
    assert observer.events and all(e.recovered for e in observer.events)
    left = _pending_in_outbox(dirpath)
    assert left is None, f"jobs left in the outbox:\n{left}"

    _assert_flags_equal_view(ln, dirpath, view)


# -- 3: a replay whose annotation fails ----------------------------------------------------------


@pytest.mark.slow
def test_flush_whose_user_annotation_fails_keeps_other_annotations_and_exits_4(
    ln: Any, tmp_path: Path
) -> None:
    feature = f"regression_note_{uuid.uuid4().hex[:8]}"
    ln.Feature(name=feature, dtype=str).save()
    # Scores 5, 3, 4: all three saved and kept (top 3); nothing uploads before the kill.
    dirpath, view = _crash(
        tmp_path,
        scores=[5.0, 3.0, 4.0],
        freeze_at=3,
        let_through=0,
        committed=0,
        artifact_feature=f"{feature}=tagged",
    )
    assert view["saved"] == []
    assert len(view["files"]) == 3
    # The feature goes away before the flush: annotating with it now fails for good.
    ln.Feature.get(name=feature).delete(permanent=True)

    flushed = _cli("flush", "--no-progress", str(dirpath))
    output = flushed.stdout + flushed.stderr
    assert flushed.returncode == 4, (
        f"flush exited {flushed.returncode}, expected 4 (an annotation failed):\n{output}"
    )
    assert feature in output, f"flush did not name the feature {feature!r}:\n{output}"

    prefix = view["prefix"]
    on_disk = {f"{prefix}/{p.name}": p for p in dirpath.glob("*.ckpt")}
    stored = assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    expected = _expected_view(view)
    for key, artifact in stored.items():
        values = single(artifact_features(ln, artifact))
        assert feature not in values
        for name in ("score", "monitor", "mode", "save_weights_only", *_FLAGS):
            assert name in values, f"{key}: annotation {name!r} dropped; stored: {values}"
        assert values["monitor"] == "score" and values["mode"] == "min"
        got = {name: values[name] for name in (*_FLAGS, "score")}
        assert got == pytest.approx(expected[key]), f"{key}: {got} != {expected[key]}"


# -- 4: a commit that exhausts its retries -------------------------------------------------------


class _FailingCommit(ll.Checkpoint):
    """Its commit of one save (file name, global step) raises ConnectionError, always."""

    def __init__(self, *, fail_name: str, fail_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_name, self.fail_step = fail_name, fail_step
        self.attempts = 0
        self.committed: dict[str, list[str]] = {}
        self.failed_uids: list[str] = []

    def commit_checkpoint_artifact(self, trainer: Any, snapshot: Any, artifact: Any) -> None:
        if snapshot.key.rsplit("/", 1)[1] == self.fail_name and (
            snapshot.global_step == self.fail_step
        ):
            self.attempts += 1
            self.failed_uids.append(artifact.uid)
            raise ConnectionError(f"injected: the database went away committing {snapshot.key}")
        super().commit_checkpoint_artifact(trainer, snapshot, artifact)
        self.committed.setdefault(snapshot.key, []).append(artifact.uid)


@pytest.mark.parametrize(
    ("fail_name", "fail_step", "save_last"),
    [
        pytest.param("epoch=0-step=2.ckpt", 2, False, id="key-saved-once"),
        pytest.param("last.ckpt", 2, True, id="second-save-of-last-ckpt"),
    ],
)
def test_commit_that_exhausts_its_retries_leaves_no_orphan_artifact(
    fail_name: str, fail_step: int, save_last: bool, ln: Any, tmp_path: Path
) -> None:
    callback = _FailingCommit(
        fail_name=fail_name,
        fail_step=fail_step,
        dirpath=tmp_path / "ckpt",
        monitor="score",
        save_top_k=-1,
        save_last=save_last,
        every_n_train_steps=1,
        retry=ll.RetryPolicy.no_delay(2),
        on_error="warn",
    )
    with pytest.warns(UserWarning, match="could not be persisted"):
        fit(callback, tmp_path, steps=2, model=TierModel(scores=[5.0, 3.0]))
    assert callback.attempts == 2, "the failing commit was not retried exactly once"
    assert callback.persistence_stats.failed == 1

    key = f"{callback.checkpoint_key_prefix}/{fail_name}"
    # The saves of this key that committed, less those a later commit replaced.
    committed = callback.committed.get(key, [])
    expected = set(committed[-1:])
    # .objects: trashed artifacts count too.
    stored = {a.uid: a for a in ln.Artifact.objects.filter(key=key)}
    orphans = {uid: artifact_features(ln, a) for uid, a in stored.items() if uid not in expected}
    assert set(stored) == expected, (
        f"artifacts under {key!r}: {sorted(stored)}, expected only the committed"
        f" {sorted(expected)}; left behind by the failed commit (uid: features):"
        f" {orphans}"
    )
    assert not set(callback.failed_uids) & set(stored)


# -- 5: a Checkpoint reused for a second fit ------------------------------------------------------


def _flags_under(ln: Any, prefix: str) -> dict[str, dict[str, list[Any]]]:
    rows = ln.Artifact.filter(key__startswith=prefix + "/", kind="model")
    return {
        a.key: {name: values for name, values in artifact_features(ln, a).items() if name in _FLAGS}
        for a in rows
    }


def test_reused_checkpoint_second_fit_leaves_the_first_prefix_flags_alone(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = ll.Checkpoint(monitor="score", save_top_k=-1, every_n_train_steps=1)
    # Fit 1: scores 5, 1, 4, 3 -> best step 2, last step 4, ranks 2, 4, 3, 1.
    fit(
        callback,
        tmp_path,
        steps=4,
        model=TierModel(scores=[5.0, 1.0, 4.0, 3.0]),
        logger=CSVLogger(tmp_path, name="reuse", version=0),
    )
    first = callback.checkpoint_key_prefix
    before = _flags_under(ln, first)
    assert len(before) == 4
    by_name = {key.rsplit("/", 1)[1]: flags for key, flags in before.items()}
    assert by_name["epoch=0-step=2.ckpt"]["is_best_model"] == [True]
    assert by_name["epoch=0-step=4.ckpt"]["is_last_model"] == [True]
    assert sorted(f["model_rank"][0] for f in before.values()) == [0, 1, 2, 3]

    # Fit 2: a new Trainer with a new logger version, so a new key prefix.
    fit(
        callback,
        tmp_path,
        steps=3,
        model=TierModel(scores=[0.5, 2.0, 0.25]),
        logger=CSVLogger(tmp_path, name="reuse", version=1),
    )
    second = callback.checkpoint_key_prefix
    assert second != first
    assert _flags_under(ln, second), "the second fit persisted nothing"

    after = _flags_under(ln, first)
    assert after == before, (
        f"the second fit (prefix {second!r}) changed the flags under {first!r}:\n"
        f"before: {before}\nafter:  {after}"
    )


# -- 6: SystemExit from an observer or the hook ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("raise_in", ["observer", "hook"])
def test_systemexit_in_on_artifact_saved_does_not_stop_the_pipeline(
    raise_in: str, ln: Any, tmp_path: Path
) -> None:
    dirpath = tmp_path / "ckpt"
    report_path = tmp_path / "report.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "systemexit",
        "--dirpath",
        str(dirpath),
        "--report",
        str(report_path),
        "--raise-in",
        raise_in,
        "--steps",
        "8",
        "--after-step",
        "3",
        "--code",
        "3",
        "--watchdog",
        str(WATCHDOG_S),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the training process hung (killed after 600s):\n{expired.stdout!r}")
    output = (done.stdout + done.stderr)[-6000:]
    if not report_path.exists():
        dump = done.stderr.find("Timeout (")
        if dump >= 0:
            raised = "raise SystemExit" in done.stderr[:dump]
            threads = done.stderr[dump:][-5000:]
            pytest.fail(
                f"training hung: {WATCHDOG_S:.0f} s after on_artifact_saved ({raise_in}) raised"
                f" SystemExit{'' if raised else ' (not seen in the output)'}, fit had neither"
                f" returned nor raised; the watchdog's thread dump (end):\n{threads}"
            )
        pytest.fail(f"the training process failed ({done.returncode}):\n{output}")
    assert done.returncode == 0, f"the process did not exit cleanly after fit:\n{output}"
    report = json.loads(report_path.read_text())
    assert not report["gate_timed_out"], report

    # The SystemExit reached the user: fit raised it on the training thread ...
    assert report["raised"] == "SystemExit" and report["code"] == 3, report
    # ... after the pipeline finished everything it had been given.
    assert report["pending"] == 0 and report["failed"] == 0, report
    left = _pending_in_outbox(dirpath)
    assert left is None, f"jobs left in the outbox:\n{left}"

    prefix = report["prefix"]
    on_disk = {f"{prefix}/{p.name}": p for p in dirpath.glob("*.ckpt")}
    stored = assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    names = {key.rsplit("/", 1)[1] for key in stored}
    # The raise came for step 1's event once step 3 was submitted: what came later persisted.
    assert report["exit_raised_for"] == f"{prefix}/epoch=0-step=1.ckpt"
    assert {"epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"} <= names, sorted(names)
    # Every other persisted checkpoint was announced (the raising key's own event may
    # stop at the code that raised).
    announced = set(report["saved_events"]) | {report["exit_raised_for"]}
    assert announced >= set(stored), sorted(set(stored) - announced)
