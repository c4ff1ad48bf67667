"""The deploy flow: source commit → image → values commit → Argo CD synced at that commit →
rollout → health answering the new version → report. A failure after the values commit reached
the remote runs the rollback flow as a subflow, then the run ends Failed naming what serves now.

Why a subflow and not a Prefect automation on the Failed event: the rollback must happen while
this run still holds the environment's deploy lock (so no newer deploy can slip in between), and
its outcome belongs in this run's report and final message."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.states import Failed

from delivery.config import App, Environment, load_config
from delivery.errors import DeliveryError, DeploySuperseded, PromotionRefused
from delivery.log import get_logger
from delivery.promotion import start_auto_promotions
from delivery.report import Report
from delivery.runs import active_deploy_runs, tag_flow_run
from delivery.settings import get_settings
from flows import feedback
from flows.common import commit_author, deploy_lock, publish, read_back, scratch_dir, settle, verify, work_dir
from flows.rollback import rollback
from tasks import gitops, images, records, trailers, values


def _tag_for(source_ref: str, source_sha: str, default_branch: str) -> str:
    return images.image_tags(source_ref, source_sha, default_branch)[0]


def _run_name() -> str:
    p = runtime.flow_run.parameters
    try:
        cfg = load_config()
        tag = _tag_for(p["source_ref"], p["source_sha"], cfg.app(p["app"]).default_branch)
    except Exception:  # the name must never fail the run; validation happens in the flow body
        tag = str(p.get("source_sha", ""))[:7]
    return f"deploy-{p['app']}-{p['environment']}-{tag}"


@dataclass(frozen=True)
class Prebuilt:
    """An image already built, pushed and verified in another environment (a promotion): the deploy
    path takes it as it is. Build and push are skipped; instead the registry must still serve
    `digest` for the tag, and `superseded(gitops_repo)` (the promotion's newest-wins) may stop the run
    before Git is written. The trailers name the source environment and the approval."""

    digest: str
    promoted_from: str
    approved_by: str = ""
    approval_comment: str = ""
    superseded: Callable[[Any], str | None] | None = None


def _check_prebuilt(a: App, tag: str, prebuilt: Prebuilt, creds: Any) -> str:
    now = images.manifest_digest(a.image, tag, credentials=creds) or ""
    if not now:
        raise PromotionRefused(f"image {a.image}:{tag} is no longer in the registry; nothing was changed")
    if now != prebuilt.digest:
        raise PromotionRefused(f"image {a.image}:{tag} changed since it was verified in {prebuilt.promoted_from}: "
                               f"the registry serves {now}, verified was {prebuilt.digest}; nothing was changed")
    return now


def _superseded_by(src_repo: Any, app: App, env: Environment, source_ref: str, source_sha: str,
                   deployed_source: str | None, *, fetch: bool = False) -> str | None:
    """A newer commit of the same ref that is queued, running or already deployed, if any.

    With `fetch`, commits our clone lacks are fetched first: the clone was made before the lock
    wait, and a commit pushed (and deployed) since is unknown to it, so it could not be judged newer.
    A promotion has no source clone: its newest-wins is its own (`Prebuilt.superseded`)."""
    if src_repo is None:
        return None
    candidates = [r.source_sha for r in active_deploy_runs(app.name, env.name, runtime.flow_run.id)
                  if r.source_ref == source_ref and r.source_sha and r.source_sha != source_sha]
    if deployed_source and deployed_source != source_sha:
        candidates.append(deployed_source)
    if fetch and candidates:
        gitops.fetch_commits(src_repo, candidates)
    for sha in candidates:
        if gitops.is_newer(src_repo, source_sha, sha):
            return sha
    return None


@flow(name="deploy", flow_run_name=_run_name, log_prints=False)
def deploy(
    app: str,
    environment: str,
    source_ref: str,
    source_sha: str,
    delivery_id: str | None = None,
    received_at: str | None = None,
    # Above the seed policy's retry budget (5 attempts, 5 s doubling, ≤ 3 m: about 155 s plus the
    # attempts themselves): a sync Argo CD is still retrying must not be called a timeout.
    sync_timeout: float = 300.0,
    rollout_timeout: float = 120.0,
    health_timeout: float = 60.0,
    lock_timeout: float = 1800.0,
) -> dict[str, Any] | Any:
    """Build the source commit, push the image, bump the environment's values file, wait for Argo CD
    to sync that commit, verify the rollout and the app's health; roll back if that fails."""
    log = get_logger()
    cfg = load_config()
    a = cfg.app(app)
    env = a.environment(environment)
    tags = images.image_tags(source_ref, source_sha, a.default_branch)
    tag = tags[0]
    report = Report(kind="deploy", app=app, environment=environment, tag=tag, source_ref=source_ref,
                    source_sha=source_sha, health_url=env.health_url, flow_run_id=str(runtime.flow_run.id or ""),
                    received_at=received_at or "")
    # Commit statuses and a GitHub Deployment for this run, kept up to date from the report (off
    # without a GitHub token; never fails the run).
    feedback.attach(report, a, run_url=runtime.flow_run.ui_url)
    values_path = a.values_path(environment)
    ref_name = source_ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    tag_flow_run(runtime.flow_run.id, [f"app:{app}", f"env:{environment}", f"ref:{ref_name}"])
    log.info("deploying %s@%s to %s as %s (delivery %s)", source_ref, source_sha[:12], environment, tag,
             delivery_id or "none")

    with scratch_dir(app, "run-") as run_dir:
        def body() -> Any:
            with report.stage("checkout"):
                # One clone per run: concurrent deploys of the same app (another environment, a newer
                # commit) must never build each other's checkout.
                src_dir = gitops.checkout_commit_task(a.source_repo, source_sha, run_dir / "source")
                src_repo = gitops.open_repo(src_dir)
            # Check before queueing on the lock: in a burst, most runs end here at once.
            newer = _superseded_by(src_repo, a, env, source_ref, source_sha, None)
            if newer:
                raise DeploySuperseded(f"superseded by {newer[:12]} of {source_ref}, queued or running")
            with deploy_lock(report, app, environment, lock_timeout):
                return _deploy_locked(report, a, env, tags, src_dir, src_repo, values_path, sync_timeout,
                                      rollout_timeout, health_timeout)

        return settle(report, a, env, body)


def _deploy_locked(report: Report, a: App, env: Environment, tags: list[str], src_dir: Path | None, src_repo: Any,
                   values_path: str, sync_timeout: float, rollout_timeout: float,
                   health_timeout: float, *, prebuilt: Prebuilt | None = None) -> dict[str, Any] | Any:
    log = get_logger()
    tag = tags[0]
    gitops_dir = work_dir(a.name, f"gitops-{env.name}")
    with report.stage("gitops-checkout"):
        repo = gitops.checkout_task(a.gitops_repo, a.gitops_branch, gitops_dir)
    deployed_source = records.deployed_source_commit(repo, app=a.name, environment=env.name)
    newer = _superseded_by(src_repo, a, env, report.source_ref, report.source_sha, deployed_source, fetch=True)
    if newer:
        raise DeploySuperseded(f"superseded by {newer[:12]} of {report.source_ref}, deployed or queued")
    if prebuilt is not None and prebuilt.superseded is not None and (why := prebuilt.superseded(repo)):
        raise DeploySuperseded(why)
    values_file = gitops_dir / values_path
    report.previous_tag = values.read_image_tag(values_file)

    creds = images.registry_credentials(get_settings())
    if prebuilt is not None:
        # A promotion deploys the very image verified in its source environment, never a rebuild.
        with report.stage("digest-check"):
            report.digest = _check_prebuilt(a, tag, prebuilt, creds)
            report.stages[-1].detail = f"{report.digest} as verified in {prebuilt.promoted_from}"
    # A re-run after a crash finds the image already pushed: same tag, same source commit.
    with report.stage("build"):
        if prebuilt is not None:
            report.stages[-1].outcome = "skipped"
            report.stages[-1].detail = f"promoted from {prebuilt.promoted_from}: not rebuilt"
            built = None
        elif images.image_exists(a.image, tag, credentials=creds):
            report.stages[-1].outcome = "skipped"
            report.stages[-1].detail = "image already in the registry"
            built = None
        else:
            built = images.build_image_task(
                src_dir / a.context, a.image, tags, dockerfile=a.dockerfile,
                build_args={**a.build_args, "APP_VERSION": tag}, revision=report.source_sha, source=a.source_repo,
            )
    with report.stage("push"):
        if prebuilt is not None:
            report.stages[-1].outcome = "skipped"
            report.stages[-1].detail = "already in the registry, digest checked"
        elif built is None:
            report.digest = images.manifest_digest(a.image, tag, credentials=creds) or ""
            report.stages[-1].outcome = "skipped"
        else:
            report.digest = images.push_image_task(a.image, tags, credentials=creds).digest

    # The last look before Git is written, the point of no return: in a burst of pushes the newer
    # commits are often queued only while this one builds. Superseded here, it leaves only an image
    # in the registry behind, and the newest run takes the lock at once.
    newer = _superseded_by(src_repo, a, env, report.source_ref, report.source_sha, None, fetch=True)
    if newer:
        raise DeploySuperseded(f"superseded by {newer[:12]} of {report.source_ref}, queued while this one built")

    with report.stage("bump-commit-push"):
        bump = values.bump_image_tag_task(values_file, tag)
        message = trailers.commit_message(
            "bump", tag, app=a.name, environment=env.name, source_sha=report.source_sha, digest=report.digest,
            replaces=bump.old_tag, flow_run_id=report.flow_run_id, flow_run_url=runtime.flow_run.ui_url,
            **({"promoted_from": prebuilt.promoted_from, "approved_by": prebuilt.approved_by or None,
                "approval_comment": prebuilt.approval_comment} if prebuilt is not None else {}),
        )
        commit = gitops.commit_and_push_task(repo, [values_path], message, author=commit_author(),
                                             branch=a.gitops_branch)
        report.values_commit = commit.sha
        report.stages[-1].detail = "new commit" if commit.committed else "tag already in Git"
    log.info("values commit %s sets %s to %s", commit.sha[:12], values_path, tag)

    # From here on Git names the new tag: any failure must put the last known-good tag back.
    try:
        verify(report, env, commit.sha, tag, sync_timeout, rollout_timeout, health_timeout, repo=repo,
               values_path=values_path)
    except DeliveryError as failure:
        return _roll_back_after(report, a, env, repo, failure, sync_timeout=sync_timeout,
                                rollout_timeout=rollout_timeout, health_timeout=health_timeout)

    with report.stage("record-verified"):
        records.record_verified_task(repo, commit.sha, app=a.name, environment=env.name, tag=tag,
                                     digest=report.digest)
    # Environments that take their image from this one (`promote_from`, `auto: true`) start their
    # promotion now; that never fails this run (what could not be started is a note in the report).
    start_auto_promotions(report, a, env, tag, values_commit=commit.sha)
    report.serving = tag
    report.finish("completed")
    read_back(report, a, env, repo)
    publish(report)
    return report.summary()


def _roll_back_after(report: Report, a: App, env: Environment, repo: Any, failure: DeliveryError, *,
                     sync_timeout: float, rollout_timeout: float, health_timeout: float) -> Any:
    log = get_logger()
    bad = report.tag
    try:
        known_good = records.last_verified_tag(repo, a.name, env.name, branch=a.gitops_branch, exclude={bad})
    except DeliveryError as e:
        # Git failing too (a hang, say) must not skip the rollback: the tag this run replaced is the
        # best target left, and the rollback reports for itself whether Git let it through.
        log.warning("cannot read the verification records (%s); rolling back to the replaced tag", e)
        known_good = None
    target = known_good or (report.previous_tag if report.previous_tag != bad else None)
    log.error("deploy of %s failed after its values commit: %s; rolling back to %s", bad, failure, target)
    if not target:
        read_back(report, a, env, repo)
        msg = (f"deploy of {bad} to {env.name} failed ({failure}) and there is no known-good tag to roll back to; "
               f"Git names {report.git_names}, the cluster runs {report.cluster_runs}")
        report.finish("failed", msg)
        publish(report)
        return Failed(message=msg)
    with report.stage("rollback"):
        try:
            # The same wait budget the caller gave the deploy: a rollback that cannot be verified
            # must not keep the run (and the environment's lock) for the rollback's own defaults.
            result = rollback(app=a.name, environment=env.name, to_tag=target,
                              reason=f"automatic: deploy of {bad} failed: {failure}", sync_timeout=sync_timeout,
                              rollout_timeout=rollout_timeout, health_timeout=health_timeout,
                              github_deployment_id=feedback.feedback_of(report))
            report.rolled_back_to = target
            report.serving = result.get("serving", target) if isinstance(result, dict) else target
            outcome = "rolled back"
        except Exception as rb:  # a refused, unverified or crashed rollback must still end this run clearly
            report.rolled_back_to = f"{target} (not verified)"
            outcome = f"the rollback to {target} did not complete ({rb})"
    # Say what Git and the cluster name as read back now, not what the rollback meant them to.
    read_back(report, a, env, repo)
    msg = (f"deploy of {bad} to {env.name} failed: {failure}; {outcome}; "
           f"Git names {report.git_names}, the cluster runs {report.cluster_runs}")
    if report.serving:
        msg += f", verified serving {report.serving}"
    report.finish("rolled-back" if report.serving else "failed", msg)
    publish(report)
    return Failed(message=msg)
