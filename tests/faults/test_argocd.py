"""Argo CD misbehaves or the app does: the controller is down during a deploy, or the new version
crash-loops. Git must end naming the last known-good tag, and the flow must say what it knows."""

from __future__ import annotations

import os
import signal

import pytest

from flows.deploy import deploy
from tests.faults.conftest import (
    FAST,
    FaultEnv,
    SourceClone,
    app_version,
    pid_alive,
    remote_file,
    remote_log,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "dev", "release-dev"


def _tag_in_git(fe: FaultEnv) -> str:
    from ruamel.yaml import YAML

    return str(YAML(typ="safe").load(remote_file(fe.gitops, fe.values(ENV)))["image"]["tag"])


def test_argocd_down_rollback_pushed_but_unverified(settings_of: FaultEnv, source: SourceClone) -> None:
    """Argo CD stopped: SyncTimeout, the rollback commit still lands, the run says neither was verified;
    once Argo CD is back the cluster converges to the known-good tag."""
    fe = settings_of
    good = _tag_in_git(fe)
    wait_for(lambda: app_version(fe.health_url(ENV)) == good, 60, "dev serving what Git names")
    sha = source.commit(BRANCH, "argocd down")
    bad = f"release-dev-{sha[:7]}"
    pid = fe.argocd_pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 30, "the Argo CD emulator to exit")
    try:
        state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                       return_state=True, sync_timeout=6.0, rollout_timeout=10.0, health_timeout=10.0)
    finally:
        fe.restart_argocd()
    assert state.is_failed()
    msg = state.message or ""
    # Both waits timed out (SyncTimeout), and the message says what Argo CD last reported.
    assert msg.count("not synced and healthy at") == 2 and "within 6 s; last status:" in msg, msg
    assert f"deploy of {bad}" in msg and f"the rollback to {good} did not complete" in msg, msg
    # What Git names is read back: the rollback commit landed even though nothing verified it.
    assert msg.endswith(f"Git names {good}, the cluster runs {good}") or f"; Git names {good}," in msg, msg
    assert _tag_in_git(fe) == good
    subjects = [s for _, s in remote_log(fe.gitops, fe.values(ENV), n=2)]
    assert bad in subjects[1] and good in subjects[0], subjects
    wait_for(lambda: app_version(fe.health_url(ENV)) == good, 90, f"dev converging to {good}")


def test_crash_loop_rolls_back_to_verified_previous(settings_of: FaultEnv, source: SourceClone) -> None:
    """A release that crashes on start is caught from its pod (CrashLoopBackOff) while Argo CD still says
    Progressing; the run rolls back and the previous version answers."""
    fe = settings_of
    wait_for(lambda: app_version(fe.health_url(ENV)) == _tag_in_git(fe), 90, "dev serving what Git names")
    good = _tag_in_git(fe)
    sha = source.commit(BRANCH, "crash on start", crash=True)
    bad = f"release-dev-{sha[:7]}"
    state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                   return_state=True, **FAST)
    assert state.is_failed()
    msg = state.message or ""
    assert f"deploy of {bad} to {ENV} failed" in msg, msg
    assert f"rolled back; Git names {good}, the cluster runs {good}, verified serving {good}" in msg, msg
    assert "CrashLoopBackOff" in msg and "pod workout-api-" in msg and " container " in msg, msg
    assert _tag_in_git(fe) == good
    assert app_version(fe.health_url(ENV)) == good
