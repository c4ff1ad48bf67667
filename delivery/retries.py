"""The one Prefect retry condition every task uses: retry only what trying again can fix."""

from __future__ import annotations

from typing import Any

from delivery.errors import DeliveryError


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: True only for a `DeliveryError` marked transient (connection
    refused, timeouts, 5xx, a lost push race); a 401, a broken build or a failed verdict is final."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, DeliveryError) and exc.transient
