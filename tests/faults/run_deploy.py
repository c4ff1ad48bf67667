"""Run one deploy in a process of its own and print its final state as one JSON line, for tests that
restart or kill the Prefect side around it: `python -m tests.faults.run_deploy '<parameters JSON>'`."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from flows.deploy import deploy

    state = deploy(**json.loads(sys.argv[1]), return_state=True)
    print("RESULT " + json.dumps({"type": state.type.value, "name": state.name, "message": state.message}),
          flush=True)


if __name__ == "__main__":
    main()
