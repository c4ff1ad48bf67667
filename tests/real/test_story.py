"""The story on a real Kubernetes (kube-apiserver, controller-manager, scheduler, kubelet, containerd)
and a real Argo CD (application-controller + repo-server, core mode): deploys verified by the real
kubelet's probes, bad releases (crash loop, unpullable image, readiness never passing) caught from
their pods and rolled back, rollbacks by hand, an already-synced re-run, drift made through the real
API found and healed, and two apps sharing the GitOps repository."""

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


def test_good_deploy_is_verified_by_the_real_kubelet(real, src: SourceClone, capture) -> None:
    """Build, push, commit, real Argo CD sync, the real rollout and readiness/liveness probes, health."""
    sha = src.commit("main", note="real good")
    with capture("good-deploy", APP, "staging"):
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


def test_an_already_synced_rerun_is_done_without_a_second_commit(real, src: SourceClone, capture) -> None:
    sha = src.commit("main", note="real rerun")
    assert _deploy(APP, "staging", "refs/heads/main", sha).is_completed()
    path = f"helm/{APP}/values-staging.yaml"
    before = _commits(real, path)
    with capture("already-synced", APP, "staging"):
        state = _deploy(APP, "staging", "refs/heads/main", sha)
    assert state.is_completed(), state.message
    assert _commits(real, path) == before


def _lose_pushed_image(monkeypatch: pytest.MonkeyPatch, registry: str) -> None:
    """The registry loses the image right after the deploy pushed it (a retention job, a wrong
    registry): the tag Git is about to name cannot be pulled by the kubelet."""
    from tasks import images

    push = images.push_image_task

    def push_then_lose(image: str, tags: list[str], **kwargs):
        result = push(image, tags, **kwargs)
        repo = image.split("/", 1)[1]
        r = httpx.delete(f"http://{registry}/v2/{repo}/manifests/{result.digest}", timeout=10)
        assert r.status_code == 202, r.text
        return result

    monkeypatch.setattr(images, "push_image_task", push_then_lose)


# What the report must name for each kind of bad release: the kubelet's reason on the new pod.
REASONS = {"crash": ("CrashLoopBackOff", "Error"), "unpullable": ("ImagePullBackOff", "ErrImagePull"),
           "unhealthy": ("NeverReady",)}


@pytest.mark.parametrize("fault", ["crash", "unpullable", "unhealthy"])
def test_a_bad_release_is_caught_from_its_pods_and_rolled_back(real, src: SourceClone, tmp_path: Path, fault: str,
                                                              monkeypatch: pytest.MonkeyPatch, capture) -> None:
    """A crash-looping release, an unpullable tag and one whose readiness never passes: each fails
    from its pod's status within seconds (not the chart's 600 s progress deadline), the failure names
    the pod, container and reason, it is rolled back automatically, and the previous version answers."""
    good = _git_tag(real, tmp_path, APP, "dev")
    assert _serving(APP, "dev") == good
    if fault == "unpullable":
        _lose_pushed_image(monkeypatch, real.registry)
    sha = src.commit("release-dev", note=f"real {fault} {time.time_ns()}", crash=fault == "crash",
                     healthy=fault != "unhealthy")
    started = time.monotonic()
    with capture(f"bad-release-{fault}", APP, "dev"):
        state = _deploy(APP, "dev", "refs/heads/release-dev", sha)
    took = time.monotonic() - started
    assert state.is_failed()
    msg = state.message or ""
    assert f"rolled back; Git names {good}, the cluster runs {good}, verified serving {good}" in msg, msg
    assert _serving(APP, "dev") == good
    env = load_config().app(APP).environment("dev")
    assert f"pod {env.deployment}-" in msg and " container " in msg, msg
    assert any(reason in msg for reason in REASONS[fault]), msg
    # Detected from the pods: the whole failed deploy and its rollback take far less than 600 s.
    assert took < 240, f"{fault}: {took:.0f} s"


def test_manual_rollbacks_to_a_tag_and_to_last_known_good(real, src: SourceClone, tmp_path: Path, capture) -> None:
    first = src.commit("main", note="real manual 1")
    assert _deploy(APP, "staging", "refs/heads/main", first).is_completed()
    second = src.commit("main", note="real manual 2")
    assert _deploy(APP, "staging", "refs/heads/main", second).is_completed()
    t1, t2 = f"main-{first[:7]}", f"main-{second[:7]}"
    with capture("manual-rollback", APP, "staging"):
        result = rollback(app=APP, environment="staging", reason="real: to the last known good",
                          sync_timeout=300.0, rollout_timeout=180.0, health_timeout=60.0)
        assert result["serving"] == t1 and _serving(APP, "staging") == t1
        result = rollback(app=APP, environment="staging", to_tag=t2, reason="real: to a tag",
                          sync_timeout=300.0, rollout_timeout=180.0, health_timeout=60.0)
    assert result["serving"] == t2 and _serving(APP, "staging") == t2
    assert _git_tag(real, tmp_path, APP, "staging") == t2


def test_drift_made_through_the_real_api_is_found_and_healed(real, src: SourceClone, capture) -> None:
    """Self-heal off, the Deployment's image patched by hand: the drift check says `drifted`, Argo CD
    says OutOfSync; `heal=True` syncs Git's version back and the app answers it again."""
    from flows.drift import collect_drift, drift_check

    # Staging's last sync at the GitOps head: otherwise Argo CD's automated sync of a revision it has
    # not synced yet (another environment's commit) undoes the hand-made change at once.
    sha = src.commit("main", note="real before drift")
    assert _deploy(APP, "staging", "refs/heads/main", sha).is_completed()
    env = load_config().app(APP).environment("staging")
    want = _serving(APP, "staging")
    api = api_client()
    crd, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)

    def self_heal(on: bool) -> None:
        crd.patch_namespaced_custom_object("argoproj.io", "v1alpha1", env.argocd_namespace, "applications",
                                           env.application, {"spec": {"syncPolicy": {"automated": {"selfHeal": on}}}})

    def rows() -> dict[str, object]:
        return {r.environment: r for r in collect_drift(load_config(), [APP])}

    def wait_rows(pred, timeout: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        current = rows()
        while not pred(current) and time.monotonic() < deadline:
            time.sleep(2)
            current = rows()
        return current

    with capture("drift-heal", APP, "staging"):
        self_heal(False)
        try:
            dep = apps.read_namespaced_deployment(env.deployment, env.namespace)
            c0 = dep.spec.template.spec.containers[0]
            image = c0.image.rsplit(":", 1)[0] + ":by-hand"
            apps.patch_namespaced_deployment(env.deployment, env.namespace, {"spec": {"template": {"spec": {
                "containers": [{"name": c0.name, "image": image}]}}}})
            found = wait_rows(lambda r: r["staging"].result == "drifted", timeout=120)
            assert found["staging"].result == "drifted", found["staging"].details
            assert found["staging"].live_image.endswith(":by-hand")
            state = drift_check(apps=[APP], return_state=True)
            assert state.is_failed() and "staging: drifted" in (state.message or "")
            drift_check(apps=[APP], heal=True, return_state=True)
            healed = wait_rows(lambda r: r["staging"].result == "in-sync", timeout=180)
            assert healed["staging"].result == "in-sync", healed["staging"].details
        finally:
            self_heal(True)
    deadline = time.monotonic() + 120
    while _serving(APP, "staging") != want and time.monotonic() < deadline:
        time.sleep(2)
    assert _serving(APP, "staging") == want


def test_two_apps_share_the_gitops_repo(real, tmp_path: Path, capture) -> None:
    """nutrition-api and workout-api deploy to the same environment from one GitOps repository; a bad
    workout-api release rolls back to workout-api's own last verified tag and leaves nutrition-api
    serving what it served."""
    other = "nutrition-api"
    other_src = SourceClone(str(real.source_remotes[other]), tmp_path / "other-src")
    sha = other_src.commit("main", note="real nutrition")
    state = _deploy(other, "staging", "refs/heads/main", sha)
    assert state.is_completed(), state.message
    other_tag = f"main-{sha[:7]}"
    assert _serving(other, "staging") == other_tag

    src = SourceClone(str(real.source_remote), tmp_path / "src")
    good = src.commit("main", note="real shared good")
    assert _deploy(APP, "staging", "refs/heads/main", good).is_completed()
    bad = src.commit("main", note="real shared bad", crash=True)
    # What the other app's Application and Deployment show meanwhile: a new GitOps head, nothing else.
    with capture("two-apps-other", other, "staging"):
        state = _deploy(APP, "staging", "refs/heads/main", bad)
    assert state.is_failed() and f"verified serving main-{good[:7]}" in (state.message or ""), state.message
    assert _serving(APP, "staging") == f"main-{good[:7]}"
    assert _serving(other, "staging") == other_tag
    assert _git_tag(real, tmp_path, other, "staging") == other_tag
