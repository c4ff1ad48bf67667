"""Fixtures for end-to-end flow tests: the sandbox, a Prefect server, and a clone of the sample
app's source repository to push commits from."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import git
import pytest

from delivery.settings import get_settings
from tests.source_clone import SourceClone


@pytest.fixture(scope="session")
def stack(sandbox, prefect_api):
    """The sandbox plus a Prefect server, with settings re-read from the sandbox's environment."""
    get_settings.cache_clear()
    return sandbox


@pytest.fixture
def source(stack, tmp_path) -> SourceClone:
    return SourceClone(str(stack.source_remote), tmp_path / "src")


def gitops_log(remote: str, tmp: Path, path: str, n: int = 10) -> list[tuple[str, str]]:
    """(sha, subject) of the newest commits touching `path` on the GitOps remote's main branch."""
    out = git.Repo.clone_from(remote, tmp / "gitops-log", branch="main") if not (tmp / "gitops-log").exists() \
        else git.Repo(tmp / "gitops-log")
    out.remotes.origin.fetch()
    out.git.reset("--hard", "origin/main")
    return [(c.hexsha, c.summary) for c in out.iter_commits("origin/main", paths=path, max_count=n)]


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
