"""Time to restore on the stack (dev): a bad release that rolls back on its own, and a manual rollback.

    .venv/bin/python bench/bench_restore.py [--failed N] [--manual N] [--fault crash|unhealthy] [--real]

1. Failed deploy: a source commit that crashes on start (`--fault crash`, the default: CRASH_ON_START)
   or never passes readiness (`--fault unhealthy`: HEALTHY=false) goes through the webhook. The deploy
   catches it from the new pod (CrashLoopBackOff within seconds; readiness failing past
   readiness_grace_seconds), not from the Deployment's 600 s progress deadline, rolls back to the last
   verified tag as a new commit and verifies it. Reported: detection (the failed argocd-sync stage),
   the rollback stage from the run's report, and the time to restore from the bad commit, watching
   from outside: the Application first at the bad values commit → the previous version verified
   again (Synced+Healthy at the rollback commit and answering on its health URL), and → the run's
   end. Downtime is what a health poll every 50 ms saw not answering 200.
2. Manual rollback: `run_deployment("rollback/rollback", ...)` (what the UI and the CLI do) → the
   run Completed, and from outside → the target version answering.
The seed's "git revert + wait for the poll" is measured by bench_old_way.py on staging.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import common
from common import (
    Ctx,
    HealthWatcher,
    fmt,
    health,
    push_and_deliver,
    report_of,
    save,
    say,
    settings_text,
    source_repo,
    stage_seconds,
    summarize,
    ts,
    wait_final,
)

ENV = "dev"


class AppWatcher(threading.Thread):
    """Every change of the Application's (sync revision, sync status, health, operation phase), timed."""

    def __init__(self, ctx: Ctx, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.ctx, self.interval = ctx, interval
        self.changes: list[tuple[float, str, str, str, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        from tasks.argocd import get_application
        from tasks.argocd import summarize as app_summary

        env = self.ctx.env(ENV)
        last = None
        while not self._halt.is_set():
            try:
                s = app_summary(get_application(env.application, namespace=env.argocd_namespace))
                key = (s.sync_revision or "", s.sync_status, s.health_status, s.operation_phase or "")
                if key != last:
                    self.changes.append((time.time(), *key))
                    last = key
            except Exception:  # noqa: BLE001 - a missed sample only coarsens the timing
                pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def failed_deploy_once(ctx: Ctx, repo: Any, label: str, fault: str = "crash") -> dict[str, Any]:
    env = ctx.env(ENV)
    branch = env.branches[0]
    code, prev = health(env.health_url)
    hw, aw = HealthWatcher(env.health_url, interval=0.05), AppWatcher(ctx)
    hw.start()
    aw.start()
    try:
        text = settings_text(healthy=fault != "unhealthy", marker=f"bench restore {label}")
        if fault == "crash":
            text = text.replace("CRASH_ON_START=false", "CRASH_ON_START=true")
            if "CRASH_ON_START=true" not in text:
                text = text.rstrip("\n") + "\nCRASH_ON_START=true\n"
        pushed = push_and_deliver(ctx, repo, branch, text, f"fix: bench broken release {label} ({fault})")
        run = wait_final(pushed["run_id"], 300)
        time.sleep(0.3)
    finally:
        hw.stop()
        aw.stop()
    report = report_of(pushed["run_id"]) or {}
    bad_commit = report.get("values_commit", "")
    # The bad commit is live in Argo CD from the first status naming it (the refresh makes that at once).
    t_bad = next((t for t, rev, _s, _h, _p in aw.changes if rev == bad_commit), None)
    t_restored = None
    if t_bad is not None:
        t_restored = next((t for t, rev, s, h, p in aw.changes if t > t_bad and rev and rev != bad_commit
                           and s == "Synced" and h == "Healthy" and p in ("Succeeded", "")), None)
    # Verified from outside also means the previous version answering at that moment.
    restored_tag = report.get("serving") or report.get("rolled_back_to", "")
    answering = hw.first_seen.get(restored_tag)
    if t_restored is not None and answering is not None:
        t_restored = max(t_restored, answering)
    row = {
        "run": run.name, "state": run.state_name, "result": report.get("result"), "previous_tag": prev,
        "bad_tag": report.get("tag"), "rolled_back_to": report.get("rolled_back_to"),
        "serving_after": report.get("serving"),
        "detect_s": stage_seconds(report, "argocd-sync"),
        "rollback_stage_s": stage_seconds(report, "rollback"),
        "accepted_to_failed_s": round(ts(run.end_time) - pushed["accepted_at"], 3),
        "fault": fault,
        "bad_commit_to_restored_outside_s": round(t_restored - t_bad, 3) if t_restored and t_bad else None,
        "bad_commit_to_run_end_s": round(ts(run.end_time) - t_bad, 3) if t_bad else None,
        "bad_version_answered": report.get("tag", "?") in hw.first_seen,
        "downtime_s": hw.downtime_s(),
        "health_samples": hw.samples,
    }
    return row


def manual_rollback_once(ctx: Ctx) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    env = ctx.env(ENV)
    hw = HealthWatcher(env.health_url, interval=0.05)
    hw.start()
    try:
        t0 = time.time()
        fr = run_deployment("rollback/rollback", parameters={"app": ctx.app.name, "environment": ENV,
                                                              "reason": "bench: manual rollback"}, timeout=0)
        run = wait_final(str(fr.id), 240)
        time.sleep(0.2)
    finally:
        hw.stop()
    report = report_of(str(fr.id)) or {}
    target = report.get("tag", "")
    answered = hw.first_seen.get(target)
    return {"run": run.name, "state": run.state_name, "to_tag": target, "from_tag": report.get("previous_tag"),
            "total_s": round(ts(run.end_time) - t0, 3),
            "queue_wait_s": round(ts(run.start_time) - ts(run.created), 3),
            "target_answering_s": round(answered - t0, 3) if answered else None,
            "stages": {s["name"]: s["seconds"] for s in report.get("stages", [])},
            "downtime_s": hw.downtime_s()}


def run(ctx: Ctx, failed: int, manual: int, fault: str = "crash") -> dict[str, Any]:
    repo = source_repo(ctx)
    branch = ctx.env(ENV).branches[0]
    rows = []
    for i in range(failed):
        r = failed_deploy_once(ctx, repo, f"{ctx.run_id}-{i}", fault)
        say(f"failed deploy {i + 1}/{failed} ({fault}): {r['result']}: detected after {r['detect_s']:.1f} s, "
            f"rollback stage {r['rollback_stage_s']:.2f} s, bad commit → previous version verified (outside) "
            f"{r['bad_commit_to_restored_outside_s']} s, downtime {r['downtime_s']} s, now {r['serving_after']}")
        rows.append(r)
    # Leave the branch healthy (not deployed: the next benchmark's push supersedes it).
    repo.remotes.origin.fetch()
    from common import commit_local, push_sha

    push_sha(repo, commit_local(repo, branch, settings_text(marker="bench: restore health settings"),
                                "revert: restore health settings"), branch)
    manuals = []
    for i in range(manual):
        m = manual_rollback_once(ctx)
        say(f"manual rollback {i + 1}/{manual}: {m['from_tag']} → {m['to_tag']} {m['state']} in {m['total_s']:.2f} s "
            f"(queue {m['queue_wait_s']:.2f} s, answering after {m['target_answering_s']} s)")
        manuals.append(m)
    out = {
        "environment": ENV,
        "failed_deploys": rows,
        "detect_s": summarize(r["detect_s"] for r in rows),
        "rollback_stage_s": summarize(r["rollback_stage_s"] for r in rows),
        "fault": fault,
        "bad_commit_to_restored_outside_s": summarize(r["bad_commit_to_restored_outside_s"] for r in rows),
        "bad_commit_to_run_end_s": summarize(r["bad_commit_to_run_end_s"] for r in rows),
        "accepted_to_failed_s": summarize(r["accepted_to_failed_s"] for r in rows),
        "downtime_s": max((r["downtime_s"] for r in rows), default=0.0),
        "manual_rollbacks": manuals,
        "manual_total_s": summarize(m["total_s"] for m in manuals),
        "manual_answering_s": summarize(m["target_answering_s"] for m in manuals),
    }
    say(f"time to restore, rollback stage: {fmt(out['rollback_stage_s'])}")
    say(f"time to restore, bad commit → previous version verified (outside): "
        f"{fmt(out['bad_commit_to_restored_outside_s'])}")
    say(f"manual rollback, run_deployment → Completed: {fmt(out['manual_total_s'])}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--failed", type=int, default=2)
    p.add_argument("--manual", type=int, default=3)
    p.add_argument("--fault", choices=["crash", "unhealthy"], default="crash")
    p.add_argument("--real", action="store_true", help="on the real tier (delivery up --real)")
    a = p.parse_args()
    ctx = common.ensure_stack(real=a.real)
    out = run(ctx, a.failed, a.manual, a.fault)
    out["machine"] = common.machine()
    out["tier"] = "real" if a.real else "emulators"
    say(f"wrote {save('restore' + ('_real' if a.real else ''), out)}")


if __name__ == "__main__":
    main()
