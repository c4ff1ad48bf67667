"""GitHub webhook receiver: a pure core (`parse_event`, `decide`) and a thin FastAPI adapter.

The core does no I/O, so every decision can be tested from bytes and a `Config`. The adapter reads
the body with a cap, answers GitHub within its 10 s limit, and starts deploy runs on the Prefect
server with one idempotency key per delivery, app and environment: a redelivery of the same
delivery returns the runs it already created instead of starting new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from delivery.config import Config
from delivery.errors import ConfigError, WebhookError
from delivery.log import get_logger
from delivery.redact import redact, register_secret

# The same trailer rule the GitOps commits are written with: our own pushes must not deploy again.
from tasks.gitops import PIPELINE_TRAILER, is_pipeline_commit

if TYPE_CHECKING:
    from delivery.settings import Settings

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


# --------------------------------------------------------------------------- starting runs


@runtime_checkable
class Starter(Protocol):
    async def start(
        self, requests: list[DeployRequest], *, received_at: datetime, delivery_id: str
    ) -> list[StartedRun]: ...


class PrefectStarter:
    """Creates deploy flow runs on the Prefect server (Scheduled; a worker or serve process runs them).

    `create_flow_run_from_deployment(idempotency_key=...)` (what `run_deployment(timeout=0)` calls)
    returns the existing run when the key was used before, so redelivering a webhook never starts
    the same deploy twice. One client per event loop is kept open and the deployment id is looked up
    once: at GitHub's burst rates, a fresh connection and a name lookup per delivery doubled the
    load on the Prefect API.
    """

    def __init__(
        self,
        *,
        deployment_name: str = DEFAULT_DEPLOYMENT,
        api_url: str | None = None,
        ui_url: str | None = None,
        request_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self.deployment_name = deployment_name
        self._api_url = api_url
        self._ui_url = ui_url
        self._request_timeout = request_timeout
        self._open_client: tuple[asyncio.AbstractEventLoop, str, Any] | None = None
        self._deployment_id: Any = None

    def _resolve_api_url(self) -> str:
        from prefect.settings import PREFECT_API_URL

        api = self._api_url or PREFECT_API_URL.value()
        if not api:
            # Without it the client would start a private ephemeral server no worker ever polls.
            raise WebhookError("PREFECT_API_URL is not set: no Prefect server to start runs on", status=503)
        return api

    def _client(self, api: str, timeout: float) -> Any:
        from prefect.client.orchestration import PrefectClient
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

        return PrefectClient(
            api,
            auth_string=PREFECT_API_AUTH_STRING.value(),
            api_key=PREFECT_API_KEY.value(),
            httpx_settings={"timeout": timeout},
        )

    def ui_link(self, flow_run_id: str) -> str | None:
        from prefect.settings import PREFECT_UI_URL

        ui = self._ui_url
        if not ui and self._api_url:
            ui = self._api_url.rstrip("/").removesuffix("/api")
        ui = ui or PREFECT_UI_URL.value()
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None

    async def _client_for_loop(self, api: str) -> Any:
        loop = asyncio.get_running_loop()
        cached = self._open_client
        if cached and cached[0] is loop and cached[1] == api:
            return cached[2]
        client = self._client(api, self._request_timeout)
        await client.__aenter__()
        cached = self._open_client
        if cached and cached[0] is loop and cached[1] == api:  # another delivery opened one meanwhile
            await client.__aexit__(None, None, None)
            return cached[2]
        self._open_client = (loop, api, client)
        return client

    async def aclose(self) -> None:
        cached, self._open_client = self._open_client, None
        if cached and cached[0] is asyncio.get_running_loop():
            await cached[2].__aexit__(None, None, None)

    async def _create_run(self, client: Any, request: DeployRequest, parameters: dict[str, Any]) -> Any:
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Scheduled

        for attempt in (1, 2):
            if self._deployment_id is None:
                deployment = await client.read_deployment_by_name(self.deployment_name)
                self._deployment_id = deployment.id
            try:
                return await client.create_flow_run_from_deployment(
                    self._deployment_id,
                    parameters=parameters,
                    state=Scheduled(),
                    tags=[f"app:{request.app}", f"env:{request.environment}"],
                    idempotency_key=request.idempotency_key,
                )
            except ObjectNotFound:
                # The deployment was re-created under a new id since we looked it up.
                self._deployment_id = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def start(
        self, requests: list[DeployRequest], *, received_at: datetime, delivery_id: str
    ) -> list[StartedRun]:
        import httpx
        from prefect.exceptions import ObjectNotFound

        api = self._resolve_api_url()
        started: list[StartedRun] = []
        try:
            client = await self._client_for_loop(api)
            for r in requests:
                parameters = {
                    "app": r.app,
                    "environment": r.environment,
                    "source_ref": r.source_ref,
                    "source_sha": r.source_sha,
                    "delivery_id": delivery_id,
                    "received_at": received_at.isoformat(),
                }
                run = await self._create_run(client, r, parameters)
                started.append(StartedRun(str(run.id), r.app, r.environment, self.ui_link(str(run.id))))
        except ObjectNotFound as e:
            raise WebhookError(f"Prefect deployment {self.deployment_name!r} does not exist", status=503) from e
        except httpx.HTTPStatusError as e:
            # e.g. 422 when the deployment's parameter schema does not accept what we send.
            raise WebhookError(
                f"Prefect API refused to create the run for {self.deployment_name!r}: "
                f"HTTP {e.response.status_code}", status=503
            ) from e
        except (httpx.HTTPError, OSError) as e:
            raise WebhookError(
                f"Prefect API at {redact(api)} is unreachable: {type(e).__name__}", status=503
            ) from e
        return started

    async def check_api(self, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
        """Quick reachability probe for /healthz; never raises."""
        try:
            api = self._resolve_api_url()
            async with self._client(api, timeout) as client:
                err = await asyncio.wait_for(client.api_healthcheck(), timeout)
            return err is None
        except Exception:  # noqa: BLE001 - any failure means "unreachable" to a health probe
            return False


# --------------------------------------------------------------------------- HTTP adapter


class _BodyTooLarge(Exception):
    pass


async def _read_capped(request: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    *,
    secret: str,
    config_loader: Callable[[], Config],
    starter: Starter,
    start_timeout: float = START_TIMEOUT_SECONDS,
    health_timeout: float = HEALTH_TIMEOUT_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The receiver's ASGI app. Fails closed: an empty secret is a configuration error."""
    if not secret:
        raise ConfigError(_NO_SECRET)
    register_secret(secret)
    log = get_logger()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        close = getattr(starter, "aclose", None)
        if close is not None:
            await close()

    app = FastAPI(title="delivery webhook receiver", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    def answer(
        http_status: int,
        status: str,
        reason: str,
        *,
        delivery: str,
        event: str,
        ref: str = "",
        runs: Sequence[StartedRun] = (),
        extra: dict[str, Any] | None = None,
    ) -> JSONResponse:
        run_ids = ",".join(r.flow_run_id for r in runs)
        log.info(
            "webhook delivery=%s event=%s ref=%s -> %s %s: %s%s",
            delivery,
            event,
            ref or "-",
            http_status,
            status,
            reason,
            f" runs={run_ids}" if run_ids else "",
        )
        content: dict[str, Any] = {"status": status, "reason": redact(reason, [secret])}
        if runs:
            content["runs"] = [
                {"flow_run_id": r.flow_run_id, "app": r.app, "environment": r.environment, "url": r.ui_url}
                for r in runs
            ]
        content.update(extra or {})
        return JSONResponse(content, status_code=http_status)

    @app.post("/webhooks/github")
    async def github_webhook(request: Request) -> JSONResponse:
        received_at = datetime.now(UTC)
        # Header values are untrusted until the signature checks out: log them quoted and short.
        delivery = _show(request.headers.get("x-github-delivery", ""), 64)
        event_name = _show(request.headers.get("x-github-event", ""), 64)

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return answer(413, "refused", f"body is larger than {max_body_bytes} bytes", delivery=delivery,
                          event=event_name)
        try:
            body = await _read_capped(request, max_body_bytes)
        except _BodyTooLarge:
            return answer(413, "refused", f"body is larger than {max_body_bytes} bytes", delivery=delivery,
                          event=event_name)
        except ClientDisconnect:
            return answer(400, "refused", "client disconnected before sending the whole body", delivery=delivery,
                          event=event_name)
        try:
            event = parse_event(request.headers, body, secret=secret)
        except WebhookError as e:
            return answer(e.status, "refused", e.message, delivery=delivery, event=event_name)
        except Exception as e:  # noqa: BLE001 - bad input must never become a 500
            log.error("webhook delivery=%s: unexpected %s while parsing", delivery, type(e).__name__)
            return answer(400, "refused", "malformed delivery", delivery=delivery, event=event_name)

        ref = _show(event.push.ref) if event.push else ""
        try:
            # Only pushes are routed by the config: a ping must answer even before the config exists.
            config = config_loader() if event.push is not None else Config(path=Path("-"), apps={})
        except Exception as e:  # noqa: BLE001 - a broken config is ours to fix; GitHub can redeliver later
            return answer(503, "unavailable", f"delivery config cannot be loaded: {redact(str(e), [secret])}",
                          delivery=delivery, event=event_name, ref=ref)

        decision = decide(event, config)
        extra = {"zen": decision.zen} if decision.zen is not None else None
        if not decision.requests:
            return answer(decision.http_status, decision.status, decision.reason, delivery=delivery,
                          event=event_name, ref=ref, extra=extra)
        try:
            runs = await asyncio.wait_for(
                starter.start(list(decision.requests), received_at=received_at, delivery_id=event.delivery_id),
                timeout=start_timeout,
            )
        except TimeoutError:
            return answer(503, "unavailable", f"Prefect API did not answer within {start_timeout:g} s",
                          delivery=delivery, event=event_name, ref=ref)
        except WebhookError as e:
            return answer(e.status, "unavailable", e.message, delivery=delivery, event=event_name, ref=ref)
        except Exception as e:  # noqa: BLE001 - the delivery must fail visibly so GitHub can redeliver
            return answer(503, "unavailable", f"could not start runs: {type(e).__name__}: {redact(str(e), [secret])}",
                          delivery=delivery, event=event_name, ref=ref)
        return answer(decision.http_status, decision.status, decision.reason, delivery=delivery, event=event_name,
                      ref=ref, runs=runs)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        check = getattr(starter, "check_api", None)
        if check is None:
            state = "unknown"
        else:
            try:
                ok = await asyncio.wait_for(check(health_timeout), timeout=health_timeout + 1)
            except Exception:  # noqa: BLE001 - a slow or failing probe is "unreachable"
                ok = False
            state = "reachable" if ok else "unreachable"
        return JSONResponse({"status": "ok", "prefect_api": state})

    return app


# --------------------------------------------------------------------------- secret and serve

_NO_SECRET = (
    "no webhook secret configured: set DELIVERY_WEBHOOK_SECRET or create a Prefect Secret block "
    "and set DELIVERY_WEBHOOK_SECRET_BLOCK"
)


def load_webhook_secret(settings: Settings) -> str:
    """The shared secret from the settings, else from the named Prefect `Secret` block; none: ConfigError."""
    if settings.webhook_secret is not None:
        value = settings.webhook_secret.get_secret_value()
        if value.strip():
            register_secret(value)
            return value
    if settings.webhook_secret_block:
        from prefect.blocks.system import Secret

        name = settings.webhook_secret_block
        try:
            value = Secret.load(name).get()
        except Exception as e:
            raise ConfigError(f"cannot load Prefect Secret block {name!r}: {type(e).__name__}") from e
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"Prefect Secret block {name!r} holds no usable string")
        register_secret(value)
        return value
    raise ConfigError(_NO_SECRET)


def _log_to_stderr() -> None:
    """Outside a flow run the `delivery` logger has no handler; the receiver's one line per delivery must show."""
    logger = logging.getLogger("delivery")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    settings: Settings | None = None,
    deployment_name: str = DEFAULT_DEPLOYMENT,
) -> None:
    """Run the receiver with uvicorn until interrupted. Refuses to start without a secret.

    Binds to loopback by default; pass another `host` explicitly to accept deliveries from outside.
    """
    import uvicorn

    from delivery.config import load_config
    from delivery.settings import get_settings

    settings = settings or get_settings()
    secret = load_webhook_secret(settings)
    _log_to_stderr()
    path = settings.resolved_config_file()
    app = create_app(
        secret=secret,
        # Read per delivery: config edits apply without a restart, and a broken config answers 503.
        config_loader=lambda: load_config(path),
        starter=PrefectStarter(deployment_name=deployment_name),
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = [
    "Commit",
    "Decision",
    "DeployRequest",
    "Event",
    "PrefectStarter",
    "Push",
    "Repository",
    "StartedRun",
    "Starter",
    "create_app",
    "decide",
    "is_pipeline_commit",
    "load_webhook_secret",
    "parse_event",
    "serve",
    "signature_for",
    "validate_ref",
    "validate_sha",
]
