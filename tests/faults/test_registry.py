"""The registry goes away in the middle of an image push: bounded retries, then either the deploy
completes (it came back in time) or the flow fails before anything reaches Git."""

from __future__ import annotations

import pytest

from flows.deploy import deploy
from tasks.images import image_exists
from tests.faults.conftest import FAST, FaultEnv, SourceClone, app_version, remote_head, remote_log

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "staging", "main"
# A layer big enough that its upload is still streaming when the registry is killed.
BALLAST = "head -c 67108864 /dev/urandom > /app/ballast.bin"


def _upload_started(fe: FaultEnv) -> str:
    return f'"POST /v2/{fe.image.split("/", 1)[1]}/blobs/uploads/'


def test_registry_back_in_time_deploy_completes(settings_of: FaultEnv, source: SourceClone) -> None:
    """Registry killed mid-push and back 2 s later: the push is retried and the deploy completes."""
    fe = settings_of
    sha = source.commit(BRANCH, "registry blip", dockerfile_run=BALLAST)
    killed = fe.registry.kill_on_request(_upload_started(fe), restart_after=2)
    try:
        state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                       return_state=True, **FAST)
    finally:
        if not fe.registry.up:
            fe.registry.start()
    assert killed.is_set(), "the registry was never killed: the push did not reach it"
    assert state.is_completed(), state.message
    tag = f"main-{sha[:7]}"
    assert image_exists(fe.image, tag)
    assert app_version(fe.health_url(ENV)) == tag
    assert remote_log(fe.gitops, fe.values(ENV))[0][1].endswith(tag)


def test_registry_gone_for_good_fails_before_git(settings_of: FaultEnv, source: SourceClone) -> None:
    """Registry killed mid-push and left down: the push gives up after bounded retries; Git is untouched."""
    fe = settings_of
    sha = source.commit(BRANCH, "registry gone", dockerfile_run=BALLAST)
    before = remote_head(fe.gitops)
    serving = app_version(fe.health_url(ENV))
    killed = fe.registry.kill_on_request(_upload_started(fe))
    try:
        state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                       return_state=True, **FAST)
    finally:
        fe.registry.kill()
        fe.registry.start()
    assert killed.is_set()
    assert state.is_failed()
    assert "PushError" in state.message and "gave up after" in state.message, state.message
    assert remote_head(fe.gitops) == before
    assert not image_exists(fe.image, f"main-{sha[:7]}")
    assert app_version(fe.health_url(ENV)) == serving
