"""A flood of bad deliveries: every one refused with 4xx, the receiver stays up, nothing starts."""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import urlencode

import httpx

from deployments.webhook import PrefectStarter, create_app
from tests.webhook.helpers import SECRET, ServerThread, body_of, make_config, payload, signed_headers
from tests.webhook.test_http import runs_for


def _malformed() -> list[tuple[bytes, str]]:
    """Bodies that are signed correctly but must still be refused, with their content type."""
    out: list[tuple[bytes, str]] = [
        (b"{not json", "application/json"),
        (b'["a list"]', "application/json"),
        (b"\xc3\x28", "application/json"),
        (body_of("push_branch.json"), "text/plain"),
        (body_of("push_branch.json"), "application/xml"),
        (b"payload=%7B", "application/x-www-form-urlencoded"),
        (b"x" * (1024 * 1024 + 10), "application/json"),
        (b"[" * 50_000, "application/json"),
    ]
    for missing in ("ref", "after", "repository"):
        p = payload("push_branch.json")
        del p[missing]
        out.append((json.dumps(p).encode(), "application/json"))
    for ref in ("refs/heads/$(reboot)", "refs/heads/a..b", "refs/heads/-x", "main"):
        p = payload("push_branch.json")
        p["ref"] = ref
        out.append((urlencode({"payload": json.dumps(p)}).encode(), "application/x-www-form-urlencoded"))
    p = payload("push_branch.json")
    p["after"] = "not-a-sha"
    out.append((json.dumps(p).encode(), "application/json"))
    return out


def test_flood_of_bad_deliveries(prefect_api: str) -> None:
    """500 badly signed and 200 malformed deliveries are all 4xx; healthz stays ok; no run is created."""
    before = len(runs_for(prefect_api))
    app = create_app(secret=SECRET, config_loader=make_config, starter=PrefectStarter(api_url=prefect_api))
    statuses: Counter[int] = Counter()
    body = body_of("push_branch.json")
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(500):
            headers = signed_headers(body, secret=f"wrong-{i}")
            if i % 3 == 0:
                del headers["X-Hub-Signature-256"]
            elif i % 3 == 1:
                headers["X-Hub-Signature-256"] = "sha256=" + f"{i:064x}"
            statuses[client.post("/webhooks/github", content=body, headers=headers).status_code] += 1
        assert statuses == Counter({401: 500})

        malformed = _malformed()
        for i in range(200):
            bad_body, content_type = malformed[i % len(malformed)]
            r = client.post("/webhooks/github", content=bad_body,
                            headers=signed_headers(bad_body, content_type=content_type))
            statuses[r.status_code] += 1
            assert 400 <= r.status_code < 500, (i, r.status_code, r.text)
            assert r.json()["status"] == "refused"

        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "prefect_api": "reachable"}

    assert sum(statuses.values()) == 700
    assert {400, 401, 413, 415} <= set(statuses)
    assert len(runs_for(prefect_api)) == before
