"""Host snapshots of checkpoints, for writing them off the training thread.

With ``async_write=True`` the training thread runs ``torch.save``'s own pickling of
the checkpoint (so the file holds exactly what ``torch.save`` would write at that
moment, and what cannot be pickled fails there, as it would) and copies each tensor
storage's bytes into host buffers (reused from one checkpoint to the next; pinned
when the tensors live on an accelerator, so the copy never needs a second buffer on
the device). Writing the archive happens later, for the pipeline's intake thread, on
a thread of its own at a lower CPU priority than training, into a temporary file that
is fsynced and renamed into place: a file is complete or absent, never torn.

The background write shares the host's CPUs with training, so it does as little
CPU work as it can (measured in ``benchmarks/bench_async_write.py``): the zip
archive is written without CRC-32 checksums (``torch.load`` does not check them;
only this write, never the process-wide ``torch.save`` setting, so a synchronous
``torch.save`` elsewhere still writes them), and once the file is fsynced its
pages are dropped from the page cache (``POSIX_FADV_DONTNEED``), so the next
checkpoint reuses that memory instead of taking fresh pages. Where the filesystem allows
it (Linux, ``O_DIRECT``), the archive does not go through the page cache at all: it is
copied, 1 MiB at a time, into one reused, aligned buffer that is written straight to the
disk (see :class:`_DirectSink`).

At most ``max_snapshots`` snapshots exist at once; a checkpoint that finds none
free waits (and the wait is counted as training stall). The first snapshot's buffers
can be made beforehand, off the training thread (:meth:`Snapshotter.prepare`).
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import io
import logging
import mmap
import os
import pickle
import queue
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from lamin_lightning import _flocks
from lamin_lightning._jobs import file_identity
from lamin_lightning._journal import flock_here
from lamin_lightning._names import release_name, take_name
from lamin_lightning._staging import CLAIMED_SUFFIX, WRITING_SUFFIX, scratch_name

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lamin_lightning")


_BufferKey = tuple[int, bool]  # a host buffer's size in bytes, and whether it is pinned


class SnapshotSlot:
    """One set of reusable host buffers, one per storage of a checkpoint.

    A storage takes a buffer of its own size (pinned for a CUDA storage) that the slot
    holds from an earlier snapshot or from :meth:`Snapshotter.prepare`, else a new one.
    Buffers are matched by size, not by position: small tensors that come and go in a
    checkpoint (a callback's best score, the loops' state) do not shift the others."""

    def __init__(self, index: int) -> None:
        self.index = index
        # This snapshot's buffers (after it: the last snapshot's), with their keys.
        self._kept: list[tuple[_BufferKey, torch.Tensor]] = []
        # Buffers free for this snapshot: the last snapshot's, or prepared ones.
        self._spare: dict[_BufferKey, list[torch.Tensor]] = {}
        # CUDA devices with device-to-host copies in flight into this slot.
        self.cuda_devices: set[torch.device] = set()
        # Host-to-host copies not made yet: made together, on several cores, before
        # the snapshot is handed out (see :func:`_copy_in_parallel`).
        self.host_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        # This snapshot's copies, by source storage; and the buffers' addresses.
        self._copied: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
        self._own: set[int] = set()

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The host buffers of the last snapshot taken in this slot."""
        return [buffer for _, buffer in self._kept]

    def warm(self) -> bool:
        """Whether the slot holds buffers (a later snapshot of the same model needs none)."""
        return bool(self._kept or self._spare)

    def add_spare(self, key: _BufferKey, buffer: torch.Tensor) -> None:
        self._spare.setdefault(key, []).append(buffer)

    def keep_only(self, keys: list[_BufferKey], *, free_others: bool) -> list[_BufferKey]:
        """Between snapshots: return the keys of storages of ``keys`` the slot has no
        buffer for; with ``free_others``, free the buffers none of them needs."""
        self.begin()  # every buffer spare
        missing: list[_BufferKey] = []
        needed: dict[_BufferKey, list[torch.Tensor]] = {}
        for key in keys:
            spare = self._spare.get(key)
            if spare:
                needed.setdefault(key, []).append(spare.pop())
            else:
                missing.append(key)
        if not free_others:
            for key, buffers in needed.items():
                self._spare.setdefault(key, []).extend(buffers)
        else:
            self._spare = needed
        return missing

    def begin(self) -> None:
        for key, buffer in self._kept:
            self.add_spare(key, buffer)
        self._kept = []
        self.cuda_devices.clear()
        self.host_copies.clear()
        self._copied.clear()
        self._own.clear()

    def end(self) -> None:
        self._spare.clear()  # a smaller checkpoint frees what it does not use
        self._copied.clear()

    def owns(self, storage: Any) -> bool:
        """Whether ``storage`` is one of this snapshot's host copies."""
        return storage.nbytes() == 0 or storage.data_ptr() in self._own

    def host_storage(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        """This snapshot's host copy of ``storage``: made once per storage, so tensors
        that share one (tied weights, views) share the copy, as ``torch.save`` writes
        it once. Copies from CUDA go into pinned memory without blocking (see
        ``cuda_devices``); copies on the host are made before the snapshot is handed
        out. A copy of a device's storage carries the device for the file's location
        tag (``_fake_device``, which ``torch.save`` reads), so it loads where it was."""
        device = storage.device
        identity = storage._cdata  # the storage itself, as torch.save tells them apart
        known = self._copied.get(identity)
        copied = known[1] if known is not None else None
        if copied is None:
            on_cuda = device.type == "cuda"
            key = (storage.nbytes(), on_cuda)
            spare = self._spare.get(key)
            buffer = spare.pop() if spare else allocate_buffer(key)
            self._kept.append((key, buffer))
            source = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            if on_cuda:
                buffer.copy_(source, non_blocking=True)
                self.cuda_devices.add(device)
            elif device.type == "cpu":
                self.host_copies.append((buffer, source))  # both contiguous
            else:
                buffer.copy_(source)
            copied = buffer.untyped_storage()
            self._own.add(copied.data_ptr())
            # The source is kept too: its address is never reused during this snapshot.
            self._copied[identity] = (storage, copied)
        copied._fake_device = None if device.type == "cpu" else device
        return copied


# Buffers this large are mappings of their own, which a forked child gets as zeros
# (MADV_WIPEONFORK, Linux 4.14+) instead of sharing them copy-on-write: a DataLoader that
# forks its workers at every epoch would otherwise make the next snapshot copy each page
# it writes (a fault and a 4 KiB copy per page, on the training thread), and every fork
# copy the buffers' page tables. Smaller ones come from torch's allocator.
_OWN_MAPPING_MIN_BYTES = 2**20
_MADV_WIPEONFORK = 18  # <linux/mman.h>; Python's mmap module names it from 3.12 on
_TOUCH_PIECE_BYTES = 16 * 2**20  # a preparation gives way between pieces this large


def allocate_buffer(key: _BufferKey) -> torch.Tensor:
    """A host buffer of ``key``'s size, pinned if ``key`` says so."""
    size, pinned = key
    if pinned or size < _OWN_MAPPING_MIN_BYTES or not sys.platform.startswith("linux"):
        return torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=pinned)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # an older kernel: shared copy-on-write, as before
        mapping.madvise(_MADV_WIPEONFORK)
    # Writable: no warning. The tensor holds the mapping until it is freed, then it goes.
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _touch(buffer: torch.Tensor, stop: Callable[[], bool]) -> bool:
    """Fault in ``buffer``'s pages now (the kernel gives a new allocation's pages at its
    first write), on this thread only and without holding the GIL, a piece at a time;
    return False if ``stop()`` said so between two pieces (the rest faults at its first
    use)."""
    size, address = buffer.numel(), buffer.data_ptr()
    for start in range(0, size, _TOUCH_PIECE_BYTES):
        if stop():
            return False
        ctypes.memset(address + start, 0, min(_TOUCH_PIECE_BYTES, size - start))
    return True


def storage_keys(tensors: Iterable[Any]) -> list[_BufferKey]:
    """The buffer keys a snapshot of ``tensors`` needs: one per distinct storage."""
    seen: set[int] = set()
    keys: list[_BufferKey] = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type not in ("cpu", "cuda"):
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse)
            continue
        if storage._cdata in seen or storage.nbytes() == 0:
            continue
        seen.add(storage._cdata)
        keys.append((storage.nbytes(), tensor.device.type == "cuda"))
    return keys


_STORAGES = (torch.storage.TypedStorage, torch.UntypedStorage)


def _on_host(value: Any, slot: SnapshotSlot) -> Any:
    """A tensor's reduction arguments with each storage in them replaced by its host copy."""
    if isinstance(value, torch.storage.TypedStorage):
        host = slot.host_storage(value._untyped_storage)
        typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=host, dtype=value.dtype, _internal=True
        )
        typed._fake_device = host._fake_device
        return typed
    if isinstance(value, torch.UntypedStorage):
        return slot.host_storage(value)
    if type(value) is tuple:
        return tuple(_on_host(item, slot) for item in value)
    return value


def _pickle_module(slot: SnapshotSlot) -> Any:
    """``pickle`` for ``torch.save``'s own record writing, with a pickler that reduces each
    tensor as ``torch.save`` does, its storage replaced by the slot's host copy."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if not isinstance(obj, torch.Tensor):
                return NotImplemented
            reduced = obj.__reduce_ex__(_PROTOCOL)  # type: ignore[no-untyped-call]
            if not isinstance(reduced, tuple):
                return NotImplemented
            args = reduced[1]
            if args and isinstance(args[0], _STORAGES):  # a plain tensor: storage first
                args = (_on_host(args[0], slot), *args[1:])
            else:  # subclasses, quantized, sparse, ...: wherever a storage is
                args = _on_host(args, slot)
            return (reduced[0], args, *reduced[2:])

    return types.SimpleNamespace(Pickler=Pickler)


class _Recorder:
    """Stands in for ``torch.save``'s zip writer: keeps the records it would write, in
    order. A storage that reaches it without a host copy (one pickled on its own, not
    through a tensor) is copied here."""

    def __init__(self, slot: SnapshotSlot) -> None:
        self.slot = slot
        self.records: list[tuple[str, Any, int]] = []

    def write_record(self, name: str, data: Any, size: int) -> None:
        if not isinstance(data, bytes | str) and not self.slot.owns(data):
            data = self.slot.host_storage(data)
        self.records.append((name, data, size))

    def write_record_metadata(self, name: str, size: int) -> None:
        self.records.append((name, None, size))


class Archive:
    """A checkpoint as ``torch.save`` writes it, taken on the training thread and written
    later: the records of its zip archive in order (``data.pkl``, the pickled structure,
    and each storage's bytes in host memory), or, where this torch's record writing is not
    the one known here, the whole file's bytes."""

    __slots__ = ("blob", "records")

    def __init__(
        self, records: list[tuple[str, Any, int]] | None = None, blob: bytes | None = None
    ) -> None:
        self.records = records or []
        self.blob = blob


class Snapshotter:
    """Hands out snapshot slots and takes host snapshots of checkpoint dicts.

    A slot given back is handed out again before one used less recently, so that a
    checkpoint written before the next one comes reuses the same buffers and the other
    slots never take memory.

    Args:
        max_snapshots: How many snapshots may exist at once (each holds one
            checkpoint's tensors in host memory).
    """

    def __init__(self, max_snapshots: int) -> None:
        # Held as ``with self._lock`` (a lock's own __enter__), not ``with self._changed``:
        # a Ctrl+C can land right after Condition.__enter__ (Python code) took the lock
        # and before the block, which then never released it (a snapshot's wait on the
        # training thread, then every write's release, hung for good).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._slots = [SnapshotSlot(index) for index in range(max_snapshots)]
        self._free: list[SnapshotSlot] = self._slots[::-1]  # slot 0 on top
        self._preparing: SnapshotSlot | None = None  # see prepare
        self._preparer: threading.Thread | None = None
        self._queued: tuple[list[_BufferKey], bool] | None = None  # asked for meanwhile
        self._hurry = False  # a snapshot waits for the slot being prepared

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def acquire(self) -> tuple[SnapshotSlot, float]:
        """Take a free slot, waiting if none is free (or for the slot being prepared, which
        then stops at its next piece of work); return it and the seconds waited."""
        with self._lock:
            slot = self._take()
            if slot is not None:
                return slot, 0.0
            started = time.monotonic()
            while slot is None:
                if self._preparing is not None:
                    self._hurry = True
                self._changed.wait()
                slot = self._take()
            if self._preparing is not None:  # another slot came free: preparing goes on
                self._hurry = False
            return slot, time.monotonic() - started

    def _take(self) -> SnapshotSlot | None:
        free = self._free
        for at in range(len(free) - 1, -1, -1):  # the slot given back last first
            if free[at].warm():
                return free.pop(at)
        if self._preparing is not None:
            return None  # buffers are on their way: allocating them twice would cost more
        return free.pop() if free else None

    def release(self, slot: SnapshotSlot) -> None:
        """Give a slot back once its snapshot has been written."""
        with self._lock:
            self._free.append(slot)
            self._changed.notify_all()

    def prepare(
        self, keys: list[_BufferKey], *, free_others: bool = True
    ) -> threading.Thread | None:
        """Have one slot hold buffers for a snapshot of storages of ``keys``: make those
        it lacks (and fault their pages in) on a thread at the background write's lower
        CPU priority, and (with ``free_others``: ``keys`` are all a checkpoint holds)
        free those it holds that ``keys`` do not need; return that thread, or None when
        nothing is to be made.

        A first snapshot otherwise takes fresh memory on the training thread: the
        kernel's page faults on first touch (a few hundred ms per GB, more on a VM that
        returns free memory to its host), or pinning on a CUDA machine. A snapshot that
        comes meanwhile waits for the buffer being made, then takes the slot as it is
        and makes the rest itself. The slot prepared is the one the next snapshot takes
        (the warm one given back last); none while a warm slot is in use (a write).
        Asked again while a preparation runs, it goes on with these keys afterwards
        (the thread returned is that one)."""
        if _save_records is None:
            return None  # snapshots are torch.save's bytes here: no buffers to reuse
        with self._lock:
            running = self._preparing
            if running is not None:  # made next, into the same slot, unless hurried
                self._queued = (keys, free_others)
                return self._preparer
            warm = [slot for slot in self._free if slot.warm()]
            if warm:
                slot = warm[-1]
            elif any(slot.warm() for slot in self._slots) or not self._free:
                return None
            else:
                slot = self._free[-1]
            missing = slot.keep_only(keys, free_others=free_others)
            if not missing:
                return None
            self._free.remove(slot)
            self._preparing, self._hurry, self._queued = slot, False, None
            thread = self._preparer = threading.Thread(
                target=_below,
                args=(lambda: self._prepare(slot, missing),),
                name="lamin-lightning-snapshot-prepare",
                daemon=True,
            )
        try:
            thread.start()
        except Exception:  # no thread to be had: the snapshot allocates, as without
            self._prepared(slot)
            log.debug("no thread to prepare snapshot buffers", exc_info=True)
            return None
        return thread

    def _prepare(self, slot: SnapshotSlot, keys: list[_BufferKey]) -> None:
        def hurried() -> bool:
            return self._hurry

        given_back = False
        try:
            while True:
                for key in keys:
                    if hurried():
                        return
                    buffer = allocate_buffer(key)
                    slot.add_spare(key, buffer)
                    # Pinning faulted a pinned buffer's pages in already.
                    if not key[1] and not _touch(buffer, hurried):
                        return
                with self._lock:  # what was asked for meanwhile (see prepare)
                    queued, self._queued = self._queued, None
                    if queued is None or self._hurry:
                        # Given back under this same lock: a prepare() from now on starts
                        # a preparation of its own instead of queuing for this one.
                        self._give_back_prepared(slot)
                        given_back = True
                        return
                    keys = slot.keep_only(queued[0], free_others=queued[1])
        except Exception:  # out of memory, say: the snapshot allocates what is left
            log.debug("preparing snapshot buffers failed", exc_info=True)
        finally:
            if not given_back:
                self._prepared(slot)

    def _prepared(self, slot: SnapshotSlot) -> None:
        with self._lock:
            self._give_back_prepared(slot)

    def _give_back_prepared(self, slot: SnapshotSlot) -> None:  # holding self._changed
        self._preparing, self._preparer, self._hurry, self._queued = None, None, False, None
        self._free.append(slot)
        self._changed.notify_all()

    def in_use(self) -> bool:
        """Whether a slot is taken by a snapshot or its write (a preparation aside)."""
        with self._lock:
            return len(self._free) + (self._preparing is not None) < len(self._slots)

    def stop_preparing(self) -> None:
        """Have a preparation under way stop at its next piece of work."""
        with self._lock:
            if self._preparing is not None:
                self._hurry = True

    @staticmethod
    def snapshot(checkpoint: dict[str, Any], slot: SnapshotSlot) -> Archive:
        """``checkpoint`` as ``torch.save`` writes it, its tensors' bytes in ``slot``.

        ``torch.save``'s own pickling runs here, on the training thread: the file holds
        what ``torch.save`` would write at this moment (types, attributes, shared
        storages), and what it cannot pickle fails here, as it would. Only the storages'
        bytes are copied, into the slot's host buffers. After this returns, training
        may change the checkpoint freely.
        """
        if _save_records is None:
            whole = io.BytesIO()
            torch.save(checkpoint, whole)
            return Archive(blob=whole.getvalue())
        return Archive(_record(checkpoint, slot, _save_records))


def _record(checkpoint: Any, slot: SnapshotSlot, save_records: Any) -> list[tuple[str, Any, int]]:
    """The records ``torch.save`` writes of ``checkpoint`` (``save_records``: its own
    record writing), with every storage's bytes copied into ``slot``."""
    slot.begin()
    recorder = _Recorder(slot)
    try:
        save_records(checkpoint, recorder, _pickle_module(slot), _PROTOCOL, False)
        copies, slot.host_copies = slot.host_copies, []
        _copy_in_parallel(copies)
        # Wait for the non-blocking device-to-host copies. Only devices copied from: a
        # CPU checkpoint never touches CUDA (a context costs host and device memory).
        for device in slot.cuda_devices:
            torch.cuda.synchronize(device)
    finally:
        slot.end()
    return recorder.records


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


def _known_record_writing() -> tuple[Any, Any, Any] | None:
    """``torch.save``'s record writing (``torch.serialization._save``), its zip writer and
    its storage alignment, if this torch has them as known here; else None.

    They are private, so they are checked here once. Without them a snapshot is the
    whole file's bytes from ``torch.save`` (:class:`Archive`), checksums included.
    """
    serialization = getattr(torch, "serialization", None)
    writer_type = getattr(torch._C, "PyTorchFileWriter", None)
    save_records = getattr(serialization, "_save", None)
    alignment = getattr(serialization, "_get_storage_alignment", None)
    if writer_type is None or save_records is None or alignment is None:
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
    # And it works as used here: a small checkpoint recorded, written, read back.
    try:
        numbers = torch.arange(6.0)
        ones = torch.ones(2, dtype=torch.int64)
        probe: dict[str, Any] = {"a": numbers, "b": [ones], "view": numbers[2:]}
        whole = io.BytesIO()
        records = _record(probe, SnapshotSlot(-1), save_records)
        _write_records(writer_type(whole, False, alignment()), records)
        whole.seek(0)
        back = torch.load(whole, weights_only=True)
        if not (
            torch.equal(back["a"], numbers)
            and torch.equal(back["b"][0], ones)
            and back["view"].untyped_storage().data_ptr() == back["a"].data_ptr()
        ):
            return None
    except Exception:
        return None
    return save_records, writer_type, alignment


_PROTOCOL = getattr(torch.serialization, "DEFAULT_PROTOCOL", 2)


def save_snapshot(archive: Archive, handle: Any) -> None:
    """Write ``archive`` to ``handle``: the file ``torch.save`` writes, without the zip's
    CRC-32 checksums.

    ``torch.load`` reads it (it never checks the checksums); ``unzip -t`` and Python's
    ``zipfile`` would report them wrong. Computing them costs about as much CPU as
    writing the file, taken from training. No process-wide setting changes, so a
    ``torch.save`` on another thread meanwhile keeps its checksums.
    """
    with _bypassing_page_cache(handle) as sink:
        if archive.blob is not None or _writer_type is None or _alignment is None:
            sink.write(archive.blob)
        else:
            _write_records(_writer_type(sink, False, _alignment()), archive.records)


def _write_records(writer: Any, records: list[tuple[str, Any, int]]) -> None:
    """Write ``records`` with ``writer`` (``torch.save``'s zip writer) and finish the archive."""
    try:
        for name, data, size in records:
            if data is None:
                writer.write_record_metadata(name, size)
            else:
                writer.write_record(name, data, size)
    except BaseException:
        # Finish the archive as torch.save does, so the writer never does it later from
        # its destructor into a closed file; the first error is the one that counts.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    writer.write_end_of_file()


# Checked once, at import, after everything the check uses is defined.
_known = _known_record_writing()
_save_records, _writer_type, _alignment = _known if _known is not None else (None, None, None)


_DIRECT_BLOCK = 4096  # O_DIRECT's alignment of memory, offsets and lengths (a page)
_DIRECT_CHUNK = 1 << 20  # bytes per write(2); a multiple of _DIRECT_BLOCK
_spare_buffers: list[mmap.mmap] = []  # aligned buffers of writes that ended, reused
_spare_lock = threading.Lock()


class _DirectSink:
    """A write-only file for ``torch.save``'s zip writer that bypasses the page cache.

    Writes are gathered in a page-aligned buffer of 1 MiB (reused from one write to the
    next) and written through a descriptor of the file opened with ``O_DIRECT``. A page
    cache write takes fresh memory for every page of every checkpoint; on a VM whose
    guest returns free memory to its host (free page reporting, balloons), each such
    page is a fault on the host again, and the write of a 268 MB checkpoint took 0.1 to
    0.7 s of CPU (kernel time) against 0.03 s this way, on a core training shares.
    A direct write the disk refuses (``EINVAL``: an alignment it does not take; ``ENOSPC``
    seen now and then on some VMs) sends the rest through the page cache, as before.
    """

    def __init__(self, fd: int, buffer: mmap.mmap) -> None:
        self._fd = fd
        self._buffer = buffer
        self._view = memoryview(buffer)
        self._used = 0  # bytes in the buffer
        self._size = 0  # bytes written by the zip writer so far (the file's final size)
        self._direct = True

    def write(self, data: Any) -> int:
        source = memoryview(data).cast("B")
        total = len(source)
        start = 0
        while start < total:  # the copy holds the GIL: 1 MiB at a time (~0.1 ms)
            take = min(len(self._view) - self._used, total - start)
            self._view[self._used : self._used + take] = source[start : start + take]
            self._used += take
            start += take
            if self._used == len(self._view):
                self._drain(self._used)
        self._size += total
        return total

    def seek(self, offset: int, whence: int = io.SEEK_CUR) -> int:
        """Skip ``offset`` bytes forward (a record written as metadata only): zeros."""
        if whence != io.SEEK_CUR or offset < 0:
            raise io.UnsupportedOperation("only a forward skip is supported")
        zeros = bytes(min(offset, _DIRECT_CHUNK))
        while offset > 0:
            offset -= self.write(zeros[: min(offset, len(zeros))])
        return self._size

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        """Nothing to do before :meth:`finish` (called by the zip writer at the end)."""

    def writable(self) -> bool:
        return True

    def finish(self) -> None:
        """Write what the buffer still holds; the file is then exactly ``tell()`` bytes."""
        tail = self._used
        if tail and self._direct:
            padded = -(-tail // _DIRECT_BLOCK) * _DIRECT_BLOCK  # O_DIRECT writes whole blocks
            self._view[tail:padded] = bytes(padded - tail)
            self._drain(padded)
            os.ftruncate(self._fd, self._size)  # the padding goes
        elif tail:
            self._drain(tail)

    def _drain(self, count: int) -> None:
        written = 0
        while written < count:
            part = self._view[written:count]
            try:
                done = os.write(self._fd, part)
            except OSError as error:
                if not self._direct:
                    raise
                log.debug(
                    "a direct write was refused (%s); the rest goes through the page cache", error
                )
                self._through_page_cache()  # and the same bytes again, at the same offset
                continue
            written += done
            if done % _DIRECT_BLOCK and self._direct:
                self._through_page_cache()  # a short write left the offset unaligned
        self._used = 0

    def _through_page_cache(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False


# Filesystems on a local disk that write O_DIRECT to it. Not a network filesystem (NFS
# and the like make each direct write a synchronous round trip to the server, where the
# page cache writes behind), not tmpfs (which refuses it), not FUSE (which may ignore it).
_DIRECT_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})
_direct_devices: dict[int, bool] = {}  # st_dev -> whether it is one of them


def _on_a_local_disk(fd: int) -> bool:
    """Whether the file of ``fd`` is on a filesystem of :data:`_DIRECT_FILESYSTEMS`
    (Linux: its device in ``/proc/self/mountinfo``; remembered per device)."""
    device = os.fstat(fd).st_dev
    known = _direct_devices.get(device)
    if known is None:
        wanted = f"{os.major(device)}:{os.minor(device)}"
        known = False
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts,
        ):
            for line in mounts:
                fields = line.split(" - ", 1)
                if len(fields) == 2 and fields[0].split()[2] == wanted:
                    known = fields[1].split()[0] in _DIRECT_FILESYSTEMS
                    break
        _direct_devices[device] = known
    return known


def _forget_spare_buffers() -> None:
    """In a forked child: a thread of the parent may have held the lock."""
    global _spare_lock
    _spare_lock = threading.Lock()
    _spare_buffers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spare_buffers)


@contextlib.contextmanager
def _bypassing_page_cache(handle: Any) -> Any:
    """A :class:`_DirectSink` writing the file of ``handle`` (empty, opened for writing)
    where it is on a local disk's filesystem (see :func:`_on_a_local_disk`), else
    ``handle`` itself (not Linux, tmpfs, network filesystems, an object without a file)."""
    direct = getattr(os, "O_DIRECT", 0)
    fd = -1
    if direct and fcntl is not None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation: no file
            if _on_a_local_disk(handle.fileno()):
                fd = os.open(f"/proc/self/fd/{handle.fileno()}", os.O_WRONLY | direct)
    if fd < 0:
        yield handle
        return
    with _spare_lock:
        buffer = _spare_buffers.pop() if _spare_buffers else None
    try:
        if buffer is None:
            # Page-aligned, as O_DIRECT needs; private, so a forked child's copy is its own.
            buffer = mmap.mmap(-1, _DIRECT_CHUNK, flags=mmap.MAP_PRIVATE)
        sink = _DirectSink(fd, buffer)
        yield sink
        sink.finish()
    finally:
        os.close(fd)
        if buffer is not None:
            with _spare_lock:
                _spare_buffers.append(buffer)


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
    payload: Any,
    target: str | os.PathLike[str],
    scratch: Path,
    save: Callable[[Any, Any], None],
    before_rename: Callable[[int], None] | None = None,
    modified_ns: int | None = None,
) -> int:
    """Write ``payload`` with ``save(payload, handle)`` to ``target``: temp file, fsync, rename.

    The temporary file lives in ``scratch`` where that is on the same filesystem as
    ``target``'s folder, else in that folder (the rename needs one filesystem: ``dirpath``
    is a mount point, or a subfolder of it a link to, or a mount of, another one). Once
    fsynced, its pages are dropped from the page cache (see :func:`_drop_from_page_cache`),
    and ``before_rename`` is called with the complete file's descriptor. Returns the size
    of the written file. ``modified_ns``: the modification time the file gets (when its
    save was made), before it is fsynced and before ``before_rename`` sees it.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(target).parent
    folder.mkdir(parents=True, exist_ok=True)  # as Lightning's CheckpointIO does
    if os.stat(scratch).st_dev != os.stat(folder).st_dev:
        scratch = folder
    stem = scratch / f".{scratch_name(Path(target).name)}.{os.getpid()}.{threading.get_ident()}"
    claimed, temporary = Path(f"{stem}{CLAIMED_SUFFIX}"), Path(f"{stem}{WRITING_SUFFIX}")
    try:
        handle = _flocks.open_file(claimed, "wb")
        try:
            if fcntl is not None:
                # Held until the file is renamed into place: a ``.tmp`` file nobody
                # holds is the write of a process that ended (see clear_dead_writes).
                # Locked before it takes that name, so none is ever unlocked while it
                # is written. A child forked meanwhile (a DataLoader worker) lets go of
                # its copy of the lock (see _flocks), or it would keep a killed
                # trainer's partial checkpoint from being deleted while it lives.
                try:
                    flock_here(handle, fcntl.LOCK_EX)
                except BlockingIOError:  # pragma: no cover - a stale file's holder
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            os.replace(claimed, temporary)
            save(payload, handle)
            handle.flush()
            if modified_ns is not None:
                _set_modified(handle.fileno(), temporary, modified_ns)
            os.fsync(handle.fileno())
            _drop_from_page_cache(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
            if before_rename is not None:
                before_rename(handle.fileno())
            os.replace(temporary, target)
        finally:
            _flocks.close(handle)
    except BaseException:
        claimed.unlink(missing_ok=True)
        temporary.unlink(missing_ok=True)
        raise
    return size


_REALTIME_COARSE = 5  # Linux's CLOCK_REALTIME_COARSE (Python has no name for it)


def file_clock_ns() -> int:
    """Now, as the kernel stamps a file it writes now: Linux stamps modification times
    from its coarse clock (a few ms per tick), never later than this. A file written
    after this call never has an earlier time than what it returns."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            return time.clock_gettime_ns(_REALTIME_COARSE)
    return time.time_ns()


def _set_modified(fd: int, path: Path, modified_ns: int) -> None:
    """Give the file open at ``fd`` (at ``path``) the access and modification time
    ``modified_ns``; best effort."""
    with contextlib.suppress(OSError):
        if os.utime in os.supports_fd:
            os.utime(fd, ns=(modified_ns, modified_ns))
        else:  # pragma: no cover - no futimens
            os.utime(path, ns=(modified_ns, modified_ns))


WRITE_NICENESS = 10
"""How much lower than the caller's the background write's CPU priority is (the nice
value added to its thread; Linux only, where a thread has its own)."""


def run_below_training(work: Callable[[], None], name: str) -> None:
    """Run ``work`` on a new thread whose CPU priority is :data:`WRITE_NICENESS` below the
    caller's; return once it ended.

    Where cores are short (training plus another busy process), the scheduler then gives
    the write the CPU that training leaves: the write takes longer, training does not.
    When training waits (for a slot, for the GIL, at its next save) it sleeps, and the
    write gets the core. ``work`` must not raise: it reports its own outcome. If the
    wait is interrupted, the thread goes on and finishes ``work``.
    """
    thread = threading.Thread(target=_below, args=(work,), name=name, daemon=True)
    thread.start()
    thread.join()


def _below(work: Callable[[], None]) -> None:
    if sys.platform.startswith("linux"):  # elsewhere a thread id is no process id
        with contextlib.suppress(OSError):  # raising one's nice value is always allowed
            os.setpriority(
                os.PRIO_PROCESS,
                threading.get_native_id(),
                min(19, os.getpriority(os.PRIO_PROCESS, 0) + WRITE_NICENESS),
            )
    work()


class HostWrite:
    """The background write of one host snapshot (``async_write``); frees its slot once.

    Called on the intake thread, it writes the file (on a lower-priority thread, see
    :func:`run_below_training`) and gives the slot back. If the
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
        host: Archive,
        filepath: str,
        scratch: Path,
    ) -> None:
        self._snapshotter = snapshotter
        self._slot = slot
        self._host: Archive | None = host
        self._filepath = filepath
        self._scratch = scratch
        self._lock = threading.Lock()
        self._state: Literal["pending", "writing", "ran", "abandoned"] = "pending"
        self._done = threading.Event()
        # Set (under the lock) once the outcome is known; then() runs at once from then on.
        self._finished = False
        self._then: list[tuple[Callable[[], None], Callable[[], None] | None]] = []
        self.error: BaseException | None = None
        """Why the write failed (or was abandoned); None while pending and once written."""
        self._mark: Callable[[tuple[int, int, int]], None] | None = None
        self._first: list[Callable[[], None]] = []  # see before_start
        # The file's modification time: when Lightning saved it, as ModelCheckpoint's file
        # has (not when the write ended). Lightning's ckpt_path="last" takes the newest
        # last checkpoint of all checkpoint callbacks by this time.
        self._saved_at_ns = file_clock_ns()
        # Taken until the file exists (or the write failed): Lightning's version counter
        # must see the name now, on the training thread (see :func:`name_taken`).
        take_name(filepath)

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

    def then(self, action: Callable[[], None], otherwise: Callable[[], None] | None = None) -> None:
        """Run ``action`` once the file is written, ``otherwise`` if the write failed or
        was abandoned: on the thread that finishes the write, before it counts as done,
        or here and now if it finished already."""
        with self._lock:
            if not self._finished:
                self._then.append((action, otherwise))
                return
            written = self.error is None
        run_after_write(self._filepath, [(action, otherwise)], written)

    def before_start(self, action: Callable[[], None]) -> None:
        """Have ``action`` run before the write starts, whoever runs it: the intake thread,
        or the training thread that writes it at once (``on_exception``, a save kept from
        admission), outside the intake's order. Added before the write can run (at the
        save). For one: waiting until other callbacks' earlier saves of the same file (a
        name shared without a version counter) are staged, as their writes came first,
        so the file ends as the later save left it, as with ModelCheckpoint."""
        self._first.append(action)

    def mark_written_with(self, mark: Callable[[tuple[int, int, int]], None]) -> None:
        """Have ``mark`` told the identity of the complete file (see
        ``_jobs.file_identity``) before it is renamed into place: its job's journal notes
        it (``Outbox.mark_written``). Set before the write runs (when its job is journaled)."""
        self._mark = mark

    def _marked(self, fd: int) -> None:
        identity = file_identity(fd)
        if self._mark is None or identity is None:
            return
        try:
            self._mark(identity)
        except Exception:
            log.exception("noting that %s was written", self._filepath)

    def __call__(self) -> None:
        if self._first and self._state == "pending":
            for action in self._first:  # (a caller that finds it claimed meanwhile: no more)
                action()
        with self._lock:
            state = self._state
            if state == "pending":
                self._state = "writing"
        if state == "abandoned":
            raise RuntimeError(f"the snapshot of {self._filepath} was abandoned; not written")
        if state == "pending":
            # On a thread of its own, at a lower CPU priority than training (see
            # :func:`run_below_training`). It finishes what it started, slot and all,
            # even if this caller is interrupted (a Ctrl+C while it waits).
            run_below_training(self._write, name="lamin-lightning-write")
        else:  # run (or running) on another thread already: its outcome
            self._done.wait()
        if self.error is not None:
            raise self.error

    def _write(self) -> None:
        try:
            write_atomically(
                self._host,
                self._filepath,
                self._scratch,
                save_snapshot,
                self._marked,
                modified_ns=self._saved_at_ns,
            )
        except BaseException as error:
            self.error = error
        finally:
            self._host = None
            self._snapshotter.release(self._slot)
            release_name(self._filepath)
            self._finish()

    def _finish(self) -> None:
        """Run what waits for the outcome (``self.error`` is set), then count it done."""
        with self._lock:
            self._finished = True
            waiting, self._then = self._then, []
        run_after_write(self._filepath, waiting, self.error is None)
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
        release_name(self._filepath)
        self._finish()


def run_after_write(
    path: str,
    waiting: list[tuple[Callable[[], None], Callable[[], None] | None]],
    written: bool,
) -> None:
    """Run each ``(action, otherwise)`` pair for a write of ``path`` that finished: the
    action if it ``written`` its file, else the other; a failure of one is logged (the
    write's outcome is what it is)."""
    for action, otherwise in waiting:
        chosen = action if written else otherwise
        if chosen is None:
            continue
        try:
            chosen()
        except Exception:
            log.exception("after the write of %s", path)


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
        f" {_describe_checkpoint_io(strategy.checkpoint_io)}. Writing checkpoints"
        " synchronously."
    )


def _describe_checkpoint_io(io: Any) -> str:
    from lamin_lightning._checkpoint_io import describe

    return describe(io)


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
