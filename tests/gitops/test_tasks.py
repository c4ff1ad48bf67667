"""The Prefect task layer over the GitOps functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.states import Failed

from delivery.errors import GitError, GitPushError, ValuesError
from tasks.gitops import (
    _retry_if_transient,
    bump_image_tag_task,
    checkout,
    checkout_commit_task,
    checkout_task,
    commit_and_push_task,
    commit_message,
    last_verified_tag,
    record_verified_task,
)
from tests.gitops.conftest import AUTHOR, remote_log, run_git


@pytest.fixture(scope="module")
def prefect_harness(prefect_api) -> Iterator[None]:
    """The session's Prefect server (tests/conftest.py): one start-up for the whole suite."""
    yield


def test_retry_condition_only_retries_transient_errors() -> None:
    """Only transient delivery errors (connection trouble, lost races) are retried by Prefect."""
    assert _retry_if_transient(None, None, Failed(data=GitError("connection refused", transient=True)))
    assert not _retry_if_transient(None, None, Failed(data=GitPushError("hook declined", transient=False)))
    assert not _retry_if_transient(None, None, Failed(data=ValuesError("no key")))
    assert not _retry_if_transient(None, None, Failed(data=ValueError("bug")))
    assert commit_and_push_task.retries == 2 and commit_and_push_task.retry_jitter_factor
    assert (checkout_task.name, bump_image_tag_task.name, commit_and_push_task.name, record_verified_task.name) == (
        "checkout", "bump-image-tag", "commit-and-push", "record-verified")


def test_tasks_bump_commit_push_and_record_in_a_flow(prefect_harness: None, remote: Path, clone_dir) -> None:
    """Inside a flow, the tasks check out, bump, push and record the verification on the remote."""

    @flow
    def bump_flow(workdir: Path, src: Path) -> tuple[str, bool, str]:
        repo = checkout_task(str(remote), "main", workdir)
        source = checkout_commit_task(str(remote), repo.head.commit.hexsha, src)
        bumped = bump_image_tag_task(workdir / "envs/dev/values.yaml", "5.0.0")
        msg = commit_message("bump", "5.0.0", app="workout-api", environment="dev")
        pushed = commit_and_push_task(repo, ["envs/dev/values.yaml"], msg, author=AUTHOR)
        record_verified_task(repo, pushed.sha, "workout-api", "dev", "5.0.0")
        return pushed.sha, bumped.changed, str(source)

    sha, changed, source = bump_flow(clone_dir("a"), clone_dir("src"))
    assert changed and Path(source).is_dir()
    assert remote_log(remote)[0] == (sha, "chore(helm): update image tag to 5.0.0")
    assert "verified app=workout-api env=dev tag=5.0.0" in run_git(remote, "notes", "--ref=delivery", "show", sha)
    assert last_verified_tag(checkout(str(remote), "main", clone_dir("b")), "workout-api", "dev") == "5.0.0"
