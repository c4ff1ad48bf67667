"""What the flows ask the Prefect API: the per-environment deploy lock and the other deploy runs
that may supersede this one."""

from __future__ import annotations

from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.utilities.asyncutils import run_coro_as_sync

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
