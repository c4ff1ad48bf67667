"""GitHub down, slow, rate-limiting or refusing: retried within the bound where that can help, noted
where it cannot, and never raised into the deploy."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tasks.github import STAGES, DeployFeedback, create_commit_status, create_deployment, github_target
from tests.github.conftest import HEALTH_URL, RUN_URL, SHA, make_settings
from tests.github.fake_github import FakeGitHub, unused_url

pytestmark = pytest.mark.github

# make_settings: 1 s per request, 3 attempts, 4 s in all.
BOUND_SECONDS = 4.0
PER_REQUEST = 1.0


def _target(url: str, **overrides: object):
    target, notes = github_target(settings=make_settings(url, **overrides))
    assert target is not None and notes == []
    return target


def test_server_errors_then_ok_are_retried_and_succeed(fake_github: FakeGitHub) -> None:
    """Two 502s then an answer: the status is sent on the third attempt, well inside the bound."""
    fake_github.outage(status=502, times=2, operation="repos/create-commit-status")
    started = time.monotonic()
    result = create_commit_status(_target(fake_github.url), SHA, context="delivery/build", state="success",
                                  description="built")
    elapsed = time.monotonic() - started

    assert result.ok and result.notes == [] and result.attempts == 3
    assert [r.status for r in fake_github.calls("repos/create-commit-status")] == [502, 502, 201]
    assert fake_github.latest_statuses(SHA) == {"delivery/build": "success"}
    assert elapsed < BOUND_SECONDS


def test_rate_limit_retry_after_is_honoured(fake_github: FakeGitHub) -> None:
    """A 429 with Retry-After: 1 is retried after that second, not sooner, and then succeeds."""
    fake_github.outage(status=429, times=1, retry_after=1)
    started = time.monotonic()
    result = create_deployment(_target(fake_github.url), sha=SHA, environment="dev", app="workout-api", tag="t1")
    elapsed = time.monotonic() - started

    assert result.ok and result.deployment_id is not None and result.attempts == 2
    assert 1.0 <= elapsed < BOUND_SECONDS


def test_retry_after_beyond_the_bound_gives_up_at_once(fake_github: FakeGitHub) -> None:
    """A rate limit asking for two minutes is not waited out: one attempt, a note naming the wait."""
    fake_github.outage(status=403, times=None, headers={"X-RateLimit-Remaining": "0",
                                                         "X-RateLimit-Reset": str(int(time.time()) + 120)})
    started = time.monotonic()
    result = create_commit_status(_target(fake_github.url), SHA, context="delivery/dev", state="pending")

    assert not result.ok and result.attempts == 1
    assert "GitHub asked to wait" in result.notes[0] and "HTTP 403" in result.notes[0]
    assert time.monotonic() - started < 1.0


def _server_errors(fake: FakeGitHub) -> str:
    fake.outage(status=503, times=None)
    return fake.url


def _hang(fake: FakeGitHub) -> str:
    fake.hang(times=None)
    return fake.url


def _drop(fake: FakeGitHub) -> str:
    fake.drop(times=None)
    return fake.url


def _refused(fake: FakeGitHub) -> str:
    return unused_url()


@pytest.mark.parametrize("outage", [_server_errors, _hang, _drop, _refused], ids=["503", "hang", "drop", "refused"])
def test_github_down_for_good_gives_a_note_within_the_bound(fake_github: FakeGitHub,
                                                           outage: Callable[[FakeGitHub], str]) -> None:
    """GitHub down for good: a note naming attempts and seconds, nothing raised, and done within the bound."""
    url = outage(fake_github)
    started = time.monotonic()
    result = create_commit_status(_target(url), SHA, context="delivery/health", state="failure",
                                  description="health check failed")
    elapsed = time.monotonic() - started

    assert not result.ok and result.outage
    [note] = result.notes
    assert note.startswith("GitHub commit status delivery/health (failure) not sent: gave up after")
    assert "(bound: 3 attempts, 4 s)" in note
    assert elapsed < BOUND_SECONDS + PER_REQUEST


def test_a_whole_deploy_during_an_outage_is_not_held_up(fake_github: FakeGitHub) -> None:
    """GitHub down for a whole deploy: only the first call waits out the bound; the deploy gets notes, not errors."""
    fake_github.outage(status=503, times=None)
    started = time.monotonic()
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=make_settings(fake_github.url))
    for stage in STAGES:
        fb.stage(stage, "pending")
        fb.stage(stage, "success")
    result = fb.finish(True)
    elapsed = time.monotonic() - started

    assert not result.ok and fb.notes
    assert fb.notes[0].startswith("GitHub Deployment for dev not created: gave up after 3 attempt(s)")
    assert any(n.startswith("GitHub commit status delivery/dev (success) not sent") for n in fb.notes)
    # One bounded wait, then one attempt per call (13 calls answered 503 at once).
    assert elapsed < BOUND_SECONDS + 3
    assert len(fake_github.requests) == 3 + 1 + 12 + 1


def test_feedback_recovers_its_retries_after_github_comes_back(fake_github: FakeGitHub) -> None:
    """After an outage ends, the next call that gets through restores full retries for the rest of the run."""
    fake_github.outage(status=503, times=4)  # the Deployment gives up after 3, the aggregate's single try fails
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1",
                              settings=make_settings(fake_github.url))
    fb.stage("build", "success")  # GitHub is back: sent, and the run leaves its outage mode
    fake_github.outage(status=500, times=1)
    result = fb.stage("push", "success")  # retried again

    assert result.ok and result.attempts == 2
    assert fake_github.latest_statuses(SHA) == {"delivery/build": "success", "delivery/push": "success"}


def test_client_error_is_not_retried_and_is_noted(fake_github: FakeGitHub) -> None:
    """GitHub refusing a commit it does not know (422) is asked once, and the report says why."""
    fake_github.unknown_shas.add(SHA)
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=make_settings(fake_github.url))
    fb.stage("build", "success")
    fb.finish(True)

    assert len(fake_github.calls("repos/create-deployment")) == 1
    assert fb.deployment_id is None
    assert fb.notes[0] == (f"GitHub Deployment for dev not created: HTTP 422 No ref found for: {SHA} (not retried)")
    assert (f"GitHub commit status delivery/build (success) not sent: HTTP 422 No commit found for SHA: {SHA} "
            "(not retried)") in fb.notes
    assert all(r.status == 422 for r in fake_github.requests)
    assert not fake_github.calls("repos/create-deployment-status")  # no Deployment, nothing to update


def test_refused_token_stops_the_runs_feedback_after_one_request(fake_github: FakeGitHub) -> None:
    """A token GitHub refuses (401) costs one request and one note, not one per status."""
    from pydantic import SecretStr

    settings = make_settings(fake_github.url, github_token=SecretStr("ghp_" + "x" * 36))
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", settings=settings)
    for stage in STAGES:
        fb.stage(stage, "success")
    fb.finish(True)

    assert len(fake_github.requests) == 1 and fake_github.requests[0].authorization == "other"
    assert fb.notes == ["GitHub Deployment for dev not created: HTTP 401 Bad credentials (not retried)",
                        "GitHub feedback stopped for this run: the token was refused (HTTP 401)"]
