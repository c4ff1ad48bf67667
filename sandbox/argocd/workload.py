"""What Kubernetes does below Argo CD, for one Deployment: the Deployment controller and kubelet
(pull the image, run it as a container, probe readiness, restart a crashed container with back-off,
roll over with maxUnavailable 0, write `DeploymentStatus`, the ReplicaSets and the Pods), and the
Service (a stable port that forwards to the ready container).

One container stands for all replicas (one Pod object for it); the Deployment status reports the
counts a Deployment with N replicas would show. As on a real cluster, a release that cannot pull its
image, crashes or never becomes ready keeps the Deployment Progressing until its
progressDeadlineSeconds pass; what says so at once is the Pod's container status
(ImagePullBackOff, CrashLoopBackOff with its restart count), which the pipeline's fail-fast reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from kubernetes import watch as k8s_watch
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from delivery.redact import redact
from sandbox.argocd.model import (
    CRASHED,
    CREATED,
    EXITED,
    FAILED,
    PULL_ERROR,
    REVISION_ANNOTATION,
    ROLLING,
    RUNNING,
    STEADY,
    UNAVAILABLE,
    ContainerState,
    LiveSpec,
    crash_back_off,
    deployment_status,
    live_spec,
    now_iso,
    pod_manifest,
    pod_status,
    replica_set_manifest,
    replica_set_name,
)

log = logging.getLogger("sandbox.argocd")

LABEL = "delivery.sandbox"
# Connections already open to the old container get this long to finish before it is removed.
DRAIN_SECONDS = 1.0


# --- the Service: a stable port -----------------------------------------------------------------


class Proxy:
    """Forwards each new connection on 127.0.0.1:`port` to the current backend port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.backend: int | None = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self.backend
        if backend is None:
            # A Service without ready endpoints: the connection is refused.
            writer.close()
            return
        try:
            b_reader, b_writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", backend), 5)
        except (OSError, TimeoutError):
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                pass

        try:
            await asyncio.gather(pump(reader, b_writer), pump(b_reader, writer))
        finally:
            for w in (writer, b_writer):
                with contextlib.suppress(Exception):
                    w.close()


class ProxyHub:
    """One event loop thread serving every application's stable port."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self._thread.start()
        self._proxies: dict[int, Proxy] = {}

    def open(self, port: int) -> Proxy:
        if port in self._proxies:
            return self._proxies[port]
        proxy = Proxy(port)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
        self._proxies[port] = proxy
        return proxy

    def close(self, port: int) -> None:
        proxy = self._proxies.pop(port, None)
        if proxy is not None:
            asyncio.run_coroutine_threadsafe(proxy.stop(), self.loop).result(10)

    def shutdown(self) -> None:
        for port in list(self._proxies):
            with contextlib.suppress(Exception):
                self.close(port)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# --- containers -----------------------------------------------------------------------------------


class PullFailed(Exception):
    pass


def split_image(image: str) -> tuple[str, str]:
    """`host:5000/repo:tag` -> (`host:5000/repo`, `tag`); a missing tag is `latest`."""
    name, _, digest = image.partition("@")
    if digest:
        return name, digest
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, "latest"


def has_registry_host(image: str) -> bool:
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")


def probe(host_port: int | None, path: str, timeout: float = 2.0) -> bool:
    """The readiness probe: HTTP GET answering 2xx/3xx, as the kubelet counts it."""
    return probe_detail(host_port, path, timeout)[0]


def probe_detail(host_port: int | None, path: str, timeout: float = 2.0) -> tuple[bool, str]:
    """The readiness probe and, when it fails, the kubelet's words for why."""
    if not host_port:
        return False, "Readiness probe failed: no port is published yet"
    url = f"http://127.0.0.1:{host_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
            ok = 200 <= r.status < 400
            return ok, "" if ok else f"Readiness probe failed: HTTP probe failed with statuscode: {r.status}"
    except urllib.error.HTTPError as e:
        return False, f"Readiness probe failed: HTTP probe failed with statuscode: {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return False, f'Readiness probe failed: Get "{url}": {getattr(e, "reason", e)}'


@dataclass
class Pod:
    """One emulated pod: a container in the engine (none yet while its image is pulled) and the Pod
    object the kubelet would keep up to date for it."""

    container_id: str
    name: str
    image: str
    host_port: int | None
    pod_name: str = ""
    replica_set: dict[str, Any] | None = None
    c: ContainerState = field(default_factory=ContainerState)
    created: str = ""
    written: Any = None
    next_restart: float = 0.0
    unhealthy: int = 0
    unhealthy_at: float = 0.0


def _safe(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", text).strip("-.") or "x"


class Workload(threading.Thread):
    """The Deployment controller and kubelet for one Application's Deployment, on a 1 s loop (woken at
    once by `poke()` when Argo CD applies a change). Besides the Deployment's status it writes what a
    real cluster writes below it, and what the pipeline's fail-fast reads: a ReplicaSet per template
    with the revision annotation, and a Pod per container with the kubelet's container statuses
    (ContainerCreating, ErrImagePull/ImagePullBackOff, CrashLoopBackOff with restart counts)."""

    def __init__(self, *, app: str, namespace: str, name: str, api_client: ApiClient, root: str, port: int,
                 hub: ProxyHub, notify: Callable[[], None], revision_of: Callable[[str], str]) -> None:
        super().__init__(name=f"workload-{app}", daemon=True)
        self.app, self.namespace, self.deploy_name = app, namespace, name
        self.root, self.port = root, port
        self.api = CustomObjectsApi(api_client)
        self.core = CoreV1Api(api_client)
        self.docker = docker.from_env(timeout=120)
        self.hub = hub
        self.proxy: Proxy | None = None
        self.notify = notify
        self.revision_of = revision_of
        self.current: Pod | None = None
        self.failed_pod: Pod | None = None
        self.failed_key: tuple[str, int] | None = None
        # Why the newest pod is not running, as `kubectl get pod` would say (reason, message).
        self.pod_problem: dict[str, str] | None = None
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._status_key: Any = None
        # The (image, generation) whose ReplicaSet carries the Deployment's current revision.
        self._revision_for: tuple[str, int] | None = None

    # -- thread plumbing ------------------------------------------------------------------------

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        try:
            self.proxy = self.hub.open(self.port)
        except OSError as e:
            log.error("app %s: cannot listen on 127.0.0.1:%s: %s", self.app, self.port, e)
        try:
            self._adopt()
        except Exception:
            log.exception("app %s: adopting containers failed", self.app)
        threading.Thread(target=self._watch_deployment, name=f"watch-{self.app}", daemon=True).start()
        while not self._halt.is_set():
            try:
                self._step()
            except Exception:
                log.exception("app %s: deployment controller step failed", self.app)
            self._wake.wait(1.0)
            self._wake.clear()

    def _watch_deployment(self) -> None:
        """Wake the controller on every change of the Deployment, as the real controller-manager's
        informer does: a spec changed by hand is rolled out at once, not at the next 1 s poll (a
        drift healed within that second would otherwise never have been rolled out at all)."""
        while not self._halt.is_set():
            w = k8s_watch.Watch()
            try:
                for _event in w.stream(self.api.list_namespaced_custom_object, "apps", "v1", self.namespace,
                                       "deployments", field_selector=f"metadata.name={self.deploy_name}",
                                       timeout_seconds=30, _request_timeout=(5, 40)):
                    if self._halt.is_set():
                        break
                    self.poke()
            except Exception:  # noqa: BLE001 - a dropped stream is re-opened; the 1 s poll still runs
                self._halt.wait(0.5)
            finally:
                w.stop()

    # -- Kubernetes I/O -------------------------------------------------------------------------

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object("apps", "v1", self.namespace, "deployments", self.deploy_name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _write_status(self, dep: dict[str, Any], spec: LiveSpec, phase: str, image: str, old_ready: bool) -> None:
        previous = dep.get("status") or {}
        status = deployment_status(phase=phase, replicas=spec.replicas, observed_generation=spec.generation,
                                   new_rs=replica_set_name(self.deploy_name, image), old_ready=old_ready,
                                   previous=previous)
        if _strip_times(status) == _strip_times(previous):
            return
        # A merge patch keeps keys it does not name: a count that dropped to zero (omitted, as the API
        # server omits zeros) must be removed explicitly, or a stale unavailableReplicas lingers.
        body = {"status": {**{k: None for k in previous if k not in status}, **status}}
        try:
            self.api.patch_namespaced_custom_object_status("apps", "v1", self.namespace, "deployments",
                                                           self.deploy_name, body)
        except ApiException as e:
            if e.status != 404:
                raise
        self.notify()

    def _replica_sets(self, spec: LiveSpec) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in spec.selector) or None
        body = self.api.list_namespaced_custom_object("apps", "v1", self.namespace, "replicasets",
                                                      label_selector=selector)
        return list(body.get("items") or [])

    def _ensure_replica_set(self, dep: dict[str, Any], spec: LiveSpec) -> dict[str, Any]:
        """The template's ReplicaSet at the Deployment's newest revision, as the controller keeps it: a
        new template gets revision max+1, and so does an old one rolled out again (a rollback)."""
        name = replica_set_name(self.deploy_name, spec.image)
        uid = (dep.get("metadata") or {}).get("uid")
        owned = [rs for rs in self._replica_sets(spec)
                 if any(o.get("uid") == uid for o in (rs.get("metadata") or {}).get("ownerReferences") or [])]
        revisions = {(rs["metadata"]["name"]): int(((rs["metadata"].get("annotations") or {})
                                                    .get(REVISION_ANNOTATION)) or 0) for rs in owned}
        top = max(revisions.values(), default=0)
        mine = next((rs for rs in owned if rs["metadata"]["name"] == name), None)
        dep_revision = ((dep.get("metadata") or {}).get("annotations") or {}).get(REVISION_ANNOTATION)
        if mine is not None and revisions[name] == top and dep_revision == str(top):
            self._revision_for = (spec.image, spec.generation)
            return mine
        revision = top if mine is not None and revisions[name] == top else top + 1
        manifest = replica_set_manifest(dep, spec, revision=revision, replicas=spec.replicas)
        if mine is None:
            with contextlib.suppress(ApiException):
                # A stale one not owned by this Deployment (an earlier Deployment of the same name).
                self.api.delete_namespaced_custom_object("apps", "v1", self.namespace, "replicasets", name)
            mine = self.api.create_namespaced_custom_object("apps", "v1", self.namespace, "replicasets", manifest)
        else:
            mine = self.api.patch_namespaced_custom_object(
                "apps", "v1", self.namespace, "replicasets", name,
                {"metadata": {"annotations": {REVISION_ANNOTATION: str(revision)}},
                 "spec": {"replicas": spec.replicas}})
        self.api.patch_namespaced_custom_object("apps", "v1", self.namespace, "deployments", self.deploy_name,
                                                {"metadata": {"annotations": {REVISION_ANNOTATION: str(revision)}}})
        self._revision_for = (spec.image, spec.generation)
        return mine

    def _has_replica_set(self, spec: LiveSpec) -> bool:
        name = replica_set_name(self.deploy_name, spec.image)
        return any(rs["metadata"]["name"] == name for rs in self._replica_sets(spec))

    def _scale_down_others(self, spec: LiveSpec) -> None:
        keep = replica_set_name(self.deploy_name, spec.image)
        old = []
        for rs in self._replica_sets(spec):
            name = rs["metadata"]["name"]
            if name == keep:
                continue
            old.append(rs)
            if (rs.get("spec") or {}).get("replicas"):
                with contextlib.suppress(ApiException):
                    self.api.patch_namespaced_custom_object("apps", "v1", self.namespace, "replicasets", name,
                                                            {"spec": {"replicas": 0}})
        self._clean_up_old(old)

    def _clean_up_old(self, old: list[dict[str, Any]]) -> None:
        """The Deployment controller's cleanup: of the old ReplicaSets (all scaled to zero by now) only
        the newest `revisionHistoryLimit` stay, oldest revision deleted first. Without it every release
        ever rolled out stays in the API (a leak the 200-deploy soak found: one ReplicaSet per deploy)."""
        dep = self._read()
        if dep is None:
            return
        limit = (dep.get("spec") or {}).get("revisionHistoryLimit")
        limit = 10 if limit is None else max(0, int(limit))  # apps/v1's default
        uid = (dep.get("metadata") or {}).get("uid")
        owned = [rs for rs in old if any(o.get("uid") == uid for o in rs["metadata"].get("ownerReferences") or [])]
        owned.sort(key=lambda rs: int((rs["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION) or 0))
        for rs in owned[:max(0, len(owned) - limit)]:
            with contextlib.suppress(ApiException):
                self.api.delete_namespaced_custom_object("apps", "v1", self.namespace, "replicasets",
                                                         rs["metadata"]["name"])

    def _new_pod(self, rs: dict[str, Any], spec: LiveSpec) -> Pod:
        pod_name = f"{rs['metadata']['name']}-{secrets.token_hex(3)[:5]}"
        pod = Pod("", _safe(f"{self.root}-{pod_name}"), spec.image, None, pod_name=pod_name, replica_set=rs,
                  created=now_iso())
        try:
            self.core.create_namespaced_pod(self.namespace, pod_manifest(pod_name, rs, spec), _preload_content=False)
        except ApiException as e:
            log.warning("app %s: creating pod %s failed: %s", self.app, pod_name, e.status)
        self._write_pod(pod, spec)
        return pod

    def _set(self, pod: Pod, spec: LiveSpec, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(pod.c, k, v)
        self._write_pod(pod, spec)

    def _write_pod(self, pod: Pod, spec: LiveSpec) -> None:
        """The kubelet's status update, only when something changed."""
        if not pod.pod_name:
            return
        key = dataclasses.astuple(pod.c)
        if key == pod.written:
            return
        body = pod_manifest(pod.pod_name, pod.replica_set or {"metadata": {"namespace": self.namespace}}, spec)
        body["status"] = pod_status(spec, pod.c, created=pod.created or now_iso())
        try:
            self.core.replace_namespaced_pod_status(pod.pod_name, self.namespace, body, _preload_content=False)
            pod.written = key
        except ApiException as e:
            if e.status != 404:
                log.warning("app %s: pod %s status write failed: %s", self.app, pod.pod_name, e.status)

    def _readiness_event(self, pod: Pod, container: str, message: str) -> None:
        """The kubelet's `Unhealthy` Warning event, counted, at most every 5 s per pod."""
        if time.monotonic() - pod.unhealthy_at < 5.0:
            return
        pod.unhealthy_at = time.monotonic()
        pod.unhealthy += 1
        ts = now_iso()
        name = f"{pod.pod_name}.readiness"
        body = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": self.namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.pod_name,
                                   "namespace": self.namespace, "fieldPath": f"spec.containers{{{container}}}"},
                "reason": "Unhealthy", "message": message, "type": "Warning", "count": pod.unhealthy,
                "firstTimestamp": ts, "lastTimestamp": ts, "source": {"component": "kubelet", "host": "sandbox"}}
        try:
            if pod.unhealthy == 1:
                self.core.create_namespaced_event(self.namespace, body, _preload_content=False)
            else:
                self.core.patch_namespaced_event(name, self.namespace, {"message": message, "count": pod.unhealthy,
                                                                        "lastTimestamp": ts}, _preload_content=False)
        except ApiException:
            pass

    def _delete_pod_object(self, pod_name: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(pod_name, self.namespace, _preload_content=False)
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_event(f"{pod_name}.readiness", self.namespace, _preload_content=False)

    def _cascade(self) -> None:
        """The Deployment is gone: so are its ReplicaSets and their pods (garbage collection)."""
        for kind, call in (("pods", self.core.list_namespaced_pod), ("replicasets", None)):
            try:
                if call is not None:
                    items = json.loads(call(self.namespace, _preload_content=False).data).get("items") or []
                else:
                    items = self.api.list_namespaced_custom_object("apps", "v1", self.namespace,
                                                                   "replicasets").get("items") or []
            except ApiException:
                continue
            for obj in items:
                meta = obj.get("metadata") or {}
                if not meta.get("name", "").startswith(f"{self.deploy_name}-"):
                    continue
                with contextlib.suppress(ApiException):
                    if kind == "pods":
                        self._delete_pod_object(meta["name"])
                    else:
                        self.api.delete_namespaced_custom_object("apps", "v1", self.namespace, kind, meta["name"])

    # -- docker I/O -----------------------------------------------------------------------------

    def _labels(self, image: str, pod_name: str = "") -> dict[str, str]:
        _, tag = split_image(image)
        return {f"{LABEL}/managed": "true", f"{LABEL}/root": self.root, f"{LABEL}/application": self.app,
                f"{LABEL}/revision": self.revision_of(image), f"{LABEL}/tag": tag, f"{LABEL}/image": image,
                f"{LABEL}/namespace": self.namespace, f"{LABEL}/deployment": self.deploy_name,
                f"{LABEL}/pod": pod_name}

    def _pull(self, image: str) -> None:
        repo, tag = split_image(image)
        try:
            self.docker.images.pull(repo, tag=tag)
            return
        except (APIError, ImageNotFound) as e:
            err = redact(str(getattr(e, "explanation", None) or e))
        if not has_registry_host(image):
            # A node-local image (the sandbox's base image) needs no registry.
            try:
                self.docker.images.get(image)
                return
            except ImageNotFound:
                pass
        raise PullFailed(f'failed to pull and unpack image "{image}": {err}')

    def _start(self, pod: Pod, spec: LiveSpec) -> None:
        c = self.docker.containers.run(
            spec.image, detach=True, name=pod.name, labels=self._labels(spec.image, pod.pod_name),
            ports={f"{spec.container_port}/tcp": ("127.0.0.1", None)},
            environment={"PORT": str(spec.container_port)})
        pod.container_id = c.id
        pod.host_port = self._host_port(c.id, spec.container_port)

    def _host_port(self, cid: str, container_port: int) -> int | None:
        for _ in range(20):
            try:
                c = self.docker.containers.get(cid)
            except NotFound:
                return None
            bindings = (c.attrs.get("NetworkSettings") or {}).get("Ports") or {}
            for key, value in bindings.items():
                if key.startswith(f"{container_port}/") and value:
                    return int(value[0]["HostPort"])
            if c.status != "running" and c.status != "created":
                return None
            time.sleep(0.1)
        return None

    def _state(self, pod: Pod) -> tuple[str, int]:
        if not pod.container_id:
            return "missing", -1
        try:
            c = self.docker.containers.get(pod.container_id)
        except NotFound:
            return "missing", -1
        return c.status, int((c.attrs.get("State") or {}).get("ExitCode") or 0)

    def _remove(self, pod: Pod | None) -> None:
        if pod is None:
            return
        if pod.container_id:
            try:
                self.docker.containers.get(pod.container_id).remove(force=True)
            except NotFound:
                pass
            except DockerException as e:
                log.warning("app %s: removing container %s failed: %s", self.app, pod.name, e)
        if pod.pod_name:
            self._delete_pod_object(pod.pod_name)

    def _adopt(self) -> None:
        """Take over this app's containers from an earlier run, so a restart causes no downtime."""
        found = self.docker.containers.list(all=True, filters={"label": [
            f"{LABEL}/root={self.root}", f"{LABEL}/application={self.app}"]})
        if not found:
            return
        dep = self._read()
        spec = live_spec(dep) if dep else None
        want = spec.image if spec else None
        found.sort(key=lambda c: (c.labels.get(f"{LABEL}/image") == want, c.attrs.get("Created", "")), reverse=True)
        keep: Pod | None = None
        for c in found:
            pod_name = c.labels.get(f"{LABEL}/pod") or ""
            if keep is None and c.status == "running":
                image = c.labels.get(f"{LABEL}/image") or ""
                port = spec.container_port if spec else 8000
                pod = Pod(c.id, c.name, image, self._host_port(c.id, port), pod_name=pod_name, created=now_iso())
                if probe(pod.host_port, spec.readiness_path if spec else "/"):
                    keep = pod
                    continue
            self._remove(Pod(c.id, c.name, "", None, pod_name=pod_name))
        if keep is not None:
            self.current = keep
            if self.proxy is not None:
                self.proxy.backend = keep.host_port
            if dep is not None and spec is not None and keep.image == spec.image and keep.pod_name:
                keep.replica_set = self._ensure_replica_set(dep, spec)
                self._set(keep, spec, state=RUNNING, ready=True, started_at=now_iso())
            log.info("app %s: adopted container %s (%s)", self.app, keep.name, keep.image)

    def teardown(self) -> None:
        """Cascade delete: the Deployment is gone, so are its pods."""
        self.stop()
        self.join(10)
        for pod in (self.current, self.failed_pod):
            self._remove(pod)
        self.current = self.failed_pod = None
        self.hub.close(self.port)

    # -- the controller -------------------------------------------------------------------------

    def _step(self) -> None:
        dep = self._read()
        if dep is None:
            if self.current or self.failed_pod:
                self._remove(self.current)
                self._remove(self.failed_pod)
                self.current = self.failed_pod = None
                if self.proxy:
                    self.proxy.backend = None
                self._cascade()
                self._revision_for = None
                self.notify()
            return
        spec = live_spec(dep)
        if spec is None:
            return
        if self.current is not None and spec.image == self.current.image:
            if self._revision_for != (spec.image, spec.generation):
                # Rolled back to what still runs: its ReplicaSet becomes the newest revision again.
                self.current.replica_set = self._ensure_replica_set(dep, spec)
            if self.failed_pod is not None:
                # ...and the failed ReplicaSet is scaled away.
                self._remove(self.failed_pod)
                self._scale_down_others(spec)
                self.failed_pod, self.failed_key, self.pod_problem = None, None, None
            self._keep_running(dep, spec)
            return
        if self.failed_key == (spec.image, spec.generation):
            self._write_status(dep, spec, FAILED, spec.image, self._old_ready(spec))
            return
        self._rollout(dep, spec)

    def _old_ready(self, spec: LiveSpec) -> bool:
        return self.current is not None and self._state(self.current)[0] == "running"

    def _crashed(self, pod: Pod, spec: LiveSpec, code: int) -> None:
        """The container exited: the kubelet restarts it at once the first time (the status shows it
        terminated meanwhile), then backs off (CrashLoopBackOff, 10 s doubling)."""
        failures = pod.c.restarts + 1
        back_off = crash_back_off(failures)
        pod.next_restart = time.monotonic() + back_off
        self.pod_problem = {"reason": "CrashLoopBackOff" if back_off else "Error",
                            "message": f"back-off {back_off:.0f}s restarting failed container={spec.container_name} "
                                       f"pod={pod.pod_name} (exit code {code})"}
        if back_off:
            self._set(pod, spec, state=CRASHED, ready=False, last_exit=code, last_started=pod.c.started_at,
                      last_finished=now_iso(), message=f"back-off {back_off:.0f}s restarting failed container="
                                                       f"{spec.container_name} pod={pod.pod_name}_{self.namespace}")
        else:
            self._set(pod, spec, state=EXITED, ready=False, last_exit=code, last_started=pod.c.started_at,
                      last_finished=now_iso(), message="")

    def _restart_if_due(self, pod: Pod, spec: LiveSpec) -> None:
        if pod.c.state not in (CRASHED, EXITED) or time.monotonic() < pod.next_restart:
            return
        with contextlib.suppress(DockerException):
            self.docker.containers.get(pod.container_id).start()
            pod.host_port = self._host_port(pod.container_id, spec.container_port)
            self._set(pod, spec, state=RUNNING, ready=False, started_at=now_iso(), message="",
                      restarts=pod.c.restarts + 1)

    def _keep_running(self, dep: dict[str, Any], spec: LiveSpec) -> None:
        assert self.current is not None
        pod = self.current
        state, code = self._state(pod)
        if state == "running":
            if pod.c.state == RUNNING:
                phase = STEADY
                self.pod_problem = None
                if not pod.c.ready and probe(pod.host_port, spec.readiness_path, timeout=1.0):
                    self._set(pod, spec, ready=True)
                    if self.proxy:
                        self.proxy.backend = pod.host_port
            else:
                phase = UNAVAILABLE
        else:
            phase = UNAVAILABLE
            if pod.c.state == RUNNING and state != "missing":
                self._crashed(pod, spec, code)
            if state != "missing":
                self._restart_if_due(pod, spec)
                if self.proxy and pod.c.state == RUNNING:
                    self.proxy.backend = pod.host_port
        self._write_status(dep, spec, phase if pod.c.ready or phase == UNAVAILABLE else UNAVAILABLE,
                           spec.image, False)

    def _spec_moved(self, spec: LiveSpec) -> bool:
        dep = self._read()
        now = live_spec(dep) if dep else None
        return now is None or now.image != spec.image

    def _fail(self, dep: dict[str, Any], spec: LiveSpec, reason: str, message: str, old_ready: bool) -> None:
        self.pod_problem = {"reason": reason, "message": message}
        self.failed_key = (spec.image, spec.generation)
        log.warning("app %s: rollout of %s failed: %s: %s", self.app, spec.image, reason, message)
        self._write_status(self._read() or dep, spec, FAILED, spec.image, old_ready)

    def _pause(self, spec: LiveSpec, seconds: float, deadline: float) -> str:
        """Sleep up to `seconds`, returning early with "halt", "moved" (a new spec to roll out) or
        "deadline" (the progress deadline passed); "" when the time is up."""
        until = min(time.monotonic() + seconds, deadline)
        checked = time.monotonic()
        while time.monotonic() < until:
            if self._halt.is_set():
                return "halt"
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if self._spec_moved(spec):
                    return "moved"
            time.sleep(0.3)
        return "deadline" if time.monotonic() >= deadline else ""

    def _abandon(self, why: str, pod: Pod, dep: dict[str, Any], spec: LiveSpec, old_ready: bool) -> None:
        if why == "moved":
            log.info("app %s: %s superseded before it was ready", self.app, spec.image)
            self._remove(pod)
        elif why == "deadline":
            self.failed_pod = pod
            problem = self.pod_problem or {}
            self._fail(dep, spec, "ProgressDeadlineExceeded",
                       (f"{problem['reason']}: {problem['message']}; " if problem else "")
                       + f"no progress within {spec.progress_deadline} s", old_ready)
        # "halt": the next run adopts or replaces it

    def _rollout(self, dep: dict[str, Any], spec: LiveSpec) -> None:
        log.info("app %s: rolling out %s (generation %s)", self.app, spec.image, spec.generation)
        self._remove(self.failed_pod)
        self.failed_pod, self.failed_key, self.pod_problem = None, None, None
        old = self.current
        old_ready = self._old_ready(spec)
        existed = self._has_replica_set(spec)
        rs = self._ensure_replica_set(dep, spec)
        if not existed:
            # Rolling back to a template whose ReplicaSet still exists scales that one up: no
            # NewReplicaSetCreated then (as seen on the real tier).
            self._write_status(dep, spec, CREATED, spec.image, old_ready)
        # Progress is judged against the Deployment's own progressDeadlineSeconds, as the controller
        # does: a release that cannot start is reported by its pod's status long before that.
        deadline = time.monotonic() + spec.progress_deadline
        pod = self._new_pod(rs, spec)
        self._write_status(self._read() or dep, spec, ROLLING, spec.image, old_ready)
        pulls = 0
        while True:
            try:
                self._pull(spec.image)
                break
            except PullFailed as e:
                pulls += 1
                err = str(e)
                self.pod_problem = {"reason": "ImagePullBackOff", "message": err}
                self._set(pod, spec, state=PULL_ERROR, reason="ErrImagePull", message=err)
                why = self._pause(spec, 1.0, deadline)
                if not why:
                    self._set(pod, spec, reason="ImagePullBackOff",
                              message=f'Back-off pulling image "{spec.image}": ErrImagePull: {err}')
                    why = self._pause(spec, crash_back_off(pulls), deadline)
                if why:
                    self._abandon(why, pod, dep, spec, old_ready)
                    return
        if self._spec_moved(spec):
            self._remove(pod)
            return
        try:
            self._start(pod, spec)
        except DockerException as e:
            message = redact(str(e))[:300]
            self.pod_problem = {"reason": "CreateContainerError", "message": message}
            self._set(pod, spec, state=PULL_ERROR, reason="CreateContainerError", message=message)
            self._abandon(self._pause(spec, float(spec.progress_deadline), deadline) or "deadline",
                          pod, dep, spec, old_ready)
            return
        self._set(pod, spec, state=RUNNING, started_at=now_iso())
        checked = time.monotonic()
        while True:
            if self._halt.is_set():
                return  # the next run adopts or replaces it
            state, code = self._state(pod)
            if state in ("running", "created", "restarting"):
                if pod.c.state == RUNNING:
                    ok, detail = probe_detail(pod.host_port, spec.readiness_path, timeout=1.0)
                    if ok:
                        break
                    self._readiness_event(pod, spec.container_name, detail)
            else:
                if pod.c.state == RUNNING:
                    self._crashed(pod, spec, code)
                self._restart_if_due(pod, spec)
            if time.monotonic() > deadline:
                self._abandon("deadline", pod, dep, spec, old_ready)
                return
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if self._spec_moved(spec):
                    self._abandon("moved", pod, dep, spec, old_ready)
                    return
            # The kubelet probes on the chart's period (5 s); the emulator looks more often so that a
            # sandbox deploy is not timed by its polling.
            time.sleep(0.1)
        # Ready: the Service sends new connections to it, the old pod drains and goes away.
        self.pod_problem = None
        self._set(pod, spec, ready=True)
        if self.proxy is not None:
            self.proxy.backend = pod.host_port
        self.current = pod
        # As the real controllers do: the old pod is deleted (Terminating) and its ReplicaSet scaled to
        # 0 at once, and the Deployment's status counts it gone then; the drain of its open
        # connections (terminationGracePeriodSeconds) delays no status.
        if old is not None and old.pod_name:
            self._delete_pod_object(old.pod_name)
        self._scale_down_others(spec)
        log.info("app %s: %s is ready on 127.0.0.1:%s", self.app, spec.image, self.port)
        fresh = self._read()
        if fresh is not None:
            fresh_spec = live_spec(fresh)
            if fresh_spec is not None and fresh_spec.image == spec.image:
                self._write_status(fresh, fresh_spec, STEADY, spec.image, False)
        if old is not None:
            time.sleep(DRAIN_SECONDS)
            self._remove(old)


def _strip_times(status: dict[str, Any]) -> Any:
    conds = [{k: v for k, v in c.items() if not k.startswith("last")} for c in status.get("conditions") or []]
    return {**{k: v for k, v in status.items() if k != "conditions"}, "conditions": conds}
