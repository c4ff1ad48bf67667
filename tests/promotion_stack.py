"""What the promotion tests (tests/flows/test_promote.py, tests/browser/) run on: the session's sandbox,
a Prefect server of their own (`prefect server start`, with its UI) and `python -m deployments.serve`
serving the deployments as `delivery up` does (Prefect's runner, our fork server). A suspended
promotion's process exits there, and its approval resumes it as a new execution, as for a user.

The config is a copy of the sandbox's, so a test can switch `auto` on and off (each flow run reads
the config when it starts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from uuid import UUID

import docker
import git
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from ruamel.yaml import YAML

from delivery.settings import PROJECT_ROOT, get_settings
from tests.fixtures_sandbox import _restore_env, _set_env
from tests.prefect_server import PrefectServer

APP = "workout-api"
DEV_REF = "refs/heads/release-dev"
FAST = {"sync_timeout": 120.0, "rollout_timeout": 60.0, "health_timeout": 60.0}


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout:.0f} s (last: {last!r})")


def api(fn: Callable[[Any], Any]) -> Any:
    """`await fn(client)` against the Prefect server in force."""
    async def go() -> Any:
        async with get_client() as c:
            return await fn(c)
    return run_coro_as_sync(go())


class PromotionStack:
    def __init__(self, sandbox: Any, home: Path) -> None:
        self.sandbox = sandbox
        self.home = home
        self.server = PrefectServer(home / "server")
        self.config = home / "delivery.yaml"
        self.serve: subprocess.Popen[bytes] | None = None
        self.serve_log = home / "serve.log"

    @property
    def ui_url(self) -> str:
        return self.server.api_url.removesuffix("/api")

    def write_config(self, *, auto: bool, **environments: dict[str, Any]) -> None:
        """The sandbox's config (dev → staging, staging → prod with approval) with staging's `auto` set
        and the given keys changed per environment."""
        yaml = YAML()
        data = yaml.load(Path(self.sandbox.config_file).read_text())
        for app in data["apps"].values():
            app["environments"]["staging"]["auto"] = auto
            for name, keys in environments.items():
                app["environments"][name].update(keys)
        tmp = self.config.with_suffix(".tmp")
        with open(tmp, "w") as f:
            yaml.dump(data, f)
        tmp.replace(self.config)

    @contextmanager
    def auto(self) -> Iterator[None]:
        self.write_config(auto=True)
        try:
            yield
        finally:
            self.write_config(auto=False)

    def start_serve(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=self.server.api_url, PREFECT_UI_URL=self.ui_url,
                   PREFECT_HOME=str(self.home / "client"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PYTHONPATH=str(PROJECT_ROOT), DELIVERY_CONFIG_FILE=str(self.config),
                   # Runs start only when the server announces them: a run that starts proves the announcement
                   # (a resumed run's `Resuming` among them) was heard, not that a poll came round.
                   DELIVERY_SERVE_POLL_SECONDS="900")
        with open(self.serve_log, "ab") as out:
            self.serve = subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=PROJECT_ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)

        def ready() -> bool:
            assert self.serve is not None and self.serve.poll() is None, self.serve_log.read_text()[-3000:]
            return "serving " in self.serve_log.read_text()
        wait_for(ready, 180, "serve to register the deployments")

    def stop_serve(self) -> None:
        if self.serve is None or self.serve.poll() is not None:
            return
        os.killpg(self.serve.pid, signal.SIGTERM)
        try:
            self.serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.serve.pid, signal.SIGKILL)
            self.serve.wait(10)

    # -- runs

    def run(self, name: str, parameters: dict[str, Any], timeout: float = 600) -> Any:
        """Run a deployment through serve and wait for its end (or `timeout=0`: return at once)."""
        run = run_deployment(name, parameters=parameters, timeout=timeout, poll_interval=1)
        if timeout:
            assert run.state is not None and run.state.is_final(), f"{run.name}: {run.state_name}\n" + \
                self.serve_log.read_text()[-3000:]
        return run

    def deploy_dev(self, sha: str) -> Any:
        return self.run("deploy/deploy", {"app": APP, "environment": "dev", "source_ref": DEV_REF,
                                          "source_sha": sha, **FAST})

    def promote(self, source: str, target: str, *, tag: str | None = None, timeout: float = 600, **kw: Any) -> Any:
        params = {"app": APP, "from_environment": source, "to_environment": target, "tag": tag, **FAST, **kw}
        return self.run("promote/promote", params, timeout=timeout)

    def read_run(self, run_id: Any) -> Any:
        return api(lambda c: c.read_flow_run(UUID(str(run_id))))

    def wait_state(self, run_id: Any, pred: Callable[[Any], bool], timeout: float, what: str) -> Any:
        def check() -> Any:
            r = self.read_run(run_id)
            return r if pred(r) else None
        return wait_for(check, timeout, what, interval=0.2)

    def promote_runs(self) -> list[Any]:
        return api(lambda c: c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"]))))

    def report(self, run_id: Any, key: str) -> str:
        async def read(c: Any) -> str:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(run_id))])), sort=ArtifactSort.CREATED_DESC)
            keyed = [a for a in arts if a.key == key]
            return str(keyed[0].data) if keyed else ""
        return api(read)

    # -- what Git, the registry and the cluster say

    def gitops_refs(self) -> dict[str, str]:
        """Every ref of the GitOps remote (branches, verification notes): "nothing written" is these unchanged."""
        out = git.Git().ls_remote(str(self.sandbox.gitops_remote))
        return {ref: sha for sha, ref in (ln.split("\t") for ln in out.splitlines())}

    def commit_message(self, sha: str) -> str:
        return git.Git(str(self.sandbox.gitops_remote)).log("-1", "--format=%B", sha)

    def notes(self) -> str:
        g = git.Git(str(self.sandbox.gitops_remote))
        with suppress(git.GitCommandError):
            return g.log("--notes=delivery", "--format=%N", "main")
        return ""

    def serving_digests(self, environment: str) -> set[str]:
        """The registry digests of the images the environment's running containers were made from."""
        client = docker.from_env()
        try:
            found = set()
            for c in client.containers.list(filters={"label": [f"delivery.sandbox/application={APP}-{environment}",
                                                                f"delivery.sandbox/root={Path(self.sandbox.root).resolve()}"]}):
                found |= {d.split("@", 1)[1] for d in (c.image.attrs.get("RepoDigests") or []) if "@" in d}
            return found
        finally:
            client.close()


def _start_with_ui(server: PrefectServer) -> None:
    """`server.start()`, with the UI told where its API is (it says port 4200 whatever `--port` is)."""
    import tests.prefect_server as module

    plain = module.prefect_server_env
    module.prefect_server_env = lambda home: {**plain(home), "PREFECT_UI_API_URL": server.api_url}
    try:
        server.start()
    finally:
        module.prefect_server_env = plain


@contextmanager
def promotion_stack(sandbox: Any, home: Path) -> Iterator[PromotionStack]:
    ps = PromotionStack(sandbox, home)
    _start_with_ui(ps.server)
    ps.write_config(auto=False)
    old = _set_env({"DELIVERY_CONFIG_FILE": str(ps.config)})
    try:
        ps.start_serve()
        with temporary_settings(updates={PREFECT_API_URL: ps.server.api_url, PREFECT_UI_URL: ps.ui_url}):
            yield ps
    finally:
        ps.stop_serve()
        ps.server.stop()
        _restore_env(old)
        get_settings.cache_clear()
