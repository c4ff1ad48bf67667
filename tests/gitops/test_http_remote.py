"""Git over real HTTP: a token-authenticated remote (`git http-backend` behind basic auth), and a remote
that accepts the connection and never answers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from delivery.errors import GitError
from delivery.settings import get_settings
from tasks.gitops import checkout, commit_and_push
from tasks.records import record_verified, verified_tags
from tasks.trailers import commit_message
from tasks.values import bump_image_tag
from tests.git_http import GitHttpServer, HangingListener
from tests.gitops.conftest import AUTHOR, remote_log, run_git

TOKEN = "ghp_httpRemoteTest0123456789"  # secret-scan: allow (test fixture)


@pytest.fixture
def served(remote: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DELIVERY_GIT_TOKEN", TOKEN)
    get_settings.cache_clear()
    with GitHttpServer(remote.parent, TOKEN) as server:
        yield server, server.url(remote.name)


def test_token_remote_clone_push_and_notes(served, remote: Path, clone_dir) -> None:
    """With the token setting, clone, push and notes go through; the token is in no file of the clone."""
    server, url = served
    repo = checkout(url, "main", clone_dir("a"))
    values = Path(repo.working_tree_dir) / "envs/dev/values.yaml"
    bump_image_tag(values, "http-1")
    result = commit_and_push(repo, [values], commit_message("bump", "http-1", app="workout-api", environment="dev"),
                             author=AUTHOR)
    record_verified(repo, result.sha, app="workout-api", environment="dev", tag="http-1")
    assert remote_log(remote)[0][0] == result.sha
    assert verified_tags(repo, "workout-api", "dev")[0][:2] == (result.sha, "http-1")
    assert server.requests > 0
    for f in Path(clone_dir("a")).rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert run_git(clone_dir("a"), "config", "--get", "remote.origin.url").strip() == url


def test_without_the_token_the_remote_refuses_and_says_so(served, clone_dir, monkeypatch) -> None:
    """No token: the forge answers 401; the error is final (not retried) and names the remote."""
    server, url = served
    monkeypatch.delenv("DELIVERY_GIT_TOKEN")
    get_settings.cache_clear()
    with pytest.raises(GitError) as err:
        checkout(url, "main", clone_dir("b"))
    assert not err.value.transient
    assert url in str(err.value)
    assert server.refused >= 1 and server.requests == 0


def test_a_remote_that_never_answers_is_bounded(clone_dir, monkeypatch) -> None:
    """A listener that accepts and never answers: the checkout ends after the bound, naming the remote and
    the seconds, with the attempts the settings allow; no half-clone is left behind."""
    monkeypatch.setenv("DELIVERY_GIT_TIMEOUT_SECONDS", "1.5")
    monkeypatch.setenv("DELIVERY_GIT_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("DELIVERY_GIT_RETRY_SECONDS", "30")
    get_settings.cache_clear()
    with HangingListener() as hang:
        url = hang.url("gitops.git")
        started = time.monotonic()
        with pytest.raises(GitError) as err:
            checkout(url, "main", clone_dir("hang"))
        elapsed = time.monotonic() - started
    msg = str(err.value)
    assert "gave up after 2 attempt(s)" in msg, msg
    assert f"git clone {url} did not finish within 1.5 s" in msg, msg
    assert hang.accepted >= 2
    assert 3.0 <= elapsed < 10, elapsed
    assert not clone_dir("hang").exists()
