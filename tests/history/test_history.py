"""`delivery history`: the rows and DORA figures after a good deploy, a rolled-back deploy and a manual rollback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from delivery import history
from delivery.settings import PROJECT_ROOT
from tests.history.conftest import APP, ENV


def _rows() -> list[history.HistoryRow]:
    return history.read_history(APP, ENV, limit=3)


def test_rows_show_each_run_with_its_result(history_runs):
    """Newest first: the manual rollback, the rolled-back deploy naming the tag it restored, the verified deploy."""
    manual, failed, good = _rows()
    assert (manual.kind, manual.result, manual.tag) == ("rollback", "completed", history_runs.rollback_tag)
    assert (failed.kind, failed.result, failed.tag) == ("deploy", "rolled-back", history_runs.bad_tag)
    assert failed.rolled_back_to == history_runs.good_tag and failed.source == history_runs.bad_sha[:7]
    assert failed.restore_s is not None and failed.restore_s > 0 and failed.lead_time_s is None
    assert (good.kind, good.result, good.tag) == ("deploy", "completed", history_runs.good_tag)
    assert good.lead_time_s is not None and good.lead_time_s > 0 and good.source == history_runs.good_sha[:7]
    assert all((r.app, r.environment) == (APP, ENV) for r in (manual, failed, good))


def test_dora_figures(history_runs):
    """One verified deploy out of two: change failure rate 1/2; lead time and time to restore are measured."""
    d = history.dora(_rows())
    assert d.deployments == 1 and d.per_day > 0
    assert d.change_failure_rate == 0.5
    assert d.median_lead_time_s is not None and d.median_lead_time_s > 0
    assert d.median_time_to_restore_s is not None and d.median_time_to_restore_s > 0


def test_render_prints_the_table_and_the_four_figures(history_runs):
    """The rendered history has a row per run and the four DORA lines with values, not n/a."""
    text = history.render(_rows())
    lines = text.splitlines()
    assert lines[0].split()[:7] == ["when", "kind", "app", "env", "tag", "source", "result"]
    body = lines[2:5]
    assert "rollback" in body[0] and "completed" in body[0] and history_runs.rollback_tag in body[0]
    assert "rolled-back" in body[1] and history_runs.bad_tag in body[1] and history_runs.good_tag in body[1]
    assert "completed" in body[2] and history_runs.good_tag in body[2] and " s " in body[2] + " "
    assert "Deployment frequency: 1 verified deploys" in text
    assert "Change failure rate: 50%" in text
    for label in ("Median lead time", "Median time to restore"):
        line = next(ln for ln in lines if ln.strip().startswith(label))
        assert line.endswith(" s") and "n/a" not in line


def test_cli_prints_the_same_history(history_runs, prefect_api, tmp_path: Path):
    """`delivery history workout-api -e staging -n 3` prints the same table and figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    res = subprocess.run([sys.executable, "-m", "delivery.cli", "history", APP, "-e", ENV, "-n", "3"], env=env,
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == history.render(_rows()).strip()


def test_dora_figures_are_per_app():
    """Two apps' runs in one history give each app its own four figures, never a blend of both."""
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 12, 1, tzinfo=UTC)

    def row(app: str, result: str, minutes: int, lead: float | None) -> history.HistoryRow:
        return history.HistoryRow(when=t0 + timedelta(minutes=minutes), kind="deploy", app=app,
                                  environment="dev", tag=f"{app}-{minutes}", source="abc1234", result=result,
                                  lead_time_s=lead, rolled_back_to="", restore_s=None, run_name="r")

    rows = [row("app-a", "completed", 0, 5.0), row("app-a", "completed", 10, 7.0),
            row("app-b", "rolled-back", 5, None)]
    assert history.dora([r for r in rows if r.app == "app-a"]).change_failure_rate == 0.0
    text = history.render(rows)
    a = text[text.index("DORA figures for app-a"):text.index("DORA figures for app-b")]
    b = text[text.index("DORA figures for app-b"):]
    assert "2 verified deploys" in a and "Change failure rate: 0%" in a and "6.0 s" in a
    assert "0 verified deploys" in b and "Change failure rate: 100%" in b


def _entry(flow: str, params: dict, summary: dict | None, *, minutes: int, state: str = "Completed",
           parent: tuple[str, str] = ("", "")) -> history.RunEntry:
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace
    from uuid import uuid4

    run = SimpleNamespace(id=uuid4(), name=f"{flow}-{minutes}", parameters=params, state_name=state,
                          start_time=datetime(2026, 12, 1, tzinfo=UTC) + timedelta(minutes=minutes),
                          expected_start_time=None)
    return history.RunEntry(run, flow, summary, *parent)


def _summary(result: str, tag: str, **extra) -> dict:
    return {"result": result, "tag": tag, "started_at": 1000.0, "finished_at": 1004.0, "stages": [], **extra}


def test_a_recovered_deploy_shows_once_with_what_its_recovery_made_of_it():
    """The crashed deploy, its recovery and the recovery's re-run of the deploy are one row: completed,
    with the lead time of the re-run, 'recovered by' the recovery run, and one verified deploy in DORA."""
    params = {"app": "workout-api", "environment": "dev", "source_sha": "abcdef123456"}
    crashed = _entry("deploy", params, None, minutes=0, state="Crashed")
    recover = _entry("recover", {"crashed_run_id": str(crashed.run.id)}, _summary("completed", "main-abcdef1"),
                     minutes=2)
    redeploy = _entry("deploy", params, _summary("completed", "main-abcdef1"), minutes=3,
                      parent=(str(recover.run.id), "recover"))
    rows = history.assemble([redeploy, recover, crashed], "workout-api", "dev", 10)
    assert len(rows) == 1, rows
    (row,) = rows
    assert (row.kind, row.result, row.tag, row.run_name) == ("deploy", "completed", "main-abcdef1", "deploy-0")
    assert row.lead_time_s == 4.0 and row.via == f"recovered by {recover.run.name}"
    d = history.dora(rows)
    assert (d.deployments, d.change_failure_rate) == (1, 0.0)


def test_a_recovery_that_crashed_is_followed_to_the_one_that_finished():
    """A recovery that died itself is taken over by another: the deploy's row shows the last one's outcome."""
    params = {"app": "workout-api", "environment": "dev", "source_sha": "abcdef123456"}
    crashed = _entry("deploy", params, None, minutes=0, state="Crashed")
    first = _entry("recover", {"crashed_run_id": str(crashed.run.id)}, None, minutes=1, state="Crashed")
    second = _entry("recover", {"crashed_run_id": str(first.run.id)},
                    _summary("superseded", "main-abcdef1"), minutes=2)
    (row,) = history.assemble([second, first, crashed], None, None, 10)
    assert (row.result, row.via) == ("superseded", f"recovered by {second.run.name}")
    assert history.dora([row]).change_failure_rate is None, "a superseded deploy is not a change"


def test_promotions_are_rows_and_count_as_deploys():
    """A promotion is a row of the target environment, naming its source and approval; a verified one counts
    as a deploy, a rejected or refused one does not."""
    ok = _entry("promote", {"app": "workout-api", "from_environment": "staging", "to_environment": "prod"},
                _summary("completed", "main-abcdef1", promoted_from="staging",
                         approval="approved by ana: looks good", source_sha="abcdef123456"), minutes=5)
    rejected = _entry("promote", {"app": "workout-api", "from_environment": "staging", "to_environment": "prod"},
                      _summary("rejected", "main-abcdef1", promoted_from="staging", approval="rejected by bo"),
                      minutes=4, state="Cancelled")
    dev = _entry("deploy", {"app": "workout-api", "environment": "dev"}, _summary("completed", "main-abcdef1"),
                 minutes=1)
    assert [r.environment for r in history.assemble([ok, rejected, dev], None, "prod", 10)] == ["prod", "prod"]
    rows = history.assemble([ok, rejected, dev], "workout-api", None, 10)
    assert [(r.kind, r.result) for r in rows] == [("promote", "completed"), ("promote", "rejected"),
                                                  ("deploy", "completed")]
    assert rows[0].via == "from staging, approved by ana: looks good" and rows[0].lead_time_s is None
    assert rows[0].source == "abcdef1"
    d = history.dora(rows)
    assert (d.deployments, d.change_failure_rate) == (2, 0.0)
    assert "from staging, approved by ana: looks good" in history.render(rows)
