"""Fixtures for the deployment tests: the real `prefect` CLI against the session's Prefect server,
and process workers started the way the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from delivery.settings import PROJECT_ROOT

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "delivery-pool"


def cli_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment pointed at `api_url`, with a Prefect home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_CLI_PROMPT="false", **extra)
    return env


def prefect_cli(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PREFECT, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def registered(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The work pool and `prefect deploy --all` from the project root, as the README describes."""
    env = cli_env(prefect_api, tmp_path_factory.mktemp("prefect-home"))
    pool = prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stdout + pool.stderr
    res = prefect_cli(["--no-prompt", "deploy", "--all"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return env


@contextmanager
def worker(env: dict[str, str], cwd: Path, log: Path) -> Iterator[Path]:
    """`prefect worker start --pool delivery-pool` in `cwd`, stopped (with its flow runs) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield log
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.2)
        with suppress(ProcessLookupError):  # flow-run processes the worker left behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
