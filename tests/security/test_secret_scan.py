"""Known secret values configured for real (registry password, webhook secret, Git token) go through
representative flows: a deploy on the sandbox, a registry push with credentials (and one with a wrong
password), Git over a token-authenticated HTTP remote (and one that fails), and a webhook delivery.
Then every captured log line, every Prefect log, artifact and flow-run parameter, every commit
(message, notes and file contents) of the repositories involved, the argv of every child process
sampled during the run, and every file under the work directories and the sandbox state is scanned:
zero hits."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import bcrypt
import docker
import git
import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.utilities.asyncutils import run_coro_as_sync

from delivery.errors import DeliveryError
from delivery.settings import get_settings
from deployments.webhook import PrefectStarter, create_app
from flows.deploy import deploy
from sandbox.demo import runs_of
from sandbox.manager import IMAGE_REPOSITORY
from tasks import gitops, images, values
from tests.faults.conftest import OwnRegistry
from tests.git_http import GitHttpServer
from tests.source_clone import SourceClone
from tests.webhook.helpers import ServerThread, deploy_stub, make_config, payload, signed_headers

WRONG_SECRET = "x"  # secret-scan: allow (a wrong signature key on purpose)

pytestmark = [pytest.mark.docker, pytest.mark.sandbox]

REGISTRY_PASSWORD = f"regpw-{uuid.uuid4().hex}"
WEBHOOK_SECRET = f"whsec-{uuid.uuid4().hex}"
GIT_TOKEN = f"ghp_{uuid.uuid4().hex}"
WRONG_PASSWORD = f"not-the-password-{uuid.uuid4().hex[:8]}"
SECRETS = {"registry password": REGISTRY_PASSWORD, "webhook secret": WEBHOOK_SECRET, "git token": GIT_TOKEN}


@flow(name="secret-scan-registry")
def push_with_credentials(image: str, tag: str) -> str:
    creds = images.registry_credentials(get_settings())
    pushed = images.push_image_task(image, [tag], credentials=creds, max_attempts=1, max_seconds=30)
    try:
        wrong = images.RegistryCredentials("ci", type(creds.password)(WRONG_PASSWORD))
        images.push_image(image, [tag], credentials=wrong, max_attempts=1, max_seconds=20)
    except DeliveryError as e:
        images.get_logger().warning(f"as expected: {e}")
    return pushed.digest


@flow(name="secret-scan-git")
def git_over_http(url: str, unreachable: str, workdir: str) -> str:
    repo = gitops.checkout_task(url, "main", Path(workdir))
    path = "helm/workout-api/values-staging.yaml"
    values.bump_image_tag_task(Path(workdir) / path, "secret-scan-1")
    result = gitops.commit_and_push_task(repo, [path], "chore(helm): update image tag to secret-scan-1",
                                         author=("delivery-bot", "bot@example.com"), branch="main")
    try:
        gitops.checkout(unreachable, "main", Path(workdir + "-unreachable"))
    except DeliveryError as e:
        gitops.get_logger().warning(f"as expected: {e}")
    return result.sha


async def _everything_in_prefect(run_ids: list[Any]) -> list[tuple[str, str]]:
    """(what, text) of every log line of our runs, every artifact and every flow run's parameters."""
    out: list[tuple[str, str]] = []
    async with get_client() as c:
        runs = await c.read_flow_runs(limit=200)
        runs += await c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
        for r in runs:
            out.append((f"parameters of {r.name}", json.dumps(r.parameters, default=str)))
            out.append((f"state of {r.name}", str(r.state.message if r.state else "")))
        offset = 0
        while True:
            logs = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), limit=200,
                                     offset=offset)
            out += [(f"log of run {lg.flow_run_id}", lg.message) for lg in logs]
            if len(logs) < 200:
                break
            offset += 200
        offset = 0
        while True:
            arts = await c.read_artifacts(limit=200, offset=offset)
            out += [(f"artifact {a.key}", json.dumps([a.data, a.description, a.metadata_], default=str))
                    for a in arts]
            if len(arts) < 200:
                break
            offset += 200
    return out


class ChildArgvSampler(threading.Thread):
    """Samples `/proc/<pid>/cmdline` of every descendant of this process, every few milliseconds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.argv: set[str] = set()
        self.seen = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            parents: dict[int, int] = {}
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, IndexError, ValueError):
                        continue
            for pid in parents:
                p, hops = pid, 0
                while p > 1 and p != me and hops < 50:
                    p, hops = parents.get(p, 0), hops + 1
                if p == me and pid != me:
                    try:
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
                    except OSError:
                        continue
                    if argv:
                        self.seen += 1
                        self.argv.add(argv)
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _files_under(*roots: Path, limit: int = 64 * 1024 * 1024) -> dict[Path, bytes]:
    out: dict[Path, bytes] = {}
    for root in roots:
        for f in root.rglob("*"):
            try:
                if f.is_file() and not f.is_symlink() and f.stat().st_size <= limit:
                    out[f] = f.read_bytes()
            except OSError:
                continue
    return out


def _git_everything(repo: Path) -> str:
    """Every commit message, note and file content reachable from any ref, as one text."""
    return subprocess.run(["git", "log", "--all", "-p", "--binary", "--format=%H%n%B%n%N"], cwd=repo,
                          capture_output=True, text=True, check=True, errors="replace").stdout


def test_no_secret_anywhere(sandbox, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture) -> None:
    """Deploy, registry push, Git over https and a webhook with real secrets: no secret in any log,
    artifact, parameter, answer or commit."""
    caplog.set_level(logging.DEBUG)
    for k, v in {"DELIVERY_REGISTRY_USERNAME": "ci", "DELIVERY_REGISTRY_PASSWORD": REGISTRY_PASSWORD,
                 "DELIVERY_GIT_TOKEN": GIT_TOKEN, "DELIVERY_WEBHOOK_SECRET": WEBHOOK_SECRET,
                 "DELIVERY_WORK_DIR": str(tmp_path / "work")}.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    run_ids: list[Any] = []
    texts: list[tuple[str, str]] = []
    sampler = ChildArgvSampler()
    sampler.start()

    # 1. A deploy on the sandbox, with every secret configured.
    src = SourceClone(str(sandbox.source_remote), tmp_path / "src")
    sha = src.commit("main", note="secret scan")
    state = deploy(app="workout-api", environment="staging", source_ref="refs/heads/main", source_sha=sha,
                   return_state=True, sync_timeout=120.0, rollout_timeout=60.0, health_timeout=60.0)
    assert state.is_completed(), state.message
    run_ids.append(state.state_details.flow_run_id)

    # 2. A push to a registry that wants the password, and one with a wrong password.
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(REGISTRY_PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    reg = OwnRegistry(tmp_path / "registry", htpasswd=htpasswd)
    reg.start()
    try:
        image = f"{reg.addr}/secret-scan"
        client = docker.from_env(timeout=120)
        try:
            client.images.get(f"{IMAGE_REPOSITORY}:{sandbox.initial_tag}").tag(image, "v1")
            st = push_with_credentials(image, "v1", return_state=True)
            client.images.remove(f"{image}:v1")
        finally:
            client.close()
        assert st.is_completed(), st.message
        run_ids.append(st.state_details.flow_run_id)
        texts.append(("registry log", reg.requests()))
    finally:
        reg.kill()

    # 3. Git over a token-authenticated HTTP remote (git http-backend behind basic auth), and one
    #    that refuses the connection.
    bare = tmp_path / "org" / "gitops.git"
    git.Repo.clone_from(str(sandbox.gitops_remote), bare, bare=True)
    with GitHttpServer(bare.parent, GIT_TOKEN) as server:
        st = git_over_http(server.url("gitops.git"), "http://127.0.0.1:9/org/none.git",
                           str(tmp_path / "work" / "http-clone"), return_state=True)
    assert st.is_completed(), st.message
    assert server.requests > 0, "the token opened the remote"
    run_ids.append(st.state_details.flow_run_id)
    assert "secret-scan-1" in _git_everything(bare), "the push over HTTP went through"

    # 4. A signed webhook delivery that creates a run (of a stand-in deployment, deleted afterwards).
    dep_name = f"secret-scan-{uuid.uuid4().hex[:6]}"
    deploy_stub.to_deployment(name=dep_name).apply()
    app = create_app(secret=get_settings().webhook_secret.get_secret_value(), config_loader=make_config,
                     starter=PrefectStarter(deployment_name=f"deploy/{dep_name}"))
    with ServerThread(app) as server:
        body = json.dumps(payload("push_branch.json")).encode()
        r = httpx.post(f"{server.url}/webhooks/github", content=body,
                       headers=signed_headers(body, secret=WEBHOOK_SECRET), timeout=60)
        bad = httpx.post(f"{server.url}/webhooks/github", content=body,
                         headers={**signed_headers(body, secret=WRONG_SECRET), "X-Hub-Signature-256": WEBHOOK_SECRET},
                         timeout=60)
        assert r.status_code == 202 and bad.status_code == 401, (r.text, bad.text)
        # The receiver acknowledges once the delivery is stored and creates the runs right after.
        webhook_runs = [x["flow_run_id"] for x in runs_of(r.json())]
        delivery_view = httpx.get(r.json()["status_url"], timeout=30).text
    texts += [("webhook answer", r.text), ("webhook refusal", bad.text), ("webhook delivery status", delivery_view)]
    assert webhook_runs

    try:
        texts += run_coro_as_sync(_everything_in_prefect([*run_ids, *webhook_runs]))
    finally:
        async def delete() -> None:
            async with get_client() as c:
                for rid in webhook_runs:
                    await c.delete_flow_run(rid)
        run_coro_as_sync(delete())

    texts.append(("captured logs", caplog.text))
    for repo in (sandbox.gitops_remote, sandbox.source_remote, bare):
        texts.append((f"commits of {repo.name}", _git_everything(repo)))
    assert sum(1 for what, _ in texts if what.startswith("log of run")) > 20, "the runs' logs were read"

    # Every child process seen during the run (git, docker, helm, ...): its argv.
    sampler.stop()
    assert sampler.seen > 10 and any(a.startswith("git\0") for a in sampler.argv), "children were sampled"
    texts += [("argv of a child process", a.replace("\0", " ")) for a in sampler.argv]
    # Every file under the work directories and the sandbox state.
    files = _files_under(tmp_path / "work", Path(sandbox.root))
    assert len(files) > 50, "the work directories and the sandbox state were read"
    hits = [f"{name} in {what}" for what, text in texts for name, value in SECRETS.items() if value in text]
    hits += [f"{name} in file {f}" for f, data in files.items() for name, value in SECRETS.items()
             if value.encode() in data]
    assert hits == []
