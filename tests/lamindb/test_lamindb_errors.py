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


def test_wrong_value_type_fails_once_and_leaves_no_half_annotated_artifact(
    ln: Any, no_run: None, float_feature: str, tmp_path: Path, lamin_instance: Path
) -> None:
    """A wrongly typed feature value fails once (no retry) and leaves no artifact behind."""
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        features={"artifact": {float_feature: "not a float"}},
        artifact_observers=[observer],
        on_error="warn",
    )
    stored_before = {p for p in lamin_instance.rglob("*") if p.is_file()}
    with pytest.warns(UserWarning, match="could not be persisted"):
        fit(callback, tmp_path, steps=2)

    failures = observer.of_type(ArtifactFailedEvent)
    prefix = callback.checkpoint_key_prefix
    assert [(f.key, f.attempts) for f in failures] == [
        (f"{prefix}/epoch=0-step=1.ckpt", 1),
        (f"{prefix}/epoch=0-step=2.ckpt", 1),
    ]
    assert all(float_feature in str(f.error) for f in failures), failures[0].error
    assert observer.events == failures
    stats = callback.persistence_stats
    assert (stats.failed, stats.saved, stats.retried) == (2, 0, 0)
    assert artifacts_under(ln, prefix) == {}
    stored_after = {p for p in lamin_instance.rglob("*") if p.is_file()}
    assert stored_after - stored_before == set()
    # The local checkpoints of failed saves are kept.
    assert {p.name for p in Path(callback.dirpath).glob("*.ckpt")} == {
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
    }


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


class _FloatHparamModel(TierModel):
    """A TierModel with a float hparam whose feature (``tier_int_hparam``) is an int."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams["tier_int_hparam"] = 0.5


def test_a_bad_run_value_fails_one_checkpoint_not_every_one(
    ln: Any, fresh_run: Any, tmp_path: Path
) -> None:
    """A run-level value of the wrong type fails the checkpoint whose commit first adds the
    run's values (the reference's first save raises); later checkpoints persist. Before,
    every later commit tried the same values again and failed too: with on_error="warn",
    no checkpoint of the run was ever persisted."""
    if not ln.Feature.filter(name="tier_int_hparam").exists():
        ln.Feature(name="tier_int_hparam", dtype=int).save()
    observer = RecordingObserver()
    callback = ll.Checkpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=-1,
        artifact_observers=[observer],
        on_error="warn",
    )
    with pytest.warns(UserWarning, match="could not be persisted"):
        fit(callback, tmp_path, steps=3, model=_FloatHparamModel())
    prefix = callback.checkpoint_key_prefix
    failures = observer.of_type(ArtifactFailedEvent)
    assert [(f.key, f.attempts) for f in failures] == [(f"{prefix}/epoch=0-step=1.ckpt", 1)]
    assert "tier_int_hparam" in str(failures[0].error)
    stored = {key for key in artifacts_under(ln, prefix) if key.endswith(".ckpt")}
    assert stored == {f"{prefix}/epoch=0-step=2.ckpt", f"{prefix}/epoch=0-step=3.ckpt"}
