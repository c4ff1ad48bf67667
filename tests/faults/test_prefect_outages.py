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

import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultEnv, SourceClone, app_version, pid_alive, wait_for
from tests.faults.prefect_runs import (
    BRANCH,
    ENV,
    ArgoPaused,
    assert_recovered,
    commits_for,
    deployment_exists,
    descendants,
    finished_recovery,
    result,
    run_processes,
    run_state,
    start_deploy,
    start_run,
    start_serve,
    state,
    stop,
)
from tests.prefect_server import PrefectServer

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

def test_prefect_server_restart_while_waiting_for_sync(settings_of: FaultEnv, server: PrefectServer,
                                                      source: SourceClone, tmp_path: Path) -> None:
    """Server restarted mid-wait: the deploy still completes; a re-run gets the lock and makes no second commit."""
    fe = settings_of
    sha = source.commit(BRANCH, "prefect server restart")
    tag = f"main-{sha[:7]}"
    with ArgoPaused(fe):
        proc = start_deploy(fe, server, sha, tmp_path / "deploy1.log")
        wait_for(lambda: commits_for(fe, tag) == 1, 180, "our values commit (the deploy now waits for sync)")
        server.restart()
    first = result(proc, tmp_path / "deploy1.log")
    assert first["type"] == "COMPLETED", first
    assert app_version(fe.health_url(ENV)) == tag

    again = start_deploy(fe, server, sha, tmp_path / "deploy2.log")
    second = result(again, tmp_path / "deploy2.log")
    assert second["type"] == "COMPLETED", second
    assert commits_for(fe, tag) == 1


def test_run_process_killed_right_after_the_values_commit_is_recovered(
        settings_of: FaultEnv, server: PrefectServer, source: SourceClone, tmp_path: Path) -> None:
    """The deploy's own process SIGKILLed as its values commit lands: the runner marks it Crashed at once,
    and the recover automation finishes the deploy (after the dead run's lease) with no second commit."""
    fe = settings_of
    sha = source.commit(BRANCH, "run killed after commit")
    tag = f"main-{sha[:7]}"
    serve = start_serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        before = set(run_processes(serve.pid))
        run_id = start_run(server, sha)
        wait_for(lambda: commits_for(fe, tag) == 1, 180, "our values commit", interval=0.02)
        victims = set(run_processes(serve.pid)) - before
        assert len(victims) == 1, victims
        killed_at = time.monotonic()
        os.kill(victims.pop(), signal.SIGKILL)
        wait_for(lambda: state(server, run_id)[0] == "CRASHED", 30, "the killed run marked Crashed", 0.5)
        print(f"marked Crashed {time.monotonic() - killed_at:.1f} s after the kill")
        assert_recovered(fe, server, run_id, tag, killed_at, tmp_path / "serve.log")
    finally:
        stop(serve)


def test_serve_process_killed_mid_deploy(settings_of: FaultEnv, server: PrefectServer, source: SourceClone,
                                        tmp_path: Path) -> None:
    """serve and its flow-run process SIGKILLed while the deploy waits for Argo CD, serve started again as a
    supervisor would: the silent run is marked Crashed within the heartbeat window, and the recover
    automation finishes the deploy within 3 minutes of the kill, with one values commit."""
    from deployments.automations import HEARTBEAT_SECONDS, WINDOW

    fe = settings_of
    sha = source.commit(BRANCH, "serve killed")
    tag = f"main-{sha[:7]}"
    serve = start_serve(fe, server, tmp_path / "serve1.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        with ArgoPaused(fe):
            run_id = start_run(server, sha)
            wait_for(lambda: commits_for(fe, tag) == 1, 180, "our values commit (the run now waits for sync)")
            time.sleep(2)
            # A dead machine takes the serve process and the flow-run process it started (in a session
            # of its own, so not in serve's process group) down together.
            victims = [serve.pid, *descendants(serve.pid)]
            assert len(victims) >= 2, "serve runs each flow run in a child process"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            serve.wait(timeout=10)
            wait_for(lambda: not any(pid_alive(p) for p in victims[1:]), 30, "the flow-run process to die")
        assert state(server, run_id)[0] == "RUNNING", "nobody is left to say it died"
        # The machine comes back: a supervisor starts serve again. Nothing else is done by hand.
        serve = start_serve(fe, server, tmp_path / "serve2.log")
        # The last heartbeat came at most one interval before the kill; then the window, and the
        # server's proactive evaluation tick (5 s) with some slack.
        window = HEARTBEAT_SECONDS + WINDOW.total_seconds() + 20
        wait_for(lambda: state(server, run_id)[0] == "CRASHED", max(killed_at + window - time.monotonic(), 1),
                 "the silent run marked Crashed", 1)
        crashed_after = time.monotonic() - killed_at
        print(f"marked Crashed {crashed_after:.0f} s after the kill")
        assert crashed_after >= WINDOW.total_seconds() - HEARTBEAT_SECONDS, crashed_after
        assert "no heartbeat for 90 s" in state(server, run_id)[1]
        assert_recovered(fe, server, run_id, tag, killed_at, tmp_path / "serve2.log")
    finally:
        stop(serve)


def test_one_run_killed_does_not_take_another(settings_of: FaultEnv, server: PrefectServer, source: SourceClone,
                                              tmp_path: Path) -> None:
    """Two runs served at once, each in its own process forked from the warm server: SIGKILL of one is
    reported Crashed by the runner at once, and the other completes and verifies its release."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    fe = settings_of
    sha = source.commit(BRANCH, "one run killed")
    tag = f"main-{sha[:7]}"
    serve = start_serve(fe, server, tmp_path / "serve.log")
    try:
        wait_for(lambda: deployment_exists(server), 120, "the deploy deployment served", interval=0.5)
        before = set(run_processes(serve.pid))
        with ArgoPaused(fe):
            first = start_run(server, sha)
            wait_for(lambda: commits_for(fe, tag) == 1, 180, "the first run's values commit")
            first_pids = set(run_processes(serve.pid)) - before
            assert len(first_pids) == 1, f"one process per run, forked from the server: {first_pids}"
            # The same deploy again: it waits for the environment's lock in a process of its own.
            second = start_run(server, sha)
            wait_for(lambda: run_coro_as_sync(run_state(server.api_url, second)) == "RUNNING", 60,
                     "the second run to be Running")
            second_pids = set(run_processes(serve.pid)) - before - first_pids
            assert len(second_pids) == 1, second_pids
            os.kill(second_pids.pop(), signal.SIGKILL)
            wait_for(lambda: run_coro_as_sync(run_state(server.api_url, second)) == "CRASHED", 30,
                     "the killed run to be marked Crashed by the runner")
        final = wait_for(lambda: (st := run_coro_as_sync(run_state(server.api_url, first))) in
                         ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and st, 240, "the first run to finish", 1)
        assert final == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert app_version(fe.health_url(ENV)) == tag
        assert commits_for(fe, tag) == 1
        assert serve.poll() is None, "the serve process outlives a killed run"
        # The killed run is recovered too: the same deploy, already done by the first run, is verified
        # again once the first frees the lock, with no second commit.
        recovery = finished_recovery(server, second, time.monotonic() + 180)
        assert state(server, recovery.id)[0] == "COMPLETED", state(server, recovery.id)
        assert commits_for(fe, tag) == 1
    finally:
        stop(serve)
