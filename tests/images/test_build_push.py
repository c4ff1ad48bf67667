"""Build and push against the real Docker engine and the shared registry on 127.0.0.1:5000."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import docker
import pytest

from delivery.errors import BuildError, PushError
from sandbox.engine import BASE_IMAGE, REGISTRY_ADDR
from tasks.images import build_image, image_exists, image_tags, manifest_digest, push_image

SHA = "89abcdef0123456789abcdef0123456789abcdef"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "workout-api"


def test_build_push_and_registry_agrees(context_dir: Path, shared_repo: str, caplog: pytest.LogCaptureFixture) -> None:
    """A built image is pushed under every tag and the registry serves the pushed digest."""
    caplog.set_level(logging.INFO, logger="delivery")
    tags = image_tags("main", SHA)
    built = build_image(context_dir, shared_repo, tags, revision=SHA, source="https://example.test/app.git")
    assert built.primary_tag == "main-89abcde"
    assert built.refs == [f"{shared_repo}:{t}" for t in tags]
    assert built.image_id.startswith("sha256:")
    assert "building-step-output" in caplog.text  # build output reached the log line by line

    assert not image_exists(shared_repo, built.primary_tag)
    pushed = push_image(shared_repo, built.tags)
    assert pushed.digest.startswith("sha256:") and len(pushed.digest) == 71
    assert pushed.attempts == 1
    assert pushed.ref == f"{shared_repo}@{pushed.digest}"
    for tag in tags:
        assert image_exists(shared_repo, tag)
        assert manifest_digest(shared_repo, tag) == pushed.digest


def test_oci_labels_on_built_image(context_dir: Path, shared_repo: str) -> None:
    """The image carries revision, source, created (RFC 3339 UTC) and version labels."""
    built = build_image(context_dir, shared_repo, ["v1.2.3"], revision=SHA, source="https://example.test/app.git",
                        labels={"team": "fitness"})
    labels = docker.from_env().images.get(built.image_id).labels
    assert labels["org.opencontainers.image.revision"] == SHA
    assert labels["org.opencontainers.image.source"] == "https://example.test/app.git"
    assert labels["org.opencontainers.image.version"] == "v1.2.3"
    assert labels["team"] == "fitness"
    created = labels["org.opencontainers.image.created"]
    assert created.endswith("Z") and created[10] == "T" and len(created) == 20


def test_build_args_reach_the_build(context_dir: Path, shared_repo: str) -> None:
    """Build args are passed to the Dockerfile."""
    (context_dir / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nARG GREETING\nRUN test \"$GREETING\" = hello\n")
    built = build_image(context_dir, shared_repo, ["t1"], build_args={"GREETING": "hello"})
    assert built.tags == ["t1"]


def test_broken_dockerfile_fails_with_step_and_tail(context_dir: Path, shared_repo: str) -> None:
    """A RUN that exits 1 raises BuildError naming the step, with output, and nothing reaches the registry."""
    (context_dir / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nRUN echo before-the-failure\nRUN echo about-to-fail && exit 1\nRUN echo never\n"
    )
    with pytest.raises(BuildError) as e:
        build_image(context_dir, shared_repo, image_tags("feature/broken", SHA))
    err = e.value
    assert not err.transient
    # The engine counts the LABEL instruction it appends, so the total is not 4.
    assert re.match(r"Step 3/\d+ : RUN echo about-to-fail", err.step)
    assert any("about-to-fail" in line for line in err.output_tail)
    assert any("non-zero code: 1" in line for line in err.output_tail)
    assert 0 < len(err.output_tail) <= 20
    assert err.step in str(err)
    assert not image_exists(shared_repo, "feature-broken-89abcde")
    assert not image_exists(shared_repo, "feature-broken")


def test_missing_dockerfile_is_a_build_error(context_dir: Path, shared_repo: str) -> None:
    """Naming a Dockerfile that is not there fails before talking to the engine."""
    with pytest.raises(BuildError, match="no Nope.Dockerfile"):
        build_image(context_dir, shared_repo, ["t1"], dockerfile="Nope.Dockerfile")


def test_unreachable_engine_is_a_clear_build_error(context_dir: Path, shared_repo: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With no Docker engine at DOCKER_HOST the build fails saying the engine was unreachable."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    with pytest.raises(BuildError, match="Docker engine was unreachable"):
        build_image(context_dir, shared_repo, ["t1"])


def test_push_of_an_image_not_built_fails_at_once(shared_repo: str) -> None:
    """Pushing a tag the engine does not have is not retried."""
    with pytest.raises(PushError) as e:
        push_image(shared_repo, ["never-built"], max_attempts=5, max_seconds=30)
    assert not e.value.transient
    assert e.value.attempts == 1
    assert "not found" in str(e.value) or "does not exist" in str(e.value)


@pytest.mark.skipif(not (EXAMPLE / "Dockerfile").exists(), reason="examples/workout-api is not there")
def test_example_app_builds_and_pushes(shared_repo: str) -> None:
    """The sample app builds on the local busybox image and is served by the registry after the push."""
    built = build_image(EXAMPLE, shared_repo, image_tags("main", SHA),
                        build_args={"BASE_IMAGE": BASE_IMAGE, "APP_VERSION": "main-89abcde"}, revision=SHA)
    pushed = push_image(built.repository, built.tags)
    assert manifest_digest(shared_repo, "main-89abcde") == pushed.digest
    assert shared_repo.startswith(REGISTRY_ADDR)
