"""How long `delivery sandbox up` takes: cold (new root: seed the Git remotes, build and push the
initial image, start every process), warm (everything already running: only checks), and restart
(after `down`: processes start again, repositories and image are reused).

    .venv/bin/python bench/bench_sandbox_up.py [--no-prefect] [--rounds 3]

Runs in a temporary root with its own app ports; the registry and Docker engine are shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.manager import Sandbox  # noqa: E402
from tests.fixtures_sandbox import free_port_block  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-prefect", action="store_true", help="leave the Prefect server out")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    figures: dict[str, list[float]] = {"cold": [], "warm": [], "restart": [], "down": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
            sb = Sandbox(Path(tmp) / "sandbox", prefect=not args.no_prefect, app_port_base=free_port_block())
            try:
                figures["cold"].append(timed(sb.up))
                figures["warm"].append(timed(sb.up))
                figures["down"].append(timed(sb.down))
                figures["restart"].append(timed(sb.up))
            finally:
                sb.reset()

    print(f"sandbox up ({'without' if args.no_prefect else 'with'} Prefect server), {args.rounds} rounds, seconds:")
    for name, values in figures.items():
        print(f"  {name:<8} median {statistics.median(values):6.2f}  min {min(values):6.2f}  max {max(values):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
