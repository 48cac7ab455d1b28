"""Every error lamin-lightning raises, under one base: :class:`LaminLightningError`.

Each public error also derives from the builtin a caller would expect (a setup problem
is a ``ValueError``, as the synchronous reference raises; a directory problem an
``OSError``), so ``except ValueError`` written for the reference keeps working.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Collection, Mapping

from lamin_lightning._events import ArtifactFailedEvent


class LaminLightningError(Exception):
    """Base of every error lamin-lightning raises."""


class TransientError(LaminLightningError):
    """Raise (or subclass) this in a persistence hook to ask for a retry."""


class PermanentError(LaminLightningError):
    """Raise (or subclass) this in a persistence hook to fail at once, without retrying."""


class PersistenceError(LaminLightningError, RuntimeError):
    """Raised on the training thread when persisting one or more files failed.

    Attributes:
        failures: The failed events, in submission order.

    ``raised=False`` words it for a warning (``on_error="warn"``); ``outbox=False`` for a
    callback without an outbox (nothing retries a failed job). ``replaced`` maps the index
    of a failure that a later job of its key made moot to that job's operation
    (``"save"`` or ``"remove"``): nothing of it is left to persist.
    """

    def __init__(
        self,
        failures: list[ArtifactFailedEvent],
        unjournaled: Collection[str] = (),
        dirpath: str | os.PathLike[str] | None = None,
        *,
        raised: bool = True,
        outbox: bool = True,
        replaced: Mapping[int, str] | None = None,
    ) -> None:
        self.failures = list(failures)
        since = replaced or {}
        lines = [
            f"  {f.operation} {f.key!r} after {f.attempts} attempt(s): "
            f"{type(f.error).__name__}: {error_text(f.error)}"
            + (
                replaced_note(since[i])
                if i in since
                else f"{_never_written(f)}{_outside(f, unjournaled) if outbox else ''}"
            )
            for i, f in enumerate(self.failures)
        ]
        open_ = [f for i, f in enumerate(self.failures) if i not in since]
        written = all(not _never_written(f) for f in open_)
        folder = shell_word(os.fspath(dirpath)) if dirpath else "DIRPATH"
        if not open_:
            then = (
                "\nNothing of them is left to persist: a later job of each key has committed since."
            )
        elif not any(not _never_written(f) for f in open_):
            then = (
                "\nNothing of them is left to retry: their files were never written (a later"
                " save of each key is persisted as usual)."
            )
        elif not outbox:
            then = (
                "\nNothing retries them: this callback has no outbox (outbox=False), so"
                " neither `lamin-lightning flush` nor the next setup knows of them. Pass"
                " outbox=True to keep failed jobs for a retry."
            )
        else:
            then = (
                "\nThey stay in the outbox next to the checkpoints: fix the cause, then run"
                f" `lamin-lightning flush {folder}` or start training again with"
                " the same dirpath."
            )
        saves = sum(f.operation == "save" for f in self.failures)
        parts = [f"{saves} checkpoint artifact(s) could not be persisted"] if saves else []
        if len(self.failures) > saves:
            # A removal's file is gone (Lightning evicted it); its artifact stays stored.
            parts.append(
                f"{len(self.failures) - saves} evicted checkpoint artifact(s) could not be"
                " deleted from the store"
            )
        head = "; ".join(parts)
        if any(f.operation == "save" for f in open_):
            head += f"; the local files {'are' if written else 'that were written are'} kept"
        super().__init__(
            f"{head}:\n"
            + "\n".join(lines)
            + then
            + (" Pass on_error='warn' to only warn." if raised else "")
        )


def replaced_note(how: str) -> str:
    """The note for a failed job that a later job of its key made moot (see
    ``Outbox._settle``): ``how`` is the later job's operation."""
    if how == "remove":
        return " (its key was removed since: nothing left to persist)"
    return " (replaced since by a later save of its key, which was persisted)"


def shell_word(text: str) -> str:
    """``text`` as one shell word: quoted only where it needs it (a space, say)."""
    return shlex.quote(text)


def _outside(failure: ArtifactFailedEvent, unjournaled: Collection[str]) -> str:
    """A note for a save a full disk kept out of the outbox: a flush will not find it."""
    if failure.operation != "save" or os.path.abspath(failure.local_path) not in unjournaled:
        return ""
    return (
        " (not in the outbox: the disk was full when it was saved, so neither"
        " `lamin-lightning flush` nor the next setup knows of it)"
    )


def _never_written(failure: ArtifactFailedEvent) -> str:
    """A note for a save whose file is not there, or whose write failed (a background
    write: what is at its path, if anything, is an earlier save's ``last.ckpt``):
    "the local files are kept" does not hold for it, and a flush drops its job."""
    if failure.operation != "save":
        return ""
    if getattr(failure.error, _NEVER_WRITTEN, False):
        return (
            f" (its write failed: {failure.local_path} was never written, nothing of it to persist)"
        )
    if os.path.lexists(failure.local_path):
        return ""
    return f" ({failure.local_path} does not exist: nothing of it to persist)"


_NEVER_WRITTEN = "_lamin_lightning_never_written"


def note_never_written(error: BaseException) -> None:
    """Mark ``error`` as the failure of a save's own write (in the background, after
    Lightning's hook returned): the failure report says the file was never written."""
    # An exception type that takes no attributes keeps its report as it was.
    with contextlib.suppress(AttributeError, TypeError):
        setattr(error, _NEVER_WRITTEN, True)


class CheckpointDirectoryError(LaminLightningError, OSError):
    """The checkpoint directory cannot hold checkpoints: not writable, or too full.

    Raised at ``setup``, before the first training step, instead of hours later.
    """


class ArgumentTypeError(LaminLightningError, ValueError, TypeError):
    """A constructor argument of the wrong type (a string where a list goes, ...).

    Both a ``ValueError`` (as every bad argument of ours) and a ``TypeError`` (Python's
    convention, and what the reference's own failures raise for the same input).
    """


class LaminSetupError(LaminLightningError, ValueError):
    """LaminDB is not ready for checkpointing (no instance, missing features, ...).

    A ``ValueError``, as the synchronous reference raises for the same problems.
    """


class CheckpointIOError(LaminLightningError, ValueError):
    """The trainer's CheckpointIO writes in the background in a way we cannot follow.

    Raised at ``setup``: staging a checkpoint before its writer finished would persist
    a partial file. The message names the CheckpointIO and what to use instead.
    """


class OutboxInUseError(LaminLightningError, RuntimeError):
    """Another process (or callback) holds this outbox: a training run still going."""


class LostFileError(PermanentError):
    """Neither the staged copy nor the local file of a journaled save exists any more."""


class UnknownStoreError(LaminLightningError, LookupError):
    """An outbox names a store that no installed package registers."""


class NotSetUpError(LaminLightningError, RuntimeError, AssertionError):
    """Something that needs ``setup`` was asked for before it (an ``AssertionError`` too,
    as the reference raises)."""


class UnknownKindError(LaminLightningError, ValueError, KeyError):
    """An artifact kind other than checkpoint, config or hparams (a ``KeyError`` too, as
    the reference raises)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def error_text(error: BaseException) -> str:
    """``str(error)``, or what can be said of an error whose ``__str__`` raises (a user's
    hook may raise one): reporting a failure must never fail itself."""
    try:
        return str(error)
    except Exception as unreadable:
        return f"<{type(error).__name__} whose message raised {type(unreadable).__name__}>"


class EventWithheld(Exception):
    """A store could not name where a committed artifact lives (a user's
    ``resolve_artifact_storage_uri`` raised; the callback has that error): the save is
    done, and no saved event is delivered for it."""


class AttemptsExhausted(Exception):
    """Internal marker carrying the last error and how many attempts were made."""

    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(error_text(error))
        self.error = error
        self.attempts = attempts
