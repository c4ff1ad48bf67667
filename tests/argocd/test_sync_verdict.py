"""Table tests of `sync_verdict` on Application documents shaped like `kubectl get application -o yaml`."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest

from tasks.argocd import describe, summarize, sync_verdict

NEW = "9f2c1e4b7a0d3c5e8f1a2b3c4d5e6f7a8b9c0d1e"
OLD = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"
T0 = datetime(2025, 3, 4, 10, 0, 0, tzinfo=UTC)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def app(revision: str = NEW, *, phase: str = "Succeeded", op_revision: str | None = None, sync: str = "Synced",
        health: str = "Healthy", finished: float = 10, reconciled: float = 12) -> dict:
    """A single-source Application after an automated sync, as Argo CD writes it."""
    op_revision = op_revision or revision
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": "workout-api-dev", "namespace": "argocd", "resourceVersion": "48213",
                     "generation": 57},
        "spec": {
            "project": "default",
            "source": {"repoURL": "https://github.com/example/workout-gitops.git", "path": "helm/workout-api",
                       "targetRevision": "main", "helm": {"valueFiles": ["values-dev.yaml"]}},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "workout-dev"},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True}},
        },
        "status": {
            "sync": {
                "status": sync,
                "revision": revision,
                "comparedTo": {"source": {"repoURL": "https://github.com/example/workout-gitops.git",
                                          "path": "helm/workout-api", "targetRevision": "main"},
                               "destination": {"server": "https://kubernetes.default.svc",
                                               "namespace": "workout-dev"}},
            },
            "health": {"status": health, "lastTransitionTime": ts(11)},
            "operationState": {
                "operation": {
                    "sync": {"revision": op_revision, "prune": True, "syncStrategy": {"hook": {}}},
                    "initiatedBy": {"automated": True},
                    "retry": {"limit": 5},
                },
                "phase": phase,
                "message": "successfully synced (all tasks run)" if phase == "Succeeded" else "",
                "startedAt": ts(0),
                **({"finishedAt": ts(finished)} if phase not in ("Running", "Terminating") else {}),
                "syncResult": {
                    "revision": op_revision,
                    "source": {"repoURL": "https://github.com/example/workout-gitops.git",
                               "path": "helm/workout-api", "targetRevision": "main"},
                    "resources": [{"group": "apps", "version": "v1", "kind": "Deployment",
                                   "namespace": "workout-dev", "name": "workout-api", "status": "Synced",
                                   "message": "deployment.apps/workout-api configured", "hookPhase": "Running",
                                   "syncPhase": "Sync"}],
                },
            },
            "reconciledAt": ts(reconciled),
            "observedAt": ts(reconciled),
            "sourceType": "Helm",
            "summary": {"images": ["127.0.0.1:5000/workout-api:1.4.0"]},
            "resources": [{"version": "v1", "kind": "Service", "namespace": "workout-dev", "name": "workout-api",
                           "status": "Synced", "health": {"status": "Healthy"}},
                          {"group": "apps", "version": "v1", "kind": "Deployment", "namespace": "workout-dev",
                           "name": "workout-api", "status": "Synced", "health": {"status": health}}],
            "history": [
                {"id": 11, "revision": OLD, "deployedAt": "2025-03-03T09:00:00Z",
                 "deployStartedAt": "2025-03-03T08:59:58Z", "source": {"path": "helm/workout-api"}},
                {"id": 12, "revision": op_revision, "deployedAt": ts(finished), "deployStartedAt": ts(0),
                 "source": {"path": "helm/workout-api"}},
            ],
            "controllerNamespace": "argocd",
        },
    }


def with_(doc: dict, **changes) -> dict:
    """Deep-copy `doc` and apply dotted-path changes (value None deletes the key)."""
    doc = copy.deepcopy(doc)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


def multi_source(revisions: list[str], op_revisions: list[str], sync: str = "Synced") -> dict:
    doc = app()
    st = doc["status"]
    st["sync"] = {"status": sync, "revisions": revisions}
    st["operationState"]["operation"]["sync"] = {"revisions": op_revisions}
    st["operationState"]["syncResult"] = {"revisions": op_revisions, "sources": [{}, {}], "resources": []}
    return doc


NOW = T0 + timedelta(seconds=30)

CASES = [
    ("synced, healthy, at our revision after the sync", app(), "done", ""),
    ("Synced and Healthy but at the OLD revision", app(OLD), "wait", "waiting for Synced at 9f2c1e4"),
    ("OutOfSync at our revision before any sync", app(NEW, op_revision=OLD, sync="OutOfSync"), "wait", ""),
    ("operation Succeeded but reconciledAt older than finishedAt",
     app(reconciled=5), "wait", "health not yet assessed after the sync"),
    ("operation Succeeded without finishedAt", with_(app(), status__operationState__finishedAt=None), "wait",
     "no finishedAt"),
    ("sync operation Running", app(phase="Running", sync="OutOfSync", health="Progressing"), "wait", "Running"),
    ("sync operation Terminating", app(phase="Terminating"), "wait", "Terminating"),
    ("operation Failed for our revision",
     with_(app(phase="Failed", sync="OutOfSync"), status__operationState__message=(
         'one or more objects failed to apply, reason: Deployment.apps "workout-api" is invalid')),
     "failed", 'Deployment.apps "workout-api" is invalid'),
    ("operation Error for our revision, no syncResult yet",
     with_(app(phase="Error", sync="OutOfSync"), status__operationState__syncResult=None,
           status__operationState__message="rpc error: code = Unknown desc = helm template failed"),
     "failed", "helm template failed"),
    ("operation Failed for an older revision",
     with_(app(NEW, phase="Failed", op_revision=OLD, sync="OutOfSync"),
           status__operationState__message="one or more objects failed to apply"), "wait", "waiting for Synced"),
    ("pending top-level operation", with_(app(), operation={"sync": {"revision": NEW}, "initiatedBy": {
        "automated": True}}), "wait", "sync operation"),
    ("ComparisonError condition",
     with_(app(OLD, sync="Unknown"), status__conditions=[{
         "type": "ComparisonError", "lastTransitionTime": ts(5),
         "message": "Failed to load target state: failed to generate manifest for source 1 of 1: "
                    "rpc error: code = Unknown desc = `helm template .` failed exit status 1"}]),
     "failed", "helm template"),
    ("InvalidSpecError condition",
     with_(app(OLD), status__conditions=[{"type": "InvalidSpecError",
                                           "message": "Application referencing project nope which does not exist"}]),
     "failed", "project nope"),
    ("ComparisonError while our refresh is still pending",
     with_(app(OLD, sync="Unknown"), metadata__annotations={"argocd.argoproj.io/refresh": "hard"},
           status__conditions=[{"type": "ComparisonError", "message": "stale"}]), "wait", ""),
    ("SyncError condition does not fail by itself",
     with_(app(), status__conditions=[{"type": "SyncError", "message": "retrying"}]), "done", ""),
    ("Synced at our revision but still Progressing", app(health="Progressing"), "wait", "Progressing"),
    ("Suspended", app(health="Suspended"), "wait", "Suspended"),
    ("no health yet", with_(app(), status__health=None), "wait", "not reported"),
    ("Degraded within the grace",
     with_(app(health="Degraded", finished=25, reconciled=26), status__health__message="pods crash-looping"),
     "wait", "grace"),
    ("Degraded after the grace",
     with_(app(health="Degraded", finished=10, reconciled=12), status__health__message="pods crash-looping"),
     "failed", "Degraded: pods crash-looping"),
    ("Degraded after the grace, message only on the resource",
     with_(app(health="Degraded"), status__resources=[{
         "group": "apps", "kind": "Deployment", "name": "workout-api", "namespace": "workout-dev",
         "health": {"status": "Degraded",
                    "message": 'Deployment "workout-api" exceeded its progress deadline'}}]),
     "failed", "Deployment/workout-api Degraded: Deployment \"workout-api\" exceeded its progress deadline"),
    ("Missing after the grace", app(health="Missing"), "failed", "Missing"),
    ("Synced at our revision with sync status Unknown", app(sync="Unknown"), "wait", "Unknown"),
    ("multi-source: our revision among revisions", multi_source([OLD, NEW], [OLD, NEW]), "done", ""),
    ("multi-source: only old revisions", multi_source([OLD, OLD], [OLD, OLD]), "wait", ""),
    ("empty status", {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                      "metadata": {"name": "workout-api-dev", "namespace": "argocd"}}, "wait", "no status"),
    ("status without operationState", {"metadata": {"name": "a"}, "status": {
        "sync": {"status": "OutOfSync", "revision": NEW}, "health": {"status": "Healthy"}}}, "wait", ""),
    # Already synced: our commit rendered nothing new, so the last operation is an older one.
    ("already synced: no operation for our revision, Synced at it and Healthy",
     app(NEW, op_revision=OLD, finished=5, reconciled=20), "done", "already synced"),
    ("already synced, never any operation", {"metadata": {"name": "a"}, "status": {
        "sync": {"status": "Synced", "revision": NEW}, "health": {"status": "Healthy"},
        "reconciledAt": ts(20)}}, "done", "already synced"),
    ("already synced but our refresh not consumed yet",
     with_(app(NEW, op_revision=OLD), metadata__annotations={"argocd.argoproj.io/refresh": "hard"}),
     "wait", "refresh requested"),
    ("already synced at a later revision that carries nothing of ours", app(OLD, op_revision=OLD), "wait", ""),
    ("sync retrying between attempts (Running with finishedAt)",
     with_(app(phase="Running", sync="OutOfSync", health="Progressing"), status__operationState__finishedAt=ts(8),
           status__operationState__message="Retrying attempt #2 at 10:00:18. one or more objects failed to apply"),
     "wait", "sync retrying: Retrying attempt #2"),
    ("sync failed after its retries",
     with_(app(phase="Failed", sync="OutOfSync"),
           status__operationState__message="one or more objects failed to apply (retried 5 times)."),
     "failed", "(retried 5 times)"),
]


@pytest.mark.parametrize(("doc", "state", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sync_verdict_table(doc: dict, state: str, reason: str) -> None:
    """Each documented Argo CD status shape yields the verdict (and reason) a person would expect."""
    verdict = sync_verdict(doc, NEW, now=NOW, degraded_grace=10)
    assert verdict.state == state, verdict.reason
    assert reason in verdict.reason


def test_reconciled_at_lagging_long_asks_for_a_refresh() -> None:
    """reconciledAt behind finishedAt: a short lag just waits, a long one hints the loop to refresh."""
    doc = app(finished=10, reconciled=5)
    assert sync_verdict(doc, NEW, now=T0 + timedelta(seconds=12)).hint == ""
    assert sync_verdict(doc, NEW, now=T0 + timedelta(seconds=30)).hint == "refresh"


def test_a_degraded_deployment_fails_at_once_other_kinds_get_a_grace() -> None:
    """ProgressDeadlineExceeded on the Deployment fails immediately; a Degraded HPA waits out its grace."""
    doc = app(health="Degraded", finished=25, reconciled=26)
    cause = 'Deployment dev/workout-api: ProgressDeadlineExceeded: ReplicaSet "x" has timed out progressing.'
    failed = sync_verdict(doc, NEW, now=NOW, workload_failure=lambda: cause)
    assert failed.state == "failed" and "ProgressDeadlineExceeded" in failed.reason
    assert sync_verdict(doc, NEW, now=NOW, workload_failure=lambda: None).state == "wait"
    assert sync_verdict(doc, NEW, now=T0 + timedelta(seconds=90), workload_failure=lambda: None).state == "failed"


def test_progressing_fails_when_a_new_pod_cannot_become_ready() -> None:
    """Argo CD says Progressing for the whole 600 s deadline; a crash-looping new pod fails it now,
    and a Progressing app whose pods are merely starting keeps waiting."""
    doc = app(health="Progressing", finished=25, reconciled=26)
    cause = ("Deployment dev/workout-api: new ReplicaSet workout-api-5d9: "
             "pod workout-api-5d9-x container app: CrashLoopBackOff")
    failed = sync_verdict(doc, NEW, now=NOW, workload_failure=lambda: cause)
    assert failed.state == "failed" and failed.reason == f"Progressing: {cause}"
    assert sync_verdict(doc, NEW, now=NOW, workload_failure=lambda: None).state == "wait"
    assert sync_verdict(doc, NEW, now=NOW).state == "wait"


def test_pods_are_not_judged_before_argo_cd_synced_our_revision() -> None:
    """A crash loop of the release before ours (still Progressing at the old revision) is not ours to fail."""
    doc = app(health="Progressing", finished=25, reconciled=26, revision=OLD)
    called: list[bool] = []
    verdict = sync_verdict(doc, NEW, now=NOW, workload_failure=lambda: called.append(True) or "broken")
    assert verdict.state == "wait" and called == []


def test_degraded_grace_is_measured_from_finished_at() -> None:
    """The same Degraded document waits inside the grace period and fails once it has passed."""
    doc = app(health="Degraded", finished=10, reconciled=12)
    assert sync_verdict(doc, NEW, now=T0 + timedelta(seconds=15), degraded_grace=10).state == "wait"
    assert sync_verdict(doc, NEW, now=T0 + timedelta(seconds=21), degraded_grace=10).state == "failed"


def test_summarize_and_describe() -> None:
    """A summary carries the fields reports need and describes itself in one short line."""
    s = summarize(app(health="Progressing"))
    assert (s.name, s.namespace, s.sync_status, s.health_status) == ("workout-api-dev", "argocd", "Synced",
                                                                      "Progressing")
    assert s.operation_revision == NEW and s.operation_phase == "Succeeded"
    assert s.images == ["127.0.0.1:5000/workout-api:1.4.0"]
    assert [h["id"] for h in s.history] == [11, 12] and s.history[0]["revision"] == OLD
    assert describe(s) == "Synced@9f2c1e4, Progressing"
    running = summarize(app(NEW, phase="Running", op_revision=OLD, sync="OutOfSync"))
    assert describe(running) == "OutOfSync@9f2c1e4, Healthy, sync Running@1a2b3c4"


LATER = "5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f"


def test_a_later_revision_that_carries_our_change_counts_as_ours():
    """Another values commit landed on top of ours and Argo CD synced it: done when it carries our tag."""
    synced_later = app(LATER)
    assert sync_verdict(synced_later, NEW, now=T0 + timedelta(seconds=20)).state == "wait"
    assert sync_verdict(synced_later, NEW, now=T0 + timedelta(seconds=20),
                        carries=lambda r: r == LATER).state == "done"
    # A later revision that no longer names our tag (someone rolled it back) is not ours.
    assert sync_verdict(synced_later, NEW, now=T0 + timedelta(seconds=20),
                        carries=lambda r: False).state == "wait"


def test_a_deadline_condition_from_before_the_current_generation_is_not_a_failure() -> None:
    """Right after a rollback is applied, the failed rollout's ProgressDeadlineExceeded is still on the
    Deployment until the controller observes the new generation: that is a wait, not a failure."""
    from tasks.probes import degraded_reason

    cond = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "x" has timed out progressing.'}
    stale = {"metadata": {"generation": 5}, "status": {"observedGeneration": 4, "conditions": [cond]}}
    current = {"metadata": {"generation": 5}, "status": {"observedGeneration": 5, "conditions": [cond]}}
    healthy = {"metadata": {"generation": 5}, "status": {"observedGeneration": 5, "conditions": [
        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}}
    assert degraded_reason(stale) is None
    assert degraded_reason(current) == 'ProgressDeadlineExceeded: ReplicaSet "x" has timed out progressing.'
    assert degraded_reason(healthy) is None and degraded_reason(None) is None
