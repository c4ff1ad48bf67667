"""What promotions ask the Prefect API: starting the automatic promotions after a verified deploy,
the other promote runs that may supersede one, and the automation that ends an approval nobody gave
in time.

Why an automation for the approval timeout: a promotion waiting for its approval is *suspended*
(`suspend_flow_run`): its process has exited, so no code of ours runs when the wait expires. The
Prefect server then ends the run itself (its pause-expiration service marks it `Failed` with "The flow
was paused and never resumed."). A timeout is no failure of the promotion, so this automation turns
exactly that verdict, on promote runs of ours only, into `Cancelled`. The promote flow ensures it
exists before it suspends, so it works the same under `serve` and on a work pool."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.config import App, Environment
from delivery.log import get_logger
from delivery.report import Report

PROMOTE_FLOW = "promote"
PROMOTE_DEPLOYMENT = "promote/promote"
APPROVAL_TIMED_OUT = "delivery: approval timed out"
# The message of the state Prefect's server writes when a pause expires
# (prefect/server/services/pause_expirations.py, 3.9.1); the automation matches it exactly.
PAUSE_EXPIRED_MESSAGE = "The flow was paused and never resumed."
TIMED_OUT_MESSAGE = "approval timed out: nobody approved or rejected this promotion in time; nothing was changed"
# Waiting for an approval does not count: a promotion waiting for its approval is not running yet.
_QUEUED_OR_RUNNING = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


def start_auto_promotions(report: Report, app: App, source: Environment, tag: str, *, values_commit: str) -> None:
    """After `tag` was verified in `source`: start a promotion to each environment that takes its
    image from `source` with `auto: true` (scheduled for when its soak ends). Never raises: the runs
    started go into the report's `promotions`, a start that failed into its notes. No `promote`
    deployment on the server (flows run in-process, as the tests do) is only a warning in the log."""
    from prefect.exceptions import ObjectNotFound

    log = get_logger()
    for target in (t for t in app.promotions_from(source.name) if t.auto):
        due = datetime.now(UTC) + timedelta(seconds=target.soak_seconds) if target.soak_seconds else None
        try:
            run_id = _start(app.name, source.name, target.name, tag, values_commit, due)
        except Exception as e:  # noqa: BLE001 - the deploy is verified; a promotion not started is a note
            log.warning("automatic promotion of %s from %s to %s not started: %s", tag, source.name, target.name,
                        _why(e))
            if not isinstance(e, ObjectNotFound):
                report.notes.append(f"automatic promotion of {tag} to {target.name} not started: {_why(e)}")
            continue
        when = f", scheduled for {due:%Y-%m-%d %H:%M:%S} UTC (soak)" if due else ""
        log.info("promotion of %s from %s to %s started: run %s%s", tag, source.name, target.name, run_id, when)
        report.promotions.append(f"to {target.name}: {run_url(run_id)}{when}")


def _why(e: Exception) -> str:
    from prefect.exceptions import ObjectNotFound

    if isinstance(e, ObjectNotFound):
        return (f"no deployment {PROMOTE_DEPLOYMENT} on this Prefect server (serve it: `delivery up`, or "
                "`prefect deploy --all` with a worker)")
    return f"{type(e).__name__}: {e}"


def _start(app: str, source: str, target: str, tag: str, values_commit: str, due: datetime | None) -> str:
    from prefect.deployments import run_deployment

    run = run_deployment(
        PROMOTE_DEPLOYMENT,
        parameters={"app": app, "from_environment": source, "to_environment": target, "tag": tag,
                    "reason": f"automatic: {tag} verified in {source}"},
        scheduled_time=due, timeout=0, as_subflow=False,
        # A deploy run again after a crash (same values commit) finds the promotion it started.
        idempotency_key=f"auto-promote:{app}:{source}:{target}:{tag}:{values_commit}",
        tags=[f"app:{app}", f"env:{target}"],
    )
    return str(run.id)


def run_url(run_id: str) -> str:
    """The flow run's page in the Prefect UI (its API URL when no UI URL is known)."""
    from prefect.utilities.urls import url_for

    return (url_for("flow-run", obj_id=run_id) or url_for("flow-run", obj_id=run_id, url_type="api")
            or f"flow-run {run_id}")


@dataclass(frozen=True)
class PromoteRun:
    id: str
    name: str
    state: str
    tag: str | None
    from_environment: str


async def _active_promotions(app: str, target: str, exclude_id: str | None) -> list[PromoteRun]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[PROMOTE_FLOW])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=_QUEUED_OR_RUNNING))),
            limit=200,
        )
    out = []
    for r in runs:
        p = r.parameters or {}
        if str(r.id) == exclude_id or p.get("app") != app or p.get("to_environment") != target:
            continue
        out.append(PromoteRun(str(r.id), r.name, r.state_name or "", p.get("tag"), str(p.get("from_environment", ""))))
    return out


def active_promotions(app: str, target: str, exclude_id: str | None = None) -> list[PromoteRun]:
    """Other promote runs of `app` to `target` that are queued or running (not those waiting for an
    approval: an approver answering an older one must not lose it to a newer one nobody approved)."""
    return run_coro_as_sync(_active_promotions(app, target, exclude_id))


def desired_approval_automation() -> AutomationCore:
    return AutomationCore(
        name=APPROVAL_TIMED_OUT,
        description=("Ends a delivery promotion whose approval was neither given nor refused in time Cancelled "
                     "instead of Failed (Prefect's server fails an expired suspension). Managed by "
                     "delivery/promotion.py; edits are overwritten."),
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*",
                                         "prefect.state-message": PAUSE_EXPIRED_MESSAGE}),
            # Promote runs of our deployments only (they carry the `delivery` tag).
            match_related=[
                ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": PROMOTE_FLOW}),
                ResourceSpecification({"prefect.resource.id": "prefect.tag.delivery"}),
            ],
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[ChangeFlowRunState(state=StateType.CANCELLED, name="Cancelled", message=TIMED_OUT_MESSAGE,
                                    force=True)],
    )


_COMPARED = ("name", "description", "enabled", "trigger", "actions")


def _same(have: Any, want: AutomationCore) -> bool:
    def norm(a: Any) -> Any:
        data = a.model_dump(mode="json", include=set(_COMPARED))
        return _sorted(data)
    return norm(have) == norm(want)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        items = [_sorted(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


async def _ensure() -> str:
    want = desired_approval_automation()
    async with get_client() as client:
        have = await client.read_automations_by_name(want.name)
        if not have:
            return str(await client.create_automation(want))
        keep, extra = have[0], have[1:]
        for dup in extra:
            await client.delete_automation(dup.id)
        if not _same(keep, want):
            await client.update_automation(keep.id, want)
        return str(keep.id)


def ensure_approval_automation() -> str:
    """Create or update (by name) the automation that ends timed-out approvals `Cancelled`; its id."""
    return run_coro_as_sync(_ensure())
