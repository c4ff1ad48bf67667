"""Table tests of `rollout_verdict` on Deployment documents shaped like `kubectl get deploy -o yaml`."""

from __future__ import annotations

import copy

import pytest

from tasks.probes import rollout_verdict


def deployment(*, generation: int = 4, observed: int = 4, replicas: int | None = 2, status_replicas: int = 2,
               updated: int = 2, ready: int = 2, available: int = 2, progressing: tuple[str, str, str] | None = (
                   "True", "NewReplicaSetAvailable", 'ReplicaSet "workout-api-7d9f8c6b5" has successfully progressed.'),
               ) -> dict:
    conditions = [{"type": "Available", "status": "True" if available else "False",
                   "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                   "message": "Deployment has minimum availability.",
                   "lastUpdateTime": "2025-03-04T10:00:05Z", "lastTransitionTime": "2025-03-04T10:00:05Z"}]
    if progressing:
        status, reason, message = progressing
        conditions.append({"type": "Progressing", "status": status, "reason": reason, "message": message,
                           "lastUpdateTime": "2025-03-04T10:00:09Z", "lastTransitionTime": "2025-03-04T09:58:00Z"})
    doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "workout-api", "namespace": "workout-dev", "generation": generation,
                     "resourceVersion": "99120", "annotations": {"deployment.kubernetes.io/revision": "4"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "workout-api"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "progressDeadlineSeconds": 600,
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "workout-api"}},
                         "spec": {"containers": [{"name": "workout-api",
                                                  "image": "127.0.0.1:5000/workout-api:1.4.0"}]}},
        },
        "status": {"observedGeneration": observed, "replicas": status_replicas, "updatedReplicas": updated,
                   "readyReplicas": ready, "availableReplicas": available, "conditions": conditions},
    }
    if replicas is None:
        del doc["spec"]["replicas"]
    return {k: copy.deepcopy(v) for k, v in doc.items()}


CASES = [
    ("rolled out", deployment(), "done", 'deployment "workout-api" successfully rolled out'),
    ("replicas defaults to 1", deployment(replicas=None, status_replicas=1, updated=1, ready=1, available=1),
     "done", "successfully rolled out"),
    ("observedGeneration behind the spec", deployment(generation=5, observed=4), "wait",
     "Waiting for deployment spec update to be observed"),
    ("fresh rollout, no new replica yet",
     deployment(status_replicas=3, updated=1, ready=2, available=2,
                progressing=("True", "ReplicaSetUpdated", 'ReplicaSet "workout-api-7d9f8c6b5" is progressing.')),
     "wait", "1 out of 2 new replicas have been updated"),
    ("old replicas remaining", deployment(status_replicas=3, updated=2, ready=3, available=3), "wait",
     "1 old replicas are pending termination"),
    ("updated but not available", deployment(updated=2, ready=1, available=1), "wait",
     "1 of 2 updated replicas are available"),
    ("available but not ready", deployment(ready=1), "wait", "1 of 2 updated replicas are ready"),
    ("no status at all", {"metadata": {"name": "workout-api", "generation": 1}, "spec": {"replicas": 1}},
     "wait", "spec update to be observed"),
    ("progress deadline exceeded",
     deployment(status_replicas=3, updated=1, ready=2, available=2, progressing=(
         "False", "ProgressDeadlineExceeded", 'ReplicaSet "workout-api-7d9f8c6b5" has timed out progressing.')),
     "failed", 'exceeded its progress deadline: ReplicaSet "workout-api-7d9f8c6b5" has timed out progressing.'),
    ("scaled to zero", deployment(replicas=0, status_replicas=0, updated=0, ready=0, available=0), "done", ""),
]


@pytest.mark.parametrize(("doc", "state", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rollout_verdict_table(doc: dict, state: str, reason: str) -> None:
    """Each Deployment status yields kubectl's verdict and a kubectl-like message."""
    verdict = rollout_verdict(doc)
    assert verdict.state == state, verdict.reason
    assert reason in verdict.reason
