"""The local default way to run the flows: one process serving the five deployments with Prefect's
`Runner` (what `prefect.serve` uses; no work pool), the drift check on its schedule. Once they are
registered it creates or updates the automations that go with them (deployments/automations.py:
a run whose heartbeats stop is marked Crashed, and a crashed deploy is recovered).

Unlike `prefect.serve`, the flows are handed to the runner as flow objects (`Runner.add_flow`), so it
runs each flow run by forking rather than by starting `python -m prefect.engine`, which imports
everything again; with `forkserver.install()` the fork comes from a warm, single-threaded server
(see deployments/forkserver.py and deployments/README.md for the measurements).

`prefect.yaml` declares the same five deployments for a `process` work pool; a test compares it
with `deployment_specs()` (names, entrypoints, descriptions, tags, schedules, limits) so the two
cannot drift apart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.schedules import Cron

from deployments import forkserver
from deployments.automations import HEARTBEAT_SECONDS, ensure_automations
from flows.deploy import deploy
from flows.drift import drift_check
from flows.promote import promote
from flows.recover import recover
from flows.rollback import rollback

DRIFT_CRON = os.environ.get("DELIVERY_DRIFT_CRON", "*/15 * * * *")
# A backstop only: the real guard is the per-app-and-environment lock inside the flow.
DEPLOY_CONCURRENCY = 25
# A new run is picked up when the server announces it (`prefect.flow-run.Scheduled` on its events
# websocket, about 0.1 s after it is created): the announced run is read and handed to the runner.
# The runner's own poll is only the backstop, for announcements missed while the websocket
# reconnects. Polling fast is not free on a SQLite-backed server: every poll queues a background
# write of the deployments' `last_polled` that holds the database's write lock, and measured at one
# poll a second, other writes (a webhook's run creation among them) stalled about 2 s every few
# seconds. So: announced runs are read by id, never by a poll.
POLL_SECONDS = float(os.environ.get("DELIVERY_SERVE_POLL_SECONDS", "30"))
SCHEDULED_EVENT = "prefect.flow-run.Scheduled"
# A suspended run (a promotion waiting for its approval) that is resumed is scheduled again as
# `Resuming`: announced under that name, it starts at once instead of at the next backstop poll.
RESUMING_EVENT = "prefect.flow-run.Resuming"


def _specs() -> list[tuple[Any, dict[str, Any]]]:
    """(flow, deployment options): one list for both the runner and `deployment_specs`."""
    return [
        (deploy, dict(
            name="deploy",
            description="Build, push, bump values, wait for Argo CD at our commit, verify; roll back on failure.",
            concurrency_limit=ConcurrencyLimitConfig(limit=DEPLOY_CONCURRENCY,
                                                     collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            tags=["delivery"],
        )),
        (rollback, dict(
            name="rollback",
            description="Put the last known-good (or a given) image tag back as a new commit and verify it.",
            tags=["delivery"],
        )),
        (drift_check, dict(
            name="drift-check",
            description="Git vs cluster vs Argo CD, missing images and plaintext secrets in Git.",
            schedule=Cron(DRIFT_CRON, timezone="UTC"),
            tags=["delivery"],
        )),
        (recover, dict(
            name="recover",
            description="Finish a deploy whose process died: the same deploy again (idempotent), or its rollback.",
            tags=["delivery"],
        )),
        (promote, dict(
            name="promote",
            description="Deploy the image verified in one environment to the next: same digest, no rebuild.",
            tags=["delivery"],
        )),
    ]


def deployment_specs() -> list[Any]:
    return [flow.to_deployment(**options) for flow, options in _specs()]


async def _wake_on_new_runs(runner: Runner, deployment_ids: set[str]) -> None:
    """Hand each run of ours to the runner as soon as the server announces it was scheduled. After a
    (re)connect of the websocket, one poll catches what was announced while nobody listened."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    log = logging.getLogger("delivery.serve")
    announced: set[str] = set()
    stale: dict[str, int] = {}
    poll_needed = False
    wake = asyncio.Event()
    ours = {f"prefect.deployment.{d}" for d in deployment_ids}

    async def listen() -> None:
        nonlocal poll_needed
        delay = 0.5
        scheduled = EventFilter(event=EventNameFilter(name=[SCHEDULED_EVENT, RESUMING_EVENT]))
        while True:
            try:
                async with get_events_subscriber(filter=scheduled) as sub:
                    delay = 0.5
                    poll_needed = True
                    wake.set()
                    async for event in sub:
                        if any(r.id in ours for r in event.related):
                            _announce(event.resource.id.rsplit(".", 1)[-1])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the backstop poll covers the gap; keep trying
                log.warning("serve: events websocket: %s: %s; reconnecting in %.1f s (the %g s poll covers "
                            "the gap)", type(e).__name__, e, delay, POLL_SECONDS)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _announce(run_id: str) -> None:
        announced.add(run_id)
        wake.set()

    async def _read(run_id: str) -> Any:
        """The announced run, or None. An announcement can overtake the write it announces (seen on
        SQLite: the run not found yet), and a read can fail like any call: look again shortly, a
        bounded number of times, rather than leave the run to the backstop poll."""
        try:
            return await runner._client.read_flow_run(UUID(run_id))  # noqa: SLF001
        except Exception as e:  # noqa: BLE001 - retried below, then left to the backstop poll
            tries = stale[run_id] = stale.get(run_id, 0) + 1
            if tries <= 20:
                asyncio.get_running_loop().call_later(0.5, _announce, run_id)
            else:
                log.warning("serve: announced run %s unreadable (%s: %s); the %g s poll will find it",
                            run_id, type(e).__name__, e, POLL_SECONDS)
            return None

    async def submit() -> None:
        nonlocal poll_needed
        while True:
            await wake.wait()
            wake.clear()
            if not runner.started or runner.stopping:
                continue
            ids = list(announced)
            announced.clear()
            try:
                if poll_needed:
                    poll_needed = False
                    await runner._get_and_submit_flow_runs()  # noqa: SLF001 - the runner's own poll step
                    continue
                runs = []
                for r in await asyncio.gather(*(_read(i) for i in ids)):
                    if r is None:
                        continue
                    if r.state is not None and r.state.is_paused() and stale.get(str(r.id), 0) < 20:
                        # Announced as `Resuming` yet read back still suspended (the announcement can
                        # overtake the write, measured on SQLite): read it again shortly.
                        stale[str(r.id)] = stale.get(str(r.id), 0) + 1
                        asyncio.get_running_loop().call_later(0.5, _announce, str(r.id))
                        continue
                    stale.pop(str(r.id), None)
                    if r.state is None or not r.state.is_scheduled():
                        continue
                    due = r.state.state_details.scheduled_time
                    wait = (due - datetime.now(UTC)).total_seconds() if due else 0.0
                    if wait > 0.5:
                        # A run scheduled for later (the drift check's cron): look again when it is due.
                        asyncio.get_running_loop().call_later(wait, _announce, str(r.id))
                    else:
                        runs.append(r)
                if runs:
                    # The same step the runner's poll ends in: claims a slot, proposes Pending, starts the
                    # process; a run the poll already took is skipped there.
                    poller = runner._scheduled_run_poller  # noqa: SLF001
                    # A run resumed right after it suspended is announced while the process of its first
                    # execution is still exiting, and the runner skips a run it still tracks: look again
                    # in a second rather than at the next backstop poll.
                    tracked = [str(r.id) for r in runs if r.id in poller._submitting_flow_run_ids]  # noqa: SLF001
                    await poller._submit_scheduled_flow_runs(  # noqa: SLF001
                        flow_run_response=runs, task_group=runner._runs_task_group)  # noqa: SLF001
                    for run_id in tracked:
                        asyncio.get_running_loop().call_later(1.0, _announce, run_id)
            except Exception as e:  # noqa: BLE001 - the backstop poll retries what was not submitted
                log.warning("serve: submitting announced runs %s: %s: %s", ids, type(e).__name__, e)

    await asyncio.gather(listen(), submit())


async def _serve(runner: Runner, deployment_ids: set[str]) -> None:
    waker = asyncio.create_task(_wake_on_new_runs(runner, deployment_ids))
    try:
        await runner.start()
    finally:
        waker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waker


def main() -> None:
    # Each run in a child forked from a warm server instead of a new interpreter (forkserver.py);
    # DELIVERY_SERVE_FORKSERVER=0 keeps multiprocessing's spawn, for comparison.
    if os.environ.get("DELIVERY_SERVE_FORKSERVER", "1") != "0":
        forkserver.install()
    # Every run sends a heartbeat every HEARTBEAT_SECONDS; the automation below marks a run whose
    # heartbeats stop Crashed (see deployments/automations.py for the choice of interval and window).
    runner = Runner(name="delivery", limit=int(os.environ.get("DELIVERY_SERVE_LIMIT", "25")),
                    query_seconds=POLL_SECONDS, heartbeat_seconds=HEARTBEAT_SECONDS)
    registered = {options["name"]: runner.add_flow(flow, **options) for flow, options in _specs()}
    deployment_ids = {str(i) for i in registered.values()}
    made = ensure_automations(registered)
    names = ", ".join(f"{flow.name}/{options['name']}" for flow, options in _specs())
    print(f"automations: {', '.join(made)}", flush=True)
    print(f"serving {names}: runs start when the server announces them (backstop poll every {POLL_SECONDS:g} s)",
          flush=True)
    try:
        asyncio.run(_serve(runner, deployment_ids))
    except (KeyboardInterrupt, TerminationSignal):
        pass


if __name__ == "__main__":
    main()
