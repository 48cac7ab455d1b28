"""The reference's deprecated ``Callback(path, key)``, saving in the background."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import TierData, TierModel, artifact_features, make_trainer

import lamin_lightning as ll
from lamin_lightning._lamin import Callback

pytestmark = pytest.mark.lamindb


@pytest.fixture(scope="module")
def legacy_feature(ln: Any) -> str:
    """A float feature named like the metric TierModel logs (10 * score)."""
    name = "tier_metric"
    if not ln.Feature.filter(name=name).exists():
        ln.Feature(name=name, dtype=float).save()
    return name


def test_deprecated_callback_warns_and_saves_one_version_per_epoch(
    ln: Any, no_run: None, legacy_feature: str, tmp_path: Path
) -> None:
    """DeprecationWarning naming ll.Checkpoint; two epochs leave two versions of the key,
    each annotated with the feature read from the logged metric at that epoch's end."""
    key = f"tier-legacy/{tmp_path.name}/model.ckpt"
    with pytest.warns(DeprecationWarning, match="use ll.Checkpoint instead"):
        callback = ll.Callback(tmp_path / "model.ckpt", key, features={legacy_feature: None})
    assert isinstance(callback, Callback)
    trainer = make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=2)
    model = TierModel(scores=[1.0, 2.0])
    trainer.fit(model, TierData(n=1))
    versions = list(ln.Artifact.filter(key=key).order_by("created_at"))
    assert len(versions) == 2
    assert all(v.kind == "model" for v in versions)
    values = [artifact_features(ln, v).get(legacy_feature) for v in versions]
    assert values == [[10.0], [20.0]]  # the metric at each epoch's end, in epoch order
    assert (tmp_path / "model.ckpt").exists()


def test_deprecated_callback_with_a_missing_feature_fails_before_training(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """A missing feature raises ValueError starting "Feature <name> missing", as the reference."""
    with pytest.warns(DeprecationWarning):
        callback = ll.Callback(tmp_path / "m.ckpt", "tier-legacy/x.ckpt", features={"nope_x": 1})
    model = TierModel()
    with pytest.raises(ValueError, match=r"^Feature nope_x missing"):
        make_trainer(tmp_path, [callback]).fit(model, TierData(n=2))
    assert model.training_steps_run == 0


def test_deprecated_callback_whose_uploads_fail_leaves_no_staged_copy(
    ln: Any, no_run: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It keeps no journal, so nothing would ever read a failed upload's staged copy (a
    hard link holding the checkpoint): it goes with the failure, and this process lets
    go of its lock file in the staged folder at teardown. The checkpoint file stays."""
    from lamin_lightning import _owners
    from lamin_lightning._staging import staging_root

    with pytest.warns(DeprecationWarning):
        callback = ll.Callback(tmp_path / "model.ckpt", f"tier-legacy/{tmp_path.name}/m.ckpt")

    def refuse(staged: Path) -> Any:
        raise ll.PermanentError("storage refuses it")

    monkeypatch.setattr(callback, "_upload", refuse)
    with pytest.raises(ll.PersistenceError, match="storage refuses it"):
        make_trainer(tmp_path, [callback], max_steps=-1, max_epochs=2).fit(
            TierModel(scores=[1.0, 2.0]), TierData(n=1)
        )
    staged = staging_root(tmp_path) / "staged"
    assert list(staged.iterdir()) == []
    assert str(staged) not in _owners._held
    assert (tmp_path / "model.ckpt").exists()
