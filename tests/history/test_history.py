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
