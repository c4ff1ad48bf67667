"""Git: clone and update work trees, read a file at a revision, commit and push, fetch what a judgement needs.

Pushes never force. A push that loses a race is rebased onto the winner and tried again; a real
conflict aborts cleanly and names the commit that won.

Every git command is a child process with a deadline (`git_timeout_seconds`): a remote that accepts
the connection and never answers is killed with its whole process group, and the error names the
remote and the seconds waited. Prompts are disabled. The token never enters an argument or a file:
it reaches git as an `http.<url>.extraHeader` in the child's environment (`GIT_CONFIG_COUNT`), for
https remotes (and plain http on loopback, the sandbox's and the tests' servers), and every output
line is redacted before it reaches a log line or an exception.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import git
from prefect import task
from prefect.cache_policies import NO_CACHE

from delivery.errors import DeliveryError, GitError, GitPushError, ValuesError
from delivery.log import get_logger
from delivery.redact import redact, register_secret
from delivery.retries import with_retries
from delivery.settings import Settings, get_settings
from tasks.values import image_tag_in_text, read_image_tag

_SHA_RE = re.compile(r"[0-9a-fA-F]{7,40}")

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

# Commands that talk to the remote: they get the credentials, and on a hang the error names the remote.
_NETWORK = {"clone", "fetch", "push", "ls-remote"}


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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_env(url: str, settings: Settings | None = None) -> dict[str, str]:
    """The child-environment config that sends the token to `url`'s host, or {} when none applies.

    Over https only, or plain http on a loopback address (a server on this machine): a token must
    not cross a network in clear. Scoped to `<scheme>://<host>/`, so a redirect or a submodule on
    another host never receives it. `credential.helper` is emptied so that no helper stores it."""
    settings = settings or get_settings()
    token = settings.git_token.get_secret_value() if settings.git_token else ""
    parts = urlsplit(str(url))
    if not token or parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return {}
    if parts.scheme == "http" and not _loopback(parts.hostname):
        return {}
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    register_secret(token)
    register_secret(basic)
    # After any GIT_CONFIG_* entries the process already has (an operator's url.insteadOf, say).
    try:
        n = max(0, int(os.environ.get("GIT_CONFIG_COUNT", "0") or 0))
    except ValueError:
        n = 0
    return {
        "GIT_CONFIG_COUNT": str(n + 2),
        f"GIT_CONFIG_KEY_{n}": f"http.{parts.scheme}://{parts.netloc}/.extraHeader",
        f"GIT_CONFIG_VALUE_{n}": f"Authorization: Basic {basic}",
        f"GIT_CONFIG_KEY_{n + 1}": "credential.helper",
        f"GIT_CONFIG_VALUE_{n + 1}": "",
    }


def _origin_url(cwd: Path | str, timeout: float) -> str:
    res = _exec(cwd, ["config", "--get", "remote.origin.url"], {}, timeout)
    return res.out.strip() if res.ok else ""


def _exec(cwd: Path | str, args: list[str], env: dict[str, str], timeout: float) -> _Out:
    """One git child process, killed with its process group (git forks remote helpers) at `timeout`."""
    full_env = {**os.environ, **_NON_INTERACTIVE, **env}
    try:
        proc = subprocess.Popen(  # noqa: S603 - a fixed executable and our own arguments, no shell
            ["git", *args], cwd=str(cwd), env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
    except OSError as e:
        raise GitError(f"cannot run git: {e}", transient=False) from e
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return _Out(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def _run(cwd: Path | str, *args: str, env: dict[str, str] | None = None, check: bool = True,
         url: str | None = None, settings: Settings | None = None) -> _Out:
    """Run `git <args>` in `cwd` within `git_timeout_seconds`; with `check`, a non-zero exit becomes a
    redacted `GitError`. A timeout always raises: a transient `GitError` naming the remote and the
    seconds waited. `url` is the remote of a clone (other network commands use `origin`'s)."""
    settings = settings or get_settings()
    timeout = settings.git_timeout_seconds
    extra = dict(env or {})
    network = bool(args) and args[0] in _NETWORK
    remote = url or ""
    if network and settings.git_token is not None:
        # Only a configured token needs the remote up front (its host scopes the header); without
        # one, no extra `git config` process runs for every fetch and push.
        remote = remote or _origin_url(cwd, timeout)
        extra.update(auth_env(remote, settings))
    started = time.monotonic()
    try:
        res = _exec(cwd, list(args), extra, timeout)
    except subprocess.TimeoutExpired:
        waited = time.monotonic() - started
        if network and not remote:
            remote = _origin_url(cwd, timeout)
        where = f" {redact(remote)}" if remote else f" in {cwd}"
        raise GitError(f"git {args[0]}{where} did not finish within {timeout:g} s (waited {waited:.1f} s; "
                       "killed)", transient=True) from None
    if check and not res.ok:
        raise _git_error(args[0], res)
    return res


def run_git(cwd: Path | str, *args: str, check: bool = True) -> str:
    """`git <args>` in `cwd` under the same bounds and credentials as every call here; its stdout."""
    return _run(cwd, *args, check=check).out


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


def _check_ref_name(name: str, what: str = "branch") -> None:
    # A name starting with "-" would be read by git as an option.
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise GitError(f"invalid {what} name {name!r}")


def _check_url(url: str) -> str:
    url = str(url)
    if not url or url.startswith("-") or any(c.isspace() for c in url):
        raise GitError(f"invalid repository URL {redact(url)!r}", transient=False)
    if "@" in urlsplit(url).netloc and urlsplit(url).scheme in ("http", "https"):
        # Credentials in the URL would land in argv and .git/config; the token setting is the way.
        raise GitError(f"{redact(url)} carries credentials; set DELIVERY_GIT_TOKEN instead", transient=False)
    return url


def _abort_unfinished(workdir: Path) -> None:
    """A crashed run may have left a rebase or merge half done; the next run must start clean."""
    gitdir = workdir / ".git"
    if (gitdir / "rebase-merge").exists() or (gitdir / "rebase-apply").exists():
        _run(workdir, "rebase", "--abort", check=False)
    if (gitdir / "MERGE_HEAD").exists():
        _run(workdir, "merge", "--abort", check=False)
    if (gitdir / "NOTES_MERGE_WORKTREE").exists() or (gitdir / "NOTES_MERGE_PARTIAL").exists():
        _run(workdir, "notes", "merge", "--abort", check=False)


def _clone(url: str, workdir: Path, *extra: str, settings: Settings | None = None) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        raise GitError(f"{workdir} exists, is not empty and is not a git clone")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = _run(workdir.parent, "clone", "--origin", "origin", *extra, "--", url, str(workdir), check=False,
                   url=url, settings=settings)
    except GitError:
        # A killed clone leaves a half-written directory that the next attempt would refuse.
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if not res.ok:
        shutil.rmtree(workdir, ignore_errors=True)
        raise _git_error("clone", res, prefix=f"cloning {redact(url)}: ")


def _backoff(attempt: int, deadline: float, *, base: float = 0.25, cap: float = 8.0) -> None:
    # Jitter keeps two pipelines that lost the same race from retrying in lockstep.
    delay = min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # noqa: S311 - not crypto
    delay = min(delay, max(0.0, deadline - time.monotonic()))
    if delay > 0:
        time.sleep(delay)


def _retried(what: str, fn, settings: Settings):
    return with_retries(fn, what=what, attempts=settings.git_retry_attempts, seconds=settings.git_retry_seconds)


def checkout(repo_url: str, branch: str, workdir: Path, *, settings: Settings | None = None) -> git.Repo:
    """Clone `repo_url` into `workdir` once; on reuse, fetch and hard-reset to `origin/<branch>`.

    Untracked and ignored files are removed too, so nothing left by an earlier run can end up in a
    commit. Works with local paths (bare repositories) and http(s) URLs. Transient failures (a
    refused connection, a hang, a 5xx) are retried within `git_retry_attempts`/`git_retry_seconds`.
    """
    settings = settings or get_settings()
    _check_ref_name(branch)
    url = _check_url(repo_url)
    workdir = Path(workdir)
    log = get_logger()

    def attempt() -> git.Repo:
        if (workdir / ".git").is_dir():
            log.info(f"Updating {workdir} from {redact(url)} ({branch})")
            # Also rewrites a URL an older version of this code stored with a token in it.
            _run(workdir, "remote", "set-url", "origin", url)
            _abort_unfinished(workdir)
            fetched = _run(workdir, "fetch", "--prune", "origin",
                           f"+refs/heads/{branch}:refs/remotes/origin/{branch}", check=False, settings=settings)
            if not fetched.ok:
                raise _git_error("fetch", fetched, prefix=f"fetching {branch} from {redact(url)}: ")
            _run(workdir, "checkout", "--force", "-B", branch, f"refs/remotes/origin/{branch}")
            _run(workdir, "reset", "--hard", f"refs/remotes/origin/{branch}")
            _run(workdir, "clean", "-ffdx")
        else:
            log.info(f"Cloning {redact(url)} ({branch}) into {workdir}")
            _clone(url, workdir, "--branch", branch, settings=settings)
        return git.Repo(workdir)

    repo = _retried(f"checkout of {redact(url)} ({branch})", attempt, settings)
    log.info(f"{workdir} is at {repo.head.commit.hexsha} (origin/{branch})")
    return repo


def _has_commit(workdir: Path, sha: str) -> bool:
    return _run(workdir, "cat-file", "-e", f"{sha}^{{commit}}", check=False).ok


def checkout_commit(repo_url: str, sha: str, workdir: Path, *, settings: Settings | None = None) -> Path:
    """The source tree of `repo_url` at exactly `sha` (detached), in `workdir`."""
    settings = settings or get_settings()
    if not _SHA_RE.fullmatch(sha or ""):
        raise GitError(f"{sha!r} is not a commit sha", transient=False)
    url = _check_url(repo_url)
    workdir = Path(workdir)
    log = get_logger()

    def attempt() -> None:
        if (workdir / ".git").is_dir():
            _run(workdir, "remote", "set-url", "origin", url)
            _abort_unfinished(workdir)
            if not _has_commit(workdir, sha):
                fetched = _run(workdir, "fetch", "--prune", "origin", check=False, settings=settings)
                if not fetched.ok:
                    raise _git_error("fetch", fetched, prefix=f"fetching {redact(url)}: ")
        else:
            log.info(f"Cloning {redact(url)} into {workdir}")
            _clone(url, workdir, "--no-checkout", settings=settings)
        if not _has_commit(workdir, sha) and len(sha) == 40:
            # Servers that allow it (GitHub does) serve a commit no branch points at any more.
            _run(workdir, "fetch", "origin", sha, check=False, settings=settings)

    _retried(f"checkout of {redact(url)} at {sha[:12]}", attempt, settings)
    if not _has_commit(workdir, sha):
        raise GitError(f"commit {sha} not found in {redact(url)}", transient=False)
    _run(workdir, "checkout", "--force", "--detach", sha)
    _run(workdir, "clean", "-ffdx")
    head = _run(workdir, "rev-parse", "HEAD").out.strip()
    log.info(f"Source {redact(url)} checked out at {head} in {workdir}")
    return workdir


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
    return image_tag_in_text(shown.out, source, key)


def remote_image_tag_in(repo: git.Repo, branch: str, path: str, key: str = "image.tag") -> str:
    """The tag `path` names on the remote's `branch` right now: fetched, then read from that commit."""
    _check_ref_name(branch)
    _fetch_branch(_workdir(repo), branch)
    return read_image_tag_at(repo, f"refs/remotes/origin/{branch}", path, key)


def remote_image_tag(repo_url: str, branch: str, path: str, workdir: Path, key: str = "image.tag") -> str:
    """Like `remote_image_tag_in`, for a run that has no clone of the GitOps repository yet."""
    checkout(repo_url, branch, Path(workdir))
    return read_image_tag(Path(workdir) / path, key)


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
    max_attempts: int | None = None,
    max_seconds: float | None = None,
) -> CommitResult:
    """Commit exactly `paths` and push to `origin/<branch>` without ever forcing.

    A push that lost a race, or failed transiently, is retried (rebased onto the winner first when it
    lost a race), bounded by `max_attempts` and `max_seconds` (default: the `git_retry_*` settings);
    this loop is the only retry layer for the push. A real conflict aborts, resets to origin and
    raises `GitPushError` naming the remote commit. Nothing to commit returns the remote head with `committed=False`.
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

    settings = get_settings()
    max_attempts = max_attempts or settings.git_retry_attempts
    max_seconds = max_seconds or settings.git_retry_seconds
    started = time.monotonic()
    deadline = started + max_seconds
    rebased = False
    attempt = 0
    while True:
        attempt += 1
        try:
            res = _run(workdir, "push", "--porcelain", "origin", f"HEAD:refs/heads/{branch}", check=False)
        except GitError as e:  # the remote did not answer in time
            res = _Out(-1, "", e.message)
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
                f"push to origin/{branch} gave up after {attempt} attempt(s) in {time.monotonic() - started:.1f} s "
                f"(bound: {max_attempts} attempts, {max_seconds:g} s): {why}; the commit is kept locally",
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
        try:
            if not _has_commit(workdir, revision):
                _run(workdir, "fetch", "--quiet", "origin", check=False)
        except GitError:
            return False  # not remembered: the next status change asks again
        try:
            ok = is_newer(repo, commit_sha, revision) and read_image_tag_at(repo, revision, path, key) == tag
        except DeliveryError:
            ok = False
        seen[revision] = ok
        return ok

    return carries


# ------------------------------------------------------------------------------------------ tasks
# No Prefect task retries: each function above bounds its own retries (one layer, from settings).


@task(name="checkout", cache_policy=NO_CACHE)
def checkout_task(repo_url: str, branch: str, workdir: Path) -> git.Repo:
    return checkout(repo_url, branch, workdir)


@task(name="checkout-commit", cache_policy=NO_CACHE)
def checkout_commit_task(repo_url: str, sha: str, workdir: Path) -> Path:
    return checkout_commit(repo_url, sha, workdir)


@task(name="commit-and-push", cache_policy=NO_CACHE)
def commit_and_push_task(
    repo: git.Repo,
    paths: list[str | Path],
    message: str,
    author: tuple[str, str] | None = None,
    branch: str | None = None,
) -> CommitResult:
    return commit_and_push(repo, paths, message, author=author, branch=branch)
