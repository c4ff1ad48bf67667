"""Fixtures for the image tests: the shared registry, tiny build contexts, and private registries
(started from Debian's `docker-registry`) that a test may stop, restart or put behind htpasswd."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from sandbox.engine import BASE_IMAGE, REGISTRY_ADDR, docker_ok, registry_ok

pytestmark = pytest.mark.docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file: the `bcrypt` module if present, else libxcrypt via `crypt`."""
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))


class PrivateRegistry:
    """A `docker-registry serve` process on a free loopback port, its storage in a tmp dir."""

    def __init__(self, root: Path, htpasswd: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = _free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        auth = ""
        if htpasswd:
            lines = "".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in htpasswd.items())
            (root / "htpasswd").write_text(lines)
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        self.cfg = root / "registry.yml"
        self.cfg.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"http:\n  addr: {self.addr}\n{auth}"
        )

    def start(self, timeout: float = 30) -> None:
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen([shutil.which("docker-registry") or "docker-registry", "serve", str(self.cfg)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answering():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"private registry did not start: {(self.root / 'registry.log').read_text()[-2000:]}")

    def answering(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.addr}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 401 from an htpasswd registry still means it is up
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session", autouse=True)
def _engine_and_registry() -> None:
    if not docker_ok():
        pytest.skip("the Docker engine is not running (run `make setup`)")
    if not registry_ok():
        pytest.skip(f"no registry on {REGISTRY_ADDR} (run `make setup`)")
    try:
        docker.from_env().images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"base image {BASE_IMAGE} missing (run `make setup`)")


@pytest.fixture
def repo_name() -> str:
    return f"delivery-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def local_images() -> Iterator[list[str]]:
    """Repositories whose local images a test created; they are removed from the engine afterwards."""
    repos: list[str] = []
    yield repos
    client = docker.from_env()
    for repo in repos:
        for image in client.images.list(name=repo):
            for ref in image.tags:
                if ref.startswith(repo + ":"):
                    try:
                        client.images.remove(ref)
                    except docker.errors.APIError:
                        pass
    client.close()


@pytest.fixture
def shared_repo(repo_name: str, local_images: list[str]) -> str:
    """A fresh repository name on the shared registry."""
    repo = f"{REGISTRY_ADDR}/{repo_name}"
    local_images.append(repo)
    return repo


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    """A tiny build context on the local busybox image; the marker makes each image unique."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "marker.txt").write_text(uuid.uuid4().hex)
    (ctx / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nCOPY marker.txt /marker.txt\nRUN echo building-step-output && cat /marker.txt\n"
    )
    return ctx


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator:
    """Factory for private registries (e.g. with htpasswd users); all are stopped afterwards."""
    made: list[PrivateRegistry] = []

    def make(htpasswd: dict[str, str] | None = None) -> PrivateRegistry:
        reg = PrivateRegistry(_mk(tmp_path / f"registry-{len(made)}"), htpasswd=htpasswd)
        made.append(reg)
        reg.start()
        return reg

    yield make
    for reg in made:
        reg.stop()
