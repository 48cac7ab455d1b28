"""DDP (2 CPU processes, gloo) edges of async_write, against the in-memory store.

Runs ``ddp_edges.py`` in a subprocess with a timeout (a deadlock shows as the timeout).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import run_ranks

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "ddp_edges.py"
TIMEOUT = 180


def _run(root: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    return run_ranks([str(SCRIPT), *args], root, TIMEOUT, **env_extra)


def test_a_final_background_write_that_failed_is_undone_in_every_ranks_state(
    tmp_path: Path,
) -> None:
    """on_error="warn": rank zero's background write of the last top-k checkpoint of the
    fit (step 7, the best score) finds the disk full. Rank zero put Lightning's state
    right at teardown (the evicted step-5 checkpoint is best-k again), but only its own:
    on rank one ``best_model_path`` and ``best_k_models`` still named step 7, a file never
    written, so ``trainer.test(ckpt_path="best")`` right after fit failed on rank one
    (FileNotFoundError) while rank zero loaded step 4, and rank zero died in gloo. Now
    put right on every rank at on_train_end, once rank zero's writes are done. The write
    fails only once training ended (ddp_edges.py holds it until on_train_end), after the
    last save's broadcast, as a slow disk makes it: an earlier failure is put right by
    that broadcast."""
    done = _run(
        tmp_path,
        *("mem", "test_best", str(tmp_path), "--async-write", "--on-error=warn", "--steps=7"),
        "--link",  # one write at the last save: nothing on the training thread waits for it
        DDP_EDGES_FAIL_WRITE="7",
    )
    output = (done.stdout + done.stderr)[-5000:]
    reports = tmp_path / "reports"
    zero = json.loads((reports / "first-rank0.json").read_text())
    one = json.loads((reports / "first-rank1.json").read_text())
    assert "epoch=0-step=7.ckpt" not in zero["listing"], zero  # the write did fail
    for field in ("best_model_path", "best_k_models", "last_model_path"):
        assert zero[field] == one[field], (field, zero[field], one[field])
    assert done.returncode == 0, output
    tested = [json.loads((reports / f"second-rank{r}.json").read_text()) for r in (0, 1)]
    assert tested[0]["tested_step"] == tested[1]["tested_step"] == 4, tested
