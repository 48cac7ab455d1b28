"""Asynchronous LaminDB checkpoint persistence for PyTorch Lightning.

A drop-in for ``lamindb.integrations.lightning``: change
``from lamindb.integrations import lightning as ll`` to
``import lamin_lightning as ll``. Checkpoints are written locally as before and
persisted in the background, bounded, ordered and retried.

Importing this package does not import lamindb; the LaminDB layer
(:class:`Checkpoint`, :class:`SaveConfigCallback`, :func:`save_lightning_features`,
:func:`checkpoint_path`) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamin_lightning._callback import ArtifactPublishingModelCheckpoint
from lamin_lightning._errors import (
    CheckpointDirectoryError,
    LaminLightningError,
    LaminSetupError,
    LostFileError,
    OutboxInUseError,
    PermanentError,
    PersistenceError,
    TransientError,
    UnknownStoreError,
)
from lamin_lightning._events import (
    ArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactObserver,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import CheckpointSnapshot, JobRecord
from lamin_lightning._pipeline import PendingJob
from lamin_lightning._replay import FlushReport, flush_directory
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._stats import PersistenceStats
from lamin_lightning.store import ArtifactStore, register_store

if TYPE_CHECKING:
    from lamin_lightning._lamin import (
        ArtifactPublisher,
        Checkpoint,
        LaminArtifactPublisher,
        SaveConfigCallback,
        save_lightning_features,
    )
    from lamin_lightning._resume import checkpoint_path

_RESUME_EXPORTS = frozenset({"checkpoint_path"})
_LAMIN_EXPORTS = frozenset(
    {
        "ArtifactPublisher",
        "Checkpoint",
        "LaminArtifactPublisher",
        "SaveConfigCallback",
        "save_lightning_features",
    }
)

__all__ = [
    "ArtifactEvent",
    "ArtifactFailedEvent",
    "ArtifactKind",
    "ArtifactObserver",
    "ArtifactPublisher",
    "ArtifactPublishingModelCheckpoint",
    "ArtifactRemovedEvent",
    "ArtifactSavedEvent",
    "ArtifactStore",
    "Checkpoint",
    "CheckpointDirectoryError",
    "CheckpointSnapshot",
    "FlushReport",
    "JobRecord",
    "LaminArtifactPublisher",
    "LaminLightningError",
    "LaminSetupError",
    "LostFileError",
    "OutboxInUseError",
    "PendingJob",
    "PermanentError",
    "PersistenceError",
    "PersistenceStats",
    "RetryPolicy",
    "SaveConfigCallback",
    "TransientError",
    "UnknownStoreError",
    "checkpoint_path",
    "flush_directory",
    "register_store",
    "save_lightning_features",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _RESUME_EXPORTS:
        from lamin_lightning import _resume

        return getattr(_resume, name)
    if name in _LAMIN_EXPORTS:
        from lamin_lightning import _lamin

        return getattr(_lamin, name)
    raise AttributeError(f"module 'lamin_lightning' has no attribute {name!r}")
