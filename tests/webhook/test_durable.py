"""Durable intake over real HTTP with a fake Prefect (`IdempotentStarter`): a 202 means stored, the
dispatcher creates each delivery's runs once, in arrival order, through outages, restarts and disk
errors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from delivery.cli import main as cli_main
from delivery.errors import WebhookError
from deployments.webhook import DeployRequest, create_app
from deployments.webhook.store import DeliveryStore
from tests.webhook.helpers import (
    SECRET,
    IdempotentStarter,
    ServerThread,
    body_of,
    make_config,
    new_delivery_id,
    signed_headers,
    wait_for_delivery,
)

BODY = body_of("push_branch.json")


def post(url: str, delivery: str | None = None, body: bytes = BODY) -> httpx.Response:
    return httpx.post(f"{url}/webhooks/github", content=body, headers=signed_headers(body, delivery=delivery),
                      timeout=30)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DeliveryStore]:
    s = DeliveryStore(tmp_path / "deliveries.sqlite3")
    yield s
    s.close()


def serve(store: DeliveryStore, starter: object) -> ServerThread:
    return ServerThread(create_app(secret=SECRET, config_loader=make_config, starter=starter,  # type: ignore[arg-type]
                                   store=store, backoff_initial=0.05, backoff_max=0.2))


def test_ack_comes_before_dispatch(store: DeliveryStore) -> None:
    """With Prefect not answering yet, the 202 arrives at once and the delivery is pending; the run
    is created once Prefect answers."""
    gate = threading.Event()
    starter = IdempotentStarter(gate=gate)
    with serve(store, starter) as server:
        try:
            delivery = new_delivery_id()
            started = time.monotonic()
            r = post(server.url, delivery)
            assert r.status_code == 202 and time.monotonic() - started < 2
            assert r.json()["delivery_status"] == "pending" and "runs" not in r.json()
            assert store.get(delivery) is not None, "stored before the answer"
            assert httpx.get(r.json()["status_url"], timeout=30).json()["status"] == "pending"
            assert starter.runs == {}
        finally:
            gate.set()
        view = wait_for_delivery(server.url, delivery)
    assert view["status"] == "dispatched"
    assert [r["flow_run_id"] for r in view["runs"]] == [starter.runs[f"{delivery}:workout-api:staging"]]
    assert view["runs"][0]["url"] == f"http://ui.test/runs/flow-run/{view['runs'][0]['flow_run_id']}"


def test_prefect_down_then_back_every_delivery_gets_its_run_once_in_order(store: DeliveryStore) -> None:
    """Prefect unreachable while 15 deliveries arrive: all acknowledged, retried with backoff; once it
    is back each gets exactly one run, created in arrival order, and every failed attempt is recorded."""
    starter = IdempotentStarter(down=True)
    with serve(store, starter) as server:
        deliveries = [new_delivery_id() for _ in range(15)]
        for d in deliveries:
            assert post(server.url, d).status_code == 202
        deadline = time.monotonic() + 30
        while starter.failures < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        head = httpx.get(f"{server.url}/webhooks/github/deliveries/{deliveries[0]}", timeout=30).json()
        assert head["status"] == "pending" and head["attempt_count"] >= 3
        assert all("unreachable" in a["outcome"] for a in head["attempts"])
        starter.down = False
        views = [wait_for_delivery(server.url, d) for d in deliveries]
    keys = [f"{d}:workout-api:staging" for d in deliveries]
    assert starter.asked == keys  # each asked for once, oldest first
    assert [v["status"] for v in views] == ["dispatched"] * 15
    assert [v["runs"][0]["flow_run_id"] for v in views] == [starter.runs[k] for k in keys]
    assert views[0]["attempts"][-1]["outcome"].startswith("created run")


def test_permanent_refusal_fails_the_delivery_and_the_next_one_proceeds(store: DeliveryStore) -> None:
    """A 4xx-like refusal marks that delivery failed with the reason and is not retried; the next
    delivery still gets its run; a redelivery of the failed one tries it again, without a second record."""

    class Refusing(IdempotentStarter):
        refuse: bool = True

        async def start(self, requests: list[DeployRequest], **kw: object) -> list:  # type: ignore[override]
            if self.refuse:
                self.failures += 1
                raise WebhookError("Prefect API refused to create the run for 'deploy/deploy': HTTP 422", status=503)
            return await super().start(requests, **kw)  # type: ignore[arg-type]

    starter = Refusing()
    with serve(store, starter) as server:
        bad = new_delivery_id()
        post(server.url, bad)
        view = wait_for_delivery(server.url, bad)
        assert view["status"] == "failed" and "HTTP 422" in view["reason"] and view["attempt_count"] == 1
        starter.refuse = False
        good = new_delivery_id()
        post(server.url, good)
        assert wait_for_delivery(server.url, good)["status"] == "dispatched"
        assert starter.failures == 1

        again = post(server.url, bad)
        assert again.status_code == 202 and again.json()["delivery_status"] == "pending"
        view = wait_for_delivery(server.url, bad)
        assert view["status"] == "dispatched" and view["reason"] == ""
    assert store.counts() == {"pending": 0, "dispatched": 2, "failed": 0}


def test_restart_resumes_pending_deliveries(store: DeliveryStore) -> None:
    """Deliveries a previous receiver stored but never dispatched get their runs, oldest first, as
    soon as a new receiver starts on the same store."""
    ids = [new_delivery_id() for _ in range(3)]
    for d in ids:
        store.add(d, "push", [DeployRequest("workout-api", "staging", "refs/heads/main", "a" * 40,
                                            f"{d}:workout-api:staging")], datetime.now(UTC))
    starter = IdempotentStarter()
    with serve(store, starter) as server:
        views = [wait_for_delivery(server.url, d) for d in ids]
    assert [v["status"] for v in views] == ["dispatched"] * 3
    assert starter.asked == [f"{d}:workout-api:staging" for d in ids]


def test_store_full_is_503_with_retry_after_and_a_loud_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At max_pending, a new delivery is refused 503 with Retry-After and an ERROR line; it is not stored."""
    store = DeliveryStore(tmp_path / "d.sqlite3", max_pending=2)
    starter = IdempotentStarter(down=True)
    with serve(store, starter) as server, caplog.at_level(logging.INFO, logger="delivery"):
        assert post(server.url).status_code == 202
        assert post(server.url).status_code == 202
        refused = new_delivery_id()
        r = post(server.url, refused)
    assert r.status_code == 503 and r.headers["Retry-After"] == "30"
    assert r.json()["status"] == "unavailable" and "full" in r.json()["reason"]
    assert store.get(refused) is None
    loud = [rec for rec in caplog.records if refused in rec.getMessage() and rec.levelno == logging.ERROR]
    assert loud and "store is full" in loud[0].getMessage()
    store.close()


def test_disk_full_is_503_and_no_ack(store: DeliveryStore) -> None:
    """When SQLite reports 'database or disk is full', the delivery is answered 503, never 202, and is not stored."""
    starter = IdempotentStarter()
    with serve(store, starter) as server:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        answers = []
        for _ in range(300):  # fill what room the last page has left
            d = new_delivery_id()
            r = post(server.url, d)
            answers.append((d, r.status_code))
            if r.status_code == 503:
                break
        d, status = answers[-1]
        assert status == 503, "the page cap was never reached"
        assert "could not be stored" in r.json()["reason"] and "full" in r.json()["reason"]
        assert store.get(d) is None
        assert all(store.get(x) is not None for x, s in answers if s == 202)


def test_read_only_store_is_503_and_no_ack(store: DeliveryStore) -> None:
    """A store SQLite refuses to write ('attempt to write a readonly database') answers 503 and stores nothing."""
    # Tests run as root, for whom a 0444 file is still writable: make SQLite itself read-only instead.
    starter = IdempotentStarter()
    with serve(store, starter) as server:
        store._db.execute("PRAGMA query_only = ON")
        d = new_delivery_id()
        r = post(server.url, d)
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert "readonly" in r.json()["reason"]
        store._db.execute("PRAGMA query_only = OFF")
        assert store.get(d) is None
        assert post(server.url, d).status_code == 202, "accepted once the store is writable again"


def test_status_of_unknown_or_malformed_delivery_is_404(store: DeliveryStore) -> None:
    """The status endpoint answers 404 for an id it never stored and for one that is not a delivery id."""
    with serve(store, IdempotentStarter()) as server:
        assert httpx.get(f"{server.url}/webhooks/github/deliveries/{new_delivery_id()}", timeout=30).status_code == 404
        assert httpx.get(f"{server.url}/webhooks/github/deliveries/a%20b", timeout=30).status_code == 404


def test_cli_lists_recent_and_pending_deliveries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`delivery deliveries` lists the newest deliveries with status and runs; --pending only the waiting ones."""
    from delivery.settings import get_settings

    path = tmp_path / "store.sqlite3"
    store = DeliveryStore(path)
    for d in ("done-1", "wait-2"):
        store.add(d, "push", [DeployRequest("workout-api", "staging", "refs/heads/main", "b" * 40,
                                            f"{d}:workout-api:staging")], datetime.now(UTC))
    store.record_attempt("done-1", 0, "created run run-1", run_id="run-1")
    store.record_attempt("wait-2", 0, "Prefect API at http://x/api is unreachable: ConnectError")
    store.close()
    monkeypatch.setenv("DELIVERY_WEBHOOK_STORE_PATH", str(path))
    monkeypatch.setenv("PREFECT_UI_URL", "http://ui.test")
    get_settings.cache_clear()
    try:
        assert cli_main(["deliveries"]) == 0
        out = capsys.readouterr().out
        assert "1 pending, 1 dispatched, 0 failed" in out
        assert out.index("wait-2") < out.index("done-1")
        assert "run run-1" in out and "unreachable" in out
        assert cli_main(["deliveries", "--pending", "--limit", "5"]) == 0
        out = capsys.readouterr().out
        assert "wait-2" in out and "done-1" not in out
    finally:
        get_settings.cache_clear()
