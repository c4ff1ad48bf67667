"""A real `prefect server start` of a test's own (its own PREFECT_HOME and SQLite database, the
environment the sandbox gives its server, every service on: triggers and actions run automations),
on a free port, that a test may stop and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sandbox.manager import free_port, prefect_server_env


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class PrefectServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(prefect_server_env(self.home))
        # Expired leases are looked for every 15 s by default; the test waits less for a freed lock.
        env["PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS"] = "1"
        exe = Path(sys.executable).with_name("prefect")
        with open(self.home / "server.log", "ab") as out:
            self.proc = subprocess.Popen([str(exe), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while not _http_ok(f"{self.api_url}/health"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"the Prefect server did not answer on {self.api_url}; see {self.home}/server.log")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()
