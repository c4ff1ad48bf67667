"""What GitHub shows for a deploy, a failed deploy, a cancelled one and a rollback: commit statuses
per stage and per environment, and a Deployment per run with its statuses."""

from __future__ import annotations

import pytest

from tasks.github import STAGES, DeployFeedback, rollback_feedback
from tests.github.conftest import HEALTH_URL, REPO, RUN_URL, SHA, TOKEN, make_settings
from tests.github.fake_github import FakeGitHub

pytestmark = pytest.mark.github

GOOD_SHA = "a84d88e7554fc1fa21bcbc4efae3c782a70d2b9d"
BAD_SHA = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"


def _deploy(fake: FakeGitHub, *, sha: str = SHA, tag: str = "main-6dcb09b", fail_at: str | None = None,
            **settings: object) -> DeployFeedback:
    """A deploy run's calls as the flow makes them, failing at `fail_at` if given."""
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=sha, tag=tag, run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=make_settings(fake.url, **settings))
    fb.begin()
    for stage in STAGES:
        fb.stage(stage, "pending")
        if stage == fail_at:
            fb.stage(stage, "failure", f"{stage} failed: the new pods never became ready")
            fb.finish(False, f"deploy of {tag} failed at {stage}")
            return fb
        fb.stage(stage, "success", f"{stage} ok")
    fb.finish(True, f"{tag} serves in dev")
    return fb


def test_good_deploy_sends_stage_statuses_aggregate_and_a_successful_deployment(fake_github: FakeGitHub) -> None:
    """A verified deploy turns every stage and delivery/dev green; its Deployment: queued → in_progress → success."""
    fb = _deploy(fake_github)

    assert fb.notes == [] and fb.ok
    assert fake_github.latest_statuses(SHA) == {**{f"delivery/{s}": "success" for s in STAGES},
                                                "delivery/dev": "success"}
    aggregate = [s["state"] for s in fake_github.statuses(SHA) if s["context"] == "delivery/dev"]
    assert aggregate == ["pending", "success"]
    for status in fake_github.statuses(SHA):
        assert status["target_url"] == RUN_URL
        assert 0 < len(status["description"]) <= 140

    [created] = fake_github.calls("repos/create-deployment")
    assert created.path == f"/repos/{REPO}/deployments"
    assert created.body["ref"] == SHA and created.body["environment"] == "dev"
    assert created.body["auto_merge"] is False and created.body["required_contexts"] == []
    assert created.body["payload"]["app"] == "workout-api" and created.body["payload"]["tag"] == "main-6dcb09b"
    assert "workout-api" in created.body["description"] and "main-6dcb09b" in created.body["description"]
    assert fake_github.deployment_states(fb.deployment_id) == ["queued", "in_progress", "success"]
    for status in fake_github.deployment_statuses[fb.deployment_id]:
        assert status["log_url"] == RUN_URL and status["environment_url"] == HEALTH_URL

    for req in fake_github.requests:
        assert req.authorization == "expected"
        assert req.headers["accept"] == "application/vnd.github+json"
        assert req.headers["x-github-api-version"] == "2022-11-28"
        assert TOKEN not in req.raw_without_authorization


def test_failed_deploy_sends_failure_statuses_and_a_failed_deployment(fake_github: FakeGitHub) -> None:
    """A deploy failing at rollout shows delivery/rollout and delivery/dev failed and its Deployment failure."""
    fb = _deploy(fake_github, fail_at="rollout")

    assert fb.notes == []
    latest = fake_github.latest_statuses(SHA)
    assert latest["delivery/rollout"] == "failure" and latest["delivery/dev"] == "failure"
    assert "delivery/health" not in latest  # never started, so never shown
    assert fake_github.deployment_states(fb.deployment_id) == ["queued", "in_progress", "failure"]
    final = fake_github.deployment_statuses[fb.deployment_id][-1]
    assert "failed at rollout" in final["description"]


def test_run_ending_mid_stage_closes_the_stage_as_error(fake_github: FakeGitHub) -> None:
    """A run that ends while a stage is pending leaves no status spinning: the stage says error."""
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=make_settings(fake_github.url))
    fb.stage("argocd-sync", "pending")
    fb.finish(False, "Argo CD sync timed out")

    latest = fake_github.latest_statuses(SHA)
    assert latest == {"delivery/argocd-sync": "error", "delivery/dev": "failure"}
    assert fake_github.deployment_states(fb.deployment_id) == ["queued", "in_progress", "failure"]


def test_superseded_deploy_marks_its_deployment_inactive(fake_github: FakeGitHub) -> None:
    """A deploy superseded by a newer commit says so on the commit and its Deployment goes inactive."""
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=make_settings(fake_github.url))
    fb.cancel("superseded by a84d88e of main")

    assert fake_github.latest_statuses(SHA) == {"delivery/dev": "error"}
    assert fake_github.deployment_states(fb.deployment_id) == ["queued", "inactive"]


def test_report_stage_names_map_to_status_contexts(fake_github: FakeGitHub) -> None:
    """The report's "bump-commit-push" stage shows as delivery/commit."""
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1",
                              settings=make_settings(fake_github.url))
    fb.stage("bump-commit-push", "success", "new commit")

    assert fake_github.latest_statuses(SHA)["delivery/commit"] == "success"


def test_rollback_creates_its_own_deployment_and_marks_the_bad_one_failure(fake_github: FakeGitHub) -> None:
    """A rollback to v1 has its own Deployment at v1's commit, and the bad v2 Deployment is marked failure."""
    good = _deploy(fake_github, sha=GOOD_SHA, tag="v1")
    bad = _deploy(fake_github, sha=BAD_SHA, tag="v2")  # verified at first, found bad later

    rb = rollback_feedback(app="workout-api", environment="dev", to_tag="v1", run_url=RUN_URL + "-rb",
                           health_url=HEALTH_URL, bad_tag="v2", reason="error rate above 5 %",
                           settings=make_settings(fake_github.url))
    rb.begin()
    for stage in ("commit", "argocd-sync", "rollout", "health"):
        rb.stage(stage, "success")
    rb.finish(True)

    assert rb.notes == []
    assert rb.deployment_id not in (good.deployment_id, bad.deployment_id)
    mine = fake_github.deployments[rb.deployment_id]
    assert mine["sha"] == GOOD_SHA  # the commit of the release put back, found from v1's Deployment
    assert mine["task"] == "deploy:rollback" and mine["payload"]["tag"] == "v1"
    assert fake_github.deployment_states(rb.deployment_id) == ["queued", "in_progress", "success"]
    assert fake_github.deployment_states(bad.deployment_id)[-1] == "failure"
    marked = fake_github.deployment_statuses[bad.deployment_id][-1]
    assert marked["description"] == "rolled back to v1: error rate above 5 %"
    assert marked["log_url"] == RUN_URL + "-rb"
    assert fake_github.deployment_states(good.deployment_id) == ["queued", "in_progress", "success"]
    assert fake_github.latest_statuses(GOOD_SHA)["delivery/dev"] == "success"


def test_automatic_rollback_marks_the_failing_runs_deployment(fake_github: FakeGitHub) -> None:
    """The deploy's own rollback names the bad Deployment by id and the commit to put back by SHA."""
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=BAD_SHA, tag="v2", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=make_settings(fake_github.url))
    fb.stage("health", "failure", "answered v1, expected v2")
    rb = rollback_feedback(app="workout-api", environment="dev", to_tag="v1", sha=GOOD_SHA, run_url=RUN_URL,
                           health_url=HEALTH_URL, bad_deployment_id=fb.deployment_id, reason="health check failed",
                           settings=make_settings(fake_github.url))
    rb.finish(True)
    fb.finish(False, "health check failed; rolled back to v1")

    assert fb.notes == [] and rb.notes == []
    assert fake_github.deployment_states(fb.deployment_id)[-1] == "failure"
    assert fake_github.deployments[rb.deployment_id]["sha"] == GOOD_SHA
    assert fake_github.deployment_states(rb.deployment_id) == ["queued", "in_progress", "success"]
    assert fake_github.latest_statuses(BAD_SHA)["delivery/dev"] == "failure"
    assert not fake_github.calls("repos/list-deployments")  # nothing to look up


def test_rollback_without_any_record_of_the_good_release_still_marks_the_bad_one(fake_github: FakeGitHub) -> None:
    """With no earlier Deployment of the target tag, the rollback notes it and still marks the bad Deployment."""
    bad = _deploy(fake_github, sha=BAD_SHA, tag="v2")
    rb = rollback_feedback(app="workout-api", environment="dev", to_tag="v0", bad_tag="v2",
                           settings=make_settings(fake_github.url))

    assert rb.deployment_id is None
    assert any("no source commit known for that tag" in n for n in rb.notes)
    assert fake_github.deployment_states(bad.deployment_id)[-1] == "failure"
    assert len(fake_github.deployments) == 1
