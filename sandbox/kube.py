"""A Kubernetes API server emulator: the real REST API over HTTP, objects kept in memory.

    python -m sandbox.kube --host 127.0.0.1 --port 8001 [--drop-watch-after 30] [--watch-history 1000]

The product talks to it only through the official `kubernetes` client and a kubeconfig
(`write_kubeconfig`), so it must behave like an API server where clients can tell the difference:

- one cluster-wide `resourceVersion` counter bumped on every change (like etcd's revision);
  `metadata.generation` bumped only when something other than metadata and status changes;
  `uid` and `creationTimestamp` set on create; optimistic concurrency (409 on a stale
  `resourceVersion` in a PUT or PATCH body);
- PATCH as JSON patch, JSON merge patch (`null` removes a key), strategic merge patch (lists of
  named items merged by name) and server-side apply (create-or-merge);
- `/status` subresources: for kinds that have one (Deployment, ...), the main endpoint ignores
  status and `/status` changes only status, as the real API does. Argo CD's Application has none:
  Argo CD writes its status through the main endpoint, so it does here too;
- finalizers: DELETE on an object with finalizers only sets `deletionTimestamp`; the object goes
  once the last finalizer is removed;
- list and watch with label and field selectors; a watch from a resourceVersion replays what
  happened after it, and a resourceVersion older than the kept history gets an ERROR event with a
  410 Gone Status, so clients re-list, exactly like a real watch cache.

kmock's `KubernetesEmulator` was the starting point, but it has no resourceVersion, generation,
field selectors, merge-patch `null` semantics or 410, and extending it meant reaching into its
name-mangled internals; a small aiohttp server is simpler to keep right (kmock is no dependency).

Fault injection for the tests of the waits: `--drop-watch-after S` closes every watch stream S
seconds after it opened; `POST /sandbox/compact` forgets the watch history so that any watch from
an earlier resourceVersion gets 410.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import dataclasses
import json
import logging
import re
import secrets
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
from aiohttp import web

log = logging.getLogger("sandbox.kube")

JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`deployments.apps`, as the real API names a resource in its messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCE_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", False, True, ("ns",)),
    ResourceType("", "v1", "services", "Service", True, True, ("svc",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, False, ("cm",)),
    ResourceType("", "v1", "secrets", "Secret", True, False),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, False, ("sa",)),
    ResourceType("", "v1", "pods", "Pod", True, True, ("po",)),
    ResourceType("", "v1", "events", "Event", True, False, ("ev",)),
    ResourceType("", "v1", "endpoints", "Endpoints", True, False, ("ep",)),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, True, ("pvc",)),
    ResourceType("", "v1", "nodes", "Node", False, True, ("no",)),
    ResourceType("apps", "v1", "deployments", "Deployment", True, True, ("deploy",)),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", True, True, ("rs",)),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", True, True, ("sts",)),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", True, True, ("ds",)),
    ResourceType("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, True, ("hpa",)),
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", True, True, ("ing",)),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, True, ("pdb",)),
    ResourceType("argoproj.io", "v1alpha1", "applications", "Application", True, False, ("app", "apps")),
    ResourceType("argoproj.io", "v1alpha1", "appprojects", "AppProject", True, False, ("appproj",)),
)
_BY_PATH = {(t.group, t.version, t.plural): t for t in RESOURCE_TYPES}

# What the real API answers for the `Status` of a failed request.
_REASONS = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict", 410: "Expired",
            415: "UnsupportedMediaType", 422: "Invalid", 500: "InternalError"}


class ApiError(Exception):
    def __init__(self, code: int, message: str, *, reason: str | None = None, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rt.qualified} "{name}" not found',
                    details={"name": name, "group": rt.group, "kind": rt.plural})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge, `null` removes the key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, the common case: like merge patch, but lists of items that all have a
    `name` (containers, ports, env, volumes) are merged item by item instead of replaced."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        result = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                result.pop(key, None)
            else:
                result[key] = strategic_merge_patch(result.get(key), value)
        return result
    if (isinstance(patch, list) and isinstance(target, list) and patch and target
            and all(isinstance(i, dict) and "name" in i for i in [*patch, *target])):
        merged = [copy.deepcopy(i) for i in target]
        index = {i["name"]: n for n, i in enumerate(merged)}
        for item in patch:
            if item.get("$patch") == "delete":
                merged = [i for i in merged if i["name"] != item["name"]]
                index = {i["name"]: n for n, i in enumerate(merged)}
            elif item["name"] in index:
                merged[index[item["name"]]] = strategic_merge_patch(merged[index[item["name"]]], item)
            else:
                index[item["name"]] = len(merged)
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def json_patch(doc: Any, ops: list[JSON]) -> Any:
    """RFC 6902 JSON patch, by the `jsonpatch` library; a failing op is a 422 as on a real API server."""
    try:
        return jsonpatch.apply_patch(doc, ops, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, KeyError, IndexError, TypeError,
            ValueError) as e:
        raise ApiError(422, f"the JSON patch could not be applied: {e}") from e


# ---------------------------------------------------------------- selectors


def _split_terms(selector: str) -> list[str]:
    """Split at commas outside parentheses (`env in (a,b),tier`)."""
    terms, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    return [t.strip() for t in terms if t.strip()]


_SET_TERM = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)$")


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in _split_terms(selector):
        if m := _SET_TERM.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            inside = key in labels and labels[key] in values
            if (op == "in") != inside:
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str, obj: JSON) -> bool:
    for term in _split_terms(selector):
        negate = "!=" in term
        key, value = (s.strip() for s in term.replace("!=", "=").replace("==", "=").split("=", 1))
        current: Any = obj
        for part in key.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        current = "" if current is None else str(current)
        if (current == value) == negate:
            return False
    return True


# ---------------------------------------------------------------- the store


@dataclasses.dataclass
class Event:
    rv: int
    rt: ResourceType
    type: str
    obj: JSON


@dataclasses.dataclass(eq=False)
class Watcher:
    rt: ResourceType
    namespace: str | None
    queue: asyncio.Queue[Event]


class Store:
    """All objects plus the event history that watches replay; every mutation is synchronous, so
    the single event loop makes each one atomic."""

    def __init__(self, history: int = 1000) -> None:
        self.rv = 0
        self.objects: dict[tuple[str, str, str, str], JSON] = {}
        self.history: deque[Event] = deque()
        self.history_size = history
        # Events up to this resourceVersion are forgotten: a watch from before it gets 410.
        self.compacted_rv = 0
        self.watchers: set[Watcher] = set()

    @staticmethod
    def key(rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (rt.group, rt.plural, namespace or "", name)

    def compact(self) -> None:
        self.history.clear()
        self.compacted_rv = self.rv

    def _emit(self, rt: ResourceType, type_: str, obj: JSON) -> None:
        event = Event(self.rv, rt, type_, copy.deepcopy(obj))
        if len(self.history) >= self.history_size:
            self.compacted_rv = self.history.popleft().rv
        self.history.append(event)
        for w in list(self.watchers):
            if w.rt == rt:
                w.queue.put_nowait(event)

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> JSON:
        obj = self.objects.get(self.key(rt, namespace, name))
        if obj is None:
            raise _not_found(rt, name)
        return obj

    def list(self, rt: ResourceType, namespace: str | None) -> list[JSON]:
        items = [o for (g, p, ns, _), o in self.objects.items()
                 if g == rt.group and p == rt.plural and (namespace is None or ns == namespace)]
        return sorted(items, key=lambda o: int(o["metadata"]["resourceVersion"]))

    def create(self, rt: ResourceType, namespace: str | None, body: JSON) -> JSON:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, f"{rt.kind} is invalid: metadata.name: Required value", reason="Invalid")
        if rt.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace "
                                    "sent on the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        key = self.key(rt, meta.get("namespace"), name)
        if key in self.objects:
            raise ApiError(409, f'{rt.qualified} "{name}" already exists', reason="AlreadyExists",
                           details={"name": name, "group": rt.group, "kind": rt.plural})
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        for drop in ("resourceVersion", "deletionTimestamp", "uid", "creationTimestamp"):
            meta.pop(drop, None)
        self.rv += 1
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(self.rv), generation=1)
        if rt.status_subresource:
            obj.pop("status", None)
        _defaults(rt, obj)
        self.objects[key] = obj
        self._emit(rt, "ADDED", obj)
        return obj

    def update(self, rt: ResourceType, namespace: str | None, name: str, new: JSON, *,
               subresource: str | None = None, expected_rv: str | None = None) -> JSON:
        """Store `new` as the next version of the object; the caller built it from the current one."""
        key = self.key(rt, namespace, name)
        old = self.objects.get(key)
        if old is None:
            raise _not_found(rt, name)
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been '
                                "modified; please apply your changes to the latest version and try again",
                           details={"name": name, "group": rt.group, "kind": rt.plural})
        new = copy.deepcopy(new)
        if subresource == "status":
            # Only status moves through /status; everything else stays as it was.
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif rt.status_subresource:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match the URL's ({name})")
        old_meta = old["metadata"]
        # Fields the server owns.
        for field in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        _defaults(rt, new)
        if _spec_part(new) != _spec_part(old):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == old:
            return old  # a no-op write does not bump resourceVersion, as on a real API server
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[key]
            self._emit(rt, "DELETED", new)
            return new
        self.objects[key] = new
        self._emit(rt, "MODIFIED", new)
        return new

    def delete(self, rt: ResourceType, namespace: str | None, name: str) -> tuple[JSON, bool]:
        """Delete, or only mark for deletion when finalizers remain; returns (object, gone)."""
        key = self.key(rt, namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            raise _not_found(rt, name)
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                self.rv += 1
                obj["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                       resourceVersion=str(self.rv))
                if rt.kind == "Namespace":
                    obj.setdefault("status", {})["phase"] = "Terminating"
                self.objects[key] = obj
                self._emit(rt, "MODIFIED", obj)
            return obj, False
        del self.objects[key]
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(rt, "DELETED", obj)
        if rt.kind == "Namespace":
            # A namespace takes everything in it along (the namespace controller's job on a cluster).
            for (group, plural, ns, obj_name) in list(self.objects):
                if ns == name:
                    self._force_delete(_BY_PLURAL[(group, plural)], ns, obj_name)
        return obj, True

    def _force_delete(self, rt: ResourceType, namespace: str, name: str) -> None:
        obj = self.objects.pop(self.key(rt, namespace, name))
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(rt, "DELETED", obj)


_BY_PLURAL = {(t.group, t.plural): t for t in RESOURCE_TYPES}


def _spec_part(obj: JSON) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _defaults(rt: ResourceType, obj: JSON) -> None:
    """The few defaults the real API server fills in that clients read back."""
    if rt.kind == "Deployment":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("strategy", {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    elif rt.kind == "Namespace":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
    elif rt.kind == "Secret":
        string_data = obj.pop("stringData", None) or {}
        data = obj.setdefault("data", {}) if string_data else obj.get("data")
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
        obj.setdefault("type", "Opaque")


# ---------------------------------------------------------------- HTTP


@dataclasses.dataclass
class Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None
    watch: bool


def parse_path(path: str) -> Route | None:
    """Map `/api/v1/...` and `/apis/<group>/<version>/...` onto a resource; None for other paths."""
    segs = [s for s in path.split("/") if s]
    if len(segs) >= 2 and segs[0] == "api":
        group, version, rest = "", segs[1], segs[2:]
    elif len(segs) >= 3 and segs[0] == "apis":
        group, version, rest = segs[1], segs[2], segs[3:]
    else:
        return None
    if not rest:
        return None
    watch = False
    if rest[0] == "watch":
        watch, rest = True, rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        raise ApiError(404, "the server could not find the requested resource")
    rt = _BY_PATH.get((group, version, rest[0]))
    if rt is None:
        raise ApiError(404, "the server could not find the requested resource")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    # Every kind answers /status here (lenient: Argo CD's Application has none on a real cluster).
    if sub is not None and sub != "status":
        raise ApiError(404, "the server could not find the requested resource")
    if namespace is not None and not rt.namespaced:
        raise ApiError(404, "the server could not find the requested resource")
    return Route(rt, namespace, name, sub, watch)


class KubeServer:
    def __init__(self, *, history: int = 1000, drop_watch_after: float | None = None,
                 bookmark_interval: float = 30.0) -> None:
        self.store = Store(history)
        self.drop_watch_after = drop_watch_after
        self.bookmark_interval = bookmark_interval
        # API requests served (not counting /sandbox/*): lets a test measure how hard a client polls.
        self.requests = 0
        for ns in ("default", "kube-system"):
            self.store.create(_BY_PATH[("", "v1", "namespaces")], None, {"metadata": {"name": ns}})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)
        except Exception as e:  # a bug here must still answer like an API server, not hang the client
            log.exception("internal error on %s %s", request.method, request.path)
            return web.json_response(ApiError(500, f"internal error: {e!r}").status(), status=500)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-sandbox",
                                      "platform": "linux/amd64"})
        if path == "/sandbox/compact" and method == "POST":
            self.store.compact()
            return web.json_response({"compactedResourceVersion": str(self.store.compacted_rv)})
        if path == "/sandbox/requests" and method == "GET":
            return web.json_response({"requests": self.requests})
        self.requests += 1
        discovery = self._discovery(path)
        if discovery is not None:
            return web.json_response(discovery)
        route = parse_path(path)
        if route is None:
            raise ApiError(404, "the server could not find the requested resource")
        q = request.query
        if route.watch or (method == "GET" and q.get("watch") in ("true", "1")):
            if route.name is not None:  # the old /watch/<plural>/<name> form
                q = {**q, "fieldSelector": ",".join(filter(None, [q.get("fieldSelector"),
                                                                   f"metadata.name={route.name}"]))}
            return await self._watch(request, route, q)
        if method == "GET":
            if route.name is None:
                return web.json_response(self._list(route, q))
            return web.json_response(self.store.get(route.rt, route.namespace, route.name))
        if method == "POST" and route.name is None:
            return web.json_response(self.store.create(route.rt, route.namespace, await _body(request)), status=201)
        if route.name is None:
            raise ApiError(405, f"{method} is not supported on a collection here")
        if method == "PUT":
            body = await _body(request)
            expected = (body.get("metadata") or {}).get("resourceVersion")
            return web.json_response(self.store.update(route.rt, route.namespace, route.name, body,
                                                       subresource=route.subresource, expected_rv=expected))
        if method == "PATCH":
            return await self._patch(request, route)
        if method == "DELETE":
            obj, gone = self.store.delete(route.rt, route.namespace, route.name)
            if not gone:
                return web.json_response(obj)
            return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                      "details": {"name": route.name, "group": route.rt.group,
                                                  "kind": route.rt.plural, "uid": obj["metadata"]["uid"]}})
        raise ApiError(405, f"method {method} is not allowed")

    async def _patch(self, request: web.Request, route: Route) -> web.StreamResponse:
        ctype = request.content_type
        raw = await request.read()
        try:
            if ctype == "application/apply-patch+yaml":
                from ruamel.yaml import YAML

                patch = YAML(typ="safe").load(raw.decode())
            else:
                patch = json.loads(raw or b"null")
        except Exception as e:
            raise ApiError(400, f"the patch body is not valid: {e}") from e
        rt = route.rt
        try:
            current = self.store.get(rt, route.namespace, route.name or "")
        except ApiError:
            if ctype == "application/apply-patch+yaml" and route.subresource is None:
                # Server-side apply creates what does not exist yet.
                return web.json_response(self.store.create(rt, route.namespace, patch), status=201)
            raise
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "a JSON patch must be a list of operations")
            new = json_patch(current, patch)
            expected = None
        elif ctype in ("application/merge-patch+json", "application/apply-patch+yaml"):
            new = merge_patch(current, patch)
            expected = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        elif ctype == "application/strategic-merge-patch+json":
            if rt.group == "argoproj.io":
                # As on a real cluster: custom resources have no strategic merge schema.
                raise ApiError(415, f"the body of the request was in an unknown format - accepted media types "
                                    f"include: application/json-patch+json, application/merge-patch+json, "
                                    f"application/apply-patch+yaml (got {ctype})")
            new = strategic_merge_patch(current, patch)
            expected = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
        else:
            raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                                f"application/json-patch+json, application/merge-patch+json, "
                                f"application/apply-patch+yaml (got {ctype or 'none'})")
        if not isinstance(new, dict):
            raise ApiError(422, "the patched object is not an object")
        return web.json_response(self.store.update(rt, route.namespace, route.name or "", new,
                                                   subresource=route.subresource, expected_rv=expected))

    def _matching(self, objs: Iterable[JSON], q: Any) -> list[JSON]:
        labels, fields = q.get("labelSelector"), q.get("fieldSelector")
        out = []
        for o in objs:
            if labels and not label_selector_matches(labels, o.get("metadata", {}).get("labels") or {}):
                continue
            if fields and not field_selector_matches(fields, o):
                continue
            out.append(o)
        return out

    def _list(self, route: Route, q: Any) -> JSON:
        items = self._matching(self.store.list(route.rt, route.namespace), q)
        return {"apiVersion": route.rt.api_version, "kind": f"{route.rt.kind}List",
                "metadata": {"resourceVersion": str(self.store.rv)}, "items": items}

    async def _watch(self, request: web.Request, route: Route, q: Any) -> web.StreamResponse:
        store = self.store
        rv_param = q.get("resourceVersion") or ""
        timeout = _float(q.get("timeoutSeconds"))
        limits = [t for t in (timeout, self.drop_watch_after) if t is not None and t > 0]
        deadline = time.monotonic() + min(limits) if limits else None
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")

        # Register and snapshot with no await in between, so no event falls in a gap.
        watcher = Watcher(route.rt, route.namespace, asyncio.Queue())
        initial: list[Event] = []
        gone = False
        if rv_param in ("", "0"):
            initial = [Event(int(o["metadata"]["resourceVersion"]), route.rt, "ADDED", copy.deepcopy(o))
                       for o in store.list(route.rt, route.namespace)]
        else:
            try:
                since = int(rv_param)
            except ValueError as e:
                raise ApiError(400, f"invalid resourceVersion {rv_param!r}") from e
            if since < store.compacted_rv:
                gone = True
            else:
                initial = [e for e in store.history if e.rv > since and e.rt == route.rt]
        if not gone:
            store.watchers.add(watcher)

        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            if gone:
                err = ApiError(410, f"too old resource version: {rv_param} ({store.compacted_rv})", reason="Expired")
                await resp.write(json.dumps({"type": "ERROR", "object": err.status()}).encode() + b"\n")
                return resp
            for event in initial:
                await self._send(resp, route, q, event)
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                waits = [t - now for t in (deadline, next_bookmark if bookmarks else None) if t is not None]
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(0.0, min(waits)) if waits else None)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    bookmark = {"kind": route.rt.kind, "apiVersion": route.rt.api_version,
                                "metadata": {"resourceVersion": str(store.rv)}}
                    await resp.write(json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n")
                    next_bookmark = time.monotonic() + self.bookmark_interval
                    continue
                await self._send(resp, route, q, event)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            store.watchers.discard(watcher)
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def _send(self, resp: web.StreamResponse, route: Route, q: Any, event: Event) -> None:
        obj = event.obj
        if route.namespace is not None and obj.get("metadata", {}).get("namespace") != route.namespace:
            return
        if not self._matching([obj], q):
            return
        await resp.write(json.dumps({"type": event.type, "object": obj}).encode() + b"\n")

    def _discovery(self, path: str) -> JSON | None:
        p = path.rstrip("/") or "/"
        if p == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if p == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in _groups()]}
        segs = p.strip("/").split("/")
        if segs == ["api", "v1"]:
            return _resource_list("", "v1")
        if len(segs) == 2 and segs[0] == "apis" and segs[1] in _groups():
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(segs[1])}
        served = {(t.group, t.version) for t in RESOURCE_TYPES}
        if len(segs) == 3 and segs[0] == "apis" and (segs[1], segs[2]) in served:
            return _resource_list(segs[1], segs[2])
        if p == "/":
            paths = {"/api", "/api/v1", "/apis", "/version", "/healthz"}
            paths |= {f"/apis/{t.group}/{t.version}" for t in RESOURCE_TYPES if t.group}
            return {"paths": sorted(paths)}
        return None


def _groups() -> list[str]:
    return sorted({t.group for t in RESOURCE_TYPES if t.group})


def _group(group: str) -> JSON:
    versions = sorted({t.version for t in RESOURCE_TYPES if t.group == group})
    gv = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": gv, "preferredVersion": gv[0]}


def _resource_list(group: str, version: str) -> JSON:
    resources = []
    for t in RESOURCE_TYPES:
        if (t.group, t.version) != (group, version):
            continue
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        resources.append({"name": t.plural, "singularName": t.kind.lower(), "namespaced": t.namespaced,
                          "kind": t.kind, "verbs": verbs, "shortNames": list(t.short_names)})
        if t.status_subresource:
            resources.append({"name": f"{t.plural}/status", "singularName": "", "namespaced": t.namespaced,
                              "kind": t.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources}


async def _body(request: web.Request) -> JSON:
    try:
        body = await request.json()
    except Exception as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be an object")
    return body


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


# ---------------------------------------------------------------- kubeconfig and entry point


def kubeconfig_text(server_url: str, *, namespace: str = "default") -> str:
    # JSON is YAML: the official client's loader reads it as a kubeconfig.
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": {"server": server_url}}],
        # The emulator checks no credentials; a token keeps the client on its normal bearer-auth path.
        "users": [{"name": "sandbox", "user": {}}],  # the emulator does not authenticate
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox",
                                                     "namespace": namespace}}],
        "current-context": "sandbox",
        "preferences": {},
    }, indent=2) + "\n"


def write_kubeconfig(path: Path, server_url: str) -> Path:
    """Write a kubeconfig (cluster, context and user all named `sandbox`) pointing at `server_url`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(kubeconfig_text(server_url))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


async def serve(host: str, port: int, *, history: int, drop_watch_after: float | None,
                port_file: Path | None = None) -> None:
    server = KubeServer(history=history, drop_watch_after=drop_watch_after)
    runner = web.AppRunner(server.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
    await site.start()
    sockets = site._server.sockets if site._server else []  # noqa: SLF001 - the bound port when 0 was asked
    bound = sockets[0].getsockname()[1] if sockets else port
    url = f"http://{host}:{bound}"
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{bound}\n")
        tmp.replace(port_file)
    print(f"kubernetes api emulator listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.kube", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--drop-watch-after", type=float, default=None, metavar="SECONDS",
                   help="close every watch stream this long after it opened (fault injection)")
    p.add_argument("--watch-history", type=int, default=1000,
                   help="events kept for watches from a resourceVersion; older ones get 410 Gone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.host, args.port, history=max(1, args.watch_history),
                      drop_watch_after=args.drop_watch_after, port_file=args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
