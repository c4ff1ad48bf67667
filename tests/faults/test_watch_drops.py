"""The Kubernetes API drops every watch stream after one second (as API servers and load balancers
do to long-lived connections): a whole deploy still finishes correctly."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client, config, watch

from flows.deploy import deploy
from tests.faults.conftest import (
    FAST,
    FaultEnv,
    SourceClone,
    app_version,
    remote_log,
    start_fault_env,
    stop_fault_env,
    wait_for,
)
from tests.fixtures_sandbox import _restore_env, _set_env

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "dev", "release-dev"


@pytest.fixture(scope="module")
def dropping(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[FaultEnv]:
    fe = start_fault_env(tmp_path_factory.mktemp("watch-drops"), kube_args=["--drop-watch-after", "1"])
    old = _set_env(fe.env)
    try:
        yield fe
    finally:
        _restore_env(old)
        stop_fault_env(fe)


def _one_watch_lasts(fe: FaultEnv) -> float:
    """Seconds a watch asked to last 30 s really lasts before the server closes it."""
    api = config.new_client_from_config(config_file=str(fe.state.kubeconfig))
    try:
        w = watch.Watch()
        started = time.monotonic()
        for _ in w.stream(client.CustomObjectsApi(api).list_namespaced_custom_object, "argoproj.io", "v1alpha1",
                          "argocd", "applications", timeout_seconds=30):
            pass
        return time.monotonic() - started
    finally:
        api.close()


def _hold_argocd_after_push(fe: FaultEnv, tag: str, seconds: float) -> threading.Thread:
    """Pause the Argo CD emulator for `seconds` once our values commit is on the remote, so the
    deploy's wait for sync spans several dropped watch streams."""
    def hold() -> None:
        wait_for(lambda: remote_log(fe.gitops, fe.values(ENV))[0][1].endswith(tag), 120, "our values commit")
        pid = fe.argocd_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    return t


def test_deploy_survives_watch_streams_dropped_every_second(dropping: FaultEnv, tmp_path) -> None:
    """With every watch cut after 1 s, the deploy still ends Completed at our commit, new version answering."""
    fe = dropping
    source = SourceClone(fe.state.source_remote, tmp_path / "src")
    sha = source.commit(BRANCH, "through dropped watches")
    tag = f"release-dev-{sha[:7]}"
    assert _one_watch_lasts(fe) < 15, "the API server is expected to cut watch streams after 1 s"
    holder = _hold_argocd_after_push(fe, tag, 4)
    state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                   return_state=True, **FAST)
    holder.join(timeout=60)
    assert state.is_completed(), state.message
    assert app_version(fe.health_url(ENV)) == tag
    subjects = [s for _, s in remote_log(fe.gitops, fe.values(ENV))]
    assert subjects[0].endswith(tag) and sum(s.endswith(tag) for s in subjects) == 1
