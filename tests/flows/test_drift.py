"""The drift check on the sandbox: clean, drift behind Argo CD's back, a missing image, a committed secret."""

from __future__ import annotations

import dataclasses
import re
import threading
import time

import git
from kubernetes import client

from delivery.config import load_config
from flows.common import work_dir
from flows.drift import collect_drift, drift_check
from tasks import argocd
from tasks.kube import api_client

APP = "workout-api"


def _rows():
    return {r.environment: r for r in collect_drift(load_config(), [APP])}


def _wait_rows(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    rows = _rows()
    while not pred(rows) and time.monotonic() < deadline:
        time.sleep(1)
        rows = _rows()
    return rows


def _settle(env, remote: str, timeout: float = 60.0) -> None:
    """Let Argo CD compare the current Git head first, as its poll eventually would; a new revision
    would otherwise trigger an automated sync that undoes hand-made drift even without self-heal."""
    head = git.cmd.Git().ls_remote(remote, "refs/heads/main").split()[0]
    argocd.request_refresh(env.application, namespace=env.argocd_namespace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = argocd.application_status(env.application, namespace=env.argocd_namespace)
        if st.sync_revision == head and st.health_status == "Healthy" and st.operation_phase != "Running":
            return
        time.sleep(0.5)
    raise AssertionError(f"{env.application} did not settle at {head[:12]}")


def _gitops_commit(remote: str, tmp, edits: dict[str, str | None], message: str) -> None:
    path = tmp / "gitops-edit"
    repo = git.Repo(path) if path.exists() else git.Repo.clone_from(remote, path, branch="main")
    repo.remotes.origin.fetch()
    repo.git.reset("--hard", "origin/main")
    for rel, text in edits.items():
        if text is None:
            repo.index.remove([rel], working_tree=True)
        else:
            (path / rel).write_text(text)
            repo.index.add([rel])
    actor = git.Actor("someone", "someone@example.com")
    repo.index.commit(message, author=actor, committer=actor)
    repo.remotes.origin.push("main:main")


def test_clean_sandbox_is_in_sync(stack):
    """Right after start-up every environment is in sync."""
    rows = _wait_rows(lambda r: all(x.result == "in-sync" for x in r.values()))
    assert {e: r.result for e, r in rows.items()} == {e: "in-sync" for e in rows}, [r.details for r in rows.values()]


def test_image_changed_behind_argocd_is_drifted_then_healed(stack):
    """With self-heal off, a hand-patched image is `drifted`; heal=True brings Git's version back."""
    env = load_config().app(APP).environment("staging")
    _settle(env, str(stack.gitops_remote))
    crd, apps = client.CustomObjectsApi(api_client()), client.AppsV1Api(api_client())
    crd.patch_namespaced_custom_object("argoproj.io", "v1alpha1", env.argocd_namespace, "applications",
                                       env.application, {"spec": {"syncPolicy": {"automated": {"selfHeal": False}}}})
    try:
        dep = apps.read_namespaced_deployment(env.deployment, env.namespace)
        c0 = dep.spec.template.spec.containers[0]
        patch = {"spec": {"template": {"spec": {
            "containers": [{"name": c0.name, "image": c0.image.rsplit(":", 1)[0] + ":hand-patched"}]}}}}
        # Argo CD learns of the self-heal change through its watch; on a loaded machine a patch that
        # lands first is still healed. Patch again until the drift stays, as an operator would.
        for _ in range(4):
            apps.patch_namespaced_deployment(env.deployment, env.namespace, patch)
            rows = _wait_rows(lambda r: r["staging"].result == "drifted", timeout=10)
            if rows["staging"].result == "drifted":
                break
        assert rows["staging"].result == "drifted"
        assert "hand-patched" in rows["staging"].live_image
        assert rows["dev"].result != "drifted"
        state = drift_check(apps=[APP], return_state=True)
        assert state.is_failed() and "staging: drifted" in state.message
        drift_check(apps=[APP], heal=True, return_state=True)
        rows = _wait_rows(lambda r: r["staging"].result == "in-sync", timeout=60)
        assert rows["staging"].result == "in-sync", rows["staging"].details
    finally:
        crd.patch_namespaced_custom_object("argoproj.io", "v1alpha1", env.argocd_namespace, "applications",
                                           env.application, {"spec": {"syncPolicy": {"automated": {"selfHeal": True}}}})


def test_values_tag_without_image_is_missing_image(stack, tmp_path):
    """A tag committed to Git whose image is not in the registry is reported `missing-image`."""
    app = load_config().app(APP)
    path = app.values_path("prod")
    git.Repo.clone_from(str(stack.gitops_remote), tmp_path / "read", branch="main")
    text = (tmp_path / "read" / path).read_text()
    broken = re.sub(r'(\n\s+tag: )"[^"]*"', r'\1"no-such-image-0000000"', text, count=1)
    _gitops_commit(str(stack.gitops_remote), tmp_path, {path: broken}, "test: tag without image")
    try:
        rows = _rows()
        assert rows["prod"].result == "missing-image"
        assert any("no-such-image-0000000" in d for d in rows["prod"].details)
    finally:
        _gitops_commit(str(stack.gitops_remote), tmp_path, {path: text}, "test: restore prod tag")


def test_committed_plaintext_secret_is_flagged_without_its_value(stack, tmp_path, capsys):
    """A plaintext password committed to the chart is `secret-in-git`, naming the file, never the value."""
    rel = "helm/workout-api/values-leak.yaml"
    leak = "database:\n  password: hunter2\n"  # secret-scan: allow (the planted leak this test must find)
    _gitops_commit(str(stack.gitops_remote), tmp_path, {rel: leak}, "test: leak")
    try:
        rows = _rows()
        assert all(r.result == "secret-in-git" for r in rows.values())
        assert any("values-leak.yaml" in d and "password" in d for d in rows["dev"].details)
        state = drift_check(apps=[APP], return_state=True)
        assert state.is_failed()
        assert "hunter2" not in state.message
        assert all("hunter2" not in " ".join(r.details) for r in rows.values())
        assert "hunter2" not in capsys.readouterr().out
    finally:
        _gitops_commit(str(stack.gitops_remote), tmp_path, {rel: None}, "test: remove leak")


def test_heal_with_a_missing_application_still_checks_the_other_apps(stack):
    """`heal` on an app whose Application does not exist records why that heal failed and goes on:
    the other app's environments are still read and reported."""
    cfg = load_config()
    real = cfg.app(APP)
    ghost_env = dataclasses.replace(real.environment("dev"), application="ghost-api-dev")
    ghost = dataclasses.replace(real, name="ghost-api", environments={"dev": ghost_env})
    cfg = dataclasses.replace(cfg, apps={"ghost-api": ghost, APP: real})
    rows = collect_drift(cfg, ["ghost-api", APP], heal=True)
    by = {(r.app, r.environment): r for r in rows}
    g = by[("ghost-api", "dev")]
    assert g.result == "out-of-sync"
    assert any("ghost-api-dev" in d and "not found" in d for d in g.details), g.details
    assert any(d.startswith("heal failed:") and "ghost-api-dev" in d for d in g.details), g.details
    assert {e for a, e in by if a == APP} == {"dev", "staging", "prod"}
    assert all(by[(APP, e)].result == "in-sync" for e in ("dev", "staging", "prod")), rows


def test_two_drift_runs_at_once_do_not_share_a_work_tree(stack):
    """Two checks at the same moment (a schedule and a click) each read a clone of their own, both
    complete, and neither leaves its clone behind."""
    cfg = load_config()
    results: list[list] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(collect_drift(cfg, [APP]))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(results) == 2
    for rows in results:
        assert sorted(r.environment for r in rows) == ["dev", "prod", "staging"]
        assert all(r.result == "in-sync" for r in rows), rows
    assert list(work_dir("drift").iterdir()) == []
