"""The Prefect side fails under a running deploy: the server restarts while the deploy waits for
Argo CD, or the process running the deploy is killed (the flow-run process alone, or serve with it).
The deploy must end in a correct, explained state, a re-run must not make a second commit, and the
environment's lock must not stay held forever. A killed deploy is marked Crashed (by the runner, or
by the heartbeat automation when serve died too) and finished by the recover automation, with
nothing done by the test but starting serve again as a supervisor would.

These use a real `prefect server start` of their own (its own PREFECT_HOME and SQLite database, the
environment the sandbox gives its server) so it can be restarted; the deploys run in processes of
their own pointed at it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delivery.settings import PROJECT_ROOT
from tests.faults.conftest import (
    FaultEnv,
    SourceClone,
    app_version,
    pid_alive,
    remote_file,
    remote_log,
    wait_for,
)
from tests.prefect_server import PrefectServer

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "staging", "main"
WAITS = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0, "lock_timeout": 180.0}
# The shortest lease the server accepts, so a killed run's lock is repossessed within the test.
LEASE_SECONDS = "60"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    s = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _env(fe: FaultEnv, server: PrefectServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DELIVERY_"))}
    env.update(fe.env, PREFECT_API_URL=server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(PROJECT_ROOT), **extra)
    return env


def _start_deploy(fe: FaultEnv, server: PrefectServer, sha: str, log: Path) -> subprocess.Popen[str]:
    params = {"app": "workout-api", "environment": ENV, "source_ref": f"refs/heads/{BRANCH}", "source_sha": sha,
              **WAITS}
    out = open(log, "w")  # noqa: SIM115 - closed by the caller through proc.stdout
    return subprocess.Popen([sys.executable, "-m", "tests.faults.run_deploy", json.dumps(params)], cwd=PROJECT_ROOT,
                            env=_env(fe, server), stdout=out, stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen[str], log: Path, timeout: float = 300) -> dict[str, Any]:
    proc.wait(timeout=timeout)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the deploy process printed no result (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _commits_for(fe: FaultEnv, tag: str) -> int:
    return sum(1 for _, s in remote_log(fe.gitops, fe.values(ENV), n=50) if s.endswith(f" {tag}"))


class ArgoPaused:
    """SIGSTOP the Argo CD emulator so a deploy sits in its wait for sync; SIGCONT on exit."""

    def __init__(self, fe: FaultEnv) -> None:
        self.pid = fe.argocd_pid()

    def __enter__(self) -> ArgoPaused:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def test_prefect_server_restart_while_waiting_for_sync(settings_of: FaultEnv, server: PrefectServer,
                                                      source: SourceClone, tmp_path: Path) -> None:
    """Server restarted mid-wait: the deploy still completes; a re-run gets the lock and makes no second commit."""
    fe = settings_of
    sha = source.commit(BRANCH, "prefect server restart")
    tag = f"main-{sha[:7]}"
    with ArgoPaused(fe):
        proc = _start_deploy(fe, server, sha, tmp_path / "deploy1.log")
        wait_for(lambda: _commits_for(fe, tag) == 1, 180, "our values commit (the deploy now waits for sync)")
        server.restart()
    first = _result(proc, tmp_path / "deploy1.log")
    assert first["type"] == "COMPLETED", first
    assert app_version(fe.health_url(ENV)) == tag

    again = _start_deploy(fe, server, sha, tmp_path / "deploy2.log")
    second = _result(again, tmp_path / "deploy2.log")
    assert second["type"] == "COMPLETED", second
    assert _commits_for(fe, tag) == 1


async def _run_state(api_url: str, run_id: Any) -> str:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as c:
        return (await c.read_flow_run(run_id)).state_type.value


def _descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *_descendants(int(child))]
    return out


def _run_processes(serve_pid: int) -> list[int]:
    """The flow-run processes of a serve process: the children of its fork server."""
    out = []
    for child in Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split():
        if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
            out += [int(c) for c in Path(f"/proc/{child}/task/{child}/children").read_text().split()]
    return out


def _serve(fe: FaultEnv, server: PrefectServer, log: Path) -> subprocess.Popen[bytes]:
    env = _env(fe, server, DELIVERY_LOCK_LEASE_SECONDS=LEASE_SECONDS, PREFECT_RUNNER_POLL_FREQUENCY="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=PROJECT_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _start_run(server: PrefectServer, sha: str) -> Any:
    """Create a run of deploy/deploy on our server (what the webhook receiver does)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> Any:
        async with PrefectClient(server.api_url) as c:
            dep = await c.read_deployment_by_name("deploy/deploy")
            run = await c.create_flow_run_from_deployment(
                dep.id, parameters={"app": "workout-api", "environment": ENV, "source_ref": f"refs/heads/{BRANCH}",
                                    "source_sha": sha, **WAITS})
            return run.id

    return run_coro_as_sync(go())


def _deployment_exists(server: PrefectServer) -> bool:
    """serve registered the deployments and then their automations (so it is about to take runs)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    from deployments.automations import RECOVER_CRASHED_DEPLOYS

    async def go() -> bool:
        async with PrefectClient(server.api_url) as c:
            try:
                await c.read_deployment_by_name("deploy/deploy")
                return bool(await c.read_automations_by_name(RECOVER_CRASHED_DEPLOYS))
            except Exception:
                return False

    return run_coro_as_sync(go())


def _state(server: PrefectServer, run_id: Any) -> tuple[str, str]:
    """(state type, message) of a flow run."""
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> tuple[str, str]:
        async with PrefectClient(server.api_url) as c:
            run = await c.read_flow_run(run_id)
            return run.state_type.value, run.state.message or ""

    return run_coro_as_sync(go())


def _recoveries(server: PrefectServer, run_id: Any) -> list[Any]:
    """The recover runs the automation started for `run_id`, oldest first."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> list[Any]:
        async with PrefectClient(server.api_url) as c:
            runs = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["recover"])))
            return sorted((r for r in runs if r.parameters.get("crashed_run_id") == str(run_id)),
                          key=lambda r: r.created)

    return run_coro_as_sync(go())


def _report(server: PrefectServer, run_id: Any, key: str) -> str:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> str:
        async with PrefectClient(server.api_url) as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[run_id])))
            return "\n".join(str(a.data) for a in arts if a.key == key)

    return run_coro_as_sync(go())


def _lock_slots(server: PrefectServer) -> int:
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> int:
        async with PrefectClient(server.api_url) as c:
            return (await c.read_global_concurrency_limit_by_name(f"deploy:workout-api:{ENV}")).active_slots

    return run_coro_as_sync(go())


def _git_names(fe: FaultEnv) -> str:
    from ruamel.yaml import YAML

    return str(YAML(typ="safe").load(remote_file(fe.gitops, fe.values(ENV)))["image"]["tag"])


def _verified_in_git(fe: FaultEnv, tag: str) -> bool:
    notes = subprocess.run(["git", "log", "--notes=refs/notes/delivery", "--format=%N", "refs/heads/main"],
                           cwd=fe.gitops, capture_output=True, text=True, check=True).stdout
    return f"verified app=workout-api env={ENV} tag={tag} " in notes


def _assert_recovered(fe: FaultEnv, server: PrefectServer, run_id: Any, tag: str, killed_at: float,
                      log: Path) -> Any:
    """Without anything from the test: a recovery run finishes the dead deploy within 3 minutes of the
    kill, the new version verified and served, one values commit for it, Git naming what serves, the
    lock free, and the recovery's report linking the dead run."""
    deadline = killed_at + 180
    recovery = wait_for(lambda: (rs := _recoveries(server, run_id)) and _state(server, rs[-1].id)[0] in
                        ("COMPLETED", "FAILED", "CANCELLED", "CRASHED") and rs[-1],
                        max(deadline - time.monotonic(), 1), "the recovery run to finish", 1)
    st, message = _state(server, recovery.id)
    assert st == "COMPLETED", f"{st}: {message}\n{log.read_text()[-3000:]}"
    assert len(_recoveries(server, run_id)) == 1
    assert app_version(fe.health_url(ENV)) == tag
    assert _git_names(fe) == tag, "Git's last pipeline commit names what serves"
    assert _verified_in_git(fe, tag), "the recovery recorded the verification"
    assert _commits_for(fe, tag) == 1
    assert _lock_slots(server) == 0, "the environment's lock is free"
    report = _report(server, recovery.id, f"recover-workout-api-{ENV}")
    assert str(run_id) in report and "**completed**" in report, report
    print(f"recovered {time.monotonic() - killed_at:.0f} s after the kill: {message}")
    return recovery


def test_run_process_killed_right_after_the_values_commit_is_recovered(
        settings_of: FaultEnv, server: PrefectServer, source: SourceClone, tmp_path: Path) -> None:
    """The deploy's own process SIGKILLed as its values commit lands: the runner marks it Crashed at once,
    and the recover automation finishes the deploy (after the dead run's lease) with no second commit."""
    fe = settings_of
    sha = source.commit(BRANCH, "run killed after commit")
    tag = f"main-{sha[:7]}"
    serve = _serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: _deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        before = set(_run_processes(serve.pid))
        run_id = _start_run(server, sha)
        wait_for(lambda: _commits_for(fe, tag) == 1, 180, "our values commit", interval=0.02)
        victims = set(_run_processes(serve.pid)) - before
        assert len(victims) == 1, victims
        killed_at = time.monotonic()
        os.kill(victims.pop(), signal.SIGKILL)
        wait_for(lambda: _state(server, run_id)[0] == "CRASHED", 30, "the killed run marked Crashed", 0.5)
        print(f"marked Crashed {time.monotonic() - killed_at:.1f} s after the kill")
        _assert_recovered(fe, server, run_id, tag, killed_at, tmp_path / "serve.log")
    finally:
        _stop(serve)


def test_serve_process_killed_mid_deploy(settings_of: FaultEnv, server: PrefectServer, source: SourceClone,
                                        tmp_path: Path) -> None:
    """serve and its flow-run process SIGKILLed while the deploy waits for Argo CD, serve started again as a
    supervisor would: the silent run is marked Crashed within the heartbeat window, and the recover
    automation finishes the deploy within 3 minutes of the kill, with one values commit."""
    from deployments.automations import HEARTBEAT_SECONDS, WINDOW

    fe = settings_of
    sha = source.commit(BRANCH, "serve killed")
    tag = f"main-{sha[:7]}"
    serve = _serve(fe, server, tmp_path / "serve1.log")
    try:
        wait_for(lambda: _deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        with ArgoPaused(fe):
            run_id = _start_run(server, sha)
            wait_for(lambda: _commits_for(fe, tag) == 1, 180, "our values commit (the run now waits for sync)")
            time.sleep(2)
            # A dead machine takes the serve process and the flow-run process it started (in a session
            # of its own, so not in serve's process group) down together.
            victims = [serve.pid, *_descendants(serve.pid)]
            assert len(victims) >= 2, "serve runs each flow run in a child process"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            serve.wait(timeout=10)
            wait_for(lambda: not any(pid_alive(p) for p in victims[1:]), 30, "the flow-run process to die")
        assert _state(server, run_id)[0] == "RUNNING", "nobody is left to say it died"
        # The machine comes back: a supervisor starts serve again. Nothing else is done by hand.
        serve = _serve(fe, server, tmp_path / "serve2.log")
        # The last heartbeat came at most one interval before the kill; then the window, and the
        # server's proactive evaluation tick (5 s) with some slack.
        window = HEARTBEAT_SECONDS + WINDOW.total_seconds() + 20
        wait_for(lambda: _state(server, run_id)[0] == "CRASHED", max(killed_at + window - time.monotonic(), 1),
                 "the silent run marked Crashed", 1)
        crashed_after = time.monotonic() - killed_at
        print(f"marked Crashed {crashed_after:.0f} s after the kill")
        assert crashed_after >= WINDOW.total_seconds() - HEARTBEAT_SECONDS, crashed_after
        assert "no heartbeat for 90 s" in _state(server, run_id)[1]
        _assert_recovered(fe, server, run_id, tag, killed_at, tmp_path / "serve2.log")
    finally:
        _stop(serve)


def _stop(serve: subprocess.Popen[bytes]) -> None:
    if serve.poll() is None:
        for pid in [*_descendants(serve.pid), serve.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        serve.wait(timeout=30)


def test_one_run_killed_does_not_take_another(settings_of: FaultEnv, server: PrefectServer, source: SourceClone,
                                              tmp_path: Path) -> None:
    """Two runs served at once, each in its own process forked from the warm server: SIGKILL of one is
    reported Crashed by the runner at once, and the other completes and verifies its release."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    fe = settings_of
    sha = source.commit(BRANCH, "one run killed")
    tag = f"main-{sha[:7]}"
    serve = _serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: _deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        before = set(_run_processes(serve.pid))
        with ArgoPaused(fe):
            first = _start_run(server, sha)
            wait_for(lambda: _commits_for(fe, tag) == 1, 180, "the first run's values commit")
            first_pids = set(_run_processes(serve.pid)) - before
            assert len(first_pids) == 1, f"one process per run, forked from the server: {first_pids}"
            # The same deploy again: it waits for the environment's lock in a process of its own.
            second = _start_run(server, sha)
            wait_for(lambda: run_coro_as_sync(_run_state(server.api_url, second)) == "RUNNING", 60,
                     "the second run to be Running")
            second_pids = set(_run_processes(serve.pid)) - before - first_pids
            assert len(second_pids) == 1, second_pids
            os.kill(second_pids.pop(), signal.SIGKILL)
            wait_for(lambda: run_coro_as_sync(_run_state(server.api_url, second)) == "CRASHED", 30,
                     "the killed run to be marked Crashed by the runner")
        final = wait_for(lambda: (st := run_coro_as_sync(_run_state(server.api_url, first))) in
                         ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and st, 240, "the first run to finish", 1)
        assert final == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert app_version(fe.health_url(ENV)) == tag
        assert _commits_for(fe, tag) == 1
        assert serve.poll() is None, "the serve process outlives a killed run"
        # The killed run is recovered too: the same deploy, already done by the first run, is verified
        # again once the first frees the lock, with no second commit.
        recovery = wait_for(lambda: (rs := _recoveries(server, second)) and _state(server, rs[-1].id)[0] in
                            ("COMPLETED", "FAILED", "CANCELLED", "CRASHED") and rs[-1], 180,
                            "the killed run's recovery to finish", 1)
        assert _state(server, recovery.id)[0] == "COMPLETED", _state(server, recovery.id)
        assert _commits_for(fe, tag) == 1
    finally:
        _stop(serve)
