"""Credentials never survive into text that leaves a task."""

from delivery.redact import redact, register_secret


def test_url_userinfo_is_masked():
    """A token in a Git remote URL is replaced, the host and path stay readable."""
    out = redact("fatal: could not read from https://x-access-token:ghp_abc123SECRET@github.com/o/r.git")
    assert "ghp_abc123SECRET" not in out
    assert "https://***@github.com/o/r.git" in out


def test_registered_secret_is_masked_anywhere():
    """A known secret value is masked even outside a URL."""
    register_secret("s3cr3t-registry-pass")
    assert "s3cr3t-registry-pass" not in redact("login failed for password s3cr3t-registry-pass")
