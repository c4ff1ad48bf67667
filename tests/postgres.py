"""A private PostgreSQL cluster for the tests that run Prefect's server on it (scripts/postgres.sh)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from delivery.settings import PROJECT_ROOT
from sandbox.manager import free_port


@contextmanager
def private_postgres() -> Iterator[tuple[str, str]]:
    """A cluster on a free loopback port, removed at the end: (connection URL, its password). The URL
    carries the password: hand it to a server through its environment, never its arguments."""
    # Not under pytest's tmp dir: that one is private to root, and the cluster belongs to `postgres`.
    top = Path(tempfile.mkdtemp(prefix="delivery-pg-"))
    top.chmod(0o755)
    script = PROJECT_ROOT / "scripts" / "postgres.sh"
    try:
        res = subprocess.run(["bash", str(script), "start", str(top / "pg"), str(free_port())],
                             capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        url = res.stdout.strip().splitlines()[-1]
        assert url.startswith("postgresql+asyncpg://"), "postgres.sh printed no connection URL"
        yield url, (top / "pg" / "password").read_text().strip()
    finally:
        subprocess.run(["bash", str(script), "stop", str(top / "pg")], capture_output=True, timeout=120,
                       check=False)
        shutil.rmtree(top, ignore_errors=True)
