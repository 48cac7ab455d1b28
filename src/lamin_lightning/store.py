"""Where persisted files go: the store protocol and the registry replays choose from.

A store persists what a :class:`~lamin_lightning.JobRecord` describes. The pipeline
calls it from its own threads:

==================  ===========================================================
method              thread
==================  ===========================================================
``transfer``        a worker (up to ``max_workers`` at once, any order, retried)
``commit``          the committer (one thread, submission order, retried)
``remove``          the committer
``abandon``         the committer, after a job whose transfer worked failed for good
``storage_uri``     the committer
``finalize_thread`` each pipeline thread as it exits
==================  ===========================================================

The same methods run a live job and its replay after a crash: a commit is idempotent
(by key and content hash) and sets flags and ranks from the record, so a replay leaves
what an uninterrupted run leaves.

Replays outside training (``lamin-lightning flush``) find the store of a journaled
record by its name in a fixed registry: the shipped stores (``"lamindb"`` and
``"memory"``) and those that installed packages declare under the entry-point group
``lamin_lightning.stores`` (a callable taking the record and returning a store). A
journal never decides which code is imported.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lamin_lightning._errors import UnknownStoreError
from lamin_lightning._jobs import JobRecord

ENTRY_POINT_GROUP = "lamin_lightning.stores"

StoreFactory = Callable[[JobRecord], "ArtifactStore"]
"""Makes the store that replays ``record`` (called once per distinct store and context)."""


@runtime_checkable
class ArtifactStore(Protocol):
    """Persists the files jobs describe. Implementations must be thread-safe as tabled above."""

    def transfer(self, record: JobRecord, path: Path) -> Any:
        """Persist the bytes at ``path`` under ``record.key``; return the new artifact.

        Idempotent: if an artifact of this key and content is already committed, return
        it instead of creating another.
        """
        ...

    def commit(
        self, record: JobRecord, artifact: Any, *, replay: bool, set_flags: bool
    ) -> tuple[str, ...]:
        """Annotate ``artifact``, replace older artifacts of the key, set flags and ranks.

        Runs in submission order. ``set_flags`` is False for a replayed save that a
        newer committed save already outranks. Returns the names of features that
        could not be annotated (a replay keeps the artifact and reports them; a live
        commit raises instead).
        """
        ...

    def remove(self, record: JobRecord, known: Any | None) -> Any | None:
        """Delete what is stored under ``record.key`` (``known``: what this process saved)."""
        ...

    def abandon(self, record: JobRecord, artifact: Any) -> None:
        """Delete ``artifact``, transferred by a job that then failed for good."""
        ...

    def storage_uri(self, artifact: Any) -> str:
        """Where ``artifact``'s bytes live."""
        ...

    def finalize_thread(self) -> None:
        """Release per-thread resources (database connections) of the calling thread."""
        ...


_BUILTIN: dict[str, str] = {
    "lamindb": "lamin_lightning._lamin_store:replay_store",
    "memory": "lamin_lightning.testing:replay_store",
}
_registered: dict[str, StoreFactory] = {}
_lock = threading.Lock()


def register_store(name: str, factory: StoreFactory) -> None:
    """Register (or replace) the factory of the store named ``name``, for this process."""
    if not name or ":" in name:
        raise ValueError(f"a store name must be non-empty and contain no ':', got {name!r}")
    with _lock:
        _registered[name] = factory


def _factory(name: str) -> StoreFactory:
    with _lock:
        factory = _registered.get(name)
    if factory is not None:
        return factory
    target = _BUILTIN.get(name)
    if target is None:
        declared = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not declared:
            raise UnknownStoreError(
                f"the outbox names the store {name!r}, which no installed package registers"
                f" (known: {', '.join(sorted({*_BUILTIN, *_registered}))}). Install the package"
                f" that provides it (entry-point group {ENTRY_POINT_GROUP!r}) and flush again."
            )
        loaded: StoreFactory = declared[0].load()
        return loaded
    module_name, _, attr = target.partition(":")
    builtin: StoreFactory = getattr(importlib.import_module(module_name), attr)
    return builtin


class StoreLookup(Protocol):
    """The store to replay ``record`` of the journal ``journal`` into."""

    def __call__(self, record: JobRecord, journal: Path | None = None) -> ArtifactStore: ...


class StoreResolver:
    """Finds the store of each record, making one store per (name, context), and with
    ``per_journal`` per journal too.

    ``per_journal`` (``lamin-lightning flush``, a callback's replay at ``setup``): each
    journal is one callback's, and its replay gets a store of its own, as the callback
    had. Stores of several callbacks committing under one folder take turns at its flags
    as in training (see ``LaminStore._apply_flags``); one store for all of them would
    flag the best of the callback whose save commits last, not the last save that was
    its callback's best. ``own``: the journal the ``overrides`` replay (a callback's
    own); the others get a store of their own, from ``make`` where it names the store
    (the callback's kind of store), else from the registry.
    """

    def __init__(
        self,
        overrides: Mapping[str, ArtifactStore] | None = None,
        *,
        per_journal: bool = False,
        own: Path | None = None,
        make: Mapping[str, Callable[[], ArtifactStore]] | None = None,
    ) -> None:
        self._overrides = dict(overrides or {})
        self._per_journal = per_journal
        self._own = own
        self._make = dict(make or {})
        self._made: dict[tuple[str, str, str], ArtifactStore] = {}

    def __call__(self, record: JobRecord, journal: Path | None = None) -> ArtifactStore:
        override = self._overrides.get(record.store)
        if override is not None and (self._own is None or journal is None or journal == self._own):
            return override
        where = str(journal) if self._per_journal and journal is not None else ""
        ident = (record.store, repr(sorted(record.context.items())), where)
        store = self._made.get(ident)
        if store is None:
            make = self._make.get(record.store)
            store = self._made[ident] = (
                make() if make is not None else _factory(record.store)(record)
            )
        return store

    def stores(self) -> list[ArtifactStore]:
        """Every store used so far."""
        return [*self._overrides.values(), *self._made.values()]

    def finalize_thread(self) -> None:
        """Run every store's per-thread finalizer (on a pipeline thread as it exits)."""
        for store in self.stores():
            store.finalize_thread()
