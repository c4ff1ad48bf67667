"""One logger for plain functions: the Prefect run logger inside a flow or task run (so lines show
in the UI), the standard `delivery` logger outside one (tests, CLI). Every line is redacted."""

from __future__ import annotations

import logging
from typing import Any

from delivery.redact import redact

_fallback = logging.getLogger("delivery")


class _Redacting(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        # Keep the run logger's `extra` (flow/task run ids and names): Prefect's handlers format with them.
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return redact(str(msg)), kwargs


def get_logger() -> logging.LoggerAdapter:
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            base: Any = get_run_logger()
        except MissingContextError:
            base = _fallback
    except ImportError:  # pragma: no cover - prefect is a hard dependency
        base = _fallback
    if isinstance(base, logging.LoggerAdapter):
        return _Redacting(base.logger, base.extra)
    return _Redacting(base, {})
