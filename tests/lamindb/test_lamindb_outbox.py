"""Crash safety on a real instance (issue 5, faults 3, 4 and 5; guarantee 8).

Training runs in a process of its own (``outbox_train.py``) that the test kills
(SIGKILL) or terminates (SIGTERM) while an upload is in flight; then the set is
completed by ``lamin-lightning flush`` or by rerunning the script. After each, the
checkpoint artifacts under the prefix are exactly Lightning's kept set, one per key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import (
    TierData,
    TierModel,
    artifacts_under,
    assert_checkpoint_keys_persisted,
    fit,
    held_uploads,
    make_trainer,
)

import lamin_lightning as ll
from lamin_lightning import JobRecord
from lamin_lightning._journal import journal_paths, read_pending
from lamin_lightning._lamin import LaminArtifactPublisher
from lamin_lightning._lamin_store import lamin_stats
from lamin_lightning._staging import staging_root
from lamin_lightning.testing import RecordingObserver

SCRIPT = Path(__file__).parent / "outbox_train.py"
# ``lamin-lightning status`` exits 1 while jobs are pending, 0 once nothing is.
STATUS_PENDING = 1


def _start(tmp_path: Path, mode: str, *extra: str, steps: int = 8) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--dirpath",
            str(tmp_path / "ckpt"),
            "--mode",
            mode,
            "--steps",
            str(steps),
            "--marker",
            str(tmp_path / "marker"),
            "--report",
            str(tmp_path / "report.json"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_marker(proc: subprocess.Popen[str], marker: Path, timeout: float = 240) -> None:
    """Wait until the training process reports an upload in flight (or dies)."""
    deadline = time.monotonic() + timeout
    done = threading.Event()
    while not marker.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"training exited ({proc.returncode}) before an upload started:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no upload started in time")
        done.wait(0.05)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamin_lightning._cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _on_disk(dirpath: Path, prefix: str) -> dict[str, Path]:
    """Lightning's kept set after a crash: the checkpoint files it left, by key."""
    return {f"{prefix}/{p.name}": p for p in dirpath.glob("*.ckpt")}


def _pending(dirpath: Path) -> list[JobRecord]:
    return [r for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]


def _kill_mid_upload(tmp_path: Path, *extra: str) -> str:
    proc = _start(tmp_path, "block", *extra)
    try:
        _wait_for_marker(proc, tmp_path / "marker")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    prefix = (tmp_path / "report.prefix").read_text()
    pending = _pending(tmp_path / "ckpt")
    assert pending, "the killed run left nothing in the outbox"
    assert any(r.op == "save" for r in pending)
    return prefix


def test_sigkill_mid_upload_then_cli_flush_completes_the_set(ln: Any, tmp_path: Path) -> None:
    prefix = _kill_mid_upload(tmp_path)
    dirpath = tmp_path / "ckpt"

    status = _cli("status", str(dirpath))
    assert status.returncode == STATUS_PENDING, status.stderr
    assert "job(s) pending" in status.stdout and "held by" not in status.stdout

    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert "0 still pending" in flushed.stdout

    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert _pending(dirpath) == []
    # The flush deleted the emptied journals: nothing is pending (exit status 0).
    after = _cli("status", str(dirpath))
    assert after.returncode == 0 and "nothing pending" in after.stdout, after.stderr
    # Flushing again is a no-op.
    again = _cli("flush", "--no-progress", str(dirpath))
    assert again.returncode == 0 and "saved 0" in again.stdout


def test_a_replay_reads_each_file_once_to_hash_it_and_stores_lamindbs_size_and_hash(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay hashes a file to find an artifact of the same content; a new artifact
    is then given that hash, so lamindb does not read the file again (a large
    checkpoint's hash reads 100 MiB of it)."""
    from lamindb.models import artifact as module

    prefix = _kill_mid_upload(tmp_path)
    dirpath = tmp_path / "ckpt"
    hashed_by_lamindb: list[str] = []
    original = module.hash_file

    def hash_file(path: Any, *args: Any, **kwargs: Any) -> Any:
        hashed_by_lamindb.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, "hash_file", hash_file)
    before = set(artifacts_under(ln, prefix))
    report = ll.flush_directory(dirpath, progress=False)
    assert report.failed == 0 and not report.remaining, report

    assert hashed_by_lamindb == []
    after = artifacts_under(ln, prefix)
    on_disk = _on_disk(dirpath, prefix)
    created = sorted(set(after) - before)
    assert set(created) & set(on_disk), f"the flush uploaded no kept checkpoint: {created}"
    for key in set(created) & set(on_disk):
        artifact = after[key]
        stored = {"size": artifact.size, "hash": artifact.hash, "hash_type": artifact._hash_type}
        assert stored == lamin_stats(on_disk[key]), key


def test_a_replay_stores_into_the_storage_location_its_run_stored_into(
    ln: Any, tmp_path: Path
) -> None:
    """The training script made another storage location its default (for its process,
    as `ln.settings.storage = ...` does) and was killed mid-upload; a flush from a
    process whose default is the instance's first location stores the checkpoints where
    the run would have, not in the flushing process's default."""
    second = str(tmp_path / "second-storage")
    prefix = _kill_mid_upload(tmp_path, "--storage", second)
    dirpath = tmp_path / "ckpt"
    default = ln.settings.storage.root_as_str
    assert default.rstrip("/") != second
    before = set(artifacts_under(ln, prefix))
    report = ll.flush_directory(dirpath, progress=False)
    assert report.failed == 0 and not report.remaining, report

    assert ln.settings.storage.root_as_str == default
    after = artifacts_under(ln, prefix)
    created = sorted(set(after) - before)
    assert created, "the flush stored nothing"
    assert {after[key].storage.root for key in created} == {second}, created
    on_disk = _on_disk(dirpath, prefix)
    assert set(after) >= set(on_disk)
    for key, path in on_disk.items():
        assert Path(after[key].path).read_bytes() == path.read_bytes(), key


def test_a_replay_gives_lamindb_no_hash_where_the_user_turned_its_hashing_off(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lamin_lightning._lamin_store import _given_stats

    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights")
    stats = lamin_stats(path)
    assert _given_stats(stats) == {"_stats": stats}
    monkeypatch.setattr(ln.settings.creation, "artifact_skip_size_hash", True)
    assert _given_stats(stats) == {}


def test_sigkill_mid_upload_then_rerunning_the_script_completes_the_set(
    ln: Any, tmp_path: Path
) -> None:
    prefix = _kill_mid_upload(tmp_path)
    (tmp_path / "marker").unlink()
    rerun = _start(tmp_path, "plain", "--resume", steps=12)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prefix"] == prefix
    recovered = [e for e in report["events"] if e["recovered"]]
    assert recovered, "the rerun replayed nothing"
    # Replays come first, before any event of the new training.
    assert report["events"][: len(recovered)] == recovered
    dirpath = tmp_path / "ckpt"
    expected = {f"{prefix}/{name}": dirpath / name for name in report["kept"]}
    assert_checkpoint_keys_persisted(ln, prefix, expected)
    assert _pending(dirpath) == []


def _move_checkpoint_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Move the crashed run's checkpoint folder together with its working folder to another
    place (another scratch mount after a preemption, a renamed project folder); return the
    new checkpoint folder and the hash of each checkpoint file in it, by name."""
    from lamindb_setup.core.hashing import hash_file

    old = tmp_path / "ckpt"
    new = tmp_path / "elsewhere" / "ckpt"
    new.parent.mkdir()
    os.rename(old, new)
    os.rename(staging_root(old), staging_root(new))
    assert not old.exists() and staging_root(new).is_dir()
    return new, {p.name: hash_file(p)[1] for p in new.glob("*.ckpt")}


def _hashes_under(ln: Any, prefix: str) -> dict[str, str]:
    """The checkpoint artifacts under ``prefix``: hash by file name (asserts one per key)."""
    rows = list(ln.Artifact.objects.filter(key__startswith=prefix + "/", kind="model"))
    keys = [a.key for a in rows]
    assert len(keys) == len(set(keys)), f"duplicate artifacts: {sorted(keys)}"
    return {a.key.removeprefix(prefix + "/"): a.hash for a in rows}


def test_a_flush_of_a_moved_checkpoint_folder_persists_every_job_under_its_key(
    ln: Any, tmp_path: Path
) -> None:
    """Crashed mid-upload, then the checkpoint folder and its working folder moved together:
    `lamin-lightning flush NEWDIR` finds the staged copies and the files where they are
    now and persists every job once, under the keys they were journaled with (nothing is
    dropped as lost because the journal names the old paths)."""
    prefix = _kill_mid_upload(tmp_path)
    assert prefix.startswith(str(tmp_path / "ckpt"))
    dirpath, hashes = _move_checkpoint_folder(tmp_path)

    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert "0 still pending" in flushed.stdout
    assert "LostFileError" not in flushed.stderr and "dropping" not in flushed.stderr

    assert_checkpoint_keys_persisted(ln, prefix, {f"{prefix}/{n}": dirpath / n for n in hashes})
    assert _hashes_under(ln, prefix) == hashes
    assert _pending(dirpath) == []
    assert not (tmp_path / "ckpt").exists(), "the flush recreated the old folder"
    after = _cli("status", str(dirpath))
    assert after.returncode == 0 and "nothing pending" in after.stdout, after.stderr


def test_a_resumed_fit_in_a_moved_checkpoint_folder_replays_every_job_under_its_key(
    ln: Any, tmp_path: Path
) -> None:
    """As above, but training is resumed (``ckpt_path="last"``) in the moved folder: its
    setup replays the crashed run's jobs, found where they are now, under their keys."""
    prefix = _kill_mid_upload(tmp_path)
    dirpath, hashes = _move_checkpoint_folder(tmp_path)
    (tmp_path / "marker").unlink()
    rerun = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dirpath",
            str(dirpath),
            "--mode",
            "plain",
            "--steps",
            "12",
            "--marker",
            str(tmp_path / "marker"),
            "--report",
            str(tmp_path / "report.json"),
            "--resume",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stdout
    assert "dropping it from the outbox" not in rerun.stdout, rerun.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["start_step"] > 0, "the rerun started over: no last.ckpt to resume from"
    recovered = [e for e in report["events"] if e["recovered"]]
    assert recovered, "the rerun replayed nothing"
    assert all(e["key"].startswith(prefix + "/") for e in recovered), recovered
    failed = [e for e in report["events"] if e["type"] == "ArtifactFailedEvent"]
    assert failed == [], failed
    # The crashed run's checkpoints: under their original keys, with the bytes they had
    # (the resumed run rewrote last.ckpt since: its own save is under its own prefix).
    assert _hashes_under(ln, prefix) == hashes
    new_prefix = report["prefix"]
    assert new_prefix != prefix  # the key prefix is the dirpath, and it moved
    # The resumed run's own checkpoints (Lightning, its dirpath changed, restores none of
    # the earlier state: the files it wrote are its own, last-v1.ckpt its last).
    written = {p.name: p for p in dirpath.glob("*.ckpt") if p.name not in hashes}
    assert written, "the resumed run wrote no checkpoint"
    expected = {f"{new_prefix}/{name}": path for name, path in written.items()}
    assert_checkpoint_keys_persisted(ln, new_prefix, expected)
    assert _pending(dirpath) == []


# Steps reached on the training thread, where the kill lands at a known point of the
# save. (Killing when a pipeline thread reaches a step lands anywhere in the training
# thread's save, including the window guarantees.md section 8 names: a file Lightning
# wrote whose journal line was not written yet.) "moved_aside": last.ckpt is out of the
# folder for its rewrite, the new one not written; the flush puts it back.
KILL_STEPS = [
    ("journaled", 4),
    ("journaled_removal", 1),
    ("journaled_removal", 2),
    ("trashed", 1),
    ("trashed", 2),
    ("moved_aside", 1),
    ("moved_aside", 3),
    # A pipeline thread: the second save of last.ckpt committed and its event delivered,
    # the older last.ckpt's artifact not deleted yet. The flush replays that save (it is
    # settled only once the older artifact is gone): one artifact of the key is left.
    ("replacing", 1),
]


def _killed_at(tmp_path: Path, step: str, after: int) -> str:
    """Run training until it SIGKILLs itself right after the ``after``-th time a job reached
    ``step``; return the key prefix."""
    killed = _start(tmp_path, "plain", "--kill-at", step, "--kill-after", str(after))
    out, _ = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {step} #{after}:\n{out}"
    assert not (tmp_path / "report.json").exists()
    return (tmp_path / "report.prefix").read_text()


@pytest.mark.parametrize(("step", "after"), KILL_STEPS)
def test_sigkill_at_each_step_of_a_job_then_a_flush_makes_the_store_equal_the_folder(
    ln: Any, tmp_path: Path, step: str, after: int
) -> None:
    """SIGKILL right after each step of a save on the training thread (a job's journal
    line written, an eviction journaled, an evicted file moved to the trash, last.ckpt
    moved aside for its rewrite); the pipeline's jobs are wherever they are at that
    moment. `lamin-lightning flush` then leaves the store exactly as the
    checkpoint folder: one artifact per file, bytes equal, none for a file that is gone,
    no job pending."""
    prefix = _killed_at(tmp_path, step, after)
    dirpath = tmp_path / "ckpt"
    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert _pending(dirpath) == []


def test_sigkill_after_a_users_removal_kept_the_file_then_a_flush_deletes_its_artifact(
    ln: Any, tmp_path: Path
) -> None:
    """A CheckpointIO of the user's keeps every evicted file (its ``remove_checkpoint``
    does nothing): uninterrupted, each evicted checkpoint's artifact is deleted all the
    same. SIGKILL right after the first eviction was handed to it, before its removal was
    admitted: the flush deletes that artifact too (before, it kept it, the file being
    there), so the store holds what an uninterrupted run's holds: the files Lightning
    still counts, not the one the user kept."""
    killed = _start(
        tmp_path, "plain", "--keep-files", "--kill-at", "removal_handed", "--kill-after", "1"
    )
    out, _ = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, f"not killed:\n{out}"
    prefix = (tmp_path / "report.prefix").read_text()
    dirpath = tmp_path / "ckpt"
    evicted = [r for r in _pending(dirpath) if r.op == "remove"]
    assert [Path(r.local_path).exists() for r in evicted] == [True]
    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    on_disk = _on_disk(dirpath, prefix)
    assert evicted[0].key in on_disk  # the user kept the file
    del on_disk[evicted[0].key]
    assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    assert _pending(dirpath) == []


# The rerun trains 12 more steps per case: a subset of the steps (the flush test has all).
RERUN_STEPS = [("journaled_removal", 1), ("trashed", 2), ("moved_aside", 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "after"), RERUN_STEPS)
def test_sigkill_at_each_step_of_a_job_then_the_rerun_completes_the_set(
    ln: Any, tmp_path: Path, step: str, after: int
) -> None:
    """The same crashes, then the script again, resumed from last.ckpt: it replays what was
    left first, then trains on; the store ends equal to the folder, which holds
    Lightning's kept set. (A crash can leave a file Lightning no longer tracks: resumed
    from an older last.ckpt, it writes that step again under a -v1 name; the file stays,
    as with plain Lightning, and so does its artifact.)"""
    prefix = _killed_at(tmp_path, step, after)
    rerun = _start(tmp_path, "plain", "--resume", steps=12)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prefix"] == prefix
    assert report["start_step"] > 0, "the rerun started over: no last.ckpt to resume from"
    dirpath = tmp_path / "ckpt"
    on_disk = _on_disk(dirpath, prefix)
    assert {f"{prefix}/{name}" for name in report["kept"]} <= set(on_disk)
    assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    assert _pending(dirpath) == []
    failed = [e for e in report["events"] if e["type"] == "ArtifactFailedEvent"]
    assert failed == [], failed


def test_sigterm_while_teardown_flushes_is_held_until_the_flush_is_done(
    ln: Any, tmp_path: Path
) -> None:
    """SIGTERM after training, while teardown waits for uploads: Lightning has put the
    default handler back by then, which ended the process at once, mid-flush, saying
    nothing (the outbox kept the jobs). Now the signal is held: a warning says so, the
    uploads finish (here once the test releases them, after that warning), and then the
    process ends by SIGTERM, as the sender asked, with nothing left pending."""
    teardown = tmp_path / "teardown"
    proc = _start(
        tmp_path,
        "gate",
        "--let-through",
        "0",
        "--max-pending",
        "64",
        "--teardown-marker",
        str(teardown),
        steps=3,
    )
    seen: list[str] = []
    try:
        _wait_for_marker(proc, teardown)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        for line in proc.stdout:  # until the child says it holds the signal (or exits)
            seen.append(line)
            if "SIGTERM received while the last checkpoints are persisted" in line:
                break
        (tmp_path / "marker").with_suffix(".release").write_text("")
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen) + out
    assert "SIGTERM received while the last checkpoints are persisted" in output, output
    assert proc.returncode == -signal.SIGTERM, output
    prefix = (tmp_path / "report.prefix").read_text()
    dirpath = tmp_path / "ckpt"
    assert _pending(dirpath) == [], output
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))


def test_sigterm_runs_lightnings_handling_and_our_flush_completes(ln: Any, tmp_path: Path) -> None:
    proc = _start(tmp_path, "slow", steps=40)
    try:
        _wait_for_marker(proc, tmp_path / "marker")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != -signal.SIGTERM, "Lightning's SIGTERM handling did not run"
    # Lightning stops training at the signal (exit code 0, teardown runs), well before 40 steps.
    steps = [
        int(m.group(1))
        for p in (tmp_path / "ckpt").glob("*.ckpt")
        if (m := re.search(r"step=(\d+)", p.name))
    ]
    assert steps and max(steps) < 40, f"training did not stop at SIGTERM: {sorted(steps)}"
    dirpath = tmp_path / "ckpt"
    prefix = (tmp_path / "report.prefix").read_text()
    assert _pending(dirpath) == [], f"the flush at exit left jobs in the outbox:\n{out[-3000:]}"
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))


def test_hanging_storage_teardown_names_keys_and_a_later_flush_completes(
    ln: Any, tmp_path: Path
) -> None:
    dirpath = tmp_path / "ckpt"
    callback = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        flush_timeout=1.0,
        max_pending=16,
    )
    hang = held_uploads()
    callback._artifact_publisher = hang
    started = time.monotonic()
    with pytest.warns(UserWarning, match=r"flush_timeout=1\.0s; not persisted: .*step=") as caught:
        fit(callback, tmp_path, steps=4, model=TierModel(scores=[5, 4, 6, 3]))
    assert time.monotonic() - started < 60
    (message,) = [str(w.message) for w in caught if "flush_timeout" in str(w.message)]
    assert f"lamin-lightning flush {dirpath}" in message
    for path in dirpath.glob("*.ckpt"):
        assert path.name in message
    # The stuck uploads finish after teardown gave up on them (like a slow process exit).
    with hang.cond:
        blocked = hang.blocked
    hang.released.set()
    with hang.cond:
        assert hang.cond.wait_for(lambda: hang.finished >= blocked, timeout=120)
    assert _pending(dirpath), "teardown must leave the unpersisted jobs in the outbox"

    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    prefix = callback.checkpoint_key_prefix
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert _pending(dirpath) == []


def test_a_crash_after_commit_before_the_journal_marked_it_is_not_duplicated(
    ln: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit lands but no job is marked finished; the next setup replays them all."""
    from lamin_lightning._journal import Outbox

    dirpath = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        patch.setattr(Outbox, "settle", lambda self, job_id, status: None)
        first = ll.Checkpoint(dirpath=dirpath, monitor="score", save_top_k=2, every_n_train_steps=1)
        fit(first, tmp_path, steps=5, model=TierModel(scores=[5, 4, 6, 3, 2]))
    prefix = first.checkpoint_key_prefix
    before = assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert len(_pending(dirpath)) >= 5

    observer = RecordingObserver()
    second = ll.Checkpoint(
        dirpath=dirpath,
        monitor="score",
        save_top_k=2,
        every_n_train_steps=1,
        artifact_observers=[observer],
    )
    # A run that trains no step: only its setup (the replay) and teardown happen.
    make_trainer(tmp_path, [second], max_steps=0).fit(TierModel(), datamodule=TierData(n=1))
    after = assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert {k: a.id for k, a in after.items()} == {k: a.id for k, a in before.items()}, (
        "a replay re-created artifacts that were already committed"
    )
    assert observer.events and all(e.recovered for e in observer.events)
    assert _pending(dirpath) == []


def test_status_shows_a_journal_held_by_a_running_process(ln: Any, tmp_path: Path) -> None:
    proc = _start(tmp_path, "block")
    try:
        _wait_for_marker(proc, tmp_path / "marker")
        status = _cli("status", str(tmp_path / "ckpt"))
        assert "held by another process (a training run or a flush)" in status.stdout
        flushed = _cli("flush", "--no-progress", str(tmp_path / "ckpt"))
        assert flushed.returncode == 3 and "a training run" in flushed.stderr
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert os.path.isdir(tmp_path / "ckpt")


class _FailOnce(LaminArtifactPublisher):
    """Fails one checkpoint's upload permanently (a validation error), once."""

    def __init__(self, name: str) -> None:
        self.name, self.failed = name, False

    def create_artifact(self, local_path: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("key", "")).endswith(self.name) and not self.failed:
            self.failed = True
            raise ValueError(f"injected permanent failure for {self.name}")
        return super().create_artifact(local_path, **kwargs)


def test_replaying_an_old_failed_save_does_not_move_the_flags_back(ln: Any, tmp_path: Path) -> None:
    from lamindb_tier import artifact_features

    dirpath = tmp_path / "ckpt"
    first = ll.Checkpoint(
        dirpath=dirpath, monitor="score", save_top_k=-1, every_n_train_steps=1, on_error="warn"
    )
    first._artifact_publisher = _FailOnce("step=2.ckpt")
    with pytest.warns(UserWarning, match="could not be persisted"):
        fit(first, tmp_path, steps=4, model=TierModel(scores=[4, 1, 3, 2]))
    prefix = first.checkpoint_key_prefix
    assert [r.key.rsplit("/", 1)[1] for r in _pending(dirpath)] == ["epoch=0-step=2.ckpt"]

    second = ll.Checkpoint(
        dirpath=dirpath, monitor="score", save_top_k=-1, every_n_train_steps=1, on_error="warn"
    )
    make_trainer(tmp_path, [second], max_steps=0).fit(TierModel(), datamodule=TierData(n=1))
    stored = assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert _pending(dirpath) == []
    last = {
        k.rsplit("/", 1)[1]
        for k, a in stored.items()
        if artifact_features(ln, a).get("is_last_model") == [True]
    }
    assert last == {"epoch=0-step=4.ckpt"}, "the replay of step 2 moved is_last_model back"


def test_a_replay_uploads_again_when_the_matching_artifacts_upload_was_cut_short(
    ln: Any, tmp_path: Path
) -> None:
    """lamindb saves an artifact's record, uploads, then marks it complete. Killed in
    between, a record of this key and hash exists with no file: the replay must not reuse
    it (a record whose bytes are gone) but drop it and upload the file again."""
    import uuid

    from lamin_lightning._lamin_store import LaminStore

    path = tmp_path / "model.ckpt"
    path.write_bytes(os.urandom(4096))
    key = f"cut-short-{uuid.uuid4().hex[:8]}/checkpoints/model.ckpt"
    cut = ln.Artifact(path, key=key, kind="model", skip_hash_lookup=True).save()
    ln.Artifact.objects.filter(id=cut.id).update(_aux={"so": 1})  # the mark of an upload
    cut.path.unlink()  # ... that never finished
    record = JobRecord(op="save", kind="checkpoint", key=key, local_path=str(path), store="lamindb")

    artifact = LaminStore().transfer(record, path)

    assert artifact.id != cut.id and not ln.Artifact.objects.filter(id=cut.id).exists()
    assert not artifact._storage_ongoing and artifact.path.exists()
    assert artifact.path.read_bytes() == path.read_bytes()
    artifact.delete(permanent=True)


def test_a_replayed_save_of_last_ckpt_older_than_its_committed_artifact_is_dropped(
    ln: Any, tmp_path: Path
) -> None:
    """The save of last.ckpt fails for good and stays in the outbox; a later fit with
    outbox=False (or LaminDB's own callback) commits a newer last.ckpt. Replayed,
    the old save replaced the newer artifact: the store's last.ckpt held the older file
    while the folder holds the newer one. Now the replay is dropped, with a warning."""
    dirpath = tmp_path / "ckpt"
    first = ll.Checkpoint(
        dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=1, on_error="warn"
    )
    first._artifact_publisher = _FailOnce("last.ckpt")
    with pytest.warns(UserWarning, match="could not be persisted"):
        fit(first, tmp_path, steps=1)
    prefix = first.checkpoint_key_prefix
    assert [r.key.rsplit("/", 1)[1] for r in _pending(dirpath)] == ["last.ckpt"]
    newer = ll.Checkpoint(
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        enable_version_counter=False,  # last.ckpt again, as a resumed fit names it
        outbox=False,
    )
    fit(newer, tmp_path, steps=2)
    folder = lamin_stats(dirpath / "last.ckpt")["hash"]
    assert ln.Artifact.filter(key=f"{prefix}/last.ckpt").one().hash == folder

    flushed = _cli("flush", "--no-progress", str(dirpath))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert "not replaying the save of" in flushed.stderr
    assert _pending(dirpath) == []
    stored = ln.Artifact.filter(key=f"{prefix}/last.ckpt")
    assert [a.hash for a in stored] == [folder], "the replay brought the older file back"


def _killed_when_parked(tmp_path: Path, *args: str, steps: int = 8) -> None:
    """Run ``outbox_train.py`` with ``args`` (a ``--park-at``) until the thread that reaches
    the step says so (the marker), then SIGKILL the process from here."""
    marker = tmp_path / "marker"
    marker.unlink(missing_ok=True)
    proc = _start(tmp_path, "plain", *args, steps=steps)
    try:
        _wait_for_marker(proc, marker)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _flushed_by_the_script(tmp_path: Path) -> dict[str, Any]:
    """``outbox_train.py --flush``: the replay's events and what it left pending."""
    flushed = _start(tmp_path, "plain", "--flush")
    out, _ = flushed.communicate(timeout=600)
    assert flushed.returncode == 0, out
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    return report


def _assert_each_file_persisted_once_with_its_features(ln: Any, prefix: str, dirpath: Path) -> None:
    """Every checkpoint in the folder has exactly one artifact (nothing evicted is left),
    its bytes; one value of each feature, its score the one Lightning saved in the file;
    one best and one last checkpoint; nothing pending."""
    import torch
    from lamindb_tier import artifact_features, single

    stored = assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    values = {key: single(artifact_features(ln, artifact)) for key, artifact in stored.items()}
    for key, features in values.items():
        state = torch.load(dirpath / key.rsplit("/", 1)[1], map_location="cpu", weights_only=False)
        (saved,) = [s for s in state["callbacks"].values() if "current_score" in s]
        assert features["score"] == pytest.approx(float(saved["current_score"])), key
    assert [k for k, v in values.items() if v.get("is_best_model") is True] != []
    assert len([k for k, v in values.items() if v.get("is_best_model") is True]) == 1, values
    assert len([k for k, v in values.items() if v.get("is_last_model") is True]) == 1, values
    ranks = [v["model_rank"] for v in values.values() if "model_rank" in v]
    assert sorted(ranks) == list(range(len(ranks))), values
    assert _pending(dirpath) == []


# Steps of the committer not covered by KILL_STEPS: the kill lands between them.
# Two of the commit's steps in the suite (each case is two processes, ~30 s); the crash
# sweep (crash_sweep.py, by hand) draws every step, "transferred" and "flagged" included,
# in random configurations.
COMMIT_STEPS = [
    ("annotated", 3),  # annotated, its flags and ranks not written
    ("removal_deleted", 2),  # an evicted checkpoint's artifact deleted, its job not settled
]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "after"), COMMIT_STEPS)
def test_sigkill_from_outside_between_the_steps_of_a_commit_then_a_replay_completes_the_set(
    ln: Any, tmp_path: Path, step: str, after: int
) -> None:
    """The training process waits at a step of a commit and is SIGKILLed from here; the
    replay (a process of its own) leaves each checkpoint in the folder with exactly one
    artifact, its features and flags, no evicted one, its events marked recovered."""
    _killed_when_parked(tmp_path, "--park-at", step, "--park-after", str(after))
    prefix = (tmp_path / "report.prefix").read_text()
    dirpath = tmp_path / "ckpt"
    assert _pending(dirpath)
    report = _flushed_by_the_script(tmp_path)
    assert report["remaining"] == []
    assert report["events"] and all(e["recovered"] for e in report["events"]), report
    assert [e for e in report["events"] if e["type"] == "ArtifactFailedEvent"] == []
    _assert_each_file_persisted_once_with_its_features(ln, prefix, dirpath)


# Steps of a replay (the second process's), each after a training run killed where the
# replay is sure to reach it: saves never transferred (the intake thread waits at its fourth
# staging; one job at a time, the older last.ckpt is committed by then), or a removal of a
# committed checkpoint (one job at a time, killed once the first evicted file is in the
# trash).
UNSTAGED = ("--park-at", "staged", "--park-after", "4")
EVICTED = ("--max-pending", "1", "--park-at", "trashed", "--park-after", "1")
# A subset in the suite (each case is three processes): the commit's middle, and the
# replacement of an older artifact. By hand, the rest of the replay's steps:
# (UNSTAGED, "transferred"), (UNSTAGED, "flagged"), (EVICTED, "removal_deleted"),
# (UNSTAGED, "settled"), all passing when written.
REPLAY_STEPS = [
    (UNSTAGED, "annotated"),
    # a save of last.ckpt committed, its older artifact (committed first) not deleted yet
    (("--max-pending", "1", *UNSTAGED), "replacing"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("killed", "step"), REPLAY_STEPS, ids=[s for _, s in REPLAY_STEPS])
def test_a_replay_sigkilled_midway_is_completed_by_the_next_one(
    ln: Any, tmp_path: Path, killed: tuple[str, ...], step: str
) -> None:
    """Training is SIGKILLed with jobs pending; the replay that follows (a process of its
    own) is SIGKILLed at a step of its first commit; a third process replays what is
    left: each checkpoint in the folder ends with exactly one artifact, its features and
    flags, no evicted one, every event marked recovered."""
    _killed_when_parked(tmp_path, *killed)
    prefix = (tmp_path / "report.prefix").read_text()
    dirpath = tmp_path / "ckpt"
    _killed_when_parked(tmp_path, "--flush", "--park-at", step, "--park-after", "1")
    assert _pending(dirpath)
    report = _flushed_by_the_script(tmp_path)
    assert report["remaining"] == []
    assert report["events"] and all(e["recovered"] for e in report["events"]), report
    assert [e for e in report["events"] if e["type"] == "ArtifactFailedEvent"] == []
    _assert_each_file_persisted_once_with_its_features(ln, prefix, dirpath)


TWO_SCRIPT = Path(__file__).parent / "two_callbacks_train.py"


def _two_callbacks_run(
    tmp_path: Path, dirpaths: dict[str, Path | None], *extra: str, which: str = "a,b"
) -> subprocess.Popen[str]:
    """The two-callback script; a dirpath of None is the callback's ``dirpath=None``."""
    return subprocess.Popen(
        [
            sys.executable,
            str(TWO_SCRIPT),
            "--dirpath-a",
            str(dirpaths["a"] or "none"),
            "--dirpath-b",
            str(dirpaths["b"] or "none"),
            "--which",
            which,
            "--marker",
            str(tmp_path / "marker"),
            "--report",
            str(tmp_path / "report.json"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _store_equals_folders(ln: Any, dirpaths: dict[str, Path], prefixes: dict[str, str]) -> None:
    """Each folder's checkpoint files, each with exactly one artifact of its bytes under
    its folder's key prefix, nothing else under it; nothing pending in any journal."""
    for name, dirpath in dirpaths.items():
        prefix = prefixes[name]
        assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
        assert _pending(dirpath) == [], name


# Three of the six (folders x recoveries) in the suite, each recovery once; all six passed
# when written.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("shared", "then"),
    [(True, "flush"), (True, "rerun_a"), (False, "rerun_both")],
    ids=["one_folder-flush", "one_folder-rerun_a", "two_folders-rerun_both"],
)
def test_two_callbacks_sigkilled_mid_upload_then_a_replay_makes_the_store_equal_the_folders(
    ln: Any, tmp_path: Path, shared: bool, then: str
) -> None:
    """Two callbacks (different monitors and file names) in one training process, each
    with an upload in flight and jobs journaled behind it, SIGKILLed; then ``flush`` of
    the folders, a rerun with one of them only (the user dropped the other), or a resumed
    rerun with both: every checkpoint file of each folder has one artifact, nothing is
    left pending, every replayed event is marked recovered."""
    dirpaths = (
        {"a": tmp_path / "ckpt", "b": tmp_path / "ckpt"}
        if shared
        else {"a": tmp_path / "ckpt_a", "b": tmp_path / "ckpt_b"}
    )
    proc = _two_callbacks_run(tmp_path, dirpaths, "--block")
    try:
        _wait_for_marker(proc, tmp_path / "marker.parked")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    prefixes = {name: (tmp_path / f"report.{name}").read_text() for name in "ab"}
    for name in ("a", "b", "parked"):
        (tmp_path / f"marker.{name}").unlink()
    for name in "ab":
        (tmp_path / f"report.{name}").unlink()
    assert all(_pending(d) for d in dirpaths.values())
    if then == "flush":
        for dirpath in dict.fromkeys(dirpaths.values()):
            flushed = _cli("flush", "--no-progress", str(dirpath))
            assert flushed.returncode == 0, flushed.stdout + flushed.stderr
            assert "0 still pending" in flushed.stdout, flushed.stdout
    else:
        which = "a" if then == "rerun_a" else "a,b"
        rerun = _two_callbacks_run(tmp_path, dirpaths, "--resume", which=which)
        out, _ = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, out
        report = json.loads((tmp_path / "report.json").read_text())
        for name, seen in report.items():
            assert seen["prefix"] == prefixes[name]
            failed = [e for e in seen["events"] if e["type"] == "ArtifactFailedEvent"]
            assert failed == [], (name, seen)
        # Each journal replayed once, recovered: a's by a; b's by b, or by a where b is
        # gone from the trainer and a writes into b's folder.
        replayed = [
            (name, e["key"].rsplit("/", 1)[1])
            for name, seen in report.items()
            for e in seen["events"]
            if e["recovered"]
        ]
        assert ("a", "a-step=4.ckpt") in replayed, replayed
        b_by = "b" if then == "rerun_both" else "a" if shared else None
        assert [n for n, f in replayed if f == "b-step=5.ckpt"] == ([b_by] if b_by else [])
        if then == "rerun_a" and not shared:
            # b's folder is nobody's in this run: its journal waits for a flush.
            assert _pending(dirpaths["b"])
            flushed = _cli("flush", "--no-progress", str(dirpaths["b"]))
            assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    _store_equals_folders(ln, dirpaths, prefixes)


@pytest.mark.slow
def test_two_callbacks_sigkilled_in_one_folder_then_one_moved_elsewhere_the_rerun_replays_both(
    ln: Any, tmp_path: Path
) -> None:
    """Two callbacks in one folder SIGKILLed with jobs pending; the rerun (resumed) moves
    one of them (``b``) to a folder of its own. ``b``'s journal in the first folder is
    nobody's in this trainer any more: ``a`` replays it, as it replays the journal of a
    callback the user dropped."""
    shared = tmp_path / "ckpt"
    proc = _two_callbacks_run(tmp_path, {"a": shared, "b": shared}, "--block")
    try:
        _wait_for_marker(proc, tmp_path / "marker.parked")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    prefix = (tmp_path / "report.a").read_text()
    assert (tmp_path / "report.b").read_text() == prefix
    assert _pending(shared)
    moved = {"a": shared, "b": tmp_path / "ckpt_b"}
    rerun = _two_callbacks_run(tmp_path, moved, "--resume")
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [e for e in report["a"]["events"] if e["type"] == "ArtifactFailedEvent"] == []
    replayed = {e["key"].rsplit("/", 1)[1] for e in report["a"]["events"] if e["recovered"]}
    assert "b-step=5.ckpt" in replayed, report["a"]["events"]
    assert _pending(shared) == []
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(shared, prefix))


# Two of the four (counter x recovery) in the suite; all four passed when written.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("counter", "then"),
    [(True, "flush"), (False, "rerun_both")],
    ids=["version_counter-flush", "no_counter-rerun_both"],
)
def test_two_callbacks_of_one_template_sigkilled_then_a_replay_makes_the_store_equal_the_folder(
    ln: Any, tmp_path: Path, counter: bool, then: str
) -> None:
    """Two callbacks of one ``filename`` template in one folder (without the version
    counter each overwrites and evicts the other's files, as ``ModelCheckpoint`` does)
    SIGKILLed with uploads in flight and jobs journaled behind them; their two journals
    hold jobs of the same keys. A flush, or a resumed rerun with both, leaves each file
    of the folder with one artifact of its bytes and nothing pending."""
    dirpath = tmp_path / "ckpt"
    dirpaths = {"a": dirpath, "b": dirpath}
    options = ["--filename", "{step}", *([] if counter else ["--no-counter"])]
    proc = _two_callbacks_run(tmp_path, dirpaths, "--block", *options)
    try:
        _wait_for_marker(proc, tmp_path / "marker.parked")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    prefix = (tmp_path / "report.a").read_text()
    for name in ("a", "b", "parked"):
        (tmp_path / f"marker.{name}").unlink()
    assert _pending(dirpath)
    if then == "flush":
        flushed = _cli("flush", "--no-progress", str(dirpath))
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    else:
        rerun = _two_callbacks_run(tmp_path, dirpaths, "--resume", *options)
        out, _ = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, out
        report = json.loads((tmp_path / "report.json").read_text())
        for seen in report.values():
            assert [e for e in seen["events"] if e["type"] == "ArtifactFailedEvent"] == []
    _store_equals_folders(ln, {"a": dirpath}, {"a": prefix})


def _two_callbacks_killed(
    tmp_path: Path, dirpaths: dict[str, Path | None], *extra: str
) -> dict[str, tuple[str, Path]]:
    """Run the two-callback script until both have an upload in flight and jobs journaled
    behind it, SIGKILL it; each callback's key prefix and folder (Lightning's choice where
    its dirpath is None)."""
    proc = _two_callbacks_run(tmp_path, dirpaths, "--block", *extra)
    try:
        _wait_for_marker(proc, tmp_path / "marker.parked")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    where = {}
    for name in "ab":
        report = tmp_path / f"report.{name}"
        folder = report.with_name(f"{report.name}.dir")
        where[name] = (report.read_text(), Path(folder.read_text()))
        report.unlink()
        folder.unlink()
    for name in ("a", "b", "parked"):
        (tmp_path / f"marker.{name}").unlink(missing_ok=True)  # --free: no marker
    return where


def _flags_by_file(ln: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """is_best_model, is_last_model and model_rank of each checkpoint under ``prefix``, by
    file name (one value each)."""
    from lamindb_tier import artifact_features, single

    return {
        key.rsplit("/", 1)[1]: {
            name: value
            for name, value in single(artifact_features(ln, artifact)).items()
            if name in ("is_best_model", "is_last_model", "model_rank")
        }
        for key, artifact in artifacts_under(ln, prefix).items()
        if key.endswith(".ckpt")
    }


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a,b", "b,a"], ids=["kept_first", "derived_first"])
def test_two_callbacks_sigkilled_in_one_folder_then_one_with_no_dirpath_the_rerun_replays_both(
    ln: Any, tmp_path: Path, which: str
) -> None:
    """Two callbacks in one folder SIGKILLed with jobs pending; in the rerun (resumed) one
    of them (``b``) has ``dirpath=None``, so Lightning derives a folder of its own for it
    at setup (``default_root_dir/checkpoints``). ``b``'s journal in the first folder is
    nobody's in this trainer any more: ``a`` replays it, whichever callback is set up
    first (before, ``a`` took ``b`` for a callback that may write there, left its journal
    to it when ``a`` came first, and ``b``'s pending saves were never persisted)."""
    shared = tmp_path / "ckpt"
    where = _two_callbacks_killed(tmp_path, {"a": shared, "b": shared})
    prefix = where["a"][0]
    assert where["b"] == (prefix, shared)
    assert _pending(shared)
    rerun = _two_callbacks_run(
        tmp_path, {"a": shared, "b": None}, "--resume", "--root", str(tmp_path), which=which
    )
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert Path(report["b"]["dirpath"]) == tmp_path / "checkpoints"
    for seen in report.values():
        assert [e for e in seen["events"] if e["type"] == "ArtifactFailedEvent"] == []
    replayed = [
        (name, e["key"].rsplit("/", 1)[1])
        for name, seen in report.items()
        for e in seen["events"]
        if e["recovered"]
    ]
    assert [n for n, f in replayed if f == "b-step=5.ckpt"] == ["a"], replayed
    assert _pending(shared) == []
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(shared, prefix))


def _replayed_by_its_own_callback(report: dict[str, Any]) -> None:
    """No failure; each callback replayed checkpoints, only its own (``a-*`` and
    ``last.ckpt`` are ``a``'s, ``b-*`` and ``last-v1.ckpt`` ``b``'s), each job once."""
    for seen in report.values():
        assert [e for e in seen["events"] if e["type"] == "ArtifactFailedEvent"] == []
    replayed = [
        (name, e["type"], e["key"])
        for name, seen in report.items()
        for e in seen["events"]
        if e["recovered"] and e["key"].endswith(".ckpt")
    ]
    owner = {"last.ckpt": "a", "last-v1.ckpt": "b"}
    for name, _, key in replayed:
        file = key.rsplit("/", 1)[1]
        assert owner.get(file, file[0]) == name, replayed
    assert {name for name, _, _ in replayed} == {"a", "b"}, replayed
    saves = [(t, k) for _, t, k in replayed if t == "ArtifactSavedEvent"]
    assert len(saves) == len(set(saves)), replayed


# The flags an uninterrupted fit of the two callbacks leaves in their folder (measured
# with ModelCheckpoint's semantics, as the reference writes them): is_last_model on the
# save made last (b's last-v1.ckpt), is_best_model on the last save that was its
# callback's best, model_rank over the kept checkpoints of the callback that saved last.
_NOT_FLAGGED = {"is_best_model": False, "is_last_model": False}
FLAGS_AFTER_8_STEPS = {
    "a-step=6.ckpt": _NOT_FLAGGED,
    "a-step=8.ckpt": {"is_best_model": True, "is_last_model": False},
    "b-step=5.ckpt": {**_NOT_FLAGGED, "model_rank": 1},
    "b-step=7.ckpt": {**_NOT_FLAGGED, "model_rank": 0},
    "last-v1.ckpt": {"is_best_model": False, "is_last_model": True},
    "last.ckpt": _NOT_FLAGGED,
}
FLAGS_AFTER_5_STEPS = {
    "a-step=2.ckpt": _NOT_FLAGGED,
    "a-step=4.ckpt": _NOT_FLAGGED,
    "b-step=3.ckpt": {**_NOT_FLAGGED, "model_rank": 1},
    "b-step=5.ckpt": {"is_best_model": True, "is_last_model": False, "model_rank": 0},
    "last-v1.ckpt": {"is_best_model": False, "is_last_model": True},
    "last.ckpt": _NOT_FLAGGED,
}


@pytest.mark.slow
def test_two_callbacks_with_no_dirpath_sigkilled_then_a_resumed_rerun_ends_with_the_right_flags(
    ln: Any, tmp_path: Path
) -> None:
    """Two callbacks with ``dirpath=None`` (one folder, the logger's version ``fixed``)
    SIGKILLed with jobs pending, then the script rerun, resumed, with every upload held
    until training ended, so that the replays commit after the rerun's own saves. The
    replays persist the first run's saves, each by its callback, and the flags end as an
    uninterrupted fit leaves them (before, a replay committed last counted as the newest
    save: is_last_model, is_best_model and model_rank followed an old checkpoint)."""
    none: dict[str, Path | None] = {"a": None, "b": None}
    options = ["--root", str(tmp_path), "--logger", "fixed"]
    where = _two_callbacks_killed(tmp_path, none, *options)
    prefix, folder = where["a"]
    assert where["b"] == (prefix, folder)
    assert folder == tmp_path / "lightning_logs" / "fixed" / "checkpoints"
    assert _pending(folder)
    rerun = _two_callbacks_run(tmp_path, none, *options, "--resume", "--hold")
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    _replayed_by_its_own_callback(json.loads((tmp_path / "report.json").read_text()))
    assert _pending(folder) == []
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(folder, prefix))
    assert _flags_by_file(ln, prefix) == FLAGS_AFTER_8_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("which", ["a,b", "b,a"], ids=["same_order", "swapped"])
def test_two_callbacks_with_no_dirpath_sigkilled_then_the_next_logger_version_replays_the_first(
    ln: Any, tmp_path: Path, which: str
) -> None:
    """Two callbacks with ``dirpath=None`` under a CSV logger (``version_0``) SIGKILLed with
    jobs pending; the rerun (callbacks in either order) checkpoints into ``version_1`` and
    replays what each callback left in ``version_0``, by that callback, once; ``version_0``
    ends as an uninterrupted fit of its five steps leaves it: every checkpoint persisted
    once under its key, nothing pending, the flags of its last save (b's), whichever
    callback's replay commits last."""
    none: dict[str, Path | None] = {"a": None, "b": None}
    options = ["--root", str(tmp_path), "--logger"]
    where = _two_callbacks_killed(tmp_path, none, *options)
    prefix, folder = where["a"]
    assert where["b"] == (prefix, folder)
    assert folder == tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert _pending(folder)
    rerun = _two_callbacks_run(tmp_path, none, *options, "--hold", which=which)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert {Path(seen["dirpath"]).parent.name for seen in report.values()} == {"version_1"}
    _replayed_by_its_own_callback(report)
    assert _pending(folder) == []
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(folder, prefix))
    assert _flags_by_file(ln, prefix) == FLAGS_AFTER_5_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("touched", [False, True], ids=["as_left", "first_journal_touched"])
def test_two_callbacks_with_no_dirpath_sigkilled_then_a_flush_of_their_version_folder(
    ln: Any, tmp_path: Path, touched: bool
) -> None:
    """Two callbacks with ``dirpath=None`` under a CSV logger SIGKILLed with jobs pending;
    nothing reruns: ``lamin-lightning flush`` of the folder Lightning chose for them
    (``lightning_logs/version_0/checkpoints``) persists both journals, and the folder ends
    as an uninterrupted fit of its five steps leaves it, flags included. Also where ``a``'s
    journal was written last (a line settling one of its earlier jobs, after ``b``'s last
    save): before, the flush replayed journal after journal, the most recently written
    last, and the flags followed ``a``'s last save, not the save made last."""
    none: dict[str, Path | None] = {"a": None, "b": None}
    where = _two_callbacks_killed(tmp_path, none, "--root", str(tmp_path), "--logger")
    prefix, folder = where["a"]
    assert folder == tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    if touched:
        (journal,) = [
            path
            for path in journal_paths(staging_root(folder))
            if any("/a-step=" in r.key for _, r in read_pending(path))
        ]
        os.utime(journal)
        assert journal_paths(staging_root(folder))[-1] == journal
    flushed = _cli("flush", "--no-progress", str(folder))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert "0 still pending" in flushed.stdout, flushed.stdout
    assert _pending(folder) == []
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(folder, prefix))
    assert _flags_by_file(ln, prefix) == FLAGS_AFTER_5_STEPS


def _flags_of_uninterrupted_fit(
    ln: Any, tmp_path: Path, shared: bool, steps: int
) -> dict[str, Any]:
    """By file name, the flags an uninterrupted fit of ``steps`` steps with the two
    callbacks leaves (in ``tmp_path/uninterrupted``): one folder, or one each."""
    root = tmp_path / "uninterrupted"
    root.mkdir()
    dirpaths: dict[str, Path | None] = (
        {"a": root / "ckpt", "b": root / "ckpt"}
        if shared
        else {"a": root / "ckpt_a", "b": root / "ckpt_b"}
    )
    proc = _two_callbacks_run(root, dirpaths, "--steps", str(steps))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    report = json.loads((root / "report.json").read_text())
    flags: dict[str, Any] = {}
    for prefix in {seen["prefix"] for seen in report.values()}:
        flags.update(_flags_by_file(ln, prefix))
    return flags


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shared", "then", "free"),
    [
        pytest.param(True, "flush", "", id="one_folder-flush"),
        pytest.param(True, "rerun", "", id="one_folder-rerun"),
        pytest.param(True, "rerun_a", "", id="one_folder-rerun_a"),
        pytest.param(False, "flush", "", id="two_folders-flush"),
        *(
            pytest.param(True, then, free, id=f"one_folder-{then}-{free}_persisted")
            for then in ("flush", "rerun", "rerun_a")
            for free in "ab"
        ),
    ],
)
def test_two_callbacks_sigkilled_after_their_last_saves_end_with_the_flags_of_an_uninterrupted_fit(
    ln: Any, tmp_path: Path, shared: bool, then: str, free: str
) -> None:
    """Two callbacks (``a``: ``score`` min, ``b``: ``tier_metric`` max, top 2, save last)
    SIGKILLed once both made every save of eight steps, with the saves of both pending
    behind a blocked upload each (or of one only, the other's all persisted: ``free``);
    then ``lamin-lightning flush`` of their folder(s), or a resumed rerun with both
    (nothing left to train: the replays only). The flags end as an uninterrupted fit of
    eight steps leaves them. Before, the flush replayed both callbacks' journals through
    one store, which flagged as best the best of the callback that saved last
    (``b-step=7.ckpt``), not the last save that was its callback's best
    (``a-step=8.ckpt``), as the fit, the reference and a rerun do. And where one
    callback's saves were all persisted before the crash, the replay of the other's
    knew only its own journal: it flagged its callback's best (``a`` persisted), or its
    callback's last save and ranking (``b`` persisted); it now starts from what every
    journal of the folder says was committed, read before the flush (or a setup)
    deletes a journal with nothing pending."""
    expected = _flags_of_uninterrupted_fit(ln, tmp_path, shared, 8)
    if shared:
        assert expected == FLAGS_AFTER_8_STEPS
    dirpaths: dict[str, Path | None] = (
        {"a": tmp_path / "ckpt", "b": tmp_path / "ckpt"}
        if shared
        else {"a": tmp_path / "ckpt_a", "b": tmp_path / "ckpt_b"}
    )
    where = _two_callbacks_killed(
        tmp_path, dirpaths, "--steps", "9", "--park-step", "8", "--free", free
    )
    folders = {name: folder for name, (_, folder) in where.items()}
    assert all(_pending(folder) for folder in folders.values())
    if then == "flush":
        for folder in dict.fromkeys(folders.values()):
            flushed = _cli("flush", "--no-progress", str(folder))
            assert flushed.returncode == 0, flushed.stdout + flushed.stderr
            assert "0 still pending" in flushed.stdout, flushed.stdout
    else:
        which = "a" if then == "rerun_a" else "a,b"  # rerun_a: the user dropped b
        rerun = _two_callbacks_run(tmp_path, dirpaths, "--resume", "--steps", "8", which=which)
        out, _ = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, out
    flags: dict[str, Any] = {}
    for name, (prefix, folder) in where.items():
        assert _pending(folder) == [], name
        assert_checkpoint_keys_persisted(ln, prefix, _on_disk(folder, prefix))
        flags.update(_flags_by_file(ln, prefix))
    assert flags == expected


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["exception", "ctrl_c"])
@pytest.mark.parametrize("again", ["a,b", "a"], ids=["both_again", "a_only_again"])
def test_two_callbacks_fit_again_in_the_same_process_end_with_the_flags_of_an_uninterrupted_fit(
    ln: Any, tmp_path: Path, stop: str, again: str
) -> None:
    """Two callbacks in one folder (as ``two_callbacks_train.py``), whose uploads fail
    after each one's first (``on_error="warn"``: training goes on), stopped at the start
    of step 9 by an exception or Ctrl+C (Lightning's graceful shutdown, then
    ``SystemExit``): their failed saves stay in the journals. In the same process, a new
    trainer with two new callbacks, or with ``a`` only (resumed, nothing left to train),
    replays them at setup: the stores share the folder's flags (``_PrefixFlags``) with
    each other, not with the first fit's, and the flags end as an uninterrupted fit of
    eight steps leaves them."""
    import lightning.pytorch as pl
    from outbox_train import SCORES

    from lamin_lightning import PermanentError

    class FailAfterFirst(LaminArtifactPublisher):
        def __init__(self) -> None:
            self.count = 0

        def create_artifact(self, local_path: Any, **kwargs: Any) -> Any:
            if str(kwargs.get("key", "")).endswith(".ckpt"):
                self.count += 1
                if self.count > 1:
                    raise PermanentError("storage refuses the upload")
            return super().create_artifact(local_path, **kwargs)

    class Stop(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == 8:
                raise KeyboardInterrupt if stop == "ctrl_c" else RuntimeError("stopped")

    dirpath = tmp_path / "ckpt"

    def callbacks(failing: bool, which: str = "a,b") -> list[ll.Checkpoint]:
        made = []
        for name, monitor, mode in (("a", "score", "min"), ("b", "tier_metric", "max")):
            if name not in which.split(","):
                continue
            callback = ll.Checkpoint(
                dirpath=dirpath,
                monitor=monitor,
                mode=mode,
                filename=f"{name}-{{step}}",
                save_top_k=2,
                save_last=True,
                every_n_train_steps=1,
                max_workers=2,
                flush_timeout=120,
                on_error="warn" if failing else "raise",  # training goes on
            )
            if failing:
                callback._artifact_publisher = FailAfterFirst()
            made.append(callback)
        return made

    first = callbacks(failing=True)
    trainer = make_trainer(tmp_path, [*first, Stop()], max_steps=9, logger=False)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if stop == "ctrl_c" else RuntimeError):
            trainer.fit(TierModel(scores=SCORES), datamodule=TierData(n=9))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl+C once it had one
    assert len({r.key for r in _pending(dirpath)}) > 4
    prefix = first[0].checkpoint_key_prefix
    assert first[1].checkpoint_key_prefix == prefix
    second = callbacks(failing=False, which=again)
    trainer = make_trainer(tmp_path, second, max_steps=8, logger=False)
    trainer.fit(TierModel(scores=SCORES), datamodule=TierData(n=8), ckpt_path="last")
    assert _pending(dirpath) == []
    assert_checkpoint_keys_persisted(ln, prefix, _on_disk(dirpath, prefix))
    assert _flags_by_file(ln, prefix) == FLAGS_AFTER_8_STEPS
