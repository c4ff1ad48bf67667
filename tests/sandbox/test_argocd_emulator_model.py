"""The Argo CD emulator's pure rules: the desired state of a rendered chart, Argo CD's Deployment
health check, Kubernetes Deployment status, and the status documents, checked against documented
behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.argocd import model
from sandbox.argocd.controller import stable_port
from sandbox.argocd.gitsource import value_files
from sandbox.argocd.workload import has_registry_host, split_image


def _rendered(container: dict, **spec) -> list[dict]:
    return [{"kind": "Service", "metadata": {"name": "web"}},
            {"kind": "Deployment", "metadata": {"name": "web"}, "spec": {**spec, "template": {"spec": {
                "containers": [container]}}}}]


def test_desired_state_is_read_from_the_rendered_deployment() -> None:
    """Image, replicas, port, readiness path and deadline come from the chart's rendered Deployment."""
    d = model.desired_from_manifests(_rendered({"image": "127.0.0.1:5000/app:abc"}))
    assert d == model.Desired(image="127.0.0.1:5000/app:abc", replicas=1, container_port=8000,
                              readiness_path="/api/health/", progress_deadline=600)
    d = model.desired_from_manifests(_rendered(
        {"image": "r:1.5", "ports": [{"containerPort": 9000}], "readinessProbe": {"httpGet": {"path": "/ready"}}},
        replicas=3, progressDeadlineSeconds=30))
    assert (d.image, d.replicas, d.container_port, d.readiness_path, d.progress_deadline) == (
        "r:1.5", 3, 9000, "/ready", 30)


@pytest.mark.parametrize("docs", [[], [{"kind": "Service"}], _rendered({"image": "r:"}), _rendered({}),
                                  _rendered({"image": "r:t"}) + _rendered({"image": "r:t"})[1:]])
def test_no_runnable_deployment_is_a_comparison_error(docs: list) -> None:
    """No Deployment, two of them, or one without a full image reference: nothing to compare."""
    with pytest.raises(model.ComparisonError, match="Deployment"):
        model.desired_from_manifests(docs)


def _deployment(*, generation: int = 2, observed: int = 2, replicas: int = 2, status: dict | None = None) -> dict:
    return {"metadata": {"name": "web", "generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, **(status or {})}}


@pytest.mark.parametrize(("deployment", "expected"), [
    (None, {"status": "Missing"}),
    (_deployment(generation=3, observed=2),
     {"status": "Progressing",
      "message": "Waiting for rollout to finish: observed deployment generation less than desired generation"}),
    (_deployment(status={"replicas": 3, "updatedReplicas": 1, "availableReplicas": 2}),
     {"status": "Progressing",
      "message": "Waiting for rollout to finish: 1 out of 2 new replicas have been updated..."}),
    (_deployment(status={"replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}),
     {"status": "Progressing", "message": "Waiting for rollout to finish: 1 old replicas are pending termination..."}),
    (_deployment(status={"replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}),
     {"status": "Progressing", "message": "Waiting for rollout to finish: 1 of 2 updated replicas are available..."}),
    (_deployment(status={"replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}), {"status": "Healthy"}),
    (_deployment(status={"replicas": 3, "updatedReplicas": 1, "availableReplicas": 2, "conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}),
     {"status": "Degraded", "message": 'Deployment "web" exceeded its progress deadline'}),
])
def test_deployment_health_follows_argo_cd(deployment: dict | None, expected: dict) -> None:
    """Argo CD's Deployment health check, case by case (as `kubectl rollout status` words it)."""
    assert model.deployment_health(deployment) == expected


def test_deployment_status_through_a_rollout() -> None:
    """Counts and conditions a 2-replica Deployment shows while rolling, when done, and when stuck."""
    rolling = model.deployment_status(phase=model.ROLLING, replicas=2, observed_generation=4, new_rs="web-abc",
                                      old_ready=True, ts="2024-01-01T00:00:00Z")
    assert {k: v for k, v in rolling.items() if k != "conditions"} == {
        "observedGeneration": 4, "replicas": 3, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2,
        "unavailableReplicas": 1}
    conds = {c["type"]: c for c in rolling["conditions"]}
    assert (conds["Available"]["status"], conds["Available"]["reason"]) == ("True", "MinimumReplicasAvailable")
    assert (conds["Progressing"]["status"], conds["Progressing"]["reason"]) == ("True", "ReplicaSetUpdated")
    assert conds["Progressing"]["message"] == 'ReplicaSet "web-abc" is progressing.'

    done = model.deployment_status(phase=model.STEADY, replicas=2, observed_generation=4, new_rs="web-abc",
                                   old_ready=False, previous=rolling, ts="2024-01-01T00:00:05Z")
    assert {k: v for k, v in done.items() if k != "conditions"} == {
        "observedGeneration": 4, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}
    conds = {c["type"]: c for c in done["conditions"]}
    assert conds["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert conds["Progressing"]["message"] == 'ReplicaSet "web-abc" has successfully progressed.'
    # Available did not change status: its transition time stays.
    assert conds["Available"]["lastTransitionTime"] == "2024-01-01T00:00:00Z"
    assert model.deployment_health({"metadata": {"name": "web", "generation": 4}, "spec": {"replicas": 2},
                                    "status": done}) == {"status": "Healthy"}

    stuck = model.deployment_status(phase=model.FAILED, replicas=1, observed_generation=2, new_rs="web-def",
                                    old_ready=False)
    conds = {c["type"]: c for c in stuck["conditions"]}
    assert (conds["Progressing"]["status"], conds["Progressing"]["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert (conds["Available"]["status"], conds["Available"]["reason"]) == ("False", "MinimumReplicasUnavailable")
    assert "availableReplicas" not in stuck  # zero counts are omitted, as the API server does


def test_app_health_is_status_and_transition_time_without_a_message() -> None:
    """As Argo CD 3.x writes it (tests/data/captures): no message (the pod's reason is on the Pod), and
    lastTransitionTime kept while the status stays, moved when it changes."""
    dep = _deployment(status={"conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]})
    assert model.app_health(dep, None, ts="T1") == {"status": "Degraded", "lastTransitionTime": "T1"}
    assert model.app_health(dep, {"status": "Degraded", "lastTransitionTime": "T0"}, ts="T1") == {
        "status": "Degraded", "lastTransitionTime": "T0"}
    assert model.app_health(None, {"status": "Degraded", "lastTransitionTime": "T0"}, ts="T1") == {
        "status": "Missing", "lastTransitionTime": "T1"}


def test_history_keeps_ten_entries_with_increasing_ids() -> None:
    """status.history is capped at 10 and ids keep counting up."""
    history: list = []
    for i in range(12):
        history = model.append_history(history, revision=f"{i:040d}", source={"path": "c"}, started="s",
                                       deployed="d")
    assert len(history) == 10
    assert [h["id"] for h in history] == list(range(2, 12))
    assert history[-1]["revision"] == f"{11:040d}"


def test_comparison_condition_is_set_kept_and_cleared() -> None:
    """ComparisonError appears with a timestamp, keeps it while unchanged, and goes when fixed."""
    other = {"type": "SyncError", "message": "x"}
    conds = model.comparison_conditions([other], "bad values", ts="t1")
    assert conds == [other, {"type": "ComparisonError", "message": "bad values", "lastTransitionTime": "t1"}]
    assert model.comparison_conditions(conds, "bad values", ts="t2")[-1]["lastTransitionTime"] == "t1"
    assert model.comparison_conditions(conds, None) == [other]


def test_auto_sync_skips_a_revision_already_attempted() -> None:
    """Argo CD's alreadyAttemptedSync: the last operation's syncResult.revision decides."""
    app = {"status": {"operationState": {"phase": "Failed", "syncResult": {"revision": "a" * 40}}}}
    assert model.already_attempted(app, "a" * 40) == (True, "Failed")
    assert model.already_attempted(app, "b" * 40) == (False, None)
    assert model.automated({"spec": {"syncPolicy": {"automated": {}}}}) == {}
    assert model.automated({"spec": {"syncPolicy": {}}}) is None


def test_compare_ignores_replicas_when_the_app_says_so() -> None:
    """ignoreDifferences on /spec/replicas (an HPA owns it) keeps a scaled Deployment Synced."""
    d = model.Desired("r:t", 2, 8000, "/api/health/", 600)
    live = model.deployment_manifest("app", "web", "ns", d, release="web")
    live["spec"]["replicas"] = 5
    app = {"spec": {"ignoreDifferences": [{"group": "apps", "kind": "Deployment", "jsonPointers": ["/spec/replicas"]}]}}
    assert model.compare(d, live) == "OutOfSync"
    assert model.compare(d, live, ignore_replicas=model.ignores_replicas(app)) == "Synced"
    assert model.compare(d, None) == "OutOfSync"


def test_small_helpers() -> None:
    """Image references, value file order and the stable port fallback."""
    assert split_image("127.0.0.1:5000/app:1.0") == ("127.0.0.1:5000/app", "1.0")
    assert split_image("127.0.0.1:5000/app") == ("127.0.0.1:5000/app", "latest")
    assert has_registry_host("127.0.0.1:5000/app:1") and not has_registry_host("local/busybox:stable")
    assert value_files({"helm": {"valueFiles": ["values.yaml", "values-dev.yaml"]}}) == ["values.yaml",
                                                                                         "values-dev.yaml"]
    assert value_files({}) == ["values.yaml"]
    assert 20000 <= stable_port("workout-api-dev") < 30000
    assert stable_port("workout-api-dev") == stable_port("workout-api-dev")


def _git(*args: str, cwd) -> str:
    import os
    import subprocess

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_git_source_resolves_revisions_and_renders_the_chart_at_a_commit(tmp_path) -> None:
    """Branch, tag, HEAD and short SHA resolve to full SHAs; the chart is rendered at that commit with
    `helm template` and the value files in order; a chart that does not render is a ComparisonError."""
    import shutil

    from sandbox.argocd.gitsource import GitSource, render

    remote = tmp_path / "r.git"
    _git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    work = tmp_path / "w"
    _git("clone", "-q", str(remote), str(work), cwd=tmp_path)
    shutil.copytree(Path(__file__).with_name("chart_fixture"), work / "chart")
    (work / "chart" / "values.yaml").write_text('image:\n  repository: r\n  tag: "1"\nreplicaCount: 2\n')
    (work / "chart" / "values-dev.yaml").write_text('image:\n  tag: "dev"\n')
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", "one", cwd=work)
    _git("tag", "-a", "v1", "-m", "v1", cwd=work)
    first = _git("rev-parse", "HEAD", cwd=work)
    (work / "chart" / "values.yaml").write_text("image: [broken\n")
    _git("commit", "-q", "-am", "two", cwd=work)
    second = _git("rev-parse", "HEAD", cwd=work)
    _git("push", "-q", "--tags", "origin", "HEAD:main", cwd=work)

    git = GitSource(tmp_path / "cache")
    url = f"file://{remote}"
    assert git.resolve(url, "main") == second
    assert git.resolve(url, "HEAD") == second
    assert git.resolve(url, "v1") == first  # the annotated tag's commit, not the tag object
    assert git.resolve(url, first[:10]) == first
    assert git.resolve(url, first) == first
    with pytest.raises(model.ComparisonError, match="unable to resolve"):
        git.resolve(url, "no-such-branch")

    source = {"repoURL": url, "path": "chart", "helm": {"valueFiles": ["values-dev.yaml"]}}
    d = render(git, source, first, release="web", namespace="ns")
    assert (d.image, d.replicas) == ("r:dev", 2)
    with pytest.raises(model.ComparisonError, match="helm template web . --namespace ns .* failed"):
        render(git, source, second, release="web", namespace="ns")
    with pytest.raises(model.ComparisonError, match="values-prod.yaml"):
        render(git, {**source, "helm": {"valueFiles": ["values-prod.yaml"]}}, first, release="web", namespace="ns")
    with pytest.raises(model.ComparisonError, match="not a Helm chart"):
        render(git, {**source, "path": "nowhere"}, first, release="web", namespace="ns")
    with pytest.raises(model.ComparisonError):
        git.resolve(str(tmp_path / "missing.git"), "main")
