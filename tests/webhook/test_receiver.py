"""Receiver behaviour over real HTTP that needs no Prefect server: body cap, logging, config errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from delivery.errors import ConfigError
from deployments.webhook import MAX_BODY_BYTES, create_app
from tests.webhook.helpers import (
    SECRET,
    RecordingStarter,
    ServerThread,
    body_of,
    make_config,
    signed_headers,
    wait_for_delivery,
)


@pytest.fixture
def recording() -> Iterator[tuple[ServerThread, RecordingStarter]]:
    starter = RecordingStarter()
    with ServerThread(create_app(secret=SECRET, config_loader=make_config, starter=starter)) as server:
        yield server, starter


def test_chunked_oversize_body_is_413(recording: tuple[ServerThread, RecordingStarter]) -> None:
    """A body streamed without Content-Length is cut off past 1 MiB and refused with 413."""
    server, starter = recording

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in total

    r = httpx.post(f"{server.url}/webhooks/github", content=chunks(),
                   headers={"Content-Type": "application/json", "X-GitHub-Event": "push"}, timeout=60)
    assert r.status_code == 413 and r.json()["status"] == "refused"
    assert httpx.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"
    assert starter.calls == []


def test_body_of_exactly_the_cap_is_read(recording: tuple[ServerThread, RecordingStarter]) -> None:
    """A body of exactly 1 MiB is accepted for checking (here: refused as bad JSON, not as too large)."""
    server, _ = recording
    body = b" " * (MAX_BODY_BYTES - 2) + b"[]"
    r = httpx.post(f"{server.url}/webhooks/github", content=body, headers=signed_headers(body), timeout=60)
    assert r.status_code == 400 and "not a JSON object" in r.json()["reason"]


def test_queued_answer_names_the_delivery_and_its_status_url(
    recording: tuple[ServerThread, RecordingStarter],
) -> None:
    """A matching push answers 202 queued with the delivery id and a status URL that then lists one
    run per app and environment."""
    server, starter = recording
    body = body_of("push_new_branch.json")
    headers = signed_headers(body)
    r = httpx.post(f"{server.url}/webhooks/github", content=body, headers=headers, timeout=60)
    assert r.status_code == 202
    data = r.json()
    assert data["status"] == "queued"
    assert data["delivery_id"] == headers["X-GitHub-Delivery"]
    assert data["status_url"] == f"{server.url}/webhooks/github/deliveries/{data['delivery_id']}"
    view = wait_for_delivery(server.url, data["delivery_id"])
    assert view["status"] == "dispatched"
    assert [(x["app"], x["environment"]) for x in view["runs"]] == [("workout-api", "dev")]
    assert set(view["runs"][0]) == {"flow_run_id", "app", "environment", "url"}
    assert len(starter.calls) == 1


def test_each_delivery_logged_once_without_body_or_signature(
    recording: tuple[ServerThread, RecordingStarter], caplog: pytest.LogCaptureFixture
) -> None:
    """One INFO line when a delivery is accepted (id, event, ref, decision) and one when its runs are
    created (their ids); neither carries the body, the signature or the secret."""
    server, _ = recording
    body = body_of("push_branch.json")
    delivery = "11111111-2222-3333-4444-555555555555"
    headers = signed_headers(body, delivery=delivery)
    with caplog.at_level(logging.INFO, logger="delivery"):
        httpx.post(f"{server.url}/webhooks/github", content=body, headers=headers, timeout=60)
        run_id = wait_for_delivery(server.url, delivery)["runs"][0]["flow_run_id"]
    lines = [rec.getMessage() for rec in caplog.records if "11111111-2222" in rec.getMessage()]
    accepted = [line for line in lines if "-> 202 queued" in line]
    dispatched = [line for line in lines if "-> dispatched" in line]
    assert len(accepted) == 1 and len(dispatched) == 1, lines
    assert "push" in accepted[0] and "refs/heads/main" in accepted[0]
    assert run_id in dispatched[0]
    for line in lines:
        assert headers["X-Hub-Signature-256"][7:] not in line and "Codertocat" not in line and SECRET not in line


def test_broken_config_is_503() -> None:
    """A delivery config that cannot be read answers 503 unavailable, so GitHub can redeliver later."""

    def broken() -> object:
        raise ConfigError("delivery.yaml: not valid YAML")

    starter = RecordingStarter()
    with ServerThread(create_app(secret=SECRET, config_loader=broken, starter=starter)) as server:  # type: ignore[arg-type]
        body = body_of("push_branch.json")
        r = httpx.post(f"{server.url}/webhooks/github", content=body, headers=signed_headers(body), timeout=60)
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert "not valid YAML" in r.json()["reason"]
    assert starter.calls == []


def test_ping_answers_without_a_config() -> None:
    """GitHub's ping right after creating the hook gets pong even before any delivery config exists."""

    def missing() -> object:
        raise ConfigError("delivery.yaml: no delivery config")

    with ServerThread(create_app(secret=SECRET, config_loader=missing, starter=RecordingStarter())) as server:  # type: ignore[arg-type]
        body = body_of("ping.json")
        r = httpx.post(f"{server.url}/webhooks/github", content=body, headers=signed_headers(body, event="ping"),
                       timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "pong"


def test_unknown_routes_and_methods_are_4xx(recording: tuple[ServerThread, RecordingStarter]) -> None:
    """GET on the webhook path and unknown paths are client errors, never 500."""
    server, _ = recording
    assert httpx.get(f"{server.url}/webhooks/github", timeout=30).status_code == 405
    assert httpx.post(f"{server.url}/nope", timeout=30).status_code == 404
