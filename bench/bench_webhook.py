"""Acknowledgement latency of the GitHub webhook receiver under a steady delivery rate.

Starts the receiver (uvicorn, its own process, 127.0.0.1) and sends signed pushes at a fixed rate
(default 50/s) over real HTTP, with every fifth delivery badly signed. Prints p50/p99 latency for
valid and rejected deliveries and writes bench/results/webhook.json.

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

SECRET = "bench-webhook-secret"
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


def _serve(port: int, api_url: str | None, deployment: str) -> None:
    """Child process: the receiver with a recording starter (api_url None) or the Prefect starter."""
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
    app = create_app(secret=SECRET, config_loader=lambda: config, starter=starter)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _push_body() -> bytes:
    sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    return json.dumps(
        {
            "ref": "refs/heads/main",
            "before": "0" * 40,
            "after": sha,
            "created": False,
            "deleted": False,
            "commits": [{"id": sha, "message": "Speed up workout list"}],
            "head_commit": {"id": sha, "message": "Speed up workout list"},
            "repository": {
                "name": "workout-api",
                "full_name": "your-org/workout-api",
                "clone_url": "https://github.com/your-org/workout-api.git",
                "ssh_url": "git@github.com:your-org/workout-api.git",
                "html_url": "https://github.com/your-org/workout-api",
            },
            "pusher": {"name": "bench"},
        }
    ).encode()


async def _drive(url: str, rate: float, seconds: float) -> dict[str, Any]:
    import httpx

    from deployments.webhook import signature_for

    latencies: dict[str, list[float]] = {"valid": [], "rejected": []}
    statuses: dict[str, Counter[int]] = {"valid": Counter(), "rejected": Counter()}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = _push_body()
        kind = "rejected" if i % 5 == 4 else "valid"
        secret = SECRET if kind == "valid" else "wrong-secret"
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": signature_for(body, secret),
        }
        started = time.perf_counter()
        try:
            r = await client.post(f"{url}/webhooks/github", content=body, headers=headers)
            statuses[kind][r.status_code] += 1
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

    return {"sent": total, "elapsed_s": round(elapsed, 2), "valid": summary("valid"), "rejected": summary("rejected")}


def _run_scenario(name: str, api_url: str | None, deployment: str, rate: float, seconds: float) -> dict[str, Any]:
    import httpx

    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_serve, args=(port, api_url, deployment), daemon=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0, help="deliveries per second")
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"))
    parser.add_argument("--prefect-harness", action="store_true", help="start a temporary Prefect server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "webhook.json")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

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
