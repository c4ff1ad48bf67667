"""Creates the runs of stored deliveries, oldest first, through a `Starter`.

One asyncio task in the receiver's event loop. Arrival order holds because the oldest pending
delivery is finished (every request has a run, or was refused for good) before the next is read.
A transient failure (Prefect unreachable, a timeout, 5xx, 429) is retried with exponential backoff
and full jitter for as long as it takes: the record is durable, so waiting loses nothing. A
permanent refusal (the deployment does not exist, a 4xx on the parameters) fails that request with
the reason. Each attempt and its outcome goes into the record. A crash between creating a run and
recording it is harmless: the retry reuses the request's idempotency key and gets the same run back.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from delivery.errors import DeliveryError
from delivery.log import get_logger
from delivery.redact import redact
from deployments.webhook.core import START_TIMEOUT_SECONDS, DeployRequest, Starter
from deployments.webhook.store import PENDING, DeliveryRecord, DeliveryStore, StoreError

# How long the dispatcher sleeps with nothing to do before looking at the store again, in case a
# wake-up was missed (another process cannot wake it).
IDLE_POLL_SECONDS = 1.0


class Dispatcher:
    def __init__(
        self,
        store: DeliveryStore,
        starter: Starter,
        *,
        start_timeout: float = START_TIMEOUT_SECONDS,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        secrets: list[str] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.starter = starter
        self.start_timeout = start_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._secrets = list(secrets or [])
        self._rng = rng
        self._wake = asyncio.Event()
        self._log = get_logger()

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        """Until cancelled. Never ends on an error: a broken store or starter is logged and retried."""
        failures = 0
        while True:
            try:
                record = await asyncio.to_thread(self.store.next_pending)
                if record is None:
                    self._wake.clear()
                    # Re-check after clearing: a delivery stored in between would otherwise wait a poll.
                    record = await asyncio.to_thread(self.store.next_pending)
                    if record is None:
                        try:
                            await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL_SECONDS)
                        except TimeoutError:
                            pass
                        continue
                await self.dispatch(record)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the dispatcher must outlive any one failure
                failures += 1
                delay = self._delay(failures)
                self._log.error("webhook dispatcher: %s: %s; retrying in %.1f s", type(e).__name__,
                                redact(str(e), self._secrets), delay)
                await asyncio.sleep(delay)

    def _delay(self, failures: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * (2 ** min(failures - 1, 30)))
        # Full jitter, with a floor so a burst of retries never spins.
        return max(self.backoff_initial / 2, ceiling * self._rng())

    async def dispatch(self, record: DeliveryRecord) -> DeliveryRecord:
        """Create the runs of one pending delivery; returns it dispatched or failed."""
        for index, req in enumerate(record.requests):
            if req.done:
                continue
            request = DeployRequest(req.app, req.environment, req.ref, req.sha, req.idempotency_key)
            failures = 0
            while True:
                outcome, run_id, error, transient = await self._attempt(record, request)
                record = await self._record(record.delivery_id, index, outcome, run_id, error)
                if not transient:
                    break
                failures += 1
                delay = self._delay(failures)
                self._log.warning("webhook delivery=%s %s/%s: %s; attempt %d, retrying in %.1f s",
                                  record.delivery_id, req.app, req.environment, outcome, failures, delay)
                await asyncio.sleep(delay)
        if record.status == PENDING:  # every request done yet still pending: cannot happen, but never spin
            raise StoreError(f"delivery {record.delivery_id} stayed pending after every request was tried")
        self._log.info("webhook delivery=%s -> %s%s%s", record.delivery_id, record.status,
                       f" runs={','.join(record.run_ids)}" if record.run_ids else "",
                       f": {record.reason}" if record.reason else "")
        return record

    async def _attempt(self, record: DeliveryRecord, request: DeployRequest
                       ) -> tuple[str, str | None, str | None, bool]:
        """(outcome, run id, permanent error, retry?)"""
        try:
            runs = await asyncio.wait_for(
                self.starter.start([request], received_at=record.received_at, delivery_id=record.delivery_id),
                timeout=self.start_timeout,
            )
        except TimeoutError:
            return f"Prefect API did not answer within {self.start_timeout:g} s", None, None, True
        except DeliveryError as e:
            message = redact(e.message, self._secrets)
            if e.transient:
                return message, None, None, True
            return f"refused: {message}", None, message, False
        except Exception as e:  # noqa: BLE001 - unknown failures are retried: the record waits, nothing is lost
            return f"{type(e).__name__}: {redact(str(e), self._secrets)}", None, None, True
        if len(runs) != 1:
            return f"starter returned {len(runs)} runs for one request", None, None, True
        return f"created run {runs[0].flow_run_id}", runs[0].flow_run_id, None, False

    async def _record(self, delivery_id: str, index: int, outcome: str, run_id: str | None,
                      error: str | None) -> Any:
        # A failed write here (disk full) propagates: run_forever backs off and the whole delivery is
        # tried again, which the idempotency key makes safe.
        return await asyncio.to_thread(self.store.record_attempt, delivery_id, index, outcome, run_id=run_id,
                                       error=error)
