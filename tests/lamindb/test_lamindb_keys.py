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
from lamindb_tier import TierModel, artifacts_under, fit
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


class _SlashMetricModel(TierModel):
    """Logs its score as ``train/loss``: a metric name with "/" (common in Lightning)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", float(self.scores[self.global_step]), on_step=True)
        return loss


def test_a_metric_name_with_a_slash_in_the_filename_keys_each_checkpoint_apart(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """``{train/loss:.2f}`` with auto_insert_metric_name writes ``step=2-train/loss=0.43.ckpt``:
    a subfolder per checkpoint, the same base name for equal rounded losses. Keyed by base
    name, step 3's save replaced step 2's artifact, and step 3's eviction deleted it,
    though Lightning keeps step 2's file. Each checkpoint now has its own key (its path
    below dirpath), and the store equals Lightning's kept set."""
    from lamindb_setup.core.hashing import hash_file

    from helpers import lightning_kept_paths

    dirpath = tmp_path / "ckpts"
    callback = ll.Checkpoint(
        dirpath=dirpath,
        filename="{step}-{train/loss:.2f}",
        monitor="train/loss",
        mode="min",
        save_top_k=2,
        every_n_train_steps=1,
    )
    fit(callback, tmp_path, steps=4, model=_SlashMetricModel(scores=[0.9, 0.43, 0.431, 0.1]))
    kept = sorted(p.relative_to(dirpath).as_posix() for p in lightning_kept_paths(callback))
    assert kept == ["step=2-train/loss=0.43.ckpt", "step=4-train/loss=0.10.ckpt"]
    prefix = callback.checkpoint_key_prefix
    artifacts = artifacts_under(ln, prefix)
    assert sorted(artifacts) == [f"{prefix}/{name}" for name in kept]
    for name in kept:
        assert artifacts[f"{prefix}/{name}"].hash == hash_file(dirpath / name)[1], name
    stats = callback.persistence_stats
    assert (stats.saved, stats.removed, stats.failed) == (4, 2, 0)


@pytest.mark.parametrize(
    ("filename", "names"),
    [
        ("./{step}", ["step=1.ckpt", "step=2.ckpt"]),  # directly in dirpath
        ("sub/../{step}", ["step=1.ckpt", "step=2.ckpt"]),
        ("../outside/{step}", ["step=1.ckpt", "step=2.ckpt"]),  # not below dirpath
        ("sub//{step}", ["sub/step=1.ckpt", "sub/step=2.ckpt"]),
    ],
)
def test_a_filename_with_dot_segments_keys_each_file_by_where_it_is(
    ln: Any, no_run: None, tmp_path: Path, filename: str, names: list[str]
) -> None:
    """Lightning joins the file name template to dirpath as written: ``./{step}`` writes
    ``dirpath/./step=1.ckpt``. Keyed by that text below dirpath, every save failed
    (LaminDB refuses a key with a ``.`` or ``..`` segment), where the reference (which
    keys by base name) persists them all; ``sub//{step}`` gave keys with an empty
    segment. Keys are now the file's normalised place below dirpath, and the base name
    (the reference's key) for a file directly in dirpath or outside it."""
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts", filename=filename, every_n_train_steps=1, save_top_k=-1
    )
    fit(callback, tmp_path, steps=2)
    prefix = callback.checkpoint_key_prefix
    assert sorted(artifacts_under(ln, prefix)) == [f"{prefix}/{name}" for name in names]
    assert callback.persistence_stats.failed == 0
