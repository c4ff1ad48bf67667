"""Fault-test fixtures: a sandbox of the faults' own whose app image lives in a registry the tests
may stop and restart (never the shared one on 127.0.0.1:5000), and helpers to cause faults for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import git
import pytest

from delivery.settings import get_settings
from sandbox.manager import IMAGE_REPOSITORY, Sandbox, SandboxState, free_port
from tests.fixtures_sandbox import _restore_env, _set_env, free_port_block
from tests.prefect_server import PrefectServer
from tests.source_clone import SourceClone

APP = "workout-api"
# Short waits: every fault here is expected to show within seconds on the sandbox.
FAST = {"sync_timeout": 60.0, "rollout_timeout": 45.0, "health_timeout": 30.0}


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout:.0f} s (last: {last!r})")


class OwnRegistry:
    """Debian's `docker-registry` on a port of our own, with its access log on, so a test can stop it
    at a chosen request and start it again on the same storage."""

    def __init__(self, root: Path, port: int | None = None, *, htpasswd: Path | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = root / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        auth = (f"auth:\n  htpasswd:\n    realm: faults\n    path: {htpasswd}\n" if htpasswd else "")
        self.config = root / "registry.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.addr}\n" + auth
        )

    @property
    def up(self) -> bool:
        return _http_status(f"http://{self.addr}/v2/", 1) in (200, 401)

    def start(self) -> None:
        exe = shutil.which("docker-registry")
        assert exe, "Debian's docker-registry is not installed"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([exe, "serve", str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self.up, 30, f"registry on {self.addr}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill_on_request(self, needle: str, *, restart_after: float | None = None,
                        timeout: float = 300) -> threading.Event:
        """SIGKILL the registry as soon as its access log shows a request containing `needle`; start
        it again `restart_after` seconds later (None: leave it down). The event is set once killed."""
        killed = threading.Event()
        start = self.log.stat().st_size

        def watch() -> None:
            pos, deadline = start, time.monotonic() + timeout
            while time.monotonic() < deadline:
                with open(self.log, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                    pos = f.tell()
                if needle.encode() in data:
                    self.kill()
                    killed.set()
                    if restart_after is not None:
                        time.sleep(restart_after)
                        self.start()
                    return
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True, name=f"kill-registry-{self.port}").start()
        return killed

    def requests(self) -> str:
        return self.log.read_text(errors="replace")


def remote_head(bare: Path, branch: str = "main") -> str:
    return subprocess.run(["git", "rev-parse", f"refs/heads/{branch}"], cwd=bare, capture_output=True, text=True,
                          check=True).stdout.strip()


def remote_log(bare: Path, path: str, branch: str = "main", n: int = 20) -> list[tuple[str, str]]:
    """(sha, subject) of the newest commits touching `path` on the bare remote."""
    out = subprocess.run(["git", "log", f"-{n}", "--format=%H%x1f%s", f"refs/heads/{branch}", "--", path],
                         cwd=bare, capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("\x1f", 1)) for line in out.splitlines() if line]  # type: ignore[misc]


def remote_file(bare: Path, path: str, branch: str = "main") -> str:
    return subprocess.run(["git", "show", f"refs/heads/{branch}:{path}"], cwd=bare, capture_output=True, text=True,
                          check=True).stdout


def app_version(url: str) -> str | None:
    import json

    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return json.loads(r.read()).get("version")
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class FaultEnv:
    state: SandboxState
    sandbox: Sandbox
    registry: OwnRegistry
    image: str
    config_file: Path
    env: dict[str, str]

    @property
    def gitops(self) -> Path:
        return self.state.gitops_remote

    def health_url(self, environment: str) -> str:
        return f"http://127.0.0.1:{self.state.ports[f'{APP}-{environment}']}/api/health/"

    def values(self, environment: str) -> str:
        return f"helm/{APP}/values-{environment}.yaml"

    def argocd_pid(self) -> int:
        import json

        return int(json.loads((self.state.root / "state.json").read_text())["parts"]["argocd"]["pid"])

    def restart_argocd(self) -> None:
        """Start the Argo CD emulator again exactly as `up` does (up starts only the parts not running)."""
        self.sandbox.up()


def _point_chart_at(gitops_remote: Path, image: str, workdir: Path) -> None:
    """A commit on the GitOps remote that makes the chart pull from `image` (what a team does when it
    moves registries); the Argo CD emulator then runs whatever the values name."""
    from ruamel.yaml import YAML

    repo = git.Repo.clone_from(str(gitops_remote), workdir, branch="main")
    values = workdir / "helm" / APP / "values.yaml"
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    data = yaml.load(values.read_text())
    data["image"]["repository"] = image
    with open(values, "w") as f:
        yaml.dump(data, f)
    repo.index.add([str(values.relative_to(workdir))])
    actor = git.Actor("platform", "platform@example.com")
    repo.index.commit(f"chore(helm): pull {APP} from {image}", author=actor, committer=actor)
    repo.remotes.origin.push("main:main")


def start_fault_env(root: Path, *, kube_args: list[str] | None = None) -> FaultEnv:
    """A sandbox (no Prefect server of its own) whose app image lives in a registry of its own."""
    registry = OwnRegistry(root / "registry")
    registry.start()
    sb = Sandbox(root / "sandbox", prefect=False, reconcile_interval=180,
                 app_port_base=free_port_block(), kube_args=kube_args)
    try:
        state = sb.up()
        image = f"{registry.addr}/{APP}"
        # Seed our registry with the initial image, as a team moving registries would.
        client = docker.from_env(timeout=120)
        try:
            client.images.get(f"{IMAGE_REPOSITORY}:{state.initial_tag}").tag(image, state.initial_tag)
        finally:
            client.close()
        from tasks.images import push_image

        push_image(image, [state.initial_tag])
        _point_chart_at(state.gitops_remote, image, root / "point-chart")
        config = root / "delivery.yaml"
        config.write_text(state.config_file.read_text().replace(f"image: {IMAGE_REPOSITORY}\n", f"image: {image}\n"))
        assert f"image: {image}" in config.read_text()
        for application, port in state.ports.items():
            url = f"http://127.0.0.1:{port}/api/health/"
            # Each app answers its own initial tag (both apps share the environments' names).
            tag = next(t for name, t in state.initial_tags.items() if application.startswith(f"{name}-"))
            wait_for(lambda url=url, tag=tag: app_version(url) == tag, 90, f"{url} answering the initial tag")
    except BaseException:
        sb.down()
        registry.kill()
        raise
    env = {"DELIVERY_SANDBOX_DIR": str(state.root), "DELIVERY_CONFIG_FILE": str(config),
           "DELIVERY_KUBECONFIG": str(state.kubeconfig), "DELIVERY_WORK_DIR": str(root / "work")}
    return FaultEnv(state, sb, registry, image, config, env)


def stop_fault_env(fe: FaultEnv) -> None:
    # The images go first: the sandbox's down stops the engine when the sandbox started it.
    client = docker.from_env(timeout=120)
    try:
        for img in client.images.list(name=fe.image):
            for t in img.tags:
                try:
                    # Untagged only: the layers under it are the engine's build cache, which
                    # another suite's build running at the same time may be using.
                    client.images.remove(t, noprune=True)
                except docker.errors.APIError:
                    pass
    finally:
        client.close()
    fe.sandbox.down()
    fe.registry.kill()


@pytest.fixture(scope="package")
def faults(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[FaultEnv]:
    """The faults' own sandbox and registry, with the settings pointing at them while it lives."""
    fe = start_fault_env(tmp_path_factory.mktemp("faults"))
    old = _set_env(fe.env)
    try:
        yield fe
    finally:
        _restore_env(old)
        stop_fault_env(fe)


@pytest.fixture
def settings_of(faults: FaultEnv) -> Iterator[FaultEnv]:
    """Re-applies the faults' settings (another fixture may have changed the environment)."""
    old = _set_env(faults.env)
    get_settings.cache_clear()
    try:
        yield faults
    finally:
        _restore_env(old)
        # A test may have changed settings through the environment (bounds, the config file).
        get_settings.cache_clear()


@pytest.fixture
def source(faults: FaultEnv, tmp_path: Path) -> SourceClone:
    return SourceClone(faults.state.source_remote, tmp_path / "src")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` of the module's own (own PREFECT_HOME, SQLite), so it can be restarted."""
    s = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    s.start()
    try:
        yield s
    finally:
        s.stop()
