"""Staged copies that processes which ended left behind, and that no pending job reads.

A staged copy is a hard link: left behind, it keeps a whole checkpoint's blocks on the
disk with nothing to free them. Each process that stages holds a lock file in the staged
folder; the next setup (or ``lamin-lightning flush``) deletes the copies of owners whose
lock can be taken that no journal's pending job names. Real processes stage here, and
are killed (SIGKILL) or kept alive.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from helpers import TinyModel, checkpoint_files, loader, make_trainer, staged_copies
from lamin_lightning import PermanentError, _owners
from lamin_lightning._aside import clear_dead_staging
from lamin_lightning._flush import flush_directory
from lamin_lightning._journal import read_pending
from lamin_lightning._staging import Stager, release_staged, release_staging, staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")

STAGER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from lamin_lightning._jobs import JobRecord
    from lamin_lightning._journal import Outbox
    from lamin_lightning._staging import Stager

    root, source, journaled, end = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    stager = Stager(root)
    staged = stager.plan(source)
    if journaled == "journaled":  # as the callback does: journaled first, staged after
        outbox = Outbox(root / "outbox-child.jsonl")
        outbox.open()
        outbox.append(JobRecord(op="save", kind="checkpoint", key="k/" + staged.name,
                                local_path=source, staged_path=str(staged), store="memory"))
    stager.stage(source, staged)
    print(staged, flush=True)
    if end == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # alive until the test closes its stdin
    """
)


def stage_in_child(root: Path, source: Path, *, journaled: bool, end: str) -> tuple[Path, Any]:
    """Stage ``source`` under ``root`` in a process of its own; return the staged copy and
    the process (``end="killed"``: it is dead on return; ``"alive"``: it waits)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            STAGER,
            str(root),
            str(source),
            "journaled" if journaled else "not",
            end,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None
    staged = Path(child.stdout.readline().strip())
    assert staged.exists(), "the child staged nothing"
    if end == "killed":
        assert child.wait(timeout=60) == -signal.SIGKILL
    return staged, child


def a_checkpoint(tmp_path: Path, name: str = "a.ckpt") -> Path:
    path = tmp_path / "ckpts" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(2 << 20))  # large: staged as a hard link
    return path


def test_a_copy_a_killed_process_left_unjournaled_goes_and_a_journaled_one_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after staging: the copy of a job never journaled (``outbox=False``, a full
    disk) is deleted, and says so; the copy its journal's pending job reads is kept for
    that job's replay."""
    root = staging_root(tmp_path / "ckpts")
    orphan, _ = stage_in_child(
        root, a_checkpoint(tmp_path, "a.ckpt"), journaled=False, end="killed"
    )
    kept, _ = stage_in_child(root, a_checkpoint(tmp_path, "b.ckpt"), journaled=True, end="killed")
    assert os.stat(orphan).st_nlink == 2  # the leak: the checkpoint's blocks, twice named

    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        cleared = clear_dead_staging(root)

    assert cleared == [orphan.parent]
    assert not orphan.parent.exists() and os.stat(tmp_path / "ckpts" / "a.ckpt").st_nlink == 1
    assert kept.is_file()
    assert "deleted 1 staged copy that a process which ended left" in caplog.text
    # The dead owners' lock files go with them; nothing else is touched.
    assert sorted(p.name for p in (root / "staged").iterdir()) == [kept.parent.name]
    assert [r.staged_path for _, r in read_pending(root / "outbox-child.jsonl")] == [str(kept)]


def test_a_live_process_keeps_its_copies_whatever_the_journals_say(tmp_path: Path) -> None:
    """A process still running (its upload may be reading the copy, with ``outbox=False``
    no journal names it) keeps its copies; once it has ended they go."""
    root = staging_root(tmp_path / "ckpts")
    staged, child = stage_in_child(root, a_checkpoint(tmp_path), journaled=False, end="alive")
    try:
        assert clear_dead_staging(root) == []
        assert staged.is_file()
    finally:
        child.communicate("", timeout=60)  # it ends; its lock goes with it
    assert child.returncode == 0
    assert clear_dead_staging(root) == [staged.parent]


def test_this_process_never_clears_its_own_copies(tmp_path: Path) -> None:
    root = staging_root(tmp_path / "ckpts")
    staged, _, _ = Stager(root).stage(a_checkpoint(tmp_path))
    assert clear_dead_staging(root) == []
    assert staged.is_file()
    assert (root / "staged" / f"{_owners.owner()}.lock").exists()


def test_a_copy_without_a_lock_file_goes_only_when_its_pid_is_gone(tmp_path: Path) -> None:
    """A version that took no lock file: its pid tells, erring on keeping (PID reuse)."""
    root = staging_root(tmp_path / "ckpts")
    source = a_checkpoint(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(done.stdout)  # a pid that ended (reused within this test: kept, not lost)
    copies = {}
    for pid in (os.getppid(), gone):
        folder = root / "staged" / f"{pid}-000001-0123456789ab"
        folder.mkdir(parents=True)
        os.link(source, folder / source.name)
        copies[pid] = folder
    cleared = clear_dead_staging(root)
    assert copies[os.getppid()].exists()
    assert cleared == [copies[gone]] or os.path.exists(f"/proc/{gone}")


def test_the_next_fit_in_the_folder_clears_what_a_killed_run_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end: a copy left in the working folder by a killed run goes at the next
    fit's setup, and the fit persists its own checkpoints as ever; a flush clears too."""
    dirpath = tmp_path / "ckpts"
    root = staging_root(dirpath)
    orphan, _ = stage_in_child(
        root, a_checkpoint(tmp_path, "old.ckpt"), journaled=False, end="killed"
    )
    store = MemoryStore()
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1)
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    assert not orphan.parent.exists()
    assert "staged copy that a process which ended left" in caplog.text
    assert store.keys() == {"checkpoints/epoch=0-step=1.ckpt", "checkpoints/epoch=0-step=2.ckpt"}
    assert staged_copies(root) == []
    assert checkpoint_files(dirpath) == {"old.ckpt", "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"}
    # The fit's own lock file went with its teardown: nothing of it is left to clear.
    assert list((root / "staged").glob("*.lock")) == []

    again, _ = stage_in_child(
        root, a_checkpoint(tmp_path, "old.ckpt"), journaled=False, end="killed"
    )
    flush_directory(dirpath, timeout=60)
    assert not again.parent.exists()


def test_a_journal_that_cannot_be_read_keeps_every_copy_and_the_flush_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal the sweep cannot read might name any copy: none is deleted, with a
    warning, and ``flush`` still persists what it can (and reports that journal)."""
    dirpath = tmp_path / "ckpts"
    root = staging_root(dirpath)
    orphan, _ = stage_in_child(root, a_checkpoint(tmp_path), journaled=False, end="killed")
    (root / "outbox-unreadable.jsonl").mkdir()
    with caplog.at_level(logging.WARNING, logger="lamin_lightning"):
        assert clear_dead_staging(root) == []
        report = flush_directory(dirpath, timeout=60, progress=False)
    assert orphan.is_file()
    assert "cannot be read" in caplog.text
    assert report.unreadable


def test_a_flush_in_this_process_lets_go_of_what_it_staged_for_a_replay(tmp_path: Path) -> None:
    """A replay stages a save its killed process journaled and never staged: the copy is
    the dead owner's, kept by the pending job; this process keeps no lock file there."""
    dirpath = tmp_path / "ckpts"
    root = staging_root(dirpath)
    source = a_checkpoint(tmp_path)
    staged, _ = stage_in_child(root, source, journaled=True, end="killed")
    shutil.rmtree(staged.parent)  # as if killed before the staging
    store = MemoryStore()
    report = flush_directory(dirpath, timeout=60, progress=False, stores={"memory": store})
    assert report.remaining == [] and store.keys() == {f"k/{source.name}"}
    assert str(root / "staged") not in _owners._held
    assert list((root / "staged").iterdir()) == []


def test_a_child_forked_while_a_staging_holds_the_owners_lock_can_stage(tmp_path: Path) -> None:
    """The lock around taking a lock file is not inherited held by a forked child (a
    DataLoader worker, ``ddp_fork``), which would otherwise hang at its first staging."""
    root = staging_root(tmp_path / "ckpts")
    source = a_checkpoint(tmp_path)
    with _owners.folder_lock(root / "staged"):
        pid = os.fork()
        if pid == 0:  # the child: stage, then end without Python's cleanup
            signal.alarm(60)
            try:
                Stager(root).stage(source)
                os._exit(0)
            except BaseException:
                os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_an_owner_that_took_a_new_lock_file_meanwhile_is_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweeper opened the owner's lock file; the owner then let go of it (a callback
    stopped) and took a new one (another callback stages): the sweeper's lock on the old
    file says nothing, and the owner's new lock file stays."""
    root = staging_root(tmp_path / "ckpts")
    folder = root / "staged"
    stager = Stager(root)
    staged, _, _ = stager.stage(a_checkpoint(tmp_path))
    release_staged(staged)
    me = _owners.owner()
    real_flock = _owners.fcntl.flock
    raced = []

    def flock_after_the_owner_moved_on(fd: int, operation: int) -> None:
        if not raced:  # between the sweeper's open and its lock
            raced.append(True)
            release_staging(root)
            stager.stage(a_checkpoint(tmp_path, "b.ckpt"))
        real_flock(fd, operation)

    monkeypatch.setattr(_owners.fcntl, "flock", flock_after_the_owner_moved_on)
    with _owners.dead_owner(folder, me) as dead:
        assert raced and not dead
    assert (folder / f"{me}.lock").exists()
    assert str(folder) in _owners._held


def test_a_working_folder_deleted_under_a_live_process_gets_its_lock_file_back(
    tmp_path: Path,
) -> None:
    root = staging_root(tmp_path / "ckpts")
    stager = Stager(root)
    stager.stage(a_checkpoint(tmp_path))
    shutil.rmtree(root)
    staged, _, _ = stager.stage(a_checkpoint(tmp_path, "b.ckpt"))
    lock = root / "staged" / f"{_owners.owner()}.lock"
    assert lock.exists() and staged.is_file()
    assert os.path.samestat(os.fstat(_owners._held[str(root / "staged")]), os.stat(lock))


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
def test_the_copy_of_a_failed_save_goes_once_a_later_save_of_its_key_commits(
    tmp_path: Path, async_write: bool
) -> None:
    """A save that fails for good keeps its staged copy, for a replay; a later save of the
    key that commits makes that replay moot, and the copy goes with it, in this live
    process (it stayed, a hard link holding a whole checkpoint, until another process
    swept it after this one had ended)."""
    dirpath = tmp_path / "ckpts"
    store = MemoryStore()
    store.fail_next(1, lambda: PermanentError("the first upload fails for good"))
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
        async_write=async_write,
    )
    observer = RecordingObserver()
    callback.add_artifact_observer(observer)

    class OneAtATime(TinyModel):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            callback.flush()  # no save supersedes the one before: the first one fails

    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    with pytest.warns(UserWarning, match="could not be persisted"):
        trainer.fit(OneAtATime(width=512), loader(3, width=512))
    assert [type(e).__name__ for e in observer.events] == [
        "ArtifactFailedEvent",
        "ArtifactSavedEvent",
        "ArtifactSavedEvent",
    ]
    assert staged_copies(staging_root(dirpath)) == []
    assert store.keys() == {"checkpoints/last.ckpt"}


def test_without_an_outbox_a_failed_saves_copy_goes_at_once_and_its_file_stays(
    tmp_path: Path,
) -> None:
    """With ``outbox=False`` no replay can ever read a failed save's staged copy."""
    dirpath = tmp_path / "ckpts"
    store = MemoryStore()
    store.fail_always(lambda: PermanentError("storage refuses everything"))
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, save_top_k=-1, every_n_train_steps=1, outbox=False
    )
    callback.on_error = "warn"
    with pytest.warns(UserWarning, match="could not be persisted"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(
            TinyModel(width=512), loader(2, width=512)
        )
    assert staged_copies(staging_root(dirpath)) == []
    assert checkpoint_files(dirpath) == {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"}
    assert store.keys() == set()


def test_a_folder_checkpoint_a_killed_process_left_staged_goes_whole(tmp_path: Path) -> None:
    """A sharded checkpoint is staged as a folder of links: the sweep deletes the whole
    tree, and the files in the checkpoint folder keep one name each again."""
    root = staging_root(tmp_path / "ckpts")
    folder = tmp_path / "ckpts" / "epoch=0-step=1.ckpt"
    (folder / "shards").mkdir(parents=True)
    for name in ("shards/0.distcp", "shards/1.distcp", ".metadata"):
        (folder / name).write_bytes(os.urandom(2 << 20))
    staged, _ = stage_in_child(root, folder, journaled=False, end="killed")
    assert staged.is_dir() and os.stat(folder / "shards" / "0.distcp").st_nlink == 2

    assert clear_dead_staging(root) == [staged.parent]
    assert not staged.parent.exists()
    assert all(os.stat(p).st_nlink == 1 for p in folder.rglob("*") if p.is_file())
    assert staged_copies(root) == []
