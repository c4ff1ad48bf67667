"""Fixtures for the GitHub feedback tests: GitHub's REST description (parsed once per session), a
fake GitHub that validates every request against it, and settings pointing the feedback at it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

import tasks.github as github
from delivery.settings import Settings
from tests.github.fake_github import FakeGitHub, GitHubOpenAPI, SpecMissing, load_github_openapi

# Shaped like a real personal access token, made up and unique per session so a leak cannot match by chance.
TOKEN = "ghp_" + secrets.token_urlsafe(27).replace("-", "A").replace("_", "B")[:36]  # secret-scan: allow
REPO = "octo-org/workout-api"
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
RUN_URL = "http://127.0.0.1:4200/runs/flow-run/0b0c5f3e-1d2e-4c59-9a0b-2f3f6a1e8d11"
HEALTH_URL = "https://dev.example.com/api/health/"

_loaded: dict[str, GitHubOpenAPI] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    spec = _loaded.get("spec")
    if spec is not None:
        terminalreporter.write_line(
            f"GitHub REST description: @octokit/openapi {spec.package_version} {spec.path.name}, "
            f"parsed in {spec.load_seconds:.2f} s (once per session)")


@pytest.fixture(scope="session")
def github_openapi() -> GitHubOpenAPI:
    """GitHub's published REST description; a missing one fails the tests (never skips them)."""
    try:
        spec = load_github_openapi()
    except SpecMissing as e:
        pytest.fail(str(e))
    _loaded["spec"] = spec
    return spec


def _serve(spec: GitHubOpenAPI, prefix: str) -> Iterator[FakeGitHub]:
    fake = FakeGitHub(spec, token=TOKEN, prefix=prefix, hang_seconds=10)
    with fake:
        yield fake
    assert fake.violations == [], "requests GitHub's REST description does not allow:\n" + "\n".join(fake.violations)


@pytest.fixture
def fake_github(github_openapi: GitHubOpenAPI) -> Iterator[FakeGitHub]:
    """A fake api.github.com; the test fails if any request broke the description."""
    yield from _serve(github_openapi, "")


@pytest.fixture
def fake_ghes(github_openapi: GitHubOpenAPI) -> Iterator[FakeGitHub]:
    """A fake GitHub Enterprise Server: the API lives under /api/v3."""
    yield from _serve(github_openapi, "/api/v3")


@pytest.fixture(autouse=True)
def _fresh_feedback_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Feedback is off" is said once per process; each test starts from a fresh process's view.
    monkeypatch.setattr(github, "_said_off", False)
    for name in [n for n in os.environ if n.startswith("DELIVERY_GITHUB_")]:
        monkeypatch.delenv(name)


def make_settings(api_url: str, **overrides: object) -> Settings:
    """Settings for the feedback with short bounds (a test must not wait out production's)."""
    values: dict[str, object] = {
        "github_token": SecretStr(TOKEN),
        "github_api_url": api_url,
        "github_repository": REPO,
        "github_timeout_seconds": 1.0,
        "github_attempts": 3,
        "github_retry_seconds": 4.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]
