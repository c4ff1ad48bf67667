"""The receiver's pure core: verify a GitHub delivery, parse it into an `Event`, and `decide` which
deploys it asks for. No I/O at all, so every decision can be tested from bytes and a `Config`."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs

from delivery.config import Config
from delivery.errors import ConfigError, WebhookError

# The same trailer rule the GitOps commits are written with: our own pushes must not deploy again.
from tasks.trailers import PIPELINE_TRAILER, is_pipeline_commit

MAX_BODY_BYTES = 1024 * 1024
# GitHub gives up after 10 s; leave room for reading the body and answering.
START_TIMEOUT_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 2.0
DEFAULT_DEPLOYMENT = "deploy/deploy"
ZERO_SHA = "0" * 40

_SHA_RE = re.compile(r"[0-9a-fA-F]{40}")
_SIGNATURE_RE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_DELIVERY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EVENT_RE = re.compile(r"[a-z_]{1,64}")
# Characters git itself refuses in ref names, plus the ones that turn a ref into shell syntax.
_REF_FORBIDDEN = set(" ;$`~^:?*[\\\"'|&<>(){}!")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Repository:
    full_name: str
    name: str = ""
    clone_url: str = ""
    ssh_url: str = ""
    html_url: str = ""

    def names(self) -> set[str]:
        """Every way GitHub names this repository, for matching against configured source repos."""
        return {n for n in (self.full_name, self.clone_url, self.ssh_url, self.html_url) if n}


@dataclass(frozen=True)
class Commit:
    id: str
    message: str = ""


@dataclass(frozen=True)
class Push:
    ref: str
    before: str
    after: str
    deleted: bool
    created: bool
    repository: Repository
    head_commit: Commit | None = None
    commits: tuple[Commit, ...] = ()
    pusher: str = ""

    @property
    def is_tag(self) -> bool:
        return self.ref.startswith("refs/tags/")

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.is_tag else None

    @property
    def ref_name(self) -> str:
        """The branch or tag name without its `refs/...` prefix."""
        return self.tag if self.is_tag else (self.branch or self.ref)  # type: ignore[return-value]


@dataclass(frozen=True)
class Event:
    event: str
    delivery_id: str
    payload: dict[str, Any]
    push: Push | None = None


@dataclass(frozen=True)
class DeployRequest:
    app: str
    environment: str
    source_ref: str
    source_sha: str
    idempotency_key: str


@dataclass(frozen=True)
class Decision:
    http_status: int
    status: str  # pong | ignored | queued | refused
    reason: str
    requests: tuple[DeployRequest, ...] = ()
    zen: str | None = None


@dataclass(frozen=True)
class StartedRun:
    flow_run_id: str
    app: str
    environment: str
    ui_url: str | None = None


# --------------------------------------------------------------------------- pure checks


def validate_ref(ref: str) -> None:
    """Refuse ref names that are not a plain branch or tag, or that could be read as shell or options."""
    if not isinstance(ref, str) or not ref:
        raise WebhookError("ref must be a non-empty string", status=400)
    shown = _show(ref)
    if ref.startswith("refs/heads/"):
        name = ref.removeprefix("refs/heads/")
    elif ref.startswith("refs/tags/"):
        name = ref.removeprefix("refs/tags/")
    else:
        raise WebhookError(f"ref {shown} is neither refs/heads/... nor refs/tags/...", status=400)
    if len(ref.encode("utf-8", "surrogatepass")) > 255:
        raise WebhookError("ref is longer than 255 bytes", status=400)
    if not name:
        raise WebhookError(f"ref {shown} has an empty name", status=400)
    if name.startswith("-"):
        raise WebhookError(f"ref {shown} starts with '-'", status=400)
    if ".." in name or "@{" in name or "//" in name:
        raise WebhookError(f"ref {shown} contains '..', '@{{' or '//'", status=400)
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise WebhookError(f"ref {shown} contains control characters", status=400)
    bad = sorted({c for c in name if c in _REF_FORBIDDEN})
    if bad:
        raise WebhookError(f"ref {shown} contains forbidden characters {''.join(bad)!r}", status=400)
    if name.endswith(("/", ".", ".lock")) or name.startswith(".") or "/." in name:
        raise WebhookError(f"ref {shown} is not a valid git ref name", status=400)


def validate_sha(sha: str, what: str = "after") -> None:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise WebhookError(f"{what} is not a 40-character hexadecimal commit sha", status=400)


def signature_for(body: bytes, secret: str) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: str) -> None:
    if not header:
        raise WebhookError("missing X-Hub-Signature-256 header", status=401)
    m = _SIGNATURE_RE.fullmatch(header.strip())
    if m is None:
        raise WebhookError("X-Hub-Signature-256 is not of the form sha256=<hex>", status=401)
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode("ascii"), m.group(1).lower().encode("ascii")):
        raise WebhookError("signature does not match the body", status=401)


# --------------------------------------------------------------------------- parse


def parse_event(headers: Mapping[str, str], body: bytes, *, secret: str) -> Event:
    """Verify and parse one GitHub delivery; raise `WebhookError` with the HTTP status to answer."""
    if not secret:
        raise ConfigError("no webhook secret configured")
    h = {str(k).lower(): v for k, v in headers.items()}
    if len(body) > MAX_BODY_BYTES:
        raise WebhookError(f"body is larger than {MAX_BODY_BYTES} bytes", status=413)
    sig = h.get("x-hub-signature-256")
    if not sig and h.get("x-hub-signature"):
        raise WebhookError("only a sha1 X-Hub-Signature was sent; X-Hub-Signature-256 is required", status=401)
    verify_signature(body, sig, secret)

    event = (h.get("x-github-event") or "").strip()
    if not _EVENT_RE.fullmatch(event):
        raise WebhookError("missing or malformed X-GitHub-Event header", status=400)
    delivery_id = (h.get("x-github-delivery") or "").strip()
    if not _DELIVERY_ID_RE.fullmatch(delivery_id):
        raise WebhookError("missing or malformed X-GitHub-Delivery header", status=400)

    payload = _decode_payload(h.get("content-type") or "", body)
    push = _parse_push(payload) if event == "push" else None
    return Event(event=event, delivery_id=delivery_id, payload=payload, push=push)


def _decode_payload(content_type: str, body: bytes) -> dict[str, Any]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        raw: bytes | str = body
    elif media == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError) as e:
            raise WebhookError("form body is not valid urlencoded UTF-8", status=400) from e
        values = form.get("payload")
        if not values or len(values) != 1:
            raise WebhookError("form body must carry exactly one 'payload' field", status=400)
        raw = values[0]
    else:
        raise WebhookError(
            "unsupported content type: expected application/json or application/x-www-form-urlencoded",
            status=415,
        )
    try:
        payload = json.loads(raw)
    # RecursionError: deeply nested arrays; ValueError: bad JSON, bad UTF-8, integers too long to convert.
    except (ValueError, RecursionError) as e:
        raise WebhookError("body is not valid JSON", status=400) from e
    if not isinstance(payload, dict):
        raise WebhookError("payload is not a JSON object", status=400)
    return payload


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str, *, required: bool = True) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise WebhookError(f"push payload is missing {where}", status=400)
        return None
    if not isinstance(value, kind):
        raise WebhookError(f"push payload field {where} has the wrong type", status=400)
    return value


def _commit(raw: Any, where: str) -> Commit:
    if not isinstance(raw, dict):
        raise WebhookError(f"push payload field {where} is not an object", status=400)
    cid = _field(raw, "id", str, f"{where}.id")
    message = _field(raw, "message", str, f"{where}.message", required=False) or ""
    return Commit(id=cid, message=message)


def _parse_push(payload: dict[str, Any]) -> Push:
    ref = _field(payload, "ref", str, "ref")
    after = _field(payload, "after", str, "after")
    repo_raw = _field(payload, "repository", dict, "repository")
    validate_ref(ref)
    validate_sha(after, "after")
    before = _field(payload, "before", str, "before", required=False) or ""
    if before:
        validate_sha(before, "before")

    full_name = _field(repo_raw, "full_name", str, "repository.full_name")
    repository = Repository(
        full_name=full_name,
        name=_field(repo_raw, "name", str, "repository.name", required=False) or "",
        clone_url=_field(repo_raw, "clone_url", str, "repository.clone_url", required=False) or "",
        ssh_url=_field(repo_raw, "ssh_url", str, "repository.ssh_url", required=False) or "",
        html_url=_field(repo_raw, "html_url", str, "repository.html_url", required=False) or "",
    )
    commits_raw = _field(payload, "commits", list, "commits", required=False) or []
    commits = tuple(_commit(c, f"commits[{i}]") for i, c in enumerate(commits_raw))
    head_raw = payload.get("head_commit")
    head = _commit(head_raw, "head_commit") if head_raw is not None else None

    pusher_raw = payload.get("pusher")
    pusher = ""
    if isinstance(pusher_raw, dict) and isinstance(pusher_raw.get("name"), str):
        pusher = pusher_raw["name"]

    deleted_flag = _field(payload, "deleted", bool, "deleted", required=False)
    created_flag = _field(payload, "created", bool, "created", required=False)
    return Push(
        ref=ref,
        before=before.lower(),
        after=after.lower(),
        deleted=bool(deleted_flag) or after == ZERO_SHA,
        created=bool(created_flag) or before == ZERO_SHA,
        repository=repository,
        head_commit=head,
        commits=commits,
        pusher=pusher,
    )


# --------------------------------------------------------------------------- decide


def decide(event: Event, config: Config) -> Decision:
    """What to do with a verified delivery. Pure: the same event and config give the same decision."""
    if event.event == "ping":
        zen = event.payload.get("zen")
        return Decision(200, "pong", "ping received", zen=zen if isinstance(zen, str) else None)
    if event.event != "push":
        return Decision(202, "ignored", f"event {event.event!r} is not handled")
    push = event.push
    if push is None:
        return Decision(400, "refused", "push event without a parsed push payload")
    try:
        validate_ref(push.ref)
        validate_sha(push.after, "after")
    except WebhookError as e:
        return Decision(e.status, "refused", e.message)

    if push.deleted:
        return Decision(202, "ignored", f"push deletes {push.ref}")
    apps = config.apps_for_repo(push.repository.names())
    if not apps:
        return Decision(202, "ignored", f"repository {_show(push.repository.full_name)} is not configured for any app")
    requests = tuple(
        DeployRequest(
            app=app.name,
            environment=env.name,
            source_ref=push.ref,
            source_sha=push.after,
            idempotency_key=f"{event.delivery_id}:{app.name}:{env.name}",
        )
        for app in apps
        for env in app.environments_for_ref(push.ref)
    )
    if not requests:
        return Decision(202, "ignored", f"no environment is configured for {push.ref}")
    commits = push.commits or ((push.head_commit,) if push.head_commit else ())
    if commits and all(is_pipeline_commit(c.message) for c in commits):
        return Decision(202, "ignored", f"commits carry the {PIPELINE_TRAILER} trailer: the pipeline's own")
    targets = ", ".join(f"{r.app}/{r.environment}" for r in requests)
    return Decision(202, "queued", f"deploying {push.ref} at {push.after[:12]} to {targets}", requests=requests)


def _show(value: str, limit: int = 80) -> str:
    """A short, quoted, escape-safe rendering of an untrusted string for messages and logs."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)




# --------------------------------------------------------------------------- the starter's interface


@runtime_checkable
class Starter(Protocol):
    async def start(
        self, requests: list[DeployRequest], *, received_at: datetime, delivery_id: str
    ) -> list[StartedRun]: ...
