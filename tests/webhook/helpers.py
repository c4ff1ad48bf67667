"""Shared helpers for the webhook tests: the test config, signed requests, a uvicorn server in a
thread, and a recording starter (a fake of our own `Starter` protocol)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn
from prefect import flow

from delivery.config import Config, parse_config
from deployments.webhook import DeployRequest, StartedRun, signature_for

SECRET = "test-webhook-secret-8f1c2e"  # secret-scan: allow (test fixture)
PAYLOADS = Path(__file__).parent / "payloads"


def make_config() -> Config:
    """workout-api: dev <- release-dev, staging <- main, prod <- v*.*.* tags."""
    return parse_config(config_data(), Path("test-delivery.yaml"))


def config_data() -> dict[str, Any]:
    """The test config as data (JSON is YAML: a subprocess receiver reads it from a file)."""

    def env(name: str, **refs: Any) -> dict[str, Any]:
        return {
            "values_file": f"values-{name}.yaml",
            "application": f"workout-api-{name}",
            "namespace": f"workout-{name}",
            "deployment": "workout-api",
            "health_url": f"http://127.0.0.1:1/{name}/api/health/",
            **refs,
        }

    return {
        "apps": {
            "workout-api": {
                "source_repo": "https://github.com/your-org/workout-api.git",
                "image": "127.0.0.1:5000/your-org/workout-api",
                "gitops_repo": "https://github.com/your-org/workout-gitops.git",
                "chart_path": "helm/workout-api",
                "environments": {
                    "dev": env("dev", branches=["release-dev"]),
                    "staging": env("staging", branches=["main"]),
                    "prod": env("prod", tags=["v*.*.*"]),
                },
            }
        }
    }


def payload(name: str) -> dict[str, Any]:
    return json.loads((PAYLOADS / name).read_text())


def body_of(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def new_delivery_id() -> str:
    return str(uuid.uuid4())


def signed_headers(
    body: bytes,
    *,
    event: str = "push",
    delivery: str | None = None,
    content_type: str = "application/json",
    secret: str = SECRET,
) -> dict[str, str]:
    """Headers shaped like GitHub's, with a valid X-Hub-Signature-256 for `body`."""
    return {
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or new_delivery_id(),
        "X-GitHub-Hook-ID": "109948940",
        "X-Hub-Signature-256": signature_for(body, secret),
    }


@dataclass
class RecordingStarter:
    """Records what would have been started and answers with made-up run ids."""

    calls: list[list[DeployRequest]] = field(default_factory=list)

    async def start(
        self, requests: list[DeployRequest], *, received_at: datetime, delivery_id: str
    ) -> list[StartedRun]:
        self.calls.append(list(requests))
        return [StartedRun(str(uuid.uuid5(uuid.NAMESPACE_URL, r.idempotency_key)), r.app, r.environment, None)
                for r in requests]

    async def check_api(self, timeout: float) -> bool:
        return True


@dataclass
class IdempotentStarter:
    """A fake Prefect: one run per idempotency key (as `create_flow_run_from_deployment` does), the
    keys in the order they were asked for, and a switch that makes it fail like an unreachable API.
    `gate`, when given, holds every start until it is set (a Prefect that has not answered yet)."""

    down: bool = False
    gate: threading.Event | None = None
    runs: dict[str, str] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    failures: int = 0

    async def start(
        self, requests: list[DeployRequest], *, received_at: datetime, delivery_id: str
    ) -> list[StartedRun]:
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait)
        if self.down:
            self.failures += 1
            from delivery.errors import WebhookError

            raise WebhookError("Prefect API at http://127.0.0.1:1/api is unreachable: ConnectError", status=503,
                               transient=True)
        out = []
        for r in requests:
            self.asked.append(r.idempotency_key)
            run_id = self.runs.setdefault(r.idempotency_key, str(uuid.uuid4()))
            out.append(StartedRun(run_id, r.app, r.environment, f"http://ui.test/runs/flow-run/{run_id}"))
        return out

    def ui_link(self, flow_run_id: str) -> str:
        return f"http://ui.test/runs/flow-run/{flow_run_id}"

    async def check_api(self, timeout: float) -> bool:
        return not self.down


def wait_for_delivery(base_url: str, delivery_id: str, timeout: float = 30) -> dict[str, Any]:
    """The delivery's status document once it is no longer pending."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        view = httpx.get(f"{base_url}/webhooks/github/deliveries/{delivery_id}", timeout=30).json()
        if view["status"] != "pending":
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery {delivery_id} still pending after {timeout} s: {view}")
        time.sleep(0.05)


class ServerThread:
    """A real uvicorn server on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app: Any) -> None:
        # port=0 lets uvicorn bind a free port itself (a pre-bound socket would lose TCP_NODELAY
        # and add 40 ms of delayed-ACK to every answer).
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.port = 0
        self.url = ""

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


@flow(name="deploy")
def deploy_stub(
    app: str,
    environment: str,
    source_ref: str,
    source_sha: str,
    delivery_id: str = "",
    received_at: str = "",
) -> None:
    """Stands in for the deploy flow: the tests only create its runs, nobody executes them."""


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
