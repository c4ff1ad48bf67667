"""`wait_for_sync` and `request_refresh` against a real HTTP Kubernetes API (the sandbox's emulator)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from delivery.errors import ArgoCDError, SyncFailed, SyncTimeout
from tasks.argocd import AppStatus, application_status, request_refresh, wait_for_sync
from tests.argocd.kubeapi import KubeAPI, kube_api

NEW = "9f2c1e4b7a0d3c5e8f1a2b3c4d5e6f7a8b9c0d1e"
OLD = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"
NS = "argocd"
G, V, P = "argoproj.io", "v1alpha1", "applications"


def iso(delta: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_app(kube: KubeAPI) -> str:
    """An Application Synced and Healthy at OLD, as after the previous deploy."""
    kube.ensure_namespace(NS)
    name = f"app-{uuid.uuid4().hex[:8]}"
    body = {
        "apiVersion": f"{G}/{V}", "kind": "Application",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"project": "default",
                 "source": {"repoURL": "file:///gitops.git", "path": "helm/workout-api", "targetRevision": "main"},
                 "destination": {"server": "https://kubernetes.default.svc", "namespace": "workout-dev"},
                 "syncPolicy": {"automated": {"prune": True, "selfHeal": True}}},
        "status": {
            "sync": {"status": "Synced", "revision": OLD},
            "health": {"status": "Healthy"},
            "operationState": {"phase": "Succeeded", "message": "successfully synced (all tasks run)",
                               "operation": {"sync": {"revision": OLD}, "initiatedBy": {"automated": True}},
                               "startedAt": iso(-120), "finishedAt": iso(-118),
                               "syncResult": {"revision": OLD, "resources": []}},
            "reconciledAt": iso(-60),
            "history": [{"id": 1, "revision": OLD, "deployedAt": iso(-118)}],
            "summary": {"images": ["127.0.0.1:5000/workout-api:1.0.0"]},
        },
    }
    client.CustomObjectsApi(kube.client()).create_namespaced_custom_object(G, V, NS, P, body)
    return name


def patch(kube: KubeAPI, name: str, body: dict) -> None:
    client.CustomObjectsApi(kube.client()).patch_namespaced_custom_object(G, V, NS, P, name, body)


def running(rev: str = NEW) -> dict:
    return {"operation": {"sync": {"revision": rev}, "initiatedBy": {"automated": True}},
            "status": {"sync": {"status": "OutOfSync", "revision": rev},
                       "operationState": {"phase": "Running", "message": "waiting for healthy state",
                                          "operation": {"sync": {"revision": rev}}, "startedAt": iso(),
                                          "finishedAt": None, "syncResult": {"revision": rev}}}}


def succeeded(rev: str = NEW, *, health: str = "Progressing", assessed: bool = False) -> dict:
    finished = iso()
    return {"operation": None,
            "status": {"sync": {"status": "Synced", "revision": rev},
                       "health": {"status": health},
                       "operationState": {"phase": "Succeeded", "message": "successfully synced (all tasks run)",
                                          "finishedAt": finished, "syncResult": {"revision": rev}},
                       "reconciledAt": iso(1) if assessed else iso(-30),
                       "summary": {"images": ["127.0.0.1:5000/workout-api:1.1.0"]}}}


def in_background(steps: list[tuple[float, Callable[[], None]]]) -> threading.Thread:
    """Run each step after its delay, in a thread, like the Argo CD controller writing status."""

    def run() -> None:
        for delay, step in steps:
            time.sleep(delay)
            step()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_wait_for_sync_follows_a_sync_to_healthy(kube: KubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    """A sync that goes Running -> Succeeded -> assessed -> Healthy returns the final status and logs the steps."""
    name = create_app(kube)
    caplog.set_level(logging.INFO, logger="delivery")
    t = in_background([
        (0.5, lambda: patch(kube, name, running())),
        (0.5, lambda: patch(kube, name, succeeded(health="Progressing"))),
        (0.5, lambda: patch(kube, name, {"status": {"reconciledAt": iso(2)}})),
        (0.5, lambda: patch(kube, name, {"status": {"health": {"status": "Healthy"}}})),
    ])
    status = wait_for_sync(name, NEW, timeout=60, namespace=NS, kubeconfig=kube.kubeconfig)
    t.join(10)
    assert isinstance(status, AppStatus)
    assert (status.sync_status, status.sync_revision, status.health_status) == ("Synced", NEW, "Healthy")
    assert status.images == ["127.0.0.1:5000/workout-api:1.1.0"]
    assert "Synced@9f2c1e4, Healthy" in caplog.text
    assert "synced and healthy at 9f2c1e4" in caplog.text


def test_already_synced_returns_at_once(kube: KubeAPI) -> None:
    """An Application already synced and healthy at the revision returns without waiting for an event."""
    name = create_app(kube)
    patch(kube, name, succeeded(health="Healthy", assessed=True))
    started = time.monotonic()
    # No event will ever come and the periodic re-check is 60 s away: only the initial state can end this.
    status = wait_for_sync(name, NEW, timeout=120, namespace=NS, kubeconfig=kube.kubeconfig, tick=60)
    assert status.health_status == "Healthy"
    assert time.monotonic() - started < 55


def test_failed_sync_raises_sync_failed_with_argocd_message(kube: KubeAPI) -> None:
    """An operation Failed for our revision ends the wait with Argo CD's own message."""
    name = create_app(kube)
    message = 'one or more objects failed to apply, reason: Deployment.apps "workout-api" is invalid'
    in_background([
        (0.3, lambda: patch(kube, name, running())),
        (0.3, lambda: patch(kube, name, {"operation": None, "status": {"operationState": {
            "phase": "Failed", "message": message, "finishedAt": iso()}}})),
    ])
    with pytest.raises(SyncFailed) as exc:
        wait_for_sync(name, NEW, timeout=60, namespace=NS, kubeconfig=kube.kubeconfig)
    assert message in str(exc.value)
    assert not exc.value.transient


def test_degraded_after_the_grace_fails_without_further_events(kube: KubeAPI) -> None:
    """A sync that ends Degraded fails once the grace has passed, even though no status changes after it."""
    name = create_app(kube)
    degraded = succeeded(health="Degraded", assessed=True)
    degraded["status"]["health"]["message"] = "Back-off restarting failed container web"
    patch(kube, name, degraded)
    with pytest.raises(SyncFailed, match="Degraded: Back-off restarting failed container web"):
        wait_for_sync(name, NEW, timeout=60, namespace=NS, kubeconfig=kube.kubeconfig, degraded_grace=2, tick=1.0)


def test_nothing_happening_times_out_naming_the_last_status(kube: KubeAPI) -> None:
    """With Argo CD silent, the wait ends at its timeout and says it was still Synced at the old revision."""
    name = create_app(kube)
    with pytest.raises(SyncTimeout) as exc:
        wait_for_sync(name, NEW, timeout=3, namespace=NS, kubeconfig=kube.kubeconfig)
    text = str(exc.value)
    assert "Synced@1a2b3c4, Healthy" in text
    assert "waiting for Synced at 9f2c1e4" in text


def test_missing_application_times_out_saying_so(kube: KubeAPI) -> None:
    """Waiting on an Application that does not exist ends in a timeout that says it was not found."""
    with pytest.raises(SyncTimeout, match="Application not found"):
        wait_for_sync("no-such-app", NEW, timeout=2, namespace=NS, kubeconfig=kube.kubeconfig)


@pytest.mark.parametrize("revision", ["9f2c1e4", "main", "v1.2.3", NEW.upper(), NEW + "0", ""])
def test_non_sha_revision_is_refused_up_front(revision: str, tmp_path) -> None:
    """A short SHA, branch or tag can never match Argo CD's revision, so it is refused before any API call."""
    # The kubeconfig does not exist: any API use would fail with a ConfigError instead.
    with pytest.raises(ArgoCDError, match="40-character"):
        wait_for_sync("app", revision, timeout=600, kubeconfig=tmp_path / "no-kubeconfig")


def test_watch_survives_410_gone(kube: KubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    """When the API forgets the watched resourceVersion (410 Gone), the wait lists again and still sees the result."""
    name = create_app(kube)
    other = create_app(kube)
    caplog.set_level(logging.DEBUG, logger="delivery")

    def churn_and_compact() -> None:
        for i in range(3):
            patch(kube, other, {"metadata": {"labels": {"churn": str(i)}}})
        kube.compact()

    in_background([
        (0.5, churn_and_compact),
        (3.5, lambda: patch(kube, name, succeeded(health="Healthy", assessed=True))),
    ])
    status = wait_for_sync(name, NEW, timeout=60, namespace=NS, kubeconfig=kube.kubeconfig, tick=1.0)
    assert status.health_status == "Healthy"
    assert "410 Gone" in caplog.text


def test_dropped_watch_streams_do_not_lose_the_result(tmp_path) -> None:
    """With the API closing every watch stream after 0.5 s, a change made later is still seen."""
    with kube_api(tmp_path, drop_watch_after=0.5) as kube:
        name = create_app(kube)
        in_background([
            (1.2, lambda: patch(kube, name, running())),
            (1.2, lambda: patch(kube, name, succeeded(health="Healthy", assessed=True))),
        ])
        # A long tick: only the drops (not our own periodic re-watch) make the stream restart.
        status = wait_for_sync(name, NEW, timeout=60, namespace=NS, kubeconfig=kube.kubeconfig, tick=30)
        assert (status.sync_revision, status.health_status) == (NEW, "Healthy")


def test_request_refresh_sets_the_annotation(kube: KubeAPI) -> None:
    """A hard refresh request shows up as Argo CD's refresh annotation on the Application."""
    name = create_app(kube)
    request_refresh(name, namespace=NS, kubeconfig=kube.kubeconfig)
    app = client.CustomObjectsApi(kube.client()).get_namespaced_custom_object(G, V, NS, P, name)
    assert app["metadata"]["annotations"]["argocd.argoproj.io/refresh"] == "hard"
    request_refresh(name, namespace=NS, hard=False, kubeconfig=kube.kubeconfig)
    app = client.CustomObjectsApi(kube.client()).get_namespaced_custom_object(G, V, NS, P, name)
    assert app["metadata"]["annotations"]["argocd.argoproj.io/refresh"] == "normal"


def test_request_refresh_of_unknown_app_names_it(kube: KubeAPI) -> None:
    """Refreshing an Application that does not exist fails at once, naming the app and namespace."""
    with pytest.raises(ArgoCDError) as exc:
        request_refresh("ghost-app", namespace=NS, kubeconfig=kube.kubeconfig)
    assert "'ghost-app'" in str(exc.value) and "'argocd'" in str(exc.value)
    assert not exc.value.transient


def test_unreachable_api_is_a_transient_error(tmp_path) -> None:
    """With the API server down, refreshing fails with a transient error the retry layer may retry."""
    from sandbox.kube import write_kubeconfig

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    with pytest.raises(ArgoCDError) as exc:
        request_refresh("app", namespace=NS, kubeconfig=kubeconfig)
    assert exc.value.transient


def test_application_status_reads_the_summary(kube: KubeAPI) -> None:
    """application_status returns the summary of what Argo CD reports."""
    name = create_app(kube)
    s = application_status(name, namespace=NS, kubeconfig=kube.kubeconfig)
    assert (s.name, s.sync_status, s.sync_revision, s.health_status) == (name, "Synced", OLD, "Healthy")
    assert s.history[0]["revision"] == OLD


def test_a_waiter_on_a_quiet_application_makes_less_than_one_request_per_second(kube: KubeAPI) -> None:
    """Ten seconds of waiting on an Application nothing changes costs the API server < 1 request/s."""
    name = create_app(kube)
    before = kube.requests()
    started = time.monotonic()
    with pytest.raises(SyncTimeout):
        wait_for_sync(name, NEW, timeout=10, namespace=NS, kubeconfig=kube.kubeconfig)
    made = kube.requests() - before
    elapsed = time.monotonic() - started
    assert made / elapsed < 1.0, f"{made} requests in {elapsed:.1f} s"
