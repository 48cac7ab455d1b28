"""Our progress bar and log are the only console output of persistence (issue 14, item 4).

LaminDB prints "... uploading NAME: 0.0% ... 100.0%" for every file it uploads; from our
worker threads that floods a training console. Meaningful on the S3 tier (an upload);
on local storage it checks nothing else prints either.
"""

from __future__ import annotations

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
