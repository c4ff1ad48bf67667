"""Credentials never survive into text that leaves a task."""

from delivery.redact import redact, register_secret

# Built at run time so the repository holds no token-shaped literal.
TOKEN = "ghp_abc123" + "SECRET"  # secret-scan: allow


def test_url_userinfo_is_masked():
    """A token in a Git remote URL is replaced, the host and path stay readable."""
    out = redact(f"fatal: could not read from https://x-access-token:{TOKEN}@github.com/o/r.git")
    assert TOKEN not in out
    assert "https://***@github.com/o/r.git" in out


def test_registered_secret_is_masked_anywhere():
    """A known secret value is masked even outside a URL."""
    value = "s3cr3t-" + "registry-pass"
    register_secret(value)
    assert value not in redact(f"login failed for password {value}")
