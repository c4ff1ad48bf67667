"""The GitOps remote accepts connections and never answers (a real HTTP Git server that goes silent):
the stage that hit it fails within the configured bound, naming the remote and the seconds; the
report is published; the environment's lock is free again; and a hang after the values commit still
goes through the rollback path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.concurrency.sync import concurrency
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.runs import ensure_lock
from delivery.settings import get_settings
from flows.deploy import deploy
from flows.rollback import rollback
from tests.faults.conftest import FAST, FaultEnv, SourceClone, app_version, remote_file, remote_head, wait_for
from tests.git_http import GitHttpServer

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

APP, ENV, BRANCH = "workout-api", "dev", "release-dev"
TOKEN = "ghp_gitHangFaultTest4242"  # secret-scan: allow (test fixture)
BOUND = {"DELIVERY_GIT_TIMEOUT_SECONDS": "2", "DELIVERY_GIT_RETRY_ATTEMPTS": "2", "DELIVERY_GIT_RETRY_SECONDS": "20"}


def _report() -> str:
    async def read() -> str:
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                f"deploy-{APP}-{ENV}"])), sort=ArtifactSort.CREATED_DESC, limit=1)
            return str(arts[0].data) if arts else ""
    return run_coro_as_sync(read())


def _tag_in_git(fe: FaultEnv) -> str:
    from ruamel.yaml import YAML

    return str(YAML().load(remote_file(fe.gitops, fe.values(ENV)))["image"]["tag"])


@pytest.fixture
def over_http(settings_of: FaultEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GitHttpServer]:
    """The faults' GitOps remote served over token-authenticated HTTP, and a config that uses that URL."""
    fe = settings_of
    with GitHttpServer(fe.gitops.parent, TOKEN) as server:
        config = tmp_path / "delivery.yaml"
        text = fe.config_file.read_text()
        assert str(fe.gitops) in text
        config.write_text(text.replace(str(fe.gitops), server.url(fe.gitops.name)))
        for k, v in {**BOUND, "DELIVERY_CONFIG_FILE": str(config), "DELIVERY_GIT_TOKEN": TOKEN}.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        yield server
        server.hang.clear()
    get_settings.cache_clear()


def _lock_is_free() -> bool:
    with concurrency(ensure_lock(APP, ENV), occupy=1, strict=True, timeout_seconds=5, lease_duration=60):
        return True


def test_hang_before_the_commit_fails_the_stage_and_frees_the_lock(over_http: GitHttpServer, settings_of: FaultEnv,
                                                                    source: SourceClone) -> None:
    fe = settings_of
    url = over_http.url(fe.gitops.name)
    sha = source.commit(BRANCH, "git hangs")
    before = remote_head(fe.gitops)
    serving = app_version(fe.health_url(ENV))
    over_http.hang.set()
    state = deploy(app=APP, environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha, return_state=True,
                   **FAST)
    assert state.is_failed()
    msg = state.message or ""
    # Two attempts of 2 s each, as the settings bound it; the remote and the seconds are named.
    # A clone, or a fetch into the environment's clone an earlier run left: either way, named and bounded.
    assert "gave up after 2 attempt(s)" in msg and f"{url} did not finish within 2 s" in msg, msg
    assert over_http.hung >= 2
    report = _report()
    assert "gitops-checkout" in report and "did not finish within 2 s" in report, report
    assert "Git names" in report or "git_names" in report or "unknown" in report, report
    assert _lock_is_free()
    assert remote_head(fe.gitops) == before
    assert app_version(fe.health_url(ENV)) == serving
    assert TOKEN not in msg and TOKEN not in report


def test_hang_after_the_commit_still_takes_the_rollback_path(over_http: GitHttpServer, settings_of: FaultEnv,
                                                             source: SourceClone) -> None:
    """The values commit lands, then Git goes silent and the release crashes: the run still goes to the
    rollback path (the replaced tag is the target, since the records cannot be read), reports that the
    rollback could not reach Git, and frees the lock; once Git answers again a rollback restores it."""
    fe = settings_of
    url = over_http.url(fe.gitops.name)
    wait_for(lambda: app_version(fe.health_url(ENV)) == _tag_in_git(fe), 90, "dev serving what Git names")
    good = _tag_in_git(fe)
    sha = source.commit(BRANCH, "crash while git hangs", crash=True)
    bad = f"release-dev-{sha[:7]}"
    over_http.hang_after_push = True
    state = deploy(app=APP, environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha, return_state=True,
                   **FAST)
    assert over_http.pushes == 1 and over_http.hang.is_set()
    assert _tag_in_git(fe) == bad, "the values commit landed before the hang"
    assert state.is_failed()
    msg = state.message or ""
    assert f"deploy of {bad} to {ENV} failed" in msg, msg
    assert f"the rollback to {good} did not complete" in msg and "did not finish within 2 s" in msg, msg
    assert url in msg, msg
    assert _lock_is_free()

    # Git answers again: the rollback a user starts from the UI puts the good tag back, verified.
    over_http.hang.clear()
    over_http.hang_after_push = False
    result = rollback(app=APP, environment=ENV, to_tag=good, reason="git answered again", **FAST)
    assert result["serving"] == good
    assert _tag_in_git(fe) == good
    assert app_version(fe.health_url(ENV)) == good
    assert os.environ["DELIVERY_GIT_TOKEN"] == TOKEN
