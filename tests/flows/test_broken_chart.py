"""Argo CD renders the real chart (`helm template` with the Application's values files), so a chart that
does not render fails the deploy end to end, naming helm's own error, as it would on a real cluster."""

from __future__ import annotations

import time
from pathlib import Path

import git

from delivery.config import load_config
from flows.deploy import deploy
from tasks import argocd
from tests.flows.conftest import health

APP, ENV, REF = "workout-api", "staging", "refs/heads/main"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}
TEMPLATE = "helm/workout-api/templates/service.yaml"


def _commit(clone: git.Repo, path: str, text: str, message: str) -> None:
    clone.remotes.origin.fetch()
    clone.git.reset("--hard", "origin/main")
    (Path(clone.working_tree_dir) / path).write_text(text)
    clone.index.add([path])
    actor = git.Actor("platform", "platform@example.com")
    clone.index.commit(message, author=actor, committer=actor)
    clone.remotes.origin.push("main:main")


def test_a_chart_that_does_not_render_fails_the_deploy(stack, source, tmp_path: Path) -> None:
    env = load_config().app(APP).environment(ENV)
    serving = health(env.health_url)[1].get("version")
    clone = git.Repo.clone_from(str(stack.gitops_remote), tmp_path / "chart-edit", branch="main")
    good = (Path(clone.working_tree_dir) / TEMPLATE).read_text()
    # A template that calls a function helm does not have: `helm template` fails, as it would in Argo CD.
    _commit(clone, TEMPLATE, good + "\n{{ no_such_function .Values }}\n", "chore(helm): a broken template")
    try:
        sha = source.commit("main", note="deploy onto a broken chart")
        state = deploy(app=APP, environment=ENV, source_ref=REF, source_sha=sha, return_state=True, **FAST)
        assert state.is_failed()
        msg = state.message or ""
        assert "ComparisonError" in msg and "helm template" in msg and "no_such_function" in msg, msg
        # The rollback commit cannot render either; the run says so instead of claiming a recovery.
        assert "did not complete" in msg or "no known-good tag" in msg, msg
        assert health(env.health_url)[1].get("version") == serving, "the running version was never replaced"
    finally:
        _commit(clone, TEMPLATE, good, "chore(helm): fix the template")
        _settle(clone)


def _settle(clone: git.Repo) -> None:
    """Leave every environment as found: Argo CD notices the fix at its next poll (180 s here), so ask
    for the refresh now and wait until each Application compares cleanly again."""
    head = clone.git.rev_parse("origin/main")
    app = load_config().app(APP)
    deadline = time.monotonic() + 120
    for env in app.environments.values():
        argocd.request_refresh(env.application, namespace=env.argocd_namespace)
    for env in app.environments.values():
        while True:
            st = argocd.application_status(env.application, namespace=env.argocd_namespace)
            if st.sync_status == "Synced" and st.sync_revision == head and st.health_status == "Healthy":
                break
            assert time.monotonic() < deadline, f"{env.application} did not settle after the fix: {st}"
            time.sleep(0.5)
