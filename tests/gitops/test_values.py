"""Rewriting the image tag in a Helm values file: the diff is the tag line alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery.errors import ValuesError
from tasks.gitops import checkout, commit_and_push, read_image_tag_at
from tasks.trailers import commit_message
from tasks.values import bump_image_tag, read_image_tag
from tests.gitops.conftest import AUTHOR, HERE, run_git


def changed_lines(workdir: Path) -> tuple[list[str], list[str]]:
    """(removed, added) lines of the uncommitted diff."""
    diff = run_git(workdir, "diff", "--unified=0")
    removed = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return removed, added


def test_bump_changes_only_the_tag_line(remote: Path, clone_dir) -> None:
    """Bumping a commented values file changes exactly the tag line, keeping its quotes and comment."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    values = Path(repo.working_tree_dir) / "envs/dev/values.yaml"
    result = bump_image_tag(values, "0.2.0")
    assert result.changed and result.old_tag == "0.1.0" and result.new_tag == "0.2.0"
    removed, added = changed_lines(Path(repo.working_tree_dir))
    assert removed == ['  tag: "0.1.0"  # bumped by the delivery pipeline']
    assert added == ['  tag: "0.2.0"  # bumped by the delivery pipeline']
    assert read_image_tag(values) == "0.2.0"


def test_bump_twice_is_a_no_op(remote: Path, clone_dir) -> None:
    """A second bump to the same tag leaves the file untouched and makes no commit."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    values = Path(repo.working_tree_dir) / "envs/dev/values.yaml"
    msg = commit_message("bump", "0.2.0", app="workout-api", environment="dev")
    assert bump_image_tag(values, "0.2.0").changed
    first = commit_and_push(repo, [values], msg, author=AUTHOR)
    assert first.committed
    before = values.read_bytes()
    again = bump_image_tag(values, "0.2.0")
    assert not again.changed and again.old_tag == "0.2.0"
    assert values.read_bytes() == before
    second = commit_and_push(repo, [values], msg, author=AUTHOR)
    assert not second.committed and second.sha == first.sha
    assert run_git(remote, "rev-list", "--count", "main").strip() == "2"


def test_digest_pinning_adds_one_line_after_the_tag(remote: Path, clone_dir) -> None:
    """With a digest, the diff is the tag line plus one `digest:` line right after it."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    values = Path(repo.working_tree_dir) / "envs/prod/values.yaml"
    digest = "sha256:" + "ab" * 32
    result = bump_image_tag(values, "0.3.0", digest=digest)
    assert result.changed and result.digest == digest
    removed, added = changed_lines(Path(repo.working_tree_dir))
    assert removed == ['  tag: "0.1.0"  # bumped by the delivery pipeline']
    assert added == ['  tag: "0.3.0"  # bumped by the delivery pipeline', f'  digest: "{digest}"']
    lines = values.read_text().splitlines()
    assert lines[lines.index(added[0]) + 1] == added[1]
    assert read_image_tag(values, "image.digest") == digest

    # Pinning a new digest later rewrites that line instead of adding another.
    digest2 = "sha256:" + "cd" * 32
    run_git(Path(repo.working_tree_dir), "commit", "-qam", "pin")
    bump_image_tag(values, "0.4.0", digest=digest2)
    removed, added = changed_lines(Path(repo.working_tree_dir))
    assert removed == ['  tag: "0.3.0"  # bumped by the delivery pipeline', f'  digest: "{digest}"']
    assert added == ['  tag: "0.4.0"  # bumped by the delivery pipeline', f'  digest: "{digest2}"']


def test_plain_tags_stay_plain_and_number_like_tags_get_quoted(tmp_path: Path) -> None:
    """An unquoted tag stays unquoted, unless the new tag would read back as a number."""
    values = tmp_path / "values.yaml"
    values.write_text("image:\n  repository: app   # where\n  tag: v1 # current\n")
    bump_image_tag(values, "v2")
    assert values.read_text() == "image:\n  repository: app   # where\n  tag: v2 # current\n"
    bump_image_tag(values, "1.10")
    assert values.read_text() == 'image:\n  repository: app   # where\n  tag: "1.10" # current\n'
    assert read_image_tag(values) == "1.10"


def test_unusual_layout_falls_back_to_a_round_trip(tmp_path: Path) -> None:
    """A flow-style image mapping still gets the tag and digest, with the rest of the file kept."""
    values = tmp_path / "values.yaml"
    values.write_text('# top\nimage: {repository: app, tag: "v1"}  # inline\nlist:\n  - a  # first\n')
    bump_image_tag(values, "v2", digest="sha256:" + "0" * 64)
    text = values.read_text()
    assert read_image_tag(values) == "v2"
    assert read_image_tag(values, "image.digest") == "sha256:" + "0" * 64
    assert "# top" in text and "# first" in text and "  - a" in text


@pytest.mark.parametrize(
    ("content", "key", "detail"),
    [
        ("image:\n  repository: app\n", "image.tag", "image.tag is missing"),
        ("replicaCount: 2\n", "image.tag", "image is missing"),
        ("image: nginx\n", "image.tag", "image is not a mapping"),
        ("image:\n  tag: [v1\n", "image.tag", "not valid YAML"),
        ("image:\n  tag: v1\n  tag: v2\n", "image.tag", "not valid YAML"),
        ("image:\n  tag:\n    name: v1\n", "image.tag", "holds a mapping"),
        ("- a\n- b\n", "image.tag", "not a YAML mapping"),
    ],
)
def test_broken_values_raise_values_error_naming_file_and_key(tmp_path: Path, content: str, key: str,
                                                              detail: str) -> None:
    """Missing keys, non-mappings and invalid YAML raise ValuesError naming the file and the key."""
    values = tmp_path / "values.yaml"
    values.write_text(content)
    with pytest.raises(ValuesError) as err:
        bump_image_tag(values, "v9", key=key)
    assert str(values) in str(err.value) and key in str(err.value) and detail in str(err.value)
    assert values.read_text() == content
    with pytest.raises(ValuesError):
        read_image_tag(values, key)


def test_missing_values_file_raises_values_error(tmp_path: Path) -> None:
    """A values file that does not exist raises ValuesError naming it and the key."""
    missing = tmp_path / "nope" / "values.yaml"
    with pytest.raises(ValuesError) as err:
        bump_image_tag(missing, "v2", key="image.tag")
    assert str(missing) in str(err.value) and "image.tag" in str(err.value)
    assert not err.value.transient


def test_crlf_file_keeps_its_line_endings(tmp_path: Path) -> None:
    """A file with Windows line endings keeps them; only the tag changes."""
    values = tmp_path / "values.yaml"
    original = (HERE / "values.yaml").read_text().replace("\n", "\r\n")
    values.write_bytes(original.encode())
    bump_image_tag(values, "0.9.0", digest="sha256:" + "1" * 64)
    new = values.read_bytes().decode()
    assert "\r\n" in new and "\n" not in new.replace("\r\n", "")
    assert new.count("\r\n") == original.count("\r\n") + 1


def test_read_image_tag_at_reads_an_older_commit(remote: Path, clone_dir) -> None:
    """The tag of an earlier commit is read from history, without touching the work tree."""
    repo = checkout(str(remote), "main", clone_dir("a"))
    first = repo.head.commit.hexsha
    values = Path(repo.working_tree_dir) / "envs/dev/values.yaml"
    bump_image_tag(values, "0.2.0")
    commit_and_push(repo, [values], commit_message("bump", "0.2.0", app="a", environment="dev"), author=AUTHOR)
    assert read_image_tag_at(repo, first, "envs/dev/values.yaml") == "0.1.0"
    assert read_image_tag_at(repo, "HEAD", "envs/dev/values.yaml") == "0.2.0"
    with pytest.raises(ValuesError) as err:
        read_image_tag_at(repo, first, "envs/qa/values.yaml")
    assert "envs/qa/values.yaml" in str(err.value) and "image.tag" in str(err.value)
