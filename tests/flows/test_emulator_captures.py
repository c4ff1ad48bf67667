"""The emulators against the real thing: each scenario recorded on the real tier (tests/real, with
DELIVERY_RECORD_CAPTURES=1; the captures are committed under tests/data/captures/) runs again here on
the emulators, recorded the same way, and what they write is compared with the capture:

- shape: every field path the real Argo CD / controller-manager wrote appears in what the emulator
  writes, and the emulator writes nothing the real one does not, except the differences listed in
  `KNOWN` (each also in sandbox/README.md, with its reason);
- order: the milestones the pipeline's waits judge (Application: sync status, health, operation
  phase; Deployment: the Progressing reason and Available) come in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from delivery.config import load_config
from flows.deploy import deploy
from tasks.kube import api_client
from tests.captures import CAPTURES, StatusRecorder, load, milestones, shape
from tests.source_clone import SourceClone

APP = "workout-api"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 90.0, "health_timeout": 60.0}

# Field paths one side writes and the other does not, on purpose: path prefix -> why.
KNOWN: dict[str, dict[str, str]] = {
    "application": {},
    "deployment": {},
}


def _known(path: str, kind: str) -> bool:
    return any(path == p or path.startswith(p + ".") or path.startswith(p + "[]") for p in KNOWN[kind])


def _record(env_name: str, action: Callable[[], Any]) -> list[dict[str, Any]]:
    e = load_config().app(APP).environment(env_name)
    with StatusRecorder(api_client(), e.application, e.argocd_namespace, e.deployment, e.namespace) as rec:
        action()
    return rec.documents()


def _deploy(env: str, ref: str, sha: str):
    return deploy(app=APP, environment=env, source_ref=ref, source_sha=sha, return_state=True, **FAST)


def _lose_pushed_image(monkeypatch: pytest.MonkeyPatch, registry: str) -> None:
    from tasks import images

    push = images.push_image_task

    def push_then_lose(image: str, tags: list[str], **kwargs):
        result = push(image, tags, **kwargs)
        repo = image.split("/", 1)[1]
        assert httpx.delete(f"http://{registry}/v2/{repo}/manifests/{result.digest}", timeout=10).status_code == 202
        return result

    monkeypatch.setattr(images, "push_image_task", push_then_lose)


def _drift_and_heal() -> None:
    from flows.drift import collect_drift, drift_check

    env = load_config().app(APP).environment("staging")
    api = api_client()
    crd, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)

    def self_heal(on: bool) -> None:
        crd.patch_namespaced_custom_object("argoproj.io", "v1alpha1", env.argocd_namespace, "applications",
                                           env.application, {"spec": {"syncPolicy": {"automated": {"selfHeal": on}}}})

    def wait(result: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if next(r for r in collect_drift(load_config(), [APP]) if r.environment == "staging").result == result:
                return
            time.sleep(1)
        raise AssertionError(f"staging never became {result}")

    self_heal(False)
    try:
        dep = apps.read_namespaced_deployment(env.deployment, env.namespace)
        c0 = dep.spec.template.spec.containers[0]
        apps.patch_namespaced_deployment(env.deployment, env.namespace, {"spec": {"template": {"spec": {
            "containers": [{"name": c0.name, "image": c0.image.rsplit(":", 1)[0] + ":by-hand"}]}}}})
        wait("drifted", 60)
        drift_check(apps=[APP], heal=True, return_state=True)
        wait("in-sync", 120)
    finally:
        self_heal(True)


def run_scenario(name: str, stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The scenario as tests/real runs it, on the emulators; returns the recorded documents."""
    src = SourceClone(str(stack.source_remote), tmp_path / "src")
    if name == "good-deploy":
        sha = src.commit("main", note="capture good")
        docs = _record("staging", lambda: _deploy("staging", "refs/heads/main", sha))
    elif name == "already-synced":
        sha = src.commit("main", note="capture rerun")
        assert _deploy("staging", "refs/heads/main", sha).is_completed()
        docs = _record("staging", lambda: _deploy("staging", "refs/heads/main", sha))
    elif name.startswith("bad-release-"):
        fault = name.removeprefix("bad-release-")
        if fault == "unpullable":
            _lose_pushed_image(monkeypatch, stack.registry)
        sha = src.commit("release-dev", note=f"capture {fault} {time.time_ns()}", crash=fault == "crash",
                         healthy=fault != "unhealthy")
        docs = _record("dev", lambda: _deploy("dev", "refs/heads/release-dev", sha))
    elif name == "drift-heal":
        docs = _record("staging", _drift_and_heal)
    else:
        raise AssertionError(f"unknown scenario {name}")
    return docs


def differences(real: list[dict[str, Any]], emulated: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for kind in ("application", "deployment"):
        r, e = shape(real, kind), shape(emulated, kind)
        missing = sorted(p for p in r - e if not _known(p, kind))
        extra = sorted(p for p in e - r if not _known(p, kind))
        if missing:
            out.append(f"{kind}: the emulator never writes {missing}")
        if extra:
            out.append(f"{kind}: the emulator writes what the real one does not: {extra}")
        rm, em = milestones(real, kind), milestones(emulated, kind)
        if rm != em:
            out.append(f"{kind}: milestones differ:\n  real     {rm}\n  emulator {em}")
    return out


SCENARIOS = sorted(p.stem for p in CAPTURES.glob("*.json")) if CAPTURES.exists() else []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_emulator_writes_what_the_real_cluster_writes(scenario: str, stack, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    capture = load(scenario)
    emulated = run_scenario(scenario, stack, tmp_path, monkeypatch)
    diff = differences(capture["documents"], emulated)
    assert not diff, f"{scenario} (real: {capture['versions']}):\n" + "\n".join(diff)


def test_every_real_tier_scenario_has_a_capture() -> None:
    expected = {"good-deploy", "already-synced", "bad-release-crash", "bad-release-unpullable",
                "bad-release-unhealthy", "drift-heal"}
    assert expected <= set(SCENARIOS), sorted(expected - set(SCENARIOS))
