"""The Prefect automations that go with the deployments, created and kept up to date by the code that
registers them: `deployments/serve.py` calls `ensure_automations` once its flows are registered
(so `delivery up` does too), and the work-pool path runs `python -m deployments.automations` after
`prefect deploy --all` (see prefect.yaml's header).

- `delivery: crash silent runs`: a `Running` run of ours whose heartbeats stop for `WINDOW` is marked
  `Crashed`. Self-hosted Prefect marks nothing Crashed by itself: when the serve process or the
  worker dies with its runs (SIGKILL, OOM, a lost machine), nobody is left to report them.
- `delivery: recover crashed deploys`: every `Crashed` run of the `deploy`, `promote` and `rollback`
  deployments (and of `recover` itself, whose attempts flows/recover.py bounds) starts a run of the
  `recover` deployment with the crashed run's id. Why an automation and not an `on_crashed` hook: see flows/recover.py.

Both are scoped to our deployments (and the `delivery` tag, which our deployments and the subflows a
recovery starts carry), so a shared Prefect server's other flows are never touched. Idempotent: each
is found by name, updated when it differs from what this module wants, created when missing;
duplicates of the name (two serve processes starting at once) are deleted."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.errors import ConfigError
from delivery.redact import register_secret
from delivery.settings import Settings, get_settings

# Flow-run heartbeats every 30 s, Prefect's minimum. A heartbeat is one small event per running run
# (about 25 runs at most here: under one event a second), so the only thing a longer interval buys
# is a slower takeover. Detection takes `WINDOW` after the last heartbeat, up to
# HEARTBEAT_SECONDS + WINDOW after the death (2 min here, plus the server's 5 s evaluation tick),
# which leaves room inside the 3-minute budget for the recovery to run. Three missed
# heartbeats, not one: a heartbeat can be late or lost without the run being dead (2 CPUs busy with
# an image build, the events websocket reconnecting), and a live run marked Crashed by mistake only
# costs a recovery that waits for the run's lock and then finds nothing to do.
HEARTBEAT_SECONDS = 30
MISSED_HEARTBEATS = 3
WINDOW = timedelta(seconds=HEARTBEAT_SECONDS * MISSED_HEARTBEATS)

TAG = "delivery"
# flow name/deployment name of what serve.py and prefect.yaml register.
DEPLOYMENTS = {
    "deploy": "deploy/deploy",
    "rollback": "rollback/rollback",
    "drift-check": "drift-check/drift-check",
    "recover": "recover/recover",
    "promote": "promote/promote",
}
# The deployments whose crashed runs the recover deployment takes over (a subflow run, such as a
# deploy's automatic rollback, has no deployment: its parent's recovery covers it).
RECOVERED = ("deploy", "promote", "rollback", "recover")
CRASH_SILENT_RUNS = "delivery: crash silent runs"
RECOVER_CRASHED_DEPLOYS = "delivery: recover crashed deploys"
# Sent through a Prefect notification block when DELIVERY_NOTIFY_WEBHOOK_URL or DELIVERY_NOTIFY_BLOCK
# is set; without either they are removed.
NOTIFY_FAILURES = "delivery: notify failed runs"
NOTIFY_CANCELLED_PROMOTIONS = "delivery: notify cancelled promotions"
NOTIFY_BLOCK_NAME = "delivery-notify"
ALL_AUTOMATIONS = (CRASH_SILENT_RUNS, RECOVER_CRASHED_DEPLOYS, NOTIFY_FAILURES, NOTIFY_CANCELLED_PROMOTIONS)
# What a notification says, rendered by the server from the run: the app, the environment, the run's
# name (which carries the tag), the state, its message (the reason and, for our runs, what Git and the
# cluster name and what serves now, as read back) and the link to the run.
NOTIFY_SUBJECT = "delivery: {{ flow_run.name }} {{ flow_run.state.name }}"
NOTIFY_BODY = (
    "{{ flow.name }} of {{ flow_run.parameters.app }} to "
    "{{ flow_run.parameters.environment or flow_run.parameters.to_environment }}: "
    "{{ flow_run.name }} ended {{ flow_run.state.name }}\n"
    "{{ flow_run.state.message }}\n"
    "RUN_LINK"
)


def _notify_body() -> str:
    """The body with the run's link. The server's `ui_url` filter needs PREFECT_UI_URL set on the
    server, which a default one lacks (it renders `None`); the UI address this process knows (the
    one serve's runs link to) is written into the template instead, when there is one."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    link = f"{ui.rstrip('/')}/runs/flow-run/{{{{ flow_run.id }}}}" if ui else "{{ flow_run|ui_url }}"
    return NOTIFY_BODY.replace("RUN_LINK", link)
_FLOW_RUN = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
# A run that reached any of these has not gone silent: a final state, or paused/suspended (a suspended
# run has no process, and so no heartbeats, until it is resumed).
_ALIVE_OR_DONE = {
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Paused",
    "prefect.flow-run.Suspended",
}


def desired_automations(deployment_ids: Mapping[str, UUID | str],
                        notify_block_id: UUID | None = None) -> list[AutomationCore]:
    """The automations for the given deployment ids (keys as in `DEPLOYMENTS`); with a notification
    block, also the ones that notify."""
    ids = {name: str(deployment_ids[name]) for name in DEPLOYMENTS}
    ours = sorted([f"prefect.deployment.{i}" for i in ids.values()] + [f"prefect.tag.{TAG}"])
    crash = AutomationCore(
        name=CRASH_SILENT_RUNS,
        description=(f"Marks a Running delivery flow run Crashed when it sent no heartbeat for "
                     f"{WINDOW.total_seconds():g} s ({MISSED_HEARTBEATS} x {HEARTBEAT_SECONDS} s): its process "
                     "is gone. Managed by deployments/automations.py; edits are overwritten."),
        trigger=EventTrigger(
            # A run's `Running` opens the watch too, so one killed before its first heartbeat is caught.
            after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
            expect=set(_ALIVE_OR_DONE),
            match=_FLOW_RUN,
            match_related=ResourceSpecification({"prefect.resource.id": ours}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=WINDOW,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED, name="Crashed",
            message=(f"no heartbeat for {WINDOW.total_seconds():g} s: the process running this flow run is "
                     f"gone (automation '{CRASH_SILENT_RUNS}')"),
        )],
    )
    recover = AutomationCore(
        name=RECOVER_CRASHED_DEPLOYS,
        description=("Runs recover/recover for every Crashed run of deploy/deploy, promote/promote and "
                     "rollback/rollback (or of recover/recover, bounded by its max_attempts) with the crashed "
                     "run's id. Managed by "
                     "deployments/automations.py; edits are overwritten."),
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=_FLOW_RUN,
            match_related=ResourceSpecification({
                "prefect.resource.role": "deployment",
                "prefect.resource.id": sorted(f"prefect.deployment.{ids[n]}" for n in RECOVERED),
            }),
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[RunDeployment(
            source="selected", deployment_id=UUID(ids["recover"]),
            parameters={"crashed_run_id": {"__prefect_kind": "jinja", "template": "{{ flow_run.id }}"}},
        )],
    )
    if notify_block_id is None:
        return [crash, recover]
    return [crash, recover, *_notify_automations(ids, notify_block_id)]


def _notify_automations(ids: Mapping[str, str], block_id: UUID) -> list[AutomationCore]:
    """A failed deploy (rolled back or not), rollback, recovery or promotion; a promotion cancelled
    (rejected, timed out waiting for its approval). A deploy superseded by a newer commit ends
    Cancelled too, and is not worth a message: only promotions are watched for Cancelled."""
    def related(*names: str) -> ResourceSpecification:
        return ResourceSpecification({"prefect.resource.role": "deployment",
                                      "prefect.resource.id": sorted(f"prefect.deployment.{ids[n]}" for n in names)})

    def on(event: str, *names: str) -> EventTrigger:
        return EventTrigger(expect={event}, match=_FLOW_RUN, match_related=related(*names), for_each={
            "prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=timedelta(0))

    action = SendNotification(block_document_id=block_id, subject=NOTIFY_SUBJECT, body=_notify_body())
    return [
        AutomationCore(name=NOTIFY_FAILURES, trigger=on("prefect.flow-run.Failed", "deploy", "rollback", "recover",
                                                        "promote"),
                       description="Sends a message for every failed deploy, rollback, recovery or promotion. "
                                   "Managed by deployments/automations.py; edits are overwritten.",
                       actions=[action]),
        AutomationCore(name=NOTIFY_CANCELLED_PROMOTIONS, trigger=on("prefect.flow-run.Cancelled", "promote"),
                       description="Sends a message for every promotion rejected or not approved in time. "
                                   "Managed by deployments/automations.py; edits are overwritten.",
                       actions=[action]),
    ]


async def ensure_notify_block(settings: Settings | None = None) -> UUID | None:
    """The notification block the notify automations send through: the one named by
    DELIVERY_NOTIFY_BLOCK (`<block type slug>/<name>`, e.g. `slack-webhook/ops`), or else a generic
    webhook block `delivery-notify` posting Slack's `{"text": ...}` to DELIVERY_NOTIFY_WEBHOOK_URL
    (kept as the block's secret: a Slack URL is a credential). None when neither is set."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    settings = settings or get_settings()
    if settings.notify_block:
        slug, _, name = settings.notify_block.partition("/")
        if not name:
            raise ConfigError(f"DELIVERY_NOTIFY_BLOCK must be <block type slug>/<name>, got {settings.notify_block!r}")
        async with get_client() as client:
            return (await client.read_block_document_by_name(name, block_type_slug=slug)).id
    if settings.notify_webhook_url is None:
        return None
    url = settings.notify_webhook_url.get_secret_value()
    register_secret(url)
    block = CustomWebhookNotificationBlock(name="delivery", url="{{ webhook_url }}", method="POST",
                                           json_data={"text": "{{subject}}\n{{body}}"},
                                           secrets={"webhook_url": url})
    return await block.asave(NOTIFY_BLOCK_NAME, overwrite=True)


def _normal(value: Any) -> Any:
    """A comparable form of an automation's JSON: no generated ids, sets in order."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        items = [_normal(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


_COMPARED = ("name", "description", "enabled", "tags", "trigger", "actions", "actions_on_trigger",
             "actions_on_resolve")


def _differs(have: Any, want: AutomationCore) -> bool:
    a = _normal(have.model_dump(mode="json", include=set(_COMPARED)))
    b = _normal(want.model_dump(mode="json", include=set(_COMPARED)))
    return a != b


async def _deployment_ids(client: Any) -> dict[str, UUID]:
    ids = {}
    for key, name in DEPLOYMENTS.items():
        ids[key] = (await client.read_deployment_by_name(name)).id
    return ids


async def _ensure(deployment_ids: Mapping[str, UUID | str] | None) -> dict[str, UUID]:
    notify_block_id = await ensure_notify_block()
    async with get_client() as client:
        ids = deployment_ids if deployment_ids is not None else await _deployment_ids(client)
        out: dict[str, UUID] = {}
        wanted = desired_automations(ids, notify_block_id)
        for name in set(ALL_AUTOMATIONS) - {w.name for w in wanted}:
            for gone in await client.read_automations_by_name(name):  # notifications switched off
                await client.delete_automation(gone.id)
        for want in wanted:
            have = await client.read_automations_by_name(want.name)  # newest first
            if not have:
                out[want.name] = await client.create_automation(want)
                continue
            keep, extra = have[0], have[1:]
            for dup in extra:
                await client.delete_automation(dup.id)
            if _differs(keep, want):
                # The client sends only the fields set explicitly: make every field explicit, so that
                # a default (enabled=True) puts back what was changed (a disabled automation). The
                # update endpoint refuses owner_resource, even empty.
                full = AutomationCore.model_validate(want.model_dump(exclude={"owner_resource"}))
                await client.update_automation(keep.id, full)
            out[want.name] = keep.id
        return out


def ensure_automations(deployment_ids: Mapping[str, UUID | str] | None = None) -> dict[str, UUID]:
    """Create or update the automations on the current Prefect server; returns their ids by name.

    `deployment_ids` maps the keys of `DEPLOYMENTS` to ids (serve.py has them from registering);
    without it the deployments are read by name, and a missing one raises `ObjectNotFound`."""
    return run_coro_as_sync(_ensure(deployment_ids))


def main() -> int:
    """`python -m deployments.automations`: after `prefect deploy --all`, against PREFECT_API_URL."""
    from prefect.exceptions import ObjectNotFound

    try:
        made = ensure_automations()
    except ObjectNotFound:
        print("deployments missing: run `prefect deploy --all` first (needs " + ", ".join(DEPLOYMENTS.values())
              + ")", file=sys.stderr)
        return 1
    for name, automation_id in made.items():
        print(f"automation {name!r}: {automation_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
