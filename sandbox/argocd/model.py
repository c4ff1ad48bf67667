"""Pure parts of the Argo CD emulator: what the chart asks for, how Argo CD and Kubernetes judge it,
and the status documents they write. No I/O here, so the rules can be tested on their own.

Shapes follow Argo CD's `ApplicationStatus` (sync, health, operationState, history, reconciledAt,
conditions, resources, summary) and Kubernetes' `DeploymentStatus`. Health rules are Argo CD's own
Deployment health check (gitops-engine), which borrows from `kubectl rollout status`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

REFRESH_ANNOTATION = "argocd.argoproj.io/refresh"
RESOURCES_FINALIZER = "resources-finalizer.argocd.argoproj.io"
HISTORY_LIMIT = 10
DEFAULT_PORT = 8000
DEFAULT_READINESS_PATH = "/api/health/"
DEFAULT_PROGRESS_DEADLINE = 600
SYNC_OK_MESSAGE = "successfully synced (all tasks run)"


class ComparisonError(Exception):
    """The target state cannot be computed (Git, a values file, or a chart that does not render)."""


def now_iso(t: datetime | None = None) -> str:
    """Kubernetes `metav1.Time`: RFC 3339, UTC, whole seconds."""
    return (t or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A recursive map merge: maps merge key by key, anything else in `override` replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Desired:
    """What the chart renders for the one Deployment we care about."""

    image: str
    replicas: int
    container_port: int
    readiness_path: str
    progress_deadline: int
    sync_wave: int | None = None


def desired_from_manifests(docs: list[Mapping[str, Any]]) -> Desired:
    """The one Deployment of a rendered chart, as the fields the emulator runs; none, several, or one
    without an image is a ComparisonError (a real sync would apply nothing runnable)."""
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise ComparisonError(f"the chart renders {len(deployments)} Deployments; the emulator runs exactly one")
    spec = deployments[0].get("spec") or {}
    containers = (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []
    if not containers or not containers[0].get("image") or str(containers[0]["image"]).endswith(":"):
        raise ComparisonError("the rendered Deployment has no container image (is image.tag empty?)")
    c = containers[0]
    ports = c.get("ports") or []
    probe = (c.get("readinessProbe") or {}).get("httpGet") or {}
    try:
        return Desired(
            image=str(c["image"]),
            replicas=int(spec["replicas"]) if spec.get("replicas") is not None else 1,
            container_port=int(ports[0].get("containerPort", DEFAULT_PORT)) if ports else DEFAULT_PORT,
            readiness_path=str(probe.get("path") or DEFAULT_READINESS_PATH),
            progress_deadline=int(spec.get("progressDeadlineSeconds") or DEFAULT_PROGRESS_DEADLINE),
            sync_wave=int(wave) if (wave := ((deployments[0].get("metadata") or {}).get("annotations") or {})
                                    .get("argocd.argoproj.io/sync-wave")) not in (None, "", "0") else None,
        )
    except (TypeError, ValueError) as e:
        raise ComparisonError(f"the rendered Deployment has a non-numeric field: {e}") from e


def template_hash(image: str) -> str:
    """The `pod-template-hash` label: it only needs to change with the template (here, the image)."""
    return hashlib.sha256(image.encode()).hexdigest()[:10]


def replica_set_name(deployment: str, image: str) -> str:
    """`<deployment>-<pod-template-hash>`, as the Deployment controller names its ReplicaSets."""
    return f"{deployment}-{template_hash(image)}"


def deployment_manifest(app_name: str, name: str, namespace: str, d: Desired, *, release: str) -> dict[str, Any]:
    """The apps/v1 Deployment as the chart renders it (the fields the pipeline reads)."""
    selector = {"app.kubernetes.io/name": release, "app.kubernetes.io/instance": release}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            # Argo CD's label tracking: the instance label carries the Application name.
            "labels": {"app.kubernetes.io/instance": app_name, "app.kubernetes.io/name": release,
                       "app.kubernetes.io/managed-by": "Helm"},
        },
        "spec": {
            "replicas": d.replicas,
            "progressDeadlineSeconds": d.progress_deadline,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": dict(selector)},
                "spec": {
                    "containers": [{
                        "name": release,
                        "image": d.image,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"name": "http", "containerPort": d.container_port, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": d.readiness_path, "port": d.container_port}},
                    }],
                },
            },
        },
    }


@dataclass(frozen=True)
class LiveSpec:
    """What the Deployment controller reads from a live Deployment's spec."""

    image: str
    replicas: int
    container_port: int
    readiness_path: str
    progress_deadline: int
    generation: int
    container_name: str = "app"
    selector: tuple[tuple[str, str], ...] = ()


def live_spec(deployment: Mapping[str, Any]) -> LiveSpec | None:
    spec = deployment.get("spec") or {}
    containers = (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []
    if not containers or not containers[0].get("image"):
        return None
    c = containers[0]
    ports = c.get("ports") or []
    probe = ((c.get("readinessProbe") or {}).get("httpGet") or {})
    return LiveSpec(
        image=c["image"],
        replicas=int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1),
        container_port=int(ports[0].get("containerPort", DEFAULT_PORT)) if ports else DEFAULT_PORT,
        readiness_path=probe.get("path") or DEFAULT_READINESS_PATH,
        progress_deadline=int(spec.get("progressDeadlineSeconds") or DEFAULT_PROGRESS_DEADLINE),
        generation=int((deployment.get("metadata") or {}).get("generation") or 1),
        container_name=str(c.get("name") or "app"),
        selector=tuple(sorted((str(k), str(v)) for k, v in
                              (((spec.get("selector") or {}).get("matchLabels")) or {}).items())),
    )


def compare(desired: Desired, live: Mapping[str, Any] | None, *, ignore_replicas: bool = False) -> str:
    """Argo CD's sync status for our one resource: `Synced` or `OutOfSync`."""
    if live is None:
        return "OutOfSync"
    spec = live_spec(live)
    if spec is None or spec.image != desired.image:
        return "OutOfSync"
    if not ignore_replicas and spec.replicas != desired.replicas:
        return "OutOfSync"
    return "Synced"


def ignores_replicas(app: Mapping[str, Any]) -> bool:
    for rule in (app.get("spec") or {}).get("ignoreDifferences") or []:
        if rule.get("kind") == "Deployment" and "/spec/replicas" in (rule.get("jsonPointers") or []):
            return True
    return False


# --- Kubernetes Deployment status -------------------------------------------------------------

# Phases of the one emulated rollout, as the Deployment controller would see its ReplicaSets.
STEADY = "steady"          # the current ReplicaSet is fully available
CREATED = "created"        # the new ReplicaSet exists, its first pod is not created yet
ROLLING = "rolling"        # a new ReplicaSet's pods are starting
FAILED = "failed"          # the new ReplicaSet made no progress (crash, pull error, deadline)
UNAVAILABLE = "unavailable"  # the current pods are not ready (e.g. restarting)


def _condition(ctype: str, status: str, reason: str, message: str, previous: list[dict[str, Any]],
               ts: str) -> dict[str, Any]:
    prev = next((c for c in previous if c.get("type") == ctype), None)
    unchanged = prev is not None and prev.get("status") == status
    same = unchanged and prev.get("reason") == reason and prev.get("message") == message
    return {
        "type": ctype,
        "status": status,
        "lastUpdateTime": prev.get("lastUpdateTime", ts) if same else ts,
        "lastTransitionTime": prev.get("lastTransitionTime", ts) if unchanged else ts,
        "reason": reason,
        "message": message,
    }


def deployment_status(*, phase: str, replicas: int, observed_generation: int, new_rs: str,
                      old_ready: bool, previous: Mapping[str, Any] | None = None,
                      ts: str | None = None) -> dict[str, Any]:
    """`DeploymentStatus` for a rollout of `replicas` pods with maxSurge 1 / maxUnavailable 0."""
    ts = ts or now_iso()
    prev_conds = list((previous or {}).get("conditions") or [])
    n = replicas
    if phase == STEADY:
        counts = dict(replicas=n, updatedReplicas=n, readyReplicas=n, availableReplicas=n)
        progressing = ("True", "NewReplicaSetAvailable", f'ReplicaSet "{new_rs}" has successfully progressed.')
    elif phase == UNAVAILABLE:
        counts = dict(replicas=n, updatedReplicas=n, readyReplicas=0, availableReplicas=0, unavailableReplicas=n)
        progressing = ("True", "NewReplicaSetAvailable", f'ReplicaSet "{new_rs}" has successfully progressed.')
    else:
        if old_ready and phase == CREATED:
            # The new ReplicaSet exists but has no pod yet: the N old ones still serve.
            counts = dict(replicas=n, readyReplicas=n, availableReplicas=n)
        elif old_ready:
            # One surge pod of the new ReplicaSet next to the N old, still-serving ones.
            counts = dict(replicas=n + 1, updatedReplicas=1, readyReplicas=n, availableReplicas=n,
                          unavailableReplicas=1)
        else:
            counts = dict(replicas=n, updatedReplicas=n, readyReplicas=0, availableReplicas=0, unavailableReplicas=n)
        if phase == FAILED:
            progressing = ("False", "ProgressDeadlineExceeded", f'ReplicaSet "{new_rs}" has timed out progressing.')
        elif phase == CREATED:
            progressing = ("True", "NewReplicaSetCreated", f'Created new replica set "{new_rs}"')
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{new_rs}" is progressing.')
    if counts["availableReplicas"] >= n and n > 0:
        available = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
    else:
        available = ("False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
    # Kubernetes omits zero counts (omitempty).
    status: dict[str, Any] = {"observedGeneration": observed_generation}
    status.update({k: v for k, v in counts.items() if v})
    status["conditions"] = [
        _condition("Available", *available, prev_conds, ts),
        _condition("Progressing", *progressing, prev_conds, ts),
    ]
    return status


# --- Argo CD health ---------------------------------------------------------------------------


def deployment_health(deployment: Mapping[str, Any] | None) -> dict[str, str]:
    """Argo CD's health check for apps/v1 Deployment (gitops-engine `getAppsv1DeploymentHealth`)."""
    if deployment is None:
        return {"status": "Missing"}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    name = (deployment.get("metadata") or {}).get("name", "")
    if spec.get("paused"):
        return {"status": "Suspended", "message": "Deployment is paused"}
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    if generation > int(status.get("observedGeneration") or 0):
        return {"status": "Progressing",
                "message": "Waiting for rollout to finish: observed deployment generation less than desired generation"}
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), None)
    replicas = spec.get("replicas")
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if cond is not None and cond.get("reason") == "ProgressDeadlineExceeded":
        return {"status": "Degraded", "message": f'Deployment "{name}" exceeded its progress deadline'}
    if replicas is not None and updated < int(replicas):
        msg = f"Waiting for rollout to finish: {updated} out of {replicas} new replicas have been updated..."
        return {"status": "Progressing", "message": msg}
    if total > updated:
        return {"status": "Progressing",
                "message": f"Waiting for rollout to finish: {total - updated} old replicas are pending termination..."}
    if available < updated:
        return {"status": "Progressing",
                "message": f"Waiting for rollout to finish: {available} of {updated} updated replicas are available..."}
    return {"status": "Healthy"}


def app_health(deployment: Mapping[str, Any] | None, previous: Mapping[str, Any] | None = None,
               ts: str | None = None) -> dict[str, str]:
    """The Application's health as Argo CD 3.x writes it: its one Deployment's status and when that
    status last changed, without a message (resource health lives in the app tree, not the CR; the
    pod's reason is on the Pod)."""
    status = deployment_health(deployment)["status"]
    prev = previous or {}
    since = prev.get("lastTransitionTime") if prev.get("status") == status else None
    return {"status": status, "lastTransitionTime": since or ts or now_iso()}


# --- Argo CD Application status ---------------------------------------------------------------


def source_of(app: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy((app.get("spec") or {}).get("source") or {})


def destination_of(app: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy((app.get("spec") or {}).get("destination") or {})


def sync_status(app: Mapping[str, Any], status: str, revision: str | None) -> dict[str, Any]:
    compared: dict[str, Any] = {"source": source_of(app), "destination": destination_of(app)}
    ignore = (app.get("spec") or {}).get("ignoreDifferences")
    if ignore:
        compared["ignoreDifferences"] = copy.deepcopy(ignore)
    out: dict[str, Any] = {"status": status, "comparedTo": compared}
    if revision:
        out["revision"] = revision
    return out


def comparison_conditions(previous: list[dict[str, Any]] | None, error: str | None,
                          ts: str | None = None) -> list[dict[str, Any]]:
    """Keep other conditions; set or clear our `ComparisonError` (timestamp kept while unchanged)."""
    others = [c for c in previous or [] if c.get("type") != "ComparisonError"]
    if not error:
        return others
    prev = next((c for c in previous or [] if c.get("type") == "ComparisonError"), None)
    if prev is not None and prev.get("message") == error:
        return others + [prev]
    return others + [{"type": "ComparisonError", "message": error, "lastTransitionTime": ts or now_iso()}]


def resource_entry(namespace: str, name: str, sync: str, sync_wave: int | None = None) -> dict[str, Any]:
    """The Deployment's line in `.status.resources`; no health there (resourceHealthSource: appTree)."""
    entry: dict[str, Any] = {"group": "apps", "version": "v1", "kind": "Deployment",
                             "namespace": namespace, "name": name, "status": sync}
    if sync_wave:
        entry["syncWave"] = sync_wave
    return entry


def complete_operation(app: Mapping[str, Any], operation: Mapping[str, Any]) -> dict[str, Any]:
    """The operation as Argo CD records it in `operationState.operation` (seen on v3.2.11): the sync's
    source, prune and syncOptions from the Application, its retry policy (default limit 5 with
    backoff 5s ×2 up to 3m), and `initiatedBy.automated` when the app syncs automatically, also for
    an operation someone else set."""
    op = copy.deepcopy(dict(operation))
    spec = app.get("spec") or {}
    policy = spec.get("syncPolicy") or {}
    auto = policy.get("automated")
    sync = op.setdefault("sync", {})
    sync.setdefault("source", source_of(app))
    if auto is not None:
        sync.setdefault("prune", bool(auto.get("prune")))
    if policy.get("syncOptions"):
        sync.setdefault("syncOptions", list(policy["syncOptions"]))
    op["retry"] = op.get("retry") or copy.deepcopy(policy.get("retry") or {}) or {
        "limit": 5, "backoff": {"duration": "5s", "factor": 2, "maxDuration": "3m"}}
    by = dict(op.get("initiatedBy") or {})
    if auto is not None:
        by["automated"] = True
    op["initiatedBy"] = by
    return op


def operation_running(operation: Mapping[str, Any], started: str) -> dict[str, Any]:
    return {"operation": copy.deepcopy(dict(operation)), "phase": "Running",
            "message": "one or more tasks are running", "startedAt": started}


def operation_finished(running: Mapping[str, Any], *, ok: bool, message: str, revision: str,
                       source: Mapping[str, Any], resources: list[dict[str, Any]], finished: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(running))
    out.update({
        "phase": "Succeeded" if ok else "Failed",
        "message": message,
        "finishedAt": finished,
        "syncResult": {"revision": revision, "source": copy.deepcopy(dict(source)), "resources": resources},
    })
    return out


def append_history(history: list[dict[str, Any]] | None, *, revision: str, source: Mapping[str, Any],
                   started: str, deployed: str, initiated_by: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Argo CD keeps the last `revisionHistoryLimit` (10) entries with ever-increasing ids."""
    history = list(history or [])
    next_id = max((int(h.get("id", 0)) for h in history), default=-1) + 1
    entry: dict[str, Any] = {"id": next_id, "revision": revision, "deployStartedAt": started,
                             "deployedAt": deployed, "source": copy.deepcopy(dict(source))}
    if initiated_by:
        entry["initiatedBy"] = dict(initiated_by)
    return (history + [entry])[-HISTORY_LIMIT:]


def already_attempted(app: Mapping[str, Any], revision: str) -> tuple[bool, str | None]:
    """Argo CD's `alreadyAttemptedSync`: was the last operation a sync to this revision?"""
    state = (app.get("status") or {}).get("operationState") or {}
    result = state.get("syncResult") or {}
    if not state or result.get("revision") != revision:
        return False, None
    return True, state.get("phase")


def automated(app: Mapping[str, Any]) -> dict[str, Any] | None:
    policy = (app.get("spec") or {}).get("syncPolicy") or {}
    auto = policy.get("automated")
    if auto is None or auto is False:
        return None
    if isinstance(auto, Mapping) and auto.get("enabled") is False:
        return None
    return dict(auto) if isinstance(auto, Mapping) else {}


def merge_patch_for(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: keys that disappear become null,
    so a stale `message` or `finishedAt` does not survive a merge."""
    if not isinstance(new, Mapping) or not isinstance(old, Mapping):
        return copy.deepcopy(new)
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        out[k] = merge_patch_for(old[k], v) if k in old else copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class RetryPolicy:
    """An operation's `retry` (`limit`, `backoff.duration`/`factor`/`maxDuration`), with Argo CD's defaults."""

    limit: int = 0
    duration: float = 5.0
    factor: float = 2.0
    max_duration: float = 180.0

    def delay(self, attempt: int) -> float:
        return min(self.max_duration, self.duration * self.factor ** (attempt - 1))


def _seconds(value: Any, default: float) -> float:
    """`"5s"`, `"3m"`, `"1h"` or a number of seconds."""
    if value is None or value == "":
        return default
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        return default


def retry_policy(retry: Mapping[str, Any] | None) -> RetryPolicy:
    retry = retry or {}
    backoff = retry.get("backoff") or {}
    try:
        limit = int(retry.get("limit") or 0)
    except (TypeError, ValueError):
        limit = 0
    return RetryPolicy(limit=max(0, limit), duration=_seconds(backoff.get("duration"), 5.0),
                       factor=float(backoff.get("factor") or 2),
                       max_duration=_seconds(backoff.get("maxDuration"), 180.0))


# --- Kubernetes ReplicaSets and Pods, as the Deployment controller and the kubelet write them -------

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


def owner(kind: str, obj: Mapping[str, Any], *, api_version: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {"apiVersion": api_version, "kind": kind, "name": meta.get("name", ""), "uid": meta.get("uid", ""),
            "controller": True, "blockOwnerDeletion": True}


def replica_set_manifest(deployment: Mapping[str, Any], spec: LiveSpec, *, revision: int,
                         replicas: int) -> dict[str, Any]:
    """The ReplicaSet of `spec`'s template: owned by the Deployment, labelled with the template hash,
    annotated with the Deployment revision it was last rolled out as."""
    meta = deployment.get("metadata") or {}
    labels = {**dict(spec.selector), "pod-template-hash": template_hash(spec.image)}
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": replica_set_name(meta.get("name", ""), spec.image), "namespace": meta.get("namespace"),
                     "labels": labels, "annotations": {REVISION_ANNOTATION: str(revision)},
                     "ownerReferences": [owner("Deployment", deployment, api_version="apps/v1")]},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": spec.container_name, "image": spec.image}]}}},
    }


def pod_manifest(name: str, replica_set: Mapping[str, Any], spec: LiveSpec) -> dict[str, Any]:
    rs_meta = replica_set.get("metadata") or {}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": rs_meta.get("namespace"),
                     "labels": dict(rs_meta.get("labels") or {}),
                     "ownerReferences": [owner("ReplicaSet", replica_set, api_version="apps/v1")]},
        "spec": {"containers": [{"name": spec.container_name, "image": spec.image,
                                 "readinessProbe": {"httpGet": {"path": spec.readiness_path,
                                                                "port": spec.container_port}}}],
                 "restartPolicy": "Always"},
    }


# What the one container of an emulated pod is doing, in the kubelet's terms.
CREATING = "creating"      # waiting: ContainerCreating (pulling, starting)
PULL_ERROR = "pull-error"  # waiting: ErrImagePull on the first failure, ImagePullBackOff after
RUNNING = "running"        # running; ready once the readiness probe passes
CRASHED = "crashed"        # waiting: CrashLoopBackOff, last state terminated with an exit code
EXITED = "exited"          # terminated: the first exit, restarted at once (no back-off yet)


@dataclass
class ContainerState:
    state: str = CREATING
    ready: bool = False
    started_at: str = ""
    restarts: int = 0
    reason: str = ""
    message: str = ""
    last_exit: int | None = None
    last_started: str = ""
    last_finished: str = ""


def pod_status(spec: LiveSpec, c: ContainerState, *, created: str, ts: str | None = None) -> dict[str, Any]:
    """`PodStatus` for the pod's one container, shaped as the kubelet writes it (phase, conditions,
    containerStatuses with `state`, `lastState`, `ready`, `started`, `restartCount`)."""
    ts = ts or now_iso()
    state: dict[str, Any]
    if c.state == RUNNING:
        state = {"running": {"startedAt": c.started_at or ts}}
    elif c.state == CRASHED:
        state = {"waiting": {"reason": "CrashLoopBackOff", "message": c.message}}
    elif c.state == EXITED:
        state = {"terminated": {"exitCode": c.last_exit if c.last_exit is not None else 1,
                                "reason": "Error" if c.last_exit else "Completed",
                                "startedAt": c.last_started or created, "finishedAt": c.last_finished or ts}}
    elif c.state == PULL_ERROR:
        state = {"waiting": {"reason": c.reason or "ErrImagePull", "message": c.message}}
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    cs: dict[str, Any] = {"name": spec.container_name, "image": spec.image, "imageID": "", "ready": c.ready,
                          "started": c.state == RUNNING, "restartCount": c.restarts, "state": state,
                          "lastState": {}}
    if c.last_exit is not None and c.state != EXITED:
        cs["lastState"] = {"terminated": {"exitCode": c.last_exit, "reason": "Error" if c.last_exit else "Completed",
                                          "startedAt": c.last_started or created,
                                          "finishedAt": c.last_finished or ts}}
    ever_started = c.state in (RUNNING, CRASHED, EXITED)
    ready = "True" if c.ready else "False"
    why = {} if c.ready else {"reason": "ContainersNotReady",
                              "message": f"containers with unready status: [{spec.container_name}]"}
    return {
        "phase": "Running" if ever_started else "Pending",
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": "True" if ever_started else "False",
             "lastTransitionTime": created},
            {"type": "Initialized", "status": "True", "lastTransitionTime": created},
            {"type": "Ready", "status": ready, "lastTransitionTime": ts, **why},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": ts, **why},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": created},
        ],
        "hostIP": "127.0.0.1",
        "startTime": created,
        "qosClass": "BestEffort",
        "containerStatuses": [cs],
    }


def crash_back_off(failures: int) -> float:
    """The kubelet's back-off after the `failures`-th failure (a container exit, an image pull): none
    after the first, then 10 s, doubling, capped at 300 s."""
    return 0.0 if failures <= 1 else float(min(300, 10 * 2 ** (failures - 2)))
