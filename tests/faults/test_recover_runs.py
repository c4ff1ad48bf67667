"""A promotion or a rollback whose process dies is finished by running it again as itself.

staging verifies a release, a promotion of it to prod (approval required) is approved through the
same API call the UI's form makes, and its process is SIGKILLed while it waits for Argo CD, after its
values commit. The runner marks it Crashed; the recover automation runs it again as itself (the UI's
Retry), so the server hands back the approval it was given: nobody is asked twice, prod serves the
promoted tag verified, one values commit for it names the approver, and the lock is free."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import FaultEnv, SourceClone, app_version, remote_log, wait_for
from tests.faults.prefect_runs import (
    BRANCH,
    ENV,
    WAITS,
    ArgoPaused,
    commits_for,
    deployment_exists,
    finished_recovery,
    lock_slots,
    report,
    run_processes,
    start_run,
    start_serve,
    state,
    stop,
)
from tests.prefect_server import PrefectServer

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

TARGET = "prod"


def _api(server: PrefectServer, fn: Any) -> Any:
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> Any:
        async with PrefectClient(server.api_url) as c:
            return await fn(c)

    return run_coro_as_sync(go())


def _start_promotion(server: PrefectServer, tag: str) -> Any:
    async def go(c: Any) -> Any:
        dep = await c.read_deployment_by_name("promote/promote")
        run = await c.create_flow_run_from_deployment(dep.id, parameters={
            "app": "workout-api", "from_environment": ENV, "to_environment": TARGET, "tag": tag,
            "reason": "crash drill", **WAITS})
        return run.id

    return _api(server, go)


def _state_name(server: PrefectServer, run_id: Any) -> str:
    return _api(server, lambda c: c.read_flow_run(run_id)).state_name or ""


def test_promotion_killed_after_its_approval_is_run_again_with_that_approval(
        settings_of: FaultEnv, server: PrefectServer, source: SourceClone, tmp_path: Path) -> None:
    fe = settings_of
    sha = source.commit(BRANCH, "promotion killed")
    tag = f"main-{sha[:7]}"
    serve = start_serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deployments served", interval=0.5)
        deployed = start_run(server, sha)
        wait_for(lambda: state(server, deployed)[0] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 240,
                 f"the deploy of {tag} to {ENV}", 1)
        assert state(server, deployed)[0] == "COMPLETED", state(server, deployed)

        run_id = _start_promotion(server, tag)
        wait_for(lambda: _state_name(server, run_id) == "Suspended", 120, "the promotion to wait for its approval",
                 0.5)
        before = set(run_processes(serve.pid))
        with ArgoPaused(fe):
            answer = {"approve": True, "approver": "tester", "comment": "crash drill"}
            result = _api(server, lambda c: c.resume_flow_run(run_id, run_input=answer))
            assert result.status.value == "ACCEPT", result
            wait_for(lambda: commits_for(fe, tag, TARGET) == 1, 180, "the promotion's values commit", 0.05)
            victims = set(run_processes(serve.pid)) - before
            assert len(victims) == 1, victims
            killed_at = time.monotonic()
            os.kill(victims.pop(), signal.SIGKILL)
            wait_for(lambda: state(server, run_id)[0] == "CRASHED", 30, "the killed promotion marked Crashed", 0.5)
            print(f"marked Crashed {time.monotonic() - killed_at:.1f} s after the kill")

        recovery = finished_recovery(server, run_id, killed_at + 180)
        st, message = state(server, recovery.id)
        assert st == "COMPLETED", f"{st}: {message}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        print(f"recovered {time.monotonic() - killed_at:.0f} s after the kill: {message}")
        assert state(server, run_id)[0] == "COMPLETED", "the promotion itself ran again and completed"
        assert app_version(fe.health_url(TARGET)) == tag
        assert commits_for(fe, tag, TARGET) == 1, "no second values commit"
        (sha_of_commit,) = [c for c, s in remote_log(fe.gitops, fe.values(TARGET), n=50) if s.endswith(f" {tag}")]
        body = subprocess.run(["git", "log", "-1", "--format=%B", sha_of_commit], cwd=fe.gitops, capture_output=True,
                              text=True, check=True).stdout
        assert "Delivery-Approved-By: tester" in body, body
        assert lock_slots(server, TARGET) == 0, "the prod lock is free"
        text = report(server, recovery.id, f"recover-workout-api-{TARGET}")
        assert str(run_id) in text and "**completed**" in text, text
    finally:
        stop(serve)


def _rollbacks_to(fe: FaultEnv, tag: str) -> int:
    return sum(1 for _, s in remote_log(fe.gitops, fe.values(ENV), n=50)
               if s.startswith("chore(helm): roll back") and s.endswith(f" {tag}"))


def test_rollback_killed_after_its_commit_is_run_again(settings_of: FaultEnv, server: PrefectServer,
                                                       source: SourceClone, tmp_path: Path) -> None:
    """A rollback started by hand (the rollback deployment) SIGKILLed after its rollback commit, while it
    waits for Argo CD: run again as itself, it verifies the same tag with no second rollback commit."""
    fe = settings_of
    previous = app_version(fe.health_url(ENV))
    assert previous, "staging answers a version"
    sha = source.commit(BRANCH, "rollback killed")
    tag = f"main-{sha[:7]}"
    serve = start_serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deployments served", interval=0.5)
        deployed = start_run(server, sha)
        wait_for(lambda: state(server, deployed)[0] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 240,
                 f"the deploy of {tag} to {ENV}", 1)
        assert state(server, deployed)[0] == "COMPLETED", state(server, deployed)
        assert app_version(fe.health_url(ENV)) == tag
        rollbacks = _rollbacks_to(fe, previous)

        async def start(c: Any) -> Any:
            dep = await c.read_deployment_by_name("rollback/rollback")
            return (await c.create_flow_run_from_deployment(dep.id, parameters={
                "app": "workout-api", "environment": ENV, "to_tag": previous, "reason": "crash drill",
                **{k: v for k, v in WAITS.items() if k != "lock_timeout"}})).id

        before = set(run_processes(serve.pid))
        with ArgoPaused(fe):
            run_id = _api(server, start)
            wait_for(lambda: _rollbacks_to(fe, previous) == rollbacks + 1, 180, "the rollback commit", 0.05)
            victims = set(run_processes(serve.pid)) - before
            assert len(victims) == 1, victims
            killed_at = time.monotonic()
            os.kill(victims.pop(), signal.SIGKILL)
            wait_for(lambda: state(server, run_id)[0] == "CRASHED", 30, "the killed rollback marked Crashed", 0.5)

        recovery = finished_recovery(server, run_id, killed_at + 180)
        st, message = state(server, recovery.id)
        assert st == "COMPLETED", f"{st}: {message}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        print(f"recovered {time.monotonic() - killed_at:.0f} s after the kill: {message}")
        assert state(server, run_id)[0] == "COMPLETED", "the rollback itself ran again and completed"
        assert app_version(fe.health_url(ENV)) == previous
        assert _rollbacks_to(fe, previous) == rollbacks + 1, "no second rollback commit"
        assert lock_slots(server) == 0, "the lock is free"
    finally:
        stop(serve)
