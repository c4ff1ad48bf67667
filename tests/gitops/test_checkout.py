"""Checking out the GitOps repository and the app source at an exact commit."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.errors import GitError
from tasks.gitops import checkout, checkout_commit
from tests.gitops.conftest import run_git


def test_reused_checkout_discards_stale_local_state(remote: Path, clone_dir, tmp_path: Path) -> None:
    """Reusing a work tree drops local edits, untracked files and unpushed commits, and picks up the remote."""
    work = clone_dir("a")
    repo = checkout(str(remote), "main", work)
    (work / "envs/dev/values.yaml").write_text("stale edit\n")
    (work / "leftover.txt").write_text("from an earlier run\n")
    (work / "README.md").write_text("unpushed\n")
    run_git(work, "commit", "-qam", "local only")

    other = tmp_path / "other"
    run_git(tmp_path, "clone", "-q", str(remote), str(other))
    (other / "NEW.md").write_text("pushed by someone else\n")
    run_git(other, "add", "NEW.md")
    run_git(other, "commit", "-qm", "Add NEW.md")
    run_git(other, "push", "-q", "origin", "main")

    repo = checkout(str(remote), "main", work)
    assert repo.head.commit.hexsha == run_git(remote, "rev-parse", "main").strip()
    assert run_git(work, "status", "--porcelain", "--ignored") == ""
    assert (work / "NEW.md").exists() and not (work / "leftover.txt").exists()
    assert "stale edit" not in (work / "envs/dev/values.yaml").read_text()


def test_checkout_of_a_missing_branch_fails_naming_it(remote: Path, clone_dir) -> None:
    """Asking for a branch the remote lacks raises a non-transient GitError naming the branch."""
    with pytest.raises(GitError) as err:
        checkout(str(remote), "release-9", clone_dir("a"))
    assert "release-9" in str(err.value) and not err.value.transient


def test_checkout_commit_gives_the_exact_commit(remote: Path, clone_dir, tmp_path: Path) -> None:
    """The source tree is the one of the requested commit, even after the branch moved on."""
    first = run_git(remote, "rev-parse", "main").strip()
    other = tmp_path / "other"
    run_git(tmp_path, "clone", "-q", str(remote), str(other))
    (other / "README.md").write_text("second version\n")
    run_git(other, "commit", "-qam", "Second")
    run_git(other, "push", "-q", "origin", "main")
    second = run_git(remote, "rev-parse", "main").strip()

    src = checkout_commit(str(remote), first, clone_dir("src"))
    assert run_git(src, "rev-parse", "HEAD").strip() == first
    assert (src / "README.md").read_text() == "GitOps repository for workout-api\n"
    (src / "junk").write_text("x")
    src = checkout_commit(str(remote), second, clone_dir("src"))
    assert run_git(src, "rev-parse", "HEAD").strip() == second
    assert (src / "README.md").read_text() == "second version\n"
    assert not (src / "junk").exists()


def test_checkout_commit_of_an_unknown_sha_names_it(remote: Path, clone_dir) -> None:
    """An unknown commit raises a GitError naming the sha, not a git stack trace."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(GitError) as err:
        checkout_commit(str(remote), sha, clone_dir("src"))
    assert sha in str(err.value) and "not found" in str(err.value)
    assert not err.value.transient
    with pytest.raises(GitError) as err:
        checkout_commit(str(remote), "--upload-pack=touch /tmp/x", clone_dir("src2"))
    assert "not a commit sha" in str(err.value)
