"""A Kubernetes API server for tests: the sandbox's emulator as a subprocess on a free port, plus a
kubeconfig pointing at it. Tests then use only the official client, as the product does."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client

from delivery.settings import PROJECT_ROOT
from tasks.kube import api_client


@dataclass
class KubeAPI:
    url: str
    kubeconfig: Path
    log: Path

    def client(self) -> client.ApiClient:
        return api_client(self.kubeconfig)

    def compact(self) -> None:
        """Forget the watch history, so that a watch from an earlier resourceVersion gets 410 Gone."""
        req = urllib.request.Request(f"{self.url}/sandbox/compact", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=5).close()

    def requests(self) -> int:
        """How many API requests the emulator has served so far."""
        import json

        with urllib.request.urlopen(f"{self.url}/sandbox/requests", timeout=5) as r:
            return int(json.loads(r.read())["requests"])

    def ensure_namespace(self, name: str) -> None:
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api(self.client()).create_namespace({"metadata": {"name": name}})


@contextlib.contextmanager
def kube_api(tmp: Path, *, drop_watch_after: float | None = None) -> Iterator[KubeAPI]:
    from sandbox.kube import write_kubeconfig

    tmp.mkdir(parents=True, exist_ok=True)
    port_file = tmp / "kube.port"
    log = tmp / "kube.log"
    argv = [sys.executable, "-m", "sandbox.kube", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    if drop_watch_after is not None:
        argv += ["--drop-watch-after", str(drop_watch_after)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Kubernetes API emulator did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", url)
        yield KubeAPI(url, kubeconfig, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
