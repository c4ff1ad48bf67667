"""The receiver over real HTTP against a real (temporary) Prefect server."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from deployments.webhook import PrefectStarter, create_app
from tests.webhook.helpers import (
    SECRET,
    ServerThread,
    body_of,
    closed_port,
    make_config,
    new_delivery_id,
    payload,
    signed_headers,
    wait_for_delivery,
)


def runs_for(api: str, delivery_id: str | None = None) -> list:
    """Flow runs of the deploy/deploy deployment, optionally only those of one delivery."""
    runs: list = []
    with get_client(sync_client=True) as client:
        while True:  # the API answers at most 200 at a time
            page = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["deploy"])), limit=200,
                offset=len(runs),
            )
            runs += page
            if len(page) < 200:
                break
    return [r for r in runs if delivery_id is None or r.parameters.get("delivery_id") == delivery_id]


@pytest.fixture
def receiver(prefect_api: str) -> Iterator[ServerThread]:
    app = create_app(secret=SECRET, config_loader=make_config, starter=PrefectStarter(api_url=prefect_api))
    with ServerThread(app) as server:
        yield server


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/webhooks/github", content=body, headers=headers, timeout=timeout)


def test_matching_push_creates_one_run_with_parameters(receiver: ServerThread, prefect_api: str) -> None:
    """A push to main answers 202 queued; its status then names exactly one Scheduled staging run with
    our parameters, with its Prefect UI link."""
    delivery = new_delivery_id()
    body = body_of("push_branch.json")
    r = post(receiver.url, body, signed_headers(body, delivery=delivery))
    assert r.status_code == 202, r.text
    data = r.json()
    assert data["status"] == "queued" and data["delivery_id"] == delivery
    view = wait_for_delivery(receiver.url, delivery)
    assert view["status"] == "dispatched" and view["reason"] == ""
    assert len(view["runs"]) == 1
    run_info = view["runs"][0]
    assert (run_info["app"], run_info["environment"]) == ("workout-api", "staging")
    assert run_info["url"].endswith(f"/runs/flow-run/{run_info['flow_run_id']}")

    runs = runs_for(prefect_api, delivery)
    assert len(runs) == 1
    run = runs[0]
    assert str(run.id) == run_info["flow_run_id"]
    assert run.state is not None and run.state.is_scheduled()
    assert set(run.tags) >= {"app:workout-api", "env:staging"}
    assert run.idempotency_key == f"{delivery}:workout-api:staging"
    params = run.parameters
    assert params["app"] == "workout-api" and params["environment"] == "staging"
    assert params["source_ref"] == "refs/heads/main"
    assert params["source_sha"] == payload("push_branch.json")["after"]
    assert params["delivery_id"] == delivery and params["received_at"]


def test_redelivery_after_dispatch_answers_from_the_store(receiver: ServerThread, prefect_api: str) -> None:
    """The same delivery posted again once its run exists (GitHub's Redeliver) answers with that run
    from the store; Prefect still has exactly one run for it."""
    delivery = new_delivery_id()
    body = body_of("push_tag.json")
    first = post(receiver.url, body, signed_headers(body, delivery=delivery)).json()
    view = wait_for_delivery(receiver.url, delivery)
    second = post(receiver.url, body, signed_headers(body, delivery=delivery))
    assert second.status_code == 202
    again = second.json()
    assert first["status"] == again["status"] == "queued"
    assert again["delivery_status"] == "dispatched" and "redelivery" in again["reason"]
    assert again["runs"][0]["flow_run_id"] == view["runs"][0]["flow_run_id"]
    time.sleep(0.5)  # a second dispatch, if there were one, would have happened by now
    runs = runs_for(prefect_api, delivery)
    assert [str(r.id) for r in runs] == [view["runs"][0]["flow_run_id"]]
    assert runs[0].parameters["environment"] == "prod"
    assert wait_for_delivery(receiver.url, delivery)["attempt_count"] == 1


def test_pipeline_bump_push_creates_no_run(receiver: ServerThread, prefect_api: str) -> None:
    """A push of the pipeline's own bump commit is acknowledged as ignored and starts nothing."""
    delivery = new_delivery_id()
    body = body_of("push_pipeline_bump.json")
    r = post(receiver.url, body, signed_headers(body, delivery=delivery))
    assert r.status_code == 202 and r.json()["status"] == "ignored"
    assert runs_for(prefect_api, delivery) == []


def test_ping_over_http(receiver: ServerThread) -> None:
    """GitHub's ping gets 200 pong with the zen line."""
    body = body_of("ping.json")
    r = post(receiver.url, body, signed_headers(body, event="ping"))
    assert r.status_code == 200
    assert r.json()["status"] == "pong" and r.json()["zen"] == "Keep it logically awesome."


def test_answers_never_echo_secret_or_signature(receiver: ServerThread) -> None:
    """Neither a refusal nor an acceptance carries the secret or the signature sent."""
    body = body_of("push_branch.json")
    good = signed_headers(body)
    bad = dict(good, **{"X-Hub-Signature-256": "sha256=" + "ab" * 32})
    for headers in (good, bad):
        text = post(receiver.url, body, headers).text
        assert SECRET not in text and headers["X-Hub-Signature-256"].split("=")[1] not in text


def test_healthz_reports_prefect_reachable(receiver: ServerThread) -> None:
    """/healthz says ok and that the Prefect API answers."""
    r = httpx.get(f"{receiver.url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "prefect_api": "reachable"}


def test_prefect_down_is_acknowledged_and_kept_pending(prefect_api: str) -> None:
    """With the Prefect API unreachable the delivery is still stored and acknowledged (202); it stays
    pending with each failed attempt recorded, and /healthz says Prefect is unreachable."""
    api = f"http://127.0.0.1:{closed_port()}/api"
    app = create_app(secret=SECRET, config_loader=make_config, starter=PrefectStarter(api_url=api), start_timeout=3,
                     backoff_initial=0.1, backoff_max=0.2)
    with ServerThread(app) as server:
        body = body_of("push_branch.json")
        started = time.monotonic()
        r = post(server.url, body, signed_headers(body))
        assert time.monotonic() - started < 5
        assert r.status_code == 202, r.text
        assert r.json()["delivery_status"] == "pending"
        deadline = time.monotonic() + 30
        while (view := httpx.get(r.json()["status_url"], timeout=30).json())["attempt_count"] < 2:
            assert time.monotonic() < deadline, view
            time.sleep(0.1)
        assert view["status"] == "pending" and view["runs"] == []
        assert "unreachable" in view["attempts"][-1]["outcome"]
        health = httpx.get(f"{server.url}/healthz", timeout=30).json()
        assert health == {"status": "ok", "prefect_api": "unreachable"}


def test_prefect_slow_is_retried_after_the_bound() -> None:
    """A Prefect API that accepts connections but never answers: acknowledged at once, and each
    attempt ends after the start timeout, recorded as such."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # never accepted: connects succeed, reads hang
    try:
        api = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
        app = create_app(secret=SECRET, config_loader=make_config, starter=PrefectStarter(api_url=api),
                         start_timeout=1, health_timeout=1, backoff_initial=0.1, backoff_max=0.2)
        with ServerThread(app) as server:
            body = body_of("push_new_branch.json")
            r = post(server.url, body, signed_headers(body))
            assert r.status_code == 202 and r.json()["delivery_status"] == "pending"
            deadline = time.monotonic() + 30
            while not (view := httpx.get(r.json()["status_url"], timeout=30).json())["attempts"]:
                assert time.monotonic() < deadline, view
                time.sleep(0.1)
            assert view["status"] == "pending"
            assert view["attempts"][0]["outcome"] == "Prefect API did not answer within 1 s"
            assert httpx.get(f"{server.url}/healthz", timeout=30).json()["prefect_api"] == "unreachable"
    finally:
        listener.close()


def test_missing_deployment_fails_the_delivery(prefect_api: str) -> None:
    """If the deploy deployment is not registered, the delivery is marked failed with a reason naming it."""
    app = create_app(secret=SECRET, config_loader=make_config,
                     starter=PrefectStarter(api_url=prefect_api, deployment_name="deploy/not-registered"))
    with ServerThread(app) as server:
        body = body_of("push_branch.json")
        r = post(server.url, body, signed_headers(body))
        assert r.status_code == 202
        view = wait_for_delivery(server.url, r.json()["delivery_id"])
        assert view["status"] == "failed" and "deploy/not-registered" in view["reason"]
        assert view["runs"] == [] and view["attempt_count"] == 1
        assert "deploy/not-registered" in json.dumps(view["requests"])
