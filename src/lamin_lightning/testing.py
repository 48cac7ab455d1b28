"""Test helpers: an in-memory store with fault injection, and a recording observer.

Use them to test your own observers and subclasses without a database::

    from lamin_lightning.testing import MemoryCheckpoint, MemoryStore, RecordingObserver
    from lamin_lightning import RetryPolicy

    store = MemoryStore()
    store.fail_next(2)                      # the next two storage calls fail transiently
    observer = RecordingObserver()
    callback = MemoryCheckpoint(store, dirpath=tmp_path, artifact_observers=[observer],
                                retry=RetryPolicy.no_delay())
    trainer = Trainer(callbacks=[callback], ...)
    trainer.fit(model)
    assert store.keys() == {...}

Faults apply to the store's storage calls (``put`` and ``delete``): transient
failures (``fail_next``, ``fail_randomly``), permanent failures (``fail_always``),
latency (``latency``), and hangs (``hang`` / ``release``); ``fail_commits`` makes
commits fail, ``reject_feature`` makes the store refuse one feature's values (left out
of every commit, live or replayed, and named by the saved event, as LaminDB's refused
values are).

``MemoryStore`` implements the store protocol (:mod:`lamin_lightning.store`) with one
commit path for live jobs and replays, like the LaminDB store: the contract suite runs
the same scenarios against both. It lives in one process: to replay a journal into
it, pass it to ``flush_directory(..., stores={"memory": store})``.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lamin_lightning._callback import ArtifactPublishingModelCheckpoint
from lamin_lightning._errors import PermanentError, UnknownStoreError
from lamin_lightning._events import (
    AnyArtifactEvent,
    ArtifactFailedEvent,
    ArtifactKind,
    ArtifactRemovedEvent,
    ArtifactSavedEvent,
)
from lamin_lightning._jobs import CheckpointSnapshot, JobRecord
from lamin_lightning._retry import is_testing, set_testing
from lamin_lightning._surface import note_persisted

__all__ = [
    "MemoryCheckpoint",
    "MemoryStore",
    "RecordingObserver",
    "StoredArtifact",
    "content_sha256",
    "is_testing",
    "local_instance",
    "no_retry_delays",
    "set_testing",
]


@contextmanager
def no_retry_delays() -> Iterator[None]:
    """Within the block, retries happen without backoff sleeps."""
    previous = is_testing()
    set_testing(True)
    try:
        yield
    finally:
        set_testing(previous)


@dataclass(frozen=True)
class StoredArtifact:
    """What the memory store holds for one key.

    Attributes:
        key: The artifact key.
        kind: ``checkpoint``, ``config`` or ``hparams``.
        sha256: Hash of the bytes read from the file when it was put.
        size: Number of bytes.
        version: 1 for the first put of a key, then counting up.
        feature_values: Values passed to the save.
        data: The bytes, if the store keeps them (``MemoryStore(keep_bytes=True)``;
            files only).
        files: For a folder (a sharded checkpoint), the relative paths of its files,
            sorted; empty for a file. ``sha256`` and ``size`` then cover the whole tree
            (see :func:`content_sha256`).
    """

    key: str
    kind: str
    sha256: str
    size: int
    version: int
    feature_values: dict[Any, Any] = field(default_factory=dict)
    data: bytes | None = None
    files: tuple[str, ...] = ()


class MemoryStore:
    """A thread-safe in-memory artifact store with fault injection.

    Args:
        keep_bytes: Keep the files' bytes (for small test files); by default
            only their hash and size are kept.
        latency: Seconds every storage call takes (simulated with a wait).
    """

    def __init__(self, *, keep_bytes: bool = False, latency: float = 0.0) -> None:
        self.keep_bytes = keep_bytes
        self.latency = latency
        self._init_sync()
        self._objects: dict[str, StoredArtifact] = {}
        self._versions: dict[str, int] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.failures_injected = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.history: list[tuple[str, str]] = []
        self._fail_next = 0
        self._transient_error: Callable[[], BaseException] = lambda: ConnectionError(
            "injected transient failure"
        )
        self._permanent_error: Callable[[], BaseException] | None = None
        self._fail_rate = 0.0
        self._rng = random.Random(0)
        self._fail_commits = 0
        self._rejected: set[str] = set()
        # What each key held after its last successful commit (restored by abandon()).
        self._committed: dict[str, StoredArtifact] = {}

    def _init_sync(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self._hanging = threading.Condition(self._lock)
        self._hung = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_released", "_hanging", "_transient_error", "_permanent_error"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_sync()
        self._transient_error = lambda: ConnectionError("injected transient failure")
        self._permanent_error = None

    # -- fault injection --------------------------------------------------------

    def fail_next(self, count: int, error: Callable[[], BaseException] | None = None) -> None:
        """Make the next ``count`` storage calls raise a transient error (ConnectionError)."""
        with self._lock:
            self._fail_next = count
            if error is not None:
                self._transient_error = error

    def fail_randomly(self, rate: float, *, seed: int = 0) -> None:
        """Make each storage call fail transiently with probability ``rate``."""
        with self._lock:
            self._fail_rate = rate
            self._rng = random.Random(seed)

    def fail_always(self, error: Callable[[], BaseException] | None = None) -> None:
        """Make every storage call raise a permanent error until :meth:`heal`."""
        with self._lock:
            self._permanent_error = error or (lambda: PermanentError("injected permanent failure"))

    def fail_commits(self, count: int) -> None:
        """Make the next ``count`` checkpoint commits raise a transient error (ConnectionError)."""
        with self._lock:
            self._fail_commits = count

    def reject_feature(self, name: str) -> None:
        """Make the store refuse the values of the feature ``name`` (as LaminDB refuses a
        value of another dtype, or of a feature deleted since a crash): each commit leaves
        them out and returns the name, for the saved event's ``unannotated_features``."""
        with self._lock:
            self._rejected.add(name)

    def heal(self) -> None:
        """Stop injecting failures."""
        with self._lock:
            self._fail_next = 0
            self._fail_rate = 0.0
            self._permanent_error = None
            self._fail_commits = 0
            self._rejected.clear()

    def hang(self) -> None:
        """Make storage calls block until :meth:`release`."""
        self._released.clear()

    def release(self) -> None:
        """Let blocked storage calls (and later ones) proceed."""
        self._released.set()

    def wait_until_hanging(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``count`` storage calls are blocked in :meth:`hang`."""
        with self._hanging:
            return self._hanging.wait_for(lambda: self._hung >= count, timeout)

    # -- storage calls ----------------------------------------------------------

    @contextmanager
    def _call(self, operation: str, key: str) -> Iterator[None]:
        with self._lock:
            self.calls += 1
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if not self._released.is_set():
                with self._hanging:
                    self._hung += 1
                    self._hanging.notify_all()
                self._released.wait()
                with self._hanging:
                    self._hung -= 1
            if self.latency:
                time.sleep(self.latency)
            with self._lock:
                error: BaseException | None = None
                if self._permanent_error is not None:
                    error = self._permanent_error()
                elif self._fail_next > 0:
                    self._fail_next -= 1
                    error = self._transient_error()
                elif self._fail_rate and self._rng.random() < self._fail_rate:
                    error = self._transient_error()
                if error is not None:
                    self.failures_injected += 1
                    raise error
            yield
            with self._lock:
                self.history.append((operation, key))
        finally:
            with self._lock:
                self.concurrent -= 1

    def put(
        self,
        key: str,
        path: str | Path,
        *,
        kind: str = "checkpoint",
        feature_values: dict[Any, Any] | None = None,
    ) -> StoredArtifact:
        """Store the file (or folder) at ``path`` under ``key``, streaming it; return the record."""
        with self._call("put", key):
            if Path(path).is_dir():
                return self._put_folder(key, Path(path), kind, feature_values)
            digest = hashlib.sha256()
            size = 0
            chunks: list[bytes] = []
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    if self.keep_bytes:
                        chunks.append(chunk)
            with self._lock:
                version = self._versions.get(key, 0) + 1
                self._versions[key] = version
                record = StoredArtifact(
                    key=key,
                    kind=kind,
                    sha256=digest.hexdigest(),
                    size=size,
                    version=version,
                    feature_values=dict(feature_values or {}),
                    data=b"".join(chunks) if self.keep_bytes else None,
                )
                self._objects[key] = record
            return record

    def _put_folder(
        self, key: str, path: Path, kind: str, feature_values: dict[Any, Any] | None
    ) -> StoredArtifact:
        files = _tree_files(path)
        size = sum((path / name).stat().st_size for name in files)
        with self._lock:
            version = self._versions.get(key, 0) + 1
            self._versions[key] = version
            record = StoredArtifact(
                key=key,
                kind=kind,
                sha256=content_sha256(path),
                size=size,
                version=version,
                feature_values=dict(feature_values or {}),
                files=tuple(files),
            )
            self._objects[key] = record
        return record

    def delete(self, key: str) -> StoredArtifact | None:
        """Delete what is stored under ``key``; return it, or None if nothing was.

        An upload newer than the key's committed version (a later save of the key in
        flight: transfers run ahead of commits) stays, as in LaminDB's store: only the
        committed version is removed, and that upload's commit makes it the key's."""
        with self._call("delete", key), self._lock:
            self.flags.pop(key, None)
            committed = self._committed.pop(key, None)
            current = self._objects.get(key)
            if (
                current is not None
                and committed is not None
                and current.version > committed.version
            ):
                return committed
            return self._objects.pop(key, None)

    # -- inspection ----------------------------------------------------------------

    def get(self, key: str) -> StoredArtifact | None:
        """The record under ``key``, or None."""
        with self._lock:
            return self._objects.get(key)

    def keys(self, kind: str | None = None) -> set[str]:
        """Stored keys, optionally only those of one kind."""
        with self._lock:
            return {k for k, v in self._objects.items() if kind is None or v.kind == kind}

    def set_flags(self, key: str, **values: Any) -> None:
        """Record order-dependent metadata (best, last, rank) for ``key``."""
        with self._lock:
            self.flags.setdefault(key, {}).update(values)

    # -- the store protocol: one path for live jobs and replays ---------------------

    def transfer(self, record: JobRecord, path: Path) -> StoredArtifact:
        """Put the file under ``record.key``, unless the same bytes are already stored there."""
        existing = self.get(record.key)
        if existing is not None and existing.sha256 == content_sha256(path):
            return existing
        return self.put(record.key, path, kind=record.kind)

    def commit(
        self, record: JobRecord, artifact: StoredArtifact, *, replay: bool, set_flags: bool
    ) -> tuple[str, ...]:
        """Commit a checkpoint: annotate its features, then set the flags of its prefix."""
        if record.kind != "checkpoint" or record.checkpoint is None:
            self._mark_committed(record.key, artifact)
            return ()
        return self.commit_checkpoint(
            record.checkpoint, artifact, replay=replay, set_flags=set_flags
        )

    def _mark_committed(self, key: str, artifact: StoredArtifact) -> None:
        """``artifact`` is the key's committed version now, even when a newer upload (not
        committed yet: transfers run ahead of commits) already holds the key; a failed
        commit of that upload then brings this one back."""
        with self._lock:
            current = self._objects.get(key)
            if current is not None and current.version == artifact.version:
                artifact = current  # with the features its commit annotated
            previous = self._committed.get(key)
            if previous is None or previous.version <= artifact.version:
                self._committed[key] = artifact

    def commit_checkpoint(
        self,
        snapshot: CheckpointSnapshot,
        artifact: StoredArtifact,
        *,
        replay: bool,
        set_flags: bool,
    ) -> tuple[str, ...]:
        """Annotate (a rejected feature left out, and its name returned, live or replayed),
        then make best/last/rank under the checkpoint's prefix equal the snapshot."""
        with self._lock:
            if self._fail_commits > 0:
                self._fail_commits -= 1
                self.failures_injected += 1
                raise ConnectionError("injected commit failure")
            rejected = sorted(set(snapshot.feature_values or {}) & self._rejected)
        values = {k: v for k, v in (snapshot.feature_values or {}).items() if k not in rejected}
        annotated = replace(artifact, feature_values=values)
        with self._lock:
            current = self._objects.get(snapshot.key)
            if current is not None and current.version == artifact.version:
                annotated = replace(current, feature_values=values)
                self._objects[snapshot.key] = annotated
        if set_flags:
            self._set_prefix_flags(snapshot)
        self._mark_committed(snapshot.key, annotated)
        return tuple(rejected)

    def _set_prefix_flags(self, snapshot: CheckpointSnapshot) -> None:
        prefix = _prefix(snapshot.key)
        ranks = {key: rank for rank, key in enumerate(snapshot.ranking)}
        stored = {k for k in self.keys(kind="checkpoint") if _prefix(k) == prefix}
        for key in stored | {snapshot.key}:
            self.set_flags(
                key,
                is_best_model=key == snapshot.best_key,
                is_last_model=key == snapshot.key,
                model_rank=ranks.get(key),
            )

    def remove(self, record: JobRecord, known: Any | None) -> tuple[Any, str] | None:
        """Delete what is stored under the key."""
        del known
        removed = self.delete(record.key)
        return (removed, self.storage_uri(removed)) if removed is not None else None

    def abandon(self, record: JobRecord, artifact: StoredArtifact) -> None:
        """Delete ``artifact`` if it is still what the key holds (a failed commit's upload)."""
        with self._lock:
            current = self._objects.get(record.key)
            if current is None or current.version != artifact.version:
                return
            del self._objects[record.key]
            self.flags.pop(record.key, None)
            previous = self._committed.get(record.key)
            if previous is not None:
                self._objects[record.key] = previous

    @staticmethod
    def storage_uri(artifact: StoredArtifact) -> str:
        """``memory://{key}?version={version}``."""
        return f"memory://{artifact.key}?version={artifact.version}"

    def finalize_thread(self) -> None:
        """Nothing per thread."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under ``folder``, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def content_sha256(path: str | Path) -> str:
    """What :class:`MemoryStore` records as ``sha256``: of a file, its bytes; of a folder,
    each file's relative path and sha256, in path order (equal trees hash equal)."""
    path = Path(path)
    if not path.is_dir():
        return _sha256(path)
    digest = hashlib.sha256(b"folder\0")
    for name in _tree_files(path):
        digest.update(f"{name}\0{_sha256(path / name)}\n".encode())
    return digest.hexdigest()


class MemoryCheckpoint(ArtifactPublishingModelCheckpoint):
    """An :class:`ArtifactPublishingModelCheckpoint` that persists into a :class:`MemoryStore`.

    Keys are ``{key_prefix}/{file name}`` for checkpoints and ``hparams.yaml``,
    and ``{file name}`` for configs. After each commit the store's ``flags`` hold
    ``is_best_model``, ``is_last_model`` and ``model_rank`` for every stored
    checkpoint, computed from the submission snapshot.

    Args:
        store: The store to persist into (a new one if omitted).
        key_prefix: Prefix of checkpoint keys.
        **kwargs: Passed to :class:`ArtifactPublishingModelCheckpoint`.
    """

    def __init__(
        self, store: MemoryStore | None = None, *, key_prefix: str = "checkpoints", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.store = store if store is not None else MemoryStore()
        self.key_prefix = key_prefix.rstrip("/")
        # Names a commit left out (rejected features), by id() of the artifact.
        self._left_out: dict[int, tuple[str, ...]] = {}

    def resolve_artifact_key(
        self, trainer: pl.Trainer, filepath: Path | str, kind: ArtifactKind
    ) -> str:
        """``{key_prefix}/{name}`` for checkpoints and hparams, ``{name}`` for configs."""
        name = Path(filepath).name
        return name if kind == "config" else f"{self.key_prefix}/{name}"

    def resolve_artifact_storage_uri(self, artifact: StoredArtifact) -> str:
        """``memory://{key}?version={version}``."""
        return self.store.storage_uri(artifact)

    def save_checkpoint_artifact(
        self,
        trainer: pl.Trainer,
        filepath: Path | str,
        *,
        feature_values: dict[Any, Any] | None = None,
    ) -> StoredArtifact:
        """Put the checkpoint into the store."""
        key = self.resolve_artifact_key(trainer=trainer, filepath=filepath, kind="checkpoint")
        return _noted(
            self.store.put(key, filepath, kind="checkpoint", feature_values=feature_values)
        )

    def save_config_artifact(self, trainer: pl.Trainer, config_path: Path | str) -> StoredArtifact:
        """Put the config into the store."""
        key = self.resolve_artifact_key(trainer=trainer, filepath=config_path, kind="config")
        return _noted(self.store.put(key, config_path, kind="config"))

    def save_hparams_artifact(
        self, trainer: pl.Trainer, hparams_path: Path | str
    ) -> StoredArtifact | None:
        """Put ``hparams.yaml`` into the store."""
        if not Path(hparams_path).exists():
            return None
        key = self.resolve_artifact_key(trainer=trainer, filepath=hparams_path, kind="hparams")
        return _noted(self.store.put(key, hparams_path, kind="hparams"))

    store_name = "memory"

    def replay_store(self) -> MemoryStore:
        """This callback's store: replays at ``setup`` go where the live jobs went."""
        return self.store

    def commit_checkpoint_artifact(
        self, trainer: pl.Trainer, snapshot: CheckpointSnapshot, artifact: StoredArtifact
    ) -> None:
        """The store's commit: annotate, then set best/last/rank flags under the prefix."""
        left_out = self.store.commit_checkpoint(snapshot, artifact, replay=False, set_flags=True)
        if left_out:  # for its saved event, taken by the pipeline (see Checkpoint)
            self._left_out[id(artifact)] = left_out

    def _left_out_of(self, artifact: Any) -> tuple[str, ...]:
        return self._left_out.pop(id(artifact), ())

    def remove_checkpoint_artifact(
        self, trainer: pl.Trainer, key: str, artifact: Any | None
    ) -> StoredArtifact | None:
        """Delete the key from the store."""
        return self.store.delete(key)

    def abandon_checkpoint_artifact(
        self, trainer: pl.Trainer, key: str, artifact: StoredArtifact
    ) -> None:
        """Delete an upload whose commit failed for good."""
        self.store.abandon(_removal(key), artifact)


def _noted(artifact: StoredArtifact) -> StoredArtifact:
    """``artifact``, noted as stored for the pipeline's job (an override raising after its
    ``super()`` call leaves it stored, see ``note_persisted``)."""
    note_persisted(artifact)
    return artifact


def _removal(key: str) -> JobRecord:
    return JobRecord(op="remove", kind="checkpoint", key=key, local_path="", store="memory")


def _prefix(key: str) -> str:
    return key.rsplit("/", 1)[0] if "/" in key else ""


def replay_store(record: JobRecord) -> MemoryStore:
    """The registry's factory for ``"memory"``: there is no store to find outside a process."""
    raise UnknownStoreError(
        f"{record.key!r} was journaled for a MemoryStore, which lives only in the process that"
        " made it; replay it with flush_directory(dirpath, stores={'memory': store})"
    )


class RecordingObserver:
    """An observer that records every event it receives, in order, thread-safely."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[AnyArtifactEvent] = []
        self.threads: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Observers travel with the callback when it is pickled or deep-copied
        # (ddp_spawn, LightningCLI); a Condition cannot.
        with self._cond:
            return {"events": list(self.events), "threads": set(self.threads)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._cond = threading.Condition()
        self.events = state["events"]
        self.threads = state["threads"]

    def _record(self, event: AnyArtifactEvent) -> None:
        with self._cond:
            self.events.append(event)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def on_artifact_saved(self, event: ArtifactSavedEvent) -> None:
        """Record a saved event."""
        self._record(event)

    def on_artifact_removed(self, event: ArtifactRemovedEvent) -> None:
        """Record a removed event."""
        self._record(event)

    def on_artifact_failed(self, event: ArtifactFailedEvent) -> None:
        """Record a failed event."""
        self._record(event)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` events arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events) >= count, timeout)

    def of_type(self, cls: type[Any]) -> list[Any]:
        """The events of one class, in order."""
        with self._cond:
            return [e for e in self.events if isinstance(e, cls)]

    def keys(self, cls: type[Any] | None = None) -> list[str]:
        """Keys of the events (of one class), in order."""
        with self._cond:
            return [e.key for e in self.events if cls is None or isinstance(e, cls)]


@contextmanager
def local_instance(root: str | Path | None = None) -> Iterator[Path]:
    """Create, connect and finally disconnect an isolated, offline, local LaminDB instance.

    The instance (SQLite database and storage) lives under ``root`` (a new
    temporary folder if omitted, deleted afterwards). LaminDB's settings and
    cache go to ``root/settings`` and ``root/cache`` unless ``LAMIN_SETTINGS_DIR``
    and ``LAMIN_CACHE_DIR`` are set; they must be set before lamindb is first
    imported, so use this helper before importing lamindb (or set them yourself).
    The instance never contacts LaminDB's hub. Yields the storage folder.

    Example (a pytest fixture)::

        @pytest.fixture(scope="session")
        def lamin(tmp_path_factory):
            with local_instance(tmp_path_factory.mktemp("lamin")) as storage:
                yield storage
    """
    import os
    import shutil
    import sys
    import tempfile

    owned = root is None
    base = Path(tempfile.mkdtemp(prefix="lamin-lightning-")) if root is None else Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for var, sub in (("LAMIN_SETTINGS_DIR", "settings"), ("LAMIN_CACHE_DIR", "cache")):
        if var not in os.environ:
            if "lamindb_setup" in sys.modules:
                raise RuntimeError(
                    f"{var} is not set and lamindb is already imported, so its settings would"
                    f" go to ~/.lamin; set {var} before importing lamindb"
                )
            os.environ[var] = str(base / sub)
    import lamindb_setup

    storage = base / "storage"
    # lamindb-setup writes a ".lamin/current_instance" marker into the working
    # directory; keep it inside ``base``, not in the caller's project.
    previous = os.getcwd()
    os.chdir(base)
    try:
        lamindb_setup.init(storage=str(storage))
    finally:
        os.chdir(previous)
    from lamin_lightning._lamin_features import ensure_offline_safe

    ensure_offline_safe()
    # Child processes (a DDP launch, `lamin-lightning flush`) find the instance this way.
    previous_slug = os.environ.get("LAMIN_CURRENT_INSTANCE")
    os.environ["LAMIN_CURRENT_INSTANCE"] = lamindb_setup.settings.instance.slug
    try:
        yield storage
    finally:
        if previous_slug is None:
            os.environ.pop("LAMIN_CURRENT_INSTANCE", None)
        else:
            os.environ["LAMIN_CURRENT_INSTANCE"] = previous_slug
        with suppress(Exception):
            lamindb_setup.disconnect()
        if owned:
            shutil.rmtree(base, ignore_errors=True)
