"""Issue 16's kill points: the process running a deploy is SIGKILLed (the flow-run process alone, or
serve with everything under it, as a lost machine) during the build, right after the values commit
is pushed, during the wait for Argo CD, and during the health probe. Nothing is done by the test
afterwards but starting serve again, as a supervisor would, when serve died. Each time: the run
shows Crashed within the window (the runner says so at once when only its process died; the
heartbeat automation when serve died with it), and within 3 minutes of the kill the recover
automation has the new version verified and served, Git's last pipeline commit naming it, one
values commit for the tag, and the environment's lock free.

(The flow-run process right after the commit and serve during the wait for Argo CD are in
test_prefect_outages.py.)

How a run is held at its point, so the kill lands there every time:
- build: the source commit adds a slow RUN step to the sample app's Dockerfile, tagged with a marker;
  the kill comes while the engine runs that step (the classic builder runs it as a container);
- right after the commit: the remote is watched for the values commit every 20 ms;
- Argo CD wait: the Argo CD emulator is stopped (SIGSTOP) until the kill, and the kill comes once the
  run's wait-for-sync task is Running;
- health: the Argo CD emulator, which is also the Service in front of the app, is stopped the moment
  it shows the Application synced and healthy at our commit (a watch, judged as the deploy's own
  wait judges it). The deploy's wait ends there, its rollout wait finds the rollout done, and its
  health probe's requests go unanswered; verifying takes it three answers 0.1 s apart, so the
  stop comes first. The kill comes once the run's probe-health task is Running, and the emulator
  is let go after it."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import pytest

from tasks.images import image_exists
from tests.faults.conftest import FaultEnv, SourceClone, pid_alive, wait_for
from tests.faults.prefect_runs import (
    BRANCH,
    ArgoPaused,
    assert_recovered,
    commits_for,
    deployment_exists,
    kill_tree,
    run_processes,
    start_run,
    start_serve,
    state,
    stop,
    verified_in_git,
    wait_crashed,
    wait_synced,
    wait_task_running,
)
from tests.prefect_server import PrefectServer

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

# Long enough to be caught under way, short enough that the recovery's rebuild fits the 3 minutes
# after a serve kill, whose Crashed alone takes up to 2 minutes.
BUILD_SECONDS = 10


def _commit(source: SourceClone, point: str, note: str) -> tuple[str, str, str]:
    """(sha, tag, build marker) of a new source commit; for the build point its Dockerfile has a slow step."""
    marker = f"kill-point-{uuid.uuid4().hex[:12]}"
    sha = source.commit(BRANCH, note, dockerfile_run=f"sleep {BUILD_SECONDS} && echo {marker}"
                        if point == "build" else None)
    return sha, f"main-{sha[:7]}", marker


def _building(marker: str) -> bool:
    """The engine is running our build's slow RUN step."""
    client = docker.from_env(timeout=10)
    try:
        return any(marker in c.get("Command", "") for c in client.api.containers())
    finally:
        client.close()


@contextmanager
def _run_held_at(point: str, fe: FaultEnv, server: PrefectServer, sha: str, tag: str,
                 marker: str) -> Iterator[Any]:
    """Start a deploy run of `sha` and yield its id once it is at `point`, held there (where a hold
    is needed) until the block ends."""
    argo = ArgoPaused(fe)
    if point == "build":
        run_id = start_run(server, sha)
        wait_for(lambda: _building(marker), 240, "the build's slow RUN step under way", 0.1)
        yield run_id
    elif point == "after-commit":
        run_id = start_run(server, sha)
        wait_for(lambda: commits_for(fe, tag) == 1, 240, "our values commit", 0.02)
        yield run_id
    elif point == "argocd-wait":
        with argo:
            run_id = start_run(server, sha)
            wait_for(lambda: commits_for(fe, tag) == 1, 240, "our values commit")
            wait_task_running(server, run_id, "wait-for-sync")
            yield run_id
    elif point == "health":
        run_id = start_run(server, sha)
        wait_synced(fe, tag)
        with argo:
            wait_task_running(server, run_id, "probe-health")
            yield run_id
    else:
        raise ValueError(point)


def _assert_stopped_at(point: str, fe: FaultEnv, tag: str) -> None:
    """What Git and the registry show right after the kill is what that point leaves behind."""
    assert not verified_in_git(fe, tag), "killed before its verification"
    if point == "build":
        assert commits_for(fe, tag) == 0, "killed before its values commit"
        assert not image_exists(fe.image, tag), "killed before its image reached the registry"
    else:
        assert commits_for(fe, tag) == 1


@pytest.mark.parametrize("point", ["build", "argocd-wait", "health"])
def test_run_process_killed_is_recovered(point: str, settings_of: FaultEnv, server: PrefectServer,
                                         source: SourceClone, tmp_path: Path) -> None:
    """The deploy's own process SIGKILLed at `point`: Crashed at once, and finished by the recover automation."""
    fe = settings_of
    print(f"\nthe flow-run process killed at {point}:")
    sha, tag, marker = _commit(source, point, f"run process killed during {point}")
    serve = start_serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        before = set(run_processes(serve.pid))
        with _run_held_at(point, fe, server, sha, tag, marker) as run_id:
            victims = set(run_processes(serve.pid)) - before
            assert len(victims) == 1, f"one flow-run process, ours: {victims}"
            os.kill(victims.pop(), signal.SIGKILL)
            killed_at = time.monotonic()
        _assert_stopped_at(point, fe, tag)
        wait_crashed(server, run_id, killed_at, silent=False)
        assert_recovered(fe, server, run_id, tag, killed_at, tmp_path / "serve.log")
    finally:
        stop(serve)


@pytest.mark.parametrize("point", ["build", "after-commit", "health"])
def test_serve_tree_killed_is_recovered(point: str, settings_of: FaultEnv, server: PrefectServer,
                                        source: SourceClone, tmp_path: Path) -> None:
    """serve and every process under it SIGKILLed at `point`, serve started again: Crashed by the heartbeat
    automation within its window, and finished by the recover automation."""
    fe = settings_of
    print(f"\nserve and its processes killed at {point}:")
    sha, tag, marker = _commit(source, point, f"serve killed during {point}")
    serve = start_serve(fe, server, tmp_path / "serve1.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        with _run_held_at(point, fe, server, sha, tag, marker) as run_id:
            runs = run_processes(serve.pid)
            victims = kill_tree(serve.pid)
            killed_at = time.monotonic()
            assert runs and set(runs) <= set(victims), (runs, victims)
            serve.wait(timeout=10)
            wait_for(lambda: not any(pid_alive(p) for p in victims), 30, "every killed process gone")
        _assert_stopped_at(point, fe, tag)
        assert state(server, run_id)[0] == "RUNNING", "nobody is left to say it died"
        # The machine comes back: a supervisor starts serve again. Nothing else is done by hand.
        serve = start_serve(fe, server, tmp_path / "serve2.log")
        wait_crashed(server, run_id, killed_at, silent=True)
        assert_recovered(fe, server, run_id, tag, killed_at, tmp_path / "serve2.log")
    finally:
        stop(serve)
