"""Fixtures for the GitOps tests: an isolated git environment, a bare "remote" seeded with Helm values
files for two environments, and clones of it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from delivery.settings import get_settings

HERE = Path(__file__).parent
AUTHOR = ("Test Pusher", "pusher@example.test")
VALUES_FILES = ("envs/dev/values.yaml", "envs/prod/values.yaml")


def run_git(cwd: Path, *args: str) -> str:
    """Run git for test set-up and inspection; fails the test on a non-zero exit."""
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"git {' '.join(args)} failed: {res.stderr}"
    return res.stdout


@pytest.fixture(autouse=True)
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No global or system git config, a fixed identity, no token from the caller's environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    for var in ("NAME", "EMAIL"):
        monkeypatch.setenv(f"GIT_AUTHOR_{var}", AUTHOR[0] if var == "NAME" else AUTHOR[1])
        monkeypatch.setenv(f"GIT_COMMITTER_{var}", AUTHOR[0] if var == "NAME" else AUTHOR[1])
    monkeypatch.delenv("DELIVERY_GIT_TOKEN", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare repository holding `main` with a commented values file per environment."""
    bare = tmp_path / "remote.git"
    run_git(tmp_path, "init", "--bare", "-q", "-b", "main", str(bare))
    seed = tmp_path / "seed"
    run_git(tmp_path, "clone", "-q", str(bare), str(seed))
    run_git(seed, "checkout", "-q", "-b", "main")
    for rel in VALUES_FILES:
        (seed / rel).parent.mkdir(parents=True)
        shutil.copy(HERE / "values.yaml", seed / rel)
    (seed / "README.md").write_text("GitOps repository for workout-api\n")
    run_git(seed, "add", ".")
    run_git(seed, "commit", "-q", "-m", "Initial values")
    run_git(seed, "push", "-q", "origin", "main")
    return bare


@pytest.fixture
def clone_dir(tmp_path: Path) -> Callable[[str], Path]:
    """A fresh directory name under tmp_path for a work tree."""
    return lambda name: tmp_path / "work" / name


def remote_log(bare: Path, branch: str = "main") -> list[tuple[str, str]]:
    """(sha, subject) of every commit on the remote branch, newest first."""
    out = run_git(bare, "log", "--format=%H%x1f%s", branch)
    return [tuple(line.split("\x1f", 1)) for line in out.splitlines()]  # type: ignore[misc]
