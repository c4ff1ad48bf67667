"""The `sandbox` fixture: one whole sandbox (Kubernetes API and Argo CD emulators, Git remotes, the
initial image) per test session, in a temporary directory, torn down at the end.

Loaded as a plugin from tests/conftest.py so every test area can ask for it. While it is up,
DELIVERY_SANDBOX_DIR, DELIVERY_CONFIG_FILE and DELIVERY_KUBECONFIG point at it, so product code that
reads the settings finds the sandbox as it would after `delivery sandbox up`.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port_block(count: int = 6) -> int:
    """A base port such that base+1 .. base+count are free now (below the ephemeral range, so that
    outgoing connections do not grab them later)."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10000, 19000, 10)
        socks = []
        try:
            for port in range(base + 1, base + count + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports found")


def _set_env(values: dict[str, str]) -> dict[str, str | None]:
    from delivery.settings import get_settings

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    return old


def _restore_env(old: dict[str, str | None]) -> None:
    from delivery.settings import get_settings

    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A running sandbox (no Prefect server; Argo CD polls every 180 s, so tests use the refresh
    annotation or start their own emulator for a short interval); yields its `SandboxState`."""
    from sandbox.manager import Sandbox

    root = tmp_path_factory.mktemp("sandbox")
    sb = Sandbox(root, prefect=False, reconcile_interval=180,
                 app_port_base=free_port_block())
    with running(sb) as state:
        yield state


@contextmanager
def running(sb: object, extra_env: dict[str, str] | None = None) -> Iterator[object]:
    """`sb` up, with the settings pointing at it while it lives; down afterwards (also on a failed up)."""
    try:
        state = sb.up()
    except BaseException:
        sb.down()
        raise
    old = _set_env({"DELIVERY_SANDBOX_DIR": str(state.root), "DELIVERY_CONFIG_FILE": str(state.config_file),
                    "DELIVERY_KUBECONFIG": str(state.kubeconfig), **(extra_env or {})})
    try:
        yield state
    finally:
        _restore_env(old)
        sb.down()
