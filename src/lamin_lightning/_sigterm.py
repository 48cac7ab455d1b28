"""SIGTERM while teardown flushes: the uploads first, then the signal's default action.

Lightning restores the default SIGTERM handler before it calls the callbacks' ``teardown``,
so a SIGTERM then (a preemption notice while the last uploads finish) would end the
process at once, mid-flush, with no warning. Inside :func:`sigterm_after_flush` it is
held: a warning says so, the flush goes on (it is bounded by ``flush_timeout``, as after
a SIGTERM during training), and the signal is raised again at the end, so that the
process still ends as the sender asked. Nothing is changed where the handler is not
the default one (a user's own handler, or Lightning's, still installed) or off the main
thread (where Python cannot set handlers).

Ctrl+C while a strategy or CheckpointIO of the user's removes an evicted file: inside
:func:`ctrl_c_after` a first Ctrl+C is held until the removal returned and its journal
mark is made, then raised as ``KeyboardInterrupt``; a second one is raised at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("lamin_lightning")

try:  # the C module under ``signal``: the same handlers, not wrapped in enums
    import _signal as _signals  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - another Python implementation
    _signals = signal
_SIGINT = int(signal.SIGINT)


@contextmanager
def sigterm_after_flush(flush_timeout: float | None) -> Iterator[None]:
    """Hold a SIGTERM received inside until the end, then raise it again (see above)."""
    sigterm = getattr(signal, "SIGTERM", None)
    if (
        sigterm is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(sigterm) is not signal.SIG_DFL
    ):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if not received:
            limit = "" if flush_timeout is None else f" (up to flush_timeout={flush_timeout}s)"
            log.warning(
                "lamin-lightning: SIGTERM received while the last checkpoints are persisted;"
                " finishing that first%s, then the process ends as SIGTERM asks",
                limit,
            )
        received.append(signum)

    signal.signal(sigterm, hold)
    try:
        yield
    finally:
        if signal.getsignal(sigterm) is hold:
            signal.signal(sigterm, signal.SIG_DFL)
        if received:
            os.kill(os.getpid(), sigterm)


@contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Hold a first Ctrl+C (SIGINT) received inside until the end, then raise
    ``KeyboardInterrupt``; a second one inside raises at once (a removal that hangs).
    Only where Python's own handler is installed, on the main thread.

    A Ctrl+C lands between any two bytecodes: raised inside a user's removal of an evicted
    file, after it did its work (kept the file, archived it) but before its journal mark,
    it left a replay keeping the evicted checkpoint's artifact, as for a removal never
    made. Held, the removal and its mark end together, or (a second Ctrl+C) neither is
    known to have happened.

    A save's path holds a few times (each step and the journal line recording it), so the
    handlers are read and set through ``_signal``, as ``signal`` does, without its
    conversion of each to an enum: that doubled a hold's cost on the training thread."""
    if (
        threading.get_ident() != threading.main_thread().ident
        or _signals.getsignal(_SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    _signals.signal(_SIGINT, hold)
    try:
        yield
    except Exception:
        if received:
            # Held, then the block raised (a user's resolver, a full disk): unheld, the
            # Ctrl+C had been raised first, where it landed; dropped, it stopped nothing.
            raise KeyboardInterrupt  # noqa: B904 - the error stays its __context__
        raise
    finally:
        if _signals.getsignal(_SIGINT) is hold:
            _signals.signal(_SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
