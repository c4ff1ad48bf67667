"""The automations that go with the deployments, read back from a real `prefect server start`: created
by serve.py when it registers the flows, kept as they should be by `ensure_automations`, scoped to our
deployments, and acting as they should (a silent run of ours marked Crashed, another's left alone; a
crashed deploy run starting a recovery run with its id)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import StateType
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient
from prefect.events.schemas.automations import AutomationCore
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed, Running
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.settings import PROJECT_ROOT
from deployments.automations import (
    CRASH_SILENT_RUNS,
    DEPLOYMENTS,
    HEARTBEAT_SECONDS,
    RECOVER_CRASHED_DEPLOYS,
    WINDOW,
    ensure_automations,
)
from tests.prefect_server import PrefectServer


def _wait(pred: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout:.0f} s (last: {last!r})")


def _in(server: PrefectServer, fn: Any) -> Any:
    async def go() -> Any:
        async with PrefectClient(server.api_url) as c:
            return await fn(c)
    return run_coro_as_sync(go())


def _automations(server: PrefectServer) -> dict[str, list[Any]]:
    async def read(c: PrefectClient) -> dict[str, list[Any]]:
        return {n: await c.read_automations_by_name(n) for n in (CRASH_SILENT_RUNS, RECOVER_CRASHED_DEPLOYS)}
    return _in(server, read)


def _core(automation: Any) -> AutomationCore:
    """What the API takes for a create or an update: the automation without its id (and without the
    owner, which the update endpoint refuses even when empty)."""
    return AutomationCore.model_validate(automation.model_dump(exclude={"id", "owner_resource"}))


def _deployment_ids(server: PrefectServer) -> dict[str, str]:
    async def read(c: PrefectClient) -> dict[str, str]:
        return {k: str((await c.read_deployment_by_name(n)).id) for k, n in DEPLOYMENTS.items()}
    return _in(server, read)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server on which `python -m deployments.serve` registered the deployments and their
    automations; serve is stopped again, so runs the tests create stay where they are."""
    home = tmp_path_factory.mktemp("automations")
    server = PrefectServer(home / "server")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(home / "client"), PYTHONPATH=str(PROJECT_ROOT),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = home / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=PROJECT_ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: all(_automations(server).values()) or serve.poll() is not None, 120,
              "serve to create the automations")
        assert serve.poll() is None, log.read_text()[-3000:]
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        server.stop()


def test_serve_creates_the_heartbeat_automation_scoped_to_our_deployments(served: PrefectServer) -> None:
    """One automation marks a run of our deployments (or tagged delivery) Crashed after 3 missed 30 s heartbeats."""
    (crash,) = _automations(served)[CRASH_SILENT_RUNS]
    ids = _deployment_ids(served)
    t = crash.trigger
    assert crash.enabled
    assert t.posture.value == "Proactive" and t.threshold == 1
    assert t.within == WINDOW == timedelta(seconds=3 * HEARTBEAT_SECONDS) and HEARTBEAT_SECONDS == 30
    assert "prefect.flow-run.heartbeat" in t.after
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"} <= t.expect
    assert t.for_each == {"prefect.resource.id"}
    assert t.match.model_dump() == {"prefect.resource.id": "prefect.flow-run.*"}
    assert sorted(t.match_related.model_dump()["prefect.resource.id"]) == sorted(
        [f"prefect.deployment.{i}" for i in ids.values()] + ["prefect.tag.delivery"])
    (action,) = crash.actions
    assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED
    assert "no heartbeat for 90 s" in action.message


def test_serve_creates_the_recovery_automation_for_crashed_deploys(served: PrefectServer) -> None:
    """A Crashed run of deploy/deploy, promote/promote, rollback/rollback (or recover/recover) runs
    recover/recover with the crashed run's id."""
    (recover,) = _automations(served)[RECOVER_CRASHED_DEPLOYS]
    ids = _deployment_ids(served)
    t = recover.trigger
    assert t.posture.value == "Reactive" and t.expect == {"prefect.flow-run.Crashed"}
    related = t.match_related.model_dump()
    assert related["prefect.resource.role"] == "deployment"
    assert sorted(related["prefect.resource.id"]) == sorted(
        f"prefect.deployment.{ids[k]}" for k in ("deploy", "promote", "rollback", "recover"))
    (action,) = recover.actions
    assert action.type == "run-deployment" and str(action.deployment_id) == ids["recover"]
    assert action.parameters == {"crashed_run_id": {"__prefect_kind": "jinja", "template": "{{ flow_run.id }}"}}


def test_ensure_automations_is_idempotent_and_puts_back_what_was_changed(served: PrefectServer) -> None:
    """Run again it changes nothing; an edited one is restored in place, a deleted one re-created, a duplicate gone."""
    before = {n: [a.id for a in v] for n, v in _automations(served).items()}
    assert ensure_automations() == {n: ids[0] for n, ids in before.items()}
    assert {n: [a.id for a in v] for n, v in _automations(served).items()} == before

    (crash,) = _automations(served)[CRASH_SILENT_RUNS]
    longer = crash.trigger.model_copy(update={"within": timedelta(hours=1)})
    edited = _core(crash).model_copy(update={"enabled": False, "trigger": longer})
    (recover,) = _automations(served)[RECOVER_CRASHED_DEPLOYS]

    async def tamper(c: PrefectClient) -> None:
        await c.update_automation(crash.id, edited)
        await c.delete_automation(recover.id)
    _in(served, tamper)
    (changed,) = _automations(served)[CRASH_SILENT_RUNS]
    assert changed.trigger.within == timedelta(hours=1) and not changed.enabled

    made = ensure_automations()
    now = _automations(served)
    (crash_now,), (recover_now,) = now[CRASH_SILENT_RUNS], now[RECOVER_CRASHED_DEPLOYS]
    assert crash_now.id == crash.id and crash_now.enabled and crash_now.trigger.within == WINDOW
    assert recover_now.id != recover.id and made[RECOVER_CRASHED_DEPLOYS] == recover_now.id

    async def duplicate(c: PrefectClient) -> None:
        await c.create_automation(_core(recover_now))
    _in(served, duplicate)
    assert len(_automations(served)[RECOVER_CRASHED_DEPLOYS]) == 2
    ensure_automations()
    assert len(_automations(served)[RECOVER_CRASHED_DEPLOYS]) == 1


def test_cli_path_after_prefect_deploy(served: PrefectServer, tmp_path: Path) -> None:
    """`python -m deployments.automations` (the prefect.yaml path) finds the deployments by name and exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=served.api_url, PREFECT_HOME=str(tmp_path), PYTHONPATH=str(PROJECT_ROOT))
    res = subprocess.run([sys.executable, "-m", "deployments.automations"], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert CRASH_SILENT_RUNS in res.stdout and RECOVER_CRASHED_DEPLOYS in res.stdout
    assert all(len(v) == 1 for v in _automations(served).values())


async def _running_run(c: PrefectClient, deployment_id: Any) -> Any:
    run = await c.create_flow_run_from_deployment(deployment_id, parameters={
        "app": "workout-api", "environment": "staging", "source_ref": "refs/heads/main", "source_sha": "0" * 40})
    await c.set_flow_run_state(run.id, Running(), force=True)
    return await c.read_flow_run(run.id)


def _heartbeat(run: Any, flow_name: str) -> Event:
    """The event the flow engine sends (flow_engine._build_heartbeat_event_template)."""
    related = [{"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow",
                "prefect.resource.name": flow_name},
               {"prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                "prefect.resource.role": "deployment"}]
    related += [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in run.tags]
    return Event(event="prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{run.id}",
                                                               "prefect.resource.name": run.name},
                 related=related)


def test_a_silent_run_of_ours_is_marked_crashed_and_anothers_is_not(served: PrefectServer) -> None:
    """Both runs send one heartbeat, then nothing: ours is Crashed within the window, the foreign one stays Running."""
    async def setup(c: PrefectClient) -> tuple[Any, Any]:
        ours = await _running_run(c, (await c.read_deployment_by_name("drift-check/drift-check")).id)
        flow_id = await c.create_flow_from_name("someone-elses-flow")
        other_dep = await c.create_deployment(flow_id=flow_id, name=f"other-{uuid4().hex[:6]}")
        other = await _running_run(c, other_dep)
        async with PrefectEventsClient(served.api_url) as events:
            await events.emit(_heartbeat(ours, "drift-check"))
            await events.emit(_heartbeat(other, "someone-elses-flow"))
        return ours, other

    ours, other = _in(served, setup)
    started = time.monotonic()

    def state(run: Any) -> str:
        async def read(c: PrefectClient) -> str:
            return (await c.read_flow_run(run.id)).state_type.value
        return _in(served, read)

    # The window, plus the server's 5 s proactive evaluation tick and some slack.
    _wait(lambda: state(ours) == "CRASHED", WINDOW.total_seconds() + 30, "our silent run marked Crashed", 1)
    waited = time.monotonic() - started
    assert waited >= WINDOW.total_seconds() - 5, f"marked Crashed after {waited:.0f} s, before the window"
    assert state(other) == "RUNNING"

    async def message(c: PrefectClient) -> str:
        return (await c.read_flow_run(ours.id)).state.message
    assert "no heartbeat for 90 s" in _in(served, message)


def test_a_crashed_deploy_run_starts_a_recovery_run_with_its_id(served: PrefectServer) -> None:
    """deploy/deploy run set Crashed → a recover/recover run is created whose crashed_run_id is that run's id."""
    async def crash(c: PrefectClient) -> Any:
        run = await _running_run(c, (await c.read_deployment_by_name("deploy/deploy")).id)
        await c.set_flow_run_state(run.id, Crashed(message="test"), force=True)
        return run

    run = _in(served, crash)

    def recoveries() -> list[Any]:
        async def read(c: PrefectClient) -> list[Any]:
            runs = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["recover"])))
            return [r for r in runs if r.parameters.get("crashed_run_id") == str(run.id)]
        return _in(served, read)

    (recovery,) = _wait(recoveries, 60, "a recovery run for the crashed deploy run")
    ids = _deployment_ids(served)
    assert str(recovery.deployment_id) == ids["recover"]
    time.sleep(5)
    assert len(recoveries()) == 1, "one recovery per crashed run"
