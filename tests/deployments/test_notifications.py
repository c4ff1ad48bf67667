"""Failure notifications, end to end on a real `prefect server start`: `ensure_automations` with
DELIVERY_NOTIFY_WEBHOOK_URL set makes the notification block and automations; a deploy run that ends
Failed (as a rolled-back deploy does) and a promotion that ends Cancelled each bring a Slack-style
message to a real local HTTP receiver, naming the app, the environment, the tag, the reason, what
serves now and the run's link; a superseded (Cancelled) deploy brings none; unset, they are removed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import PrefectClient
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from prefect.states import Cancelled, Failed, Running
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.settings import get_settings
from deployments.automations import (
    DEPLOYMENTS,
    NOTIFY_CANCELLED_PROMOTIONS,
    NOTIFY_FAILURES,
    ensure_automations,
)
from tests.prefect_server import PrefectServer


class Receiver:
    """An incoming-webhook endpoint: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.bodies.append(json.loads(raw or b"{}"))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/secret-part"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    s = PrefectServer(tmp_path_factory.mktemp("prefect-notify"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _register(server: PrefectServer) -> dict[str, str]:
    """Deployments named as ours, of stand-in flows with our parameters (never executed here)."""
    ids: dict[str, str] = {}
    for key, name in DEPLOYMENTS.items():
        flow_name, dep_name = name.split("/")

        @flow(name=flow_name)
        def stand_in(app: str = "", environment: str = "", to_environment: str = "") -> None:
            """Never executed: the test sets the run's states itself."""

        with temporary_settings({PREFECT_API_URL: server.api_url}):
            ids[key] = str(stand_in.to_deployment(name=dep_name).apply())
    return ids


def _run_ending(server: PrefectServer, deployment_id: str, name: str, parameters: dict[str, str],
                final: Any) -> str:
    async def go() -> str:
        async with PrefectClient(server.api_url) as c:
            run = await c.create_flow_run_from_deployment(deployment_id, parameters=parameters, name=name)
            await c.set_flow_run_state(run.id, Running(), force=True)
            await c.set_flow_run_state(run.id, final, force=True)
            return str(run.id)
    return run_coro_as_sync(go())


def _wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def test_failed_deploy_and_cancelled_promotion_send_messages(server: PrefectServer, receiver: Receiver,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """A rolled-back deploy and a rejected promotion each send one message with app, environment, tag,
    reason, what serves and the run link; a superseded deploy sends none; the webhook URL is kept secret."""
    ids = _register(server)
    monkeypatch.setenv("DELIVERY_NOTIFY_WEBHOOK_URL", receiver.url)
    get_settings.cache_clear()
    ui = server.api_url.removesuffix("/api")
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ui}):
        made = ensure_automations(ids)
    assert {NOTIFY_FAILURES, NOTIFY_CANCELLED_PROMOTIONS} <= set(made)

    tag = f"release-dev-{uuid4().hex[:7]}"
    failed = _run_ending(server, ids["deploy"], f"deploy-workout-api-dev-{tag}",
                         {"app": "workout-api", "environment": "dev"},
                         Failed(message=f"deploy of {tag} to dev failed: health: HTTP 500; rolled back; Git names "
                                        "release-dev-good, the cluster runs release-dev-good, verified serving "
                                        "release-dev-good"))
    superseded = _run_ending(server, ids["deploy"], f"deploy-workout-api-dev-{tag}-old",
                             {"app": "workout-api", "environment": "dev"},
                             Cancelled(message="superseded by 1a2b3c4d5e6f of refs/heads/release-dev"))
    rejected = _run_ending(server, ids["promote"], f"promote-workout-api-staging-prod-{tag}",
                           {"app": "workout-api", "to_environment": "prod"},
                           Cancelled(message=f"promotion of {tag} to prod rejected by ops: not during the sale"))

    texts = _wait_for(lambda: len(receiver.bodies) >= 2 and [b["text"] for b in receiver.bodies], 90,
                      "two notifications")
    time.sleep(5)  # a message for the superseded deploy would have come by now too
    texts = [b["text"] for b in receiver.bodies]
    assert len(texts) == 2, texts
    [deploy_text] = [t for t in texts if failed in t]
    assert "workout-api" in deploy_text and " dev" in deploy_text and tag in deploy_text
    assert "health: HTTP 500" in deploy_text and "verified serving release-dev-good" in deploy_text
    assert f"{ui}/runs/flow-run/{failed}" in deploy_text
    [promote_text] = [t for t in texts if rejected in t]
    assert "prod" in promote_text and "rejected by ops: not during the sale" in promote_text
    assert not any(superseded in t for t in texts)

    async def block_shown() -> str:
        async with PrefectClient(server.api_url) as c:
            doc = await c.read_block_document_by_name("delivery-notify", block_type_slug="custom-webhook",
                                                      include_secrets=False)
            return json.dumps(doc.data)
    assert "secret-part" not in run_coro_as_sync(block_shown())

    monkeypatch.delenv("DELIVERY_NOTIFY_WEBHOOK_URL")
    get_settings.cache_clear()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        made = ensure_automations(ids)
    assert NOTIFY_FAILURES not in made and NOTIFY_CANCELLED_PROMOTIONS not in made

    async def remaining() -> list[Any]:
        async with PrefectClient(server.api_url) as c:
            return await c.read_automations_by_name(NOTIFY_FAILURES)
    assert run_coro_as_sync(remaining()) == []
