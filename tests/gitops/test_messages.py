"""Commit messages with trailers, and finding the pipeline's own commits again."""

from __future__ import annotations

from pathlib import Path

from tasks.gitops import checkout, checkout_commit, commit_and_push, is_newer, open_repo
from tasks.records import deployed_source_commit
from tasks.trailers import commit_message, commit_trailers, is_pipeline_commit
from tasks.values import bump_image_tag
from tests.gitops.conftest import AUTHOR, run_git


def test_bump_message_round_trip() -> None:
    """A bump message has the expected subject, a readable body and trailers that mark it as ours."""
    msg = commit_message("bump", "1.4.0", app="workout-api", environment="prod", source_sha="a" * 40,
                         digest="sha256:" + "b" * 64, flow_run_id="run-123",
                         flow_run_url="http://127.0.0.1:4200/runs/flow-run/run-123")
    subject, _, body = msg.partition("\n\n")
    assert subject == "chore(helm): update image tag to 1.4.0"
    assert "workout-api" in body and "prod" in body and "a" * 40 in body and "sha256:" + "b" * 64 in body
    assert "http://127.0.0.1:4200/runs/flow-run/run-123" in body
    assert is_pipeline_commit(msg)
    trailers = dict(commit_trailers(msg))
    assert trailers["Delivery-Pipeline"] == "values-bump"
    assert trailers["Delivery-App"] == "workout-api"
    assert trailers["Delivery-Environment"] == "prod"
    assert trailers["Delivery-Tag"] == "1.4.0"
    assert trailers["Delivery-Source-Commit"] == "a" * 40


def test_rollback_message_names_replaced_tag_and_reason() -> None:
    """A rollback message says which tag it replaces and why, and is marked as a rollback."""
    msg = commit_message("rollback", "1.3.0", app="workout-api", environment="dev", replaces="1.4.0",
                         reason="health check failed:\n\nversion 1.4.0 answered 500")
    assert msg.startswith("chore(helm): roll back image tag to 1.3.0\n")
    assert "1.4.0" in msg and "health check failed: version 1.4.0 answered 500" in msg
    assert dict(commit_trailers(msg))["Delivery-Pipeline"] == "rollback"
    assert is_pipeline_commit(msg)


def test_human_commits_are_not_pipeline_commits() -> None:
    """A commit that only mentions the trailer in its body, or has other trailers, is not ours."""
    assert not is_pipeline_commit("Fix typo")
    assert not is_pipeline_commit("Delivery-Pipeline: values-bump")
    assert not is_pipeline_commit(
        "Explain the pipeline\n\nOur commits carry Delivery-Pipeline: values-bump as a trailer.\n\n"
        "Signed-off-by: Dev <dev@example.test>\n"
    )
    assert not is_pipeline_commit(
        "Docs\n\nDelivery-Pipeline: values-bump\nis what the bot writes, see docs.\n"
    )
    assert is_pipeline_commit("x\r\n\r\nSigned-off-by: a <a@b>\r\ndelivery-pipeline: rollback\r\n")


def test_deployed_source_commit_reads_the_newest_pipeline_commit(remote: Path, clone_dir) -> None:
    """The source commit behind the environment's current tag comes from the newest pipeline commit for it."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    assert deployed_source_commit(repo, app="workout-api", environment="dev") is None
    for tag, src in (("1.0.0", "a" * 40), ("1.1.0", "b" * 40)):
        bump_image_tag(Path(repo.working_tree_dir) / "envs/dev/values.yaml", tag)
        msg = commit_message("bump", tag, app="workout-api", environment="dev", source_sha=src)
        commit_and_push(repo, ["envs/dev/values.yaml"], msg, author=AUTHOR)
    bump_image_tag(Path(repo.working_tree_dir) / "envs/prod/values.yaml", "1.1.0")
    msg = commit_message("bump", "1.1.0", app="workout-api", environment="prod", source_sha="c" * 40)
    commit_and_push(repo, ["envs/prod/values.yaml"], msg, author=AUTHOR)
    assert deployed_source_commit(repo, app="workout-api", environment="dev") == "b" * 40
    assert deployed_source_commit(repo, app="workout-api", environment="prod") == "c" * 40


def test_deployed_source_commit_is_per_app(remote: Path, clone_dir) -> None:
    """Another app's newer bump in the same environment, 60 commits later, never hides or replaces ours."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    tree = Path(repo.working_tree_dir)
    bump_image_tag(tree / "envs/dev/values.yaml", "1.0.0")
    msg = commit_message("bump", "1.0.0", app="workout-api", environment="dev", source_sha="a" * 40)
    commit_and_push(repo, ["envs/dev/values.yaml"], msg, author=AUTHOR)
    for i in range(60):
        (tree / "README.md").write_text(f"busy {i}\n")
        run_git(tree, "commit", "-qam", f"other app bump {i}\n\nDelivery-Pipeline: values-bump\n"
                f"Delivery-App: workout-api-admin\nDelivery-Environment: dev\nDelivery-Source-Commit: {'d' * 40}")
    run_git(tree, "push", "-q", "origin", "main")
    assert deployed_source_commit(repo, app="workout-api", environment="dev") == "a" * 40
    assert deployed_source_commit(repo, app="workout-api-admin", environment="dev") == "d" * 40
    assert deployed_source_commit(repo, app="workout", environment="dev") is None


def test_is_newer_follows_the_commit_graph(remote: Path, clone_dir, tmp_path: Path) -> None:
    """A later commit of the same line is newer; an older one, the same one or an unknown one is not."""
    first = run_git(remote, "rev-parse", "main").strip()
    other = tmp_path / "other"
    run_git(tmp_path, "clone", "-q", str(remote), str(other))
    (other / "README.md").write_text("second\n")
    run_git(other, "commit", "-qam", "Second")
    run_git(other, "push", "-q", "origin", "main")
    second = run_git(remote, "rev-parse", "main").strip()
    src = open_repo(checkout_commit(str(remote), first, clone_dir("src")))
    assert is_newer(src, first, second)
    assert not is_newer(src, second, first)
    assert not is_newer(src, first, first)
    assert not is_newer(src, first, "e" * 40)
