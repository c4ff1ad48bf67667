"""Burst: 20 signed pushes to the same branch within about 2 s, each a new commit (dev).

    .venv/bin/python bench/bench_burst.py [--pushes N]

The 20 commits are made locally first (a chain on the deploying branch), then each is pushed to the
sandbox's source remote and its push webhook delivered at once, in order. Reported: the spread of
the pushes, time from the last push's webhook accepted until the newest commit is verified (its
deploy run Completed) and until it first answers on the health URL, how many full deploys ran
(results from each run's report: completed vs superseded vs failed), that the version serving at
the end is the newest commit's, and that the GitOps history is intact: linear (no merge commits),
the head before the burst still an ancestor (no force-push) and every values commit a run reported
still reachable from the branch. Peak memory of the stack's processes is sampled during the burst.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import common
from common import (
    Ctx,
    HealthWatcher,
    MemSampler,
    commit_local,
    deliver_push,
    push_sha,
    report_of,
    save,
    say,
    settings_text,
    source_repo,
    stack_pids,
    tag_for,
    ts,
    wait_final,
)

ENV = "dev"


def _git(bare: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", f"--git-dir={bare}", *args], capture_output=True, text=True)


def gitops_head(ctx: Ctx) -> str:
    return _git(ctx.app.gitops_repo, "rev-parse", f"refs/heads/{ctx.app.gitops_branch}").stdout.strip()


def check_history(ctx: Ctx, before: str, values_commits: list[str]) -> dict[str, Any]:
    bare, branch = ctx.app.gitops_repo, f"refs/heads/{ctx.app.gitops_branch}"
    merges = _git(bare, "rev-list", "--merges", f"{before}..{branch}").stdout.split()
    added = _git(bare, "rev-list", f"{before}..{branch}").stdout.split()
    not_forced = _git(bare, "merge-base", "--is-ancestor", before, branch).returncode == 0
    lost = [c for c in values_commits if c and _git(bare, "merge-base", "--is-ancestor", c, branch).returncode != 0]
    return {"linear": not merges, "merge_commits": merges, "head_before_is_ancestor": not_forced,
            "commits_added": len(added), "pipeline_commits_reported": len([c for c in values_commits if c]),
            "lost_commits": lost, "ok": not merges and not_forced and not lost}


def run(ctx: Ctx, pushes: int = 20, timeout: float = 420.0) -> dict[str, Any]:
    env = ctx.env(ENV)
    branch = env.branches[0]
    repo = source_repo(ctx)
    base = repo.commit(f"origin/{branch}").hexsha
    shas, prev = [], base
    for i in range(pushes):
        prev = commit_local(repo, branch, settings_text(marker=f"bench burst {ctx.run_id} {i}"),
                            f"feat: bench burst {ctx.run_id} #{i + 1}", base=prev)
        shas.append(prev)
    newest_tag = tag_for(ctx, branch, shas[-1])
    gitops_before = gitops_head(ctx)
    sampler = MemSampler(stack_pids(ctx), interval=0.2)
    hw = HealthWatcher(env.health_url, interval=0.05)
    sampler.start()
    hw.start()
    runs: list[str] = []
    acks: list[float] = []
    failed_acks: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []

    def sha_of(i: int) -> str:
        return shas[i]

    try:
        # Pushes are sequential (each must fast-forward the last); each webhook goes out as soon as its
        # push landed, without waiting for the previous delivery's answer, as GitHub does.
        futures = []
        ids = [str(uuid.uuid4()) for _ in shas]
        befores = [base, *shas[:-1]]
        with ThreadPoolExecutor(max_workers=8) as pool:
            t_first = time.time()
            for i, sha in enumerate(shas):
                push_sha(repo, sha, branch)
                futures.append(pool.submit(deliver_push, ctx, branch, befores[i], sha,
                                           f"feat: bench burst {ctx.run_id} #{i + 1}", ids[i]))
            t_pushed = time.time()
            for i, fut in enumerate(futures):
                status, answer, ack = fut.result()
                acks.append(ack)
                # A 503 is GitHub's cue to redeliver (by hand or by an app); do it at once, same delivery id.
                while status != 202:
                    failed_acks.append({"push": i + 1, "status": status, "seconds": round(ack, 3),
                                        "reason": answer.get("reason", "")})
                    if len(failed_acks) > 3 * pushes:
                        raise RuntimeError(f"burst push {i + 1}: the webhook keeps answering {status} {answer}")
                    status, answer, ack = deliver_push(ctx, branch, befores[i], sha_of(i),
                                                       f"feat: bench burst {ctx.run_id} #{i + 1}", ids[i])
                answers.append(answer)
            # From here the clock runs for the figures "after the last push": every push acknowledged.
            t_last = time.time()
            from sandbox.demo import runs_of

            # The receiver creates the runs after its 202 (durable intake): read them from its status URL.
            runs.extend(runs_of(answer)[0]["flow_run_id"] for answer in answers)
            t_runs = time.time()
        say(f"burst: {pushes} pushes in {t_pushed - t_first:.2f} s, all webhooks accepted after "
            f"{t_last - t_first:.2f} s, all runs created after {t_runs - t_first:.2f} s; waiting for the runs ...")
        finals = [wait_final(r, timeout) for r in runs]
        time.sleep(0.3)
    finally:
        hw.stop()
        memory = sampler.stop()
    reports = [report_of(r) or {} for r in runs]
    results = Counter((rep.get("result") or f"state:{f.state_name}") for rep, f in zip(reports, finals, strict=True))
    newest_run, newest_report = finals[-1], reports[-1]
    newest_answer = hw.first_seen.get(newest_tag)
    from common import health

    code, serving = health(env.health_url)
    full = sum(1 for rep in reports if rep.get("values_commit"))
    out = {
        "environment": ENV,
        "pushes": pushes,
        "push_spread_s": round(t_pushed - t_first, 3),
        "pushes_and_webhooks_s": round(t_last - t_first, 3),
        "first_push_to_all_runs_created_s": round(t_runs - t_first, 3),
        "webhook_ack_s": common.summarize(acks),
        "webhook_not_accepted": failed_acks,
        "newest_tag": newest_tag,
        "newest_result": newest_report.get("result") or newest_run.state_name,
        "last_push_to_newest_verified_s": round(ts(newest_run.end_time) - t_last, 3)
        if newest_report.get("result") == "completed" else None,
        "last_push_to_newest_answering_s": round(newest_answer - t_last, 3) if newest_answer else None,
        "all_runs_final_s": round(max(ts(f.end_time) for f in finals) - t_last, 3),
        "results": dict(results),
        "full_deploys": full,
        "serving_at_end": serving if code == 200 else f"HTTP {code}",
        "serving_is_newest": code == 200 and serving == newest_tag,
        "versions_seen": sorted(hw.first_seen, key=hw.first_seen.get),
        "downtime_s": hw.downtime_s(),
        "gitops_history": check_history(ctx, gitops_before, [rep.get("values_commit", "") for rep in reports]),
        "memory_mib": memory,
        "runs": [{"run": f.name, "state": f.state_name, "result": rep.get("result"),
                  "reason": rep.get("reason", "")[:160],
                  "start_after_last_push_s": round(ts(f.start_time) - t_last, 2) if f.start_time else None,
                  "end_after_last_push_s": round(ts(f.end_time) - t_last, 2) if f.end_time else None}
                 for f, rep in zip(finals, reports, strict=True)],
    }
    say(f"burst: newest {newest_tag} {out['newest_result']}; verified {out['last_push_to_newest_verified_s']} s and "
        f"answering {out['last_push_to_newest_answering_s']} s after the last push; runs {dict(results)}; "
        f"full deploys {full}; serving newest: {out['serving_is_newest']}; history ok: {out['gitops_history']['ok']}; "
        f"webhook answers other than 202 (redelivered): {len(failed_acks)}")
    for name, m in memory.items():
        say(f"memory {name:<8} VmHWM {m['root_hwm_mib']:7.1f} MiB, "
            f"children max VmHWM {m['max_child_hwm_mib']:7.1f} MiB "
            f"(up to {m['max_children']}), peak tree RSS {m['peak_tree_rss_mib']:7.1f} MiB")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pushes", type=int, default=20)
    a = p.parse_args()
    ctx = common.ensure_stack()
    out = run(ctx, a.pushes)
    out["machine"] = common.machine()
    say(f"wrote {save('burst', out)}")


if __name__ == "__main__":
    main()
