"""Lifecycle events and the observer protocol.

Events are frozen: they cross from the pipeline's threads to user code and must
not change on the way. Field names and order match
``lamindb.integrations.lightning`` so observers written for it work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

ArtifactKind = Literal["checkpoint", "config", "hparams"]
"""Which file an event is about: a checkpoint, a LightningCLI config, or ``hparams.yaml``."""


@dataclass(frozen=True)
class ArtifactEvent:
    """Fields every lifecycle event carries.

    Attributes:
        kind: Which kind of file the event is about.
        key: The logical artifact key, resolved when the job was submitted.
        local_path: The path Lightning wrote (not the staged copy).
        trainer: The trainer that produced the file. Do not read live training
            state from it: by the time the event arrives, training has moved on.
    """

    kind: ArtifactKind
    key: str
    local_path: Path
    trainer: Any


@dataclass(frozen=True)
class ArtifactSavedEvent(ArtifactEvent):
    """An artifact was persisted and committed.

    Attributes:
        artifact: The persisted object (a ``lamindb.Artifact`` for ``Checkpoint``).
        storage_uri: Where the bytes live, for hand-off to other registries.
        recovered: True when the job was replayed from the outbox after a crash.
        unannotated_features: Names of features whose values LaminDB refused (a value
            of another dtype than its feature's, a categorical value not in its
            registry; for a replay also a feature deleted or changed since the crash):
            left out, with a warning; the artifact and every other annotation are kept.
    """

    artifact: Any
    storage_uri: str
    recovered: bool = False
    unannotated_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArtifactRemovedEvent(ArtifactEvent):
    """Lightning removed a checkpoint file; its persisted artifact (if any) was deleted.

    Attributes:
        artifact: The artifact that was deleted, or None when nothing had been
            persisted under the key (for example a save cancelled by this removal).
        storage_uri: Where the deleted artifact lived, or None.
        recovered: True when the job was replayed from the outbox after a crash.
    """

    artifact: Any | None = None
    storage_uri: str | None = None
    recovered: bool = False


@dataclass(frozen=True)
class ArtifactFailedEvent(ArtifactEvent):
    """Persisting a file failed for good: retries were exhausted or the error was permanent.

    The local file is kept. The event takes the place in the event stream that the
    saved or removed event would have taken.

    Attributes:
        error: The last exception raised.
        attempts: How many attempts were made (1 for a permanent error).
        operation: ``"save"`` or ``"remove"``.
        recovered: True when the job was replayed from the outbox after a crash.
    """

    error: BaseException
    attempts: int
    operation: Literal["save", "remove"] = "save"
    recovered: bool = False


@runtime_checkable
class ArtifactObserver(Protocol):
    """Receives artifact lifecycle events, in submission order, on the delivery thread.

    ``on_artifact_failed`` is optional: an observer that does not define it is
    simply not told about failures. Exceptions raised by an observer are logged
    and do not affect persistence or other observers.
    """

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        """Called after an artifact was persisted and committed."""
        ...

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        """Called after an evicted checkpoint was removed locally and from storage."""
        ...


AnyArtifactEvent = ArtifactSavedEvent | ArtifactRemovedEvent | ArtifactFailedEvent
