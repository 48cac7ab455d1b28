"""A checkpoint moved aside for its rewrite comes back after a crash (issue 12, item 5).

Before a synchronous rewrite (``last.ckpt``) the previous file is renamed into the
working folder's ``aside/``. A process that dies before the rewrite is done leaves it
there: the checkpoint folder lacks ``last.ckpt`` (or holds it cut short) while the store
holds the previous one. ``setup``, Lightning's ``ckpt_path="last"`` lookup and
``lamin-lightning flush`` put it back; what a live process has aside is left alone.

The crashed processes here are real ones: a child moves the file aside through the same
function the callback uses, optionally writes the new file, and exits without cleaning up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from helpers import TinyModel, loader, make_trainer, sha256_file
from lamin_lightning import _aside
from lamin_lightning._checkpoint_io import rewrites_by_rename
from lamin_lightning._flush import flush_directory
from lamin_lightning._staging import staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from lamin_lightning import _aside
    root, target, then = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if then.startswith("linked"):
        _aside.link_aside(root, target)
    else:
        _aside.move_aside(root, target)
    if then == "linked, renamed over":
        import torch
        torch.save({"new": 1}, target + ".tmp")
        os.replace(target + ".tmp", target)
    if then == "truncated":
        Path(target).write_bytes(b"PK\\x03\\x04 cut short")
    elif then == "one shard of three":  # a folder checkpoint's writer, killed midway
        Path(target).mkdir()
        (Path(target) / "shard-0.distcp").write_bytes(b"new")
    elif then == "three shards":  # written whole, killed before the previous one went
        Path(target).mkdir()
        for n in range(3):
            (Path(target) / f"shard-{n}.distcp").write_bytes(b"new" * (n + 1))
    elif then == "three shards, same sizes":
        Path(target).mkdir()
        for n in range(3):
            (Path(target) / f"shard-{n}.distcp").write_bytes(bytes([9]) * 1000)
    elif then == "complete":
        import torch
        torch.save({"new": 1}, target)
    elif then == "wait":
        print("moved", flush=True)
        sys.stdin.read()
    os._exit(0)  # no cleanup, as a crash
    """
)


def _crash_mid_rewrite(dirpath: Path, name: str = "last.ckpt", then: str = "") -> None:
    """A process moves ``dirpath/name`` aside for its rewrite, maybe writes, and dies."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(staging_root(dirpath)), str(dirpath / name), then],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _aside_entries(dirpath: Path) -> list[str]:
    folder = staging_root(dirpath) / _aside.ASIDE_DIRNAME
    return (
        sorted(n for n in os.listdir(folder) if not n.endswith(".lock")) if folder.exists() else []
    )


@pytest.fixture
def last(tmp_path: Path) -> Path:
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    torch.save({"step": 1}, dirpath / "last.ckpt")
    return dirpath / "last.ckpt"


def test_a_checkpoint_whose_rewrite_a_crash_cut_short_before_it_was_written_is_put_back(
    last: Path,
) -> None:
    digest = sha256_file(last)
    _crash_mid_rewrite(last.parent)
    assert not last.exists() and len(_aside_entries(last.parent)) == 1

    assert _aside.put_back_in(last.parent) == [last]
    assert sha256_file(last) == digest
    assert _aside_entries(last.parent) == []
    # Nothing left to do: a second look changes nothing.
    assert _aside.put_back_in(last.parent) == []
    assert sha256_file(last) == digest


def test_a_rewrite_cut_short_mid_write_gives_way_to_the_previous_checkpoint(last: Path) -> None:
    digest = sha256_file(last)
    _crash_mid_rewrite(last.parent, then="truncated")
    assert sha256_file(last) != digest

    assert _aside.put_back_in(last.parent) == [last]
    assert sha256_file(last) == digest
    assert torch.load(last, weights_only=True) == {"step": 1}
    assert _aside_entries(last.parent) == []


def test_a_rewrite_that_finished_before_the_crash_is_kept_and_the_previous_file_deleted(
    last: Path,
) -> None:
    _crash_mid_rewrite(last.parent, then="complete")
    assert _aside.put_back_in(last.parent) == []
    assert torch.load(last, weights_only=True) == {"new": 1}
    assert _aside_entries(last.parent) == []


@pytest.mark.parametrize("then", ["linked", "linked, renamed over"])
def test_a_checkpoint_linked_aside_by_a_process_that_died_stays_as_it_is(
    last: Path, then: str
) -> None:
    """Killed while its rewrite ran (before or after the rename over the file), a process
    that linked the file aside left it whole in place: the leftover is deleted, nothing is
    put back over the file, and ``status`` names nothing."""
    digest = sha256_file(last)
    _crash_mid_rewrite(last.parent, then=then)
    assert len(_aside_entries(last.parent)) == 1
    assert _aside.leftovers_in(last.parent) == []

    assert _aside.put_back_in(last.parent) == []
    assert _aside_entries(last.parent) == []
    if then == "linked":
        assert sha256_file(last) == digest
    else:
        assert torch.load(last, weights_only=False) == {"new": 1}


def test_what_a_live_process_has_aside_is_left_alone_until_it_ends(last: Path) -> None:
    digest = sha256_file(last)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(staging_root(last.parent)), str(last), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "moved"
        # Mid-rewrite in a live process: putting it back would race its write.
        assert _aside.put_back_in(last.parent) == []
        assert not last.exists() and len(_aside_entries(last.parent)) == 1
    finally:
        assert child.stdin is not None
        child.stdin.close()  # it exits, without putting anything back
        child.wait(timeout=60)
    assert _aside.put_back_in(last.parent) == [last]
    assert sha256_file(last) == digest


def test_of_several_leftovers_of_one_name_the_newest_comes_back(last: Path) -> None:
    _crash_mid_rewrite(last.parent)
    torch.save({"step": 2}, last)
    os.utime(last, (os.stat(last).st_atime, os.stat(last).st_mtime + 10))
    newest = sha256_file(last)
    _crash_mid_rewrite(last.parent)
    assert len(_aside_entries(last.parent)) == 2

    assert _aside.put_back_in(last.parent) == [last]
    assert sha256_file(last) == newest
    assert _aside_entries(last.parent) == []


def test_a_leftover_named_as_before_version_0_4_is_put_back(last: Path) -> None:
    folder = staging_root(last.parent) / _aside.ASIDE_DIRNAME
    folder.mkdir(parents=True)
    digest = sha256_file(last)
    os.replace(last, folder / "4242-0-last.ckpt")
    assert _aside.put_back_in(last.parent) == [last]
    assert sha256_file(last) == digest


def test_looking_for_leftovers_creates_nothing(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpt"
    dirpath.mkdir()
    assert _aside.put_back_in(dirpath) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_callbacks_own_rewrites_leave_no_aside_folder_behind(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpt"
    callback = MemoryCheckpoint(
        MemoryStore(), dirpath=dirpath, save_last=True, every_n_train_steps=1
    )
    make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader())
    assert (dirpath / "last.ckpt").exists()
    assert not (staging_root(dirpath) / _aside.ASIDE_DIRNAME).exists()


class _SeesRewritten(pl.Callback):
    """Inside every save (another callback's ``on_save_checkpoint``, which Lightning calls
    while it builds the checkpoint), the step of the checkpoint file ``path`` holds, or
    None where it is missing; raises at step ``fail_at``."""

    def __init__(self, path: Path, fail_at: int = 0) -> None:
        self.path = path
        self.fail_at = fail_at
        self.seen: list[tuple[int, int | None]] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, *args: Any) -> None:
        held = (
            torch.load(self.path, weights_only=False)["global_step"] if self.path.exists() else None
        )
        self.seen.append((trainer.global_step, held))
        if trainer.global_step == self.fail_at:
            raise RuntimeError("the rewrite fails")


REWRITES = {
    "last.ckpt": ({"save_last": True}, "last.ckpt"),
    "a fixed name": ({"filename": "model", "enable_version_counter": False}, "model.ckpt"),
}


@pytest.mark.parametrize("rewrite", list(REWRITES))
@pytest.mark.parametrize("kind", ["ModelCheckpoint", "ours"])
def test_a_file_being_rewritten_keeps_its_name_and_the_previous_checkpoint_until_replaced(
    tmp_path: Path, kind: str, rewrite: str
) -> None:
    """Lightning writes a temporary file and renames it over the old one: while a save
    runs, the file it rewrites is still there, whole. Ours renamed it aside for the whole
    save (found by a review: another callback's hook, or a process reading last.ckpt,
    found nothing); now it gives it a second name aside instead, and the path keeps it."""
    dirpath = tmp_path / "ckpt"
    options, name = REWRITES[rewrite]
    options = {"dirpath": dirpath, "every_n_train_steps": 1, **options}
    callback = (
        ModelCheckpoint(**options)
        if kind == "ModelCheckpoint"
        else MemoryCheckpoint(MemoryStore(), **options)
    )
    probe = _SeesRewritten(dirpath / name)
    make_trainer(tmp_path, [callback, probe], max_steps=4).fit(TinyModel(), loader())

    # Every save after the first finds the file of the previous step, saved or rewritten.
    later = [(step, held) for step, held in probe.seen if step > 1]
    assert later and all(held == step - 1 for step, held in later), probe.seen
    assert torch.load(dirpath / name, weights_only=False)["global_step"] == 4
    if kind == "ours":
        assert _aside_entries(dirpath) == []


def test_a_rewrite_that_fails_leaves_the_previous_checkpoint_and_nothing_aside(
    tmp_path: Path,
) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        filename="model",
        enable_version_counter=False,
        every_n_train_steps=1,
    )
    probe = _SeesRewritten(dirpath / "model.ckpt", fail_at=3)
    with pytest.raises(RuntimeError, match="the rewrite fails"):
        make_trainer(tmp_path, [callback, probe], max_steps=4).fit(TinyModel(), loader())

    assert torch.load(dirpath / "model.ckpt", weights_only=False)["global_step"] == 2
    assert _aside_entries(dirpath) == []
    assert not (staging_root(dirpath) / "trash").exists() or not os.listdir(
        staging_root(dirpath) / "trash"
    )


class _InPlace(TorchCheckpointIO):
    """A user's CheckpointIO that writes into the file (``torch.save`` to the path)."""

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        ([], True),
        ([AsyncCheckpointIO()], False),
        ([_InPlace()], False),
        ([AsyncCheckpointIO(_InPlace())], False),
    ],
    ids=["Lightning's", "AsyncCheckpointIO", "a user's", "AsyncCheckpointIO of a user's"],
)
def test_only_lightnings_synchronous_write_counts_as_a_rewrite_by_rename(
    tmp_path: Path, plugins: list[Any], expected: bool
) -> None:
    """A file linked aside keeps its name through the rewrite: safe only where the writer
    replaces it by a rename. A writer into the file would destroy the previous checkpoint
    under both names; a late one leaves it at the name a replay would persist."""
    trainer = make_trainer(tmp_path, [], plugins=plugins)
    assert rewrites_by_rename(trainer.strategy) is expected


def test_a_user_checkpoint_io_that_writes_in_place_finds_the_previous_file_moved_away(
    tmp_path: Path,
) -> None:
    """Where the writer truncates the file (a user's CheckpointIO), the previous checkpoint
    is renamed aside for the rewrite, as before: its persisted bytes stay its own."""
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_last=True, every_n_train_steps=1)
    probe = _SeesRewritten(dirpath / "last.ckpt")
    trainer = make_trainer(tmp_path, [callback, probe], max_steps=3, plugins=[_InPlace()])
    trainer.fit(TinyModel(), loader())

    # During the rewrite of last.ckpt (the second save of each step) it was away.
    assert (3, None) in probe.seen, probe.seen
    assert torch.load(dirpath / "last.ckpt", weights_only=False)["global_step"] == 3
    assert _aside_entries(dirpath) == []


def test_ckpt_path_last_resumes_from_a_last_ckpt_a_crash_left_aside(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    first = MemoryCheckpoint(store, dirpath=dirpath, save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path, [first], max_steps=3).fit(TinyModel(), loader())
    _crash_mid_rewrite(dirpath)
    assert not (dirpath / "last.ckpt").exists()

    again = MemoryCheckpoint(store, dirpath=dirpath, save_last=True, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [again], max_steps=5)
    model = TinyModel()
    trainer.fit(model, loader(), ckpt_path="last")
    # Resumed at step 3 (not started over): two more steps, and the file is Lightning's.
    assert trainer.global_step == 5
    assert torch.load(dirpath / "last.ckpt", weights_only=False)["global_step"] == 5
    assert _aside_entries(dirpath) == []


def test_flush_puts_a_leftover_back_before_replaying(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader())
    digest = sha256_file(dirpath / "last.ckpt")
    _crash_mid_rewrite(dirpath)

    flush_directory(dirpath, progress=False, stores={"memory": store})
    assert sha256_file(dirpath / "last.ckpt") == digest
    assert _aside_entries(dirpath) == []


def _folder_checkpoint(dirpath: Path) -> Path:
    """``dirpath/last.ckpt``, a folder of three shards (a sharded strategy's checkpoint)."""
    folder = dirpath / "last.ckpt"
    folder.mkdir(parents=True)
    for n in range(3):
        (folder / f"shard-{n}.distcp").write_bytes(bytes([n]) * 1000)
    return folder


def test_a_folder_checkpoint_whose_rewrite_a_crash_cut_short_is_put_back(tmp_path: Path) -> None:
    dirpath = tmp_path / "ckpt"
    folder = _folder_checkpoint(dirpath)
    _crash_mid_rewrite(dirpath)
    assert not folder.exists()

    assert _aside.put_back_in(dirpath) == [folder]
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-{n}.distcp" for n in range(3)]
    assert (folder / "shard-2.distcp").read_bytes() == bytes([2]) * 1000


def test_status_names_a_checkpoint_a_crash_left_aside_until_flush_puts_it_back(
    tmp_path: Path,
) -> None:
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    callback = MemoryCheckpoint(store, dirpath=dirpath, save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader())
    _crash_mid_rewrite(dirpath)

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lamin_lightning._cli", "status", str(dirpath)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    before = status()
    assert before.returncode == 1, before.stdout + before.stderr
    assert f"{dirpath / 'last.ckpt'} is missing or cut short" in before.stdout
    assert _aside.leftovers_in(dirpath) == [dirpath / "last.ckpt"]
    # Looking changed nothing: the file is still aside.
    assert not (dirpath / "last.ckpt").exists()

    flush_directory(dirpath, progress=False, stores={"memory": store})
    after = status()
    assert after.returncode == 0 and "nothing pending" in after.stdout, after.stdout


@pytest.mark.parametrize("token", ["0123456789ab", "012345678901"], ids=["hex", "all-digits"])
def test_an_aside_entry_is_put_back_under_its_name_whatever_its_owners_token(
    token: str, last: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-process token in an aside entry's name is hex, so about one process in 300
    draws one of digits only: its entry was read as an older version's, and the crashed
    rewrite's last.ckpt came back as ``0-last.ckpt`` (seen once in a suite run)."""
    from lamin_lightning import _staging

    monkeypatch.setattr(_staging, "_TOKEN", token)
    assert _aside._parse(f"4242-{token}-0-last.ckpt") == (f"4242-{token}", "last.ckpt")
    assert _aside._parse("4242-3-epoch=0-step=1.ckpt") == ("4242-3", "epoch=0-step=1.ckpt")
    digest = sha256_file(last)
    _crash_mid_rewrite(last.parent)  # a child process, with a token of its own
    folder = staging_root(last.parent) / _aside.ASIDE_DIRNAME
    entry = next(n for n in os.listdir(folder) if not n.endswith(".lock"))
    child_token = entry.split("-")[1]
    (folder / entry).rename(folder / entry.replace(child_token, token, 1))
    lock = next(n for n in os.listdir(folder) if n.endswith(".lock"))
    (folder / lock).rename(folder / lock.replace(child_token, token, 1))

    assert _aside.put_back_in(last.parent) == [last]
    assert sha256_file(last) == digest


def test_a_folder_checkpoint_a_crash_cut_short_midway_through_its_rewrite_gives_way_to_the_previous(
    tmp_path: Path,
) -> None:
    """A CheckpointIO of the user's writing folders (sharded, as torch.distributed.checkpoint
    does) killed midway through the rewrite of last.ckpt leaves part of the new folder where
    the previous one was: the previous folder, whole, comes back (before, it was deleted as
    if the part were whole, and ckpt_path="last" found one shard of three)."""
    dirpath = tmp_path / "ckpt"
    folder = _folder_checkpoint(dirpath)
    _crash_mid_rewrite(dirpath, then="one shard of three")
    assert sorted(p.name for p in folder.iterdir()) == ["shard-0.distcp"]

    assert _aside.put_back_in(dirpath) == [folder]
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-{n}.distcp" for n in range(3)]
    assert (folder / "shard-0.distcp").read_bytes() == bytes([0]) * 1000
    assert _aside_entries(dirpath) == []


def _pending_save(dirpath: Path, folder: Path, staged_from: Path) -> None:
    """A journal whose pending save of ``folder`` staged a copy of ``staged_from``."""
    from lamin_lightning import JobRecord
    from lamin_lightning._journal import Outbox

    staged = staging_root(dirpath) / "staged" / "copy" / folder.name
    shutil.copytree(staged_from, staged)
    outbox = Outbox(staging_root(dirpath) / "outbox-a.jsonl")
    outbox.open()
    outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key=folder.name,
            local_path=str(folder),
            staged_path=str(staged),
            written_later=True,
        )
    )
    outbox.close()


def test_a_folder_checkpoint_rewritten_whole_and_staged_before_the_crash_is_kept(
    tmp_path: Path,
) -> None:
    """The same rewrite written whole, and staged by its pending save (a CheckpointIO that
    writes after it returns, such as AsyncCheckpointIO: the save is journaled first),
    killed before the previous folder left the aside folder: the new folder is the one the
    replay persists, so it stays, and the previous one is deleted."""
    dirpath = tmp_path / "ckpt"
    folder = _folder_checkpoint(dirpath)
    _crash_mid_rewrite(dirpath, then="three shards")
    _pending_save(dirpath, folder, staged_from=folder)

    assert _aside.put_back_in(dirpath) == []
    assert (folder / "shard-2.distcp").read_bytes() == b"new" * 3
    assert _aside_entries(dirpath) == []


def test_a_folder_rewritten_whole_but_never_journaled_gives_way_to_the_one_its_save_staged(
    tmp_path: Path,
) -> None:
    """A synchronous rewrite is journaled after it returned: killed before that, with the
    previous folder's save still pending (staged), the new folder, whole and of the same
    files and sizes, is no save's: the previous one comes back, as the replay persists it."""
    dirpath = tmp_path / "ckpt"
    folder = _folder_checkpoint(dirpath)
    _pending_save(dirpath, folder, staged_from=folder)
    _crash_mid_rewrite(dirpath, then="three shards, same sizes")

    assert _aside.put_back_in(dirpath) == [folder]
    assert (folder / "shard-2.distcp").read_bytes() == bytes([2]) * 1000
    assert _aside_entries(dirpath) == []


@pytest.mark.parametrize("mark", ["written mark", "in its line", "another folder's"])
def test_a_late_folder_rewrite_its_write_marked_complete_before_the_crash_is_kept(
    tmp_path: Path, mark: str
) -> None:
    """Under AsyncCheckpointIO the previous last.ckpt folder stays aside until the intake
    thread reaches the rewrite's job (the previous one trashed, then the new one staged),
    while the write marks the folder it completed in the journal as soon as it ends. A
    kill in between (the intake thread still staging an earlier checkpoint) left the new
    folder whole and marked, not staged: recovery took it for cut short, put the previous
    folder back and dropped the rewrite's save, so the newest checkpoint was lost, on disk
    and in the store. A marked folder is whole: it stays and its save persists it; one
    whose mark names another folder still gives way to the previous one."""
    from lamin_lightning import JobRecord
    from lamin_lightning._jobs import file_identity
    from lamin_lightning._journal import Outbox
    from lamin_lightning.testing import content_sha256

    dirpath = tmp_path / "ckpt"
    folder = _folder_checkpoint(dirpath)
    previous = content_sha256(folder)
    _crash_mid_rewrite(dirpath, then="three shards")
    new = content_sha256(folder)
    identity = file_identity(folder if mark != "another folder's" else dirpath)
    assert identity is not None
    outbox = Outbox(staging_root(dirpath) / "outbox-a.jsonl")
    outbox.open()
    job_id = outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key="checkpoints/last.ckpt",
            local_path=str(folder),
            staged_path=str(staging_root(dirpath) / "staged" / "never" / folder.name),
            store="memory",
            written_later=True,
            marks_folder=True,
            written_file=identity if mark == "in its line" else None,
        )
    )
    if mark != "in its line":
        outbox.mark_written(job_id, identity)
    outbox.close()
    assert _aside.leftovers_in(dirpath) == ([folder] if mark == "another folder's" else [])
    store = MemoryStore()

    report = flush_directory(dirpath, progress=False, stores={"memory": store})

    assert _aside_entries(dirpath) == []
    assert report.remaining == [] and report.failed == 0
    if mark == "another folder's":
        assert content_sha256(folder) == previous
        assert store.keys() == set()
    else:
        assert content_sha256(folder) == new
        assert report.dropped == []
        assert store.get("checkpoints/last.ckpt").sha256 == new  # type: ignore[union-attr]
