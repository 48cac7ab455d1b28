"""Which later job of a key makes its earlier pending jobs moot, and whose staged copy
goes with them.

A settled job marks the earlier pending jobs of its key obsolete, and deletes their
staged copies: a newer save replaced them, a removal said they are not wanted. Not a save
that was lost (its write never finished: it stored nothing), nor a job bound for another
store or instance; and a settle deletes only copies in its own working folder. In each
scenario here the earlier job is still to be replayed, so its copy is still needed."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from helpers import journal_a_save
from lamin_lightning._flush import flush_directory
from lamin_lightning._jobs import JobRecord
from lamin_lightning._journal import Outbox, read_pending
from lamin_lightning._staging import Stager, staging_root
from lamin_lightning.testing import MemoryStore

KEY = "checkpoints/last.ckpt"


def _zip_bytes(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data", payload)
    return buffer.getvalue()


def _journal_crash_state(dirpath: Path, local_after: bytes | None) -> tuple[Path, bytes]:
    """What a SIGKILL leaves: save X of last.ckpt staged (its upload never finished),
    then save Y of last.ckpt, written later (async), never finished. ``local_after``:
    what last.ckpt holds then (None: nothing, Y's write never created it)."""
    dirpath.mkdir(parents=True)
    root = staging_root(dirpath)
    local = dirpath / "last.ckpt"
    x_bytes = _zip_bytes(b"X" * 4096)
    local.write_bytes(x_bytes)
    stager = Stager(root)
    staged_x = stager.plan(local)
    outbox = Outbox(root / "outbox-review.jsonl")
    outbox.open()
    outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key=KEY,
            local_path=str(local),
            staged_path=str(staged_x),
            store="memory",
            root=str(root),
        )
    )
    stager.stage(local, staged_x)
    # Lightning rewrites last.ckpt: the staged link keeps X, the name gets a fresh inode.
    os.unlink(local)
    staged_y = stager.plan(local)
    outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key=KEY,
            local_path=str(local),
            staged_path=str(staged_y),
            store="memory",
            written_later=True,
            root=str(root),
        )
    )
    outbox.close()
    if local_after is not None:
        local.write_bytes(local_after)
    assert staged_x.read_bytes() == x_bytes
    return staged_x, x_bytes


@pytest.mark.parametrize("local_after", ["absent", "cut_short"])
def test_replay_of_X_keeps_its_staged_copy_when_a_later_unwritten_save_is_dropped(
    tmp_path: Path, local_after: str
) -> None:
    """Killed while X's upload ran and Y's background write of last.ckpt was on its way:
    the replay drops Y as never written, and persists X from its staged copy (not from
    last.ckpt, which is missing or Y's cut-short file)."""
    dirpath = tmp_path / "ckpts"
    cut = _zip_bytes(b"Y" * 4096)[:-30] if local_after == "cut_short" else None
    _, x_bytes = _journal_crash_state(dirpath, cut)
    store = MemoryStore(keep_bytes=True)
    flush_directory(dirpath, stores={"memory": store}, progress=False)
    stored = store.get(KEY)
    # Expected: X, the last checkpoint that was whole, is persisted from its staged copy.
    assert stored is not None, "X's bytes are gone: its staged copy was deleted"
    assert stored.data == x_bytes, "X was persisted from another file than its own"


def test_a_rewrite_a_crash_interrupted_does_not_moot_the_pending_save_it_was_replacing(
    tmp_path: Path,
) -> None:
    """Same crash, where the rewrite had set the previous last.ckpt (X's file) aside:
    the flush puts X's file back and settles Y "lost". That must not make X moot: X is
    persisted, from its staged copy (it was settled obsolete, its copy deleted, and its
    bytes were left only in last.ckpt, until the resumed fit rewrote it)."""
    dirpath = tmp_path / "ckpts"
    staged_x, x_bytes = _journal_crash_state(dirpath, None)
    root = staging_root(dirpath)
    aside = root / "aside"
    aside.mkdir(exist_ok=True)
    # the dead trainer (no lock file) set X's last.ckpt aside before the rewrite
    os.link(staged_x, aside / f"999999-{'a' * 12}-0-last.ckpt")
    store = MemoryStore(keep_bytes=True)
    flush_directory(dirpath, stores={"memory": store}, progress=False)
    assert (dirpath / "last.ckpt").read_bytes() == x_bytes  # put back
    stored = store.get(KEY)
    assert stored is not None and stored.data == x_bytes, (
        f"X not persisted; staged copy exists={staged_x.exists()},"
        f" pending={read_pending(root / 'outbox-review.jsonl')}"
    )


def test_a_save_refused_at_setup_stays_for_its_store_and_keeps_its_copy(tmp_path: Path) -> None:
    """Run 1 left save X of last.ckpt pending for another store (LaminDB: another instance;
    the refusal says "connect it and flush again", the job "stays in the outbox"). Run 2
    in the same dirpath saves last.ckpt into its own store: that does not replace X, which
    stays pending with its staged copy, the last copy of its bytes."""
    from helpers import TinyModel, loader, make_trainer
    from lamin_lightning._submission import _journal_digest
    from lamin_lightning.testing import MemoryCheckpoint

    dirpath = tmp_path / "ckpts"
    dirpath.mkdir()
    store = MemoryStore()
    callback = MemoryCheckpoint(
        store, dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=1
    )
    root = staging_root(dirpath)
    local = dirpath / "last.ckpt"
    x_bytes = _zip_bytes(b"X" * 4096)
    local.write_bytes(x_bytes)
    journal = root / f"outbox-{_journal_digest(callback)}.jsonl"
    staged_x = journal_a_save(journal, local, store="elsewhere", key=KEY)
    os.unlink(local)  # rewritten since (the staged link has X's bytes)

    make_trainer(tmp_path, [callback], max_steps=1).fit(TinyModel(), loader(1))

    assert store.keys() == {KEY}
    left = [r.key for _, r in read_pending(journal)]
    assert staged_x.exists() and left == [KEY], (
        f"X refused for its store, then mooted by a save into another one:"
        f" pending={left}, staged copy exists={staged_x.exists()}"
    )


def test_a_settle_in_a_copied_folder_never_deletes_the_originals_staged_copy(
    tmp_path: Path,
) -> None:
    """A checkpoint folder copied with its working folder (cp -a, a backup, a second
    experiment started from it): the copy's journal names the ORIGINAL's staged paths
    (relocate maps them only for reading). A save committing in the copy deletes the
    copy's staged copies only, never the original's, which its own journal still needs."""
    import shutil

    from helpers import TinyModel, loader, make_trainer
    from lamin_lightning import PermanentError
    from lamin_lightning._submission import _journal_digest
    from lamin_lightning.testing import MemoryCheckpoint

    original = tmp_path / "orig" / "ckpts"
    original.mkdir(parents=True)
    probe = MemoryCheckpoint(
        MemoryStore(), dirpath=original, save_top_k=0, save_last=True, every_n_train_steps=1
    )
    root = staging_root(original)
    local = original / "last.ckpt"
    x_bytes = _zip_bytes(b"X" * 4096)
    local.write_bytes(x_bytes)
    journal = root / f"outbox-{_journal_digest(probe)}.jsonl"
    staged_x = journal_a_save(journal, local, store="memory", key=KEY)

    copy = tmp_path / "copy" / "ckpts"
    copy.parent.mkdir()
    shutil.copytree(original, copy, symlinks=True)
    shutil.copytree(
        root, staging_root(copy), symlinks=True, ignore=shutil.ignore_patterns("*.lock")
    )

    store = MemoryStore()
    store.fail_next(1, lambda: PermanentError("the replay of X fails in the copy"))
    callback = MemoryCheckpoint(
        store,
        dirpath=copy,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        on_error="warn",
        enable_version_counter=False,
    )
    with pytest.warns(UserWarning):
        make_trainer(tmp_path / "copy", [callback], max_steps=1).fit(TinyModel(), loader(1))
    assert store.keys() == {KEY}
    assert staged_x.exists(), "a save in the copy deleted the original folder's staged copy"
    assert [r.key for _, r in read_pending(journal)] == [KEY]
