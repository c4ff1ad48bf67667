"""Flow runs start from a warm fork instead of a new interpreter.

`prefect.serve` runs each flow run in a child process made with multiprocessing's `spawn`: a new
Python interpreter that imports Prefect, our flows and their dependencies again before the run can
start. Measured here that import is 1.2-1.5 s of every run's `Scheduled` -> `Running` wait.

We keep Prefect's own runner (its polling, the `Pending` proposal, the deployment's concurrency slots,
cancellation from the UI, `Crashed` when a child dies, heartbeats) and change only how the child
process is made: multiprocessing's `forkserver`. A single-threaded server process imports the flow
modules once (`PRELOAD`) and forks one child per run. So

- each run is still its own process, with its own Prefect client, logs, state and artifacts: one run
  crashing (even SIGKILL) cannot take another with it, and the runner marks it `Crashed` as before;
- the fork is taken from a process that never started a thread or an event loop, which is what makes
  forking safe (forking the runner itself, with its threads and open clients, would not be);
- the per-environment lock and newest-wins live inside the flow, so nothing about them changes.

Options measured (bench/bench_prefect_overhead.py, `Scheduled` -> `Running`): see deployments/README.md.

Prefect builds the child with `multiprocessing.get_context("spawn")` inside
`prefect.flow_engine.run_flow_in_subprocess`. Rather than copy that function (it wires the
control channel, settings and signals through private helpers that change between releases), we give
that module a `multiprocessing` whose `get_context("spawn")` answers the forkserver context; every
other use of multiprocessing is untouched.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import sys
from types import ModuleType
from typing import Any

# What the server imports before it forks anything: Prefect's engine and everything a flow run
# imports. A module missing here still works; it is just imported in each child again.
PRELOAD = [
    "prefect.flow_engine",
    "prefect.task_engine",
    "flows.deploy",
    "flows.rollback",
    "flows.drift",
    "flows.recover",
    "flows.promote",
]


class _MultiprocessingWithForkserver(ModuleType):
    """`multiprocessing` as seen by prefect.flow_engine: `spawn` means our forkserver."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        super().__init__("multiprocessing")
        self._context = context

    def get_context(self, method: str | None = None) -> Any:
        return self._context if method == "spawn" else multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def install(preload: list[str] | None = None) -> multiprocessing.context.BaseContext:
    """Start the fork server now (so the first run does not pay for its imports) and route Prefect's
    flow-run subprocesses through it. Call once, in the process that runs `serve`."""
    import prefect.flow_engine

    _forget_main()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload if preload is not None else PRELOAD))
    multiprocessing.forkserver.ensure_running()
    prefect.flow_engine.multiprocessing = _MultiprocessingWithForkserver(context)  # type: ignore[attr-defined]
    return context


def _forget_main() -> None:
    """Keep multiprocessing from running this process's main module again in each child.

    Every child multiprocessing makes first re-executes the parent's `__main__` (for
    `python -m deployments.serve`: deployments/serve.py) *from disk*, so that objects defined there
    can be unpickled. Runs need nothing from it (the flow and Prefect's entry point are pickled by
    reference to modules the server preloaded), and re-running it would mix the code the server
    preloaded with whatever is on disk now: measured, a child crashed at once when serve.py on disk
    had changed under a running serve. Without a module name or file for `__main__`, the child
    leaves it alone. The price: after changing the pipeline's code, restart serve (as for any
    long-lived process)."""
    main = sys.modules.get("__main__")
    if main is None:
        return
    main.__spec__ = None
    if hasattr(main, "__file__"):
        del main.__file__


def installed() -> bool:
    import prefect.flow_engine

    return isinstance(getattr(prefect.flow_engine, "multiprocessing", None), _MultiprocessingWithForkserver)
