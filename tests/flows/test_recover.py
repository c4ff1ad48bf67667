"""The recover flow called directly on the sandbox, for crashed deploy runs made up in the Prefect
API: it finishes the deploy, finishes a rollback the dead run had pushed instead of deploying the bad
tag again, gives up after its attempts saying what Git, the registry and the cluster show, and
refuses what is not a crashed deploy. (The automations that start it on a real crash:
tests/faults/test_prefect_outages.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.states import Cancelled, Crashed, Running
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.config import load_config
from flows.deploy import deploy
from flows.drift import drift_check
from flows.recover import recover
from tasks import gitops, trailers, values
from tests.flows.conftest import gitops_log, health

APP, ENV, REF = "workout-api", "dev", "refs/heads/release-dev"
VALUES = "helm/workout-api/values-dev.yaml"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


def _tag(sha: str) -> str:
    return f"release-dev-{sha[:7]}"


def _dead_run(flow: Any, parameters: dict[str, Any], state: Any, tags: list[str] | None = None) -> str:
    async def go() -> str:
        async with get_client() as c:
            run = await c.create_flow_run(flow, parameters=parameters, state=state, tags=tags or [])
            return str(run.id)
    return run_coro_as_sync(go())


def _end(run_id: str, state: Any) -> None:
    async def go() -> None:
        async with get_client() as c:
            await c.set_flow_run_state(run_id, state, force=True)
    run_coro_as_sync(go())


def _dead_deploy(sha: str, state: Any = None) -> str:
    return _dead_run(deploy, {"app": APP, "environment": ENV, "source_ref": REF, "source_sha": sha, **FAST},
                     state or Crashed(message="its process was killed"))


def _report(run_id: Any) -> str:
    async def go() -> str:
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[run_id])))
            return "\n".join(str(a.data) for a in arts if a.key == f"recover-{APP}-{ENV}")
    return run_coro_as_sync(go())


def _commits_for(stack: Any, tmp_path: Path, tag: str) -> int:
    return sum(1 for _, s in gitops_log(str(stack.gitops_remote), tmp_path, VALUES, n=30) if s.endswith(f" {tag}"))


def test_a_crashed_deploy_is_finished_and_its_report_links_it(stack, source, tmp_path):
    """A deploy that died before its build: the recovery builds, commits once, verifies; its report links the run."""
    sha = source.commit("release-dev", note="deploy whose process died")
    dead = _dead_deploy(sha)
    state = recover(crashed_run_id=dead, return_state=True)
    assert state.is_completed(), state.message
    assert _tag(sha) in state.message
    assert health(load_config().app(APP).environment(ENV).health_url)[1]["version"] == _tag(sha)
    assert _commits_for(stack, tmp_path, _tag(sha)) == 1
    report = _report(state.state_details.flow_run_id)
    assert dead in report and "**completed**" in report
    assert "before " in report and "reached the registry" in report, report

    # Recovering the same dead run again (a duplicate trigger) does nothing: an earlier recovery finished it.
    again = recover(crashed_run_id=dead, return_state=True)
    assert again.is_cancelled(), again.message
    assert _commits_for(stack, tmp_path, _tag(sha)) == 1


def test_a_deploy_that_died_rolling_back_gets_its_rollback_finished(stack, source, tmp_path):
    """Its rollback commit is already in Git: the recovery verifies that rollback, never deploys the bad tag again."""
    good = source.commit("release-dev", note="good release")
    assert deploy(app=APP, environment=ENV, source_ref=REF, source_sha=good, return_state=True, **FAST).is_completed()
    bad = source.commit("release-dev", note="release whose deploy died while rolling back")
    dead = _dead_deploy(bad)
    # What the dead run left in Git: its values commit, then its rollback commit (Argo CD saw neither).
    repo = gitops.checkout(str(stack.gitops_remote), "main", tmp_path / "gitops")
    values.bump_image_tag(tmp_path / "gitops" / VALUES, _tag(bad))
    gitops.commit_and_push(repo, [VALUES], trailers.commit_message(
        "bump", _tag(bad), app=APP, environment=ENV, source_sha=bad, flow_run_id=dead), branch="main")
    values.bump_image_tag(tmp_path / "gitops" / VALUES, _tag(good))
    gitops.commit_and_push(repo, [VALUES], trailers.commit_message(
        "rollback", _tag(good), app=APP, environment=ENV, replaces=_tag(bad)), branch="main")
    state = recover(crashed_run_id=dead, return_state=True)
    assert state.is_failed(), state.message
    assert "died rolling back" in state.message and f"rollback to {_tag(good)} is finished" in state.message
    assert health(load_config().app(APP).environment(ENV).health_url)[1]["version"] == _tag(good)
    assert _commits_for(stack, tmp_path / "log", _tag(bad)) == 1, "the bad tag is never committed again"
    assert "rolled-back" in _report(state.state_details.flow_run_id)


def test_recovery_gives_up_after_its_attempts_saying_what_git_the_registry_and_the_cluster_show(stack, source):
    """Three recoveries crashed already: the fourth ends Failed saying what Git, registry and cluster show."""
    sha = source.commit("release-dev", note="deploy whose recoveries keep dying")
    dead = _dead_deploy(sha)
    for _ in range(3):
        _dead_run(recover, {"crashed_run_id": dead}, Crashed(message="killed"), tags=[f"recovers:{dead}"])
    state = recover(crashed_run_id=dead, return_state=True)
    assert state.is_failed()
    msg = state.message
    assert "gave up" in msg and "after 3 recoveries" in msg, msg
    assert "Git names" in msg and f"registry: {load_config().app(APP).image}:{_tag(sha)} absent" in msg, msg
    assert "the cluster runs" in msg and "Argo CD:" in msg, msg


def test_only_crashed_deploy_promote_and_rollback_runs_are_taken_over(stack, source):
    """A deploy still running, and a crashed drift check, are refused with the reason."""
    running = _dead_deploy(source.commit("release-dev", note="still running"), Running())
    try:
        state = recover(crashed_run_id=running, return_state=True)
    finally:
        # Left Running it would count as a queued deploy of the environment for later tests.
        _end(running, Cancelled(message="test over"))
    assert state.is_failed() and "not crashed: nothing to take over" in state.message, state.message
    other = _dead_run(drift_check, {"apps": [APP]}, Crashed())
    state = recover(crashed_run_id=other, return_state=True)
    assert state.is_failed() and "only deploy, promote and rollback runs are recovered" in state.message, state.message
