"""DDP on 2 CPU processes (gloo), ``ddp`` and ``ddp_spawn``: only global rank zero persists,
no other rank touches the pool or lamindb or waits on them, teardown does not deadlock,
and the artifact set is complete.

Each fit runs ``ddp_fit.py`` in a subprocess with a timeout (``ddp`` relaunches the
script for rank 1; a deadlock shows up as the timeout). The subprocess uses this
session's instance: it inherits ``LAMIN_SETTINGS_DIR``/``LAMIN_CACHE_DIR``, set by
``conftest.py`` before the instance was created, and runs in a folder whose
``.lamin/current_instance`` marker names the instance. Network is blocked in every rank, so
the callback's setup must keep lamindb from asking its hub about the instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import assert_checkpoint_keys_persisted

pytestmark = [pytest.mark.lamindb, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "ddp_fit.py"
TIMEOUT = 300


def run_ddp(root: Path, strategy: str, backend: str, *extra: str) -> dict[int, dict[str, Any]]:
    """Run ``ddp_fit.py`` and return the report of each rank (asserting exactly two)."""
    done, output = _run_ddp_script(root, strategy, backend, *extra)
    assert done.returncode == 0, f"{strategy} fit failed ({done.returncode}):\n{output}"
    reports = [json.loads(p.read_text()) for p in sorted((root / "reports").glob("*.json"))]
    by_rank = {r["rank"]: r for r in reports}
    assert sorted(by_rank) == [0, 1] and len(reports) == 2, output
    assert by_rank[0]["pid"] != by_rank[1]["pid"]
    return by_rank


def _run_ddp_script(
    root: Path, strategy: str, backend: str, *extra: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``ddp_fit.py`` within TIMEOUT (a deadlock fails the test); its process and output."""
    import lamindb_setup
    from lamindb_setup.core._settings_store import write_local_current_instance

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK"))}
    # lamindb 2.x finds the current instance through a marker in the working directory
    # (``.lamin/current_instance``, written where the instance was created: the repository,
    # shared with any other test session running there). Give the subprocess a working
    # directory of its own whose marker names this session's instance; its settings come
    # from the inherited LAMIN_SETTINGS_DIR.
    write_local_current_instance(root, lamindb_setup.settings.instance.slug)
    env["PYTHONWARNINGS"] = "ignore"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), strategy, backend, str(root), *extra],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
            cwd=root,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(
            f"{strategy} fit did not finish within {TIMEOUT}s (deadlock?):\n"
            f"{(expired.stdout or b'')[-3000:]!r}\n{(expired.stderr or b'')[-3000:]!r}"
        )
    (root / "ddp_fit.log").write_text(f"{done.stdout}\n{done.stderr}")
    # Rank one's traceback often only says rank zero went away: show rank zero's lines first.
    lines = f"{done.stdout}\n{done.stderr}".splitlines()
    rank_zero = [line for line in lines if not line.startswith("[rank1]")]
    output = "\n".join(rank_zero[-80:]) + "\n--- rank 1 ---\n" + "\n".join(lines[-20:])
    print(f"{strategy}/{backend}: {time.monotonic() - started:.1f}s")
    return done, output


def assert_only_rank_zero_persisted(reports: dict[int, dict[str, Any]], backend: str) -> None:
    zero, other = reports[0], reports[1]
    # Rank zero did the work, and its teardown flush left nothing behind.
    assert zero["transfers"] >= len(zero["kept"]), zero
    assert zero["removals"] > 0, "the scores should make Lightning evict checkpoints"
    assert zero["pool_seen"] and zero["outbox_seen"]
    stats = zero["stats"]
    assert stats["failed"] == 0 and stats["pending"] == 0
    assert (
        stats["submitted"]
        == stats["saved"] + stats["removed"] + stats["cancelled"] + stats["superseded"]
    )
    assert zero["pipeline_threads"] == []
    # Rank one never persisted, never had a pool, never waited on one.
    assert (other["transfers"], other["removals"]) == (0, 0), other
    assert not other["pool_seen"] and not other["outbox_seen"]
    assert other["pipeline_threads"] == []
    assert other["stats"]["submitted"] == 0
    assert other["stats"]["training_stall_seconds"] == 0
    assert other["teardown_seconds"] < 5, other
    if backend == "lamindb":
        assert zero["lamindb_imported"]
        assert not other["lamindb_imported"], "a non-zero rank imported lamindb"


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_only_rank_zero_persists_and_the_artifact_set_is_complete(
    strategy: str, ln: Any, tmp_path: Path
) -> None:
    """Two ranks on the real instance: rank zero persists Lightning's kept set, rank one
    touches neither the pool nor lamindb, and the fit ends without deadlock."""
    reports = run_ddp(tmp_path, strategy, "lamindb")
    assert_only_rank_zero_persisted(reports, "lamindb")
    zero = reports[0]
    assert zero["prefix"] == f"{tmp_path / 'ckpts'}/checkpoints"  # no run in the subprocess
    expected = {key: Path(path) for key, path in zero["kept"].items()}
    assert len(expected) == 3  # top-2 + last.ckpt
    assert_checkpoint_keys_persisted(ln, zero["prefix"], expected)
    hparams = ln.Artifact.filter(key=f"{zero['prefix']}/hparams.yaml")
    assert hparams.count() == 1


def test_ddp_with_async_write_and_the_test_store(tmp_path: Path) -> None:
    """Store-backed, with ``async_write`` (its barrier runs on every rank): same guarantees."""
    reports = run_ddp(tmp_path, "ddp", "memory", "--async-write")
    assert_only_rank_zero_persisted(reports, "memory")
    zero = reports[0]
    assert set(zero["store"]) == set(zero["kept"])
    for key, path in zero["kept"].items():
        assert zero["store"][key] == zero["local_sha256"][path], key


def test_ddp_with_an_async_checkpoint_io_whose_write_fails_ends_and_a_flush_completes_the_set(
    ln: Any, tmp_path: Path
) -> None:
    """Lightning's AsyncCheckpointIO, its 3rd write (rank zero) failing with ENOSPC: the
    fit ends within the timeout (no rank waits for another forever) with the disk error,
    and ``lamin-lightning flush`` then persists exactly the checkpoints left in dirpath,
    each as written there (none for the file never written)."""
    done, output = _run_ddp_script(tmp_path, "ddp", "lamindb", "--async-io-fails=3")
    assert done.returncode != 0, output
    assert "No space left on device" in output, output
    dirpath = tmp_path / "ckpts"
    flushed = subprocess.run(
        [sys.executable, "-m", "lamin_lightning._cli", "flush", "--no-progress", str(dirpath)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    prefix = f"{dirpath}/checkpoints"  # no run in the subprocess
    left = {f"{prefix}/{p.name}": p for p in dirpath.glob("*.ckpt")}
    assert len(left) >= 2, sorted(left)  # two written before the failure
    assert_checkpoint_keys_persisted(ln, prefix, left)
