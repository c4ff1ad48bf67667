"""Shared test set-up. Area fixtures live in each area's own conftest; the sandbox fixture is a
plugin so every area can use it."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# A release whose readiness never passes fails after this grace (default 30 s); the sample app is
# ready within about 2 s on both tiers, so 20 s still leaves a wide margin.
os.environ.setdefault("DELIVERY_READINESS_GRACE_SECONDS", "20")

import pytest  # noqa: E402

pytest_plugins = ["tests.fixtures_sandbox"]


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for the whole session (starting one costs seconds)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
