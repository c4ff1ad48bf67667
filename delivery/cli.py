"""The `delivery` command. Each subcommand imports its module lazily so that `delivery --help`
stays fast and a broken optional part does not take the others down."""

from __future__ import annotations

import argparse
import sys

from delivery.errors import DeliveryError


def _sandbox(args: argparse.Namespace) -> int:
    from sandbox import manager

    return manager.cli(args.action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delivery", description="GitOps delivery pipeline on Prefect.")
    sub = p.add_subparsers(dest="command", required=True)

    sb = sub.add_parser("sandbox", help="the one-machine environment (registry, Git, Kubernetes/Argo CD emulators)")
    sb.add_argument("action", choices=["up", "down", "status", "reset"])
    sb.set_defaults(func=_sandbox)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeliveryError as e:
        print(f"delivery: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
