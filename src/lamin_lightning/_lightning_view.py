"""The Lightning-view layer of the generic callback: Lightning's state stays true.

:class:`LightningViewCheckpoint` wraps Lightning's choice of a checkpoint
(``_save_topk_checkpoint``, ``_save_last_checkpoint``): earlier failures surface
before Lightning updates its state, so ``best_model_path`` and friends never name a
file never written; a name being written in the background (``async_write``) counts
as taken for Lightning's version counter; a background save goes through Lightning's
own save path (``trainer.save_checkpoint`` -> strategy -> CheckpointIO) with a host
snapshot where the file would be written; and Lightning's state is put right when a
background write failed (see :mod:`lamin_lightning._evictions`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from types import MethodType
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lamin_lightning._evictions import (
    Evictions,
    lightning_state,
    put_right,
    set_lightning_state,
)
from lamin_lightning._local_write import (
    HostWrite,
    Snapshotter,
    async_write_supported,
    snapshot_checkpoint,
)
from lamin_lightning._names import being_written, name_taken, release_name, take_name
from lamin_lightning._reporting import ReportingCheckpoint
from lamin_lightning._staging import WRITING_DIRNAME, link_temporary, remove_path
from lamin_lightning._submit import removals_waiting, supersede_removals
from lamin_lightning._write_io import saving_to_snapshots

log = logging.getLogger("lamin_lightning")

PIPELINE_THREAD_PREFIX = "lamin-lightning"


class _LightningStaticOnClass:
    """A method that stays Lightning's ``staticmethod`` when looked up on the class.

    ``ModelCheckpoint._link_checkpoint`` is a ``staticmethod`` (code calls it as
    ``ModelCheckpoint._link_checkpoint(trainer, filepath=..., linkpath=...)``); ours needs
    the callback. On an instance this is our method; on the class, Lightning's.
    """

    def __init__(self, method: Any) -> None:
        self._method = method
        self.__doc__ = method.__doc__
        self.__wrapped__ = method

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return getattr(pl.callbacks.ModelCheckpoint, self._name)
        return MethodType(self._method, obj)


class LightningViewCheckpoint(ReportingCheckpoint):
    """Keeps Lightning's view of the checkpoint folder true (see the module docstring)."""

    _snapshotter: Snapshotter | None
    _async_write_refused: bool
    _evictions: Evictions
    _save_depth: int
    _saving_on_exception: bool
    _io_writes: Any  # a WriteTracker while a CheckpointIO that writes late is composed
    # Per background save, in order: its write, the loggers Lightning told of it (they are
    # told once it is written, see _tell_loggers), and the file it saved.
    _loggers_owed: list[tuple[HostWrite, list[Any], str]]
    # Errors of links made after their target's background write (see _make_link_later).
    _link_failures: list[BaseException]

    def _plain(self) -> bool:
        """Whether the callback acts as a plain ``ModelCheckpoint`` (see the subclass)."""
        return False

    @property
    @override
    def _legacy_state_key(self) -> Any:
        """Where Lightning looks for this callback's state in a checkpoint that holds none
        under :attr:`state_key`: ``ModelCheckpoint``'s key for the same settings.

        Lightning keys a callback's state by its class name, so a fit resumed with this
        callback from a checkpoint written with ``ModelCheckpoint`` would start with empty
        ``best_k_models`` and ``best_model_path`` (and keep every file it should evict).
        A callback's own key still comes first. (Lightning's own fallback, the class,
        is for checkpoints older than Lightning 1.5, older than this package.)

        Only while no other callback of the trainer claims that key: a ``ModelCheckpoint``
        of the same settings still attached owns the state saved under it (it loads it
        itself), and this callback starts with empty state, as the reference does.
        Lightning loads the callbacks' states after ``setup``, which sets ``_trainer``.
        """
        key = self.state_key
        own = type(self).__qualname__
        if not key.startswith(own):
            return key
        fallback = "ModelCheckpoint" + key[len(own) :]
        trainer = getattr(self, "_trainer", None)
        callbacks = getattr(trainer, "callbacks", None) or ()
        if any(cb is not self and cb.state_key == fallback for cb in callbacks):
            return key  # the attached ModelCheckpoint's state: not ours to take
        return fallback

    @override
    def _save_topk_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        with self._lightning_save(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    @override
    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        if not self.save_last:  # Lightning's returns at once: nothing to wrap
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        with self._lightning_save(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    @contextmanager
    def _lightning_save(self, trainer: pl.Trainer) -> Iterator[None]:
        """Around Lightning's choice of a checkpoint, its state update, save and evictions.

        Before Lightning changes its state for this save: its state is put right for
        background writes that failed, then earlier failures are raised (``on_error=
        "raise"``), so ``best_model_path`` and friends never name a file never written.
        """
        if self._plain():
            yield
            return
        if self._save_depth == 0:
            self._tell_loggers(trainer)  # of the previous saves, if written by now
            # Only background writes fail after Lightning chose a file.
            # Every rank alike (the state is broadcast): async_write and a CheckpointIO
            # that writes late are the same on every rank, the writes known on rank zero.
            if self.async_write or self._io_writes is not None or self._evictions.has_writes():
                self._put_state_right(trainer)
            if not self._saving_on_exception:
                self._raise_link_failure()
                self._surface_failures()
        self._save_depth += 1
        # Lightning's state before its choice, for putting it right: background writes only.
        self._evictions.save_started(
            self if self.async_write or self._io_writes is not None else None
        )
        raised: BaseException | None = None
        try:
            with self._holding_jobs(trainer):
                yield
        except BaseException as error:
            raised = error
            raise
        finally:
            self._save_depth -= 1
            self._evictions.save_finished()
            if raised is None or isinstance(raised, Exception):
                # A direct call's jobs, also those submitted before it failed (its own
                # error goes on; the flush's are logged then, not raised).
                self._persist_outside_a_stage(raise_errors=raised is None)

    def _persist_outside_a_stage(self, *, raise_errors: bool = True) -> None:
        """A save or removal of Lightning's methods called directly outside a stage (after
        ``fit`` returned, or before ``setup``), not from within another of them: no
        teardown is left to flush it (or none may come), and a script that ends next
        would end the pipeline's threads (daemons) with its job. It is journaled (see
        ``_open_outbox_outside_a_stage``) and persisted before the call returns, as the
        reference persists it; failures are raised as teardown raises them (bounded by
        ``flush_timeout``; what is left is named, for ``lamin-lightning flush``)."""
        if (
            self._in_stage
            or self._save_depth
            or self._saving_on_exception
            or self._shutting_down
            or self._submitter is None
            or self._submitter.pipeline is None
        ):
            return
        self._shutdown(raise_errors=raise_errors)

    def _holding_jobs(self, trainer: pl.Trainer) -> AbstractContextManager[None]:
        """The hook's jobs reach the pipeline's threads together, when it returns (see
        :meth:`Submitter.holding`). Not with a write the training thread may wait for
        (``async_write``, a CheckpointIO that writes after it returns): those run on
        the pipeline's intake thread."""
        if not trainer.is_global_zero or self.async_write or self._io_writes is not None:
            return nullcontext()
        return self._ensure_submitter().holding()

    @override
    def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
        # A checkpoint still being written in the background (async_write) takes its name.
        # The names in flight are looked at first: a write goes from "in flight, no file"
        # to "file, in flight" to "file"; looking at the disk first could see no file yet,
        # then a write no longer in flight, and hand its name out again. A name evicted
        # (see _gone) is free, also while its own write is still in flight: the write its
        # removal waits for comes after that one. Looked at before the disk, likewise: a
        # removal goes from "waiting" to "file gone" (the eviction forgotten); looking at
        # the disk first could see the file, then the eviction forgotten, and take the
        # name for taken (under load, while the removal ran on the intake thread).
        taken = (
            trainer.is_global_zero
            and not self._gone(filepath)
            and (
                being_written(filepath)
                or self._fs.exists(filepath)
                or _links_to_a_file_being_written(filepath)
            )
        )
        return bool(trainer.strategy.reduce_boolean_decision(taken, all=False))

    def _gone(self, filepath: Any) -> bool:
        """Whether ``filepath`` is gone for Lightning though still on disk: Lightning evicted
        it (or the checkpoint a link there names), and the removal waits for its
        replacement's background write. With ``ModelCheckpoint`` the removal is done, and
        the name is free (a template whose metric comes back to an earlier value names the
        evicted file again).

        A file's own name is free once its replacement is written (by ``async_write``
        or by a CheckpointIO that writes later, ``AsyncCheckpointIO``): the removal then
        runs before any later save's write of the name, or that save tells it to leave
        the new file alone (``supersede_removals``: a CheckpointIO's write runs on its
        own thread, in no order with the removal). Until that is known, this waits for
        the write (a name reused that soon is rare); if the write failed, the file stays,
        and so does its name. A link's name is free at once (the link dangles for
        Lightning either way).
        """
        evictions = self._evictions
        if not evictions.evicting():
            return self._gone_for_another(filepath)  # no lstat, commonly: see there
        path = os.fspath(filepath)
        real = os.path.realpath(path)
        if not evictions.removing(real):
            return self._gone_for_another(filepath)
        if os.path.islink(path):
            return True
        write = evictions.replacement_write(real)
        if write is None:
            return True  # its replacement was written: the removal will run
        write.wait()
        return not write.failed()

    def _gone_for_another(self, filepath: Any) -> bool:
        """Whether another callback of this process evicted ``filepath`` and its removal
        waits for that callback's background write (see :meth:`_gone`): with
        ``ModelCheckpoint`` that callback removed it, and this one takes the name (a
        template whose names repeat, shared). The removal then leaves the new file alone
        (see ``supersede_removals``). As for this callback's own, this waits for the
        write first: if it fails, the file stays, and so does its name."""
        writes = removals_waiting(filepath, but_of=self._submitter)
        if not writes:
            return False  # the common case: no removal waits in this process
        if os.path.islink(filepath):
            return True
        for write in writes:
            write.wait()  # an async_write's or a CheckpointIO's: see _gone
            if write.failed():
                return False
        return True

    def _async_write_supported(self, trainer: pl.Trainer) -> bool:
        supported, why = async_write_supported(trainer)
        if not supported and not self._async_write_refused:
            self._async_write_refused = True
            rank_zero_warn(why)
        return supported

    def _save_in_background(self, trainer: pl.Trainer, filepath: str) -> HostWrite | None:
        """Lightning's own save (``trainer.save_checkpoint``), with a host snapshot taken
        where its CheckpointIO would write; return the write to run in the background
        (rank zero), or None."""
        if self._snapshotter is None:
            self._snapshotter = Snapshotter(self.max_snapshots)
        snapshotter = self._snapshotter
        scratch = self._staging_root(filepath) / WRITING_DIRNAME

        def take(checkpoint: dict[str, Any], path: str) -> HostWrite:
            # The folder now, on the training thread, as Lightning's CheckpointIO makes it:
            # a link to the file (save_last="link") is made before the file is written.
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return snapshot_checkpoint(
                checkpoint, snapshotter, path, scratch=scratch, stats=self._stats_recorder
            )

        told: list[Any] = []
        with saving_to_snapshots(trainer.strategy, take) as io, _telling_later(trainer, told):
            try:
                super()._save_checkpoint(trainer, filepath)
            except BaseException:
                if io.write is not None:
                    io.write.abandon()
                raise
        if told:
            if io.write is None:  # nothing left to write: told now, as Lightning would
                for logger in told:
                    logger.after_save_checkpoint(proxy(self))
            else:
                self._loggers_owed.append((io.write, told, filepath))
        return io.write

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        if self._loggers_owed:  # one list check per step otherwise
            self._tell_loggers(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # save_last's save at the end, if owed
        if (
            trainer.world_size > 1
            and not self._plain()
            and (self.async_write or self._io_writes is not None)
        ):
            self._put_state_right_on_every_rank(trainer)

    def _put_state_right_on_every_rank(self, trainer: pl.Trainer) -> None:
        """Training ended on every rank (Lightning calls this hook only then; its own
        save of ``save_last`` here meets the ranks too): rank zero waits for its background
        writes, and the state is put right for those that failed on every rank alike.
        Teardown can put it right on rank zero only: no collective there, where a fit may
        have ended on one rank only.

        The other ranks wait in the broadcast meanwhile: the wait ends well within the
        process group's timeout (half of it; and ``flush_timeout``), or a slow disk would
        make their collective time out. A write still unfinished then is put right at
        teardown, on rank zero."""
        if trainer.is_global_zero:
            limits = [self.flush_timeout]
            group_timeout = getattr(trainer.strategy, "_timeout", None)
            if isinstance(group_timeout, timedelta):
                limits.append(group_timeout.total_seconds() / 2)
            known = [limit for limit in limits if limit is not None]
            deadline = time.monotonic() + min(known) if known else None
            for write in self._evictions.unfinished():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not write.wait(left):
                    break  # what is still written then is put right at teardown (rank zero)
        self._put_state_right(trainer)

    def _tell_loggers(self, trainer: pl.Trainer) -> None:
        """``logger.after_save_checkpoint``, which Lightning calls as soon as a save returns,
        for the saves written in the background (``async_write``): once each is written
        (or failed), in order, on the training thread, so that a logger that uploads the
        checkpoints it is told of (``log_model="all"``) finds their files. Lightning's
        loggers skip the files named in the callback's state that do not exist yet (newer
        saves still being written), and take them when told of those."""
        owed = self._loggers_owed
        while owed and owed[0][0].done():  # up to the first save still being written
            _, loggers, filepath = owed.pop(0)
            # As when Lightning tells them at once, the file "just saved" is this save's.
            latest, self._last_checkpoint_saved = self._last_checkpoint_saved, filepath
            try:
                for logger in loggers:
                    logger.after_save_checkpoint(proxy(self))
            finally:
                self._last_checkpoint_saved = latest

    @_LightningStaticOnClass
    def _link_checkpoint(  # Lightning's is a staticmethod: see _LightningStaticOnClass
        self, trainer: pl.Trainer, filepath: str, linkpath: str
    ) -> None:
        """Lightning's link (``save_last="link"``) to a file that may still be written.

        To a file still written in the background (``async_write``, or a CheckpointIO
        that writes after it returns), the link (or, where links are not allowed,
        Lightning's fallback copy) is made once it is written, by the thread that wrote
        it: until then it names the previous checkpoint, which a process that dies
        meanwhile resumes from (a link made at once would name a file that may never
        come). If the write fails, the link stays where it was. Meanwhile its name counts
        as taken for Lightning's version counter (another callback in the same folder
        takes ``last-v1.ckpt``, as it would with the link made), and links are made in
        the order Lightning asked for them (see :class:`_Links`). A file Lightning wrote
        under the link's name (the first ``last.ckpt`` of a resumed fit) is staged for
        its upload before the link replaces it.
        """
        if (
            not trainer.is_global_zero
            or os.path.abspath(filepath) == os.path.abspath(linkpath)
            or self._plain()
        ):
            super()._link_checkpoint(trainer, filepath, linkpath)
            return
        pending = self._evictions.write_of(filepath) is not None
        if _link_folder_missing(filepath, linkpath, pending):
            # Lightning's link, and its fallback copy, fail there (a CHECKPOINT_NAME_LAST
            # such as "sub/last" with no file ever saved in sub/): the error it raises, at
            # this save, not on the thread that writes the file later, which only logs it.
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), linkpath)
        submitter = self._ensure_submitter()
        # A removal of the file there still waiting for its replacement's write would
        # delete the link once made (see supersede_removals).
        supersede_removals(linkpath)
        # Saved there by another callback too (a shared last-checkpoint name), and not
        # staged yet: written in the background, maybe (async_write).
        others = submitter.others_stagings(linkpath)
        # A file (not a link) under the link's name, or one still being written there:
        # Lightning drops it for the link, so its artifact goes too, once the link stands.
        replaced = (
            (os.path.lexists(linkpath) and not os.path.islink(linkpath))
            or self._evictions.write_of(linkpath) is not None
            or bool(others)
        )
        write = self._evictions.write_of(filepath)
        if write is None:
            submitter.await_staging(linkpath)
            _LINKS.make(_LINKS.request(linkpath), filepath)
        else:
            link = _LINKS.request(linkpath)
            try:
                staging = submitter.staging_of(linkpath)
                write.then(
                    partial(self._make_link_later, link, filepath, staging, others),
                    partial(_LINKS.drop, link),
                )
            except BaseException:  # Ctrl+C in between: the name must not stay taken
                _LINKS.drop(link)
                raise
        if replaced:
            # After the jobs of the file and of the link's target: it commits once the
            # link is made (or finds the file kept, if the target's write failed).
            record = self._record(
                trainer, "remove", "checkpoint", linkpath, after=filepath, linked=True
            )
            self._submit_record(trainer, record, prepare=None)
        trainer.strategy.barrier()
        self._persist_outside_a_stage()  # a direct call of Lightning's

    def _make_link_later(
        self, link: tuple[str, int], target: str, staging: Any, others: Sequence[Any]
    ) -> None:
        """The link once its target is written, on the thread that wrote it. If it fails
        (no room for it, nor for Lightning's fallback copy), the error is kept for the
        training thread, which raises it (see :meth:`_raise_link_failure`): Lightning's
        link raises it out of ``fit``."""
        try:
            _LINKS.make(link, target, staging, others)
        except Exception as error:
            self._link_failures.append(error)
            raise  # logged there too, naming the write

    def _raise_link_failure(self) -> None:
        """Raise the first error of a link made after its target's background write (see
        :meth:`_make_link_later`), on the training thread: at the next save, before
        Lightning changes its state for it, or at teardown. Lightning raised it at the
        save that asked for the link."""
        if self._link_failures:
            error = self._link_failures.pop(0)
            self._link_failures.clear()  # the first one stops training, as Lightning's
            raise error

    def _put_state_right(self, trainer: pl.Trainer, *, other_ranks: bool = True) -> int:
        """Undo, in Lightning's state, the saves whose background write failed (see
        :mod:`lamin_lightning._evictions`); evict what that leaves beyond ``save_top_k``."""
        evict = put_right(self, self._evictions.take_failed()) if trainer.is_global_zero else []
        late = self.async_write or self._io_writes is not None
        if other_ranks and late and trainer.world_size > 1:
            shared = trainer.strategy.broadcast((lightning_state(self), evict))
            set_lightning_state(self, shared[0])
            evict = shared[1]
        for path in evict:
            self._remove_checkpoint(trainer, path)
        return len(evict)


def _link_folder_missing(filepath: Any, linkpath: Any, write_pending: bool) -> bool:
    """Whether the folder of ``linkpath`` does not exist, and no write of ``filepath``
    still to come creates it: Lightning's CheckpointIO makes the folders above the file it
    writes, so a link beside or above a file still being written (by a CheckpointIO that
    writes late, ``AsyncCheckpointIO``) finds its folder made by then."""
    folder = os.path.dirname(os.path.abspath(linkpath))
    if os.path.isdir(folder):
        return False
    if not write_pending:
        return True
    above = os.path.dirname(os.path.abspath(filepath))
    return not (above == folder or above.startswith(folder.rstrip(os.sep) + os.sep))


def _links_to_a_file_being_written(filepath: Any) -> bool:
    """Whether ``filepath`` is a link (``save_last="link"``) whose target a background
    write of this process is creating. Lightning's ``file_exists`` follows the link; the
    target of a rewrite under a CheckpointIO that writes late (``AsyncCheckpointIO``) is
    renamed aside until its write (see ``_aside``), where ``ModelCheckpoint``'s file
    stays: the link resolves for it, and its name is taken (another callback saving
    ``last`` in the folder takes ``last-v1.ckpt``)."""
    path = os.fspath(filepath)
    if not os.path.islink(path):
        return False
    # The link's own target, by the path it names (``being_written`` knows files by
    # their absolute path, not their real one: a dirpath under a symlinked folder,
    # default_root_dir's, is not resolved); realpath would resolve the folder too.
    try:
        target = os.readlink(path)
    except OSError:
        return False
    return being_written(os.path.join(os.path.dirname(os.path.abspath(path)), target))


def _note(told: list[Any], logger: Any, checkpoint_callback: Any) -> None:
    told.append(logger)


@contextmanager
def _telling_later(trainer: pl.Trainer, told: list[Any]) -> Iterator[None]:
    """Inside, a logger's ``after_save_checkpoint`` only notes that it was called (in
    ``told``): the file is not written yet (see ``_tell_loggers``)."""
    patched = []
    for logger in trainer.loggers:
        own = logger.__dict__.get("after_save_checkpoint")
        setattr(logger, "after_save_checkpoint", partial(_note, told, logger))  # noqa: B010
        patched.append((logger, own))
    try:
        yield
    finally:
        for logger, own in patched:
            if own is None:
                delattr(logger, "after_save_checkpoint")
            else:
                setattr(logger, "after_save_checkpoint", own)  # noqa: B010


class _Links:
    """The links Lightning asked for (``save_last="link"``) and not made yet, per process.

    A link to a file written in the background is made by the thread that wrote it, so
    two requests for one link path can be carried out on two threads: each is made
    under one lock, and only if it is newer than the one the link shows (writes finish
    in order, so the newest written file wins). A request holds the link's name until
    it is made or dropped (:func:`name_taken`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._shown: dict[str, int] = {}  # link path -> the request it shows

    def request(self, linkpath: str) -> tuple[str, int]:
        with self._lock:
            link = (linkpath, next(self._seq))
        take_name(linkpath)
        return link

    def make(
        self,
        link: tuple[str, int],
        target: str,
        staging: Any = None,
        others: Sequence[Any] = (),
    ) -> None:
        linkpath, seq = link
        try:
            if staging is not None and not staging.is_set():
                # A file Lightning wrote under this name: staged before it goes. Off the
                # pipeline's own threads only (there, its job came first and is staged).
                if threading.current_thread().name.startswith(PIPELINE_THREAD_PREFIX):
                    log.warning("%s is replaced by a link before it was staged", linkpath)
                else:
                    staging.wait()
            for other in others:
                # Another callback's save under this name (a shared last-checkpoint name):
                # its pipeline stages it, on its own threads, whichever thread this is.
                other.wait()
            name = os.path.abspath(linkpath)
            with self._lock:
                if self._shown.get(name, 0) > seq:
                    return  # a newer request was made already
                _link_or_copy(target, linkpath)
                self._shown[name] = seq
        finally:
            release_name(linkpath)

    def drop(self, link: tuple[str, int]) -> None:
        release_name(link[0])

    def cancel(self, linkpath: str) -> None:
        """Lightning removes ``linkpath`` (the previous ``last`` link, under a name that
        changes from save to save): a request for it not made yet never will be, or it
        would stand after its removal, dangling once its target is evicted."""
        name = os.path.abspath(linkpath)
        with self._lock:
            if name_taken(linkpath) or name in self._shown:
                self._shown[name] = next(self._seq)


_LINKS = _Links()
cancel_link = _LINKS.cancel


def _link_or_copy(target: str, link: str) -> None:
    """Lightning's ``_link_checkpoint`` on one rank: ``link`` becomes a relative symlink to
    ``target``, or a copy of it where links are not allowed.

    Made beside it under a temporary name and renamed over it, so that ``link`` never
    stops existing in between (Lightning removes, then links): another thread looks for
    it meanwhile, such as another callback's removal that waits for its replacement
    (see ``RemovalOnceWritten``), which would otherwise keep its evicted file. A folder
    (a folder checkpoint) under the link's name is removed first, as Lightning removes
    it. A SIGKILL between the two steps leaves the temporary name, which the next
    ``setup`` or flush deletes (``_staging.clear_dead_links``).
    """
    relative = os.path.relpath(target, os.path.dirname(link))
    if os.path.isdir(link) and not os.path.islink(link):
        remove_path(link)
    temporary = link_temporary(link)
    # One left by an earlier process of this pid and thread (a container's PID 1):
    # never written through (a copy follows a link), never renamed into place.
    remove_path(temporary)
    try:
        try:
            os.symlink(relative, temporary)
        except OSError as error:
            if error.errno == errno.EEXIST:
                raise
            shutil.copy(target, temporary)
        os.replace(temporary, link)
    except OSError as error:
        remove_path(temporary)
        if temporary not in (error.filename, error.filename2):
            raise
        # Lightning's error names the link (its fallback copy's, written there): so does
        # ours, not the temporary name only this callback knows.
        raise type(error)(error.errno, error.strerror, link) from error
    except BaseException:
        remove_path(temporary)
        raise
