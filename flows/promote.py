"""The promote flow: the image verified in one environment, deployed to the next, the same digest and
never a rebuild: dev → staging → prod.

1. Which image: the tag last verified in the source environment (or the one given, which must have
   been verified there), with the digest recorded at its verification (the verification note's
   `digest=`, or for an older note the verified values commit's own digest). The registry must still
   serve that digest for the tag. The target's `soak`, when set: verified there at least that long,
   with no rollback there since. Anything else is refused before anything is written.
2. When the target has `approval: required`, the run suspends (`suspend_flow_run` with a typed form
   in the Prefect UI showing the tag, the digest, the verification time and a link to its report).
   Suspended, it holds no lock and no process. An approval resumes it as a new execution of this
   flow: everything before the wait runs again, so the verification, the digest and newest-wins are
   checked again after the approval. A rejection ends it `Cancelled` with the comment in the report;
   no answer in time ends it `Cancelled` too (delivery/promotion.py explains how).
3. Then the deploy path itself (`flows.deploy._deploy_locked` with `prebuilt`): the environment's
   lock, newest-wins, the digest checked again under the lock, bump, commit (its trailers name the
   source environment, the digest and the approval), Argo CD, rollout, health, the report, and the
   automatic rollback on failure. Nothing is built or pushed.

Newest-wins for a promotion: a tag verified in the source environment *later* than ours wins, whether
the target already runs it or its promotion is queued or running."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.context import FlowRunContext
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled
from pydantic import Field

from delivery.config import App, Environment, load_config
from delivery.errors import DeploySuperseded, PromotionRefused
from delivery.log import get_logger
from delivery.promotion import active_promotions, ensure_approval_automation, run_url
from delivery.report import Report
from delivery.runs import tag_flow_run
from delivery.settings import get_settings
from flows import feedback
from flows.common import deploy_lock, publish, scratch_dir, settle
from flows.deploy import Prebuilt, _deploy_locked
from tasks import gitops, images, records, values

APPROVAL_KEY = "approval"


class ApprovalDecision(RunInput):
    """The approval form the Prefect UI shows on a promotion waiting for one."""

    approve: bool = Field(default=False, title="Approve",
                          description="Tick to deploy this image; leave unticked to reject the promotion.")
    approver: str = Field(min_length=1, max_length=100, title="Your name",
                          description="Who decides: written into the values commit and the report.")
    comment: str = Field(default="", max_length=2000, title="Comment",
                         description="Why: written into the values commit and the report.")


@dataclass(frozen=True)
class Candidate:
    """The image a promotion deploys, as the source environment verified it."""

    tag: str
    digest: str
    verified_at: str  # the newest verification of the tag in the source environment
    soaked_since: str  # the start of its soak ("" without a soak)
    source_sha: str
    verified_by_run: str  # the flow run that verified it there, for the report's link
    target_runs: str  # the tag the target's values file names now


def _run_name() -> str:
    p = runtime.flow_run.parameters
    return f"promote-{p['app']}-{p['from_environment']}-to-{p['to_environment']}-{p.get('tag') or 'last-verified'}"


@flow(name="promote", flow_run_name=_run_name, log_prints=False)
def promote(
    app: str,
    from_environment: str,
    to_environment: str,
    tag: str | None = None,
    reason: str = "",
    approval_timeout: float | None = None,
    sync_timeout: float = 300.0,
    rollout_timeout: float = 120.0,
    health_timeout: float = 60.0,
    lock_timeout: float = 1800.0,
) -> dict[str, Any] | Any:
    """Deploy the image verified in `from_environment` to `to_environment`: the same digest, never rebuilt.

    Args:
        app: the app name from the delivery config.
        from_environment: the environment whose verified image is promoted (e.g. dev, staging).
        to_environment: the environment it is deployed to (e.g. staging, prod).
        tag: the image tag to promote; it must have been verified in from_environment. Empty: the tag
            last verified there.
        reason: why; written into the values commit and the report.
        approval_timeout: seconds to wait for an approval when the target requires one; empty: the
            DELIVERY_APPROVAL_TIMEOUT_SECONDS setting (24 h).
    """
    log = get_logger()
    a = load_config().app(app)
    source = a.environment(from_environment)
    target = a.environment(to_environment)
    report = Report(kind="promote", app=app, environment=to_environment, tag=tag or "",
                    health_url=target.health_url, flow_run_id=str(runtime.flow_run.id or ""),
                    promoted_from=from_environment)
    tag_flow_run(runtime.flow_run.id, [f"app:{app}", f"env:{to_environment}", f"from:{from_environment}"])
    creds = images.registry_credentials(get_settings())
    with scratch_dir(app, "promote-") as run_dir:
        def body() -> Any:
            with report.stage("checks"):
                # A clone of our own: the environments' clones belong to the runs holding their locks.
                repo = gitops.checkout_task(a.gitops_repo, a.gitops_branch, run_dir / "gitops")
                c = _candidate(repo, a, source, target, tag, creds)
                _fill(report, c)
                newer = _superseded(repo, a, source, target, c.tag)
                if newer:
                    raise DeploySuperseded(newer)
            log.info("promoting %s (%s, verified in %s at %s) to %s", c.tag, c.digest, source.name, c.verified_at,
                     target.name)
            if target.approval_required:
                decision = _wait_for_approval(report, a, source, target, c, reason, approval_timeout)
                report.approved_by, report.approval_comment = decision.approver.strip(), decision.comment.strip()
                verdict = "approved" if decision.approve else "rejected"
                report.approval = f"{verdict} by {report.approved_by}" + (
                    f": {report.approval_comment}" if report.approval_comment else "")
                if not decision.approve:
                    msg = f"promotion of {c.tag} to {target.name} {report.approval}; nothing was changed"
                    log.info("%s", msg)
                    report.finish("rejected", msg)
                    publish(report)
                    return Cancelled(message=msg)
                log.info("promotion of %s to %s %s", c.tag, target.name, report.approval)
            report.reason = reason
            if report.source_sha:
                feedback.attach(report, a, run_url=runtime.flow_run.ui_url, kind="promote", sha=report.source_sha)
            prebuilt = Prebuilt(
                digest=c.digest, promoted_from=source.name, approved_by=report.approved_by,
                approval_comment=report.approval_comment,
                superseded=lambda locked_repo: _superseded(locked_repo, a, source, target, c.tag),
            )
            # Taken only now, after the approval: a promotion waiting for one holds no lock.
            with deploy_lock(report, app, to_environment, lock_timeout):
                return _deploy_locked(report, a, target, [c.tag], None, None, a.values_path(to_environment),
                                      sync_timeout, rollout_timeout, health_timeout, prebuilt=prebuilt)

        return settle(report, a, target, body)


def _fill(report: Report, c: Candidate) -> None:
    report.tag, report.digest, report.source_sha = c.tag, c.digest, c.source_sha
    report.source_verified_at = c.verified_at
    report.source_report_url = run_url(c.verified_by_run) if c.verified_by_run else ""


def _candidate(repo: Any, a: App, source: Environment, target: Environment, tag: str | None, creds: Any) -> Candidate:
    """The tag to promote and its digest, checked against the records, the registry and the soak;
    `PromotionRefused` (nothing written) when any of them says no."""
    if source.name == target.name:
        raise PromotionRefused(f"cannot promote {a.name} from {source.name} to itself")
    if target.promote_from and target.promote_from != source.name:
        raise PromotionRefused(f"{a.name}/{target.name} takes promotions only from {target.promote_from} "
                               f"(promote_from in the config), not from {source.name}; nothing was changed")
    vs = records.verifications(repo, a.name, source.name, branch=a.gitops_branch)
    if not vs:
        raise PromotionRefused(f"nothing of {a.name} was ever verified in {source.name}: there is no image to "
                               f"promote to {target.name}; nothing was changed")
    tag = tag or vs[0].tag
    mine = [v for v in vs if v.tag == tag]
    if not mine:
        recent = ", ".join(list(dict.fromkeys(v.tag for v in vs))[:5])
        raise PromotionRefused(f"{a.name}:{tag} was never verified in {source.name} (verified there lately: "
                               f"{recent}); only a verified image is promoted; nothing was changed")
    recorded = next((d for v in mine if (d := records.verified_digest(repo, v, app=a.name, environment=source.name))),
                    "")
    if not recorded:
        raise PromotionRefused(f"no image digest was recorded when {a.name}:{tag} was verified in {source.name}, so "
                               f"there is nothing to check the registry's image against; deploy it to {source.name} "
                               "again (its verification then records the digest); nothing was changed")
    now = images.manifest_digest(a.image, tag, credentials=creds)
    if not now:
        raise PromotionRefused(f"image {a.image}:{tag} is not in the registry any more; nothing was changed")
    if now != recorded:
        raise PromotionRefused(f"image {a.image}:{tag} changed since it was verified in {source.name}: the registry "
                               f"serves {now}, the verification recorded {recorded}; nothing was changed")
    soaked_since = _soak(repo, a, source, target, tag, mine)
    pipeline = {p.sha: p for p in records.pipeline_commits(repo, app=a.name, environment=source.name,
                                                           branch=a.gitops_branch)}
    verified = next((pipeline[v.commit] for v in mine if v.commit in pipeline and pipeline[v.commit].tag == tag), None)
    if verified is None:
        verified = next((p for p in pipeline.values() if p.tag == tag and p.source_sha), None)
    return Candidate(tag=tag, digest=recorded, verified_at=mine[0].at, soaked_since=soaked_since,
                     source_sha=verified.source_sha if verified else "",
                     verified_by_run=verified.flow_run if verified else "",
                     target_runs=values.read_image_tag(Path(repo.working_tree_dir) / a.values_path(target.name)))


def _soak(repo: Any, a: App, source: Environment, target: Environment, tag: str,
          mine: list[records.Verification]) -> str:
    """With `soak` set on the target: the start of the tag's soak (its first verification in the source
    environment after the last rollback there); refused when that is too recent or there is none."""
    if not target.soak_seconds:
        return ""
    times = [(v, t) for v in mine if (t := v.at_datetime) is not None]
    if not times:
        raise PromotionRefused(f"the verification time of {a.name}:{tag} in {source.name} is unreadable; "
                               "nothing was changed")
    oldest = min(t for _, t in times)
    failures = records.rollbacks_since(repo, app=a.name, environment=source.name, since=oldest - timedelta(seconds=1),
                                       branch=a.gitops_branch)
    last_failure = max((t for _, t in failures), default=None)
    valid = [t for _, t in times if last_failure is None or t > last_failure]
    if not valid:
        sha, when = failures[0]
        raise PromotionRefused(f"{a.name}:{tag} was verified in {source.name} at {mine[0].at}, but {source.name} had a "
                               f"failed verification since (rollback {sha[:12]} at {when:%Y-%m-%dT%H:%M:%SZ}); "
                               f"{target.name} takes only a tag verified after that; nothing was changed")
    start = min(valid)
    age = datetime.now(UTC) - start
    if age.total_seconds() < target.soak_seconds:
        ready = start + timedelta(seconds=target.soak_seconds)
        raise PromotionRefused(f"{a.name}:{tag} has been verified in {source.name} for {_human(age.total_seconds())} "
                               f"(since {start:%Y-%m-%dT%H:%M:%SZ}); {target.name} needs {_human(target.soak_seconds)} "
                               f"(soak): promote it after {ready:%Y-%m-%d %H:%M:%S} UTC; nothing was changed")
    return f"{start:%Y-%m-%dT%H:%M:%SZ}"


def _human(seconds: float) -> str:
    s = int(seconds)
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0s"


def _superseded(repo: Any, a: App, source: Environment, target: Environment, tag: str) -> str | None:
    """Newest-wins for promotions: the target already runs, or a queued or running promotion brings, a
    tag verified in the source environment later than ours."""
    latest: dict[str, str] = {}
    for v in records.verifications(repo, a.name, source.name, branch=a.gitops_branch):
        latest.setdefault(v.tag, v.at)  # newest first: the first seen is the newest
    ours = latest.get(tag, "")
    current = values.read_image_tag(Path(repo.working_tree_dir) / a.values_path(target.name))
    if current and current != tag and latest.get(current, "") > ours:
        return (f"superseded: {target.name} already runs {current}, verified in {source.name} at {latest[current]}, "
                f"after {tag} ({ours})")
    for other in active_promotions(a.name, target.name, exclude_id=str(runtime.flow_run.id or "") or None):
        if other.tag and other.tag != tag and other.from_environment == source.name \
                and latest.get(other.tag, "") > ours:
            return (f"superseded by the promotion of {other.tag} ({other.name}, {other.state}), verified in "
                    f"{source.name} at {latest[other.tag]}, after {tag} ({ours})")
    return None


def _wait_for_approval(report: Report, a: App, source: Environment, target: Environment, c: Candidate,
                       reason: str, timeout: float | None) -> ApprovalDecision:
    """Suspend until someone answers the form in the Prefect UI; returns the answer. The first
    execution publishes the waiting report and exits its process here (Prefect's `Pause`); the
    execution after the answer gets the answer back at once."""
    log = get_logger()
    ctx = FlowRunContext.get()
    answered_before = bool(ctx and ctx.flow_run and APPROVAL_KEY in (ctx.flow_run.empirical_policy.pause_keys or set()))
    timeout = float(timeout or get_settings().approval_timeout_seconds)
    deadline = datetime.now(UTC) + timedelta(seconds=timeout)
    if not answered_before:
        try:
            # Before the run suspends: a pause that expires must find the automation already there.
            ensure_approval_automation()
        except Exception as e:  # noqa: BLE001 - without it a timed-out wait ends Failed instead of Cancelled
            log.warning("could not ensure the approval-timeout automation: %s: %s", type(e).__name__, e)
            report.notes.append(f"the approval-timeout automation could not be ensured ({type(e).__name__}: {e}); "
                                "a timeout ends this run Failed rather than Cancelled")
        report.approval = f"waiting for an approval in the Prefect UI until {deadline:%Y-%m-%d %H:%M:%S} UTC"
        report.result = "waiting-for-approval"
        report.reason = reason
        publish(report)
        log.info("promotion of %s to %s waits for an approval until %s UTC: %s", c.tag, target.name,
                 f"{deadline:%Y-%m-%d %H:%M:%S}", runtime.flow_run.ui_url)
    form = ApprovalDecision.with_initial_data(description=_form_description(a, source, target, c, reason, deadline))
    decision = suspend_flow_run(wait_for_input=form, timeout=max(1, round(timeout)), key=APPROVAL_KEY)
    report.result = "running"
    return decision


def _form_description(a: App, source: Environment, target: Environment, c: Candidate, reason: str,
                      deadline: datetime) -> str:
    """The markdown the Prefect UI shows above the approval form: what exactly would be deployed."""
    report_link = f"[the {source.name} run that verified it]({run_url(c.verified_by_run)})" if c.verified_by_run \
        else "not known (its values commit names no flow run)"
    items = [
        ("Image tag", f"`{c.tag}`"),
        # In two halves: the UI's form neither wraps nor scrolls a code span, and a digest is wider than it.
        ("Image digest", f"`{c.digest[:len(c.digest) // 2 + 4]}` `{c.digest[len(c.digest) // 2 + 4:]}`"),
        (f"Verified in {source.name} at", c.verified_at),
        ("Verification report", report_link),
        ("Source commit", f"`{c.source_sha}`" if c.source_sha else "unknown"),
        (f"{target.name} runs now", f"`{c.target_runs}`"),
    ]
    if reason:
        items.append(("Reason", reason))
    lines = "\n".join(f"- **{k}:** {v}" for k, v in items)
    return (f"### Promote {a.name} from {source.name} to {target.name}\n\n{lines}\n\n"
            f"Tick **Approve** to deploy this exact image (the digest above, not rebuilt) to {target.name}, or leave "
            "it unticked to reject the promotion. Your name and comment go into the values commit and the report. "
            f"Without an answer by {deadline:%Y-%m-%d %H:%M:%S} UTC the promotion is cancelled.")
