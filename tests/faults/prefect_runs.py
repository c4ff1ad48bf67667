"""What the Prefect-side fault tests share: a deploy or serve process pointed at a Prefect server of the
tests' own, and reads of what that server, Git and the lock say afterwards (the guarantees a killed or
cut-off deploy must keep: one values commit, Git naming what serves, the lock free)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from delivery.settings import PROJECT_ROOT
from tests.faults.conftest import FaultEnv, app_version, remote_file, remote_log, wait_for
from tests.prefect_server import PrefectServer

ENV, BRANCH = "staging", "main"
WAITS = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0, "lock_timeout": 180.0}
# The shortest lease the server accepts, so a killed run's lock is repossessed within the test.
LEASE_SECONDS = "60"


def run_env(fe: FaultEnv, server: PrefectServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DELIVERY_"))}
    env.update(fe.env, PREFECT_API_URL=server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(PROJECT_ROOT), **extra)
    return env


def start_deploy(fe: FaultEnv, server: PrefectServer, sha: str, log: Path) -> subprocess.Popen[str]:
    params = {"app": "workout-api", "environment": ENV, "source_ref": f"refs/heads/{BRANCH}", "source_sha": sha,
              **WAITS}
    out = open(log, "w")  # noqa: SIM115 - closed by the caller through proc.stdout
    return subprocess.Popen([sys.executable, "-m", "tests.faults.run_deploy", json.dumps(params)], cwd=PROJECT_ROOT,
                            env=run_env(fe, server), stdout=out, stderr=subprocess.STDOUT, text=True)


def result(proc: subprocess.Popen[str], log: Path, timeout: float = 300) -> dict[str, Any]:
    proc.wait(timeout=timeout)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the deploy process printed no result (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def commits_for(fe: FaultEnv, tag: str, environment: str = ENV) -> int:
    return sum(1 for _, s in remote_log(fe.gitops, fe.values(environment), n=50) if s.endswith(f" {tag}"))


class ArgoPaused:
    """SIGSTOP the Argo CD emulator so a deploy sits in its wait for sync; SIGCONT on exit."""

    def __init__(self, fe: FaultEnv) -> None:
        self.pid = fe.argocd_pid()

    def __enter__(self) -> ArgoPaused:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


async def run_state(api_url: str, run_id: Any) -> str:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as c:
        return (await c.read_flow_run(run_id)).state_type.value


def descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *descendants(int(child))]
    return out


def run_processes(serve_pid: int) -> list[int]:
    """The flow-run processes of a serve process: the children of its fork server."""
    out = []
    for child in Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split():
        if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
            out += [int(c) for c in Path(f"/proc/{child}/task/{child}/children").read_text().split()]
    return out


def start_serve(fe: FaultEnv, server: PrefectServer, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """`python -m deployments.serve` against our server; `extra`: more environment variables. No drift
    check is scheduled (once a year): its flow-run process would be one more child of serve, and the
    tests kill the deploy's own."""
    env = run_env(fe, server, **{"DELIVERY_LOCK_LEASE_SECONDS": LEASE_SECONDS, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                                 "DELIVERY_DRIFT_CRON": "0 0 1 1 *", **extra})
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=PROJECT_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def start_run(server: PrefectServer, sha: str) -> Any:
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


def deployment_exists(server: PrefectServer) -> bool:
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


def state(server: PrefectServer, run_id: Any) -> tuple[str, str]:
    """(state type, message) of a flow run."""
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> tuple[str, str]:
        async with PrefectClient(server.api_url) as c:
            run = await c.read_flow_run(run_id)
            return run.state_type.value, run.state.message or ""

    return run_coro_as_sync(go())


def recoveries(server: PrefectServer, run_id: Any) -> list[Any]:
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


def report(server: PrefectServer, run_id: Any, key: str) -> str:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> str:
        async with PrefectClient(server.api_url) as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[run_id])))
            return "\n".join(str(a.data) for a in arts if a.key == key)

    return run_coro_as_sync(go())


def lock_slots(server: PrefectServer, environment: str = ENV) -> int:
    from prefect.client.orchestration import PrefectClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> int:
        async with PrefectClient(server.api_url) as c:
            return (await c.read_global_concurrency_limit_by_name(f"deploy:workout-api:{environment}")).active_slots

    return run_coro_as_sync(go())


def git_names(fe: FaultEnv) -> str:
    from ruamel.yaml import YAML

    return str(YAML(typ="safe").load(remote_file(fe.gitops, fe.values(ENV)))["image"]["tag"])


def verified_in_git(fe: FaultEnv, tag: str) -> bool:
    notes = subprocess.run(["git", "log", "--notes=refs/notes/delivery", "--format=%N", "refs/heads/main"],
                           cwd=fe.gitops, capture_output=True, text=True, check=True).stdout
    return f"verified app=workout-api env={ENV} tag={tag} " in notes


def finished_recovery(server: PrefectServer, run_id: Any, deadline: float) -> Any:
    """The newest recover run started for `run_id`, once it is final; waits until `deadline` (monotonic)."""
    return wait_for(lambda: (rs := recoveries(server, run_id)) and state(server, rs[-1].id)[0] in
                    ("COMPLETED", "FAILED", "CANCELLED", "CRASHED") and rs[-1],
                    max(deadline - time.monotonic(), 1), "the recovery run to finish", 1)


def assert_recovered(fe: FaultEnv, server: PrefectServer, run_id: Any, tag: str, killed_at: float,
                      log: Path) -> Any:
    """Without anything from the test: a recovery run finishes the dead deploy within 3 minutes of the
    kill, the new version verified and served, one values commit for it, Git naming what serves, the
    lock free, and the recovery's report linking the dead run."""
    recovery = finished_recovery(server, run_id, killed_at + 180)
    st, message = state(server, recovery.id)
    assert st == "COMPLETED", f"{st}: {message}\n{log.read_text()[-3000:]}"
    assert len(recoveries(server, run_id)) == 1
    assert app_version(fe.health_url(ENV)) == tag
    assert git_names(fe) == tag, "Git's last pipeline commit names what serves"
    assert verified_in_git(fe, tag), "the recovery recorded the verification"
    assert commits_for(fe, tag) == 1
    assert lock_slots(server) == 0, "the environment's lock is free"
    text = report(server, recovery.id, f"recover-workout-api-{ENV}")
    assert str(run_id) in text and "**completed**" in text, text
    print(f"recovered {time.monotonic() - killed_at:.0f} s after the kill: {message}")
    return recovery


def stop(serve: subprocess.Popen[bytes]) -> None:
    if serve.poll() is None:
        for pid in [*descendants(serve.pid), serve.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        serve.wait(timeout=30)


def task_state(server: PrefectServer, run_id: Any, task: str) -> str | None:
    """State type of the newest run of task `task` (its Prefect name) in flow run `run_id`; None
    while there is none."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> str | None:
        async with PrefectClient(server.api_url) as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            ours = sorted((r for r in runs if r.name.startswith(f"{task}-")), key=lambda r: r.created)
            return ours[-1].state_type.value if ours and ours[-1].state_type else None

    return run_coro_as_sync(go())


def wait_task_running(server: PrefectServer, run_id: Any, task: str, timeout: float = 60) -> None:
    """Until the run's `task` is Running; fails at once when it has already finished (the run went past)."""
    def running() -> bool:
        st = task_state(server, run_id, task)
        assert st in (None, "PENDING", "RUNNING"), f"the run's {task} is {st} already: it went past the point"
        return st == "RUNNING"

    wait_for(running, timeout, f"the run's {task} task Running", 0.2)


def wait_synced(fe: FaultEnv, tag: str, timeout: float = 240) -> float:
    """Return (time.monotonic()) as soon as Argo CD shows the environment synced and healthy at our
    values commit for `tag`: the moment the deploy's wait for Argo CD ends (its rollout wait then
    finds the rollout done at once). A watch, judged as the deploy judges it, so this sees it within
    milliseconds of the Argo CD emulator writing it."""
    from kubernetes import client

    from delivery.config import load_config
    from tasks.argocd import GROUP, PLURAL, VERSION, describe, summarize, sync_verdict
    from tasks.kube import api_client, watch_object

    env = load_config().app("workout-api").environment(ENV)
    revision = wait_for(lambda: next((sha for sha, s in remote_log(fe.gitops, fe.values(ENV), n=50)
                                      if s.endswith(f" {tag}")), None), timeout, f"the values commit for {tag}")
    states = watch_object(client.CustomObjectsApi(api_client()).list_namespaced_custom_object, env.application,
                          deadline=time.monotonic() + timeout, group=GROUP, version=VERSION,
                          namespace=env.argocd_namespace, plural=PLURAL)
    last = "nothing"
    for app in states:
        if app is None:
            continue
        last = describe(summarize(app))
        if sync_verdict(app, str(revision)).state == "done":
            return time.monotonic()
    raise AssertionError(f"{env.application} not synced and healthy at {tag} within {timeout:.0f} s (last: {last})")


def kill_tree(root: int) -> list[int]:
    """SIGKILL `root` and every process under it at once, as a lost machine takes them down. Each is
    stopped first and its children read after, so none can start another process that escapes."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        seen.append(pid)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return seen


def wait_crashed(server: PrefectServer, run_id: Any, killed_at: float, *, silent: bool) -> float:
    """Until the killed run shows Crashed; returns the seconds since the kill. The runner says so at
    once when only the run's process died (within 30 s here); when serve died with it (`silent`), the
    heartbeat automation does: the last heartbeat came at most one interval before the kill, then the
    window, and the server's proactive evaluation tick (5 s) with some slack."""
    from deployments.automations import HEARTBEAT_SECONDS, WINDOW

    window = HEARTBEAT_SECONDS + WINDOW.total_seconds() + 20 if silent else 30
    wait_for(lambda: state(server, run_id)[0] == "CRASHED", max(killed_at + window - time.monotonic(), 1),
             "the killed run marked Crashed", 0.5)
    after = time.monotonic() - killed_at
    print(f"marked Crashed {after:.1f} s after the kill")
    if silent:
        assert after >= WINDOW.total_seconds() - HEARTBEAT_SECONDS, after
        assert f"no heartbeat for {WINDOW.total_seconds():g} s" in state(server, run_id)[1]
    return after
