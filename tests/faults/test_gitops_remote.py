"""The GitOps remote misbehaves: it refuses pushes with a hook, or another actor commits to the
branch between our bump and our push."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import git
import pytest

from flows.deploy import deploy
from tasks import gitops
from tasks import values as values_mod
from tests.faults.conftest import FAST, FaultEnv, SourceClone, app_version, remote_file, remote_head, remote_log

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "dev", "release-dev"
REFUSAL = "pushes to main are frozen for the release audit (ticket OPS-4711)"


@pytest.fixture
def refusing_remote(settings_of: FaultEnv) -> Iterator[Path]:
    """A pre-receive hook on the bare GitOps remote that declines every push with a message."""
    hook = settings_of.gitops / "hooks" / "pre-receive"
    assert not hook.exists()
    hook.write_text(f"#!/bin/sh\necho '{REFUSAL}' >&2\nexit 1\n")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    try:
        yield hook
    finally:
        hook.unlink()


def test_remote_hook_declines_push(settings_of: FaultEnv, source: SourceClone, refusing_remote: Path) -> None:
    """A pre-receive hook that declines: Failed naming the remote's message; Git and the app unchanged."""
    fe = settings_of
    sha = source.commit(BRANCH, "frozen remote")
    before = remote_head(fe.gitops)
    values_before = remote_file(fe.gitops, fe.values(ENV))
    serving = app_version(fe.health_url(ENV))
    state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                   return_state=True, **FAST)
    assert state.is_failed()
    assert "GitPushError" in state.message and REFUSAL in state.message, state.message
    assert remote_head(fe.gitops) == before
    assert remote_file(fe.gitops, fe.values(ENV)) == values_before
    assert app_version(fe.health_url(ENV)) == serving


def test_concurrent_commit_between_bump_and_push_is_rebased(settings_of: FaultEnv, tmp_path: Path) -> None:
    """Another actor pushes between our bump and our push: ours is rebased on theirs; both are on the remote."""
    fe = settings_of
    ours = gitops.checkout(str(fe.gitops), "main", tmp_path / "ours")
    values = fe.values("prod")
    bump = values_mod.bump_image_tag(tmp_path / "ours" / values, "race-test-1")
    assert bump.changed

    other = git.Repo.clone_from(str(fe.gitops), tmp_path / "other", branch="main")
    (tmp_path / "other" / "argocd" / "NOTES.md").write_text("maintenance window: Sunday 02:00 UTC\n")
    other.index.add(["argocd/NOTES.md"])
    actor = git.Actor("ops", "ops@example.com")
    theirs = other.index.commit("docs(argocd): maintenance window", author=actor, committer=actor).hexsha
    other.remotes.origin.push("main:main")

    result = gitops.commit_and_push(ours, [values], "chore(helm): update image tag to race-test-1",
                                    author=("delivery-bot", "bot@example.com"), branch="main")
    assert result.committed and result.rebased
    assert remote_head(fe.gitops) == result.sha
    parent = git.Repo(fe.gitops).commit(result.sha).parents[0].hexsha
    assert parent == theirs
    assert "race-test-1" in remote_file(fe.gitops, values)
    assert "maintenance window" in remote_file(fe.gitops, "argocd/NOTES.md")
    assert remote_log(fe.gitops, values)[0] == (result.sha, "chore(helm): update image tag to race-test-1")
    # Put prod's tag back so the Argo CD emulator never tries to run the made-up tag.
    values_mod.bump_image_tag(tmp_path / "ours" / values, bump.old_tag)
    gitops.commit_and_push(ours, [values], f"chore(helm): update image tag to {bump.old_tag}",
                           author=("delivery-bot", "bot@example.com"), branch="main")
