"""``async_write=True``: the local ``torch.save`` runs off the training thread.

The training thread only snapshots the checkpoint's tensors into reusable host
buffers; the intake thread serialises and writes the file (temp name, fsync,
rename), then stages it and admits the persistence job.

Everything is observed from outside the package: concurrency is driven by a Lightning
callback (:class:`WriteGate`) that adds an object to each checkpoint in
``on_save_checkpoint``; serialising the checkpoint (the background write) pickles that
object, which waits for a permit that the test or the training thread gives at a known
point. A write that dies midway hits a real limit (``RLIMIT_FSIZE``, like a full disk);
the host buffers a snapshot copies into are seen through a ``TorchFunctionMode`` on the
training thread. Nothing sleeps to synchronise.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import mmap
import os
import resource
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.overrides import TorchFunctionMode

from helpers import (
    TinyModel,
    checkpoint_files,
    ctrl_c_right_after_entering,
    loader,
    make_trainer,
    returns_on_another_thread,
    sha256_file,
    staged_files,
    wait_until,
)
from helpers import (
    mounted_at as _mounted_at,
)
from lamin_lightning import (
    ArtifactFailedEvent,
    ArtifactSavedEvent,
    PersistenceError,
    RetryPolicy,
    _callback,
    _local_write,
    _names,
)
from lamin_lightning._local_write import Snapshotter, save_snapshot
from lamin_lightning._staging import staging_root
from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*save_last is not necessary.*"),
]

TIMEOUT = 20.0
# ``score`` logged at training step i; the checkpoint after step i+1 sees it. With
# top-1 (max) the best improves at steps 1, 2, 4, 6, 7 and not at 3, 5, 8.
UP_AND_DOWN = [1.0, 2.0, 0.5, 3.0, 1.5, 4.0, 5.0, 0.0]
REFUSAL = "async_write=True needs"
# The key under which the test callbacks below put their object into a checkpoint.
PROBE_KEY = "test_async_write_probe"


def key(name: str) -> str:
    return f"checkpoints/{name}"


def keys_of(paths: Any) -> set[str]:
    return {key(Path(p).name) for p in paths}


def writing_dir(dirpath: Path) -> Path:
    return staging_root(dirpath) / "writing"


def leftovers_in_writing(dirpath: Path) -> list[str]:
    folder = writing_dir(dirpath)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def load(path: str | Path | io.BytesIO) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]


def written(archive: Any) -> bytes:
    """The file a snapshot becomes (as the background write writes it)."""
    buffer = io.BytesIO()
    save_snapshot(archive, buffer)
    return buffer.getvalue()


class MomentumModel(TinyModel):
    """TinyModel with SGD momentum, so the optimizer state holds tensors too."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class ScoreLoggingMomentumModel(MomentumModel):
    """MomentumModel that logs a rising ``score`` (so a monitoring callback keeps one)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("score", float(batch_idx))
        return super().training_step(batch, batch_idx)


class StepCountingModel(TinyModel):
    """Counts the training steps it actually ran (to see where a resumed fit started)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


class OnTrainEnd(pl.Callback):
    """Runs ``fn`` at on_train_end (other callbacks' hooks run before the checkpoint's)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fn()


# Probes: an object in a checkpoint whose function runs while that checkpoint's file is
# written. The checkpoint is pickled on the training thread (the host snapshot runs
# torch.save's own pickling there) and its file written later, record by record: the
# probe pickles as a string carrying a token, and the writer below runs the probe's
# function when it meets the token in the archive's data.pkl, before the first storage.
_PROBES: dict[str, Callable[[], None]] = {}
_PROBES_LOCK = threading.Lock()


class OnSerialise:
    """Calls ``fn`` while the checkpoint holding it is written: on the thread that writes
    the file, its temporary file open, before the first tensor's bytes. In the file it
    is the string ``label`` (with a token)."""

    def __init__(self, fn: Callable[[], None], label: str) -> None:
        self.label = f"{label} {PROBE_KEY}-{uuid.uuid4().hex}"
        with _PROBES_LOCK:
            _PROBES[self.label] = fn

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (str, (self.label,))


def _probing(writer_type: Any) -> Any:
    class ProbingWriter:
        def __init__(self, *args: Any) -> None:
            self._inner = writer_type(*args)
            self._probes: list[Callable[[], None]] = []

        def write_record(self, name: str, data: Any, size: int) -> None:
            if name == "data.pkl" and isinstance(data, bytes) and PROBE_KEY.encode() in data:
                with _PROBES_LOCK:
                    found = [label for label in _PROBES if label.encode() in data]
                    self._probes = [_PROBES.pop(label) for label in found]
            elif self._probes and name.startswith("data/"):
                probes, self._probes = self._probes, []
                for probe in probes:
                    probe()
            self._inner.write_record(name, data, size)

        def write_record_metadata(self, name: str, size: int) -> None:
            self._inner.write_record_metadata(name, size)

        def write_end_of_file(self) -> None:
            probes, self._probes = self._probes, []
            for probe in probes:  # an archive without storages: before its end
                probe()
            self._inner.write_end_of_file()

    return ProbingWriter


if _local_write._writer_type is not None:  # the background write's zip writer, probing
    _local_write._writer_type = _probing(_local_write._writer_type)


class WriteGate(pl.Callback):
    """Holds background checkpoint writes: each waits for one permit while it serialises.

    Add it to the trainer's callbacks. Records the thread every write ran on and the
    step of each write that went through. A write that gets no permit within
    ``TIMEOUT`` proceeds anyway and is recorded in ``timed_out`` (a test that then
    asserts ``timed_out == []`` fails instead of hanging). ``dumping`` is released on
    the training thread each time Lightning assembles a checkpoint (right before the
    callback takes its host snapshot).
    """

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.dumping = threading.Semaphore(0)
        self.threads: list[str] = []
        self.timed_out: list[str] = []
        self.passed: list[str] = []

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        label = f"step={trainer.global_step}"
        checkpoint[PROBE_KEY] = OnSerialise(lambda: self._through(label), label)
        self.dumping.release()

    def _through(self, label: str) -> None:
        self.threads.append(threading.current_thread().name)
        self.entered.release()
        if not self.opened.is_set() and not self.permits.acquire(timeout=TIMEOUT):
            self.timed_out.append(label)
        self.passed.append(label)

    def allow(self, count: int = 1) -> None:
        """Let ``count`` more writes proceed."""
        for _ in range(count):
            self.permits.release()

    def open(self) -> None:
        """Let every write proceed from now on."""
        self.opened.set()
        self.allow(64)


class HostCopies(TorchFunctionMode):
    """While active (on the training thread), records where checkpoint tensors are copied.

    Every destination of ``Tensor.copy_`` is kept alive by its address: if a snapshot
    allocated fresh buffers each time, they would show up as new addresses instead of
    reusing freed ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.buffers: dict[int, torch.Tensor] = {}
        self.sources: dict[int, torch.device] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if func is torch.Tensor.copy_ and args[0].numel():
            destination, source = args[0], args[1]
            self.buffers[destination.data_ptr()] = destination
            self.sources[destination.data_ptr()] = source.device
        return result


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def async_callback(
    store: MemoryStore, dirpath: Path, cls: type[MemoryCheckpoint] = MemoryCheckpoint, **kwargs: Any
) -> MemoryCheckpoint:
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "save_top_k": -1,
        "every_n_train_steps": 1,
        "async_write": True,
        "retry": RetryPolicy.no_delay(),
    }
    options.update(kwargs)
    return cls(store, **options)


# -- what is written -----------------------------------------------------------------------------


def test_files_hold_the_state_at_save_time_although_training_mutates_it_right_after(
    tmp_path: Path,
) -> None:
    """Weights and optimizer state changed after _save_checkpoint returns never reach the file."""
    dirpath = tmp_path / "ckpt"
    gate = WriteGate()

    class MutatingCheckpoint(MemoryCheckpoint):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.expected: dict[str, dict[str, Any]] = {}

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            module = trainer.lightning_module
            optimizer = trainer.optimizers[0]
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            momenta = {
                i: optimizer.state[p]["momentum_buffer"].clone()
                for i, p in enumerate(module.parameters())
                if optimizer.state.get(p, {}).get("momentum_buffer") is not None
            }
            super()._save_checkpoint(trainer, filepath)
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.add_(1.0)
                for state in optimizer.state.values():
                    state["momentum_buffer"].add_(1.0)
            self.expected[Path(filepath).name] = {"weights": weights, "momenta": momenta}
            gate.allow()  # the write may run now, after the mutation

    callback = MutatingCheckpoint(
        MemoryStore(),
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        async_write=True,
        retry=RetryPolicy.no_delay(),
    )
    make_trainer(tmp_path, [callback, gate], max_steps=4).fit(MomentumModel(), loader(4))

    assert gate.timed_out == []
    assert gate.passed == [f"step={s}" for s in range(1, 5)]
    assert set(callback.expected) == checkpoint_files(dirpath)
    for name, expected in callback.expected.items():
        written = load(dirpath / name)
        assert set(written["state_dict"]) == set(expected["weights"])
        for param, tensor in expected["weights"].items():
            assert torch.equal(written["state_dict"][param], tensor), (name, param)
        state = written["optimizer_states"][0]["state"]
        assert {i: s["momentum_buffer"] for i, s in state.items()}.keys() == expected[
            "momenta"
        ].keys()
        for index, tensor in expected["momenta"].items():
            assert torch.equal(state[index]["momentum_buffer"], tensor), (name, index)
        assert callback.store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]
    assert all(expected["momenta"] for expected in callback.expected.values())


def test_the_training_thread_does_not_write_and_persistence_starts_on_the_complete_file(
    tmp_path: Path,
) -> None:
    """No file when _save_checkpoint returns; written on another thread; flush waits; full hash."""
    dirpath = tmp_path / "ckpt"
    gate = WriteGate()
    training_thread: list[str] = []

    class ObservingCheckpoint(MemoryCheckpoint):
        at_return: dict[str, bool] = {}
        after_flush: dict[str, tuple[bool, str | None, str | None]] = {}
        seen_by_store: dict[str, tuple[str, int]] = {}

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            training_thread.append(threading.current_thread().name)
            super()._save_checkpoint(trainer, filepath)
            name = Path(filepath).name
            self.at_return[name] = os.path.exists(filepath)
            gate.allow()
            assert self.flush(TIMEOUT)
            stored = self.store.get(key(name))
            self.after_flush[name] = (
                os.path.exists(filepath),
                sha256_file(filepath) if os.path.exists(filepath) else None,
                stored.sha256 if stored is not None else None,
            )

        def save_checkpoint_artifact(
            self, trainer: pl.Trainer, filepath: Path | str, **kwargs: Any
        ) -> Any:
            artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
            local = self.dirpath and Path(self.dirpath) / Path(filepath).name
            self.seen_by_store[Path(filepath).name] = (
                artifact.sha256,
                os.path.getsize(local) if local and os.path.exists(local) else -1,
            )
            return artifact

    callback = ObservingCheckpoint(
        MemoryStore(),
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        async_write=True,
        retry=RetryPolicy.no_delay(),
    )
    make_trainer(tmp_path, [callback, gate], max_steps=3).fit(TinyModel(width=512), loader(3, 512))

    names = {f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)}
    assert checkpoint_files(dirpath) == names
    assert gate.timed_out == []
    assert callback.at_return == dict.fromkeys(names, False)
    assert set(training_thread) == {threading.current_thread().name}
    assert gate.threads and not set(gate.threads) & set(training_thread)
    for name in names:
        exists, local_hash, stored_hash = callback.after_flush[name]
        assert exists
        assert stored_hash == local_hash == sha256_file(dirpath / name)
        assert callback.seen_by_store[name] == (local_hash, os.path.getsize(dirpath / name))
    assert leftovers_in_writing(dirpath) == []
    assert staged_files(dirpath) == []


@contextmanager
def file_size_limit_restored() -> Iterator[None]:
    """Let a test lower ``RLIMIT_FSIZE`` from any thread; restore it (and SIGXFSZ) on exit.

    A write past the limit then fails as on a full disk (EFBIG) instead of killing the
    process with SIGXFSZ.
    """
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


class FailWriteMidway(pl.Callback):
    """Makes the background write of the checkpoint of one step fail midway, for real.

    When that checkpoint is serialised (its temporary file is open, still empty), this
    lowers the process's file size limit to ``limit`` bytes: the file takes ``limit``
    bytes and the next write fails, as on a full disk. It keeps the temporary file open,
    to see afterwards how much was written and that it was removed.
    """

    def __init__(self, dirpath: Path, step: int, limit: int) -> None:
        self.dirpath, self.step, self.limit = dirpath, step, limit
        self.written_to: list[Path] = []
        self.target_visible_while_writing: list[bool] = []
        self.descriptors: list[int] = []

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.global_step == self.step:
            checkpoint[PROBE_KEY] = OnSerialise(self._writing, f"step={self.step}")

    def _writing(self) -> None:
        temporary = sorted(writing_dir(self.dirpath).iterdir())
        self.written_to.extend(temporary)
        self.descriptors.extend(os.open(path, os.O_RDONLY) for path in temporary)
        name = f"epoch=0-step={self.step}.ckpt"
        self.target_visible_while_writing.append((self.dirpath / name).exists())
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, hard))

    def partial_files(self) -> list[os.stat_result]:
        """What the temporary files held when the write died (they are deleted by now)."""
        try:
            return [os.fstat(fd) for fd in self.descriptors]
        finally:
            for fd in self.descriptors:
                os.close(fd)
            self.descriptors = []


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_write_failing_midway_leaves_no_torn_file_and_reaches_the_user(
    on_error: str, tmp_path: Path
) -> None:
    """A write that dies halfway: no file, no temp file, a failed event in its slot, then raised."""
    dirpath = tmp_path / "ckpt"
    failing_name = "epoch=0-step=3.ckpt"
    limit = 256 << 10  # a checkpoint of TinyModel(width=512) is just over 1 MiB
    midway = FailWriteMidway(dirpath, step=3, limit=limit)
    observer = RecordingObserver()
    # No outbox: the second fit below must not replay the failed job (not the subject here).
    callback = async_callback(
        MemoryStore(), dirpath, on_error=on_error, artifact_observers=[observer], outbox=False
    )
    trainer = make_trainer(tmp_path, [callback, midway], max_steps=3)
    # torch reports a failed write of its own as RuntimeError, Python's file writes as
    # OSError: the user sees the write's own error, whichever it is.
    with file_size_limit_restored():
        if on_error == "raise":
            with pytest.raises(PersistenceError, match=r"epoch=0-step=3\.ckpt") as info:
                trainer.fit(TinyModel(width=512), loader(3, 512))
            assert [f.key for f in info.value.failures] == [key(failing_name)]
            assert isinstance(info.value.failures[0].error, RuntimeError | OSError)
        else:
            with pytest.warns(UserWarning, match=r"epoch=0-step=3\.ckpt.*(RuntimeError|OSError)"):
                trainer.fit(TinyModel(width=512), loader(3, 512))

    partial = midway.partial_files()
    assert [p.st_size for p in partial] == [limit]  # the write really died halfway
    assert [p.st_nlink for p in partial] == [0]  # and its temporary file was removed
    # Written under a temporary name in the scratch folder: the target never held half a file.
    assert [p.parent for p in midway.written_to] == [writing_dir(dirpath)]
    assert midway.written_to[0].name != failing_name
    assert midway.target_visible_while_writing == [False]
    assert not (dirpath / failing_name).exists()
    assert checkpoint_files(dirpath) == {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"}
    assert leftovers_in_writing(dirpath) == []
    assert [type(e) for e in observer.events] == [
        ArtifactSavedEvent,
        ArtifactSavedEvent,
        ArtifactFailedEvent,
    ]
    failed = observer.events[-1]
    assert failed.key == key(failing_name) and failed.operation == "save"
    assert isinstance(failed.error, RuntimeError | OSError)
    assert callback.store.keys(kind="checkpoint") == keys_of(checkpoint_files(dirpath))
    assert callback.persistence_stats.failed == 1

    # The failed write gave its snapshot slot back (max_snapshots=1): the next save of
    # the same callback gets it, instead of waiting forever.
    errors: list[BaseException] = []

    def next_fit() -> None:
        try:
            make_trainer(tmp_path, [callback], max_steps=1).fit(
                TinyModel(width=512), loader(1, 512)
            )
        except BaseException as error:
            errors.append(error)

    fitting = threading.Thread(target=next_fit, name="next-fit", daemon=True)
    fitting.start()
    fitting.join(TIMEOUT)
    assert not fitting.is_alive(), "the next save waits for the snapshot slot of the failed write"
    assert errors == []
    stored = callback.store.get(key("epoch=0-step=1.ckpt"))
    assert stored is not None and stored.sha256 == sha256_file(dirpath / "epoch=0-step=1.ckpt")


# -- bounded host memory -------------------------------------------------------------------------


@pytest.mark.parametrize("max_snapshots", [1, 2])
def test_a_checkpoint_beyond_max_snapshots_waits_for_a_free_slot_and_the_wait_is_counted(
    max_snapshots: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the first write held, save number max_snapshots+1 blocks until it is let go."""
    # Set when a save finds no free snapshot slot, right before it blocks for one (while
    # the first write is held, no slot can free up in between).
    blocking = threading.Event()
    real_acquire = Snapshotter.acquire

    def acquire(self: Snapshotter) -> Any:
        if self.free_slots() == 0:
            blocking.set()
        return real_acquire(self)

    monkeypatch.setattr(Snapshotter, "acquire", acquire)
    dirpath = tmp_path / "ckpt"
    first_file = dirpath / "epoch=0-step=1.ckpt"
    gate = WriteGate()
    copies = HostCopies()
    # Per save, in order: its file name, whether the held first write had finished when
    # the save returned, and the seconds the training thread spent in it.
    returned: list[tuple[str, bool, float]] = []

    class Recording(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            started = time.perf_counter()
            with copies:
                super()._save_checkpoint(trainer, filepath)
            returned.append(
                (Path(filepath).name, first_file.exists(), time.perf_counter() - started)
            )

    callback = Recording(
        MemoryStore(),
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=max_snapshots,
        max_pending=8,
        retry=RetryPolicy.no_delay(),
    )
    steps = max_snapshots + 2
    errors: list[BaseException] = []

    def run_fit() -> None:
        try:
            make_trainer(tmp_path, [callback, gate], max_steps=steps).fit(
                TinyModel(), loader(steps)
            )
        except BaseException as error:
            errors.append(error)

    fitting = threading.Thread(target=run_fit, name="fit")
    fitting.start()
    try:
        # The first write is held. Saves 1..max_snapshots took a snapshot and returned;
        # save max_snapshots+1 is being assembled, about to wait for a free snapshot.
        assert gate.entered.acquire(timeout=TIMEOUT)
        for _ in range(max_snapshots + 1):
            assert gate.dumping.acquire(timeout=TIMEOUT)
        # Assembled is not yet waiting: let go of the first write only once it waits.
        assert blocking.wait(timeout=TIMEOUT)
        first_written_while_held = first_file.exists()
        returned_while_held = [name for name, _, _ in returned]
    finally:
        gate.open()
        fitting.join(TIMEOUT)
    assert not fitting.is_alive()
    assert errors == []
    assert gate.timed_out == []

    names = [f"epoch=0-step={s}.ckpt" for s in range(1, steps + 1)]
    assert not first_written_while_held
    # Exactly max_snapshots snapshots existed while the first write was held: the next
    # save had not returned.
    assert returned_while_held == names[:max_snapshots]
    # The first max_snapshots saves returned while the first write was still held; the
    # next one returned only once it had finished.
    assert [done for _, done, _ in returned[: max_snapshots + 1]] == [False] * max_snapshots + [
        True
    ]
    assert [name for name, _, _ in returned] == names
    # The wait is training stall, counted in the stats (and no longer than the saves took).
    stats = callback.persistence_stats
    inside = [seconds for _, _, seconds in returned]
    # (On a loaded machine an earlier save may also wait, for the buffers a thread at the
    # write's lower priority is still preparing: counted as well.)
    assert 1 <= stats.admission_waits <= steps
    assert 0 < stats.max_training_stall_seconds <= max(inside)
    assert stats.max_training_stall_seconds <= stats.training_stall_seconds <= sum(inside)
    # Buffers are reused: one set of host tensors per slot, whatever the number of saves.
    tensors_per_checkpoint = sum(1 for t in _tensors(load(first_file)) if t.numel())
    assert len(copies.buffers) == max_snapshots * tensors_per_checkpoint
    assert callback.store.keys(kind="checkpoint") == keys_of(checkpoint_files(dirpath))
    assert checkpoint_files(dirpath) == set(names)


def _storage_sizes(tensors: Any) -> list[int]:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
            storage = tensor.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sorted(seen.values())


class PreparedBeforeStep(pl.Callback):
    """Waits, before training step ``step``, until no snapshot buffers are being made
    (so that what a save at that step allocates does not depend on the machine's load)."""

    def __init__(self, callback: MemoryCheckpoint, step: int) -> None:
        self.callback, self.step = callback, step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        snapshotter = self.callback._snapshotter
        if trainer.global_step == self.step - 1 and snapshotter is not None:
            assert wait_until(lambda: snapshotter._preparing is None, TIMEOUT)


@pytest.mark.parametrize(
    ("every", "monitor"), [(3, None), (3, "score"), (1, None)], ids=["3", "3-monitor", "1"]
)
def test_the_first_snapshot_takes_host_buffers_made_off_the_training_thread(
    every: int, monitor: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buffers for the model's storages are made (and their pages faulted in) on a
    background thread at the start of training, and those for the optimizer's once it has
    stepped (its state exists then). A first save after that allocates none of them on
    the training thread: only the few bytes of the logged score (which, like a monitoring
    callback's best scores, come before the optimizer state in the file: buffers matched
    by size still fit). A first save at the first step makes the optimizer's itself.
    Every buffer is made once; the files hold the state at each save; the buffers go
    with the fit."""
    made: list[tuple[int, int]] = []  # (thread ident, bytes)
    real = _local_write.allocate_buffer

    def recording(key: tuple[int, bool]) -> torch.Tensor:
        made.append((threading.get_ident(), key[0]))
        return real(key)

    monkeypatch.setattr(_local_write, "allocate_buffer", recording)
    dirpath = tmp_path / "ckpt"
    saved_state: dict[str, dict[str, torch.Tensor]] = {}

    class Remembering(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            state = trainer.lightning_module.state_dict()
            saved_state[Path(filepath).name] = {name: t.clone() for name, t in state.items()}
            super()._save_checkpoint(trainer, filepath)

    options: dict[str, Any] = {"every_n_train_steps": every}
    if monitor:
        options.update(monitor=monitor, mode="max", save_top_k=2)
    callback = async_callback(MemoryStore(), dirpath, cls=Remembering, **options)
    model = ScoreLoggingMomentumModel()
    waiting = PreparedBeforeStep(callback, every)
    make_trainer(tmp_path, [waiting, callback], max_steps=6).fit(model, loader(6))

    training = threading.get_ident()
    on_training = [size for thread, size in made if thread == training]
    elsewhere = [size for thread, size in made if thread != training]
    optimizer_state = [
        value for state in model.trainer.optimizers[0].state.values() for value in state.values()
    ]
    assert optimizer_state  # momentum buffers
    model_sizes = _storage_sizes(model.state_dict().values())
    all_sizes = _storage_sizes([*model.state_dict().values(), *optimizer_state])
    large_on_training = sorted(size for size in on_training if size > 8)
    # Only the logged score's few bytes besides (the loops' state keeps it; with a
    # monitor, the callback's best scores too).
    assert len(on_training) > len(large_on_training)
    if every == 1:
        assert sorted(elsewhere) == model_sizes
        assert sorted(elsewhere + large_on_training) == all_sizes
    else:
        assert sorted(elsewhere) == all_sizes
        assert large_on_training == []
    assert sorted(saved_state) == sorted(checkpoint_files(dirpath))
    for name, state in saved_state.items():
        assert load(dirpath / name)["state_dict"].keys() == state.keys()
        for tensor_name, tensor in load(dirpath / name)["state_dict"].items():
            assert torch.equal(tensor, state[tensor_name]), (name, tensor_name)
    assert callback._snapshotter is None  # its buffers went with the fit


PREPARING = "lamin-lightning-snapshot-prepare"


def test_a_snapshot_that_comes_while_its_buffers_are_made_takes_them_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot that comes while its buffers are being made (on a thread at a lower
    priority) does not take the other, empty slot to allocate everything again: it waits
    for the buffer being made, the preparation stops there, and the snapshot takes that
    buffer and makes the rest itself. The file holds the state at the snapshot."""
    entered, let_go = threading.Event(), threading.Event()
    made: list[tuple[str, int]] = []
    real = _local_write.allocate_buffer

    def held(key: tuple[int, bool]) -> torch.Tensor:
        name = threading.current_thread().name
        if name == PREPARING and not entered.is_set():
            entered.set()
            assert let_go.wait(TIMEOUT)
        buffer = real(key)
        made.append((name, buffer.data_ptr()))
        return buffer

    monkeypatch.setattr(_local_write, "allocate_buffer", held)
    snapshotter = Snapshotter(2)
    weights, bias, other = torch.randn(600, 500), torch.randn(300), torch.randn(7)
    keys = _local_write.storage_keys([weights, weights.t(), bias, other, 3])
    assert keys == [(600 * 500 * 4, False), (300 * 4, False), (7 * 4, False)]
    preparing = snapshotter.prepare(keys)
    assert preparing is not None and entered.wait(TIMEOUT)
    taken: list[tuple[Any, float]] = []
    taker = threading.Thread(target=lambda: taken.append(snapshotter.acquire()), name="taker")
    taker.start()
    # The taker waits for the slot being prepared, and asks it to stop.
    assert wait_until(lambda: snapshotter._hurry, TIMEOUT)
    assert snapshotter.free_slots() == 1  # the other slot: not taken
    let_go.set()
    taker.join(TIMEOUT)
    preparing.join(TIMEOUT)
    assert not taker.is_alive() and not preparing.is_alive()
    slot, waited = taken[0]
    assert waited > 0 and slot is not snapshotter._slots[1]
    expected = {"w": weights.clone(), "b": bias.clone(), "o": other.clone()}
    archive = snapshotter.snapshot({"w": weights, "b": bias, "o": other, "wt": weights.t()}, slot)
    weights.add_(1.0)
    prepared = [address for name, address in made if name == PREPARING]
    assert len(prepared) == 1  # the one being made when the snapshot came; then it stopped
    assert len(made) == 3 and len(slot.buffers) == 3
    assert prepared[0] in {buffer.data_ptr() for buffer in slot.buffers}
    host = load(io.BytesIO(written(archive)))
    for name, tensor in expected.items():
        assert torch.equal(host[name], tensor), name
    assert host["wt"].data_ptr() == host["w"].data_ptr()  # one storage, as torch.save writes
    assert not snapshotter._slots[1].warm()


def test_a_preparation_that_fails_leaves_the_snapshot_to_allocate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Making buffers is best effort: if it fails (out of memory), the slot is given
    back and the snapshot allocates what it needs."""
    real = _local_write.allocate_buffer

    def failing(key: tuple[int, bool]) -> torch.Tensor:
        if threading.current_thread().name == PREPARING:
            raise MemoryError("test: no memory for snapshot buffers")
        return real(key)

    monkeypatch.setattr(_local_write, "allocate_buffer", failing)
    snapshotter = Snapshotter(1)
    checkpoint = {"w": torch.randn(64, 64)}
    preparing = snapshotter.prepare(_local_write.storage_keys(checkpoint.values()))
    assert preparing is not None
    preparing.join(TIMEOUT)
    slot, _ = snapshotter.acquire()
    archive = snapshotter.snapshot(checkpoint, slot)
    assert torch.equal(load(io.BytesIO(written(archive)))["w"], checkpoint["w"])


@pytest.mark.parametrize("free_others", [True, False])
def test_buffers_prepared_for_another_model_replace_those_no_longer_needed(
    free_others: bool,
) -> None:
    """A second fit of the same callback with another model: preparing (once the
    optimizer has stepped, all a checkpoint holds is known) frees the buffers the new
    checkpoint does not need before making new ones, so memory never holds both; at the
    start of training (the optimizer's state not known yet) nothing is freed."""
    snapshotter = Snapshotter(1)
    slot, _ = snapshotter.acquire()
    shared = torch.randn(100)
    snapshotter.snapshot({"old": torch.randn(50, 50), "shared": shared}, slot)
    snapshotter.release(slot)
    keys = _local_write.storage_keys([torch.randn(70, 70), shared])
    preparing = snapshotter.prepare(keys, free_others=free_others)
    assert preparing is not None
    preparing.join(TIMEOUT)
    held = sorted(size for (size, _), buffers in slot._spare.items() for _ in buffers)
    old = 50 * 50 * 4
    assert held == sorted([70 * 70 * 4, 100 * 4] + ([] if free_others else [old]))
    # All there: nothing more to make.
    assert snapshotter.prepare(keys) is None


def test_no_buffers_are_prepared_where_snapshots_are_whole_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without torch's record writing known here, a snapshot is torch.save's bytes and
    takes no buffers: none are made (they would be held for nothing)."""
    monkeypatch.setattr(_local_write, "_save_records", None)
    assert Snapshotter(1).prepare([(2**20, False)]) is None


def test_a_large_buffer_is_not_shared_with_a_forked_child() -> None:
    """A buffer of a megabyte or more is a mapping a forked child (a DataLoader worker)
    gets as zeros, not copy-on-write: the next snapshot's copy into it faults on no page
    of the training thread, and the child sees no checkpoint bytes."""
    if not sys.platform.startswith("linux"):
        pytest.skip("MADV_WIPEONFORK is Linux's")
    probe = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        probe.madvise(_local_write._MADV_WIPEONFORK)
    except OSError:
        pytest.skip("this kernel refuses MADV_WIPEONFORK (before Linux 4.14)")
    finally:
        probe.close()
    size = 2 * 2**20
    large = _local_write.allocate_buffer((size, False))
    small = _local_write.allocate_buffer((4096, False))
    large.fill_(7)
    small.fill_(7)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: no torch here (its threads stay behind)
        code = 1
        try:
            zeros = ctypes.string_at(large.data_ptr(), size) == bytes(size)
            kept = ctypes.string_at(small.data_ptr(), 4096) == b"\x07" * 4096
            code = 0 if zeros and kept else (2 if not zeros else 3)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 2, "the child saw the parent's bytes in the large buffer"
    assert code == 0
    assert int(large.sum()) == 7 * size  # the parent's bytes stay


@pytest.mark.parametrize(
    "settings",
    [{"save_top_k": 0}, {"fast_dev_run": True}],
    ids=["save_top_k=0", "fast_dev_run"],
)
def test_no_buffers_are_made_for_a_fit_that_saves_nothing(
    settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    real = _local_write.allocate_buffer

    def recording(key: tuple[int, bool]) -> torch.Tensor:
        made.append(threading.current_thread().name)
        return real(key)

    monkeypatch.setattr(_local_write, "allocate_buffer", recording)
    dirpath = tmp_path / "ckpt"
    options = {"save_top_k": settings.get("save_top_k", -1)}
    callback = async_callback(MemoryStore(), dirpath, **options)
    trainer_options = {"fast_dev_run": True} if "fast_dev_run" in settings else {}
    make_trainer(tmp_path, [callback], max_steps=4, **trainer_options).fit(
        MomentumModel(), loader(4)
    )
    assert made == []
    assert checkpoint_files(dirpath) == set()


def test_keys_asked_for_while_a_preparation_runs_are_made_by_it_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The optimizer's buffers are asked for (after its first step) while the model's,
    asked for at the start of training, may still be made: they are made next, into the
    same slot, by the same thread."""
    entered, let_go = threading.Event(), threading.Event()
    real = _local_write.allocate_buffer

    def held(key: tuple[int, bool]) -> torch.Tensor:
        if threading.current_thread().name == PREPARING and not entered.is_set():
            entered.set()
            assert let_go.wait(TIMEOUT)
        return real(key)

    monkeypatch.setattr(_local_write, "allocate_buffer", held)
    snapshotter = Snapshotter(1)
    model_keys = [(4096, False), (512, False)]
    optimizer_keys = [(8192, False)]
    preparing = snapshotter.prepare(model_keys, free_others=False)
    assert preparing is not None and entered.wait(TIMEOUT)
    assert snapshotter.prepare(model_keys + optimizer_keys) is preparing
    let_go.set()
    preparing.join(TIMEOUT)
    assert not preparing.is_alive()
    slot = snapshotter._slots[0]
    held_keys = sorted(key for key, buffers in slot._spare.items() for _ in buffers)
    assert held_keys == sorted(model_keys + optimizer_keys)
    assert snapshotter.prepare(model_keys + optimizer_keys) is None  # all there


class EmaState(pl.Callback):
    """A callback whose state (saved in every checkpoint) holds a 2 MiB tensor, unknown
    to the model and the optimizer."""

    def __init__(self) -> None:
        self.average = torch.zeros(2**19)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}


def test_a_first_save_at_the_first_step_keeps_the_buffers_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved at the first step (every_n_train_steps=1), the checkpoint's first snapshot
    makes what it needs, a callback's state included: no preparation afterwards frees a
    buffer of a tensor it does not know (which the next save would make again on the
    training thread), even once that write is done."""
    made: list[int] = []
    real = _local_write.allocate_buffer

    def recording(key: tuple[int, bool]) -> torch.Tensor:
        made.append(key[0])
        return real(key)

    monkeypatch.setattr(_local_write, "allocate_buffer", recording)
    real_prepare = Snapshotter.prepare

    def after_the_writes(self: Snapshotter, *args: Any, **kwargs: Any) -> Any:
        # The slot free again (its write done) when a preparation looks at it.
        assert wait_until(lambda: self.free_slots() == len(self._slots), TIMEOUT)
        return real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(Snapshotter, "prepare", after_the_writes)
    dirpath = tmp_path / "ckpt"
    callback = async_callback(MemoryStore(), dirpath)
    make_trainer(tmp_path, [EmaState(), callback], max_steps=3).fit(MomentumModel(), loader(3))
    assert made.count(2**21) == 1
    assert len(checkpoint_files(dirpath)) == 3
    assert torch.equal(
        load(dirpath / "epoch=0-step=3.ckpt")["callbacks"]["EmaState"]["average"],
        torch.zeros(2**19),
    )


def test_snapshot_buffers_go_when_a_fit_fails_or_ends_while_they_are_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning calls no teardown after an exception: the buffers go then too. A fit
    that ends while its buffers are still being made stops that preparation."""
    entered, let_go = threading.Event(), threading.Event()
    preparers: list[threading.Thread] = []
    made: list[str] = []
    real = _local_write.allocate_buffer

    def held(key: tuple[int, bool]) -> torch.Tensor:
        if threading.current_thread().name == PREPARING and not entered.is_set():
            preparers.append(threading.current_thread())
            entered.set()
            assert let_go.wait(TIMEOUT)
        made.append(threading.current_thread().name)
        return real(key)

    monkeypatch.setattr(_local_write, "allocate_buffer", held)

    # A fit that saves nothing before it ends (its first save would be at step 50).
    quiet = async_callback(MemoryStore(), tmp_path / "quiet", every_n_train_steps=50)
    make_trainer(tmp_path, [quiet], max_steps=1).fit(MomentumModel(), loader(1))
    assert entered.is_set()  # held at the model's first buffer
    assert quiet._snapshotter is None
    let_go.set()
    preparers[0].join(TIMEOUT)
    assert not preparers[0].is_alive()
    assert made == [PREPARING]  # it stopped there: the rest were not made

    class FailsAtStep3(MomentumModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 2:
                raise RuntimeError("test: training fails")
            return super().training_step(batch, batch_idx)

    failing = async_callback(MemoryStore(), tmp_path / "failing")
    with pytest.raises(RuntimeError, match="training fails"):
        make_trainer(tmp_path, [failing], max_steps=5).fit(FailsAtStep3(), loader(5))
    assert failing._snapshotter is None
    assert checkpoint_files(tmp_path / "failing") == {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"}


def test_a_slot_given_back_is_taken_again_first_so_other_slots_take_no_memory() -> None:
    """Writes that keep up with the checkpoints reuse one slot's buffers: the other
    slots (max_snapshots) stay empty, and no buffers are made for a snapshotter whose
    slot is warm."""
    snapshotter = Snapshotter(3)
    checkpoint = {"w": torch.randn(64, 64)}
    taken = []
    for _ in range(3):
        slot, waited = snapshotter.acquire()
        assert waited == 0.0
        snapshotter.snapshot(checkpoint, slot)
        taken.append(slot.index)
        snapshotter.release(slot)
    assert taken == [0, 0, 0]
    assert snapshotter.prepare(_local_write.storage_keys(checkpoint.values())) is None
    # Two at once take two slots; the one given back last comes first again.
    first, _ = snapshotter.acquire()
    second, _ = snapshotter.acquire()
    snapshotter.snapshot(checkpoint, second)
    snapshotter.release(first)
    snapshotter.release(second)
    assert snapshotter.acquire()[0] is second  # given back last
    assert snapshotter.acquire()[0] is first
    assert not snapshotter._slots[2].warm()


# -- eviction and overwrite ----------------------------------------------------------------------


class AwaitRecording(MemoryCheckpoint):
    """Lets a held write go when Lightning is about to remove or overwrite its file.

    Lightning removes an evicted file with ``_remove_checkpoint`` (once
    ``_should_remove_checkpoint`` said so) and overwrites one by
    saving to the same path again. If this callback saved that path before and its file
    is not on disk yet (its write is held by the gate), the file is recorded in
    ``pending_at_await`` and one write may go: the callback must now wait for it before
    it moves the file aside. Every upload is loaded from the file the store read, to
    record which step's complete checkpoint it was (None: not a complete checkpoint).
    """

    def __init__(self, gate: WriteGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.saved_paths: set[str] = set()
        self.pending_at_await: list[str] = []
        self.uploads: dict[str, list[tuple[str, int | None]]] = {}

    def _let_pending_write_go(self, filepath: str) -> None:
        if filepath in self.saved_paths and not os.path.exists(filepath):
            self.pending_at_await.append(Path(filepath).name)
            self.gate.allow()

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._let_pending_write_go(filepath)
        super()._save_checkpoint(trainer, filepath)
        self.saved_paths.add(filepath)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Here, not in _remove_checkpoint: a class overriding that has the evicted file
        # staged (so written) before its override runs, which would wait on the gate.
        remove = super()._should_remove_checkpoint(trainer, previous, current)
        if remove:
            self._let_pending_write_go(previous)
        return remove

    def save_checkpoint_artifact(
        self, trainer: pl.Trainer, filepath: Path | str, **kwargs: Any
    ) -> Any:
        artifact = super().save_checkpoint_artifact(trainer, filepath, **kwargs)
        try:
            step: int | None = load(filepath)["global_step"]
        except Exception:  # a torn or missing file
            step = None
        self.uploads.setdefault(Path(filepath).name, []).append((artifact.sha256, step))
        return artifact


def step_of(name: str) -> int:
    return int(name.removesuffix(".ckpt").rsplit("step=", 1)[1])


def test_top1_eviction_waits_for_pending_writes_and_persists_exactly_the_kept_file(
    tmp_path: Path,
) -> None:
    """Evicting a file still being written waits for it; store = kept set; events once, ordered."""
    dirpath = tmp_path / "ckpt"
    gate = WriteGate()
    observer = RecordingObserver()
    callback = AwaitRecording(
        gate,
        MemoryStore(),
        dirpath=dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=2,
        artifact_observers=[observer],
        retry=RetryPolicy.no_delay(),
    )
    steps = len(UP_AND_DOWN)
    make_trainer(tmp_path, [callback, gate, OnTrainEnd(gate.open)], max_steps=steps).fit(
        TinyModel(scores=UP_AND_DOWN), loader(steps)
    )

    assert gate.timed_out == []
    kept = checkpoint_files(dirpath)
    assert kept == {Path(callback.best_model_path).name} == {"epoch=0-step=7.ckpt"}
    assert callback.store.keys(kind="checkpoint") == keys_of(kept)
    saved_names = ["epoch=0-step=1.ckpt", *(f"epoch=0-step={s}.ckpt" for s in (2, 4, 6, 7))]
    evicted = saved_names[:-1]
    # Every eviction found its file still being written, and the callback waited for it:
    # an evicted file uploaded (not cancelled) was the complete checkpoint of its step.
    assert callback.pending_at_await == evicted
    for name in evicted:
        assert [step for _, step in callback.uploads.get(name, [])] in ([], [step_of(name)])
    assert callback.uploads["epoch=0-step=7.ckpt"] == [
        (sha256_file(dirpath / "epoch=0-step=7.ckpt"), 7)
    ]
    assert callback.store.get(key("epoch=0-step=7.ckpt")).sha256 == sha256_file(  # type: ignore[union-attr]
        dirpath / "epoch=0-step=7.ckpt"
    )

    events = observer.events
    assert not [e for e in events if isinstance(e, ArtifactFailedEvent)]
    identities = [(type(e).__name__, e.key) for e in events]
    assert len(identities) == len(set(identities)), identities
    assert [k for kind, k in identities if kind == "ArtifactRemovedEvent"] == [
        key(n) for n in evicted
    ]
    for index, (kind, k) in enumerate(identities):
        if kind == "ArtifactSavedEvent" and ("ArtifactRemovedEvent", k) in identities:
            assert index < identities.index(("ArtifactRemovedEvent", k)), identities
    assert key("epoch=0-step=7.ckpt") in [
        e.key for e in events if isinstance(e, ArtifactSavedEvent)
    ]
    assert leftovers_in_writing(dirpath) == []
    assert staged_files(dirpath) == []


def test_last_ckpt_rewritten_while_its_write_is_pending_stores_the_final_file(
    tmp_path: Path,
) -> None:
    """last.ckpt overwritten each step while its previous write is held: stored = final file.

    The rewrites never wait for the held writes: each background write replaces the
    file atomically, after the previous one was staged.
    """

    class HoldingAll(AwaitRecording):
        def _let_pending_write_go(self, filepath: str) -> None:
            if filepath in self.saved_paths and not os.path.exists(filepath):
                self.pending_at_await.append(Path(filepath).name)  # recorded, not let go

    dirpath = tmp_path / "ckpt"
    gate = WriteGate()
    store = MemoryStore(keep_bytes=True)
    steps = 5
    callback = HoldingAll(
        gate,
        store,
        dirpath=dirpath,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=steps,
        max_pending=2 * steps,
        retry=RetryPolicy.no_delay(),
    )
    make_trainer(tmp_path, [callback, gate, OnTrainEnd(gate.open)], max_steps=steps).fit(
        TinyModel(), loader(steps)
    )

    assert gate.timed_out == []
    assert checkpoint_files(dirpath) == {"last.ckpt"}
    # Every rewrite found the previous write still held, and went on without it.
    assert callback.pending_at_await == ["last.ckpt"] * (steps - 1)
    final = dirpath / "last.ckpt"
    stored = store.get(key("last.ckpt"))
    assert stored is not None and stored.data is not None
    assert stored.sha256 == sha256_file(final)
    assert load(io.BytesIO(stored.data))["global_step"] == steps
    # Every upload saw a complete file, never a torn one, in the order of the rewrites.
    uploaded = callback.uploads["last.ckpt"]
    uploaded_steps = [step for _, step in uploaded]
    assert None not in uploaded_steps
    assert uploaded_steps == sorted(set(uploaded_steps)) and uploaded_steps[-1] == steps
    assert uploaded[-1][0] == sha256_file(final)
    assert callback.persistence_stats.failed == 0
    assert leftovers_in_writing(dirpath) == []
    assert staged_files(dirpath) == []


# -- how the background write spares the CPU ------------------------------------------------------


def test_background_files_skip_zip_checksums_while_a_concurrent_torch_save_keeps_them(
    tmp_path: Path,
) -> None:
    """Our file: no CRC-32, loads equal; a torch.save on the training thread meanwhile: CRCs."""
    dirpath = tmp_path / "ckpt"
    gate = WriteGate()
    concurrent = tmp_path / "saved-by-the-user.pt"
    user_state = {"x": torch.arange(10_000)}
    expected: dict[str, torch.Tensor] = {}

    def save_while_the_background_write_is_mid_archive() -> None:
        # The write of the checkpoint is inside torch's zip writer, held by the gate.
        assert gate.entered.acquire(timeout=TIMEOUT)
        torch.save(user_state, concurrent)
        gate.open()

    class Remembering(MemoryCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            state = trainer.lightning_module.state_dict()
            expected.update({k: v.detach().clone() for k, v in state.items()})
            super()._save_checkpoint(trainer, filepath)

    callback = async_callback(MemoryStore(), dirpath, cls=Remembering)
    make_trainer(
        tmp_path,
        [callback, gate, OnTrainEnd(save_while_the_background_write_is_mid_archive)],
        max_steps=1,
    ).fit(TinyModel(width=64), loader(1, 64))

    assert gate.timed_out == []
    (name,) = checkpoint_files(dirpath)
    with zipfile.ZipFile(dirpath / name) as archive:
        assert {entry.CRC for entry in archive.infolist()} == {0}
    written = load(dirpath / name)
    assert written["global_step"] == 1
    assert all(torch.equal(written["state_dict"][k], v) for k, v in expected.items())
    assert torch.serialization.get_crc32_options() is True
    with zipfile.ZipFile(concurrent) as archive:
        assert archive.testzip() is None  # every checksum present and right
        assert 0 not in {entry.CRC for entry in archive.infolist()}
    assert torch.equal(load(concurrent)["x"], user_state["x"])


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from ``/proc/mounts`` ("" if unknown)."""
    best, kind = "", ""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if str(path).startswith(point.rstrip("/") + "/") and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def _resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` on a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vector = (ctypes.c_ubyte * pages)()
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector) / pages
    finally:
        libc.munmap(address, size)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and /proc/mounts")
def test_a_file_written_in_the_background_does_not_stay_in_the_page_cache(tmp_path: Path) -> None:
    """Written and fsynced, the checkpoint's pages leave the page cache before anyone reads it."""
    if _filesystem_type(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip(f"{tmp_path} is in memory (or unknown): there is no page cache to leave")
    dirpath = tmp_path / "ckpt"
    store = MemoryStore()
    store.hang()  # the upload, which reads the file, waits until the file has been checked
    resident: dict[str, float] = {}

    def check_the_written_file() -> None:
        assert store.wait_until_hanging(timeout=TIMEOUT)
        (name,) = checkpoint_files(dirpath)
        resident[name] = _resident_fraction(dirpath / name)
        store.release()

    callback = async_callback(store, dirpath)
    make_trainer(tmp_path, [callback, OnTrainEnd(check_the_written_file)], max_steps=1).fit(
        TinyModel(width=512), loader(1, 512)
    )

    (name,) = checkpoint_files(dirpath)
    assert (dirpath / name).stat().st_size > 1 << 20
    assert resident == {name: 0.0}
    assert store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's"
)
def test_the_background_write_runs_at_a_lower_cpu_priority_than_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every background write runs on a thread niced below the training thread (so where
    cores are short the scheduler favours training), and the files are complete."""
    dirpath = tmp_path / "ckpt"
    seen: list[tuple[str, int]] = []
    real_write = _local_write.write_atomically

    def observed_write(*args: Any, **kwargs: Any) -> int:
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, 0)))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(_local_write, "write_atomically", observed_write)
    store = MemoryStore()
    callback = async_callback(store, dirpath)
    training = os.getpriority(os.PRIO_PROCESS, 0)
    make_trainer(tmp_path, [callback], max_steps=3).fit(TinyModel(), loader(3))

    assert len(seen) == 3
    expected = min(19, training + _local_write.WRITE_NICENESS)
    assert all(name == "lamin-lightning-write" and nice == expected for name, nice in seen), seen
    assert os.getpriority(os.PRIO_PROCESS, 0) == training  # the caller's is untouched
    files = checkpoint_files(dirpath)
    assert len(files) == 3
    for name in files:
        assert store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]
        load(dirpath / name)


# -- resume and fallback -------------------------------------------------------------------------


def test_each_background_write_notes_the_file_it_completed_in_its_jobs_journal_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay takes a background save's file as written only if the journal says so,
    and names that very file (see ``JobRecord.marks_written``): every write of a fit
    notes it, before the file takes its name, against the job of that save."""
    from lamin_lightning._jobs import file_identity
    from lamin_lightning._journal import Outbox

    noted: list[tuple[str, tuple[int, int, int], bool]] = []
    real = Outbox.mark_written

    def mark_written(outbox: Outbox, job_id: str, identity: tuple[int, int, int]) -> None:
        record = dict(outbox.pending())[job_id]
        assert record.marks_written and record.written_later
        # Not renamed yet: the name holds no file, or another one (the previous last.ckpt).
        noted.append((record.local_path, identity, file_identity(record.local_path) != identity))
        real(outbox, job_id, identity)

    monkeypatch.setattr(Outbox, "mark_written", mark_written)
    dirpath = tmp_path / "ckpt"
    callback = async_callback(MemoryStore(), dirpath, save_top_k=2, monitor="score", save_last=True)
    make_trainer(tmp_path, [callback], max_steps=4).fit(TinyModel(scores=UP_AND_DOWN), loader(4))

    # last.ckpt at each of 4 steps; top-2 (min) of 1.0, 2.0, 0.5, 3.0: 3.0 is not saved.
    assert len(noted) == 7
    assert all(before_rename for _, _, before_rename in noted)
    final = {path: identity for path, identity, _ in noted}  # the last write of each name
    kept = {str(dirpath / name) for name in checkpoint_files(dirpath)}
    assert kept <= set(final)
    assert {path: file_identity(path) for path in kept} == {path: final[path] for path in kept}


@pytest.mark.parametrize("which", ["best", "last"])
def test_fit_resumes_from_a_file_written_in_the_background(which: str, tmp_path: Path) -> None:
    """A new Trainer resumes from a best/last file written with async_write; steps continue."""
    dirpath = tmp_path / "ckpt"
    first = async_callback(
        MemoryStore(),
        dirpath,
        monitor="score",
        mode="max",
        save_top_k=1,
        save_last=True,
    )
    make_trainer(tmp_path, [first], max_steps=5).fit(TinyModel(scores=UP_AND_DOWN), loader(5))
    path = first.best_model_path if which == "best" else first.last_model_path
    saved = load(path)
    expected_start = {"best": 4, "last": 5}[which]
    assert saved["global_step"] == expected_start

    second = async_callback(MemoryStore(), tmp_path / "resumed", save_top_k=1)
    model = StepCountingModel(scores=UP_AND_DOWN)
    trainer = make_trainer(tmp_path, [second], max_steps=8)
    trainer.fit(model, loader(8), ckpt_path=path)

    assert trainer.global_step == 8
    assert model.steps_run == 8 - expected_start
    assert second.store.keys(kind="checkpoint") == keys_of(checkpoint_files(tmp_path / "resumed"))


class RecordingIO(TorchCheckpointIO):
    """A custom CheckpointIO plugin (async_write does not support it)."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[str, str]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, **kwargs: Any) -> None:
        self.saves.append((Path(path).name, threading.current_thread().name))
        super().save_checkpoint(checkpoint, path, **kwargs)


def test_an_unsupported_checkpoint_io_warns_once_and_writes_synchronously(
    tmp_path: Path,
) -> None:
    """A custom CheckpointIO: one warning, the file written on the training thread, persisted."""
    dirpath = tmp_path / "ckpt"

    class Recording(MemoryCheckpoint):
        at_return: dict[str, bool] = {}

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            self.at_return[Path(filepath).name] = os.path.exists(filepath)

    io_plugin = RecordingIO()
    callback = Recording(
        MemoryStore(),
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        async_write=True,
        retry=RetryPolicy.no_delay(),
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=3, plugins=[io_plugin])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyModel(), loader(3))

    refusals = [w for w in caught if REFUSAL in str(w.message)]
    assert len(refusals) == 1, [str(w.message) for w in caught]
    assert "RecordingIO" in str(refusals[0].message)
    names = {f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)}
    assert callback.at_return == dict.fromkeys(names, True)
    assert {name for name, _ in io_plugin.saves} == names
    assert {thread for _, thread in io_plugin.saves} == {threading.current_thread().name}
    assert callback.store.keys(kind="checkpoint") == keys_of(names)
    for name in names:
        assert callback.store.get(key(name)).sha256 == sha256_file(dirpath / name)  # type: ignore[union-attr]
    assert not writing_dir(dirpath).exists()


def test_an_error_after_the_snapshot_gives_its_slot_back_so_the_next_fit_does_not_hang(
    tmp_path: Path,
) -> None:
    """A save that fails after taking a host snapshot frees it: a later fit saves normally."""

    class FailingOnce(MemoryCheckpoint):
        calls = 0

        def collect_checkpoint_feature_values(self, trainer: pl.Trainer, snapshot: Any) -> Any:
            self.calls += 1
            if self.calls == 1:  # after the snapshot was taken, before the job is submitted
                raise RuntimeError("feature collection failed")
            return None

    dirpath = tmp_path / "ckpt"
    callback = async_callback(MemoryStore(), dirpath, cls=FailingOnce, max_snapshots=1)
    with pytest.raises(RuntimeError, match="feature collection failed"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))

    errors: list[BaseException] = []

    def second_fit() -> None:
        try:
            make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
        except BaseException as error:
            errors.append(error)

    fitting = threading.Thread(target=second_fit, name="second-fit", daemon=True)
    fitting.start()
    fitting.join(TIMEOUT)
    assert not fitting.is_alive(), "the second fit hangs waiting for a leaked snapshot slot"
    assert errors == []
    assert callback.store.keys(kind="checkpoint") == keys_of(checkpoint_files(dirpath))
    assert "epoch=0-step=2.ckpt" in checkpoint_files(dirpath)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_snapshots_are_pinned_host_copies_taken_before_training_moves_on(
    tmp_path: Path,
) -> None:
    """GPU: pinned host buffers, no second device copy, and the file holds the save-time state."""
    dirpath = tmp_path / "ckpt"
    busy = torch.randn(4096, 4096, device="cuda")
    copies = HostCopies()

    class GpuCheckpoint(MemoryCheckpoint):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.expected: dict[str, dict[str, torch.Tensor]] = {}
            self.device_growth: list[int] = []

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            module = trainer.lightning_module
            self.expected[Path(filepath).name] = {
                k: v.detach().clone() for k, v in module.state_dict().items()
            }
            # Queue GPU work ahead of the device-to-host copies: a snapshot that returned
            # before its copies finished would hand the writer stale host memory.
            for _ in range(20):
                busy.copy_(busy @ busy / busy.shape[0])
            torch.cuda.reset_peak_memory_stats()
            allocated = torch.cuda.memory_allocated()
            with copies:
                super()._save_checkpoint(trainer, filepath)
            self.device_growth.append(torch.cuda.max_memory_allocated() - allocated)
            with torch.no_grad():
                for parameter in module.parameters():
                    parameter.add_(1.0)

    callback = GpuCheckpoint(
        MemoryStore(),
        dirpath=dirpath,
        save_top_k=-1,
        every_n_train_steps=1,
        async_write=True,
        retry=RetryPolicy.no_delay(),
    )
    model = MomentumModel(width=1024)
    make_trainer(tmp_path, [callback], max_steps=3, accelerator="gpu").fit(model, loader(3, 1024))

    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert copies.buffers
    # The weight and its momentum buffer live on the GPU: their host buffers (one byte
    # buffer per storage) are pinned.
    from_device = [
        b
        for address, b in copies.buffers.items()
        if b.numel() == 1024 * 1024 * 4 and copies.sources[address].type == "cuda"
    ]
    assert len(from_device) == 2
    assert all(b.device.type == "cpu" and b.is_pinned() for b in from_device)
    assert max(callback.device_growth) < parameter_bytes // 4, callback.device_growth
    assert set(callback.expected) == checkpoint_files(dirpath)
    for name, expected in callback.expected.items():
        written = load(dirpath / name)["state_dict"]
        for param, tensor in expected.items():
            assert torch.equal(written[param], tensor.cpu()), (name, param)


def test_a_cpu_checkpoint_on_a_machine_with_a_gpu_never_touches_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Snapshotting CPU tensors neither synchronises CUDA nor pins memory, even with a GPU."""
    touched: list[str] = []

    def synchronize(device: Any = None) -> None:
        touched.append(f"synchronize({device})")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    snapshotter = Snapshotter(1)
    slot, _ = snapshotter.acquire()
    weights = torch.randn(64, 64)
    checkpoint = {"state_dict": {"w": weights}, "epoch": 3, "nested": [torch.ones(2)]}

    expected = weights.clone()
    archive = snapshotter.snapshot(checkpoint, slot)
    weights.add_(1.0)

    assert touched == []  # a CUDA context costs ~100+ MiB of host RSS and device memory
    assert slot.buffers and not any(b.is_pinned() for b in slot.buffers)
    host = load(io.BytesIO(written(archive)))
    assert torch.equal(host["state_dict"]["w"], expected)
    assert host["epoch"] == 3 and torch.equal(host["nested"][0], torch.ones(2))


def test_a_large_host_snapshot_is_copied_on_several_threads_and_equals_its_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one torch thread (training on one core), the host copy of a large checkpoint
    is split in pieces copied by several threads: every tensor of the snapshot equals its
    source (odd sizes, a non-contiguous view, several dtypes), and training may then
    change the source freely."""
    from lamin_lightning import _local_write

    monkeypatch.setattr(_local_write, "_COPY_PIECE_BYTES", 4096)  # many pieces
    monkeypatch.setattr(_local_write, "_COPY_PARALLEL_MIN_BYTES", 1)
    started: list[str] = []
    real_thread = threading.Thread

    def counting_thread(*args: Any, **kwargs: Any) -> threading.Thread:
        started.append(kwargs.get("name", ""))
        return real_thread(*args, **kwargs)

    monkeypatch.setattr(_local_write.threading, "Thread", counting_thread)
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1001, 37, generator=generator)
    checkpoint = {
        "state_dict": {
            "w": weights,
            "b": torch.randn(4099, generator=generator).to(torch.bfloat16),
            "t": weights.t(),  # not contiguous: copied as it is
            "i": torch.arange(10_007, dtype=torch.int64),
        },
        "global_step": 3,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        snapshotter = Snapshotter(1)
        slot, _ = snapshotter.acquire()
        archive = snapshotter.snapshot(checkpoint, slot)
    finally:
        torch.set_num_threads(threads)
    if (os.cpu_count() or 1) > 1:
        assert "lamin-snapshot-copy" in started
    expected = {name: tensor.clone() for name, tensor in checkpoint["state_dict"].items()}  # type: ignore[attr-defined]
    weights.add_(1.0)  # training moves on: the snapshot keeps what it copied
    snapshot = load(io.BytesIO(written(archive)))
    for name, tensor in expected.items():
        copy = snapshot["state_dict"][name]
        assert copy.dtype == tensor.dtype and torch.equal(copy, tensor), name
    assert snapshot["state_dict"]["t"].stride() == (1, 37)  # a view of w's storage, still
    assert snapshot["global_step"] == 3


_BLOCKED_WRITER = """
import sys, threading
from pathlib import Path
from lamin_lightning._local_write import _bypassing_page_cache, write_atomically

through = sys.argv[3] if len(sys.argv) > 3 else "page"

def save(payload, handle):
    if through == "direct":  # as save_snapshot writes: 2 MiB are on disk, the rest not
        with _bypassing_page_cache(handle) as sink:
            assert sink is not handle, "not written around the page cache"
            sink.write(payload)
            print("writing", flush=True)
            threading.Event().wait()  # killed here, mid-write
    handle.write(payload)
    handle.flush()
    print("writing", flush=True)
    threading.Event().wait()  # killed here, mid-write

size = (2 << 20) + 100_000 if through == "direct" else 100_000
write_atomically(b"x" * size, sys.argv[1], Path(sys.argv[2]), save)
"""


@pytest.mark.parametrize("through", ["page cache", "direct"])
def test_a_write_killed_midway_leaves_a_temporary_file_the_next_holder_deletes(
    through: str, tmp_path: Path
) -> None:
    """SIGKILL mid-write (a real child process) leaves a partial checkpoint in the working
    folder's ``writing/``, which nothing else would ever delete; the next setup, a
    ``ckpt_path="last"`` lookup or ``lamin-lightning flush`` deletes it at once. A write
    whose process lives is never touched, however old; a file killed between its
    creation and its lock (``.new``) only once it is older than the grace period. The same
    when the write goes around the page cache (``direct``: its second descriptor, opened
    with O_DIRECT, holds no lock)."""
    import subprocess

    if through == "direct" and not _written_around_the_page_cache(tmp_path):
        pytest.skip(f"{tmp_path} is not on a local disk's filesystem")

    from lamin_lightning import _staging
    from lamin_lightning._aside import put_back_in

    dirpath = tmp_path / "ckpts"
    dirpath.mkdir()
    scratch = staging_root(dirpath) / _staging.WRITING_DIRNAME
    arguments = [str(dirpath / "last.ckpt"), str(scratch), through.split()[0]]
    child = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_WRITER, *arguments],
        stdout=subprocess.PIPE,
        text=True,
    )
    old = time.time() - 2 * _staging.DEAD_WRITE_GRACE_SECONDS
    try:
        assert child.stdout is not None and child.stdout.readline() == "writing\n"
        (partial,) = scratch.iterdir()
        written = 2 << 20 if through == "direct" else 100_000
        assert partial.name.endswith(".tmp") and partial.stat().st_size == written
        os.utime(partial, (old, old))
        assert put_back_in(dirpath) == [] and partial.exists()  # alive: left alone
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    fresh = scratch / ".epoch=0-step=1.ckpt.1.2.new"  # created, not locked yet
    fresh.write_bytes(b"y")
    stale = scratch / ".epoch=0-step=2.ckpt.1.3.new"
    stale.write_bytes(b"z")
    os.utime(stale, (old, old))
    partial_mtime_now = time.time()
    os.utime(partial, (partial_mtime_now, partial_mtime_now))  # a .tmp goes at once
    assert put_back_in(dirpath) == []  # nothing to put back; the dead writes are deleted
    assert sorted(scratch.iterdir()) == [fresh]
    assert not (dirpath / "last.ckpt").exists()


_FORKING_WRITER = """
import os, sys, threading
from pathlib import Path
from lamin_lightning._local_write import write_atomically

def save(payload, handle):
    handle.write(payload)
    handle.flush()
    pid = os.fork()  # a DataLoader worker started while the write runs
    if pid == 0:
        threading.Event().wait()  # outlives the writer; stopped by the test
    print(f"writing {pid}", flush=True)
    threading.Event().wait()  # killed here, mid-write

write_atomically(b"x" * 100_000, sys.argv[1], Path(sys.argv[2]), save)
"""


def test_a_child_forked_during_a_write_does_not_keep_its_partial_file_locked(
    tmp_path: Path,
) -> None:
    """A process forked while a background write runs (a DataLoader worker at an epoch's
    start) shared the write's locked descriptor: after SIGKILL of the trainer, the child
    kept the partial checkpoint locked, so it looked alive and stayed on disk as long as
    the child lived. The child lets go of its copy of the lock at the fork."""
    import subprocess

    from lamin_lightning import _staging
    from lamin_lightning._aside import put_back_in

    dirpath = tmp_path / "ckpts"
    dirpath.mkdir()
    scratch = staging_root(dirpath) / _staging.WRITING_DIRNAME
    writer = subprocess.Popen(
        [sys.executable, "-c", _FORKING_WRITER, str(dirpath / "last.ckpt"), str(scratch)],
        stdout=subprocess.PIPE,
        text=True,
    )
    forked = 0
    try:
        assert writer.stdout is not None
        said, child = writer.stdout.readline().split()
        assert said == "writing"
        forked = int(child)
        (partial,) = scratch.iterdir()
        assert partial.name.endswith(".tmp")
        assert put_back_in(dirpath) == [] and partial.exists()  # the writer lives
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        os.kill(forked, 0)  # the child lives on
        assert put_back_in(dirpath) == []
        assert list(scratch.iterdir()) == []  # deleted while the child lives
    finally:
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        if forked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(forked, signal.SIGKILL)


class _Pair(collections.namedtuple("_Pair", "weight step")):
    pass


class _Tagged(dict):  # type: ignore[type-arg]
    """A dict whose __init__ needs an argument (rebuilt without calling it, as pickle does)."""

    def __init__(self, tag: str, **items: Any) -> None:
        super().__init__(**items)
        self.tag = tag


class _Items(list):  # type: ignore[type-arg]
    pass


class _TaggedTensor(torch.Tensor):
    pass


def _checkpoint_with_every_kind_of_container() -> dict[str, Any]:
    tied = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    tied[1].weight = tied[0].weight  # tied weights: one storage, two names
    quantized = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(torch.nn.Linear(16, 4)), {torch.nn.Linear}, dtype=torch.qint8
    )
    base = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    log_alpha = torch.zeros(1, requires_grad=True)
    by_default: collections.defaultdict[str, list[torch.Tensor]] = collections.defaultdict(list)
    by_default["a"].append(torch.ones(3))
    return {
        "state_dict": tied.state_dict(),  # an OrderedDict with _metadata (module versions)
        "quantized": quantized.state_dict(),
        "views": {"rows": base[2:5], "base": base, "t": base.t()},  # a view first
        "extra": {
            "default": by_default,
            "tagged": _Tagged("n", x=torch.zeros(2)),
            "items": _Items([torch.full((2,), 7.0)]),
            "pair": _Pair(torch.ones(4), 3),
            "counter": collections.Counter(a=2),
            "parameter": torch.nn.Parameter(torch.ones(2)),
            "lazy": torch.nn.LazyLinear(4).state_dict(),  # uninitialized parameters
            "log_alpha": log_alpha,  # requires_grad, leaf and not
            "doubled": log_alpha * 2,
            "subclass": torch.ones(3).as_subclass(_TaggedTensor),
            "a tensor as a key": {torch.zeros(2): "value"},
        },
        "global_step": 12,
    }


def test_a_host_snapshot_is_what_torch_save_writes_of_the_checkpoint_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file from a snapshot is byte for byte the file torch.save writes of the
    checkpoint at the moment of the snapshot (checksums off in both), although training
    changes the checkpoint's tensors right after: container types and their attributes
    (a state_dict's _metadata, which some modules need to load; a defaultdict's factory;
    a dict whose __init__ takes arguments), tensor kinds (quantized, Parameter), storages
    shared by tied weights and views (one copy, as torch.save writes one).

    The first snapshot copied the checkpoint's structure by hand: attributes and
    subclasses lost, one copy per tensor (a tied model's file twice the size), and a
    TypeError for such a dict.
    """

    def saved(value: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()

    checkpoint = _checkpoint_with_every_kind_of_container()
    monkeypatch.setattr(torch.serialization, "get_crc32_options", lambda: False)
    expected = saved(checkpoint)
    slot, _ = Snapshotter(1).acquire()
    archive = Snapshotter.snapshot(checkpoint, slot)
    (key,) = checkpoint["extra"]["a tensor as a key"]
    for tensor in (checkpoint["state_dict"]["0.weight"], checkpoint["views"]["base"], key):
        with torch.no_grad():
            tensor.add_(1.0)  # training moves on
    assert written(archive) == expected

    snapshot = load(io.BytesIO(expected))
    state = snapshot["state_dict"]
    assert type(state) is collections.OrderedDict and state._metadata  # type: ignore[attr-defined]
    assert state["0.weight"].data_ptr() == state["1.weight"].data_ptr()
    module = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(torch.nn.Linear(16, 4)), {torch.nn.Linear}, dtype=torch.qint8
    )
    module.load_state_dict(snapshot["quantized"])


def test_a_tied_model_written_in_the_background_is_the_size_modelcheckpoint_writes(
    tmp_path: Path,
) -> None:
    """End to end: the same fit with ModelCheckpoint and with async_write gives files that
    load to the same thing, tied weights sharing one storage, at the same size (CRCs aside:
    ours writes them as 0, see the checksum test above)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tied(TinyModel):
        def __init__(self) -> None:
            super().__init__(width=256)
            self.head = torch.nn.Linear(256, 256, bias=False)
            self.head.weight = self.layer.weight

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["extra"] = collections.defaultdict(list, a=[torch.ones(2)])

    files = {}
    for name, callback in (
        ("plain", ModelCheckpoint(dirpath=tmp_path / "plain", every_n_train_steps=1)),
        ("ours", async_callback(MemoryStore(), tmp_path / "ours")),
    ):
        torch.manual_seed(0)
        make_trainer(tmp_path / name, [callback], max_steps=2).fit(Tied(), loader(2, 256))
        files[name] = tmp_path / name / "epoch=0-step=2.ckpt"
    plain, ours = (load(files[name]) for name in ("plain", "ours"))
    assert files["ours"].stat().st_size == files["plain"].stat().st_size
    assert ours["state_dict"]._metadata == plain["state_dict"]._metadata
    weights = ours["state_dict"]
    assert weights["layer.weight"].data_ptr() == weights["head.weight"].data_ptr()
    assert all(torch.equal(weights[k], v) for k, v in plain["state_dict"].items())
    assert ours["extra"].default_factory is list


def test_what_torch_save_cannot_pickle_fails_that_save_on_the_training_thread_as_it_would(
    tmp_path: Path,
) -> None:
    """A lambda in the checkpoint: ModelCheckpoint's torch.save raises at that save; so does
    the snapshot (it runs torch.save's pickling), not a background write a step later.
    Nothing of it is left: no file, no job, and the snapshot slot is free again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Unpicklable(TinyModel):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            if self.trainer.global_step == 2:
                checkpoint["oops"] = lambda: None

    errors = {}
    callbacks = {
        "plain": ModelCheckpoint(dirpath=tmp_path / "plain", every_n_train_steps=1, save_top_k=-1),
        "ours": async_callback(MemoryStore(), tmp_path / "ours"),
    }
    for name, callback in callbacks.items():
        with pytest.raises(Exception) as raised:
            make_trainer(tmp_path / name, [callback], max_steps=4).fit(Unpicklable(), loader(4))
        errors[name] = (type(raised.value), checkpoint_files(Path(callback.dirpath)))
    assert errors["ours"] == errors["plain"]
    assert errors["ours"][1] == {"epoch=0-step=1.ckpt"}
    ours = callbacks["ours"]
    assert ours.pending_artifacts() == []
    assert ours.store.keys(kind="checkpoint") == keys_of({"epoch=0-step=1.ckpt"})


def test_where_torchs_record_writing_is_not_the_known_one_a_snapshot_is_the_whole_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another torch, whose private record writing differs (checked at import): the
    snapshot is torch.save's whole file, in memory, written as it is (checksums and all)."""
    monkeypatch.setattr(_local_write, "_save_records", None)
    checkpoint = _checkpoint_with_every_kind_of_container()
    expected = io.BytesIO()
    torch.save(checkpoint, expected)
    slot, _ = Snapshotter(1).acquire()
    archive = Snapshotter.snapshot(checkpoint, slot)
    with torch.no_grad():
        checkpoint["views"]["base"].add_(1.0)  # training moves on
    assert archive.blob is not None and written(archive) == expected.getvalue()
    with zipfile.ZipFile(io.BytesIO(written(archive))) as zipped:
        assert zipped.testzip() is None


class _JustSaved(Logger):
    """Records, for each ``after_save_checkpoint`` call, what :meth:`note` takes of it:
    the file reported as just saved."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    @property
    def name(self) -> str:
        return "just-saved"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.seen.append(self.note(checkpoint_callback))

    def note(self, checkpoint_callback: Any) -> Any:
        return Path(checkpoint_callback._last_checkpoint_saved).name


def test_loggers_are_told_of_a_background_save_once_its_file_is_written(tmp_path: Path) -> None:
    """Lightning calls ``logger.after_save_checkpoint`` as soon as a save returns; a logger
    that uploads the checkpoints it is told of (W&B, MLflow or Neptune with
    ``log_model="all"``) read files async_write had not written yet. It is now told once
    they are written, on the training thread, as many times as Lightning would tell it."""

    class Probe(_JustSaved):
        def note(self, checkpoint_callback: Any) -> Any:
            # The callback's state names files that exist (a logger uploads those).
            files = [checkpoint_callback.last_model_path, *checkpoint_callback.best_k_models]
            return (
                super().note(checkpoint_callback),
                all(os.path.exists(f) for f in files if f),
                threading.current_thread().name,
            )

    gate = WriteGate()
    probes = [Probe(), Probe()]
    callback = MemoryCheckpoint(
        MemoryStore(),
        dirpath=tmp_path / "ckpt",
        save_top_k=2,
        monitor="score",
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=4,
        max_pending=8,
    )
    trainer = make_trainer(
        tmp_path, [gate, callback, OnTrainEnd(gate.open)], max_steps=3, logger=probes
    )
    trainer.fit(TinyModel(scores=[3.0, 2.0, 1.0]), loader(3))

    assert gate.timed_out == []
    for probe in probes:
        assert len(probe.seen) == 3, "each logger told once per save"
        # Of each save in turn, as just saved (not the newest save each time; step 1's
        # file is evicted by then, as its write was held until training ended).
        assert [name for name, _, _ in probe.seen] == [
            f"epoch=0-step={step}.ckpt" for step in (1, 2, 3)
        ]
        assert all(exists for _, exists, _ in probe.seen), probe.seen
        assert {thread for _, _, thread in probe.seen} == {threading.main_thread().name}


def _told_when_training_raises(
    tmp_path: Path, arm: str, model: TinyModel, extra: list[Any], **options: Any
) -> list[str]:
    """The files a logger is told of by a fit that raises, with Lightning's
    ``ModelCheckpoint`` ("plain") or ours writing synchronously or in the background."""
    dirpath = tmp_path / arm / "ckpt"
    if arm == "plain":
        callback: ModelCheckpoint = ModelCheckpoint(dirpath=dirpath, **options)
    else:
        callback = MemoryCheckpoint(
            MemoryStore(), dirpath=dirpath, async_write=arm == "async", **options
        )
    logger = _JustSaved()
    trainer = make_trainer(tmp_path / arm, [*extra, callback], max_steps=5, logger=logger)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loader(5))
    return list(logger.seen)


@pytest.mark.parametrize("save_last", [False, True, "link"])
def test_loggers_are_told_of_the_checkpoint_saved_on_exception_as_modelcheckpoint_tells_them(
    tmp_path: Path, save_last: Any
) -> None:
    """Training raises with ``save_on_exception=True``: Lightning tells the loggers of the
    checkpoint ``on_exception`` saves, then finalizes them ("failed"). Teardown, which
    tells them of the saves written in the background, is not called on that path; the
    callback's ``on_exception`` does it once the writes are done."""
    options = dict(save_on_exception=True, every_n_train_steps=100, save_last=save_last)
    plain = _told_when_training_raises(tmp_path, "plain", TinyModel(fail_at_step=2), [], **options)
    assert plain, "Lightning told the logger"
    for arm in ("sync", "async"):
        told = _told_when_training_raises(tmp_path, arm, TinyModel(fail_at_step=2), [], **options)
        assert told == plain, arm


class _OpensThenFails(TinyModel):
    """Lets the held background writes go at ``fail_at_step``, then raises there."""

    def __init__(self, gate: WriteGate, fail_at_step: int) -> None:
        super().__init__(fail_at_step=fail_at_step)
        self.gate = gate

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == self.fail_at_step:
            self.gate.open()
        return super().training_step(batch, batch_idx)


def test_loggers_are_told_of_a_save_still_being_written_when_training_raised(
    tmp_path: Path,
) -> None:
    """A save at step 1 whose background write is still held at the next step, where
    training raises: Lightning told the logger at step 1; ours tells it once the write is
    done, before the loggers are finalized, although no later save or teardown comes."""
    options = dict(every_n_train_steps=1, save_top_k=-1)
    plain = _told_when_training_raises(tmp_path, "plain", TinyModel(fail_at_step=1), [], **options)
    assert plain == ["epoch=0-step=1.ckpt"]
    gate = WriteGate()
    told = _told_when_training_raises(
        tmp_path, "async", _OpensThenFails(gate, 1), [gate], **options
    )
    assert gate.timed_out == []
    assert told == plain


def test_a_last_link_lightning_removed_before_it_was_made_is_never_made(tmp_path: Path) -> None:
    """save_last="link" with a name that changes per save (CHECKPOINT_NAME_LAST with
    "{step}"): the link to a file still being written is made once it is written, but
    Lightning removes the previous save's link at the next save. Removed before it was
    made, it was made afterwards all the same, and dangled once its target was evicted."""

    class Named(MemoryCheckpoint):
        CHECKPOINT_NAME_LAST = "{step}-last"

    gate = WriteGate()
    dirpath = tmp_path / "ckpt"
    callback = Named(
        MemoryStore(),
        dirpath=dirpath,
        monitor="score",
        save_top_k=1,
        save_last="link",
        every_n_train_steps=1,
        async_write=True,
        max_snapshots=4,
        max_pending=8,
    )
    make_trainer(tmp_path, [gate, callback, OnTrainEnd(gate.open)], max_steps=3).fit(
        TinyModel(scores=[3.0, 2.0, 1.0]), loader(3)
    )

    assert gate.timed_out == []
    links = sorted(p.name for p in dirpath.iterdir() if p.is_symlink())
    assert links == ["step=3-last.ckpt"], links
    assert os.path.realpath(dirpath / links[0]) == os.path.realpath(callback.best_model_path)


class HeldCommits(MemoryCheckpoint):
    """Commits wait until ``opened`` is set: every job commits after training ended."""

    def __init__(self, opened: threading.Event, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = opened

    def commit_checkpoint_artifact(self, *args: Any, **kwargs: Any) -> None:
        assert self.opened.wait(TIMEOUT), "training never ended"
        super().commit_checkpoint_artifact(*args, **kwargs)


@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_an_eviction_whose_name_a_later_checkpoint_reuses_is_removed_as_without_async_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Top-k names without a version counter (``filename="{score:.0f}"``) come back: a
    file evicted in favour of one still being written is removed on the intake thread,
    and Lightning may write a new checkpoint under its name before the removal commits.
    The commit used to look at the folder, found a file there, took the removal for one
    whose replacement was never written, kept the artifact and told no observer, with a
    false "was never written" warning. It removes as with async_write=False."""
    scores = [3.2, 1.1, 1.4, 5.0, 0.3, 0.4, 1.2, 0.45, 2.9, 0.1, 0.2, 3.3]
    settings = dict(
        monitor="score",
        filename="{score:.0f}",
        save_top_k=2,
        save_last=True,
        enable_version_counter=False,
        every_n_train_steps=1,
        max_pending=64,
        retry=RetryPolicy.no_delay(),
    )
    removed: dict[bool, list[str]] = {}
    stored: dict[bool, set[str]] = {}
    for async_write in (False, True):
        observer = RecordingObserver()
        opened = threading.Event()
        dirpath = tmp_path / f"async_write={async_write}"
        callback = HeldCommits(
            opened,
            MemoryStore(),
            dirpath=dirpath,
            async_write=async_write,
            artifact_observers=[observer],
            **settings,  # type: ignore[arg-type]
        )
        make_trainer(tmp_path, [callback, OnTrainEnd(opened.set)], max_steps=len(scores)).fit(
            TinyModel(scores=scores), loader(len(scores))
        )
        removed[async_write] = [
            e.key for e in observer.events if type(e).__name__ == "ArtifactRemovedEvent"
        ]
        stored[async_write] = callback.store.keys(kind="checkpoint")
        assert stored[async_write] == keys_of(checkpoint_files(dirpath))
    assert removed[False], "the scenario must evict names that come back"
    assert any(removed[False].count(k) > 1 for k in removed[False])
    assert removed[True] == removed[False]
    assert stored[True] == stored[False]
    assert "was never written" not in caplog.text


class _InterruptAt(TinyModel):
    """Logs ``score`` 1.0 and raises KeyboardInterrupt (Ctrl+C) in training step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.interrupt_at = step

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == self.interrupt_at:
            raise KeyboardInterrupt
        self.log("score", 1.0)
        return super().training_step(batch, batch_idx)


class _StartStep(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def _fit_interrupted_at_step_1(tmp_path: Path, callback: ModelCheckpoint) -> None:
    """A fit that Ctrl+C stops in step 1 (Lightning's SystemExit caught, as in a notebook)."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, [callback], max_steps=4).fit(_InterruptAt(1), loader(4))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after Ctrl+C


@pytest.mark.parametrize("save_on_exception", [False, True])
@pytest.mark.parametrize("kind", ["model_checkpoint", "ours"])
def test_after_ctrl_c_the_checkpoints_lightning_saved_are_on_disk_when_fit_returns(
    kind: str, save_on_exception: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C in step 1 while the background writes of step 1's checkpoint and of
    ``last.ckpt`` still run (a large checkpoint, a slow disk): when ``fit`` returns (its
    SystemExit), both files exist, as ``ModelCheckpoint`` leaves them, and
    ``fit(ckpt_path="last")`` resumes at step 1. The writes used to go on after ``fit``
    returned, on daemon threads: in a script the process then exited and killed them, so
    ``last.ckpt`` was never written (seen with a real script), and in a notebook a
    ``fit(ckpt_path="last")`` right away found no ``last.ckpt`` yet and trained from step 0."""
    dirpath = tmp_path / "ckpt"
    write = _local_write.save_snapshot
    write_now = _callback._write_now
    # The background writes go on only once the callback finishes them itself: without
    # that, fit returns with both still held here, as a process exit would find them.
    finish = threading.Event()

    def held_write(archive: Any, handle: Any) -> None:
        finish.wait(60)
        write(archive, handle)

    def finishing(pending: Any) -> None:
        finish.set()
        write_now(pending)

    monkeypatch.setattr(_local_write, "save_snapshot", held_write)
    monkeypatch.setattr(_callback, "_write_now", finishing)
    options: dict[str, Any] = {
        "dirpath": dirpath,
        "every_n_train_steps": 1,
        "save_top_k": -1,
        "save_last": True,
        "save_on_exception": save_on_exception,
    }
    callback: ModelCheckpoint = (
        ModelCheckpoint(**options)
        if kind == "model_checkpoint"
        else async_callback(MemoryStore(), **options, max_snapshots=2)  # type: ignore[arg-type]
    )
    try:
        _fit_interrupted_at_step_1(tmp_path, callback)
        # At once, as the process's exit would come: no wait for anything.
        files = checkpoint_files(dirpath)
    finally:
        finish.set()  # a write left held ends (the test has failed by then)
    assert files == {"epoch=0-step=1.ckpt", "last.ckpt"}
    assert load(dirpath / "last.ckpt")["global_step"] == 1
    started = _StartStep()
    trainer = make_trainer(tmp_path, [callback, started], max_steps=3)
    trainer.fit(TinyModel(), loader(4), ckpt_path="last")
    assert started.step == 1
    assert trainer.global_step == 3


@contextmanager
def _still_being_written(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if a background write of this process were still creating ``path`` (a link
    too): the file is away and its name taken until the callback waits for written files
    (then the write finishes, on another thread), or else until the block ends."""
    away = path.with_name(path.name + ".away")
    path.rename(away)
    _names.take_name(path)
    lock, threads = threading.Lock(), list[threading.Thread]()

    def back() -> None:
        with lock:
            if os.path.lexists(away):
                away.rename(path)
                _names.release_name(path)

    wait = _callback.wait_until_written

    def finish_while_waiting(paths: Any, timeout: float) -> set[str]:
        threads.append(threading.Thread(target=back))
        threads[-1].start()
        return wait(paths, timeout)

    monkeypatch.setattr(_callback, "wait_until_written", finish_while_waiting)
    try:
        yield
    finally:
        for thread in threads:
            thread.join()
        back()


@pytest.mark.parametrize("save_last", [True, "link"])
def test_the_last_checkpoint_lookup_waits_for_a_last_ckpt_this_process_still_writes(
    save_last: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning looks for ``last.ckpt`` (``ckpt_path="last"``) before ``setup``, whose
    replay waits for writes this process still runs: the lookup waits too, or it finds no
    ``last.ckpt`` yet and the fit trains from step 0 ("no last checkpoint available").
    Before ``on_exception`` finished the writes, a Ctrl+C left such a write running."""
    dirpath = tmp_path / "ckpt"
    callback = async_callback(MemoryStore(), dirpath, save_last=save_last)
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(), loader(2))
    started = _StartStep()
    trainer = make_trainer(tmp_path, [callback, started], max_steps=3)
    last = dirpath / "last.ckpt"
    with (
        _still_being_written(last, monkeypatch),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        trainer.fit(TinyModel(), loader(4), ckpt_path="last")
    assert not [w for w in caught if "no last checkpoint" in str(w.message)]
    assert started.step == 2


@pytest.mark.parametrize("outbox", [True, False])
def test_setup_waits_for_the_best_file_this_process_still_writes_without_the_outbox_too(
    outbox: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning loads ``ckpt_path="best"`` after ``setup``, which waits for a write this
    process still runs in ``dirpath``. Only the outbox's replay waited, for the files of
    journaled jobs: with ``outbox=False`` nothing waited, and
    ``trainer.test(ckpt_path="best")`` raised ``FileNotFoundError``."""
    dirpath = tmp_path / "ckpt"
    callback = async_callback(MemoryStore(), dirpath, monitor="score", save_top_k=1, outbox=outbox)
    make_trainer(tmp_path, [callback], max_steps=2).fit(TinyModel(scores=[2.0, 1.0]), loader(2))
    best = Path(callback.best_model_path)
    assert best.name == "epoch=0-step=2.ckpt"
    with _still_being_written(best, monkeypatch):
        (result,) = make_trainer(tmp_path, [callback]).test(
            TinyModel(), loader(2), ckpt_path="best", verbose=False
        )
    assert "test_loss" in result


class _CrashAt(TinyModel):
    """Raises RuntimeError in training step ``step`` (a crash, not Ctrl+C)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.crash_at = step

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == self.crash_at:
            raise RuntimeError("crashed")
        return super().training_step(batch, batch_idx)


def test_ctrl_c_while_on_exception_finishes_a_write_still_stops_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training crashes; while ``on_exception`` finishes a background write, the user
    presses Ctrl+C (after a crash, Lightning does not ignore it). The pipeline is still
    stopped: its threads end (the interrupt left ``on_exception`` before its shutdown, so
    in a notebook the pipeline's threads ran on). The interrupt ends our waits and goes no
    further: Lightning's handling of the crash runs to its end and raises the crash."""
    before = {t for t in threading.enumerate() if t.name.startswith("lamin-lightning")}
    gate = threading.Event()  # the writes wait for on_exception
    calls: list[str] = []

    def interrupted(write: Any) -> None:
        calls.append(write.filepath)
        gate.set()
        raise KeyboardInterrupt

    write = _local_write.save_snapshot

    def held_write(archive: Any, handle: Any) -> None:
        gate.wait(TIMEOUT)
        write(archive, handle)

    monkeypatch.setattr(_local_write, "save_snapshot", held_write)
    monkeypatch.setattr(_callback, "_write_now", interrupted)
    callback = async_callback(MemoryStore(), tmp_path / "ckpt")
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    with pytest.raises(RuntimeError, match="crashed"):
        trainer.fit(_CrashAt(1), loader(4))
    assert calls  # the interrupt came during the wait for a write
    assert trainer.state.stage is None  # Lightning's teardown ran
    now = {t for t in threading.enumerate() if t.name.startswith("lamin-lightning")}
    for thread in now - before:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), thread.name


def _other_filesystem_than(path: Path) -> Path | None:
    """A writable folder on another filesystem than ``path`` (a tmpfs), or None."""
    for candidate in (Path("/dev/shm"), Path("/run"), Path("/tmp")):
        try:
            if candidate.is_dir() and candidate.stat().st_dev != path.stat().st_dev:
                folder = candidate / f"lamin-lightning-test-{uuid.uuid4().hex[:12]}"
                folder.mkdir()
                return folder
        except OSError:
            continue
    return None


@pytest.mark.parametrize("last_there", [False, True])
def test_a_subfolder_of_dirpath_on_another_filesystem_is_written_as_with_model_checkpoint(
    tmp_path: Path, last_there: bool
) -> None:
    """A "/" in the file name writes into a subfolder of dirpath, which may be a link to
    (or a mount of) another filesystem. The background write's temporary file lived in the
    working folder beside dirpath, and its rename into place failed (EXDEV): every file
    of the subfolder was lost, where ModelCheckpoint writes them."""
    elsewhere = _other_filesystem_than(tmp_path)
    if elsewhere is None:
        pytest.skip("no second filesystem to link a subfolder to")
    try:
        trees = {}
        for name, cls, extra in (
            ("reference", ModelCheckpoint, {}),
            ("ours", MemoryCheckpoint, {"async_write": True}),
        ):
            dirpath = tmp_path / name
            dirpath.mkdir()
            (elsewhere / name).mkdir()
            (dirpath / "sub").symlink_to(elsewhere / name)
            callback = cls(
                dirpath=dirpath,
                filename="sub/{step}",
                monitor="score",
                save_top_k=2,
                save_last=True,
                every_n_train_steps=1,
                **extra,
            )
            if last_there:
                callback.CHECKPOINT_NAME_LAST = "sub/last"
            scores = [5, 3, 4, 1, 2, 6]
            make_trainer(tmp_path / f"root-{name}", [callback], max_steps=6).fit(
                TinyModel(scores=scores), loader(n=6)
            )
            trees[name] = sorted(  # the linked subfolder included (rglob does not follow it)
                os.path.relpath(os.path.join(folder, file), dirpath)
                for folder, _, files in os.walk(dirpath, followlinks=True)
                for file in files
            )
            if name == "ours":
                store = callback.store
                for path in {*callback.best_k_models, callback.last_model_path}:
                    stored = store.get(callback.resolve_artifact_key(None, path, "checkpoint"))
                    assert stored is not None and stored.sha256 == sha256_file(path)
        assert trees["ours"] == trees["reference"]
        assert not list(elsewhere.rglob(".*")), "a temporary file was left behind"
    finally:
        import shutil

        shutil.rmtree(elsewhere, ignore_errors=True)


def _tmpfs_mounted_at(folder: Path) -> contextlib.AbstractContextManager[bool]:
    """A tmpfs mounted at ``folder`` (True), or False where mounting is not permitted."""
    return _mounted_at(folder, "-t", "tmpfs", "-o", "size=64m", "tmpfs", lazy_unmount=True)


def test_a_dirpath_that_is_a_mount_point_is_written_in_the_background(tmp_path: Path) -> None:
    """A checkpoint folder that is a mounted volume (a Kubernetes volume at /checkpoints):
    the working folder beside it is on the parent filesystem. Every background write's
    rename into dirpath failed (EXDEV), so that no checkpoint was written at all; and a
    top-k eviction in favour of a background write, a rename into the working folder's
    trash, failed too, and left the evicted file where ModelCheckpoint deletes it."""
    folders = {}
    with contextlib.ExitStack() as mounts:
        for name in ("reference", "ours"):
            dirpath = folders[name] = tmp_path / name / "volume"
            if not mounts.enter_context(_tmpfs_mounted_at(dirpath)):
                pytest.skip("mounting a tmpfs is not permitted here")
        scores = [5, 3, 4, 1, 2, 6]
        reference = ModelCheckpoint(
            dirpath=folders["reference"], monitor="score", save_top_k=2, every_n_train_steps=1
        )
        make_trainer(tmp_path / "reference", [reference], max_steps=6).fit(
            TinyModel(scores=scores), loader(n=6)
        )
        callback = MemoryCheckpoint(
            dirpath=folders["ours"],
            monitor="score",
            save_top_k=2,
            every_n_train_steps=1,
            async_write=True,
        )
        make_trainer(tmp_path / "ours", [callback], max_steps=6).fit(
            TinyModel(scores=scores), loader(n=6)
        )
        names = sorted(p.name for p in folders["ours"].iterdir())
        assert names == sorted(p.name for p in folders["reference"].iterdir())
        assert names == sorted(Path(p).name for p in callback.best_k_models)
        for name in names:
            stored = callback.store.get(f"checkpoints/{name}")
            assert stored is not None and stored.sha256 == sha256_file(folders["ours"] / name)


def test_a_write_killed_midway_beside_its_checkpoint_is_deleted_by_the_next_holder(
    tmp_path: Path,
) -> None:
    """A checkpoint folder (or a subfolder of it) on another filesystem than the working
    folder gets the background write's temporary file beside the checkpoint. SIGKILL
    mid-write left that partial checkpoint there for good: the recovery looked in the
    working folder's ``writing/`` only. A file of the user's whose name merely looks
    like one (not ours: no pid and thread) is left alone."""
    import shutil
    import subprocess

    from lamin_lightning import _staging
    from lamin_lightning._aside import put_back_in

    elsewhere = _other_filesystem_than(tmp_path)
    if elsewhere is None:
        pytest.skip("no second filesystem to link a subfolder to")
    try:
        dirpath = tmp_path / "ckpts"
        dirpath.mkdir()
        (dirpath / "sub").symlink_to(elsewhere)
        scratch = staging_root(dirpath) / _staging.WRITING_DIRNAME
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _BLOCKED_WRITER,
                str(dirpath / "sub" / "last.ckpt"),
                str(scratch),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "writing\n"
            (partial,) = elsewhere.iterdir()
            assert partial.name.endswith(".tmp") and partial.stat().st_size == 100_000
            assert put_back_in(dirpath) == [] and partial.exists()  # alive: left alone
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        users = elsewhere / ".notes.tmp"
        users.write_bytes(b"mine")
        assert put_back_in(dirpath) == []
        assert sorted(elsewhere.iterdir()) == [users]
        assert not (dirpath / "sub" / "last.ckpt").exists()
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def _written_around_the_page_cache(folder: Path) -> bool:
    """Whether a background write into ``folder`` goes around the page cache."""
    from lamin_lightning._local_write import _on_a_local_disk

    with open(folder / ".filesystem-probe", "wb") as handle:
        local = _on_a_local_disk(handle.fileno())
    (folder / ".filesystem-probe").unlink()
    return local and _opens_direct(folder)


def _opens_direct(folder: Path) -> bool:
    """Whether files in ``folder`` can be opened with O_DIRECT (not tmpfs, not macOS)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(folder / ".direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    (folder / ".direct-probe").unlink()
    return True


@pytest.mark.parametrize("refused", [None, "the first write", "the tail"])
def test_a_background_write_goes_around_the_page_cache_and_is_torch_saves_file(
    refused: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive is written with O_DIRECT, 1 MiB at a time from a reused aligned buffer:
    byte for byte the file torch.save writes (checksums off), of its exact size although
    direct writes are whole 4 KiB blocks. A direct write the disk refuses (EINVAL for its
    alignment; ENOSPC, seen now and then on VMs), the first or the padded tail, sends the
    rest through the page cache at the same offset: the same file."""
    import errno
    import fcntl
    import types

    import lamin_lightning._local_write as local_write

    if not _opens_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    checkpoint = _checkpoint_with_every_kind_of_container()
    checkpoint["large"] = torch.arange(917_503, dtype=torch.float32)  # ~3.5 MiB, odd size
    monkeypatch.setattr(torch.serialization, "get_crc32_options", lambda: False)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    expected = buffer.getvalue()
    assert len(expected) % 4096, "the file must end in a partial block"
    writes: list[tuple[bool, int]] = []

    def write(fd: int, data: Any) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        writes.append((direct, len(data)))
        if direct and refused == "the first write":
            raise OSError(errno.EINVAL, "Invalid argument")
        if direct and refused == "the tail" and len(data) % (1 << 20):
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    proxy = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    proxy.write = write
    monkeypatch.setattr(local_write, "os", proxy)
    slot, _ = Snapshotter(1).acquire()
    archive = Snapshotter.snapshot(checkpoint, slot)
    target = tmp_path / "ckpt" / "a.ckpt"
    size = local_write.write_atomically(archive, target, tmp_path / "scratch", save_snapshot)

    assert size == len(expected) == target.stat().st_size
    assert target.read_bytes() == expected
    assert writes[0][0], "the first write did not go around the page cache"
    if refused is None:
        assert all(direct for direct, _ in writes) and len(writes) == -(-len(expected) // (1 << 20))
    else:
        last_direct = max(i for i, (direct, _) in enumerate(writes) if direct)
        assert writes[last_direct + 1 :] and not any(d for d, _ in writes[last_direct + 1 :])
    assert not list((tmp_path / "scratch").iterdir())


def test_a_record_skipped_in_a_file_written_around_the_page_cache_reads_as_zeros(
    tmp_path: Path,
) -> None:
    """torch's zip writer skips a record written as metadata only (``seek`` forward): the
    direct write fills it with zeros, as a sparse file reads."""
    from lamin_lightning._local_write import _bypassing_page_cache, _DirectSink

    if not _opens_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    with open(tmp_path / "file", "wb") as handle, _bypassing_page_cache(handle) as sink:
        assert isinstance(sink, _DirectSink)
        sink.write(b"a")
        assert sink.seek(5000, io.SEEK_CUR) == 5001 == sink.tell()
        sink.write(b"b" * (3 << 20))
    assert (tmp_path / "file").read_bytes() == b"a" + bytes(5000) + b"b" * (3 << 20)


def test_a_file_on_a_filesystem_in_memory_is_written_through_the_page_cache() -> None:
    """tmpfs refuses O_DIRECT (and network filesystems would make each direct write a
    round trip to the server): the write there goes through the page cache, as before."""
    from lamin_lightning._local_write import _bypassing_page_cache

    shm = Path("/dev/shm")
    if not sys.platform.startswith("linux") or _filesystem_type(shm / "file") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    with (
        tempfile.NamedTemporaryFile(dir=shm) as handle,
        _bypassing_page_cache(handle) as sink,
    ):
        assert sink is handle


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_writes_into_the_parents_write_buffer(tmp_path: Path) -> None:
    """The reused buffer of direct writes was a shared mapping: a child forked after a
    write (a fork pool of fits) took it from its copy of the spare list and wrote its
    checkpoint's bytes into the parent's, under a write of the parent's at the same time.
    The child now has no spare buffers, and a buffer it maps is its own."""
    import lamin_lightning._local_write as local_write

    if not _opens_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    with (
        open(tmp_path / "file", "wb") as handle,
        local_write._bypassing_page_cache(handle) as sink,
    ):
        sink.write(b"x" * 5000)
    buffer = local_write._spare_buffers[-1]
    buffer[:6] = b"parent"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 2 if local_write._spare_buffers else 0
            buffer[:6] = b"child!"  # its copy of the parent's mapping
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child kept the parent's spare buffers"
    assert buffer[:6] == b"parent"


@contextmanager
def _small_ext4_mounted_at(folder: Path, megabytes: int) -> Iterator[bool]:
    """A loop-mounted ext4 of ``megabytes`` at ``folder`` (True), or False where that is
    not permitted (no root, no loop devices, no mkfs.ext4)."""
    import shutil
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    image = folder.with_suffix(".img")
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        yield False
        return
    with open(image, "wb") as handle:
        handle.truncate(megabytes << 20)
    if subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True).returncode:
        yield False
        return
    with _mounted_at(folder, "-o", "loop", str(image)) as mounted:
        yield mounted


def test_a_full_disk_fails_a_direct_write_cleanly_and_the_next_write_that_fits_lands(
    tmp_path: Path,
) -> None:
    """ENOSPC mid-write on a real local disk (a loop-mounted ext4 of 24 MB): the direct
    write is refused, the page cache refuses the same bytes, and the error reaches the
    caller with no temporary file left; the next checkpoint that fits is written whole."""
    import errno

    import lamin_lightning._local_write as local_write

    disk = tmp_path / "disk"
    with _small_ext4_mounted_at(disk, 24) as mounted:
        if not mounted:
            pytest.skip("cannot loop-mount an ext4 here (needs root, loop devices, mkfs.ext4)")
        with open(disk / "probe", "wb") as handle:
            assert local_write._on_a_local_disk(handle.fileno())
        (disk / "probe").unlink()
        too_big = {"w": torch.randn(8 << 20)}  # 32 MB
        slot, _ = Snapshotter(1).acquire()
        archive = Snapshotter.snapshot(too_big, slot)
        with pytest.raises(OSError) as raised:
            local_write.write_atomically(
                archive, disk / "ckpt" / "a.ckpt", disk / "w", save_snapshot
            )
        assert raised.value.errno == errno.ENOSPC
        assert [p for p in disk.rglob("*") if p.is_file()] == []
        fits = {"w": torch.randn(1 << 20)}  # 4 MB
        slot, _ = Snapshotter(1).acquire()
        archive = Snapshotter.snapshot(fits, slot)
        local_write.write_atomically(archive, disk / "ckpt" / "b.ckpt", disk / "w", save_snapshot)
        assert torch.equal(torch.load(disk / "ckpt" / "b.ckpt")["w"], fits["w"])


def _until_the_file_clock_passes(ns: int) -> None:
    """Wait until a file written now gets a modification time later than ``ns`` (the
    kernel's coarse clock ticks every few ms)."""
    from lamin_lightning._local_write import file_clock_ns

    ticked = threading.Event()
    while file_clock_ns() <= ns:
        ticked.wait(0.001)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's coarse file clock")
def test_a_last_checkpoint_written_late_keeps_the_time_it_was_saved_for_ckpt_path_last(
    tmp_path: Path,
) -> None:
    """Two checkpoint callbacks save ``last.ckpt`` in their own folders at the same step:
    A (ours, async_write), then B (``ModelCheckpoint``). ``fit(ckpt_path="last")`` takes
    the newest of them by modification time: B's, whose state is the later one. A's
    background write finished after B's file was written, and its file took that time:
    Lightning resumed from A's ``last.ckpt`` (found by an adversarial helper, 4 runs in
    5), and B's state came back one save behind. A file written in the background now
    has the time its save was made."""
    from lamin_lightning._local_write import file_clock_ns

    class LaterTick(ModelCheckpoint):
        """B: its file is written a clock tick after A's save, never in the same one."""

        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
            _until_the_file_clock_passes(file_clock_ns())
            super()._save_checkpoint(trainer, filepath)

    options: dict[str, Any] = {"save_last": True, "save_top_k": 0, "every_n_train_steps": 2}
    store, gate = MemoryStore(), WriteGate()
    ours = MemoryCheckpoint(store, dirpath=tmp_path / "A", async_write=True, **options)
    theirs = LaterTick(dirpath=tmp_path / "B", **options)
    gate.allow(1)  # step 2's write; step 4's waits until B's file is older than the clock

    def release() -> None:
        _until_the_file_clock_passes(os.stat(tmp_path / "B" / "last.ckpt").st_mtime_ns)
        gate.open()

    make_trainer(tmp_path, [gate, OnTrainEnd(release), ours, theirs], max_steps=4).fit(
        TinyModel(), loader(8)
    )
    assert gate.timed_out == [] and gate.passed == ["step=2", "step=4"]

    again = make_trainer(
        tmp_path,
        [
            ModelCheckpoint(dirpath=tmp_path / "A", **options),
            LaterTick(dirpath=tmp_path / "B", **options),
        ],
        max_steps=4,
    )
    again.fit(TinyModel(), loader(8), ckpt_path="last", weights_only=False)  # the probes
    assert again.ckpt_path == str(tmp_path / "B" / "last.ckpt")


def test_ctrl_c_right_as_a_snapshot_takes_the_slots_lock_leaves_it_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl+C lands right after ``threading.Condition.__enter__`` (Python code) took the
    snapshot slots' lock, before the ``with`` block: the block never ran, so its exit
    never released the lock, and every later use of the slots (the write's release of
    its slot, the next snapshot, on_exception finishing the write) hung for good (a
    Ctrl+C sweep over async_write saves). The slots' lock is now taken as a plain lock."""
    from lamin_lightning._local_write import Snapshotter

    snapshotter = Snapshotter(1)
    ctrl_c_right_after_entering(monkeypatch, snapshotter._changed, snapshotter.acquire)
    assert returns_on_another_thread(snapshotter.free_slots), "the slots' lock stayed taken"
