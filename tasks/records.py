"""Verification records: which tag of which app was verified healthy in which environment, and which
source commit Git deploys. Kept in the GitOps repository itself, so the record survives a new Prefect
server and is what a rollback reads:

- git notes on the values commit (`refs/notes/delivery`), one line per verification:
  `verified app=<app> env=<env> tag=<tag> at=<UTC time> digest=<image digest>` (`digest=` since
  promotions: the digest the verified release was pushed with, which a promotion must find unchanged;
  older lines lack it, and `verified_digest` then reads the values commit's own message);
- the trailers of the pipeline's own commits (`tasks.trailers`).

Every record is keyed by app and environment, and so is every read: several apps share one GitOps
repository and the same environment names. A line without `app=` counts for no app.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import git
from prefect import task
from prefect.cache_policies import NO_CACHE

from delivery.errors import GitError, GitPushError
from delivery.log import get_logger
from delivery.settings import get_settings
from tasks.gitops import (
    _SHA_RE,
    _abort_unfinished,
    _backoff,
    _check_ref_name,
    _classify_push,
    _current_branch,
    _fetch_branch,
    _git_error,
    _has_commit,
    _identity_env,
    _Out,
    _remote_says,
    _run,
    _workdir,
)
from tasks.trailers import PIPELINE_TRAILER, trailer_map

NOTES_REF = "refs/notes/delivery"
# Where the remote's notes are fetched to before being merged into ours; never pushed.
_NOTES_FETCHED = "refs/notes/origin/delivery"



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


def _note_line(app: str, environment: str, tag: str, stamp: str, digest: str = "") -> str:
    line = f"verified app={app} env={environment} tag={tag} at={stamp}"
    return f"{line} digest={digest}" if digest else line


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
                    max_attempts: int | None = None, digest: str = "") -> None:
    """Record on `commit_sha` (git note in refs/notes/delivery) that `app`'s `tag` was verified in
    `environment`, with the image `digest` that was verified when it is known."""
    workdir = _workdir(repo)
    log = get_logger()
    _check_word(app, "app")
    _check_word(environment, "environment")
    _check_word(tag, "tag")
    if digest:
        _check_word(digest, "digest")
    if not _SHA_RE.fullmatch(commit_sha or "") or not _has_commit(workdir, commit_sha):
        raise GitError(f"commit {commit_sha} not found in {workdir}; cannot record verification", transient=False)
    env = _identity_env()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = _note_line(app, environment, tag, stamp, digest)

    _sync_notes(workdir, env)
    existing = _run(workdir, "notes", f"--ref={NOTES_REF}", "show", commit_sha, check=False)
    content = (existing.out.rstrip("\n") + "\n" + line) if existing.ok and existing.out.strip() else line
    _run(workdir, "notes", f"--ref={NOTES_REF}", "add", "--force", "-m", content, commit_sha, env=env)

    settings = get_settings()
    max_attempts = max_attempts or settings.git_retry_attempts
    started = time.monotonic()
    deadline = started + settings.git_retry_seconds
    last = ""
    for attempt in range(1, max_attempts + 1):
        try:
            res = _run(workdir, "push", "--porcelain", "origin", f"{NOTES_REF}:{NOTES_REF}", check=False)
        except GitError as e:  # the remote did not answer in time
            res = _Out(-1, "", e.message)
        if res.ok:
            log.info(f"Recorded: {commit_sha} {line}")
            return
        kind = _classify_push(res)
        if kind in ("declined", "auth", "fatal") and res.status != -1:
            raise GitPushError(f"pushing verification notes failed: {_remote_says(res)}", transient=False)
        last = _remote_says(res)
        if attempt == max_attempts or time.monotonic() >= deadline:
            break
        _backoff(attempt, deadline)
        if kind == "behind":
            _sync_notes(workdir, env)
    raise GitError(f"pushing verification notes gave up after {attempt} attempt(s) in "
                   f"{time.monotonic() - started:.1f} s (bound: {max_attempts} attempts, "
                   f"{settings.git_retry_seconds:g} s): {last}", transient=True)


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
        t = trailer_map(body)
        ours = t.get("delivery-app") == app and t.get("delivery-environment") == environment
        if PIPELINE_TRAILER.lower() in t and ours:
            return t.get("delivery-source-commit") or None
    return None


@dataclass(frozen=True)
class PipelineCommit:
    """One of the pipeline's own values commits for an app and environment, read from its trailers."""

    sha: str
    kind: str  # values-bump | rollback
    tag: str
    source_sha: str
    flow_run: str


def pipeline_commits(repo: git.Repo, *, app: str, environment: str, branch: str | None = None,
                     fetch: bool = False) -> list[PipelineCommit]:
    """The pipeline's values commits (bumps and rollbacks) for `app` in `environment`, newest first,
    over the whole branch; filtered by trailers as `deployed_source_commit` is."""
    workdir = _workdir(repo)
    rev = _history_rev(workdir, branch, fetch=fetch)
    out = _run(workdir, "log", "--fixed-strings", "--all-match", f"--grep={PIPELINE_TRAILER}: ",
               f"--grep=Delivery-App: {app}", f"--grep=Delivery-Environment: {environment}",
               "--format=%H%x1f%B%x1e", rev).out
    found = []
    for record in out.split("\x1e"):
        sha, _, body = record.strip().partition("\x1f")
        t = trailer_map(body)
        if PIPELINE_TRAILER.lower() not in t or t.get("delivery-app") != app or \
                t.get("delivery-environment") != environment:
            continue
        found.append(PipelineCommit(sha=sha, kind=t[PIPELINE_TRAILER.lower()], tag=t.get("delivery-tag", ""),
                                    source_sha=t.get("delivery-source-commit", ""),
                                    flow_run=t.get("delivery-flow-run", "")))
    return found


@dataclass(frozen=True)
class Verification:
    """One verification of an app's tag in an environment, as its note records it."""

    commit: str  # the values commit the note is on
    tag: str
    at: str  # UTC, `%Y-%m-%dT%H:%M:%SZ`
    digest: str  # empty on lines written before digests were recorded

    @property
    def at_datetime(self) -> datetime | None:
        try:
            return datetime.strptime(self.at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return None


def verifications(repo: git.Repo, app: str, environment: str, *, branch: str | None = None) -> list[Verification]:
    """Every verification of `app` in `environment`, newest first by time (what `verified_tags`
    reads, with each line's digest)."""
    workdir = _workdir(repo)
    _sync_notes(workdir, _identity_env())
    rev = _history_rev(workdir, branch, fetch=True)
    if not _run(workdir, "rev-parse", "--verify", "--quiet", NOTES_REF, check=False).ok:
        return []
    out = _run(workdir, "log", f"--notes={NOTES_REF}", "--format=%H%x1f%N%x1e", rev).out
    found: list[Verification] = []
    for record in out.split("\x1e"):
        sha, _, note = record.strip().partition("\x1f")
        for ln in note.splitlines():
            f = _parse_note_line(ln)
            if f and f["app"] == app and f["env"] == environment:
                found.append(Verification(sha, f["tag"], f.get("at", ""), f.get("digest", "")))
    return sorted(found, key=lambda v: v.at, reverse=True)


_BODY_DIGEST_RE = re.compile(r"^Image digest: (sha256:[0-9a-f]{64})$", re.MULTILINE)


def verified_digest(repo: git.Repo, v: Verification, *, app: str, environment: str) -> str:
    """The image digest recorded when `v` was verified: the note's `digest=`, else (a line written
    before digests were noted) the digest the verified values commit itself names, but only when that
    commit is the pipeline's bump of this very app, environment and tag (a note can sit on another
    commit: the remote head, when the tag was already in Git). Empty when neither records one."""
    if v.digest:
        return v.digest
    res = _run(_workdir(repo), "log", "-1", "--format=%B", v.commit, check=False)
    if not res.ok:
        return ""
    t = trailer_map(res.out)
    if t.get("delivery-app") != app or t.get("delivery-environment") != environment or t.get("delivery-tag") != v.tag:
        return ""
    if t.get("delivery-image-digest"):
        return t["delivery-image-digest"]
    m = _BODY_DIGEST_RE.search(res.out)
    return m.group(1) if m else ""


def rollbacks_since(repo: git.Repo, *, app: str, environment: str, since: datetime,
                    branch: str | None = None) -> list[tuple[str, datetime]]:
    """(sha, commit time) of the pipeline's rollback commits for `app` in `environment` made after
    `since`, newest first: each one means a release there failed its verification (or was rolled back
    by hand). Filtered by trailers as `deployed_source_commit` is."""
    workdir = _workdir(repo)
    rev = _history_rev(workdir, branch, fetch=False)
    out = _run(workdir, "log", "--fixed-strings", "--all-match", f"--grep={PIPELINE_TRAILER}: rollback",
               f"--grep=Delivery-App: {app}", f"--grep=Delivery-Environment: {environment}",
               f"--since={int(since.timestamp())}", "--format=%H%x1f%ct%x1f%B%x1e", rev).out
    found = []
    for record in out.split("\x1e"):
        parts = record.strip().split("\x1f", 2)
        if len(parts) != 3:
            continue
        sha, stamp, body = parts
        t = trailer_map(body)
        if t.get(PIPELINE_TRAILER.lower()) == "rollback" and t.get("delivery-app") == app and \
                t.get("delivery-environment") == environment:
            when = datetime.fromtimestamp(int(stamp), UTC)
            if when > since:
                found.append((sha, when))
    return found


@task(name="record-verified", cache_policy=NO_CACHE)
def record_verified_task(repo: git.Repo, commit_sha: str, app: str, environment: str, tag: str,
                         digest: str = "") -> None:
    """No task retries: `record_verified` bounds its own push retries."""
    record_verified(repo, commit_sha, app=app, environment=environment, tag=tag, digest=digest)
