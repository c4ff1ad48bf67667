"""Every deploy ends with its report, and the report says what Git and the cluster name at the end,
as read back from them: a lock-wait timeout, an error that is not one of ours, a refused rollback."""

from __future__ import annotations

import threading

import git
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.concurrency.sync import concurrency
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.config import load_config
from delivery.runs import ensure_lock
from flows.deploy import deploy
from tasks import gitops, images, records, values
from tests.flows.conftest import health

APP, ENV, REF = "workout-api", "staging", "refs/heads/main"
VALUES = "helm/workout-api/values-staging.yaml"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


def _tag(sha: str) -> str:
    return f"main-{sha[:7]}"


def _env():
    return load_config().app(APP).environment(ENV)


def _report(key: str = f"deploy-{APP}-{ENV}") -> str:
    async def read():
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          sort=ArtifactSort.CREATED_DESC, limit=1)
            return arts[0].data if arts else ""
    return run_coro_as_sync(read())


def _git_tag(stack, tmp_path) -> str:
    clone = git.Repo.clone_from(str(stack.gitops_remote), tmp_path / "gitops-read", branch="main")
    return values.read_image_tag(clone.working_tree_dir + "/" + VALUES)


def _deploy(sha: str, **kw):
    return deploy(app=APP, environment=ENV, source_ref=REF, source_sha=sha, return_state=True, **{**FAST, **kw})


def test_lock_wait_timeout_ends_failed_with_a_report(stack, source, tmp_path):
    """A deploy that cannot get the environment's lock ends Failed with a report naming the lock wait."""
    sha = source.commit("main", note="lock wait")
    held, release = threading.Event(), threading.Event()

    def hold():
        with concurrency(ensure_lock(APP, ENV), occupy=1, strict=True, lease_duration=60):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        state = _deploy(sha, lock_timeout=3)
    finally:
        release.set()
        holder.join(30)
    assert state.is_failed()
    assert "LockTimeout" in state.message or "lock" in state.message, state.message
    report = _report()
    assert "**failed**" in report
    assert "| lock-wait |" in report and "| Failed stage | lock-wait |" in report
    assert f"| Git names now | `{_git_tag(stack, tmp_path)}` |" in report
    assert "| Cluster runs now |" in report


def test_an_error_that_is_not_ours_still_ends_with_a_report(stack, source, monkeypatch):
    """A bug-like exception (here from the registry check) still leaves a report with the stage and error."""
    sha = source.commit("main", note="unexpected error")

    def broken(*args, **kwargs):
        raise RuntimeError("registry client exploded")

    monkeypatch.setattr(images, "image_exists", broken)
    state = _deploy(sha)
    assert state.is_failed()
    report = _report()
    assert "RuntimeError: registry client exploded" in report
    assert "| Failed stage | build |" in report


def test_refused_rollback_reports_the_tag_git_really_names(stack, source, tmp_path):
    """When the rollback is refused before any commit, the report says Git still names the bad tag."""
    good = source.commit("main", note="before ghost")
    assert _deploy(good).is_completed()
    # The last verified tag's image is gone from the registry (garbage-collected, say).
    work = tmp_path / "notes"
    repo = gitops.checkout(str(stack.gitops_remote), "main", work)
    (work / "GHOST.md").write_text("a later commit carrying the ghost's verification\n")
    later = gitops.commit_and_push(repo, ["GHOST.md"], "docs: ghost", author=("t", "t@example.com"), branch="main")
    records.record_verified(repo, later.sha, app=APP, environment=ENV, tag="main-0ddba11")
    bad = source.commit("main", healthy=False, note="bad after ghost")
    state = _deploy(bad)
    assert state.is_failed()
    assert f"Git names {_tag(bad)}" in state.message, state.message
    assert "main-0ddba11" in state.message and "not in the registry" in state.message
    report = _report()
    assert f"| Git names now | `{_tag(bad)}` |" in report
    # Leave staging with a newer verified release than the ghost for the tests that follow.
    fixed = source.commit("main", note="after ghost")
    assert _deploy(fixed).is_completed()
    assert health(_env().health_url)[1]["version"] == _tag(fixed)
