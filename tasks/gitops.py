"""The GitOps repository: check it out, rewrite the image tag in a Helm values file, commit and push.

Pushes never force. A push that loses a race is rebased onto the winner and tried again; a real
conflict aborts cleanly and names the commit that won. Which tags were verified healthy in which
environment is kept as git notes (`refs/notes/delivery`) in the repository itself, so the record
survives a new Prefect server and is what a rollback reads.

Every git command runs with prompts disabled and with its output redacted before it reaches a log
line or an exception: remote URLs may carry a token.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import git
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

from delivery.errors import DeliveryError, GitError, GitPushError, ValuesError
from delivery.log import get_logger
from delivery.redact import redact, register_secret
from delivery.retries import retry_if_transient as _retry_if_transient
from delivery.settings import Settings, get_settings

PIPELINE_TRAILER = "Delivery-Pipeline"
NOTES_REF = "refs/notes/delivery"
# Where the remote's notes are fetched to before being merged into ours; never pushed.
_NOTES_FETCHED = "refs/notes/origin/delivery"

_PIPELINE_KINDS = {"bump": "values-bump", "rollback": "rollback"}
_SHA_RE = re.compile(r"[0-9a-fA-F]{7,40}")
_TRAILER_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_PLAIN_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")

# A job must never hang on a credential prompt or an editor.
_NON_INTERACTIVE = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "SSH_ASKPASS": "",
    "GIT_EDITOR": "true",
    "GIT_SEQUENCE_EDITOR": "true",
    "GIT_MERGE_AUTOEDIT": "no",
}

_TRANSIENT_MARKERS = (
    "could not resolve host",
    "connection refused",
    "couldn't connect to server",
    "failed to connect",
    "connection timed out",
    "operation timed out",
    "timed out",
    "connection reset",
    "the remote end hung up unexpectedly",
    "early eof",
    "unexpected disconnect",
    "http 429",
    "the requested url returned error: 5",
    "http/2 stream",
    "gnutls",
    "ssl_connect",
    "temporary failure in name resolution",
    "network is unreachable",
)
_AUTH_MARKERS = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "the requested url returned error: 401",
    "the requested url returned error: 403",
    "permission denied",
    "invalid username or password",
)


# --------------------------------------------------------------------------------------------- git


@dataclass
class _Out:
    status: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def text(self) -> str:
        return "\n".join(s for s in (self.out.strip(), self.err.strip()) if s)


def _run(cwd: Path | str, *args: str, env: dict[str, str] | None = None, check: bool = True) -> _Out:
    """Run `git <args>` in `cwd`; with `check`, a non-zero exit becomes a redacted `GitError`."""
    status, out, err = git.Git(str(cwd)).execute(
        ["git", *args],
        with_extended_output=True,
        with_exceptions=False,
        env={**_NON_INTERACTIVE, **(env or {})},
    )
    res = _Out(int(status or 0), out or "", err or "")
    if check and not res.ok:
        raise _git_error(args[0], res)
    return res


def _git_error(what: str, res: _Out, *, prefix: str = "") -> GitError:
    text = redact(_last_lines(res.text))
    lowered = text.lower()
    transient = any(m in lowered for m in _TRANSIENT_MARKERS) and not any(m in lowered for m in _AUTH_MARKERS)
    return GitError(f"{prefix}git {what} failed: {text}", transient=transient)


def _last_lines(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("hint:")]
    return "\n".join(lines[-n:]) or "(no output)"


def _workdir(repo: git.Repo) -> Path:
    if repo.working_tree_dir is None:
        raise GitError(f"{repo.git_dir} is a bare repository; a working tree is needed")
    return Path(repo.working_tree_dir)


def _identity_env(author: tuple[str, str] | None = None, settings: Settings | None = None) -> dict[str, str]:
    if author is None:
        s = settings or get_settings()
        author = (s.git_author_name, s.git_author_email)
    name, email = author
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }


def _authenticated_url(repo_url: str, settings: Settings) -> str:
    """Put the configured token into an https URL that has no credentials of its own."""
    url = str(repo_url)
    if settings.git_token is None:
        return url
    token = settings.git_token.get_secret_value()
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc or "@" in parts.netloc or not token:
        return url
    register_secret(token)
    return urlunsplit(parts._replace(netloc=f"x-access-token:{token}@{parts.netloc}"))


def _check_ref_name(name: str, what: str = "branch") -> None:
    # A name starting with "-" would be read by git as an option.
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise GitError(f"invalid {what} name {name!r}")


def _abort_unfinished(workdir: Path) -> None:
    """A crashed run may have left a rebase or merge half done; the next run must start clean."""
    gitdir = workdir / ".git"
    if (gitdir / "rebase-merge").exists() or (gitdir / "rebase-apply").exists():
        _run(workdir, "rebase", "--abort", check=False)
    if (gitdir / "MERGE_HEAD").exists():
        _run(workdir, "merge", "--abort", check=False)
    if (gitdir / "NOTES_MERGE_WORKTREE").exists() or (gitdir / "NOTES_MERGE_PARTIAL").exists():
        _run(workdir, "notes", "merge", "--abort", check=False)


def _clone(url: str, workdir: Path, *extra: str) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        raise GitError(f"{workdir} exists, is not empty and is not a git clone")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    res = _run(workdir.parent, "clone", "--origin", "origin", *extra, "--", url, str(workdir), check=False)
    if not res.ok:
        raise _git_error("clone", res, prefix=f"cloning {redact(url)}: ")


def _backoff(attempt: int, deadline: float, *, base: float = 0.25, cap: float = 8.0) -> None:
    # Jitter keeps two pipelines that lost the same race from retrying in lockstep.
    delay = min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # noqa: S311 - not crypto
    delay = min(delay, max(0.0, deadline - time.monotonic()))
    if delay > 0:
        time.sleep(delay)


def checkout(repo_url: str, branch: str, workdir: Path, *, settings: Settings | None = None) -> git.Repo:
    """Clone `repo_url` into `workdir` once; on reuse, fetch and hard-reset to `origin/<branch>`.

    Untracked and ignored files are removed too, so nothing left by an earlier run can end up in a
    commit. Works with local paths (bare repositories) and http(s) URLs.
    """
    settings = settings or get_settings()
    _check_ref_name(branch)
    url = _authenticated_url(str(repo_url), settings)
    workdir = Path(workdir)
    log = get_logger()
    if (workdir / ".git").is_dir():
        log.info(f"Updating {workdir} from {redact(url)} ({branch})")
        _run(workdir, "remote", "set-url", "origin", url)
        _abort_unfinished(workdir)
        fetched = _run(workdir, "fetch", "--prune", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
                       check=False)
        if not fetched.ok:
            raise _git_error("fetch", fetched, prefix=f"fetching {branch} from {redact(url)}: ")
        _run(workdir, "checkout", "--force", "-B", branch, f"refs/remotes/origin/{branch}")
        _run(workdir, "reset", "--hard", f"refs/remotes/origin/{branch}")
        _run(workdir, "clean", "-ffdx")
    else:
        log.info(f"Cloning {redact(url)} ({branch}) into {workdir}")
        _clone(url, workdir, "--branch", branch)
    repo = git.Repo(workdir)
    log.info(f"{workdir} is at {repo.head.commit.hexsha} (origin/{branch})")
    return repo


def _has_commit(workdir: Path, sha: str) -> bool:
    return _run(workdir, "cat-file", "-e", f"{sha}^{{commit}}", check=False).ok


def checkout_commit(repo_url: str, sha: str, workdir: Path, *, settings: Settings | None = None) -> Path:
    """The source tree of `repo_url` at exactly `sha` (detached), in `workdir`."""
    settings = settings or get_settings()
    if not _SHA_RE.fullmatch(sha or ""):
        raise GitError(f"{sha!r} is not a commit sha", transient=False)
    url = _authenticated_url(str(repo_url), settings)
    workdir = Path(workdir)
    log = get_logger()
    if (workdir / ".git").is_dir():
        _run(workdir, "remote", "set-url", "origin", url)
        _abort_unfinished(workdir)
        if not _has_commit(workdir, sha):
            fetched = _run(workdir, "fetch", "--prune", "origin", check=False)
            if not fetched.ok:
                raise _git_error("fetch", fetched, prefix=f"fetching {redact(url)}: ")
    else:
        log.info(f"Cloning {redact(url)} into {workdir}")
        _clone(url, workdir, "--no-checkout")
    if not _has_commit(workdir, sha) and len(sha) == 40:
        # Servers that allow it (GitHub does) serve a commit no branch points at any more.
        _run(workdir, "fetch", "origin", sha, check=False)
    if not _has_commit(workdir, sha):
        raise GitError(f"commit {sha} not found in {redact(url)}", transient=False)
    _run(workdir, "checkout", "--force", "--detach", sha)
    _run(workdir, "clean", "-ffdx")
    head = _run(workdir, "rev-parse", "HEAD").out.strip()
    log.info(f"Source {redact(url)} checked out at {head} in {workdir}")
    return workdir


# ------------------------------------------------------------------------------------------ values


@dataclass
class BumpResult:
    values_file: Path
    key: str
    old_tag: str
    new_tag: str
    changed: bool
    digest: str | None = None


def _read_values_text(values_file: Path, key: str) -> str:
    try:
        with open(values_file, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError as e:
        raise ValuesError(f"values file {values_file} not found (looking for key {key})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValuesError(f"values file {values_file} cannot be read (looking for key {key}): {e}") from e


def _compose(text: str, source: str, key: str) -> MappingNode:
    """Parse `text` into nodes that know where each value sits in the text."""
    try:
        # A full load also catches what composing alone lets through (duplicate keys).
        YAML(typ="rt").load(text)
        root = YAML(typ="rt").compose(text)
    except YAMLError as e:
        detail = " ".join(str(e).split())
        raise ValuesError(f"{source} is not valid YAML (looking for key {key}): {detail}") from e
    if not isinstance(root, MappingNode):
        raise ValuesError(f"{source} is not a YAML mapping (looking for key {key})")
    return root


def _key_parts(key: str) -> list[str]:
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ValuesError(f"invalid key path {key!r}")
    return parts


def _find_node(root: MappingNode, key: str, source: str) -> tuple[MappingNode, ScalarNode, Any]:
    """(parent mapping, key node, value node) of the dotted `key`."""
    parts = _key_parts(key)
    node: Any = root
    parent: MappingNode = root
    key_node: Any = None
    for i, part in enumerate(parts):
        if not isinstance(node, MappingNode):
            where = ".".join(parts[:i])
            raise ValuesError(f"{source}: {where} is not a mapping, so key {key} cannot be found")
        matches = [(k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == part]
        if not matches:
            where = ".".join(parts[: i + 1])
            raise ValuesError(f"{source}: key {key} not found ({where} is missing)")
        parent = node
        key_node, node = matches[-1]
    return parent, key_node, node


def _scalar_value(node: Any, key: str, source: str) -> str:
    if not isinstance(node, ScalarNode):
        kind = "mapping" if isinstance(node, MappingNode) else "list"
        raise ValuesError(f"{source}: key {key} holds a {kind}, not an image tag")
    return node.value


def read_image_tag(values_file: Path, key: str = "image.tag") -> str:
    """The image tag stored at `key` in `values_file`."""
    values_file = Path(values_file)
    text = _read_values_text(values_file, key)
    _, _, node = _find_node(_compose(text, str(values_file), key), key, str(values_file))
    return _scalar_value(node, key, str(values_file))


def read_image_tag_at(repo: git.Repo, rev: str, path: str, key: str = "image.tag") -> str:
    """The image tag at `key` in `path` as of commit `rev`, read without touching the working tree."""
    _check_ref_name(rev, "revision")
    workdir = _workdir(repo)
    if not _run(workdir, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False).ok:
        raise GitError(f"revision {rev} not found in {workdir}", transient=False)
    source = f"{path} at {rev}"
    shown = _run(workdir, "show", f"{rev}:{path}", check=False)
    if not shown.ok:
        raise ValuesError(f"values file {source} not found (looking for key {key})")
    _, _, node = _find_node(_compose(shown.out, source, key), key, source)
    return _scalar_value(node, key, source)


def remote_image_tag_in(repo: git.Repo, branch: str, path: str, key: str = "image.tag") -> str:
    """The tag `path` names on the remote's `branch` right now: fetched, then read from that commit."""
    _check_ref_name(branch)
    _fetch_branch(_workdir(repo), branch)
    return read_image_tag_at(repo, f"refs/remotes/origin/{branch}", path, key)


def remote_image_tag(repo_url: str, branch: str, path: str, workdir: Path, key: str = "image.tag") -> str:
    """Like `remote_image_tag_in`, for a run that has no clone of the GitOps repository yet."""
    checkout(repo_url, branch, Path(workdir))
    return read_image_tag(Path(workdir) / path, key)


def _plain_is_string(value: str) -> bool:
    """True when `value` written without quotes reads back as the same string (not a number or a date)."""
    if not _PLAIN_TAG_RE.fullmatch(value):
        return False
    try:
        return YAML(typ="safe").load(f"k: {value}\n") == {"k": value}
    except YAMLError:
        return False


def _render_scalar(value: str, style: str | None) -> str:
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    if style != '"' and _plain_is_string(value):
        return value
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(value, ensure_ascii=False)


def _single_line(text: str, node: Any) -> bool:
    start, end = node.start_mark.index, node.end_mark.index
    return end > start and "\n" not in text[start:end] and "\r" not in text[start:end]


def _replace_span(text: str, node: Any, new: str) -> str:
    return text[: node.start_mark.index] + new + text[node.end_mark.index :]


def _edit_in_place(text: str, root: MappingNode, key: str, new_tag: str, digest: str | None, source: str) -> str | None:
    """Rewrite only the characters of the tag (and digest) scalars; None when that is not possible."""
    parent, tag_key, tag_node = _find_node(root, key, source)
    if not _single_line(text, tag_node):
        return None
    digest_node = None
    if digest is not None:
        digest_node = next((v for k, v in parent.value if isinstance(k, ScalarNode) and k.value == "digest"), None)
        if digest_node is not None and not (isinstance(digest_node, ScalarNode) and _single_line(text, digest_node)):
            return None
        if digest_node is None:
            line_start = text.rfind("\n", 0, tag_key.start_mark.index) + 1
            if parent.flow_style or text[line_start : tag_key.start_mark.index].strip():
                return None
    # Edit back to front so the earlier marks stay valid.
    edits: list[tuple[int, str]] = []
    if digest is not None and digest_node is not None:
        edits.append((digest_node.start_mark.index, "replace-digest"))
    if tag_node.value != new_tag:
        edits.append((tag_node.start_mark.index, "replace-tag"))
    if digest is not None and digest_node is None:
        edits.append((tag_node.end_mark.index, "insert-digest"))
    for _, what in sorted(edits, reverse=True):
        if what == "replace-tag":
            text = _replace_span(text, tag_node, _render_scalar(new_tag, tag_node.style))
        elif what == "replace-digest":
            text = _replace_span(text, digest_node, _render_scalar(digest or "", digest_node.style or '"'))
        else:
            eol = text.find("\n", tag_node.end_mark.index)
            newline = "\r\n" if eol > 0 and text[eol - 1] == "\r" else "\n"
            line = " " * tag_key.start_mark.column + f"digest: {json.dumps(digest)}"
            if eol < 0:
                text = text + newline + line
            else:
                text = text[: eol + 1] + line + newline + text[eol + 1 :]
    return text


def _detect_mapping_indent(text: str) -> int:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for cur, nxt in zip(lines, lines[1:], strict=False):
        body = cur.split(" #")[0].rstrip()
        if body.endswith(":") and not cur.lstrip().startswith("- "):
            i, j = len(cur) - len(cur.lstrip()), len(nxt) - len(nxt.lstrip())
            if j > i and not nxt.lstrip().startswith("- "):
                return j - i
    return 2


def _detect_sequence_indent(text: str) -> tuple[int, int]:
    """(sequence indent, dash offset) as ruamel means them: `key:\\n  - x` is (4, 2)."""
    lines = text.splitlines()
    for prev, cur in zip(lines, lines[1:], strict=False):
        if cur.lstrip().startswith("- ") and prev.rstrip().split(" #")[0].endswith(":"):
            offset = (len(cur) - len(cur.lstrip())) - (len(prev) - len(prev.lstrip()))
            if offset >= 0:
                return offset + 2, offset
    return 4, 2


def _edit_round_trip(text: str, key: str, new_tag: str, digest: str | None, source: str) -> str:
    """Fallback for layouts the in-place edit cannot handle: a full round trip that keeps comments,
    key order, quoting and the file's own indentation."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    seq, offset = _detect_sequence_indent(text)
    yaml.indent(mapping=_detect_mapping_indent(text), sequence=seq, offset=offset)
    if "\r\n" in text:
        yaml.line_break = "\r\n"
    data = yaml.load(text)
    parts = _key_parts(key)
    parent = data
    for part in parts[:-1]:
        parent = parent[part]
    old = parent[parts[-1]]
    if isinstance(old, SingleQuotedScalarString):
        parent[parts[-1]] = SingleQuotedScalarString(new_tag)
    elif isinstance(old, DoubleQuotedScalarString) or not _plain_is_string(new_tag):
        parent[parts[-1]] = DoubleQuotedScalarString(new_tag)
    else:
        parent[parts[-1]] = new_tag
    if digest is not None:
        if "digest" in parent:
            parent["digest"] = DoubleQuotedScalarString(digest)
        else:
            parent.insert(list(parent.keys()).index(parts[-1]) + 1, "digest", DoubleQuotedScalarString(digest))
    out = StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bump_image_tag(values_file: Path, new_tag: str, *, key: str = "image.tag", digest: str | None = None) -> BumpResult:
    """Set the image tag at `key` in a Helm values file to `new_tag`, changing nothing else.

    Only the tag's characters are rewritten (and, with `digest`, a `digest:` line is set or added right
    after the tag), so comments, key order, quoting and indentation stay as they are and the diff is the
    tag line alone. A tag that is already `new_tag` leaves the file untouched.
    """
    values_file = Path(values_file)
    source = str(values_file)
    log = get_logger()
    if not new_tag or any(c in new_tag for c in "\r\n"):
        raise ValuesError(f"refusing to write image tag {new_tag!r} to {source} (key {key})")
    text = _read_values_text(values_file, key)
    root = _compose(text, source, key)
    parent, _, tag_node = _find_node(root, key, source)
    old_tag = _scalar_value(tag_node, key, source)
    old_digest = None
    if digest is not None:
        found = next((v for k, v in parent.value if isinstance(k, ScalarNode) and k.value == "digest"), None)
        old_digest = found.value if isinstance(found, ScalarNode) else None

    if old_tag == new_tag and (digest is None or old_digest == digest):
        log.info(f"{source}: {key} is already {new_tag}; nothing changed")
        return BumpResult(values_file, key, old_tag, new_tag, changed=False, digest=old_digest)

    new_text = _edit_in_place(text, root, key, new_tag, digest, source)
    if new_text is None:
        new_text = _edit_round_trip(text, key, new_tag, digest, source)

    # Never write a file that would not read back as what we meant.
    check_root = _compose(new_text, source, key)
    check_parent, _, check_node = _find_node(check_root, key, source)
    written_digest = next(
        (v.value for k, v in check_parent.value if isinstance(k, ScalarNode) and k.value == "digest"), None
    )
    if _scalar_value(check_node, key, source) != new_tag or (digest is not None and written_digest != digest):
        raise ValuesError(f"{source}: rewriting {key} to {new_tag} did not read back as written; file left as is")

    _write_atomically(values_file, new_text)
    suffix = f" (digest {digest})" if digest else ""
    log.info(f"{source}: {key} {old_tag or '(empty)'} -> {new_tag}{suffix}")
    return BumpResult(values_file, key, old_tag, new_tag, changed=True, digest=digest)


# ------------------------------------------------------------------------------- commit messages


def _one_line(value: str) -> str:
    return " ".join(str(value).split())


def commit_message(
    kind: Literal["bump", "rollback"],
    tag: str,
    *,
    app: str,
    environment: str,
    source_sha: str | None = None,
    digest: str | None = None,
    replaces: str | None = None,
    reason: str = "",
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
) -> str:
    """The message of a values commit: subject, a body a reviewer can read, and machine-readable trailers."""
    if kind not in _PIPELINE_KINDS:
        raise ValueError(f"unknown commit kind {kind!r}")
    tag, app, environment = _one_line(tag), _one_line(app), _one_line(environment)
    verb = "update" if kind == "bump" else "roll back"
    subject = f"chore(helm): {verb} image tag to {tag}"
    if kind == "bump":
        body = [f"Deploy {app} to {environment} with image tag {tag}."]
    else:
        body = [f"Roll {app} in {environment} back to image tag {tag}."]
    if source_sha:
        body.append(f"Source commit: {_one_line(source_sha)}")
    if digest:
        body.append(f"Image digest: {_one_line(digest)}")
    if replaces:
        body.append(f"Replaces tag: {_one_line(replaces)}")
    if reason.strip():
        # Blank lines in the reason would end the body early and confuse trailer parsing.
        body.append("Reason: " + " ".join(ln.strip() for ln in reason.strip().splitlines() if ln.strip()))
    if flow_run_id:
        body.append(f"Prefect flow run: {_one_line(flow_run_id)}")
    if flow_run_url:
        body.append(f"Flow run URL: {_one_line(flow_run_url)}")
    trailers = [
        f"{PIPELINE_TRAILER}: {_PIPELINE_KINDS[kind]}",
        f"Delivery-App: {app}",
        f"Delivery-Environment: {environment}",
        f"Delivery-Tag: {tag}",
    ]
    if source_sha:
        trailers.append(f"Delivery-Source-Commit: {_one_line(source_sha)}")
    if flow_run_id:
        trailers.append(f"Delivery-Flow-Run: {_one_line(flow_run_id)}")
    return "\n".join([subject, "", *body, "", *trailers]) + "\n"


def commit_trailers(message: str) -> list[tuple[str, str]]:
    """The git trailers of `message`: the last paragraph, when every line of it is `Key: value`."""
    text = message.replace("\r\n", "\n").strip()
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) < 2:
        return []
    trailers: list[tuple[str, str]] = []
    for line in paragraphs[-1].split("\n"):
        if line.startswith("#"):
            continue
        if line[:1] in (" ", "\t") and trailers:
            k, v = trailers[-1]
            trailers[-1] = (k, f"{v} {line.strip()}")
            continue
        m = _TRAILER_RE.match(line)
        if not m:
            return []
        trailers.append((m.group(1), m.group(2).strip()))
    return trailers


def _trailer_map(message: str) -> dict[str, str]:
    return {k.lower(): v for k, v in commit_trailers(message)}


def is_pipeline_commit(message: str) -> bool:
    """True iff the commit was made by this pipeline (its trailer block has `Delivery-Pipeline:`)."""
    return PIPELINE_TRAILER.lower() in _trailer_map(message)


# ------------------------------------------------------------------------------- commit and push


@dataclass
class CommitResult:
    sha: str
    committed: bool
    attempts: int
    rebased: bool


def _current_branch(workdir: Path) -> str:
    res = _run(workdir, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if not res.ok:
        raise GitError(f"{workdir} is on a detached HEAD; name the branch to push", transient=False)
    return res.out.strip()


def _relative_paths(workdir: Path, paths: list[str | Path]) -> list[str]:
    root = workdir.resolve()
    if isinstance(paths, str | Path):
        paths = [paths]  # a bare string would otherwise be taken character by character
    out = []
    for p in paths:
        path = Path(p)
        if path.is_absolute():
            try:
                path = path.resolve().relative_to(root)
            except ValueError as e:
                raise GitError(f"{p} is outside the repository {workdir}", transient=False) from e
        out.append(path.as_posix())
    return out


def _fetch_branch(workdir: Path, branch: str) -> str:
    res = _run(workdir, "fetch", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}", check=False)
    if not res.ok:
        raise _git_error("fetch", res, prefix=f"fetching origin/{branch}: ")
    return _run(workdir, "rev-parse", f"refs/remotes/origin/{branch}").out.strip()


def _classify_push(res: _Out) -> str:
    text = res.text.lower()
    # Two pushes landing at the same instant: the remote's ref moved under us; same as non-fast-forward.
    if "cannot lock ref" in text or "failed to update ref" in text or "incorrect old value" in text:
        return "behind"
    if "[remote rejected]" in text or "pre-receive hook declined" in text or "hook declined" in text:
        return "declined"
    if "[rejected]" in text and ("fetch first" in text or "non-fast-forward" in text):
        return "behind"
    if any(m in text for m in _AUTH_MARKERS):
        return "auth"
    if any(m in text for m in _TRANSIENT_MARKERS):
        return "transient"
    return "fatal"


def _remote_says(res: _Out) -> str:
    """What the remote (its hooks) printed, without git's own framing."""
    said = [ln[len("remote:") :].strip() for ln in res.err.splitlines() if ln.startswith("remote:")]
    said = [s for s in said if s]
    reasons = re.findall(r"\[remote rejected\][^\n]*", res.text)
    return redact("; ".join(said + reasons) or _last_lines(res.text))


def _reset_to_remote(workdir: Path, branch: str) -> None:
    _run(workdir, "reset", "--hard", f"refs/remotes/origin/{branch}", check=False)
    _run(workdir, "clean", "-ffdx", check=False)


def _rebase_onto_remote(workdir: Path, branch: str, env: dict[str, str]) -> None:
    """Replay our commit on top of what won the race; on a real conflict, give up cleanly."""
    remote = f"refs/remotes/origin/{branch}"
    base = _run(workdir, "merge-base", "HEAD", remote).out.strip()
    res = _run(workdir, "rebase", "--autostash", remote, env=env, check=False)
    if res.ok:
        return
    conflicted = _run(workdir, "diff", "--name-only", "--diff-filter=U", check=False).out.split()
    _run(workdir, "rebase", "--abort", check=False)
    culprit = _run(workdir, "log", "-1", "--format=%H%x1f%s", f"{base}..{remote}", "--", *conflicted,
                   check=False).out.strip()
    if not culprit:
        culprit = _run(workdir, "log", "-1", "--format=%H%x1f%s", remote, check=False).out.strip()
    sha, _, subject = culprit.partition("\x1f")
    _reset_to_remote(workdir, branch)
    files = ", ".join(conflicted) or "the same lines"
    raise GitPushError(
        f"our change to {files} conflicts with {sha} \"{subject}\" on origin/{branch}; "
        "nothing was pushed and the work tree was reset to origin",
        transient=False,
    )


def commit_and_push(
    repo: git.Repo,
    paths: list[str | Path],
    message: str,
    *,
    author: tuple[str, str] | None = None,
    branch: str | None = None,
    max_attempts: int = 5,
    max_seconds: float = 60,
) -> CommitResult:
    """Commit exactly `paths` and push to `origin/<branch>` without ever forcing.

    A push that lost a race is rebased onto the winner and retried (bounded by `max_attempts` and
    `max_seconds`); a real conflict aborts, resets to origin and raises `GitPushError` naming the
    remote commit. Nothing to commit returns the remote head with `committed=False`.
    """
    workdir = _workdir(repo)
    log = get_logger()
    branch = branch or _current_branch(workdir)
    _check_ref_name(branch)
    rel = _relative_paths(workdir, paths)
    if not rel:
        raise GitError("commit_and_push needs at least one path", transient=False)
    env = _identity_env(author)

    _run(workdir, "add", "--", *rel)
    staged = _run(workdir, "diff", "--cached", "--name-only", "HEAD", "--", *rel).out.strip()
    if staged:
        # --only: whatever else is staged or dirty in the work tree stays out of this commit.
        _run(workdir, "commit", "--only", "--no-verify", "-m", message, "--", *rel, env=env)
        head = _run(workdir, "rev-parse", "HEAD").out.strip()
        log.info(f"Committed {head} ({', '.join(rel)}): {message.splitlines()[0]}")
    else:
        remote_head = _fetch_branch(workdir, branch)
        ahead = _run(workdir, "rev-list", "--count", f"refs/remotes/origin/{branch}..HEAD").out.strip()
        if ahead == "0":
            log.info(f"Nothing to commit in {', '.join(rel)}: origin/{branch} is already at {remote_head}")
            return CommitResult(sha=remote_head, committed=False, attempts=0, rebased=False)
        # An earlier attempt committed but could not push; push that commit now.
        log.info(f"Nothing new to commit; pushing {ahead} pending local commit(s) to origin/{branch}")

    deadline = time.monotonic() + max_seconds
    rebased = False
    attempt = 0
    while True:
        attempt += 1
        res = _run(workdir, "push", "--porcelain", "origin", f"HEAD:refs/heads/{branch}", check=False)
        if res.ok:
            sha = _run(workdir, "rev-parse", "HEAD").out.strip()
            log.info(f"Pushed {sha} to origin/{branch} (attempt {attempt}{', rebased' if rebased else ''})")
            return CommitResult(sha=sha, committed=True, attempts=attempt, rebased=rebased)
        kind = _classify_push(res)
        if kind == "declined":
            raise GitPushError(f"push to origin/{branch} refused by the remote: {_remote_says(res)}", transient=False)
        if kind in ("auth", "fatal"):
            raise GitPushError(f"push to origin/{branch} failed: {redact(_last_lines(res.text))}", transient=False)
        if attempt >= max_attempts or time.monotonic() >= deadline:
            why = "still behind origin" if kind == "behind" else redact(_last_lines(res.text))
            raise GitError(
                f"push to origin/{branch} gave up after {attempt} attempt(s): {why}; the commit is kept locally",
                transient=True,
            )
        log.warning(
            f"Push to origin/{branch} attempt {attempt} "
            f"{'rejected (remote moved on)' if kind == 'behind' else 'failed: ' + redact(_last_lines(res.text, 2))}"
            "; retrying"
        )
        _backoff(attempt, deadline)
        if kind == "behind":
            _fetch_branch(workdir, branch)
            _rebase_onto_remote(workdir, branch, env)
            rebased = True
            head = _run(workdir, "rev-parse", "HEAD").out.strip()
            remote_head = _run(workdir, "rev-parse", f"refs/remotes/origin/{branch}").out.strip()
            if head == remote_head:
                log.info(f"origin/{branch} already holds this change; nothing to push ({head})")
                return CommitResult(sha=head, committed=False, attempts=attempt, rebased=True)


# ------------------------------------------------------------------------------------------ notes


def _sync_notes(workdir: Path, env: dict[str, str]) -> None:
    """Bring the remote's verification notes into ours; lines from both sides are all kept."""
    res = _run(workdir, "fetch", "origin", f"+{NOTES_REF}:{_NOTES_FETCHED}", check=False)
    if not res.ok:
        if "couldn't find remote ref" in res.text.lower():
            return
        raise _git_error("fetch", res, prefix="fetching verification notes: ")
    if not _run(workdir, "rev-parse", "--verify", "--quiet", NOTES_REF, check=False).ok:
        _run(workdir, "update-ref", NOTES_REF, _NOTES_FETCHED)
        return
    _abort_unfinished(workdir)
    merged = _run(workdir, "notes", f"--ref={NOTES_REF}", "merge", "-q", "-s", "cat_sort_uniq", _NOTES_FETCHED,
                  env=env, check=False)
    if not merged.ok:
        raise _git_error("notes merge", merged, prefix="merging verification notes: ")


def _check_word(value: str, what: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise GitError(f"{what} {value!r} must be one word to be recorded", transient=False)


def _note_line(app: str, environment: str, tag: str, stamp: str) -> str:
    return f"verified app={app} env={environment} tag={tag} at={stamp}"


def _parse_note_line(line: str) -> dict[str, str] | None:
    """`verified app=A env=E tag=T at=S` → its fields; an older line without `app=` → None: it counts
    for no app, since in a GitOps repository shared by several apps it could be any of them."""
    words = line.split()
    if not words or words[0] != "verified":
        return None
    fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    if not fields.get("app") or not fields.get("env") or not fields.get("tag"):
        return None
    return fields


def record_verified(repo: git.Repo, commit_sha: str, *, app: str, environment: str, tag: str,
                    max_attempts: int = 5) -> None:
    """Record on `commit_sha` (git note in refs/notes/delivery) that `app`'s `tag` was verified in `environment`."""
    workdir = _workdir(repo)
    log = get_logger()
    _check_word(app, "app")
    _check_word(environment, "environment")
    _check_word(tag, "tag")
    if not _SHA_RE.fullmatch(commit_sha or "") or not _has_commit(workdir, commit_sha):
        raise GitError(f"commit {commit_sha} not found in {workdir}; cannot record verification", transient=False)
    env = _identity_env()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = _note_line(app, environment, tag, stamp)

    _sync_notes(workdir, env)
    existing = _run(workdir, "notes", f"--ref={NOTES_REF}", "show", commit_sha, check=False)
    content = (existing.out.rstrip("\n") + "\n" + line) if existing.ok and existing.out.strip() else line
    _run(workdir, "notes", f"--ref={NOTES_REF}", "add", "--force", "-m", content, commit_sha, env=env)

    deadline = time.monotonic() + 60
    for attempt in range(1, max_attempts + 1):
        res = _run(workdir, "push", "--porcelain", "origin", f"{NOTES_REF}:{NOTES_REF}", check=False)
        if res.ok:
            log.info(f"Recorded: {commit_sha} {line}")
            return
        kind = _classify_push(res)
        if kind in ("declined", "auth", "fatal"):
            raise GitPushError(f"pushing verification notes failed: {_remote_says(res)}", transient=False)
        if attempt == max_attempts:
            break
        _backoff(attempt, deadline)
        if kind == "behind":
            _sync_notes(workdir, env)
    raise GitError(f"pushing verification notes gave up after {max_attempts} attempts", transient=True)


def _history_rev(workdir: Path, branch: str | None, *, fetch: bool) -> str:
    branch = branch or _current_branch(workdir)
    _check_ref_name(branch)
    remote = f"refs/remotes/origin/{branch}"
    if fetch:
        _fetch_branch(workdir, branch)
    if _run(workdir, "rev-parse", "--verify", "--quiet", remote, check=False).ok:
        return remote
    return "HEAD"


def verified_tags(repo: git.Repo, app: str, environment: str, *,
                  branch: str | None = None) -> list[tuple[str, str, str]]:
    """(commit sha, tag, timestamp) of each verification of `app` in `environment`, newest commit first.

    The whole branch is read, not its last N commits: on a GitOps branch shared by many apps the last
    verification of a quiet app can be hundreds of commits back."""
    workdir = _workdir(repo)
    _sync_notes(workdir, _identity_env())
    rev = _history_rev(workdir, branch, fetch=True)
    if not _run(workdir, "rev-parse", "--verify", "--quiet", NOTES_REF, check=False).ok:
        return []
    out = _run(workdir, "log", f"--notes={NOTES_REF}", "--format=%H%x1f%N%x1e", rev).out
    found: list[tuple[str, str, str]] = []
    for record in out.split("\x1e"):
        sha, _, note = record.strip().partition("\x1f")
        if not note.strip():
            continue
        entries = []
        for ln in note.splitlines():
            f = _parse_note_line(ln)
            if f and f["app"] == app and f["env"] == environment:
                entries.append((sha, f["tag"], f.get("at", "")))
        found.extend(sorted(entries, key=lambda e: e[2], reverse=True))
    return found


def last_verified_tag(
    repo: git.Repo, app: str, environment: str, *, branch: str | None = None,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> str | None:
    """The tag of the newest commit on the branch verified for `app` in `environment`, skipping `exclude`."""
    for _, tag, _ in verified_tags(repo, app, environment, branch=branch):
        if tag not in exclude:
            return tag
    return None


def deployed_source_commit(repo: git.Repo, *, app: str, environment: str, branch: str | None = None) -> str | None:
    """The source commit behind what Git currently deploys of `app` to `environment`: the
    `Delivery-Source-Commit` of the newest pipeline commit (bump or rollback) for both, or None.

    Git filters the history by the trailers (so the whole branch is searched, however busy), and
    each hit is then checked by parsing its trailer block: a body line that merely mentions an app
    must not count."""
    workdir = _workdir(repo)
    rev = _history_rev(workdir, branch, fetch=False)
    out = _run(workdir, "log", "--fixed-strings", "--all-match", f"--grep={PIPELINE_TRAILER}: ",
               f"--grep=Delivery-App: {app}", f"--grep=Delivery-Environment: {environment}",
               "--format=%H%x1f%B%x1e", rev).out
    for record in out.split("\x1e"):
        _, _, body = record.strip().partition("\x1f")
        t = _trailer_map(body)
        ours = t.get("delivery-app") == app and t.get("delivery-environment") == environment
        if PIPELINE_TRAILER.lower() in t and ours:
            return t.get("delivery-source-commit") or None
    return None


def open_repo(path: Path) -> git.Repo:
    """The repository checked out at `path` (e.g. by `checkout_commit`)."""
    try:
        return git.Repo(Path(path))
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
        raise GitError(f"{path} is not a git work tree", transient=False) from e


def fetch_commits(repo: git.Repo, shas: list[str]) -> None:
    """Make sure `repo` has each of `shas` (when the remote still has them): one fetch of every
    branch first, since a newer commit of a branch is usually its tip; then by sha, which servers
    that allow it (GitHub, protocol v2) serve even when no branch points at it any more."""
    workdir = _workdir(repo)
    missing = [s for s in shas if _SHA_RE.fullmatch(s or "") and not _has_commit(workdir, s)]
    if not missing:
        return
    _run(workdir, "fetch", "--quiet", "origin", "+refs/heads/*:refs/remotes/origin/*", check=False)
    for sha in missing:
        if not _has_commit(workdir, sha) and len(sha) == 40:
            _run(workdir, "fetch", "--quiet", "origin", sha, check=False)


def is_newer(repo: git.Repo, sha: str, other: str) -> bool:
    """True when `other` is a descendant of `sha` in `repo`, i.e. a later commit of the same line.

    A commit `repo` does not have (not fetched yet, or from an unrelated history) is not called newer:
    without the graph there is no safe answer, and a wrong "newer" would drop a deploy."""
    workdir = _workdir(repo)
    if sha == other or not _SHA_RE.fullmatch(sha or "") or not _SHA_RE.fullmatch(other or ""):
        return False
    if not (_has_commit(workdir, sha) and _has_commit(workdir, other)):
        return False
    a = _run(workdir, "rev-parse", f"{sha}^{{commit}}").out.strip()
    b = _run(workdir, "rev-parse", f"{other}^{{commit}}").out.strip()
    return a != b and _run(workdir, "merge-base", "--is-ancestor", a, b, check=False).ok


def carries_change(repo: git.Repo, commit_sha: str, path: str, tag: str, *, key: str = "image.tag"):
    """A predicate for `tasks.argocd.wait_for_sync`: does revision `r` still carry our values commit?

    True when `r` descends from `commit_sha` and `path` still names `tag` at `r`: another app's or
    environment's values commit landed on top of ours, and Argo CD synced that newer head. Unknown
    revisions are fetched once; answers are remembered, since the wait asks on every status change."""
    workdir = _workdir(repo)
    seen: dict[str, bool] = {}

    def carries(revision: str) -> bool:
        if revision in seen:
            return seen[revision]
        if not _SHA_RE.fullmatch(revision or ""):
            return False
        if not _has_commit(workdir, revision):
            _run(workdir, "fetch", "--quiet", "origin", check=False)
        try:
            ok = is_newer(repo, commit_sha, revision) and read_image_tag_at(repo, revision, path, key) == tag
        except DeliveryError:
            ok = False
        seen[revision] = ok
        return ok

    return carries


# ------------------------------------------------------------------------------------------ tasks




_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_if_transient,
}


@task(name="checkout", cache_policy=NO_CACHE, **_RETRIES)
def checkout_task(repo_url: str, branch: str, workdir: Path) -> git.Repo:
    return checkout(repo_url, branch, workdir)


@task(name="checkout-commit", cache_policy=NO_CACHE, **_RETRIES)
def checkout_commit_task(repo_url: str, sha: str, workdir: Path) -> Path:
    return checkout_commit(repo_url, sha, workdir)


@task(name="bump-image-tag", cache_policy=NO_CACHE)
def bump_image_tag_task(
    values_file: Path, new_tag: str, key: str = "image.tag", digest: str | None = None
) -> BumpResult:
    return bump_image_tag(values_file, new_tag, key=key, digest=digest)


@task(name="commit-and-push", cache_policy=NO_CACHE, **_RETRIES)
def commit_and_push_task(
    repo: git.Repo,
    paths: list[str | Path],
    message: str,
    author: tuple[str, str] | None = None,
    branch: str | None = None,
) -> CommitResult:
    return commit_and_push(repo, paths, message, author=author, branch=branch)


@task(name="record-verified", cache_policy=NO_CACHE, **_RETRIES)
def record_verified_task(repo: git.Repo, commit_sha: str, app: str, environment: str, tag: str) -> None:
    record_verified(repo, commit_sha, app=app, environment=environment, tag=tag)
