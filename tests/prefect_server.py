"""A real `prefect server start` of a test's own (its own PREFECT_HOME and SQLite database, or a
PostgreSQL database given by URL; the environment the sandbox gives its server, every service on:
triggers and actions run automations), on a free port, that a test may stop, restart, or keep
down for a while."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sandbox.manager import free_port, prefect_server_env


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass(frozen=True)
class Outage:
    """When (time.monotonic()) a `down_for` stopped the server, started it again, and it answered."""

    stopped: float
    started: float
    answering: float

    @property
    def seconds(self) -> float:
        """How long the API did not answer: the time kept down plus the server's own startup."""
        return self.answering - self.stopped


class PrefectServer:
    def __init__(self, home: Path, *, database_url: str | None = None) -> None:
        """`database_url`: PREFECT_API_DATABASE_CONNECTION_URL instead of SQLite under `home`. It is
        handed to the server through its environment only, never as an argument: it may carry a
        password, and every process's arguments are readable by anyone on the machine."""
        self.home = home
        self.database_url = database_url
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(prefect_server_env(self.home))
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
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

    def down_for(self, seconds: float) -> Outage:
        """Stop the server (SIGTERM, as an orchestrator does), keep it stopped `seconds`, then start it
        again on the same port, home and database; returns once it answers."""
        stopped = time.monotonic()
        self.stop()
        time.sleep(max(stopped + seconds - time.monotonic(), 0))
        started = time.monotonic()
        self.start()
        return Outage(stopped, started, time.monotonic())
