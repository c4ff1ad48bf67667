"""The Kubernetes API emulator, seen only through the official `kubernetes` client and a kubeconfig,
the way the product sees a real cluster."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from delivery.settings import PROJECT_ROOT
from sandbox.kube import write_kubeconfig

GROUP, VERSION, PLURAL, NS = "argoproj.io", "v1alpha1", "applications", "argocd"


@dataclass
class Kube:
    url: str
    kubeconfig: Path
    api_client: client.ApiClient

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)


@pytest.fixture()
def start_kube(tmp_path: Path) -> Iterator[Callable[..., Kube]]:
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[client.ApiClient] = []

    def start(*args: str) -> Kube:
        d = tmp_path / f"kube{len(procs)}"
        d.mkdir()
        port_file = d / "port"
        log = open(d / "kube.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "sandbox.kube", "--port", "0", "--port-file", str(port_file),
                                 *args], stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, (d / "kube.log").read_text()
            assert time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        kubeconfig = write_kubeconfig(d / "kubeconfig", url)
        api = config.new_client_from_config(config_file=str(kubeconfig))
        clients.append(api)
        k = Kube(url, kubeconfig, api)
        k.core.create_namespace({"metadata": {"name": NS}})
        return k

    yield start
    for api in clients:
        api.close()
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def kube(start_kube: Callable[..., Kube]) -> Kube:
    return start_kube()


def app_body(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Application",
            "metadata": {"name": name, **meta},
            "spec": {"project": "default", "source": {"repoURL": "/srv/gitops.git", "targetRevision": "main",
                                                      "path": "helm/workout-api"},
                     "destination": {"server": "https://kubernetes.default.svc", "namespace": "apps"}}}


def create_app(kube: Kube, name: str, **meta: Any) -> dict[str, Any]:
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, app_body(name, **meta))


def get_app(kube: Kube, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def patch_app(kube: Kube, name: str, body: Any) -> dict[str, Any]:
    return kube.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, body)


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def deployment_body(name: str, image: str = "127.0.0.1:5000/app:1") -> dict[str, Any]:
    labels = {"app": name}
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": image,
                                                           "ports": [{"containerPort": 8000}]}]}}}}


def test_application_create_get_list_replace_delete(kube: Kube) -> None:
    """Applications go through their whole life cycle with the official client, with real API errors."""
    created = create_app(kube, "shop")
    meta = created["metadata"]
    assert meta["namespace"] == NS and meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1

    with pytest.raises(ApiException) as dup:
        create_app(kube, "shop")
    assert dup.value.status == 409

    assert get_app(kube, "shop")["spec"]["source"]["path"] == "helm/workout-api"
    listed = kube.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["shop"]
    assert int(listed["metadata"]["resourceVersion"]) >= rv(created)

    current = get_app(kube, "shop")
    current["spec"]["source"]["targetRevision"] = "release"
    replaced = kube.custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "shop", current)
    assert replaced["spec"]["source"]["targetRevision"] == "release"
    assert rv(replaced) > rv(created)

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "shop")
    with pytest.raises(ApiException) as gone:
        get_app(kube, "shop")
    assert gone.value.status == 404


def test_replace_with_a_stale_resource_version_conflicts(kube: Kube) -> None:
    """A write based on an old read is refused with 409, as optimistic concurrency requires."""
    stale = create_app(kube, "race")
    patch_app(kube, "race", {"spec": {"project": "other"}})
    stale["spec"]["source"]["targetRevision"] = "x"
    with pytest.raises(ApiException) as conflict:
        kube.custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "race", stale)
    assert conflict.value.status == 409


def test_merge_patch_sets_and_removes_annotations(kube: Kube) -> None:
    """The client's default patch for custom objects is a merge patch; null removes a key."""
    create_app(kube, "notes", annotations={"keep": "1", "argocd.argoproj.io/refresh": "hard"})
    patched = patch_app(kube, "notes", {"metadata": {"annotations": {"argocd.argoproj.io/refresh": None,
                                                                      "added": "yes"}}})
    assert patched["metadata"]["annotations"] == {"keep": "1", "added": "yes"}
    assert get_app(kube, "notes")["metadata"]["annotations"] == {"keep": "1", "added": "yes"}

    # Custom resources have no strategic-merge schema: a real API server refuses that content type, so
    # the merge above worked because the client sent application/merge-patch+json.
    with pytest.raises(ApiException) as refused:
        kube.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "notes", {"spec": {}},
                                                   _content_type="application/strategic-merge-patch+json")
    assert refused.value.status == 415

    json_patched = kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "notes", [{"op": "remove", "path": "/metadata/annotations/added"}],
        _content_type="application/json-patch+json")
    assert json_patched["metadata"]["annotations"] == {"keep": "1"}


def test_generation_follows_spec_changes_only(kube: Kube) -> None:
    """Every change bumps resourceVersion; only spec changes bump generation."""
    first = create_app(kube, "gen")
    labelled = patch_app(kube, "gen", {"metadata": {"labels": {"team": "a"}}})
    with_status = patch_app(kube, "gen", {"status": {"sync": {"status": "Synced"}}})
    respecced = patch_app(kube, "gen", {"spec": {"source": {"targetRevision": "v2"}}})
    same = patch_app(kube, "gen", {"spec": {"source": {"targetRevision": "v2"}}})

    versions = [rv(o) for o in (first, labelled, with_status, respecced)]
    assert versions == sorted(versions) and len(set(versions)) == 4
    assert [o["metadata"]["generation"] for o in (first, labelled, with_status, respecced)] == [1, 1, 1, 2]
    assert rv(same) == rv(respecced), "a write that changes nothing is not a change"
    assert with_status["status"] == {"sync": {"status": "Synced"}}
    assert first["metadata"]["uid"] == respecced["metadata"]["uid"]


def test_deployment_status_subresource_and_strategic_merge(kube: Kube) -> None:
    """Deployments keep status behind /status, and patches merge containers by name."""
    kube.core.create_namespace({"metadata": {"name": "apps"}})
    dep = kube.apps.create_namespaced_deployment("apps", deployment_body("web"))
    assert dep.metadata.generation == 1 and dep.spec.replicas == 1

    dep = kube.apps.patch_namespaced_deployment(
        "web", "apps", {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:2"}]}}}})
    assert dep.metadata.generation == 2
    assert dep.spec.template.spec.containers[0].image == "app:2"
    assert dep.spec.template.spec.containers[0].ports[0].container_port == 8000, "merged by name, not replaced"

    dep = kube.apps.patch_namespaced_deployment_status(
        "web", "apps", {"status": {"observedGeneration": 2, "replicas": 1, "readyReplicas": 1,
                                   "updatedReplicas": 1, "availableReplicas": 1}})
    assert dep.status.observed_generation == 2 and dep.status.ready_replicas == 1
    assert dep.metadata.generation == 2

    # Through the main endpoint, status is not writable (and spec is not writable through /status).
    dep = kube.apps.patch_namespaced_deployment("web", "apps", {"status": {"readyReplicas": 0}})
    assert dep.status.ready_replicas == 1
    dep = kube.apps.patch_namespaced_deployment_status("web", "apps", {"spec": {"replicas": 5}})
    assert dep.spec.replicas == 1

    dep = kube.apps.patch_namespaced_deployment("web", "apps", [{"op": "replace", "path": "/spec/replicas",
                                                                  "value": 3}])
    assert dep.spec.replicas == 3 and dep.metadata.generation == 3


def test_core_objects(kube: Kube) -> None:
    """Namespaces, services, config maps and secrets can be created, listed by label and deleted."""
    kube.core.create_namespace({"metadata": {"name": "apps"}})
    assert "apps" in [n.metadata.name for n in kube.core.list_namespace().items]
    assert kube.core.read_namespace("apps").status.phase == "Active"
    kube.core.create_namespaced_service("apps", {"metadata": {"name": "web", "labels": {"tier": "front"}},
                                                 "spec": {"ports": [{"port": 80, "targetPort": 8000}]}})
    kube.core.create_namespaced_config_map("apps", {"metadata": {"name": "cfg", "labels": {"tier": "back"}},
                                                    "data": {"A": "1"}})
    data = {"token": "abc"}  # secret-scan: allow
    kube.core.create_namespaced_secret("apps", {"metadata": {"name": "s"}, "stringData": data})
    assert kube.core.read_namespaced_secret("s", "apps").data == {"token": "YWJj"}  # secret-scan: allow
    assert [s.metadata.name for s in kube.core.list_namespaced_service("apps", label_selector="tier=front").items] \
        == ["web"]
    assert kube.core.list_namespaced_config_map("apps", label_selector="tier in (front,middle)").items == []

    kube.core.delete_namespace("apps")
    with pytest.raises(ApiException) as gone:
        kube.core.read_namespaced_config_map("cfg", "apps")
    assert gone.value.status == 404


def test_finalizers_hold_deletion_until_removed(kube: Kube) -> None:
    """An Application with finalizers is only marked for deletion until they are removed."""
    create_app(kube, "held", finalizers=["resources-finalizer.argocd.argoproj.io"])
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "held")
    assert get_app(kube, "held")["metadata"]["deletionTimestamp"]
    patch_app(kube, "held", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as gone:
        get_app(kube, "held")
    assert gone.value.status == 404


def test_watch_from_a_resource_version_streams_later_changes(kube: Kube) -> None:
    """A watch from resourceVersion X replays what changed after X, filtered by name."""
    mine = create_app(kube, "watched")
    create_app(kube, "other")
    patch_app(kube, "watched", {"metadata": {"annotations": {"a": "1"}}})
    patch_app(kube, "other", {"metadata": {"annotations": {"a": "1"}}})
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "watched")

    events = list(watch.Watch().stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                                       resource_version=mine["metadata"]["resourceVersion"],
                                       field_selector="metadata.name=watched", timeout_seconds=2))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "watched"),
                                                                             ("DELETED", "watched")]
    assert events[0]["object"]["metadata"]["annotations"] == {"a": "1"}
    assert rv(events[1]["object"]) > rv(events[0]["object"]) > rv(mine)


def test_watch_without_resource_version_lists_then_follows(kube: Kube) -> None:
    """A watch with no resourceVersion starts with ADDED for what exists, then live changes."""
    create_app(kube, "live")
    seen: list[tuple[str, str]] = []
    w = watch.Watch()

    def follow() -> None:
        for e in w.stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=30):
            seen.append((e["type"], e["object"]["metadata"].get("annotations", {}).get("step", "")))
            if len(seen) == 2:
                w.stop()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    patch_app(kube, "live", {"metadata": {"annotations": {"step": "2"}}})
    t.join(30)
    assert seen == [("ADDED", ""), ("MODIFIED", "2")]


def test_watch_from_a_forgotten_resource_version_is_gone(start_kube: Callable[..., Kube]) -> None:
    """Watching from a resourceVersion older than the kept history fails with 410, so clients re-list."""
    kube = start_kube("--watch-history", "3")
    old = create_app(kube, "churn")
    for i in range(5):
        patch_app(kube, "churn", {"metadata": {"annotations": {"i": str(i)}}})
    with pytest.raises(ApiException) as gone:
        list(watch.Watch().stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                                  resource_version=old["metadata"]["resourceVersion"]))
    assert gone.value.status == 410

    # Re-listing gives a resourceVersion to watch from again.
    listed = kube.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    patch_app(kube, "churn", {"metadata": {"annotations": {"i": "last"}}})
    events = list(watch.Watch().stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                                       resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=1))
    assert [e["object"]["metadata"]["annotations"]["i"] for e in events] == ["last"]


def test_compaction_endpoint_expires_every_older_watch(kube: Kube) -> None:
    """POST /sandbox/compact makes any watch from before it get 410 (fault injection for tests)."""
    old = create_app(kube, "compact-me")
    patch_app(kube, "compact-me", {"metadata": {"labels": {"changed": "yes"}}})
    req = urllib.request.Request(f"{kube.url}/sandbox/compact", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    with pytest.raises(ApiException) as gone:
        list(watch.Watch().stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                                  resource_version=old["metadata"]["resourceVersion"], timeout_seconds=5))
    assert gone.value.status == 410


def test_dropped_watch_streams_end_and_the_client_resumes(start_kube: Callable[..., Kube]) -> None:
    """--drop-watch-after closes streams; a client that resumes from its last resourceVersion misses nothing."""
    kube = start_kube("--drop-watch-after", "1")
    first = create_app(kube, "dropped")

    # A single request ends on its own, with no server timeout asked for.
    resp = kube.custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, watch=True,
                                                     resource_version=first["metadata"]["resourceVersion"],
                                                     _preload_content=False)
    body = resp.read()
    resp.release_conn()
    assert body == b""

    # The Watch helper reconnects from the last resourceVersion it saw, across several drops.
    got: list[str] = []
    w = watch.Watch()

    def follow() -> None:
        for e in w.stream(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=first["metadata"]["resourceVersion"]):
            got.append(e["object"]["metadata"]["annotations"]["n"])
            if len(got) == 2:
                w.stop()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    patch_app(kube, "dropped", {"metadata": {"annotations": {"n": "1"}}})
    time.sleep(2.5)  # at least two drops in between
    patch_app(kube, "dropped", {"metadata": {"annotations": {"n": "2"}}})
    t.join(30)
    assert got == ["1", "2"]


def test_kubeconfig_names_the_sandbox_context(kube: Kube) -> None:
    """The written kubeconfig loads with the official loader and targets the emulator."""
    contexts, current = config.list_kube_config_contexts(config_file=str(kube.kubeconfig))
    assert current["name"] == "sandbox" and current["context"]["cluster"] == "sandbox"
    loaded = client.Configuration()
    config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=loaded)
    assert loaded.host == kube.url
    name = f"ns-{uuid.uuid4().hex[:8]}"
    with client.ApiClient(loaded) as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
        assert client.CoreV1Api(api).read_namespace(name).metadata.name == name
