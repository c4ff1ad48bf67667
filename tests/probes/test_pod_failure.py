"""The fail-fast verdict on the new ReplicaSet's pods, on status documents shaped as the kubelet
writes them (see tests/real for the same reasons read from a real kubelet)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tasks.probes import NEVER_READY, new_replica_set, pod_failure

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name: str, *statuses: dict[str, Any], phase: str = "Running", deleting: bool = False,
        init: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = ts(1)
    status: dict[str, Any] = {"phase": phase, "containerStatuses": list(statuses)}
    if init:
        status["initContainerStatuses"] = list(init)
    return {"metadata": meta, "status": status}


def waiting(reason: str, message: str = "", *, restarts: int = 0, exit_code: int | None = None,
            name: str = "app") -> dict[str, Any]:
    cs: dict[str, Any] = {"name": name, "ready": False, "restartCount": restarts,
                          "state": {"waiting": {"reason": reason, "message": message}}}
    if exit_code is not None:
        cs["lastState"] = {"terminated": {"exitCode": exit_code, "reason": "Error"}}
    return cs


def running(seconds_ago: float, *, ready: bool, name: str = "app") -> dict[str, Any]:
    return {"name": name, "ready": ready, "restartCount": 0, "state": {"running": {"startedAt": ts(seconds_ago)}}}


def test_crash_loop_fails_at_once_naming_pod_container_reason_and_exit_code() -> None:
    pods = [pod("api-7f-abc", waiting("CrashLoopBackOff", "back-off 10s restarting failed container=app",
                                      restarts=2, exit_code=3))]
    f = pod_failure(pods, now=NOW, readiness_grace=60)
    assert f is not None
    assert (f.pod, f.container, f.reason) == ("api-7f-abc", "app", "CrashLoopBackOff")
    assert "last exit code 3 (Error)" in f.message and "2 restarts" in f.message
    assert str(f).startswith("pod api-7f-abc container app: CrashLoopBackOff: back-off 10s")


def test_every_kubelet_give_up_reason_fails() -> None:
    for reason in ("ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"):
        f = pod_failure([pod("p", waiting(reason, "x"))], now=NOW, readiness_grace=60)
        assert f is not None and f.reason == reason


def test_starting_containers_do_not_fail() -> None:
    pods = [pod("p1", waiting("ContainerCreating"), phase="Pending"), pod("p2", running(5, ready=False)),
            pod("p3", running(500, ready=True))]
    assert pod_failure(pods, now=NOW, readiness_grace=60) is None


def test_readiness_failing_past_the_grace_fails_as_never_ready() -> None:
    assert pod_failure([pod("p", running(59, ready=False))], now=NOW, readiness_grace=60) is None
    f = pod_failure([pod("p", running(61, ready=False))], now=NOW, readiness_grace=60)
    assert f is not None and f.reason == NEVER_READY and "running for 61 s" in f.message


def test_init_containers_and_failed_pods_count_and_deleting_pods_do_not() -> None:
    f = pod_failure([pod("p", init=(waiting("CrashLoopBackOff", name="migrate"),))], now=NOW, readiness_grace=60)
    assert f is not None and f.container == "migrate"
    failed = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted", "message": "disk"}}
    f = pod_failure([failed], now=NOW, readiness_grace=60)
    assert f is not None and (f.reason, f.message) == ("Evicted", "disk")
    assert pod_failure([pod("p", waiting("CrashLoopBackOff"), deleting=True)], now=NOW, readiness_grace=60) is None


def deployment(generation: int = 2, observed: int = 2, revision: str = "3") -> dict[str, Any]:
    return {"metadata": {"name": "api", "uid": "d-1", "generation": generation,
                         "annotations": {"deployment.kubernetes.io/revision": revision}},
            "status": {"observedGeneration": observed}}


def replica_set(name: str, revision: str, owner: str = "d-1") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"rs-{name}", "ownerReferences": [{"uid": owner}],
                         "annotations": {"deployment.kubernetes.io/revision": revision}}}


def test_the_new_replica_set_is_the_owned_one_at_the_deployments_revision() -> None:
    sets = [replica_set("api-old", "2"), replica_set("other", "3", owner="d-9"), replica_set("api-new", "3")]
    rs = new_replica_set(deployment(), sets)
    assert rs is not None and rs["metadata"]["name"] == "api-new"


def test_no_new_replica_set_before_the_controller_observed_the_generation() -> None:
    """Right after a rollback is applied the revision annotation still names the failed rollout's set."""
    assert new_replica_set(deployment(generation=3, observed=2), [replica_set("api-new", "3")]) is None
