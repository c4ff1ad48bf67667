"""deployments/serve.py and prefect.yaml declare the same five deployments, with the same heartbeats."""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML

from delivery.settings import PROJECT_ROOT
from deployments.automations import DEPLOYMENTS, HEARTBEAT_SECONDS
from deployments.serve import deployment_specs


def _yaml_deployments() -> dict[str, dict[str, Any]]:
    data = YAML(typ="safe").load((PROJECT_ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in data["deployments"]}


def _serve_deployments() -> dict[str, Any]:
    return {d.name: d for d in deployment_specs()}


def test_same_names_entrypoints_descriptions_and_tags():
    """Both ways of running the flows offer deploy, rollback, drift-check, recover and promote with the same code
    and labels."""
    yaml, served = _yaml_deployments(), _serve_deployments()
    assert sorted(yaml) == sorted(served) == ["deploy", "drift-check", "promote", "recover", "rollback"]
    assert sorted(f"{d.flow_name}/{d.name}" for d in served.values()) == sorted(DEPLOYMENTS.values())
    for name, spec in yaml.items():
        d = served[name]
        assert d.entrypoint == spec["entrypoint"], name
        assert d.description == spec["description"], name
        assert sorted(d.tags) == sorted(spec["tags"]), name


def test_same_schedules():
    """Only drift-check is scheduled, on the same cron and time zone in both."""
    yaml, served = _yaml_deployments(), _serve_deployments()
    for name, spec in yaml.items():
        want = [(s["cron"], s.get("timezone", "UTC")) for s in spec.get("schedules", [])]
        got = [(s.schedule.cron, s.schedule.timezone or "UTC") for s in served[name].schedules]
        assert got == want, name
    assert yaml["drift-check"]["schedules"][0]["cron"] == "*/15 * * * *"


def test_same_concurrency_limits():
    """deploy is capped at the same number of concurrent runs, queued beyond it; the others are not capped."""
    yaml, served = _yaml_deployments(), _serve_deployments()
    for name, spec in yaml.items():
        limit = spec.get("concurrency_limit")
        d = served[name]
        if limit is None:
            assert d.concurrency_limit is None, name
            continue
        assert d.concurrency_limit == limit["limit"], name
        strategy = d.concurrency_options.collision_strategy.value if d.concurrency_options else "ENQUEUE"
        assert strategy == limit.get("collision_strategy", "ENQUEUE"), name
    assert yaml["deploy"]["concurrency_limit"]["limit"] == 25


def test_work_pool_runs_send_heartbeats_as_often_as_served_runs():
    """Every prefect.yaml deployment sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY to the interval serve.py uses."""
    for name, spec in _yaml_deployments().items():
        env = spec["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS), name
