"""Calling the ``save_*`` hooks directly behaves like the synchronous reference.

Code written against ``lamindb.integrations.lightning`` may call
``save_config_artifact`` or ``save_checkpoint_artifact`` itself and expect the
artifact to be saved, annotated and announced to observers before the call returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import artifact_features, fit, single

import lamin_lightning as ll
from lamin_lightning import ArtifactSavedEvent
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.contract,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def test_direct_save_calls_annotate_and_emit_before_returning(
    ln: Any, tmp_path: Path, no_run: None
) -> None:
    """A direct save_* call returns a saved, annotated artifact and emits its event."""
    observer = RecordingObserver()
    callback = ll.Checkpoint(dirpath=str(tmp_path / "ckpts"), artifact_observers=[observer])
    trainer = fit(callback, tmp_path)
    before = len(observer.events)

    extra = tmp_path / "extra.ckpt"
    extra.write_bytes(b"weights")
    score = ln.Feature.filter(name="score", type__name="lamindb.lightning").one()
    artifact = callback.save_checkpoint_artifact(trainer, extra, feature_values={score: 0.25})
    assert artifact.id is not None
    assert artifact.key == f"{callback.checkpoint_key_prefix}/extra.ckpt"
    assert single(artifact_features(ln, artifact))["score"] == 0.25
    saved = observer.events[before:]
    assert [type(e) for e in saved] == [ArtifactSavedEvent]
    assert saved[0].artifact.id == artifact.id and saved[0].storage_uri == str(artifact.path)

    # Saving the same key again directly replaces the older artifact, as the reference does.
    extra.write_bytes(b"weights v2")
    again = callback.save_checkpoint_artifact(trainer, extra)
    assert [a.id for a in ln.Artifact.filter(key=artifact.key)] == [again.id]

    config = tmp_path / "config.yaml"
    config.write_text("trainer: {}\n")
    config_artifact = callback.save_config_artifact(trainer, config)
    assert config_artifact.key == f"{callback.base_prefix}/config.yaml"
    assert observer.events[-1].kind == "config"
    assert observer.events[-1].artifact.id == config_artifact.id
