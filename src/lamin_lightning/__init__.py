"""Asynchronous LaminDB checkpoint persistence for PyTorch Lightning.

A drop-in for ``lamindb.integrations.lightning``: change
``from lamindb.integrations import lightning as ll`` to
``import lamin_lightning as ll``. Checkpoints are written locally as before and
persisted in the background, bounded, ordered and retried.

Importing this package imports neither lamindb nor Lightning, torch or anyio: the
records, events, errors and stats load at once (standard library only); every other
name loads its module on first use, so ``lamin-lightning status`` answers at once.
The LaminDB layer (:class:`Checkpoint`, :class:`SaveConfigCallback`,
:func:`save_lightning_features`, :func:`checkpoint_path`) imports lamindb then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lamin_lightning._errors import (
    CheckpointDirectoryError,
    CheckpointIOError,
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
from lamin_lightning._stats import PersistenceStats
from lamin_lightning.store import ArtifactStore, register_store

if TYPE_CHECKING:
    from lamin_lightning._callback import ArtifactPublishingModelCheckpoint
    from lamin_lightning._flush import FlushReport, flush_directory
    from lamin_lightning._lamin import (
        ArtifactPublisher,
        Checkpoint,
        LaminArtifactPublisher,
        SaveConfigCallback,
        save_lightning_features,
    )
    from lamin_lightning._pipeline import PendingJob
    from lamin_lightning._resume import checkpoint_path
    from lamin_lightning._retry import RetryPolicy

# Names whose module imports Lightning and torch (_callback), anyio and tenacity
# (_pipeline, _retry, _flush) or lamindb (_lamin, _resume): loaded on first use.
_LAZY: dict[str, str] = {
    "ArtifactPublisher": "lamin_lightning._lamin",
    "ArtifactPublishingModelCheckpoint": "lamin_lightning._callback",
    # The reference's deprecated Callback(path, key): reachable, as there, but not in __all__.
    "Callback": "lamin_lightning._lamin",
    "Checkpoint": "lamin_lightning._lamin",
    "FlushReport": "lamin_lightning._flush",
    "LaminArtifactPublisher": "lamin_lightning._lamin",
    "PendingJob": "lamin_lightning._pipeline",
    "RetryPolicy": "lamin_lightning._retry",
    "SaveConfigCallback": "lamin_lightning._lamin",
    "checkpoint_path": "lamin_lightning._resume",
    "flush_directory": "lamin_lightning._flush",
    "save_lightning_features": "lamin_lightning._lamin",
}

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
    "CheckpointIOError",
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
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lamin_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
