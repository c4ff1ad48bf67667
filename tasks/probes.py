"""Verification after Argo CD says "synced and healthy": the Deployment rollout, judged the way
`kubectl rollout status` judges it, and the app's own health endpoint answering the version we
deployed several times in a row (one lucky answer from an old pod behind a Service proves nothing).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE

from delivery.errors import HealthCheckFailed, RolloutFailed
from delivery.log import get_logger
from delivery.redact import redact
from delivery.waits import Verdict, follow
from tasks.kube import STREAM_ERRORS, api_client, api_error_text, is_transient, request_timeout, watch_object

# ---------------------------------------------------------------------------------------------
# Deployment rollout


def rollout_verdict(deployment: dict[str, Any]) -> Verdict:
    """Has the Deployment finished rolling out? Pure; messages mirror `kubectl rollout status`.

    Stricter than kubectl in one way: ready replicas must also reach the desired count.
    """
    meta = deployment.get("metadata") or {}
    name = meta.get("name", "?")
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    generation = meta.get("generation") or 0
    observed = status.get("observedGeneration") or 0
    if observed < generation:
        return Verdict.wait("Waiting for deployment spec update to be observed...")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            message = cond.get("message") or ""
            return Verdict.failed(f'deployment "{name}" exceeded its progress deadline' + (f": {message}"
                                                                                           if message else ""))
    desired = spec.get("replicas")
    desired = 1 if desired is None else desired
    replicas = status.get("replicas") or 0
    updated = status.get("updatedReplicas") or 0
    ready = status.get("readyReplicas") or 0
    available = status.get("availableReplicas") or 0
    prefix = f'Waiting for deployment "{name}" rollout to finish: '
    if updated < desired:
        return Verdict.wait(f"{prefix}{updated} out of {desired} new replicas have been updated...")
    if replicas > updated:
        return Verdict.wait(f"{prefix}{replicas - updated} old replicas are pending termination...")
    if available < updated:
        return Verdict.wait(f"{prefix}{available} of {updated} updated replicas are available...")
    if ready < desired:
        return Verdict.wait(f"{prefix}{ready} of {desired} updated replicas are ready...")
    return Verdict.done(f'deployment "{name}" successfully rolled out')


def _rollout_summary(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment.get("spec") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    status = deployment.get("status") or {}
    return {
        "name": (deployment.get("metadata") or {}).get("name", ""),
        "replicas": spec.get("replicas", 1),
        "image": containers[0].get("image", "") if containers else "",
        "images": [c.get("image", "") for c in containers],
        "generation": (deployment.get("metadata") or {}).get("generation"),
        "observed_generation": status.get("observedGeneration"),
        "ready_replicas": status.get("readyReplicas", 0),
    }


def read_deployment(deployment: str, namespace: str, *,
                    kubeconfig: Path | str | None = None) -> dict[str, Any] | None:
    """The Deployment as the API serves it, or None when it does not exist."""
    apps = client.AppsV1Api(api_client(kubeconfig))
    try:
        resp = apps.read_namespaced_deployment(deployment, namespace, _preload_content=False,
                                               _request_timeout=request_timeout())
    except ApiException as e:
        if e.status == 404:
            return None
        raise RolloutFailed(redact(f"deployment {namespace}/{deployment}: {api_error_text(e)}"),
                            transient=is_transient(e)) from e
    except STREAM_ERRORS as e:
        raise RolloutFailed(redact(f"deployment {namespace}/{deployment}: {api_error_text(e)}"),
                            transient=True) from e
    return json.loads(resp.data)


def degraded_reason(dep: dict[str, Any] | None) -> str | None:
    """Pure: `ProgressDeadlineExceeded: <message>` when the Deployment controller has judged the *current*
    spec a failed rollout, else None. A condition the controller wrote before it observed the current
    generation belongs to the previous spec: right after a rollback is applied, a real cluster still
    shows the failed rollout's ProgressDeadlineExceeded until the controller catches up (seen on the
    real tier; calling that a failure would fail a rollback that is about to succeed)."""
    meta, status = (dep or {}).get("metadata") or {}, (dep or {}).get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return f"ProgressDeadlineExceeded: {cond.get('message', '')}".strip()
    return None


# ---------------------------------------------------------------------------------------------
# The new ReplicaSet's pods: fail a release that cannot become ready in seconds, not after the
# progress deadline. The Deployment's own status says nothing until `progressDeadlineSeconds` (600 s
# in the chart) have passed; the kubelet's container statuses say it at once.

# Waiting reasons after which the kubelet only backs off and retries the same thing: the release is
# broken as built or configured, and waiting for the deadline changes nothing.
FAIL_AT_ONCE = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
                          "CreateContainerError", "InvalidImageName", "ErrImageNeverPull", "RunContainerError"})
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
NEVER_READY = "NeverReady"


@dataclass(frozen=True)
class PodFailure:
    pod: str
    container: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"pod {self.pod} container {self.container}: {self.reason}" + (f": {self.message}"
                                                                             if self.message else "")


def _parse_k8s_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _terminated_detail(cs: dict[str, Any]) -> str:
    term = ((cs.get("lastState") or {}).get("terminated") or {})
    bits = []
    if term:
        bits.append(f"last exit code {term.get('exitCode', '?')}" + (f" ({term['reason']})" if term.get("reason")
                                                                      else ""))
    if cs.get("restartCount"):
        bits.append(f"{cs['restartCount']} restarts")
    return ", ".join(bits)


def pod_failure(pods: list[dict[str, Any]], *, now: datetime, readiness_grace: float) -> PodFailure | None:
    """Pure: the first container of `pods` (the new ReplicaSet's) that will not become ready, or None.

    - A container waiting with a reason in FAIL_AT_ONCE (the kubelet's words: CrashLoopBackOff,
      ImagePullBackOff, ...) fails at once, with the kubelet's message and the last exit code;
    - a container that has been running for more than `readiness_grace` seconds without ever
      being ready (readiness keeps failing) fails as NeverReady;
    - a pod in phase Failed fails with its reason.
    Pods being deleted are skipped: they belong to a scale-down, not to the release's verdict.
    """
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        name = meta.get("name", "?")
        statuses = list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])
        for cs in statuses:
            container = cs.get("name", "?")
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in FAIL_AT_ONCE:
                detail = "; ".join(x for x in (str(waiting.get("message") or "").strip(), _terminated_detail(cs)) if x)
                return PodFailure(name, container, str(waiting["reason"]), redact(_shorten(detail, 400)))
            running = state.get("running") or {}
            started = _parse_k8s_time(running.get("startedAt"))
            if running and not cs.get("ready") and started is not None:
                ran = (now - started).total_seconds()
                if ran > readiness_grace:
                    extra = _terminated_detail(cs)
                    return PodFailure(name, container, NEVER_READY,
                                      f"running for {ran:.0f} s without passing its readiness probe "
                                      f"(grace {readiness_grace:.0f} s)" + (f"; {extra}" if extra else ""))
        if status.get("phase") == "Failed":
            return PodFailure(name, "-", str(status.get("reason") or "Failed"),
                              redact(_shorten(str(status.get("message") or ""), 400)))
    return None


def new_replica_set(deployment: dict[str, Any], replica_sets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pure: the Deployment's current ReplicaSet, as `kubectl rollout status` finds it: owned by the
    Deployment and carrying the Deployment's revision annotation. None before the controller has
    observed the current generation (the revision then still names the previous rollout's)."""
    meta, status = deployment.get("metadata") or {}, deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return None
    revision = (meta.get("annotations") or {}).get(REVISION_ANNOTATION)
    uid = meta.get("uid")
    if not revision or not uid:
        return None
    for rs in replica_sets:
        rs_meta = rs.get("metadata") or {}
        owned = any(o.get("uid") == uid for o in rs_meta.get("ownerReferences") or [])
        if owned and (rs_meta.get("annotations") or {}).get(REVISION_ANNOTATION) == revision:
            return rs
    return None


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _selector_text(match_labels: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


def _readiness_event(core: client.CoreV1Api, namespace: str, pod: str) -> str:
    """The kubelet's last `Unhealthy` event for `pod` ("Readiness probe failed: HTTP probe failed
    with statuscode: 503"), or "" when there is none or events cannot be read."""
    try:
        resp = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}",
                                          _preload_content=False, _request_timeout=request_timeout())
        items = json.loads(resp.data).get("items") or []
    except (ApiException, *STREAM_ERRORS, ValueError):
        return ""
    unhealthy = [e for e in items if e.get("reason") == "Unhealthy" and "eadiness" in str(e.get("message", ""))]
    if not unhealthy:
        return ""
    last = max(unhealthy, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return _shorten(str(last.get("message") or ""), 300)


def workload_failure(deployment: str, namespace: str, *, readiness_grace: float,
                     kubeconfig: Path | str | None = None) -> str | None:
    """Why the Deployment's current rollout has failed, or None (not failed, or unreadable right now:
    the caller then keeps waiting within its own deadline rather than failing on a read error).

    Either the controller's own verdict (ProgressDeadlineExceeded, see `degraded_reason`) or the
    first of the new ReplicaSet's pods that will not become ready (see `pod_failure`)."""
    where = f"Deployment {namespace}/{deployment}"
    try:
        dep = read_deployment(deployment, namespace, kubeconfig=kubeconfig)
    except RolloutFailed:
        return None
    if dep is None:
        return None
    reason = degraded_reason(dep)
    if reason:
        return f"{where}: {reason}"
    api = api_client(kubeconfig)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    match = ((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    try:
        resp = apps.list_namespaced_replica_set(namespace, label_selector=_selector_text(match) or None,
                                                _preload_content=False, _request_timeout=request_timeout())
        rs = new_replica_set(dep, json.loads(resp.data).get("items") or [])
        if rs is None:
            return None
        rs_meta = rs.get("metadata") or {}
        pod_labels = dict(match)
        template_hash = (rs_meta.get("labels") or {}).get("pod-template-hash")
        if template_hash:
            pod_labels["pod-template-hash"] = template_hash
        resp = core.list_namespaced_pod(namespace, label_selector=_selector_text(pod_labels) or None,
                                        _preload_content=False, _request_timeout=request_timeout())
        pods = [p for p in json.loads(resp.data).get("items") or [] if _owned_by(p, rs_meta.get("uid", ""))]
    except (ApiException, *STREAM_ERRORS, ValueError):
        return None
    failure = pod_failure(pods, now=datetime.now(UTC), readiness_grace=readiness_grace)
    if failure is None:
        return None
    text = f"{where}: new ReplicaSet {rs_meta.get('name', '?')}: {failure}"
    if failure.reason == NEVER_READY:
        event = _readiness_event(core, namespace, failure.pod)
        if event:
            text += f"; last: {event}"
    return redact(text)


class FailureWatch:
    """`workload_failure` as a callback for the waits, at most once per `interval` seconds: the waits
    judge on every watch event and tick, and three API reads per judgement would be waste."""

    def __init__(self, deployment: str, namespace: str, *, readiness_grace: float, interval: float = 2.0,
                 kubeconfig: Path | str | None = None) -> None:
        self.deployment, self.namespace = deployment, namespace
        self.readiness_grace, self.interval, self.kubeconfig = readiness_grace, interval, kubeconfig
        self._at = -float("inf")
        self._last: str | None = None

    def __call__(self) -> str | None:
        if time.monotonic() - self._at >= self.interval:
            self._at = time.monotonic()
            self._last = workload_failure(self.deployment, self.namespace, readiness_grace=self.readiness_grace,
                                          kubeconfig=self.kubeconfig)
        return self._last


def wait_for_rollout(deployment: str, namespace: str, *, timeout: float, kubeconfig: Path | str | None = None,
                     tick: float = 1.5, failure: Callable[[], str | None] | None = None) -> dict[str, Any]:
    """Watch the Deployment until its rollout is complete; return replicas, image and generation."""
    log = get_logger()
    where = f"deployment {namespace}/{deployment}"
    deadline = time.monotonic() + timeout
    apps = client.AppsV1Api(api_client(kubeconfig))
    states = watch_object(apps.list_namespaced_deployment, deployment, deadline=deadline, tick=tick,
                          namespace=namespace)

    def judge(obj: dict[str, Any] | None) -> Verdict:
        if obj is None:
            return Verdict.wait(f"{where} not found")
        verdict = rollout_verdict(obj)
        if verdict.state == "wait" and failure is not None:
            cause = failure()
            if cause:
                return Verdict.failed(cause)
        return verdict

    def on_change(obj: dict[str, Any] | None, verdict: Verdict, elapsed: float) -> None:
        log.info(f"{where} ({elapsed:.1f} s): {verdict.reason}")

    try:
        outcome = follow(states, judge, change_key=lambda obj: None if obj is None else rollout_verdict(obj).reason,
                         on_change=on_change)
    except (ApiException, *STREAM_ERRORS) as e:
        raise RolloutFailed(redact(f"{where}: {api_error_text(e)}"), transient=is_transient(e)) from e
    if outcome.verdict.state == "done" and outcome.state is not None:
        return _rollout_summary(outcome.state)
    if outcome.verdict.state == "failed":
        reason = outcome.verdict.reason
        raise RolloutFailed(redact(reason if reason.startswith(("Deployment ", where)) else f"{where}: {reason}"),
                            transient=False)
    if outcome.state is None:
        raise RolloutFailed(f"{where} was not found during the whole {timeout:.0f} s wait", transient=False)
    raise RolloutFailed(redact(f"{where} did not finish rolling out within {timeout:.0f} s; "
                               f"last status: {outcome.verdict.reason}"), transient=False)


# ---------------------------------------------------------------------------------------------
# HTTP health probe

KUBE_PROXY_SCHEME = "kube-proxy://"


@dataclass
class HealthAnswer:
    url: str
    status_code: int
    version: str
    body: dict[str, Any] = field(default_factory=dict)
    successes: int = 0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class _Target:
    url: str
    headers: dict[str, str]
    verify: Any = True
    cert: Any = None


def _tls_context(target: _Target) -> ssl.SSLContext | bool:
    """One SSL context with the CA and the client certificate: httpx ignores `cert=` once `verify` is a
    CA path, and a kubeconfig that authenticates by client certificate (kubeadm's, this project's real
    tier) then reaches the API server as system:anonymous."""
    if target.verify is False:
        if not target.cert:
            return False
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif isinstance(target.verify, str | Path):
        ctx = ssl.create_default_context(cafile=str(target.verify))
    else:
        ctx = ssl.create_default_context()
    if target.cert:
        ctx.load_cert_chain(*target.cert)
    return ctx


def _proxy_path(namespace: str, service: str, port: int | str, path: str) -> str:
    path = path if path.startswith("/") else f"/{path}"
    return (f"/api/v1/namespaces/{quote(namespace, safe='')}/services/"
            f"{quote(service, safe='')}:{quote(str(port), safe='')}/proxy{path}")


def _proxy_target(namespace: str, service: str, port: int | str, path: str,
                  kubeconfig: Path | str | None) -> _Target:
    cfg = api_client(kubeconfig).configuration
    if getattr(cfg, "refresh_api_key_hook", None):
        cfg.refresh_api_key_hook(cfg)
    headers = {str(a["key"]): str(a["value"]) for a in cfg.auth_settings().values()
               if a.get("in") == "header" and a.get("value")}
    if cfg.username and cfg.password and "authorization" not in {k.lower() for k in headers}:
        headers["Authorization"] = cfg.get_basic_auth_token()
    verify: Any = (cfg.ssl_ca_cert or True) if cfg.verify_ssl else False
    cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file else None
    return _Target(cfg.host.rstrip("/") + _proxy_path(namespace, service, port, path), headers, verify, cert)


def parse_kube_proxy_url(url: str) -> tuple[str, str, str, str]:
    """`kube-proxy://<namespace>/<service>:<port>/path` -> (namespace, service, port, path)."""
    rest = url.removeprefix(KUBE_PROXY_SCHEME)
    namespace, _, remainder = rest.partition("/")
    service_port, slash, path = remainder.partition("/")
    service, _, port = service_port.partition(":")
    if not namespace or not service or not port:
        raise HealthCheckFailed(f"bad service proxy URL {url!r}: expected "
                                "kube-proxy://<namespace>/<service>:<port>/path", transient=False)
    return namespace, service, port, f"/{path}" if slash else "/"


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fetch_health(url: str, *, timeout: float = 5, kubeconfig: Path | str | None = None) -> tuple[int, str]:
    """One GET of a health URL (http(s):// or kube-proxy://): (status code, body), or (0, why) when
    nothing answered. For people and reports; the verdict is `probe_health`'s."""
    if url.startswith(KUBE_PROXY_SCHEME):
        ns, svc, port, path = parse_kube_proxy_url(url)
        target = _proxy_target(ns, svc, port, path, kubeconfig)
    else:
        target = _Target(url, {})
    try:
        with httpx.Client(headers={**target.headers, "Accept": "application/json"}, verify=_tls_context(target),
                          timeout=timeout, follow_redirects=True) as http:
            resp = http.get(target.url)
            return resp.status_code, redact(resp.text)
    except httpx.HTTPError as e:
        return 0, redact(f"{type(e).__name__}: {_shorten(str(e)) or 'no detail'}")


def probe_health(
    url: str,
    *,
    expect_version: str,
    successes: int = 3,
    interval: float = 0.5,
    confirm_interval: float = 0.1,
    timeout: float = 60,
    request_timeout: float = 3,
    headers: dict[str, str] | None = None,
    kubeconfig: Path | str | None = None,
) -> HealthAnswer:
    """GET `url` until it answers 200 with JSON `version == expect_version` `successes` times in a row.

    Anything else (another version, a 5xx, a refused connection) resets the count and is logged once
    per distinct answer; after `timeout` seconds HealthCheckFailed says what the last answer was.
    While the app is not answering the version yet it is asked every `interval`; once it does, the
    confirming answers come `confirm_interval` apart. By then the rollout is complete and the new
    pods are Ready, so the streak only has to show the answer is not a one-off (a flapping app, a
    Service still pointing at an old pod): a healthy app is verified in (successes - 1) x 0.1 s
    instead of a full second.
    """
    log = get_logger()
    if url.startswith(KUBE_PROXY_SCHEME):
        ns, svc, port, path = parse_kube_proxy_url(url)
        target = _proxy_target(ns, svc, port, path, kubeconfig)
    else:
        target = _Target(url, {})
    shown_url = redact(url)
    started = time.monotonic()
    deadline = started + timeout
    streak = 0
    last_answer = "no answer yet"
    logged: set[str] = set()
    with httpx.Client(headers={**target.headers, **(headers or {}), "Accept": "application/json"},
                      verify=_tls_context(target), timeout=request_timeout, follow_redirects=True) as http:
        while True:
            answer_text: str
            ok = False
            code = 0
            body: dict[str, Any] = {}
            version = ""
            try:
                resp = http.get(target.url)
                code = resp.status_code
                raw = resp.text
                try:
                    parsed = json.loads(raw)
                    body = parsed if isinstance(parsed, dict) else {"value": parsed}
                except ValueError:
                    body = {}
                version = str(body.get("version", "")) if body else ""
                ok = code == 200 and bool(body) and version == expect_version
                if ok:
                    answer_text = f"HTTP 200 version {version!r}"
                elif code == 200 and body:
                    answer_text = f"HTTP 200 version {version or 'missing'!r}: {_shorten(raw)}"
                else:
                    answer_text = f"HTTP {code}: {_shorten(raw) or '(empty body)'}"
            except httpx.HTTPError as e:
                answer_text = f"{type(e).__name__}: {_shorten(str(e)) or 'no detail'}"
            answer_text = redact(answer_text)
            elapsed = time.monotonic() - started
            if ok:
                streak += 1
                if streak >= successes:
                    log.info(f"{shown_url} answered version {expect_version!r} {streak} times in a row "
                             f"({elapsed:.1f} s)")
                    return HealthAnswer(shown_url, code, version, body, streak, elapsed)
            else:
                if streak:
                    log.info(f"{shown_url}: streak of {streak} broken")
                streak = 0
                if answer_text not in logged:
                    logged.add(answer_text)
                    log.info(f"{shown_url} ({elapsed:.1f} s): {answer_text}; waiting for version {expect_version!r}")
            last_answer = answer_text
            if time.monotonic() + interval > deadline:
                raise HealthCheckFailed(
                    f"{shown_url} did not answer version {expect_version!r} {successes} times in a row within "
                    f"{timeout:.0f} s; last answer: {last_answer}", transient=False)
            time.sleep(confirm_interval if ok else interval)


# ---------------------------------------------------------------------------------------------
# Prefect tasks


@task(name="wait-for-rollout", cache_policy=NO_CACHE)
def wait_for_rollout_task(deployment: str, namespace: str, timeout: float,
                          readiness_grace: float | None = None) -> dict[str, Any]:
    """With `readiness_grace`, the new pods are watched too and a release that cannot become ready
    fails within seconds (see `workload_failure`)."""
    failure = (FailureWatch(deployment, namespace, readiness_grace=readiness_grace)
               if readiness_grace is not None else None)
    return wait_for_rollout(deployment, namespace, timeout=timeout, failure=failure)


@task(name="probe-health", cache_policy=NO_CACHE)
def probe_health_task(url: str, expect_version: str, successes: int = 3, interval: float = 0.5,
                      timeout: float = 60, request_timeout: float = 3, confirm_interval: float = 0.1) -> HealthAnswer:
    """No retries: the probe already retries within its timeout; a wrong version is a verdict, not a blip."""
    return probe_health(url, expect_version=expect_version, successes=successes, interval=interval,
                        confirm_interval=confirm_interval, timeout=timeout, request_timeout=request_timeout)


__all__ = [
    "FailureWatch", "HealthAnswer", "PodFailure", "fetch_health", "new_replica_set", "parse_kube_proxy_url",
    "pod_failure", "probe_health", "probe_health_task", "rollout_verdict", "wait_for_rollout",
    "wait_for_rollout_task", "workload_failure",
]
