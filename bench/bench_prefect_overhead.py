"""Prefect's own cost: a flow of N no-op tasks vs the same N calls without Prefect.

    .venv/bin/python bench/bench_prefect_overhead.py [--tasks 100] [--runs 3]

Runs in a child process against the stack's Prefect server (PREFECT_API_URL), as the deploy flow
does: task runs are reported to the server. Prints the per-task overhead (flow time minus the
empty flow's time, divided by N) and the empty flow's own cost, next to the plain calls' per-call time.
The deploy flow runs about 12 tasks, so multiply to see the share of a deploy's lead time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import common
from common import ROOT, save, say, summarize

CHILD = r"""
import json, sys, time
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

def noop(i: int) -> int:
    return i

noop_task = task(name="noop", cache_policy=NO_CACHE)(noop)

@flow(name="bench-overhead")
def timed_loops(n: int) -> dict:
    # Timed inside the flow: the per-task figure excludes the flow run's own start and finish.
    t = time.perf_counter(); sum(noop_task(i) for i in range(n)); tasks_s = time.perf_counter() - t
    t = time.perf_counter(); sum(noop(i) for i in range(n)); plain_s = time.perf_counter() - t
    return {"tasks_s": tasks_s, "plain_s": plain_s}

@flow(name="bench-overhead-empty")
def empty() -> None:
    return None

n, runs = int(sys.argv[1]), int(sys.argv[2])
out = {"tasks_s": [], "plain_s": [], "empty_flow_s": []}
empty()  # warm-up: the first flow call pays imports and the server's first answers
# Empty flows first: after a flow of many tasks, the next flow run waits for their events to flush.
for _ in range(runs):
    t = time.perf_counter(); empty(); out["empty_flow_s"].append(time.perf_counter() - t)
timed_loops(2)
for _ in range(runs):
    r = timed_loops(n)
    out["tasks_s"].append(r["tasks_s"]); out["plain_s"].append(r["plain_s"])
t = time.perf_counter(); empty(); out["flush_after_tasks_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""


def run(tasks: int = 100, runs: int = 3) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "WARNING"}
    res = subprocess.run([sys.executable, "-c", CHILD, str(tasks), str(runs)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"overhead child failed: {res.stderr[-2000:]}")
    raw = json.loads(line[len("RESULT "):])
    per_task = [(t - p) / tasks for t, p in zip(raw["tasks_s"], raw["plain_s"], strict=True)]
    per_call = [p / tasks for p in raw["plain_s"]]
    out = {"tasks": tasks, "runs": runs,
           "per_task_overhead_ms": summarize((x * 1000 for x in per_task), 3),
           "plain_call_us": summarize((x * 1e6 for x in per_call), 3),
           "empty_flow_s": summarize(raw["empty_flow_s"]),
           "empty_flow_after_task_flows_s": round(raw["flush_after_tasks_s"], 3), "raw": raw}
    # What the task runs cost in all: in line, plus the flush of their events the next flow run waits for.
    deferred = max(0.0, raw["flush_after_tasks_s"] - out["empty_flow_s"]["median"])
    out["per_task_effective_ms"] = round((sum(raw["tasks_s"]) + deferred) / (tasks * runs) * 1000, 3)
    say(f"Prefect: {out['per_task_effective_ms']:.2f} ms per task in all (in line + deferred event flush); in line "
        f"{out['per_task_overhead_ms']['median']:.2f} ms per task (median over {runs} flows of {tasks} "
        f"no-op tasks; p95 {out['per_task_overhead_ms']['p95']:.2f} ms); a flow run alone "
        f"{out['empty_flow_s']['median']:.2f} s (after the task flows: {out['empty_flow_after_task_flows_s']:.2f} s); "
        f"the plain call {out['plain_call_us']['median']:.3f} µs")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    common.quiet()
    out = run(a.tasks, a.runs)
    out["machine"] = common.machine()
    say(f"wrote {save('prefect_overhead', out)}")


if __name__ == "__main__":
    main()
