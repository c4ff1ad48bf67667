"""Registry credentials from settings or a Prefect Secret block, and the Prefect task layer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.blocks.system import Secret
from prefect.states import Failed
from pydantic import SecretStr

from delivery.errors import BuildError, ConfigError, PushError
from delivery.retries import retry_if_transient as _retry_if_transient
from delivery.settings import Settings
from tasks.images import (
    build_image_task,
    classify_push_error,
    image_exists,
    push_image_task,
    registry_credentials,
)

PASSWORD = "block-held-pass-5e2d9"  # secret-scan: allow


@pytest.fixture(scope="module")
def prefect_harness(prefect_api) -> Iterator[None]:
    """The session's Prefect server (tests/conftest.py): one start-up for the whole suite."""
    yield


def test_no_credentials_configured_means_anonymous() -> None:
    """Without a username or password the registry is used anonymously."""
    assert registry_credentials(Settings(_env_file=None)) is None


def test_credentials_from_settings_stay_secret() -> None:
    """Username and password come from settings; the password is not shown when the object is printed."""
    creds = registry_credentials(Settings(_env_file=None, registry_username="bob",
                                          registry_password=SecretStr("settings-pass-1234")))
    assert creds is not None
    assert creds.username == "bob"
    assert creds.password.get_secret_value() == "settings-pass-1234"
    assert "settings-pass-1234" not in repr(creds)


def test_password_without_username_is_a_config_error() -> None:
    """A password with no username is refused, without echoing the password."""
    with pytest.raises(ConfigError, match="USERNAME") as e:
        registry_credentials(Settings(_env_file=None, registry_password=SecretStr("lonely-pass-1234")))
    assert "lonely-pass-1234" not in str(e.value)


def test_credentials_from_prefect_secret_block(prefect_harness: None) -> None:
    """The password can live in a Prefect Secret block named by the settings."""
    Secret(value=PASSWORD).save("registry-test-password", overwrite=True)
    creds = registry_credentials(Settings(_env_file=None, registry_username="carol",
                                          registry_password_block="registry-test-password"))
    assert creds is not None and creds.username == "carol"
    assert creds.password.get_secret_value() == PASSWORD


def test_missing_secret_block_is_a_config_error(prefect_harness: None) -> None:
    """A Secret block that does not exist gives a ConfigError naming the block."""
    with pytest.raises(ConfigError, match="no-such-block"):
        registry_credentials(Settings(_env_file=None, registry_username="carol",
                                      registry_password_block="no-such-block"))


@pytest.mark.parametrize(
    ("message", "transient", "reason"),
    [
        ("unauthorized: authentication required", False, "unauthorized"),
        ("no basic auth credentials", False, "unauthorized"),
        ("denied: requested access to the resource is denied", False, "denied"),
        ("name unknown: repository name not known to registry", False, "not found"),
        ("An image does not exist locally with the tag: x", False, "not found"),
        ('Get "http://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused', True, "unreachable"),
        ("received unexpected HTTP status: 503 Service Unavailable", True, "unreachable"),
        ("Patch http://r/v2/x/blobs/uploads/1: EOF", True, "unreachable"),
        ("net/http: TLS handshake timeout", True, "unreachable"),
    ],
)
def test_push_errors_are_classified(message: str, transient: bool, reason: str) -> None:
    """Errors the engine reports in the push stream are sorted into retry-worthy and not."""
    got_transient, got_reason = classify_push_error(message)
    assert got_transient is transient
    assert reason in got_reason


def test_task_retry_condition_only_retries_transient_errors() -> None:
    """The Prefect retry condition retries transient delivery errors and nothing else."""
    assert _retry_if_transient(None, None, Failed(data=PushError("registry down", transient=True)))
    assert not _retry_if_transient(None, None, Failed(data=PushError("unauthorized", transient=False)))
    assert not _retry_if_transient(None, None, Failed(data=BuildError("RUN failed")))
    assert not _retry_if_transient(None, None, Failed(data=ValueError("bug")))
    # One retry layer: push_image retries within its bound, so the task adds none.
    assert push_image_task.retries == 0
    assert build_image_task.retries == 0
    assert (build_image_task.name, push_image_task.name) == ("build-image", "push-image")


def test_tasks_build_and_push_in_a_flow(prefect_harness: None, context_dir: Path, shared_repo: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Inside a flow, the tasks build, push and find the image, and build output shows in the run log."""
    caplog.set_level(logging.INFO)

    @flow
    def ship() -> tuple[str, bool]:
        built = build_image_task(context_dir, shared_repo, ["main-1234567", "main"])
        pushed = push_image_task(built.repository, built.tags)
        return pushed.digest, image_exists(shared_repo, "main")

    digest, exists = ship()
    assert digest.startswith("sha256:") and exists
    assert "building-step-output" in caplog.text
