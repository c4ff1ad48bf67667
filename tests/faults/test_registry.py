"""The registry goes away in the middle of an image push: bounded retries, then either the deploy
completes (it came back in time) or the flow fails before anything reaches Git."""

from __future__ import annotations

import time

import docker
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.errors import PushError
from delivery.settings import get_settings
from flows.deploy import deploy
from tasks.images import image_exists, push_image
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


def _push_task_runs(flow_run_id) -> list:
    async def read() -> list:
        async with get_client() as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [r for r in runs if r.name.startswith("push-image")]
    return run_coro_as_sync(read())


def test_stopped_registry_push_ends_at_the_seconds_bound(settings_of: FaultEnv,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the registry stopped and room for many attempts, the push ends when the seconds bound is
    spent (not before it, not long after it), and says how many attempts it made in that time."""
    fe = settings_of
    monkeypatch.setenv("DELIVERY_PUSH_RETRY_ATTEMPTS", "1000")
    monkeypatch.setenv("DELIVERY_PUSH_RETRY_SECONDS", "6")
    get_settings.cache_clear()
    client = docker.from_env(timeout=60)
    try:
        client.images.get(f"{fe.image}:{fe.state.initial_tag}").tag(fe.image, "bound-test")
    finally:
        client.close()
    fe.registry.kill()
    try:
        started = time.monotonic()
        with pytest.raises(PushError) as err:
            push_image(fe.image, ["bound-test"])
        elapsed = time.monotonic() - started
    finally:
        fe.registry.start()
    msg = str(err.value)
    attempts = err.value.attempts
    assert f"gave up after {attempts} attempt(s)" in msg and "bound: 1000 attempts, 6 s" in msg, msg
    assert 3 <= attempts < 1000, msg
    assert 5.5 <= elapsed <= 12, elapsed


def test_registry_gone_for_good_fails_before_git(settings_of: FaultEnv, source: SourceClone,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry killed mid-push and left down: the push gives up after exactly the configured attempts,
    in one task run (one retry layer), within the configured seconds; Git is untouched."""
    fe = settings_of
    monkeypatch.setenv("DELIVERY_PUSH_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("DELIVERY_PUSH_RETRY_SECONDS", "60")
    get_settings.cache_clear()
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
    assert "PushError" in state.message, state.message
    assert "gave up after 3 attempt(s)" in state.message and "bound: 3 attempts, 60 s" in state.message, state.message
    pushes = _push_task_runs(state.state_details.flow_run_id)
    assert len(pushes) == 1 and pushes[0].run_count == 1, [(r.name, r.run_count) for r in pushes]
    assert remote_head(fe.gitops) == before
    assert not image_exists(fe.image, f"main-{sha[:7]}")
    assert app_version(fe.health_url(ENV)) == serving
