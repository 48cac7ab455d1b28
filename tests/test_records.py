"""The job record and the journal that stores it: codec, versions, registry, torn tails.

A record is the whole description of a job: these tests prove it survives the journal
unchanged, that journals written by version 1 still replay, that a journal never
decides which code runs, and that a write cut short by a full disk never swallows
the job appended after it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lamin_lightning import JobRecord, UnknownStoreError, flush_directory
from lamin_lightning._jobs import CheckpointSnapshot, decode, encode
from lamin_lightning._journal import Outbox, read_journal, read_pending
from lamin_lightning._staging import staging_root
from lamin_lightning.store import StoreResolver
from lamin_lightning.testing import MemoryStore


def _snapshot(key: str = "ckpts/a.ckpt") -> CheckpointSnapshot:
    return CheckpointSnapshot(
        key=key,
        local_path=Path("/data/a.ckpt"),
        staged_path=Path("/data/.lamin-lightning/staged/x/a.ckpt"),
        global_step=7,
        epoch=1,
        monitor="val_loss",
        mode="min",
        save_weights_only=False,
        score=0.25,
        is_best=True,
        best_key=key,
        last_key=key,
        ranking=(key, "ckpts/b.ckpt"),
        scores={key: 0.25, "ckpts/b.ckpt": 0.5},
        feature_values={"score": 0.25, "project": "x"},
        auto_features=frozenset({"score"}),
    )


def test_a_checkpoint_record_round_trips_through_json_unchanged() -> None:
    """encode -> JSON text -> decode gives back an equal record, snapshot and features included."""
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key="ckpts/a.ckpt",
        local_path="/data/a.ckpt",
        staged_path="/data/.lamin-lightning/staged/x/a.ckpt",
        store="lamindb",
        context={"instance": "me/inst", "prefix": "ckpts", "run_uid": None},
        checkpoint=_snapshot(),
        submitted_at=1700000000.5,
    )
    assert decode(json.loads(json.dumps(encode(record)))) == record


def test_a_version_1_entry_decodes_with_its_store_and_prefix() -> None:
    """A line journaled by 0.1.0 (a class path, no store) still replays into the right store."""
    entry = {
        "v": 1,
        "op": "save",
        "kind": "checkpoint",
        "key": "p/checkpoints/a.ckpt",
        "local_path": "/d/a.ckpt",
        "staged": "/d/.lamin-lightning/staged/1/a.ckpt",
        "publisher": "lamin_lightning._lamin:Checkpoint",
        "context": {"instance": "me/i", "run_uid": "r1", "checkpoint_key_prefix": "p/checkpoints"},
        "snapshot": {
            "score": 1.0,
            "ranking": ["p/checkpoints/a.ckpt"],
            "features": [["x", 1, False]],
        },
        "time": 12.0,
    }
    record = decode(entry)
    assert record.store == "lamindb"
    assert record.context["prefix"] == "p/checkpoints"
    assert record.checkpoint is not None and record.checkpoint.feature_values == {"x": 1}
    assert (
        decode(
            {**entry, "publisher": "lamin_lightning.testing:MemoryCheckpoint", "context": {}}
        ).store
        == "memory"
    )


@pytest.mark.parametrize(
    "bad",
    [{"v": 9, "op": "save", "key": "k"}, {"op": "upload", "key": "k"}, {"op": "save", "key": ""}],
)
def test_entries_that_are_not_records_are_refused(bad: dict[str, object]) -> None:
    """Unknown versions, operations or empty keys raise ValueError instead of half-decoding."""
    with pytest.raises(ValueError):
        decode(bad)


def test_a_journal_naming_unknown_code_never_imports_it(tmp_path: Path) -> None:
    """A v1 line naming a class of another module is refused by name; the module is not imported."""
    module = "lamin_lightning_test_never_imported"
    record = decode(
        {"v": 1, "op": "remove", "kind": "checkpoint", "key": "k", "publisher": f"{module}:Evil"}
    )
    with pytest.raises(UnknownStoreError, match="no installed package registers"):
        StoreResolver()(record)
    assert module not in sys.modules


def test_a_memory_record_needs_its_store_passed_to_flush(tmp_path: Path) -> None:
    """Replaying a memory-store journal without the store leaves the job pending, refused."""
    outbox = Outbox(tmp_path / ".lamin-lightning" / "outbox-a.jsonl")
    outbox.open()
    outbox.append(
        JobRecord(op="remove", kind="checkpoint", key="k", local_path="/x", store="memory")
    )
    outbox.close()
    report = flush_directory(tmp_path, progress=False)
    assert [r.key for r in report.remaining] == ["k"]
    assert isinstance(report.refused[0][1], UnknownStoreError)
    store = MemoryStore()
    assert flush_directory(tmp_path, progress=False, stores={"memory": store}).remaining == []


def _record(key: str) -> JobRecord:
    return JobRecord(op="remove", kind="checkpoint", key=key, local_path="/x", store="memory")


def test_a_torn_tail_is_cut_before_the_next_append(tmp_path: Path) -> None:
    """A journal ending in half a line (a crash mid-write) gets its next job on a new line."""
    path = tmp_path / "outbox-a.jsonl"
    outbox = Outbox(path)
    outbox.open()
    first = outbox.append(_record("k1"))
    outbox.close()
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"t":"job","id":"x","entry":{"op":"sa')  # killed mid-write
    reopened = Outbox(path)
    assert [r.key for _, r in reopened.open()] == ["k1"]
    second = reopened.append(_record("k2"))
    assert [(i, r.key) for i, r in read_pending(path)] == [(first, "k1"), (second, "k2")]
    reopened.close()


def test_a_whole_last_line_without_its_newline_is_kept_by_the_next_holder(
    tmp_path: Path,
) -> None:
    """A journal whose last job line is whole but lacks its newline (a write cut short
    right before it): the next holder counts the job, and it stays in the file even if
    that holder is killed before its compaction. Before, the first append cut the line
    off as torn, and a flush killed while it held the journal lost the job for good
    (found by an adversarial helper: the store kept an older last.ckpt)."""
    path = tmp_path / "outbox-a.jsonl"
    outbox = Outbox(path)
    outbox.open()
    first = outbox.append(_record("k1"))
    second = outbox.append(_record("k2"))
    outbox.close()
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    path.write_bytes(raw[:-1])
    assert [(i, r.key) for i, r in read_pending(path)] == [(first, "k1"), (second, "k2")]

    holder = Outbox(path)
    assert [r.key for _, r in holder.open()] == ["k1", "k2"]
    third = holder.append(_record("k3"))
    # Killed here (no close, no compaction): the file says what the holder knew.
    assert [(i, r.key) for i, r in read_pending(path)] == [
        (first, "k1"),
        (second, "k2"),
        (third, "k3"),
    ]
    holder.close()


SHORT_WRITE = textwrap.dedent(
    """
    import errno, json, resource, signal, sys
    from lamin_lightning import JobRecord
    from lamin_lightning._journal import Outbox

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    path = sys.argv[1]
    outbox = Outbox(path)
    outbox.open()
    record = lambda key: JobRecord(op="remove", kind="checkpoint", key=key, local_path="/x" * 40)
    first = outbox.append(record("k1"))
    size = outbox.path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 60, hard))  # the next line is cut short
    try:
        outbox.append(record("k2"))
        print(json.dumps({"error": None}))
        sys.exit(1)
    except OSError as error:
        torn = errno.errorcode.get(error.errno)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    third = outbox.append(record("k3"))
    print(json.dumps({"error": torn, "ids": [first, third]}))
    """
)


def test_a_write_cut_short_by_a_full_disk_does_not_swallow_the_next_job(tmp_path: Path) -> None:
    """A real short write (file size limit, as a full disk) leaves half a line; the next job is
    journaled intact after it, and the failed job is not half-recorded."""
    path = tmp_path / "outbox-a.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] == "EFBIG"
    pending, _ = read_journal(path)
    assert [(job_id, record.key) for job_id, record in pending] == [
        (result["ids"][0], "k1"),
        (result["ids"][1], "k3"),
    ]
    assert path.read_bytes().endswith(b"\n")


def test_the_training_thread_never_fsyncs_the_journal_and_uploads_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends only write into the page cache; every fsync of the journal runs on a pipeline
    thread, and a job's upload starts only once the lines before it are synced."""
    import os
    import threading

    from helpers import TinyModel, loader, make_trainer
    from lamin_lightning.testing import MemoryCheckpoint

    journal_syncs: list[tuple[str, int]] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            journal_syncs.append((threading.current_thread().name, os.fstat(fd).st_size))

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    uploads: list[tuple[int, int]] = []

    class Recording(MemoryStore):
        def put(self, key: str, path: Any, **kwargs: Any) -> Any:
            if key.endswith(".ckpt"):
                journal = next(staging_root(tmp_path / "ckpt").glob("outbox-*.jsonl"))
                synced = max((size for _, size in journal_syncs), default=0)
                uploads.append((synced, journal.stat().st_size))
            return super().put(key, path, **kwargs)

    callback = MemoryCheckpoint(
        Recording(), dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1
    )
    make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(), loader(4))
    training = threading.main_thread().name
    assert journal_syncs and all(name != training for name, _ in journal_syncs)
    assert len(uploads) == 4
    assert all(synced > 0 for synced, _ in uploads)


def test_a_snapshot_with_its_feature_values_is_the_snapshot_the_constructor_builds() -> None:
    """The snapshot rebuilt with feature values (copied without ``__init__``, on the training
    thread) equals, encodes and stays frozen as one built field by field."""
    import dataclasses

    from lamin_lightning._submission import _with_features

    class Feature:
        name = "lr"

    base = dataclasses.replace(_snapshot(), feature_values={}, auto_features=frozenset())
    values = {"score": 0.25, Feature(): 0.1}
    copied = _with_features(base, values)
    built = dataclasses.replace(
        base, feature_values={"score": 0.25, "lr": 0.1}, auto_features=frozenset({"lr"})
    )
    assert copied == built and type(copied) is CheckpointSnapshot

    def line(snapshot: CheckpointSnapshot) -> Any:
        return encode(
            JobRecord(
                op="save",
                kind="checkpoint",
                key=base.key,
                local_path="/a",
                staged_path=None,
                store="memory",
                context={},
                checkpoint=snapshot,
                submitted_at=1.0,
            )
        )

    assert line(copied) == line(built)
    assert base.feature_values == {}  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        copied.score = 1.0  # type: ignore[misc]


def test_datetime_date_and_record_feature_values_survive_the_journal_as_themselves() -> None:
    """A datetime and a date come back as themselves, a database record as a reference to
    look it up by (never its ``str``); a user's mapping that only resembles the tagged form
    stays a mapping."""
    import dataclasses
    import datetime

    from lamin_lightning._jobs import RecordRef

    class Label:  # a database record as the codec sees one: a Django ``_meta`` and a uid
        _meta = object()
        uid = "u1d"

    look_alike = {"__lamin_lightning__": "date", "value": "2024-01-02"}
    values = {
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 1, 2),
        "label": Label(),
        "mapping": look_alike,
    }
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key="ckpts/a.ckpt",
        local_path="/data/a.ckpt",
        staged_path=None,
        store="memory",
        context={},
        checkpoint=dataclasses.replace(_snapshot(), feature_values=values),
        submitted_at=1.0,
    )
    decoded = decode(json.loads(json.dumps(encode(record))))
    assert decoded.checkpoint is not None
    assert decoded.checkpoint.feature_values == {
        **values,
        "label": RecordRef(f"{__name__}.{Label.__qualname__}", "u1d"),
    }


def test_a_checkpoint_records_run_level_values_round_trip_through_json() -> None:
    """The run-level values a checkpoint carries (name, value, auto feature) are journaled
    and read back as they were; a record without them encodes no such field."""
    import dataclasses

    snapshot = dataclasses.replace(
        _snapshot(), run_features=(("max_steps", 8, True), ("lr", 0.1, False))
    )
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key=snapshot.key,
        local_path="/data/a.ckpt",
        staged_path=str(snapshot.staged_path),
        store="lamindb",
        context={"instance": "me/inst", "prefix": "ckpts", "run_uid": "r"},
        checkpoint=snapshot,
        submitted_at=1700000000.5,
    )
    assert decode(json.loads(json.dumps(encode(record)))).checkpoint == snapshot
    plain = dataclasses.replace(record, checkpoint=_snapshot())
    assert "run_features" not in encode(plain)["snapshot"]


def test_a_late_save_that_marks_its_folder_round_trips_and_an_older_entry_does_not_mark() -> None:
    """A save written by a CheckpointIO under AsyncCheckpointIO journals ``marks_folder``
    (its write notes a folder it completed), and its mark's identity, and reads both back;
    an entry of the version before (no such field) reads as not marking, so that its
    replay persists a folder as that version did."""
    record = JobRecord(
        op="save",
        kind="checkpoint",
        key="ckpts/a.ckpt",
        local_path="/data/a.ckpt",
        store="lamindb",
        written_later=True,
        marks_folder=True,
        written_file=(12, 4096, 1700000000000000000),
    )
    entry = encode(record)
    assert entry["marks_folder"] is True
    assert decode(json.loads(json.dumps(entry))) == record
    del entry["marks_folder"]
    assert decode(entry).marks_folder is False
    assert "marks_folder" not in encode(dataclasses.replace(record, marks_folder=False))
