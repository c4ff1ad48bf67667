"""Configuration of the GitHub feedback: the token's sources and its secrecy, the repository each app
reports to, GitHub Enterprise base URLs, and feedback switched off."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

import tasks.github as github
from delivery.config import App, Environment, parse_config
from delivery.errors import ConfigError
from delivery.redact import redact
from tasks.github import STAGES, DeployFeedback, create_commit_status, github_repository_for, github_target
from tests.github.conftest import HEALTH_URL, REPO, RUN_URL, SHA, TOKEN, make_settings
from tests.github.fake_github import FakeGitHub

pytestmark = pytest.mark.github


def _app(source_repo: str, github_repository: str = "") -> App:
    env = Environment(name="dev", values_file="values-dev.yaml", application="a-dev", namespace="ns",
                      deployment="a", health_url=HEALTH_URL)
    return App(name="workout-api", source_repo=source_repo, image="registry/x", gitops_repo="https://g/x.git",
               chart_path="helm/x", environments={"dev": env}, github_repository=github_repository)


def test_without_a_token_every_call_is_a_no_op_said_once(fake_github: FakeGitHub,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """No token configured: nothing is sent, nothing is noted, and the log says feedback is off once."""
    caplog.set_level(logging.DEBUG)
    settings = make_settings(fake_github.url, github_token=None)
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", settings=settings)
    for stage in STAGES:
        assert fb.stage(stage, "success").skipped
    result = fb.finish(True)
    assert create_commit_status(None, SHA, context="delivery/dev", state="success").skipped

    assert result.ok and fb.notes == [] and not fb.enabled
    assert fake_github.requests == []
    assert caplog.text.count("GitHub feedback is off") == 1


def test_token_never_appears_in_logs_notes_errors_or_requests(fake_github: FakeGitHub, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a deploy with retries, refusals and a crash, the token shows nowhere but the Authorization header."""
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included
    settings = make_settings(fake_github.url)
    fake_github.outage(status=503, times=1)
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=settings)
    fb.stage("build", "success", f"a description quoting the token {TOKEN}")
    fake_github.unknown_shas.add(SHA)
    fb.stage("push", "failure")
    fake_github.unknown_shas.clear()

    # A library that quotes the request's headers in its exception must not carry the token out either.
    def leaky(*args: object, **kwargs: object) -> httpx.Response:
        raise httpx.ConnectError(f"refused, headers were Authorization: Bearer {TOKEN}")

    with monkeypatch.context() as m:
        m.setattr(httpx.Client, "request", leaky)
        crashed = fb.stage("commit", "success")
    fb.finish(False, f"failed; token {TOKEN}")

    texts = [caplog.text, *fb.notes, *crashed.notes, repr(fb), repr(fb.target), str(settings), repr(settings)]
    assert crashed.notes and all(TOKEN not in t for t in texts)
    for req in fake_github.requests:
        assert TOKEN not in req.raw_without_authorization
        assert req.authorization == "expected"
    [build] = [s for s in fake_github.statuses(SHA) if s["context"] == "delivery/build"]
    assert build["description"] == "a description quoting the token ***"
    assert redact(TOKEN) == "***"  # registered for every later log line of the process


def test_token_from_a_prefect_secret_block(fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """DELIVERY_GITHUB_TOKEN_BLOCK names a Prefect Secret block whose value is sent as the bearer token."""
    from prefect.blocks.system import Secret

    class FakeBlock:
        def get(self) -> str:
            return TOKEN

    loaded: list[str] = []
    monkeypatch.setattr(Secret, "load", classmethod(lambda cls, name, **kw: loaded.append(name) or FakeBlock()))
    settings = make_settings(fake_github.url, github_token=None, github_token_block="github-token")
    result = create_commit_status(github_target(settings=settings)[0], SHA, context="delivery/dev", state="pending")

    assert loaded == ["github-token"] and result.ok
    assert fake_github.requests[0].authorization == "expected"


def test_unreadable_secret_block_turns_feedback_off_with_a_note(fake_github: FakeGitHub,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret block that cannot be read: no requests, one note naming the block, nothing raised."""
    from prefect.blocks.system import Secret

    def boom(cls: object, name: str, **kw: object) -> None:
        raise ValueError(f"block document {name} not found; value was {TOKEN}")

    monkeypatch.setattr(Secret, "load", classmethod(boom))
    settings = make_settings(fake_github.url, github_token=None, github_token_block="github-token")
    fb = DeployFeedback.start(app="workout-api", environment="dev", sha=SHA, tag="t1", settings=settings)
    fb.finish(True)

    assert fake_github.requests == []
    assert fb.notes == ["GitHub feedback off: cannot load Prefect Secret block 'github-token' (ValueError)"]


def test_github_enterprise_base_url_with_a_path_prefix(fake_ghes: FakeGitHub) -> None:
    """Against GitHub Enterprise (https://HOST/api/v3) every call goes under /api/v3 and is accepted."""
    host_url = fake_ghes.url.removesuffix("/api/v3")
    # The app's clone URL is on the same Enterprise host: the repository comes from it.
    app = _app(f"{host_url}/octo-org/workout-api.git")
    settings = make_settings(fake_ghes.url, github_repository=None)
    fb = DeployFeedback.start(app=app, environment="dev", sha=SHA, tag="t1", run_url=RUN_URL,
                              health_url=HEALTH_URL, settings=settings)
    fb.stage("build", "success")
    fb.finish(True)

    assert fb.notes == []
    assert {r.path for r in fake_ghes.requests} == {
        "/api/v3/repos/octo-org/workout-api/deployments",
        f"/api/v3/repos/octo-org/workout-api/deployments/{fb.deployment_id}/statuses",
        f"/api/v3/repos/octo-org/workout-api/statuses/{SHA}",
    }
    assert fake_ghes.deployment_states(fb.deployment_id) == ["queued", "in_progress", "success"]


@pytest.mark.parametrize(("source_repo", "api_url", "expected"), [
    ("https://github.com/octo-org/workout-api.git", "https://api.github.com", "octo-org/workout-api"),
    ("git@github.com:octo-org/workout-api.git", "https://api.github.com", "octo-org/workout-api"),
    ("ssh://git@github.com/octo-org/workout-api", "https://api.github.com", "octo-org/workout-api"),
    ("https://ghe.example.com/team/svc.git", "https://ghe.example.com/api/v3", "team/svc"),
    ("https://ghe.example.com/team/svc.git", "https://api.github.com", None),
    ("http://127.0.0.1:9418/source/workout-api.git", "https://api.github.com", None),
    ("/srv/git/workout-api.git", "https://api.github.com", None),
])
def test_repository_is_derived_from_a_github_clone_url(source_repo: str, api_url: str, expected: str | None) -> None:
    """An app cloned from the configured GitHub reports to that repository; any other remote to none."""
    settings = make_settings(api_url, github_repository=None)
    assert github_repository_for(_app(source_repo), settings) == expected


def test_explicit_repository_wins_over_the_setting_and_the_url() -> None:
    """The app's github_repository beats DELIVERY_GITHUB_REPOSITORY, which beats the clone URL."""
    settings = make_settings("https://api.github.com", github_repository="other/fallback")
    assert github_repository_for(_app("https://github.com/a/b.git", "octo-org/workout-api"), settings) == REPO
    assert github_repository_for(_app("https://github.com/a/b.git"), settings) == "other/fallback"


def test_no_repository_is_a_note_not_an_error(fake_github: FakeGitHub) -> None:
    """A token but no repository for the app: one note in the report, no requests."""
    settings = make_settings(fake_github.url, github_repository=None)
    fb = DeployFeedback.start(app=_app("/srv/git/workout-api.git"), environment="dev", sha=SHA, tag="t1",
                              settings=settings)
    fb.finish(True)

    assert fake_github.requests == []
    assert len(fb.notes) == 1 and "no repository" in fb.notes[0]


def test_delivery_yaml_accepts_a_github_repository_and_refuses_a_bad_one() -> None:
    """`github_repository: owner/name` in delivery.yaml is read; a path-like value is refused."""
    raw = {"apps": {"workout-api": {
        "source_repo": "/srv/git/x.git", "image": "r/x", "gitops_repo": "/srv/git/g.git", "chart_path": "helm/x",
        "github_repository": "octo-org/workout-api",
        "environments": {"dev": {"values_file": "v.yaml", "application": "a", "namespace": "n", "deployment": "d",
                                 "health_url": HEALTH_URL}}}}}
    assert parse_config(raw, Path("delivery.yaml")).app("workout-api").github_repository == REPO
    raw["apps"]["workout-api"]["github_repository"] = "octo-org/../admin"
    with pytest.raises(ConfigError, match="github_repository"):
        parse_config(raw, Path("delivery.yaml"))


def test_feedback_tasks_keep_no_result() -> None:
    """The Prefect tasks persist no result and cache nothing: a DeployFeedback holds the token."""
    from prefect.cache_policies import NO_CACHE

    for t in (github.start_feedback_task, github.finish_feedback_task, github.rollback_feedback_task):
        assert t.persist_result is False and t.cache_policy is NO_CACHE


def test_settings_read_github_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DELIVERY_GITHUB_* variables configure the feedback, and the token prints masked."""
    from delivery.settings import Settings

    monkeypatch.setenv("DELIVERY_GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("DELIVERY_GITHUB_API_URL", "https://ghe.example.com/api/v3")
    monkeypatch.setenv("DELIVERY_GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("DELIVERY_GITHUB_ATTEMPTS", "2")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    target, notes = github_target(settings=s)

    assert notes == [] and target is not None
    assert target.repo_url == f"https://ghe.example.com/api/v3/repos/{REPO}" and target.attempts == 2
    assert TOKEN not in repr(s) and TOKEN not in repr(target)
    assert isinstance(s.github_token, SecretStr)


def test_api_url_carrying_credentials_is_refused(fake_github: FakeGitHub) -> None:
    """A github_api_url with user:password@ is not used (it would send them as basic auth) and the note hides them."""
    url = fake_github.url.replace("http://", f"http://x-access-token:{TOKEN}@")
    target, notes = github_target(settings=make_settings(url))

    assert target is None and fake_github.requests == []
    assert "without credentials" in notes[0] and TOKEN not in notes[0]
