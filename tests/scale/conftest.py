"""Scale tests are heavy (a PostgreSQL cluster, a Prefect server, two workers, ten deploys at once):
they run only when selected with `-m scale` (`make test-scale`), never as part of `make test`."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "scale" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="scale test: run with `make test-scale` (pytest -m scale)")
    for item in items:
        if "scale" in item.keywords:
            item.add_marker(skip)
