"""The sample image's own start-up: `docker run` → first HTTP 200 on /api/health/.

    .venv/bin/python bench/bench_startup.py [--runs N] [--tag TAG]

This is the part of a deploy's lead time that belongs to the app, not to the pipeline: the lead-time
benchmark subtracts it (with build and push) to get the pipeline's own overhead. Polls every 20 ms.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common  # noqa: F401  (sets up sys.path and Prefect's environment)
from common import build_sample_image, fmt, health, save, say, summarize


def measure_once(image: str, timeout: float = 30.0) -> float:
    import docker

    client = docker.from_env(timeout=60)
    t0 = time.monotonic()
    c = client.containers.run(image, detach=True, ports={"8000/tcp": ("127.0.0.1", None)},
                              labels={"delivery.bench": "startup"})
    try:
        port = None
        while port is None and time.monotonic() - t0 < timeout:
            c.reload()
            bound = (c.attrs.get("NetworkSettings") or {}).get("Ports", {}).get("8000/tcp")
            if bound:
                port = int(bound[0]["HostPort"])
            else:
                time.sleep(0.01)
        while time.monotonic() - t0 < timeout:
            code, _ = health(f"http://127.0.0.1:{port}/api/health/", timeout=0.5)
            if code == 200:
                return time.monotonic() - t0
            time.sleep(0.02)
        raise TimeoutError(f"{image} did not answer 200 within {timeout:.0f} s")
    finally:
        c.remove(force=True)
        client.close()


def run(tag: str, runs: int) -> dict[str, Any]:
    from sandbox.manager import IMAGE_REPOSITORY

    build_sample_image(tag)
    image = f"{IMAGE_REPOSITORY}:{tag}"
    measure_once(image)  # warm-up: the first run may pay for a cold page cache
    xs = [measure_once(image) for _ in range(runs)]
    s = summarize(xs)
    say(f"container start-up (docker run → first 200): {fmt(s)}")
    return {"image": image, "startup_s": s, "samples": [round(x, 3) for x in xs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tag", default="bench-startup")
    a = p.parse_args()
    common.quiet()
    out = run(a.tag, a.runs)
    out["machine"] = common.machine()
    say(f"wrote {save('startup', out)}")


if __name__ == "__main__":
    main()
