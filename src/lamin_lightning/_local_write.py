"""Host snapshots of checkpoints, for writing them off the training thread.

With ``async_write=True`` the training thread only copies the checkpoint's
tensors into host buffers (reused from one checkpoint to the next; pinned when
the tensors live on an accelerator, so the copy never needs a second buffer on
the device) and copies the small Python structure around them. Serialisation
and the local write happen later on the pipeline's intake thread, into a
temporary file that is fsynced and renamed into place: a file is complete or
absent, never torn.

The background write shares the host's CPUs with training, so it does as little
CPU work as it can (measured in ``benchmarks/bench_async_write.py``): the zip
archive is written without CRC-32 checksums (``torch.load`` does not check them;
only this write, never the process-wide ``torch.save`` setting, so a synchronous
``torch.save`` elsewhere still writes them), and once the file is fsynced its
pages are dropped from the page cache (``POSIX_FADV_DONTNEED``), so the next
checkpoint reuses that memory instead of taking fresh pages.

At most ``max_snapshots`` snapshots exist at once; a checkpoint that finds none
free waits (and the wait is counted as training stall).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from lamin_lightning._staging import CLAIMED_SUFFIX, WRITING_SUFFIX

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TensorPath = tuple[Any, ...]


class SnapshotSlot:
    """One set of reusable host buffers, keyed by a tensor's place in the checkpoint."""

    def __init__(self, index: int) -> None:
        self.index = index
        # One byte buffer per storage, under the place of the first tensor that uses it.
        self.buffers: dict[TensorPath, torch.Tensor] = {}
        # CUDA devices with device-to-host copies in flight into this slot.
        self.cuda_devices: set[torch.device] = set()
        # Host-to-host copies not made yet: made together, on several cores, before
        # the snapshot is handed out (see :func:`_copy_in_parallel`).
        self.host_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        # This snapshot's storages already copied: (device, address, bytes) -> host bytes.
        self.storages: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def host_copy(self, where: TensorPath, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, detached, on the host: a view of this slot's copy of its storage.

        As ``torch.save`` does, a storage is copied whole and once: tensors that share it
        (tied weights, views) share it in the snapshot too, with their offsets and
        strides. Its buffer is allocated on first use and reused by later snapshots.
        Copies from CUDA go into pinned memory without blocking (see ``cuda_devices``);
        every other copy is made before the snapshot is handed out.
        """
        source = tensor.detach()
        if (
            source.layout is not torch.strided
            or source.is_quantized
            or source.is_conj()
            or source.is_neg()
            or source.device.type == "meta"
        ):
            # Rare tensor kinds: a plain copy, not worth a reusable buffer.
            return source.clone() if source.device.type == "meta" else source.to("cpu", copy=True)
        on_cuda = source.device.type == "cuda"
        storage = source.untyped_storage()
        size = storage.nbytes()
        identity = (source.device, storage.data_ptr(), size)
        copied = self.storages.get(identity) if size else None
        if copied is not None:  # a storage this snapshot copied already: share it
            return _view(copied, source)
        buffer = self.buffers.get(where)
        whole = (
            source.storage_offset() == 0
            and source.is_contiguous()
            and source.numel() * source.element_size() == size
        )
        if whole:  # the tensor is its storage (most are): a buffer of its shape
            if (
                buffer is None
                or buffer.shape != source.shape
                or buffer.dtype != source.dtype
                or (on_cuda and not buffer.is_pinned())
            ):
                buffer = torch.empty(
                    source.shape, dtype=source.dtype, device="cpu", pin_memory=on_cuda
                )
                self.buffers[where] = buffer
            self._copy(buffer, source, on_cuda)
            result = buffer
        else:  # a view: its whole storage, as bytes
            if (
                buffer is None
                or buffer.dtype != torch.uint8
                or buffer.numel() != size
                or (on_cuda and not buffer.is_pinned())
            ):
                buffer = torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=on_cuda)
                self.buffers[where] = buffer
            self._copy(
                buffer,
                torch.empty(0, dtype=torch.uint8, device=source.device).set_(storage),
                on_cuda,
            )
            result = _view(buffer, source)
        if size:
            self.storages[identity] = buffer
        return result

    def _copy(self, buffer: torch.Tensor, source: torch.Tensor, on_cuda: bool) -> None:
        if on_cuda:
            buffer.copy_(source, non_blocking=True)
            self.cuda_devices.add(source.device)
        elif source.device.type == "cpu":
            self.host_copies.append((buffer, source))  # both contiguous
        else:
            buffer.copy_(source)


def _view(copied: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``source``'s view (offset, shape, strides, dtype) of the host copy of its storage."""
    return torch.empty(0, dtype=source.dtype).set_(
        copied.untyped_storage(), source.storage_offset(), source.size(), source.stride()
    )


_ATOMIC = (str, int, float, bool, bytes, complex, type(None))


def _copy_tree(value: Any, slot: SnapshotSlot, where: TensorPath, seen: dict[int, Any]) -> Any:
    kind = type(value)
    if kind is torch.Tensor:
        return slot.host_copy(where, value)
    if kind is torch.nn.Parameter:
        copied = torch.nn.Parameter(slot.host_copy(where, value), value.requires_grad)
        return copied
    if isinstance(value, torch.Tensor):
        return slot.host_copy(where, value)
    if kind in _ATOMIC:
        return value
    identity = id(value)
    if identity in seen:
        return seen[identity]
    if kind is dict:
        result: dict[Any, Any] = {}
        seen[identity] = result
        for key, item in value.items():
            result[key] = _copy_tree(item, slot, (*where, key), seen)
        return result
    if kind is list:
        items: list[Any] = []
        seen[identity] = items
        items.extend(_copy_tree(item, slot, (*where, i), seen) for i, item in enumerate(value))
        return items
    if kind is tuple:
        return tuple(_copy_tree(item, slot, (*where, i), seen) for i, item in enumerate(value))
    if isinstance(value, dict | list | tuple):
        # OrderedDict (a state_dict, with its _metadata), defaultdict, namedtuples, the
        # user's own: rebuilt as pickle (so torch.save) sees them, tensors into the slot.
        return _rebuild(value, slot, where, seen)
    if isinstance(value, _ATOMIC):
        return value
    copied = copy.deepcopy(value)
    seen[identity] = copied
    return copied


def _rebuild(value: Any, slot: SnapshotSlot, where: TensorPath, seen: dict[int, Any]) -> Any:
    """A container subclass, copied through its pickle reduction (type, attributes such
    as ``OrderedDict._metadata`` and ``defaultdict.default_factory``, and items kept),
    ``__init__`` not called: what ``torch.load`` would give back."""
    reduced = value.__reduce_ex__(2)  # torch.save's pickle protocol
    if isinstance(reduced, str):  # a global: pickled by reference
        return value
    make, args, state, items, pairs = (*reduced, None, None, None)[:5]
    result = make(*_copy_tree(args, slot, (*where, "__args__"), seen))
    seen[id(value)] = result
    if state is not None:
        state = _copy_tree(state, slot, (*where, "__state__"), seen)
        if hasattr(result, "__setstate__"):
            result.__setstate__(state)
        else:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                result.__dict__.update(state)
            for name, item in (slots or {}).items():
                setattr(result, name, item)
    if items is not None:
        for i, item in enumerate(items):
            result.append(_copy_tree(item, slot, (*where, i), seen))
    if pairs is not None:
        for key, item in pairs:
            result[key] = _copy_tree(item, slot, (*where, key), seen)
    return result


class Snapshotter:
    """Hands out snapshot slots and takes host snapshots of checkpoint dicts.

    Args:
        max_snapshots: How many snapshots may exist at once (each holds one
            checkpoint's tensors in host memory).
    """

    def __init__(self, max_snapshots: int) -> None:
        self._free: queue.SimpleQueue[SnapshotSlot] = queue.SimpleQueue()
        for index in range(max_snapshots):
            self._free.put(SnapshotSlot(index))

    def acquire(self) -> tuple[SnapshotSlot, float]:
        """Take a free slot, waiting if none is free; return it and the seconds waited."""
        try:
            return self._free.get_nowait(), 0.0
        except queue.Empty:
            started = time.monotonic()
            slot = self._free.get()
            return slot, time.monotonic() - started

    def release(self, slot: SnapshotSlot) -> None:
        """Give a slot back once its snapshot has been written."""
        self._free.put(slot)

    @staticmethod
    def snapshot(checkpoint: dict[str, Any], slot: SnapshotSlot) -> dict[str, Any]:
        """A deep copy of ``checkpoint`` whose tensors live in ``slot``'s host buffers.

        After this returns, training may change its tensors freely: the snapshot
        does not share storage with them.
        """
        slot.cuda_devices.clear()
        slot.host_copies.clear()
        slot.storages.clear()
        try:
            result = _copy_tree(checkpoint, slot, (), {})
        finally:
            slot.storages.clear()
        copies, slot.host_copies = slot.host_copies, []
        _copy_in_parallel(copies)
        # Wait for the non-blocking device-to-host copies. Only devices copied from: a CPU
        # checkpoint never touches CUDA (a context would cost host and device memory).
        for device in slot.cuda_devices:
            torch.cuda.synchronize(device)
        return result  # type: ignore[no-any-return]


# A host copy is bound by memory bandwidth, which one core does not saturate (measured
# on the 2-core benchmark machine: 4.3 GB/s from one thread, 8.2 GB/s from two). The
# training thread waits for the snapshot anyway, so the copy uses a few cores for the
# while; never when torch already copies on several threads (torch.get_num_threads()).
_COPY_THREADS_MAX = 4
_COPY_PIECE_BYTES = 16 * 2**20  # the work is split in pieces of this size
_COPY_PARALLEL_MIN_BYTES = 32 * 2**20  # below this a thread costs more than it saves


def _copy_threads() -> int:
    if torch.get_num_threads() > 1:
        return 1  # torch's own copy kernel runs on its intra-op threads already
    return max(1, min(_COPY_THREADS_MAX, os.cpu_count() or 1))


def _copy_in_parallel(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make each ``buffer.copy_(source)`` (contiguous CPU tensors), on up to
    :data:`_COPY_THREADS_MAX` threads when there is enough to copy. Returns once all are
    made; the first error (if any) is raised."""
    total = sum(source.numel() * source.element_size() for _, source in copies)
    threads = _copy_threads() if total >= _COPY_PARALLEL_MIN_BYTES else 1
    if threads == 1:
        for buffer, source in copies:
            buffer.copy_(source)
        return
    pieces: queue.SimpleQueue[tuple[torch.Tensor, torch.Tensor]] = queue.SimpleQueue()
    for buffer, source in copies:
        flat_buffer, flat_source = buffer.view(-1), source.reshape(-1)
        step = max(1, _COPY_PIECE_BYTES // max(1, source.element_size()))
        for start in range(0, flat_source.numel(), step):
            pieces.put((flat_buffer[start : start + step], flat_source[start : start + step]))
    errors: list[BaseException] = []

    def work() -> None:  # torch releases the GIL while it copies
        try:
            while True:
                try:
                    into, source = pieces.get_nowait()
                except queue.Empty:
                    return
                into.copy_(source)
        except BaseException as error:
            errors.append(error)

    helpers = [
        threading.Thread(target=work, name="lamin-snapshot-copy", daemon=True)
        for _ in range(threads - 1)
    ]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


def _private_zip_save() -> Callable[[Any, Any], None] | None:
    """``torch.save``'s own zip writer with CRC-32 off for this one call, if this torch has it.

    ``torch.save`` reads the CRC switch from a process-wide setting
    (``torch.serialization.set_crc32_options``); flipping it around a background save
    would also strip the checksums of any ``torch.save`` another thread runs meanwhile.
    Instead this builds the writer ``torch.save`` builds, with the switch passed in. Its
    parts are private, so they are checked here once; ``None`` (write with ``torch.save``,
    checksums included) where they differ.
    """
    serialization = getattr(torch, "serialization", None)
    writer_type = getattr(torch._C, "PyTorchFileWriter", None)
    save_records = getattr(serialization, "_save", None)
    alignment = getattr(serialization, "_get_storage_alignment", None)
    protocol = getattr(serialization, "DEFAULT_PROTOCOL", None)
    if writer_type is None or save_records is None or alignment is None or protocol is None:
        return None
    try:
        parameters = list(inspect.signature(save_records).parameters)
    except (TypeError, ValueError):
        return None
    if parameters != [
        "obj",
        "zip_file",
        "pickle_module",
        "pickle_protocol",
        "_disable_byteorder_record",
    ]:
        return None

    def save_without_crc(payload: Any, handle: Any) -> None:
        try:
            writer = writer_type(handle, False, alignment())
        except TypeError:  # another constructor: nothing written yet
            torch.save(payload, handle)
            return
        try:
            save_records(payload, writer, pickle, protocol, False)
        except BaseException:
            # Finish the archive as torch.save does, so the writer never does it later from
            # its destructor into a closed file; the first error is the one that counts.
            with contextlib.suppress(Exception):
                writer.write_end_of_file()
            raise
        writer.write_end_of_file()

    return save_without_crc


_save_without_crc = _private_zip_save()


def save_snapshot(payload: Any, handle: Any) -> None:
    """``torch.save(payload, handle)``, without the zip's CRC-32 checksums where possible.

    The file is the one ``torch.save`` writes with ``set_crc32_options(False)``:
    ``torch.load`` reads it (it never checks the checksums); ``unzip -t`` and Python's
    ``zipfile`` would report them wrong. Computing them costs about as much CPU as
    writing the file, taken from training. Thread-safe: no process-wide setting changes.
    """
    if _save_without_crc is None:
        torch.save(payload, handle)
    else:
        _save_without_crc(payload, handle)


def _drop_from_page_cache(fd: int) -> None:
    """Let the kernel reuse a written, fsynced file's pages now (best effort, POSIX only).

    Without it every checkpoint takes fresh memory for its pages while older checkpoints'
    pages stay cached: more work for the writer (on a VM whose memory is backed lazily,
    ~0.5 s of kernel time per 268 MB against 0.06 s for reused pages) and for the kernel
    reclaiming later, and other files (training data) pushed out of the cache.
    """
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        with contextlib.suppress(OSError):
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_atomically(
    payload: Any, target: str | os.PathLike[str], scratch: Path, save: Callable[[Any, Any], None]
) -> int:
    """Write ``payload`` with ``save(payload, handle)`` to ``target``: temp file, fsync, rename.

    The temporary file lives in ``scratch`` (on the same filesystem as ``target``). Once
    fsynced, its pages are dropped from the page cache (see :func:`_drop_from_page_cache`).
    Returns the size of the written file.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    Path(target).parent.mkdir(parents=True, exist_ok=True)  # as Lightning's CheckpointIO does
    stem = scratch / f".{Path(target).name}.{os.getpid()}.{threading.get_ident()}"
    claimed, temporary = Path(f"{stem}{CLAIMED_SUFFIX}"), Path(f"{stem}{WRITING_SUFFIX}")
    try:
        with open(claimed, "wb") as handle:
            if fcntl is not None:
                # Held until the file is renamed into place: a ``.tmp`` file nobody holds
                # is the write of a process that ended (see clear_dead_writes). Locked
                # before it takes that name, so none is ever unlocked while it is written.
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            os.replace(claimed, temporary)
            save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
            _drop_from_page_cache(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
            os.replace(temporary, target)
    except BaseException:
        claimed.unlink(missing_ok=True)
        temporary.unlink(missing_ok=True)
        raise
    return size


class HostWrite:
    """The background write of one host snapshot (``async_write``); frees its slot once.

    Called on the intake thread, it writes the file and gives the slot back. If the
    save fails on the training thread before the job is submitted, :meth:`abandon`
    gives the slot back instead (a slot never freed would block every later save);
    a write abandoned that way refuses to run, since its buffers may be reused. A write
    runs once: a later call (the job's, after the training thread wrote the file itself)
    waits for that run and returns, or raises its error again.
    """

    def __init__(
        self,
        snapshotter: Snapshotter,
        slot: SnapshotSlot,
        host: dict[str, Any],
        filepath: str,
        scratch: Path,
    ) -> None:
        self._snapshotter = snapshotter
        self._slot = slot
        self._host: dict[str, Any] | None = host
        self._filepath = filepath
        self._scratch = scratch
        self._lock = threading.Lock()
        self._state: Literal["pending", "writing", "ran", "abandoned"] = "pending"
        self._done = threading.Event()
        self.error: BaseException | None = None
        """Why the write failed (or was abandoned); None while pending and once written."""
        # Taken until the file exists (or the write failed): Lightning's version counter
        # must see the name now, on the training thread (see :func:`name_taken`).
        _take_name(filepath)

    @property
    def filepath(self) -> str:
        """The path this write creates."""
        return self._filepath

    def done(self) -> bool:
        """Whether the write finished (written, failed or abandoned)."""
        return self._done.is_set()

    def failed(self) -> bool:
        """Whether the write finished without creating its file."""
        return self._done.is_set() and self.error is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the write finished; return whether it did within ``timeout``."""
        return self._done.wait(timeout)

    def __call__(self) -> None:
        with self._lock:
            state = self._state
            if state == "pending":
                self._state = "writing"
        if state == "abandoned":
            raise RuntimeError(f"the snapshot of {self._filepath} was abandoned; not written")
        if state != "pending":  # run (or running) on another thread already: its outcome
            self._done.wait()
            if self.error is not None:
                raise self.error
            return
        try:
            write_atomically(self._host, self._filepath, self._scratch, save_snapshot)
        except BaseException as error:
            self.error = error
            raise
        finally:
            self._host = None
            self._snapshotter.release(self._slot)
            _release_name(self._filepath)
            with self._lock:
                self._state = "ran"
            self._done.set()

    def abandon(self) -> None:
        """Give the slot back if the write has not started (it then never runs)."""
        with self._lock:
            if self._state != "pending":
                return
            self._state = "abandoned"
        self._host = None
        self.error = RuntimeError(f"the snapshot of {self._filepath} was abandoned; not written")
        self._snapshotter.release(self._slot)
        _release_name(self._filepath)
        self._done.set()


# -- names being written ------------------------------------------------------------------

_names_lock = threading.Lock()
_names_taken: dict[str, int] = {}


def _take_name(filepath: str | os.PathLike[str]) -> None:
    name = os.path.abspath(filepath)
    with _names_lock:
        _names_taken[name] = _names_taken.get(name, 0) + 1


def _release_name(filepath: str | os.PathLike[str]) -> None:
    name = os.path.abspath(filepath)
    with _names_lock:
        left = _names_taken.get(name, 0) - 1
        if left > 0:
            _names_taken[name] = left
        else:
            _names_taken.pop(name, None)


def name_taken(filepath: str | os.PathLike[str]) -> bool:
    """Whether a background write of this process is creating ``filepath`` right now.

    Lightning picks a checkpoint's name (``-v1``, ``last-v1``) by what exists on disk;
    a file still being written counts as existing, for every callback of this process.
    """
    name = os.path.abspath(filepath)
    with _names_lock:
        return name in _names_taken


def async_write_supported(trainer: Any) -> tuple[bool, str]:
    """Whether ``trainer`` saves through the default ``torch.save`` path; else why not."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO and isinstance(
        strategy, SingleDeviceStrategy | DDPStrategy
    ):
        return True, ""
    return False, (
        f"async_write=True needs the default TorchCheckpointIO and a single-device or"
        f" DDP strategy; this trainer has {type(strategy).__name__} with"
        f" {type(strategy.checkpoint_io).__name__}. Writing checkpoints synchronously."
    )


def snapshot_checkpoint(
    checkpoint: dict[str, Any],
    snapshotter: Snapshotter,
    filepath: str,
    *,
    scratch: Path,
    stats: Any,
) -> HostWrite:
    """Copy ``checkpoint`` (as Lightning assembled it) into a host snapshot; return its write.

    Runs on the training thread, where the CheckpointIO would have written the file (rank
    zero). A wait for a free snapshot slot is counted as training stall in ``stats``.
    """
    slot, waited = snapshotter.acquire()
    if waited:
        stats.add(admission_waits=1, training_stall_seconds=waited)
        stats.record_max("max_training_stall_seconds", waited)
    try:
        host = snapshotter.snapshot(checkpoint, slot)
    except BaseException:
        snapshotter.release(slot)
        raise
    return HostWrite(snapshotter, slot, host, filepath, scratch)
