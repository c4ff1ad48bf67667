"""Soak: many deploys in a row against the running stack (`delivery up`), watching for leaks.

    .venv/bin/python bench/bench_soak.py [--count 200] [--every 10] [--env dev]

Each deploy is a new commit on the environment's deploying branch of the sample app, pushed and
announced with a signed webhook, then waited for until its run is final (as a user's `git push`).
Before the first deploy and after every `--every` deploys it prints, for each long-running process
of the stack (serve, webhook, argocd, kube, prefect: pids from `.sandbox/stack.json` and
`.sandbox/state.json`), its resident memory, open file descriptors and number of processes in its
tree, plus the sandbox's containers (`docker ps` by the sandbox's root label). At the end each figure
is judged "flat" or "grows": the mean of the last third of samples against the first third (after
the first sample, which is before any deploy warmed the caches), with a slack per kind of figure.
Figures go to bench/results/soak.json; nothing here asserts.

The stack's own ports apply (DELIVERY_SANDBOX_DIR, DELIVERY_PREFECT_PORT with PREFECT_API_URL,
DELIVERY_WEBHOOK_PORT, DELIVERY_APP_PORT_BASE select another stack).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
from common import Ctx, push_and_deliver, say, settings_text, source_repo, stack_pids, tree, wait_final

# How much a figure may rise between the first and the last third before it counts as growth.
SLACK = {"rss_mib": 30.0, "tree_rss_mib": 60.0, "fds": 8, "procs": 2, "containers": 1}


def _rss_mib(pid: int) -> float:
    return common._status_kb(pid, "VmRSS") / 1024


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def containers(root: Path) -> tuple[int, int]:
    """(running, all) containers the sandbox's Argo CD emulator started for this root."""
    import docker

    from sandbox.manager import LABEL

    client = docker.from_env(timeout=30)
    try:
        found = client.containers.list(all=True, filters={"label": [f"{LABEL}/root={root}"]})
        return sum(1 for c in found if c.status == "running"), len(found)
    finally:
        client.close()


def sample(pids: dict[str, int], root: Path, deploys: int) -> dict[str, Any]:
    table = common._proc_table()
    running, total = containers(root)
    out: dict[str, Any] = {"deploys": deploys, "t": round(time.time(), 1), "containers": running,
                           "containers_all": total, "machine_procs": len(table), "parts": {}}
    for name, pid in pids.items():
        if pid not in table:
            out["parts"][name] = {"alive": False}
            continue
        members = tree(pid, table)
        out["parts"][name] = {
            "alive": True, "rss_mib": round(_rss_mib(pid), 1),
            "tree_rss_mib": round(sum(_rss_mib(p) for p in members), 1),
            "fds": sum(_fds(p) for p in members), "procs": len(members),
        }
    return out


def print_sample(s: dict[str, Any]) -> None:
    parts = "  ".join(
        f"{n}: {p['rss_mib']:.0f}/{p['tree_rss_mib']:.0f} MiB {p['fds']} fd {p['procs']} proc" if p.get("alive")
        else f"{n}: GONE" for n, p in s["parts"].items())
    say(f"after {s['deploys']:>4} deploys: containers {s['containers']} running ({s['containers_all']} all), "
        f"{s['machine_procs']} processes on the machine | {parts}")


def _slope_per_100(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def judge(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per figure: first-third and last-third means, slope per 100 deploys, and "flat" or "grows"."""
    body = samples[1:] if len(samples) > 3 else samples
    third = max(1, len(body) // 3)
    series: dict[str, tuple[str, list[float], list[float]]] = {}
    for kind in ("containers",):
        series[kind] = (kind, [s["deploys"] for s in body], [s[kind] for s in body])
    names = {n for s in body for n in s["parts"]}
    for name in sorted(names):
        for kind in ("rss_mib", "tree_rss_mib", "fds", "procs"):
            pts = [(s["deploys"], s["parts"][name][kind]) for s in body if s["parts"].get(name, {}).get("alive")]
            series[f"{name}.{kind}"] = (kind, [p[0] for p in pts], [p[1] for p in pts])
    out = {}
    for key, (kind, xs, ys) in series.items():
        if not ys:
            out[key] = {"verdict": "gone"}
            continue
        first = sum(ys[:third]) / len(ys[:third])
        last = sum(ys[-third:]) / len(ys[-third:])
        grows = last > first + SLACK[kind] and len(ys) >= 3
        out[key] = {"first": round(first, 1), "last": round(last, 1), "max": max(ys),
                    "per_100_deploys": round(_slope_per_100(xs, ys), 2), "verdict": "grows" if grows else "flat"}
    return out


def run(ctx: Ctx, count: int, every: int, env_name: str, timeout: float, settle: float = 3.0) -> dict[str, Any]:
    from delivery.settings import get_settings

    env = ctx.env(env_name)
    branch = env.branches[0]
    root = get_settings().sandbox_dir.resolve()
    pids = stack_pids(ctx)
    say(f"soak: {count} deploys to {env_name} (branch {branch}); sampling {sorted(pids)} every {every} deploys")
    repo = source_repo(ctx)
    samples = [sample(pids, root, 0)]
    print_sample(samples[-1])
    results: Counter[str] = Counter()
    durations: list[float] = []
    t_start = time.monotonic()
    for i in range(1, count + 1):
        t0 = time.monotonic()
        pushed = push_and_deliver(ctx, repo, branch, settings_text(marker=f"bench soak {ctx.run_id} {i}"),
                                  f"feat: bench soak {ctx.run_id} #{i}")
        final = wait_final(pushed["run_id"], timeout)
        durations.append(time.monotonic() - t0)
        results[final.state_name or "unknown"] += 1
        if not final.state.is_completed():
            say(f"deploy #{i}: {final.state_name}: {final.state.message}")
        if i % every == 0 or i == count:
            # The finished run's process may still be exiting; a moment later it is gone or it leaked.
            time.sleep(settle)
            samples.append(sample(pids, root, i))
            print_sample(samples[-1])
    verdicts = judge(samples)
    growing = {k: v for k, v in verdicts.items() if v["verdict"] != "flat"}
    say(f"soak: {count} deploys in {time.monotonic() - t_start:.0f} s ({dict(results)}); per deploy "
        f"{common.fmt(common.summarize(durations))}")
    for key, v in verdicts.items():
        if "first" in v:
            say(f"  {key:<28} {v['verdict']:<5} first {v['first']:>8}  last {v['last']:>8}  max {v['max']:>8}  "
                f"{v['per_100_deploys']:+.2f} per 100 deploys")
        else:
            say(f"  {key:<28} {v['verdict']}")
    say("soak: nothing grows beyond its slack" if not growing else f"soak: GROWING: {', '.join(sorted(growing))}")
    return {"count": count, "every": every, "environment": env_name, "results": dict(results),
            "deploy_s": common.summarize(durations), "pids": pids, "samples": samples, "verdicts": verdicts,
            "growing": sorted(growing), "slack": SLACK}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=200, help="deploys in a row (default 200; 20 for a quick look)")
    p.add_argument("--every", type=int, default=10, help="sample the processes after every N deploys")
    p.add_argument("--env", default="dev", help="environment to deploy to (its first deploying branch)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one deploy may take")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait after a deploy before sampling")
    args = p.parse_args()
    ctx = common.ensure_stack(quick=args.count < 200)
    out = run(ctx, args.count, max(1, args.every), args.env, args.timeout, args.settle)
    out["machine"] = common.machine()
    say(f"results: {common.save('soak', out)}")


if __name__ == "__main__":
    main()
