"""Promotion end to end on the sandbox: dev → staging (automatic) and staging → prod (approval in the
Prefect UI's form), the promote flow served by deployments/serve.py against a real Prefect server.

Each test starts its runs the way a user does (the deployments), so suspension, the suspended
process exiting, the resume as a new execution and the approval timeout all happen for real."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from prefect.client.schemas.objects import StateType

from delivery.config import load_config
from delivery.promotion import TIMED_OUT_MESSAGE
from tasks import images
from tasks.trailers import trailer_map
from tests.flows.conftest import health
from tests.promotion_stack import APP, PromotionStack, api, promotion_stack, wait_for
from tests.source_clone import SourceClone


@pytest.fixture(scope="module")
def ps(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromotionStack]:
    with promotion_stack(sandbox, tmp_path_factory.mktemp("promote")) as stack:
        yield stack


@pytest.fixture(scope="module")
def dev_source(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> SourceClone:
    return SourceClone(str(sandbox.source_remote), tmp_path_factory.mktemp("promote-src") / "src")


def _tag(sha: str) -> str:
    return f"release-dev-{sha[:7]}"


def _env(name: str) -> Any:
    return load_config().app(APP).environment(name)


def _version(environment: str) -> str:
    return health(_env(environment).health_url)[1].get("version", "")


def _registry_digest(tag: str) -> str:
    return images.manifest_digest(load_config().app(APP).image, tag) or ""


def _noted_digest(ps: PromotionStack, environment: str, tag: str) -> str:
    """The digest the verification note of `tag` in `environment` records."""
    for line in ps.notes().splitlines():
        f = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        if f.get("app") == APP and f.get("env") == environment and f.get("tag") == tag and f.get("digest"):
            return f["digest"]
    return ""


def _verified_in_dev(ps: PromotionStack, source: SourceClone, note: str) -> str:
    sha = source.commit("release-dev", note=note)
    run = ps.deploy_dev(sha)
    assert run.state.is_completed(), run.state.message
    return _tag(sha)


@pytest.fixture(scope="module")
def staging_tag(ps: PromotionStack, dev_source: SourceClone) -> str:
    """A tag verified in dev and promoted to (and verified in) staging, for the prod approvals."""
    tag = _verified_in_dev(ps, dev_source, "release for prod approvals")
    run = ps.promote("dev", "staging", tag=tag)
    assert run.state.is_completed(), run.state.message
    return tag


def _suspended(ps: PromotionStack, run_id: Any) -> Any:
    return ps.wait_state(run_id, lambda r: r.state_name == "Suspended", 120, "the promotion to wait for its approval")


def _lock_slots(environment: str) -> int:
    """Slots taken on the environment's deploy lock (none: no run ever took it on this server)."""
    from prefect.exceptions import ObjectNotFound

    async def read(c: Any) -> int:
        try:
            return (await c.read_global_concurrency_limit_by_name(f"deploy:{APP}:{environment}")).active_slots
        except ObjectNotFound:
            return 0
    return api(read)


def _form(run: Any) -> tuple[dict[str, Any], str]:
    """The schema and the description of the approval form the suspended run saved for the UI."""
    run_id, keys = run.id, run.state.state_details.run_input_keyset
    schema = api(lambda c: c.read_flow_run_input(flow_run_id=run_id, key=keys["schema"]))
    description = api(lambda c: c.read_flow_run_input(flow_run_id=run_id, key=keys["description"]))
    return json.loads(schema), json.loads(description)


def _resume(run_id: Any, answer: dict[str, Any]) -> None:
    """What the UI's form does when it is submitted."""
    async def go(c: Any) -> None:
        result = await c.resume_flow_run(run_id, run_input=answer)
        assert result.status.value == "ACCEPT", result
    api(go)


def test_auto_promotion_serves_the_dev_digest_in_staging_without_a_build(ps, dev_source):
    """dev verified → the promotion to staging starts by itself and staging runs the same digest, not rebuilt."""
    with ps.auto():
        sha = dev_source.commit("release-dev", note="auto promotion")
        deployed = ps.deploy_dev(sha)
    assert deployed.state.is_completed(), deployed.state.message
    tag = _tag(sha)
    digest = _noted_digest(ps, "dev", tag)
    assert digest.startswith("sha256:") and digest == _registry_digest(tag)
    run = wait_for(lambda: next((r for r in ps.promote_runs() if (r.parameters or {}).get("tag") == tag), None), 60,
                   "the automatic promotion run")
    assert run.parameters["from_environment"] == "dev" and run.parameters["to_environment"] == "staging"
    assert f"| Promotions started | to staging: {ps.ui_url}/runs/flow-run/{run.id} |" in ps.report(
        deployed.id, f"deploy-{APP}-dev")
    run = ps.wait_state(run.id, lambda r: r.state is not None and r.state.is_final(), 300, "the promotion to end")
    assert run.state.is_completed(), run.state.message

    assert _version("staging") == tag
    assert digest in ps.serving_digests("staging")
    assert _registry_digest(tag) == digest, "the promotion pushed nothing"
    report = ps.report(run.id, f"promote-{APP}-staging")
    assert "| build | " in report and "| skipped | promoted from dev: not rebuilt |" in report
    assert "| digest-check | " in report and f"{digest} as verified in dev" in report
    assert "Promoted from | dev, verified there at " in report and "**completed**" in report
    commit = next(ln.split("`")[1] for ln in report.splitlines() if ln.startswith("| Values commit |"))
    t = trailer_map(ps.commit_message(commit))
    assert (t["delivery-environment"], t["delivery-tag"]) == ("staging", tag)
    assert t["delivery-promoted-from"] == "dev" and t["delivery-image-digest"] == digest
    assert "delivery-approved-by" not in t
    assert _noted_digest(ps, "staging", tag) == digest


def test_a_tag_never_verified_in_the_source_is_refused_and_nothing_is_written(ps, dev_source, staging_tag):
    """A tag dev never verified, or one verified in dev but never in staging, is refused; Git is untouched."""
    before = ps.gitops_refs()
    run = ps.promote("dev", "staging", tag="release-dev-0000000")
    assert run.state.is_failed()
    assert "release-dev-0000000 was never verified in dev" in run.state.message
    assert "nothing was changed" in run.state.message
    dev_only = _verified_in_dev(ps, dev_source, "verified in dev only")
    before = ps.gitops_refs()
    run = ps.promote("staging", "prod", tag=dev_only)
    assert run.state.is_failed() and f"{dev_only} was never verified in staging" in run.state.message
    # prod takes promotions from staging only.
    run = ps.promote("dev", "prod", tag=dev_only)
    assert run.state.is_failed() and "takes promotions only from staging" in run.state.message
    assert ps.gitops_refs() == before
    assert _version("prod") != dev_only


def _last_verified(ps: PromotionStack, environment: str) -> str:
    for line in ps.notes().splitlines():
        f = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        if f.get("app") == APP and f.get("env") == environment:
            return f.get("tag", "")
    return ""


def _overwrite_in_registry(ps: PromotionStack, tag: str) -> None:
    """Push another image (the sandbox's initial one) under `tag`: its digest changes."""
    client = docker.from_env()
    try:
        image = load_config().app(APP).image
        client.images.get(f"{image}:{ps.sandbox.initial_tag}").tag(image, tag)
        client.images.push(image, tag=tag)
    finally:
        client.close()


def test_a_changed_digest_is_refused_and_nothing_is_written(ps, dev_source):
    """The tag verified in dev now names another image in the registry: refused, Git untouched."""
    tag = _verified_in_dev(ps, dev_source, "to be overwritten in the registry")
    verified = _noted_digest(ps, "dev", tag)
    _overwrite_in_registry(ps, tag)
    changed = _registry_digest(tag)
    assert changed and changed != verified
    before = ps.gitops_refs()
    run = ps.promote("dev", "staging", tag=tag)
    assert run.state.is_failed(), run.state.message
    assert f"changed since it was verified in dev: the registry serves {changed}" in run.state.message
    assert f"the verification recorded {verified}" in run.state.message
    assert ps.gitops_refs() == before
    assert _version("staging") != tag


def test_an_approved_promotion_deploys_to_prod_naming_who_approved(ps, staging_tag):
    """prod needs an approval: the run waits without a lock, the form shows the image; approved, prod serves it."""
    digest = _noted_digest(ps, "staging", staging_tag)
    run = ps.promote("staging", "prod", timeout=0)
    waiting = _suspended(ps, run.id)
    assert waiting.state.type == StateType.PAUSED
    assert _lock_slots("prod") == 0, "a promotion waiting for its approval holds no lock"
    schema, description = _form(waiting)
    assert {"approve", "approver", "comment"} <= set(schema["properties"])
    for shown in (staging_tag, "Verified in staging at", "/runs/flow-run/"):
        assert shown in description, shown
    assert digest in description.replace("` `", ""), "the digest, in two halves that fit the form"
    waiting_report = ps.report(run.id, f"promote-{APP}-prod")
    assert "**waiting-for-approval**" in waiting_report

    asked = time.monotonic()
    _resume(run.id, {"approve": True, "approver": "Ada Lovelace", "comment": "soaked in staging; ship it"})
    ps.wait_state(run.id, lambda r: r.state_name == "Running", 60, "the approved run to start again")
    started_in = time.monotonic() - asked
    done = ps.wait_state(run.id, lambda r: r.state is not None and r.state.is_final(), 300, "the promotion to end")
    assert done.state.is_completed(), done.state.message
    # Suspended, its process exited; the approval scheduled it again and serve ran it anew.
    names = [st.name for st in api(lambda c: c.read_flow_run_states(run.id))]
    assert names[names.index("Suspended"):] == ["Suspended", "Resuming", "Pending", "Submitting", "Running",
                                                "Completed"], names
    print(f"approval → Running again: {started_in:.2f} s")
    # serve polls every 900 s here: the resumed run started when its `Resuming` was announced, as soon as
    # its first execution's process had exited (seconds on a busy machine).
    assert started_in < 60, f"the resumed run waited {started_in:.1f} s for serve"
    assert _version("prod") == staging_tag and digest in ps.serving_digests("prod")

    report = ps.report(run.id, f"promote-{APP}-prod")
    assert "**completed**" in report and "approved by Ada Lovelace: soaked in staging; ship it" in report
    commit = next(ln.split("`")[1] for ln in report.splitlines() if ln.startswith("| Values commit |"))
    t = trailer_map(ps.commit_message(commit))
    assert t["delivery-promoted-from"] == "staging" and t["delivery-image-digest"] == digest
    assert t["delivery-approved-by"] == "Ada Lovelace"
    assert t["delivery-approval-comment"] == "soaked in staging; ship it"


def test_a_rejected_promotion_ends_cancelled_with_the_comment(ps, staging_tag):
    """Rejected in the form: Cancelled, the comment in the report, Git untouched."""
    before = ps.gitops_refs()
    run = ps.promote("staging", "prod", tag=staging_tag, timeout=0)
    _suspended(ps, run.id)
    _resume(run.id, {"approve": False, "approver": "Grace", "comment": "not during the freeze"})
    done = ps.wait_state(run.id, lambda r: r.state is not None and r.state.is_final(), 120, "the promotion to end")
    assert done.state.is_cancelled(), f"{done.state_name}: {done.state.message}"
    assert "rejected by Grace: not during the freeze" in done.state.message
    report = ps.report(run.id, f"promote-{APP}-prod")
    assert "**rejected**" in report and "not during the freeze" in report
    assert ps.gitops_refs() == before


def test_cli_promote_prints_the_run_and_where_to_approve_it(ps, staging_tag, capsys):
    """`delivery promote APP staging prod` starts the run, prints its URL and, once it waits, where the form is."""
    from delivery.cli import main

    assert main(["promote", APP, "staging", "prod", "--tag", staging_tag, "--reason", "from the CLI test"]) == 0
    out = capsys.readouterr().out
    assert f"promotion of {APP} from staging to prod: {ps.ui_url}/runs/flow-run/" in out
    url = out.split("to prod: ", 1)[1].split()[0]
    assert f"waiting for an approval: open {url} and click Resume" in out
    run_id = url.rsplit("/", 1)[1]
    _resume(run_id, {"approve": False, "approver": "cli-test", "comment": "only checking the CLI"})
    done = ps.wait_state(run_id, lambda r: r.state is not None and r.state.is_final(), 120, "the promotion to end")
    assert done.state.is_cancelled() and done.parameters["reason"] == "from the CLI test"


def test_an_approval_nobody_gives_ends_cancelled_after_the_timeout(ps, staging_tag):
    """No answer within approval_timeout: the run ends Cancelled, saying so; Git untouched."""
    before = ps.gitops_refs()
    run = ps.promote("staging", "prod", tag=staging_tag, timeout=0, approval_timeout=5)
    _suspended(ps, run.id)
    seen: list[str] = []

    def cancelled() -> Any:
        r = ps.read_run(run.id)
        seen.append(f"{r.state_name}: {r.state.message if r.state else ''}")
        return r if r.state is not None and r.state.is_cancelled() else None
    # Prefect's server fails an expired suspension; the automation makes that Cancelled a moment later.
    try:
        done = wait_for(cancelled, 90, "the approval to time out", interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; the run was last {seen[-1] if seen else 'unread'}") from None
    assert done.state.message == TIMED_OUT_MESSAGE
    assert ps.gitops_refs() == before


def test_a_tag_verified_too_recently_for_the_soak_is_refused(ps, dev_source):
    """staging with soak: 1h refuses a tag dev verified seconds ago, saying when it may go; Git untouched."""
    tag = _verified_in_dev(ps, dev_source, "not soaked yet")
    ps.write_config(auto=False, staging={"soak": "1h"})
    try:
        before = ps.gitops_refs()
        run = ps.promote("dev", "staging", tag=tag)
    finally:
        ps.write_config(auto=False)
    assert run.state.is_failed(), run.state.message
    assert f"{tag} has been verified in dev for " in run.state.message
    assert "staging needs 1h (soak): promote it after " in run.state.message
    assert ps.gitops_refs() == before


def test_an_older_tag_than_the_target_runs_is_superseded(ps, dev_source, staging_tag):
    """Newest wins: promoting a tag dev verified before the one staging runs ends Cancelled, Git untouched."""
    newer = _verified_in_dev(ps, dev_source, "newer than the staging tag")
    assert ps.promote("dev", "staging", tag=newer).state.is_completed()
    before = ps.gitops_refs()
    run = ps.promote("dev", "staging", tag=staging_tag)
    assert run.state.is_cancelled(), f"{run.state_name}: {run.state.message}"
    assert f"superseded: staging already runs {newer}, verified in dev at " in run.state.message
    assert ps.gitops_refs() == before
    assert _version("staging") == newer


def test_after_the_approval_the_digest_is_checked_again(ps):
    """The image changes in the registry while the promotion waits: approved, it is refused, nothing written."""
    run = ps.promote("staging", "prod", timeout=0)
    _suspended(ps, run.id)
    tag = _last_verified(ps, "staging")
    _overwrite_in_registry(ps, tag)
    before = ps.gitops_refs()
    _resume(run.id, {"approve": True, "approver": "Ada", "comment": "go"})
    done = ps.wait_state(run.id, lambda r: r.state is not None and r.state.is_final(), 120, "the promotion to end")
    assert done.state.is_failed(), f"{done.state_name}: {done.state.message}"
    assert "changed since it was verified in staging" in done.state.message
    assert ps.gitops_refs() == before
