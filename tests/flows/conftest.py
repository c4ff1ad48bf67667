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


class SourceRepo:
    """A working clone of the sandbox's sample-app remote; commits go to the remote like a developer's."""

    def __init__(self, remote: str, path: Path) -> None:
        self.repo = git.Repo.clone_from(remote, path)
        self.path = path
        self.actor = git.Actor("dev", "dev@example.com")

    def commit(self, branch: str, *, healthy: bool = True, crash: bool = False, note: str = "",
               dockerfile_broken: bool = False, push: bool = True) -> str:
        self.repo.remotes.origin.fetch()
        self.repo.git.checkout("-B", branch, f"origin/{branch}")
        settings = self.path / "app" / "settings.env"
        lines = [ln for ln in settings.read_text().splitlines()
                 if not ln.startswith(("HEALTHY=", "CRASH_ON_START=", "# note:"))]
        lines += [f"HEALTHY={'true' if healthy else 'false'}", f"CRASH_ON_START={'true' if crash else 'false'}",
                  f"# note: {note}"]
        settings.write_text("\n".join(lines) + "\n")
        paths = ["app/settings.env"]
        dockerfile = self.path / "Dockerfile"
        text = dockerfile.read_text()
        marker = "RUN echo broken-step && exit 3\n"
        text = text.replace(marker, "")
        if dockerfile_broken:
            text = text.replace("\nCOPY ", f"\n{marker}COPY ", 1)
        dockerfile.write_text(text)
        paths.append("Dockerfile")
        self.repo.index.add(paths)
        self.repo.index.commit(f"change: {note}", author=self.actor, committer=self.actor)
        if push:
            self.repo.remotes.origin.push(f"{branch}:{branch}")
        return self.repo.head.commit.hexsha


@pytest.fixture(scope="session")
def stack(sandbox, prefect_api):
    """The sandbox plus a Prefect server, with settings re-read from the sandbox's environment."""
    get_settings.cache_clear()
    return sandbox


@pytest.fixture
def source(stack, tmp_path) -> SourceRepo:
    return SourceRepo(str(stack.source_remote), tmp_path / "src")


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
