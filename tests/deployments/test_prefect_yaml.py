"""`prefect deploy --all` from prefect.yaml, and a process worker running what it registered."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.deployments import run_deployment
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.settings import PROJECT_ROOT
from deployments.automations import HEARTBEAT_SECONDS
from tests.deployments.conftest import POOL, worker

CHECK_MESSAGE = "DELIVERY_PROJECT_DIR must name this project checkout on the worker"


def _deployment(name: str) -> Any:
    async def read() -> Any:
        async with get_client() as c:
            return await c.read_deployment_by_name(name)
    return run_coro_as_sync(read())


def _artifacts_and_logs(run_id: Any, until: Callable[[list[str]], bool]) -> tuple[list[Any], list[str]]:
    """The run's artifacts and log messages, once `until(messages)` holds or after 60 s: the last
    log lines of a run reach the API shortly after its final state."""
    async def read() -> tuple[list[Any], list[str]]:
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            logs = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return arts, [log.message for log in logs]
    deadline = time.monotonic() + 60
    arts, logs = run_coro_as_sync(read())
    while not until(logs) and time.monotonic() < deadline:
        time.sleep(1)
        arts, logs = run_coro_as_sync(read())
    return arts, logs


def test_deploy_all_registers_the_five_deployments_with_schedules_and_limits(registered):
    """deploy, rollback, drift-check, recover and promote exist on the process pool, their runs sending
    heartbeats; only drift-check is scheduled (every 15 min)."""
    names = ("deploy/deploy", "rollback/rollback", "drift-check/drift-check", "recover/recover", "promote/promote")
    deploy, rollback, drift, recover, promote = (_deployment(n) for n in names)
    for d, entrypoint in ((deploy, "flows/deploy.py:deploy"), (rollback, "flows/rollback.py:rollback"),
                          (drift, "flows/drift.py:drift_check"), (recover, "flows/recover.py:recover"),
                          (promote, "flows/promote.py:promote")):
        assert d.entrypoint == entrypoint
        assert d.work_pool_name == POOL and d.work_queue_name == "default"
        assert "delivery" in d.tags and d.description
        assert d.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)
        steps = [next(iter(s)) for s in d.pull_steps]
        assert steps == ["prefect.deployments.steps.run_shell_script",
                         "prefect.deployments.steps.set_working_directory"]
    schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in drift.schedules]
    assert schedules == [("*/15 * * * *", "UTC", True)]
    assert deploy.schedules == [] and rollback.schedules == [] and recover.schedules == [] and promote.schedules == []
    limit = deploy.global_concurrency_limit
    assert limit is not None and limit.limit == 25
    assert deploy.concurrency_options.collision_strategy.value == "ENQUEUE"


def test_parameter_schemas_name_required_parameters_and_describe_them(registered):
    """The UI's run form: deploy needs app, environment, ref and sha; rollback's to_tag is optional and described."""
    deploy = _deployment("deploy/deploy").parameter_openapi_schema
    assert deploy["required"] == ["app", "environment", "source_ref", "source_sha"]
    assert {"delivery_id", "received_at", "sync_timeout"} <= set(deploy["properties"])
    rollback = _deployment("rollback/rollback").parameter_openapi_schema
    assert rollback["required"] == ["app", "environment"]
    props = rollback["properties"]
    assert props["to_tag"].get("default") is None
    assert "last known-good" in props["to_tag"]["description"]
    for name in ("app", "environment", "reason"):
        assert props[name].get("description"), name
    drift = _deployment("drift-check/drift-check").parameter_openapi_schema
    assert drift.get("required", []) == [] and drift["properties"]["heal"]["default"] is False
    assert "Git is never written" in drift["properties"]["heal"]["description"]
    promote = _deployment("promote/promote").parameter_openapi_schema
    assert promote["required"] == ["app", "from_environment", "to_environment"]
    assert promote["properties"]["tag"].get("default") is None
    assert "verified" in promote["properties"]["tag"]["description"]


def test_worker_runs_drift_check_from_the_project_dir(registered, sandbox, tmp_path):
    """A worker started elsewhere runs drift-check in DELIVERY_PROJECT_DIR: the flow body runs and reports."""
    env = {**registered, "DELIVERY_PROJECT_DIR": str(PROJECT_ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "DELIVERY_SANDBOX_DIR": str(sandbox.root), "DELIVERY_CONFIG_FILE": str(sandbox.config_file),
           "DELIVERY_KUBECONFIG": str(sandbox.kubeconfig)}
    with worker(env, tmp_path, tmp_path / "worker.log") as log:
        run = run_deployment("drift-check/drift-check", parameters={"apps": ["workout-api"]}, timeout=300,
                             poll_interval=1)
    assert run.state is not None and run.state.is_final(), f"{run.state_name}; worker log:\n{log.read_text()[-3000:]}"
    arts, logs = _artifacts_and_logs(run.id, until=lambda logs: any("workout-api/dev:" in m for m in logs))
    # Completed unless an earlier test in the session left drift behind; either way the flow itself ran.
    assert run.state.is_completed() or (run.state.is_failed() and "app environments drifted" in run.state.message), \
        f"{run.state_name}: {run.state.message}; worker log:\n{log.read_text()[-3000:]}"
    reports = [a for a in arts if a.key == "drift-report"]
    assert reports, "the flow body did not publish its drift report"
    # The report's table has a row per environment: the flow read the sandbox's config and cluster.
    assert "workout-api" in str(reports[0].data) and "dev" in str(reports[0].data)


def test_worker_without_project_dir_fails_the_pull_step_with_a_clear_message(registered, tmp_path):
    """DELIVERY_PROJECT_DIR unset: the run crashes in the pull step, the flow never starts, the worker says why."""
    env = {k: v for k, v in registered.items() if k != "DELIVERY_PROJECT_DIR"}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    with worker(env, tmp_path, tmp_path / "worker.log") as log:
        run = run_deployment("drift-check/drift-check", timeout=300, poll_interval=1)
        deadline = time.monotonic() + 30
        while CHECK_MESSAGE not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    assert run.state is not None and run.state.is_crashed(), f"{run.state_name}: {run.state.message}"
    assert CHECK_MESSAGE in log.read_text()
    arts, logs = _artifacts_and_logs(
        run.id, until=lambda logs: "Executing deployment step: run_shell_script" in logs)
    assert arts == []
    assert "Executing deployment step: run_shell_script" in logs
    assert not any("completed successfully" in m for m in logs)
