"""What the flows ask the Prefect API: the per-environment deploy lock, the other deploy runs
that may supersede this one, and, for the recovery of a crashed deploy, the runs it concerns."""

from __future__ import annotations

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
from prefect.states import Crashed
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.errors import RecoveryError

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

    `concurrency(..., strict=True)` then fails loudly if it ever disappears, instead of silently
    letting two deploys run at once."""
    name = lock_name(app, environment)
    run_coro_as_sync(_ensure_limit(name))
    return name


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


def _info(run: Any, flow_name: str) -> RunInfo:
    return RunInfo(str(run.id), run.name or "", flow_name, run.state_type.value if run.state_type else "",
                   run.state_name or "", dict(run.parameters or {}), list(run.tags or []),
                   str(run.deployment_id) if run.deployment_id else None)


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


def run_url(run_id: str) -> str:
    """The flow run's page in the Prefect UI (or its API URL when no UI URL is known)."""
    from prefect.utilities.urls import url_for

    return (url_for("flow-run", obj_id=run_id) or url_for("flow-run", obj_id=run_id, url_type="api")
            or f"flow-run {run_id}")
