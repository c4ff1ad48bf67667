"""The receiver process (`delivery webhook serve`) SIGKILLed in the middle of a burst and started
again on the same store, against a real (temporary) Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from delivery.settings import PROJECT_ROOT
from deployments.webhook.store import DeliveryStore
from tests.webhook.helpers import SECRET, body_of, closed_port, config_data, new_delivery_id, signed_headers
from tests.webhook.test_http import runs_for

BURST = 60
KILL_AFTER_ACKS = 25


def start_receiver(tmp_path: Path, store: Path, api: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    config = tmp_path / "delivery.yaml"
    config.write_text(json.dumps(config_data()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(PYTHONPATH=str(PROJECT_ROOT), PREFECT_API_URL=api, DELIVERY_WEBHOOK_SECRET=SECRET,
               DELIVERY_CONFIG_FILE=str(config), DELIVERY_WEBHOOK_STORE_PATH=str(store),
               DELIVERY_WEBHOOK_DISPATCH_BACKOFF_MAX_SECONDS="1")
    proc = subprocess.Popen([sys.executable, "-m", "delivery.cli", "webhook", "serve", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"receiver did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def test_sigkill_mid_burst_every_acknowledged_delivery_gets_its_run_once(tmp_path: Path, prefect_api: str) -> None:
    """60 pushes sent 8 at a time; the receiver is SIGKILLed after 25 acknowledgements, while runs are
    still being created, and restarted: every acknowledged delivery ends dispatched with exactly one
    run in Prefect, and no delivery has two."""
    store_path = tmp_path / "deliveries.sqlite3"
    log = tmp_path / "receiver.log"
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_receiver(tmp_path, store_path, prefect_api, port, log)
    body = body_of("push_branch.json")
    deliveries = [new_delivery_id() for _ in range(BURST)]
    acked: list[str] = []

    def send(d: str) -> tuple[str, int]:
        try:
            r = httpx.post(f"{url}/webhooks/github", content=body, headers=signed_headers(body, delivery=d),
                           timeout=30)
            return d, r.status_code
        except httpx.HTTPError:
            return d, 0

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for fut in as_completed([pool.submit(send, d) for d in deliveries]):
                d, status = fut.result()
                if status == 202:
                    acked.append(d)
                else:
                    assert status == 0, f"{d}: answered {status}"
                if len(acked) == KILL_AFTER_ACKS and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    assert KILL_AFTER_ACKS <= len(acked) < BURST, f"{len(acked)} acknowledged: the kill was not mid-burst"
    stopped = DeliveryStore(store_path)
    at_kill = {d: stopped.get(d) for d in acked}
    stopped.close()
    assert all(rec is not None for rec in at_kill.values()), "an acknowledged delivery is missing from the store"
    pending_at_kill = [d for d, rec in at_kill.items() if rec and rec.status == "pending"]
    assert pending_at_kill, "every run was already created when the receiver died: not a mid-dispatch kill"

    proc = start_receiver(tmp_path, store_path, prefect_api, port, log)
    try:
        deadline = time.monotonic() + 120
        for d in acked:
            status_url = f"{url}/webhooks/github/deliveries/{d}"
            while (view := httpx.get(status_url, timeout=30).json())["status"] == "pending":
                assert time.monotonic() < deadline, view
                time.sleep(0.1)
            assert view["status"] == "dispatched", view
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    by_delivery: dict[str, list[str]] = {}
    for run in runs_for(prefect_api):
        d = run.parameters.get("delivery_id")
        if d in deliveries:
            by_delivery.setdefault(d, []).append(str(run.id))
    store = DeliveryStore(store_path)
    for d in acked:
        record = store.get(d)
        assert record is not None
        assert by_delivery.get(d) == record.run_ids, (d, by_delivery.get(d), record.run_ids)
    assert all(len(runs) == 1 for runs in by_delivery.values())
    store.close()
    assert "Traceback" not in log.read_text()
