"""`make demo-real`: the demo's story (webhook-triggered deploys of two apps, a broken release rolled
back automatically, drift found and healed) on the real tier, through `delivery up --real`: the
Prefect server, `serve` and the webhook receiver beside the real Kubernetes and Argo CD.

It runs in this session's real sandbox directory (one real cluster per machine: its ports, bridge and
iptables chains are fixed), adding the Prefect server, serve and the receiver to it; the session's
teardown stops them with the cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from delivery.settings import PROJECT_ROOT
from sandbox.stack import stop_pid
from tests.demo.story import assert_story_told
from tests.fixtures_sandbox import free_port_block

pytestmark = [pytest.mark.real, pytest.mark.docker]


@pytest.mark.timeout(1800)
def test_demo_tells_the_story_on_the_real_tier(real, tmp_path: Path) -> None:
    base = free_port_block(count=8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELIVERY_", "PREFECT_"))}
    env.update(
        DELIVERY_SANDBOX_DIR=str(real.root), DELIVERY_PREFECT_PORT=str(base + 7),
        DELIVERY_WEBHOOK_PORT=str(base + 8), PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=os.pathsep.join([str(PROJECT_ROOT / ".tools" / "bin"), str(Path(sys.executable).parent),
                              os.environ.get("PATH", "")]),
    )
    try:
        res = subprocess.run([sys.executable, "-m", "sandbox.demo", "--real"], env=env, cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=1700, check=False)
    finally:
        stack = real.root / "stack.json"
        if stack.exists():
            st = json.loads(stack.read_text())
            for key in ("webhook_pid", "serve_pid"):
                stop_pid(st.get(key))
            stack.unlink()
    out = assert_story_told(res)
    assert "delivery up --real: a real Kubernetes and Argo CD" in out
