"""GitHub deploy feedback driven by a run's `Report`: each stage the report records becomes a commit
status on the source commit, the run a GitHub Deployment, the report's result the final statuses.

The flows attach it once (`attach`) and need no other call: the report tells it when a stage starts
and ends and when the run finishes, and what GitHub refused or could not take lands in the report's
notes before the report is published. GitHub being down or refusing never fails a run (tasks/github.py)."""

from __future__ import annotations

from typing import Any

from delivery.config import App
from delivery.report import Report
from tasks import github

# The report's stage names that GitHub shows, as GitHub's contexts (`delivery/<name>`).
STAGE_CONTEXTS = {
    "build": "build",
    "push": "push",
    "bump-commit-push": "commit",
    "argocd-sync": "argocd-sync",
    "rollout": "rollout",
    "health": "health",
}
_SUCCESS = {"ok": "success", "skipped": "success", "failed": "failure"}


class ReportFeedback:
    """Turns a report's stage and finish events into GitHub feedback."""

    def __init__(self, report: Report, feedback: github.DeployFeedback) -> None:
        self.report = report
        self.feedback = feedback

    @property
    def deployment_id(self) -> int | None:
        return self.feedback.deployment_id

    def __call__(self, event: str, name: str, outcome: str = "", detail: str = "") -> None:
        fb = self.feedback
        if event == "stage-start":
            if name in STAGE_CONTEXTS:
                fb.stage(STAGE_CONTEXTS[name], "pending")
        elif event == "stage-end":
            if name == "lock-wait" and outcome == "ok":
                fb.begin()
            elif name in STAGE_CONTEXTS:
                fb.stage(STAGE_CONTEXTS[name], _SUCCESS.get(outcome, "error"), detail)
        elif event == "finish":
            if name == "superseded":
                fb.cancel(detail)
            else:
                fb.finish(name == "completed", detail)
            self.report.notes.extend(n for n in fb.notes if n not in self.report.notes)


def attach(report: Report, app: App, *, run_url: str | None, kind: str | None = None,
           sha: str | None = None, bad_deployment_id: int | None = None, bad_tag: str | None = None,
           reason: str = "") -> ReportFeedback:
    """Start GitHub feedback for the run `report` describes and keep it up to date from the report.
    A rollback gets a Deployment of its own (for the good release's commit, found from that tag's
    earlier Deployment when `sha` is not given) and marks the bad deploy's Deployment failed."""
    kind = kind or report.kind
    if kind == "rollback":
        fb = github.rollback_feedback(app=app, environment=report.environment, to_tag=report.tag, sha=sha,
                                      run_url=run_url, health_url=report.health_url,
                                      bad_deployment_id=bad_deployment_id, bad_tag=bad_tag, reason=reason)
    else:
        fb = github.DeployFeedback.start(app=app, environment=report.environment, sha=sha or report.source_sha,
                                         tag=report.tag, run_url=run_url, health_url=report.health_url, kind=kind)
    listener = ReportFeedback(report, fb)
    report.listen(listener)
    return listener


def feedback_of(report: Report) -> Any:
    """The run's GitHub Deployment id, if it has one (an automatic rollback marks it failed)."""
    for listener in report.listeners:
        if isinstance(listener, ReportFeedback):
            return listener.deployment_id
    return None
