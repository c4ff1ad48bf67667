"""The fake GitHub itself: it must catch requests GitHub's REST description does not allow, or the
feedback tests could pass while sending GitHub something it would refuse."""

from __future__ import annotations

import httpx
import pytest

from tests.github.conftest import REPO, SHA, TOKEN
from tests.github.fake_github import FakeGitHub, GitHubOpenAPI

pytestmark = pytest.mark.github

HEADERS = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/vnd.github+json",
           "X-GitHub-Api-Version": "2022-11-28"}


def _send(fake: FakeGitHub, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(method, fake.url + path, json=body, headers=HEADERS, timeout=5)


def test_the_description_is_githubs_published_one(github_openapi: GitHubOpenAPI) -> None:
    """The checks use @octokit/openapi's api.github.com description, with the three operations the feedback uses."""
    assert github_openapi.raw["info"]["x-github-plan"] == "api.github.com"
    assert github_openapi.path.name == "api.github.com.json"
    ops = {op.get("operationId") for item in github_openapi.raw["paths"].values() for op in item.values()
           if isinstance(op, dict)}
    assert {"repos/create-commit-status", "repos/create-deployment", "repos/create-deployment-status",
            "repos/list-deployments"} <= ops


@pytest.mark.parametrize(("method", "path", "body", "expect"), [
    ("POST", f"/repos/{REPO}/statuses/{SHA}", {"state": "done", "context": "delivery/build"}, "'done' is not one of"),
    ("POST", f"/repos/{REPO}/deployments", {"environment": "dev", "auto_merge": False}, "'ref' is a required property"),
    ("POST", f"/repos/{REPO}/deployments", {"ref": SHA, "required_contexts": "none"}, "is not of type 'array'"),
    ("POST", f"/repos/{REPO}/deployments/12/statuses", {"state": "started"}, "'started' is not one of"),
    ("POST", f"/repos/{REPO}/deployments/twelve/statuses", {"state": "queued"}, "deployment_id"),
    ("POST", f"/repos/{REPO}/deployments/12/statuses", {"state": "success", "description": "x" * 141},
     "over the documented maximum of 140"),
    ("POST", f"/repos/{REPO}/statuses/{SHA}", None, "body"),
    ("POST", f"/repos/{REPO}/deployment", {"ref": SHA}, "not in GitHub's REST description"),
    ("DELETE", f"/repos/{REPO}/statuses/{SHA}", None, "not in GitHub's REST description"),
], ids=["bad-commit-state", "missing-ref", "contexts-not-array", "bad-deployment-state", "id-not-integer",
        "description-too-long", "no-body", "unknown-path", "unknown-method"])
def test_malformed_request_is_flagged_and_refused(fake_github: FakeGitHub, method: str, path: str, body: object,
                                                  expect: str) -> None:
    """A request the description forbids is recorded as a violation and refused, as GitHub would."""
    resp = _send(fake_github, method, path, body)
    violations = fake_github.take_violations()  # taken, so the fixture's own check does not fail this test

    assert resp.status_code in (404, 422)
    assert len(violations) == 1 and expect in violations[0], violations
    assert fake_github.commit_statuses == {} and fake_github.deployments == {}


def test_ghes_request_outside_the_base_path_is_flagged(fake_ghes: FakeGitHub) -> None:
    """Against Enterprise, a call that forgot the /api/v3 prefix is a violation, not a silent success."""
    url = fake_ghes.url.removesuffix("/api/v3") + f"/repos/{REPO}/statuses/{SHA}"
    resp = httpx.post(url, json={"state": "success"}, headers=HEADERS, timeout=5)

    assert resp.status_code == 404
    assert "not under the API base path" in fake_ghes.take_violations()[0]


def test_well_formed_requests_get_answers_shaped_by_the_description(fake_github: FakeGitHub) -> None:
    """A valid Deployment and status are answered 201 with GitHub's documented fields, checked against the schema."""
    dep = _send(fake_github, "POST", f"/repos/{REPO}/deployments",
                {"ref": SHA, "environment": "dev", "auto_merge": False, "required_contexts": [], "payload": {"a": 1}})
    assert dep.status_code == 201
    body = dep.json()
    assert body["sha"] == SHA and body["environment"] == "dev" and body["payload"] == {"a": 1}
    assert {"id", "node_id", "creator", "statuses_url", "created_at"} <= set(body)

    st = _send(fake_github, "POST", f"/repos/{REPO}/deployments/{body['id']}/statuses",
               {"state": "in_progress", "log_url": "http://run", "environment_url": "http://app"})
    assert st.status_code == 201 and st.json()["state"] == "in_progress"
    listed = httpx.get(fake_github.url + f"/repos/{REPO}/deployments", params={"environment": "dev"},
                       headers=HEADERS, timeout=5)
    assert [d["id"] for d in listed.json()] == [body["id"]]
    # No violations: the fixture checks at teardown that the answers matched the description too.


def test_missing_or_wrong_token_is_refused_like_github(fake_github: FakeGitHub) -> None:
    """Without the expected bearer token the fake answers 401 Bad credentials."""
    resp = httpx.post(fake_github.url + f"/repos/{REPO}/statuses/{SHA}", json={"state": "success"}, timeout=5)

    assert resp.status_code == 401 and resp.json()["message"] == "Bad credentials"
    assert fake_github.requests[0].authorization == "missing"


def test_fake_answer_that_drifts_from_the_description_is_flagged(fake_github: FakeGitHub,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """If the fake answered without a field GitHub always sends (the status id), that is a violation too."""
    original = fake_github._create_commit_status

    def drifted(ctx: dict) -> tuple:
        status, out, headers = original(ctx)
        out = {k: v for k, v in out.items() if k != "id"}
        return status, out, headers

    monkeypatch.setattr(fake_github, "_create_commit_status", drifted)
    _send(fake_github, "POST", f"/repos/{REPO}/statuses/{SHA}", {"state": "success"})
    [violation] = fake_github.take_violations()

    assert violation.startswith("fake answer to repos/create-commit-status (201) does not match the description")
    assert "'id' is a required property" in violation
