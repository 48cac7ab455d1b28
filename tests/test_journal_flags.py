"""What a journal says its committed checkpoint saves flagged, for the replays of a
folder where several callbacks journal (``_journal.folder_flags``), and how a replayed
save carries it (``_replay._with_committed_flags``). The LaminDB tier
(``tests/lamindb/test_lamindb_outbox.py``) covers the flags that end stored.
"""

from __future__ import annotations

import json
from pathlib import Path

from lamin_lightning import JobRecord
from lamin_lightning._jobs import CheckpointSnapshot, CommittedFlags, replayed_sequence
from lamin_lightning._journal import Outbox, folder_flags, read_journal
from lamin_lightning._replay import _with_committed_flags, read_folder_flags


def _save(
    key: str, at: float, *, best: bool, best_key: str | None, ranking: tuple[str, ...]
) -> JobRecord:
    snapshot = CheckpointSnapshot(
        key=key,
        local_path=Path(f"/ckpt/{key}"),
        staged_path=Path(f"/ckpt/{key}"),
        global_step=1,
        epoch=0,
        monitor="score",
        mode="min",
        save_weights_only=False,
        score=1.0,
        is_best=best,
        best_key=best_key,
        last_key=None,
        ranking=ranking,
    )
    return JobRecord(
        op="save",
        kind="checkpoint",
        key=key,
        local_path=f"/ckpt/{key}",
        checkpoint=snapshot,
        submitted_at=at,
    )


def _committed(outbox: Outbox, *records: JobRecord) -> None:
    for record in records:
        outbox.settle(outbox.append(record), "saved")


def test_a_journal_tells_what_its_newest_committed_save_flagged_also_once_compacted(
    tmp_path: Path,
) -> None:
    """The newest committed save's key, ranking and best key, and the newest committed
    save that was its callback's best, from the job lines the ``done`` lines settle; a
    compaction (nothing but a pending job left) keeps them in its ``flags`` line, beside
    the time that readers of an earlier version read."""
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    _committed(
        outbox,
        _save("p/a-1.ckpt", 10.0, best=True, best_key="p/a-1.ckpt", ranking=("p/a-1.ckpt",)),
        _save(
            "p/a-2.ckpt",
            20.0,
            best=False,
            best_key="p/a-1.ckpt",
            ranking=("p/a-1.ckpt", "p/a-2.ckpt"),
        ),
        _save("p/last.ckpt", 30.0, best=False, best_key="p/a-1.ckpt", ranking=()),
    )
    expected = CommittedFlags(
        last=(replayed_sequence(30.0), "p/last.ckpt", (), "p/a-1.ckpt"),
        best=(replayed_sequence(10.0), "p/a-1.ckpt"),
    )
    assert folder_flags(tmp_path) == {"p": (frozenset({"outbox-a.jsonl"}), expected)}
    outbox.append(_save("p/a-3.ckpt", 40.0, best=False, best_key=None, ranking=()))
    outbox.close()  # compacts: the flags line, then the pending job
    lines = [json.loads(line) for line in (tmp_path / "outbox-a.jsonl").read_text().splitlines()]
    assert [line["t"] for line in lines] == ["flags", "job"]
    assert lines[0]["at"] == 30.0 and lines[0]["key"] == "p/last.ckpt"
    assert folder_flags(tmp_path) == {"p": (frozenset({"outbox-a.jsonl"}), expected)}
    assert read_journal(tmp_path / "outbox-a.jsonl")[1] == {"p": 30.0}


def test_a_prefix_an_earlier_version_marked_is_left_out_and_replays_as_before(
    tmp_path: Path,
) -> None:
    """A ``flags`` line of an earlier version tells the time only: what that journal's
    saves flagged is unknown, so its prefix is left out of the folder's flags (even
    after a save of this version commits there, and a compaction), and a replayed save
    of the prefix carries none: it replays as before."""
    (tmp_path / "outbox-a.jsonl").write_text(
        json.dumps({"t": "flags", "prefix": "p", "at": 5.0}) + "\n"
    )
    other = Outbox(tmp_path / "outbox-b.jsonl")
    other.open()
    _committed(other, _save("p/b-1.ckpt", 6.0, best=True, best_key="p/b-1.ckpt", ranking=()))
    assert folder_flags(tmp_path) == {}
    outbox = Outbox(tmp_path / "outbox-a.jsonl")
    outbox.open()
    _committed(outbox, _save("p/a-1.ckpt", 7.0, best=True, best_key="p/a-1.ckpt", ranking=()))
    outbox.append(_save("p/a-2.ckpt", 8.0, best=False, best_key=None, ranking=()))
    outbox.close()  # compacts: the time only, as nothing tells what the first mark flagged
    assert "key" not in json.loads((tmp_path / "outbox-a.jsonl").read_text().splitlines()[0])
    assert folder_flags(tmp_path) == {}
    record = _save("p/a-2.ckpt", 8.0, best=False, best_key=None, ranking=())
    folders: dict[str, dict[str, tuple[frozenset[str], CommittedFlags]]] = {}
    replayed = _with_committed_flags(record, tmp_path / "outbox-a.jsonl", folders)
    assert replayed.checkpoint is not None and replayed.checkpoint.committed is None
    other.close()


def test_a_replayed_save_carries_the_folder_flags_only_where_another_journal_committed(
    tmp_path: Path,
) -> None:
    """One callback's journal alone under a prefix: its replayed saves carry nothing
    (its own newest committed save already bounds them, as before). With another
    callback's journal that committed under the prefix: the newest committed save and
    best of both, whichever journal holds them."""
    a = Outbox(tmp_path / "outbox-a.jsonl")
    a.open()
    _committed(
        a, _save("p/a-1.ckpt", 10.0, best=True, best_key="p/a-1.ckpt", ranking=("p/a-1.ckpt",))
    )
    pending = _save("p/a-2.ckpt", 40.0, best=False, best_key="p/a-1.ckpt", ranking=())
    alone = _with_committed_flags(pending, a.path, {})
    assert alone.checkpoint is not None and alone.checkpoint.committed is None
    b = Outbox(tmp_path / "outbox-b.jsonl")
    b.open()
    _committed(
        b,
        _save("p/b-1.ckpt", 20.0, best=True, best_key="p/b-1.ckpt", ranking=("p/b-1.ckpt",)),
        _save("p/last-v1.ckpt", 30.0, best=False, best_key="p/b-1.ckpt", ranking=("p/b-1.ckpt",)),
    )
    both = _with_committed_flags(pending, a.path, {})
    assert both.checkpoint is not None
    assert both.checkpoint.committed == CommittedFlags(
        last=(replayed_sequence(30.0), "p/last-v1.ckpt", ("p/b-1.ckpt",), "p/b-1.ckpt"),
        best=(replayed_sequence(20.0), "p/b-1.ckpt"),
    )
    assert both.checkpoint == pending.checkpoint  # not compared: the same save
    # What was read before a journal with nothing pending was deleted still counts.
    folders: dict[str, dict[str, tuple[frozenset[str], CommittedFlags]]] = {}

    read_folder_flags(tmp_path, folders)
    b.close()  # nothing pending: deleted
    assert not b.path.exists()
    kept = _with_committed_flags(pending, a.path, folders)
    assert kept.checkpoint is not None and kept.checkpoint.committed == both.checkpoint.committed
    a.close()
