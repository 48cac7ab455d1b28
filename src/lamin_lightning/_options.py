"""The asynchronous knobs: defaults and validation, once, at construction.

Every error names the parameter and says what to pass instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

from lamin_lightning._errors import ArgumentTypeError
from lamin_lightning._retry import RetryPolicy

OnError = Literal["raise", "warn"]
ON_ERROR_VALUES = ("raise", "warn")

DEFAULT_MAX_WORKERS = 2
MAX_WORKERS_LIMIT = 256
"""Most transfers at once: one thread each (a typo such as 10**9 would start threads until
the process runs out)."""
DEFAULT_MAX_PENDING = 4
DEFAULT_FLUSH_TIMEOUT = 900.0


def as_float(value: Any) -> float | None:
    """A score or metric as a float (tensors of one element too), or None."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def validate_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    wrong_type = isinstance(value, bool) or not isinstance(value, int)
    if wrong_type or value < minimum or (maximum is not None and value > maximum):
        error = ArgumentTypeError if wrong_type else ValueError
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise error(f"{name} must be an integer {bounds}, got {value!r}")
    return value  # type: ignore[no-any-return]


def validate_retry(value: Any) -> RetryPolicy:
    if value is None:
        return RetryPolicy()
    if isinstance(value, RetryPolicy):
        return value
    if isinstance(value, Mapping) or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            return RetryPolicy(**value) if isinstance(value, Mapping) else RetryPolicy(value)
        except (TypeError, ValueError) as error:
            kind = ArgumentTypeError if isinstance(error, TypeError) else ValueError
            raise kind(
                f"retry={value!r} is not a valid retry policy: {error}. Pass a number of"
                " attempts >= 1 or a mapping of RetryPolicy fields (attempts, initial_backoff,"
                " max_backoff, jitter, transient_errors)"
            ) from error
    raise ArgumentTypeError(
        "retry must be a lamin_lightning.RetryPolicy, a mapping of its fields"
        f" (attempts, initial_backoff, max_backoff, jitter, transient_errors) or an int"
        f" number of attempts, got {value!r}"
    )


def validate_flush_timeout(value: Any, name: str = "flush_timeout") -> float | None:
    """Seconds to wait (``inf``: None, without limit); else an error naming ``name``."""
    if value is None:
        return None
    # numbers.Real: numpy's numbers too (a timeout computed with numpy).
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if wrong_type or not value >= 0:
        error = ArgumentTypeError if wrong_type else ValueError
        raise error(
            f"{name} must be a number of seconds >= 0, or None to wait without limit, got {value!r}"
        )
    if math.isinf(value):
        return None
    return float(value)


def validate_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; otherwise a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return value


def validate_on_error(value: Any) -> OnError:
    """``"raise"`` or ``"warn"``; otherwise a ValueError naming ``on_error``."""
    if value not in ON_ERROR_VALUES:
        error = ValueError if isinstance(value, str) else ArgumentTypeError
        raise error(f"on_error must be one of {ON_ERROR_VALUES}, got {value!r}")
    return value  # type: ignore[no-any-return]
