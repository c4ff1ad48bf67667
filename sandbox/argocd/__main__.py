"""`python -m sandbox.argocd`: run the Argo CD emulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path

from sandbox.argocd.controller import Controller


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sandbox.argocd", description=__doc__)
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--interval", type=float, default=180.0,
                   help="seconds between Git polls of each Application (Argo CD: 120 s + jitter)")
    p.add_argument("--ports-file", type=Path, default=None,
                   help='JSON {"<application>": <host port>} for the stable app ports')
    p.add_argument("--self-heal-interval", type=float, default=5.0)
    p.add_argument("--root", default="default", help="label value that marks this sandbox's containers")
    p.add_argument("--cache-dir", type=Path, default=None, help="where Git caches live (default: a temp dir)")
    p.add_argument("--log-file", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file is not None:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(args.log_file)]
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="argocd-repo-cache-") as tmp:
        ctl = Controller(kubeconfig=args.kubeconfig, interval=args.interval, ports_file=args.ports_file,
                         root=args.root,
                         self_heal_interval=args.self_heal_interval, cache_dir=args.cache_dir or Path(tmp))

        def stop(signum: int, _frame: object) -> None:
            logging.getLogger("sandbox.argocd").info("signal %s: shutting down", signum)
            ctl.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        ctl.run()
        ctl.shutdown()


if __name__ == "__main__":
    main()
