"""Fixtures for the webhook tests: one temporary Prefect server for the session, with a
`deploy/deploy` deployment whose runs are created but never executed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.webhook.helpers import deploy_stub


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API URL (temporary server and database) with `deploy/deploy` registered."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        deploy_stub.to_deployment(name="deploy").apply()
        yield PREFECT_API_URL.value()
