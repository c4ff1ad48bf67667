"""Faults of the real cluster in the middle of a deploy: Argo CD's application-controller SIGKILLed
right after our values commit and started again, and the kubelet stopped while the new pods roll out.
Each deploy still ends verified, with one values commit, because the pipeline judges what Argo CD
and the Deployment report once they are back, within its own bounded waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import git
import pytest
from kubernetes import client

from delivery.config import load_config
from flows.deploy import deploy
from sandbox.real import RealCluster
from tasks.kube import api_client
from tests.source_clone import SourceClone

pytestmark = [pytest.mark.real, pytest.mark.docker]

APP = "workout-api"


def _commits(remote: Path, path: str) -> int:
    return int(git.Git().execute(["git", "-C", str(remote), "rev-list", "--count", "main", "--", path]))


def _serving(app: str, env: str) -> str:
    import json

    from tasks.probes import fetch_health

    code, body = fetch_health(load_config().app(app).environment(env).health_url, timeout=10)
    return str(json.loads(body).get("version", "")) if code == 200 else ""


def _in_background(when: Callable[[], bool], fault: Callable[[], None], timeout: float = 300) -> threading.Thread:
    """Run `fault` in a thread as soon as `when()` holds (polled every 0.2 s); errors surface in the test."""
    errors: list[BaseException] = []

    def run() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not when():
                if time.monotonic() > deadline:
                    raise AssertionError("the moment for the fault never came")
                time.sleep(0.2)
            fault()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def _finish(t: threading.Thread) -> None:
    t.join(300)
    assert not t.is_alive(), "the fault thread did not finish"
    errors = t.errors  # type: ignore[attr-defined]
    if errors:
        raise errors[0]


def _deploy(sha: str):
    return deploy(app=APP, environment="staging", source_ref="refs/heads/main", source_sha=sha, return_state=True,
                  sync_timeout=300.0, rollout_timeout=240.0, health_timeout=90.0)


def test_application_controller_killed_mid_sync_then_restarted(real, tmp_path: Path) -> None:
    cluster = RealCluster(real.root / "real")
    values_path = f"helm/{APP}/values-staging.yaml"
    before = _commits(real.gitops_remote, values_path)
    src = SourceClone(str(real.source_remote), tmp_path / "src")
    sha = src.commit("main", note="real controller killed")
    seen: dict[str, float] = {}

    def kill_then_restart() -> None:
        cluster.stop_part("argocd-application-controller", kill=True)
        seen["killed"] = time.monotonic()
        time.sleep(15)
        cluster.up(build_first=False)
        seen["restarted"] = time.monotonic()

    t = _in_background(lambda: _commits(real.gitops_remote, values_path) > before, kill_then_restart)
    state = _deploy(sha)
    _finish(t)
    assert "killed" in seen and "restarted" in seen
    assert state.is_completed(), state.message
    assert _serving(APP, "staging") == f"main-{sha[:7]}"
    assert _commits(real.gitops_remote, values_path) == before + 1


def test_kubelet_stopped_during_the_rollout(real, tmp_path: Path) -> None:
    cluster = RealCluster(real.root / "real")
    env = load_config().app(APP).environment("staging")
    values_path = f"helm/{APP}/values-staging.yaml"
    before = _commits(real.gitops_remote, values_path)
    src = SourceClone(str(real.source_remote), tmp_path / "src")
    sha = src.commit("main", note="real kubelet stopped")
    tag = f"main-{sha[:7]}"
    apps = client.AppsV1Api(api_client())
    seen: dict[str, float] = {}

    def rolling_out() -> bool:
        dep = apps.read_namespaced_deployment(env.deployment, env.namespace)
        return dep.spec.template.spec.containers[0].image.endswith(f":{tag}")

    def stop_then_start() -> None:
        cluster.stop_part("kubelet")
        seen["stopped"] = time.monotonic()
        time.sleep(20)
        cluster.up(build_first=False)
        seen["started"] = time.monotonic()

    t = _in_background(rolling_out, stop_then_start)
    state = _deploy(sha)
    _finish(t)
    assert "stopped" in seen and "started" in seen
    assert state.is_completed(), state.message
    assert _serving(APP, "staging") == tag
    assert _commits(real.gitops_remote, values_path) == before + 1
