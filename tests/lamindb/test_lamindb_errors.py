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
