"""SIGTERM while teardown flushes: the uploads first, then the signal's default action.

Lightning restores the default SIGTERM handler before it calls the callbacks' ``teardown``,
so a SIGTERM then (a preemption notice while the last uploads finish) would end the
process at once, mid-flush, with no warning. Inside :func:`sigterm_after_flush` it is
held: a warning says so, the flush goes on (it is bounded by ``flush_timeout``, as after
a SIGTERM during training), and the signal is raised again at the end, so that the
process still ends as the sender asked. Nothing is changed where the handler is not
the default one (a user's own handler, or Lightning's, still installed) or off the main
thread (where Python cannot set handlers).
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
