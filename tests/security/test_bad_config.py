"""Broken configuration: a config file that is not YAML or lacks a key, a values file that is not
YAML, an Application that does not exist. The CLI exits non-zero with one clear error naming the
file or object, and nothing is written to Git."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import git
import pytest

from delivery import cli
from delivery.settings import get_settings
from sandbox.manager import IMAGE_REPOSITORY

pytestmark = [pytest.mark.docker, pytest.mark.sandbox]

VALUES = "helm/workout-api/values-dev.yaml"


def _retag(source: str, repository: str, tag: str) -> None:
    import docker

    from tasks.images import push_image

    client = docker.from_env(timeout=120)
    try:
        client.images.get(source).tag(repository, tag)
    finally:
        client.close()
    push_image(repository, [tag])


def _head(bare: Path) -> str:
    return subprocess.run(["git", "rev-parse", "refs/heads/main"], cwd=bare, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def use_config(monkeypatch: pytest.MonkeyPatch, prefect_api: str, tmp_path: Path) -> Iterator[object]:
    def use(path: Path) -> None:
        monkeypatch.setenv("DELIVERY_CONFIG_FILE", str(path))
        monkeypatch.setenv("DELIVERY_WORK_DIR", str(tmp_path / "work"))
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize(("text", "expect"), [
    ("apps: [unclosed\n  workout-api: {\n", "YAML"),
    ("apps:\n  workout-api:\n    source_repo: x\n", "image"),
    ("- just\n- a list\n", "apps"),
])
def test_malformed_config_is_one_clear_error(sandbox, use_config, capsys, tmp_path: Path, text: str,
                                             expect: str) -> None:
    """`delivery drift --local` and `delivery rollback --local` on a broken config: exit 1 naming the file."""
    bad = tmp_path / "broken-delivery.yaml"
    bad.write_text(text)
    use_config(bad)
    before = _head(sandbox.gitops_remote)
    for argv in (["drift", "--local"], ["rollback", "workout-api", "dev", "--to-tag", "x1", "--local"]):
        rc, out = _run(capsys, *argv)
        assert rc == 1, out
        assert str(bad) in out and expect in out, out
        assert "Traceback" not in out
    assert _head(sandbox.gitops_remote) == before


@pytest.fixture
def gitops_copy(sandbox, tmp_path: Path) -> Path:
    """A copy of the sandbox's GitOps remote (the shared one is never broken) and a config naming it."""
    bare = tmp_path / "gitops-copy.git"
    git.Repo.clone_from(str(sandbox.gitops_remote), bare, bare=True)
    return bare


def _config_for(sandbox, tmp_path: Path, gitops: Path, application: str | None = None) -> Path:
    text = sandbox.config_file.read_text().replace(str(sandbox.gitops_remote), str(gitops))
    if application:
        text = text.replace("application: workout-api-dev", f"application: {application}")
    path = tmp_path / "delivery.yaml"
    path.write_text(text)
    return path


def test_values_file_not_yaml(sandbox, use_config, capsys, tmp_path: Path, gitops_copy: Path) -> None:
    """A values file that is not YAML: rollback exits 1 naming the file; the remote gets no commit."""
    work = git.Repo.clone_from(str(gitops_copy), tmp_path / "edit", branch="main")
    (tmp_path / "edit" / VALUES).write_text("image:\n  tag: [unclosed\n  repository: {{ bad\n")
    work.index.add([VALUES])
    actor = git.Actor("someone", "someone@example.com")
    work.index.commit("break the values", author=actor, committer=actor)
    work.remotes.origin.push("main:main")
    before = _head(gitops_copy)
    use_config(_config_for(sandbox, tmp_path, gitops_copy))
    rc, out = _run(capsys, "rollback", "workout-api", "dev", "--to-tag", sandbox.initial_tag, "--local")
    assert rc == 1, out
    assert "values-dev.yaml" in out and "Traceback" not in out, out
    assert _head(gitops_copy) == before


def test_application_that_does_not_exist(sandbox, use_config, capsys, tmp_path: Path, gitops_copy: Path) -> None:
    """An Application missing from the cluster: drift and rollback exit 1 naming it; nothing is pushed."""
    use_config(_config_for(sandbox, tmp_path, gitops_copy, application="workout-api-nope"))
    before = _head(gitops_copy)
    rc, out = _run(capsys, "drift", "workout-api", "--local")
    assert rc == 1 and "workout-api-nope" in out, out
    # A tag Git does not name yet, whose image exists: without the check the rollback would commit it.
    other = f"sec-{uuid.uuid4().hex[:8]}"
    _retag(f"{IMAGE_REPOSITORY}:{sandbox.initial_tag}", IMAGE_REPOSITORY, other)
    rc, out = _run(capsys, "rollback", "workout-api", "dev", "--to-tag", other, "--local")
    assert rc == 1 and "workout-api-nope" in out, out
    assert "Traceback" not in out
    assert _head(gitops_copy) == before
