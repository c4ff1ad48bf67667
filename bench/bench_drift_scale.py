"""Drift check at scale: 50 apps × 2 environments in one drift-check run (goal < 5 s).

    .venv/bin/python bench/bench_drift_scale.py [--apps 50] [--runs 3]

Builds a separate world so the stack's sandbox is not touched: its own Kubernetes API emulator
(`python -m sandbox.kube`, no Argo CD emulator) holding 100 Argo CD Applications with realistic
synced/healthy status and 100 Deployments; a bare GitOps repository with one copy of the real chart
per app (values-dev.yaml and values-staging.yaml each); one image tag per app pushed to the real
registry (the local busybox image under 50 repository names: the "image exists" check hits the
registry 100 times for real); a generated delivery.yaml. DELIVERY_CONFIG_FILE / DELIVERY_KUBECONFIG /
DELIVERY_WORK_DIR point at them in a child process that times `flows.drift.collect_drift` (the first
run clones the GitOps repository, later ones fetch) and the `drift-check` flow itself (a flow run on
the stack's Prefect server, artifact included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common
from common import ROOT, fmt, save, say, summarize

ENVS = ("dev", "staging")
REGISTRY_PREFIX = "127.0.0.1:5000/bench-drift"
TAG = "v1"


def _git(cwd: Path, *args: str) -> str:
    res = subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com",
                          "-c", "init.defaultBranch=main", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def push_images(n: int) -> float:
    import docker

    from sandbox.engine import BASE_IMAGE
    from tasks.images import image_exists

    t0 = time.monotonic()
    client = docker.from_env(timeout=120)
    try:
        base = client.images.get(BASE_IMAGE)
        for i in range(n):
            repo = f"{REGISTRY_PREFIX}/app-{i:02d}"
            if image_exists(repo, TAG):
                continue
            base.tag(repo, TAG)
            for line in client.images.push(repo, tag=TAG, stream=True, decode=True):
                if "error" in line:
                    raise RuntimeError(f"push {repo}:{TAG}: {line['error']}")
    finally:
        client.close()
    return time.monotonic() - t0


def make_gitops(root: Path, n: int) -> tuple[Path, str]:
    tree, bare = root / "gitops-tree", root / "gitops.git"
    for i in range(n):
        chart = tree / "helm" / f"app-{i:02d}"
        shutil.copytree(ROOT / "helm" / "workout-api", chart, ignore=shutil.ignore_patterns("charts", "*.tgz"))
        for f in chart.glob("values-*.yaml"):
            f.unlink()
        values = (chart / "values.yaml").read_text()
        (chart / "values.yaml").write_text(values.replace("repository:", f"repository: {REGISTRY_PREFIX}/app-{i:02d}"
                                                          "  # was:", 1))
        for env in ENVS:
            (chart / f"values-{env}.yaml").write_text(
                f"# {env} overrides for app-{i:02d}\nimage:\n  tag: \"{TAG}\"\nreplicaCount: 1\n")
    shutil.copytree(ROOT / "argocd", tree / "argocd")
    _git(root, "init", "-q", "-b", "main", str(tree))
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", f"{n} apps")
    _git(root, "clone", "-q", "--bare", str(tree), str(bare))
    return bare, _git(bare, "rev-parse", "main")


def start_kube(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = root / "kube.port"
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.kube", "--port", "0", "--port-file", str(port_file)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the Kubernetes API emulator did not start")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def populate(kubeconfig: Path, n: int, head: str) -> None:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    core, apps, co = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for ns in ("argocd", *(f"bench-{e}" for e in ENVS)):
        core.create_namespace({"metadata": {"name": ns}})
    for i in range(n):
        name = f"app-{i:02d}"
        image = f"{REGISTRY_PREFIX}/{name}:{TAG}"
        for env in ENVS:
            ns = f"bench-{env}"
            dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}},
                                         "spec": {"containers": [{"name": name, "image": image}]}}}}
            apps.create_namespaced_deployment(ns, dep)
            apps.patch_namespaced_deployment_status(name, ns, {"status": {
                "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
                "availableReplicas": 1, "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}})
            source = {"repoURL": "gitops", "path": f"helm/{name}", "targetRevision": "main",
                      "helm": {"valueFiles": [f"values-{env}.yaml"]}}
            application = {
                "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                "metadata": {"name": f"{name}-{env}", "namespace": "argocd"},
                "spec": {"project": "default", "source": source,
                         "destination": {"server": "https://kubernetes.default.svc", "namespace": ns},
                         "syncPolicy": {"automated": {"prune": True, "selfHeal": True}}},
                "status": {
                    "sync": {"status": "Synced", "revision": head, "comparedTo": {"source": source}},
                    "health": {"status": "Healthy"},
                    "operationState": {"phase": "Succeeded", "message": "successfully synced (all tasks run)",
                                       "startedAt": now, "finishedAt": now,
                                       "operation": {"sync": {"revision": head}},
                                       "syncResult": {"revision": head, "source": source}},
                    "reconciledAt": now,
                    "resources": [{"group": "apps", "version": "v1", "kind": "Deployment", "namespace": ns,
                                   "name": name, "status": "Synced", "health": {"status": "Healthy"}}],
                    "history": [{"id": 1, "revision": head, "deployedAt": now, "source": source}],
                }}
            co.create_namespaced_custom_object("argoproj.io", "v1alpha1", "argocd", "applications", application)
    api.close()


def write_config(path: Path, bare: Path, n: int) -> None:
    from ruamel.yaml import YAML

    apps = {}
    for i in range(n):
        name = f"app-{i:02d}"
        apps[name] = {
            "source_repo": f"https://github.com/bench/{name}.git", "image": f"{REGISTRY_PREFIX}/{name}",
            "gitops_repo": str(bare), "gitops_branch": "main", "chart_path": f"helm/{name}",
            "environments": {env: {"branches": ["main"] if env == "staging" else [f"release-{env}"],
                                   "values_file": f"values-{env}.yaml", "application": f"{name}-{env}",
                                   "argocd_namespace": "argocd", "namespace": f"bench-{env}", "deployment": name,
                                   "health_url": f"http://127.0.0.1:1/{name}/{env}/api/health/"}
                             for env in ENVS}}
    with open(path, "w") as f:
        YAML().dump({"apps": apps}, f)


CHILD = r"""
import json, sys, time, logging
logging.getLogger("delivery").setLevel(logging.WARNING)
from delivery.config import load_config
from flows.drift import collect_drift, drift_check
cfg = load_config()
names = sorted(cfg.apps)
out = {"collect": [], "flow": []}
for i in range(int(sys.argv[1])):
    t = time.perf_counter(); rows = collect_drift(cfg, names); out["collect"].append(time.perf_counter() - t)
    out["results"] = {}
    for r in rows:
        out["results"][r.result] = out["results"].get(r.result, 0) + 1
    out["rows"] = len(rows)
for i in range(int(sys.argv[2])):
    t = time.perf_counter(); state = drift_check(return_state=True); out["flow"].append(time.perf_counter() - t)
    out["flow_state"] = f"{state.name}: {state.message}"
print("RESULT " + json.dumps(out))
"""


def run(n: int = 50, runs: int = 3, flow_runs: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {"apps": n, "environments": len(ENVS)}
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        out["image_push_s"] = round(push_images(n), 2)
        bare, head = make_gitops(root, n)
        kube, url = start_kube(root)
        try:
            from sandbox.kube import write_kubeconfig

            kubeconfig = write_kubeconfig(root / "kubeconfig", url)
            populate(kubeconfig, n, head)
            write_config(root / "delivery.yaml", bare, n)
            out["setup_s"] = round(time.monotonic() - t0, 2)
            say(f"drift at scale: {n} apps × {len(ENVS)} environments set up in {out['setup_s']:.1f} s")
            env = {**os.environ, "PYTHONPATH": str(ROOT), "DELIVERY_CONFIG_FILE": str(root / "delivery.yaml"),
                   "DELIVERY_KUBECONFIG": str(kubeconfig), "DELIVERY_WORK_DIR": str(root / "work"),
                   "PREFECT_LOGGING_LEVEL": "WARNING"}
            res = subprocess.run([sys.executable, "-c", CHILD, str(runs), str(flow_runs)], cwd=root, env=env,
                                 capture_output=True, text=True, timeout=600)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"drift child failed: {res.stderr[-2000:]}")
            child = json.loads(line[len("RESULT "):])
        finally:
            kube.terminate()
            kube.wait(10)
    out["collect_first_s"] = round(child["collect"][0], 3)
    out["collect_s"] = summarize(child["collect"][1:] or child["collect"])
    out["flow_s"] = summarize(child["flow"])
    out["rows"] = child.get("rows")
    out["results"] = child.get("results")
    out["flow_state"] = child.get("flow_state")
    say(f"collect_drift over {out['rows']} app environments: first (clone) {out['collect_first_s']:.2f} s, "
        f"then {fmt(out['collect_s'])}; results {out['results']}")
    say(f"drift-check flow: {fmt(out['flow_s'])} ({out['flow_state']})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--apps", type=int, default=50)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--flow-runs", type=int, default=2)
    a = p.parse_args()
    common.quiet()
    out = run(a.apps, a.runs, a.flow_runs)
    out["machine"] = common.machine()
    say(f"wrote {save('drift_scale', out)}")


if __name__ == "__main__":
    main()
