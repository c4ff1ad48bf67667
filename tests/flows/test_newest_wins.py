"""Newest wins across clones: a run that cloned before a newer commit existed must still see, once it
holds the lock, that the newer commit was deployed meanwhile, and step aside."""

from __future__ import annotations

import threading
from pathlib import Path

import git

from delivery import runs
from delivery.config import load_config
from flows import common as common_module
from flows.deploy import deploy
from tests.flows.conftest import gitops_log, health

APP, ENV, REF = "workout-api", "dev", "refs/heads/release-dev"
VALUES = "helm/workout-api/values-dev.yaml"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


def _tag(sha: str) -> str:
    return f"release-dev-{sha[:7]}"


def test_older_run_waiting_on_the_lock_is_superseded_by_a_newer_deploy(stack, source, tmp_path, monkeypatch):
    """The older run cloned, then waited; the newer commit deployed meanwhile: the older ends Cancelled."""
    older = source.commit("release-dev", note="older, slow to get the lock")
    cloned, go_on = threading.Event(), threading.Event()
    real_ensure_lock = runs.ensure_lock
    first = threading.Lock()

    def ensure_lock_after_a_wait(app: str, environment: str) -> str:
        # Only the older run (the first to get here) is held: it has cloned and passed its early check.
        if first.acquire(blocking=False):
            cloned.set()
            go_on.wait(300)
        return real_ensure_lock(app, environment)

    # The deploy takes its lock through flows.common.deploy_lock.
    monkeypatch.setattr(common_module, "ensure_lock", ensure_lock_after_a_wait)
    states = {}
    t = threading.Thread(target=lambda: states.setdefault("older", deploy(
        app=APP, environment=ENV, source_ref=REF, source_sha=older, return_state=True, **FAST)))
    t.start()
    try:
        assert cloned.wait(120), "the older run never reached the lock"
        newer = source.commit("release-dev", note="newer, deployed first")
        state = deploy(app=APP, environment=ENV, source_ref=REF, source_sha=newer, return_state=True, **FAST)
        assert state.is_completed(), state.message
    finally:
        go_on.set()
        t.join(300)
    assert states["older"].is_cancelled(), states["older"].message
    assert newer[:12] in states["older"].message
    env = load_config().app(APP).environment(ENV)
    assert health(env.health_url)[1]["version"] == _tag(newer)
    subjects = [s for _, s in gitops_log(str(stack.gitops_remote), tmp_path, VALUES, n=5)]
    assert subjects[0] == f"chore(helm): update image tag to {_tag(newer)}"
    assert not any(s.endswith(_tag(older)) for s in subjects)


def test_rerun_when_git_already_names_the_tag_is_done_without_a_rollback(stack, source, tmp_path):
    """Tag already in Git and a later head that only touches another file: Argo CD runs no operation,
    and the re-run still ends Completed (it used to time out and roll back a healthy release)."""
    sha = source.commit("release-dev", note="already synced")
    first = deploy(app=APP, environment=ENV, source_ref=REF, source_sha=sha, return_state=True, **FAST)
    assert first.is_completed(), first.message
    other = git.Repo.clone_from(str(stack.gitops_remote), tmp_path / "other-team", branch="main")
    (Path(other.working_tree_dir) / "OTHER-TEAM.md").write_text(f"unrelated {sha[:7]}\n")
    other.index.add(["OTHER-TEAM.md"])
    actor = git.Actor("other team", "other@example.com")
    other.index.commit("docs: another team's change", author=actor, committer=actor)
    other.remotes.origin.push("main:main")
    again = deploy(app=APP, environment=ENV, source_ref=REF, source_sha=sha, return_state=True,
                   **{**FAST, "sync_timeout": 40.0})
    assert again.is_completed(), again.message
    env = load_config().app(APP).environment(ENV)
    assert health(env.health_url)[1]["version"] == _tag(sha)
    subjects = [s for _, s in gitops_log(str(stack.gitops_remote), tmp_path, VALUES, n=3)]
    assert subjects[0] == f"chore(helm): update image tag to {_tag(sha)}"
