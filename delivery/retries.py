"""The one retry layer: a plain function retries what trying again can fix, within attempts and seconds
from settings, and its last error says how many attempts it made in how long. Prefect tasks around
such functions have no retries of their own, so the bounds the README states are the bounds that hold.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from delivery.errors import DeliveryError
from delivery.log import get_logger

T = TypeVar("T")


def with_retries(fn: Callable[[], T], *, what: str, attempts: int, seconds: float,
                 base: float = 0.5, cap: float = 8.0) -> T:
    """`fn()`, retried on a transient `DeliveryError` until `attempts` calls or `seconds` have passed.

    Backoff is exponential with jitter and never sleeps past the deadline. A final failure re-raises
    the same error type, transient, naming the attempts, the seconds spent and the last error; a
    non-transient error is raised at once, unchanged."""
    log = get_logger()
    started = time.monotonic()
    deadline = started + seconds
    n = 0
    while True:
        n += 1
        try:
            return fn()
        except DeliveryError as e:
            if not e.transient:
                raise
            now = time.monotonic()
            if n >= attempts or now >= deadline:
                err = type(e).__new__(type(e))
                DeliveryError.__init__(
                    err, f"{what} gave up after {n} attempt(s) in {now - started:.1f} s (bound: {attempts} "
                    f"attempts, {seconds:g} s); last error: {e.message}", transient=True)
                err.attempts = n  # type: ignore[attr-defined]
                raise err from e
            delay = min(cap, base * 2 ** (n - 1)) * random.uniform(0.5, 1.0)  # noqa: S311 - not crypto
            delay = max(0.0, min(delay, deadline - now))
            log.warning(f"{what}: attempt {n}/{attempts} failed ({e.message}); retrying in {delay:.1f} s")
            time.sleep(delay)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`, for the tasks whose retry layer is Prefect's (no loop inside):
    True only for a `DeliveryError` marked transient (connection refused, timeouts, 5xx); a 401, a
    broken build or a failed verdict is final."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, DeliveryError) and exc.transient
