"""Acknowledgement latency of the GitHub webhook receiver under a steady delivery rate.

Starts the receiver (uvicorn, its own process, 127.0.0.1) and sends signed pushes at a fixed rate
(default 50/s) over real HTTP, with every fifth delivery badly signed. Prints p50/p99 latency for
valid and rejected deliveries and writes bench/results/webhook.json.

With `--stack`, against the running stack instead (bench/run_all.py uses this): rejected pushes
against the stack's receiver itself, valid ones against a twin of it (see `run_stack`).

Scenarios:
- `recording`: the receiver's starter only records requests (the receiver's own cost);
- `prefect`: the real PrefectStarter creating flow runs, when a Prefect API is given
  (`--prefect-api URL` or PREFECT_API_URL), or `--prefect-harness` to start a temporary server.
  A trivial deployment `webhook-bench/deploy` is registered there; its runs stay Scheduled.

    .venv/bin/python bench/bench_webhook.py --seconds 10
    .venv/bin/python bench/bench_webhook.py --seconds 10 --prefect-harness
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import secrets
import socket
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = secrets.token_hex(16)  # made per run: nothing secret-shaped is committed
BENCH_DEPLOYMENT = "webhook-bench/deploy"
CONFIG = {
    "apps": {
        "workout-api": {
            "source_repo": "https://github.com/your-org/workout-api.git",
            "image": "127.0.0.1:5000/your-org/workout-api",
            "gitops_repo": "https://github.com/your-org/workout-gitops.git",
            "chart_path": "helm/workout-api",
            "environments": {
                "staging": {
                    "branches": ["main"],
                    "values_file": "values-staging.yaml",
                    "application": "workout-api-staging",
                    "namespace": "workout-staging",
                    "deployment": "workout-api",
                    "health_url": "http://127.0.0.1:1/api/health/",
                }
            },
        }
    }
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, api_url: str | None, deployment: str, secret: str) -> None:
    """Child process: the receiver with a recording starter (api_url None) or the Prefect starter.
    The secret is passed in: a spawned child re-imports this module and would make its own."""
    import uvicorn

    from delivery.config import parse_config
    from deployments.webhook import DeployRequest, PrefectStarter, StartedRun, create_app

    class Recording:
        async def start(self, requests: list[DeployRequest], **_: Any) -> list[StartedRun]:
            return [StartedRun(str(uuid.uuid4()), r.app, r.environment) for r in requests]

        async def check_api(self, timeout: float) -> bool:
            return True

    config = parse_config(CONFIG, Path("bench.yaml"))
    starter: Any = PrefectStarter(api_url=api_url, deployment_name=deployment) if api_url else Recording()
    app = create_app(secret=secret, config_loader=lambda: config, starter=starter)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _push_body(ref: str = "refs/heads/main", repo_url: str | None = None) -> bytes:
    sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    repository = {
        "name": "workout-api",
        "full_name": "your-org/workout-api",
        "clone_url": "https://github.com/your-org/workout-api.git",
        "ssh_url": "git@github.com:your-org/workout-api.git",
        "html_url": "https://github.com/your-org/workout-api",
    }
    if repo_url:
        repository = {"name": "workout-api", "full_name": "sandbox/workout-api", "clone_url": repo_url,
                      "ssh_url": repo_url, "html_url": repo_url}
    return json.dumps(
        {
            "ref": ref,
            "before": "0" * 40,
            "after": sha,
            "created": False,
            "deleted": False,
            "commits": [{"id": sha, "message": "Speed up workout list"}],
            "head_commit": {"id": sha, "message": "Speed up workout list"},
            "repository": repository,
            "pusher": {"name": "bench"},
        }
    ).encode()


async def _drive(url: str, rate: float, seconds: float, *, secret: str = SECRET, every_rejected: int = 5,
                 body: Any = _push_body) -> dict[str, Any]:
    import httpx

    from deployments.webhook import signature_for

    latencies: dict[str, list[float]] = {"valid": [], "rejected": []}
    statuses: dict[str, Counter[int]] = {"valid": Counter(), "rejected": Counter()}
    accepted: list[str] = []  # delivery ids of valid pushes answered 2xx

    async def one(client: httpx.AsyncClient, i: int) -> None:
        payload = body()
        kind = "rejected" if every_rejected and i % every_rejected == every_rejected - 1 else "valid"
        key = secret if kind == "valid" else "wrong-secret"
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": signature_for(payload, key),
        }
        started = time.perf_counter()
        try:
            r = await client.post(f"{url}/webhooks/github", content=payload, headers=headers)
            statuses[kind][r.status_code] += 1
            if kind == "valid" and 200 <= r.status_code < 300:
                accepted.append(headers["X-GitHub-Delivery"])
        except httpx.HTTPError:
            statuses[kind][0] += 1
        latencies[kind].append((time.perf_counter() - started) * 1000)

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        tasks = []
        t0 = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            # Open loop: send on schedule whether or not earlier answers came back.
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0

    def summary(kind: str) -> dict[str, Any]:
        xs = sorted(latencies[kind])
        if not xs:
            return {"count": 0}
        return {
            "count": len(xs),
            "p50_ms": round(statistics.median(xs), 2),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 2),
            "max_ms": round(xs[-1], 2),
            "statuses": {str(k): v for k, v in sorted(statuses[kind].items())},
        }

    return {"sent": total, "elapsed_s": round(elapsed, 2), "valid": summary("valid"), "rejected": summary("rejected"),
            "accepted_ids": accepted}


def _runs_per_delivery(deployment_name: str) -> Counter[str]:
    """How many runs of the bench deployment each delivery id got (the `delivery_id` parameter)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    counts: Counter[str] = Counter()
    with get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name(deployment_name)
        offset = 0
        while True:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                    limit=200, offset=offset)
            if not runs:
                return counts
            counts.update(str(r.parameters.get("delivery_id", "")) for r in runs)
            offset += len(runs)


def _wait_dispatched(store_path: Path, ids: list[str], timeout: float = 600) -> float:
    """Seconds until every accepted delivery left `pending` in the receiver's store (read beside it: WAL)."""
    from deployments.webhook.store import PENDING, DeliveryStore

    t0 = time.monotonic()
    store = DeliveryStore(store_path, create=False)
    try:
        while True:
            records = {i: store.get(i) for i in ids}
            pending = [i for i, rec in records.items() if rec is None or rec.status == PENDING]
            if not pending:
                outcomes: Counter[str] = Counter()
                for rec in records.values():
                    for a in rec.attempts if rec else []:
                        text = a["outcome"]
                        outcomes["created" if text.startswith("created") else text[:60]] += 1
                print(f"  attempts: {dict(outcomes.most_common(6))}", flush=True)
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"{len(pending)} accepted deliveries still pending after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        store.close()


def _run_scenario(name: str, api_url: str | None, deployment: str, rate: float, seconds: float) -> dict[str, Any]:
    import httpx

    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_serve, args=(port, api_url, deployment, SECRET), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or not proc.is_alive():
                raise SystemExit(f"{name}: receiver did not start")
            time.sleep(0.2)
        print(f"[{name}] {rate:g} deliveries/s for {seconds:g} s against {url} ...", flush=True)
        result = asyncio.run(_drive(url, rate, seconds))
        result.pop("accepted_ids")
    finally:
        proc.terminate()
        proc.join(timeout=10)
    result["scenario"] = name
    return result


def _register_bench_deployment() -> None:
    from prefect import flow

    @flow(name=BENCH_DEPLOYMENT.split("/")[0])
    def webhook_bench(
        app: str, environment: str, source_ref: str, source_sha: str, delivery_id: str = "", received_at: str = ""
    ) -> None:
        """Never executed: the benchmark only measures run creation."""

    webhook_bench.to_deployment(name=BENCH_DEPLOYMENT.split("/")[1]).apply()


# ------------------------------------------------------------------------------ against the stack


def _serve_twin(port: int) -> None:
    """Child process: the stack's receiver code (`deployments.webhook.serve`, same config, secret and
    Prefect server) bound to a deployment nobody serves, so valid pushes create real runs that stay
    Scheduled instead of 400 deploys hitting the machine."""
    from deployments.webhook import serve

    serve(port=port, deployment_name=BENCH_DEPLOYMENT)


def _delete_bench_runs(*, deployment_too: bool = True) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    deleted = 0
    with get_client(sync_client=True) as c:
        try:
            dep = c.read_deployment_by_name(BENCH_DEPLOYMENT)
        except ObjectNotFound:
            return 0
        while True:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])), limit=200)
            if not runs:
                break
            for r in runs:
                with contextlib.suppress(ObjectNotFound):
                    c.delete_flow_run(r.id)
                    deleted += 1
        if deployment_too:
            c.delete_deployment(dep.id)
    return deleted


def run_stack(ctx: Any, rate: float = 50.0, seconds: float = 10.0,
              sweep: tuple[float, ...] = (10.0, 25.0)) -> dict[str, Any]:
    """Valid pushes through a twin of the stack's receiver (runs created on the stack's Prefect server,
    left Scheduled, deleted afterwards); rejected pushes against the stack's running receiver itself.
    `sweep` adds shorter runs at lower rates to show where run creation stops keeping up."""
    import subprocess

    import httpx

    repo_url = ctx.app.source_repo
    branch = ctx.env("dev").branches[0]

    def body() -> bytes:
        return _push_body(f"refs/heads/{branch}", repo_url)

    print(f"[stack receiver] {rate:g} badly signed deliveries/s for {seconds / 2:g} s against {ctx.stack.webhook_url}",
          flush=True)
    wrong = secrets.token_hex(16)
    rejected = asyncio.run(_drive(ctx.stack.webhook_url, rate, seconds / 2, secret=wrong, every_rejected=1,
                                  body=body))

    import tempfile

    _register_bench_deployment()
    port = _free_port()
    # A store of its own: the stack's receiver dispatches whatever is pending in its store to the real
    # deploy deployment, and must never see the twin's deliveries.
    scratch = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    store_path = scratch / "deliveries.sqlite3"
    env = {**os.environ, "DELIVERY_WEBHOOK_SECRET": ctx.secret, "PYTHONPATH": str(ROOT),
           "DELIVERY_CONFIG_FILE": os.environ["DELIVERY_CONFIG_FILE"], "DELIVERY_WEBHOOK_STORE_PATH": str(store_path)}
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                             f"import bench_webhook; bench_webhook._serve_twin({port})"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    levels: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the twin receiver did not start")
            time.sleep(0.2)
        for r, secs in [*((x, max(3.0, seconds / 2)) for x in sweep), (rate, seconds)]:
            print(f"[twin receiver] {r:g} deliveries/s (1 in 5 badly signed) for {secs:g} s against {url} -> "
                  f"{BENCH_DEPLOYMENT} on the stack's Prefect server", flush=True)
            res = asyncio.run(_drive(url, r, secs, secret=ctx.secret, body=body))
            res["rate_per_s"] = r
            ids = res.pop("accepted_ids")
            # Acknowledged is not done: every accepted delivery must get exactly one run.
            res["dispatch_drain_s"] = round(_wait_dispatched(store_path, ids), 2)
            per = _runs_per_delivery(BENCH_DEPLOYMENT)
            res["accepted"] = len(ids)
            res["with_exactly_one_run"] = sum(1 for i in ids if per.get(i) == 1)
            res["runs_created"] = sum(per.values())
            print(f"  {res['accepted']} accepted; {res['with_exactly_one_run']} got exactly one run "
                  f"({res['runs_created']} runs); all dispatched {res['dispatch_drain_s']:.1f} s after the last push",
                  flush=True)
            levels.append(res)
            _delete_bench_runs(deployment_too=False)  # between levels: a growing run table is not measured
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    t0 = time.monotonic()
    deleted = _delete_bench_runs()
    print(f"deleted the bench deployment and its Scheduled runs in {time.monotonic() - t0:.1f} s", flush=True)
    main_level = levels[-1]
    out = {"rate_per_s": rate, "valid": main_level["valid"], "rejected_twin": main_level["rejected"],
           "accepted": main_level["accepted"], "with_exactly_one_run": main_level["with_exactly_one_run"],
           "dispatch_drain_s": main_level["dispatch_drain_s"],
           "rejected_stack": rejected["rejected"], "deleted_runs_last": deleted,
           "sweep": [{"rate_per_s": lv["rate_per_s"], "valid": lv["valid"], "rejected": lv["rejected"]}
                     for lv in levels]}
    for lv in out["sweep"]:
        src = next(x for x in levels if x["rate_per_s"] == lv["rate_per_s"])
        lv.update(accepted=src["accepted"], with_exactly_one_run=src["with_exactly_one_run"],
                  dispatch_drain_s=src["dispatch_drain_s"])
    for lv in levels:
        s = lv["valid"]
        print(f"valid @ {lv['rate_per_s']:>4g}/s {s['count']:>5}  p50 {s['p50_ms']:8.2f} ms  "
              f"p99 {s['p99_ms']:8.2f} ms  "
              f"max {s['max_ms']:8.2f} ms  {s['statuses']}", flush=True)
    for name in ("rejected_twin", "rejected_stack"):
        s = out[name]
        print(f"{name:<15} {s['count']:>5}  p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
              f"max {s['max_ms']:7.2f} ms  {s['statuses']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0, help="deliveries per second")
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"))
    parser.add_argument("--prefect-harness", action="store_true", help="start a temporary Prefect server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "webhook.json")
    parser.add_argument("--stack", action="store_true",
                        help="against the running stack (delivery up): see run_stack")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.stack:
        sys.path.insert(0, str(ROOT / "bench"))
        import common

        out = run_stack(common.ensure_stack(), args.rate, args.seconds)
        out["machine"] = common.machine()
        print(f"wrote {common.save('webhook_stack', out)}")
        return

    results = [_run_scenario("recording", None, BENCH_DEPLOYMENT, args.rate, args.seconds)]
    with contextlib.ExitStack() as stack:
        api = args.prefect_api
        if args.prefect_harness:
            from prefect.settings import PREFECT_API_URL
            from prefect.testing.utilities import prefect_test_harness

            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            api = PREFECT_API_URL.value()
        if api:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: api}):
                _register_bench_deployment()
            results.append(_run_scenario("prefect", api, BENCH_DEPLOYMENT, args.rate, args.seconds))

    print(f"\n{'scenario':<10} {'kind':<9} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses")
    for res in results:
        for kind in ("valid", "rejected"):
            s = res[kind]
            if s.get("count"):
                print(f"{res['scenario']:<10} {kind:<9} {s['count']:>6} {s['p50_ms']:>8} {s['p99_ms']:>8} "
                      f"{s['max_ms']:>8}  {s['statuses']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "results": results,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
