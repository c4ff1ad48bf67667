"""The deploy and rollback flows report to GitHub on their own (commit statuses per stage, a Deployment
per run), against the fake GitHub that checks every request with GitHub's REST description."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from delivery.settings import get_settings
from tests.flows.test_deploy import _deploy, _env, _report, _tag
from tests.github.conftest import TOKEN, fake_github, github_openapi  # noqa: F401 - fixtures used by name
from tests.github.fake_github import FakeGitHub

pytestmark = pytest.mark.github

REPO = "octo-org/workout-api"
STAGES = ("build", "push", "commit", "argocd-sync", "rollout", "health")


@pytest.fixture
def github_on(fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:  # noqa: F811
    """The flows' settings point their GitHub feedback at the fake, with short bounds."""
    monkeypatch.setenv("DELIVERY_GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("DELIVERY_GITHUB_API_URL", fake_github.url)
    monkeypatch.setenv("DELIVERY_GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("DELIVERY_GITHUB_TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("DELIVERY_GITHUB_RETRY_SECONDS", "4")
    get_settings.cache_clear()
    yield fake_github
    get_settings.cache_clear()


def _deployments(fake: FakeGitHub, sha: str) -> list[dict]:
    return sorted((d for d in fake.deployments.values() if d["sha"] == sha), key=lambda d: d["id"])


def test_a_deploy_shows_each_stage_and_a_successful_deployment(stack, source, github_on: FakeGitHub) -> None:
    """A verified deploy turns every stage and delivery/dev green on its commit; its Deployment ends success,
    every status links the run, and the token appears nowhere in the report."""
    sha = source.commit("release-dev", note="github feedback good")
    state = _deploy(sha)
    assert state.is_completed(), state.message

    assert github_on.latest_statuses(sha) == {**{f"delivery/{s}": "success" for s in STAGES},
                                              "delivery/dev": "success"}
    run_id = str(state.state_details.flow_run_id)
    assert all(run_id in (s["target_url"] or "") for s in github_on.statuses(sha))
    [dep] = _deployments(github_on, sha)
    assert dep["environment"] == "dev" and dep["payload"]["tag"] == _tag(sha)
    assert github_on.deployment_states(dep["id"]) == ["queued", "in_progress", "success"]
    assert github_on.deployment_statuses[dep["id"]][-1]["environment_url"] == _env().health_url
    report = _report()
    assert TOKEN not in report
    assert "GitHub" not in report.split("## Notes")[-1] if "## Notes" in report else True, report


def test_a_failed_deploy_and_its_rollback_each_have_a_deployment(stack, source, github_on: FakeGitHub) -> None:
    """A release that never gets healthy: its health stage and delivery/dev fail on its commit, its
    Deployment ends failure, and the automatic rollback has a Deployment of its own (for the good
    release's commit) that ends success."""
    good = source.commit("release-dev", note="github feedback good before bad")
    assert _deploy(good).is_completed()
    bad = source.commit("release-dev", healthy=False, note="github feedback bad")
    assert _deploy(bad).is_failed()

    latest = github_on.latest_statuses(bad)
    assert latest["delivery/dev"] == "failure"
    assert "failure" in latest.values() and latest.get("delivery/commit") == "success"
    [bad_dep] = _deployments(github_on, bad)
    assert github_on.deployment_states(bad_dep["id"])[-1] == "failure"
    good_deps = _deployments(github_on, good)
    assert len(good_deps) == 2, "the good release's deploy and the rollback to it"
    rollback_dep = good_deps[-1]
    assert rollback_dep["payload"]["kind"] == "rollback" and rollback_dep["payload"]["tag"] == _tag(good)
    assert github_on.deployment_states(rollback_dep["id"])[-1] == "success"


def test_github_down_never_fails_a_deploy(stack, source, github_on: FakeGitHub) -> None:
    """With GitHub answering 503 to everything, the deploy still completes and its report says what was not sent."""
    github_on.outage(status=503, times=None)
    sha = source.commit("release-dev", note="github down")
    state = _deploy(sha)
    assert state.is_completed(), state.message
    report = _report()
    assert "## Notes" in report and "GitHub" in report and TOKEN not in report
