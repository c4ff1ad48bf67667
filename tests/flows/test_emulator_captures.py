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
    "application": {
        # `history` keeps the last ten syncs: which of them someone started by hand depends on what ran
        # before the scenario (on the real tier the demo's drift heal), not on the scenario.
        "history[].initiatedBy.username": "depends on the syncs before the scenario",
        # During a failing rollout Argo CD 3.2.11 on the real tier also ran a self-heal: a selective
        # sync of the Deployment alone at the same revision. The emulator self-heals only when the
        # live image differs from Git's (its drift-heal path writes these fields too).
        "operationState.operation.sync.autoHealAttemptsCount": "a self-heal during a failing rollout",
        "operationState.operation.sync.resources": "a self-heal during a failing rollout",
    },
    "deployment": {},
}


def _known(path: str, kind: str) -> bool:
    return any(path == p or path.startswith(p + ".") or path.startswith(p + "[]") for p in KNOWN[kind])


def _record(env_name: str, action: Callable[[], Any], app: str = APP) -> list[dict[str, Any]]:
    e = load_config().app(app).environment(env_name)
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
    # As on the real tier (which waits for the app to answer Git's version again): the recording ends
    # once the healed rollout has finished, not when the spec is back.
    from tasks.probes import rollout_verdict

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dep = api.sanitize_for_serialization(apps.read_namespaced_deployment(env.deployment, env.namespace))
        if dep["spec"]["template"]["spec"]["containers"][0]["image"] == c0.image and \
                rollout_verdict(dep).state == "done":
            return
        time.sleep(0.5)
    raise AssertionError("the healed rollout did not finish")


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
        # Staging's last sync must be at the GitOps head, as on the real tier: otherwise Argo CD's
        # automated sync of a revision it has not synced yet undoes the hand-made change at once,
        # self-heal or not.
        sha = src.commit("main", note="capture before drift")
        assert _deploy("staging", "refs/heads/main", sha).is_completed()
        docs = _record("staging", _drift_and_heal)
    elif name == "manual-rollback":
        from flows.rollback import rollback

        first = src.commit("main", note="capture manual 1")
        assert _deploy("staging", "refs/heads/main", first).is_completed()
        second = src.commit("main", note="capture manual 2")
        assert _deploy("staging", "refs/heads/main", second).is_completed()

        def both() -> None:
            rollback(app=APP, environment="staging", reason="capture: last known good", **FAST)
            rollback(app=APP, environment="staging", to_tag=f"main-{second[:7]}", reason="capture: a tag", **FAST)

        docs = _record("staging", both)
    elif name == "two-apps-other":
        other = "nutrition-api"
        other_src = SourceClone(str(stack.source_remotes[other]), tmp_path / "other-src")
        sha = other_src.commit("main", note="capture nutrition")
        assert deploy(app=other, environment="staging", source_ref="refs/heads/main", source_sha=sha,
                      return_state=True, **FAST).is_completed()
        good = src.commit("main", note="capture shared good")
        assert _deploy("staging", "refs/heads/main", good).is_completed()
        bad = src.commit("main", note="capture shared bad", crash=True)
        docs = _record("staging", lambda: _deploy("staging", "refs/heads/main", bad), app=other)
    else:
        raise AssertionError(f"unknown scenario {name}")
    return docs


def _collapsed(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


def _after_first(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The scenario's own documents: the first one is the state before it began, and so is an
    `operationState` still left from an earlier sync (it stays until the scenario's first operation)."""
    of_kind = [d for d in docs if d["kind"] == kind]
    if len(of_kind) < 2:
        return of_kind
    before = of_kind[0]["status"].get("operationState")
    out = []
    for d in of_kind[1:]:
        if before is not None and d["status"].get("operationState") == before:
            d = {**d, "status": {k: v for k, v in d["status"].items() if k != "operationState"}}
        out.append(d)
    return out


def differences(real: list[dict[str, Any]], emulated: list[dict[str, Any]]) -> list[str]:
    """What differs, in words; empty when the emulator agrees with the capture.

    The Deployment's milestones must come in exactly the real order. The Application's are noisier on
    a real controller (each compare during an operation may flip sync status, and how many compares
    land depends on timing), so for it: the health sequence is the same, the last milestone is the
    same, and the emulator never shows a (health, operation phase) the real controller did not."""
    out: list[str] = []
    for kind in ("application", "deployment"):
        # The first document of each kind is the state before the scenario: what earlier syncs left.
        r, e = shape(_after_first(real, kind), kind), shape(_after_first(emulated, kind), kind)
        missing = sorted(p for p in r - e if not _known(p, kind))
        extra = sorted(p for p in e - r if not _known(p, kind))
        if missing:
            out.append(f"{kind}: the emulator never writes {missing}")
        if extra:
            out.append(f"{kind}: the emulator writes what the real one does not: {extra}")
    rd, ed = milestones(real, "deployment"), milestones(emulated, "deployment")
    if rd != ed:
        out.append(f"deployment milestones differ:\n  real     {rd}\n  emulator {ed}")
    ra, ea = milestones(real, "application"), milestones(emulated, "application")
    rh, eh = _collapsed([m[1] for m in ra]), _collapsed([m[1] for m in ea])
    if rh != eh:
        out.append(f"application health sequence differs: real {rh}, emulator {eh}")
    if ra and ea and ra[-1] != ea[-1]:
        out.append(f"application ends differently: real {ra[-1]}, emulator {ea[-1]}")
    # The sync status flips with every compare during an operation, and how many compares land is
    # timing (re-recording the same scenario shows different flips). Health and phase are not: every
    # (health, phase) the emulator shows, the real controller showed in this scenario.
    seen = {(h, ph) for _s, h, ph in ra}
    unseen = [m for m in ea if (m[1], m[2]) not in seen]
    if unseen:
        out.append(f"application: the emulator shows {unseen}, whose (health, phase) the real controller never "
                   f"did (this scenario on the real tier: {ra})")
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
