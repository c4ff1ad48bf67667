"""`wait_for_rollout` against a real HTTP Kubernetes API (the sandbox's emulator)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest
from kubernetes import client

from delivery.errors import RolloutFailed
from tasks.probes import wait_for_rollout
from tests.argocd.kubeapi import KubeAPI

NS = "workout-dev"
MERGE = "application/merge-patch+json"


def create_deployment(kube: KubeAPI, image: str = "127.0.0.1:5000/workout-api:1.0.0") -> str:
    kube.ensure_namespace(NS)
    name = f"web-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "web", "image": image}]}}}}
    client.AppsV1Api(kube.client()).create_namespaced_deployment(NS, body)
    set_status(kube, name, observed=1, replicas=2, updated=2, ready=2, available=2)
    return name


def set_status(kube: KubeAPI, name: str, *, observed: int, replicas: int, updated: int, ready: int,
               available: int, conditions: list[dict] | None = None) -> None:
    status = {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
              "readyReplicas": ready, "availableReplicas": available}
    if conditions is not None:
        status["conditions"] = conditions
    client.AppsV1Api(kube.client()).patch_namespaced_deployment_status(name, NS, {"status": status},
                                                                       _content_type=MERGE)


def set_image(kube: KubeAPI, name: str, image: str) -> None:
    body = {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}}}
    client.AppsV1Api(kube.client()).patch_namespaced_deployment(name, NS, body, _content_type=MERGE)


def in_background(steps: list[tuple[float, Callable[[], None]]]) -> threading.Thread:
    def run() -> None:
        for delay, step in steps:
            time.sleep(delay)
            step()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_rollout_of_a_new_image_completes(kube: KubeAPI) -> None:
    """A rollout seen through generation bump, surge and old pods leaving returns the new image and replicas."""
    name = create_deployment(kube)
    new = "127.0.0.1:5000/workout-api:1.1.0"
    set_image(kube, name, new)  # generation 2, not yet observed by the controller
    in_background([
        (0.4, lambda: set_status(kube, name, observed=2, replicas=3, updated=1, ready=2, available=2)),
        (0.4, lambda: set_status(kube, name, observed=2, replicas=3, updated=2, ready=3, available=3)),
        (0.4, lambda: set_status(kube, name, observed=2, replicas=2, updated=2, ready=2, available=2)),
    ])
    summary = wait_for_rollout(name, NS, timeout=60, kubeconfig=kube.kubeconfig)
    assert summary["image"] == new
    assert summary["replicas"] == 2
    assert summary["generation"] == 2


def test_progress_deadline_exceeded_fails(kube: KubeAPI) -> None:
    """A Deployment that exceeded its progress deadline fails with the controller's message."""
    name = create_deployment(kube)
    set_image(kube, name, "127.0.0.1:5000/workout-api:broken")
    set_status(kube, name, observed=2, replicas=3, updated=1, ready=2, available=2, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": f'ReplicaSet "{name}-5d8f7" has timed out progressing.'}])
    with pytest.raises(RolloutFailed, match="has timed out progressing"):
        wait_for_rollout(name, NS, timeout=60, kubeconfig=kube.kubeconfig)


def test_stuck_rollout_times_out_with_the_last_reason(kube: KubeAPI) -> None:
    """A rollout that stops with an old pod left ends at the timeout, naming what it was waiting for."""
    name = create_deployment(kube)
    set_image(kube, name, "127.0.0.1:5000/workout-api:1.2.0")
    set_status(kube, name, observed=2, replicas=3, updated=2, ready=3, available=3)
    with pytest.raises(RolloutFailed, match="1 old replicas are pending termination"):
        wait_for_rollout(name, NS, timeout=3, kubeconfig=kube.kubeconfig)


def test_missing_deployment_fails_saying_so(kube: KubeAPI) -> None:
    """A Deployment that never appears fails the wait with 'not found'."""
    kube.ensure_namespace(NS)
    with pytest.raises(RolloutFailed, match="was not found"):
        wait_for_rollout("no-such-deployment", NS, timeout=2, kubeconfig=kube.kubeconfig)


def test_deployment_created_during_the_wait_is_followed(kube: KubeAPI) -> None:
    """A Deployment created after the wait started (Argo CD creating it) is picked up by the watch."""
    kube.ensure_namespace(NS)
    holder: dict[str, str] = {}
    name = f"late-{uuid.uuid4().hex[:8]}"

    def create() -> None:
        body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}},
                                      "spec": {"containers": [{"name": "web", "image": "img:1"}]}}}}
        client.AppsV1Api(kube.client()).create_namespaced_deployment(NS, body)
        holder["ok"] = "1"

    in_background([(0.5, create),
                   (0.5, lambda: set_status(kube, name, observed=1, replicas=1, updated=1, ready=1, available=1))])
    summary = wait_for_rollout(name, NS, timeout=60, kubeconfig=kube.kubeconfig)
    assert summary["image"] == "img:1" and holder["ok"] == "1"
