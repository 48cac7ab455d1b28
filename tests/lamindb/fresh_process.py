"""Run by the tier in a fresh process (lamindb holds one instance per process).

1. With LaminDB settings in a fresh folder and no instance: fit with
   ``lamin_lightning.Checkpoint`` and record what it raised and whether a training
   step ran.
2. Then create a fresh local instance, call the reference's
   ``save_lightning_features()`` first and ours twice after, record the features of
   the ``lamindb.lightning`` type, and fit once with our callback to see that it uses
   the features the reference created.

Prints one line ``RESULT: <json>``. Non-loopback network is blocked throughout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

home = Path(tempfile.mkdtemp(prefix="lamin-lightning-fresh-"))
os.environ["LAMIN_SETTINGS_DIR"] = str(home / "settings")
os.environ["LAMIN_CACHE_DIR"] = str(home / "cache")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from lamindb_tier import TierData, TierModel, block_network, make_trainer  # noqa: E402

import lamin_lightning as ll  # noqa: E402


def main() -> dict[str, object]:
    result: dict[str, object] = {}
    guard = pytest.MonkeyPatch()
    block_network(guard)

    model = TierModel()
    callback = ll.Checkpoint(dirpath=home / "no-instance")
    try:
        make_trainer(home, [callback], max_steps=2).fit(model, datamodule=TierData(n=2))
        result["error_type"] = None
    except Exception as error:
        result["error_type"] = f"{type(error).__module__}.{type(error).__qualname__}"
        result["error_message"] = str(error)
    result["training_steps_run"] = model.training_steps_run

    from lamin_lightning.testing import local_instance

    with local_instance(home / "instance"):
        from lamindb.integrations.lightning import save_lightning_features as reference_save

        import lamindb as ln

        reference_save()
        ll.save_lightning_features()
        ll.save_lightning_features()
        types = ln.Feature.filter(name="lamindb.lightning", is_type=True)
        result["type_records"] = types.count()
        result["features"] = sorted(
            ln.Feature.filter(type=types.one()).values_list("name", "_dtype_str")
        )
        callback = ll.Checkpoint(dirpath=home / "with-instance", monitor="score")
        make_trainer(home, [callback], max_steps=1).fit(TierModel(), datamodule=TierData(n=1))
        artifact = ln.Artifact.filter(key__startswith=callback.checkpoint_key_prefix + "/").one()
        result["checkpoint_features"] = sorted(
            ln.models.ArtifactJsonValue.filter(artifact_id=artifact.id).values_list(
                "jsonvalue__feature__name", flat=True
            )
        )
    guard.undo()
    return result


if __name__ == "__main__":
    print("RESULT: " + json.dumps(main()), flush=True)
