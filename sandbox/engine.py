"""The real parts the sandbox needs from the machine: the Docker engine, the registry on
127.0.0.1:5000, and a local base image (no Docker Hub here).

Each `ensure_*` starts its part only when it is not already answering and returns the pid it
started (or None), so that `down` can stop exactly what `up` started and nothing else.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

from delivery.errors import SandboxError

BASE_IMAGE = "local/busybox:stable"
REGISTRY_ADDR = "127.0.0.1:5000"


def docker_ok() -> bool:
    try:
        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
        return True
    except (DockerException, OSError):
        return False


def registry_ok(addr: str = REGISTRY_ADDR) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/v2/", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait(pred, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise SandboxError(f"{what} did not come up within {timeout:.0f} s; last log lines:\n{tail}")


def _spawn(argv: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session so that the part outlives the command that started it.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def ensure_dockerd(log_dir: Path) -> int | None:
    """Start `dockerd` when the engine does not answer and we are root; return its pid if started."""
    if docker_ok():
        return None
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        raise SandboxError("the Docker engine is not running and cannot be started here "
                           "(needs root and Debian's docker.io: run `make setup` as root)")
    log = log_dir / "dockerd.log"
    pid = _spawn(["dockerd", "--host", "unix:///var/run/docker.sock"], log)
    _wait(docker_ok, 60, "dockerd", log)
    return pid


def ensure_registry(state_dir: Path, log_dir: Path, addr: str = REGISTRY_ADDR) -> int | None:
    """Start Debian's `docker-registry` on `addr` with storage under `state_dir` when not answering."""
    if registry_ok(addr):
        return None
    exe = shutil.which("docker-registry")
    if not exe:
        raise SandboxError("no registry on 127.0.0.1:5000 and Debian's docker-registry is not installed "
                           "(run `make setup`)")
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = state_dir / "registry.yml"
    cfg.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {state_dir / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}\n"
    )
    log = log_dir / "registry.log"
    pid = _spawn([exe, "serve", str(cfg)], log)
    _wait(lambda: registry_ok(addr), 20, "docker-registry", log)
    return pid


def ensure_base_image(name: str = BASE_IMAGE) -> str:
    """A busybox base image built from Debian's `busybox-static`: Docker Hub is out of reach here."""
    client = docker.from_env()
    try:
        client.images.get(name)
        return name
    except ImageNotFound:
        pass
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise SandboxError("busybox is not installed (Debian's busybox-static): run `make setup`")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "etc", "www"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        # busybox picks the applet from argv[0]; `sh` is what Dockerfile RUN lines need.
        for applet in subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split():
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    buf.seek(0)
    repo, _, tag = name.partition(":")
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag or "latest")
    client.images.get(name)
    return name


def main() -> None:
    """`python -m sandbox.engine`: what `make setup` runs to bring the real parts up."""
    from delivery.settings import get_settings

    s = get_settings()
    logs = s.sandbox_dir / "logs"
    ensure_dockerd(logs)
    ensure_registry(s.sandbox_dir / "registry", logs)
    ensure_base_image()
    print(f"docker engine: ok; registry: http://{REGISTRY_ADDR}; base image: {BASE_IMAGE}")


if __name__ == "__main__":
    main()
