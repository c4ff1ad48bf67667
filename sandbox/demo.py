"""The main job on the sandbox, end to end, as a new user would watch it (`make demo`):

1. start everything (`delivery up`);
2. push a commit to the sample app's deploying branch and deliver a signed GitHub push webhook:
   the deploy flow builds, pushes, bumps, waits for Argo CD and verifies the new version;
   dev's verified release is promoted to staging by itself (the same image digest, not rebuilt),
   and a promotion of it to prod waits for an approval in the Prefect UI (the URL of the form is
   printed; the run waits there, holding no lock, until someone answers it or 24 h pass);
3. push a commit that breaks the health check: the deploy fails and rolls back automatically,
   the previous version answers again;
4. change the live Deployment behind Argo CD's back: a drift-check run finds it, a healing run
   asks Argo CD to put Git's version back;
5. print the run history, the DORA figures and the Prefect UI address. The stack stays up until
   `delivery down`. Re-running works: each run makes new commits.

The exit code is 1 when the story does not go as described, so CI can run the demo as a test. Ports
and the state directory follow DELIVERY_PREFECT_PORT, DELIVERY_WEBHOOK_PORT, DELIVERY_APP_PORT_BASE
and DELIVERY_SANDBOX_DIR, so a second stack can run beside a developer's.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import git

from delivery.config import load_config
from delivery.settings import get_settings
from sandbox import stack
from tasks.probes import fetch_health

ZERO = "0" * 40


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def push_payload(ref: str, before: str, after: str, repo_url: str, commits: list[dict[str, str]]) -> dict[str, Any]:
    """A push event shaped like GitHub's (the fields the receiver reads, and the usual others)."""
    name = Path(repo_url.rstrip("/")).name.removesuffix(".git")
    return {
        "ref": ref, "before": before, "after": after, "created": before == ZERO, "deleted": after == ZERO,
        "forced": False, "base_ref": None, "compare": "",
        "commits": [{"id": c["id"], "message": c["message"], "distinct": True,
                     "author": {"name": "demo", "email": "demo@example.com"}} for c in commits],
        "head_commit": ({"id": commits[-1]["id"], "message": commits[-1]["message"]} if commits else None),
        "repository": {"name": name, "full_name": f"sandbox/{name}", "clone_url": repo_url,
                       "ssh_url": repo_url, "html_url": repo_url, "default_branch": "main"},
        "pusher": {"name": "demo", "email": "demo@example.com"},
    }


def deliver(url: str, secret: str, payload: dict[str, Any], *, event: str = "push",
            delivery_id: str | None = None) -> tuple[int, dict[str, Any]]:
    body = json.dumps(payload).encode()
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()), "X-Hub-Signature-256": sig,
        "User-Agent": "GitHub-Hookshot/demo"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def runs_of(answer: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    """The runs of an accepted delivery. The receiver answers as soon as the delivery is stored and
    creates the runs right after, so poll its status URL until they exist (or the delivery failed)."""
    if answer.get("delivery_status") not in (None, "pending") or not answer.get("status_url"):
        return list(answer.get("runs") or [])
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(answer["status_url"], timeout=10) as r:
            view = json.loads(r.read() or b"{}")
        if view.get("status") == "failed":
            raise SystemExit(f"delivery {view.get('delivery_id')} failed: {view.get('reason')}")
        if view.get("status") != "pending":
            return list(view.get("runs") or [])
        if time.monotonic() > deadline:
            last = (view.get("attempts") or [{}])[-1].get("outcome", "no attempt yet")
            raise SystemExit(f"delivery {view.get('delivery_id')} has no runs after {timeout:.0f} s: {last}")
        time.sleep(0.05)


def source_clone(remote: str, workdir: Path) -> git.Repo:
    if workdir.exists():
        repo = git.Repo(workdir)
        repo.remotes.origin.fetch()
    else:
        repo = git.Repo.clone_from(remote, workdir)
    return repo


def commit_to(repo: git.Repo, branch: str, edit: dict[str, str], message: str) -> tuple[str, str]:
    """Commit file edits on top of origin/<branch> and push; returns (before, after)."""
    repo.git.checkout("-B", branch, f"origin/{branch}")
    before = repo.head.commit.hexsha
    for rel, text in edit.items():
        (Path(repo.working_tree_dir) / rel).write_text(text)
        repo.index.add([rel])
    actor = git.Actor("demo", "demo@example.com")
    repo.index.commit(message, author=actor, committer=actor)
    repo.remotes.origin.push(f"{branch}:{branch}")
    return before, repo.head.commit.hexsha


def wait_run(run_id: str, timeout: float = 300) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read() -> Any:
        async with get_client() as c:
            return await c.read_flow_run(uuid.UUID(run_id))

    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = run_coro_as_sync(read())
        if run.state_name != last:
            say(f"  run {run.name}: {run.state_name}")
            last = run.state_name
        if run.state and run.state.is_final():
            return run
        time.sleep(1)
    raise SystemExit(f"run {run_id} did not finish within {timeout:.0f} s")


def health(url: str) -> str:
    code, body = fetch_health(url, timeout=3)
    return f"{code} {body[:200]}" if code else f"no answer ({body})"


def push_and_deploy(st: stack.StackState, repo: git.Repo, remote: str, branch: str, edit: dict[str, str],
                    message: str, secret: str) -> Any:
    before, after = commit_to(repo, branch, edit, message)
    say(f"pushed {after[:7]} to {branch}: {message!r}")
    payload = push_payload(f"refs/heads/{branch}", before, after, remote, [{"id": after, "message": message}])
    delivery_id = str(uuid.uuid4())
    for attempt in range(1, 6):
        try:
            status, answer = deliver(f"{st.webhook_url}/webhooks/github", secret, payload, delivery_id=delivery_id)
        except OSError as e:
            status, answer = 0, {"status": "no answer", "reason": str(e)}
        say(f"webhook answered {status}: {answer.get('status')} {answer.get('reason', '')}")
        if status not in (0, 502, 503, 504) or attempt == 5:
            break
        # What GitHub's "Redeliver" does: the same delivery again; the receiver starts it once.
        say(f"  redelivering {delivery_id} (attempt {attempt + 1})")
        time.sleep(2 * attempt)
    runs = runs_of(answer) if status == 202 else []
    if not runs:
        raise SystemExit("the webhook did not queue a deploy")
    return wait_run(runs[0]["flow_run_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.demo", description="the sandbox story, told")
    parser.add_argument("--real", action="store_true",
                        help="on the real tier: a one-node Kubernetes and Argo CD built from Go modules")
    real = parser.parse_args(argv).real
    say("starting the sandbox, Prefect server, serve process and webhook receiver (delivery up"
        + (" --real: a real Kubernetes and Argo CD" if real else "") + ")")
    st = stack.up(real=real)
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: st.prefect_api_url, PREFECT_UI_URL: st.prefect_ui_url}):
        return _story(st)


def _story(st: stack.StackState) -> int:
    cfg = load_config(get_settings().sandbox_config_file)
    app = cfg.app("workout-api")
    env = app.environment("dev")
    branch = env.branches[0]
    secret = stack.sandbox_webhook_secret()
    repo = source_clone(app.source_repo, get_settings().sandbox_dir / "demo" / "workout-api")
    settings_rel = "app/settings.env"
    good = (Path(repo.working_tree_dir) / settings_rel).read_text()
    say(f"{app.name}/{env.name} answers now: {health(env.health_url)}")

    # What went differently from the story; the demo exits 1 when this is not empty, so CI can run it.
    problems: list[str] = []

    say("1) a good change: deploy, verified")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    good_text = good.replace("HEALTHY=false", "HEALTHY=true").rstrip("\n") + f"\n# demo release {stamp}\n"
    run = push_and_deploy(st, repo, app.source_repo, branch, {settings_rel: good_text},
                          f"feat: demo release {stamp}", secret)
    say(f"deploy ended {run.state_name}; {env.name} answers: {health(env.health_url)}")
    if run.state_name != "Completed":
        problems.append(f"the good deploy ended {run.state_name}")

    say("1a) promotion: dev verified it, so staging takes the same image by itself (auto), not rebuilt")
    promoted = _auto_promotion(app.name, run, "staging")
    staging = app.environment("staging")
    say(f"promotion ended {promoted.state_name if promoted else 'not started'}; {staging.name} answers: "
        f"{health(staging.health_url)}")
    if promoted is None or promoted.state_name != "Completed" or _version(staging.health_url) != _version(
            env.health_url):
        problems.append("dev's verified release did not reach staging by promotion")
    say("1b) promotion to prod needs an approval (approval: required): `delivery promote workout-api staging prod`")
    waiting = _promote_and_wait_for_approval(app.name, "staging", "prod")
    if waiting is None:
        problems.append("the promotion to prod did not wait for an approval")
    else:
        from delivery.promotion import run_url

        say(f"  waiting for an approval, holding no lock: open {run_url(str(waiting.id))} and click Resume "
            "(the form shows the tag, the digest and staging's verification)")

    say("1c) the second app, nutrition-api, shares the GitOps repository and the environment names: "
        "a good change to it, verified")
    other = cfg.app("nutrition-api")
    other_env = other.environment(env.name)
    other_repo = source_clone(other.source_repo, get_settings().sandbox_dir / "demo" / "nutrition-api")
    other_good = (Path(other_repo.working_tree_dir) / settings_rel).read_text()
    other_text = other_good.replace("HEALTHY=false", "HEALTHY=true").rstrip("\n") + f"\n# demo release {stamp}\n"
    run = push_and_deploy(st, other_repo, other.source_repo, branch, {settings_rel: other_text},
                          f"feat: nutrition demo release {stamp}", secret)
    other_serving = _version(other_env.health_url)
    say(f"deploy ended {run.state_name}; {other.name}/{other_env.name} answers: {health(other_env.health_url)}")
    if run.state_name != "Completed":
        problems.append(f"the {other.name} deploy ended {run.state_name}")
    other_promoted = _auto_promotion(other.name, run, "staging")
    if other_promoted is None or other_promoted.state_name != "Completed":
        problems.append(f"{other.name}'s verified release did not reach staging by promotion")

    say("2) a change that breaks the health check: deploy fails, rolls back automatically")
    bad_text = good_text.replace("HEALTHY=true", "HEALTHY=false")
    run = push_and_deploy(st, repo, app.source_repo, branch, {settings_rel: bad_text},
                          "fix: tweak health settings (broken)", secret)
    message = run.state.message if run.state else ""
    say(f"deploy ended {run.state_name}: {message}")
    if run.state_name != "Failed" or "rolled back" not in (message or ""):
        problems.append(f"the broken deploy ended {run.state_name} without a rollback")
    say(f"{env.name} answers: {health(env.health_url)}")
    # The rollback restored workout-api's own last verified tag and left the other app alone.
    say(f"{other.name}/{other_env.name} still answers: {health(other_env.health_url)}")
    if _version(other_env.health_url) != other_serving:
        problems.append(f"{other.name} changed while {app.name} rolled back")
    # Put the branch back to a healthy state so the next demo run starts clean.
    commit_to(repo, branch, {settings_rel: good_text}, "revert: restore health settings")

    say("3) drift behind Argo CD's back: self-heal off, live image changed by hand")
    _inject_drift(env)
    from flows.drift import drift_check

    state = drift_check(apps=[app.name], return_state=True)
    say(f"drift check: {state.name}: {state.message}")
    if not state.is_failed():
        problems.append("the drift check did not find the hand-made change")
    state = drift_check(apps=[app.name], heal=True, return_state=True)
    say(f"drift check with heal=True: {state.name}: {state.message}")
    _restore_self_heal(env)
    _wait_in_sync(cfg, app.name, env.name)
    state = drift_check(apps=[app.name], return_state=True)
    say(f"drift check after healing: {state.name}: {state.message}")
    if not state.is_completed():
        problems.append("drift remained after healing")

    from delivery import history

    for name in (app.name, other.name):
        print()
        print(history.render(history.read_history(name, limit=10)))
    print()
    say(f"Prefect UI: {st.prefect_ui_url}  (runs, logs, artifacts). Stop everything with: delivery down")
    if problems:
        say("the demo did not go as described: " + "; ".join(problems))
        return 1
    return 0


def _auto_promotion(app: str, deploy_run: Any, target: str, timeout: float = 300) -> Any:
    """The promotion the verified deploy `deploy_run` started by itself, once it ended (None: none came)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.utilities.asyncutils import run_coro_as_sync

    from tasks.images import image_tags

    p = deploy_run.parameters or {}
    tag = image_tags(p.get("source_ref", ""), p.get("source_sha", ""), "main")[0]

    async def find() -> Any:
        async with get_client() as c:
            runs = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])))
        return next((r for r in runs if (r.parameters or {}).get("app") == app
                     and (r.parameters or {}).get("tag") == tag
                     and (r.parameters or {}).get("to_environment") == target), None)

    deadline = time.monotonic() + 30
    found = run_coro_as_sync(find())
    while found is None and time.monotonic() < deadline:
        time.sleep(0.5)
        found = run_coro_as_sync(find())
    return wait_run(str(found.id), timeout) if found is not None else None


def _promote_and_wait_for_approval(app: str, source: str, target: str, timeout: float = 120) -> Any:
    """Start a promotion as `delivery promote` does; the run once it waits for its approval (or None)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    run = run_deployment("promote/promote", parameters={"app": app, "from_environment": source,
                                                        "to_environment": target, "reason": "the demo"},
                         timeout=0, as_subflow=False)

    async def read() -> Any:
        async with get_client() as c:
            return await c.read_flow_run(run.id)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = run_coro_as_sync(read())
        if current.state is not None and current.state.is_paused():
            return current
        if current.state is not None and current.state.is_final():
            say(f"  the promotion ended {current.state_name}: {current.state.message}")
            return None
        time.sleep(0.5)
    return None


def _version(url: str) -> str:
    """The version the health endpoint names, or "" when it does not answer with one."""
    code, body = fetch_health(url, timeout=5)
    try:
        return str(json.loads(body).get("version", "")) if code else ""
    except (ValueError, AttributeError):
        return ""


def _wait_in_sync(cfg: Any, app: str, environment: str, timeout: float = 90) -> None:
    """Argo CD puts Git's version back in a few seconds; wait for that rather than guess a sleep."""
    from flows.drift import collect_drift

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.result == "in-sync" for r in collect_drift(cfg, [app]) if r.environment == environment):
            return
        time.sleep(1)


def _apis() -> tuple[Any, Any]:
    from kubernetes import client

    from tasks.kube import api_client

    api = api_client()
    return client.CustomObjectsApi(api), client.AppsV1Api(api)


def _inject_drift(env: Any) -> None:
    crd, apps = _apis()
    crd.patch_namespaced_custom_object("argoproj.io", "v1alpha1", env.argocd_namespace, "applications",
                                       env.application, {"spec": {"syncPolicy": {"automated": {"selfHeal": False}}}})
    dep = apps.read_namespaced_deployment(env.deployment, env.namespace)
    image = dep.spec.template.spec.containers[0].image
    repo_part, _, _ = image.rpartition(":")
    bad = f"{repo_part}:hotfix-by-hand"
    apps.patch_namespaced_deployment(env.deployment, env.namespace, {"spec": {"template": {"spec": {
        "containers": [{"name": dep.spec.template.spec.containers[0].name, "image": bad}]}}}})
    say(f"  patched Deployment {env.namespace}/{env.deployment} image {image} → {bad}")


def _restore_self_heal(env: Any) -> None:
    crd, _ = _apis()
    crd.patch_namespaced_custom_object("argoproj.io", "v1alpha1", env.argocd_namespace, "applications",
                                       env.application, {"spec": {"syncPolicy": {"automated": {"selfHeal": True}}}})


if __name__ == "__main__":
    sys.exit(main())
