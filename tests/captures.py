"""Status captures: the sequence of Application `.status` and Deployment `.status` documents a cluster
writes during one scenario, normalised so that two runs (and two implementations) compare.

The real tier records them (`DELIVERY_RECORD_CAPTURES=1 make test-real` rewrites tests/data/captures/);
the emulator tests replay the same scenario on the emulators and compare the *shape* (which fields
appear) and the *order* (the sequence of milestones the pipeline judges) with the committed capture.

Normalisation: timestamps become "<time>", commit SHAs "<rev1>", "<rev2>", ... in order of
appearance, image tags "<tag1>", ..., ReplicaSet/pod hashes "<hash1>", ...; the repository URL
"<repo>". What is compared never depends on those values, only on where they appear.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch

CAPTURES = Path(__file__).parent / "data" / "captures"

_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_SHA = re.compile(r"\b[0-9a-f]{40}\b")
# The pipeline's tags: `<branch or version>-<short sha>` after the image name's colon.
_TAG = re.compile(r"(?<=:)(main|release-dev|release|v\d+\.\d+\.\d+)-[0-9a-f]{7}\b")


@dataclass
class Recorded:
    at: float
    kind: str  # "application" | "deployment"
    status: dict[str, Any]
    operation: bool = False


@dataclass
class StatusRecorder:
    """Watches one Application and its Deployment in background threads and keeps every distinct
    `.status` they are written with, in the order the API server delivered them."""

    api: client.ApiClient
    application: str
    argocd_namespace: str
    deployment: str
    namespace: str
    entries: list[Recorded] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> StatusRecorder:
        crd = client.CustomObjectsApi(self.api)
        apps = client.AppsV1Api(self.api)
        self._spawn("application", crd.list_namespaced_custom_object, self.application,
                    group="argoproj.io", version="v1alpha1", namespace=self.argocd_namespace, plural="applications")
        self._spawn("deployment", apps.list_namespaced_deployment, self.deployment, namespace=self.namespace)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)  # the last writes of the scenario
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _spawn(self, kind: str, list_fn: Any, name: str, **kwargs: Any) -> None:
        def run() -> None:
            last: str | None = None
            while not self._stop.is_set():
                w = watch.Watch()
                try:
                    for event in w.stream(list_fn, field_selector=f"metadata.name={name}", timeout_seconds=2,
                                          _request_timeout=(5, 5), **kwargs):
                        obj = event.get("raw_object") or {}
                        status = obj.get("status") or {}
                        key = json.dumps([status, bool(obj.get("operation"))], sort_keys=True)
                        if key != last:
                            last = key
                            with self._lock:
                                self.entries.append(Recorded(time.monotonic(), kind, status,
                                                             bool(obj.get("operation"))))
                        if self._stop.is_set():
                            break
                except Exception:  # noqa: BLE001 - a dropped watch is re-opened; the recorder only observes
                    time.sleep(0.2)
                finally:
                    w.stop()

        t = threading.Thread(target=run, daemon=True, name=f"record-{kind}")
        t.start()
        self._threads.append(t)

    def documents(self) -> list[dict[str, Any]]:
        with self._lock:
            entries = sorted(self.entries, key=lambda e: e.at)
        return normalise([{"kind": e.kind, "operation": e.operation, "status": e.status} for e in entries])


def normalise(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names: dict[str, dict[str, str]] = {"rev": {}, "tag": {}, "hash": {}}

    def token(kind: str, value: str) -> str:
        table = names[kind]
        if value not in table:
            table[value] = f"<{kind}{len(table) + 1}>"
        return table[value]

    def text(s: str) -> str:
        if _TIME.match(s):
            return "<time>"
        s = _SHA.sub(lambda m: token("rev", m.group(0)), s)
        if s.startswith(("file://", "http://", "https://")) and (".git" in s or s.startswith("file://")):
            return "<repo>"
        s = _TAG.sub(lambda m: token("tag", m.group(0)), s)
        s = re.sub(r"(?<=-)[0-9a-f]{8,10}(?=\b|-)", lambda m: token("hash", m.group(0)), s)
        return s

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str):
            return text(v)
        return v

    return [walk(d) for d in docs]


def paths(doc: Any, prefix: str = "") -> set[str]:
    """Every key path of `doc`, lists collapsed to `[]`: the document's shape."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= paths(v, p)
    elif isinstance(doc, list):
        for v in doc:
            out |= paths(v, f"{prefix}[]")
    return out


def shape(docs: list[dict[str, Any]], kind: str) -> set[str]:
    out: set[str] = set()
    for d in docs:
        if d["kind"] == kind:
            out |= paths(d["status"])
    return out


def app_milestone(d: dict[str, Any]) -> tuple[str, str, str]:
    """What the pipeline's sync verdict turns on: sync status, health status, operation phase (or
    "requested" while an operation is set but has no state of its own yet)."""
    st = d["status"]
    phase = (st.get("operationState") or {}).get("phase") or ""
    return ((st.get("sync") or {}).get("status") or "", (st.get("health") or {}).get("status") or "",
            phase if not d.get("operation") or phase == "Running" else "requested")


def deployment_milestone(d: dict[str, Any]) -> tuple[str, str]:
    """What the rollout verdict and Argo CD's Deployment health turn on: the Progressing reason and
    whether the Deployment is Available."""
    conds = {c.get("type"): c for c in d["status"].get("conditions") or []}
    return ((conds.get("Progressing") or {}).get("reason") or "", (conds.get("Available") or {}).get("status") or "")


def milestones(docs: list[dict[str, Any]], kind: str) -> list[tuple[str, ...]]:
    """The ordered milestones of `kind`'s documents, consecutive repeats collapsed."""
    fn = app_milestone if kind == "application" else deployment_milestone
    out: list[tuple[str, ...]] = []
    for d in docs:
        if d["kind"] != kind:
            continue
        m = fn(d)
        if not out or out[-1] != m:
            out.append(m)
    return out


def is_subsequence(small: list[Any], big: list[Any]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def save(scenario: str, docs: list[dict[str, Any]], versions: dict[str, str]) -> Path:
    CAPTURES.mkdir(parents=True, exist_ok=True)
    path = CAPTURES / f"{scenario}.json"
    # One document per line: a re-recording diffs document by document.
    lines = ",\n".join(json.dumps(d, sort_keys=True) for d in docs)
    head = json.dumps({"scenario": scenario, "versions": versions}, sort_keys=True)[:-1]
    path.write_text(f'{head}, "documents": [\n{lines}\n]}}\n')
    return path


def load(scenario: str) -> dict[str, Any]:
    return json.loads((CAPTURES / f"{scenario}.json").read_text())
