"""No plaintext secret is committed, and the scanner that checks it finds real leaks without echoing them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from delivery.secrets_scan import ALLOW_MARKER, Finding, scan_text, scan_tree

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The Application the old setup committed, password and all (from its own documentation).
SEED_APPLICATION = """\
spec:
  source:
    helm:
      values: |
        secrets:
          postgresPassword: jandrew28
          mongodbPassword: ""
"""


def repo_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [Path(p) for p in out.split("\0") if p]


def test_repository_has_no_plaintext_secrets():
    """Every tracked or new file in the repository is free of secret-looking literal values."""
    files = repo_files()
    assert Path("helm/workout-api/values.yaml") in files
    findings = scan_tree(PROJECT_ROOT, files)
    if findings:
        pytest.fail(
            "secret-looking values committed (use an out-of-band Secret, ${VAR} or <placeholder>; "
            f"fake secrets in tests/ need `{ALLOW_MARKER}` on the line):\n" + "\n".join(map(str, findings)),
            pytrace=False,
        )


def test_seed_password_is_found_without_its_value():
    """The old Application's inline postgresPassword is reported by file, line and key, never by value."""
    findings = scan_text("argocd/application.yaml", SEED_APPLICATION)
    assert findings == [Finding("argocd/application.yaml", 6, "postgresPassword", "secret-key")]
    for text in (repr(findings), str(findings[0]), repr(findings[0].__dict__)):
        assert "jandrew28" not in text  # secret-scan: allow


def test_secrets_in_other_syntaxes_are_found():
    """JSON, env files, kubectl --from-literal, helm --set, block scalars and Secret manifests are scanned."""
    cases = {
        "config.json": '{"name": "x", "apiKey": "k3y-abc123"}',  # secret-scan: allow
        ".env": "export DJANGO_SECRET_KEY=django-insecure-abc123xyz",  # secret-scan: allow
        "deploy.sh": "kubectl create secret generic s --from-literal=postgres-password=hunter2",  # secret-scan: allow
        "Makefile": "\thelm upgrade x . --set secrets.postgresPassword=hunter2",  # secret-scan: allow
        "key.yaml": "sshPrivateKey: |\n  c3VwZXJzZWNyZXQ=\n",
        "secret.yaml": "kind: Secret\ndata:\n  postgres-password: aHVudGVyMg==\n",  # secret-scan: allow
        "settings.py": 'webhook_secret: str = "s3cr3t-value"',  # secret-scan: allow
        "app/settings.py": 'SECRET_KEY = "django-insecure-9x8y7z"',  # secret-scan: allow
    }
    for path, text in cases.items():
        findings = scan_text(path, text)
        assert len(findings) == 1, (path, findings)
        assert findings[0].rule == "secret-key"


def test_known_token_shapes_are_found_whatever_the_key():
    """GitHub, Docker Hub and AWS tokens, PEM private keys and URL passwords are found under any key."""
    fakes = {
        "github-token": "ghp_" + "A1b2C3d4" * 5,  # secret-scan: allow
        "dockerhub-token": "dckr_pat_" + "Zz9-" * 7,  # secret-scan: allow
        "aws-access-key-id": "AKIA" + "ABCDEFGHIJKLMNOP",  # secret-scan: allow
        "private-key": "-----BEGIN " + "OPENSSH PRIVATE KEY-----",  # secret-scan: allow
    }
    for rule, token in fakes.items():
        findings = scan_text("notes.txt", f"remember this: {token}\n")
        assert [f.rule for f in findings] == [rule]
        assert token not in repr(findings)
    url = "https://deploy:" + "pa55word" + "@git.example.com/x.git"
    assert [f.rule for f in scan_text("ci.yaml", f"remote: {url}")] == ["url-password"]


def test_placeholders_and_references_are_not_secrets():
    """Empty values, templates, env references, placeholders and Secret names are not reported."""
    benign = """\
secrets:
  create: false
  existingSecret: workout-api-secrets
  postgresPassword: ""
  mongodbPassword:
env:
  - name: POSTGRES_PASSWORD
    valueFrom:
      secretKeyRef:
        name: workout-api-secrets
        key: postgres-password
password: ${{ secrets.DOCKERHUB_PASSWORD }}
token: "{{ .Values.token }}"
apiKey: ${API_KEY}
secretName: workout-api-tls
automountServiceAccountToken: false
tokenTTL: 3600
# kubectl create secret generic s --from-literal=postgres-password=<value>
DB_PASSWORD=$(cat /run/secrets/db)
registry_password_block: registry-password
password: your-postgres-password
# --from-literal=django-secret-key='django-insecure-abc123xyz...'
webhook secret: set it in the GitHub UI
clone https://x-access-token:<token>@github.com/o/r.git
"""
    assert scan_text("helm/workout-api/values.yaml", benign) == []
    code = 'token = settings.git_token.get_secret_value()\nWEBHOOK_SECRET_ENV = "DELIVERY_WEBHOOK_SECRET"\n'
    assert scan_text("delivery/x.py", code) == []


def test_allow_marker_only_counts_in_tests():
    """The allow marker silences a line under tests/ only; in manifests or code the finding stands."""
    line = f"postgresPassword: hunter2  # {ALLOW_MARKER}\n"  # secret-scan: allow
    assert scan_text("tests/fixtures/values.yaml", line) == []
    assert len(scan_text("helm/workout-api/values.yaml", line)) == 1
    assert len(scan_text("argocd/tests/values.yaml", line)) == 1
    assert len(scan_text("delivery/tests.yaml", line)) == 1
    assert len(scan_text("tests/../helm/values.yaml", line)) == 1
    # The marker covers its own line, not the next one.
    two = f"# {ALLOW_MARKER}\npostgresPassword: hunter2\n"  # secret-scan: allow
    assert [f.line for f in scan_text("tests/values.yaml", two)] == [2]


def test_scan_tree_reports_relative_paths_and_skips_binaries_and_links(tmp_path):
    """scan_tree names files relative to the root and ignores binary files and symlinks."""
    (tmp_path / "helm").mkdir()
    (tmp_path / "helm" / "values.yaml").write_text("image:\n  tag: x\nsecrets:\n  postgresPassword: hunter2\n")
    (tmp_path / "blob.bin").write_bytes(b"\0\1password: hunter2\n")
    os.symlink(tmp_path / "helm" / "values.yaml", tmp_path / "link.yaml")
    paths = [Path("helm/values.yaml"), Path("blob.bin"), Path("link.yaml"), Path("gone.yaml")]
    findings = scan_tree(tmp_path, paths)
    assert findings == [Finding("helm/values.yaml", 4, "postgresPassword", "secret-key")]
