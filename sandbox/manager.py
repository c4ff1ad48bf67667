"""The sandbox manager behind `delivery sandbox up|down|status|reset`.

`up` brings every part of the one-machine environment up, each only when it is not already running
(its recorded pid alive and its address answering), and records what it started in
`<root>/state.json`:

- the Docker engine, the registry on 127.0.0.1:5000 and the base image (sandbox/engine.py);
- bare Git repositories under `<root>/git/`: `gitops.git` (this repository's helm/ and argocd/,
  pointed at the sandbox registry and the initial image tags), shared by both sample apps, and one
  source repository per app: `workout-api.git` and `nutrition-api.git` (from examples/);
- the initial image of each app, built from its source repository's first commit and pushed;
- the Kubernetes API emulator (sandbox/kube.py) with the Argo CD Applications of both apps in dev,
  staging and prod (the same environment names), and `<root>/kubeconfig`;
- the Argo CD emulator (sandbox/argocd), which runs the apps as containers on fixed host ports;
- a Prefect server on 127.0.0.1:4200 (optional; `DELIVERY_PREFECT_PORT` moves it);
- `<root>/delivery.yaml`, the delivery config for all of the above.

`down` stops what `up` started and only that, by recorded process id (never by name), and removes the
containers the Argo CD emulator started for this root. A part that was already running when `up`
came (a shared registry, a system dockerd) is "external" and never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from delivery.errors import SandboxError
from delivery.settings import PROJECT_ROOT, get_settings
from sandbox import engine
from sandbox.kube import write_kubeconfig

APP = "workout-api"
IMAGE_REPOSITORY = f"{engine.REGISTRY_ADDR}/{APP}"
CHART_PATH = "helm/workout-api"
# Overridable so that a second stack (CI, a demo beside a developer's) can run on other ports.
PREFECT_PORT = int(os.environ.get("DELIVERY_PREFECT_PORT", "4200"))
APP_PORT_BASE = int(os.environ.get("DELIVERY_APP_PORT_BASE", "18080"))
LABEL = "delivery.sandbox"
KUBECTL = PROJECT_ROOT / ".tools" / "bin" / "kubectl"


@dataclass(frozen=True)
class EnvSpec:
    name: str
    port_offset: int
    namespace: str
    branches: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def application(self) -> str:
        return f"{APP}-{self.name}"


ENVIRONMENTS = (
    EnvSpec("dev", 1, "woodez-database-dev", branches=("release-dev",)),
    EnvSpec("staging", 2, "woodez-database-staging", branches=("main",)),
    EnvSpec("prod", 3, "woodez-database", tags=("v*.*.*",)),
)


@dataclass(frozen=True)
class AppSpec:
    """A sample app of the sandbox: its source (examples/<name>), its chart and Argo CD manifests in
    the one shared GitOps repository, and its environments (the same names for every app)."""

    name: str
    chart_path: str
    # Directory holding this app's `overlays/<env>` kustomizations.
    argocd_dir: str
    environments: tuple[EnvSpec, ...]
    summary: str

    @property
    def image(self) -> str:
        return f"{engine.REGISTRY_ADDR}/{self.name}"

    def application(self, env: EnvSpec) -> str:
        return f"{self.name}-{env.name}"


# Promotions in the sandbox, the same for every app: dev's verified image goes on to staging by itself,
# and on to prod only with an approval in the Prefect UI (`delivery promote APP staging prod`).
PROMOTIONS: dict[str, dict[str, Any]] = {
    "staging": {"promote_from": "dev", "auto": True},
    "prod": {"promote_from": "staging", "approval": "required"},
}

SECOND_APP = "nutrition-api"
APPS = (
    AppSpec(APP, CHART_PATH, "argocd", ENVIRONMENTS, "the workout API"),
    # The common layout of a shared GitOps repository: another chart beside the first, the same
    # environment names, its own Applications, namespaces and ports.
    AppSpec(SECOND_APP, f"helm/{SECOND_APP}", f"argocd/{SECOND_APP}", (
        EnvSpec("dev", 4, "nutrition-dev", branches=("release-dev",)),
        EnvSpec("staging", 5, "nutrition-staging", branches=("main",)),
        EnvSpec("prod", 6, "nutrition", tags=("v*.*.*",)),
    ), "the nutrition API"),
)


@dataclass
class SandboxState:
    root: Path
    kubeconfig: Path
    kube_url: str
    gitops_remote: Path
    source_remote: Path
    registry: str
    config_file: Path
    ports: dict[str, int]
    initial_tag: str
    prefect_api_url: str | None
    # Parts this sandbox started, by name; external parts are not here.
    pids: dict[str, int] = field(default_factory=dict)
    # Every app's source repository and initial tag, by app name (the fields above are workout-api's).
    source_remotes: dict[str, Path] = field(default_factory=dict)
    initial_tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartStatus:
    name: str
    address: str
    healthy: bool
    pid: int | None = None
    # "started" (ours), "external" (running before us, never stopped), "stopped", "disabled"
    ownership: str = "started"
    detail: str = ""


# ---------------------------------------------------------------- state.json


def load_state(path: Path) -> dict[str, Any]:
    """A sandbox's recorded state (parts, pids, options); {} when there is none yet or it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_state(path: Path, raw: dict[str, Any]) -> None:
    """Written atomically: a `down` from another shell must never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- processes


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks: together with the pid it names one process, so a pid
    reused by an unrelated process is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # a zombie has finished
        return None
    return int(fields[19])


def _alive(rec: dict[str, Any] | None) -> bool:
    if not rec or not rec.get("pid"):
        return False
    ticks = _start_ticks(int(rec["pid"]))
    return ticks is not None and ticks == rec.get("start")


# Children started by this very process: reaped on stop so they do not linger as zombies.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(name: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None) -> dict[str, Any]:
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), full_env.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        # A session of its own: the part outlives the CLI that started it, and `down` can signal the
        # whole process group it forms (the Prefect server runs workers of its own).
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=PROJECT_ROOT, env=full_env, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return {"pid": proc.pid, "start": _start_ticks(proc.pid), "log": str(log), "name": name}


def _stop(rec: dict[str, Any], timeout: float = 10.0) -> None:
    """SIGTERM the recorded process (and the group it leads), SIGKILL after `timeout`."""
    pid = int(rec["pid"])

    def signal_it(sig: int) -> None:
        if not _alive(rec):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    signal_it(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(rec) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if _alive(rec):
        signal_it(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(rec) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
    _reap(pid)


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs we built
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: str | Path | None, n: int = 2000) -> str:
    if not path or not Path(path).exists():
        return ""
    return Path(path).read_text(errors="replace")[-n:]


def _wait_until(pred: Any, timeout: float, what: str, rec: dict[str, Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if rec is not None and not _alive(rec):
            raise SandboxError(f"{what} exited while starting; last log lines:\n{_log_tail(rec.get('log'))}")
        time.sleep(0.1)
    tail = _log_tail(rec.get("log")) if rec else ""
    raise SandboxError(f"{what} did not answer within {timeout:.0f} s; last log lines:\n{tail}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def prefect_server_env(home: Path) -> dict[str, str]:
    """The environment of the Prefect server the sandbox starts (tests start one the same way)."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # Leases of concurrency slots (the deploy lock) live in memory by default: a server restart
        # then forgets them while the slot stays taken in the database, and the lock is held forever.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    }


# ---------------------------------------------------------------- git


def _git(*args: str, cwd: Path | None = None) -> str:
    s = get_settings()
    argv = ["git", "-c", f"user.name={s.git_author_name}", "-c", f"user.email={s.git_author_email}",
            "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args]
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SandboxError(f"git {' '.join(args[:2])} failed: {res.stderr.strip()[-800:]}")
    return res.stdout.strip()


def _seed_bare(bare: Path, tree: Path, message: str, branches: tuple[str, ...] = ("main",)) -> None:
    """Commit `tree` as the first commit and push it to a new bare repo at `bare`, atomically: the
    repo appears under its final name only once complete, so its presence means "seeded"."""
    _git("init", "-q", "-b", "main", str(tree))
    _git("add", "-A", cwd=tree)
    _git("commit", "-q", "-m", message, cwd=tree)
    tmp_bare = bare.with_name(bare.name + ".seeding")
    shutil.rmtree(tmp_bare, ignore_errors=True)
    _git("init", "-q", "--bare", "-b", "main", str(tmp_bare))
    _git("push", "-q", str(tmp_bare), *[f"main:refs/heads/{b}" for b in branches], cwd=tree)
    tmp_bare.rename(bare)


def root_commit(bare: Path, branch: str = "main") -> str:
    return _git("rev-list", "--max-parents=0", branch, cwd=bare).splitlines()[-1]


def _set_values(values: Path, repository: str) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments and order stay
    yaml.preserve_quotes = True
    yaml.width = 4096
    data = yaml.load(values.read_text())
    data["image"]["repository"] = repository
    with open(values, "w") as f:
        yaml.dump(data, f)


def _set_tag(values: Path, tag: str) -> None:
    try:
        from tasks.values import bump_image_tag
    except ImportError:
        bump_image_tag = None
    if bump_image_tag is not None:
        bump_image_tag(values, tag)
        return
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    data = yaml.load(values.read_text())
    data.setdefault("image", {})["tag"] = tag
    with open(values, "w") as f:
        yaml.dump(data, f)


# ---------------------------------------------------------------- the sandbox


class Sandbox:
    def __init__(self, root: Path | None = None, *, reconcile_interval: float = 180,
                 prefect: bool = True, app_port_base: int = APP_PORT_BASE,
                 kube_port: int | None = None, kube_args: list[str] | None = None, real: bool = False) -> None:
        self.root = Path(root if root is not None else get_settings().sandbox_dir).resolve()
        # The real tier (sandbox/real.py): a real Kubernetes and Argo CD instead of the emulators; the
        # repositories, images and config are the same, only the cluster behind the kubeconfig differs.
        self.real = real
        # Extra arguments for `python -m sandbox.kube`, e.g. ["--drop-watch-after", "1"] for fault tests.
        self.kube_args = list(kube_args or [])
        self.reconcile_interval = reconcile_interval
        self.prefect = prefect
        self.app_port_base = app_port_base
        self.kube_port = kube_port

    # -- paths

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def gitops_remote(self) -> Path:
        return self.root / "git" / "gitops.git"

    @property
    def source_remote(self) -> Path:
        return self.source_remote_of(APP)

    def source_remote_of(self, app: str) -> Path:
        return self.root / "git" / f"{app}.git"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def config_file(self) -> Path:
        return self.root / "delivery.yaml"

    @property
    def ports_file(self) -> Path:
        return self.root / "ports.json"

    @property
    def ports(self) -> dict[str, int]:
        return {a.application(e): self.app_port_base + e.port_offset for a in APPS for e in a.environments}

    # -- state.json

    def _load(self) -> dict[str, Any]:
        return load_state(self.state_file)

    def _save(self, raw: dict[str, Any]) -> None:
        save_state(self.state_file, raw)

    # -- up

    def up(self) -> SandboxState:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        raw = self._load()
        parts: dict[str, Any] = raw.setdefault("parts", {})
        # What `status` and `down` from a later CLI call need to know about this sandbox.
        raw["options"] = {"prefect": self.prefect, "reconcile_interval": self.reconcile_interval,
                          "app_port_base": self.app_port_base,
                          "real": self.real}
        self._save(raw)

        self._engine_part(parts, "dockerd", lambda: engine.ensure_dockerd(self.logs), engine.docker_ok,
                          "unix:///var/run/docker.sock")
        self._engine_part(parts, "registry", lambda: engine.ensure_registry(self.root / "registry", self.logs),
                          engine.registry_ok, f"http://{engine.REGISTRY_ADDR}")
        self._save(raw)
        engine.ensure_base_image()

        # Slow starters first, waited for last.
        prefect_rec = self._start_prefect(parts) if self.prefect else None
        self._save(raw)
        kube_url = self._real_cluster().up()["server"] if self.real else self._start_kube(parts)
        self._save(raw)

        initial_tags = {}
        for a in APPS:
            self._seed_source(a)
            initial_tags[a.name] = f"main-{root_commit(self.source_remote_of(a.name))[:7]}"
        self._seed_gitops(initial_tags)
        for a in APPS:
            self._ensure_initial_image(a, initial_tags[a.name])
        initial_tag = initial_tags[APP]

        if self.real:
            shutil.copyfile(self._real_cluster().kubeconfig, self.kubeconfig)
            os.chmod(self.kubeconfig, 0o600)
            self._create_app_secrets()
        else:
            write_kubeconfig(self.kubeconfig, kube_url)
        self._apply_applications()
        self._write_json(self.ports_file, self.ports)
        self._write_config()

        if not self.real:
            # On the real tier Argo CD's own controller and repo-server run (started by RealCluster).
            self._start_argocd(parts)
        self._save(raw)

        prefect_url = None
        if self.prefect:
            if prefect_rec is not None:
                _wait_until(lambda: _http_ok(self._prefect_health), 120, "the Prefect server", prefect_rec)
            prefect_url = f"http://127.0.0.1:{PREFECT_PORT}/api"

        state = SandboxState(
            root=self.root, kubeconfig=self.kubeconfig, kube_url=kube_url, gitops_remote=self.gitops_remote,
            source_remote=self.source_remote, registry=engine.REGISTRY_ADDR, config_file=self.config_file,
            ports=self.ports, initial_tag=initial_tag, prefect_api_url=prefect_url,
            pids={name: rec["pid"] for name, rec in parts.items() if rec.get("pid")},
            source_remotes={a.name: self.source_remote_of(a.name) for a in APPS}, initial_tags=initial_tags,
        )
        raw["state"] = asdict(state)
        self._save(raw)
        return state

    def _real_cluster(self) -> Any:
        from sandbox.real import RealCluster

        return RealCluster(self.root / "real")

    def _create_app_secrets(self) -> None:
        """The Secret the workout-api chart reads (`workout-api-secrets`), made out of band in each of its
        namespaces as its values.yaml says a team does: random values, never in Git. The emulator ignores
        secretKeyRefs; a real kubelet does not start the container without them."""
        import secrets as pysecrets

        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        try:
            core = client.CoreV1Api(api)
            for env in ENVIRONMENTS:
                _create_ok_if_exists(lambda ns=env.namespace: core.create_namespace({"metadata": {"name": ns}}))
                body = {"metadata": {"name": f"{APP}-secrets"}, "type": "Opaque", "stringData": {
                    "django-secret-key": pysecrets.token_urlsafe(32), "postgres-password": pysecrets.token_urlsafe(24),
                    "mongodb-password": pysecrets.token_urlsafe(24)}}
                _create_ok_if_exists(lambda ns=env.namespace, body=body: core.create_namespaced_secret(ns, body))
        finally:
            api.close()

    def _engine_part(self, parts: dict[str, Any], name: str, ensure: Any, ok: Any, address: str) -> None:
        rec = parts.get(name)
        if _alive(rec) and ok():
            return
        pid = ensure()
        if pid is None:
            parts[name] = {"external": True, "address": address}
        else:
            parts[name] = {"pid": pid, "start": _start_ticks(pid), "address": address,
                           "log": str(self.logs / f"{name}.log")}

    def _start_kube(self, parts: dict[str, Any]) -> str:
        rec = parts.get("kube")
        if _alive(rec) and _http_ok(f"{rec['address']}/healthz"):
            return str(rec["address"])
        if rec and _alive(rec):
            _stop(rec)  # alive but not answering: a hung emulator is no use
        # The same port as last time when possible, so kubeconfigs already handed out stay valid.
        port = self.kube_port or (rec or {}).get("port")
        if not port or (not self.kube_port and not _port_free(int(port))):
            port = free_port()
        port_file = self.root / "kube.port"
        port_file.unlink(missing_ok=True)
        new = _spawn("kube", [sys.executable, "-m", "sandbox.kube", "--host", "127.0.0.1", "--port", str(port),
                              "--port-file", str(port_file), *self.kube_args], self.logs / "kube.log")
        url = f"http://127.0.0.1:{port}"
        new.update(address=url, port=port)
        parts["kube"] = new
        _wait_until(lambda: _http_ok(f"{url}/healthz", 1), 30, "the Kubernetes API emulator", new)
        return url

    @property
    def _prefect_health(self) -> str:
        return f"http://127.0.0.1:{PREFECT_PORT}/api/health"

    def _start_prefect(self, parts: dict[str, Any]) -> dict[str, Any] | None:
        rec = parts.get("prefect")
        if _alive(rec):
            # Ours and running; up() waits for it to answer.
            return rec
        if _http_ok(self._prefect_health):
            parts["prefect"] = {"external": True, "address": f"http://127.0.0.1:{PREFECT_PORT}/api"}
            return None
        home = self.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("prefect")
        argv = [str(exe) if exe.exists() else "prefect", "server", "start", "--host", "127.0.0.1",
                "--port", str(PREFECT_PORT)]
        # The UI asks the server where its API is; without this it answers port 4200 whatever `--port` says.
        env = {**prefect_server_env(home), "PREFECT_UI_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api"}
        new = _spawn("prefect", argv, self.logs / "prefect.log", env=env)
        new["address"] = f"http://127.0.0.1:{PREFECT_PORT}/api"
        parts["prefect"] = new
        return new

    def _start_argocd(self, parts: dict[str, Any]) -> None:
        rec = parts.get("argocd")
        if _alive(rec):
            return
        if not any((PROJECT_ROOT / "sandbox" / p).exists() for p in ("argocd", "argocd.py")):
            print("sandbox: warning: sandbox/argocd is missing; the Argo CD emulator is not started", file=sys.stderr)
            parts.pop("argocd", None)
            return
        argv = [sys.executable, "-m", "sandbox.argocd", "--kubeconfig", str(self.kubeconfig),
                "--interval", str(self.reconcile_interval), "--ports-file", str(self.ports_file),
                "--root", str(self.root), "--cache-dir", str(self.root / "argocd-cache"),
                "--log-file", str(self.logs / "argocd.log")]
        new = _spawn("argocd", argv, self.logs / "argocd.out")
        new["address"] = f"kubeconfig {self.kubeconfig}"
        parts["argocd"] = new
        time.sleep(0.2)
        if not _alive(new):
            raise SandboxError(f"the Argo CD emulator exited at start; last log lines:\n"
                               f"{_log_tail(new['log'])}{_log_tail(self.logs / 'argocd.log')}")

    # -- repositories and image

    def _seed_source(self, a: AppSpec) -> None:
        remote = self.source_remote_of(a.name)
        if remote.exists():
            return
        remote.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="seed-src-", dir=self.root) as tmp:
            tree = Path(tmp) / "tree"
            shutil.copytree(PROJECT_ROOT / "examples" / a.name, tree, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".git"))
            _seed_bare(remote, tree, f"Initial commit of {a.summary}", ("main", "release-dev"))

    def _seed_gitops(self, initial_tags: dict[str, str]) -> None:
        if self.gitops_remote.exists():
            return
        self.gitops_remote.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="seed-gitops-", dir=self.root) as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            for top in ("helm", "argocd"):
                shutil.copytree(PROJECT_ROOT / top, tree / top, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "charts", "*.tgz"))
            for a in APPS:
                chart = tree / a.chart_path
                _set_values(chart / "values.yaml", a.image)
                for env in a.environments:
                    _set_tag(chart / f"values-{env.name}.yaml", initial_tags[a.name])
            listed = ", ".join(f"{a.name} {initial_tags[a.name]}" for a in APPS)
            _seed_bare(self.gitops_remote, tree, f"Deploy {listed} to every environment")

    def _ensure_initial_image(self, a: AppSpec, tag: str) -> None:
        from tasks.images import build_image, image_exists, push_image

        if image_exists(a.image, tag):
            return
        remote = self.source_remote_of(a.name)
        sha = root_commit(remote)
        with tempfile.TemporaryDirectory(prefix="initial-image-", dir=self.root) as tmp:
            archive = Path(tmp) / "src.tar"
            _git("archive", "--format=tar", "-o", str(archive), sha, cwd=remote)
            ctx = Path(tmp) / "ctx"
            with tarfile.open(archive) as tar:
                tar.extractall(ctx, filter="data")
            build_image(ctx, a.image, [tag], revision=sha, source=str(remote),
                        build_args={"BASE_IMAGE": engine.BASE_IMAGE, "APP_VERSION": tag})
        push_image(a.image, [tag])

    # -- Kubernetes objects and config

    def _render_applications(self) -> list[dict[str, Any]]:
        from ruamel.yaml import YAML

        if not KUBECTL.exists():
            raise SandboxError(f"{KUBECTL} is missing: run `make setup` to install helm and kubectl")
        apps = []
        for a, env in [(app, e) for app in APPS for e in app.environments]:
            overlay = PROJECT_ROOT / a.argocd_dir / "overlays" / env.name
            res = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SandboxError(f"kubectl kustomize {a.argocd_dir}/overlays/{env.name} failed: "
                                   f"{res.stderr.strip()}")
            for doc in YAML(typ="safe").load_all(res.stdout):
                if isinstance(doc, dict) and doc.get("kind") == "Application":
                    # The committed manifests name the GitHub repository; the sandbox serves its own
                    # (real Argo CD wants a URL: file:// is what its own e2e tests use).
                    doc["spec"]["source"]["repoURL"] = (f"file://{self.gitops_remote}" if self.real
                                                        else str(self.gitops_remote))
                    apps.append(doc)
        return apps

    def _apply_applications(self) -> None:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        try:
            co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
            existing = {a["metadata"]["name"] for a in co.list_namespaced_custom_object(
                "argoproj.io", "v1alpha1", "argocd", "applications")["items"]}
            if all(a.application(e) in existing for a in APPS for e in a.environments):
                return
            apps = self._render_applications()
            namespaces = {"argocd"} | {a["spec"]["destination"]["namespace"] for a in apps}
            for ns in sorted(namespaces):
                _create_ok_if_exists(lambda ns=ns: core.create_namespace({"metadata": {"name": ns}}))
            for app in apps:
                ns = app["metadata"].get("namespace", "argocd")
                _create_ok_if_exists(lambda app=app, ns=ns: co.create_namespaced_custom_object(
                    "argoproj.io", "v1alpha1", ns, "applications", app))
        finally:
            api.close()

    def _write_config(self) -> None:
        from ruamel.yaml import YAML

        apps: dict[str, Any] = {}
        for a in APPS:
            envs = {}
            for e in a.environments:
                entry: dict[str, Any] = {}
                if e.branches:
                    entry["branches"] = list(e.branches)
                if e.tags:
                    entry["tags"] = list(e.tags)
                # On the real tier the app is reached through the API server's service proxy (the
                # Service in front of the pods, as the chart renders it: port 80).
                health = (f"kube-proxy://{e.namespace}/{a.name}:80/api/health/" if self.real
                          else f"http://127.0.0.1:{self.ports[a.application(e)]}/api/health/")
                entry.update(values_file=f"values-{e.name}.yaml", application=a.application(e),
                             argocd_namespace="argocd", namespace=e.namespace, deployment=a.name,
                             health_url=health)
                entry.update(PROMOTIONS.get(e.name, {}))
                envs[e.name] = entry
            apps[a.name] = {
                "source_repo": str(self.source_remote_of(a.name)),
                "context": ".",
                "dockerfile": "Dockerfile",
                "image": a.image,
                "default_branch": "main",
                # The sandbox has no Docker Hub: the sample apps build on the local busybox image.
                "build_args": {"BASE_IMAGE": engine.BASE_IMAGE},
                "gitops_repo": str(self.gitops_remote),
                "gitops_branch": "main",
                "chart_path": a.chart_path,
                "environments": envs,
            }
        data = {"apps": apps}
        tmp = self.config_file.with_name("delivery.yaml.tmp")
        with open(tmp, "w") as f:
            f.write("# Written by `delivery sandbox up`: the delivery config of the local sandbox.\n")
            yaml = YAML()
            yaml.default_flow_style = False
            yaml.dump(data, f)
        tmp.replace(self.config_file)

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)

    # -- status, down, reset

    def status(self) -> list[PartStatus]:
        raw = self._load()
        parts = raw.get("parts", {})
        options = raw.get("options", {})
        prefect = options.get("prefect", self.prefect)
        interval = options.get("reconcile_interval", self.reconcile_interval)
        out = []

        def part(name: str, address: str, healthy: bool, detail: str = "") -> None:
            rec = parts.get(name)
            if rec is None:
                ownership = "stopped" if not healthy else "external"
            elif rec.get("external"):
                ownership = "external"
            else:
                ownership = "started" if _alive(rec) else "stopped"
            pid = rec.get("pid") if rec and ownership == "started" else None
            out.append(PartStatus(name, address, healthy, pid, ownership, detail))

        part("dockerd", "unix:///var/run/docker.sock", engine.docker_ok())
        part("registry", f"http://{engine.REGISTRY_ADDR}", engine.registry_ok())
        git_ok = self.gitops_remote.exists() and all(self.source_remote_of(a.name).exists() for a in APPS)
        detail = ", ".join(["gitops.git", *(f"{a.name}.git" for a in APPS)]) if git_ok else "not seeded"
        out.append(PartStatus("git", str(self.gitops_remote.parent), git_ok, None,
                              "started" if git_ok else "stopped", detail))
        if options.get("real", self.real):
            # The real tier's parts, with the pinned versions (sandbox/real.py).
            for name, ok, detail in self._real_cluster().status():
                out.append(PartStatus(name, detail, ok, None, "started" if ok else "stopped"))
            if prefect or "prefect" in parts:
                part("prefect", f"http://127.0.0.1:{PREFECT_PORT}/api", _http_ok(self._prefect_health))
            return out
        kube = parts.get("kube") or {}
        kube_url = kube.get("address", "")
        part("kube", kube_url or "-", bool(kube_url) and _alive(kube) and _http_ok(f"{kube_url}/healthz"))
        argocd = parts.get("argocd")
        part("argocd", f"interval {interval:g} s", _alive(argocd))
        if prefect or "prefect" in parts:
            part("prefect", f"http://127.0.0.1:{PREFECT_PORT}/api", _http_ok(self._prefect_health))
        base = int(options.get("app_port_base", self.app_port_base))
        ports = {a.application(e): base + e.port_offset for a in APPS for e in a.environments}
        for app_name, port in sorted(ports.items()):
            url = f"http://127.0.0.1:{port}/api/health/"
            out.append(PartStatus(app_name, url, _http_ok(url), None, "argocd", "app container"))
        return out

    def down(self) -> None:
        raw = self._load()
        parts = raw.get("parts", {})
        if (raw.get("options") or {}).get("real") or self.real:
            self._real_cluster().down()
        for name in ("argocd", "prefect", "kube", "registry", "dockerd"):
            rec = parts.get(name)
            if name == "dockerd":
                # Our containers go while the engine still answers.
                self._remove_containers()
            if not rec or rec.get("external"):
                parts.pop(name, None)
                continue
            _stop(rec, timeout=10 if name != "dockerd" else 30)
            parts.pop(name, None)
        if self.state_file.exists():
            raw.pop("state", None)
            self._save(raw)

    def _remove_containers(self) -> None:
        if not engine.docker_ok():
            return
        import docker
        from docker.errors import DockerException, NotFound

        client = docker.from_env(timeout=30)
        try:
            for c in client.containers.list(all=True, filters={"label": [f"{LABEL}/managed=true",
                                                                         f"{LABEL}/root={self.root}"]}):
                with contextlib.suppress(NotFound):
                    c.remove(force=True)
        except DockerException as e:
            raise SandboxError(f"could not remove the sandbox containers: {e}") from e
        finally:
            client.close()

    def reset(self) -> None:
        self.down()
        if not self.root.exists():
            return
        if not self.state_file.exists() and any(self.root.iterdir()):
            raise SandboxError(f"{self.root} has no state.json: not a sandbox, not removing it")
        shutil.rmtree(self.root)


def _create_ok_if_exists(create: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        create()
    except ApiException as e:
        if e.status != 409:
            raise SandboxError(f"could not create a sandbox object: {e.status} {e.reason}") from e


def cli(action: str, *, real: bool = False) -> int:
    """`delivery sandbox <action> [--real]`; prints what it did and returns the exit code."""
    sb = Sandbox(real=real)
    was_real = (sb._load().get("options") or {}).get("real")
    if action == "up" and was_real is not None and bool(was_real) != real:
        print(f"{sb.root} holds a sandbox on the {'real tier' if was_real else 'emulators'}; "
              "`delivery sandbox reset` it first (or set DELIVERY_SANDBOX_DIR to another directory)")
        return 1
    if action == "up":
        t0 = time.monotonic()
        st = sb.up()
        print(f"sandbox up in {time.monotonic() - t0:.1f} s ({st.root})")
        print(f"  kubernetes api  {st.kube_url}  (kubeconfig {st.kubeconfig})")
        print(f"  registry        http://{st.registry}")
        print(f"  gitops remote   {st.gitops_remote}  (shared by {', '.join(a.name for a in APPS)})")
        for a in APPS:
            print(f"  {a.name:<15} source {st.source_remotes[a.name]}, "
                  f"initial image {a.image}:{st.initial_tags[a.name]}")
        if st.prefect_api_url:
            print(f"  prefect         {st.prefect_api_url}  (UI http://127.0.0.1:{PREFECT_PORT})")
        for app_name, port in st.ports.items():
            print(f"  {app_name:<15} http://127.0.0.1:{port}/api/health/")
        print(f"  config          {st.config_file}")
        return 0
    if action == "status":
        rows = sb.status()
        for r in rows:
            health = "answering" if r.healthy else "not answering"
            pid = f"pid {r.pid}" if r.pid else r.ownership
            print(f"{r.name:<20} {health:<14} {pid:<10} {r.address}" + (f"  ({r.detail})" if r.detail else ""))
        core = [r for r in rows if r.name in ("dockerd", "registry", "git", "kube", "argocd", "prefect")
                or (real and r.address.startswith("pid "))]
        return 0 if core and all(r.healthy for r in core) else 1
    if action == "down":
        sb.down()
        print(f"sandbox down ({sb.root}); repositories and state kept (`delivery sandbox reset` removes them)")
        return 0
    if action == "reset":
        sb.reset()
        print(f"sandbox reset: {sb.root} removed")
        return 0
    raise SandboxError(f"unknown sandbox action {action!r}")
