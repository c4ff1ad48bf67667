"""Build and push durations against the real engine and the registry on 127.0.0.1:5000.

    .venv/bin/python bench/bench_images.py [--runs N] [--example]

Each run builds a small context whose content changes (so the COPY/RUN layers are rebuilt, as for a
new commit), pushes it under the usual three tags, then pushes again unchanged (layers already there).
Prints the median, min and max of each phase. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docker  # noqa: E402

from sandbox.engine import BASE_IMAGE, REGISTRY_ADDR  # noqa: E402
from tasks.images import build_image, image_tags, manifest_digest, push_image  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workout-api"


def _context(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "marker.txt").write_text(uuid.uuid4().hex)
    (root / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY marker.txt /marker.txt\nRUN cat /marker.txt\n")
    return root


def _summary(name: str, values: list[float]) -> str:
    return (f"{name:<28} median {statistics.median(values):7.3f} s   min {min(values):7.3f} s   "
            f"max {max(values):7.3f} s   (n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--example", action="store_true", help="build examples/workout-api instead of a tiny context")
    parser.add_argument("-v", "--verbose", action="store_true", help="show build and push output")
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("delivery").setLevel(logging.WARNING)

    repo = f"{REGISTRY_ADDR}/bench-images-{uuid.uuid4().hex[:8]}"
    phases: dict[str, list[float]] = {"build": [], "push (new layers)": [], "push (unchanged)": [],
                                      "manifest HEAD": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            sha = uuid.uuid4().hex[:40].ljust(40, "0")
            tags = image_tags("main", sha)
            if args.example:
                ctx, build_args = EXAMPLE, {"BASE_IMAGE": BASE_IMAGE, "APP_VERSION": f"bench-{i}-{sha[:7]}"}
            else:
                ctx, build_args = _context(Path(tmp) / f"ctx{i}"), None
            built = build_image(ctx, repo, tags, build_args=build_args, revision=sha)
            phases["build"].append(built.duration_s)
            pushed = push_image(repo, built.tags)
            phases["push (new layers)"].append(pushed.duration_s)
            again = push_image(repo, built.tags)
            phases["push (unchanged)"].append(again.duration_s)
            t0 = time.perf_counter()
            manifest_digest(repo, tags[0])
            phases["manifest HEAD"].append(time.perf_counter() - t0)

    client = docker.from_env()
    for image in client.images.list(name=repo):
        for ref in image.tags:
            client.images.remove(ref)
    print(f"repository {repo}; {'examples/workout-api' if args.example else 'tiny context'}; {args.runs} runs")
    for name, values in phases.items():
        print(_summary(name, values))


if __name__ == "__main__":
    main()
