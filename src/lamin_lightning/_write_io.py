"""``async_write`` inside Lightning's save path: a CheckpointIO that snapshots instead of writing.

With ``async_write=True`` the callback still saves through ``trainer.save_checkpoint``
(strategy, then CheckpointIO), so an override of either sees every call, as Lightning's
own ``AsyncCheckpointIO`` leaves them. For the length of that one call the strategy's
CheckpointIO is wrapped: where the wrapped plugin would ``torch.save`` the assembled
checkpoint, the wrapper copies it into a host snapshot (training thread) and keeps the
background write for the callback, which runs it on the pipeline's intake thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from lamin_lightning._local_write import HostWrite

TakeSnapshot = Callable[[dict[str, Any], str], HostWrite]
"""Copies an assembled checkpoint into a host snapshot; returns the write of its file."""


class SnapshotCheckpointIO(CheckpointIO):
    """Wraps a strategy's CheckpointIO for one save: snapshot now, write in the background.

    Loading and removing go to the wrapped plugin unchanged.

    Args:
        wrapped: The strategy's CheckpointIO (the default ``TorchCheckpointIO``).
        take: Takes the snapshot (see :data:`TakeSnapshot`).
    """

    def __init__(self, wrapped: CheckpointIO, take: TakeSnapshot) -> None:
        super().__init__()
        self.wrapped = wrapped
        self._take = take
        self.write: HostWrite | None = None

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or self.write is not None:
            # Not ours to take (options only the wrapped plugin knows; a second save in
            # one call): the wrapped plugin writes it, now.
            self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        self.write = self._take(checkpoint, str(path))

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        location = {} if map_location is None else {"map_location": map_location}
        return self.wrapped.load_checkpoint(path, weights_only=weights_only, **location)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.wrapped.remove_checkpoint(path)


@contextmanager
def saving_to_snapshots(strategy: Any, take: TakeSnapshot) -> Iterator[SnapshotCheckpointIO]:
    """While inside, ``strategy`` saves through a :class:`SnapshotCheckpointIO`.

    The strategy's own CheckpointIO is put back on the way out, whatever happened.
    """
    wrapped = strategy.checkpoint_io
    wrapper = SnapshotCheckpointIO(wrapped, take)
    strategy.checkpoint_io = wrapper
    try:
        yield wrapper
    finally:
        strategy.checkpoint_io = wrapped


__all__ = ["SnapshotCheckpointIO", "TakeSnapshot", "saving_to_snapshots"]
