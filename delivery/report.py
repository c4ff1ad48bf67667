"""The run report: each stage with its duration and outcome, rendered as a Prefect markdown
artifact. A machine-readable copy rides along in an HTML comment (invisible in the UI) so that
`delivery history` can compute lead times from the same artifact people read."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

SUMMARY_MARKER = "delivery-summary"


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    outcome: str = "ok"  # ok | failed | skipped
    detail: str = ""


@dataclass
class Report:
    kind: str  # deploy | rollback | promote
    app: str
    environment: str
    tag: str = ""
    source_ref: str = ""
    source_sha: str = ""
    digest: str = ""
    values_commit: str = ""
    previous_tag: str = ""
    health_url: str = ""
    flow_run_id: str = ""
    received_at: str = ""
    started_at: float = field(default_factory=time.time)
    stages: list[Stage] = field(default_factory=list)
    argocd: str = ""
    health_answer: str = ""
    # completed | failed | superseded | rolled-back; a promotion also: refused | rejected | waiting-for-approval
    result: str = "running"
    reason: str = ""
    rolled_back_to: str = ""
    serving: str = ""
    finished_at: float = 0.0
    # What the run found at its end, read back from Git, the Deployment and the Application.
    git_names: str = ""
    cluster_runs: str = ""
    argocd_final: str = ""
    # A promotion: the environment whose verified image this is, when it was verified there and the
    # report of that verification; who approved or rejected it (when approval is required) and why.
    promoted_from: str = ""
    source_verified_at: str = ""
    source_report_url: str = ""
    approval: str = ""
    approved_by: str = ""
    approval_comment: str = ""
    # The promotions this run's verified release started by itself (`auto: true`), with their links.
    promotions: list[str] = field(default_factory=list)
    # What went wrong on the side (GitHub feedback not sent, say) without failing the run.
    notes: list[str] = field(default_factory=list)

    # Listeners (GitHub feedback) are told when a stage starts and ends and when the run finishes:
    # listener(event, name, outcome, detail) with event "stage-start" | "stage-end" | "finish". Kept
    # outside the dataclass fields so that `summary()` (the run's result) never carries them.
    def listen(self, listener: Callable[..., None]) -> None:
        self.__dict__.setdefault("_listeners", []).append(listener)

    @property
    def listeners(self) -> list[Callable[..., None]]:
        return list(self.__dict__.get("_listeners", []))

    def _tell(self, *event: str) -> None:
        for listener in self.listeners:
            try:
                listener(*event)
            except Exception as e:  # noqa: BLE001 - a listener's trouble is a note, never the run's failure
                self.notes.append(f"{type(listener).__name__} failed on {event[0]} {event[1]}: "
                                  f"{type(e).__name__}: {e}")

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        st = Stage(name)
        self.stages.append(st)
        self._tell("stage-start", name)
        t0 = time.monotonic()
        try:
            yield st
        except BaseException as e:
            st.outcome = "failed"
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            st.detail = st.detail or msg
            raise
        finally:
            st.seconds = round(time.monotonic() - t0, 3)
            self._tell("stage-end", name, st.outcome, st.detail)

    @property
    def failed_stage(self) -> str:
        """The stage the run failed in; the first one, since later stages (a rollback) follow from it."""
        return next((s.name for s in self.stages if s.outcome == "failed"), "")

    def finish(self, result: str, reason: str = "") -> None:
        self.result = result
        self.reason = reason
        self.finished_at = time.time()
        self._tell("finish", result, "", reason)

    def _promoted_from(self) -> str:
        if not self.promoted_from:
            return ""
        text = f"{self.promoted_from}, verified there at {self.source_verified_at or '?'}"
        return f"{text} ([report]({self.source_report_url}))" if self.source_report_url else text

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "failed_stage": self.failed_stage}

    def markdown(self) -> str:
        title = f"{self.kind.capitalize()} {self.app} → {self.environment}: **{self.result}**"
        lines = [f"# {title}", ""]
        if self.reason:
            lines += [f"> {self.reason}", ""]
        rows = [
            ("Source", "" if not self.source_sha else
             f"`{self.source_ref}` @ `{self.source_sha}`" if self.source_ref else f"`{self.source_sha}`"),
            ("Image tag", f"`{self.tag}`"),
            ("Image digest", f"`{self.digest}`" if self.digest else ""),
            ("Promoted from", self._promoted_from()),
            ("Approval", self.approval.replace("|", "\\|").replace("\n", " ")),
            ("Promotions started", "; ".join(self.promotions)),
            ("Values commit", f"`{self.values_commit}`" if self.values_commit else ""),
            ("Previous tag", f"`{self.previous_tag}`" if self.previous_tag else ""),
            ("Argo CD", self.argocd),
            ("Health answer", f"`{self.health_answer}`" if self.health_answer else ""),
            ("Rolled back to", f"`{self.rolled_back_to}`" if self.rolled_back_to else ""),
            ("Now serving", f"`{self.serving}`" if self.serving else ""),
            ("Failed stage", self.failed_stage if self.result not in ("completed", "superseded") else ""),
            ("Git names now", f"`{self.git_names}`" if self.git_names else ""),
            ("Cluster runs now", f"`{self.cluster_runs}`" if self.cluster_runs else ""),
            ("Argo CD now", self.argocd_final),
        ]
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v]
        lines += ["", "## Stages", "", "| stage | seconds | outcome | detail |", "|---|---:|---|---|"]
        for s in self.stages:
            detail = s.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {s.name} | {s.seconds:.2f} | {s.outcome} | {detail} |")
        total = (self.finished_at or time.time()) - self.started_at
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        lines += ["", f"Total: {total:.1f} s", "", f"<!-- {SUMMARY_MARKER} {json.dumps(self.summary())} -->"]
        return "\n".join(lines)


def parse_summary(markdown: str) -> dict[str, Any] | None:
    """The machine-readable summary embedded by `Report.markdown`, or None."""
    start = markdown.rfind(f"<!-- {SUMMARY_MARKER} ")
    if start < 0:
        return None
    body = markdown[start + len(SUMMARY_MARKER) + 6:]
    end = body.rfind(" -->")
    try:
        return json.loads(body[:end])
    except (ValueError, TypeError):
        return None
