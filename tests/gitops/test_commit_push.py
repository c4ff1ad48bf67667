"""Committing and pushing values changes: only our paths, never forced, races and refusals handled."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from delivery.errors import GitError, GitPushError
from delivery.settings import Settings
from tasks.gitops import checkout, commit_and_push
from tasks.trailers import commit_message
from tasks.values import bump_image_tag, read_image_tag
from tests.gitops.conftest import AUTHOR, remote_log, run_git


def bump(repo, env: str, tag: str):
    values = Path(repo.working_tree_dir) / f"envs/{env}/values.yaml"
    bump_image_tag(values, tag)
    return values, commit_message("bump", tag, app="workout-api", environment=env)


def test_two_racing_pushers_both_land_without_force(remote: Path, clone_dir) -> None:
    """Two clones pushing different files at the same time both end up on the remote, in a line."""
    a = checkout(str(remote), "main", clone_dir("a"))
    b = checkout(str(remote), "main", clone_dir("b"))
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def push(name: str, repo, env: str, tag: str) -> None:
        values, msg = bump(repo, env, tag)
        start.wait(timeout=30)
        try:
            results[name] = commit_and_push(repo, [values], msg, author=AUTHOR, max_seconds=120)
        except Exception as e:  # surfaced by the assertions below
            results[name] = e

    threads = [threading.Thread(target=push, args=("a", a, "dev", "1.1.0")),
               threading.Thread(target=push, args=("b", b, "prod", "2.2.0"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    ra, rb = results["a"], results["b"]
    assert not isinstance(ra, Exception) and not isinstance(rb, Exception), results
    assert ra.committed and rb.committed
    assert ra.rebased or rb.rebased
    head = run_git(remote, "rev-parse", "main").strip()
    first, second = sorted([ra, rb], key=lambda r: r.attempts)
    assert head == second.sha
    subjects = [s for _, s in remote_log(remote)]
    assert "chore(helm): update image tag to 1.1.0" in subjects
    assert "chore(helm): update image tag to 2.2.0" in subjects
    # Not forced: the first pusher's commit is still in the remote's history.
    run_git(remote, "merge-base", "--is-ancestor", first.sha, head)
    fresh = checkout(str(remote), "main", clone_dir("fresh"))
    tree = Path(fresh.working_tree_dir)
    assert read_image_tag(tree / "envs/dev/values.yaml") == "1.1.0"
    assert read_image_tag(tree / "envs/prod/values.yaml") == "2.2.0"


def test_stale_pusher_rebases_onto_the_winner(remote: Path, clone_dir) -> None:
    """A push from a stale clone is rejected, rebased onto the new remote head and retried."""
    a = checkout(str(remote), "main", clone_dir("a"))
    b = checkout(str(remote), "main", clone_dir("b"))
    values_a, msg_a = bump(a, "dev", "1.1.0")
    won = commit_and_push(a, [values_a], msg_a, author=AUTHOR)
    values, msg = bump(b, "prod", "2.2.0")
    late = commit_and_push(b, [values], msg, author=AUTHOR)
    assert late.committed and late.rebased and late.attempts == 2
    assert run_git(remote, "rev-parse", "main").strip() == late.sha
    assert run_git(remote, "rev-parse", "main~1").strip() == won.sha


def test_same_line_conflict_names_the_winner_and_leaves_remote_intact(remote: Path, clone_dir) -> None:
    """When both change the same tag line, the loser raises naming the winner's commit; nothing is forced."""
    a = checkout(str(remote), "main", clone_dir("a"))
    b = checkout(str(remote), "main", clone_dir("b"))
    values_a, msg_a = bump(a, "dev", "1.1.0")
    won = commit_and_push(a, [values_a], msg_a, author=AUTHOR)
    values_b, msg_b = bump(b, "dev", "9.9.9")
    with pytest.raises(GitPushError) as err:
        commit_and_push(b, [values_b], msg_b, author=AUTHOR)
    assert not err.value.transient
    assert won.sha in str(err.value) and "update image tag to 1.1.0" in str(err.value)
    assert run_git(remote, "rev-parse", "main").strip() == won.sha
    tree_b = Path(b.working_tree_dir)
    assert run_git(tree_b, "status", "--porcelain") == ""
    assert run_git(tree_b, "rev-parse", "HEAD").strip() == won.sha
    assert read_image_tag(values_b) == "1.1.0"


def test_only_the_given_paths_are_committed(remote: Path, clone_dir) -> None:
    """Other dirty or staged files in the work tree stay out of the commit."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    tree = Path(repo.working_tree_dir)
    (tree / "README.md").write_text("local edit that must not be pushed\n")
    (tree / "envs/prod/values.yaml").write_text("# staged but not ours\n")
    run_git(tree, "add", "envs/prod/values.yaml")
    (tree / "envs/qa").mkdir()
    (tree / "envs/qa/values.yaml").write_text('image:\n  tag: "0.0.1"\n')
    values, msg = bump(repo, "dev", "1.2.3")
    result = commit_and_push(repo, ["envs/dev/values.yaml", tree / "envs/qa/values.yaml"], msg, author=AUTHOR)
    files = run_git(remote, "show", "--name-only", "--format=", result.sha).split()
    assert sorted(files) == ["envs/dev/values.yaml", "envs/qa/values.yaml"]
    author = run_git(remote, "log", "-1", "--format=%an <%ae>", result.sha).strip()
    assert author == f"{AUTHOR[0]} <{AUTHOR[1]}>"
    assert "local edit" in (tree / "README.md").read_text()


def test_nothing_to_commit_returns_the_remote_head(remote: Path, clone_dir) -> None:
    """Unchanged paths make no commit and report the remote head."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    result = commit_and_push(repo, ["envs/dev/values.yaml"], "unused", author=AUTHOR)
    assert not result.committed and result.attempts == 0
    assert result.sha == run_git(remote, "rev-parse", "main").strip()


def test_hook_that_declines_is_reported_with_its_message(remote: Path, clone_dir) -> None:
    """A pre-receive hook's refusal raises a non-transient GitPushError carrying the hook's words."""
    hook = remote / "hooks" / "pre-receive"
    hook.write_text('#!/bin/sh\necho "pushes frozen by release manager" >&2\nexit 1\n')
    hook.chmod(0o755)
    repo = checkout(str(remote), "main", clone_dir("a"))
    before = run_git(remote, "rev-parse", "main").strip()
    values, msg = bump(repo, "dev", "1.1.0")
    with pytest.raises(GitPushError) as err:
        commit_and_push(repo, [values], msg, author=AUTHOR)
    assert "pushes frozen by release manager" in str(err.value)
    assert not err.value.transient
    assert run_git(remote, "rev-parse", "main").strip() == before


def test_pending_commit_is_pushed_on_the_next_attempt(remote: Path, clone_dir) -> None:
    """A commit whose push failed is pushed when the step runs again, not reported as 'nothing to do'."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    tree = Path(repo.working_tree_dir)
    values, msg = bump(repo, "dev", "1.1.0")
    run_git(tree, "remote", "set-url", "origin", str(remote.parent / "missing.git"))
    with pytest.raises(GitError):
        commit_and_push(repo, [values], msg, author=AUTHOR, max_attempts=1)
    run_git(tree, "remote", "set-url", "origin", str(remote))
    result = commit_and_push(repo, [values], msg, author=AUTHOR)
    assert result.committed
    assert remote_log(remote)[0] == (result.sha, "chore(helm): update image tag to 1.1.0")


def test_token_never_appears_in_logs_or_errors(remote: Path, clone_dir, caplog: pytest.LogCaptureFixture) -> None:
    """A token in the remote URL, or from settings, is masked in every log line and error."""
    caplog.set_level(logging.DEBUG)
    token = "ghp_FAKE123456"  # secret-scan: allow (test fixture)
    url = f"https://x-access-token:{token}@127.0.0.1:9/o/r.git"
    texts = []
    with pytest.raises(GitError) as err:
        checkout(url, "main", clone_dir("https"))
    # Refused before git runs: a token in the URL would be in git's argv and in .git/config.
    assert not err.value.transient and "DELIVERY_GIT_TOKEN" in str(err.value)
    assert not clone_dir("https").exists() or not any(clone_dir("https").iterdir())
    texts.append(str(err.value))

    # A clone an older version left with a token in its URL: the push error still masks it.
    repo = checkout(str(remote), "main", clone_dir("a"))
    run_git(Path(repo.working_tree_dir), "remote", "set-url", "origin", url)
    values, msg = bump(repo, "dev", "1.1.0")
    with pytest.raises(GitError) as err:
        commit_and_push(repo, [values], msg, author=AUTHOR, max_attempts=2, max_seconds=5)
    assert err.value.transient
    texts.append(str(err.value))

    settings_token = "ghp_SETTING987654"  # secret-scan: allow (test fixture)
    with pytest.raises(GitError) as err:
        checkout("https://127.0.0.1:9/o/r.git", "main", clone_dir("settings"),
                 settings=Settings(_env_file=None, git_token=settings_token))
    texts.append(str(err.value))

    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1" in "".join(texts)
    for secret in (token, settings_token):
        assert secret not in logged
        assert all(secret not in t for t in texts)


def test_carries_change_follows_later_commits_that_keep_our_tag(tmp_path):
    """A later commit on top of ours carries our change while the values file still names our tag."""
    import git as _git

    from tasks.gitops import carries_change, commit_and_push
    from tasks.values import bump_image_tag

    bare = tmp_path / "remote.git"
    _git.Repo.init(bare, bare=True, initial_branch="main")
    seed = _git.Repo.clone_from(str(bare), tmp_path / "seed")
    (tmp_path / "seed" / "values-dev.yaml").write_text('image:\n  tag: "a"\n')
    (tmp_path / "seed" / "values-staging.yaml").write_text('image:\n  tag: "s"\n')
    seed.index.add(["values-dev.yaml", "values-staging.yaml"])
    actor = _git.Actor("t", "t@example.com")
    seed.index.commit("seed", author=actor, committer=actor)
    seed.remotes.origin.push("HEAD:refs/heads/main")
    ours = _git.Repo.clone_from(str(bare), tmp_path / "ours")
    bump_image_tag(tmp_path / "ours" / "values-dev.yaml", "b")
    mine = commit_and_push(ours, ["values-dev.yaml"], "dev to b", author=("t", "t@example.com"), branch="main").sha
    other = _git.Repo.clone_from(str(bare), tmp_path / "other")
    bump_image_tag(tmp_path / "other" / "values-staging.yaml", "s2")
    later = commit_and_push(other, ["values-staging.yaml"], "staging", author=("t", "t@example.com"),
                            branch="main").sha
    bump_image_tag(tmp_path / "other" / "values-dev.yaml", "c")
    replaced = commit_and_push(other, ["values-dev.yaml"], "dev to c", author=("t", "t@example.com"),
                               branch="main").sha
    carries = carries_change(ours, mine, "values-dev.yaml", "b")
    assert carries(later) is True  # fetched on demand: `ours` had never seen it
    assert carries(replaced) is False
    assert carries(mine) is False  # the exact revision is the caller's own comparison
    assert carries("not-a-sha") is False
