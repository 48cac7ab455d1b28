"""Retry policy: which errors are transient, how often and how long to retry.

tenacity drives the retries but never appears in a public signature: the policy
is a plain frozen dataclass of numbers and exception names, so a LightningCLI
YAML can set every field.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

import anyio
import tenacity

from lamin_lightning._errors import (
    ArgumentTypeError,
    AttemptsExhausted,
    PermanentError,
    TransientError,
)

T = TypeVar("T")

_testing = False

DEFAULT_TRANSIENT_ERRORS: tuple[str, ...] = (
    "builtins.OSError",  # includes ConnectionError, TimeoutError, BrokenPipeError
    "builtins.TimeoutError",
    "sqlite3.OperationalError",  # "database is locked"
    "django.db.utils.OperationalError",
    "django.db.utils.InterfaceError",
    "botocore.exceptions.ConnectionError",
    "botocore.exceptions.EndpointConnectionError",
    "aiohttp.ClientError",
)
"""Exceptions treated as transient unless a policy names others."""

_NEVER_TRANSIENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def set_testing(enabled: bool = True) -> None:
    """Turn retry delays off (or back on) process-wide, for fast tests.

    Attempts are still made and counted; only the backoff sleeps are skipped.
    """
    global _testing
    _testing = enabled


def is_testing() -> bool:
    """Whether :func:`set_testing` turned retry delays off."""
    return _testing


@lru_cache(maxsize=64)
def _resolve(dotted: str) -> type[BaseException] | None:
    module_name, _, attr = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name or "builtins")
    except ImportError:
        return None
    obj = getattr(module, attr, None)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How failed persistence calls are retried.

    Delays grow exponentially from ``initial_backoff`` up to ``max_backoff``
    seconds, each with up to ``jitter`` seconds of random extra delay.

    Attributes:
        attempts: Total attempts per call, the first included (1 disables retries).
        initial_backoff: Delay before the first retry, in seconds.
        max_backoff: Upper bound of a single delay, in seconds.
        jitter: Maximum random extra delay added to each wait, in seconds.
        transient_errors: Dotted names of exception classes that are retried
            (subclasses too). Names whose module is not installed are ignored.
            :class:`TransientError` is always retried, :class:`PermanentError`,
            ``FileNotFoundError`` and ``PermissionError`` never.
    """

    attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.5
    transient_errors: tuple[str, ...] = field(default=DEFAULT_TRANSIENT_ERRORS)

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool):
            raise ArgumentTypeError(
                f"RetryPolicy(attempts=...) must be an int >= 1, got {self.attempts!r}"
            )
        if self.attempts < 1:
            raise ValueError(
                f"RetryPolicy(attempts={self.attempts}) must be >= 1 (1 means no retries)"
            )
        for name in ("initial_backoff", "max_backoff", "jitter"):
            value = getattr(self, name)
            # NaN failed every retry; an infinite first backoff or jitter slept for ever.
            # An infinite max_backoff is no cap: the backoffs stay finite.
            unbounded = name == "max_backoff" and value == math.inf
            wrong_type = isinstance(value, bool) or not isinstance(value, int | float)
            if wrong_type or not (math.isfinite(value) or unbounded) or value < 0:
                what = (
                    "a number of seconds >= 0, or inf for no cap"
                    if name == "max_backoff"
                    else ("a finite number of seconds >= 0")
                )
                error = ArgumentTypeError if wrong_type else ValueError
                raise error(f"RetryPolicy({name}={value!r}) must be {what}")
        if self.max_backoff < self.initial_backoff:
            raise ValueError(
                f"RetryPolicy(max_backoff={self.max_backoff}) must be >= "
                f"initial_backoff={self.initial_backoff}"
            )
        names: object = self.transient_errors  # typed a tuple; a user may pass anything
        if isinstance(names, str | bytes) or not isinstance(names, Iterable):
            # One name alone was taken letter by letter ("got 'b'").
            raise ArgumentTypeError(
                "RetryPolicy(transient_errors=...) takes a list of dotted exception class"
                f" names such as ['builtins.OSError'], got {names!r}"
            )
        # A YAML list arrives as a list: store a tuple so the policy stays hashable.
        object.__setattr__(self, "transient_errors", tuple(names))
        for name in self.transient_errors:
            if not isinstance(name, str) or "." not in name:
                raise (ValueError if isinstance(name, str) else ArgumentTypeError)(
                    "RetryPolicy(transient_errors=...) takes dotted exception class names"
                    f" such as 'builtins.OSError', got {name!r}"
                )

    @classmethod
    def no_delay(cls, attempts: int = 5) -> RetryPolicy:
        """A policy that retries without waiting, for tests."""
        return cls(attempts=attempts, initial_backoff=0.0, max_backoff=0.0, jitter=0.0)

    def is_transient(self, error: BaseException) -> bool:
        """Whether ``error`` is worth retrying under this policy."""
        if isinstance(error, (PermanentError, *_NEVER_TRANSIENT)):
            return False
        if isinstance(error, TransientError):
            return True
        for name in self.transient_errors:
            cls = _resolve(name)
            if cls is not None and isinstance(error, cls):
                return True
        return False

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based)."""
        if _testing:
            return 0.0
        # The exponent capped: with no max_backoff, 2.0 ** 1100 would overflow.
        base = min(self.max_backoff, self.initial_backoff * 2.0 ** min(retry_number - 1, 64))
        return float(base) + (random.uniform(0, self.jitter) if self.jitter else 0.0)


def _outcome_error(state: tenacity.RetryCallState) -> BaseException:
    error = state.outcome.exception() if state.outcome is not None else None
    return error if error is not None else RuntimeError("unknown error")


async def call_with_retries(
    policy: RetryPolicy,
    call: Callable[[], Awaitable[T]],
    on_retry: Callable[[BaseException, int], None],
) -> T:
    """Await ``call()`` under ``policy``.

    Raises:
        AttemptsExhausted: wrapping the last error when retries are exhausted or
            the error is permanent.
    """
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=lambda state: policy.backoff(state.attempt_number),
        retry=tenacity.retry_if_exception(policy.is_transient),
        sleep=anyio.sleep,
        reraise=True,
        before_sleep=lambda state: on_retry(_outcome_error(state), state.attempt_number),
    )
    attempt = 0
    try:
        async for attempt_ctx in retrying:
            attempt = attempt_ctx.retry_state.attempt_number
            with attempt_ctx:
                return await call()
    except anyio.get_cancelled_exc_class():
        raise
    except BaseException as error:
        # BaseException too: a SystemExit from a user's hook fails this job (never
        # retried: it is not transient), not the pipeline.
        raise AttemptsExhausted(error, max(attempt, 1)) from error
    raise AssertionError("unreachable: tenacity neither returned nor raised")  # pragma: no cover
