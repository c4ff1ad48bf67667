"""Shared test set-up. Area fixtures live in each area's own conftest; the sandbox fixture is a
plugin so every area can use it."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
