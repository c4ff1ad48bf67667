"""The `delivery` command. Each subcommand imports its module lazily so that `delivery --help`
stays fast and a broken optional part does not take the others down."""

from __future__ import annotations

import argparse
import sys

from delivery.errors import DeliveryError


def _sandbox(args: argparse.Namespace) -> int:
    from sandbox import manager

    return manager.cli(args.action, real=args.real)


def _up(args: argparse.Namespace) -> int:
    from delivery.settings import get_settings
    from sandbox import stack

    st = (stack.up(real=args.real) if args.webhook_port is None
          else stack.up(webhook_port=args.webhook_port, real=args.real))
    print(f"Prefect UI:       {st.prefect_ui_url}")
    print(f"Webhook receiver: {st.webhook_url}/webhooks/github")
    print(f"Logs:             {get_settings().sandbox_dir / 'logs'}/   Stop with: delivery down")
    return 0


def _down(args: argparse.Namespace) -> int:
    from sandbox import stack

    stack.down()
    print("stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    from sandbox import manager, stack

    rc = manager.cli("status")
    print("\n".join(stack.status_lines()))
    return rc


def _webhook(args: argparse.Namespace) -> int:
    from deployments import webhook

    webhook.serve(host=args.host, port=args.port)
    return 0


def _deliveries(args: argparse.Namespace) -> int:
    """Recent webhook deliveries from the receiver's store, newest first."""
    from delivery.settings import get_settings
    from deployments.webhook.http import delivery_view, open_store
    from deployments.webhook.starter import PrefectStarter

    settings = get_settings()
    path = settings.resolved_webhook_store_path()
    if not path.exists():
        print(f"no delivery store at {path}: the receiver has not stored a delivery yet")
        return 0
    store = open_store(settings, create=False)
    try:
        records = store.recent(limit=args.limit, pending_only=args.pending)
        counts = store.counts()
    finally:
        store.close()
    link = PrefectStarter().ui_link
    print(f"{path}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if not records:
        print("no pending deliveries" if args.pending else "no deliveries")
    for record in records:
        view = delivery_view(record, link)
        targets = " ".join(f"{r['app']}/{r['environment']}@{r['sha'][:12]}" for r in view["requests"])
        print(f"{view['received_at'][:19]}  {record.delivery_id}  {record.status:<10}  {targets}  "
              f"attempts={record.attempt_count}")
        for r in view["requests"]:
            if r["flow_run_id"]:
                url = f"  {r['url']}" if r["url"] else ""
                print(f"    {r['app']}/{r['environment']}: run {r['flow_run_id']}{url}")
            elif r["error"]:
                print(f"    {r['app']}/{r['environment']}: failed: {r['error']}")
        if record.status == "pending" and record.attempts:
            print(f"    last attempt {record.attempts[-1]['at'][:19]}: {record.attempts[-1]['outcome']}")
    return 0


def _history(args: argparse.Namespace) -> int:
    from delivery import history

    rows = history.read_history(args.app, args.environment, args.limit)
    print(history.render(rows))
    return 0


def _run(args: argparse.Namespace) -> int:
    """Start a deployment run and wait for its end (or run the flow here with --local)."""
    if args.command == "rollback":
        params = {"app": args.app, "environment": args.environment, "to_tag": args.to_tag, "reason": args.reason}
        name = "rollback/rollback"
    else:
        params = {"apps": args.apps or None, "heal": args.heal}
        name = "drift-check/drift-check"
    if args.local:
        if args.command == "rollback":
            from flows.rollback import rollback as fn
        else:
            from flows.drift import drift_check as fn
        state = fn(**params, return_state=True)
        print(f"{state.name}: {state.message or ''}")
        return 0 if state.is_completed() else 1
    from prefect.deployments import run_deployment

    run = run_deployment(name=name, parameters=params, timeout=args.timeout)
    print(f"{run.name}: {run.state_name}: {run.state.message if run.state else ''}")
    return 0 if run.state and run.state.is_completed() else 1


def _promote(args: argparse.Namespace) -> int:
    """Start a promotion and follow it until it ends or waits for an approval (printing where to give it)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    from delivery.promotion import PROMOTE_DEPLOYMENT, run_url

    params = {"app": args.app, "from_environment": args.source, "to_environment": args.target, "tag": args.tag,
              "reason": args.reason}
    run = run_deployment(name=PROMOTE_DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
    url = run_url(str(run.id))
    print(f"promotion of {args.app} from {args.source} to {args.target}: {url}", flush=True)

    async def read() -> object:
        async with get_client() as c:
            return await c.read_flow_run(run.id)

    deadline = time.monotonic() + args.timeout
    last = ""
    while True:
        current = run_coro_as_sync(read())
        state = current.state
        if current.state_name != last:
            print(f"  {current.state_name}", flush=True)
            last = current.state_name or ""
        if state is not None and state.is_paused():
            print(f"waiting for an approval: open {url} and click Resume to approve or reject "
                  "(the form shows the tag, the digest and the verification)")
            return 0
        if state is not None and state.is_final():
            print(f"{current.name}: {current.state_name}: {state.message or ''}")
            return 0 if state.is_completed() else 1
        if time.monotonic() > deadline:
            print(f"{current.name} still {current.state_name} after {args.timeout:g} s; follow it at {url}")
            return 1
        time.sleep(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delivery", description="GitOps delivery pipeline on Prefect.")
    sub = p.add_subparsers(dest="command", required=True)

    sb = sub.add_parser("sandbox", help="the one-machine environment (registry, Git, Kubernetes/Argo CD emulators)")
    sb.add_argument("action", choices=["up", "down", "status", "reset"])
    sb.add_argument("--real", action="store_true",
                    help="on the real tier: a one-node Kubernetes and Argo CD core built from Go modules "
                         "(minutes the first time) instead of the emulators")
    sb.set_defaults(func=_sandbox)

    up = sub.add_parser("up", help="start the sandbox, Prefect server, serve process and webhook receiver")
    up.add_argument("--webhook-port", type=int, default=None, help="default 8080, or DELIVERY_WEBHOOK_PORT")
    up.add_argument("--real", action="store_true",
                    help="the sandbox on the real tier (a one-node Kubernetes and Argo CD built from Go modules)")
    up.set_defaults(func=_up)
    sub.add_parser("down", help="stop everything `delivery up` started").set_defaults(func=_down)
    sub.add_parser("status", help="what runs and whether it answers").set_defaults(func=_status)

    wh = sub.add_parser("webhook", help="the GitHub webhook receiver")
    wh.add_argument("action", choices=["serve"])
    wh.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1 unless you mean it)")
    wh.add_argument("--port", type=int, default=8080)
    wh.set_defaults(func=_webhook)

    de = sub.add_parser("deliveries", help="recent webhook deliveries from the receiver's durable store")
    de.add_argument("--pending", action="store_true", help="only those whose runs are not created yet")
    de.add_argument("--limit", "-n", type=int, default=20)
    de.set_defaults(func=_deliveries)

    hi = sub.add_parser("history", help="deploy, promotion and rollback runs with DORA figures")
    hi.add_argument("app", nargs="?")
    hi.add_argument("--environment", "-e")
    hi.add_argument("--limit", "-n", type=int, default=20)
    hi.set_defaults(func=_history)

    rb = sub.add_parser("rollback", help="roll an environment back to the last known-good or a given tag")
    rb.add_argument("app")
    rb.add_argument("environment")
    rb.add_argument("--to-tag", default=None)
    rb.add_argument("--reason", default="manual rollback from the CLI")
    rb.add_argument("--local", action="store_true", help="run the flow in this process, not via the deployment")
    rb.add_argument("--timeout", type=float, default=600)
    rb.set_defaults(func=_run)

    pr = sub.add_parser("promote", help="deploy the image verified in one environment to another: the same digest, "
                                       "no rebuild (waits for an approval where the target requires one)")
    pr.add_argument("app")
    pr.add_argument("source", metavar="FROM", help="the environment whose verified image is promoted")
    pr.add_argument("target", metavar="TO", help="the environment it goes to")
    pr.add_argument("--tag", default=None, help="a tag verified in FROM (default: the one verified there last)")
    pr.add_argument("--reason", default="promoted from the CLI")
    pr.add_argument("--timeout", type=float, default=900,
                    help="seconds to follow the run (it goes on in Prefect after that)")
    pr.set_defaults(func=_promote)

    dr = sub.add_parser("drift", help="run the drift check now")
    dr.add_argument("apps", nargs="*")
    dr.add_argument("--heal", action="store_true")
    dr.add_argument("--local", action="store_true")
    dr.add_argument("--timeout", type=float, default=300)
    dr.set_defaults(func=_run)
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
