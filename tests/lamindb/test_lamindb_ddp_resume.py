"""DDP (2 CPU processes, gloo) killed mid-fit (SIGKILL of the whole process group), then
resumed with ``fit(ckpt_path="last")``: rank zero replays the outbox at ``setup`` while rank
one waits at Lightning's barrier. No deadlock, the same step resumed as ``ModelCheckpoint``
(step 5: the sync write of ``last.ckpt`` for step 5 came before the kill), and the
artifacts equal the kept checkpoints, one per key.

Runs ``ddp_diff.py`` in subprocesses with a timeout (a deadlock shows as the timeout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import assert_checkpoint_keys_persisted

pytestmark = [pytest.mark.lamindb, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "ddp_diff.py"
TIMEOUT = 240


def _run(
    root: Path, *args: str, kind: str = "ll", **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """``ddp_diff.py KIND ddp ROOT ARGS`` (``ll``: against this session's instance)."""
    if kind == "ll":
        import lamindb_setup
        from lamindb_setup.core._settings_store import write_local_current_instance

        write_local_current_instance(root, lamindb_setup.settings.instance.slug)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK"))}
    env.update(PYTHONWARNINGS="ignore", **env_extra)
    try:
        return subprocess.run(
            [sys.executable, str(SCRIPT), kind, "ddp", str(root), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
            cwd=root,
            check=False,
            start_new_session=True,  # the SIGKILL of the process group spares pytest
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"DDP fit did not finish within {TIMEOUT}s (deadlock?): {expired.stderr!r}")


def _report(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / "reports" / f"{name}.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("async_write", [False, True])
def test_ddp_resume_after_sigkill_replays_the_outbox_once(
    async_write: bool, ln: Any, tmp_path: Path
) -> None:
    extra = ["--async-write"] if async_write else []
    # Uploads held: the kill finds every job in the outbox, however fast commits are.
    killed = _run(tmp_path, "--fault=sigkill:5", "--hold-uploads", *extra)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    resumed = _run(tmp_path, "--resume", "--steps=10", *extra)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    # The kill left the jobs in the outbox; the resumed fit's setup replays them.
    assert "replaying the unfinished persistence jobs" in output, output[-4000:]
    zero, one = _report(tmp_path, "resume-rank0"), _report(tmp_path, "resume-rank1")
    assert zero["error"] is None and one["error"] is None, output[-4000:]
    # ModelCheckpoint resumes at 5; a background write of last.ckpt that the kill cut
    # short resumes from the previous one (documented for async_write).
    assert zero["started_at"] == one["started_at"]
    assert zero["started_at"] == 5 or (async_write and zero["started_at"] == 4), zero
    assert zero["global_step"] == 10
    for field in ("best_model_path", "last_model_path", "best_k_models"):
        assert zero[field] == one[field], field
    stats = zero["stats"]
    assert stats["failed"] == 0 and stats["pending"] == 0, stats
    dirpath = tmp_path / "ckpts"
    expected = {
        f"{zero['prefix']}/{p.name}": p
        for p in dirpath.glob("*.ckpt")
        if p.is_file() and not p.is_symlink()
    }
    assert {p.name for p in expected.values()} >= {"last.ckpt", "epoch=0-step=10.ckpt"}
    assert_checkpoint_keys_persisted(ln, zero["prefix"], expected)


def test_ddp_async_write_fit_again_from_last_right_after_an_exception(tmp_path: Path) -> None:
    """Both ranks raise at step 1 (after the first save); the script at once fits again
    with ckpt_path="last". Large checkpoint (~240 MB) so rank zero's write takes a while.

    Rank one's fit returns at once (other ranks do not wait) while rank zero still writes
    the first last.ckpt in on_exception; rank one resolved "last" before any barrier,
    found none, started at step 0 while rank zero resumed at step 1, and the fit died in
    gloo. ModelCheckpoint resumes both at 1; so does the callback now (a barrier in
    ``_find_last_checkpoints`` once a process group exists)."""
    done = _run(
        tmp_path,
        *("--fault=raise:1", "--retry", "--steps=3", "--async-write"),
        kind="mem",
        DDP_DIFF_BIG="60000",
    )
    output = (done.stdout + done.stderr)[-4000:]
    zero, one = _report(tmp_path, "retry-rank0"), _report(tmp_path, "retry-rank1")
    assert (zero["started_at"], one["started_at"]) == (1, 1), output
    assert zero["error"] is None and one["error"] is None, output
