"""The recover flow: finish a deploy (or a promotion, or a rollback) whose process died.

A Prefect automation (deployments/automations.py) starts this deployment for every `Crashed` run of
the `deploy`, `promote` and `rollback` deployments, whoever marked it: the runner that saw its child process die, or the
heartbeat automation that saw a run go silent because the whole serve process or machine is gone.

Why an automation that runs a deployment, and not an `on_crashed` hook on the deploy flow: a hook
runs in the process that is dying. It covers what that process lives to see (an exception the
engine reports as a crash, a signal it can handle); a SIGKILL, the OOM killer or a lost machine ends
the process before any hook can run, and those are the crashes that leave a half-finished deploy
behind. The automation runs on the server, and this flow runs in a new process wherever the
`recover` deployment is served, once that infrastructure is back.

What it does, in order:
1. reads the crashed run's parameters (app, environment, source ref and sha, its waits); a crashed
   recovery is followed back to the deploy it was recovering;
2. bounds a crash loop: at most `max_attempts` recoveries per crashed deploy (runs tagged
   `recovers:<deploy run id>`), then a `Failed` run whose report says what Git, the registry and the
   cluster show;
3. takes the environment's lock, waiting for the dead run's lease to expire, and works out from
   Git, the registry and Argo CD where the dead run stopped;
4. finishes it: a rollback the dead run had pushed is finished (verified under the lock); anything
   else re-runs the same deploy as a subflow, which is idempotent (an image already in the registry
   is not rebuilt, a tag already in Git makes no second commit), verifies or rolls back as usual,
   and ends superseded when its commit is no longer the newest for the environment (the deploy's
   own newest-wins check decides; it takes the lock again itself).

A crashed promotion or rollback is not re-run as a subflow but run again as itself (the UI's Retry),
so that a promotion keeps the approval it was given: see `_recover_by_rerun`.

The report (kind `recover`) links the crashed run and records each step."""

from __future__ import annotations

import inspect
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, runtime, tags
from prefect.artifacts import create_link_artifact
from prefect.states import Cancelled, Completed, Failed

from delivery.config import App, Environment, load_config
from delivery.errors import DeliveryError, LockTimeout, RecoveryError
from delivery.log import get_logger
from delivery.report import Report
from delivery.runs import (
    RunInfo,
    child_runs,
    crash_unfinished_children,
    ensure_lock,
    hold_lock,
    read_run,
    rerun,
    run_url,
    runs_tagged,
    tag_flow_run,
    wait_until_final,
)
from delivery.settings import get_settings
from flows.common import deploy_lock, publish, read_back, work_dir
from flows.deploy import deploy
from flows.rollback import rollback
from tasks import gitops, images, records, values

# Recoveries of one crashed deploy, the first included: a deploy whose recovery keeps crashing (a
# release that takes its process down, a machine that keeps dying) ends Failed after this many.
MAX_ATTEMPTS = 3
RECOVERS_TAG = "recovers:"
# The dead run's parameters are passed on unchanged: every one the deploy flow takes.
DEPLOY_PARAMETERS = tuple(inspect.signature(deploy.fn).parameters)
# Crashed runs of these are run again as themselves (see `_recover_by_rerun`).
RERUN_FLOWS = ("promote", "rollback")
_ACTIVE = {"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"}
_FINISHED = {"COMPLETED", "FAILED", "CANCELLED"}


def _run_name() -> str:
    p = runtime.flow_run.parameters
    return f"recover-{str(p.get('crashed_run_id', '')).removeprefix('prefect.flow-run.')[:8]}"


@dataclass
class Findings:
    """Where a dead deploy of `tag` stopped, as Git, the registry and the cluster show it."""

    tag: str
    image: str
    in_registry: bool | None  # None: the registry could not be asked
    registry: str  # the digest, or why the registry could not be asked
    values_commit: str = ""  # the newest pipeline commit that set this tag from this source commit
    by_dead_run: bool = False  # that commit names the dead run (or a recovery's deploy of it) as its maker
    verified: bool = False  # a verification of the tag is recorded on that commit
    git_tag: str = ""  # what the environment's values file names now
    later: list[records.PipelineCommit] = field(default_factory=list)  # pipeline commits after it

    @property
    def rolling_back(self) -> bool:
        """Only rollback commits followed the dead run's own values commit: it was rolling back (or someone
        rolled back by hand since), so finishing means verifying that rollback, never deploying the tag
        again. (Followed a commit of the same tag by an earlier run, it is a deliberate deploy again.)"""
        return bool(self.values_commit and self.by_dead_run and self.later
                    and all(c.kind == "rollback" for c in self.later))

    def registry_text(self) -> str:
        if self.in_registry is None:
            return f"registry: {self.image}:{self.tag} unknown ({self.registry})"
        return f"registry: {self.image}:{self.tag} " + (f"present ({self.registry})" if self.in_registry else "absent")

    def where(self) -> str:
        vc = self.values_commit[:12]
        if self.rolling_back:
            return (f"in its rollback: its values commit {vc} was followed by rollback commit "
                    f"{self.later[0].sha[:12]}; Git names {self.git_tag}")
        if self.later:
            return (f"after its values commit {vc}; a later deploy replaced it (values commit "
                    f"{self.later[0].sha[:12]}, tag {self.later[0].tag}); Git names {self.git_tag}")
        if self.values_commit:
            if self.verified:
                return f"after verifying {self.tag} (values commit {vc}, verification recorded)"
            return (f"after its values commit {vc}, before {self.tag} was verified (Argo CD, rollout or health); "
                    f"Git names {self.git_tag}")
        if self.in_registry:
            return f"after pushing {self.image}:{self.tag}, before its values commit; Git names {self.git_tag}"
        if self.in_registry is None:
            return f"before its values commit ({self.registry_text()}); Git names {self.git_tag}"
        return f"before {self.image}:{self.tag} reached the registry; Git names {self.git_tag}"


def find_where_it_stopped(a: App, env: Environment, tag: str, source_sha: str, scratch: Path,
                          dead_runs: set[str] | None = None) -> Findings:
    """Read the registry and a fresh clone of the GitOps repository: is the image pushed, is there a
    values commit for this tag and source commit (made by one of `dead_runs`, when given), was it
    verified, and what came after it."""
    creds = images.registry_credentials(get_settings())
    try:
        digest = images.manifest_digest(a.image, tag, credentials=creds)
        found = Findings(tag, a.image, digest is not None, digest or "")
    except DeliveryError as e:
        found = Findings(tag, a.image, None, e.message)
    repo = gitops.checkout(a.gitops_repo, a.gitops_branch, scratch / "gitops")
    found.git_tag = values.read_image_tag(scratch / "gitops" / a.values_path(env.name))
    later = []
    for c in records.pipeline_commits(repo, app=a.name, environment=env.name, branch=a.gitops_branch):
        if c.kind == "values-bump" and c.tag == tag and c.source_sha == source_sha:
            found.values_commit = c.sha
            found.by_dead_run = dead_runs is None or c.flow_run in dead_runs
            found.later = later
            break
        later.append(c)
    if found.values_commit:
        found.verified = any(sha == found.values_commit and t == tag for sha, t, _ in
                             records.verified_tags(repo, a.name, env.name, branch=a.gitops_branch))
    return found


def _follow(crashed: RunInfo) -> tuple[RunInfo, list[RunInfo]]:
    """The deploy run behind `crashed` and the chain of crashed recoveries that led to it."""
    chain = [crashed]
    target = crashed
    while target.flow_name == "recover":
        if len(chain) > 50:
            raise RecoveryError(f"recovery {crashed.name} leads through more than 50 recoveries")
        target = read_run(str(target.parameters.get("crashed_run_id", "")))
        chain.append(target)
    if target.flow_name not in ("deploy", *RERUN_FLOWS):
        raise RecoveryError(f"{target.name} ({target.id}) is a {target.flow_name} run; only deploy, promote and "
                            "rollback runs are recovered")
    return target, chain


@flow(name="recover", flow_run_name=_run_name)
def recover(crashed_run_id: str, max_attempts: int = MAX_ATTEMPTS) -> Any:
    """Finish a deploy whose process died: wait for its lock, find out from Git, the registry and Argo CD
    where it stopped, and finish it (the same deploy again, idempotent, or the rollback it was making).

    Args:
        crashed_run_id: the crashed deploy run (or the crashed recovery of one); the automation passes it.
        max_attempts: recoveries per crashed deploy, this one included, before giving up.
    """
    log = get_logger()
    me = str(runtime.flow_run.id or "")
    target, chain = _follow(read_run(crashed_run_id))
    if target.flow_name in RERUN_FLOWS:
        return _recover_by_rerun(target, chain, me, max_attempts)
    p = target.parameters
    missing = [k for k in ("app", "environment", "source_ref", "source_sha") if not p.get(k)]
    if missing:
        raise RecoveryError(f"{target.name} has no {', '.join(missing)} parameter")
    a = load_config().app(p["app"])
    env = a.environment(p["environment"])
    tag = images.image_tags(p["source_ref"], p["source_sha"], a.default_branch)[0]
    if me:
        tag_flow_run(me, [f"{RECOVERS_TAG}{target.id}", f"app:{a.name}", f"env:{env.name}"])
    report = Report(kind="recover", app=a.name, environment=env.name, tag=tag, source_ref=p["source_ref"],
                    source_sha=p["source_sha"], health_url=env.health_url, flow_run_id=me,
                    received_at=p.get("received_at") or "")
    link = f"[{target.name}]({run_url(target.id)})"
    log.info("recovering %s (%s, %s) of %s to %s", target.name, target.id, target.state_name, tag, env.name)
    scratch = Path(tempfile.mkdtemp(prefix="recover-", dir=work_dir(a.name)))
    try:
        _crashed_run(report, target, chain, link)
        if target.state_type in _FINISHED:
            return _ended_by_itself(report, a, env, target)
        with report.stage("leftovers") as st:
            dead = [r.id for r in chain if r.state_type == "CRASHED"]
            marked = crash_unfinished_children(dead, f"its parent run died; recovered by {me or 'a recovery'}")
            st.detail = f"marked Crashed: {', '.join(marked)}" if marked else "no subflow runs left running"
            # The runs whose values commit is the dead run's own: it, and the deploys crashed recoveries ran.
            dead_runs = {target.id} | {r.id for r in child_runs([r.id for r in chain[:-1]]) if r.flow_name == "deploy"}

        with report.stage("attempts") as st:
            earlier = [r for r in runs_tagged(f"{RECOVERS_TAG}{target.id}", "recover") if r.id != me]
            busy = [r for r in earlier if r.state_type in _ACTIVE]
            done = [r for r in earlier if r.state_type in _FINISHED]
            crashed = max(sum(1 for r in earlier if r.state_type == "CRASHED"), len(chain) - 1)
            st.detail = f"attempt {crashed + 1} of {max_attempts}"
        if done or busy:
            other = (done or busy)[0]
            return _end(report, a, env, target, "superseded", f"recovery {other.name} of {target.name} is "
                                                     f"{other.state_name}: this one is not needed", Cancelled)
        if crashed >= max_attempts:
            with report.stage("where-it-stopped") as st:
                found = find_where_it_stopped(a, env, tag, p["source_sha"], scratch, dead_runs)
                st.detail = found.where()
            _record(report, found)
            read_back(report, a, env)
            return _end(report, a, env, target, "failed",
                        f"gave up on {target.name} after {crashed} recoveries crashed too: Git names "
                        f"{report.git_names}, {found.registry_text()}, the cluster runs {report.cluster_runs}, "
                        f"Argo CD: {report.argocd_final or 'unknown'}", Failed, read=False)

        waits = {k: p[k] for k in ("sync_timeout", "rollout_timeout", "health_timeout") if k in p}
        with ExitStack() as held:
            with report.stage("lock-wait"):
                lock_timeout = float(p.get("lock_timeout") or 1800)
                try:
                    held.enter_context(hold_lock(ensure_lock(a.name, env.name), timeout=lock_timeout,
                                                 lease_seconds=get_settings().lock_lease_seconds))
                except TimeoutError as e:
                    raise LockTimeout(f"the deploy lock of {a.name}/{env.name} was not free within "
                                      f"{lock_timeout:g} s") from e
            now = read_run(target.id)
            if now.state_type in _FINISHED:
                return _ended_by_itself(report, a, env, now)
            with report.stage("where-it-stopped") as st:
                found = find_where_it_stopped(a, env, tag, p["source_sha"], scratch, dead_runs)
                st.detail = found.where()
            _record(report, found)
            log.info("%s stopped %s", target.name, found.where())
            if found.rolling_back:
                return _finish_rollback(report, a, env, target, found, waits)
        # The lock is free again: the deploy takes it itself. A newer deploy that slips in first makes
        # this one superseded, which is what newest-wins wants.
        return _finish_deploy(report, a, env, target, {k: p[k] for k in DEPLOY_PARAMETERS if k in p})
    except Exception as e:
        _failed(report, a, env, target, e)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _recover_by_rerun(target: RunInfo, chain: list[RunInfo], me: str, max_attempts: int) -> Any:
    """A crashed promotion or manual rollback is run again as itself, the way the UI's Retry does it: the
    same run, scheduled again (`runs.rerun`). That keeps what the run already had: a promotion keeps
    the approval it was given (the server remembers the answered suspension and hands its input back,
    so nobody is asked twice) and runs its checks, digest check and newest-wins again; its bump of a
    tag Git already names makes no second commit, and it verifies or rolls back as usual. A rollback
    puts back the same tag the same way and verifies it. Both take the lock themselves; the recovery
    waits for the dead run's lease first, so the re-run does not queue behind a ghost. A re-run that
    crashes again is scheduled again, up to `max_attempts` runs of it in all."""
    log = get_logger()
    p = target.parameters
    a = load_config().app(p["app"])
    env = a.environment(p["to_environment"] if target.flow_name == "promote" else p["environment"])
    if me:
        tag_flow_run(me, [f"{RECOVERS_TAG}{target.id}", f"app:{a.name}", f"env:{env.name}"])
    report = Report(kind="recover", app=a.name, environment=env.name, tag=p.get("tag") or p.get("to_tag") or "",
                    health_url=env.health_url, flow_run_id=me, promoted_from=p.get("from_environment") or "")
    link = f"[{target.name}]({run_url(target.id)})"
    log.info("recovering %s (%s, %s) by running it again", target.name, target.id, target.state_name)
    try:
        _crashed_run(report, target, chain, link)
        if target.state_type in _FINISHED:
            return _ended_by_itself(report, a, env, target)
        with report.stage("attempts") as st:
            earlier = [r for r in runs_tagged(f"{RECOVERS_TAG}{target.id}", "recover") if r.id != me]
            busy = [r for r in earlier if r.state_type in _ACTIVE]
            # Each earlier recovery ran it once (or died doing so); the dead run itself was the first.
            runs = 1 + len(earlier)
            st.detail = f"run {runs + 1} of {max_attempts} at most"
        if busy:
            return _end(report, a, env, target, "superseded", f"recovery {busy[0].name} of {target.name} is "
                                                     f"{busy[0].state_name}: this one is not needed", Cancelled)
        # Its own waits, twice (a promotion that rolls back verifies twice), plus its lock wait.
        budget = float(p.get("lock_timeout") or 1800) + 2 * sum(
            float(p.get(k) or d) for k, d in (("sync_timeout", 300), ("rollout_timeout", 120),
                                              ("health_timeout", 60))) + 120
        final = target
        while final.state_type == "CRASHED":
            if runs >= max_attempts:
                read_back(report, a, env)
                return _end(report, a, env, target, "failed",
                            f"gave up on {target.name} after {runs} runs of it crashed: Git names "
                            f"{report.git_names}, the cluster runs {report.cluster_runs}, Argo CD: "
                            f"{report.argocd_final or 'unknown'}", Failed, read=False)
            with deploy_lock(report, a.name, env.name, float(p.get("lock_timeout") or 1800)):
                pass  # the dead run's lease has lapsed; the re-run takes the lock itself
            with report.stage("re-run") as st:
                rerun(target.id, f"run again by recovery {runtime.flow_run.name or me}: its process died")
                runs += 1
                final = wait_until_final(target.id, budget)
                st.detail = f"{link} ran again and ended {final.state_name}" + (
                    f": {final.message}" if final.message else "")
        return _end_rerun(report, a, env, target, final)
    except Exception as e:
        _failed(report, a, env, target, e)
        raise


def _crashed_run(report: Report, target: RunInfo, chain: list[RunInfo], link: str) -> None:
    """The report's first stage names the run taken over (and the recoveries of it that crashed too);
    a run still active is refused."""
    with report.stage("crashed-run") as st:
        st.detail = f"{link} ({target.flow_name}) is {target.state_name}"
        if len(chain) > 1:
            st.detail += "; recoveries that crashed too: " + ", ".join(r.name for r in chain[:-1])
        if target.state_type in _ACTIVE:
            raise RecoveryError(f"{target.name} is {target.state_name}, not crashed: nothing to take over")


def _ended_by_itself(report: Report, a: App, env: Environment, target: RunInfo) -> Any:
    """Marked Crashed while still alive (heartbeats lost, not the process), it then finished."""
    return _end(report, a, env, target, "completed", f"{target.name} ended {target.state_name} by itself: "
                                            "nothing to recover", Completed)


def _failed(report: Report, a: App, env: Environment, target: RunInfo, e: Exception) -> None:
    """The recovery itself failed: the report says why and what Git and the cluster show now."""
    if report.result == "running":
        what = str(e) if isinstance(e, DeliveryError) else f"{type(e).__name__}: {e}"
        report.finish("failed", f"recovery of {target.name} failed: {what}")
    read_back(report, a, env)
    _publish(report, target)


def _end_rerun(report: Report, a: App, env: Environment, target: RunInfo, final: RunInfo) -> Any:
    what = f"{target.name} ran again and ended {final.state_name}" + (f": {final.message}" if final.message else "")
    if final.state_type == "COMPLETED":
        report.serving = report.tag
        return _end(report, a, env, target, "completed", what, Completed)
    if final.state_type == "CANCELLED":
        return _end(report, a, env, target, "superseded", what, Cancelled)
    if final.state_type in _ACTIVE:
        return _end(report, a, env, target, "failed", f"{target.name} ran again and is still {final.state_name} "
                                                      "after its own time budget", Failed)
    return _end(report, a, env, target, "rolled-back" if "; rolled back;" in final.message else "failed", what,
                Failed)


def _record(report: Report, found: Findings) -> None:
    report.values_commit = found.values_commit
    report.digest = found.registry if found.in_registry else ""


def _finish_deploy(report: Report, a: App, env: Environment, target: RunInfo, params: dict[str, Any]) -> Any:
    with report.stage("finish-deploy") as st:
        # Tagged so the heartbeat automation also covers this subflow, which has no deployment.
        with tags("delivery"):
            state = deploy(**params, return_state=True)
        sub = state.state_details.flow_run_id
        st.detail = f"deploy run [{sub}]({run_url(str(sub))}) ended {state.name}: {state.message or ''}".strip()
    message = state.message or ""
    if state.is_completed():
        try:
            summary = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - the summary only adds detail; the state says it completed
            summary = None
        if isinstance(summary, dict):
            report.values_commit = summary.get("values_commit") or report.values_commit
            report.digest = summary.get("digest") or report.digest
            report.serving = summary.get("serving") or report.tag
        return _end(report, a, env, target, "completed",
                    f"finished {target.name}: {report.tag} verified in {env.name}", Completed)
    if state.is_cancelled():
        return _end(report, a, env, target, "superseded", f"{target.name} is superseded: {message}", Cancelled)
    rolled_back = "; rolled back;" in message
    return _end(report, a, env, target, "rolled-back" if rolled_back else "failed",
                f"finished {target.name}: {message}", Failed)


def _finish_rollback(report: Report, a: App, env: Environment, target: RunInfo, found: Findings,
                     waits: dict[str, Any]) -> Any:
    """The dead run had pushed its rollback commit: verify that rollback, under the lock we hold (the
    rollback flow run as a subflow does not take it again)."""
    with report.stage("finish-rollback") as st:
        with tags("delivery"):
            state = rollback(app=a.name, environment=env.name, to_tag=found.git_tag,
                             reason=f"finishing the rollback of {target.name}, whose process died", **waits,
                             return_state=True)
        sub = state.state_details.flow_run_id
        st.detail = f"rollback run [{sub}]({run_url(str(sub))}) ended {state.name}: {state.message or ''}".strip()
    if state.is_completed():
        report.rolled_back_to = report.serving = found.git_tag
        return _end(report, a, env, target, "rolled-back",
                    f"{target.name} died rolling back {report.tag}; the rollback to {found.git_tag} is finished "
                    "and verified", Failed)
    report.rolled_back_to = f"{found.git_tag} (not verified)"
    return _end(report, a, env, target, "failed",
                f"{target.name} died rolling back {report.tag}; finishing the rollback to {found.git_tag} failed: "
                f"{state.message}", Failed)


def _end(report: Report, a: App, env: Environment, target: RunInfo, result: str, message: str, state: Any, *,
         read: bool = True) -> Any:
    """Finish the report with what Git and the cluster name now, publish it, and end the run in `state`."""
    if read:
        read_back(report, a, env)
    if result != "superseded" and report.git_names and "Git names" not in message:
        message += f"; Git names {report.git_names}, the cluster runs {report.cluster_runs}"
    report.finish(result, message)
    get_logger().info("recovery of %s: %s: %s", target.name, result, message)
    _publish(report, target)
    return state(message=message)


def _publish(report: Report, target: RunInfo) -> None:
    """The report, as the deploy publishes its own, and a link to the crashed run."""
    publish(report)
    if not runtime.flow_run.id:
        return
    try:
        create_link_artifact(key=f"recover-{report.app}-{report.environment}-crashed-run".lower(),
                             link=run_url(target.id), link_text=target.name,
                             description=f"the crashed run this recovery takes over ({target.id})")
    except Exception as e:  # noqa: BLE001 - the run's own outcome must not be replaced by a failed artifact write
        get_logger().error("could not publish the link to the crashed run: %s", e)
