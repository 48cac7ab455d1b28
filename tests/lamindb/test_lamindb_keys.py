"""Artifact keys on a real instance, case by case, against the reference's key functions.

Each case runs one real fit of ``lamin_lightning.Checkpoint`` (one checkpoint), reads
the keys of what was stored, and asks a ``lamindb.integrations.lightning.Checkpoint``
built with the same arguments (and pointed at the same trainer) for its
``base_prefix``, ``checkpoint_key_prefix`` and ``resolve_artifact_key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import artifacts_under, fit
from lightning.pytorch.loggers import CSVLogger

import lamin_lightning as ll

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# name: (dirpath spec, logger spec, run active, run_uid_is_version, expected base template)
# dirpath spec: None, "abs:<sub>" (absolute, under tmp_path) or "rel:<sub>" (relative to
# tmp_path after chdir); a trailing "/" is kept in the string passed to Checkpoint.
# logger spec: None, "csv" (integer version 0) or "csv-str" (version "exp-a").
# Template fields: {abs} absolute dirpath without trailing slash, {rel} relative one,
# {run} the run uid, {save} the logger's save_dir basename.
CASES: dict[str, tuple[str | None, str | None, bool, bool, str]] = {
    "dirpath-abs-run": ("abs:ckpts", None, True, True, "{abs}/{run}"),
    "dirpath-abs-trailing-slash-uid-off": ("abs:ckpts/", None, True, False, "{abs}"),
    "dirpath-rel-trailing-slash-no-run": ("rel:ckpts/", None, False, True, "{rel}"),
    "dirpath-rel-run": ("rel:ckpts", None, True, True, "{rel}/{run}"),
    "dirpath-wins-over-logger": ("abs:ckpts", "csv", True, True, "{abs}/{run}"),
    "logger-run-replaces-version": (None, "csv", True, True, "{save}/tier/{run}"),
    "logger-uid-off": (None, "csv", True, False, "{save}/tier/version_0"),
    "logger-string-version-no-run": (None, "csv-str", False, True, "{save}/tier/exp-a"),
    "neither-no-run": (None, None, False, True, ""),
    "neither-run": (None, None, True, True, "{run}"),
}


def _dirpath(spec: str | None, tmp_path: Path, case: str) -> tuple[str | None, str, str]:
    """(string passed as dirpath, absolute form, relative form) — both without trailing slash."""
    if spec is None:
        return None, "", ""
    where, sub = spec.split(":", 1)
    # Unique per case: keys without a run uid would otherwise collide across tests.
    sub = f"{case}-{sub}"
    if where == "abs":
        return str(tmp_path) + "/" + sub, str(tmp_path / sub.rstrip("/")), ""
    return sub, str(tmp_path / sub.rstrip("/")), sub.rstrip("/")


@pytest.mark.parametrize("case", list(CASES))
def test_key_layout_matches_reference(
    case: str, ln: Any, fresh_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoint, hparams and config keys equal the documented layout and the reference's."""
    from lamindb.integrations import lightning as reference

    dir_spec, logger_spec, run_active, uid_is_version, template = CASES[case]
    if not run_active:
        monkeypatch.setattr(ln.context, "_run", None)
    monkeypatch.chdir(tmp_path)
    dirpath, abs_dir, rel_dir = _dirpath(dir_spec, tmp_path, case)
    logger: Any = False
    if logger_spec is not None:
        version = "exp-a" if logger_spec == "csv-str" else None
        logger = CSVLogger(save_dir=str(tmp_path), name="tier", version=version)

    callback = ll.Checkpoint(dirpath=dirpath, run_uid_is_version=uid_is_version)
    trainer = fit(callback, tmp_path, steps=1, logger=logger)

    expected_base = template.format(
        abs=abs_dir, rel=rel_dir, run=fresh_run.uid if run_active else "", save=tmp_path.name
    )
    expected_prefix = f"{expected_base}/checkpoints" if expected_base else "checkpoints"
    assert callback.base_prefix == expected_base
    assert callback.checkpoint_key_prefix == expected_prefix

    local_checkpoints = sorted(Path(callback.dirpath).glob("*.ckpt"))
    assert [p.name for p in local_checkpoints] == ["epoch=0-step=1.ckpt"]
    expected_keys = {f"{expected_prefix}/epoch=0-step=1.ckpt"}
    if logger_spec is not None:
        expected_keys.add(f"{expected_prefix}/hparams.yaml")
    stored = artifacts_under(ln, expected_prefix)
    assert set(stored) == expected_keys

    # The reference, given the same arguments and trainer, derives the same keys.
    ref = reference.Checkpoint(dirpath=dirpath, run_uid_is_version=uid_is_version)
    ref._trainer = trainer
    assert ref.base_prefix == callback.base_prefix
    assert ref.checkpoint_key_prefix == callback.checkpoint_key_prefix
    for name, kind in (
        ("epoch=0-step=1.ckpt", "checkpoint"),
        ("hparams.yaml", "hparams"),
        ("config.yaml", "config"),
    ):
        path = Path(callback.dirpath) / name
        ours = callback.resolve_artifact_key(trainer, path, kind)  # type: ignore[arg-type]
        assert ours == ref.resolve_artifact_key(trainer, path, kind)
        if kind == "config":
            assert ours == (f"{expected_base}/config.yaml" if expected_base else "config.yaml")
