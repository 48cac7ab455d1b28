"""The LightningCLI example (``examples/lightning_cli``) runs as a user runs it, offline.

``python main.py fit --config config.yaml`` in a subprocess, in a fresh folder, against
the session's local instance (the subprocess inherits ``LAMIN_SETTINGS_DIR`` and
``LAMIN_CACHE_DIR`` and gets ``LAMIN_CURRENT_INSTANCE``). A ``sitecustomize`` on the
subprocess's ``PYTHONPATH`` blocks every non-loopback connection from its start, so
contacting LaminDB's hub (or anything else) fails the run instead of passing by luck.
Expected keys and the best checkpoint are derived from what Lightning left on disk (kept
files, ``metrics.csv``), not hard-coded.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import artifact_features, artifacts_under, single, stored_path

pytestmark = [pytest.mark.lamindb, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_cli"
TIER = Path(__file__).resolve().parent

SITECUSTOMIZE = f"""\
import sys
sys.path.insert(0, {str(TIER)!r})
import pytest
from lamindb_tier import block_network
block_network(pytest.MonkeyPatch())
"""


def _run_example(workdir: Path, instance: str) -> subprocess.CompletedProcess[str]:
    for name in ("main.py", "config.yaml"):
        shutil.copy(EXAMPLE / name, workdir / name)
    guard = workdir / "network-guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    assert env["LAMIN_SETTINGS_DIR"] and env["LAMIN_CACHE_DIR"]  # the tier's, not ~/.lamin
    # lamindb finds the current instance through a `.lamin/current_instance` marker in
    # the working directory or a parent (written by `lamin init` / `lamin connect`), or
    # through this variable; the fresh working directory has no marker.
    env["LAMIN_CURRENT_INSTANCE"] = instance
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "main.py", "fit", "--config", "config.yaml"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_lightning_cli_example_persists_kept_checkpoints_and_config(
    ln: Any, tmp_path: Path
) -> None:
    """`python main.py fit --config config.yaml`: kept checkpoints, hparams, config in LaminDB."""
    started = time.time()
    done = _run_example(tmp_path, ln.setup.settings.instance.slug)
    output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"the example failed ({done.returncode}):\n{output}"
    assert "NetworkBlockedError" not in output, output

    # The run main.py tracked: the newest run of a transform named after the script.
    run = ln.Run.filter(transform__key__endswith="main.py").order_by("-started_at").first()
    assert run is not None and run.started_at.timestamp() >= started - 5, output
    prefix = f"runs/lightning_logs/{run.uid}"
    assert f"checkpoints under {prefix}/checkpoints/" in done.stdout, output

    local = tmp_path / "runs" / "lightning_logs" / "version_0"
    kept = sorted(p.name for p in (local / "checkpoints").glob("*.ckpt"))
    assert len(kept) == 2, kept  # save_top_k: 2 in config.yaml, 4 epochs

    stored = artifacts_under(ln, prefix)
    checkpoint_keys = {key for key, a in stored.items() if a.kind == "model"}
    assert checkpoint_keys == {f"{prefix}/checkpoints/{name}" for name in kept}
    for name in kept:
        artifact = stored[f"{prefix}/checkpoints/{name}"]
        assert stored_path(artifact).read_bytes() == (local / "checkpoints" / name).read_bytes()
        assert artifact.run_id == run.id

    config = stored[f"{prefix}/config.yaml"]
    assert (config.kind, config.description) == ("config", "Lightning CLI config")
    assert stored_path(config).read_text() == (local / "config.yaml").read_text()
    assert config in list(run.input_artifacts.all())
    hparams = stored[f"{prefix}/checkpoints/hparams.yaml"]
    assert stored_path(hparams).read_text() == (local / "hparams.yaml").read_text()
    assert set(stored) == checkpoint_keys | {config.key, hparams.key}

    # Best and rank from Lightning's own log of val_loss (monitor, mode min).
    with (local / "metrics.csv").open() as handle:
        val_loss = {int(row["epoch"]): float(row["val_loss"]) for row in csv.DictReader(handle)}
    ranked = sorted(
        (e for e in val_loss if any(n.startswith(f"epoch={e}-") for n in kept)),
        key=val_loss.__getitem__,
    )
    assert len(ranked) == 2
    for rank, epoch in enumerate(ranked):
        (name,) = [n for n in kept if n.startswith(f"epoch={epoch}-")]
        values = single(artifact_features(ln, stored[f"{prefix}/checkpoints/{name}"]))
        assert values["is_best_model"] is (rank == 0)
        assert values["model_rank"] == rank
        assert values["score"] == pytest.approx(val_loss[epoch], rel=1e-5)
        assert (values["monitor"], values["mode"]) == ("val_loss", "min")
