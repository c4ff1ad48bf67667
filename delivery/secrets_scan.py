"""Find plaintext secrets committed to a repository: the app's own repo in the tests, the GitOps repo
in the drift check.

Two kinds of evidence:
- a key whose name says it holds a secret (password, passwd, secret, token, apikey/api_key,
  private_key) with a literal value: YAML `key: value`, JSON `"key": "value"`, env/CLI `KEY=value`
  (`--from-literal=postgres-password=...`, `--set secrets.postgresPassword=...`), and in source code
  only quoted string literals (an identifier there is a reference, not a value);
- a value that looks like a known credential whatever its key (GitHub / Docker Hub / GitLab / Slack
  tokens, AWS access key ids, PEM private keys, passwords in URLs).

Placeholders are not secrets: empty values, `<...>`, `${VAR}`, `$VAR`, `{{ ... }}`, `***`, `your-...`,
booleans and numbers, ENV_VAR_NAMES. Keys that *name* a secret rather than hold one
(`existingSecret`, `secretName`, `secretKeyRef`, `passwordKey`, `...File`, `...Path`) are references.

A `Finding` carries the file, line and key, never the value, so reports can be shown anywhere.

Test files that must contain fake secrets mark the line with `secret-scan: allow`. The marker only
counts under a top-level `tests/` directory: in manifests, values files or code it is ignored, so it
cannot hide a real secret where it would be deployed.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ALLOW_MARKER = "secret-scan: allow"
_ALLOW_MARKER_DIRS = ("tests",)

# Files larger than this are data, not configuration.
_MAX_BYTES = 2_000_000

_SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "privatekey")

# Normalised (lower-case, alphanumerics only) key suffixes that name a secret instead of holding one.
_REFERENCE_SUFFIXES = (
    "existingsecret",
    "secretname",
    "secretref",
    "secretkeyref",
    "secretsref",
    "pullsecrets",
    "passwordkey",
    "tokenkey",
    "secretkeyname",
    "block",
    "file",
    "path",
    "env",
    "envvar",
    "header",
    "secretstore",
    "secretproviderclass",
    "automountserviceaccounttoken",
)

_CODE_SUFFIXES = {".py", ".pyi", ".js", ".ts", ".go", ".java", ".rb", ".rs"}

_TOKEN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("github-token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})")),
    ("dockerhub-token", re.compile(r"\bdckr_pat_[A-Za-z0-9_-]{20,}")),
    ("gitlab-token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("slack-token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private-key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
)
_URL_PASSWORD = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]+:(?P<pw>[^/\s@'\"]+)@")

# `key: value` (YAML, also `"key": value` JSON on its own line), optionally a list item.
_YAML_PAIR = re.compile(r"""^\s*(?:-\s+)?(?P<q>["']?)(?P<key>[A-Za-z0-9_][\w.\-/]*)(?P=q)\s*:(?:\s+(?P<value>.*))?$""")
# `"key": "value"` anywhere (JSON on one line, Python dicts).
# The value is a lookahead so that pairs nested in a quoted value are seen too.
_QUOTED_PAIR = re.compile(
    r"""(?P<q>["'])(?P<key>[A-Za-z0-9_][\w.\-]*)(?P=q)\s*:\s*(?=(?P<value>"[^"\n]*"|'[^'\n]*'))"""
)
# `key=value`; the key must be glued to `=` so that `a == b` and prose do not match. The value is a
# lookahead so that `--from-literal=name=value` yields both `from-literal` and `name`.
_ENV_PAIR = re.compile(
    r"""(?<![\w.\-])(?P<key>[A-Za-z_][\w.\-]*)=(?!=)(?=(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s"'=,;]*))"""
)
# Source code: `name = "literal"`, `name: str = "literal"`, `name="literal"` (keyword argument).
_CODE_ASSIGN = re.compile(
    r"""(?<![\w.])(?P<key>[A-Za-z_]\w*)\s*(?::\s*[\w\[\]|. ]+?)?\s*=(?!=)\s*(?P<value>"[^"\n]*"|'[^'\n]*')"""
)

_PLACEHOLDER = re.compile(
    r"""^(?:
        <[^<>]*>                      # <value>, <your-password>
      | \$.*                          # $VAR, ${VAR}, ${{ secrets.X }}, $(command)
      | .*\{\{.*\}\}.*                # {{ .Values.x }} / Jinja
      | \{[^{}]*\}                    # f-string / format field
      | %\([^)]*\)s                   # %(name)s
      | [*xX.•…-]{3,}                 # ***, xxxx, ...
      | .*(?:\.\.\.|…)               # an elided example: abc123...
      | (?i:redacted|placeholder|none|null|nil|undefined|true|false|yes|no|on|off|required|optional)
      | (?i:your[-_].*)               # your-postgres-password
      | [A-Z][A-Z0-9_]*               # an environment variable name
      | [-+]?\d+(?:\.\d+)?[a-z]{0,2}  # numbers, durations (3600, 5s, 10m)
    )$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Finding:
    """One secret-looking value: where it is and under which key or rule. Never the value itself."""

    file: str
    line: int
    key: str
    rule: str = "secret-key"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule} ({self.key})"


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def is_secret_key(key: str) -> bool:
    """Does the key's name say it holds a secret (and not a reference to one)?"""
    k = _norm(key.rsplit(".", 1)[-1]) if "." in key else _norm(key)
    if not any(w in k for w in _SECRET_WORDS):
        return False
    return not k.endswith(_REFERENCE_SUFFIXES)


def _unquote(raw: str) -> tuple[str, bool]:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1], True
    return raw, False


def is_placeholder(value: str) -> bool:
    """Is this value obviously not a real secret (empty, a template, a reference, a mask)?"""
    v = value.strip()
    # Unquoted values in prose and commands drag punctuation along: `(--set x=<value>).`
    return not v or bool(_PLACEHOLDER.match(v) or _PLACEHOLDER.match(v.rstrip(").,;:]}")))


def _yaml_value(raw: str | None, next_lines: list[str]) -> str | None:
    """The literal value of a YAML pair, or None when it is not a scalar literal worth checking."""
    if raw is None:
        return None
    raw = raw.strip()
    if raw[:1] in "\"'":
        m = re.match(r"""(["'])(.*?)\1""", raw)
        return m.group(2) if m else raw[1:]
    raw = re.split(r"\s+#", raw, maxsplit=1)[0].strip().rstrip(",")
    if raw in ("", "{}", "[]") or raw[:1] in "{[&*!":
        return None
    if raw[:1] in "|>":
        # A block scalar: its first content line is the value.
        for nxt in next_lines:
            if nxt.strip():
                return nxt.strip()
        return None
    if re.search(r"\s", raw):
        # Several words: prose, an expression or a command, not a credential.
        return None
    return raw


def _allowed(path: str) -> bool:
    # Normalised first, so that `tests/../helm/values.yaml` is not "under tests/".
    parts = PurePosixPath(posixpath.normpath(path.replace("\\", "/"))).parts
    return bool(parts) and parts[0] in _ALLOW_MARKER_DIRS


def scan_text(path: str, text: str) -> list[Finding]:
    """Secret-looking values in one file's text; `path` (repo-relative) picks the syntax rules."""
    findings: list[Finding] = []
    is_code = PurePosixPath(path).suffix.lower() in _CODE_SUFFIXES
    honour_marker = _allowed(path)
    lines = text.splitlines()
    for idx, line in enumerate(lines):
        if honour_marker and ALLOW_MARKER in line:
            continue
        lineno = idx + 1
        seen: set[tuple[str, str]] = set()

        def add(key: str, rule: str, lineno: int = lineno, seen: set[tuple[str, str]] = seen) -> None:
            if (key, rule) not in seen:
                seen.add((key, rule))
                findings.append(Finding(path, lineno, key, rule))

        for rule, pattern in _TOKEN_PATTERNS:
            if pattern.search(line):
                add(rule, rule)
        for m in _URL_PASSWORD.finditer(line):
            if not is_placeholder(m.group("pw")):
                add("url", "url-password")

        if is_code:
            for rx in (_CODE_ASSIGN, _QUOTED_PAIR):
                for m in rx.finditer(line):
                    value, _ = _unquote(m.group("value"))
                    if is_secret_key(m.group("key")) and not is_placeholder(value):
                        add(m.group("key"), "secret-key")
            continue

        m = _YAML_PAIR.match(line)
        if m and is_secret_key(m.group("key")):
            value = _yaml_value(m.group("value"), lines[idx + 1 : idx + 4])
            if value is not None and not is_placeholder(value):
                add(m.group("key"), "secret-key")
        for m in _QUOTED_PAIR.finditer(line):
            value, _ = _unquote(m.group("value"))
            if is_secret_key(m.group("key")) and not is_placeholder(value):
                add(m.group("key"), "secret-key")
        for m in _ENV_PAIR.finditer(line):
            value, _ = _unquote(m.group("value"))
            if is_secret_key(m.group("key")) and not is_placeholder(value):
                add(m.group("key"), "secret-key")
    return findings


def scan_tree(root: Path, paths: Iterable[Path]) -> list[Finding]:
    """Scan the given files (relative to `root`, or absolute inside it); binary, huge and symlinked
    files are skipped (a symlink's target is scanned as itself when it is in the tree)."""
    root = Path(root)
    findings: list[Finding] = []
    for p in paths:
        full = p if p.is_absolute() else root / p
        try:
            rel = full.relative_to(root).as_posix()
        except ValueError:
            rel = full.as_posix()
        if full.is_symlink() or not full.is_file():
            continue
        try:
            if full.stat().st_size > _MAX_BYTES:
                continue
            data = full.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        findings.extend(scan_text(rel, data.decode("utf-8", errors="replace")))
    return findings
