"""Waits: a pure verdict on one observed state, and a bounded loop that follows a stream of states.

Every wait in the pipeline is split the same way: a pure function judges one status document
(`wait`, `done` or `failed`, with a reason a person can read), and a loop feeds it the states a
watch delivers until the verdict settles or the deadline passes. The loop remembers the last state
and verdict so that a timeout error can say what it saw last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    state: Literal["wait", "done", "failed"]
    reason: str
    # What the loop could do to move things along (e.g. "refresh": ask for a new compare); the
    # predicate stays pure and the loop decides whether and how often to act on it.
    hint: str = ""

    @classmethod
    def wait(cls, reason: str, hint: str = "") -> Verdict:
        return cls("wait", reason, hint)

    @classmethod
    def done(cls, reason: str) -> Verdict:
        return cls("done", reason)

    @classmethod
    def failed(cls, reason: str) -> Verdict:
        return cls("failed", reason)

    @property
    def settled(self) -> bool:
        return self.state != "wait"


@dataclass(frozen=True)
class WaitOutcome(Generic[T]):
    """How a wait ended: settled on a verdict, or ran out of states (the deadline passed)."""

    state: T | None
    verdict: Verdict
    elapsed_s: float
    seen_any: bool

    @property
    def timed_out(self) -> bool:
        return not self.verdict.settled


def follow(
    states: Iterable[T],
    judge: Callable[[T], Verdict],
    *,
    change_key: Callable[[T], Hashable] | None = None,
    on_change: Callable[[T, Verdict, float], None] | None = None,
) -> WaitOutcome[T]:
    """Judge each state from `states` until a verdict settles or the iterable ends.

    `states` is expected to end by itself at its deadline (a bounded watch does); `on_change` is
    called once per distinct `change_key(state)` so that logs show transitions, not every event.
    """
    started = time.monotonic()
    last_state: T | None = None
    verdict = Verdict.wait("no status observed yet")
    last_key: object = object()
    seen = False
    try:
        for state in states:
            seen = True
            last_state = state
            verdict = judge(state)
            key = (change_key(state) if change_key else state, verdict.state)
            if key != last_key:
                last_key = key
                if on_change is not None:
                    on_change(state, verdict, time.monotonic() - started)
            if verdict.settled:
                break
    finally:
        # Stop the underlying watch (close its HTTP stream) as soon as we stop reading.
        close = getattr(states, "close", None)
        if callable(close):
            close()
    return WaitOutcome(last_state, verdict, time.monotonic() - started, seen)
