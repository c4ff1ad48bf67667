"""The deploy and rollback flows end to end on the sandbox, with a real Prefect server."""

from __future__ import annotations

import threading
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.config import load_config
from flows.deploy import deploy
from flows.rollback import rollback
from tests.flows.conftest import gitops_log, health

APP, ENV, REF = "workout-api", "dev", "refs/heads/release-dev"
VALUES = "helm/workout-api/values-dev.yaml"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


def _env():
    return load_config().app(APP).environment(ENV)


def _tag(sha: str) -> str:
    return f"release-dev-{sha[:7]}"


def _report(key: str = f"deploy-{APP}-{ENV}") -> str:
    """The newest report artifact under `key`."""
    async def read():
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          sort=ArtifactSort.CREATED_DESC, limit=1)
            return arts[0].data if arts else ""
    return run_coro_as_sync(read())


def _deploy(sha: str, **kw):
    return deploy(app=APP, environment=ENV, source_ref=REF, source_sha=sha, return_state=True, **{**FAST, **kw})


def test_good_deploy_serves_the_new_version_and_reports(stack, source):
    """A good commit ends Completed, its version answers, and the report lists every stage."""
    sha = source.commit("release-dev", note="good deploy")
    state = _deploy(sha)
    assert state.is_completed(), state.message
    status, body = health(_env().health_url)
    assert status == 200 and body["version"] == _tag(sha)
    report = _report()
    for stage in ("checkout", "build", "push", "bump-commit-push", "argocd-sync", "rollout", "health"):
        assert f"| {stage} |" in report
    assert _tag(sha) in report and "completed" in report
    subjects = [s for _, s in gitops_log(str(stack.gitops_remote), source.path.parent, VALUES)]
    assert subjects[0] == f"chore(helm): update image tag to {_tag(sha)}"


def test_same_deploy_twice_makes_one_values_commit(stack, source, tmp_path):
    """Running the same deploy again is idempotent: one values commit, still Completed."""
    sha = source.commit("release-dev", note="idempotent")
    assert _deploy(sha).is_completed()
    first = gitops_log(str(stack.gitops_remote), tmp_path, VALUES)
    assert _deploy(sha).is_completed()
    second = gitops_log(str(stack.gitops_remote), tmp_path, VALUES)
    assert first[0] == second[0]
    assert sum(1 for _, s in second if s.endswith(_tag(sha))) == 1


def test_unhealthy_release_is_rolled_back_automatically(stack, source, tmp_path):
    """A commit whose health check fails ends Failed, rolled back; the previous version answers."""
    good = source.commit("release-dev", note="good before bad")
    assert _deploy(good).is_completed()
    bad = source.commit("release-dev", healthy=False, note="bad health")
    state = _deploy(bad)
    assert state.is_failed()
    assert _tag(bad) in state.message and "rolled back" in state.message and _tag(good) in state.message
    status, body = health(_env().health_url)
    assert status == 200 and body["version"] == _tag(good)
    subjects = [s for _, s in gitops_log(str(stack.gitops_remote), tmp_path, VALUES, n=2)]
    assert subjects == [f"chore(helm): roll back image tag to {_tag(good)}",
                        f"chore(helm): update image tag to {_tag(bad)}"]
    report = _report()
    assert f"`{_tag(good)}`" in report
    # Caught from the new pod's readiness, long before the chart's 600 s progress deadline, and the
    # report names the pod, its container and the reason.
    assert "NeverReady" in report and f"pod {_env().deployment}-" in report and " container " in report


def test_broken_build_changes_nothing_in_git(stack, source, tmp_path):
    """A Dockerfile that fails to build ends Failed at build, with no GitOps commit and no rollback."""
    before = gitops_log(str(stack.gitops_remote), tmp_path, VALUES)
    sha = source.commit("release-dev", dockerfile_run="echo broken-step && exit 3", note="broken build")
    state = _deploy(sha)
    assert state.is_failed()
    assert "build" in state.message.lower() or "broken-step" in state.message
    assert gitops_log(str(stack.gitops_remote), tmp_path, VALUES) == before
    report = _report()
    assert "| build |" in report and "| rollback |" not in report


def test_manual_rollback_to_explicit_tag_and_to_last_known_good(stack, source, tmp_path):
    """Rollback to a given tag, then to the last verified tag, each verified by its health answer."""
    a = source.commit("release-dev", note="rollback A")
    assert _deploy(a).is_completed()
    b = source.commit("release-dev", note="rollback B")
    assert _deploy(b).is_completed()
    state = rollback(app=APP, environment=ENV, to_tag=_tag(a), reason="test explicit", return_state=True, **FAST)
    assert state.is_completed(), state.message
    assert health(_env().health_url)[1]["version"] == _tag(a)
    # Last known-good other than what runs now (a) is b, verified by its deploy.
    state = rollback(app=APP, environment=ENV, reason="test last known good", return_state=True, **FAST)
    assert state.is_completed(), state.message
    assert health(_env().health_url)[1]["version"] == _tag(b)
    subjects = [s for _, s in gitops_log(str(stack.gitops_remote), tmp_path, VALUES, n=2)]
    assert subjects == [f"chore(helm): roll back image tag to {_tag(b)}",
                        f"chore(helm): roll back image tag to {_tag(a)}"]


def test_rollback_refuses_a_tag_missing_from_the_registry(stack, tmp_path):
    """A rollback target whose image is not in the registry is refused before Git is touched."""
    before = gitops_log(str(stack.gitops_remote), tmp_path, VALUES)
    state = rollback(app=APP, environment=ENV, to_tag="release-dev-0000000", reason="test", return_state=True)
    assert state.is_failed() and "not in the registry" in state.message
    assert gitops_log(str(stack.gitops_remote), tmp_path, VALUES) == before


def test_concurrent_deploys_newest_wins(stack, source, tmp_path):
    """Two deploys of one branch started together: the newer commit serves at the end, never the older."""
    older = source.commit("release-dev", note="race older")
    newer = source.commit("release-dev", note="race newer")
    states = {}

    def run(name, sha):
        states[name] = _deploy(sha)

    threads = [threading.Thread(target=run, args=("older", older)),
               threading.Thread(target=run, args=("newer", newer))]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join(600)
    assert states["newer"].is_completed(), states["newer"].message
    assert states["older"].is_completed() or states["older"].is_cancelled()
    assert health(_env().health_url)[1]["version"] == _tag(newer)
    subjects = [s for _, s in gitops_log(str(stack.gitops_remote), tmp_path, VALUES, n=10)]
    assert subjects[0] == f"chore(helm): update image tag to {_tag(newer)}"
    assert sum(1 for s in subjects if s.endswith(_tag(newer))) == 1
    assert sum(1 for s in subjects if s.endswith(_tag(older))) <= 1
