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
from tasks.kube import STREAM_ERRORS, api_client, api_error_text, is_transient, request_timeout, watch_object

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


_RETRYING = re.compile(r"retrying attempt #\d+", re.IGNORECASE)
# How long reconciledAt may trail the operation's finishedAt before we ask for the compare ourselves
# instead of waiting for the next periodic refresh (120 s + up to 60 s of jitter), as Kargo does.
REFRESH_LAG_SECONDS = 5.0


def sync_verdict(
    application: dict[str, Any],
    revision: str,
    *,
    now: datetime | None = None,
    degraded_grace: float = 60.0,
    carries: Callable[[str], bool] | None = None,
    workload_failure: Callable[[], str | None] | None = None,
) -> Verdict:
    """Is `application` synced and healthy at `revision` (a full commit SHA)? Pure, given its callbacks.

    Done, following what Argo CD writes (DESIGN.md, "synced and healthy at revision X"):
    - no pending `.operation`, no operation Running (a Running one whose message says "Retrying
      attempt #N" is a sync between retries: still running);
    - the refresh we asked for has been consumed, so the status is a fresh compare;
    - `sync.status == Synced` at `revision` (or at a later revision that `carries` our change). Either
      an operation for it Succeeded, or none ran at all: when our commit renders nothing new for this
      app (the tag was already in Git, a later head only touches another app) Argo CD runs no
      operation and simply reports Synced at the new revision. That is done too, never a timeout;
    - `reconciledAt >= operationState.finishedAt` when there is an operation state: the health we read
      was assessed after the last sync (hint "refresh" when it lags for long);
    - `health.status == Healthy`.
    A Failed/Error operation for our revision fails. Degraded fails at once when `workload_failure`
    names a failed rollout (ProgressDeadlineExceeded, or a new pod that cannot become ready); other
    kinds (an HPA briefly Degraded during a rollout, argo-cd #28522) get `degraded_grace` seconds
    first. Progressing fails when `workload_failure` names a new pod that will not become ready:
    Argo CD itself says Progressing until the Deployment's 600 s progress deadline has passed.
    """
    now = now or datetime.now(UTC)
    status = application.get("status") or {}
    annotations = (application.get("metadata") or {}).get("annotations") or {}
    op_state = status.get("operationState") or {}
    phase = op_state.get("phase") or ""
    op_revs = _operation_revisions(op_state)
    message = str(op_state.get("message") or "")
    if application.get("operation"):
        if phase == "Running" and _RETRYING.search(message):
            return Verdict.wait(f"sync retrying: {message}")
        return Verdict.wait(f"sync operation {phase.lower() if phase else 'requested, not started yet'}")
    if not status:
        return Verdict.wait("no status yet")

    def matches(revs: list[str]) -> bool:
        return revision in revs or (carries is not None and any(carries(r) for r in revs if r))

    if phase in ("Running", "Terminating"):
        if _RETRYING.search(message):
            return Verdict.wait(f"sync retrying: {message}")
        return Verdict.wait(f"sync operation {phase} for {_short(op_revs[0] if op_revs else None)}")

    refresh_pending = REFRESH_ANNOTATION in annotations
    if not refresh_pending:
        for cond in status.get("conditions") or []:
            if cond.get("type") in _CONFIG_ERRORS:
                return Verdict.failed(f"{cond['type']}: {cond.get('message', '')}".strip())

    ours = matches(op_revs)
    if phase in ("Failed", "Error") and ours:
        return Verdict.failed(f"sync {phase.lower()} at {_short(revision)}: {message}".strip())

    sync = status.get("sync") or {}
    sync_status = sync.get("status") or "Unknown"
    sync_revs = _revisions(sync)
    if refresh_pending:
        return Verdict.wait(f"refresh requested, not compared yet ({sync_status} at "
                            f"{_short(sync_revs[0] if sync_revs else None)})")
    if sync_status != "Synced" or not matches(sync_revs):
        return Verdict.wait(f"{sync_status} at {_short(sync_revs[0] if sync_revs else None)}, "
                            f"waiting for Synced at {_short(revision)}")

    finished = _parse_time(op_state.get("finishedAt")) if op_state else None
    reconciled = _parse_time(status.get("reconciledAt"))
    if op_state and finished is None:
        return Verdict.wait("sync operation has no finishedAt yet")
    if finished is not None and (reconciled is None or reconciled < finished):
        lag = (now - finished).total_seconds()
        return Verdict.wait(f"health not yet assessed after the sync ({lag:.0f} s)",
                            hint="refresh" if lag >= REFRESH_LAG_SECONDS else "")

    health = (status.get("health") or {}).get("status") or ""
    how = "synced" if ours and phase == "Succeeded" else "already synced (no operation needed)"
    if health == "Healthy":
        return Verdict.done(f"Synced at {_short(revision)} and Healthy ({how})")
    if health in ("Degraded", "Missing"):
        detail = _health_message(status)
        cause = workload_failure() if workload_failure is not None else None
        if cause:
            return Verdict.failed(f"{health}: {cause}")
        since_t = finished or reconciled or now
        since = (now - since_t).total_seconds()
        if since < degraded_grace:
            return Verdict.wait(f"{health} {since:.0f} s after sync (grace {degraded_grace:.0f} s)"
                                + (f": {detail}" if detail else ""))
        return Verdict.failed(f"{health}" + (f": {detail}" if detail else ""))
    if health == "Progressing" and workload_failure is not None:
        cause = workload_failure()
        if cause:
            return Verdict.failed(f"{health}: {cause}")
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
            GROUP, VERSION, namespace, PLURAL, app, body, _request_timeout=request_timeout(),
            _content_type="application/merge-patch+json")
    except (ApiException, *STREAM_ERRORS) as e:
        raise _translate(e, f"refresh of {what}") from e
    get_logger().info(f"requested a {'hard' if hard else 'normal'} refresh of {namespace}/{app}")


def get_application(app: str, *, namespace: str = "argocd", kubeconfig: Path | str | None = None) -> dict[str, Any]:
    try:
        return _custom(kubeconfig).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, app, _request_timeout=request_timeout())
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
            GROUP, VERSION, namespace, PLURAL, app, body, _request_timeout=request_timeout(),
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
    degraded_grace: float = 60.0,
    kubeconfig: Path | str | None = None,
    tick: float = 1.5,
    carries: Callable[[str], bool] | None = None,
    workload_failure: Callable[[], str | None] | None = None,
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

    refreshed = {"at": time.monotonic(), "count": 0}

    def judge(obj: dict[str, Any] | None) -> Verdict:
        if obj is None:
            return Verdict.wait("Application does not exist")
        verdict = sync_verdict(obj, revision, degraded_grace=degraded_grace, carries=carries,
                               workload_failure=workload_failure)
        # reconciledAt lags the sync: ask for the compare now rather than wait up to 180 s for the
        # periodic one; at most every few seconds and a bounded number of times.
        if (verdict.hint == "refresh" and refreshed["count"] < 10
                and time.monotonic() - refreshed["at"] >= REFRESH_LAG_SECONDS):
            refreshed["at"], refreshed["count"] = time.monotonic(), refreshed["count"] + 1
            log.info(f"{where}: reconciledAt lags the sync; asking for a refresh again")
            try:
                request_refresh(app, namespace=namespace, hard=False, kubeconfig=kubeconfig)
            except ArgoCDError as e:
                log.warning(f"{where}: refresh request failed: {e.message}")
        return verdict

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
                       degraded_grace: float = 60.0, carries: Callable[[str], bool] | None = None,
                       workload_failure: Callable[[], str | None] | None = None) -> AppStatus:
    """No retries: the wait already spans its whole timeout, and a failed sync will not heal by asking again."""
    return wait_for_sync(app, revision, timeout=timeout, namespace=namespace, degraded_grace=degraded_grace,
                         carries=carries, workload_failure=workload_failure)


__all__ = [
    "AppStatus", "application_status", "describe", "get_application",
    "request_refresh", "request_refresh_task", "summarize", "sync_verdict", "wait_for_sync", "wait_for_sync_task",
]
