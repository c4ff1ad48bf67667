"""Scale-out on an existing engine: a Prefect server on PostgreSQL, a `process` work pool served by
two workers, and ten apps deploying at once on one sandbox, all verified end to end."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import git
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from ruamel.yaml import YAML

from delivery.settings import PROJECT_ROOT
from sandbox import engine
from sandbox.manager import CHART_PATH, IMAGE_REPOSITORY, Sandbox, SandboxState, free_port, prefect_server_env
from tests.deployments.conftest import POOL, PREFECT, cli_env, prefect_cli
from tests.fixtures_sandbox import free_port_block
from tests.postgres import private_postgres

pytestmark = [pytest.mark.scale, pytest.mark.docker, pytest.mark.sandbox]

APPS = int(os.environ.get("DELIVERY_SCALE_APPS", "10"))
# One shared GitOps repository by default, as teams run it: another app's values commit often lands
# before Argo CD syncs ours, and the deploy must accept the newer head that still carries its tag.
# DELIVERY_SCALE_SHARED_GITOPS=0 gives each app its own repository instead.
SHARED_GITOPS = os.environ.get("DELIVERY_SCALE_SHARED_GITOPS", "1") != "0"
WORKERS = 2
# Each worker takes at most half the burst, so both must run some of it.
WORKER_LIMIT = (APPS + WORKERS - 1) // WORKERS
# Generous: ten builds, ten Git pushes racing on one branch and ten rollouts on two cores.
WAITS = {"sync_timeout": 600.0, "rollout_timeout": 300.0, "health_timeout": 180.0}
RUNS_TIMEOUT = 1500
LOCKED = "database is locked"


def _log_tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _http_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(0.2)
    with suppress(ProcessLookupError):  # children (flow-run processes) the leader left behind
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# ---------------------------------------------------------------- PostgreSQL and the Prefect server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL cluster on a free loopback port (scripts/postgres.sh), removed at the end."""
    with private_postgres() as (url, _):
        yield url


@dataclass
class Server:
    api_url: str
    log: Path


@pytest.fixture(scope="module")
def server(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`prefect server start` on PostgreSQL with a home of its own."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(prefect_server_env(home))
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_url
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                cwd=home, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while _http_json(f"{api}/health") is not True:
            assert proc.poll() is None, f"the Prefect server exited:\n{_log_tail(log)}"
            assert time.monotonic() < deadline, f"the Prefect server did not answer:\n{_log_tail(log)}"
            time.sleep(1)
        yield Server(api, log)
    finally:
        _stop_group(proc)


# ---------------------------------------------------------------- ten apps on one sandbox


@dataclass
class ScaleApp:
    name: str
    application: str
    namespace: str
    values_path: str
    image: str
    port: int
    gitops_remote: Path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/health/"


@dataclass
class Fleet:
    sandbox: SandboxState
    apps: list[ScaleApp]
    config_file: Path
    gitops_base: str  # the GitOps commit that added the apps' values files


def _git_clone(remote: Path, path: Path) -> git.Repo:
    repo = git.Repo.clone_from(str(remote), path, branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "scale-test")
        cw.set_value("user", "email", "scale-test@example.com")
    return repo


def _add_values_files(st: SandboxState, apps: list[ScaleApp], work: Path) -> str:
    """One GitOps commit with a values file per app (its own image repository, the initial tag)."""
    repo = _git_clone(st.gitops_remote, work / "gitops-setup")
    yaml = YAML()
    for a in apps:
        text = (f"# {a.name}: Argo CD Application {a.application}, namespace {a.namespace} (scale test).\n"
                f"image:\n  repository: {a.image}\n  tag: \"{st.initial_tag}\"\nreplicaCount: 1\n")
        yaml.load(text)  # must parse
        (Path(repo.working_tree_dir) / a.values_path).write_text(text)
    repo.index.add([a.values_path for a in apps])
    repo.index.commit(f"Add {len(apps)} apps for the scale test")
    repo.remotes.origin.push("main:main")
    return repo.head.commit.hexsha


def _push_initial_images(st: SandboxState, apps: list[ScaleApp]) -> None:
    """The initial image under each app's own repository, so every app starts Healthy."""
    from tasks.images import push_image

    client = docker.from_env(timeout=120)
    try:
        src = f"{IMAGE_REPOSITORY}:{st.initial_tag}"
        try:
            image = client.images.get(src)
        except docker.errors.ImageNotFound:
            image = client.images.pull(IMAGE_REPOSITORY, tag=st.initial_tag)
        for a in apps:
            image.tag(a.image, st.initial_tag)
            push_image(a.image, [st.initial_tag])
    finally:
        client.close()


def _add_applications(st: SandboxState, apps: list[ScaleApp]) -> None:
    """An Argo CD Application per app, shaped like workout-api-dev: its own name, namespace and values."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(st.kubeconfig))
    try:
        co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        dev = co.get_namespaced_custom_object("argoproj.io", "v1alpha1", "argocd", "applications", "workout-api-dev")
        for a in apps:
            obj = {"apiVersion": dev["apiVersion"], "kind": dev["kind"],
                   "metadata": {"name": a.application, "namespace": "argocd",
                                "labels": dict(dev["metadata"].get("labels") or {}),
                                "finalizers": list(dev["metadata"].get("finalizers") or [])},
                   "spec": copy.deepcopy(dev["spec"])}
            obj["spec"]["destination"]["namespace"] = a.namespace
            obj["spec"]["source"]["repoURL"] = str(a.gitops_remote)
            obj["spec"]["source"]["helm"]["valueFiles"] = ["values.yaml", a.values_path.rsplit("/", 1)[-1]]
            with suppress(client.exceptions.ApiException):
                core.create_namespace({"metadata": {"name": a.namespace}})
            co.create_namespaced_custom_object("argoproj.io", "v1alpha1", "argocd", "applications", obj)
    finally:
        api.close()


def _write_config(st: SandboxState, apps: list[ScaleApp], path: Path) -> None:
    data = {"apps": {a.name: {
        "source_repo": str(st.source_remote), "context": ".", "dockerfile": "Dockerfile", "image": a.image,
        "default_branch": "main", "build_args": {"BASE_IMAGE": engine.BASE_IMAGE},
        "gitops_repo": str(a.gitops_remote), "gitops_branch": "main", "chart_path": CHART_PATH,
        "environments": {"dev": {
            "branches": ["main"], "values_file": a.values_path.rsplit("/", 1)[-1], "application": a.application,
            "argocd_namespace": "argocd", "namespace": a.namespace, "deployment": "workout-api",
            "health_url": a.health_url}},
    } for a in apps}}
    with open(path, "w") as f:
        YAML().dump(data, f)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A sandbox of this module's own with APPS apps (app-0..), each Healthy at the initial tag."""
    root = tmp_path_factory.mktemp("scale-sandbox")
    sb = Sandbox(root, prefect=False, reconcile_interval=180, app_port_base=free_port_block())
    try:
        st = sb.up()
        token = uuid.uuid4().hex[:8]
        base = free_port_block(APPS)
        apps = [ScaleApp(name=f"app-{i}", application=f"app-{i}-dev", namespace=f"scale-app-{i}",
                         values_path=f"{CHART_PATH}/values-app-{i}.yaml",
                         image=f"{engine.REGISTRY_ADDR}/scale-{token}/app-{i}", port=base + 1 + i,
                         gitops_remote=st.gitops_remote if SHARED_GITOPS else root / "git" / f"gitops-app-{i}.git")
                for i in range(APPS)]
        work = tmp_path_factory.mktemp("scale-work")
        gitops_base = _add_values_files(st, apps, work)
        for a in apps:
            if a.gitops_remote != st.gitops_remote:
                git.Repo.clone_from(str(st.gitops_remote), a.gitops_remote, bare=True)
        _push_initial_images(st, apps)
        # The Argo CD emulator re-reads the ports file whenever it opens an app's port.
        ports = json.loads(sb.ports_file.read_text())
        ports.update({a.application: a.port for a in apps})
        tmp = sb.ports_file.with_name("ports.json.tmp")
        tmp.write_text(json.dumps(ports, indent=2) + "\n")
        tmp.replace(sb.ports_file)
        _add_applications(st, apps)
        config_file = root / "delivery-scale.yaml"
        _write_config(st, apps, config_file)
        for a in apps:
            _wait(lambda a=a: (_http_json(a.health_url) or {}).get("version") == st.initial_tag, 300,
                  f"{a.name} healthy at {st.initial_tag} ({a.health_url}); argocd log:\n"
                  f"{_log_tail(root / 'logs' / 'argocd.log')}")
        yield Fleet(st, apps, config_file, gitops_base)
    finally:
        sb.down()


def _new_source_commit(st: SandboxState, work: Path) -> str:
    repo = _git_clone(st.source_remote, work)
    settings = Path(repo.working_tree_dir) / "app" / "settings.env"
    settings.write_text(settings.read_text() + f"# note: scale test {uuid.uuid4().hex[:8]}\n")
    repo.index.add(["app/settings.env"])
    repo.index.commit("change: scale test")
    repo.remotes.origin.push("main:main")
    return repo.head.commit.hexsha


# ---------------------------------------------------------------- workers


@contextmanager
def _worker(env: dict[str, str], cwd: Path, log: Path) -> Iterator[Path]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", str(WORKER_LIMIT)],
                                env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield log
    finally:
        _stop_group(proc)


def _read_runs(ids: list[uuid.UUID]) -> list[Any]:
    async def read() -> list[Any]:
        async with get_client() as c:
            return [await c.read_flow_run(i) for i in ids]
    return run_coro_as_sync(read())


def _values_commits(remote: Path, work: Path, base: str, path: str) -> tuple[list[str], str]:
    """The commits after `base` that touch `path` on main, and the tag the file names now."""
    repo = git.Repo(work) if work.exists() else git.Repo.clone_from(str(remote), work, branch="main")
    repo.remotes.origin.fetch()
    repo.git.reset("--hard", "origin/main")
    shas = [c.hexsha for c in repo.iter_commits(f"{base}..origin/main", paths=path)]
    tag = YAML(typ="safe").load((work / path).read_text())["image"]["tag"]
    return shas, str(tag)


def _ran(run_id: str, worker_log: str) -> bool:
    """Did this worker start the run? Both workers try to submit it; the server aborts the loser."""
    return f"submitting flow run '{run_id}'" in worker_log and f"Aborted submission of flow run '{run_id}'" \
        not in worker_log


@pytest.mark.timeout(RUNS_TIMEOUT + 900)
def test_ten_apps_deploy_at_once_on_postgres_with_two_workers(server, fleet, tmp_path):
    """Ten deploys at once on a PostgreSQL-backed server and two workers: all Completed and verified,
    one values commit per app, both workers used, no `database is locked` anywhere."""
    st = fleet.sandbox
    env = cli_env(server.api_url, tmp_path / "cli-home")
    pool = prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stdout + pool.stderr
    res = prefect_cli(["--no-prompt", "deploy", "--all"], env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    sha = _new_source_commit(st, tmp_path / "src")
    tag = f"main-{sha[:7]}"
    worker_env = {**env, "DELIVERY_PROJECT_DIR": str(PROJECT_ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
                  "DELIVERY_SANDBOX_DIR": str(st.root), "DELIVERY_CONFIG_FILE": str(fleet.config_file),
                  "DELIVERY_KUBECONFIG": str(st.kubeconfig)}
    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    with ExitStack() as workers, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        for i, log in enumerate(logs):
            (tmp_path / f"w{i}").mkdir()
            workers.enter_context(_worker(worker_env, tmp_path / f"w{i}", log))
        t0 = time.monotonic()
        started = [run_deployment("deploy/deploy", timeout=0, parameters={
            "app": a.name, "environment": "dev", "source_ref": "refs/heads/main", "source_sha": sha, **WAITS})
            for a in fleet.apps]
        ids = [r.id for r in started]
        deadline = time.monotonic() + RUNS_TIMEOUT
        runs = _read_runs(ids)
        while not all(r.state is not None and r.state.is_final() for r in runs):
            assert time.monotonic() < deadline, (
                "runs not final: " + ", ".join(f"{r.name}={r.state_name}" for r in runs)
                + "".join(f"\n--- {p.name}:\n{_log_tail(p)}" for p in logs))
            time.sleep(3)
            runs = _read_runs(ids)
        wall = time.monotonic() - t0

    worker_text = [p.read_text(errors="replace") for p in logs]
    summary = ", ".join(f"{r.name}={r.state_name}: {r.state.message}" for r in runs if not r.state.is_completed())
    assert all(r.state.is_completed() for r in runs), summary + "".join(f"\n---\n{t[-3000:]}" for t in worker_text)

    durations = sorted(r.total_run_time.total_seconds() for r in runs)
    per_worker = [sum(_ran(str(i), text) for i in ids) for text in worker_text]
    print(f"\nscale: {APPS} deploys at once ({'one shared GitOps repo' if SHARED_GITOPS else 'a GitOps repo each'}), "
          f"{WORKERS} workers (limit {WORKER_LIMIT} each): all Completed in "
          f"{wall:.0f} s; run time min {durations[0]:.0f} s, median {durations[len(durations) // 2]:.0f} s, "
          f"max {durations[-1]:.0f} s; runs per worker {per_worker}")

    assert all(n >= 1 for n in per_worker) and sum(per_worker) == APPS, per_worker
    named = [("server", _log_tail(server.log, 10**7))] + [(f"worker-{i}", t) for i, t in enumerate(worker_text)]
    for name, text in named:
        assert LOCKED not in text.lower(), f"{name} log says {LOCKED!r}"
    for a in fleet.apps:
        shas, now = _values_commits(a.gitops_remote, tmp_path / f"gitops-check-{a.name}", fleet.gitops_base,
                                    a.values_path)
        assert len(shas) == 1, f"{a.name}: {len(shas)} values commits after the setup commit"
        assert now == tag, f"{a.name}: values name {now}, expected {tag}"
        assert (_http_json(a.health_url) or {}).get("version") == tag, f"{a.name} does not serve {tag}"
