"""The receiver fails closed: without a webhook secret it refuses to start."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from delivery.errors import ConfigError
from delivery.settings import PROJECT_ROOT, Settings
from deployments.webhook import create_app, load_webhook_secret
from tests.webhook.helpers import RecordingStarter, closed_port, make_config

MESSAGE = (
    "no webhook secret configured: set DELIVERY_WEBHOOK_SECRET or create a Prefect Secret block "
    "and set DELIVERY_WEBHOOK_SECRET_BLOCK"
)


def test_no_secret_raises_config_error() -> None:
    """Neither a secret nor a block configured: a ConfigError that says how to fix it."""
    with pytest.raises(ConfigError) as exc:
        load_webhook_secret(Settings(_env_file=None, webhook_secret=None, webhook_secret_block=None))
    assert str(exc.value) == MESSAGE


def test_blank_secret_counts_as_none() -> None:
    """A whitespace-only DELIVERY_WEBHOOK_SECRET is not a secret."""
    with pytest.raises(ConfigError):
        load_webhook_secret(Settings(_env_file=None, webhook_secret=SecretStr("  "), webhook_secret_block=None))


def test_secret_from_settings() -> None:
    """DELIVERY_WEBHOOK_SECRET is used as is."""
    settings = Settings(_env_file=None, webhook_secret=SecretStr("from-settings-123"))
    assert load_webhook_secret(settings) == "from-settings-123"


def test_secret_from_prefect_block(prefect_api: str) -> None:
    """With only DELIVERY_WEBHOOK_SECRET_BLOCK set, the secret comes from that Prefect Secret block."""
    from prefect.blocks.system import Secret

    name = f"webhook-secret-{uuid.uuid4().hex[:8]}"
    Secret(value="from-block-456").save(name)
    settings = Settings(_env_file=None, webhook_secret=None, webhook_secret_block=name)
    assert load_webhook_secret(settings) == "from-block-456"


def test_missing_block_is_config_error(prefect_api: str) -> None:
    """A block name that does not exist stops start-up with an error naming the block."""
    settings = Settings(_env_file=None, webhook_secret=None, webhook_secret_block="no-such-block-here")
    with pytest.raises(ConfigError) as exc:
        load_webhook_secret(settings)
    assert "no-such-block-here" in str(exc.value)


def test_create_app_refuses_empty_secret() -> None:
    """The app itself cannot be built with an empty secret."""
    with pytest.raises(ConfigError):
        create_app(secret="", config_loader=make_config, starter=RecordingStarter())


def test_serve_refuses_to_start_without_secret(tmp_path: Path) -> None:
    """`serve()` in a fresh process without a secret exits with the message and never listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_WEBHOOK_SECRET")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    port = closed_port()
    proc = subprocess.run(
        [sys.executable, "-c", f"from deployments.webhook import serve; serve(port={port})"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert MESSAGE in proc.stderr
    assert "Uvicorn running" not in proc.stderr
