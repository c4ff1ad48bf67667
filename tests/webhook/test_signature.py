"""Signature checks: GitHub's published test vector and the ways a signature can be wrong."""

from __future__ import annotations

import pytest

from delivery.errors import WebhookError
from deployments.webhook import parse_event, signature_for, verify_signature
from tests.webhook.helpers import SECRET, body_of, signed_headers

GITHUB_SECRET = "It's a Secret to Everybody"  # secret-scan: allow (test fixture)
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_test_vector_verifies() -> None:
    """GitHub's documented secret/body pair produces and accepts GitHub's documented signature."""
    assert signature_for(GITHUB_BODY, GITHUB_SECRET) == GITHUB_SIGNATURE
    verify_signature(GITHUB_BODY, GITHUB_SIGNATURE, GITHUB_SECRET)
    verify_signature(GITHUB_BODY, GITHUB_SIGNATURE.upper().replace("SHA256=", "sha256="), GITHUB_SECRET)


def test_test_vector_passes_the_signature_stage_of_parse_event() -> None:
    """With the test vector, parse_event gets past the signature and refuses only the non-JSON body."""
    headers = {"x-hub-signature-256": GITHUB_SIGNATURE, "X-GitHub-Event": "push", "X-GitHub-Delivery": "d1",
               "content-type": "application/json"}
    with pytest.raises(WebhookError) as exc:
        parse_event(headers, GITHUB_BODY, secret=GITHUB_SECRET)
    assert exc.value.status == 400


def _status(headers: dict[str, str], body: bytes, secret: str = SECRET) -> int:
    with pytest.raises(WebhookError) as exc:
        parse_event(headers, body, secret=secret)
    return exc.value.status


def test_tampered_body_is_401() -> None:
    """Changing one byte of a signed body makes the delivery unauthorized."""
    body = body_of("push_branch.json")
    headers = signed_headers(body)
    assert _status(headers, body.replace(b"refs/heads/main", b"refs/heads/mainx")) == 401


def test_wrong_secret_is_401() -> None:
    """A body signed with another secret is unauthorized."""
    body = body_of("push_branch.json")
    assert _status(signed_headers(body, secret="another-secret"), body) == 401  # secret-scan: allow (test fixture)


def test_sha1_only_is_401() -> None:
    """Only the legacy sha1 X-Hub-Signature header is not enough."""
    body = body_of("push_branch.json")
    headers = signed_headers(body)
    del headers["X-Hub-Signature-256"]
    headers["X-Hub-Signature"] = "sha1=7d38cdd689735b008b3c702edd92eea23791c5f6"
    with pytest.raises(WebhookError) as exc:
        parse_event(headers, body, secret=SECRET)
    assert exc.value.status == 401
    assert "sha1" in exc.value.message


@pytest.mark.parametrize("value", [None, "", "sha256=", "sha256=zz", "md5=abc", "sha256=" + "0" * 64])
def test_missing_or_malformed_signature_is_401(value: str | None) -> None:
    """No signature, an empty one, a non-hex one or a wrong one: all unauthorized."""
    body = body_of("push_branch.json")
    headers = signed_headers(body)
    del headers["X-Hub-Signature-256"]
    if value is not None:
        headers["X-Hub-Signature-256"] = value
    assert _status(headers, body) == 401


def test_header_names_are_case_insensitive() -> None:
    """Lower-case and odd-case header names are read the same as GitHub's spelling."""
    body = body_of("push_branch.json")
    headers = {k.lower() if i % 2 else k.upper(): v for i, (k, v) in enumerate(signed_headers(body).items())}
    assert parse_event(headers, body, secret=SECRET).event == "push"


def test_signature_checked_before_anything_else() -> None:
    """An unsigned delivery is 401 even when its content type and JSON are also wrong."""
    assert _status({"content-type": "text/plain", "x-github-event": "push"}, b"{not json") == 401


def test_oversize_is_413_before_the_signature() -> None:
    """A body over 1 MiB is refused as too large, without computing its HMAC."""
    assert _status({"x-hub-signature-256": "sha256=" + "0" * 64}, b"x" * (1024 * 1024 + 1)) == 413
