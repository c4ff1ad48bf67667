"""Where a dead deploy stopped, as the recovery reads it from Git and the registry: the pipeline's own
commits for the app and environment, newest first, and the verdict drawn from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.config import App, Environment
from delivery.errors import RegistryError
from flows import recover as recover_module
from flows.recover import find_where_it_stopped
from tasks.gitops import checkout, commit_and_push
from tasks.records import pipeline_commits, record_verified
from tasks.trailers import commit_message
from tasks.values import bump_image_tag
from tests.gitops.conftest import AUTHOR

SRC = "a" * 40


def _app(remote: Path) -> App:
    dev = Environment(name="dev", values_file="dev/values.yaml", application="workout-api-dev",
                      namespace="apps", deployment="workout-api", health_url="http://127.0.0.1:1/api/health/")
    return App(name="workout-api", source_repo="file:///nowhere", image="127.0.0.1:5000/workout-api",
               gitops_repo=str(remote), chart_path="envs", environments={"dev": dev})


def _commit(repo, kind: str, tag: str, source: str | None = None, app: str = "workout-api") -> str:
    bump_image_tag(Path(repo.working_tree_dir) / "envs/dev/values.yaml", tag)
    msg = commit_message(kind, tag, app=app, environment="dev", source_sha=source, flow_run_id="run-1")
    return commit_and_push(repo, ["envs/dev/values.yaml"], msg, author=AUTHOR).sha


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The registry as the recovery sees it: tag → digest; an exception instance is raised instead."""
    images: dict[str, object] = {}

    def manifest_digest(repository: str, tag: str, **_: object) -> str | None:
        found = images.get(tag)
        if isinstance(found, Exception):
            raise found
        return found  # type: ignore[return-value]

    monkeypatch.setattr(recover_module.images, "manifest_digest", manifest_digest)
    return images


def test_pipeline_commits_are_read_newest_first_for_one_app_and_environment(remote: Path, clone_dir) -> None:
    """Bumps and rollbacks of this app and environment, newest first, with tag, source and flow run; others skipped."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    first = _commit(repo, "bump", "main-1111111", SRC)
    _commit(repo, "bump", "other-1", "c" * 40, app="nutrition-api")
    back = _commit(repo, "rollback", "main-0000000")
    found = pipeline_commits(repo, app="workout-api", environment="dev", branch="main")
    assert [(c.sha, c.kind, c.tag, c.source_sha) for c in found] == [
        (back, "rollback", "main-0000000", ""), (first, "values-bump", "main-1111111", SRC)]
    assert found[1].flow_run == "run-1"


def test_before_the_image_then_after_the_push(remote: Path, clone_dir, tmp_path: Path, registry) -> None:
    """No image and no commit: it stopped before the registry; the image but no commit: after the push."""
    a = _app(remote)
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s1")
    assert found.in_registry is False and not found.values_commit and not found.rolling_back
    assert "before 127.0.0.1:5000/workout-api:main-1111111 reached the registry" in found.where()
    registry["main-1111111"] = "sha256:" + "d" * 64
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s2")
    assert found.in_registry and found.registry == "sha256:" + "d" * 64
    assert "after pushing" in found.where() and "before its values commit" in found.where()


def test_after_the_values_commit_verified_or_not(remote: Path, clone_dir, tmp_path: Path, registry) -> None:
    """Its values commit unverified: stopped before verification; with the verification note: after it."""
    a = _app(remote)
    registry["main-1111111"] = "sha256:" + "d" * 64
    repo = checkout(str(remote), "main", clone_dir("a"))
    sha = _commit(repo, "bump", "main-1111111", SRC)
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s1")
    assert found.values_commit == sha and not found.verified and found.git_tag == "main-1111111"
    assert "before main-1111111 was verified" in found.where() and not found.rolling_back
    record_verified(repo, sha, app="workout-api", environment="dev", tag="main-1111111")
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s2")
    assert found.verified and "after verifying main-1111111" in found.where()


def test_a_rollback_after_its_commit_means_it_was_rolling_back(remote: Path, clone_dir, tmp_path: Path,
                                                                 registry) -> None:
    """Only rollback commits after ours: finish the rollback; a later bump of another commit: replaced instead."""
    a = _app(remote)
    repo = checkout(str(remote), "main", clone_dir("a"))
    sha = _commit(repo, "bump", "main-1111111", SRC)
    back = _commit(repo, "rollback", "main-0000000")
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s1")
    assert found.values_commit == sha and found.rolling_back and found.git_tag == "main-0000000"
    assert f"rollback commit {back[:12]}" in found.where()
    # The same commit made by an earlier run, then rolled back: the dead run was deploying it again.
    again = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s3", {"run-2"})
    assert again.values_commit == sha and not again.rolling_back
    _commit(repo, "bump", "main-2222222", "b" * 40)
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s2")
    assert not found.rolling_back and "a later deploy replaced it" in found.where()


def test_a_registry_that_cannot_be_asked_is_reported_not_guessed(remote: Path, tmp_path: Path, registry) -> None:
    """The registry failing is 'unknown' with its reason, never 'absent'."""
    a = _app(remote)
    registry["main-1111111"] = RegistryError("registry 127.0.0.1:5000 refused the connection")
    found = find_where_it_stopped(a, a.environment("dev"), "main-1111111", SRC, tmp_path / "s1")
    assert found.in_registry is None
    assert "unknown (registry 127.0.0.1:5000 refused the connection)" in found.registry_text()
