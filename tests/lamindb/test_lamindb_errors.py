"""Bad input fails early and clearly; bad values fail once, cleanly; the tier is offline."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from lamindb_tier import NetworkBlockedError, TierModel, artifacts_under, fit

import lamin_lightning as ll
from lamin_lightning import ArtifactFailedEvent, LaminSetupError
from lamin_lightning.testing import RecordingObserver

pytestmark = [
    pytest.mark.lamindb,
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lamin-lightning-")]


def test_no_instance_fails_at_setup_with_lamin_init_hint(
    fresh_process_report: dict[str, Any],
) -> None:
    """Without an instance, fit fails at setup with a `lamin init` hint, before training."""
    assert fresh_process_report["error_type"] == "lamin_lightning._errors.LaminSetupError"
    assert "lamin init" in fresh_process_report["error_message"]
    assert fresh_process_report["training_steps_run"] == 0


@pytest.fixture(scope="module")
def float_feature(ln: Any) -> str:
    name = "tier_float_value"
    if not ln.Feature.filter(name=name).exists():
        ln.Feature(name=name, dtype=float).save()
    return name


@pytest.mark.parametrize("scope", ["run", "artifact"])
def test_unknown_user_feature_fails_at_setup_before_training(
    scope: str, ln: Any, fresh_run: Any, float_feature: str, tmp_path: Path
) -> None:
    """An unknown user feature fails at setup, naming it, before any training step."""
    model = TierModel()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        features={scope: {"tier_no_such_feature": 1.0, float_feature: 1.0}},  # type: ignore[misc]
    )
    with pytest.raises(LaminSetupError, match="tier_no_such_feature") as raised:
        fit(callback, tmp_path, steps=2, model=model)
    assert float_feature not in str(raised.value)
    assert model.training_steps_run == 0
    assert not ln.Artifact.filter(key__startswith=str(tmp_path)).exists()
    assert _pipeline_threads() == []


def test_network_is_blocked_for_non_loopback_addresses_in_every_thread() -> None:
    """The guard blocks non-loopback connections from any thread, not loopback or unix."""
    with pytest.raises(NetworkBlockedError):
        socket.create_connection(("hub.lamin.ai", 443), timeout=1)
    errors: list[BaseException] = []

    def connect_elsewhere() -> None:
        with socket.socket() as sock:
            try:
                sock.connect(("192.0.2.1", 443))
            except BaseException as error:
                errors.append(error)

    thread = threading.Thread(target=connect_elsewhere)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], NetworkBlockedError)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(FileNotFoundError):
        sock.connect("/nonexistent/lamin-lightning-tier.sock")


def test_the_same_callback_fit_again_replays_its_first_fits_failed_save_once(
    ln: Any, no_run: None, tmp_path: Path
) -> None:
    """One callback, two fits (the second resumed from last.ckpt, a notebook's next cell).
    A save of the first fit fails for good (on_error="warn"): the second fit's setup
    replays it, once, marked recovered; the store ends equal to the folder, one artifact
    per checkpoint file, and nothing is left pending."""
    from lamindb_tier import TierData, assert_checkpoint_keys_persisted, make_trainer

    from lamin_lightning import ArtifactSavedEvent
    from lamin_lightning._journal import journal_paths, read_pending
    from lamin_lightning._lamin import LaminArtifactPublisher
    from lamin_lightning._staging import staging_root

    refused = {"on": True}

    class Refusing(LaminArtifactPublisher):
        def create_artifact(self, local_path: Any, **kwargs: Any) -> Any:
            if refused["on"] and str(kwargs.get("key", "")).endswith("step=2.ckpt"):
                raise PermissionError("the storage refused step=2")
            return super().create_artifact(local_path, **kwargs)

    observer = RecordingObserver()
    dirpath = tmp_path / "ckpts"
    callback = ll.Checkpoint(
        dirpath=dirpath,
        every_n_train_steps=1,
        save_top_k=-1,
        save_last=True,
        retry=1,
        artifact_observers=[observer],
        on_error="warn",
    )
    callback._artifact_publisher = Refusing()
    with pytest.warns(UserWarning, match="could not be persisted"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(TierModel(), datamodule=TierData(n=4))
    prefix = callback.checkpoint_key_prefix
    failed = [e.key for e in observer.of_type(ArtifactFailedEvent)]
    assert failed == [f"{prefix}/epoch=0-step=2.ckpt"], observer.events
    pending = [r.key for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]
    assert pending == [f"{prefix}/epoch=0-step=2.ckpt"]

    refused["on"] = False
    observer.events.clear()
    make_trainer(tmp_path, [callback], max_steps=4).fit(
        TierModel(), datamodule=TierData(n=4), ckpt_path="last"
    )
    recovered = [(e.key, type(e).__name__) for e in observer.events if e.recovered]
    assert recovered == [(f"{prefix}/epoch=0-step=2.ckpt", "ArtifactSavedEvent")], observer.events
    assert observer.of_type(ArtifactFailedEvent) == []
    assert all(isinstance(e, ArtifactSavedEvent) for e in observer.events)
    assert callback.checkpoint_key_prefix == prefix
    on_disk = {f"{prefix}/{p.name}": p for p in dirpath.glob("*.ckpt")}
    assert len(on_disk) == 5  # step=1..4 and last.ckpt
    assert_checkpoint_keys_persisted(ln, prefix, on_disk)
    pending = [r.key for p in journal_paths(staging_root(dirpath)) for _, r in read_pending(p)]
    assert pending == []


class _IntMetricModel(TierModel):
    """A TierModel that also logs ``tier_int_metric`` = 0.5, a float, whose feature is an int."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("tier_int_metric", 0.5, on_step=True, on_epoch=False)
        return loss


@pytest.mark.parametrize("refused", ["value", "metric"])
def test_an_artifact_value_lamindb_refuses_is_left_out_and_the_checkpoint_persists(
    refused: str,
    ln: Any,
    no_run: None,
    float_feature: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An artifact value LaminDB refuses (``"not a float"`` given for a float feature, or a
    float metric logged under an int feature's name) is left out of each checkpoint, with
    one warning naming the feature, its dtype and the value; every checkpoint persists
    with its flags and its other values, and its saved event names the refused feature.
    An int given for a float feature is recorded as the float. Before, each checkpoint's
    job failed and left no artifact (PersistenceError out of fit)."""
    import logging

    from lamindb_tier import artifact_features, single

    from lamin_lightning import ArtifactSavedEvent

    for name, dtype in {"tier_int_metric": int, "tier_str_value": str}.items():
        if not ln.Feature.filter(name=name).exists():
            ln.Feature(name=name, dtype=dtype).save()
    if refused == "value":
        name, dtype, value = float_feature, "float", "not a float"
        features: dict[str, Any] = {name: value, "tier_str_value": "kept"}
        kept = {"tier_str_value": "kept"}
    else:
        name, dtype, value = "tier_int_metric", "int", 0.5
        features = {name: None, float_feature: 2, "tier_str_value": "kept"}
        kept = {float_feature: 2.0, "tier_str_value": "kept"}
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        features={"artifact": features},
        artifact_observers=[observer],
    )
    caplog.set_level(logging.DEBUG, logger="lamin_lightning")
    fit(callback, tmp_path, steps=2, model=_IntMetricModel())

    prefix = callback.checkpoint_key_prefix
    keys = [f"{prefix}/epoch=0-step=1.ckpt", f"{prefix}/epoch=0-step=2.ckpt"]
    saved = observer.of_type(ArtifactSavedEvent)
    assert [(e.key, e.unannotated_features) for e in saved] == [(k, (name,)) for k in keys]
    assert observer.of_type(ArtifactFailedEvent) == []
    stats = callback.persistence_stats
    assert (stats.saved, stats.failed) == (2, 0)
    stored = artifacts_under(ln, prefix)
    assert sorted(stored) == keys
    for key in keys:
        values = single(artifact_features(ln, stored[key]))
        assert {n: values.get(n) for n in kept} == kept, values
        assert isinstance(values.get(float_feature, 0.0), float)
        assert name not in values
        assert values["is_last_model"] is (key == keys[-1])
    said = f"the value {value!r} of feature {name!r} (dtype {dtype}) is left out"
    told = [r for r in caplog.records if said in r.getMessage()]
    assert [r.levelno for r in told] == [logging.WARNING, logging.DEBUG], caplog.text
    assert f"give it a value of dtype {dtype}" in told[0].getMessage()
