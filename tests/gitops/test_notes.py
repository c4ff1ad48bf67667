"""Verification records kept as git notes: durable, per app and environment, safe under concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from delivery.errors import GitError
from tasks.gitops import checkout, commit_and_push
from tasks.records import last_verified_tag, record_verified, verified_tags
from tasks.trailers import commit_message
from tasks.values import bump_image_tag
from tests.gitops.conftest import AUTHOR, run_git

APP = "workout-api"


def deploy(repo, env: str, tag: str, app: str = "workout-api") -> str:
    """Bump and push `tag` for `env`; the pushed sha."""
    bump_image_tag(Path(repo.working_tree_dir) / f"envs/{env}/values.yaml", tag)
    msg = commit_message("bump", tag, app=app, environment=env)
    return commit_and_push(repo, [f"envs/{env}/values.yaml"], msg, author=AUTHOR).sha


def test_last_verified_tag_per_environment_with_exclude(remote: Path, clone_dir) -> None:
    """The newest verified tag per environment is found; excluded tags are skipped; unverified ones ignored."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    assert last_verified_tag(repo, APP, "dev") is None
    c1 = deploy(repo, "dev", "1.0.0")
    record_verified(repo, c1, app=APP, environment="dev", tag="1.0.0")
    c2 = deploy(repo, "prod", "1.0.0")
    record_verified(repo, c2, app=APP, environment="prod", tag="1.0.0")
    c3 = deploy(repo, "dev", "1.1.0")
    record_verified(repo, c3, app=APP, environment="dev", tag="1.1.0")
    deploy(repo, "dev", "1.2.0")  # deployed but never verified

    assert last_verified_tag(repo, APP, "dev") == "1.1.0"
    assert last_verified_tag(repo, APP, "prod") == "1.0.0"
    assert last_verified_tag(repo, APP, "dev", exclude={"1.1.0"}) == "1.0.0"
    assert last_verified_tag(repo, APP, "dev", exclude={"1.1.0", "1.0.0"}) is None
    assert last_verified_tag(repo, APP, "qa") is None
    tags = verified_tags(repo, APP, "dev")
    assert [(sha, tag) for sha, tag, _ in tags] == [(c3, "1.1.0"), (c1, "1.0.0")]
    assert all(ts.endswith("Z") and "T" in ts for _, _, ts in tags)


def test_records_survive_a_fresh_clone(remote: Path, clone_dir) -> None:
    """Verification records live in the remote repository, so a new clone (or a new server) sees them."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    sha = deploy(repo, "prod", "2.0.0")
    record_verified(repo, sha, app=APP, environment="prod", tag="2.0.0")
    record_verified(repo, sha, app=APP, environment="dev", tag="2.0.0")
    assert f"verified app={APP} env=prod tag=2.0.0" in run_git(remote, "notes", "--ref=delivery", "show", sha)

    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    assert last_verified_tag(fresh, APP, "prod") == "2.0.0"
    assert last_verified_tag(fresh, APP, "dev") == "2.0.0"


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
            record_verified(clones[i], shas[i], app=APP, environment="dev", tag=f"3.0.{i}", max_attempts=10)
            record_verified(clones[i], shas[0], app=APP, environment=f"env{i}", tag="3.0.0", max_attempts=10)
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
            f"verified app={APP} env=qa tag=3.0.1 at=2000-01-01T00:00:00Z", shas[1])
    record_verified(clones[1], shas[1], app=APP, environment="staging", tag="3.0.1")
    record_verified(stale, shas[2], app=APP, environment="qa", tag="3.0.2")

    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    assert [t for _, t, _ in verified_tags(fresh, APP, "dev")] == ["3.0.2", "3.0.1", "3.0.0"]
    for i in range(3):
        assert last_verified_tag(fresh, APP, f"env{i}") == "3.0.0"
    assert last_verified_tag(fresh, APP, "staging") == "3.0.1"
    assert [t for _, t, _ in verified_tags(fresh, APP, "qa")] == ["3.0.2", "3.0.1"]


def test_record_verified_on_an_unknown_commit_fails(remote: Path, clone_dir) -> None:
    """Recording a verification on a commit that does not exist raises a GitError naming it."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    with pytest.raises(GitError) as err:
        record_verified(repo, "f" * 40, app=APP, environment="dev", tag="1.0.0")
    assert "f" * 40 in str(err.value)


def test_records_of_two_apps_never_mix(remote: Path, clone_dir) -> None:
    """Two apps sharing a GitOps repository and environment names each read back only their own tags."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    a1 = deploy(repo, "dev", "a-1.0.0")
    record_verified(repo, a1, app="app-a", environment="dev", tag="a-1.0.0")
    b1 = deploy(repo, "dev", "b-1.0.0", app="app-b")
    record_verified(repo, b1, app="app-b", environment="dev", tag="b-1.0.0")
    assert last_verified_tag(repo, "app-a", "dev") == "a-1.0.0"
    assert last_verified_tag(repo, "app-b", "dev") == "b-1.0.0"
    assert last_verified_tag(repo, "app-a", "dev", exclude={"a-1.0.0"}) is None
    assert last_verified_tag(repo, "app", "dev") is None


def test_a_note_without_an_app_counts_for_no_app(remote: Path, clone_dir) -> None:
    """An old-format note (`verified <env> <tag>`) names no app, so no app's rollback ever picks it."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    sha = deploy(repo, "dev", "9.9.9")
    run_git(Path(repo.working_tree_dir), "notes", "--ref=delivery", "add", "-f", "-m",
            "verified dev 9.9.9 2026-01-01T00:00:00Z", sha)
    run_git(Path(repo.working_tree_dir), "push", "-q", "origin", "refs/notes/delivery")
    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    assert verified_tags(fresh, APP, "dev") == []
    assert last_verified_tag(fresh, APP, "dev") is None


def test_a_verification_far_back_on_a_busy_branch_is_found(remote: Path, clone_dir) -> None:
    """A verification 80 commits back (other apps' bumps on top) is still the app's last known-good."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    sha = deploy(repo, "prod", "7.0.0")
    record_verified(repo, sha, app=APP, environment="prod", tag="7.0.0")
    tree = Path(repo.working_tree_dir)
    for i in range(80):
        (tree / "README.md").write_text(f"busy {i}\n")
        run_git(tree, "commit", "-qam", f"other team {i}")
    run_git(tree, "push", "-q", "origin", "main")
    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    assert last_verified_tag(fresh, APP, "prod") == "7.0.0"
