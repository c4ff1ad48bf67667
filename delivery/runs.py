"""What the flows ask the Prefect API: the per-environment deploy lock, the other deploy runs
that may supersede this one, and, for the recovery of a crashed deploy, the runs it concerns."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterId,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Crashed, Scheduled
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.errors import LockError, RecoveryError
from delivery.log import get_logger

ACTIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]


def lock_name(app: str, environment: str) -> str:
    """One name per (app, environment) and never the same for two: config names cannot contain ":"
    (`deploy-a-b-c` was both (a-b, c) and (a, b-c))."""
    return f"deploy:{app}:{environment}"


async def _ensure_limit(name: str) -> None:
    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:  # another deploy created it first
            pass


def ensure_lock(app: str, environment: str) -> str:
    """Create the one-slot global concurrency limit for this app and environment if missing.

    `hold_lock` then fails loudly if it ever disappears, instead of silently letting two deploys
    run at once."""
    name = lock_name(app, environment)
    run_coro_as_sync(_ensure_limit(name))
    return name


# A held lock's lease is renewed this often, whatever its length. Prefect's own `concurrency()`
# renews at 3/4 of the lease, so its lease could be 45 s old (of 60) when the Prefect server stops:
# the server's repossessor then revokes it the moment the server is back, and frees the slot while
# the deploy still works (measured: a 60 s outage freed the lock of every running deploy, and a
# queued deploy could have gone in). Renewed every 10 s, a lease of L seconds outlives an outage
# of up to about L - 10 s.
LEASE_RENEW_SECONDS = 10.0
# While the server does not answer, the wait for the lock, a renewal and the release are tried again
# this often (not after the client's doubling back-off, which may wait 32 s more once it is back).
OUTAGE_RETRY_SECONDS = 2.0


class LockNotFree(TimeoutError):
    """The lock was not free within the timeout; `last` says what was seen last (held by another
    run, or the Prefect server not answering)."""

    def __init__(self, message: str, last: str) -> None:
        super().__init__(message)
        self.last = last


def _server_trouble(e: BaseException) -> bool:
    """The Prefect server is down, restarting or overloaded: trying again can help."""
    import httpx

    if isinstance(e, httpx.HTTPStatusError):
        return e.response.status_code >= 500 or e.response.status_code in (408, 429)
    return isinstance(e, (httpx.TransportError, OSError))


@contextmanager
def _lock_client() -> Iterator[Any]:
    """A Prefect client that makes one attempt per call: the loops below decide when to try again."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
        yield client


def _acquire(client: Any, name: str, timeout: float, lease_seconds: float, holder: Any) -> Any:
    """Wait for the one slot of `name`, through Prefect server outages, until `timeout` seconds."""
    import httpx
    from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

    deadline = time.monotonic() + timeout
    last = "never asked"
    while True:
        wait = OUTAGE_RETRY_SECONDS
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder)
            granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            if not granted.limits:
                client.release_concurrency_slots_with_lease(granted.lease_id)
                raise LockError(f"the concurrency limit {name!r} does not exist or is inactive")
            return granted
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 423:
                last = "another deploy or rollback holds it"
                wait = float(e.response.headers.get("Retry-After") or OUTAGE_RETRY_SECONDS)
            elif _server_trouble(e):
                last = f"the Prefect server answered {e.response.status_code}"
            else:
                raise LockError(f"the Prefect server refused the lock {name!r}: {e.response.status_code} "
                                f"{e.response.text[:200]}") from e
        except Exception as e:
            if not _server_trouble(e):
                raise
            last = f"the Prefect server did not answer ({type(e).__name__}: {e})"
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockNotFree(f"the lock {name!r} was not free within {timeout:g} s: {last}", last)
        time.sleep(min(wait, left))


def _keep_lease(lease_id: UUID, name: str, lease_seconds: float, stop: threading.Event, lost: Any) -> None:
    """Renew the lease every LEASE_RENEW_SECONDS, and as soon as the server answers again after an
    outage. The server saying it no longer knows the lease (it expired during a longer outage and was
    repossessed) is `lost(reason)`: another run may hold the lock by now."""
    import httpx

    log = get_logger()
    failing_since: float | None = None
    with _lock_client() as client:
        while not stop.wait(LEASE_RENEW_SECONDS if failing_since is None else OUTAGE_RETRY_SECONDS):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_seconds)
            except httpx.HTTPStatusError as e:
                if e.response.status_code in (404, 410):
                    lost(f"the Prefect server no longer knows the lease of the lock {name!r} "
                         f"({e.response.status_code}): it expired (the server was out of reach for longer "
                         "than the lease) or was revoked")
                    return
                if not _server_trouble(e):
                    log.warning("renewing the lease of the lock %r: %s", name, e)
                failing_since = failing_since or time.monotonic()
                continue
            except Exception as e:  # noqa: BLE001 - a renewal thread must not die of an unexpected error
                if failing_since is None:
                    log.warning("cannot renew the lease of the lock %r (%s: %s); trying every %g s", name,
                                type(e).__name__, e, OUTAGE_RETRY_SECONDS)
                failing_since = failing_since or time.monotonic()
                continue
            if failing_since is not None:
                log.info("renewed the lease of the lock %r after %.0f s without the Prefect server", name,
                         time.monotonic() - failing_since)
                failing_since = None


def _release(client: Any, lease_id: UUID, name: str, lease_seconds: float) -> None:
    """Give the slot back, through an outage; given up only when the lease would have expired anyway."""
    import httpx

    deadline = time.monotonic() + lease_seconds
    while True:
        try:
            client.release_concurrency_slots_with_lease(lease_id)
            return
        except httpx.HTTPStatusError as e:
            if e.response.status_code in (404, 410) or not _server_trouble(e):
                return  # already repossessed, or nothing a retry can change
            why: BaseException = e
        except Exception as e:
            if not _server_trouble(e):
                raise
            why = e
        if time.monotonic() >= deadline:
            get_logger().warning("could not release the lock %r (%s: %s); its lease expires by itself", name,
                                 type(why).__name__, why)
            return
        time.sleep(OUTAGE_RETRY_SECONDS)


@contextmanager
def hold_lock(name: str, *, timeout: float, lease_seconds: float) -> Iterator[None]:
    """The one slot of the concurrency limit `name`, held while the block runs, under a lease that is
    renewed while this process lives (a killed run's slot is freed by the server when it expires).

    Unlike Prefect's `concurrency()`, a Prefect server outage neither fails the wait for the lock
    (its client gives up after about 60 s of retries) nor lets the lease run out under a live run:
    see LEASE_RENEW_SECONDS. Should the lease still be lost (an outage longer than it), the block is
    interrupted as Prefect's `strict` does: the run ends Crashed and the recover automation finishes
    it under the lock, rather than going on while another run may hold it.

    Raises `LockNotFree` (a TimeoutError) when the lock is not free within `timeout` seconds,
    `LockError` when the limit is missing or the server refuses it."""
    from prefect._internal.concurrency.cancellation import WatcherThreadCancelScope
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    holder = (ConcurrencyLeaseHolder(type="flow_run", id=run.flow_run.id)
              if run is not None and run.flow_run is not None else None)
    with _lock_client() as client:
        granted = _acquire(client, name, timeout, lease_seconds, holder)
    events = emit_concurrency_acquisition_events(granted.limits, 1)
    stop = threading.Event()
    try:
        with WatcherThreadCancelScope(name=f"lock {name}") as scope:
            def lost(reason: str) -> None:
                get_logger().error("%s; stopping this run so that it does not go on unlocked (a crashed deploy "
                                   "is finished by the recover automation, under the lock)", reason)
                scope.cancel()

            context = contextvars.copy_context()
            keeper = threading.Thread(target=context.run, name=f"lease {name}", daemon=True,
                                      args=(_keep_lease, granted.lease_id, name, lease_seconds, stop, lost))
            keeper.start()
            try:
                yield
            finally:
                stop.set()
                keeper.join(timeout=5)
    finally:
        with _lock_client() as client:
            _release(client, granted.lease_id, name, lease_seconds)
        emit_concurrency_release_events(granted.limits, 1, events)


@dataclass(frozen=True)
class OtherRun:
    id: str
    name: str
    state: str
    source_sha: str
    source_ref: str


async def _other_deploy_runs(app: str, environment: str, exclude_id: str | None) -> list[OtherRun]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["deploy"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES))),
            limit=200,
        )
    out = []
    for r in runs:
        p = r.parameters or {}
        if str(r.id) == exclude_id or p.get("app") != app or p.get("environment") != environment:
            continue
        out.append(OtherRun(str(r.id), r.name, r.state_name or "", str(p.get("source_sha", "")),
                            str(p.get("source_ref", ""))))
    return out


def active_deploy_runs(app: str, environment: str, exclude_id: str | None = None) -> list[OtherRun]:
    """Deploy runs of the same app and environment that are queued or running, except ours."""
    return run_coro_as_sync(_other_deploy_runs(app, environment, exclude_id))


async def _add_tags(flow_run_id: str, new: list[str]) -> None:
    from uuid import UUID

    async with get_client() as client:
        run = await client.read_flow_run(UUID(flow_run_id))
        await client.update_flow_run(UUID(flow_run_id), tags=sorted(set(run.tags or []) | set(new)))


def tag_flow_run(flow_run_id: str | None, tags: list[str]) -> None:
    """Add tags to a running flow run (a run started by hand or by `serve` has none of ours)."""
    if flow_run_id:
        run_coro_as_sync(_add_tags(flow_run_id, tags))


@dataclass(frozen=True)
class RunInfo:
    """What a recovery needs to know about another flow run."""

    id: str
    name: str
    flow_name: str
    state_type: str  # StateType value: RUNNING, CRASHED, COMPLETED, ...
    state_name: str
    parameters: dict[str, Any]
    tags: list[str]
    deployment_id: str | None
    message: str = ""  # the state's message


def _info(run: Any, flow_name: str) -> RunInfo:
    return RunInfo(str(run.id), run.name or "", flow_name, run.state_type.value if run.state_type else "",
                   run.state_name or "", dict(run.parameters or {}), list(run.tags or []),
                   str(run.deployment_id) if run.deployment_id else None,
                   (run.state.message or "") if run.state else "")


async def _read_run(run_id: str) -> RunInfo:
    async with get_client() as client:
        try:
            run = await client.read_flow_run(UUID(run_id))
        except ObjectNotFound as e:
            raise RecoveryError(f"flow run {run_id} does not exist") from e
        flow = await client.read_flow(run.flow_id)
        return _info(run, flow.name)


def read_run(run_id: str) -> RunInfo:
    """The flow run `run_id` (a UUID, or an event's resource id `prefect.flow-run.<uuid>`)."""
    run_id = run_id.removeprefix("prefect.flow-run.")
    try:
        UUID(run_id)
    except ValueError as e:
        raise RecoveryError(f"{run_id!r} is not a flow run id") from e
    return run_coro_as_sync(_read_run(run_id))


async def _runs_tagged(tag: str, flow_name: str) -> list[RunInfo]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
            limit=200,
        )
    return [_info(r, flow_name) for r in runs]


def runs_tagged(tag: str, flow_name: str) -> list[RunInfo]:
    """Runs of `flow_name` carrying `tag`, in any state."""
    return run_coro_as_sync(_runs_tagged(tag, flow_name))


async def _child_runs(parent_ids: list[str]) -> list[RunInfo]:
    if not parent_ids:
        return []
    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
                any_=[UUID(i) for i in parent_ids])),
            limit=200,
        )
        names = {f.id: f.name for f in await client.read_flows(flow_filter=FlowFilter(
            id=FlowFilterId(any_=list({c.flow_id for c in children}))))} if children else {}
    return [_info(c, names.get(c.flow_id, "")) for c in children]


def child_runs(parent_ids: list[str]) -> list[RunInfo]:
    """The subflow runs the given runs started, with their flow names."""
    return run_coro_as_sync(_child_runs(parent_ids))


async def _crash_unfinished_children(parent_ids: list[str], message: str) -> list[str]:
    crashed: list[str] = []
    async with get_client() as client:
        todo = [UUID(i) for i in parent_ids]
        while todo:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo)),
                limit=200,
            )
            todo = [c.id for c in children]
            for c in children:
                if c.state_type in (StateType.RUNNING, StateType.PENDING, StateType.PAUSED):
                    result = await client.set_flow_run_state(c.id, Crashed(message=message))
                    if result.status == SetStateStatus.ACCEPT:
                        crashed.append(c.name or str(c.id))
    return crashed


def crash_unfinished_children(parent_ids: list[str], message: str) -> list[str]:
    """Mark the subflow runs of dead runs (and theirs) that still claim to run `Crashed`: they died with
    their parent's process, and a subflow has no deployment, so no heartbeat automation covers every one
    of them (a deploy's rollback subflow carries none of our tags). Returns the names marked."""
    return run_coro_as_sync(_crash_unfinished_children(parent_ids, message))


async def _rerun(run_id: str, message: str) -> None:
    async with get_client() as client:
        # Forced: the orchestration rules accept no transition out of Crashed; the UI's Retry forces too.
        result = await client.set_flow_run_state(UUID(run_id), Scheduled(message=message), force=True)
        if result.status != SetStateStatus.ACCEPT:
            raise RecoveryError(f"the server did not schedule flow run {run_id} again: {result.status.value}")


def rerun(run_id: str, message: str) -> None:
    """Schedule a finished (crashed) flow run of a deployment again, as the UI's Retry does: the same
    run id, parameters and run inputs, and so the same answered suspensions (an approval given to it
    is handed back, not asked again). Whatever serves its deployment starts it."""
    run_coro_as_sync(_rerun(run_id, message))


def wait_until_final(run_id: str, timeout: float, interval: float = 2.0) -> RunInfo:
    """The run once it is final (Completed, Failed, Cancelled, Crashed), or as last seen at `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        info = read_run(run_id)
        if info.state_type in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED") or time.monotonic() >= deadline:
            return info
        time.sleep(interval)


def run_url(run_id: str) -> str:
    """The flow run's page in the Prefect UI (or its API URL when no UI URL is known)."""
    from prefect.utilities.urls import url_for

    return (url_for("flow-run", obj_id=run_id) or url_for("flow-run", obj_id=run_id, url_type="api")
            or f"flow-run {run_id}")
