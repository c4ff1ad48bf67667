"""`delivery up` / `delivery down`: the sandbox (when the config in force is the sandbox's), the
Prefect server, the `serve` process and the webhook receiver, each logged under `.sandbox/logs/`.

Processes are tracked by the pids recorded in `.sandbox/stack.json` and stopped by those pids,
never by name, so `down` cannot hit anything it did not start."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from delivery.errors import SandboxError
from delivery.settings import PROJECT_ROOT, get_settings

WEBHOOK_PORT = int(os.environ.get("DELIVERY_WEBHOOK_PORT", "8080"))


@dataclass
class StackState:
    prefect_api_url: str
    prefect_ui_url: str
    webhook_url: str
    serve_pid: int | None = None
    webhook_pid: int | None = None
    sandbox: bool = True


def _state_file() -> Path:
    return get_settings().sandbox_dir / "stack.json"


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_pid(pid: int | None, timeout: float = 10.0) -> None:
    if not alive(pid):
        return
    assert pid is not None
    try:
        os.killpg(pid, signal.SIGTERM)  # the parts run in their own session: stop their children too
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except (urllib.error.URLError, OSError):
        return False


def webhook_secret_file() -> Path:
    return get_settings().sandbox_dir / "webhook-secret"


def sandbox_webhook_secret() -> str:
    """The sandbox's webhook secret: made once, kept in a 0600 file, never printed."""
    s = get_settings()
    if s.webhook_secret is not None:
        return s.webhook_secret.get_secret_value()
    f = webhook_secret_file()
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(secrets.token_hex(32))
        f.chmod(0o600)
    return f.read_text().strip()


def _targets_sandbox() -> bool:
    s = get_settings()
    return s.resolved_config_file() == s.sandbox_config_file


def up(*, webhook_port: int = WEBHOOK_PORT, real: bool = False) -> StackState:
    """The sandbox (on the emulators, or with `real` on a real Kubernetes and Argo CD), the Prefect
    server, the serve process and the webhook receiver; what already runs is kept."""
    s = get_settings()
    logs = s.sandbox_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    old = read_state()
    env = dict(os.environ)
    if _targets_sandbox():
        from sandbox.manager import Sandbox

        sb = Sandbox(s.sandbox_dir, prefect=True, real=real)
        was_real = (sb._load().get("options") or {}).get("real")
        if was_real is not None and bool(was_real) != real:
            raise SandboxError(f"{s.sandbox_dir} holds a sandbox on the {'real tier' if was_real else 'emulators'}; "
                               "`delivery sandbox reset` it first (or set DELIVERY_SANDBOX_DIR to another directory)")
        st = sb.up()
        api = st.prefect_api_url
        env.update(DELIVERY_CONFIG_FILE=str(st.config_file), DELIVERY_KUBECONFIG=str(st.kubeconfig))
    else:
        api = os.environ.get("PREFECT_API_URL", "")
        if not api:
            raise SandboxError("the config does not target the sandbox: set PREFECT_API_URL to your Prefect server")
    ui = api.removesuffix("/api")
    env.update(
        PREFECT_API_URL=api, PREFECT_UI_URL=ui, PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DELIVERY_WEBHOOK_SECRET=sandbox_webhook_secret(),
        PYTHONPATH=str(PROJECT_ROOT),
    )
    webhook_url = f"http://127.0.0.1:{webhook_port}"
    if old and alive(old.webhook_pid):
        webhook_url = old.webhook_url  # the running receiver keeps the port it was started on
    state = StackState(prefect_api_url=api, prefect_ui_url=ui, webhook_url=webhook_url, sandbox=_targets_sandbox())
    state.serve_pid = old.serve_pid if old and alive(old.serve_pid) else _spawn(
        [sys.executable, "-m", "deployments.serve"], env, logs / "serve.log")
    state.webhook_pid = old.webhook_pid if old and alive(old.webhook_pid) else _spawn(
        [sys.executable, "-m", "delivery.cli", "webhook", "serve", "--port", str(webhook_port)], env,
        logs / "webhook.log")
    _state_file().write_text(json.dumps(asdict(state), indent=2))
    deadline = time.monotonic() + 60
    while not _answers(f"{state.webhook_url}/healthz"):
        if time.monotonic() > deadline or not alive(state.webhook_pid):
            raise SandboxError(f"the webhook receiver did not come up; see {logs / 'webhook.log'}")
        time.sleep(0.3)
    # serve() registers the deployments a few seconds after it starts; until then a push would be
    # answered 503, so `up` is not done before they exist.
    deadline = time.monotonic() + 120
    while not all(_deployment_exists(api, name) for name in SERVED_DEPLOYMENTS):
        if time.monotonic() > deadline or not alive(state.serve_pid):
            raise SandboxError(f"the serve process did not register the deployments; see {logs / 'serve.log'}")
        time.sleep(0.5)
    return state


SERVED_DEPLOYMENTS = ("deploy/deploy", "rollback/rollback", "drift-check/drift-check", "promote/promote")


def _deployment_exists(api_url: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/deployments/name/{name}", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    return p.pid


def read_state() -> StackState | None:
    f = _state_file()
    if not f.exists():
        return None
    try:
        return StackState(**json.loads(f.read_text()))
    except (ValueError, TypeError):
        return None


def down() -> None:
    st = read_state()
    if st:
        stop_pid(st.webhook_pid)
        stop_pid(st.serve_pid)
        _state_file().unlink(missing_ok=True)
    if st is None or st.sandbox:
        from sandbox.manager import Sandbox

        Sandbox(get_settings().sandbox_dir).down()


def status_lines() -> list[str]:
    st = read_state()
    if not st:
        return ["stack: not started (delivery up)"]
    return [
        f"prefect ui      {st.prefect_ui_url}  {'answering' if _answers(st.prefect_api_url + '/health') else 'DOWN'}",
        f"serve           pid {st.serve_pid}  {'running' if alive(st.serve_pid) else 'DOWN'}",
        f"webhook         {st.webhook_url}/webhooks/github  "
        f"{'answering' if _answers(st.webhook_url + '/healthz') else 'DOWN'}",
    ]
