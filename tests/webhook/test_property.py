"""Property tests: whatever arrives, the receiver answers below 500 and starts nothing it should not."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delivery.errors import WebhookError
from deployments.webhook import create_app, decide, parse_event
from tests.webhook.helpers import SECRET, RecordingStarter, ServerThread, make_config, payload, signature_for

# What an HTTP client can send: printable ASCII without surrounding whitespace.
HEADER_TEXT = st.text(alphabet=string.printable.strip() + " ", max_size=60).map(str.strip)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
PUSH_FIELDS = ["ref", "before", "after", "created", "deleted", "commits", "head_commit", "pusher", "repository"]


@st.composite
def mutated_push(draw: st.DrawFn) -> bytes:
    """A documented push payload with random fields replaced, from a repository no app is configured for."""
    p = payload(draw(st.sampled_from(["push_branch.json", "push_tag.json", "push_new_branch.json"])))
    for key in draw(st.lists(st.sampled_from(PUSH_FIELDS), max_size=4)):
        if draw(st.booleans()):
            p.pop(key, None)
        else:
            p[key] = draw(JSON_VALUES | st.text(alphabet=string.printable, max_size=300))
    repo = draw(st.text(alphabet=string.ascii_letters + "/-._", min_size=1, max_size=30))
    p["repository"] = {"full_name": f"stranger/{repo}", "clone_url": f"https://example.invalid/{repo}.git"}
    return json.dumps(p).encode()


BODIES = st.one_of(
    st.binary(max_size=2000),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    mutated_push(),
    mutated_push().map(lambda b: urlencode({"payload": b.decode()}).encode()),
)
def build_headers(body: bytes, content_type: str, event: str, delivery: str, sign: str,
                  extra: dict[str, str]) -> dict[str, str]:
    headers = dict(extra)
    headers.update({"Content-Type": content_type, "X-GitHub-Event": event, "X-GitHub-Delivery": delivery})
    if sign == "valid":
        headers["X-Hub-Signature-256"] = signature_for(body, SECRET)
    elif sign == "wrong":
        headers["X-Hub-Signature-256"] = signature_for(body, "not-the-secret")
    elif sign == "sha1":
        headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    return headers


def header_cases(text: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    content_types = st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "application/x-www-form-urlencoded",
         "text/plain", "multipart/form-data", ""]
    ) | text
    events = st.sampled_from(["push", "ping", "issues", "create", ""]) | text
    return st.tuples(
        content_types,
        events,
        st.uuids().map(str) | text,
        st.sampled_from(["valid", "valid", "wrong", "sha1", "none"]),
        st.dictionaries(st.sampled_from(["X-Extra", "Accept", "X-GitHub-Hook-ID", "X-Forwarded-For"]), text,
                        max_size=3),
    )


@given(body=BODIES, case=header_cases(HEADER_TEXT | st.text(max_size=60)))
@settings(max_examples=300, deadline=None, database=None)
def test_parse_event_only_raises_webhook_errors(body: bytes, case: tuple[Any, ...]) -> None:
    """parse_event and decide turn any input into an Event/Decision or a 4xx WebhookError, nothing else."""
    headers = build_headers(body, *case)
    try:
        event = parse_event(headers, body, secret=SECRET)
    except WebhookError as e:
        assert 400 <= e.status < 500
        if case[3] != "valid":
            assert e.status == 401
        return
    decision = decide(event, make_config())
    assert decision.http_status < 500
    assert not decision.requests


@pytest.fixture(scope="module")
def recording_server() -> Iterator[tuple[ServerThread, RecordingStarter]]:
    starter = RecordingStarter()
    app = create_app(secret=SECRET, config_loader=make_config, starter=starter)
    with ServerThread(app) as server:
        yield server, starter


@given(body=BODIES, case=header_cases(HEADER_TEXT))
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_http_never_500_and_never_starts(
    recording_server: tuple[ServerThread, RecordingStarter], body: bytes, case: tuple[Any, ...]
) -> None:
    """Over real HTTP, random headers, bodies and content types never get a 500 and never start a run."""
    server, starter = recording_server
    r = httpx.post(f"{server.url}/webhooks/github", content=body, headers=build_headers(body, *case), timeout=60)
    assert r.status_code < 500, r.text
    assert r.json()["status"] in {"pong", "ignored", "refused"}
    assert SECRET not in r.text
    assert starter.calls == []
