"""The Docker engine restarts while an image builds: the build fails with a clear error, nothing is
pushed and nothing reaches Git. The engine is a second dockerd of the test's own (the shared one is
never touched), pointed at by DOCKER_HOST for the deploy.

The second dockerd gets a bridge interface of its own. Never start one with `--bridge none`: a
dockerd with its bridge disabled deletes the `docker0` interface, which belongs to the shared engine."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from flows.deploy import deploy
from tasks.images import image_exists
from tests.faults.conftest import FAST, FaultEnv, SourceClone, app_version, pid_alive, remote_head, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.sandbox]

ENV, BRANCH = "dev", "release-dev"


class SecondEngine:
    """A dockerd of its own: own socket, data root, exec root, containerd and bridge; no iptables."""

    def __init__(self) -> None:
        # A short path: containerd's socket lives under the exec root and unix paths max out at 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        self.sock = self.dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.pidfile = self.dir / "docker.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        n = random.randrange(1, 250)
        self.bridge = f"dkft{os.getpid() % 10000}{n}"[:15]
        ip = ["ip", "link", "add", self.bridge, "type", "bridge"]
        subprocess.run(ip, check=True, capture_output=True)
        subprocess.run(["ip", "addr", "add", f"10.213.{n}.1/24", "dev", self.bridge], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True, capture_output=True)

    def start(self) -> None:
        argv = ["dockerd", "--host", self.host, "--data-root", str(self.dir / "data"), "--exec-root",
                str(self.dir / "exec"), "--pidfile", str(self.pidfile), "--bridge", self.bridge,
                "--iptables=false", "--ip-masq=false"]
        with open(self.dir / "dockerd.log", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(self.ok, 60, "the second dockerd")

    def ok(self) -> bool:
        try:
            c = docker.DockerClient(base_url=self.host, timeout=5)
            try:
                return bool(c.ping())
            finally:
                c.close()
        except Exception:
            return False

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=60)

    def kill(self) -> None:
        """SIGKILL dockerd alone: its containerd survives, as after a crash of the daemon."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        # containerd follows its parent down, but may stay a zombie nobody reaps: a new dockerd that
        # finds its pid file takes it for running and times out on it, so the pid file goes too.
        for pid in self._containerd_pids():
            wait_for(lambda pid=pid: not pid_alive(pid), 30, f"containerd {pid} to exit")
        for pidfile in (self.dir / "exec").glob("containerd/containerd.pid"):
            pidfile.unlink()

    def _containerd_pids(self) -> list[int]:
        out = []
        for pidfile in (self.dir / "exec").glob("containerd/containerd.pid"):
            text = pidfile.read_text().strip()
            if text.isdigit():
                out.append(int(text))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # A containerd left by the SIGKILL test: stop it by the pid it recorded under our exec root.
        for pid in self._containerd_pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
        for mount in ("exec", "data"):
            for sub in sorted((self.dir / mount).glob("netns/*")) + [self.dir / mount]:
                subprocess.run(["umount", "-R", str(sub)], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[SecondEngine]:
    if not shutil.which("dockerd"):
        pytest.skip("no dockerd binary")
    eng = SecondEngine()
    eng.start()
    try:
        # The sandbox has no Docker Hub: give the second engine the local base image.
        main = docker.from_env(timeout=120)
        try:
            data = b"".join(main.images.get("local/busybox:stable").save(named="local/busybox:stable"))
        finally:
            main.close()
        c = eng.client()
        try:
            c.images.load(data)
        finally:
            c.close()
        yield eng
    finally:
        eng.stop()


def _building(eng: SecondEngine) -> bool:
    try:
        c = eng.client()
        try:
            return bool(c.containers.list(all=True))
        finally:
            c.close()
    except Exception:
        return False


def test_engine_restart_mid_build_fails_clearly(settings_of: FaultEnv, source: SourceClone, engine: SecondEngine,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """dockerd killed and restarted during a RUN step: Failed naming the engine; no image, no commit."""
    fe = settings_of
    monkeypatch.setenv("DOCKER_HOST", engine.host)
    sha = source.commit(BRANCH, "slow build", dockerfile_run="sleep 60")
    before = remote_head(fe.gitops)
    serving = app_version(fe.health_url(ENV))
    import threading

    restarted = threading.Event()

    def restart_mid_build() -> None:
        wait_for(lambda: _building(engine), 120, "a build container in the second engine", interval=0.1)
        time.sleep(0.5)
        engine.kill()
        engine.start()
        restarted.set()

    t = threading.Thread(target=restart_mid_build, daemon=True)
    t.start()
    state = deploy(app="workout-api", environment=ENV, source_ref=f"refs/heads/{BRANCH}", source_sha=sha,
                   return_state=True, **FAST)
    t.join(timeout=90)
    assert restarted.is_set()
    assert state.is_failed()
    assert "BuildError" in state.message and "Docker engine was unreachable or went away" in state.message, \
        state.message
    assert not image_exists(fe.image, f"release-dev-{sha[:7]}")
    assert remote_head(fe.gitops) == before
    assert app_version(fe.health_url(ENV)) == serving
    assert engine.ok(), "the restarted engine answers again"
