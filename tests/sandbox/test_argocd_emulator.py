"""The Argo CD emulator against the Kubernetes API emulator, a real Git remote, real images in the
registry and real containers. Expected status shapes are Argo CD's documented ones
(`kubectl get application -o yaml`, `kubectl get deployment -o yaml`), not copies of its output."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from kubernetes import client, config, watch

from delivery.settings import PROJECT_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.sandbox]

REGISTRY = "127.0.0.1:5000"
GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "applications"
SHA_LEN = 40


# --- fixtures: Kubernetes API, images, GitOps repo, emulator ----------------------------------------


@dataclass
class Kube:
    kubeconfig: Path

    def api(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(config.new_client_from_config(config_file=str(self.kubeconfig)))


@pytest.fixture()
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A Kubernetes API per test: every emulator watches all Applications of its API."""
    from sandbox.kube import write_kubeconfig

    tmp = tmp_path_factory.mktemp("kube")
    port_file = tmp / "port"
    log = open(tmp / "kube.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.kube", "--port", "0", "--port-file", str(port_file)],
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        assert proc.poll() is None, (tmp / "kube.log").read_text()
        assert time.monotonic() < deadline, "the Kubernetes API emulator did not start"
        time.sleep(0.1)
    port = int(port_file.read_text())
    yield Kube(write_kubeconfig(tmp / "kubeconfig", f"http://127.0.0.1:{port}"))
    proc.terminate()
    proc.wait(10)
    log.close()


def _build(d: docker.DockerClient, ref: str, dockerfile: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    d.images.build(fileobj=buf, custom_context=True, tag=ref, rm=True)
    repo, tag = ref.rsplit(":", 1)
    for line in d.images.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in line, line


def _app_dockerfile(version: str) -> str:
    body = json.dumps({"status": "ok", "version": version})
    return (
        "FROM local/busybox:stable\n"
        f"RUN mkdir -p /www/api/health && echo '{body}' > /www/api/health/index.html\n"
        'CMD ["httpd", "-f", "-p", "8000", "-h", "/www"]\n'
    )


@dataclass
class Images:
    repository: str  # e.g. 127.0.0.1:5000/argocd-emu-ab12cd


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    from sandbox.engine import ensure_base_image

    ensure_base_image()
    d = docker.from_env()
    repo = f"{REGISTRY}/argocd-emu-{uuid.uuid4().hex[:8]}"
    for version in ("v1", "v2", "v3"):
        _build(d, f"{repo}:{version}", _app_dockerfile(version))
    _build(d, f"{repo}:crash", 'FROM local/busybox:stable\nCMD ["sh", "-c", "exit 1"]\n')
    yield Images(repo)
    for tag in ("v1", "v2", "v3", "crash"):
        with contextlib.suppress(docker.errors.DockerException):
            d.images.remove(f"{repo}:{tag}", force=True)


def _git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


@dataclass
class GitOps:
    remote: Path
    work: Path

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        """Write chart files, commit and push to main; returns the new commit's full SHA. The first
        commit also brings a small real chart (tests/sandbox/chart_fixture): the emulator renders it
        with `helm template`, as Argo CD does."""
        if not (self.work / "chart" / "Chart.yaml").exists():
            shutil.copytree(Path(__file__).with_name("chart_fixture"), self.work / "chart", dirs_exist_ok=True)
        for rel, text in files.items():
            p = self.work / "chart" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        _git("add", "-A", cwd=self.work)
        _git("commit", "-q", "-m", message, cwd=self.work)
        _git("push", "-q", "origin", "HEAD:main", cwd=self.work)
        return _git("rev-parse", "HEAD", cwd=self.work)


def values_yaml(repository: str, tag: str, *, replicas: int = 2, deadline: int = 600) -> str:
    return (f"image:\n  repository: {repository}\n  tag: \"{tag}\"\nreplicaCount: {replicas}\ncontainerPort: 8000\n"
            f"progressDeadlineSeconds: {deadline}\nreadinessProbe:\n  httpGet:\n    path: /api/health/\n")


@pytest.fixture()
def gitops(tmp_path: Path) -> GitOps:
    remote = tmp_path / "gitops.git"
    _git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    work = tmp_path / "work"
    _git("clone", "-q", str(remote), str(work), cwd=tmp_path)
    _git("checkout", "-q", "-b", "main", cwd=work)
    return GitOps(remote, work)


@dataclass
class Emulator:
    root: str
    ports: dict[str, int]
    log: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def start_emulator(kube: Kube, tmp_path: Path) -> Iterator[Callable[..., Emulator]]:
    started: list[Emulator] = []
    root = f"test-{uuid.uuid4().hex[:8]}"
    ports: dict[str, int] = {}

    def start(apps: list[str], *, interval: float = 180, extra: list[str] | None = None) -> Emulator:
        for name in apps:
            ports.setdefault(name, _free_port())
        ports_file = tmp_path / "ports.json"
        ports_file.write_text(json.dumps(ports))
        log = tmp_path / f"argocd-{len(started)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.argocd", "--kubeconfig", str(kube.kubeconfig), "--interval",
             str(interval), "--ports-file", str(ports_file), "--root", root, "--self-heal-interval", "2",
             "--log-file", str(log), *(extra or [])],
            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        emu = Emulator(root, dict(ports), log, proc)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()
    d = docker.from_env()
    for c in d.containers.list(all=True, filters={"label": f"delivery.sandbox/root={root}"}):
        with contextlib.suppress(docker.errors.DockerException):
            c.remove(force=True)


# --- helpers ----------------------------------------------------------------------------------------


def application(name: str, gitops: GitOps, *, namespace: str, self_heal: bool = True, auto: bool = True,
                value_files: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "project": "default",
        "source": {"repoURL": str(gitops.remote), "targetRevision": "main", "path": "chart",
                   "helm": {"releaseName": name, "valueFiles": value_files or ["values.yaml"]}},
        "destination": {"server": "https://kubernetes.default.svc", "namespace": namespace},
        "syncPolicy": {"syncOptions": ["CreateNamespace=true"]},
    }
    if auto:
        spec["syncPolicy"]["automated"] = {"prune": True, "selfHeal": self_heal}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Application",
            "metadata": {"name": name, "namespace": "argocd"}, "spec": spec}


def create_app(kube: Kube, body: dict[str, Any]) -> None:
    kube.api().create_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, body)


def get_app(kube: Kube, name: str) -> dict[str, Any]:
    return kube.api().get_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name)


def get_deployment(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.api().get_namespaced_custom_object("apps", "v1", namespace, "deployments", name)


def wait_for(fetch: Callable[[], Any], pred: Callable[[Any], bool], timeout: float, what: str,
             emu: Emulator | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fetch()
            if pred(last):
                return last
        except (client.ApiException, urllib.error.URLError, OSError) as e:
            last = repr(e)
        time.sleep(0.3)
    log = emu.log.read_text()[-3000:] if emu and emu.log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}; last seen: {json.dumps(last, default=str)[:3000]}\n{log}")


def synced_healthy_at(sha: str) -> Callable[[dict[str, Any]], bool]:
    """The pipeline's verdict (DESIGN.md): synced and healthy at exactly this revision."""
    def pred(app: dict[str, Any]) -> bool:
        st = app.get("status") or {}
        op = st.get("operationState") or {}
        return (not app.get("operation") and op.get("phase") == "Succeeded"
                and (op.get("syncResult") or {}).get("revision") == sha
                and bool(op.get("finishedAt")) and st.get("reconciledAt", "") >= op["finishedAt"]
                and (st.get("sync") or {}).get("status") == "Synced" and st["sync"].get("revision") == sha
                and (st.get("health") or {}).get("status") == "Healthy")
    return pred


def health_is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda app: ((app.get("status") or {}).get("health") or {}).get("status") == status


def http_version(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health/", timeout=3) as r:
        return json.loads(r.read())["version"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- tests ------------------------------------------------------------------------------------------


def test_auto_sync_reports_argo_cd_status_and_serves_the_app(kube: Kube, images: Images, gitops: GitOps,
                                                            start_emulator: Callable[..., Emulator]) -> None:
    """A new Application syncs: Succeeded at the commit, Synced, Healthy, history, Deployment status."""
    name, ns = unique("ok"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=2)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    app = wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "synced and healthy", emu)

    st = app["status"]
    source = app["spec"]["source"]
    op = st["operationState"]
    assert len(sha) == SHA_LEN
    assert op["phase"] == "Succeeded"
    assert op["message"] == "successfully synced (all tasks run)"
    assert op["operation"]["sync"]["revision"] == sha
    assert op["startedAt"] <= op["finishedAt"] <= st["reconciledAt"]
    assert op["syncResult"]["revision"] == sha
    assert op["syncResult"]["source"] == source
    assert {"group": "apps", "kind": "Deployment", "name": name, "namespace": ns,
            "status": "Synced"}.items() <= op["syncResult"]["resources"][0].items()
    assert st["sync"] == {"status": "Synced", "revision": sha,
                          "comparedTo": {"source": source, "destination": app["spec"]["destination"]}}
    assert st["health"]["status"] == "Healthy"
    entry = st["history"][-1]
    assert entry["revision"] == sha and entry["source"] == source
    assert entry["deployStartedAt"] <= entry["deployedAt"]
    assert isinstance(entry["id"], int)
    assert not [c for c in st.get("conditions") or [] if c["type"] == "ComparisonError"]
    res = next(r for r in st["resources"] if r["kind"] == "Deployment")
    assert res["name"] == name and res["namespace"] == ns and res["status"] == "Synced" and "health" not in res
    assert st["summary"]["images"] == [f"{images.repository}:v1"]

    dep = get_deployment(kube, ns, name)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"{images.repository}:v1"
    assert dep["metadata"]["labels"]["app.kubernetes.io/instance"] == name
    ds = dep["status"]
    assert ds["observedGeneration"] >= dep["metadata"]["generation"]
    assert ds["replicas"] == ds["updatedReplicas"] == ds["readyReplicas"] == ds["availableReplicas"] == 2
    conds = {c["type"]: c for c in ds["conditions"]}
    assert conds["Available"]["status"] == "True" and conds["Available"]["reason"] == "MinimumReplicasAvailable"
    assert conds["Progressing"]["status"] == "True" and conds["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert http_version(emu.ports[name]) == "v1"

    containers = docker.from_env().containers.list(filters={"label": f"delivery.sandbox/application={name}"})
    assert len(containers) == 1
    labels = containers[0].labels
    assert labels["delivery.sandbox/root"] == emu.root and labels["delivery.sandbox/managed"] == "true"
    assert labels["delivery.sandbox/revision"] == sha and labels["delivery.sandbox/tag"] == "v1"


def test_refresh_annotation_rolls_out_without_downtime(kube: Kube, images: Images, gitops: GitOps,
                                                      start_emulator: Callable[..., Emulator]) -> None:
    """A hard refresh picks up a new commit at once, is consumed, and the stable port never fails."""
    name, ns = unique("roll"), unique("ns")
    sha1 = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha1), 90, "first sync", emu)
    port = emu.ports[name]

    errors: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                versions.add(http_version(port))
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(repr(e))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        sha2 = gitops.commit({"values.yaml": values_yaml(images.repository, "v2", replicas=1)})
        kube.api().patch_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name,
                                                  {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "hard"}}})
        app = wait_for(lambda: get_app(kube, name), synced_healthy_at(sha2), 90, "sync of the new commit", emu)
        # Healthy means the new version answers on the stable port.
        assert http_version(port) == "v2"
        time.sleep(1)
    finally:
        stop.set()
        poller.join(5)
    assert errors == []
    assert versions == {"v1", "v2"}
    assert "argocd.argoproj.io/refresh" not in (app["metadata"].get("annotations") or {})
    assert [h["revision"] for h in app["status"]["history"]][-2:] == [sha1, sha2]
    assert app["status"]["history"][-1]["id"] > app["status"]["history"][-2]["id"]


def test_new_commit_waits_for_the_poll_interval_without_refresh(kube: Kube, images: Images, gitops: GitOps,
                                                               start_emulator: Callable[..., Emulator]) -> None:
    """Without the annotation a new commit is seen only when the refresh interval expires."""
    name, ns = unique("poll"), unique("ns")
    sha1 = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name], interval=8)
    create_app(kube, application(name, gitops, namespace=ns))
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha1), 90, "first sync", emu)
    sha2 = gitops.commit({"values.yaml": values_yaml(images.repository, "v2", replicas=1)})
    time.sleep(3)
    app = get_app(kube, name)
    assert app["status"]["sync"]["revision"] == sha1
    assert app["status"]["operationState"]["syncResult"]["revision"] == sha1
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha2), 60, "sync after the interval", emu)


def pods_of(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kube.kubeconfig)))
    return json.loads(api.list_namespaced_pod(namespace, _preload_content=False).data)["items"]


def waiting_reason(pod: dict[str, Any]) -> str:
    cs = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
    return str(((cs.get("state") or {}).get("waiting") or {}).get("reason") or "")


def test_crashing_image_is_progressing_with_a_crash_looping_pod(kube: Kube, images: Images, gitops: GitOps,
                                                                start_emulator: Callable[..., Emulator]) -> None:
    """A release whose container exits, as a real cluster shows it: sync Succeeded, health Progressing
    (the Deployment has not hit its deadline), the new ReplicaSet's pod in CrashLoopBackOff with
    restarts, which the pipeline's fail-fast names; the old pod still answers; Degraded at the deadline."""
    from tasks.probes import workload_failure

    name, ns = unique("crash"), unique("ns")
    sha1 = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1, deadline=25)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha1), 90, "first sync", emu)
    sha2 = gitops.commit({"values.yaml": values_yaml(images.repository, "crash", replicas=1, deadline=25)})
    kube.api().patch_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name,
                                              {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}})

    def crash_looping(pods: list[dict[str, Any]]) -> bool:
        return any(waiting_reason(p) == "CrashLoopBackOff" and p["spec"]["containers"][0]["image"].endswith(":crash")
                   for p in pods)

    pods = wait_for(lambda: pods_of(kube, ns), crash_looping, 60, "a CrashLoopBackOff pod", emu)
    app = get_app(kube, name)
    st = app["status"]
    assert st["operationState"]["phase"] == "Succeeded" and st["sync"]["revision"] == sha2
    assert st["health"]["status"] == "Progressing"
    bad = next(p for p in pods if waiting_reason(p) == "CrashLoopBackOff")
    cs = bad["status"]["containerStatuses"][0]
    assert cs["restartCount"] >= 1 and cs["ready"] is False
    assert cs["lastState"]["terminated"]["exitCode"] != 0
    owner = bad["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ReplicaSet" and owner["name"].startswith(f"{name}-")
    cause = workload_failure(name, ns, readiness_grace=60, kubeconfig=kube.kubeconfig)
    assert cause is not None and f"pod {bad['metadata']['name']}" in cause and "CrashLoopBackOff" in cause
    assert http_version(emu.ports[name]) == "v1"
    dep = get_deployment(kube, ns, name)
    assert dep["status"]["updatedReplicas"] < dep["status"]["replicas"]

    app = wait_for(lambda: get_app(kube, name), health_is("Degraded"), 60, "Degraded at the deadline", emu)
    dep = get_deployment(kube, ns, name)
    progressing = next(c for c in dep["status"]["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == "ProgressDeadlineExceeded"
    assert http_version(emu.ports[name]) == "v1"


def test_unpullable_tag_shows_image_pull_back_off_on_its_pod(kube: Kube, images: Images, gitops: GitOps,
                                                            start_emulator: Callable[..., Emulator]) -> None:
    """A tag missing from the registry: the sync applies, health stays Progressing, the pod waits in
    ErrImagePull/ImagePullBackOff naming the image, and the fail-fast says so."""
    from tasks.probes import workload_failure

    name, ns = unique("pull"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "no-such-tag", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    pods = wait_for(lambda: pods_of(kube, ns), lambda ps: any(waiting_reason(p) == "ImagePullBackOff" for p in ps),
                    60, "ImagePullBackOff", emu)
    st = get_app(kube, name)["status"]
    assert st["operationState"]["phase"] == "Succeeded"
    assert st["operationState"]["syncResult"]["revision"] == sha
    assert st["health"]["status"] == "Progressing"
    waiting = pods[0]["status"]["containerStatuses"][0]["state"]["waiting"]
    assert f"{images.repository}:no-such-tag" in waiting["message"]
    assert pods[0]["status"]["phase"] == "Pending"
    cause = workload_failure(name, ns, readiness_grace=60, kubeconfig=kube.kubeconfig)
    assert cause is not None and "ImagePullBackOff" in cause
    dep = get_deployment(kube, ns, name)
    assert dep["status"].get("availableReplicas", 0) == 0
    available = next(c for c in dep["status"]["conditions"] if c["type"] == "Available")
    assert available["status"] == "False" and available["reason"] == "MinimumReplicasUnavailable"


def test_missing_values_key_and_file_are_comparison_errors_until_fixed(
        kube: Kube, images: Images, gitops: GitOps, start_emulator: Callable[..., Emulator]) -> None:
    """No image tag, then a missing values file: ComparisonError and sync Unknown; a fix clears it."""
    name, ns = unique("cmp"), unique("ns")
    gitops.commit({"values.yaml": f"image:\n  repository: {images.repository}\nreplicaCount: 1\n"})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns, value_files=["values.yaml"]))

    def comparison_error(app: dict[str, Any]) -> bool:
        conds = (app.get("status") or {}).get("conditions") or []
        return any(c["type"] == "ComparisonError" for c in conds)

    app = wait_for(lambda: get_app(kube, name), comparison_error, 60, "ComparisonError", emu)
    cond = next(c for c in app["status"]["conditions"] if c["type"] == "ComparisonError")
    assert "image.tag" in cond["message"] and cond["lastTransitionTime"]
    assert app["status"]["sync"]["status"] == "Unknown"
    assert "operationState" not in app["status"]

    api = kube.api()
    api.patch_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name, {
        "spec": {"source": {"helm": {"valueFiles": ["values.yaml", "values-dev.yaml"]}}}})
    app = wait_for(lambda: get_app(kube, name),
                   lambda a: comparison_error(a) and "values-dev.yaml" in json.dumps(a["status"]["conditions"]),
                   60, "ComparisonError for the missing file", emu)
    assert app["status"]["sync"]["status"] == "Unknown"

    sha = gitops.commit({"values-dev.yaml": 'image:\n  tag: "v1"\n'})
    api.patch_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name,
                                       {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}})
    app = wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "synced after the fix", emu)
    assert not comparison_error(app)
    assert app["status"]["summary"]["images"] == [f"{images.repository}:v1"]


def _patch_image(kube: Kube, ns: str, name: str, image: str) -> None:
    dep = get_deployment(kube, ns, name)
    container = dep["spec"]["template"]["spec"]["containers"][0]["name"]
    client.AppsV1Api(kube.api().api_client).patch_namespaced_deployment(
        name, ns, {"spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}}})


def test_self_heal_restores_a_patched_image(kube: Kube, images: Images, gitops: GitOps,
                                            start_emulator: Callable[..., Emulator]) -> None:
    """selfHeal: an image changed behind Argo CD's back is put back by a new sync."""
    name, ns = unique("heal"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns, self_heal=True))
    app = wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "first sync", emu)
    syncs = len(app["status"]["history"])

    _patch_image(kube, ns, name, f"{images.repository}:v3")
    image_of = lambda: get_deployment(kube, ns, name)["spec"]["template"]["spec"]["containers"][0]["image"]  # noqa: E731
    wait_for(image_of, lambda img: img == f"{images.repository}:v1", 30, "the image restored", emu)
    app = wait_for(lambda: get_app(kube, name),
                   lambda a: len(a["status"].get("history") or []) > syncs and synced_healthy_at(sha)(a),
                   60, "a self-heal sync, synced and healthy", emu)
    assert app["status"]["history"][-1]["revision"] == sha
    wait_for(lambda: http_version(emu.ports[name]), lambda v: v == "v1", 30, "v1 served again", emu)


def test_without_self_heal_drift_shows_out_of_sync_and_runs(kube: Kube, images: Images, gitops: GitOps,
                                                           start_emulator: Callable[..., Emulator]) -> None:
    """No selfHeal: the patched image rolls out (real drift) and the Application is OutOfSync."""
    name, ns = unique("drift"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns, self_heal=False))
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "first sync", emu)

    _patch_image(kube, ns, name, f"{images.repository}:v3")
    app = wait_for(lambda: get_app(kube, name),
                   lambda a: a["status"]["sync"]["status"] == "OutOfSync" and health_is("Healthy")(a)
                   and a["status"].get("summary", {}).get("images") == [f"{images.repository}:v3"],
                   60, "OutOfSync with the drifted image running", emu)
    assert app["status"]["sync"]["revision"] == sha
    assert len(app["status"]["history"]) == 1
    res = next(r for r in app["status"]["resources"] if r["kind"] == "Deployment")
    assert res["status"] == "OutOfSync"
    wait_for(lambda: http_version(emu.ports[name]), lambda v: v == "v3", 30, "the drifted version served", emu)


def test_operation_field_syncs_a_manual_app_and_is_cleared(kube: Kube, images: Images, gitops: GitOps,
                                                          start_emulator: Callable[..., Emulator]) -> None:
    """Without automated sync the app stays OutOfSync until `.operation` asks for a sync."""
    name, ns = unique("manual"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns, auto=False))
    app = wait_for(lambda: get_app(kube, name),
                   lambda a: (a.get("status") or {}).get("sync", {}).get("status") == "OutOfSync", 60,
                   "OutOfSync", emu)
    assert app["status"]["health"]["status"] == "Missing"
    assert app["status"]["sync"]["revision"] == sha
    kube.api().patch_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name, {
        "operation": {"sync": {"revision": sha}, "initiatedBy": {"username": "admin"}}})
    app = wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "synced by the operation", emu)
    assert "operation" not in app
    assert app["status"]["operationState"]["operation"]["initiatedBy"] == {"username": "admin"}


def test_restart_adopts_running_containers(kube: Kube, images: Images, gitops: GitOps,
                                           start_emulator: Callable[..., Emulator]) -> None:
    """SIGTERM leaves the app running; a new emulator adopts the container instead of replacing it."""
    name, ns = unique("adopt"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "first sync", emu)
    d = docker.from_env()
    before = [c.id for c in d.containers.list(filters={"label": f"delivery.sandbox/application={name}"})]
    emu.stop()
    assert emu.proc.returncode == 0
    assert [c.id for c in d.containers.list(filters={"label": f"delivery.sandbox/application={name}"})] == before

    emu2 = start_emulator([name])
    wait_for(lambda: http_version(emu.ports[name]), lambda v: v == "v1", 30, "the stable port back", emu2)
    time.sleep(2)
    assert [c.id for c in d.containers.list(filters={"label": f"delivery.sandbox/application={name}"})] == before


def test_never_ready_release_exceeds_its_progress_deadline(kube: Kube, images: Images, gitops: GitOps,
                                                           start_emulator: Callable[..., Emulator]) -> None:
    """A pod that runs but never passes readiness is Degraded once progressDeadlineSeconds passes."""
    name, ns = unique("deadline"), unique("ns")
    values = values_yaml(images.repository, "v1", replicas=1, deadline=3).replace("/api/health/", "/not-there/")
    sha = gitops.commit({"values.yaml": values})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    app = wait_for(lambda: get_app(kube, name), health_is("Degraded"), 60, "Degraded", emu)
    assert app["status"]["operationState"]["syncResult"]["revision"] == sha
    dep = get_deployment(kube, ns, name)
    assert dep["spec"]["progressDeadlineSeconds"] == 3
    progressing = next(c for c in dep["status"]["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "ProgressDeadlineExceeded"
    assert progressing["message"].endswith("has timed out progressing.")
    # Argo CD 3.x keeps resource health in the app tree (resourceHealthSource: appTree), not the CR.
    assert app["status"]["resourceHealthSource"] == "appTree"
    assert all("health" not in r for r in app["status"]["resources"])


def test_deleting_with_the_resources_finalizer_cascades(kube: Kube, images: Images, gitops: GitOps,
                                                        start_emulator: Callable[..., Emulator]) -> None:
    """Deleting an Application that has Argo CD's finalizer removes its Deployment and containers."""
    name, ns = unique("gone"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    body = application(name, gitops, namespace=ns)
    body["metadata"]["finalizers"] = ["resources-finalizer.argocd.argoproj.io"]
    create_app(kube, body)
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "first sync", emu)
    kube.api().delete_namespaced_custom_object(GROUP, VERSION, "argocd", PLURAL, name)

    def gone() -> bool:
        try:
            get_app(kube, name)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(gone, bool, 30, "the Application gone", emu)
    with pytest.raises(client.ApiException) as err:
        get_deployment(kube, ns, name)
    assert err.value.status == 404
    assert docker.from_env().containers.list(all=True, filters={"label": f"delivery.sandbox/application={name}"}) == []


def _refresh(kube: Kube, name: str) -> None:
    kube.api().patch_namespaced_custom_object(
        GROUP, VERSION, "argocd", PLURAL, name,
        {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "hard"}}})


def test_a_commit_that_renders_nothing_new_starts_no_operation(kube: Kube, images: Images, gitops: GitOps,
                                                               start_emulator: Callable[..., Emulator]) -> None:
    """A later commit that only touches another file: Synced at it, Healthy, and no new sync operation."""
    name, ns = unique("same"), unique("ns")
    sha1 = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    first = wait_for(lambda: get_app(kube, name), synced_healthy_at(sha1), 90, "first sync", emu)
    sha2 = gitops.commit({"OTHER-APP.md": "another app's change\n"})
    _refresh(kube, name)
    app = wait_for(lambda: get_app(kube, name),
                   lambda a: (a["status"].get("sync") or {}).get("revision") == sha2
                   and "argocd.argoproj.io/refresh" not in (a["metadata"].get("annotations") or {}),
                   30, "compared at the new head", emu)
    st = app["status"]
    assert st["sync"]["status"] == "Synced" and st["health"]["status"] == "Healthy"
    assert st["operationState"]["syncResult"]["revision"] == sha1
    assert len(st["history"]) == len(first["status"]["history"])
    assert not app.get("operation")
    assert st["reconciledAt"] >= st["operationState"]["finishedAt"]


def test_auto_sync_sets_operation_until_it_completes(kube: Kube, images: Images, gitops: GitOps,
                                                     start_emulator: Callable[..., Emulator]) -> None:
    """Auto-sync writes `.operation` (automated, with a retry policy) and clears it with the final state."""
    name, ns = unique("op"), unique("ns")
    sha = gitops.commit({"values.yaml": values_yaml(images.repository, "v1", replicas=1)})
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def record() -> None:
        w = watch.Watch()
        for ev in w.stream(kube.api().list_namespaced_custom_object, GROUP, VERSION, "argocd", PLURAL,
                           field_selector=f"metadata.name={name}", timeout_seconds=90):
            seen.append(copy.deepcopy(ev["object"]))
            if done.is_set():
                w.stop()

    t = threading.Thread(target=record, daemon=True)
    t.start()
    time.sleep(0.5)
    emu = start_emulator([name])
    create_app(kube, application(name, gitops, namespace=ns))
    wait_for(lambda: get_app(kube, name), synced_healthy_at(sha), 90, "synced", emu)
    done.set()
    _refresh(kube, name)  # one more event, so the recorder notices it may stop
    t.join(30)
    with_op = [o for o in seen if o.get("operation")]
    assert with_op, "no state with .operation was ever written"
    assert all(o["operation"].get("initiatedBy", {}).get("automated") for o in with_op)
    assert all(o["operation"].get("retry", {}).get("limit") for o in with_op)
    # `.operation` is still there while the operation runs, and gone once it succeeded.
    assert any((o.get("status") or {}).get("operationState", {}).get("phase") == "Running" for o in with_op)
    assert not any((o.get("status") or {}).get("operationState", {}).get("phase") == "Succeeded"
                   and o.get("operation") for o in seen)
