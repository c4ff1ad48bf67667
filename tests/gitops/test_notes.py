"""Verification records kept as git notes: durable, per environment, safe under concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from delivery.errors import GitError
from tasks.gitops import (
    bump_image_tag,
    checkout,
    commit_and_push,
    commit_message,
    last_verified_tag,
    record_verified,
    verified_tags,
)
from tests.gitops.conftest import AUTHOR, run_git


def deploy(repo, env: str, tag: str) -> str:
    """Bump and push `tag` for `env`; the pushed sha."""
    bump_image_tag(Path(repo.working_tree_dir) / f"envs/{env}/values.yaml", tag)
    msg = commit_message("bump", tag, app="workout-api", environment=env)
    return commit_and_push(repo, [f"envs/{env}/values.yaml"], msg, author=AUTHOR).sha


def test_last_verified_tag_per_environment_with_exclude(remote: Path, clone_dir) -> None:
    """The newest verified tag per environment is found; excluded tags are skipped; unverified ones ignored."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    assert last_verified_tag(repo, "dev") is None
    c1 = deploy(repo, "dev", "1.0.0")
    record_verified(repo, c1, environment="dev", tag="1.0.0")
    c2 = deploy(repo, "prod", "1.0.0")
    record_verified(repo, c2, environment="prod", tag="1.0.0")
    c3 = deploy(repo, "dev", "1.1.0")
    record_verified(repo, c3, environment="dev", tag="1.1.0")
    deploy(repo, "dev", "1.2.0")  # deployed but never verified

    assert last_verified_tag(repo, "dev") == "1.1.0"
    assert last_verified_tag(repo, "prod") == "1.0.0"
    assert last_verified_tag(repo, "dev", exclude={"1.1.0"}) == "1.0.0"
    assert last_verified_tag(repo, "dev", exclude={"1.1.0", "1.0.0"}) is None
    assert last_verified_tag(repo, "qa") is None
    tags = verified_tags(repo, "dev")
    assert [(sha, tag) for sha, tag, _ in tags] == [(c3, "1.1.0"), (c1, "1.0.0")]
    assert all(ts.endswith("Z") and "T" in ts for _, _, ts in tags)


def test_records_survive_a_fresh_clone(remote: Path, clone_dir) -> None:
    """Verification records live in the remote repository, so a new clone (or a new server) sees them."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    sha = deploy(repo, "prod", "2.0.0")
    record_verified(repo, sha, environment="prod", tag="2.0.0")
    record_verified(repo, sha, environment="dev", tag="2.0.0")
    assert "verified prod 2.0.0" in run_git(remote, "notes", "--ref=delivery", "show", sha)

    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    assert last_verified_tag(fresh, "prod") == "2.0.0"
    assert last_verified_tag(fresh, "dev") == "2.0.0"


def test_concurrent_note_pushes_all_survive(remote: Path, clone_dir) -> None:
    """Records written at the same time from several clones, and a diverged local note, are all kept."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    shas = [deploy(repo, "dev", f"3.0.{i}") for i in range(3)]
    clones = [checkout(str(remote), "main", clone_dir(f"c{i}")) for i in range(3)]
    start = threading.Barrier(len(clones))
    errors: list[BaseException] = []

    def record(i: int) -> None:
        start.wait(timeout=30)
        try:
            record_verified(clones[i], shas[i], environment="dev", tag=f"3.0.{i}", max_attempts=10)
            record_verified(clones[i], shas[0], environment=f"env{i}", tag="3.0.0", max_attempts=10)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=record, args=(i,)) for i in range(len(clones))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors

    # A clone whose local notes diverged from the remote merges instead of overwriting.
    stale = clones[0]
    run_git(Path(stale.working_tree_dir), "notes", "--ref=delivery", "add", "-f", "-m",
            "verified qa 3.0.1 2000-01-01T00:00:00Z", shas[1])
    record_verified(clones[1], shas[1], environment="staging", tag="3.0.1")
    record_verified(stale, shas[2], environment="qa", tag="3.0.2")

    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    assert [t for _, t, _ in verified_tags(fresh, "dev")] == ["3.0.2", "3.0.1", "3.0.0"]
    for i in range(3):
        assert last_verified_tag(fresh, f"env{i}") == "3.0.0"
    assert last_verified_tag(fresh, "staging") == "3.0.1"
    assert [t for _, t, _ in verified_tags(fresh, "qa")] == ["3.0.2", "3.0.1"]


def test_record_verified_on_an_unknown_commit_fails(remote: Path, clone_dir) -> None:
    """Recording a verification on a commit that does not exist raises a GitError naming it."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    with pytest.raises(GitError) as err:
        record_verified(repo, "f" * 40, environment="dev", tag="1.0.0")
    assert "f" * 40 in str(err.value)
