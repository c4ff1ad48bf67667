"""The drift check: for every app and environment, Git (the tag at the head of the GitOps branch)
vs the cluster (the live Deployment's image) vs Argo CD (sync status, synced revision, health);
the desired image exists in the registry; no plaintext secret in the GitOps repository.

It never writes Git. With `heal=True` it asks Argo CD to sync drift made behind its back."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.states import Completed, Failed

from delivery.config import App, Config, Environment, load_config
from delivery.errors import DeliveryError
from delivery.log import get_logger
from delivery.secrets_scan import scan_tree
from delivery.settings import get_settings
from flows.common import work_dir
from tasks import argocd, gitops, images, probes, values

# Most important first: one row shows the worst finding, `details` lists them all.
RESULTS = ("secret-in-git", "missing-image", "drifted", "degraded", "out-of-sync", "in-sync")


@dataclass
class DriftRow:
    app: str
    environment: str
    result: str = "in-sync"
    git_tag: str = ""
    live_image: str = ""
    argocd_sync: str = ""
    argocd_revision: str = ""
    git_head: str = ""
    health: str = ""
    details: list[str] = field(default_factory=list)

    def flag(self, result: str, detail: str) -> None:
        self.details.append(detail)
        if RESULTS.index(result) < RESULTS.index(self.result):
            self.result = result


def assess(app: App, env: Environment, *, git_tag: str, git_head: str, deployment: dict | None,
           application: dict | None, image_present: bool, secret_findings: list[str],
           synced_tag: str | None = None) -> DriftRow:
    """Pure: the drift verdict for one app/environment from what was read.

    `synced_tag` is this environment's tag at the revision Argo CD last synced. Argo CD polls Git, so
    its synced revision lags the head after every commit for *another* environment; that lag is only
    drift when this environment's tag differs between the two revisions."""
    row = DriftRow(app.name, env.name, git_tag=git_tag, git_head=git_head)
    desired = f"{app.image}:{git_tag}"
    for f in secret_findings:
        row.flag("secret-in-git", f"plaintext secret in Git: {f}")
    if not image_present:
        row.flag("missing-image", f"{desired} is not in the registry")
    if deployment is None:
        row.flag("degraded", f"Deployment {env.namespace}/{env.deployment} not found")
    else:
        containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        row.live_image = containers[0].get("image", "") if containers else ""
        if row.live_image != desired:
            row.flag("drifted", f"live image {row.live_image or 'none'} differs from Git's {desired}")
    if application is None:
        row.flag("out-of-sync", f"Argo CD Application {env.argocd_namespace}/{env.application} not found")
    else:
        st = argocd.summarize(application)
        row.argocd_sync, row.argocd_revision, row.health = st.sync_status, st.sync_revision or "", st.health_status
        if st.health_status in ("Degraded", "Missing"):
            row.flag("degraded", f"Argo CD health {st.health_status}: {st.health_message or ''}".strip())
        if st.sync_status != "Synced":
            row.flag("out-of-sync", f"Argo CD sync status {st.sync_status or 'unknown'}")
        elif git_head and st.sync_revision and st.sync_revision != git_head and synced_tag != git_tag:
            row.flag("out-of-sync", f"Argo CD synced {st.sync_revision[:12]} (tag {synced_tag or 'unknown'}), "
                                    f"Git head {git_head[:12]} has tag {git_tag}")
    return row


def _tag_at(repo: Any, application: dict | None, values_path: str, head: str) -> str | None:
    """The environment's tag at the revision Argo CD synced, or None when unknown."""
    revision = ((((application or {}).get("status") or {}).get("sync") or {}).get("revision")) or ""
    if not revision or revision == head:
        return None
    try:
        return gitops.read_image_tag_at(repo, revision, values_path)
    except DeliveryError:
        return None


def _secret_findings(checkout: Path, app: App) -> list[str]:
    roots = [p for p in (checkout / app.chart_path, checkout / "argocd") if p.exists()]
    files = [f for r in roots for f in r.rglob("*") if f.is_file()]
    return [f"{x.file}: key {x.key} (line {x.line})" for x in scan_tree(checkout, files)]


def collect_drift(cfg: Config, names: list[str], *, heal: bool = False) -> list[DriftRow]:
    """Read Git, the cluster, Argo CD and the registry for each app/environment and assess it.

    One app's trouble (its GitOps repo unreachable, an Application missing while healing) becomes that
    app's rows and never stops the others. Each run clones into a directory of its own, removed at the
    end: two drift runs at once (a schedule and a click) must not reset each other's work tree."""
    rows: list[DriftRow] = []
    creds = images.registry_credentials(get_settings())
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir("drift")))
    try:
        checkouts: dict[tuple[str, str], tuple[Any, Path] | DeliveryError] = {}
        for name in names:
            app = cfg.app(name)
            key = (app.gitops_repo, app.gitops_branch)
            if key not in checkouts:
                # One clone per GitOps repo and branch, however many apps share it.
                d = run_dir / f"{len(checkouts)}-{Path(app.gitops_repo.rstrip('/')).name}"
                try:
                    checkouts[key] = (gitops.checkout(app.gitops_repo, app.gitops_branch, d), d)
                except DeliveryError as e:
                    checkouts[key] = e
            got = checkouts[key]
            if isinstance(got, DeliveryError):
                rows += [DriftRow(app.name, env.name, result="degraded", details=[f"check failed: {got}"])
                         for env in app.environments.values()]
                continue
            rows += _app_rows(app, *got, creds=creds, heal=heal)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def _app_rows(app: App, repo: Any, d: Path, *, creds: Any, heal: bool) -> list[DriftRow]:
    rows: list[DriftRow] = []
    head = repo.head.commit.hexsha
    secrets = _secret_findings(d, app)
    for env in app.environments.values():
        try:
            tag = values.read_image_tag(d / app.values_path(env.name))
            application = argocd.read_application(env.application, namespace=env.argocd_namespace)
            row = assess(
                app, env, git_tag=tag, git_head=head,
                deployment=probes.read_deployment(env.deployment, env.namespace),
                application=application,
                image_present=images.image_exists(app.image, tag, credentials=creds), secret_findings=secrets,
                synced_tag=_tag_at(repo, application, app.values_path(env.name), head),
            )
        except DeliveryError as e:
            row = DriftRow(app.name, env.name, result="degraded", details=[f"check failed: {e}"])
        if heal and row.result in ("drifted", "out-of-sync"):
            try:
                argocd.request_sync(env.application, namespace=env.argocd_namespace, revision=head)
                row.details.append("heal: asked Argo CD to sync")
            except DeliveryError as e:
                row.details.append(f"heal failed: {e}")
        rows.append(row)
    return rows


@flow(name="drift-check")
def drift_check(apps: list[str] | None = None, heal: bool = False) -> Any:
    """Compare Git, the cluster and Argo CD for every app and environment; flag plaintext secrets.

    Args:
        apps: app names to check; empty means all apps in the delivery config.
        heal: for drift made behind Argo CD's back, ask Argo CD to sync (Git is never written).
    """
    log = get_logger()
    cfg: Config = load_config()
    rows = collect_drift(cfg, apps or sorted(cfg.apps), heal=heal)
    drifted = [r for r in rows if r.result != "in-sync"]
    for r in drifted:
        log.warning("drift %s/%s: %s: %s", r.app, r.environment, r.result, "; ".join(r.details))
        emit_event(
            event="delivery.drift.detected",
            resource={"prefect.resource.id": f"delivery.app.{r.app}.{r.environment}",
                      "prefect.resource.name": f"{r.app}/{r.environment}"},
            payload={"result": r.result, "details": r.details, "git_tag": r.git_tag, "live_image": r.live_image},
        )
    table = [{**asdict(r), "details": "; ".join(r.details)} for r in rows]
    if runtime.flow_run.id:
        create_table_artifact(key="drift-report", table=table,
                              description=f"{len(drifted)} of {len(rows)} app environments drifted")
    summary = f"{len(drifted)} of {len(rows)} app environments drifted"
    for r in rows:
        log.info("%s/%s: %s", r.app, r.environment, r.result)
    if drifted:
        # The details name what differs (a missing Application, the live image): the run's message is
        # often all a user reads.
        listed = ", ".join(f"{r.app}/{r.environment}: {r.result}" + (f" ({'; '.join(r.details)})" if r.details else "")
                           for r in drifted)
        return Failed(message=f"{summary}: {listed}")
    return Completed(message=summary)
