"""Push against private registries that a test can stop, restart, or protect with htpasswd."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import docker
import pytest
from pydantic import SecretStr

from delivery.errors import BuildError, PushError, RegistryError
from sandbox.engine import BASE_IMAGE
from tasks.images import RegistryCredentials, build_image, image_exists, manifest_digest, push_image

from .conftest import PrivateRegistry

PASSWORD = "s3cret-registry-pass-7f1c"  # secret-scan: allow
WRONG = "wrong-registry-pass-93ab"  # secret-scan: allow


def _tag_base(repo: str, tag: str, local_images: list[str]) -> None:
    local_images.append(repo)
    client = docker.from_env()
    client.api.tag(BASE_IMAGE, repo, tag)
    client.close()


def test_stopped_registry_fails_within_bound_after_retrying(
    make_registry: Callable[..., PrivateRegistry], local_images: list[str]
) -> None:
    """With the registry down, push retries, then gives up within its bound naming attempts and the last error."""
    reg = make_registry()
    repo = f"{reg.addr}/down"
    _tag_base(repo, "t1", local_images)
    reg.stop()
    started = time.monotonic()
    with pytest.raises(PushError) as e:
        push_image(repo, ["t1"], max_attempts=3, max_seconds=8)
    elapsed = time.monotonic() - started
    err = e.value
    assert err.transient
    assert err.attempts == 3
    assert "gave up after 3 attempt(s)" in str(err)
    assert "retried" in str(err)
    assert "connection refused" in str(err)
    assert elapsed < 60  # bounded; generous for a slow shared machine


def test_time_bound_stops_retrying(make_registry: Callable[..., PrivateRegistry], local_images: list[str]) -> None:
    """A small time bound stops the retries before the attempt bound is used up."""
    reg = make_registry()
    repo = f"{reg.addr}/slow"
    _tag_base(repo, "t1", local_images)
    reg.stop()
    with pytest.raises(PushError) as e:
        push_image(repo, ["t1"], max_attempts=100, max_seconds=2)
    assert e.value.transient
    assert 1 <= e.value.attempts < 100


def test_registry_coming_back_during_push_succeeds(
    make_registry: Callable[..., PrivateRegistry], local_images: list[str]
) -> None:
    """A registry that comes back while push is retrying gets the image, and the registry serves its digest."""
    reg = make_registry()
    repo = f"{reg.addr}/flaky"
    _tag_base(repo, "t1", local_images)
    _tag_base(repo, "t1-extra", local_images)
    reg.stop()
    restarter = threading.Timer(1.5, reg.start)
    restarter.start()
    try:
        pushed = push_image(repo, ["t1", "t1-extra"], max_attempts=30, max_seconds=90)
    finally:
        restarter.join()
    assert pushed.attempts > 1
    assert manifest_digest(repo, "t1") == pushed.digest
    assert manifest_digest(repo, "t1-extra") == pushed.digest


def test_wrong_credentials_fail_at_once_and_right_ones_push(
    make_registry: Callable[..., PrivateRegistry], local_images: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Against an htpasswd registry, a wrong password fails once with 'unauthorized'; the right one pushes."""
    caplog.set_level(logging.DEBUG, logger="delivery")
    reg = make_registry(htpasswd={"alice": PASSWORD})
    repo = f"{reg.addr}/private-app"
    _tag_base(repo, "t1", local_images)

    with pytest.raises(PushError) as e:
        push_image(repo, ["t1"], credentials=RegistryCredentials("alice", SecretStr(WRONG)), max_attempts=5)
    assert not e.value.transient
    assert e.value.attempts == 1
    assert "unauthorized" in str(e.value)
    assert WRONG not in str(e.value)

    with pytest.raises(PushError, match="unauthorized") as e:
        push_image(repo, ["t1"], credentials=None, max_attempts=5)
    assert e.value.attempts == 1

    creds = RegistryCredentials("alice", SecretStr(PASSWORD))
    pushed = push_image(repo, ["t1"], credentials=creds)
    assert image_exists(repo, "t1", credentials=creds)
    assert manifest_digest(repo, "t1", credentials=creds) == pushed.digest

    with pytest.raises(RegistryError, match="unauthorized") as re_err:
        image_exists(repo, "t1")
    assert not re_err.value.transient

    for text in (caplog.text, repr(creds), str(creds)):
        assert PASSWORD not in text
        assert WRONG not in text


def test_password_never_in_build_logs_or_errors(
    context_dir, shared_repo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry password echoed by a failing build shows neither in the log nor in the BuildError."""
    caplog.set_level(logging.DEBUG, logger="delivery")
    RegistryCredentials("alice", SecretStr(PASSWORD))  # registering it is what protects later output
    (context_dir / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nARG PW\nRUN echo \"leaking $PW now\" && exit 3\n"
    )
    with pytest.raises(BuildError) as e:
        build_image(context_dir, shared_repo, ["t1"], build_args={"PW": PASSWORD})
    assert "leaking *** now" in caplog.text
    assert PASSWORD not in caplog.text
    assert PASSWORD not in str(e.value)
    assert PASSWORD not in e.value.step
    assert all(PASSWORD not in line for line in e.value.output_tail)


def test_image_exists_on_a_stopped_registry_is_transient(make_registry: Callable[..., PrivateRegistry]) -> None:
    """Asking a registry that does not answer raises a transient RegistryError, not False."""
    reg = make_registry()
    reg.stop()
    with pytest.raises(RegistryError, match="unreachable") as e:
        image_exists(f"{reg.addr}/anything", "t1", timeout=2)
    assert e.value.transient
