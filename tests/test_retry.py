"""RetryPolicy: validation, classification of errors, backoff, and the testing switch."""

from __future__ import annotations

import pickle
import sqlite3

import anyio
import pytest

from lamin_lightning import PermanentError, RetryPolicy, TransientError
from lamin_lightning._bridge import PersistencePipeline
from lamin_lightning._errors import ArgumentTypeError, AttemptsExhausted
from lamin_lightning._pipeline import JobSpec
from lamin_lightning._retry import call_with_retries
from lamin_lightning.testing import is_testing, no_retry_delays, set_testing


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"attempts": 0}, ValueError, "attempts"),
        ({"attempts": -3}, ValueError, "attempts"),
        ({"attempts": 2.5}, ArgumentTypeError, "attempts"),
        ({"attempts": True}, ArgumentTypeError, "attempts"),
        ({"initial_backoff": -1}, ValueError, "initial_backoff"),
        ({"initial_backoff": "1s"}, ArgumentTypeError, "initial_backoff"),
        ({"max_backoff": -0.1}, ValueError, "max_backoff"),
        ({"jitter": -1}, ValueError, "jitter"),
        ({"jitter": True}, ArgumentTypeError, "jitter"),
        ({"initial_backoff": 5, "max_backoff": 1}, ValueError, "max_backoff"),
        ({"transient_errors": ["OSError"]}, ValueError, "transient_errors"),
        ({"transient_errors": [3]}, ArgumentTypeError, "transient_errors"),
        # One name alone was read letter by letter ("got 'b'").
        ({"transient_errors": "builtins.OSError"}, ArgumentTypeError, "list of dotted"),
        ({"transient_errors": 3}, ArgumentTypeError, "transient_errors"),
    ],
)
def test_invalid_policy_raises_an_error_naming_the_parameter(
    kwargs: dict[str, object], error: type[Exception], names: str
) -> None:
    """Each invalid RetryPolicy field raises an error whose message names that field."""
    with pytest.raises(error, match=names):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_from_yaml_like_values_is_hashable_and_picklable() -> None:
    """A list of transient errors (as YAML gives) becomes a tuple; the policy pickles."""
    policy = RetryPolicy(attempts=2, transient_errors=["builtins.OSError"])  # type: ignore[arg-type]
    assert policy.transient_errors == ("builtins.OSError",)
    assert hash(policy) == hash(RetryPolicy(attempts=2, transient_errors=("builtins.OSError",)))
    assert pickle.loads(pickle.dumps(policy)) == policy


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError("io"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (TransientError("please retry"), True),
        (PermanentError("no"), False),
        (ValueError("bad"), False),
        (TypeError("bad"), False),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (KeyError("k"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_default_policy_classifies_errors(error: BaseException, transient: bool) -> None:
    """I/O, connection, timeout and locked-database errors are transient; the rest permanent."""
    assert RetryPolicy().is_transient(error) is transient


def test_custom_transient_errors_replace_the_defaults_and_unknown_modules_are_ignored() -> None:
    """A policy's transient_errors list decides; names of missing modules are skipped."""
    policy = RetryPolicy(transient_errors=("builtins.KeyError", "no_such_module.Error"))
    assert policy.is_transient(KeyError("k"))
    assert not policy.is_transient(ConnectionError("reset"))
    assert policy.is_transient(TransientError("always"))
    assert not policy.is_transient(type("Sub", (PermanentError, KeyError), {})("never"))


def test_backoff_grows_exponentially_up_to_the_cap_with_bounded_jitter() -> None:
    """backoff(n) doubles from initial_backoff, stops at max_backoff, adds jitter in [0, jitter]."""
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=3.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittery = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.25)
    samples = [jittery.backoff(1) for _ in range(200)]
    assert all(1.0 <= s <= 1.25 for s in samples)
    assert len(set(samples)) > 1


def test_set_testing_and_no_retry_delays_remove_the_backoff() -> None:
    """set_testing(True) and no_retry_delays() make every backoff zero, then restore it."""
    policy = RetryPolicy(initial_backoff=2.0, max_backoff=10.0, jitter=1.0)
    assert not is_testing()
    with no_retry_delays():
        assert is_testing()
        assert policy.backoff(1) == 0.0
        assert policy.backoff(5) == 0.0
    assert not is_testing()
    assert policy.backoff(1) >= 2.0
    set_testing(True)
    try:
        assert policy.backoff(3) == 0.0
    finally:
        set_testing(False)
    assert policy.backoff(3) >= 8.0


def test_no_retry_delays_makes_a_pipeline_with_long_backoff_retry_at_once() -> None:
    """Under no_retry_delays a policy with a 30 s backoff still retries within a short flush."""
    calls = 0
    done: list[object] = []

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("flaky")
        return "ok"

    slow = RetryPolicy(attempts=3, initial_backoff=30.0, max_backoff=30.0, jitter=0.0)
    pipe = PersistencePipeline(max_workers=1, max_pending=2, retry=slow, deliver=done.append)
    with no_retry_delays():
        pipe.start()
        try:
            pipe.submit(
                JobSpec(
                    operation="save",
                    key="k",
                    transfer=flaky,
                    commit=lambda r: ("saved", r),
                    fail=lambda e, a: ("failed", a),
                )
            )
            assert pipe.flush(timeout=5.0), "a 30 s backoff was slept despite no_retry_delays"
        finally:
            pipe.stop(timeout=5.0)
    assert calls == 3
    assert done == [("saved", "ok")]
    assert pipe.stats.retried == 2


def test_call_with_retries_reports_each_retry_and_the_attempts_made() -> None:
    """call_with_retries reports each retry and wraps the last error with the attempt count."""
    seen: list[tuple[str, int]] = []

    async def always_fails() -> None:
        raise ConnectionError("down")

    async def main() -> AttemptsExhausted:
        with pytest.raises(AttemptsExhausted) as info:
            await call_with_retries(
                RetryPolicy.no_delay(4),
                always_fails,
                lambda error, attempt: seen.append((type(error).__name__, attempt)),
            )
        return info.value

    exhausted = anyio.run(main)
    assert seen == [("ConnectionError", 1), ("ConnectionError", 2), ("ConnectionError", 3)]
    assert exhausted.attempts == 4
    assert isinstance(exhausted.error, ConnectionError)

    async def permanent() -> None:
        raise ValueError("bad")

    async def main_permanent() -> AttemptsExhausted:
        with pytest.raises(AttemptsExhausted) as info:
            await call_with_retries(RetryPolicy.no_delay(4), permanent, lambda e, a: None)
        return info.value

    assert anyio.run(main_permanent).attempts == 1

    async def ok() -> str:
        return "fine"

    async def main_ok() -> str:
        return await call_with_retries(RetryPolicy.no_delay(), ok, lambda e, a: None)

    assert anyio.run(main_ok) == "fine"
