"""Our progress bar and log are the only console output of persistence (issue 14, item 4).

LaminDB prints "... uploading NAME: 0.0% ... 100.0%" for every file it uploads; from our
worker threads that floods a training console. Meaningful on the S3 tier (an upload);
on local storage it checks nothing else prints either.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import TierModel, fit

import lamin_lightning as ll

pytestmark = [pytest.mark.lamindb, pytest.mark.filterwarnings("ignore:.*LeafSpec.*")]


@pytest.mark.contract
def test_uploads_print_nothing_to_the_console(
    ln: Any, no_run: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, max_workers=2
    )
    fit(callback, tmp_path, steps=3, model=TierModel(), enable_progress_bar=False)
    assert callback.persistence_stats.saved == 3
    out, err = capfd.readouterr()
    assert "uploading" not in out + err, (out + err)[-2000:]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.threadName or "", record.levelno, record.getMessage()))


@pytest.mark.contract
def test_removals_print_nothing_to_the_console(ln: Any, no_run: None, tmp_path: Path) -> None:
    """Top-1: each new checkpoint evicts the previous one, whose artifact LaminDB deletes,
    logging "✓ deleted PATH" on our committer thread: that line never reaches LaminDB's
    console handler (its handler is bound to the stdout of its import, so this test reads
    what reaches the logger's handlers). Its lines on the training thread still do."""
    from lamindb_setup import logger

    collect = _Collect()
    logger.addHandler(collect)
    verbosity = ln.settings.verbosity
    ln.settings.verbosity = "info"  # LaminDB's success and info lines are created
    try:
        callback = ll.Checkpoint(
            dirpath=tmp_path / "ckpt",
            every_n_train_steps=1,
            save_top_k=1,
            monitor="step",
            mode="max",
        )
        fit(callback, tmp_path, steps=4, model=TierModel(), enable_progress_bar=False)
        logger.success("a line of the training thread")
    finally:
        ln.settings.verbosity = verbosity
        logger.removeHandler(collect)
    assert callback.persistence_stats.removed == 3
    ours = [line for line in collect.lines if line[0].startswith("lamin-lightning")]
    assert [line for line in ours if line[1] < logging.WARNING] == []  # its warnings pass
    assert any("a line of the training thread" in line[2] for line in collect.lines)


@pytest.mark.contract
def test_lamindbs_important_lines_of_our_threads_stay_off_the_console(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """LaminDB logs some info lines at its own levels above WARNING ("→", IMPORTANT = 31,
    IMPORTANT_HINT = 32): "creating new artifact version for key ..." at every rewrite of
    ``last.ckpt``, and "a file/folder remains here: PATH" at every replaced or evicted
    checkpoint (a file we delete right after). They reached the training console from our
    worker and committer threads, one or two per checkpoint. The warning LaminDB repeats
    for every artifact without a run ("no run & transform got linked") passes once a
    process."""
    from lamindb_setup import logger

    collect = _Collect()
    logger.addHandler(collect)
    try:
        callback = ll.Checkpoint(
            dirpath=tmp_path / "ckpt",
            every_n_train_steps=1,
            save_top_k=1,
            save_last=True,
            monitor="score",
            max_workers=4,
        )
        fit(callback, tmp_path, steps=6, model=TierModel(scores=[5, 4, 3, 2, 1, 0]))
    finally:
        logger.removeHandler(collect)
    assert callback.persistence_stats.removed == 5
    ours = [line for line in collect.lines if line[0].startswith("lamin-lightning")]
    assert [line for line in ours if line[1] != logging.WARNING] == []
    # At most once: once a process, so an earlier test may have printed it already.
    assert [line[2] for line in ours] in (
        [],
        ["no run & transform got linked, call `ln.track()` & re-run"],
    )
