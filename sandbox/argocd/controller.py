"""The application controller: watch `Application` objects, compare Git with the live Deployment,
sync (automatically or on a requested operation), self-heal, and write Application status the way
Argo CD does. Talks to the API only through the `kubernetes` client and a kubeconfig.

Refresh levels follow Argo CD: a change of a managed resource only re-assesses health (or compares
with the last resolved revision when its spec drifted); Git is asked again only when the refresh
interval expires, the refresh annotation appears, the spec changes or an operation is requested.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from delivery.redact import redact
from sandbox.argocd import model
from sandbox.argocd.gitsource import GitSource, render
from sandbox.argocd.model import ComparisonError, Desired
from sandbox.argocd.workload import ProxyHub, Workload

log = logging.getLogger("sandbox.argocd")

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "applications"

# Refresh levels (Argo CD's CompareWith*).
HEALTH, RECENT, LATEST, HARD = 1, 2, 3, 4


def stable_port(name: str) -> int:
    return 20000 + zlib.crc32(name.encode()) % 10000


def load_ports(path: Path | None) -> dict[str, int]:
    if path is None or not path.exists():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text() or "{}").items()}
    except (ValueError, OSError) as e:
        log.warning("ports file %s unreadable: %s", path, e)
        return {}


def api_client(kubeconfig: Path) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(kubeconfig))


class AppWorker(threading.Thread):
    """Reconciles one Application; requests are coalesced to the highest refresh level asked."""

    def __init__(self, ctl: Controller, namespace: str, name: str) -> None:
        super().__init__(name=f"app-{name}", daemon=True)
        self.ctl, self.namespace, self.name = ctl, namespace, name
        self.api = k8s.CustomObjectsApi(api_client(ctl.kubeconfig))
        self.core = k8s.CoreV1Api(self.api.api_client)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._level = LATEST
        self._operation = False
        self.next_full = 0.0
        self.revision: str | None = None
        self.desired: Desired | None = None
        self.error: str | None = None
        self.spec_key: str | None = None
        self.workload: Workload | None = None
        # Consecutive self-heal syncs of this app (reset by a sync to a new revision).
        self._heals = 0
        self.images: dict[str, str] = {}
        self._heal_after = 0.0

    # -- requests -------------------------------------------------------------------------------

    def request(self, level: int = HEALTH, *, operation: bool = False) -> None:
        with self._lock:
            self._level = max(self._level, level)
            self._operation = self._operation or operation
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            timeout = max(0.0, self.next_full - time.monotonic())
            if self._heal_after:
                timeout = min(timeout, max(0.0, self._heal_after - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._halt.is_set():
                break
            with self._lock:
                level, self._level = self._level, 0
                self._operation = False
            if time.monotonic() >= self.next_full:
                level = max(level, LATEST)
            if self._heal_after and time.monotonic() >= self._heal_after:
                self._heal_after = 0.0
                level = max(level, RECENT)
            if not level:
                continue
            try:
                self.reconcile(level)
            except ApiException as e:
                if e.status == 404:
                    continue
                log.warning("app %s: API error: %s %s", self.name, e.status, redact(str(e.reason)))
                self.request(level)
                self._halt.wait(2)
            except Exception:
                log.exception("app %s: reconcile failed", self.name)
                self._halt.wait(2)

    # -- API helpers ----------------------------------------------------------------------------

    def _get(self) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def _patch(self, body: dict[str, Any]) -> dict[str, Any]:
        # Argo CD's Application CRD has no status subresource: status is patched on the object.
        return self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name, body)

    def _patch_status(self, app: dict[str, Any], changes: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Set top-level status fields to exactly `changes` (None deletes), as an update would; `extra`
        goes into the same patch (clearing `.operation`, consuming the refresh annotation)."""
        prev = app.get("status") or {}
        body = {k: model.merge_patch_for(prev.get(k), v) if v is not None else None for k, v in changes.items()}
        return self._patch({"status": body, **(extra or {})}) or self._get()

    def _deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object("apps", "v1", namespace, "deployments", name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _destination(self, app: dict[str, Any]) -> tuple[str, str]:
        spec = app.get("spec") or {}
        source = spec.get("source") or {}
        namespace = (spec.get("destination") or {}).get("namespace") or "default"
        name = (source.get("helm") or {}).get("releaseName") or self.name
        return namespace, name

    def _workload(self, app: dict[str, Any]) -> Workload:
        namespace, name = self._destination(app)
        wl = self.workload
        if wl is not None and (wl.namespace, wl.deploy_name) == (namespace, name):
            return wl
        if wl is not None:
            wl.teardown()
        wl = Workload(app=self.name, namespace=namespace, name=name, api_client=api_client(self.ctl.kubeconfig),
                      root=self.ctl.root, port=self.ctl.port_for(self.name), hub=self.ctl.hub,
                      notify=lambda: self.request(HEALTH), revision_of=lambda img: self.images.get(img, ""))
        wl.start()
        self.workload = wl
        return wl

    # -- reconcile ------------------------------------------------------------------------------

    def reconcile(self, level: int) -> None:
        app = self._get()
        meta = app.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            self._finalize(app)
            return
        annotations = meta.get("annotations") or {}
        refresh = annotations.get(model.REFRESH_ANNOTATION)
        if refresh:
            level = max(level, HARD if refresh == "hard" else LATEST)
        spec_key = json.dumps(app.get("spec"), sort_keys=True)
        if spec_key != self.spec_key:
            level = max(level, LATEST)
        operation = app.get("operation")
        wl = self._workload(app)

        compared = False
        if level >= LATEST or self.desired is None and self.error is None:
            self._compare_with_latest(app, hard=level >= HARD)
            self.spec_key = spec_key
            self.next_full = time.monotonic() + self.ctl.interval
            compared = True

        synced = False
        if operation:
            self._run_operation(app, operation)
            app, synced = self._get(), True
        elif self.desired is not None and level >= RECENT:
            # A commit that renders nothing new for this app finds the live state Synced: no operation.
            synced = self._auto_sync(app)
            app = self._get()
        if synced and not compared:
            # Argo CD forces a CompareWithLatest refresh once an operation completes.
            self.request(LATEST)
        # reconciledAt moves only on a full compare against Git, and the refresh annotation is removed
        # in the same patch as the status it produced, as Argo CD does.
        self._write_status(app, wl, compared=compared, consume_refresh=bool(refresh) and compared)

    def _compare_with_latest(self, app: dict[str, Any], *, hard: bool) -> None:
        source = model.source_of(app)
        try:
            sha = self.ctl.git.resolve(str(source.get("repoURL") or ""), source.get("targetRevision"))
            namespace, release = self._destination(app)
            desired = render(self.ctl.git, source, sha, release=release, namespace=namespace, hard=hard)
        except ComparisonError as e:
            self.error = str(e)
            self.desired = None
            log.warning("app %s: comparison error: %s", self.name, self.error)
            return
        self.revision, self.desired, self.error = sha, desired, None
        self.images.setdefault(desired.image, sha)

    def _desired_at(self, app: dict[str, Any], revision: str | None) -> tuple[str, Desired]:
        """Target state for a sync operation (an explicit revision may differ from the branch head)."""
        if not revision or revision == self.revision or revision == (model.source_of(app).get("targetRevision")):
            if self.desired is None or self.revision is None:
                raise ComparisonError(self.error or "target state unknown")
            return self.revision, self.desired
        source = model.source_of(app)
        sha = self.ctl.git.resolve(str(source.get("repoURL") or ""), revision)
        namespace, release = self._destination(app)
        return sha, render(self.ctl.git, source, sha, release=release, namespace=namespace)

    def _auto_sync(self, app: dict[str, Any]) -> bool:
        """Start and run an automated sync when one is due; True when it ran."""
        auto = model.automated(app)
        if auto is None or self.desired is None or self.revision is None:
            return False
        namespace, name = self._destination(app)
        live = self._deployment(namespace, name)
        if model.compare(self.desired, live, ignore_replicas=model.ignores_replicas(app)) == "Synced":
            return False
        attempted, phase = model.already_attempted(app, self.revision)
        if attempted:
            if not auto.get("selfHeal") or phase != "Succeeded":
                return False
            finished = ((app.get("status") or {}).get("operationState") or {}).get("finishedAt")
            wait = self._since(finished)
            if wait is not None and wait < self.ctl.self_heal_interval:
                # Argo CD's self-heal timeout: not sooner than this after the last sync.
                self._heal_after = time.monotonic() + (self.ctl.self_heal_interval - wait)
                self._wake.set()
                return False
            log.info("app %s: self-healing drift back to %s", self.name, self.desired.image)
        sync: dict[str, Any] = {"revision": self.revision}
        if attempted:
            # A self-heal re-applies only what drifted, and counts the attempts (Argo CD's autoHeal).
            self._heals += 1
            sync.update(autoHealAttemptsCount=self._heals, resources=[{"group": "apps", "kind": "Deployment",
                                                                       "name": name}])
        else:
            self._heals = 0
        operation = model.complete_operation(app, {"sync": sync, "initiatedBy": {"automated": True}})
        # Like Argo CD, auto-sync writes `.operation`; it is cleared only when the operation completes.
        app = self._patch({"operation": operation})
        self._sync(app, operation)
        return True

    @staticmethod
    def _since(ts: str | None) -> float | None:
        if not ts:
            return None
        from datetime import UTC, datetime
        try:
            t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return None
        return (datetime.now(UTC) - t).total_seconds()

    def _run_operation(self, app: dict[str, Any], operation: dict[str, Any]) -> None:
        # `.operation` stays until the operation completes (then `_sync` clears it with the final state).
        self._sync(app, operation)

    def _sync(self, app: dict[str, Any], operation: dict[str, Any]) -> None:
        """Run a sync operation, retried per its `retry` policy the way Argo CD does: between attempts
        the phase stays Running with finishedAt set and "Retrying attempt #N at ..."; exhausted, it is
        Failed with "(retried N times)"."""
        source = model.source_of(app)
        started = model.now_iso()
        operation = model.complete_operation(app, operation)
        sync_req = dict(operation.get("sync") or {})
        running = model.operation_running(operation, started)
        app = self._patch_status(app, {"operationState": running})
        namespace, name = self._destination(app)
        retry = model.retry_policy(operation.get("retry"))
        attempt = 0
        while True:
            try:
                revision, desired = self._desired_at(app, sync_req.get("revision"))
            except ComparisonError as e:
                ok, message, resources, revision, desired = False, f"ComparisonError: {e}", [], \
                    sync_req.get("revision") or "", None
            else:
                running["operation"].setdefault("sync", {})["revision"] = revision
                self.images[desired.image] = revision
                ok, message, resources = self._apply(app, namespace, name, desired)
            if ok or attempt >= retry.limit or self._halt.is_set():
                break
            attempt += 1
            delay = retry.delay(attempt)
            retry_at = time.strftime("%H:%M:%S", time.gmtime(time.time() + delay))
            between = dict(running, finishedAt=model.now_iso(),
                           message=f"Retrying attempt #{attempt} at {retry_at}. {message}")
            app = self._patch_status(app, {"operationState": between})
            log.info("app %s: sync attempt %d failed (%s); retrying in %.0f s", self.name, attempt, message, delay)
            self._halt.wait(delay)
        if not ok and attempt:
            message = f"{message} (retried {attempt} times)."
        finished = model.now_iso()
        state = model.operation_finished(running, ok=ok, message=message, revision=revision, source=source,
                                         resources=resources, finished=finished)
        if desired is None:
            self._patch_status(app, {"operationState": state}, extra={"operation": None})
            return
        patch: dict[str, Any] = {"operationState": state}
        if ok:
            status = app.get("status") or {}
            patch["history"] = model.append_history(status.get("history"), revision=revision, source=source,
                                                    started=started, deployed=finished,
                                                    initiated_by=operation.get("initiatedBy"))
            patch["sync"] = model.sync_status(app, "Synced" if revision == self.revision else "OutOfSync",
                                              self.revision or revision)
        self._patch_status(app, patch, extra={"operation": None})
        log.info("app %s: sync to %s %s (%s)", self.name, revision[:12], state["phase"], desired.image)
        if self.workload is not None:
            self.workload.poke()

    def _apply(self, app: dict[str, Any], namespace: str, name: str,
               desired: Desired) -> tuple[bool, str, list[dict[str, Any]]]:
        release = (((app.get("spec") or {}).get("source") or {}).get("helm") or {}).get("releaseName") or self.name
        manifest = model.deployment_manifest(self.name, name, namespace, desired, release=release)
        self._ensure_namespace(namespace)
        result = {"group": "apps", "version": "v1", "kind": "Deployment", "namespace": namespace, "name": name,
                  "images": [desired.image],
                  "hookPhase": "Running", "syncPhase": "Sync", "status": "Synced"}
        try:
            live = self._deployment(namespace, name)
            if live is None:
                manifest["metadata"]["generation"] = 1
                self.api.create_namespaced_custom_object("apps", "v1", namespace, "deployments", manifest)
                result["message"] = f"deployment.apps/{name} created"
            else:
                old_gen = int((live.get("metadata") or {}).get("generation") or 1)
                changed = json.dumps(live.get("spec"), sort_keys=True) != json.dumps(
                    model.deep_merge(live.get("spec") or {}, manifest["spec"]), sort_keys=True)
                body = {"metadata": manifest["metadata"], "spec": manifest["spec"]}
                after = self.api.patch_namespaced_custom_object("apps", "v1", namespace, "deployments", name, body)
                new_gen = int(((after or {}).get("metadata") or {}).get("generation") or old_gen)
                if changed and new_gen <= old_gen:
                    # The API server bumps generation on spec changes; do it where it does not.
                    self.api.patch_namespaced_custom_object("apps", "v1", namespace, "deployments", name,
                                                            {"metadata": {"generation": old_gen + 1}})
                result["message"] = f"deployment.apps/{name} {'configured' if changed else 'unchanged'}"
        except ApiException as e:
            result.update(status="SyncFailed", message=redact(f"{e.status} {e.reason}: {e.body!r}"[:500]),
                          hookPhase="Failed")
            return False, f"one or more objects failed to apply, reason: {result['message']}", [result]
        return True, model.SYNC_OK_MESSAGE, [result]

    def _ensure_namespace(self, namespace: str) -> None:
        """CreateNamespace=true."""
        try:
            self.core.read_namespace(namespace, _preload_content=False)
            return
        except ApiException as e:
            if e.status != 404:
                log.debug("namespace %s: read failed: %s", namespace, e.status)
        try:
            self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                                       _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                log.debug("namespace %s: create failed: %s", namespace, e.status)

    def _write_status(self, app: dict[str, Any], wl: Workload, *, compared: bool,
                      consume_refresh: bool = False) -> None:
        namespace, name = self._destination(app)
        live = self._deployment(namespace, name)
        prev = app.get("status") or {}
        health = model.app_health(live, prev.get("health"))
        if self.desired is not None:
            sync = model.compare(self.desired, live, ignore_replicas=model.ignores_replicas(app))
            sync_block = model.sync_status(app, sync, self.revision)
        else:
            sync = "Unknown"
            sync_block = model.sync_status(app, "Unknown", None)
        status: dict[str, Any] = {
            "sync": sync_block,
            "health": health,
            "conditions": model.comparison_conditions(prev.get("conditions"), self.error) or None,
            "resources": [model.resource_entry(namespace, name, sync,
                                               self.desired.sync_wave if self.desired is not None else None)],
            "summary": {"images": [model.live_spec(live).image]} if live and model.live_spec(live) else None,
            "sourceType": "Helm",
            "controllerNamespace": self.ctl.controller_namespace,
            "resourceHealthSource": "appTree",
            "sourceHydrator": {},
        }
        if compared or not prev.get("reconciledAt"):
            # Last, and only for a comparison (not a health-only refresh), as Argo CD does: a client reads
            # reconciledAt >= operationState.finishedAt as "health is about the new sync".
            status["reconciledAt"] = model.now_iso()
        extra = {"metadata": {"annotations": {model.REFRESH_ANNOTATION: None}}} if consume_refresh else None
        self._patch_status(app, status, extra=extra)
        if self.desired is not None and sync == "OutOfSync" and model.automated(app):
            auto = model.automated(app) or {}
            attempted, _ = model.already_attempted(app, self.revision or "")
            if attempted and auto.get("selfHeal") and not self._heal_after:
                self._heal_after = time.monotonic() + 0.5

    def _finalize(self, app: dict[str, Any]) -> None:
        """Cascade delete behind Argo CD's resources finalizer."""
        namespace, name = self._destination(app)
        if self.workload is not None:
            self.workload.teardown()
            self.workload = None
        with contextlib.suppress(ApiException):
            self.api.delete_namespaced_custom_object("apps", "v1", namespace, "deployments", name)
        finalizers = [f for f in (app.get("metadata") or {}).get("finalizers") or []
                      if f != model.RESOURCES_FINALIZER]
        with contextlib.suppress(ApiException):
            self._patch({"metadata": {"finalizers": finalizers or None}})
        self.stop()

    # -- drift ----------------------------------------------------------------------------------

    def check_drift(self) -> None:
        """The live Deployment spec moved away from Git (someone patched it): compare again."""
        if self.desired is None or self.workload is None:
            return
        try:
            live = self._deployment(self.workload.namespace, self.workload.deploy_name)
        except ApiException:
            return
        if live is None:
            self.request(RECENT)
            return
        spec = model.live_spec(live)
        if spec is not None and spec.image != self.desired.image:
            self.request(RECENT)


class Controller:
    def __init__(self, *, kubeconfig: Path, interval: float, ports_file: Path | None, root: str,
                 self_heal_interval: float, cache_dir: Path,
                 controller_namespace: str = "argocd") -> None:
        self.kubeconfig = kubeconfig
        self.interval = interval
        self.ports_file = ports_file
        self.root = root
        self.self_heal_interval = self_heal_interval
        self.controller_namespace = controller_namespace
        self.git = GitSource(cache_dir)
        self.hub = ProxyHub()
        self.workers: dict[tuple[str, str], AppWorker] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.api = k8s.CustomObjectsApi(api_client(kubeconfig))

    def port_for(self, name: str) -> int:
        return load_ports(self.ports_file).get(name) or stable_port(name)

    def _worker(self, namespace: str, name: str) -> AppWorker:
        with self._lock:
            w = self.workers.get((namespace, name))
            if w is None or not w.is_alive() and w._halt.is_set():
                w = AppWorker(self, namespace, name)
                # Spread the periodic polls like Argo CD's jitter does.
                w.next_full = time.monotonic() + self.interval * (1 + random.random() * 0.1)  # noqa: S311
                self.workers[(namespace, name)] = w
                w.start()
            return w

    def on_event(self, kind: str, app: dict[str, Any]) -> None:
        meta = app.get("metadata") or {}
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        if not key[1]:
            return
        if kind == "DELETED":
            with self._lock:
                w = self.workers.pop(key, None)
            if w is not None:
                # Deleted without the resources finalizer: what it deployed stays (non-cascading delete).
                w.stop()
                if w.workload is not None:
                    w.workload.stop()
                    self.hub.close(w.workload.port)
            return
        fresh = key not in self.workers
        w = self._worker(*key)
        annotations = meta.get("annotations") or {}
        refresh = annotations.get(model.REFRESH_ANNOTATION)
        if fresh:
            w.request(LATEST)
        if refresh:
            w.request(HARD if refresh == "hard" else LATEST)
        if app.get("operation"):
            w.request(RECENT, operation=True)
        if meta.get("deletionTimestamp"):
            w.request(HEALTH)
        spec_key = json.dumps(app.get("spec"), sort_keys=True)
        if w.spec_key is not None and spec_key != w.spec_key:
            w.request(LATEST)

    def _list(self) -> tuple[list[dict[str, Any]], str | None]:
        try:
            listing = self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL) or {}
        except ApiException as e:
            if e.status == 404:  # the CRD is not served (yet)
                return [], None
            raise
        return list(listing.get("items") or []), (listing.get("metadata") or {}).get("resourceVersion")

    def watch_loop(self) -> None:
        """List, then watch; on a dropped stream or 410 Gone, list again (an informer's loop)."""
        while not self._halt.is_set():
            try:
                items, rv = self._list()
                for app in items:
                    self.on_event("ADDED", app)
                kwargs: dict[str, Any] = {"timeout_seconds": 60, "_request_timeout": (5, 90)}
                if rv and rv.isdigit():
                    kwargs["resource_version"] = rv
                w = k8s_watch.Watch()
                for event in w.stream(self.api.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kwargs):
                    if self._halt.is_set():
                        w.stop()
                        break
                    obj = event.get("object")
                    if event.get("type") == "ERROR" or not isinstance(obj, dict):
                        break
                    self.on_event(str(event.get("type")), obj)
            except ApiException as e:
                if e.status != 410:
                    log.warning("watch of applications failed: %s %s", e.status, e.reason)
                    self._halt.wait(1)
            except Exception as e:  # a dropped stream
                if not self._halt.is_set():
                    log.info("watch of applications restarted: %s", type(e).__name__)
                    self._halt.wait(0.5)

    def drift_loop(self) -> None:
        while not self._halt.wait(self.self_heal_interval):
            for w in list(self.workers.values()):
                w.check_drift()

    def run(self) -> None:
        threads = [threading.Thread(target=self.watch_loop, name="watch", daemon=True),
                   threading.Thread(target=self.drift_loop, name="drift", daemon=True)]
        for t in threads:
            t.start()
        log.info("argocd emulator running (interval %ss, root %s)", self.interval, self.root)
        self._halt.wait()

    def stop(self) -> None:
        self._halt.set()

    def shutdown(self) -> None:
        """Stop reconciling and close the stable ports; app containers keep running."""
        self._halt.set()
        for w in list(self.workers.values()):
            w.stop()
            if w.workload is not None:
                w.workload.stop()
        for w in list(self.workers.values()):
            if w.workload is not None:
                w.workload.join(5)
        self.hub.shutdown()
