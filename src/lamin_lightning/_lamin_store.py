"""The LaminDB store: one transfer, commit and removal path for live jobs and replays.

Worker threads create artifacts (hash and copy into storage, one record each); the
committer thread, in submission order, annotates features, replaces older artifacts
of the key (only once the new one is committed), and makes ``is_best_model`` /
``is_last_model`` / ``model_rank`` under the checkpoint's prefix equal the record's
snapshot. Flags and ranks are applied as a diff against what is stored, with bulk
queries, so a commit costs the same number of queries whether 5 or 500 checkpoints
are stored under the prefix. Each prefix keeps its own state: committing under one
never touches another's flags. That state is shared by every store of the process
(several callbacks in one folder), and written under one process-wide lock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from lamin_lightning import _owners
from lamin_lightning._errors import LaminSetupError, TransientError
from lamin_lightning._jobs import CheckpointSnapshot, JobRecord, RecordRef, next_sequence
from lamin_lightning._lamin_features import (
    DESCRIPTIONS,
    FLAG_FEATURES,
    _ln,
    discover_auto,
    require_instance,
)
from lamin_lightning._retry import RetryPolicy

log = logging.getLogger("lamin_lightning")


class ArtifactPublisher(Protocol):
    """How a :class:`Checkpoint` creates artifacts and names their storage location.

    The same protocol as the reference's; assign an implementation to
    ``checkpoint._artifact_publisher`` to persist elsewhere. ``create_artifact`` is
    called on worker threads and must be thread-safe.
    """

    def create_artifact(
        self,
        local_path: Path | str,
        *,
        key: str,
        description: str,
        kind: str | None = None,
        key_is_virtual: bool = True,
        add_as_input_to_run: bool = False,
        skip_hash_lookup: bool = False,
    ) -> Any:
        """Persist ``local_path`` under ``key``; return the artifact."""
        ...

    def storage_uri(self, artifact: Any) -> str:
        """Where ``artifact``'s bytes live."""
        ...


class LaminArtifactPublisher:
    """The default publisher: a ``lamindb.Artifact`` per file."""

    def create_artifact(
        self,
        local_path: Path | str,
        *,
        key: str,
        description: str,
        kind: str | None = None,
        key_is_virtual: bool = True,
        add_as_input_to_run: bool = False,
        skip_hash_lookup: bool = False,
        run: Any = None,
    ) -> Any:
        """Create and save the artifact; record it as a run input if asked."""
        ln = _ln()
        kwargs: dict[str, Any] = {
            "key": key,
            "description": description,
            "key_is_virtual": key_is_virtual,
        }
        if kind is not None:
            kwargs["kind"] = kind
        if add_as_input_to_run:
            kwargs["run"] = False
        elif run is not None:
            kwargs["run"] = run
        if skip_hash_lookup:
            kwargs["skip_hash_lookup"] = True
        with outside_storage(local_path) as source:
            artifact = ln.Artifact(source, **kwargs, **_own_store(source)).save()
        if add_as_input_to_run:
            from lamindb.models._lineage import track_run_inputs

            track_run_inputs(artifact, is_run_input=run if run is not None else True)
        return artifact

    def storage_uri(self, artifact: Any) -> str:
        """``str(artifact.path)``."""
        return str(artifact.path)


@dataclass(frozen=True)
class Removal:
    """What a removal will delete (:meth:`LaminStore.find_removal`).

    Attributes:
        key: The evicted key.
        candidates: The artifacts to delete.
        named: (artifact, storage URI) for the removal's event: the last candidate.
        commits: How many saves of the key the store had committed when it was found.
    """

    key: str
    candidates: tuple[Any, ...]
    named: tuple[Any, str]
    commits: int = 0


class _PrefixFlags:
    """What the stores of this process know of the flags under one prefix of an instance.

    One per (instance, prefix), shared by every store that commits under the prefix
    (several callbacks writing to one folder): each sees the others' writes, and
    none works from a stale copy. Read and written under :data:`_FLAGS_LOCK` only.

    Attributes:
        stores: The stores that use it (since their last ``reset``).
        latest: (sequence, key, ranking, best key) of the last save committed under the
            prefix, by submission order (:attr:`CheckpointSnapshot.sequence`).
        best: (sequence, key) of the last save committed that was its callback's best.
        Both count the saves a crashed process committed, as a replay tells them
        (:attr:`CheckpointSnapshot.committed`).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stores: weakref.WeakSet[LaminStore] = weakref.WeakSet()
        self.latest: tuple[int, str, tuple[str, ...], str | None] | None = None
        self.best: tuple[int, str] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget what was read: the next :meth:`load` reads the flags afresh."""
        self.loaded = False
        self.key_to_id: dict[str, int] = {}
        self.state: dict[int, dict[str, Any]] = {}

    def load(self, ln: Any, auto: Mapping[str, Any], exclude_ids: list[int]) -> None:
        """Every committed checkpoint under the prefix and its flags (two queries, once)."""
        if self.loaded:
            return
        self.loaded = True
        rows = ln.Artifact.filter(key__startswith=self.prefix + "/", kind="model")
        if exclude_ids:
            rows = rows.exclude(id__in=exclude_ids)
        for artifact_id, key in rows.order_by("id").values_list("id", "key"):
            self.key_to_id[key] = artifact_id  # the newest artifact of a key wins
        feature_ids = {auto[n].id: n for n in FLAG_FEATURES if n in auto}
        if not feature_ids or not self.key_to_id:
            return
        links = ln.models.ArtifactJsonValue.filter(
            artifact_id__in=list(self.key_to_id.values()),
            jsonvalue__feature_id__in=list(feature_ids),
        ).values_list("artifact_id", "jsonvalue__feature_id", "jsonvalue__value")
        for artifact_id, feature_id, value in links:
            self.state.setdefault(artifact_id, {})[feature_ids[feature_id]] = value

    def forget(self, key: str, only: Collection[int] | None = None) -> None:
        """Forget ``key``'s artifact (``only``: if it is one of these ids)."""
        if only is not None and self.key_to_id.get(key) not in only:
            return
        artifact_id = self.key_to_id.pop(key, None)
        if artifact_id is not None:
            self.state.pop(artifact_id, None)


class LaminStore:
    """Persists job records as LaminDB artifacts: the ``"lamindb"`` store.

    Args:
        publisher: Returns the publisher to create artifacts with (looked up at each
            call: a Checkpoint's ``_artifact_publisher`` may be replaced by the user).
        retry: Tells transient errors (retried by the pipeline) from permanent ones.
    """

    name = "lamindb"

    def __init__(
        self,
        *,
        publisher: Callable[[], ArtifactPublisher] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        _quiet_on_pipeline_threads()
        default = LaminArtifactPublisher()
        self._publisher = publisher if publisher is not None else (lambda: default)
        self._retry = retry if retry is not None else RetryPolicy()
        self._lock = threading.Lock()
        # Artifacts our workers are saving and the committer has not committed, by id().
        self._uncommitted: dict[int, Any] = {}
        self._reused: set[int] = set()  # of those, committed ones a transfer found again
        # committed artifact's pk -> (key, the older artifacts it replaced), to delete
        # before its event is delivered (see commit_checkpoint's defer_replaced).
        self._replaced: dict[int, tuple[str, list[Any]]] = {}
        # Per key: saves a publisher of the user's is making now (its rows exist before
        # they are known here, see create).
        self._publishing: dict[str, int] = {}
        # Per key: how many saves this store committed, and the artifact of the last one.
        self._committed: dict[str, tuple[int, Any]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget what was read from the database (at each ``setup``: it may have changed)."""
        with _FLAGS_LOCK:
            for flags in getattr(self, "_flags", {}).values():
                flags.stores.discard(self)
                flags.reset()
        self._flags: dict[str, _PrefixFlags] = {}
        self._instance: str | None = None
        self._auto: dict[str, Any] | None = None
        self._value_ids: dict[tuple[int, Any], int] = {}
        self._runs: dict[str, Any] = {}
        # (run uid, values) a replay recorded (see _add_missing_run_values)
        self._run_values_done: set[tuple[str, str]] = set()
        self._storages: dict[str, Any] = {}
        # Features a non-finite value was left out of and warned of (see _annotate).
        self._non_finite_told: set[str] = set()
        # (host type, feature) LaminDB refused a value of, warned of (see
        # add_values_keeping_valid).
        self._refused_told: set[tuple[str, str]] = set()

    # -- worker threads ----------------------------------------------------------------------

    def create(
        self,
        path: Path | str,
        *,
        key: str,
        kind: str,
        run: Any,
        key_is_virtual: bool,
        stats: dict[str, Any] | None = None,
        storage: Any = None,
    ) -> Any:
        """Hash and copy ``path`` into storage and save its artifact record (no lookup by hash).

        ``stats``: lamindb's size and hash of ``path`` (:func:`lamin_stats`), if the caller
        computed them already: lamindb then does not read the file again to hash it.
        """
        immediate_transactions()
        description, lamin_kind = DESCRIPTIONS[kind]
        publisher = self._publisher()
        if type(publisher) is not LaminArtifactPublisher:
            return self._publish(
                publisher,
                path,
                key=key,
                description=description,
                kind=lamin_kind,
                key_is_virtual=key_is_virtual,
                add_as_input_to_run=run is False,
                skip_hash_lookup=True,
            )
        with outside_storage(path) as source:
            artifact = _ln().Artifact(
                source,
                key=key,
                description=description,
                kind=lamin_kind,
                run=run,
                key_is_virtual=key_is_virtual,
                skip_hash_lookup=True,
                **_own_store(source),
                **_given_stats(stats),
                **({"storage": storage} if storage is not None else {}),
            )
            # Registered before the record exists, so that a commit replacing an older
            # artifact of this key never mistakes this newer, uncommitted one for it. By
            # object, not uid: concurrent new versions of one key get the same provisional
            # uid, and lamindb may change the uid during save().
            with self._lock:
                self._uncommitted[id(artifact)] = artifact
            share_storage_filesystem()
            try:
                with _uploading(key, getattr(artifact, "hash", None)):
                    artifact.save(**_upload_options(Path(source)))
            except (FileNotFoundError, PermissionError) as error:
                self.settle(artifact)
                raise _naming_storage(error, artifact, path) from error
            except BaseException:
                self.settle(artifact)
                raise
        return artifact

    def _publish(self, publisher: ArtifactPublisher, path: Path | str, **options: Any) -> Any:
        """``publisher.create_artifact``, counted as a save of its key in flight until its
        artifact is known to be uncommitted (see :meth:`_saving_elsewhere`): its record
        exists before it returns, and a commit that replaces newer artifacts of the key
        (a reused one's) must not take it for a committed one."""
        key = options["key"]
        with _key_lock(key), self._lock:  # against such a commit's choice of what to delete
            self._publishing[key] = self._publishing.get(key, 0) + 1
        artifact = None
        try:
            artifact = publisher.create_artifact(path, **options)
        finally:
            with self._lock:
                if artifact is not None:
                    self._uncommitted[id(artifact)] = artifact
                left = self._publishing[key] - 1
                if left:
                    self._publishing[key] = left
                else:
                    del self._publishing[key]
        return artifact

    def _saving_elsewhere(self, key: str) -> bool:
        """Whether a publisher of the user's is saving an artifact of ``key`` now."""
        with self._lock:
            return key in self._publishing

    def transfer(self, record: JobRecord, path: Path) -> Any:
        """The committed artifact of this key and content if there is one, else a new one.

        A database integrity error (a version of this key committed or replaced by the
        committer while this worker saved the next one) is retried: the next attempt
        looks the key up afresh.
        """
        immediate_transactions()
        try:
            return self._transfer(record, path)
        except Exception as error:
            # DoesNotExist: lamindb met a row of this key and content on insert, and the
            # committer deleted it (an older version) before lamindb could read it back.
            if type(error).__name__ in ("IntegrityError", "DoesNotExist"):
                raise TransientError(f"{type(error).__name__}: {error}") from error
            raise

    def _committed_to_reuse(
        self, key: str, digest: str, *, replay: bool = True, storage: Any = None
    ) -> Any | None:
        """The committed artifact of ``key`` with this content, marked in flight; or None.

        Reused (a replay of a save committed before a crash, or the same bytes saved
        again, by a rerun of a seeded training): in flight until its commit, so that the
        commit of an earlier job of this key does not delete it as an older version
        meanwhile. Looked up and marked under the key's lock, which the committer holds
        while it picks and deletes old versions: it cannot delete what was just found.
        Without this look-up lamindb found the same row itself, on insert, and the
        committer could delete it meanwhile (fits failed, FOREIGN KEY or DoesNotExist).

        Only in the storage location the save goes to (``storage``, else the default):
        one in another location (the user switched ``ln.settings.storage`` since) is an
        older version of the key, which the commit replaces, as the reference's save
        replaces it with an artifact in the new location.
        """
        storage_id = getattr(storage, "id", None) if storage is not None else _default_storage_id()
        where: dict[str, Any] = {"key": key, "hash": digest}
        if storage_id is not None:
            where["storage_id"] = storage_id
        # One filter call: with the hash in it, LaminDB looks in every branch (the trash
        # too); a second .filter() would add its default branch filter back.
        query = _ln().Artifact.filter(**where)
        if replay:
            # A worker of this process may still be uploading it: a teardown gave up on
            # it (flush_timeout), and its thread goes on. Its record is then incomplete, as
            # one a crash cut short, but dropping it under the upload left the upload's
            # file in storage with no record. Once it is done, it is reused (or it failed,
            # and lamindb deleted its record).
            _wait_for_upload_here(key, digest)
        with _key_lock(key):
            existing = query.order_by("-id").first()
            if existing is not None and getattr(existing, "_storage_ongoing", False):
                # lamindb saves the record, uploads, then marks it complete: this one's
                # upload is not complete. A replay's is cut short (the process died):
                # reusing it would commit a record whose file is missing or partial; it
                # goes, and the file is uploaded afresh. A live save leaves it alone (it
                # may be another writer's upload still going).
                if replay:
                    _drop_interrupted(existing)
                existing = None
            if existing is not None:
                _out_of_the_trash(existing)
                with self._lock:
                    self._uncommitted[id(existing)] = existing
                    self._reused.add(id(existing))
            return existing

    def create_or_reuse(
        self, path: Path | str, *, key: str, kind: str, run: Any, key_is_virtual: bool
    ) -> Any:
        """:meth:`create`, or the committed artifact of ``key`` with the same content.

        With a publisher of the user's, always :meth:`create` (it is called for each
        save, as the reference calls it); also where lamindb hashes no file.
        """
        immediate_transactions()
        if type(self._publisher()) is not LaminArtifactPublisher or not stats_accepted():
            # A publisher of the user's; or lamindb takes no precomputed hash (the user
            # turned its hashing off, or an older lamindb): no second reading of the file.
            return self.create(path, key=key, kind=kind, run=run, key_is_virtual=key_is_virtual)
        stats = lamin_stats(Path(path))
        existing = self._committed_to_reuse(key, stats["hash"], replay=False)
        if existing is not None:
            return existing
        return self.create(
            path, key=key, kind=kind, run=run, key_is_virtual=key_is_virtual, stats=stats
        )

    def holds_newer_save(self, record: JobRecord, path: Path) -> bool:
        """For a replayed save of ``path`` (its staged copy): whether its key's committed
        artifacts already hold a newer file. That is so when the folder's file under the
        key's name is no longer the replay's (Lightning rewrote it since: ``last.ckpt``)
        and an artifact of the key holds that newer file: a later save was committed, by
        this run after the replayed one failed, or by a later run (one with
        ``outbox=False``, LaminDB's own callback, one that ran while a flush did).
        Replayed, the older file would replace it."""
        local = record.local_path
        if record.op != "save" or not local or os.path.isdir(path):
            return False
        try:
            if os.path.samefile(path, local):
                return False
            if not os.path.isfile(local):
                return False
        except OSError:  # the folder's file is gone: nothing tells which is newer
            return False
        current = lamin_stats(Path(local))["hash"]
        _check_instance(record)
        with _key_lock(record.key):
            with self._lock:
                in_flight = [a.id for a in self._uncommitted.values() if a.id is not None]
            query = _ln().Artifact.filter(key=record.key, hash=current)
            if in_flight:
                query = query.exclude(id__in=in_flight)
            if not query.exists():
                return False
        # Only now the replay's own file, read once more by its transfer otherwise: the
        # same bytes are a save committed before the crash, which the replay reuses.
        return bool(current != lamin_stats(path)["hash"])

    def _transfer(self, record: JobRecord, path: Path) -> Any:
        _check_instance(record)
        stats = lamin_stats(path)
        storage = self._storage_of(record)
        existing = self._committed_to_reuse(record.key, stats["hash"], storage=storage)
        if existing is not None:
            return existing
        run = self._run_of(record.context)
        artifact = self.create(
            path,
            key=record.key,
            kind=record.kind,
            run=False if record.kind == "config" else run,
            key_is_virtual=bool(record.context.get("key_is_virtual", True)),
            stats=stats,
            storage=storage,
        )
        if record.kind == "config" and run is not None:
            from lamindb.models._lineage import track_run_inputs

            track_run_inputs(artifact, is_run_input=run)
        return artifact

    def _storage_of(self, record: JobRecord) -> Any:
        """The storage location the job's run stored into (its default at setup), where
        that is not this process's default: None for the default, and for records
        written before the location was recorded."""
        root = record.context.get("storage")
        if not isinstance(root, str) or not root:
            return None
        ln = _ln()
        if root.rstrip("/") == ln.setup.settings.storage.root_as_str.rstrip("/"):
            return None
        with self._lock:
            if root in self._storages:
                return self._storages[root]
        storage = ln.Storage.filter(root=root).one_or_none()
        if storage is None and root.endswith("/"):
            storage = ln.Storage.filter(root=root.rstrip("/")).one_or_none()
        if storage is None:
            raise LaminSetupError(
                f"the outbox entry for {record.key!r} was to be stored in {root!r}, a"
                f" storage location instance {ln.setup.settings.instance.slug!r} does not"
                " have; register it (`ln.Storage(root=...).save()`) and flush again"
            )
        with self._lock:
            self._storages[root] = storage
        return storage

    def _run_of(self, context: Mapping[str, Any]) -> Any:
        uid = context.get("run_uid")
        if not uid:
            return None
        with self._lock:
            if uid in self._runs:
                return self._runs[uid]
        run = _ln().Run.filter(uid=uid).one_or_none()
        with self._lock:
            self._runs[uid] = run
        return run

    # -- committer thread --------------------------------------------------------------------

    def reread_flags(self) -> None:
        """Read the flags afresh at the next commit (an artifact's annotations were
        replaced outside of the flag writes)."""
        with _FLAGS_LOCK:
            for flags in self._flags.values():
                flags.reset()

    def found_again(self, artifact: Any) -> bool:
        """Whether ``artifact`` is a committed one a transfer found again by its content."""
        with self._lock:
            return id(artifact) in self._reused

    def settle(self, artifact: Any) -> None:
        """``artifact`` is committed (or gone): stop excluding it from queries."""
        with self._lock:
            self._uncommitted.pop(id(artifact), None)
            self._reused.discard(id(artifact))

    def commit(
        self,
        record: JobRecord,
        artifact: Any,
        *,
        replay: bool,
        set_flags: bool,
        defer_replaced: bool = False,
    ) -> tuple[str, ...]:
        """Commit a transferred artifact (checkpoints: features, replacement, flags).

        ``defer_replaced``: see :meth:`commit_checkpoint` (a pipeline's commit, which
        calls :meth:`delete_replaced` before the event is delivered)."""
        immediate_transactions()
        if record.kind != "checkpoint" or record.checkpoint is None:
            self.settle(artifact)
            return ()
        return self.commit_checkpoint(
            record.checkpoint,
            artifact,
            replay=replay,
            set_flags=set_flags,
            run=self._run_of(record.context),
            defer_replaced=defer_replaced,
        )

    def _add_missing_run_values(self, ln: Any, run: Any, snapshot: CheckpointSnapshot) -> None:
        """A replay: record on ``run`` the run-level values its fit journaled
        (:attr:`CheckpointSnapshot.run_features`), as its live commit would have.
        The live commit records them from memory at the fit's first commit, which Ctrl+C
        or a kill may have prevented; the reference records them at its first save.
        Each callback records its own, whatever the run has already (two callbacks of a
        fit, or a callback of a later fit under the same run: their ``mode``, their
        ``monitor``, another ``max_steps``): a value the run has is not added twice (a
        value and its link to the run are each one row). Values LaminDB refuses are left
        out with a warning, as by the live commit. Once per run, set of values and store."""
        done = (str(run.uid), repr(snapshot.run_features))
        with self._lock:
            if done in self._run_values_done:
                return
        # The values the run has, by feature name (for a value LaminDB's lookup of an
        # equal one might miss: a mapping).
        present = {
            (name, _canonical(value))
            for name, value in ln.models.RunJsonValue.filter(run_id=run.id).values_list(
                "jsonvalue__feature__name", "jsonvalue__value"
            )
        }
        auto = self._auto_features(ln)
        values: dict[Any, Any] = {}
        for name, value, is_auto in snapshot.run_features:
            if value is None or (name, _canonical(value)) in present:
                continue
            try:
                value = _resolve_records(value)
            except LookupError as error:
                log.warning("run %s: run feature %r is left out: %s", run.uid, name, error)
                continue
            target = auto.get(name) if is_auto else name
            if target is not None:
                values[target] = value
        if values:
            self.add_values_keeping_valid(run, values, where=f"run {run.uid}")
        with self._lock:
            self._run_values_done.add(done)

    def add_values_keeping_valid(
        self, host: Any, values: Mapping[Any, Any], *, where: str
    ) -> tuple[str, ...]:
        """``host.features.add_values(values)`` (an artifact's or a run's), keeping what
        LaminDB accepts: where it refuses the call for good (a value of another dtype than
        its feature's, a categorical value not in its registry), each value is added on its
        own, and each refused one is left out with a warning that names the feature, its
        dtype, the value and the fix (once per feature and fit: :meth:`reset`). The
        reference raises out of ``fit`` instead, with that save's or run's other values
        unrecorded. Returns the names left out; a transient error is raised, to be retried
        (``add_values`` is idempotent)."""
        try:
            host.features.add_values(dict(values))
            return ()
        except Exception as error:
            if self._retry.is_transient(error):
                raise
        refused: list[str] = []
        for target, value in values.items():
            try:
                host.features.add_values({target: value})
            except Exception as error:
                if self._retry.is_transient(error):
                    raise
                name = str(getattr(target, "name", target))
                refused.append(name)
                told = (type(host).__name__, name)  # a run's and an artifact's apart
                first = told not in self._refused_told
                self._refused_told.add(told)
                dtype = _dtype_of(target)
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%s: the value %r of feature %r (dtype %s) is left out: LaminDB refused"
                    " it (%s: %s); the other values are recorded%s. To record it, give it"
                    " a value of dtype %s (cast the hparam, metric or value you pass), or"
                    " record it under a feature whose dtype fits the value",
                    where,
                    value,
                    name,
                    dtype,
                    type(error).__name__,
                    # its first line: LaminDB's validation report that follows repeats it
                    next(iter(str(error).splitlines()), "").rstrip(" {"),
                    " (refusals at later saves of this fit are logged at DEBUG)" if first else "",
                    dtype,
                )
        return tuple(refused)

    def commit_checkpoint(
        self,
        snapshot: CheckpointSnapshot,
        artifact: Any,
        *,
        replay: bool,
        set_flags: bool,
        run: Any = None,
        defer_replaced: bool = False,
    ) -> tuple[str, ...]:
        """Annotate, replace older artifacts of the key, then set flags and ranks.

        ``defer_replaced``: the older artifacts of the key are deleted by
        :meth:`delete_replaced` (a pipeline's commit), once the earlier saves' events
        were delivered and before this one's: an earlier save's event names an artifact
        that still exists, as the reference's observers find it.

        A value LaminDB refuses for good is left out, live or replayed: the artifact is
        kept with every value that validates, and the names of the others are returned
        (see :meth:`add_values_keeping_valid`).

        ``run``: the run of the save (None: LaminDB's current run, as for a new
        artifact). A committed artifact found again by its content (see
        :meth:`_committed_to_reuse`) is moved to it.
        """
        immediate_transactions()
        ln = _ln()
        if replay and run is not None and snapshot.run_features:
            self._add_missing_run_values(ln, run, snapshot)
        unannotated = self._annotate(
            ln, snapshot, artifact, replay=replay, found_again=self.found_again(artifact), run=run
        )
        # Only now that the new artifact is committed, remove what it replaces.
        prefix = _prefix(snapshot.key)
        with self._lock:
            # Marked until settled below: a commit that fails (or is tried again) must still
            # know the artifact was committed before, and not delete it (abandon_artifact).
            reused = id(artifact) in self._reused
        # Commits run in submission order: a reused (older) artifact replaces every other
        # committed one of its key, newer rows included; a new one only older rows. Not
        # the newer rows while a publisher of the user's saves one of the key: its row may
        # be among them, not known yet (the later save's commit replaces the rest).
        with _key_lock(snapshot.key):
            newer_too = reused and not self._saving_elsewhere(snapshot.key)
            replaced = self.others_under_key(
                snapshot.key, exclude_id=artifact.id, older_only=not newer_too
            )
            for old in replaced:
                self._forget_flags(snapshot.key)
                if not defer_replaced:
                    delete_artifact(old, keep_path=str(artifact.path))
        if defer_replaced and replaced:
            with self._lock:
                self._replaced[artifact.pk] = (snapshot.key, replaced)
        if set_flags:
            self._apply_flags(ln, prefix, snapshot, artifact)
        with self._lock:
            self._committed[snapshot.key] = (
                self._committed.get(snapshot.key, (0, None))[0] + 1,
                artifact.id,
            )
        self.settle(artifact)
        return unannotated

    def _annotate(
        self,
        ln: Any,
        snapshot: CheckpointSnapshot,
        artifact: Any,
        *,
        replay: bool,
        found_again: bool = False,
        run: Any = None,
    ) -> tuple[str, ...]:
        auto = self._auto_features(ln)
        plain: dict[Any, Any] = {}
        values: Mapping[Any, Any] = snapshot.feature_values or {}
        for feature, value in values.items():
            # By name (as journaled), or a feature object from a caller's own snapshot.
            name = feature if isinstance(feature, str) else str(getattr(feature, "name", feature))
            if name in FLAG_FEATURES or value is None:
                continue  # flags are written by _apply_flags, from the snapshot
            try:  # a replay's records are looked up again
                value = _resolve_records(value)
            except LookupError as error:
                log.warning("%r: feature %r is left out: %s", snapshot.key, name, error)
                continue
            if isinstance(value, float) and not math.isfinite(value):
                # JSON has no NaN or infinity (lamindb refuses them): the checkpoint
                # persists without this value. Lightning ranks a NaN score as the worst
                # and keeps it as current_score, so every later last.ckpt carries it too:
                # warned once per feature and fit (setup resets), not at every save.
                first = name not in self._non_finite_told
                self._non_finite_told.add(name)
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%r: feature %r is %s, which lamindb cannot store; left out%s",
                    snapshot.key,
                    name,
                    value,
                    " (from later checkpoints of this fit too, without another warning)"
                    if first
                    else "",
                )
                continue
            if not isinstance(feature, str):
                target: Any = feature
            else:
                target = auto.get(name) if name in snapshot.auto_features else name
            if target is not None:
                plain[target] = value
        if found_again:
            # The reference deletes the key's artifact and creates a new one for each save;
            # LaminDB refuses a second row of one key and content, so the committed one
            # stands for this save: its run and only this save's values (not the earlier
            # save's beside them), in one transaction with the new values.
            try:
                refresh_found_again(ln, artifact, plain, run, keep=FLAG_FEATURES)
                return ()
            except Exception as error:
                # Still marked found again (the transaction rolled it back): a retried
                # commit refreshes it again, and the clean-up of a commit that failed for
                # good keeps it (abandon_artifact), as committed before: not ours to delete.
                if self._retry.is_transient(error):
                    raise
            # A value LaminDB refuses: this save's run and none of the earlier save's
            # values, then each of this save's values that validates (below).
            refresh_found_again(ln, artifact, {}, run, keep=FLAG_FEATURES)
        if not plain:
            return ()
        # A value LaminDB refuses (another dtype than its feature's; for a replay, a
        # feature deleted or changed since the crash) is left out, with a warning: the
        # checkpoint and every value that validates are kept, its event names the others.
        where = f"replaying {snapshot.key!r}" if replay else f"checkpoint {snapshot.key!r}"
        return self.add_values_keeping_valid(artifact, plain, where=where)

    def _auto_features(self, ln: Any) -> dict[str, Any]:
        if self._auto is None:
            self._auto = discover_auto(ln)
        return self._auto

    def _flags_of(self, prefix: str) -> _PrefixFlags:
        """The process's flags under ``prefix`` (call under :data:`_FLAGS_LOCK`): read
        afresh at this store's first use since its ``reset``."""
        flags = self._flags.get(prefix)
        if flags is None:
            shared = _SHARED_FLAGS.setdefault(self._instance_key(), {})
            for gone in [p for p, f in shared.items() if not f.stores and p != prefix]:
                del shared[gone]  # no store uses it any more (collected, or set up again)
            flags = shared.get(prefix)
            if flags is None:
                flags = shared[prefix] = _PrefixFlags(prefix)
            if not flags.stores:
                flags.latest = flags.best = None  # no store left of an earlier fit's
            flags.reset()
            flags.stores.add(self)
            self._flags[prefix] = flags
        return flags

    def _instance_key(self) -> str:
        if self._instance is None:
            instance = _ln().setup.settings.instance
            self._instance = f"{instance.slug}|{getattr(instance, '_id', '')}"
        return self._instance

    def _shared_flags(self) -> Collection[_PrefixFlags]:
        """Every prefix's flags of this store's instance, those other stores use too
        (call under :data:`_FLAGS_LOCK`)."""
        return list(_SHARED_FLAGS.get(self._instance_key(), {}).values())

    def _forget_flags(self, key: str, only: Collection[int] | None = None) -> None:
        """Forget ``key``'s artifact in every prefix that holds it: its own folder's, and
        those of the folders above it (a ``filename`` with a "/" puts top-k checkpoints
        in a subfolder of ``last.ckpt``'s, whose flags cover them too). ``only``: where
        the artifact known for ``key`` is one of these ids."""
        with _FLAGS_LOCK:
            for flags in self._shared_flags():
                flags.forget(key, only)

    def _apply_flags(
        self, ln: Any, prefix: str, snapshot: CheckpointSnapshot, artifact: Any
    ) -> None:
        """Make is_best_model / is_last_model / model_rank under ``prefix`` equal the snapshot.

        What was read of the flags may be stale: another process replaced or deleted an
        artifact it holds. Writing a flag for a deleted one fails (FOREIGN KEY): the
        flags are then read afresh, and written once more.

        Several stores of this process committing under one prefix (callbacks sharing a
        folder) take turns, and end as the reference does whatever order their committer
        threads run in: ``is_last_model`` on the save submitted last, ``is_best_model``
        on the last save that was its callback's best, ``model_rank`` over the
        ``best_k_models`` of the callback that saved last.
        """
        sequence = snapshot.sequence or next_sequence()
        with _FLAGS_LOCK:
            try:
                self._write_flags(ln, prefix, snapshot, artifact, sequence)
            except Exception as error:
                if type(error).__name__ != "IntegrityError":
                    raise
                log.info("flags under %r were stale (%s); reading them again", prefix, error)
                for flags in self._flags.values():
                    flags.reset()
                self._write_flags(ln, prefix, snapshot, artifact, sequence)

    def _write_flags(
        self, ln: Any, prefix: str, snapshot: CheckpointSnapshot, artifact: Any, sequence: int
    ) -> None:
        auto = self._auto_features(ln)
        names = [n for n in FLAG_FEATURES if n in auto]
        if not names:
            return
        flags = self._flags_of(prefix)
        committed = snapshot.committed  # a replay's: what the crashed process committed
        if committed is not None:
            if flags.latest is None or committed.last[0] > flags.latest[0]:
                flags.latest = committed.last
            if committed.best is not None and (
                flags.best is None or committed.best[0] > flags.best[0]
            ):
                flags.best = committed.best
        if flags.latest is None or sequence >= flags.latest[0]:
            flags.latest = (sequence, snapshot.key, snapshot.ranking, snapshot.best_key)
        if snapshot.is_best and (flags.best is None or sequence >= flags.best[0]):
            flags.best = (sequence, snapshot.key)
        if not flags.loaded:
            in_flight: list[int] = []
            for store in list(flags.stores):
                with store._lock:
                    in_flight += [a.id for a in store._uncommitted.values() if a.id is not None]
            flags.load(ln, auto, [i for i in in_flight if i != artifact.id])
        mine = list(self._flags.values())  # its folder's and those above or below it
        for other in mine:
            # The key's own prefix, and those above it that were loaded before it existed.
            if other is flags or (other.loaded and snapshot.key.startswith(other.prefix + "/")):
                other.key_to_id[snapshot.key] = artifact.id
        if (len(flags.stores) > 1 or committed is not None) and flags.latest is not None:
            # Several callbacks in the folder (here, or committed before a crash): as
            # the reference, the last save's flags, and the best of the last save that
            # was best, whichever commits last.
            _, last_key, ranking, latest_best = flags.latest
            best_key = flags.best[1] if flags.best is not None else latest_best
        else:
            last_key, ranking, best_key = snapshot.key, snapshot.ranking, snapshot.best_key
        ranks = {key: rank for rank, key in enumerate(ranking)}
        changed: dict[int, dict[str, Any]] = {}
        for key, artifact_id in flags.key_to_id.items():
            want = {
                "is_best_model": key == best_key,
                "is_last_model": key == last_key,
                "model_rank": ranks.get(key),
            }
            want = {n: want[n] for n in names}
            have = flags.state.get(artifact_id, {})
            if want != {n: have.get(n) for n in names}:
                changed[artifact_id] = want
        if not changed:
            return
        from django.db import transaction

        link_model = ln.models.ArtifactJsonValue
        links = [
            link_model(artifact_id=artifact_id, jsonvalue_id=self._value_id(ln, auto[n], value))
            for artifact_id, values in changed.items()
            for n, value in values.items()
            if value is not None
        ]
        # One transaction: no reader (nor a failure between the two) sees an artifact
        # without its flags, or with an old value beside the new one.
        with transaction.atomic():
            link_model.objects.filter(
                artifact_id__in=list(changed),
                jsonvalue__feature_id__in=[auto[n].id for n in names],
            ).delete()
            link_model.objects.bulk_create(links, ignore_conflicts=True)
        for artifact_id, values in changed.items():
            written = {n: v for n, v in values.items() if v is not None}
            for other in mine:  # what a folder above or below knows, too
                if (
                    other is flags
                    or artifact_id in other.state
                    or artifact_id in (other.key_to_id.values())
                ):
                    other.state[artifact_id] = dict(written)

    def _value_id(self, ln: Any, feature: Any, value: Any) -> int:
        cache_key = (feature.id, value if not isinstance(value, bool) else ("bool", value))
        found = self._value_ids.get(cache_key)
        if found is None:
            record, _ = ln.models.JsonValue.get_or_create(feature, value)
            found = self._value_ids[cache_key] = record.id
        return found

    def remove(self, record: JobRecord, known: Any | None) -> tuple[Any, str] | None:
        """Delete what is stored under an evicted key; return (artifact, storage URI)."""
        _check_instance(record)
        return self.remove_key(record.key, known)

    def find_removal(self, record: JobRecord, known: Any | None) -> Removal | None:
        """What :meth:`remove` would delete, not deleted yet (:meth:`delete_removal` does).

        Between the two, observers are told of the removal while the artifact and its
        bytes still exist, as the reference tells them before it deletes.
        """
        _check_instance(record)
        return self._find_key(record.key, known)

    def _find_key(self, key: str, known: Any | None) -> Removal | None:
        immediate_transactions()
        self._forget_flags(key)
        with _key_lock(key):
            if known is not None and not _still_under(known, key):
                # The user gave it another key, trashed or deleted it meanwhile: as the
                # reference, which looks the key up, delete only what is under the key.
                known = None
            candidates = [known] if known is not None else self.others_under_key(key)
        if not candidates:
            return None
        last = candidates[-1]
        with self._lock:
            commits = self._committed.get(key, (0, None))[0]
        return Removal(key, tuple(candidates), (last, self.storage_uri(last)), commits)

    def delete_removal(self, removal: Removal) -> None:
        """Delete what :meth:`find_removal` found (those still there)."""
        immediate_transactions()
        with _key_lock(removal.key):
            with self._lock:
                # Found again by a save of the same key and content since (see
                # _committed_to_reuse): it is that save's artifact now, in flight or
                # committed after the removal found it.
                kept = self._found_again_in_flight()
                commits, last = self._committed.get(removal.key, (0, None))
                if commits != removal.commits:
                    kept.add(last)
            deleted: set[int] = set()
            for candidate in removal.candidates:
                if candidate.id is None or candidate.id in kept:
                    continue
                # A fresh copy: Django clears the id of the instance it deletes, and the
                # candidate is what observers got (with its id, as from the reference).
                victim = _ln().Artifact.filter(id=candidate.id).first()
                if victim is not None:
                    delete_artifact(victim, keep_paths=self._paths_in_use(removal.key, victim))
                    deleted.add(candidate.id)
        # Flags read meanwhile may name what went; not a later save's artifact of the key.
        self._forget_flags(removal.key, only=deleted)

    def _found_again_in_flight(self) -> set[int | None]:
        """Ids of committed artifacts a save in flight found again by its content (see
        :meth:`_committed_to_reuse`): that save's now, not to delete. Under ``_lock``."""
        return {a.id for a in self._uncommitted.values() if id(a) in self._reused}

    def _paths_in_use(self, key: str, victim: Any) -> set[str]:
        """Where the other artifacts of ``key`` keep their bytes, committed or still being
        saved: with ``key_is_virtual=False`` every version of a key is stored at the key,
        and a later save of it may be uploading there now."""
        if getattr(victim, "_key_is_virtual", True) and getattr(victim, "_real_key", None) is None:
            return set()  # stored under its own uid: no other artifact is there
        with self._lock:
            in_flight = [a for a in self._uncommitted.values() if a.key == key]
        others = list(_ln().Artifact.filter(key=key).exclude(id=victim.id)) + in_flight
        return {str(a.path) for a in others}

    def remove_key(self, key: str, known: Any | None) -> tuple[Any, str] | None:
        """Delete ``known`` (or every committed artifact under ``key``) at once.

        Returns the last deleted artifact and where its bytes were, or None.
        """
        removal = self._find_key(key, known)
        if removal is None:
            return None
        self.delete_removal(removal)
        return removal.named

    def abandon(self, record: JobRecord, artifact: Any) -> None:
        """Delete an artifact whose commit failed for good (best effort)."""
        del record
        self.abandon_artifact(artifact)

    def abandon_artifact(self, artifact: Any) -> None:
        """Delete ``artifact`` if it was created by a transfer and never committed."""
        if artifact is None or getattr(artifact, "id", None) is None:
            return
        immediate_transactions()
        with self._lock:
            reused = id(artifact) in self._reused
            self._replaced.pop(artifact.pk, None)  # what it replaced stays: it failed
        self.settle(artifact)
        if reused:
            return  # committed before (found again by its hash): not ours to delete
        try:
            delete_artifact(artifact)
        except Exception as error:
            log.warning(
                "could not delete the uncommitted artifact %r of %r (%s: %s)",
                getattr(artifact, "uid", None),
                getattr(artifact, "key", None),
                type(error).__name__,
                error,
            )

    def storage_uri(self, artifact: Any) -> str:
        """Where ``artifact``'s bytes live (as the publisher says)."""
        return self._publisher().storage_uri(artifact)

    def delete_replaced(self, artifact: Any) -> None:
        """Delete the older artifacts of its key that committing ``artifact`` replaced
        (see ``defer_replaced``): once the earlier saves' events were delivered, before
        ``artifact``'s. Those gone already are skipped, and so is one a later save of the
        key found again by its content (see :meth:`_committed_to_reuse`): it is that
        save's artifact now. An error is raised (the pipeline retries), and what is left
        to delete stays known for the retry."""
        with self._lock:
            entry = self._replaced.get(artifact.pk)
        if entry is None:
            return
        key, replaced = entry
        immediate_transactions()
        with _key_lock(key):
            with self._lock:
                kept = self._found_again_in_flight()
                kept.add(self._committed.get(key, (0, None))[1])
            kept.add(artifact.pk)
            deleted: set[int] = set()
            for old in replaced:
                if old.id is None or old.id in kept:
                    continue
                victim = _ln().Artifact.filter(id=old.id).first()
                if victim is not None:
                    delete_artifact(victim, keep_paths=self._paths_in_use(key, victim))
                    deleted.add(old.id)
        with self._lock:
            self._replaced.pop(artifact.pk, None)
        self._forget_flags(key, only=deleted)

    def others_under_key(
        self, key: str, exclude_id: int | None = None, *, older_only: bool = True
    ) -> list[Any]:
        """Committed artifacts stored under ``key`` (not those our workers are still saving)."""
        # A versioned save sets the id inside its transaction, so a visible row has it;
        # a first version's autocommit INSERT is visible a moment before its id is set,
        # and its uid does not change: exclude by id, else by uid.
        with self._lock:
            in_flight = list(self._uncommitted.values())
        query = _ln().Artifact.filter(key=key)
        if exclude_id is not None and older_only:
            # Only older rows: a newer one is a later save of the key still in flight (its
            # own commit replaces this one), even from a publisher whose saves we do not track.
            query = query.filter(id__lt=exclude_id)
        elif exclude_id is not None:
            query = query.exclude(id=exclude_id)
        ids = [a.id for a in in_flight if a.id is not None]
        uids = [a.uid for a in in_flight if a.id is None]
        if ids:
            query = query.exclude(id__in=ids)
        if uids:
            query = query.exclude(uid__in=uids)
        return list(query)

    def finalize_thread(self) -> None:
        """Close this thread's Django connection."""
        close_connections()


def _dtype_of(feature: Any) -> str:
    """The dtype of a feature (a record, or a name: every feature's of that name)."""
    if not isinstance(feature, str):
        return str(getattr(feature, "_dtype_str", None) or "unknown")
    try:
        found = _ln().Feature.filter(name=feature).values_list("_dtype_str", flat=True)
        dtypes = sorted({str(d) for d in found})
    except Exception:  # only for a warning's words
        return "unknown"
    return " or ".join(dtypes) or "unknown"


def refresh_found_again(
    ln: Any, artifact: Any, values: Mapping[Any, Any], run: Any, *, keep: Collection[str] = ()
) -> None:
    """Make a committed artifact found again by its content stand for a new save of its
    key: linked to ``run`` and annotated with ``values`` only (the features named in
    ``keep`` aside), in one transaction."""
    from django.db import transaction

    with transaction.atomic():
        _relink_run(ln, artifact, run)
        stale = [n for n in artifact.features.get_values(external_only=True) if n not in keep]
        if stale:
            artifact.features.remove_values(stale)
        if values:
            artifact.features.add_values(dict(values))


def _default_storage_id() -> int | None:
    """The id of this process's default storage location (None if it cannot be read)."""
    try:
        return int(_ln().setup.settings.storage._id)
    except Exception:
        return None


def _still_under(artifact: Any, key: str) -> bool:
    """Whether ``artifact`` still exists under ``key``, in the branch new artifacts go to
    (a look-up by id alone finds trashed rows too)."""
    artifact_id = getattr(artifact, "id", None)
    if artifact_id is None:
        return False
    rows = getattr(type(artifact), "objects", None)
    if rows is None:  # not a LaminDB record (a publisher of the user's): as it was
        return True
    return bool(rows.filter(id=artifact_id, key=key, branch_id=_branch_id()).exists())


def _branch_id() -> int:
    """The id of the branch new artifacts go to (LaminDB's main branch, 1, by default)."""
    try:
        return int(_ln().setup.settings.branch.id)
    except Exception:
        return 1


def _out_of_the_trash(artifact: Any) -> None:
    """Bring ``artifact`` back to the branch new artifacts go to if the user moved it to
    the trash (or the archive, another branch), as LaminDB's own save of the same key and
    content does ("returning artifact from trash with same hash & key"). A look-up by
    hash finds trashed rows too: committed as it was, the checkpoint stayed in the
    trash, where ``Artifact.filter`` does not see it."""
    branch_id, wanted = getattr(artifact, "branch_id", None), _branch_id()
    if branch_id is None or branch_id == wanted:
        return
    type(artifact).objects.filter(pk=artifact.pk).update(branch_id=wanted)
    artifact.branch_id = wanted


def _relink_run(ln: Any, artifact: Any, run: Any) -> None:
    """Link ``artifact`` to ``run`` (None: LaminDB's current run), as a new artifact of the
    save would be."""
    if run is None:
        run = ln.context.run
    # Written even where this copy says it is linked already: a transaction that failed
    # after this (a retried commit) rolled the row back, not the copy.
    type(artifact).objects.filter(pk=artifact.pk).update(run_id=getattr(run, "id", None))
    artifact.run = run


# Per key, for every store of this process (two callbacks may write one key, as
# hparams.yaml): a worker's look-up of a committed artifact to reuse and its marking as in
# flight, against the committer's choice and deletion of a key's old versions. Without
# it the committer could delete the artifact a worker had just found. Never dropped (a
# lock handed out must stay the key's): one small lock per key a process persisted.
_KEY_LOCKS: dict[str, threading.Lock] = {}
_KEY_LOCKS_GUARD = threading.Lock()

# The flags of every prefix, per instance (see _PrefixFlags), and the one lock their
# reads and writes take: callbacks sharing a folder write its flags in turn, each from
# what the others wrote. Taken after a key's lock, never before it.
_FLAGS_LOCK = threading.RLock()
_SHARED_FLAGS: dict[str, dict[str, _PrefixFlags]] = {}


_UPLOADS_GUARD = threading.Lock()
_UPLOADS: dict[tuple[str, str], list[threading.Event]] = {}


@contextmanager
def _uploading(key: str, digest: str | None) -> Iterator[None]:
    """Mark an upload of ``key`` with content ``digest`` in flight on this thread."""
    if not digest:
        yield
        return
    done = threading.Event()
    with _UPLOADS_GUARD:
        _UPLOADS.setdefault((key, digest), []).append(done)
    try:
        yield
    finally:
        with _UPLOADS_GUARD:
            events = _UPLOADS.get((key, digest), [])
            if done in events:  # not in a child forked meanwhile (see _forget_uploads)
                events.remove(done)
                if not events:
                    del _UPLOADS[(key, digest)]
        done.set()


def _forget_uploads() -> None:
    """In a forked child: the parent's uploads are not its own (their threads did not
    come with the fork, and nothing here would ever end them)."""
    global _UPLOADS_GUARD  # a thread of the parent may have held it
    _UPLOADS_GUARD = threading.Lock()
    _UPLOADS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_uploads)


def _wait_for_upload_here(key: str, digest: str) -> bool:
    """Wait until no thread of this process uploads ``key`` with content ``digest``;
    whether one did."""
    with _UPLOADS_GUARD:
        events = list(_UPLOADS.get((key, digest), ()))
    for event in events:
        event.wait()
    return bool(events)


def _key_lock(key: str) -> threading.Lock:
    with _KEY_LOCKS_GUARD:
        lock = _KEY_LOCKS.get(key)
        if lock is None:
            lock = _KEY_LOCKS[key] = threading.Lock()
        return lock


def lamin_stats(path: Path) -> dict[str, Any]:
    """lamindb's size and hash of a local file or folder, as ``Artifact(path)`` computes them."""
    from lamindb_setup.core.hashing import hash_dir, hash_file

    if path.is_dir():
        size, digest, hash_type, n_files = hash_dir(path)
        return {"size": size, "hash": digest, "hash_type": hash_type, "n_files": n_files}
    size, digest, hash_type = hash_file(path)
    return {"size": size, "hash": digest, "hash_type": hash_type}


def stats_accepted() -> bool:
    """Whether ``Artifact(path, _stats=...)`` may be given precomputed stats: the installed
    lamindb takes them, and the user did not turn its hashing off."""
    from lamindb.models import artifact as module

    if not hasattr(module, "_validate_stats"):
        return False
    return not _ln().settings.creation.artifact_skip_size_hash


def _given_stats(stats: dict[str, Any] | None) -> dict[str, Any]:
    return {"_stats": stats} if stats is not None and stats_accepted() else {}


# s3fs's defaults, which lamindb keeps: one file's upload holds up to this many parts
# of this size in memory at once (read before they are sent).
_PARTS_IN_FLIGHT = 10
_PART_BYTES = 50 << 20
_UPLOAD_MEMORY = _PARTS_IN_FLIGHT * _PART_BYTES


def _upload_options(path: Path) -> dict[str, Any]:
    """``Artifact.save`` options bounding a folder upload's memory to one file's.

    lamindb uploads every file of a folder at once (fsspec's batch is the open-file
    limit / 8, thousands), each holding up to ``_UPLOAD_MEMORY`` bytes: a folder of
    large shards would hold most of itself in memory. Files in flight are limited so
    that together they hold at most what one large file does; small files still go
    many at a time.
    """
    # LaminDB prints "... uploading NAME: 0.0% ... 100.0%" per file from the worker
    # threads, which floods a training console: our progress bar and log say it once.
    quiet: dict[str, Any] = {"print_progress": False}
    if not path.is_dir():
        return quiet
    largest = max((f.stat().st_size for f in path.rglob("*") if f.is_file()), default=0)
    per_file = min(max(largest, 1), _UPLOAD_MEMORY)
    return {**quiet, "store_kwargs": {"batch_size": max(1, _UPLOAD_MEMORY // per_file)}}


_share_lock = threading.Lock()


def share_storage_filesystem() -> None:
    """Make the default storage's paths share one fsspec filesystem across our workers.

    fsspec caches a filesystem per thread, and lamindb builds each artifact's storage
    path from ``settings.storage.root``: a root whose filesystem was never created gives
    every path a new one, so each worker thread built its own S3 client on its first
    upload (a fresh session, its own connections; creating a client holds fsspec's one
    IO loop for 0.1-0.3 s, stalling every other transfer). Created once on the root,
    it is inherited by every path joined to it, as one shared ``s3fs`` is used from many
    threads. Its connection pool is botocore's (``max_pool_connections``, 10 by
    default) for all workers together; see docs/tuning.md.
    """
    root = _ln().settings.storage.root
    if getattr(root, "protocol", "") in ("", "file", "local"):
        return
    with _share_lock:
        root.fs  # noqa: B018  # created once and cached on the root (UPath._fs_cached)


def immediate_transactions() -> None:
    """On SQLite, make this pipeline thread's transactions take the write lock as they begin.

    LaminDB's transactions begin DEFERRED: one that has read and then writes must upgrade
    its lock, and when another connection (a worker saving the next artifact while the
    committer commits) holds the write lock, SQLite refuses at once ("database is
    locked", no busy wait: waiting could deadlock). BEGIN IMMEDIATE waits for the lock
    up front, within the busy timeout, so our threads queue instead of failing. Only
    our own threads' connections change (Django keeps one per thread); Django reads the
    mode from its settings again at every reconnect, hence a call per operation.
    """
    if not threading.current_thread().name.startswith("lamin-lightning"):
        return  # the training thread's connection is the user's
    from django.db import connection

    replace_broken_connection()
    if connection.vendor != "sqlite":
        return
    connection.ensure_connection()
    connection.transaction_mode = "IMMEDIATE"


def replace_broken_connection() -> None:
    """On a pipeline thread, close this thread's connection if an error left it unusable.

    PostgreSQL restarted, the backend terminated, the network dropped: psycopg then
    answers "connection already closed" to every later query, and each retry failed the
    same way until the fit ended. Django replaces such a connection only between web
    requests; here, before each operation (a retry included), one found unusable is
    closed, and the operation connects afresh. Never inside a transaction (a user's
    override in ``atomic()``), nor on the user's threads.
    """
    if not threading.current_thread().name.startswith("lamin-lightning"):
        return
    from django.db import connection

    if connection.errors_occurred and not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


def close_connections() -> None:
    """Close the calling thread's Django connections (idle PostgreSQL backends pile up)."""
    try:
        from django.db import connections
    except ImportError:  # pragma: no cover
        return
    connections.close_all()


def _prefix(key: str) -> str:
    return key.rsplit("/", 1)[0] if "/" in key else ""


_quiet_now = threading.local()


@contextmanager
def _lamindb_quiet() -> Iterator[None]:
    """Drop LaminDB's info lines logged by this thread meanwhile ("a file/folder remains
    here", at its IMPORTANT level: we delete it right after)."""
    before = getattr(_quiet_now, "active", False)
    _quiet_now.active = True
    try:
        yield
    finally:
        _quiet_now.active = before


class _PipelineThreadsQuiet(logging.Filter):
    """LaminDB's info and success lines logged on our pipeline's threads ("✓ deleted
    PATH" for every evicted checkpoint) stay off the training console, where our progress
    bar and log speak for persistence; its warnings and errors pass, but for "could not
    upload artifact: Artifact(...)" at every failed attempt, which our own log line of
    the failure (key, attempts, error) says better."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.threadName or ""
        if getattr(_quiet_now, "active", False) and _is_info(record):
            return False
        if not name.startswith("lamin-lightning"):
            return True
        if _is_info(record):
            return False
        if record.levelno > logging.WARNING:
            return True
        if _is_upload_failure(record):
            return False
        # The same warning for every artifact ("no run & transform got linked"): once.
        message = record.getMessage()
        with _WARNED_LOCK:
            if message in _WARNED:
                return False
            if len(_WARNED) < 1024:
                _WARNED.add(message)
        return True


# LaminDB's info lines: below WARNING, and its "→" lines, logged at levels just above it
# (IMPORTANT, IMPORTANT_HINT) so that they show at its default verbosity: "creating new
# artifact version for key ...", "a file/folder remains here: ...".
_LAMINDB_INFO_ABOVE_WARNING = frozenset({31, 32})
_WARNED: set[str] = set()  # warnings of LaminDB's our threads printed (once each)
_WARNED_LOCK = threading.Lock()


def _is_info(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING or record.levelno in _LAMINDB_INFO_ABOVE_WARNING


def _is_upload_failure(record: logging.LogRecord) -> bool:
    try:
        return str(record.getMessage()).startswith(_UPLOAD_FAILURE)
    except Exception:  # a message that cannot format: let it through
        return False


_UPLOAD_FAILURE = "could not upload artifact:"


def _quiet_on_pipeline_threads() -> None:
    """Install :class:`_PipelineThreadsQuiet` on LaminDB's logger, once per process."""
    from lamindb_setup import logger

    if not any(isinstance(f, _PipelineThreadsQuiet) for f in logger.filters):
        logger.addFilter(_PipelineThreadsQuiet())


def _resolve_records(value: Any) -> Any:
    """``value`` with each :class:`RecordRef` (a replay's, in a list too) its record."""
    if isinstance(value, RecordRef):
        return value.resolve()
    if isinstance(value, list) and any(isinstance(v, RecordRef) for v in value):
        return [v.resolve() if isinstance(v, RecordRef) else v for v in value]
    return value


def _naming_storage(error: OSError, artifact: Any, path: str | Path) -> OSError:
    """``error`` (of the same type, so never retried) naming the storage location, where
    the local file is there and so the missing or forbidden thing is in storage: a deleted
    bucket reads "The specified bucket does not exist" without saying which."""
    if not os.path.lexists(path):
        return error
    try:
        root = artifact.storage.root
    except Exception:  # the message only loses the location
        return error
    if str(root) in str(error):
        return error
    return type(error)(f"{error} (storage location {root})")


@contextmanager
def outside_storage(path: Path | str) -> Iterator[Path | str]:
    """``path``, or a link to (else a copy of) it outside every storage location.

    lamindb registers a file that lies in one of the instance's storage locations where
    it is, without copying it (the reference's artifact of a checkpoint written there is
    Lightning's file). What we hand lamindb is the staged copy, which is deleted once
    the job is done: registered in place, its artifact would name a file that no longer
    exists. So a staged file or folder in a storage location (a ``dirpath`` or logger
    ``save_dir`` inside the instance's storage) is given to lamindb from a temporary
    folder outside it, which lamindb copies into storage as any other file.

    That folder is made in :data:`SCRATCH_FOLDER` beside the storage location where it
    can be (the same filesystem, so a hard link: a checkpoint of tens of GB is not copied
    to the system's temporary folder), else in the system's temporary folder. Each
    process holds a lock file there while it has entries (:mod:`lamin_lightning._owners`);
    what a killed process left is deleted by the next one to use the folder.
    """
    from lamindb.models.artifact import check_path_in_existing_storage

    storage = check_path_in_existing_storage(Path(path))
    if storage is None:
        yield path
        return
    beside = os.path.dirname(os.path.abspath(str(storage.root).rstrip("/")))
    failed: list[OSError] = []
    for place in (beside, tempfile.gettempdir()):
        folder = Path(place) / SCRATCH_FOLDER
        if check_path_in_existing_storage(folder) is not None:
            continue
        try:
            scratch = _scratch(folder)
        except OSError as refused:
            failed.append(refused)
            continue  # beside the storage location: not writable, say
        try:
            target = scratch / Path(path).name
            if Path(path).is_dir():
                shutil.copytree(path, target, copy_function=_hard_link_or_copy)
            else:
                _hard_link_or_copy(os.fspath(path), os.fspath(target))
            yield target
            return
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            _owners.let_go(folder, partial(_has_entries_of, folder))
    for error in failed:
        if not isinstance(error, PermissionError):
            # A full disk, too many open files: passing, retried as any OSError of the
            # save (a LaminSetupError is permanent, and blames where checkpoints are).
            raise error
    raise LaminSetupError(
        f"{path} lies in the LaminDB storage location {storage.root}, where lamindb would"
        " register the staged copy in place (to be deleted), and no temporary folder"
        f" outside every storage location could be made ({SCRATCH_FOLDER} beside it, or"
        " in the system's temporary folder): write checkpoints outside the instance's"
        " storage locations" + "".join(f" ({error})" for error in failed)
    ) from (failed[-1] if failed else None)


SCRATCH_FOLDER = ".lamin-lightning-scratch"
"""Where a file staged inside a storage location is handed to lamindb from (see
:func:`outside_storage`)."""


def _has_entries_of(folder: Path, owner: str) -> bool:
    return _owners.has_entries(folder, f"{owner}-")


def _scratch(folder: Path) -> Path:
    """A new folder of this process's in ``folder``, after deleting those of ended ones."""
    with _owners.folder_lock(folder):
        ours = _owners.hold(folder, verify=True)
        for name in os.listdir(folder):
            owner = name.rpartition("-")[0]
            if name.endswith(_owners.LOCK_SUFFIX) or not owner or owner == ours:
                continue
            if not _owners.can_tell():  # pragma: no cover - Windows
                break
            with _owners.dead_owner(folder, owner) as dead:
                if dead:
                    shutil.rmtree(folder / name, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{ours}-", dir=folder))


def _hard_link_or_copy(source: str, target: str) -> str:
    """A second name for the staged ``source`` (it is never rewritten), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _own_store(path: Path | str) -> dict[str, Any]:
    """``Artifact`` options giving a folder version a store of its own.

    lamindb's default for a folder keeps every version of a key in one storage folder
    (``overwrite_versions``), which a new version's upload empties first: a failed upload
    of ``last.ckpt`` lost the committed version's files, and deleting the failed version
    deleted every version of the key. With its own store, a version is uploaded beside
    the committed one, which the commit deletes once the new one is in place, as for a
    file.
    """
    return {"overwrite_versions": False} if Path(path).is_dir() else {}


def _drop_interrupted(artifact: Any) -> None:
    """Delete the record of an upload that never completed, and what it left in storage."""
    _delete_version(artifact, keep_store=False, partial=True)


def delete_artifact(
    artifact: Any, *, keep_path: str | None = None, keep_paths: Collection[str] = ()
) -> None:
    """Delete ``artifact`` (a version of its key) for good; its store too, unless it is
    at ``keep_path`` or one of ``keep_paths`` (where other artifacts keep their bytes)
    or other versions share it."""
    where = str(artifact.path)
    same_place = where == keep_path or where in keep_paths
    _delete_version(artifact, keep_store=same_place)


def _delete_version(artifact: Any, *, keep_store: bool, partial: bool = False) -> None:
    """Delete one version of a key: its record, and its store unless ``keep_store``.

    A version whose store its key's other versions share (a folder saved with lamindb's
    default ``overwrite_versions``, by the reference or an earlier release of ours): only
    its record goes, never that store, and never the other versions, which lamindb would
    delete with it.
    """
    from django.db import transaction

    stored = artifact.path
    if getattr(artifact, "_overwrite_versions", False):
        keep_store = keep_store or _store_shared(artifact)
        artifact._overwrite_versions = False  # in memory: lamindb deletes this version only
    pk, registry = artifact.pk, type(artifact)
    # The record, then its store, in one transaction: a store whose deletion fails (S3
    # unreachable) rolls the record back, so that the retry finds it and tries again;
    # lamindb's own order (the record committed first) left an orphan no retry could
    # find. A record lamindb refuses to delete (in a Collection; a row level security
    # policy) keeps its store: the store goes only once the record is gone.
    with transaction.atomic(), _lamindb_quiet():
        artifact.delete(permanent=True, storage=False)
        if keep_store or (pk is not None and registry.objects.filter(pk=pk).exists()):
            return
        _remove_stored(stored, artifact, partial=partial)


def _store_shared(artifact: Any) -> bool:
    """Whether another version of ``artifact``'s key keeps its files in the same store."""
    return bool(
        _ln()
        .Artifact.objects.filter(uid__startswith=artifact.stem_uid, _overwrite_versions=True)
        .exclude(id=artifact.id)
        .exists()
    )


def _remove_stored(stored: Any, artifact: Any, *, partial: bool) -> None:
    """Remove a file or folder in storage; a failure raises (the caller's retry tries
    again), but for a partial upload's, which is best effort (its record goes anyway)."""
    try:
        if stored.is_dir():
            fs = getattr(stored, "fs", None)
            fs.rm(str(stored), recursive=True) if fs is not None else shutil.rmtree(stored)
        elif stored.exists():
            stored.unlink()
    except Exception as error:
        if not partial:
            raise
        log.warning("could not remove the partial upload of %r: %s", artifact.key, error)


def _check_instance(record: JobRecord) -> None:
    """Refuse (permanently: the job stays journaled) a record of another instance."""
    ln = require_instance()
    wanted = record.context.get("instance")
    current = ln.setup.settings.instance.slug
    if wanted and wanted != current:
        raise LaminSetupError(
            f"the outbox entry for {record.key!r} belongs to LaminDB instance {wanted!r}, but"
            f" {current!r} is connected; connect {wanted!r} (`lamin connect {wanted}`) and"
            " flush again"
        )


def replay_store(record: JobRecord) -> LaminStore:
    """The registry's factory: a store on the connected instance, if it is the record's."""
    _check_instance(record)
    return LaminStore()


def _canonical(value: Any) -> str:
    """``value`` as canonical JSON text (keys sorted), to compare a journaled value with
    one read from the database."""
    return json.dumps(value, sort_keys=True, default=str)
