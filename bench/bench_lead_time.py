"""Lead time on the stack: signed push webhook accepted → new version verified (deploy flow Completed).

    .venv/bin/python bench/bench_lead_time.py [--runs N]

Each run commits a change to the sample app's deploying branch for dev in the sandbox's source
repository, pushes it, delivers a signed GitHub push webhook to the stack's receiver and waits for
the deploy run. The stage breakdown comes from the run's own report (delivery.report) and from the
Prefect API (created → start_time is the queue wait: the serve process's poll plus process start).
Pipeline overhead = total − build − push − the container's start-up (bench_startup.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import common
from common import (
    Ctx,
    HealthWatcher,
    fmt,
    push_and_deliver,
    report_of,
    save,
    say,
    settings_text,
    source_repo,
    stage_seconds,
    summarize,
    tag_for,
    ts,
    wait_final,
)

ENV = "dev"
STAGES = ("checkout", "lock-wait", "gitops-checkout", "build", "push", "bump-commit-push", "argocd-refresh",
          "argocd-sync", "rollout", "health", "record-verified")


def breakdown(run: Any, report: dict[str, Any] | None, accepted_at: float) -> dict[str, float]:
    """Where the time between webhook acceptance and Completed went, in seconds."""
    created, started, ended = ts(run.created), ts(run.start_time), ts(run.end_time)
    out: dict[str, float] = {}
    out["total"] = round(ended - accepted_at, 3)
    out["queue_wait"] = round(started - created, 3)
    # Completed runs start in Running only once their process is up; before the queue wait ends.
    out["accepted_to_created"] = round(created - accepted_at, 3)
    if report:
        out["engine_start"] = round(report["started_at"] - started, 3)
        for name in STAGES:
            out[name] = stage_seconds(report, name)
        out["report_to_completed"] = round(ended - report["finished_at"], 3)
        out["in_flow_unaccounted"] = round(report["finished_at"] - report["started_at"]
                                           - sum(out[n] for n in STAGES), 3)
    return out


def deploy_once(ctx: Ctx, repo: Any, label: str, timeout: float = 240.0) -> dict[str, Any]:
    env = ctx.env(ENV)
    branch = env.branches[0]
    watcher = HealthWatcher(env.health_url, interval=0.05)
    watcher.start()
    try:
        pushed = push_and_deliver(ctx, repo, branch, settings_text(marker=f"bench lead time {label}"),
                                  f"feat: bench lead time {label}")
        tag = tag_for(ctx, branch, pushed["sha"])
        run = wait_final(pushed["run_id"], timeout)
    finally:
        watcher.stop()
    report = report_of(pushed["run_id"])
    result = (report or {}).get("result") or run.state_name
    b = breakdown(run, report, pushed["accepted_at"])
    serving_at = watcher.first_seen.get(tag)
    row = {"tag": tag, "run": run.name, "state": run.state_name, "result": result, "ack_s": round(pushed["ack_s"], 4),
           "breakdown": b, "report_lead_time_s": None, "downtime_s": watcher.downtime_s(),
           "first_answer_s": round(serving_at - pushed["accepted_at"], 3) if serving_at else None}
    if report and report.get("received_at"):
        from datetime import datetime

        row["report_lead_time_s"] = round(report["finished_at"]
                                          - datetime.fromisoformat(report["received_at"]).timestamp(), 3)
    return row


def run(ctx: Ctx, runs: int, startup_s: float | None) -> dict[str, Any]:
    repo = source_repo(ctx)
    rows = []
    for i in range(runs):
        row = deploy_once(ctx, repo, f"{ctx.run_id}-{i}")
        b = row["breakdown"]
        say(f"lead time {i + 1}/{runs}: {row['tag']} {row['result']} in {b['total']:.2f} s "
            f"(queue {b['queue_wait']:.2f}, build {b.get('build', 0):.2f}, push {b.get('push', 0):.2f}, "
            f"sync {b.get('argocd-sync', 0):.2f}, health {b.get('health', 0):.2f})")
        rows.append(row)
        time.sleep(0.5)
    ok = [r for r in rows if r["result"] == "completed"]
    keys = sorted({k for r in ok for k in r["breakdown"]})
    stages = {k: summarize(r["breakdown"].get(k) for r in ok) for k in keys}
    overheads = []
    for r in ok:
        b = r["breakdown"]
        overheads.append(b["total"] - b.get("build", 0) - b.get("push", 0) - (startup_s or 0))
    out = {
        "environment": ENV,
        "runs": rows,
        "completed": len(ok),
        "lead_time_s": summarize(r["breakdown"]["total"] for r in ok),
        "report_lead_time_s": summarize(r["report_lead_time_s"] for r in ok),
        "first_answer_s": summarize(r["first_answer_s"] for r in ok),
        "webhook_ack_s": summarize(r["ack_s"] for r in rows),
        "stages_s": stages,
        "container_startup_s": startup_s,
        "pipeline_overhead_s": summarize(overheads),
        "downtime_s": max((r["downtime_s"] for r in rows), default=0.0),
    }
    say(f"lead time (accepted → Completed): {fmt(out['lead_time_s'])}")
    say(f"pipeline overhead (total − build − push − start-up {startup_s or 0:.2f} s): "
        f"{fmt(out['pipeline_overhead_s'])}")
    if ok:
        med = {k: v["median"] for k, v in stages.items() if v.get("n")}
        say("median stage breakdown: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total"))
        say(f"sum of median parts {statistics.fsum(v for k, v in med.items() if k not in ('total',)):.2f} s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--startup", type=float, default=None, help="container start-up seconds (default: measure)")
    p.add_argument("--real", action="store_true", help="on the real tier (delivery up --real)")
    a = p.parse_args()
    ctx = common.ensure_stack(real=a.real)
    startup = a.startup
    if startup is None:
        import bench_startup

        startup = bench_startup.run("bench-startup", 3)["startup_s"]["median"]
    out = run(ctx, a.runs, startup)
    out["machine"] = common.machine()
    out["tier"] = "real" if a.real else "emulators"
    say(f"wrote {save('lead_time' + ('_real' if a.real else ''), out)}")


if __name__ == "__main__":
    main()
