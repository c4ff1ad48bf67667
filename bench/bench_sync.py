"""Lead time from `git push` of a values commit to "synced and healthy at that commit", in the sandbox.

    .venv/bin/python bench/bench_sync.py [--runs N] [--app NAME] [--env NAME] [--no-refresh]

Each run retags the image the environment currently runs under a new tag (pushed to the registry
before the clock starts), bumps the tag in the GitOps repo, commits and pushes, then (unless
--no-refresh) sets the refresh annotation and waits for Argo CD to report synced and healthy at
the new commit. Prints median and p95 of push->synced, and of the refresh call alone. With
--no-refresh the figure is Argo CD's Git poll interval, the wait this pipeline exists to avoid.
Not a test: figures depend on the machine.
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

from delivery.config import load_config  # noqa: E402
from delivery.settings import get_settings  # noqa: E402
from tasks.argocd import describe, request_refresh, wait_for_sync  # noqa: E402
from tasks.gitops import checkout, commit_and_push, read_image_tag  # noqa: E402
from tasks.values import bump_image_tag


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def _summary(name: str, values: list[float]) -> str:
    return (f"{name:<26} median {statistics.median(values):7.2f} s   p95 {_p95(values):7.2f} s   "
            f"min {min(values):7.2f} s   max {max(values):7.2f} s   (n={len(values)})")


def _retag(repository: str, old_tag: str, new_tag: str) -> None:
    """Make `repository:new_tag` exist in the registry, as the same image as `old_tag`."""
    client = docker.from_env()
    try:
        try:
            image = client.images.get(f"{repository}:{old_tag}")
        except docker.errors.ImageNotFound:
            image = client.images.pull(repository, tag=old_tag)
        image.tag(repository, new_tag)
        for line in client.images.push(repository, tag=new_tag, stream=True, decode=True):
            if "error" in line:
                raise SystemExit(f"pushing {repository}:{new_tag} failed: {line['error']}")
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--app", default=None, help="app name in the sandbox config (default: the first)")
    parser.add_argument("--env", default=None, help="environment name (default: the app's first)")
    parser.add_argument("--root", type=Path, default=None, help="sandbox directory (default: the settings')")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--no-refresh", action="store_true", help="rely on Argo CD's Git poll instead")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("delivery").setLevel(logging.WARNING)

    from sandbox.manager import Sandbox  # imported late: the sandbox is optional for --help

    state = Sandbox(args.root or get_settings().sandbox_dir).up()
    config = load_config(Path(state.config_file))
    app = config.app(args.app) if args.app else next(iter(config.apps.values()))
    env = app.environment(args.env) if args.env else next(iter(app.environments.values()))
    kubeconfig = Path(state.kubeconfig)
    print(f"app {app.name}, environment {env.name}, Application {env.argocd_namespace}/{env.application}")

    push_to_synced: list[float] = []
    refresh_calls: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        repo = checkout(str(state.gitops_remote), app.gitops_branch, Path(tmp) / "gitops")
        values = Path(tmp) / "gitops" / app.values_path(env.name)
        for i in range(args.runs):
            current = read_image_tag(values)
            new_tag = f"bench-{i}-{uuid.uuid4().hex[:6]}"
            _retag(app.image, current, new_tag)
            bump_image_tag(values, new_tag)
            started = time.monotonic()
            result = commit_and_push(repo, [values], f"bench: {app.name} {env.name} -> {new_tag}",
                                     branch=app.gitops_branch)
            if not args.no_refresh:
                t = time.monotonic()
                request_refresh(env.application, namespace=env.argocd_namespace, kubeconfig=kubeconfig)
                refresh_calls.append(time.monotonic() - t)
            status = wait_for_sync(env.application, result.sha, timeout=args.timeout,
                                   namespace=env.argocd_namespace, kubeconfig=kubeconfig)
            push_to_synced.append(time.monotonic() - started)
            print(f"run {i + 1}/{args.runs}: {new_tag} at {result.sha[:7]}: {describe(status)} "
                  f"after {push_to_synced[-1]:.2f} s")

    print(_summary("push -> synced+healthy", push_to_synced))
    if refresh_calls:
        print(_summary("refresh annotation patch", refresh_calls))


if __name__ == "__main__":
    main()
