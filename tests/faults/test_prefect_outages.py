"""The Prefect side fails under a running deploy: the server restarts while the deploy waits for
Argo CD, or the serve process is killed mid-deploy. The deploy must end in a correct, explained state,
a re-run must not make a second commit, and the environment's lock must not stay held forever.

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
from sandbox.manager import free_port, prefect_server_env
from tests.faults.conftest import FaultEnv, SourceClone, app_version, pid_alive, remote_log, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "staging", "main"
WAITS = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0, "lock_timeout": 180.0}
# The shortest lease the server accepts, so a killed run's lock is repossessed within the test.
LEASE_SECONDS = "60"


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class PrefectServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(prefect_server_env(self.home))
        # Expired leases are looked for every 15 s by default; the test waits less for a freed lock.
        env["PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS"] = "1"
        exe = Path(sys.executable).with_name("prefect")
        with open(self.home / "server.log", "ab") as out:
            self.proc = subprocess.Popen([str(exe), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        wait_for(lambda: _http_ok(f"{self.api_url}/health"), 180, "the Prefect server", interval=0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


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
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> bool:
        async with PrefectClient(server.api_url) as c:
            try:
                await c.read_deployment_by_name("deploy/deploy")
                return True
            except Exception:
                return False

    return run_coro_as_sync(go())


def test_serve_process_killed_mid_deploy(settings_of: FaultEnv, server: PrefectServer, source: SourceClone,
                                        tmp_path: Path) -> None:
    """serve and its flow-run process SIGKILLed mid-wait: the run stays Running (no heartbeat, no Crashed);
    the lease expires, and a re-run of the same deploy completes with one values commit."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    fe = settings_of
    sha = source.commit(BRANCH, "serve killed")
    tag = f"main-{sha[:7]}"
    serve = _serve(fe, server, tmp_path / "serve1.log")
    try:
        wait_for(lambda: _deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        with ArgoPaused(fe):
            run_id = _start_run(server, sha)
            wait_for(lambda: _commits_for(fe, tag) == 1, 180, "our values commit (the run now waits for sync)")
            # A dead machine takes the serve process and the flow-run process it started (in a session
            # of its own, so not in serve's process group) down together.
            victims = [serve.pid, *_descendants(serve.pid)]
            assert len(victims) >= 2, "serve runs each flow run in a child process"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            serve.wait(timeout=10)
            wait_for(lambda: not any(pid_alive(p) for p in victims[1:]), 30, "the flow-run process to die")
        time.sleep(3)
        assert run_coro_as_sync(_run_state(server.api_url, run_id)) == "RUNNING"

        serve = _serve(fe, server, tmp_path / "serve2.log")
        wait_for(lambda: _deployment_exists(server), 120, "the deploy deployment served again", interval=0.5)
        rerun_id = _start_run(server, sha)
        final = wait_for(lambda: (st := run_coro_as_sync(_run_state(server.api_url, rerun_id))) in
                         ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and st, 240, "the re-run to finish", 1)
        assert final == "COMPLETED", (tmp_path / "serve2.log").read_text()[-3000:]
        assert _commits_for(fe, tag) == 1
        assert app_version(fe.health_url(ENV)) == tag
        # Prefect 3.9 without flow heartbeats (and an automation on them) never marks the dead run Crashed.
        assert run_coro_as_sync(_run_state(server.api_url, run_id)) == "RUNNING"
    finally:
        if serve.poll() is None:
            for pid in [*_descendants(serve.pid), serve.pid]:
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
    finally:
        if serve.poll() is None:
            for pid in [*_descendants(serve.pid), serve.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            serve.wait(timeout=30)
