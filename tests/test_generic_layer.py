"""The generic layer, as the reference's: used as is, or by a class written for it.

The reference's ``ArtifactPublishingModelCheckpoint`` leaves Lightning's saving alone:
used as is it is a ``ModelCheckpoint`` with hooks and observers, and a concrete
subclass persists in its own ``_save_checkpoint`` (calling its ``save_*`` hooks and
``_notify_artifact_*``). Ours persisted through the hooks for every class, so the
generic layer used as is failed at the first save (``NotImplementedError``), and a
class written for the reference's layer persisted twice and found no
``_notify_artifact_saved`` (found by a review against the reference). Classes that
implement ``save_checkpoint_artifact`` without a ``_save_checkpoint`` of their own
(:class:`~lamin_lightning.testing.MemoryCheckpoint`, ``Checkpoint``) persist through
the pipeline, as documented.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import TinyModel, loader, make_trainer
from lamin_lightning import ArtifactPublishingModelCheckpoint
from lamin_lightning._callback import persists_through_pipeline
from lamin_lightning._staging import staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver


def _fit(tmp_path: Path, callback: Any, steps: int = 3) -> list[str]:
    model = TinyModel(scores=[3.0, 2.0, 1.0, 0.5])  # a new best at every step
    make_trainer(tmp_path, [callback], max_steps=steps).fit(model, loader())
    return sorted(os.listdir(callback.dirpath))


OPTIONS = {"every_n_train_steps": 1, "save_top_k": 2, "monitor": "score", "save_last": True}


def test_the_generic_layer_used_as_is_saves_as_model_checkpoint_does(tmp_path: Path) -> None:
    observer = RecordingObserver()
    generic = ArtifactPublishingModelCheckpoint(
        dirpath=tmp_path / "generic", artifact_observers=[observer], **OPTIONS
    )
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", **OPTIONS)

    assert _fit(tmp_path / "a", generic) == _fit(tmp_path / "b", plain)
    assert generic.best_model_path.endswith(os.path.basename(plain.best_model_path))
    assert generic.last_artifact_event is None and observer.events == []
    # Nothing of ours beside the folder: no journal, no staging.
    assert not staging_root(Path(generic.dirpath)).exists()


def test_async_write_on_the_generic_layer_used_as_is_warns_and_writes_in_place(
    tmp_path: Path,
) -> None:
    generic = ArtifactPublishingModelCheckpoint(
        dirpath=tmp_path / "generic", async_write=True, **OPTIONS
    )
    with pytest.warns(UserWarning, match="async_write=True has no effect"):
        files = _fit(tmp_path, generic)
    assert "last.ckpt" in files


class ReferenceStyle(ArtifactPublishingModelCheckpoint):
    """A subclass written for the reference's generic layer, as its ``Checkpoint`` is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved: list[str] = []

    def resolve_artifact_key(self, trainer: Any, filepath: Any, kind: str) -> str:
        return f"mine/{os.path.basename(filepath)}"

    def resolve_artifact_storage_uri(self, artifact: Any) -> str:
        return f"memory://{artifact}"

    def save_checkpoint_artifact(
        self, trainer: Any, filepath: Any, *, feature_values: Any = None
    ) -> Any:
        assert os.path.exists(filepath), "the file Lightning wrote, there now"
        self.saved.append(os.path.basename(filepath))
        return f"artifact-{len(self.saved)}"

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
        artifact = self.save_checkpoint_artifact(trainer, filepath)
        self._notify_artifact_saved(
            trainer, kind="checkpoint", key=key, artifact=artifact, local_path=filepath
        )

    def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        self._notify_artifact_removed(
            trainer,
            kind="checkpoint",
            key=self.resolve_artifact_key(trainer, filepath, "checkpoint"),
            local_path=filepath,
            artifact=None,
        )


def test_a_class_written_for_the_reference_generic_layer_persists_each_save_once(
    tmp_path: Path,
) -> None:
    observer = RecordingObserver()
    callback = ReferenceStyle(
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=1,
        monitor="score",
        artifact_observers=[observer],
    )
    _fit(tmp_path, callback, steps=3)

    saved = [e for e in observer.events if type(e).__name__ == "ArtifactSavedEvent"]
    removed = [e for e in observer.events if type(e).__name__ == "ArtifactRemovedEvent"]
    assert callback.saved == [os.path.basename(str(e.local_path)) for e in saved]
    assert len(saved) == 3 and len(removed) == 2, observer.events
    assert callback.last_checkpoint_artifact == "artifact-3"
    assert saved[-1].storage_uri == "memory://artifact-3"
    assert callback.last_artifact_event is removed[-1]  # Lightning saves, then evicts
    assert not staging_root(Path(callback.dirpath)).exists()


def test_which_classes_persist_through_the_pipeline() -> None:
    class HooksOnly(ArtifactPublishingModelCheckpoint):
        def save_checkpoint_artifact(self, *args: Any, **kwargs: Any) -> Any:
            return None

    class OnMemory(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)  # adds to ours, persisted by it

    assert not persists_through_pipeline(ArtifactPublishingModelCheckpoint)
    assert not persists_through_pipeline(ReferenceStyle)
    assert persists_through_pipeline(HooksOnly)
    assert persists_through_pipeline(MemoryCheckpoint)
    assert persists_through_pipeline(OnMemory)


def test_a_subclass_of_ours_with_a_save_hook_of_its_own_still_persists(tmp_path: Path) -> None:
    store = MemoryStore()

    class Logged(MemoryCheckpoint):
        calls = 0

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            Logged.calls += 1
            super()._save_checkpoint(trainer, filepath)

    callback = Logged(store, dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    _fit(tmp_path, callback, steps=2)
    assert Logged.calls == 2
    assert len(store.keys()) == 1  # save_top_k=1: the kept checkpoint, persisted


class _Wrapper(ArtifactPublishingModelCheckpoint):
    """A class of ours that wraps _save_checkpoint (to time it, say) and implements the
    hook the pipeline calls: taken for a reference-style class."""

    def __init__(self, store: MemoryStore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.wrapped = 0

    def resolve_artifact_key(self, trainer: Any, filepath: Any, kind: str) -> str:
        return f"mine/{os.path.basename(filepath)}"

    def resolve_artifact_storage_uri(self, artifact: Any) -> str:
        return "memory://"

    def save_checkpoint_artifact(
        self, trainer: Any, filepath: Any, *, feature_values: Any = None
    ) -> Any:
        return self.store.put(f"mine/{os.path.basename(filepath)}", filepath)

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        self.wrapped += 1
        super()._save_checkpoint(trainer, filepath)


def test_a_wrapper_that_persists_nothing_is_told_how_to_have_the_pipeline_persist(
    tmp_path: Path,
) -> None:
    """Found by a review: such a class persisted through the pipeline before the generic
    layer became the reference's, and then silently persisted nothing."""
    callback = _Wrapper(MemoryStore(), dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    with pytest.warns(UserWarning, match="set `lamin_lightning_pipeline = True` on _Wrapper"):
        _fit(tmp_path, callback, steps=2)
    assert callback.wrapped == 2


def test_a_class_that_declares_the_pipeline_persists_through_it(tmp_path: Path) -> None:
    class Declared(_Wrapper):
        lamin_lightning_pipeline = True

    store = MemoryStore()
    callback = Declared(store, dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    _fit(tmp_path, callback, steps=2)
    assert callback.wrapped == 2 and callback.last_checkpoint_artifact is not None
    assert persists_through_pipeline(Declared) and not persists_through_pipeline(_Wrapper)


def test_a_reference_style_class_that_notifies_is_not_warned(tmp_path: Path) -> None:
    callback = ReferenceStyle(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|many workers).*")
        _fit(tmp_path, callback, steps=2)
    assert len(callback.saved) == 2


class _Emitting(ArtifactPublishingModelCheckpoint):
    """Written as the reference documents its generic layer's hooks ("persist a checkpoint
    artifact and emit the corresponding event"): each save hook emits its event with the
    reference's helper, and there is no ``_save_checkpoint`` of its own, so the pipeline
    runs the hooks."""

    def __init__(self, store: MemoryStore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    def resolve_artifact_key(self, trainer: Any, filepath: Any, kind: str) -> str:
        return f"mine/{os.path.basename(filepath)}"

    def resolve_artifact_storage_uri(self, artifact: Any) -> str:
        return f"memory://{artifact}"

    def save_checkpoint_artifact(
        self, trainer: Any, filepath: Any, *, feature_values: Any = None
    ) -> Any:
        key = self.resolve_artifact_key(trainer, filepath, "checkpoint")
        artifact = self.store.put(key, filepath)
        self._notify_artifact_saved(
            trainer, kind="checkpoint", key=key, artifact=artifact, local_path=filepath
        )
        return artifact


def test_a_save_hook_that_emits_its_event_as_the_reference_documents_is_heard_once(
    tmp_path: Path,
) -> None:
    """Found by the documented-API differential (tests/lamindb/test_lamindb_documented_api.py,
    case generic-layer-config): the pipeline delivered each save's event after the commit,
    and the hook's own ``_notify_artifact_saved`` delivered it a second time, at once on the
    worker thread, out of order with the removals."""
    observer = RecordingObserver()
    callback = _Emitting(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        artifact_observers=[observer],
    )
    _fit(tmp_path, callback, steps=3)
    kinds = [(type(e).__name__, os.path.basename(e.key)) for e in observer.events]
    assert kinds == [
        ("ArtifactSavedEvent", "epoch=0-step=1.ckpt"),
        ("ArtifactSavedEvent", "epoch=0-step=2.ckpt"),
        ("ArtifactRemovedEvent", "epoch=0-step=1.ckpt"),
        ("ArtifactSavedEvent", "epoch=0-step=3.ckpt"),
        ("ArtifactRemovedEvent", "epoch=0-step=2.ckpt"),
    ]


class _EmittingASidecar(_Emitting):
    """A save hook that, beside the checkpoint, persists a file of its own (a model card
    next to each checkpoint) and emits that artifact's event with the reference's helper,
    as it emits the checkpoint's."""

    def save_checkpoint_artifact(
        self, trainer: Any, filepath: Any, *, feature_values: Any = None
    ) -> Any:
        card = Path(filepath).with_suffix(".card")
        card.write_text("a model card")
        key = f"mine/{card.name}"
        self._notify_artifact_saved(
            trainer, kind="config", key=key, artifact=self.store.put(key, card), local_path=card
        )
        return super().save_checkpoint_artifact(trainer, filepath, feature_values=feature_values)


def test_a_save_hook_emitting_the_event_of_another_artifact_it_persisted_is_heard(
    tmp_path: Path,
) -> None:
    """Since the pipeline delivers the event of the artifact its job's hook persists (see
    above), ``_notify_artifact_saved`` called from such a hook delivered nothing, whatever
    the artifact: a file the hook persisted beside the checkpoint was never heard of by
    the hooks and observers (the pipeline knows nothing of it). Only the job's own event
    is left to the pipeline; the other is delivered at once."""
    observer = RecordingObserver()
    callback = _EmittingASidecar(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        every_n_train_steps=1,
        save_top_k=-1,
        artifact_observers=[observer],
    )
    _fit(tmp_path, callback, steps=2)
    saved = [
        (e.kind, os.path.basename(e.key))
        for e in observer.events
        if type(e).__name__ == "ArtifactSavedEvent"
    ]
    # The card's event is delivered by the hook, at once, on the worker's thread; the
    # checkpoint's by the pipeline once committed: each card before its checkpoint, and
    # the checkpoints in order, but the next card may come before the last checkpoint.
    assert sorted(saved) == [
        ("checkpoint", "epoch=0-step=1.ckpt"),
        ("checkpoint", "epoch=0-step=2.ckpt"),
        ("config", "epoch=0-step=1.card"),
        ("config", "epoch=0-step=2.card"),
    ]
    assert [name for kind, name in saved if kind == "checkpoint"] == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
    ]
    for step in (1, 2):
        card = saved.index(("config", f"epoch=0-step={step}.card"))
        assert card < saved.index(("checkpoint", f"epoch=0-step={step}.ckpt")), saved
