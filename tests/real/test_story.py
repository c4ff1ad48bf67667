"""The story on a real Kubernetes (kube-apiserver, controller-manager, scheduler, kubelet, containerd)
and a real Argo CD (application-controller + repo-server, core mode): deploys verified by the real
kubelet's probes, bad releases rolled back, rollbacks by hand, an already-synced re-run."""

from __future__ import annotations

import time
from pathlib import Path

import git
import httpx
import pytest
from kubernetes import client

from delivery.config import load_config
from flows.deploy import deploy
from flows.rollback import rollback
from tasks import values
from tasks.kube import api_client
from tasks.probes import _proxy_target, _tls_context, parse_kube_proxy_url
from tests.source_clone import SourceClone

pytestmark = [pytest.mark.real, pytest.mark.docker]

APP = "workout-api"


def _deploy(app: str, env: str, ref: str, sha: str):
    return deploy(app=app, environment=env, source_ref=ref, source_sha=sha, return_state=True,
                  sync_timeout=300.0, rollout_timeout=180.0, health_timeout=60.0)


def _serving(app: str, env: str) -> str:
    """The version the app answers with now, through the API server's service proxy."""
    e = load_config().app(app).environment(env)
    ns, svc, port, path = parse_kube_proxy_url(e.health_url)
    target = _proxy_target(ns, svc, port, path, None)
    with httpx.Client(verify=_tls_context(target), headers=target.headers, timeout=10) as http:
        return str(http.get(target.url).json().get("version", ""))


def _git_tag(real, tmp_path: Path, app: str, env: str) -> str:
    d = tmp_path / f"read-{time.monotonic_ns()}"
    git.Repo.clone_from(str(real.gitops_remote), d, branch="main")
    return values.read_image_tag(d / f"helm/{app}/values-{env}.yaml")


def _commits(real, path: str) -> int:
    return int(git.Git().execute(["git", "-C", str(real.gitops_remote), "rev-list", "--count", "main", "--", path]))


@pytest.fixture
def src(real, tmp_path: Path) -> SourceClone:
    return SourceClone(str(real.source_remote), tmp_path / "src")


def test_good_deploy_is_verified_by_the_real_kubelet(real, src: SourceClone) -> None:
    """Build, push, commit, real Argo CD sync, the real rollout and readiness/liveness probes, health."""
    sha = src.commit("main", note="real good")
    state = _deploy(APP, "staging", "refs/heads/main", sha)
    assert state.is_completed(), state.message
    tag = f"main-{sha[:7]}"
    assert _serving(APP, "staging") == tag
    env = load_config().app(APP).environment("staging")
    pods = client.CoreV1Api(api_client()).list_namespaced_pod(env.namespace).items
    ours = [p for p in pods if p.spec.containers[0].image.endswith(f":{tag}")]
    assert ours and all(p.status.phase == "Running" for p in ours)
    for p in ours:
        c = p.spec.containers[0]
        assert c.readiness_probe.http_get.path == "/api/health/" and c.liveness_probe.http_get.path == "/api/health/"
        assert any(cond.type == "Ready" and cond.status == "True" for cond in p.status.conditions)


def test_an_already_synced_rerun_is_done_without_a_second_commit(real, src: SourceClone) -> None:
    sha = src.commit("main", note="real rerun")
    assert _deploy(APP, "staging", "refs/heads/main", sha).is_completed()
    path = f"helm/{APP}/values-staging.yaml"
    before = _commits(real, path)
    state = _deploy(APP, "staging", "refs/heads/main", sha)
    assert state.is_completed(), state.message
    assert _commits(real, path) == before


@pytest.mark.parametrize("fault", ["crash", "unhealthy"])
def test_a_bad_release_is_rolled_back(real, src: SourceClone, tmp_path: Path, fault: str) -> None:
    """A crash-looping release, and one whose readiness never passes: Degraded on the real cluster,
    rolled back automatically, the previous version answers."""
    good = _git_tag(real, tmp_path, APP, "dev")
    assert _serving(APP, "dev") == good
    sha = src.commit("release-dev", note=f"real {fault}", crash=fault == "crash", healthy=fault != "unhealthy")
    state = _deploy(APP, "dev", "refs/heads/release-dev", sha)
    assert state.is_failed()
    msg = state.message or ""
    assert f"rolled back; Git names {good}, the cluster runs {good}, verified serving {good}" in msg, msg
    assert _serving(APP, "dev") == good


def test_manual_rollbacks_to_a_tag_and_to_last_known_good(real, src: SourceClone, tmp_path: Path) -> None:
    first = src.commit("main", note="real manual 1")
    assert _deploy(APP, "staging", "refs/heads/main", first).is_completed()
    second = src.commit("main", note="real manual 2")
    assert _deploy(APP, "staging", "refs/heads/main", second).is_completed()
    t1, t2 = f"main-{first[:7]}", f"main-{second[:7]}"
    result = rollback(app=APP, environment="staging", reason="real: to the last known good",
                      sync_timeout=300.0, rollout_timeout=180.0, health_timeout=60.0)
    assert result["serving"] == t1 and _serving(APP, "staging") == t1
    result = rollback(app=APP, environment="staging", to_tag=t2, reason="real: to a tag",
                      sync_timeout=300.0, rollout_timeout=180.0, health_timeout=60.0)
    assert result["serving"] == t2 and _serving(APP, "staging") == t2
    assert _git_tag(real, tmp_path, APP, "staging") == t2
