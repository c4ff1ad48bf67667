"""The receiver's HTTP adapter: read the body with a cap, run the core, start runs through a
`Starter`, and answer GitHub within its 10 s limit; plus the secret and `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from deployments.webhook.starter import PrefectStarter

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


