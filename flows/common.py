"""What the deploy, promote and rollback flows share: the work directory, the environment's lock, the
commit identity, the verify path (Argo CD synced at our commit → rollout → health), the final
read-back of what Git and the cluster name, how a run's outcome ends its report, and publishing it.
The flows import this module; none imports another's internals."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.states import Cancelled, Failed

from delivery.config import App, Environment
from delivery.errors import DeliveryError, DeploySuperseded, LockTimeout, PromotionRefused
from delivery.log import get_logger
from delivery.report import Report
from delivery.runs import LockNotFree, ensure_lock, hold_lock
from delivery.settings import get_settings
from tasks import argocd, gitops, probes


def work_dir(*parts: str) -> Path:
    d = get_settings().work_dir.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def deploy_lock(report: Report, app: str, environment: str, timeout: float) -> Iterator[None]:
    """The environment's deploy lock (deploy and promote), held while the block runs; the wait for it
    is the report's `lock-wait` stage and ends in `LockTimeout` after `timeout` seconds."""
    lock = ensure_lock(app, environment)
    with ExitStack() as held:
        with report.stage("lock-wait"):
            try:
                held.enter_context(hold_lock(lock, timeout=timeout, lease_seconds=get_settings().lock_lease_seconds))
            except LockNotFree as e:
                raise LockTimeout(f"the deploy lock of {app}/{environment} was not free within "
                                  f"{timeout:g} s: {e.last}") from e
        yield


@contextmanager
def scratch_dir(app: str, prefix: str) -> Iterator[Path]:
    """A directory of the run's own under the app's work directory, removed when the run ends."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir(app)))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def settle(report: Report, a: App, env: Environment, body: Callable[[], Any]) -> Any:
    """Run a deploy or promotion's `body` and end its report the same way whatever happens:
    superseded → Cancelled; refused (a promotion's checks; nothing was written) → Failed; any other
    failure, ours or not (a Prefect API error, a bug) → the report says what Git and the cluster
    show now, and the error is raised again so the run ends Failed with it."""
    log = get_logger()
    try:
        return body()
    except DeploySuperseded as e:
        report.finish("superseded", str(e))
        log.info("%s skipped: %s", report.kind, e)
        publish(report)
        return Cancelled(message=str(e))
    except PromotionRefused as e:
        report.finish("refused", str(e))
        log.error("%s refused: %s", report.kind, e)
        publish(report)
        return Failed(message=str(e))
    except Exception as e:
        if report.result == "running":
            report.finish("failed", str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}")
        read_back(report, a, env)
        publish(report)
        raise


def commit_author() -> tuple[str, str]:
    s = get_settings()
    return (s.git_author_name, s.git_author_email)


def verify(report: Report, env: Environment, revision: str, tag: str, sync_timeout: float,
           rollout_timeout: float, health_timeout: float, *, repo: Any, values_path: str) -> None:
    """Argo CD synced and healthy at `revision` (or a later one carrying our change), the rollout
    complete, and the app answering `tag`; raises the stage's `DeliveryError` otherwise. Both waits
    watch the new pods too, so a release that cannot become ready fails in seconds, naming the pod,
    the container and the kubelet's reason, instead of after the 600 s progress deadline."""
    grace = get_settings().readiness_grace_seconds
    with report.stage("argocd-refresh"):
        argocd.request_refresh_task(env.application, namespace=env.argocd_namespace)
    with report.stage("argocd-sync"):
        # Other environments and apps commit to the same GitOps branch: Argo CD may sync a newer head
        # that still carries our tag, and that counts as ours.
        status = argocd.wait_for_sync_task(env.application, revision, timeout=sync_timeout,
                                           namespace=env.argocd_namespace,
                                           carries=gitops.carries_change(repo, revision, values_path, tag),
                                           workload_failure=probes.FailureWatch(
                                               env.deployment, env.namespace, readiness_grace=grace))
        report.argocd = argocd.describe(status)
    with report.stage("rollout"):
        probes.wait_for_rollout_task(env.deployment, env.namespace, timeout=rollout_timeout, readiness_grace=grace)
    with report.stage("health"):
        answer = probes.probe_health_task(env.health_url, expect_version=tag, timeout=health_timeout,
                                         request_timeout=get_settings().http_timeout_seconds)
        report.health_answer = f"{answer.status_code} {answer.body}"


def _image_tag(image: str) -> str:
    """`registry:5000/team/app:tag` → `tag` (a digest reference is shown whole)."""
    if "@" in image:
        return image
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def read_back(report: Report, a: App, env: Environment, repo: Any = None) -> None:
    """Fill in what Git and the cluster name *now*, read from them rather than assumed.

    Never raises: a report must be written even when Git or the cluster is the thing that failed,
    so an unreadable side is reported as such. Each read is bounded by the settings' timeouts."""
    values_path = a.values_path(env.name)
    try:
        if repo is None:
            scratch = Path(tempfile.mkdtemp(prefix="read-back-", dir=work_dir(a.name)))
            try:
                report.git_names = gitops.remote_image_tag(a.gitops_repo, a.gitops_branch, values_path, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            report.git_names = gitops.remote_image_tag_in(repo, a.gitops_branch, values_path)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        report.git_names = f"unknown ({_first_line(e)})"
    try:
        deployment = probes.read_deployment(env.deployment, env.namespace)
        if deployment is None:
            report.cluster_runs = f"no Deployment {env.namespace}/{env.deployment}"
        else:
            containers = ((((deployment.get("spec") or {}).get("template") or {}).get("spec") or {})
                          .get("containers") or [])
            report.cluster_runs = _image_tag(containers[0].get("image", "")) if containers else "no containers"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        report.cluster_runs = f"unknown ({_first_line(e)})"
    try:
        application = argocd.read_application(env.application, namespace=env.argocd_namespace)
        report.argocd_final = (argocd.describe(argocd.summarize(application)) if application is not None
                               else f"no Application {env.argocd_namespace}/{env.application}")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        report.argocd_final = f"unknown ({_first_line(e)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else "") or type(e).__name__


def publish(report: Report) -> None:
    """The run's report and a link to the app; skipped outside a flow run (plain calls in tests)."""
    if not runtime.flow_run.id:
        return
    key = f"{report.kind}-{report.app}-{report.environment}".lower()
    try:
        create_markdown_artifact(key=key, markdown=report.markdown(),
                                 description=f"{report.kind} of {report.tag} to {report.environment}: {report.result}")
        if report.health_url:
            create_link_artifact(key=f"{key}-health", link=report.health_url,
                                 link_text=f"{report.app} {report.environment} health",
                                 description="the app's health endpoint")
    except Exception as e:  # noqa: BLE001 - the run's own outcome must not be replaced by a failed artifact write
        get_logger().error("could not publish the %s report: %s", report.kind, _first_line(e))
