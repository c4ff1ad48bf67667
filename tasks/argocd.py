"""Argo CD, through its `Application` custom resource on the Kubernetes API.

We never talk to the Argo CD API server: refreshing is the `argocd.argoproj.io/refresh` annotation
(the application controller consumes and removes it), and waiting is a watch on the Application's
status. "Done" is the predicate of DESIGN.md: the sync operation for *our* commit succeeded, health
was assessed after it, the app is Synced at our commit and Healthy. Synced+Healthy alone is not
enough: right after a push the status still describes the previous commit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from delivery.errors import ArgoCDError, SyncFailed, SyncTimeout
from delivery.log import get_logger
from delivery.redact import redact
from delivery.retries import retry_if_transient as _retry_if_transient
from delivery.waits import Verdict, follow
from tasks.kube import STREAM_ERRORS, api_client, api_error_text, is_transient, watch_object

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "applications"
REFRESH_ANNOTATION = "argocd.argoproj.io/refresh"
_SHA = re.compile(r"^[0-9a-f]{40}$")
_CONFIG_ERRORS = ("ComparisonError", "InvalidSpecError")


# ---------------------------------------------------------------------------------------------
# Reading a status document (pure)


def _parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _revisions(doc: dict[str, Any] | None) -> list[str]:
    """`revision`, or `revisions[]` for multi-source applications."""
    doc = doc or {}
    revs = [r for r in (doc.get("revisions") or []) if isinstance(r, str) and r]
    if doc.get("revision"):
        revs.insert(0, doc["revision"])
    return revs


def _operation_revisions(op_state: dict[str, Any]) -> list[str]:
    """The revision(s) an operation was for: its result, else what it was asked to sync."""
    revs = _revisions(op_state.get("syncResult"))
    if not revs:
        revs = _revisions((op_state.get("operation") or {}).get("sync"))
    return revs


def _short(rev: str | None) -> str:
    return rev[:7] if rev else "?"


def _health_message(status: dict[str, Any]) -> str:
    health = status.get("health") or {}
    if health.get("message"):
        return str(health["message"])
    # Argo CD 2.x+ no longer fills the application-level message: the cause sits on the resources.
    parts = []
    for res in status.get("resources") or []:
        rh = res.get("health") or {}
        if rh.get("status") in ("Degraded", "Missing"):
            what = f"{res.get('kind', '?')}/{res.get('name', '?')}"
            parts.append(f"{what} {rh.get('status')}" + (f": {rh['message']}" if rh.get("message") else ""))
    return "; ".join(parts)


def sync_verdict(
    application: dict[str, Any],
    revision: str,
    *,
    now: datetime | None = None,
    degraded_grace: float = 10.0,
    carries: Callable[[str], bool] | None = None,
) -> Verdict:
    """Is `application` synced and healthy at `revision` (a full commit SHA)? Pure.

    `carries(r)` says whether a later revision `r` still carries our change. Several apps and
    environments commit to one GitOps branch: when another values commit lands before Argo CD syncs
    ours, Argo CD syncs that newer head, which includes our change. Without `carries`, only the exact
    revision counts.

    A ComparisonError/InvalidSpecError condition fails only once no refresh is pending: until the
    controller consumes our refresh annotation the conditions may still be about the old commit.
    Degraded/Missing right after a sync is often the new pods starting, hence `degraded_grace`.
    """
    now = now or datetime.now(UTC)
    status = application.get("status") or {}
    annotations = (application.get("metadata") or {}).get("annotations") or {}
    if application.get("operation"):
        phase = (status.get("operationState") or {}).get("phase")
        return Verdict.wait(f"sync operation {phase.lower() if phase else 'requested, not started yet'}")
    if not status:
        return Verdict.wait("no status yet")

    def matches(revs: list[str]) -> bool:
        return revision in revs or (carries is not None and any(carries(r) for r in revs if r))

    op_state = status.get("operationState") or {}
    phase = op_state.get("phase") or ""
    op_revs = _operation_revisions(op_state)
    ours = matches(op_revs)
    if phase in ("Running", "Terminating"):
        return Verdict.wait(f"sync operation {phase} for {_short(op_revs[0] if op_revs else None)}")

    if REFRESH_ANNOTATION not in annotations:
        for cond in status.get("conditions") or []:
            if cond.get("type") in _CONFIG_ERRORS:
                return Verdict.failed(f"{cond['type']}: {cond.get('message', '')}".strip())

    if phase in ("Failed", "Error"):
        if ours:
            return Verdict.failed(f"sync {phase.lower()} at {_short(revision)}: {op_state.get('message', '')}".strip())
        return Verdict.wait(f"last sync operation ({phase}) was for {_short(op_revs[0] if op_revs else None)}, "
                            f"not {_short(revision)}")
    if phase != "Succeeded":
        return Verdict.wait(f"no sync operation for {_short(revision)} yet")
    result_revs = _revisions(op_state.get("syncResult"))
    if not matches(result_revs):
        return Verdict.wait(f"last sync was at {_short(result_revs[0] if result_revs else None)}, "
                            f"not {_short(revision)}")
    finished = _parse_time(op_state.get("finishedAt"))
    if finished is None:
        return Verdict.wait("sync operation has no finishedAt yet")
    reconciled = _parse_time(status.get("reconciledAt"))
    if reconciled is None or reconciled < finished:
        return Verdict.wait("health not yet assessed after sync")

    sync = status.get("sync") or {}
    sync_status = sync.get("status") or "Unknown"
    sync_revs = _revisions(sync)
    if sync_status != "Synced" or not matches(sync_revs):
        return Verdict.wait(f"{sync_status} at {_short(sync_revs[0] if sync_revs else None)}, "
                            f"waiting for Synced at {_short(revision)}")

    health = (status.get("health") or {}).get("status") or ""
    if health == "Healthy":
        return Verdict.done(f"Synced at {_short(revision)} and Healthy")
    if health in ("Degraded", "Missing"):
        message = _health_message(status)
        since = (now - finished).total_seconds()
        if since < degraded_grace:
            return Verdict.wait(f"{health} {since:.0f} s after sync (grace {degraded_grace:.0f} s)"
                                + (f": {message}" if message else ""))
        return Verdict.failed(f"{health}" + (f": {message}" if message else ""))
    return Verdict.wait(f"health {health or 'not reported'}")


@dataclass
class AppStatus:
    name: str
    namespace: str
    sync_status: str = ""
    sync_revision: str = ""
    health_status: str = ""
    health_message: str = ""
    operation_phase: str = ""
    operation_message: str = ""
    operation_revision: str = ""
    started_at: str = ""
    finished_at: str = ""
    reconciled_at: str = ""
    conditions: list[tuple[str, str]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def summarize(application: dict[str, Any]) -> AppStatus:
    """The fields of an Application's status that the pipeline reports on. Pure."""
    meta = application.get("metadata") or {}
    status = application.get("status") or {}
    op_state = status.get("operationState") or {}
    sync = status.get("sync") or {}
    op_revs = _operation_revisions(op_state)
    sync_revs = _revisions(sync)
    return AppStatus(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        sync_status=sync.get("status") or "",
        sync_revision=sync_revs[0] if sync_revs else "",
        health_status=(status.get("health") or {}).get("status") or "",
        health_message=_health_message(status),
        operation_phase=op_state.get("phase") or "",
        operation_message=op_state.get("message") or "",
        operation_revision=op_revs[0] if op_revs else "",
        started_at=op_state.get("startedAt") or "",
        finished_at=op_state.get("finishedAt") or "",
        reconciled_at=status.get("reconciledAt") or "",
        conditions=[(c.get("type", ""), c.get("message", "")) for c in status.get("conditions") or []],
        history=[
            {"id": h.get("id"), "revision": (_revisions(h) or [""])[0], "deployedAt": h.get("deployedAt")}
            for h in status.get("history") or []
        ],
        images=list((status.get("summary") or {}).get("images") or []),
    )


def describe(status: AppStatus) -> str:
    """One line for logs and errors: `Synced@abc1234, Healthy`, `OutOfSync@abc1234, Healthy, sync Running@def5678`."""
    text = f"{status.sync_status or 'Unknown'}@{_short(status.sync_revision)}, {status.health_status or 'no health'}"
    if status.operation_phase and (status.operation_phase != "Succeeded"
                                   or status.operation_revision != status.sync_revision):
        text += f", sync {status.operation_phase}@{_short(status.operation_revision)}"
    return text


# ---------------------------------------------------------------------------------------------
# Talking to the Kubernetes API


def _translate(e: BaseException, what: str) -> ArgoCDError:
    if isinstance(e, ApiException) and e.status == 404:
        return ArgoCDError(f"{what}: not found", transient=False)
    return ArgoCDError(redact(f"{what}: {api_error_text(e)}"), transient=is_transient(e))


def _custom(kubeconfig: Path | str | None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client(kubeconfig))


def request_refresh(app: str, *, namespace: str = "argocd", hard: bool = True,
                    kubeconfig: Path | str | None = None) -> None:
    """Ask Argo CD to compare the app with Git now (hard: also bypass the manifest cache)."""
    what = f"Argo CD Application {app!r} in namespace {namespace!r}"
    body = {"metadata": {"annotations": {REFRESH_ANNOTATION: "hard" if hard else "normal"}}}
    try:
        _custom(kubeconfig).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, app, body, _request_timeout=(5, 30),
            _content_type="application/merge-patch+json")
    except (ApiException, *STREAM_ERRORS) as e:
        raise _translate(e, f"refresh of {what}") from e
    get_logger().info(f"requested a {'hard' if hard else 'normal'} refresh of {namespace}/{app}")


def get_application(app: str, *, namespace: str = "argocd", kubeconfig: Path | str | None = None) -> dict[str, Any]:
    try:
        return _custom(kubeconfig).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, app, _request_timeout=(5, 30))
    except (ApiException, *STREAM_ERRORS) as e:
        raise _translate(e, f"Argo CD Application {app!r} in namespace {namespace!r}") from e


def read_application(app: str, *, namespace: str = "argocd",
                     kubeconfig: Path | str | None = None) -> dict[str, Any] | None:
    """The Application, or None when it does not exist (the drift check reports that, not fails)."""
    try:
        return get_application(app, namespace=namespace, kubeconfig=kubeconfig)
    except ArgoCDError as e:
        if e.message.endswith(": not found"):
            return None
        raise


def request_sync(app: str, *, namespace: str = "argocd", revision: str | None = None,
                 kubeconfig: Path | str | None = None) -> None:
    """Ask Argo CD to sync now, as `argocd app sync` does: set the top-level `.operation`.

    Used to heal drift made behind Argo CD's back; it never writes Git."""
    what = f"Argo CD Application {app!r} in namespace {namespace!r}"
    sync: dict[str, Any] = {"syncStrategy": {"hook": {}}}
    if revision:
        sync["revision"] = revision
    body = {"operation": {"sync": sync, "initiatedBy": {"username": "delivery"}},
            "metadata": {"annotations": {REFRESH_ANNOTATION: "hard"}}}
    try:
        _custom(kubeconfig).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, app, body, _request_timeout=(5, 30),
            _content_type="application/merge-patch+json")
    except (ApiException, *STREAM_ERRORS) as e:
        raise _translate(e, f"sync of {what}") from e
    get_logger().info(f"requested a sync of {namespace}/{app}" + (f" at {revision[:12]}" if revision else ""))


def application_status(app: str, *, namespace: str = "argocd", kubeconfig: Path | str | None = None) -> AppStatus:
    return summarize(get_application(app, namespace=namespace, kubeconfig=kubeconfig))


def wait_for_sync(
    app: str,
    revision: str,
    *,
    timeout: float,
    namespace: str = "argocd",
    degraded_grace: float = 10.0,
    kubeconfig: Path | str | None = None,
    tick: float = 1.5,
    carries: Callable[[str], bool] | None = None,
) -> AppStatus:
    """Watch the Application until it is synced and healthy at `revision` (a full 40-hex commit SHA),
    or at a later revision that `carries` our change (see `sync_verdict`).

    Raises SyncFailed with Argo CD's message when the sync fails or the app stays degraded, and
    SyncTimeout naming the last status seen when `timeout` seconds pass first.
    """
    if not isinstance(revision, str) or not _SHA.match(revision):
        raise ArgoCDError(f"wait_for_sync needs a full 40-character commit SHA, got {revision!r}: "
                          "a short SHA, branch or tag never equals Argo CD's sync revision", transient=False)
    log = get_logger()
    where = f"{namespace}/{app}"
    deadline = time.monotonic() + timeout
    states = watch_object(_custom(kubeconfig).list_namespaced_custom_object, app, deadline=deadline, tick=tick,
                          group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL)

    def judge(obj: dict[str, Any] | None) -> Verdict:
        if obj is None:
            return Verdict.wait("Application does not exist")
        return sync_verdict(obj, revision, degraded_grace=degraded_grace, carries=carries)

    def key(obj: dict[str, Any] | None) -> tuple[str, ...]:
        if obj is None:
            return ("absent",)
        s = summarize(obj)
        return (s.sync_status, s.sync_revision, s.operation_phase, s.operation_revision, s.health_status)

    def on_change(obj: dict[str, Any] | None, verdict: Verdict, elapsed: float) -> None:
        seen = describe(summarize(obj)) if obj is not None else "absent"
        log.info(f"{where}: {seen} ({elapsed:.1f} s): {verdict.reason}")

    try:
        outcome = follow(states, judge, change_key=key, on_change=on_change)
    except (ApiException, *STREAM_ERRORS) as e:
        raise _translate(e, f"Argo CD Application {app!r} in namespace {namespace!r}") from e

    last = outcome.state
    if outcome.verdict.state == "done" and last is not None:
        status = summarize(last)
        log.info(f"{where}: synced and healthy at {_short(revision)} after {outcome.elapsed_s:.1f} s")
        return status
    if outcome.verdict.state == "failed" and last is not None:
        status = summarize(last)
        raise SyncFailed(redact(f"{where} at {_short(revision)}: {outcome.verdict.reason} "
                                f"(status: {describe(status)})"), transient=False)
    seen = describe(summarize(last)) if last is not None else "Application not found"
    raise SyncTimeout(redact(f"{where} not synced and healthy at {_short(revision)} within {timeout:.0f} s; "
                             f"last status: {seen} ({outcome.verdict.reason})"), transient=False)


# ---------------------------------------------------------------------------------------------
# Prefect tasks




@task(name="request-refresh", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_transient)
def request_refresh_task(app: str, namespace: str = "argocd", hard: bool = True) -> None:
    request_refresh(app, namespace=namespace, hard=hard)


@task(name="wait-for-sync", cache_policy=NO_CACHE)
def wait_for_sync_task(app: str, revision: str, timeout: float, namespace: str = "argocd",
                       degraded_grace: float = 10.0, carries: Callable[[str], bool] | None = None) -> AppStatus:
    """No retries: the wait already spans its whole timeout, and a failed sync will not heal by asking again."""
    return wait_for_sync(app, revision, timeout=timeout, namespace=namespace, degraded_grace=degraded_grace,
                         carries=carries)


@task(name="application-status", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=_retry_if_transient)
def application_status_task(app: str, namespace: str = "argocd") -> AppStatus:
    return application_status(app, namespace=namespace)


__all__ = [
    "AppStatus", "application_status", "application_status_task", "describe", "get_application",
    "request_refresh", "request_refresh_task", "summarize", "sync_verdict", "wait_for_sync", "wait_for_sync_task",
]
