"""The reference's deprecated ``Callback(path, key)``, asynchronous like the rest.

``lamindb.integrations.lightning.Callback`` writes one checkpoint file at the end of
every training epoch and saves it as a new version of one artifact key, annotated
with the given features. This one does the same, except that the upload and the
annotation run on a background pipeline: the training thread writes the file and
stages a copy (the next epoch overwrites the path), nothing more. Versions are kept,
as the reference keeps them. Its jobs are not journaled: use :class:`Checkpoint`
for crash recovery, top-k, flags and everything else.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lamin_lightning._bridge import PersistencePipeline
from lamin_lightning._errors import LaminSetupError, PersistenceError
from lamin_lightning._events import ArtifactFailedEvent
from lamin_lightning._lamin_features import _ln, require_instance
from lamin_lightning._lamin_store import close_connections, outside_storage
from lamin_lightning._options import DEFAULT_FLUSH_TIMEOUT
from lamin_lightning._pipeline import JobSpec
from lamin_lightning._retry import RetryPolicy
from lamin_lightning._staging import Stager, release_staged, release_staging, staging_root

log = logging.getLogger("lamin_lightning")


class Callback(pl.Callback):
    """Saves a checkpoint to LaminDB after each training epoch, in the background.

    .. deprecated::
        Use :class:`Checkpoint` instead for new code.

    Args:
        path: A local path to the checkpoint (rewritten every epoch).
        key: The ``key`` of the checkpoint artifact (one new version per epoch).
        features: Features to annotate each version with: a value, or None to read it
            from the trainer attribute or logged metric of that name at the epoch's end.
    """

    def __init__(self, path: str | Path, key: str, features: dict[str, Any] | None = None) -> None:
        warnings.warn(
            "ll.Callback is deprecated, use ll.Checkpoint instead",
            DeprecationWarning,
            stacklevel=2,
        )
        self.path = Path(path)
        self.key = key
        self.features = dict(features or {})
        self._pipeline: PersistencePipeline | None = None
        self._failures: list[ArtifactFailedEvent] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pipeline": None, "_failures": []}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that every feature exists (``ValueError``, as the reference raises)."""
        ln = require_instance()
        found = set(
            ln.Feature.filter(name__in=sorted(self.features)).values_list("name", flat=True)
        )
        missing = [name for name in self.features if name not in found]
        if missing:
            s = "s" if len(missing) > 1 else ""
            raise LaminSetupError(
                f"Feature{s} {', '.join(missing)} missing. Create"
                f" {'them' if len(missing) > 1 else 'it'} first, e.g."
                f" `ln.Feature(name={missing[0]!r}, dtype=float).save()`."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the checkpoint, stage it and hand its upload to the background."""
        trainer.save_checkpoint(self.path)
        if not trainer.is_global_zero:
            return
        self._raise_failures()
        values = dict(self.features)
        for name in self.features:
            if hasattr(trainer, name):
                values[name] = getattr(trainer, name)
            elif name in trainer.callback_metrics:
                metric = trainer.callback_metrics[name]
                values[name] = metric.item() if hasattr(metric, "item") else float(metric)
        stager = Stager(staging_root(self.path.parent))
        staged, _, _ = stager.stage(self.path)
        self._ensure_pipeline().submit(
            JobSpec(
                operation="save",
                key=self.key,
                transfer=partial(self._upload, staged),
                commit=partial(self._annotate, staged, values),
                fail=partial(self._fail, staged),
                discard=partial(release_staged, staged),
                size_bytes=staged.stat().st_size,
                supersedable=False,  # one version per epoch, as the reference saves
            )
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Wait for every upload, then raise what failed."""
        self._stop()
        self._raise_failures()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Training raised (our own failure at an epoch's end, say): Lightning calls no
        ``teardown`` then. Wait for the uploads all the same, up to ``flush_timeout``'s
        default (900 s), unless it was Ctrl+C (which Lightning ignores from then on: a wait
        on hung storage could not be cut short); the exception goes on."""
        if isinstance(exception, KeyboardInterrupt):
            self._stop(timeout=0.0)
            return
        try:  # bounded as Checkpoint's wait after a crash: the error must come out
            self._stop(timeout=DEFAULT_FLUSH_TIMEOUT)
        except KeyboardInterrupt:  # (Lightning does not ignore it after a crash)
            log.warning("lamin-lightning: interrupted; not waiting for the uploads")

    def _stop(self, timeout: float | None = None) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.stop(timeout=timeout)
            # Kept while an upload still reads a staged copy (after Ctrl+C).
            release_staging(staging_root(self.path.parent))

    def _ensure_pipeline(self) -> PersistencePipeline:
        if self._pipeline is None:
            # One worker: versions of one key are created in epoch order.
            self._pipeline = PersistencePipeline(
                max_workers=1,
                max_pending=4,
                retry=RetryPolicy(),
                deliver=lambda event: None,
                thread_finalizer=close_connections,
            )
            self._pipeline.start()
        return self._pipeline

    def _upload(self, staged: Path) -> Any:
        with outside_storage(staged) as source:  # the staged copy is deleted after
            return _ln().Artifact(source, key=self.key, kind="model").save()

    def _annotate(self, staged: Path, values: dict[str, Any], artifact: Any) -> None:
        if values:
            artifact.features.add_values(values)
        release_staged(staged)

    def _fail(self, staged: Path, error: BaseException, attempts: int) -> None:
        release_staged(staged)  # no journal: nothing would ever read it again
        self._failures.append(
            ArtifactFailedEvent(
                kind="checkpoint",
                key=self.key,
                local_path=self.path,
                trainer=None,
                error=error,
                attempts=attempts,
            )
        )

    def _raise_failures(self) -> None:
        failures, self._failures = self._failures, []
        if failures:
            raise PersistenceError(failures)
