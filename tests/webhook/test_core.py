"""parse_event and decide on payloads shaped like GitHub's documented push and ping examples."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from delivery.errors import WebhookError
from deployments.webhook import Event, decide, is_pipeline_commit, parse_event
from tests.webhook.helpers import SECRET, body_of, make_config, payload, signed_headers

ZERO = "0" * 40


def parse(body: bytes, *, event: str = "push", delivery: str = "d-1",
          content_type: str = "application/json") -> Event:
    return parse_event(signed_headers(body, event=event, delivery=delivery, content_type=content_type), body,
                       secret=SECRET)


def refused(body: bytes, **kw: str) -> WebhookError:
    with pytest.raises(WebhookError) as exc:
        parse(body, **kw)
    return exc.value


def test_branch_push_parses_and_queues_staging() -> None:
    """A push to main is read in full and queues one staging deploy keyed by delivery, app and env."""
    ev = parse(body_of("push_branch.json"), delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    push = ev.push
    assert push is not None
    assert (push.ref, push.branch, push.tag, push.is_tag) == ("refs/heads/main", "main", None, False)
    assert push.after == "9f3b5c2d1e0a4b8c7d6e5f4a3b2c1d0e9f8a7b6c"
    assert not push.created and not push.deleted
    assert push.repository.full_name == "your-org/workout-api"
    assert push.repository.clone_url == "https://github.com/your-org/workout-api.git"
    assert push.repository.ssh_url == "git@github.com:your-org/workout-api.git"
    assert [c.id[:7] for c in push.commits] == ["6113728", "9f3b5c2"]
    assert push.head_commit is not None and push.head_commit.id == push.after
    assert push.pusher == "Codertocat"

    d = decide(ev, make_config())
    assert (d.http_status, d.status) == (202, "queued")
    assert [(r.app, r.environment, r.source_ref, r.source_sha, r.idempotency_key) for r in d.requests] == [
        ("workout-api", "staging", "refs/heads/main", push.after,
         "72d3162e-cc78-11e3-81ab-4c9367dc0958:workout-api:staging"),
    ]


def test_new_branch_push_queues_dev() -> None:
    """Creating release-dev (before all zeros) deploys to dev."""
    ev = parse(body_of("push_new_branch.json"))
    assert ev.push is not None and ev.push.created and ev.push.before == ZERO
    d = decide(ev, make_config())
    assert d.status == "queued"
    assert [r.environment for r in d.requests] == ["dev"]


def test_tag_push_queues_prod() -> None:
    """A v1.2.3 tag deploys to prod at the tagged commit even though `commits` is empty."""
    ev = parse(body_of("push_tag.json"))
    assert ev.push is not None and ev.push.is_tag and ev.push.tag == "v1.2.3"
    d = decide(ev, make_config())
    assert d.status == "queued"
    assert [(r.environment, r.source_ref) for r in d.requests] == [("prod", "refs/tags/v1.2.3")]


def test_tag_deletion_is_ignored() -> None:
    """Deleting a tag never deploys."""
    ev = parse(body_of("push_tag_deleted.json"))
    assert ev.push is not None and ev.push.deleted
    d = decide(ev, make_config())
    assert (d.http_status, d.status) == (202, "ignored")
    assert "deletes" in d.reason


def test_deleted_inferred_from_zero_after() -> None:
    """A push whose `after` is all zeros counts as a deletion even without `deleted: true`."""
    p = payload("push_branch.json")
    p["after"], p["deleted"] = ZERO, False
    assert decide(parse(json.dumps(p).encode()), make_config()).status == "ignored"


def test_form_encoded_variant_parses_like_json() -> None:
    """GitHub's `application/x-www-form-urlencoded` form (payload=<json>) gives the same decision."""
    form = urlencode({"payload": body_of("push_branch.json").decode()}).encode()
    ev = parse(form, content_type="application/x-www-form-urlencoded")
    assert ev.push is not None and ev.push.ref == "refs/heads/main"
    assert [r.environment for r in decide(ev, make_config()).requests] == ["staging"]


def test_json_with_charset_parameter() -> None:
    """`application/json; charset=utf-8` is accepted."""
    assert parse(body_of("push_tag.json"), content_type="application/json; charset=utf-8").push is not None


def test_ping_answers_pong_with_zen() -> None:
    """The ping GitHub sends on hook creation answers 200 pong with its zen line."""
    d = decide(parse(body_of("ping.json"), event="ping"), make_config())
    assert (d.http_status, d.status, d.zen) == (200, "pong", "Keep it logically awesome.")


def test_other_events_are_ignored() -> None:
    """An issues event is acknowledged and ignored."""
    d = decide(parse(b'{"action": "opened"}', event="issues"), make_config())
    assert (d.http_status, d.status) == (202, "ignored")


def test_unknown_repository_is_ignored() -> None:
    """A push from a repository no app builds from is ignored."""
    p = payload("push_branch.json")
    p["repository"].update(full_name="someone/else", name="else", clone_url="https://github.com/someone/else.git",
                           ssh_url="git@github.com:someone/else.git", html_url="https://github.com/someone/else")
    d = decide(parse(json.dumps(p).encode()), make_config())
    assert d.status == "ignored" and "someone/else" in d.reason


def test_repository_matched_by_ssh_url_only() -> None:
    """A repository renamed on GitHub still matches through any of its URLs."""
    p = payload("push_branch.json")
    p["repository"].update(full_name="your-org/renamed", clone_url="", html_url="")
    assert decide(parse(json.dumps(p).encode()), make_config()).status == "queued"


def test_unconfigured_ref_is_ignored_naming_the_ref() -> None:
    """A push to a feature branch is ignored, and the reason names the ref."""
    p = payload("push_branch.json")
    p["ref"] = "refs/heads/feature/login"
    d = decide(parse(json.dumps(p).encode()), make_config())
    assert d.status == "ignored" and "refs/heads/feature/login" in d.reason


def test_pipeline_bump_push_is_ignored() -> None:
    """A push made only of the pipeline's own values-bump commits does not deploy again."""
    d = decide(parse(body_of("push_pipeline_bump.json")), make_config())
    assert d.status == "ignored" and "Delivery-Pipeline" in d.reason


def test_mixed_push_still_deploys() -> None:
    """A push with one human commit among pipeline commits deploys."""
    p = payload("push_pipeline_bump.json")
    p["commits"].append(payload("push_branch.json")["commits"][0])
    assert decide(parse(json.dumps(p).encode()), make_config()).status == "queued"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("bump\n\nDelivery-Pipeline: values-bump", True),
        ("roll back staging\n\nwhy: health failed\n\nDelivery-Pipeline: rollback\nSigned-off-by: bot <b@x>", True),
        ("Delivery-Pipeline: values-bump", False),  # a subject line, not a trailer
        ("fix\n\nDelivery-Pipeline: values-bump\n\nmore prose after", False),
        ("fix\n\nmentions Delivery-Pipeline: values-bump in prose", False),
        ("plain commit", False),
    ],
)
def test_pipeline_trailer_detection(message: str, expected: bool) -> None:
    """Only a `Delivery-Pipeline:` trailer in the last paragraph marks a commit as the pipeline's own."""
    assert is_pipeline_commit(message) is expected


@pytest.mark.parametrize("missing", ["ref", "after", "repository"])
def test_push_missing_field_is_400_naming_it(missing: str) -> None:
    """A push without ref, after or repository is refused, and the message says which."""
    p = payload("push_branch.json")
    del p[missing]
    err = refused(json.dumps(p).encode())
    assert err.status == 400 and missing in err.message


@pytest.mark.parametrize(
    "ref",
    [
        "main",
        "refs/remotes/origin/main",
        "refs/heads/a..b",
        "refs/heads/x\nInjected: yes",
        "refs/heads/with space",
        "refs/heads/x;rm -rf",
        "refs/heads/$(id)",
        "refs/heads/`id`",
        "refs/heads/-delete",
        "refs/tags/--upload-pack=evil",
        "refs/heads/" + "a" * 250,
        "refs/heads/",
    ],
)
def test_hostile_refs_are_refused(ref: str) -> None:
    """Ref names that are not plain branches/tags or could act as shell or options are 400."""
    p = payload("push_branch.json")
    p["ref"] = ref
    err = refused(json.dumps(p).encode())
    assert err.status == 400 and "ref" in err.message


@pytest.mark.parametrize("sha", ["abc", "g" * 40, "a" * 41, 12345])
def test_bad_sha_is_400(sha: object) -> None:
    """An `after` that is not a 40-hex sha is refused."""
    p = payload("push_branch.json")
    p["after"] = sha
    assert refused(json.dumps(p).encode()).status == 400


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{broken", "application/json", 400),
        (b"[1, 2, 3]", "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        (b'{"n": ' + b"9" * 5000 + b"}", "application/json", 400),
        (b"{}", "text/plain", 415),
        (b"{}", "", 415),
        (b"payload=%7Bbroken", "application/x-www-form-urlencoded", 400),
        (b"other=1", "application/x-www-form-urlencoded", 400),
        (b"payload=1&payload=2", "application/x-www-form-urlencoded", 400),
    ],
)
def test_malformed_signed_bodies_are_4xx(body: bytes, content_type: str, status: int) -> None:
    """Correctly signed but broken bodies are refused with the right 4xx."""
    assert refused(body, content_type=content_type).status == status


def test_missing_delivery_header_is_400() -> None:
    """A signed delivery without X-GitHub-Delivery cannot be deduplicated, so it is refused."""
    body = body_of("push_branch.json")
    headers = signed_headers(body)
    del headers["X-GitHub-Delivery"]
    with pytest.raises(WebhookError) as exc:
        parse_event(headers, body, secret=SECRET)
    assert exc.value.status == 400
