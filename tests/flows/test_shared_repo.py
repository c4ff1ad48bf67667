"""Two apps in one GitOps repository, with the same environment names: each app's rollback (automatic
or by hand) restores that app's own last verified tag, and the other app is never touched."""

from __future__ import annotations

from pathlib import Path

import git

from delivery.config import load_config
from flows.deploy import deploy
from flows.rollback import rollback
from tasks import values
from tests.flows.conftest import health
from tests.source_clone import SourceClone

A, B, ENV, REF = "workout-api", "nutrition-api", "staging", "refs/heads/main"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


def _tag(sha: str) -> str:
    return f"main-{sha[:7]}"


def _git_tag(stack, tmp_path: Path, app: str) -> str:
    d = tmp_path / f"read-{app}"
    if d.exists():
        repo = git.Repo(d)
        repo.remotes.origin.fetch()
        repo.git.reset("--hard", "origin/main")
    else:
        git.Repo.clone_from(str(stack.gitops_remote), d, branch="main")
    return values.read_image_tag(d / f"helm/{app}/values-{ENV}.yaml")


def _serving(app: str) -> str:
    return health(load_config().app(app).environment(ENV).health_url)[1].get("version", "")


def _deploy(app: str, sha: str):
    return deploy(app=app, environment=ENV, source_ref=REF, source_sha=sha, return_state=True, **FAST)


def test_rollbacks_restore_each_apps_own_tag(stack, tmp_path: Path) -> None:
    src_a = SourceClone(str(stack.source_remote), tmp_path / "src-a")
    src_b = SourceClone(str(stack.source_remotes[B]), tmp_path / "src-b")

    # A v1 and B v1 verified; B's verification is the newer note on the shared branch.
    a1 = src_a.commit("main", note="A v1")
    assert _deploy(A, a1).is_completed()
    b1 = src_b.commit("main", note="B v1")
    assert _deploy(B, b1).is_completed()
    assert (_serving(A), _serving(B)) == (_tag(a1), _tag(b1))

    # A v2 fails its health check: the automatic rollback puts A v1 back, not B's newer tag.
    a2 = src_a.commit("main", note="A v2 unhealthy", healthy=False)
    state = _deploy(A, a2)
    assert state.is_failed(), state.message
    assert f"rolled back; Git names {_tag(a1)}" in (state.message or ""), state.message
    assert _git_tag(stack, tmp_path, A) == _tag(a1) and _serving(A) == _tag(a1)
    # B untouched: Git still names B v1 and B still serves it.
    assert _git_tag(stack, tmp_path, B) == _tag(b1) and _serving(B) == _tag(b1)

    # A v3, then B v2: B's note is again the newest on the branch.
    a3 = src_a.commit("main", note="A v3")
    assert _deploy(A, a3).is_completed()
    b2 = src_b.commit("main", note="B v2")
    assert _deploy(B, b2).is_completed()

    # A rollback by hand, no tag given: A's own last verified tag other than the current one (A v1).
    result = rollback(app=A, environment=ENV, reason="by hand, shared repo test", **FAST)
    assert result["serving"] == _tag(a1), result
    assert _git_tag(stack, tmp_path, A) == _tag(a1) and _serving(A) == _tag(a1)
    assert _git_tag(stack, tmp_path, B) == _tag(b2) and _serving(B) == _tag(b2)
