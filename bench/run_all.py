"""Every benchmark against the local stack, in one run that fits 15 minutes (`make bench`).

    .venv/bin/python bench/run_all.py [--quick] [--skip NAME ...]

Starts the stack (`sandbox.stack.up()`) when it is not running, then:

- in a background thread, on staging: the old way (sed + commit + push + Argo CD's real 180 s poll)
  once and the new way a few times (the seed's git-revert restore is estimated from the old way's poll);
  its idle waits overlap the rest, its active steps take a lock the other measurements hold per benchmark;
- in the foreground, on dev and on separate instances: container start-up, lead time, time to restore
  (failed deploy + manual rollback), webhook acknowledgement, the 20-push burst (with memory sampling),
  the drift check at 50 apps × 2 environments, Prefect's per-task overhead.

Writes bench/results/<name>.json per benchmark and bench/results/all-<timestamp>.json + all-latest.json,
and prints each goal as met or missed. --quick does fewer repetitions (still one old-way sample at
the real interval). The stack is left running (`delivery down` stops it).
"""

from __future__ import annotations

import argparse
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import common
from common import save, say

BENCHES = ("startup", "lead_time", "restore", "burst", "webhook", "drift", "overhead", "old_way")

FULL = {"startup": 5, "lead": 5, "failed": 2, "manual": 3, "webhook_s": 10.0, "sweep": (10.0, 25.0),
        "drift_runs": 3, "drift_flows": 2, "tasks": 200, "task_runs": 3, "new_way": 3,
        # The seed's git-revert restore waits for Argo CD to call the bad release Degraded, which the
        # chart's 600 s progress deadline now decides (the pipeline fails fast on the pods instead):
        # estimated from the old way's commit + poll, as on the real tier (bench_old_way --no-revert).
        "revert": False}
QUICK = {"startup": 3, "lead": 2, "failed": 1, "manual": 1, "webhook_s": 4.0, "sweep": (),
         "drift_runs": 2, "drift_flows": 1, "tasks": 100, "task_runs": 2, "new_way": 2, "revert": False}


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the figure it is judged on."""
    out = []

    def goal(name: str, value: Any, target: str, met: bool | None, note: str = "") -> None:
        out.append({"goal": name, "value": value, "target": target, "met": met, "note": note})

    lt = r.get("lead_time") or {}
    if lt.get("lead_time_s", {}).get("n"):
        q = (lt.get("stages_s", {}).get("queue_wait") or {}).get("median")
        if q is not None:
            goal("Scheduled → Running, median", f"{q:.2f} s", "< 0.5 s", q < 0.5)
        ov = lt["pipeline_overhead_s"]["median"]
        goal("pipeline overhead (lead time − build − push − container start)", f"{ov:.2f} s", "< 1.5 s", ov < 1.5)
        med = lt["lead_time_s"]["median"]
        goal("lead time (webhook accepted → verified), median", f"{med:.2f} s (p95 {lt['lead_time_s']['p95']:.2f})",
             "< 4 s", med < 4)
    ow = r.get("old_way") or {}
    if ow.get("ratio_measured"):
        goal("old way ≥ 10× slower", f"×{ow['ratio_measured']} measured, ×{ow['ratio_expected']} expected",
             "≥ 10×", ow["ratio_measured"] >= 10 and ow["ratio_expected"] >= 10,
             f"old {ow['old_way_s']:.1f} s vs new {ow['new_way_s']['median']:.2f} s")
    rs = r.get("restore") or {}
    if rs.get("rollback_stage_s", {}).get("n"):
        v = rs["rollback_stage_s"]
        goal("time to restore after a failed deploy (failure detected → verified)",
             f"{v['median']:.2f} s (p95 {v['p95']:.2f})", "< 10 s", v["p95"] < 10,
             f"detection itself {rs['detect_s']['median']:.1f} s (progress deadline)")
    b = r.get("burst") or {}
    if b:
        t = b.get("last_push_to_newest_verified_s")
        goal("burst of 20: newest verified after the last push", f"{t} s", "< 20 s", t is not None and t < 20,
             f"newest serving: {b.get('serving_is_newest')}; all runs created "
             f"{b.get('first_push_to_all_runs_created_s')} s after the first push")
        goal("burst of 20: full deploys", b.get("full_deploys"), "1", b.get("full_deploys") == 1,
             f"results {b.get('results')}; history ok {b.get('gitops_history', {}).get('ok')}")
        refused = len(b.get("webhook_not_accepted") or [])
        goal("burst of 20: pushes refused", refused, "0", refused == 0)
    w = r.get("webhook") or {}
    if w.get("valid", {}).get("count"):
        not_2xx = sum(n for code, n in w["valid"]["statuses"].items() if not code.startswith("2"))
        goal("valid pushes at 50/s: answers that are not 2xx", f"{not_2xx} of {w['valid']['count']}", "0",
             not_2xx == 0)
        goal("webhook ack p99, valid pushes at 50/s", f"{w['valid']['p99_ms']:.1f} ms", "< 100 ms",
             w["valid"]["p99_ms"] < 100, f"statuses {w['valid']['statuses']}")
        if "with_exactly_one_run" in w:
            goal("deliveries at 50/s with exactly one run", f"{w['with_exactly_one_run']} of {w['accepted']}",
                 "every one", w["with_exactly_one_run"] == w["accepted"],
                 f"all dispatched {w['dispatch_drain_s']} s after the last push")
        goal("webhook ack p99, rejected pushes at 50/s", f"{w['rejected_stack']['p99_ms']:.1f} ms", "< 100 ms",
             w["rejected_stack"]["p99_ms"] < 100)
    d = r.get("drift") or {}
    if d.get("flow_s", {}).get("n"):
        goal("drift check, 50 apps × 2 envs (flow run)", f"{d['flow_s']['median']:.2f} s", "< 5 s",
             d["flow_s"]["median"] < 5, f"collect_drift alone {d['collect_s']['median']:.2f} s")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions; the old way still runs once at 180 s")
    p.add_argument("--skip", nargs="*", default=[], choices=BENCHES)
    a = p.parse_args()
    n = QUICK if a.quick else FULL
    t_start = time.monotonic()
    started = time.strftime("%Y%m%d-%H%M%S")
    ctx = common.ensure_stack(quick=a.quick)

    import bench_burst
    import bench_drift_scale
    import bench_lead_time
    import bench_old_way
    import bench_prefect_overhead
    import bench_restore
    import bench_startup
    import bench_webhook

    results: dict[str, Any] = {"machine": common.machine(), "quick": a.quick, "reps": {k: v for k, v in n.items()},
                               "errors": {}}
    lock = bench_old_way.MEASURE_LOCK

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in a.skip:
            return
        t0 = time.monotonic()
        say(f"== {name} ==")
        try:
            with lock:
                res = fn()
            res["elapsed_s"] = round(time.monotonic() - t0, 1)
            results[name] = res
            save(name, res)
        except Exception as e:  # noqa: BLE001 - one failed benchmark must not lose the others' figures
            traceback.print_exc()
            results["errors"][name] = f"{type(e).__name__}: {e}"
        time.sleep(0.5)  # lets the staging thread take the lock between benchmarks

    old_thread = None
    if "old_way" not in a.skip:
        tags = bench_old_way.prepare(ctx, n["new_way"], n["revert"])

        def old_way() -> None:
            try:
                res = bench_old_way.run(ctx, n["new_way"], n["revert"], tags)
                results["old_way"] = res
                save("old_way", res)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results["errors"]["old_way"] = f"{type(e).__name__}: {e}"

        old_thread = threading.Thread(target=old_way, name="old-way", daemon=True)
        old_thread.start()

    startup_s: list[float] = []

    def startup() -> dict[str, Any]:
        res = bench_startup.run(f"bench-{ctx.run_id}-startup", n["startup"])
        startup_s.append(res["startup_s"]["median"])
        return res

    step("startup", startup)
    step("lead_time", lambda: bench_lead_time.run(ctx, n["lead"], startup_s[0] if startup_s else None))
    step("restore", lambda: bench_restore.run(ctx, n["failed"], n["manual"]))
    # The webhook load leaves nothing running (its runs are deleted); the burst waits for all its runs.
    step("webhook", lambda: bench_webhook.run_stack(ctx, 50.0, n["webhook_s"], n["sweep"]))
    step("burst", lambda: bench_burst.run(ctx, 20))
    step("drift", lambda: bench_drift_scale.run(50, n["drift_runs"], n["drift_flows"]))
    step("overhead", lambda: bench_prefect_overhead.run(n["tasks"], n["task_runs"]))

    if old_thread is not None:
        say("waiting for the old-way measurement on staging (Argo CD's 180 s poll) ...")
        old_thread.join(timeout=900)
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    # The machine is shared: the load at the end says whether other work ran beside the benchmarks.
    results["loadavg_end"] = common.machine()["loadavg"]
    results["goals"] = goals(results)
    save(f"all-{started}", results)
    save("all-latest", results)

    print()
    print(f"{'goal':<70} {'value':<42} {'target':<9} result")
    for g in results["goals"]:
        verdict = "met" if g["met"] else ("MISSED" if g["met"] is False else "?")
        print(f"{g['goal']:<70} {str(g['value']):<42} {g['target']:<9} {verdict}"
              + (f"   ({g['note']})" if g["note"] else ""))
    if results["errors"]:
        print(f"\nerrors: {results['errors']}")
    print(f"\nall benchmarks in {results['elapsed_s'] / 60:.1f} min; results in {common.RESULTS}/all-{started}.json; "
          "the stack is still running (`delivery down` stops it)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
