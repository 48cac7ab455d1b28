"""A job of a key makes earlier ones moot only where it persists them: the same store
and instance, read the same way by the live settle and the replay (a version-1 entry
names its store by a class path), and a refused save keeps its own bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lamin_lightning._flush import flush_directory
from lamin_lightning._jobs import JobRecord
from lamin_lightning._journal import Outbox, read_pending
from lamin_lightning._staging import Stager, staging_root
from lamin_lightning.testing import MemoryStore

KEY = "checkpoints/last.ckpt"


def _v1_pending_save(dirpath: Path, payload: bytes, context: dict) -> tuple[Path, Path]:
    """A journal left by a version writing v1 entries: save X of last.ckpt, staged, pending
    (its upload failed, or the process died)."""
    dirpath.mkdir(parents=True)
    root = staging_root(dirpath)
    local = dirpath / "last.ckpt"
    local.write_bytes(payload)
    stager = Stager(root)
    staged = stager.plan(local)
    stager.stage(local, staged)
    journal = root / "outbox-review.jsonl"
    entry = {
        "v": 1,
        "op": "save",
        "kind": "checkpoint",
        "key": KEY,
        "local_path": str(local),
        "staged": str(staged),
        "publisher": "lamin_lightning.testing:MemoryCheckpoint",
        "context": context,
        "time": 1.0,
    }
    with journal.open("a") as handle:
        handle.write(json.dumps({"t": "job", "id": "v1job", "entry": entry}) + "\n")
    os.unlink(local)  # Lightning rewrites last.ckpt later (the staged link keeps X)
    return journal, staged


def test_a_newer_save_after_an_upgrade_makes_a_v1_pending_save_of_its_key_moot(
    tmp_path: Path,
) -> None:
    """After an upgrade, the v1 save X is still pending in the journal (its replay at setup
    failed: storage down). The run then saves last.ckpt (Y, v2 entry, same store) and Y
    commits: X is older, and must be obsolete, or the next replay would persist X's older
    bytes over Y's under the key (the live settle read X's destination as its class
    path, ``lamin_lightning.testing:MemoryCheckpoint``, against Y's ``memory``)."""
    dirpath = tmp_path / "ckpts"
    journal, _ = _v1_pending_save(dirpath, b"X-older" * 100, {})
    root = staging_root(dirpath)
    local = dirpath / "last.ckpt"
    y_bytes = b"Y-newer" * 100
    local.write_bytes(y_bytes)

    store = MemoryStore(keep_bytes=True)
    outbox = Outbox(journal)
    outbox.open()
    y_id = outbox.append(
        JobRecord(
            op="save",
            kind="checkpoint",
            key=KEY,
            local_path=str(local),
            store="memory",
            root=str(root),
        )
    )
    store.put(KEY, local)  # Y's upload
    outbox.settle(y_id, "saved")
    outbox.close()
    assert store.get(KEY).data == y_bytes

    left = [(job_id, r.store, r.key) for job_id, r in read_pending(journal)]
    flush_directory(dirpath, stores={"memory": store}, progress=False)
    stored = store.get(KEY)
    assert left == [] and stored.data == y_bytes, (
        f"v1 save X was not made moot by the newer save Y of its key and store"
        f" (pending after Y's settle: {left}); the flush then stored"
        f" {'X (older bytes)' if stored.data != y_bytes else 'Y'} under {KEY!r}"
    )


def test_the_replay_and_the_live_settle_agree_on_a_v1_entrys_destination() -> None:
    """The live settle's destination of a raw entry is its replay's, every format."""
    from lamin_lightning._jobs import decode
    from lamin_lightning._journal import destination, record_destination

    for publisher, context, expected in [
        ("lamin_lightning.testing:MemoryCheckpoint", {}, ("memory", None)),
        ("lamin_lightning._lamin:Checkpoint", {"instance": "me/inst"}, ("lamindb", "me/inst")),
    ]:
        entry = {
            "v": 1,
            "op": "save",
            "kind": "checkpoint",
            "key": KEY,
            "local_path": "/x",
            "publisher": publisher,
            "context": context,
        }
        assert destination(entry) == record_destination(decode(entry)) == expected


def test_a_refused_unstaged_save_is_never_persisted_with_another_runs_bytes(
    tmp_path: Path,
) -> None:
    """Run 1 (store/instance A) journaled save X of last.ckpt and was killed before X was
    staged (the record is journaled before staging). Run 2 in the same dirpath persists
    into another destination (B): its setup refuses X ("connect A and flush"), and its own
    saves of last.ckpt do not make X moot. Run 2 rewrites last.ckpt. The later flush for A
    replays X from the copy run 2's setup staged when it refused X, never from last.ckpt,
    which holds run 2's bytes."""
    from helpers import TinyModel, journal_a_save, loader, make_trainer
    from lamin_lightning._submission import _journal_digest
    from lamin_lightning.testing import MemoryCheckpoint

    dirpath = tmp_path / "ckpts"
    dirpath.mkdir()
    store_b = MemoryStore(keep_bytes=True)
    callback = MemoryCheckpoint(
        store_b,
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        enable_version_counter=False,
    )
    root = staging_root(dirpath)
    local = dirpath / "last.ckpt"
    x_bytes = b"X" * 4096
    local.write_bytes(x_bytes)  # X's file, written by Lightning before the hook returned
    journal = root / f"outbox-{_journal_digest(callback)}.jsonl"
    staged_x = journal_a_save(journal, local, store="memory-a", key=KEY, staged=False)
    assert not staged_x.exists()

    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    run2_bytes = local.read_bytes()
    assert store_b.get(KEY) is not None and store_b.get(KEY).data == run2_bytes

    store_a = MemoryStore(keep_bytes=True)
    flush_directory(dirpath, stores={"memory-a": store_a}, progress=False)
    stored = store_a.get(KEY)
    assert stored is None or stored.data == x_bytes, (
        "the flush for A persisted X from last.ckpt, which holds run 2's (B's) checkpoint:"
        f" {len(stored.data)} bytes, run 2's file={stored.data == run2_bytes}"
    )
