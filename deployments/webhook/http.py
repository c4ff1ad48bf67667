"""The receiver's HTTP adapter: read the body with a cap, run the core, write a delivery that asks
for deploys to the durable store, and answer GitHub at once; the dispatcher (a task in the same
event loop) creates the runs from the store. Plus the status endpoint, the secret and `serve`.

The one rule: a 202 means the delivery is on disk. A store that is full or cannot be written
answers 503, which GitHub shows as failed so that it can be redelivered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from delivery.config import Config
from delivery.errors import ConfigError, WebhookError
from delivery.log import get_logger
from delivery.redact import redact, register_secret
from deployments.webhook.core import (
    _DELIVERY_ID_RE,
    DEFAULT_DEPLOYMENT,
    HEALTH_TIMEOUT_SECONDS,
    MAX_BODY_BYTES,
    START_TIMEOUT_SECONDS,
    StartedRun,
    Starter,
    _show,
    decide,
    parse_event,
)
from deployments.webhook.dispatcher import Dispatcher
from deployments.webhook.starter import PrefectStarter
from deployments.webhook.store import FAILED, DeliveryRecord, DeliveryStore, StoreError, StoreFull

# What a 503 for a full store asks GitHub (or whoever redelivers) to wait.
STORE_FULL_RETRY_AFTER_SECONDS = 30

if TYPE_CHECKING:
    from delivery.settings import Settings

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


def delivery_view(record: DeliveryRecord, ui_link: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """A stored delivery as the status endpoint and the CLI show it: nothing but what the record holds."""
    return {
        "delivery_id": record.delivery_id,
        "event": record.event,
        "status": record.status,
        "reason": record.reason,
        "received_at": record.received_at.isoformat(),
        "updated_at": record.updated_at.isoformat() if record.updated_at else None,
        "requests": [
            {"app": r.app, "environment": r.environment, "ref": r.ref, "sha": r.sha, "flow_run_id": r.run_id,
             "url": ui_link(r.run_id) if (ui_link and r.run_id) else None, "error": r.error}
            for r in record.requests
        ],
        "runs": [
            {"flow_run_id": r.run_id, "app": r.app, "environment": r.environment,
             "url": ui_link(r.run_id) if ui_link else None}
            for r in record.requests if r.run_id
        ],
        "attempt_count": record.attempt_count,
        "attempts": record.attempts,
    }


def create_app(
    *,
    secret: str,
    config_loader: Callable[[], Config],
    starter: Starter,
    store: DeliveryStore | None = None,
    start_timeout: float = START_TIMEOUT_SECONDS,
    health_timeout: float = HEALTH_TIMEOUT_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
    backoff_initial: float = 0.2,
    backoff_max: float = 30.0,
) -> FastAPI:
    """The receiver's ASGI app. Fails closed: an empty secret is a configuration error.

    Without `store`, deliveries go to a store in a temporary directory removed at shutdown: fine
    for tests and benchmarks, not durable across restarts. `serve` always passes the configured one.
    """
    if not secret:
        raise ConfigError(_NO_SECRET)
    register_secret(secret)
    log = get_logger()
    scratch: Path | None = None
    if store is None:
        scratch = Path(tempfile.mkdtemp(prefix="delivery-webhook-"))
        store = DeliveryStore(scratch / "deliveries.sqlite3")
    the_store = store
    dispatcher = Dispatcher(the_store, starter, start_timeout=start_timeout, backoff_initial=backoff_initial,
                            backoff_max=backoff_max, secrets=[secret])
    ui_link: Callable[[str], str | None] | None = getattr(starter, "ui_link", None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Started with the app: what an earlier process stored and did not dispatch goes first.
        task = asyncio.create_task(dispatcher.run_forever(), name="webhook-dispatcher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            close = getattr(starter, "aclose", None)
            if close is not None:
                await close()
            if scratch is not None:
                the_store.close()
                shutil.rmtree(scratch, ignore_errors=True)

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
        headers: dict[str, str] | None = None,
        level: int = logging.INFO,
    ) -> JSONResponse:
        run_ids = ",".join(r.flow_run_id for r in runs)
        log.log(
            level,
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
        return JSONResponse(content, status_code=http_status, headers=headers)

    def status_url(request: Request, delivery_id: str) -> str:
        return f"{str(request.base_url).rstrip('/')}/webhooks/github/deliveries/{delivery_id}"

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
            record, created = await asyncio.to_thread(
                the_store.add, event.delivery_id, event.event, decision.requests, received_at)
            if not created and record.status == FAILED:
                # GitHub's Redeliver of a failed delivery: try its refused requests again (same keys).
                record = await asyncio.to_thread(the_store.requeue, event.delivery_id) or record
                created = True
        except StoreFull as e:
            return answer(503, "unavailable", f"delivery store is full, try again later: {e.message}",
                          delivery=delivery, event=event_name, ref=ref, level=logging.ERROR,
                          headers={"Retry-After": str(STORE_FULL_RETRY_AFTER_SECONDS)})
        except StoreError as e:
            return answer(503, "unavailable", f"delivery could not be stored: {e.message}", delivery=delivery,
                          event=event_name, ref=ref, level=logging.ERROR)
        except Exception as e:  # noqa: BLE001 - never acknowledge what was not stored
            return answer(503, "unavailable", f"delivery could not be stored: {type(e).__name__}",
                          delivery=delivery, event=event_name, ref=ref, level=logging.ERROR)
        if created:
            dispatcher.wake()
        view = delivery_view(record, ui_link)
        runs = [StartedRun(r["flow_run_id"], r["app"], r["environment"], r["url"]) for r in view["runs"]]
        reason = decision.reason if created else f"{decision.reason} (redelivery: already {record.status})"
        return answer(decision.http_status, decision.status, reason, delivery=delivery, event=event_name,
                      ref=ref, runs=runs,
                      extra={"delivery_id": event.delivery_id, "delivery_status": record.status,
                             "status_url": status_url(request, event.delivery_id)})

    @app.get("/webhooks/github/deliveries/{delivery_id}")
    async def delivery_status(delivery_id: str) -> JSONResponse:
        if not _DELIVERY_ID_RE.fullmatch(delivery_id):
            return JSONResponse({"status": "unknown", "reason": "malformed delivery id"}, status_code=404)
        try:
            record = await asyncio.to_thread(the_store.get, delivery_id)
        except StoreError as e:
            return JSONResponse({"status": "unavailable", "reason": e.message}, status_code=503)
        if record is None:
            return JSONResponse({"status": "unknown", "reason": "no such delivery in the store"}, status_code=404)
        return JSONResponse(delivery_view(record, ui_link))

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


def open_store(settings: Settings, *, create: bool = True) -> DeliveryStore:
    """The receiver's durable store as the settings name and bound it."""
    return DeliveryStore(settings.resolved_webhook_store_path(), max_pending=settings.webhook_store_max_pending,
                         max_records=settings.webhook_store_max_records, create=create)


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
    store = open_store(settings)
    get_logger().info("webhook delivery store %s: %s", store.path,
                      ", ".join(f"{k} {v}" for k, v in store.counts().items()))
    app = create_app(
        secret=secret,
        # Read per delivery: config edits apply without a restart, and a broken config answers 503.
        config_loader=lambda: load_config(path),
        starter=PrefectStarter(deployment_name=deployment_name),
        store=store,
        backoff_max=settings.webhook_dispatch_backoff_max_seconds,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


