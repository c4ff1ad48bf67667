"""The Prefect task layer over the GitOps functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.states import Failed

from delivery.errors import GitError, GitPushError, ValuesError
from delivery.retries import retry_if_transient as _retry_if_transient
from delivery.retries import with_retries
from tasks.gitops import checkout, checkout_commit_task, checkout_task, commit_and_push_task
from tasks.records import last_verified_tag, record_verified_task
from tasks.trailers import commit_message
from tasks.values import bump_image_tag_task
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
    # One retry layer: the functions bound their own retries, so the tasks must not add Prefect's on top.
    for t in (checkout_task, checkout_commit_task, commit_and_push_task, record_verified_task, bump_image_tag_task):
        assert not t.retries, t.name
    assert (checkout_task.name, bump_image_tag_task.name, commit_and_push_task.name, record_verified_task.name) == (
        "checkout", "bump-image-tag", "commit-and-push", "record-verified")


def test_with_retries_bounds_attempts_and_names_them() -> None:
    """Transient errors are retried up to the bound; the final error says how many attempts in how long."""
    calls = []

    def flaky() -> str:
        calls.append(1)
        raise GitError("connection refused", transient=True)

    with pytest.raises(GitError) as err:
        with_retries(flaky, what="fetch of origin", attempts=3, seconds=30, base=0.01)
    assert len(calls) == 3
    assert "fetch of origin gave up after 3 attempt(s)" in str(err.value) and "connection refused" in str(err.value)

    calls.clear()

    def final() -> str:
        calls.append(1)
        raise GitPushError("hook declined", transient=False)

    with pytest.raises(GitPushError, match="hook declined"):
        with_retries(final, what="push", attempts=5, seconds=30, base=0.01)
    assert len(calls) == 1

    seen = iter([GitError("timed out", transient=True), None])

    def once_then_ok() -> str:
        e = next(seen)
        if e:
            raise e
        return "ok"

    assert with_retries(once_then_ok, what="clone", attempts=2, seconds=30, base=0.01) == "ok"


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
