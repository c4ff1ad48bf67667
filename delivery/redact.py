"""Keep credentials out of log lines and error messages.

Git remote URLs may carry a token (`https://x-access-token:<token>@github.com/...`); registry and
webhook secrets are known values. Everything that leaves a task as text goes through `redact`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")

_known_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that `redact` masks it wherever it appears."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Mask URL userinfo and every known secret in `text`."""
    out = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)
    for s in (*_known_secrets, *secrets):
        if s and len(s) >= 4:
            out = out.replace(s, "***")
    return out
