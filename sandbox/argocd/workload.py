"""What Kubernetes does below Argo CD, for one Deployment: the Deployment controller and kubelet
(pull the image, run it as a container, probe readiness, roll over with maxUnavailable 0, write
`DeploymentStatus`), and the Service (a stable port that forwards to the ready container).

One container stands for all replicas; the status reports the counts a Deployment with N replicas
would show. A pod that cannot pull its image or crashes before it is ready fails the rollout at once
(Progressing=False, ProgressDeadlineExceeded) rather than after progressDeadlineSeconds of back-off,
so a broken release is reported in seconds; an image that stays unready fails at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from delivery.redact import redact
from sandbox.argocd.model import (
    FAILED,
    ROLLING,
    STEADY,
    UNAVAILABLE,
    LiveSpec,
    deployment_status,
    live_spec,
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
    if not host_port:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{host_port}{path}", timeout=timeout) as r:  # noqa: S310
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Pod:
    container_id: str
    name: str
    image: str
    host_port: int | None


def _safe(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", text).strip("-.") or "x"


class Workload(threading.Thread):
    """The Deployment controller for one Application's Deployment, on a 1 s loop (woken at once by
    `poke()` when Argo CD applies a change)."""

    def __init__(self, *, app: str, namespace: str, name: str, api_client: ApiClient, root: str, port: int,
                 hub: ProxyHub, notify: Callable[[], None], revision_of: Callable[[str], str],
                 progress_deadline: int | None = None) -> None:
        super().__init__(name=f"workload-{app}", daemon=True)
        self.app, self.namespace, self.deploy_name = app, namespace, name
        self.root, self.port = root, port
        self.api = CustomObjectsApi(api_client)
        self.docker = docker.from_env(timeout=120)
        self.hub = hub
        self.proxy: Proxy | None = None
        self.notify = notify
        self.revision_of = revision_of
        self.progress_deadline = progress_deadline
        self.current: Pod | None = None
        self.failed_pod: Pod | None = None
        self.failed_key: tuple[str, int] | None = None
        # Why the newest pod is not running, as `kubectl get pod` would say (reason, message).
        self.pod_problem: dict[str, str] | None = None
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._status_key: Any = None
        self._restart_at = 0.0

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
        while not self._halt.is_set():
            try:
                self._step()
            except Exception:
                log.exception("app %s: deployment controller step failed", self.app)
            self._wake.wait(1.0)
            self._wake.clear()

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
        body = {"status": status}
        try:
            self.api.patch_namespaced_custom_object_status("apps", "v1", self.namespace, "deployments",
                                                           self.deploy_name, body)
        except ApiException as e:
            if e.status != 404:
                raise
        self.notify()

    # -- docker I/O -----------------------------------------------------------------------------

    def _labels(self, image: str) -> dict[str, str]:
        _, tag = split_image(image)
        return {f"{LABEL}/managed": "true", f"{LABEL}/root": self.root, f"{LABEL}/application": self.app,
                f"{LABEL}/revision": self.revision_of(image), f"{LABEL}/tag": tag, f"{LABEL}/image": image,
                f"{LABEL}/namespace": self.namespace, f"{LABEL}/deployment": self.deploy_name}

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
        raise PullFailed(f'Back-off pulling image "{image}": ErrImagePull: {err}')

    def _start(self, spec: LiveSpec) -> Pod:
        rs = replica_set_name(self.deploy_name, spec.image)
        name = _safe(f"{self.root}-{rs}-{secrets.token_hex(3)}")
        c = self.docker.containers.run(
            spec.image, detach=True, name=name, labels=self._labels(spec.image),
            ports={f"{spec.container_port}/tcp": ("127.0.0.1", None)},
            environment={"PORT": str(spec.container_port)})
        return Pod(c.id, name, spec.image, self._host_port(c.id, spec.container_port))

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
        try:
            c = self.docker.containers.get(pod.container_id)
        except NotFound:
            return "missing", -1
        return c.status, int((c.attrs.get("State") or {}).get("ExitCode") or 0)

    def _remove(self, pod: Pod | None) -> None:
        if pod is None:
            return
        try:
            self.docker.containers.get(pod.container_id).remove(force=True)
        except NotFound:
            pass
        except DockerException as e:
            log.warning("app %s: removing container %s failed: %s", self.app, pod.name, e)

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
            if keep is None and c.status == "running":
                image = c.labels.get(f"{LABEL}/image") or ""
                port = spec.container_port if spec else 8000
                pod = Pod(c.id, c.name, image, self._host_port(c.id, port))
                if probe(pod.host_port, spec.readiness_path if spec else "/"):
                    keep = pod
                    continue
            self._remove(Pod(c.id, c.name, "", None))
        if keep is not None:
            self.current = keep
            if self.proxy is not None:
                self.proxy.backend = keep.host_port
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

    def _deadline(self, spec: LiveSpec) -> int:
        return self.progress_deadline or spec.progress_deadline

    def _step(self) -> None:
        dep = self._read()
        if dep is None:
            if self.current or self.failed_pod:
                self._remove(self.current)
                self._remove(self.failed_pod)
                self.current = self.failed_pod = None
                if self.proxy:
                    self.proxy.backend = None
                self.notify()
            return
        spec = live_spec(dep)
        if spec is None:
            return
        if self.current is not None and spec.image == self.current.image:
            if self.failed_pod is not None:
                # Rolled back to what still runs: the failed ReplicaSet is scaled away.
                self._remove(self.failed_pod)
                self.failed_pod, self.failed_key, self.pod_problem = None, None, None
            self._keep_running(dep, spec)
            return
        if self.failed_key == (spec.image, spec.generation):
            self._write_status(dep, spec, FAILED, spec.image, self._old_ready(spec))
            return
        self._rollout(dep, spec)

    def _old_ready(self, spec: LiveSpec) -> bool:
        return self.current is not None and self._state(self.current)[0] == "running"

    def _keep_running(self, dep: dict[str, Any], spec: LiveSpec) -> None:
        assert self.current is not None
        state, code = self._state(self.current)
        if state == "running":
            phase = STEADY
            self.pod_problem = None
        else:
            phase = UNAVAILABLE
            self.pod_problem = {"reason": "CrashLoopBackOff",
                                "message": f"back-off restarting failed container (exit code {code})"}
            # The kubelet restarts a dead container (restartPolicy Always), with back-off.
            if state != "missing" and time.monotonic() >= self._restart_at:
                self._restart_at = time.monotonic() + 10
                with contextlib.suppress(DockerException):
                    self.docker.containers.get(self.current.container_id).start()
                    self.current.host_port = self._host_port(self.current.container_id, spec.container_port)
                    if self.proxy:
                        self.proxy.backend = self.current.host_port
        self._write_status(dep, spec, phase, spec.image, False)

    def _spec_moved(self, spec: LiveSpec) -> bool:
        dep = self._read()
        now = live_spec(dep) if dep else None
        return now is None or now.image != spec.image

    def _fail(self, dep: dict[str, Any], spec: LiveSpec, reason: str, message: str, old_ready: bool) -> None:
        self.pod_problem = {"reason": reason, "message": message}
        self.failed_key = (spec.image, spec.generation)
        log.warning("app %s: rollout of %s failed: %s: %s", self.app, spec.image, reason, message)
        self._write_status(self._read() or dep, spec, FAILED, spec.image, old_ready)

    def _rollout(self, dep: dict[str, Any], spec: LiveSpec) -> None:
        log.info("app %s: rolling out %s (generation %s)", self.app, spec.image, spec.generation)
        self._remove(self.failed_pod)
        self.failed_pod, self.failed_key, self.pod_problem = None, None, None
        old = self.current
        old_ready = self._old_ready(spec)
        self._write_status(dep, spec, ROLLING, spec.image, old_ready)
        started = time.monotonic()
        try:
            self._pull(spec.image)
        except PullFailed as e:
            self._fail(dep, spec, "ImagePullBackOff", str(e), old_ready)
            return
        if self._spec_moved(spec):
            return
        try:
            pod = self._start(spec)
        except DockerException as e:
            self._fail(dep, spec, "CreateContainerError", redact(str(e)), old_ready)
            return
        deadline = started + self._deadline(spec)
        checked = time.monotonic()
        while True:
            if self._halt.is_set():
                return  # the next run adopts or replaces it
            state, code = self._state(pod)
            if state not in ("running", "created", "restarting"):
                self.failed_pod = pod
                self._fail(dep, spec, "CrashLoopBackOff",
                           f"back-off restarting failed container {pod.name}: exit code {code}", old_ready)
                return
            if probe(pod.host_port, spec.readiness_path, timeout=1.0):
                break
            if time.monotonic() > deadline:
                self.failed_pod = pod
                self._fail(dep, spec, "ProgressDeadlineExceeded",
                           f"Readiness probe failed: GET {spec.readiness_path} did not succeed within "
                           f"{self._deadline(spec)} s", old_ready)
                return
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if self._spec_moved(spec):
                    log.info("app %s: %s superseded before it was ready", self.app, spec.image)
                    self._remove(pod)
                    return
            time.sleep(0.3)
        # Ready: the Service sends new connections to it, the old pod drains and goes away.
        if self.proxy is not None:
            self.proxy.backend = pod.host_port
        self.current = pod
        if old is not None:
            time.sleep(DRAIN_SECONDS)
            self._remove(old)
        log.info("app %s: %s is ready on 127.0.0.1:%s", self.app, spec.image, self.port)
        fresh = self._read()
        if fresh is not None:
            fresh_spec = live_spec(fresh)
            if fresh_spec is not None and fresh_spec.image == spec.image:
                self._write_status(fresh, fresh_spec, STEADY, spec.image, False)


def _strip_times(status: dict[str, Any]) -> Any:
    conds = [{k: v for k, v in c.items() if not k.startswith("last")} for c in status.get("conditions") or []]
    return {**{k: v for k, v in status.items() if k != "conditions"}, "conditions": conds}
