"""One logger for plain functions: the Prefect run logger inside a flow or task run (so lines show
in the UI), the standard `delivery` logger outside one (tests, CLI). Every line is redacted."""

from __future__ import annotations

import logging
from typing import Any

from delivery.redact import redact

_fallback = logging.getLogger("delivery")


class _Redacting(logging.LoggerAdapter):
    """Redacts the line as it will read: `%s` arguments are formatted in first (a secret passed as an
    argument must not slip through), and an exception's text joins the line instead of a raw traceback."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        text = str(msg)
        if args:
            try:
                text = text % args
            except (TypeError, ValueError):
                text = " ".join([text, *map(str, args)])
        exc_info = kwargs.pop("exc_info", None)
        if exc_info:
            exc = exc_info if isinstance(exc_info, BaseException) else None
            if exc is None and isinstance(exc_info, tuple):
                exc = exc_info[1]
            if exc is None:
                import sys

                exc = sys.exc_info()[1]
            if exc is not None:
                text = f"{text}: {type(exc).__name__}: {exc}"
        kwargs.pop("stack_info", None)
        # Keep the run logger's `extra` (flow/task run ids and names): Prefect's handlers format with them.
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        self.logger.log(level, redact(text), **kwargs)


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
