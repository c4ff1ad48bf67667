"""The rollback flow: write a known-good tag back into the values file as a NEW commit, wait for
Argo CD to sync that commit, verify rollout and health. Never a force-push, never a history
rewrite, never `argocd app rollback` (Argo CD refuses it while auto-sync is on, and it would
leave Git naming the bad tag)."""

from __future__ import annotations

from typing import Any

from prefect import flow, runtime

from delivery.config import load_config
from delivery.errors import ArgoCDError, DeliveryError, RollbackError
from delivery.log import get_logger
from delivery.report import Report
from delivery.runs import ensure_lock, hold_lock
from delivery.settings import get_settings
from flows import feedback
from flows.common import commit_author, publish, read_back, verify, work_dir
from tasks import argocd, gitops, images, records, trailers, values


def _run_name() -> str:
    p = runtime.flow_run.parameters
    return f"rollback-{p['app']}-{p['environment']}-{p.get('to_tag') or 'last-known-good'}"


@flow(name="rollback", flow_run_name=_run_name)
def rollback(
    app: str,
    environment: str,
    to_tag: str | None = None,
    reason: str = "",
    # Above the seed policy's retry budget (5 attempts, 5 s doubling, ≤ 3 m: about 155 s plus the
    # attempts themselves): a sync Argo CD is still retrying must not be called a timeout.
    sync_timeout: float = 300.0,
    rollout_timeout: float = 120.0,
    health_timeout: float = 60.0,
    github_deployment_id: int | None = None,
) -> dict[str, Any]:
    """Roll an environment back to `to_tag`, or to the last tag a deploy verified healthy.

    Args:
        app: the app name from the delivery config.
        environment: the environment to roll back (e.g. dev, staging, prod).
        to_tag: the image tag to put back; empty means the last known-good tag.
        reason: why; written into the rollback commit.
        github_deployment_id: the failed deploy's GitHub Deployment, marked failed by this rollback
            (an automatic rollback passes it; by hand, the newest Deployment of the replaced tag).
    """
    a = load_config().app(app)
    env = a.environment(environment)
    # Run by hand it takes the environment's deploy lock; run by the deploy flow, its parent holds it.
    if runtime.flow_run.parent_flow_run_id:
        return _rollback(a, env, to_tag, reason, sync_timeout, rollout_timeout, health_timeout,
                         github_deployment_id)
    with hold_lock(ensure_lock(app, environment), timeout=1800, lease_seconds=get_settings().lock_lease_seconds):
        return _rollback(a, env, to_tag, reason, sync_timeout, rollout_timeout, health_timeout,
                         github_deployment_id)


def _rollback(a, env, to_tag, reason, sync_timeout, rollout_timeout, health_timeout,
              github_deployment_id=None) -> dict[str, Any]:
    log = get_logger()
    report = Report(kind="rollback", app=a.name, environment=env.name, health_url=env.health_url,
                    flow_run_id=str(runtime.flow_run.id or ""), reason=reason)
    values_path = a.values_path(env.name)
    gitops_dir = work_dir(a.name, f"gitops-{env.name}")
    repo = None
    try:
        with report.stage("gitops-checkout"):
            repo = gitops.checkout_task(a.gitops_repo, a.gitops_branch, gitops_dir)
            current = values.read_image_tag(gitops_dir / values_path)
            report.previous_tag = current
        target = to_tag or records.last_verified_tag(repo, a.name, env.name, branch=a.gitops_branch, exclude={current})
        if not target:
            raise RollbackError(f"no known-good tag recorded for {a.name}/{env.name} other than {current}; "
                                "give to_tag explicitly")
        report.tag = target
        feedback.attach(report, a, run_url=runtime.flow_run.ui_url, kind="rollback",
                        bad_deployment_id=github_deployment_id, bad_tag=current, reason=reason)
        # Refuse before touching Git: Argo CD would sync a tag whose image cannot be pulled.
        with report.stage("image-check"):
            if not images.image_exists(a.image, target, credentials=images.registry_credentials(get_settings())):
                raise RollbackError(f"image {a.image}:{target} is not in the registry; nothing was changed")
        # Likewise an Application that does not exist: nothing would ever sync the rollback commit.
        with report.stage("argocd-check"):
            try:
                argocd.get_application(env.application, namespace=env.argocd_namespace)
            except ArgoCDError as e:
                raise RollbackError(f"{e.message}; nothing was changed") from e
        with report.stage("bump-commit-push"):
            values.bump_image_tag_task(gitops_dir / values_path, target)
            message = trailers.commit_message(
                "rollback", target, app=a.name, environment=env.name, replaces=current, reason=reason,
                flow_run_id=report.flow_run_id, flow_run_url=runtime.flow_run.ui_url,
            )
            commit = gitops.commit_and_push_task(repo, [values_path], message, author=commit_author(),
                                                 branch=a.gitops_branch)
            report.values_commit = commit.sha
        log.info("rollback commit %s puts %s back (was %s)", commit.sha[:12], target, current)
        verify(report, env, commit.sha, target, sync_timeout, rollout_timeout, health_timeout, repo=repo,
               values_path=values_path)
        with report.stage("record-verified"):
            records.record_verified_task(repo, commit.sha, app=a.name, environment=env.name, tag=target)
        report.serving = target
        report.finish("completed", reason)
        read_back(report, a, env, repo)
        return report.summary()
    except Exception as e:
        # Not only our own errors: whatever ends the run, the report says so and what Git now names.
        what = str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}"
        read_back(report, a, env, repo)
        report.finish("failed", f"rollback to {report.tag or '?'} failed: {what}; Git names {report.git_names}, "
                                f"the cluster runs {report.cluster_runs}")
        raise RollbackError(report.reason) from e
    finally:
        publish(report)
