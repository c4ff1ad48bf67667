"""Starting deploy runs on the Prefect server for a decided delivery, one idempotency key per
delivery, app and environment: a redelivery returns the runs it already created."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from delivery.errors import WebhookError
from delivery.redact import redact
from deployments.webhook.core import (
    DEFAULT_DEPLOYMENT,
    HEALTH_TIMEOUT_SECONDS,
    START_TIMEOUT_SECONDS,
    DeployRequest,
    StartedRun,
)


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
            # Transient for the dispatcher: the stored deliveries wait until the receiver is configured.
            raise WebhookError("PREFECT_API_URL is not set: no Prefect server to start runs on", status=503,
                               transient=True)
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
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

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
                # One attempt per call: the dispatcher is the retry layer. Prefect's client would wait
                # 2 s (then 4, 8 ...) after the 503 a SQLite-backed server answers whenever a write
                # meets another (SQLITE_BUSY); measured, that made a burst of 20 deliveries take 37 s
                # to dispatch. The dispatcher retries after a few hundred milliseconds, with jitter.
                with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
                    run = await self._create_run(client, r, parameters)
                started.append(StartedRun(str(run.id), r.app, r.environment, self.ui_link(str(run.id))))
        except ObjectNotFound as e:
            raise WebhookError(f"Prefect deployment {self.deployment_name!r} does not exist", status=503,
                               transient=False) from e
        except httpx.HTTPStatusError as e:
            code = e.response.status_code
            # 5xx and 429: the server is overloaded or restarting, try again; any other 4xx (e.g. 422
            # when the deployment's parameter schema does not accept what we send) will not change.
            raise WebhookError(
                f"Prefect API refused to create the run for {self.deployment_name!r}: HTTP {code}",
                status=503, transient=code >= 500 or code == 429,
            ) from e
        except (httpx.HTTPError, OSError) as e:
            raise WebhookError(
                f"Prefect API at {redact(api)} is unreachable: {type(e).__name__}", status=503, transient=True
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


