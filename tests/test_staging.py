"""Staging: a second name for the bytes Lightning wrote, safe against rewrite and removal."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import TinyModel, loader, make_trainer, sha256_file
from lamin_lightning import _owners, _staging
from lamin_lightning._staging import (
    SMALL_FILE_BYTES,
    Stager,
    detach_before_rewrite,
    link_is_safe,
    release_staged,
    stage_file,
    staging_root,
    working_folders,
)
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore


def write(path: Path, size: int, fill: bytes = b"a") -> Path:
    path.write_bytes(fill * size)
    return path


def test_the_working_folder_sits_beside_the_checkpoint_directory(tmp_path: Path) -> None:
    """Staging and outbox live in .{name}.lamin-lightning next to dirpath, never inside it;
    recovery looks there first and in the folder earlier versions used inside dirpath."""
    dirpath = tmp_path / "ckpts"
    assert staging_root(dirpath) == tmp_path / ".ckpts.lamin-lightning"
    assert staging_root(str(dirpath) + "/") == tmp_path / ".ckpts.lamin-lightning"
    assert working_folders(dirpath) == [
        tmp_path / ".ckpts.lamin-lightning",
        dirpath / ".lamin-lightning",
    ]
    assert working_folders(tmp_path / ".ckpts.lamin-lightning") == [
        tmp_path / ".ckpts.lamin-lightning"
    ]
    assert working_folders(dirpath / ".lamin-lightning") == [dirpath / ".lamin-lightning"]


def test_small_files_are_copied_and_keep_their_name(tmp_path: Path) -> None:
    """A small file is copied into a unique folder under its own base name."""
    source = write(tmp_path / "hparams.yaml", 100)
    root = staging_root(tmp_path)
    first, size, method = stage_file(source, root)
    second, _, _ = stage_file(source, root)
    assert (size, method) == (100, "copy")
    assert first.name == second.name == "hparams.yaml"
    assert first != second
    assert first.parent.parent == root / "staged"
    assert first.read_bytes() == source.read_bytes()
    assert os.stat(first).st_ino != os.stat(source).st_ino
    source.write_bytes(b"rewritten in place")  # loggers do this
    assert first.read_bytes() == b"a" * 100


def test_large_files_are_hard_linked_and_survive_rename_over_and_removal(tmp_path: Path) -> None:
    """A large file is hard-linked; renaming over or deleting the original keeps its bytes."""
    if not link_is_safe(tmp_path):
        pytest.skip("tmp_path is not on the temp dir's filesystem")
    source = write(tmp_path / "last.ckpt", SMALL_FILE_BYTES, b"1")
    staged, size, method = stage_file(source, staging_root(tmp_path))
    assert (size, method) == (SMALL_FILE_BYTES, "link")
    assert os.stat(staged).st_ino == os.stat(source).st_ino
    before = sha256_file(source)

    replacement = write(tmp_path / "tmp-new", SMALL_FILE_BYTES, b"2")
    os.replace(replacement, source)  # how Lightning rewrites last.ckpt
    assert sha256_file(staged) == before
    source.unlink()  # top-k eviction
    assert sha256_file(staged) == before


def test_copy_is_used_when_rewrites_would_go_through_the_linked_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where Lightning would rewrite in place (cross-device move), staging copies instead."""
    monkeypatch.setattr(_staging, "link_is_safe", lambda dirpath: False)
    source = write(tmp_path / "last.ckpt", SMALL_FILE_BYTES, b"1")
    staged, _, method = stage_file(source, staging_root(tmp_path))
    assert method == "copy"
    with open(source, "r+b") as handle:  # shutil.move across devices rewrites in place
        handle.write(b"2" * SMALL_FILE_BYTES)
    assert staged.read_bytes() == b"1" * SMALL_FILE_BYTES


def test_copy_is_used_where_hard_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without hard links falls back to a copy."""

    def no_links(src: object, dst: object) -> None:
        raise OSError("hard links not supported")

    monkeypatch.setattr(_staging, "link_is_safe", lambda dirpath: True)
    monkeypatch.setattr(_staging.os, "link", no_links)
    source = write(tmp_path / "big.ckpt", SMALL_FILE_BYTES, b"x")
    staged, _, method = stage_file(source, staging_root(tmp_path))
    assert method == "copy"
    assert staged.read_bytes() == source.read_bytes()


def test_link_is_safe_compares_the_temp_dir_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linking is safe only when the temp dir and the checkpoint dir share a device."""
    real_stat = os.stat

    class FakeStat:
        def __init__(self, dev: int) -> None:
            self.st_dev = dev

    other = tmp_path / "other-device"
    other.mkdir()

    def fake_stat(path: object, *args: object, **kwargs: object) -> object:
        if Path(str(path)) == other:
            return FakeStat(real_stat(tmp_path).st_dev + 1)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_staging.os, "stat", fake_stat)
    monkeypatch.setattr(_staging.tempfile, "gettempdir", lambda: str(tmp_path))
    assert link_is_safe(tmp_path) is True
    assert link_is_safe(other) is False
    assert link_is_safe(tmp_path / "missing") is False


def test_release_staged_removes_file_and_folder_and_is_idempotent(tmp_path: Path) -> None:
    """release_staged deletes the staged file and its unique folder; twice is harmless."""
    source = write(tmp_path / "a.ckpt", 10)
    staged, _, _ = stage_file(source, staging_root(tmp_path))
    release_staged(staged)
    assert not staged.exists()
    assert not staged.parent.exists()
    release_staged(staged)
    assert source.exists()


def test_detach_before_rewrite_unlinks_only_shared_inodes(tmp_path: Path) -> None:
    """A path whose inode a staged link shares is unlinked; a lone file or missing path is left."""
    lone = write(tmp_path / "lone.ckpt", 10)
    detach_before_rewrite(lone)
    assert lone.exists()
    detach_before_rewrite(tmp_path / "missing.ckpt")

    shared = write(tmp_path / "last.ckpt", 10, b"s")
    link = tmp_path / "link"
    os.link(shared, link)
    detach_before_rewrite(shared)
    assert not shared.exists()
    assert link.read_bytes() == b"s" * 10


def test_a_staging_cut_short_leaves_no_staged_copy_so_a_replay_uses_the_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging a folder (or copying a file) stops partway, as a crash stops it: no staged
    path exists, so the journaled record persists the whole local checkpoint, never the
    part that was staged; releasing the staged name removes the partial tree too."""
    from lamin_lightning._jobs import JobRecord

    source = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    source.mkdir(parents=True)
    for name in ("a.pt", "b.pt", "c.pt"):
        write(source / name, 10)
    stager = _staging.Stager(staging_root(tmp_path / "ckpt"))
    staged = stager.plan(source)
    real = _staging.Stager._stage_one
    calls: list[str] = []

    def stage_one(self: Any, file: Path, target: Path, size: int, folder: Path) -> str:
        calls.append(file.name)
        if len(calls) == 2:
            raise OSError(errno.EIO, "the process died here")
        return real(self, file, target, size, folder)

    monkeypatch.setattr(_staging.Stager, "_stage_one", stage_one)
    with pytest.raises(OSError, match="died here"):
        stager.stage(source, staged)
    assert not staged.exists()
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key="ckpt/epoch=0-step=1.ckpt",
        local_path=str(source),
        staged_path=str(staged),
        store="memory",
    )
    assert record.file() == source
    release_staged(staged)
    assert not staged.parent.exists()


@pytest.mark.parametrize("form", ["file", "folder"])
def test_a_staging_cut_short_by_a_full_disk_leaves_no_partial_copy(
    form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy fails part-way (ENOSPC): its partial file (or tree) and its unique folder
    go, instead of holding the space the disk was short of until someone looks."""
    import shutil as shutil_module

    source = tmp_path / ("model.ckpt" if form == "file" else "model.dcp")
    if form == "file":
        source.write_bytes(b"x" * 4096)
    else:
        source.mkdir()
        for name in ("a.distcp", "b.distcp"):
            (source / name).write_bytes(b"x" * 4096)
    real_copy = shutil_module.copyfile
    copies: list[str] = []

    def copy_then_full(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        copies.append(str(dst))
        if len(copies) == (1 if form == "file" else 2):
            Path(dst).write_bytes(b"x" * 100)  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr("lamin_lightning._staging.shutil.copyfile", copy_then_full)
    root = tmp_path / "work"
    stager = Stager(root)
    with pytest.raises(OSError, match="No space left"):
        stager.stage(source)

    assert copies  # the failure was met in the copy
    left = [p.relative_to(root).as_posix() for p in (root / "staged").rglob("*")]
    assert left == [f"staged/{_owners.owner()}.lock"]  # only: this process still stages here


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async_write"])
def test_a_checkpoint_name_near_the_filesystems_limit_is_persisted(
    tmp_path: Path, async_write: bool
) -> None:
    """A 250-byte file name (ModelCheckpoint writes it): staging named its temporary copy
    ``.partial-<name>`` and the background write ``.<name>.<pid>.<tid>.tmp``, both over
    255 bytes (ENAMETOOLONG): the save failed, or with async_write was never written."""
    store = MemoryStore()
    dirpath = tmp_path / "ckpt"
    name = "m" * 245  # + ".ckpt": 250 bytes
    callback = MemoryCheckpoint(
        store,
        dirpath=dirpath,
        filename=name,
        every_n_train_steps=1,
        async_write=async_write,
    )
    make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader(3))
    assert callback.persistence_stats.failed == 0
    assert [p.name for p in dirpath.iterdir()] == [f"{name}.ckpt"]
    assert store.keys() == {f"checkpoints/{name}.ckpt"}
    assert torch.load(dirpath / f"{name}.ckpt", weights_only=False)["global_step"] == 3


def _folder_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt" / "last.ckpt"
    (folder / "shards").mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    (folder / "shards" / "0.distcp").write_bytes(b"\0" * 1000)
    return folder


def test_a_subfolder_of_a_folder_checkpoint_that_is_a_link_is_staged_with_its_files(
    tmp_path: Path,
) -> None:
    """os.walk lists a linked subfolder and does not go in: it was staged (and persisted)
    as an empty folder (found by an adversarial review)."""
    folder = _folder_checkpoint(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1.distcp").write_bytes(b"\1" * 1000)
    (folder / "more").symlink_to(elsewhere, target_is_directory=True)

    staged, size, _ = Stager(tmp_path / "root").stage(folder)

    assert (staged / "more" / "1.distcp").read_bytes() == b"\1" * 1000
    assert (staged / "shards" / "0.distcp").read_bytes() == b"\0" * 1000
    assert size == 2002


def test_a_link_loop_in_a_folder_checkpoint_fails_its_staging_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    folder = _folder_checkpoint(tmp_path)
    (folder / "shards" / "up").symlink_to(folder, target_is_directory=True)
    root = tmp_path / "root"

    with pytest.raises(OSError) as raised:
        Stager(root).stage(folder)

    assert raised.value.errno == errno.ELOOP
    # The partial copy went; the lock file says this process may still stage here.
    assert [p.name for p in (root / "staged").iterdir()] == [f"{_owners.owner()}.lock"]


def test_link_is_safe_only_where_a_rename_from_the_temp_dir_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One filesystem mounted twice (a bind mount, systemd's PrivateTmp): same device, but
    fsspec's rename fails with EXDEV and it copies into the file, in place, through every
    hard link of it: the staged copy, the previous file linked aside for a rewrite (found
    by a review: last.ckpt cut short for good by a full disk mid-copy, an earlier save
    uploaded with a later one's bytes). The rename is tried now; the probe leaves nothing."""
    temp = tmp_path / "temp"
    temp.mkdir()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    monkeypatch.setattr(_staging.tempfile, "gettempdir", lambda: str(temp))
    assert link_is_safe(folder) is True

    real_rename = os.rename

    def across_mounts(src: Any, dst: Any) -> None:
        if Path(src).parent == temp:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(_staging.os, "rename", across_mounts)
    assert link_is_safe(folder) is False
    assert list(temp.iterdir()) == [] and list(folder.iterdir()) == []


def test_a_bind_mounted_temp_dir_makes_staging_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with a real bind mount, where mounting is permitted."""
    from helpers import mounted_at

    real = tmp_path / "disk"
    (real / "temp").mkdir(parents=True)
    folder = real / "ckpt"
    folder.mkdir()
    bound = tmp_path / "bound"
    with mounted_at(bound, "--bind", str(real)) as mounted:
        if not mounted:
            pytest.skip("bind mounts are not permitted here")
        assert os.stat(bound / "temp").st_dev == os.stat(folder).st_dev
        monkeypatch.setattr(_staging.tempfile, "gettempdir", lambda: str(bound / "temp"))
        assert link_is_safe(folder) is False
        monkeypatch.setattr(_staging.tempfile, "gettempdir", lambda: str(real / "temp"))
        assert link_is_safe(folder) is True


def test_two_links_to_one_subfolder_are_no_loop(tmp_path: Path) -> None:
    """Only a link to a folder above it makes a loop (found by a review: a second link
    to one subfolder failed the staging as a loop)."""
    folder = _folder_checkpoint(tmp_path)
    (folder / "alias").symlink_to(folder / "shards", target_is_directory=True)

    staged, size, _ = Stager(tmp_path / "root").stage(folder)

    assert (staged / "alias" / "0.distcp").read_bytes() == b"\0" * 1000
    assert size == 2002


def test_a_link_that_fails_for_want_of_space_does_not_turn_links_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk, or a file with too many links, says nothing of the folder: the next
    staging links again (found by a review: one ENOSPC made every later staging a full
    copy, doubling disk use when the disk was full)."""
    monkeypatch.setattr(_staging, "link_is_safe", lambda dirpath: True)
    real_link = os.link
    failures = [errno.ENOSPC]

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        if failures:
            raise OSError(failures.pop(), "No space left on device")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(_staging.os, "link", link)
    stager = Stager(staging_root(tmp_path))
    first = write(tmp_path / "a.ckpt", SMALL_FILE_BYTES, b"a")
    second = write(tmp_path / "b.ckpt", SMALL_FILE_BYTES, b"b")
    assert stager.stage(first)[2] == "copy"
    assert stager.stage(second)[2] == "link"
