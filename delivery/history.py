"""`delivery history`: the deploy, promotion and rollback runs from the Prefect API, with the figures
their reports carry, and the four DORA figures over the shown window."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.report import parse_summary


@dataclass
class HistoryRow:
    when: datetime | None
    kind: str  # deploy | promote | rollback
    app: str
    environment: str
    tag: str
    source: str
    result: str
    lead_time_s: float | None
    rolled_back_to: str
    restore_s: float | None
    run_name: str
    # How the change came: "from dev, approved by ana: ok" for a promotion, "recovered by <run>" for a
    # deploy whose process died and which a recovery run finished.
    via: str = ""


# Results that were never a change to what serves: not deploys for the DORA figures.
NOT_A_CHANGE = ("superseded", "cancelled", "refused", "rejected", "waiting-for-approval", "running")


@dataclass
class RunEntry:
    """One run as the Prefect API has it: its flow's name, its report's summary and, for a subflow,
    its parent run's id and flow name."""

    run: Any
    flow: str
    summary: dict[str, Any] | None
    parent_run_id: str = ""
    parent_flow: str = ""


def _lead_time(summary: dict[str, Any]) -> float | None:
    """Push received (or run start) → verified healthy; None unless the deploy was verified."""
    if summary.get("result") != "completed" or not summary.get("finished_at"):
        return None
    start = summary.get("started_at")
    if summary.get("received_at"):
        try:
            start = datetime.fromisoformat(summary["received_at"]).timestamp()
        except ValueError:
            pass
    return round(summary["finished_at"] - start, 2) if start else None


def row_from(run: Any, flow_name: str, summary: dict[str, Any] | None) -> HistoryRow:
    p = run.parameters or {}
    s = summary or {}
    kind = flow_name if flow_name in ("rollback", "promote") else "deploy"
    result = s.get("result") or (run.state_name or "").lower()
    restore = None
    if kind != "rollback" and result == "rolled-back":
        restore = sum(st["seconds"] for st in s.get("stages", []) if st["name"] == "rollback") or None
    via = ""
    if kind == "promote":
        via = f"from {s.get('promoted_from') or p.get('from_environment', '?')}"
        if s.get("approval") and not s["approval"].startswith("waiting"):
            via += f", {s['approval']}"
    return HistoryRow(
        when=run.start_time or run.expected_start_time, kind=kind, app=p.get("app", ""),
        environment=p.get("to_environment", "") if kind == "promote" else p.get("environment", ""),
        tag=s.get("tag") or p.get("to_tag") or p.get("tag") or "",
        source=(s.get("source_sha") or p.get("source_sha") or "")[:7], result=result,
        # A promotion's lead time belongs to the deploy that first verified the change.
        lead_time_s=_lead_time(s) if kind == "deploy" else None,
        rolled_back_to=s.get("rolled_back_to", ""), restore_s=restore, run_name=run.name, via=via,
    )


def _finished_by(run_id: str, recoveries: dict[str, RunEntry]) -> RunEntry | None:
    """The recovery that finally finished a crashed run: a recovery that crashed itself is followed to
    the one that took it over in turn."""
    rec, seen = recoveries.get(run_id), {run_id}
    while rec is not None and str(rec.run.id) in recoveries and str(rec.run.id) not in seen:
        seen.add(str(rec.run.id))
        rec = recoveries[str(rec.run.id)]
    return rec


def assemble(entries: list[RunEntry], app: str | None, environment: str | None, limit: int) -> list[HistoryRow]:
    """One row per change a user asked for, newest first. An automatic rollback shows in its deploy's
    row; a deploy whose process died shows once, with what its recovery made of it (the recovery's own
    re-run of the deploy is that outcome, not a second deploy)."""
    recoveries: dict[str, RunEntry] = {}
    for e in entries:  # newest first: the first recovery seen for a run is its latest
        if e.flow == "recover":
            recoveries.setdefault(str((e.run.parameters or {}).get("crashed_run_id", "")), e)
    redeploys = {e.parent_run_id: e for e in reversed(entries) if e.parent_flow == "recover"}
    rows: list[HistoryRow] = []
    for e in entries:
        if e.flow == "recover" or e.parent_flow:
            continue
        row = row_from(e.run, e.flow, e.summary)
        rec = _finished_by(str(e.run.id), recoveries)
        if rec is not None:
            redeploy = redeploys.get(str(rec.run.id))
            done = (row_from(redeploy.run, redeploy.flow, redeploy.summary) if redeploy is not None
                    else row_from(rec.run, e.flow, rec.summary))
            row.result, row.rolled_back_to, row.restore_s = done.result, done.rolled_back_to, done.restore_s
            row.lead_time_s = done.lead_time_s if row.kind == "deploy" else None
            row.tag = row.tag or done.tag
            row.via = ", ".join(v for v in (row.via, f"recovered by {rec.run.name}") if v)
        if (app and row.app != app) or (environment and row.environment != environment):
            continue
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


async def _read(app: str | None, environment: str | None, limit: int) -> list[HistoryRow]:
    names = ["deploy", "rollback", "promote", "recover"]
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows(flow_filter=FlowFilter(
            name=FlowFilterName(any_=names)))}
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=names)),
                                           sort=FlowRunSort.START_TIME_DESC, limit=limit * 6)
        entries = []
        for run in runs:
            p = run.parameters or {}
            flow_name = flows.get(run.flow_id, "")
            if flow_name != "recover" and app and p.get("app") != app:
                continue
            parent_run_id = parent_flow = ""
            if run.parent_task_run_id:
                parent_run_id = str((await client.read_task_run(run.parent_task_run_id)).flow_run_id)
                parent = await client.read_flow_run(parent_run_id)
                parent_flow = flows.get(parent.flow_id, "") or "other"
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]),
                type=ArtifactFilterType(any_=["markdown"])))
            summary = next((parse_summary(a.data) for a in arts if isinstance(a.data, str)
                            and parse_summary(a.data)), None)
            entries.append(RunEntry(run, flow_name, summary, parent_run_id, parent_flow))
        return assemble(entries, app, environment, limit)


def read_history(app: str | None = None, environment: str | None = None, limit: int = 20) -> list[HistoryRow]:
    return run_coro_as_sync(_read(app, environment, limit))


@dataclass
class Dora:
    deployments: int
    per_day: float
    median_lead_time_s: float | None
    change_failure_rate: float | None
    median_time_to_restore_s: float | None


def dora(rows: list[HistoryRow]) -> Dora:
    # A promotion is a deploy of a verified image to the next environment: it counts as one.
    deploys = [r for r in rows if r.kind in ("deploy", "promote") and r.result not in NOT_A_CHANGE]
    done = [r for r in deploys if r.result == "completed"]
    failed = [r for r in deploys if r.result in ("failed", "rolled-back", "crashed")]
    whens = [r.when for r in rows if r.when]
    days = max((max(whens) - min(whens)).total_seconds() / 86400, 1 / 24) if len(whens) > 1 else 1.0
    leads = [r.lead_time_s for r in done if r.lead_time_s is not None]
    restores = [r.restore_s for r in deploys if r.restore_s is not None]
    return Dora(
        deployments=len(done),
        per_day=round(len(done) / days, 2),
        median_lead_time_s=round(statistics.median(leads), 2) if leads else None,
        change_failure_rate=round(len(failed) / len(deploys), 3) if deploys else None,
        median_time_to_restore_s=round(statistics.median(restores), 2) if restores else None,
    )


def render(rows: list[HistoryRow]) -> str:
    head = ("when", "kind", "app", "env", "tag", "source", "result", "lead time", "rolled back to", "via")
    body = [(
        r.when.strftime("%Y-%m-%d %H:%M:%S") if r.when else "-", r.kind, r.app, r.environment, r.tag or "-",
        r.source or "-", r.result, f"{r.lead_time_s:.1f} s" if r.lead_time_s is not None else "-",
        r.rolled_back_to or "-", r.via or "-",
    ) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
    def secs(v: float | None) -> str:
        return f"{v:.1f} s" if v is not None else "n/a"

    # The four figures are per app: two apps' deploys mixed together describe neither team.
    for app in sorted({r.app for r in rows}) or [""]:
        d = dora([r for r in rows if r.app == app])
        lines += [
            "",
            f"DORA figures for {app or 'no app'}:",
            f"  Deployment frequency: {d.deployments} verified deploys ({d.per_day}/day over the window)",
            f"  Median lead time (push received → verified healthy): {secs(d.median_lead_time_s)}",
            "  Change failure rate: "
            + (f"{d.change_failure_rate:.0%}" if d.change_failure_rate is not None else "n/a"),
            f"  Median time to restore (failed deploy → verified rollback): {secs(d.median_time_to_restore_s)}",
        ]
    return "\n".join(lines)
