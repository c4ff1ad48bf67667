"""The image tag scheme: which tags a push to a branch or Git tag produces."""

from __future__ import annotations

import re

import pytest

from delivery.errors import ConfigError, DeliveryError
from tasks.images import image_tags

SHA = "0123456789abcdef0123456789abcdef01234567"
VALID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("main", ["main-0123456", "main", "latest"]),
        ("refs/heads/main", ["main-0123456", "main", "latest"]),
        ("release-dev", ["release-dev-0123456", "release-dev"]),
        ("refs/heads/release-dev", ["release-dev-0123456", "release-dev"]),
        ("feature/x", ["feature-x-0123456", "feature-x"]),
        ("refs/heads/feature//x__y", ["feature-x__y-0123456", "feature-x__y"]),
        ("refs/tags/v1.2.3", ["v1.2.3"]),
        ("v1.2.3", ["v1.2.3"]),
        ("refs/tags/v2.0.0-rc.1", ["v2.0.0-rc.1"]),
        ("refs/tags/nightly", ["nightly-0123456", "nightly"]),
        ("main; rm -rf /", ["main-rm-rf-0123456", "main-rm-rf"]),
        ("../../etc/passwd", ["etc-passwd-0123456", "etc-passwd"]),
        ("$(id)", ["id-0123456", "id"]),
        ("--upload-pack=x", ["upload-pack-x-0123456", "upload-pack-x"]),
        ("fëature/ünïcode", ["feature-unicode-0123456", "feature-unicode"]),
        ("latest", ["latest-0123456"]),
    ],
)
def test_tag_table(ref: str, expected: list[str]) -> None:
    """Each ref yields the documented tags, primary first, all valid Docker tags."""
    tags = image_tags(ref, SHA)
    assert tags == expected
    assert all(VALID.match(t) for t in tags)


def test_latest_follows_the_configured_default_branch() -> None:
    """`latest` goes to the configured default branch, not to `main` by name."""
    assert image_tags("main", SHA, default_branch="trunk") == ["main-0123456", "main"]
    assert image_tags("refs/heads/trunk", SHA, default_branch="trunk") == ["trunk-0123456", "trunk", "latest"]


def test_long_branch_is_truncated_to_128_characters() -> None:
    """A 300-character branch name still gives a primary tag of at most 128 characters ending in the sha."""
    tags = image_tags("feature/" + "a" * 300, SHA)
    assert len(tags[0]) == 128
    assert tags[0].endswith("-0123456")
    assert tags[0].startswith("feature-aaaa")
    assert len(tags[1]) <= 128 and tags[0].startswith(tags[1])
    assert all(VALID.match(t) for t in tags)


def test_truncation_never_leaves_a_trailing_separator() -> None:
    """Cutting a long name at a dash does not produce `--<sha>` or a trailing dash."""
    tags = image_tags("x" * 119 + "/yyyy", SHA)
    assert "--" not in tags[0]
    assert not tags[1].endswith("-")


@pytest.mark.parametrize("ref", ["", "   ", "日本語", "///", "$()", "-", "refs/heads/", "x" * 5000])
def test_unusable_ref_names_are_refused(ref: str) -> None:
    """A ref with nothing usable left after sanitising is refused with a reason."""
    with pytest.raises(ConfigError) as e:
        image_tags(ref, SHA)
    assert isinstance(e.value, DeliveryError) and not e.value.transient
    assert e.value.message


def test_empty_after_sanitising_says_so() -> None:
    """The error for an all-unicode branch name explains that nothing was left."""
    with pytest.raises(ConfigError, match="empty after sanitising"):
        image_tags("日本語", SHA)


@pytest.mark.parametrize("sha", ["", "abc123", "g123456", "0123456789abcdef0123456789abcdef012345678", "01234 67"])
def test_bad_sha_is_refused(sha: str) -> None:
    """The commit sha must be 7 to 40 hex characters."""
    with pytest.raises(ConfigError, match="hexadecimal"):
        image_tags("main", sha)


def test_short_and_uppercase_sha_are_accepted() -> None:
    """A 7-character sha works, and the tag always carries it in lowercase."""
    assert image_tags("main", "ABCDEF0")[0] == "main-abcdef0"
