"""`make demo` end to end, and `delivery up | status | down`, on a stack of their own.

The stack runs in a temporary DELIVERY_SANDBOX_DIR on free ports (DELIVERY_PREFECT_PORT,
DELIVERY_WEBHOOK_PORT, DELIVERY_APP_PORT_BASE), never on the project's `.sandbox/`, 4200 or 8080
that a developer's stack may be using."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from delivery.settings import PROJECT_ROOT
from sandbox import engine
from sandbox.manager import LABEL
from sandbox.stack import alive
from tests.demo.story import assert_story_told
from tests.fixtures_sandbox import free_port_block

DELIVERY = str(Path(sys.executable).with_name("delivery"))


class DemoStack:
    def __init__(self, root: Path) -> None:
        # Two apps of three environments each on base+1..6, then Prefect and the webhook receiver.
        base = free_port_block(count=8)
        self.root = root / "sandbox"
        self.app_ports = [base + i for i in range(1, 7)]
        self.prefect_port, self.webhook_port = base + 7, base + 8
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DELIVERY_", "PREFECT_"))}
        self.env.update(
            DELIVERY_SANDBOX_DIR=str(self.root), DELIVERY_APP_PORT_BASE=str(base),
            DELIVERY_PREFECT_PORT=str(self.prefect_port), DELIVERY_WEBHOOK_PORT=str(self.webhook_port),
            PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PATH=os.pathsep.join([str(PROJECT_ROOT / ".tools" / "bin"), str(Path(sys.executable).parent),
                                  os.environ.get("PATH", "")]),
        )

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def delivery(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.run(DELIVERY, *args, timeout=timeout)

    def pids(self) -> dict[str, int]:
        """Every process the stack recorded as its own."""
        out: dict[str, int] = {}
        stack = self.root / "stack.json"
        if stack.exists():
            st = json.loads(stack.read_text())
            out.update({k: v for k, v in st.items() if k.endswith("_pid") and v})
        state = self.root / "state.json"
        if state.exists():
            parts = json.loads(state.read_text()).get("parts", {})
            out.update({k: p["pid"] for k, p in parts.items() if p.get("pid") and not p.get("external")})
        return out

    def containers(self) -> list[str]:
        client = docker.from_env()
        try:
            return [c.name for c in client.containers.list(all=True, filters={"label": [
                f"{LABEL}/managed=true", f"{LABEL}/root={self.root.resolve()}"]})]
        finally:
            client.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status < 500
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    s = DemoStack(tmp_path_factory.mktemp("demo"))
    try:
        yield s
    finally:
        s.delivery("down", timeout=180)


def _assert_story(res: subprocess.CompletedProcess[str], s: DemoStack) -> None:
    out = assert_story_told(res)
    assert "when" in out and "rolled-back" in out and "completed" in out
    for line in ("Deployment frequency:", "Median lead time (push received → verified healthy):",
                 "Change failure rate: 33%", "Median time to restore (failed deploy → verified rollback):"):
        assert line in out, line
    assert f"Prefect UI: http://127.0.0.1:{s.prefect_port}" in out
    # dev's verified release promoted to staging by itself; the promotion to prod waits for its approval.
    assert "promotion ended Completed; staging answers: 200" in out
    assert f"waiting for an approval, holding no lock: open http://127.0.0.1:{s.prefect_port}/runs/flow-run/" in out


@pytest.mark.timeout(1800)
def test_demo_tells_the_whole_story_twice(demo_stack):
    """The demo deploys, rolls back a broken release, finds drift and prints history; and again on a re-run."""
    first = demo_stack.run(sys.executable, "-m", "sandbox.demo", timeout=900)
    _assert_story(first, demo_stack)
    pids = demo_stack.pids()
    second = demo_stack.run(sys.executable, "-m", "sandbox.demo", timeout=900)
    _assert_story(second, demo_stack)
    # The re-run used the running stack and found the first run's deploys in the history.
    assert demo_stack.pids() == pids
    history = second.stdout[second.stdout.index("when "):]
    assert history.count(" completed ") >= 2 and history.count(" rolled-back ") >= 2


def test_up_twice_is_harmless(demo_stack):
    """A second `delivery up` starts nothing new: the same processes keep running and answering."""
    first = demo_stack.delivery("up")
    assert first.returncode == 0, first.stdout + first.stderr
    pids = demo_stack.pids()
    assert {"serve_pid", "webhook_pid", "prefect", "kube", "argocd"} <= set(pids)
    second = demo_stack.delivery("up")
    assert second.returncode == 0, second.stdout + second.stderr
    assert demo_stack.pids() == pids
    assert f"Webhook receiver: http://127.0.0.1:{demo_stack.webhook_port}/webhooks/github" in second.stdout
    assert all(alive(p) for p in pids.values())


def test_status_reports_everything_answering(demo_stack):
    """`delivery status` exits 0 and every part, app and stack process answers."""
    assert demo_stack.delivery("up").returncode == 0
    res = demo_stack.delivery("status", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    for name in ("dockerd", "registry", "git", "kube", "argocd", "prefect", "workout-api-dev",
                 "workout-api-staging", "workout-api-prod"):
        line = next(ln for ln in lines if ln.startswith(name + " "))
        assert " answering " in line and "not answering" not in line, line
    assert f"http://127.0.0.1:{demo_stack.prefect_port}  answering" in res.stdout
    assert next(ln for ln in lines if ln.startswith("serve ")).endswith("running")
    assert next(ln for ln in lines if ln.startswith("webhook ")).endswith("answering")
    assert "DOWN" not in res.stdout


def test_down_stops_what_up_started(demo_stack):
    """`delivery down` stops every recorded process and app container, and leaves the shared registry alone."""
    assert demo_stack.delivery("up").returncode == 0
    pids = demo_stack.pids()
    assert demo_stack.containers()
    res = demo_stack.delivery("down", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert demo_stack.containers() == []
    for port in (demo_stack.prefect_port, demo_stack.webhook_port, *demo_stack.app_ports):
        assert not _answers(f"http://127.0.0.1:{port}/"), port
    assert engine.registry_ok()
    status = demo_stack.delivery("status", timeout=120)
    assert "stack: not started (delivery up)" in status.stdout
